//! Review of the init-time md clear (commit a9d0903, `clear_md_area`): can an old store's
//! metadata come back after a re-init? Method: the crash bdev under the simulation; store A
//! with blobs, unloaded (durable); then `Blobstore::init` of store B over it, with the
//! power cut once B's super block write has completed, keeping a subset of the writes not
//! yet flushed that the crash bdev's fault model allows (each pending write independently
//! reached the media or not); then a load of what is left.

mod common;

use std::sync::Arc;

use common::create_thick;
use spool_bdev::{Bdev, BdevDesc, CrashBdev};
use spool_blob::{Blobstore, InitOptions, LoadOptions};
use spool_reactor::{RemoteHandle, Sim, SimOptions};

/// Steps `sim` until `handle` has its result (or `until` says stop first).
fn drive<T>(sim: &mut Sim, handle: &RemoteHandle<T>, mut until: impl FnMut() -> bool) -> Option<T> {
    loop {
        if until() {
            return None;
        }
        if let Some(result) = handle.try_take() {
            return Some(result.expect("task"));
        }
        assert!(sim.step(), "the simulation stalled");
    }
}

/// What is wrong: `Blobstore::init` clears the md area (an unmap, or write-zeroes), unmaps
/// the data area, writes the new super block (clean = 0) and only then flushes: nothing
/// orders the clear before the super block. A power cut before that flush may keep the new
/// super block and lose the clear (a volatile write cache reorders them; the crash bdev's
/// model allows exactly this subset). The next load finds a dirty super block, replays
/// every md page, and the old store's blobs are back in the new store, owning its clusters.
/// (Not a regression of a9d0903: the old `zero_bytes` clear had the same order; SPDK's init
/// has no flush there either. But it is the "old metadata comes back after re-init" case.)
///
/// What should happen: the clear is durable before the super block that makes the area a
/// store's md area is written (flush between them), so any cut leaves either the old store,
/// no store, or an empty new one.
#[test]
fn a_power_cut_during_reinit_never_brings_the_old_blobs_back() {
    let bdev = Arc::new(CrashBdev::new("reinit", 4096, 4096).expect("crash bdev"));
    // Store A: three blobs, unloaded clean (everything durable).
    {
        let desc = BdevDesc::open(Arc::clone(&bdev) as Arc<dyn Bdev>).expect("open");
        let mut sim = Sim::new(SimOptions {
            seed: 1,
            reactors: 1,
        });
        let reactor = sim.reactors()[0];
        let handle = sim
            .spawn_on(reactor, move || async move {
                let store = Blobstore::init(desc, &InitOptions::default())
                    .await
                    .expect("init A");
                for _ in 0..3 {
                    create_thick(&store, 1).await;
                }
                store.unload().await.expect("unload A");
            })
            .expect("spawn");
        drive(&mut sim, &handle, || false).expect("store A made");
        sim.stop();
        assert!(bdev.pending_writes().is_empty(), "A is durable");
    }
    // Store B over it; cut once B's super block write (4 KiB at 0) has completed.
    let image = {
        let desc = BdevDesc::open(Arc::clone(&bdev) as Arc<dyn Bdev>).expect("open");
        let mut sim = Sim::new(SimOptions {
            seed: 2,
            reactors: 1,
        });
        let reactor = sim.reactors()[0];
        let handle = sim
            .spawn_on(reactor, move || async move {
                let store = Blobstore::init(desc, &InitOptions::default())
                    .await
                    .expect("init B");
                drop(store);
            })
            .expect("spawn");
        let probe = Arc::clone(&bdev);
        let super_written = move || {
            probe
                .pending_writes()
                .iter()
                .any(|w| w.offset_bytes == 0 && w.len_bytes == 4096)
        };
        let finished = drive(&mut sim, &handle, super_written);
        assert!(
            finished.is_none(),
            "init B ended before its super block write was seen"
        );
        let pending = bdev.pending_writes();
        // The new super block reached the media; the md clear before it did not.
        let image = bdev.cut_power(|w| w.offset_bytes == 0 && w.len_bytes == 4096);
        std::mem::forget(sim);
        // Before the fix the clear was still pending here (and lost by the cut); with it, it
        // was flushed before the super block write, so only that write is pending.
        let _ = pending;
        image
    };
    let bdev = Arc::new(CrashBdev::from_image("after-cut", 4096, &image).expect("image"));
    let desc = BdevDesc::open(bdev as Arc<dyn Bdev>).expect("open");
    let mut sim = Sim::new(SimOptions {
        seed: 3,
        reactors: 1,
    });
    let reactor = sim.reactors()[0];
    let handle = sim
        .spawn_on(reactor, move || async move {
            let (store, report) = Blobstore::load(desc, &LoadOptions::default())
                .await
                .expect("load after the cut");
            let ids = store.blob_ids();
            (report.recovered, ids)
        })
        .expect("spawn");
    let (recovered, ids) = drive(&mut sim, &handle, || false).expect("loaded");
    assert!(
        ids.is_empty(),
        "after a power cut during re-init, the new store (recovered: {recovered}) holds the \
         old store's blobs {ids:x?}"
    );
}
