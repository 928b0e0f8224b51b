//! Third review of issue 20: what remains after the first two reviews' fixes.
//! Each test fails on the code it was written against; each names its sequence.

mod common;
mod cuts;

use std::sync::Arc;

use common::{buf_of, pattern, read};
use cuts::{base_image, CLUSTER};
use spool_bdev::{Bdev, BdevDesc, CrashBdev, ErrorBdev, ErrorRule, IoKind};
use spool_blob::{Blobstore, LoadOptions};

/// A crash device behind an error injector, holding `base`.
fn faulty(base: &[u8]) -> (Arc<CrashBdev>, Arc<ErrorBdev>, BdevDesc) {
    let crash = Arc::new(CrashBdev::from_image("crash", 4096, base).unwrap());
    let errors = Arc::new(ErrorBdev::new(
        "faulty",
        Arc::clone(&crash) as Arc<dyn Bdev>,
    ));
    let desc = BdevDesc::open(Arc::clone(&errors) as Arc<dyn Bdev>).unwrap();
    (crash, errors, desc)
}

/// Byte range of the md page that is the root of blob `id`.
fn root_range(store: &Blobstore, id: u64) -> std::ops::Range<u64> {
    let page = (id & 0xffff_ffff) + store.geometry().md_start;
    page * 4096..(page + 1) * 4096
}

/// A delete-with-merge of S into its clone C whose last steps fail (the zeroing of S's
/// root): C owns S's cluster on disk, S is still there marked `SNAPRM` = C, the power goes.
/// The next load finishes the merge: `forget_merged_clusters` opens C to learn which of
/// S's clusters C took, but treats any error opening C (here one failed read of C's root)
/// as "C has none", so S is deleted with every cluster its root names, C's included: the
/// running store hands out a cluster C maps, and C's data is overwritten.
#[test]
fn a_read_error_in_the_load_time_merge_repair_frees_the_clones_clusters() {
    let (base, ids) = base_image();
    // The interrupted merge: S's root zeroing fails, the power goes with everything kept.
    let (crash, errors, desc) = faulty(&base);
    let probe = Arc::clone(&crash);
    let merged = cuts::run_sim(31, move || async move {
        let (store, _) = Blobstore::load(desc, &LoadOptions::default())
            .await
            .unwrap();
        // First write to S's root: the SNAPRM mark; the second: its zeroing.
        let rule = errors.add_rule(
            ErrorRule::new(-libc::EIO)
                .kinds(&[IoKind::Write, IoKind::WriteZeroes])
                .range_bytes(root_range(&store, ids.s))
                .nth(2),
        );
        let deleted = store.delete_blob(ids.s).await.map_err(|e| e.to_string());
        let fired = errors.rule_stats(rule).unwrap().injected;
        let c_root = root_range(&store, ids.c);
        std::mem::forget(store);
        (deleted, fired, c_root, probe.cut_power_keep_all())
    });
    let (deleted, fired, c_root, image) = merged;
    assert!(
        fired == 1 && deleted.is_err(),
        "the zeroing did not fail: {deleted:?}"
    );
    let mut broken = Vec::new();
    for n in 1..8u64 {
        let (_crash, errors, desc) = faulty(&image);
        let c_root = c_root.clone();
        let out = cuts::run_sim(32, move || async move {
            let rule_errors = Arc::clone(&errors);
            let root = c_root.clone();
            let rule = rule_errors.add_rule(
                ErrorRule::new(-libc::EIO)
                    .kinds(&[IoKind::Read])
                    .range_bytes(root)
                    .nth(n),
            );
            let loaded = Blobstore::load(desc, &LoadOptions::default()).await;
            let fired = rule_errors.rule_stats(rule).unwrap().injected > 0;
            rule_errors.remove_rule(rule);
            let (store, report) = match loaded {
                Ok(loaded) => loaded,
                Err(_) => return (fired, Vec::new()),
            };
            let mut broken = Vec::new();
            let c = match store.open_blob(ids.c).await {
                Ok(c) => c,
                Err(err) => {
                    broken.push(format!(
                        "read #{n} of C's root failed during the load ({:?}): C does not open: {err}",
                        report.repaired
                    ));
                    return (fired, broken);
                }
            };
            let used = store.used_clusters();
            for cluster in c.cluster_map().into_iter().filter(|&x| x != 0) {
                if !used.contains(&u64::from(cluster)) {
                    broken.push(format!(
                        "read #{n} of C's root failed during the load ({:?}): cluster {cluster} of C is free in the loaded store",
                        report.repaired
                    ));
                }
            }
            // Whoever gets the free clusters next overwrites C's data.
            let free = store.free_cluster_count();
            let filler = common::create_thick(&store, free).await;
            let channel = store.channel().unwrap();
            let f = store.open_blob(filler).await.unwrap();
            for at in 0..free {
                channel
                    .write(&f.io(), at * 16, buf_of(&pattern(99, CLUSTER as usize)))
                    .await
                    .0
                    .unwrap();
            }
            let back = read(&channel, &c.io(), 0, CLUSTER as usize - 4096).await;
            if back != pattern(3, CLUSTER as usize)[..CLUSTER as usize - 4096] {
                broken.push(format!(
                    "read #{n} of C's root failed during the load: C lost its data"
                ));
            }
            (fired, broken)
        });
        let (fired, found) = out;
        broken.extend(found);
        if !fired {
            break;
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

/// Two thin first writes into one extent page are carried by one persist whose in-place
/// write fails: both inserts stay in the map as "kept" (`kept_inserts`: "their writer has
/// gone"). But only the writer that ran that persist got its error; the other was waiting
/// for it, wakes and runs the next persist itself. When that one fails before its commit
/// (its barrier flush), `undo_failed_persist` releases the cluster as kept, and the waiting
/// writer, seeing its cluster out of the map, releases it again. Between the two releases a
/// thin write of another blob (any reactor) can take the cluster: the second release then
/// frees a cluster that blob maps, and the next claim hands it out a second time. The store
/// counts releases of a cluster already free (`testing_clusters_released_twice`).
#[test]
fn a_waiting_writer_and_the_kept_list_both_release_one_cluster() {
    let (base, ids) = base_image();
    let mut broken = Vec::new();
    for seed in 0..2u64 {
        let (crash, errors, desc) = faulty(&base);
        let probe = Arc::clone(&crash);
        let out = cuts::run_sim(seed, move || async move {
            let (store, _) = Blobstore::load(desc, &LoadOptions::default())
                .await
                .unwrap();
            let md_end = store.geometry().md_clusters * CLUSTER;
            let b = store.open_blob(ids.b).await.unwrap();
            let io = b.io();
            // The chain is this process's now: later inserts rewrite the extent page in place.
            let first = io.channel().unwrap();
            first
                .write(&io, 1, buf_of(&pattern(80, 4096)))
                .await
                .0
                .unwrap();
            drop(first);
            // The in-place write of the persist carrying both inserts fails, then the next
            // persist's barrier flush.
            errors.add_rule(
                ErrorRule::new(-libc::EIO)
                    .kinds(&[IoKind::Write, IoKind::WriteZeroes])
                    .range_bytes(0..md_end)
                    .nth(3),
            );
            errors.add_rule(ErrorRule::new(-libc::EIO).kinds(&[IoKind::Flush]).nth(3));
            // A persist of B (an xattr change) holds its lock while both inserts arrive.
            let xattr = b.clone();
            let sync = spool_reactor::spawn_local(async move {
                xattr.set_xattr("big", &[7u8; 3000]).unwrap();
                xattr.set_xattr("big2", &[8u8; 3000]).unwrap();
                xattr.sync_md().await.map_err(|e| e.to_string())
            });
            let writes: Vec<spool_reactor::JoinHandle<Result<(), String>>> = [2u64, 3]
                .into_iter()
                .map(|cluster| {
                    let io = Arc::clone(&io);
                    spool_reactor::spawn_local(async move {
                        let channel = io.channel().unwrap();
                        channel
                            .write(&io, cluster * 16 + 1, buf_of(&pattern(80 + cluster, 4096)))
                            .await
                            .0
                            .map_err(|e| e.to_string())
                    })
                })
                .collect();
            let mut results = vec![sync.await];
            for w in writes {
                results.push(w.await);
            }
            errors.clear_rules();
            drop(io);
            b.close().await.unwrap();
            let twice = store.testing_clusters_released_twice();
            let free = store.free_cluster_count();
            let image = probe.live_image();
            store.unload().await.unwrap();
            (results, twice, free, image)
        });
        let (results, twice, free, image) = out;
        assert!(
            matches!(results[1], Ok(Err(_))) && matches!(results[2], Ok(Err(_))),
            "seed {seed}: the faults did not hit both writes: {results:?}"
        );
        if twice != 0 {
            broken.push(format!(
                "seed {seed}: {twice} cluster(s) released while already free ({results:?})"
            ));
        }
        let (load_free, _) = loaded_counts(&image);
        if load_free != free {
            broken.push(format!(
                "seed {seed}: {free} free clusters in memory, a load computes {load_free}"
            ));
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

/// Free clusters and used md pages a load of `image` computes.
fn loaded_counts(image: &[u8]) -> (u64, Vec<u64>) {
    let bdev = Arc::new(spool_bdev::MallocBdev::from_image("count", 4096, image).unwrap());
    let desc = BdevDesc::open(bdev as Arc<dyn Bdev>).unwrap();
    cuts::run_sim(4, move || async move {
        let (store, _) = Blobstore::load(desc, &LoadOptions::default())
            .await
            .unwrap();
        let counts = (store.free_cluster_count(), store.used_md_pages());
        store.unload().await.unwrap();
        counts
    })
}

/// A persist that moves an extent page (the chain changes: here an xattr change carried
/// with a thin insert) claims the new page and points the blob's extent table at it before
/// it claims the continuation pages; when one of those claims fails (every md page in
/// use: -ENOMEM), the claimed pages are given back but the extent table still names the
/// moved page, and the dirty mark of that extent page is gone. The next persist writes a
/// root naming a page that was never written (or that another blob now owns): after a load
/// the blob no longer opens, and its data is lost.
#[test]
fn a_persist_that_runs_out_of_md_pages_leaves_the_extent_table_on_a_released_page() {
    let bdev = Arc::new(spool_bdev::MallocBdev::new("md", 4096, (8 << 20) / 4096).unwrap());
    let desc = BdevDesc::open(Arc::clone(&bdev) as Arc<dyn Bdev>).unwrap();
    let (x, failed) = cuts::run_sim(41, move || async move {
        let store = Blobstore::init(
            desc,
            &spool_blob::InitOptions {
                cluster_size: CLUSTER,
                md_pages: Some(16),
                ..spool_blob::InitOptions::default()
            },
        )
        .await
        .unwrap();
        let channel = store.channel().unwrap();
        let x = common::create_thin(&store, 4).await;
        let blob = store.open_blob(x).await.unwrap();
        channel
            .write(&blob.io(), 0, buf_of(&pattern(60, CLUSTER as usize)))
            .await
            .0
            .unwrap();
        // Fill the md region but one page.
        let mut fillers = Vec::new();
        while 16 - store.used_md_pages().len() > 1 {
            fillers.push(common::create_thin(&store, 0).await);
        }
        // Two pages' worth of xattrs and a thin insert: the extent page moves (the last
        // free page), the continuation page finds none.
        blob.set_xattr("big", &[7u8; 3000]).unwrap();
        blob.set_xattr("big2", &[8u8; 3000]).unwrap();
        let failed = channel
            .write(&blob.io(), 16, buf_of(&pattern(61, 4096)))
            .await
            .0
            .map_err(|e| e.to_string());
        // Room again: the next persist succeeds.
        store.delete_blob(fillers.pop().unwrap()).await.unwrap();
        store.delete_blob(fillers.pop().unwrap()).await.unwrap();
        blob.sync_md().await.unwrap();
        drop(channel);
        blob.close().await.unwrap();
        store.unload().await.unwrap();
        (x, failed)
    });
    assert!(failed.is_err(), "the md pages did not run out: {failed:?}");
    let image = bdev.snapshot();
    let back = cuts::run_sim(42, move || async move {
        let (store, _) = Blobstore::load(
            BdevDesc::open(
                Arc::new(spool_bdev::MallocBdev::from_image("b", 4096, &image).unwrap())
                    as Arc<dyn Bdev>,
            )
            .unwrap(),
            &LoadOptions::default(),
        )
        .await
        .unwrap();
        let blob = match store.open_blob(x).await {
            Ok(blob) => blob,
            Err(err) => return Err(format!("the blob does not open after a load: {err}")),
        };
        let channel = store.channel().unwrap();
        let data = read(&channel, &blob.io(), 0, CLUSTER as usize).await;
        if data != pattern(60, CLUSTER as usize) {
            return Err("the blob lost its cluster 0".into());
        }
        Ok(())
    });
    back.unwrap();
}

type Ids = cuts::Ids;
type CutOp = cuts::subsets::Op;

/// Writes `data` at io_unit `unit` of blob `id` (open for the call).
async fn write_at(store: &Blobstore, id: u64, unit: u64, data: &[u8]) {
    let blob = store.open_blob(id).await.unwrap();
    let channel = store.channel().unwrap();
    channel
        .write(&blob.io(), unit, buf_of(data))
        .await
        .0
        .unwrap();
    drop(channel);
    blob.close().await.unwrap();
}

/// Marks blob `id` "flushed" once the data written so far is durable: a flush, then the
/// xattr (a later root write: if it is on disk, so is the data).
async fn mark_flushed(store: &Blobstore, id: u64) {
    store.channel().unwrap().flush().await.unwrap();
    let blob = store.open_blob(id).await.unwrap();
    blob.set_xattr("flushed", b"1").unwrap();
    blob.close().await.unwrap();
}

/// The checks of `cuts::check`, plus: a blob marked "flushed" reads back pattern 40 in
/// every cluster listed in its xattr `keep` (u64 LE cluster indexes).
fn flushed_data_reads_back(image: Vec<u8>, _ids: Ids, what: &str) {
    let bdev = Arc::new(spool_bdev::MallocBdev::from_image("x", 4096, &image).unwrap());
    let desc = BdevDesc::open(bdev as Arc<dyn Bdev>).unwrap();
    let what = what.to_string();
    cuts::run_sim(5, move || async move {
        let (store, _) = Blobstore::load(desc, &LoadOptions::default())
            .await
            .unwrap();
        let channel = store.channel().unwrap();
        for id in store.blob_ids() {
            let blob = store.open_blob(id).await.unwrap();
            if blob.xattr("flushed").is_some() {
                let keep = blob.xattr("keep").unwrap_or_default();
                for index in keep.chunks_exact(8) {
                    let index = u64::from_le_bytes(index.try_into().unwrap());
                    let back = read(&channel, &blob.io(), index * 16, CLUSTER as usize).await;
                    assert!(
                        back == pattern(40, CLUSTER as usize),
                        "{what}: blob {id:#x} lost flushed cluster {index}"
                    );
                }
            }
            blob.close().await.unwrap();
        }
        drop(channel);
        store.unload().await.unwrap();
    });
}

/// A blob of `num_clusters` in `form` with clusters `written` holding pattern 40, flushed,
/// and listed in its xattr `keep`.
async fn flushed_blob(
    store: &Blobstore,
    num_clusters: u64,
    form: spool_blob::ExtentForm,
    written: &[u64],
) -> u64 {
    let id = store
        .create_blob(&spool_blob::BlobOptions {
            num_clusters,
            thin: true,
            form,
            xattrs: vec![(
                "keep".into(),
                written.iter().flat_map(|c| c.to_le_bytes()).collect(),
            )],
            ..spool_blob::BlobOptions::default()
        })
        .await
        .unwrap();
    for &cluster in written {
        write_at(store, id, cluster * 16, &pattern(40, CLUSTER as usize)).await;
    }
    mark_flushed(store, id).await;
    id
}

/// Sequences no earlier crash test cuts: RLE snapshots and merges, a decouple in a chain
/// of three, a table blob over two extent pages shrunk and grown. Every cut keeps all, none,
/// each pending write alone, and all but each; data flushed before the cut reads back.
///
/// Each of the three fails the same way: a thin write's insert rewrites the original's root
/// (or an extent page it names) with no flush after it; the snapshot taken next writes S's
/// root with the map (the new cluster included) with no flush before it. A cut keeping S's
/// root but not the original's leaves S naming a cluster the original does not; the load
/// removes S as a snapshot never taken, freeing only its own md pages (the rest "is the
/// original's"): the cluster is leaked for good.
#[test]
fn more_sequences_with_flushed_data_survive_every_cut() {
    let sequences: [(&str, CutOp); 3] = [
        ("RLE: snapshot, copy-on-write, merge, shrink", |store, _| {
            Box::pin(async move {
                let n = flushed_blob(&store, 4, spool_blob::ExtentForm::Rle, &[2]).await;
                write_at(&store, n, 0, &pattern(41, 4096)).await;
                let s2 = store.create_snapshot(n, &[]).await.unwrap();
                write_at(&store, n, 1, &pattern(42, 4096)).await;
                store.delete_blob(s2).await.unwrap();
                let blob = store.open_blob(n).await.unwrap();
                blob.resize(3).await.unwrap();
                blob.close().await.unwrap();
            })
        }),
        (
            "a chain of three: decouple, delete both snapshots (the second a merge)",
            |store, ids| {
                Box::pin(async move {
                    let s2 = store.create_snapshot(ids.c, &[]).await.unwrap();
                    write_at(&store, ids.c, 16 + 3, &pattern(43, 4096)).await;
                    let s3 = store.create_snapshot(ids.c, &[]).await.unwrap();
                    store.decouple_parent(ids.c).await.unwrap();
                    store.delete_blob(s3).await.unwrap();
                    store.delete_blob(s2).await.unwrap();
                })
            },
        ),
        (
            "two extent pages: shrink, grow, write, snapshot",
            |store, _| {
                Box::pin(async move {
                    let n =
                        flushed_blob(&store, 1200, spool_blob::ExtentForm::Table, &[0, 600]).await;
                    let blob = store.open_blob(n).await.unwrap();
                    blob.set_xattr("keep", &0u64.to_le_bytes()).unwrap();
                    blob.resize(500).await.unwrap();
                    blob.sync_md().await.unwrap();
                    blob.resize(1200).await.unwrap();
                    blob.close().await.unwrap();
                    write_at(&store, n, 700 * 16, &pattern(44, 4096)).await;
                    store.create_snapshot(n, &[]).await.unwrap();
                })
            },
        ),
    ];
    let mut all = Vec::new();
    for (name, op) in sequences {
        all.extend(cuts::subsets::crash_failures(
            name,
            op,
            flushed_data_reads_back,
        ));
    }
    cuts::subsets::assert_none("more sequences with flushed data", all);
}
