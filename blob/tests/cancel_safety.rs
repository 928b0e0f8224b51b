//! Goal: dropping any engine future at any of its await points leaves nothing behind (the
//! rule in docs/architecture.md, "Cancellation and panic safety"): later I/O to the same
//! clusters completes, the free clusters and md pages in memory equal what a fresh load of the
//! device computes, no freeze is left on (a resize and a snapshot after work), and the store
//! unloads.
//! Method: under the deterministic simulation (two reactors, the metadata reactor and an I/O
//! reactor, several seeds), each operation on a fresh copy of the base image is polled `n`
//! times with a waker of the test's own (the simulation runs between polls) and then dropped,
//! for every `n` until it completes within `n` polls; then the checks run.
//! Also the regression test of issue 16 item 1 (a thin write dropped during its allocation).

mod cancel;
mod common;
mod cuts;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use cancel::{poll_then_drop, within, Dropped};
use common::{buf_of, create_thin, malloc, pattern};
use cuts::{base_image, Ids, CLUSTER};
use spool_bdev::{Bdev, BdevDesc, DmaBuf, MallocBdev};
use spool_blob::{BlobIo, Blobstore, InitOptions, LoadOptions};
use spool_reactor::{RemoteHandle, Sim, SimOptions};

/// Steps the simulation until `handle` has its result, at most `steps` steps.
fn run_bounded<T>(sim: &mut Sim, handle: &RemoteHandle<T>, steps: u64) -> Option<T> {
    for _ in 0..steps {
        if let Some(result) = handle.try_take() {
            return Some(result.expect("the scenario task failed"));
        }
        if !sim.step() {
            break;
        }
    }
    handle
        .try_take()
        .map(|result| result.expect("the scenario task failed"))
}

/// How long (virtual time) a later I/O may take before it counts as wedged.
const WEDGED: Duration = Duration::from_millis(500);

/// Issue 16 item 1: a thin first write dropped while its cluster is being allocated (after
/// its first poll: the cluster is claimed, its fill is on the device) must leave no entry in
/// the channel's allocation map (a later write to the same cluster completes) and no claimed
/// cluster (one cluster allocated in all). Before the fix the second write waited forever and
/// the free count fell by two.
#[test]
fn thin_write_dropped_during_allocation_leaves_no_wedge_or_leak() {
    for seed in 0..6u64 {
        for (where_, on_md) in [("metadata reactor", true), ("I/O reactor", false)] {
            for polls in [1usize, 2] {
                let mut sim = Sim::new(SimOptions { seed, reactors: 2 });
                let reactors = sim.reactors();
                let (md, other) = (reactors[0], reactors[1]);
                let on = if on_md { md } else { other };
                let (_bdev, desc) = malloc(32 << 20);
                let handle = sim
                    .spawn_on(md, move || async move {
                        let store = Blobstore::init(desc, &InitOptions::default())
                            .await
                            .map_err(|err| err.to_string())?;
                        let id = create_thin(&store, 4).await;
                        let blob = store.open_blob(id).await.map_err(|err| err.to_string())?;
                        let free = store.free_cluster_count();
                        let io = blob.io();
                        let first = Arc::clone(&io);
                        // One channel for both writes (the allocation map is the channel's).
                        let (dropped, second) = spool_reactor::spawn_on(on, move || async move {
                            let channel = first.channel().expect("channel");
                            let write = channel.write(&first, 256, buf_of(&pattern(1, 4096)));
                            let seen = poll_then_drop(write, polls, WEDGED).await;
                            // Whatever the dropped write started finishes on its own.
                            spool_reactor::sleep(Duration::from_millis(50)).await;
                            let write = channel.write(&first, 264, buf_of(&pattern(2, 4096)));
                            let second = within(write, WEDGED).await.map(|(result, _)| result.is_ok());
                            (matches!(seen, Dropped::Completed(_)), second)
                        })
                        .map_err(|err| err.to_string())?
                        .await
                        .map_err(|err| err.to_string())?;
                        let after = store.free_cluster_count();
                        let allocated = blob.num_allocated_clusters();
                        blob.close().await.map_err(|err| err.to_string())?;
                        store.unload().await.map_err(|err| err.to_string())?;
                        Ok::<_, String>((dropped, second, free, after, allocated))
                    })
                    .unwrap();
                let what = format!("seed {seed}, dropped on the {where_} after {polls} poll(s)");
                let (completed, second, free, after, allocated) =
                    run_bounded(&mut sim, &handle, 5_000_000)
                        .unwrap_or_else(|| panic!("{what}: the scenario never finished"))
                        .unwrap_or_else(|err| panic!("{what}: {err}"));
                if completed {
                    continue; // nothing was dropped
                }
                assert_eq!(
                    second,
                    Some(true),
                    "{what}: a later write to the same cluster is still pending"
                );
                assert_eq!(allocated, 1, "{what}: clusters allocated");
                assert_eq!(
                    after,
                    free - 1,
                    "{what}: free clusters {free} before, {after} after one allocation"
                );
                sim.stop();
            }
        }
    }
}
