//! Review of issue 20: sequences that the crash and error sweeps do not try.
//! Each cut is tried with deterministic subsets of the pending writes: all, none, each
//! single write alone, and all but each single write.

mod common;
mod cuts;

use cuts::subsets::{assert_none, crash_failures, no_extra, panic_text, record_panics, LAST_PANIC};
use cuts::{base_image, check, Ids, CLUSTER};

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use common::{buf_of, create_thin, pattern};
use spool_bdev::{Bdev, BdevDesc, CrashBdev};
use spool_blob::{Blobstore, LoadOptions};

/// A thin blob X with cluster 0 written and flushed; returns its id.
async fn written_thin(store: &Blobstore) -> u64 {
    let x = create_thin(store, 2).await;
    let blob = store.open_blob(x).await.unwrap();
    let channel = store.channel().unwrap();
    channel
        .write(&blob.io(), 0, buf_of(&pattern(41, CLUSTER as usize)))
        .await
        .0
        .unwrap();
    channel.flush().await.unwrap();
    drop(channel);
    blob.close().await.unwrap();
    x
}

/// Snapshot X, then delete X at once: the snapshot's last root write (SNAPTMP removed) is
/// not flushed before X's root is zeroed; a cut keeping the zeroing only makes the load
/// repair treat the snapshot as "never taken" and delete it: its clusters leak and the
/// acknowledged snapshot is gone.
#[test]
fn snapshot_then_delete_original() {
    let failures = crash_failures(
        "snapshot then delete original",
        |store, _| {
            Box::pin(async move {
                let x = written_thin(&store).await;
                store.create_snapshot(x, &[]).await.unwrap();
                store.delete_blob(x).await.unwrap();
            })
        },
        no_extra,
    );
    assert_none("snapshot then delete original", failures);
}

/// Snapshot X, clone the snapshot, delete X: a cut keeping the clone's root and X's
/// zeroing, but not the snapshot's finished root, deletes the snapshot at load and leaves
/// the clone naming a parent that does not exist.
#[test]
fn snapshot_clone_then_delete_original() {
    let failures = crash_failures(
        "snapshot, clone, delete original",
        |store, _| {
            Box::pin(async move {
                let x = written_thin(&store).await;
                let s = store.create_snapshot(x, &[]).await.unwrap();
                store.create_clone(s, &[]).await.unwrap();
                store.delete_blob(x).await.unwrap();
            })
        },
        no_extra,
    );
    assert_none("snapshot, clone, delete original", failures);
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

/// A thin table blob with two extent pages (clusters 0 and 600 written); then three
/// concurrent first writes (clusters 1, 2 and 601), so that one group-commit persist
/// rewrites both extent pages in place, and the n-th write fails. `write_pages` issues both
/// pages at once: when one lands and the other fails, the persist is undone in memory (the
/// writer releases its cluster) while the extent page on disk maps it. The running store's
/// free clusters then disagree with a fresh load, and the cluster can be handed out twice.
#[test]
fn a_partly_failed_in_place_extent_write_leaves_a_mapped_cluster_free() {
    use spool_bdev::{ErrorBdev, ErrorRule, IoKind};
    record_panics();
    let (base, ids) = base_image();
    let mut broken = Vec::new();
    let mut fired_any = 0;
    for n in 1..=12u64 {
        let crash = Arc::new(CrashBdev::from_image("crash", 4096, &base).unwrap());
        let faulty = Arc::new(ErrorBdev::new(
            "faulty",
            Arc::clone(&crash) as Arc<dyn Bdev>,
        ));
        let desc = BdevDesc::open(Arc::clone(&faulty) as Arc<dyn Bdev>).unwrap();
        let errors = Arc::clone(&faulty);
        let probe = Arc::clone(&crash);
        let out = cuts::run_sim(5, move || async move {
            let (store, _) = Blobstore::load(desc, &LoadOptions::default())
                .await
                .unwrap();
            let x = create_thin(&store, 1100).await;
            let blob = store.open_blob(x).await.unwrap();
            let channel = store.channel().unwrap();
            for unit in [0u64, 600 * 16] {
                channel
                    .write(&blob.io(), unit, buf_of(&pattern(50, 4096)))
                    .await
                    .0
                    .unwrap();
            }
            let rule = errors.add_rule(ErrorRule::new(-libc::EIO).kinds(&[IoKind::Write]).nth(n));
            let mut tasks = Vec::new();
            for unit in [16u64, 32, 601 * 16] {
                let io = blob.io();
                tasks.push(
                    spool_reactor::spawn_on(
                        spool_reactor::reactor_id().unwrap(),
                        move || async move {
                            let channel = io.channel().unwrap();
                            channel
                                .write(&io, unit, buf_of(&pattern(51, 4096)))
                                .await
                                .0
                                .is_ok()
                        },
                    )
                    .unwrap(),
                );
            }
            let mut results = Vec::new();
            for task in tasks {
                results.push(task.await.unwrap_or(false));
            }
            let fired = errors.rule_stats(rule).unwrap().injected > 0;
            errors.remove_rule(rule);
            let free = store.free_cluster_count();
            let md = store.used_md_pages();
            let at_error = probe.live_image();
            // Another blob's first write takes the lowest free cluster, then is flushed.
            let y = create_thin(&store, 2).await;
            let yb = store.open_blob(y).await.unwrap();
            channel
                .write(&yb.io(), 0, buf_of(&pattern(52, 4096)))
                .await
                .0
                .unwrap();
            channel.flush().await.unwrap();
            yb.close().await.unwrap();
            let live = probe.live_image();
            drop(channel);
            blob.close().await.unwrap();
            store.unload().await.unwrap();
            (fired, results, free, md, at_error, live, probe.live_image())
        });
        let (fired, results, free, md, at_error, live, unloaded) = out;
        if !fired {
            continue;
        }
        fired_any += 1;
        let what = format!("write #{n} fails (writes ok: {results:?})");
        let (load_free, load_md) = loaded_counts(&at_error);
        if load_free != free {
            broken.push(format!(
                "{what}: {free} free clusters in memory, a load of the device computes {load_free}"
            ));
        }
        if load_md != md {
            broken.push(format!(
                "{what}: md pages in memory {md:?}, a load computes {load_md:?}"
            ));
        }
        for (image, when) in [
            (live, "live image once another blob took a free cluster"),
            (unloaded, "after unload"),
        ] {
            let label = format!("{what}, {when}");
            LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()).clear();
            if let Err(panic) = std::panic::catch_unwind(|| check(image, ids, &label)) {
                broken.push(panic_text(panic));
            }
        }
    }
    assert!(fired_any > 3, "the fault fired only {fired_any} times");
    assert!(
        broken.is_empty(),
        "{} broken:\n{}",
        broken.len(),
        broken.join("\n")
    );
}

/// A shrink while the same blob's metadata sync is in flight (two tasks on the metadata
/// reactor): the sync planned the old size, the shrink moves the cut clusters to
/// `pending_release`, and the sync, when its old-size root commits, drains and frees them.
/// The durable root still maps them until the shrink is persisted: memory disagrees with a
/// fresh load, and another blob's first write takes a cluster blob A still maps on disk.
#[test]
fn a_shrink_during_an_in_flight_sync_frees_clusters_the_durable_root_maps() {
    record_panics();
    let (base, ids) = base_image();
    let mut broken = Vec::new();
    for delay in [0u64, 5, 20] {
        let seed = 3;
        let crash = Arc::new(CrashBdev::from_image("crash", 4096, &base).unwrap());
        let desc = BdevDesc::open(Arc::clone(&crash) as Arc<dyn Bdev>).unwrap();
        let probe = Arc::clone(&crash);
        let out = cuts::run_sim(seed, move || async move {
            let (store, _) = Blobstore::load(desc, &LoadOptions::default())
                .await
                .unwrap();
            let a = store.open_blob(ids.a).await.unwrap();
            // The store is dirty on disk first (no clean-flag write in the sync below).
            a.set_xattr("first", &[1]).unwrap();
            a.sync_md().await.unwrap();
            // A chain of several pages: the sync writes them, flushes, then writes the root.
            for i in 0..20 {
                a.set_xattr(&format!("k{i}"), &[i as u8; 300]).unwrap();
            }
            let syncer = a.clone();
            let sync = spool_reactor::spawn_local(async move {
                syncer.sync_md().await.unwrap();
            });
            let shrinker = a.clone();
            let shrink = spool_reactor::spawn_local(async move {
                for _ in 0..delay {
                    spool_reactor::yield_now().await;
                }
                shrinker.resize(1).await.unwrap();
            });
            let _ = sync.await;
            let _ = shrink.await;
            let free = store.free_cluster_count();
            let at = probe.live_image();
            // Another blob's first write takes the lowest free cluster, then is flushed.
            let y = create_thin(&store, 2).await;
            let yb = store.open_blob(y).await.unwrap();
            let channel = store.channel().unwrap();
            channel
                .write(&yb.io(), 0, buf_of(&pattern(52, 4096)))
                .await
                .0
                .unwrap();
            channel.flush().await.unwrap();
            drop(channel);
            yb.close().await.unwrap();
            let live = probe.live_image();
            a.close().await.unwrap();
            store.unload().await.unwrap();
            (free, at, live)
        });
        let (free, at, live) = out;
        let what = format!("resize after {delay} yields");
        let (load_free, _) = loaded_counts(&at);
        if load_free != free {
            broken.push(format!(
                "{what}: {free} free clusters in memory, a load of the device computes {load_free}"
            ));
        }
        LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()).clear();
        let label = format!("{what}: power cut after another blob's flushed write");
        if let Err(panic) = std::panic::catch_unwind(|| check(live, ids, &label)) {
            broken.push(panic_text(panic));
        }
    }
    assert!(
        broken.is_empty(),
        "{} broken:\n{}",
        broken.len(),
        broken.join("\n")
    );
}

/// On a store used since init, every data cluster is marked "reads zeros" (`zeroed`); a
/// thick claim does not clear the mark. When such a cluster is released without a
/// successful unmap (the unmap fails: best effort; or the post-commit flush fails and the
/// release waits in the queue as `unmapped: false`), the stale mark stays, and the next
/// thin first write there skips the zero-fill: the new blob shows the deleted blob's bytes.
#[test]
fn a_released_cluster_whose_unmap_failed_keeps_its_reads_zeros_mark() {
    use spool_bdev::{ErrorBdev, ErrorRule, IoKind};
    let mut broken = Vec::new();
    for (what, kind) in [
        ("unmap fails", IoKind::Unmap),
        ("post-commit flush fails", IoKind::Flush),
    ] {
        let crash = Arc::new(CrashBdev::new("crash", 4096, cuts::DEVICE / 4096).unwrap());
        let faulty = Arc::new(ErrorBdev::new(
            "faulty",
            Arc::clone(&crash) as Arc<dyn Bdev>,
        ));
        let desc = BdevDesc::open(Arc::clone(&faulty) as Arc<dyn Bdev>).unwrap();
        let errors = Arc::clone(&faulty);
        let leaked = cuts::run_sim(9, move || async move {
            let store = Blobstore::init(
                desc,
                &spool_blob::InitOptions {
                    cluster_size: CLUSTER,
                    ..spool_blob::InitOptions::default()
                },
            )
            .await
            .unwrap();
            let channel = store.channel().unwrap();
            let t = common::create_thick(&store, 1).await;
            let blob = store.open_blob(t).await.unwrap();
            channel
                .write(&blob.io(), 0, buf_of(&pattern(60, CLUSTER as usize)))
                .await
                .0
                .unwrap();
            channel.flush().await.unwrap();
            blob.close().await.unwrap();
            let rule = match kind {
                IoKind::Flush => errors.add_rule(ErrorRule::new(-libc::EIO).kinds(&[kind]).nth(1)),
                _ => errors.add_rule(ErrorRule::new(-libc::EIO).kinds(&[kind])),
            };
            let deleted = store.delete_blob(t).await;
            errors.remove_rule(rule);
            // A committed delete whose later step failed reports the error; what it released
            // is free now or after the next flush.
            let _ = deleted;
            // (The next metadata write, the create below, drains the queued releases.)
            let y = create_thin(&store, 1).await;
            let yb = store.open_blob(y).await.unwrap();
            channel
                .write(&yb.io(), 0, buf_of(&pattern(61, 4096)))
                .await
                .0
                .unwrap();
            let rest = common::read(&channel, &yb.io(), 1, CLUSTER as usize - 4096).await;
            drop(channel);
            yb.close().await.unwrap();
            store.unload().await.unwrap();
            rest.iter().any(|&b| b != 0)
        });
        if leaked {
            broken.push(format!(
                "{what}: a new thin blob reads the deleted blob's old bytes"
            ));
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

/// The same repair rule broken without a delete: snapshot a thin blob X that owns nothing,
/// clone the snapshot, decouple X (its parent owns nothing: no copy, so no flush before
/// X's new root drops `SNAP`). A cut keeping the clone's root and X's new root, but not the
/// snapshot's finished root, makes the load delete the snapshot as "never taken": the clone
/// names a parent that does not exist.
#[test]
fn snapshot_clone_then_decouple_original() {
    let failures = crash_failures(
        "snapshot, clone, decouple original",
        |store, _| {
            Box::pin(async move {
                let x = create_thin(&store, 2).await;
                let s = store.create_snapshot(x, &[]).await.unwrap();
                store.create_clone(s, &[]).await.unwrap();
                store.decouple_parent(x).await.unwrap();
            })
        },
        no_extra,
    );
    assert_none("snapshot, clone, decouple original", failures);
}

/// A snapshot whose last step (S's finished root) fails after the commit point (the
/// original already names S on disk): the error comes back, S stays, and a load finishes
/// it (read-only). While the original is held open (a live volume), S stays open in memory
/// as it was: writable, not a snapshot, so it cannot be cloned, and a write to it changes
/// what the original reads. The running store disagrees with a fresh load.
#[test]
fn a_snapshot_failing_after_its_commit_leaves_a_writable_snapshot_in_memory() {
    use spool_bdev::{ErrorBdev, ErrorRule, IoKind};
    record_panics();
    let (base, ids) = base_image();
    let mut broken = Vec::new();
    let mut committed_failures = 0;
    for (kind, n) in (1..=8u64)
        .map(|n| (IoKind::Write, n))
        .chain((1..=6).map(|n| (IoKind::Flush, n)))
    {
        let crash = Arc::new(CrashBdev::from_image("crash", 4096, &base).unwrap());
        let faulty = Arc::new(ErrorBdev::new(
            "faulty",
            Arc::clone(&crash) as Arc<dyn Bdev>,
        ));
        let desc = BdevDesc::open(Arc::clone(&faulty) as Arc<dyn Bdev>).unwrap();
        let errors = Arc::clone(&faulty);
        let probe = Arc::clone(&crash);
        let out = cuts::run_sim(12, move || async move {
            let (store, _) = Blobstore::load(desc, &LoadOptions::default())
                .await
                .unwrap();
            let before = store.blob_ids();
            // The volume stays open while it is snapshotted.
            let b = store.open_blob(ids.b).await.unwrap();
            let rule = errors.add_rule(ErrorRule::new(-libc::EIO).kinds(&[kind]).nth(n));
            let result = store.create_snapshot(ids.b, &[]).await;
            errors.remove_rule(rule);
            let Err(err) = result else {
                b.close().await.unwrap();
                store.unload().await.unwrap();
                return None;
            };
            // The snapshot the failed call left, if its commit point was passed.
            let Some(s) = b.parent_id().filter(|p| !before.contains(p)) else {
                b.close().await.unwrap();
                store.unload().await.unwrap();
                return None;
            };
            let snap = store.open_blob(s).await.unwrap();
            let in_memory = (snap.is_data_read_only(), snap.is_md_read_only());
            // Write to the snapshot: B reads its cluster 1 through it.
            let channel = store.channel().unwrap();
            let wrote = channel
                .write(&snap.io(), 16, buf_of(&pattern(70, 4096)))
                .await
                .0
                .is_ok();
            let through_b = common::read(&channel, &b.io(), 16, 4096).await;
            drop(channel);
            let b_changed = wrote && through_b == pattern(70, 4096);
            snap.close().await.unwrap();
            let cloned = store.create_clone(s, &[]).await.map_err(|e| e.to_string());
            let image = probe.live_image();
            b.close().await.unwrap();
            store.unload().await.unwrap();
            Some((err.to_string(), s, in_memory, cloned, image, b_changed))
        });
        let Some((err, s, in_memory, cloned, image, b_changed)) = out else {
            continue;
        };
        committed_failures += 1;
        let bdev = Arc::new(spool_bdev::MallocBdev::from_image("c", 4096, &image).unwrap());
        let desc = BdevDesc::open(bdev as Arc<dyn Bdev>).unwrap();
        let loaded = cuts::run_sim(4, move || async move {
            let (store, _) = Blobstore::load(desc, &LoadOptions::default())
                .await
                .unwrap();
            let snap = store.open_blob(s).await.unwrap();
            let flags = (snap.is_data_read_only(), snap.is_md_read_only());
            snap.close().await.unwrap();
            store.unload().await.unwrap();
            flags
        });
        let what = format!("{kind:?} #{n} fails (`{err}`)");
        if in_memory != loaded {
            broken.push(format!(
                "{what}: snapshot {s:#x} is (data_ro, md_ro) = {in_memory:?} in memory, {loaded:?} after a load"
            ));
        }
        if let Err(e) = cloned {
            broken.push(format!("{what}: cloning snapshot {s:#x} fails: {e}"));
        }
        if b_changed {
            broken.push(format!(
                "{what}: a write to snapshot {s:#x} succeeded and changed what blob B reads"
            ));
        }
    }
    assert!(
        committed_failures > 0,
        "no fault failed the snapshot after its commit point"
    );
    assert!(
        broken.is_empty(),
        "{} broken:\n{}",
        broken.len(),
        broken.join("\n")
    );
}

/// Decouple does not freeze I/O; when its final root write fails, it restores the metadata
/// it saved before the persist, wiping a thin insert a concurrent write made meanwhile, but
/// the insert stays queued in `unpublished`. The writer gets EIO and releases its cluster;
/// the next persist of the blob publishes the queued insert anyway: the I/O map points at a
/// free cluster, which another blob then takes: the two blobs share a cluster in memory
/// (the first reads the second's data; a write to it would corrupt the second).
#[test]
fn a_failed_decouple_restores_metadata_over_a_concurrent_thin_insert() {
    use spool_bdev::{ErrorBdev, ErrorRule, IoKind};
    record_panics();
    let (base, ids) = base_image();
    let mut broken = Vec::new();
    let mut raced = 0;
    for n in 1..=4u64 {
        for delay in (0..400u64).step_by(10) {
            let crash = Arc::new(CrashBdev::from_image("crash", 4096, &base).unwrap());
            let faulty = Arc::new(ErrorBdev::new(
                "faulty",
                Arc::clone(&crash) as Arc<dyn Bdev>,
            ));
            let desc = BdevDesc::open(Arc::clone(&faulty) as Arc<dyn Bdev>).unwrap();
            let errors = Arc::clone(&faulty);
            let out = cuts::run_sim(13, move || async move {
                let (store, _) = Blobstore::load(desc, &LoadOptions::default())
                    .await
                    .unwrap();
                let md_end = store.geometry().md_clusters * CLUSTER;
                let c = store.open_blob(ids.c).await.unwrap();
                let io = c.io();
                let writer = spool_reactor::spawn_local(async move {
                    spool_reactor::sleep(std::time::Duration::from_micros(delay)).await;
                    let channel = io.channel().unwrap();
                    channel
                        .write(&io, 16, buf_of(&pattern(80, 4096)))
                        .await
                        .0
                        .is_ok()
                });
                let rule = errors.add_rule(
                    ErrorRule::new(-libc::EIO)
                        .kinds(&[IoKind::Write])
                        .range_bytes(0..md_end)
                        .nth(n),
                );
                let decoupled = store.decouple_parent(ids.c).await;
                let wrote = writer.await.unwrap_or(false);
                errors.remove_rule(rule);
                // The blob's next persist (a sync) and another blob's first write.
                let _ = c.sync_md().await;
                let y = create_thin(&store, 1).await;
                let yb = store.open_blob(y).await.unwrap();
                let channel = store.channel().unwrap();
                channel
                    .write(&yb.io(), 0, buf_of(&pattern(81, CLUSTER as usize)))
                    .await
                    .0
                    .unwrap();
                let back = common::read(&channel, &c.io(), 16, 4096).await;
                drop(channel);
                yb.close().await.unwrap();
                let _ = c.close().await;
                let _ = store.unload().await;
                (decoupled.is_err(), wrote, back)
            });
            let (failed, wrote, back) = out;
            if !failed || wrote {
                continue;
            }
            raced += 1;
            let expect_zero = back.iter().all(|&b| b == 0);
            if !expect_zero {
                let shows_y = back == pattern(81, CLUSTER as usize)[..4096].to_vec();
                broken.push(format!(
                    "md write #{n} fails, write after {delay} us failed: C's unit 16 reads {} instead of zeros",
                    if shows_y { "another blob's data" } else { "non-zero data" }
                ));
            }
        }
    }
    assert!(
        raced > 0,
        "no run had both the decouple and the concurrent write fail"
    );
    assert!(
        broken.is_empty(),
        "{} broken:\n{}",
        broken.len(),
        broken.join("\n")
    );
}

/// A delete-with-merge whose merge committed but whose zeroing of the snapshot's root
/// failed leaves the snapshot on disk (marked SNAPRM). Its retry (or the load-time repair)
/// forgets only the clusters the clone still maps at the same index. If the clone shrank
/// meanwhile and another blob took the cluster it gave back, the retried delete releases
/// that cluster a second time: another blob's cluster is free in memory (and handed out
/// again).
#[test]
fn a_retried_merge_delete_frees_a_cluster_the_clone_gave_away_meanwhile() {
    use spool_bdev::{ErrorBdev, ErrorRule, IoKind};
    record_panics();
    let (base, ids) = base_image();
    let mut broken = Vec::new();
    let mut committed = 0;
    for n in 1..=8u64 {
        let crash = Arc::new(CrashBdev::from_image("crash", 4096, &base).unwrap());
        let faulty = Arc::new(ErrorBdev::new(
            "faulty",
            Arc::clone(&crash) as Arc<dyn Bdev>,
        ));
        let desc = BdevDesc::open(Arc::clone(&faulty) as Arc<dyn Bdev>).unwrap();
        let errors = Arc::clone(&faulty);
        let probe = Arc::clone(&crash);
        let out = cuts::run_sim(14, move || async move {
            let (store, _) = Blobstore::load(desc, &LoadOptions::default())
                .await
                .unwrap();
            let md_end = store.geometry().md_clusters * CLUSTER;
            let rule = errors.add_rule(
                ErrorRule::new(-libc::EIO)
                    .kinds(&[IoKind::Write, IoKind::WriteZeroes])
                    .range_bytes(0..md_end)
                    .nth(n),
            );
            let deleted = store.delete_blob(ids.s).await;
            errors.remove_rule(rule);
            let merged = store.parent_of(ids.c).is_none();
            let still_there = store.blob_ids().contains(&ids.s);
            if deleted.is_ok() || !merged || !still_there {
                let _ = store.unload().await;
                return None;
            }
            // The clone gives its merged cluster back; another blob takes it.
            let c = store.open_blob(ids.c).await.unwrap();
            c.resize(0).await.unwrap();
            c.sync_md().await.unwrap();
            c.close().await.unwrap();
            let y = create_thin(&store, 1).await;
            let yb = store.open_blob(y).await.unwrap();
            let channel = store.channel().unwrap();
            channel
                .write(&yb.io(), 0, buf_of(&pattern(90, 4096)))
                .await
                .0
                .unwrap();
            channel.flush().await.unwrap();
            drop(channel);
            yb.close().await.unwrap();
            let retried = store.delete_blob(ids.s).await.map_err(|e| e.to_string());
            let free = store.free_cluster_count();
            let image = probe.live_image();
            let _ = store.unload().await;
            Some((deleted.unwrap_err().to_string(), retried, free, image))
        });
        let Some((err, retried, free, image)) = out else {
            continue;
        };
        committed += 1;
        let what = format!("md write #{n} fails (`{err}`), retry: {retried:?}");
        let (load_free, _) = loaded_counts(&image);
        if load_free != free {
            broken.push(format!(
                "{what}: {free} free clusters in memory, a load of the device computes {load_free}"
            ));
        }
    }
    assert!(
        committed > 0,
        "no fault left a committed merge with its snapshot on disk"
    );
    assert!(
        broken.is_empty(),
        "{} broken:\n{}",
        broken.len(),
        broken.join("\n")
    );
}

/// A clone of a snapshot made while that snapshot is being merged into its only clone (a
/// delete, on another task of the metadata reactor): the merge checked the snapshot's
/// handles only at its start, so the clone is created naming the snapshot, and then the
/// merge deletes the snapshot. Both calls succeed; the new clone no longer opens.
#[test]
fn a_clone_made_during_a_merge_delete_loses_its_parent() {
    record_panics();
    let (base, ids) = base_image();
    let mut broken = Vec::new();
    let mut both = 0;
    for delay in (0..600u64).step_by(15) {
        let crash = Arc::new(CrashBdev::from_image("crash", 4096, &base).unwrap());
        let desc = BdevDesc::open(Arc::clone(&crash) as Arc<dyn Bdev>).unwrap();
        let out = cuts::run_sim(15, move || async move {
            let (store, _) = Blobstore::load(desc, &LoadOptions::default())
                .await
                .unwrap();
            let deleter = store.clone();
            let delete =
                spool_reactor::spawn_local(async move { deleter.delete_blob(ids.s).await });
            spool_reactor::sleep(std::time::Duration::from_micros(delay)).await;
            let cloned = store.create_clone(ids.s, &[]).await;
            let deleted = delete.await.unwrap();
            let _ = store.unload().await;
            (deleted.is_ok(), cloned.ok())
        });
        let (deleted, cloned) = out;
        // Either both succeed (the clone came first, or after) or one is refused with
        // -EBUSY; whatever happened, the image must check out.
        if let (true, Some(_)) = (deleted, &cloned) {
            both += 1;
        }
        let image = crash.live_image();
        let what =
            format!("clone {cloned:?} made {delay} us into the merge delete (deleted: {deleted})");
        LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()).clear();
        if let Err(panic) = std::panic::catch_unwind(|| check(image, ids, &what)) {
            broken.push(panic_text(panic));
        }
    }
    eprintln!("both succeeded in {both} of 40 runs");
    assert!(
        broken.is_empty(),
        "{} broken:\n{}",
        broken.len(),
        broken.join("\n")
    );
}

/// `close(self)` consumes the handle; when its persist does not commit, the blob "stays
/// open and the error is returned", but the caller no longer has the handle to close it
/// again, and opening and closing another handle never drops the lost reference: the
/// store can never be unloaded.
#[test]
fn a_failed_close_leaves_the_store_unloadable() {
    use spool_bdev::{ErrorBdev, ErrorRule, IoKind};
    let (base, ids) = base_image();
    let crash = Arc::new(CrashBdev::from_image("crash", 4096, &base).unwrap());
    let faulty = Arc::new(ErrorBdev::new(
        "faulty",
        Arc::clone(&crash) as Arc<dyn Bdev>,
    ));
    let desc = BdevDesc::open(Arc::clone(&faulty) as Arc<dyn Bdev>).unwrap();
    let errors = Arc::clone(&faulty);
    let (closed, retried, unloaded) = cuts::run_sim(16, move || async move {
        let (store, _) = Blobstore::load(desc, &LoadOptions::default())
            .await
            .unwrap();
        let a = store.open_blob(ids.a).await.unwrap();
        a.set_xattr("name", b"volume").unwrap();
        let rule = errors.add_rule(ErrorRule::new(-libc::EIO).kinds(&[IoKind::Write]).count(1));
        let closed = a.close().await.map_err(|e| e.to_string());
        errors.remove_rule(rule);
        // Retry the way the caller can: a new handle, synced and closed.
        let again = store.open_blob(ids.a).await.unwrap();
        let retried = match again.sync_md().await {
            Ok(()) => again.close().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let unloaded = store.clone().unload().await.map_err(|e| e.to_string());
        (closed, retried, unloaded)
    });
    assert!(closed.is_err(), "the close did not fail");
    assert!(retried.is_ok(), "retry: {retried:?}");
    assert!(
        unloaded.is_ok(),
        "after a close failed with {closed:?} and a retry succeeded, unload fails: {unloaded:?}"
    );
}

/// The same inside the store's own operations: snapshot, inflate and decouple close the
/// handle they opened (`orig.close()`, `blob.close()`); when a failed operation left the
/// blob dirty and that close fails too (two metadata writes in a row fail), the reference
/// is lost for good: the device is healthy again, the operation's retry succeeds, and
/// unload still refuses ("1 blob(s) still open") for the life of the store.
#[test]
fn two_failed_writes_in_an_operation_leave_the_store_unloadable() {
    use spool_bdev::{ErrorBdev, ErrorRule, IoKind};
    type Op2 = fn(Blobstore, Ids) -> Pin<Box<dyn Future<Output = Result<(), String>>>>;
    let ops: [(&str, Op2); 3] = [
        ("snapshot", |store, ids| {
            Box::pin(async move {
                store
                    .create_snapshot(ids.b, &[])
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
        }),
        ("inflate", |store, ids| {
            Box::pin(async move { store.inflate_blob(ids.c).await.map_err(|e| e.to_string()) })
        }),
        ("decouple", |store, ids| {
            Box::pin(async move {
                store
                    .decouple_parent(ids.c)
                    .await
                    .map_err(|e| e.to_string())
            })
        }),
    ];
    let (base, ids) = base_image();
    let mut broken = Vec::new();
    for (name, op) in ops {
        for n in 1..=10u64 {
            let crash = Arc::new(CrashBdev::from_image("crash", 4096, &base).unwrap());
            let faulty = Arc::new(ErrorBdev::new(
                "faulty",
                Arc::clone(&crash) as Arc<dyn Bdev>,
            ));
            let desc = BdevDesc::open(Arc::clone(&faulty) as Arc<dyn Bdev>).unwrap();
            let errors = Arc::clone(&faulty);
            let out = cuts::run_sim(17, move || async move {
                let (store, _) = Blobstore::load(desc, &LoadOptions::default())
                    .await
                    .unwrap();
                let md_end = store.geometry().md_clusters * CLUSTER;
                let rules: Vec<_> = [n, n + 1]
                    .into_iter()
                    .map(|nth| {
                        errors.add_rule(
                            ErrorRule::new(-libc::EIO)
                                .kinds(&[IoKind::Write])
                                .range_bytes(0..md_end)
                                .nth(nth),
                        )
                    })
                    .collect();
                let first = op(store.clone(), ids).await;
                for rule in rules {
                    errors.remove_rule(rule);
                }
                let Err(first) = first else {
                    let _ = store.unload().await;
                    return None;
                };
                let retried = op(store.clone(), ids).await;
                let unloaded = store.clone().unload().await.map_err(|e| e.to_string());
                Some((first, retried, store.open_blob_count(), unloaded))
            });
            if let Some((first, retried, open, Err(unloaded))) = out {
                broken.push(format!(
                    "{name}, md writes #{n} and #{} fail (`{first}`), retry {retried:?}: {open} blob(s) open, unload: {unloaded}",
                    n + 1
                ));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "{} broken:\n{}",
        broken.len(),
        broken.join("\n")
    );
}
