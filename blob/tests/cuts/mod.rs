//! The base image and the checks the crash and error tests share (included with
//! `mod cuts;`): a store with a thick blob, a thin blob, and a snapshot with one clone, and
//! a check that an image loads with every blob opening, no cluster owned twice, none leaked,
//! and the base data intact.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;

pub mod subsets;

use crate::common::{buf_of, create_thick, create_thin, pattern, read};
use spool_bdev::{Bdev, BdevDesc, MallocBdev};
use spool_blob::{Blobstore, InitOptions, LoadOptions};
use spool_reactor::{Sim, SimOptions};

pub const CLUSTER: u64 = 64 << 10;
/// Xattr of a blob an operation makes: the io_units (u64 LE each) it writes; all others
/// must read zeros after any cut.
pub const ZEROS_EXCEPT: &str = "crash.zeros_except";
pub const DEVICE: u64 = 8 << 20;

/// The blobs the base image holds: A thick (2 clusters, pattern 1), B thin (4 clusters,
/// cluster 1 written with pattern 2), S a snapshot of C, C a clone (C's cluster 0 written).
#[derive(Debug, Clone, Copy)]
pub struct Ids {
    pub a: u64,
    pub b: u64,
    pub s: u64,
    pub c: u64,
}

pub fn run_sim<F, Fut, T>(seed: u64, make: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
    T: Send + 'static,
{
    let mut sim = Sim::new(SimOptions { seed, reactors: 1 });
    let reactor = sim.reactors()[0];
    let out = sim.block_on(reactor, make).unwrap();
    sim.stop();
    out
}

pub fn base_image() -> (Vec<u8>, Ids) {
    let bdev = Arc::new(MallocBdev::new("base", 4096, DEVICE / 4096).unwrap());
    let desc = BdevDesc::open(Arc::clone(&bdev) as Arc<dyn Bdev>).expect("open bdev");
    let ids = run_sim(1, move || async move {
        let store = Blobstore::init(
            desc,
            &InitOptions {
                cluster_size: CLUSTER,
                ..InitOptions::default()
            },
        )
        .await
        .unwrap();
        let channel = store.channel().unwrap();
        let a = create_thick(&store, 2).await;
        let blob = store.open_blob(a).await.unwrap();
        channel
            .write(&blob.io(), 0, buf_of(&pattern(1, 2 * CLUSTER as usize)))
            .await
            .0
            .unwrap();
        blob.close().await.unwrap();
        let b = create_thin(&store, 4).await;
        let blob = store.open_blob(b).await.unwrap();
        channel
            .write(&blob.io(), 16, buf_of(&pattern(2, CLUSTER as usize)))
            .await
            .0
            .unwrap();
        blob.close().await.unwrap();
        let c = create_thin(&store, 2).await;
        let blob = store.open_blob(c).await.unwrap();
        channel
            .write(&blob.io(), 0, buf_of(&pattern(3, CLUSTER as usize)))
            .await
            .0
            .unwrap();
        blob.close().await.unwrap();
        let s = store.create_snapshot(c, &[]).await.unwrap();
        drop(channel);
        store.unload().await.unwrap();
        Ids { a, b, s, c }
    });
    (bdev.snapshot(), ids)
}

/// The ranges each blob must read back (if it still exists): A's two clusters, B's cluster 1,
/// C's (and S's) cluster 0, as the base image wrote them. Other ranges may have changed.
pub fn expected(ids: Ids, id: u64) -> Vec<(usize, Vec<u8>)> {
    let cluster = CLUSTER as usize;
    if id == ids.a {
        vec![(0, pattern(1, 2 * cluster))]
    } else if id == ids.b {
        vec![(cluster, pattern(2, cluster))]
    } else if id == ids.s {
        vec![(0, pattern(3, cluster))]
    } else if id == ids.c {
        // The last 4 KiB is what the copy-on-write test writes.
        vec![(0, pattern(3, cluster - 4096))]
    } else {
        Vec::new() // a blob the operation made: its content is checked by its own tests
    }
}

/// Loads `image` and checks the invariants; returns the number of blobs.
/// Runs `spool check`'s checker on `image` (written to a temporary file): a crash may leave
/// only what a load repairs (a half-made snapshot, whose original may already read through
/// it, or a half-done merge); anything else is a problem the checker must not report on a
/// store Spool left, or a store Spool should not leave.
pub fn offline_check(image: &[u8], what: &str) {
    use spool_blob::check::check_image;
    let mut file = tempfile::tempfile().unwrap();
    std::io::Write::write_all(&mut file, image).unwrap();
    let checked = check_image(&file, &mut |_| {})
        .unwrap_or_else(|err| panic!("{what}: the checker cannot run: {err}"));
    let unexpected: Vec<String> = checked
        .report
        .beyond_crash_repair()
        .map(|p| p.to_string())
        .collect();
    assert!(
        unexpected.is_empty(),
        "{what}: spool check finds problems in a store Spool left: {unexpected:#?}"
    );
}

pub fn check(image: Vec<u8>, ids: Ids, what: &str) -> usize {
    offline_check(&image, what);
    let bdev = Arc::new(MallocBdev::from_image("check", 4096, &image).unwrap());
    let desc = BdevDesc::open(bdev as Arc<dyn Bdev>).expect("open bdev");
    let what = what.to_string();
    run_sim(2, move || async move {
        let (store, _report) = Blobstore::load(desc, &LoadOptions::default())
            .await
            .unwrap_or_else(|err| panic!("{what}: the store does not load: {err}"));
        let channel = store.channel().unwrap();
        let mut owned: BTreeSet<u64> = BTreeSet::new();
        let ids_now = store.blob_ids();
        for &id in &ids_now {
            let blob = store
                .open_blob(id)
                .await
                .unwrap_or_else(|err| panic!("{what}: blob {id:#x} does not open: {err}"));
            for cluster in blob.cluster_map().into_iter().filter(|&c| c != 0) {
                assert!(
                    owned.insert(u64::from(cluster)),
                    "{what}: cluster {cluster} owned twice"
                );
            }
            if let Some(listed) = blob.xattr(ZEROS_EXCEPT) {
                // A blob the operation made: every unit it did not write reads zeros (never a
                // released cluster's old data).
                let skip: Vec<u64> = listed
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                let units = blob.num_clusters() * CLUSTER / 4096;
                for unit in (0..units).filter(|u| !skip.contains(u)) {
                    let back = read(&channel, &blob.io(), unit, 4096).await;
                    assert!(
                        back.iter().all(|&b| b == 0),
                        "{what}: blob {id:#x} unit {unit} shows old data instead of zeros"
                    );
                }
            }
            for (at, data) in expected(ids, id) {
                if (at + data.len()) as u64 <= blob.num_clusters() * CLUSTER {
                    let back = read(&channel, &blob.io(), at as u64 / 4096, data.len()).await;
                    assert!(back == data, "{what}: blob {id:#x} lost data at byte {at}");
                }
            }
            blob.close().await.unwrap();
        }
        let md = store.geometry().md_clusters;
        let used: BTreeSet<u64> = store
            .used_clusters()
            .into_iter()
            .filter(|&c| c >= md)
            .collect();
        assert_eq!(used, owned, "{what}: leaked (or unaccounted) clusters");
        assert!(
            ids_now.contains(&ids.a) && ids_now.contains(&ids.b),
            "{what}: a blob vanished"
        );
        drop(channel);
        store.unload().await.unwrap();
        ids_now.len()
    })
}
