//! Second review of issue 20: what remains after the first review's eleven fixes.
//! Each test fails on the code it was written against; each names its sequence.

mod common;
mod cuts;

use cuts::subsets::{assert_none, crash_failures, no_extra, Op};
use cuts::{base_image, check, CLUSTER};

use std::sync::Arc;

use common::{buf_of, pattern};
use spool_bdev::{Bdev, BdevDesc, CrashBdev, ErrorBdev, ErrorRule, IoKind};
use spool_blob::{Blobstore, LoadOptions};

// The cut harness of review20.rs (all, none, each alone, all but each).
use spool_reactor::{Sim, SimOptions};
use std::future::Future;
use std::pin::Pin;
type Ids = cuts::Ids;

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

static LAST_PANIC: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Runs `check` and returns its first panic message (a check panics inside its simulation,
/// which reports only `Panicked(reactor)`), if any.
fn check_failure(image: Vec<u8>, ids: cuts::Ids, what: &str) -> Option<String> {
    std::panic::set_hook(Box::new(|info| {
        let text = info
            .payload()
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        LAST_PANIC
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(text);
    }));
    LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()).clear();
    let outcome = std::panic::catch_unwind(|| check(image, ids, what));
    let _ = std::panic::take_hook();
    outcome.err().map(|_| {
        let seen = LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner());
        seen.iter()
            .find(|t| !t.contains("Panicked("))
            .cloned()
            .unwrap_or_else(|| format!("{what}: check failed"))
    })
}

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

fn md_write_rule(md_end: u64) -> ErrorRule {
    ErrorRule::new(-libc::EIO)
        .kinds(&[IoKind::Write, IoKind::WriteZeroes])
        .range_bytes(0..md_end)
}

/// An orphan that is a clone (its last close, or its delete, did not commit) still holds
/// its parent snapshot's handle; unload counts that handle as an open blob before it
/// settles the orphans, so it refuses ("1 blob(s) still open") for good, although every
/// handle the caller had was given back and the device is healthy again.
#[test]
fn an_orphan_clone_keeps_the_store_from_unloading() {
    let (base, ids) = base_image();
    let mut broken = Vec::new();
    for what in ["close", "delete"] {
        let (_crash, errors, desc) = faulty(&base);
        let out = cuts::run_sim(21, move || async move {
            let (store, _) = Blobstore::load(desc, &LoadOptions::default())
                .await
                .unwrap();
            let md_end = store.geometry().md_clusters * CLUSTER;
            let c = store.open_blob(ids.c).await.unwrap();
            let rule = errors.add_rule(md_write_rule(md_end).count(1));
            let failed = if what == "close" {
                c.set_xattr("name", b"volume").unwrap();
                c.close().await.map_err(|e| e.to_string())
            } else {
                c.close().await.unwrap();
                store.delete_blob(ids.c).await.map_err(|e| e.to_string())
            };
            errors.remove_rule(rule);
            let open = store.open_blob_count();
            let first = store.clone().unload().await.map_err(|e| e.to_string());
            let second = if first.is_err() {
                store.clone().unload().await.map_err(|e| e.to_string())
            } else {
                Ok(())
            };
            (failed, open, first, second)
        });
        let (failed, open, first, second) = out;
        assert!(failed.is_err(), "{what}: the fault did not fire");
        if first.is_err() || second.is_err() {
            broken.push(format!(
                "{what} failed ({failed:?}); with no handle left ({open} counted open), unload: {first:?}, again: {second:?}"
            ));
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

/// A thin first write whose in-place extent page write fails keeps its cluster in the map,
/// unpublished, for the next persist. If that next persist then fails before its commit
/// (its barrier flush fails: a second error in a row), `undo_failed_persist` takes every
/// entry of `unpublished` out of the map as if a waiting writer would release it; but that
/// writer already returned: nobody releases the cluster. It is used in memory and mapped
/// by no blob: a fresh load disagrees, and unload writes the leak into the masks.
#[test]
fn a_failed_persist_after_a_failed_in_place_write_leaks_the_kept_cluster() {
    let (base, ids) = base_image();
    let (crash, errors, desc) = faulty(&base);
    let probe = Arc::clone(&crash);
    let out = cuts::run_sim(22, move || async move {
        let (store, _) = Blobstore::load(desc, &LoadOptions::default())
            .await
            .unwrap();
        let md_end = store.geometry().md_clusters * CLUSTER;
        let b = store.open_blob(ids.b).await.unwrap();
        let channel = store.channel().unwrap();
        // The chain is this process's now: later inserts rewrite the extent page in place.
        channel
            .write(&b.io(), 2 * 16, buf_of(&pattern(70, 4096)))
            .await
            .0
            .unwrap();
        let rule = errors.add_rule(md_write_rule(md_end).nth(1));
        let first = channel
            .write(&b.io(), 3 * 16, buf_of(&pattern(71, 4096)))
            .await
            .0
            .map_err(|e| e.to_string());
        errors.remove_rule(rule);
        let rule = errors.add_rule(ErrorRule::new(-libc::EIO).kinds(&[IoKind::Flush]).nth(1));
        let second = b.sync_md().await.map_err(|e| e.to_string());
        errors.remove_rule(rule);
        let third = b.sync_md().await.map_err(|e| e.to_string());
        let free = store.free_cluster_count();
        let image = probe.live_image();
        drop(channel);
        b.close().await.unwrap();
        store.unload().await.unwrap();
        (first, second, third, free, image, probe.live_image())
    });
    let (first, second, third, free, image, unloaded) = out;
    assert!(first.is_err(), "the in-place write did not fail");
    assert!(second.is_err(), "the flush did not fail");
    assert!(third.is_ok(), "retry: {third:?}");
    let (load_free, _) = loaded_counts(&image);
    let mut broken = Vec::new();
    if load_free != free {
        broken.push(format!(
            "{free} free clusters in memory, a load of the device computes {load_free}"
        ));
    }
    broken.extend(check_failure(unloaded, ids, "after unload"));
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

/// A delete-with-merge that fails before its commit (the clone's new root is not written)
/// leaves the snapshot on disk marked `SNAPRM` = clone; nothing removes the mark in the
/// running store. The load-time repair takes "the clone no longer reads through it" for
/// "the merge committed": once the clone is deleted, or snapshotted (its parent becomes the
/// new snapshot), the next load deletes the snapshot, an acknowledged blob nobody deleted;
/// after a snapshot of the clone, the new snapshot then names a parent that is gone, and it
/// and the clone no longer open.
#[test]
fn a_merge_that_did_not_commit_leaves_a_mark_that_deletes_the_snapshot_at_load() {
    let (base, ids) = base_image();
    let mut broken = Vec::new();
    let mut tried = 0;
    for then in ["delete the clone", "snapshot the clone"] {
        for n in 1..=6u64 {
            let (crash, errors, desc) = faulty(&base);
            let out = cuts::run_sim(23, move || async move {
                let (store, _) = Blobstore::load(desc, &LoadOptions::default())
                    .await
                    .unwrap();
                let md_end = store.geometry().md_clusters * CLUSTER;
                let rule = errors.add_rule(md_write_rule(md_end).nth(n));
                let deleted = store.delete_blob(ids.s).await;
                errors.remove_rule(rule);
                let untouched =
                    store.parent_of(ids.c) == Some(ids.s) && store.blob_ids().contains(&ids.s);
                if deleted.is_ok() || !untouched {
                    let _ = store.unload().await;
                    return None;
                }
                if then == "delete the clone" {
                    store.delete_blob(ids.c).await.unwrap();
                } else {
                    store.create_snapshot(ids.c, &[]).await.unwrap();
                }
                store.unload().await.unwrap();
                Some(deleted.unwrap_err().to_string())
            });
            let Some(err) = out else { continue };
            tried += 1;
            let image = crash.live_image();
            let what = format!("delete of S failed at md write #{n} (`{err}`), then {then}");
            let bdev = Arc::new(spool_bdev::MallocBdev::from_image("l", 4096, &image).unwrap());
            let desc = BdevDesc::open(bdev as Arc<dyn Bdev>).unwrap();
            let (has_s, repaired) = cuts::run_sim(4, move || async move {
                let (store, report) = Blobstore::load(desc, &LoadOptions::default())
                    .await
                    .unwrap();
                let has = store.blob_ids().contains(&ids.s);
                store.unload().await.unwrap();
                (has, report.repaired)
            });
            if !has_s {
                broken.push(format!("{what}: after a load S is gone ({repaired:?})"));
            }
            broken.extend(check_failure(image, ids, &what));
        }
    }
    assert!(tried > 0, "no fault left an uncommitted merge");
    assert!(
        broken.is_empty(),
        "{} broken:\n{}",
        broken.len(),
        broken.join("\n")
    );
}

/// A snapshot whose finished root fails to reach the disk (the write fails, and so does the
/// retry when the snapshot's handle is closed: two errors in a row) returns the error but
/// stays: the original reads through it, and it is finished in memory (dirty). With the
/// original kept open, nothing writes it until the original lets it go. An inflate (or
/// decouple) of the original then commits the original's new root, with no parent, and only
/// afterwards closes the old parent, which writes the snapshot's finished root. A cut in
/// between leaves a half-made snapshot that no blob reads through and whose original exists:
/// the load removes it as "never taken", freeing only its metadata pages; its clusters (the
/// original's data at snapshot time) stay claimed by nobody. Fixed: a blob that stops
/// reading through a parent whose root is not durable writes that root first
/// (`settle_parent`), and its own commit follows a flush of it. The delete variant closes the
/// original first (which finishes the snapshot on the ordinary path) and then deletes it.
#[test]
fn a_half_made_snapshot_left_by_errors_is_removed_at_load_and_its_clusters_leak() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let (base, ids) = base_image();
    let mut broken = Vec::new();
    let mut tried = 0;
    for then in ["inflate", "decouple", "delete"] {
        for n in 1..=8u64 {
            let mut k = 0u64;
            loop {
                let (crash, errors, desc) = faulty(&base);
                let mut sim = spool_reactor::Sim::new(spool_reactor::SimOptions {
                    seed: 24,
                    reactors: 1,
                });
                let reactor = sim.reactors()[0];
                let start = Arc::new(AtomicU64::new(u64::MAX));
                let (started, probe) = (Arc::clone(&start), Arc::clone(&crash));
                let handle = sim
                    .spawn_on(reactor, move || async move {
                        let (store, _) = Blobstore::load(desc, &LoadOptions::default())
                            .await
                            .unwrap();
                        let md_end = store.geometry().md_clusters * CLUSTER;
                        let x = common::create_thin(&store, 2).await;
                        let blob = store.open_blob(x).await.unwrap();
                        let channel = store.channel().unwrap();
                        channel
                            .write(&blob.io(), 0, buf_of(&pattern(41, CLUSTER as usize)))
                            .await
                            .0
                            .unwrap();
                        channel.flush().await.unwrap();
                        drop(channel);
                        let rules: Vec<_> = [n, n + 1]
                            .into_iter()
                            .map(|nth| errors.add_rule(md_write_rule(md_end).nth(nth)))
                            .collect();
                        let snap = store.create_snapshot(x, &[]).await;
                        for rule in rules {
                            errors.remove_rule(rule);
                        }
                        // Only a snapshot that failed after its commit: the original reads
                        // through it.
                        if snap.is_ok() || blob.parent_id().is_none() {
                            blob.close().await.unwrap();
                            let _ = store.unload().await;
                            return false;
                        }
                        started.store(probe.completed_writes(), Ordering::SeqCst);
                        match then {
                            "inflate" => store.inflate_blob(x).await.unwrap(),
                            "decouple" => store.decouple_parent(x).await.unwrap(),
                            _ => {
                                blob.close().await.unwrap();
                                store.delete_blob(x).await.unwrap();
                                store.unload().await.unwrap();
                                return true;
                            }
                        }
                        blob.close().await.unwrap();
                        store.unload().await.unwrap();
                        true
                    })
                    .unwrap();
                let mut image = None;
                let mut finished = None;
                loop {
                    let at = start.load(Ordering::SeqCst);
                    if at != u64::MAX && crash.completed_writes() >= at + k {
                        image = Some(crash.cut_power_keep_all());
                        break;
                    }
                    if let Some(out) = handle.try_take() {
                        finished = Some(out.unwrap());
                        break;
                    }
                    if !sim.step() {
                        break;
                    }
                }
                sim.stop();
                if finished == Some(false) {
                    break; // this n does not leave a committed, unfinished snapshot
                }
                let Some(image) = image else { break }; // the op ended before write k
                tried += 1;
                let what = format!(
                    "snapshot: md writes #{n} and #{} fail; {then}; cut after its write {k}",
                    n + 1
                );
                if let Some(failure) = check_failure(image, ids, &what) {
                    broken.push(failure);
                }
                k += 1;
            }
        }
    }
    assert!(tried > 0, "no fault left a committed snapshot unfinished");
    assert!(
        broken.is_empty(),
        "{} broken:\n{}",
        broken.len(),
        broken.join("\n")
    );
}

/// Issue 20 asks that unload not write clean masks while a thin allocation holds a claimed,
/// not yet inserted cluster. A blob closed while its first write is still filling the new
/// cluster (close does not wait for the blob's I/O), then an unload: the masks mark the
/// claimed cluster used, clean = 1 is written, and the insert that follows finds no store.
/// The next (clean) load trusts the masks: a cluster used by no blob, leaked for good.
#[test]
fn unload_writes_a_claimed_not_inserted_cluster_into_the_clean_masks() {
    let (base, ids) = base_image();
    let mut broken = Vec::new();
    let mut raced = 0;
    for delay in (0..120u64).step_by(4) {
        let crash = Arc::new(CrashBdev::from_image("crash", 4096, &base).unwrap());
        let desc = BdevDesc::open(Arc::clone(&crash) as Arc<dyn Bdev>).unwrap();
        let out = cuts::run_sim(25, move || async move {
            let (store, _) = Blobstore::load(desc, &LoadOptions::default())
                .await
                .unwrap();
            let b = store.open_blob(ids.b).await.unwrap();
            let io = b.io();
            let writer = spool_reactor::spawn_local(async move {
                let channel = io.channel().unwrap();
                channel
                    .write(&io, 2 * 16, buf_of(&pattern(90, 4096)))
                    .await
                    .0
                    .map_err(|e| e.to_string())
            });
            spool_reactor::sleep(std::time::Duration::from_micros(delay)).await;
            let closed = b.close().await.map_err(|e| e.to_string());
            let unloaded = store.clone().unload().await.map_err(|e| e.to_string());
            let wrote = writer.await.unwrap();
            (closed, unloaded, wrote)
        });
        let (closed, unloaded, wrote) = out;
        if closed.is_err() || unloaded.is_err() || wrote.is_ok() {
            continue; // refused, or the write finished first
        }
        raced += 1;
        let what = format!("unload {delay} us into a thin write (write: {wrote:?})");
        broken.extend(check_failure(crash.live_image(), ids, &what));
    }
    assert!(raced > 0, "no unload overlapped an allocation");
    assert!(
        broken.is_empty(),
        "{} broken:\n{}",
        broken.len(),
        broken.join("\n")
    );
}

/// A commit publishes every `(index, cluster)` its plan carried without checking that the
/// map still holds that cluster there. A thin insert kept (mapped, unpublished) after a
/// failed in-place extent page write, then a shrink that cuts it (the cluster goes to the
/// pending releases) and a grow back (the index reads zeros again): the next persist
/// commits the new size, releases the cluster, and publishes it at its old index. I/O
/// reactors now write the blob's cluster to a free cluster that another blob then takes: a
/// write to either corrupts the other, and the blob's acknowledged, flushed write is not
/// there after a reload (its map says unallocated).
#[test]
fn a_kept_insert_cut_by_a_shrink_is_published_after_its_release() {
    let (base, ids) = base_image();
    let (crash, errors, desc) = faulty(&base);
    let probe = Arc::clone(&crash);
    let out = cuts::run_sim(26, move || async move {
        let (store, _) = Blobstore::load(desc, &LoadOptions::default())
            .await
            .unwrap();
        let md_end = store.geometry().md_clusters * CLUSTER;
        let b = store.open_blob(ids.b).await.unwrap();
        let channel = store.channel().unwrap();
        channel
            .write(&b.io(), 2 * 16, buf_of(&pattern(70, 4096)))
            .await
            .0
            .unwrap();
        let rule = errors.add_rule(md_write_rule(md_end).nth(1));
        let failed = channel
            .write(&b.io(), 3 * 16, buf_of(&pattern(71, 4096)))
            .await
            .0
            .is_err();
        errors.remove_rule(rule);
        b.resize(3).await.unwrap();
        b.resize(4).await.unwrap();
        b.sync_md().await.unwrap();
        let zeros_before = common::read(&channel, &b.io(), 3 * 16, 4096)
            .await
            .iter()
            .all(|&x| x == 0);
        // Another blob's first write takes the lowest free cluster.
        let y = common::create_thin(&store, 1).await;
        let yb = store.open_blob(y).await.unwrap();
        channel
            .write(&yb.io(), 0, buf_of(&pattern(72, CLUSTER as usize)))
            .await
            .0
            .unwrap();
        // B writes its cluster 3 and flushes: acknowledged and durable.
        channel
            .write(&b.io(), 3 * 16, buf_of(&pattern(73, 4096)))
            .await
            .0
            .unwrap();
        channel.flush().await.unwrap();
        let y_intact = common::read(&channel, &yb.io(), 0, 4096).await
            == pattern(72, CLUSTER as usize)[..4096].to_vec();
        drop(channel);
        yb.close().await.unwrap();
        b.close().await.unwrap();
        store.unload().await.unwrap();
        (failed, zeros_before, y_intact, y, probe.live_image())
    });
    let (failed, zeros_before, y_intact, _y, image) = out;
    assert!(failed, "the in-place write did not fail");
    // After a reload, B's acknowledged write must be there.
    let bdev = Arc::new(spool_bdev::MallocBdev::from_image("l", 4096, &image).unwrap());
    let desc = BdevDesc::open(bdev as Arc<dyn Bdev>).unwrap();
    let b_kept = cuts::run_sim(4, move || async move {
        let (store, _) = Blobstore::load(desc, &LoadOptions::default())
            .await
            .unwrap();
        let b = store.open_blob(ids.b).await.unwrap();
        let channel = store.channel().unwrap();
        let back = common::read(&channel, &b.io(), 3 * 16, 4096).await;
        drop(channel);
        b.close().await.unwrap();
        store.unload().await.unwrap();
        back == pattern(73, 4096)
    });
    let mut broken = Vec::new();
    if !zeros_before {
        broken.push("after shrink and grow, B's cluster 3 does not read zeros".to_string());
    }
    if !y_intact {
        broken.push("B's write to its cluster 3 overwrote another blob's cluster".to_string());
    }
    if !b_kept {
        broken.push("B's acknowledged, flushed write to cluster 3 is gone after a reload".into());
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

/// A merge whose clone persist does not commit restores the clone's saved metadata, which
/// holds a thin insert kept (mapped, unpublished) after a failed in-place extent page
/// write; the failed persist took that insert out of `unpublished`. The clone's map then
/// holds the cluster while I/O reactors never see it: the next write to that cluster asks
/// the metadata reactor to insert, finds a cluster there that is not published, waits for a
/// persist, which has nothing to publish, and asks again, for ever. (The merge's own close
/// of the clone would write and drop it; when that close fails too, the clone stays in
/// memory as an orphan, and the next open reuses it.)
#[test]
fn a_failed_merge_restores_a_kept_insert_that_is_never_published() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (base, ids) = base_image();
    let mut broken = Vec::new();
    let mut tried = 0;
    for n in 1..=4u64 {
        let (_crash, errors, desc) = faulty(&base);
        let mut sim = spool_reactor::Sim::new(spool_reactor::SimOptions {
            seed: 27,
            reactors: 1,
        });
        let reactor = sim.reactors()[0];
        let writing = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&writing);
        let handle = sim
            .spawn_on(reactor, move || async move {
                let (store, _) = Blobstore::load(desc, &LoadOptions::default())
                    .await
                    .unwrap();
                let md_end = store.geometry().md_clusters * CLUSTER;
                let c = store.open_blob(ids.c).await.unwrap();
                // C's chain is this process's: its next insert rewrites the extent page.
                c.set_xattr("v", b"1").unwrap();
                c.sync_md().await.unwrap();
                let channel = store.channel().unwrap();
                // C's cluster 0 gets its own copy: C has an extent page from now on.
                channel
                    .write(&c.io(), 0, buf_of(&pattern(76, 4096)))
                    .await
                    .0
                    .unwrap();
                let rule = errors.add_rule(md_write_rule(md_end).count(2));
                let wrote = channel
                    .write(&c.io(), 16, buf_of(&pattern(74, 4096)))
                    .await
                    .0
                    .is_ok();
                let closed = c.close().await.is_ok();
                errors.remove_rule(rule);
                if wrote || closed {
                    return None;
                }
                // The clone's persist fails, and so does its close right after.
                let rules = [n, n + 1].map(|nth| errors.add_rule(md_write_rule(md_end).nth(nth)));
                let deleted = store.delete_blob(ids.s).await;
                for rule in rules {
                    errors.remove_rule(rule);
                }
                if deleted.is_ok() || store.parent_of(ids.c) != Some(ids.s) {
                    return None;
                }
                let c = store.open_blob(ids.c).await.unwrap();
                flag.store(true, Ordering::SeqCst);
                let done = channel
                    .write(&c.io(), 16 + 1, buf_of(&pattern(75, 4096)))
                    .await
                    .0
                    .map_err(|e| e.to_string());
                Some((deleted.unwrap_err().to_string(), done))
            })
            .unwrap();
        let mut steps_writing = 0u64;
        let out = loop {
            if let Some(out) = handle.try_take() {
                break Some(out.unwrap());
            }
            if writing.load(Ordering::SeqCst) {
                steps_writing += 1;
                if steps_writing > 200_000 {
                    break None;
                }
            }
            if !sim.step() {
                break Some(None);
            }
        };
        sim.stop();
        match out {
            Some(None) => {}
            Some(Some((err, done))) => {
                tried += 1;
                if let Err(write) = done {
                    broken.push(format!("merge failed at md write #{n} (`{err}`): the write to C's cluster 1 fails: {write}"));
                }
            }
            None => {
                tried += 1;
                broken.push(format!(
                    "merge failed at md write #{n}: a write to C's cluster 1 never completes (200000 steps)"
                ));
            }
        }
    }
    assert!(tried > 0, "no run reached the write");
    assert!(
        broken.is_empty(),
        "{} broken:\n{}",
        broken.len(),
        broken.join("\n")
    );
}

/// The clone guard (held on the snapshot while its clone is made, against a merge-delete)
/// also refuses a second clone of the same snapshot made meanwhile: two clients cloning one
/// snapshot at once, which SPDK allows and nothing about a merge requires refusing, get
/// -EBUSY ("cannot clone while a clone is in progress").
#[test]
fn two_concurrent_clones_of_one_snapshot_are_refused() {
    let (base, ids) = base_image();
    let crash = Arc::new(CrashBdev::from_image("crash", 4096, &base).unwrap());
    let desc = BdevDesc::open(Arc::clone(&crash) as Arc<dyn Bdev>).unwrap();
    let (first, second) = cuts::run_sim(28, move || async move {
        let (store, _) = Blobstore::load(desc, &LoadOptions::default())
            .await
            .unwrap();
        let other = store.clone();
        let one = spool_reactor::spawn_local(async move { other.create_clone(ids.s, &[]).await });
        let two = store.create_clone(ids.s, &[]).await;
        let one = one.await.unwrap();
        let _ = store.unload().await;
        (
            one.map_err(|e| e.to_string()),
            two.map_err(|e| e.to_string()),
        )
    });
    assert!(
        first.is_ok() && second.is_ok(),
        "concurrent clones: {first:?}, {second:?}"
    );
}

/// Crash sequences the first review's sweeps did not try, each through every cut point and
/// subset (all, none, each pending write alone, all but each).
#[test]
fn more_sequences_survive_every_cut() {
    let sequences: [(&str, Op); 7] = [
        (
            "snapshot twice, delete the middle snapshot (merge into the newer)",
            |store, ids| {
                Box::pin(async move {
                    let s2 = store.create_snapshot(ids.c, &[]).await.unwrap();
                    store.delete_blob(s2).await.unwrap();
                })
            },
        ),
        (
            "clone written, then the snapshot deleted (merge), then the clone deleted",
            |store, ids| {
                Box::pin(async move {
                    store.delete_blob(ids.s).await.unwrap();
                    store.delete_blob(ids.c).await.unwrap();
                })
            },
        ),
        (
            "thin shrink and grow in one sync, then a write",
            |store, ids| {
                Box::pin(async move {
                    let b = store.open_blob(ids.b).await.unwrap();
                    b.resize(2).await.unwrap();
                    b.resize(4).await.unwrap();
                    b.sync_md().await.unwrap();
                    let channel = store.channel().unwrap();
                    channel
                        .write(&b.io(), 3 * 16, buf_of(&pattern(2, CLUSTER as usize)))
                        .await
                        .0
                        .unwrap();
                    drop(channel);
                    b.close().await.unwrap();
                })
            },
        ),
        ("delete the clone, then its snapshot", |store, ids| {
            Box::pin(async move {
                store.delete_blob(ids.c).await.unwrap();
                store.delete_blob(ids.s).await.unwrap();
            })
        }),
        (
            "a second clone, delete the first, delete the snapshot (merge)",
            |store, ids| {
                Box::pin(async move {
                    store.create_clone(ids.s, &[]).await.unwrap();
                    store.delete_blob(ids.c).await.unwrap();
                    store.delete_blob(ids.s).await.unwrap();
                })
            },
        ),
        (
            "snapshot thick A, write A, delete the snapshot (merge)",
            |store, ids| {
                Box::pin(async move {
                    let s2 = store.create_snapshot(ids.a, &[]).await.unwrap();
                    let a = store.open_blob(ids.a).await.unwrap();
                    let channel = store.channel().unwrap();
                    channel
                        .write(
                            &a.io(),
                            16,
                            buf_of(&pattern(1, 2 * CLUSTER as usize)[CLUSTER as usize..]),
                        )
                        .await
                        .0
                        .unwrap();
                    drop(channel);
                    a.close().await.unwrap();
                    store.delete_blob(s2).await.unwrap();
                })
            },
        ),
        (
            "a long chain shrinks, another blob's chain takes its pages",
            |store, _| {
                Box::pin(async move {
                    let x = cuts_create_thin(&store).await;
                    let xb = store.open_blob(x).await.unwrap();
                    for i in 0..20 {
                        xb.set_xattr(&format!("k{i}"), &[i as u8; 300]).unwrap();
                    }
                    xb.sync_md().await.unwrap();
                    for i in 0..20 {
                        xb.remove_xattr(&format!("k{i}")).unwrap();
                    }
                    xb.sync_md().await.unwrap();
                    xb.close().await.unwrap();
                    let y = cuts_create_thin(&store).await;
                    let yb = store.open_blob(y).await.unwrap();
                    for i in 0..20 {
                        yb.set_xattr(&format!("j{i}"), &[i as u8; 300]).unwrap();
                    }
                    yb.close().await.unwrap();
                })
            },
        ),
    ];
    let mut all = Vec::new();
    for (name, op) in sequences {
        all.extend(crash_failures(name, op, no_extra));
    }
    assert_none("more sequences", all);
}

/// Inflate (or decouple) a clone, then delete its old parent, which no blob reads through
/// any more: the clone's new root (no parent) is written with no flush after it when the
/// persist frees nothing, and the parent's delete zeroes its root with no flush before it
/// (`Deps::Own`, its own pages are durable). A cut keeping the zeroing but not the clone's
/// root leaves the clone naming a parent that does not exist: it no longer opens.
#[test]
fn inflate_or_decouple_then_delete_the_old_parent() {
    let sequences: [(&str, Op); 2] = [
        (
            "snapshot B, inflate B, delete the snapshot",
            |store, ids| {
                Box::pin(async move {
                    let s2 = store.create_snapshot(ids.b, &[]).await.unwrap();
                    store.inflate_blob(ids.b).await.unwrap();
                    store.delete_blob(s2).await.unwrap();
                })
            },
        ),
        (
            "snapshot B, decouple B, delete the snapshot",
            |store, ids| {
                Box::pin(async move {
                    let s2 = store.create_snapshot(ids.b, &[]).await.unwrap();
                    store.decouple_parent(ids.b).await.unwrap();
                    store.delete_blob(s2).await.unwrap();
                })
            },
        ),
    ];
    let mut all = Vec::new();
    for (name, op) in sequences {
        all.extend(crash_failures(name, op, no_extra));
    }
    assert_none("inflate or decouple, then delete the old parent", all);
}

async fn cuts_create_thin(store: &Blobstore) -> u64 {
    common::create_thin(store, 2).await
}

type Op2 = fn(Blobstore, Ids) -> Pin<Box<dyn Future<Output = Result<(), String>>>>;

fn op_snapshot_b(store: Blobstore, ids: Ids) -> Pin<Box<dyn Future<Output = Result<(), String>>>> {
    Box::pin(async move {
        store
            .create_snapshot(ids.b, &[])
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
}

fn op_inflate_c(store: Blobstore, ids: Ids) -> Pin<Box<dyn Future<Output = Result<(), String>>>> {
    Box::pin(async move { store.inflate_blob(ids.c).await.map_err(|e| e.to_string()) })
}

fn op_decouple_c(store: Blobstore, ids: Ids) -> Pin<Box<dyn Future<Output = Result<(), String>>>> {
    Box::pin(async move {
        store
            .decouple_parent(ids.c)
            .await
            .map_err(|e| e.to_string())
    })
}

fn op_delete_s(store: Blobstore, ids: Ids) -> Pin<Box<dyn Future<Output = Result<(), String>>>> {
    Box::pin(async move {
        match store.delete_blob(ids.s).await {
            Err(e) if !store.blob_ids().contains(&ids.s) => Err(format!("gone: {e}")),
            other => other.map_err(|e| e.to_string()),
        }
    })
}

fn op_shrink_a(store: Blobstore, ids: Ids) -> Pin<Box<dyn Future<Output = Result<(), String>>>> {
    Box::pin(async move {
        let a = store.open_blob(ids.a).await.map_err(|e| e.to_string())?;
        let resized = if a.num_clusters() > 1 {
            a.resize(1).await.map_err(|e| e.to_string())
        } else {
            Ok(())
        };
        let synced = a.sync_md().await.map_err(|e| e.to_string());
        let closed = a.close().await.map_err(|e| e.to_string());
        resized.and(synced).and(closed)
    })
}

fn op_write_b(store: Blobstore, ids: Ids) -> Pin<Box<dyn Future<Output = Result<(), String>>>> {
    Box::pin(async move {
        let b = store.open_blob(ids.b).await.map_err(|e| e.to_string())?;
        let channel = store.channel().unwrap();
        let mut result = Ok(());
        for unit in [0u64, 2 * 16, 3 * 16] {
            let (r, _) = channel
                .write(&b.io(), unit, buf_of(&pattern(5, 4096)))
                .await;
            if let Err(e) = r {
                result = Err(e.to_string());
            }
        }
        drop(channel);
        let closed = b.close().await.map_err(|e| e.to_string());
        result.and(closed)
    })
}

/// Two device errors in a row (md writes n and n+1, flushes n and n+1, or the n-th and
/// n+1-th of md writes and flushes together) in one operation,
/// then the same operation retried on a healthy device: memory must agree with a fresh load
/// (free clusters, md pages), unload must work, and the unloaded image must check out.
#[test]
fn two_errors_in_a_row_then_a_retry() {
    let ops: [(&str, Op2); 6] = [
        ("snapshot B", op_snapshot_b),
        ("inflate C", op_inflate_c),
        ("decouple C", op_decouple_c),
        ("delete S (merge)", op_delete_s),
        ("shrink A", op_shrink_a),
        ("first writes to B", op_write_b),
    ];
    let (base, ids) = base_image();
    let mut broken = Vec::new();
    for (name, op) in ops {
        for kind in [
            &[IoKind::Write][..],
            &[IoKind::Flush],
            &[IoKind::Write, IoKind::Flush],
        ] {
            for n in 1..=10u64 {
                let (crash, errors, desc) = faulty(&base);
                let probe = Arc::clone(&crash);
                let out = cuts::run_sim(29, move || async move {
                    let (store, _) = Blobstore::load(desc, &LoadOptions::default())
                        .await
                        .unwrap();
                    let md_end = store.geometry().md_clusters * CLUSTER;
                    let rules = [n, n + 1].map(|nth| {
                        // A flush overlaps any range: md writes and flushes both count.
                        errors.add_rule(
                            ErrorRule::new(-libc::EIO)
                                .kinds(kind)
                                .range_bytes(0..md_end)
                                .nth(nth),
                        )
                    });
                    let first = op(store.clone(), ids).await;
                    let fired = rules
                        .iter()
                        .any(|&r| errors.rule_stats(r).unwrap().injected > 0);
                    for rule in rules {
                        errors.remove_rule(rule);
                    }
                    if !fired {
                        let _ = store.unload().await;
                        return None;
                    }
                    let retried = if first.is_err() {
                        op(store.clone(), ids).await
                    } else {
                        Ok(())
                    };
                    let _ = store.channel().unwrap().flush().await;
                    let free = store.free_cluster_count();
                    let md = store.used_md_pages();
                    let image = probe.live_image();
                    let unloaded = store.clone().unload().await.map_err(|e| e.to_string());
                    Some((
                        first,
                        retried,
                        free,
                        md,
                        image,
                        unloaded,
                        probe.live_image(),
                    ))
                });
                let Some((first, retried, free, md, image, unloaded, after)) = out else {
                    break;
                };
                let what = format!(
                    "{name}: {kind:?} #{n} and #{} fail ({first:?}), retry {retried:?}",
                    n + 1
                );
                if let Err(e) = &retried {
                    if !e.starts_with("gone") {
                        broken.push(format!("{what}: the retry fails"));
                    }
                }
                let (load_free, load_md) = loaded_counts(&image);
                if load_free != free {
                    broken.push(format!(
                        "{what}: {free} free in memory, a load computes {load_free}"
                    ));
                }
                if load_md != md {
                    broken.push(format!(
                        "{what}: md pages {md:?} in memory, a load computes {load_md:?}"
                    ));
                }
                match unloaded {
                    Err(e) => broken.push(format!("{what}: unload fails: {e}")),
                    Ok(()) => broken.extend(check_failure(after, ids, &what)),
                }
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

/// A thin first write in flight while its blob is closed and deleted (close does not wait
/// for the blob's I/O): the insert reaches the metadata reactor while the delete holds the
/// blob's persist lock (zeroing the root), puts its cluster in the map, and waits for the
/// running "persist" to end. A delete never notifies the waiters of a persist: the write
/// never completes; and the delete took the cluster with the rest of the map and freed it,
/// so if the waiter were woken it would release the cluster a second time.
#[test]
fn a_thin_write_racing_a_delete_never_completes() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (base, ids) = base_image();
    let mut broken = Vec::new();
    let mut raced = 0;
    for (seed, delay) in (30..34u64).flat_map(|seed| (0..120u64).map(move |d| (seed, d))) {
        let crash = Arc::new(CrashBdev::from_image("crash", 4096, &base).unwrap());
        let desc = BdevDesc::open(Arc::clone(&crash) as Arc<dyn Bdev>).unwrap();
        let mut sim = Sim::new(SimOptions { seed, reactors: 1 });
        let reactor = sim.reactors()[0];
        let deleted_flag = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&deleted_flag);
        let handle = sim
            .spawn_on(reactor, move || async move {
                let (store, _) = Blobstore::load(desc, &LoadOptions::default())
                    .await
                    .unwrap();
                let b = store.open_blob(ids.b).await.unwrap();
                let io = b.io();
                let writer = spool_reactor::spawn_local(async move {
                    let channel = io.channel().unwrap();
                    channel
                        .write(&io, 2 * 16, buf_of(&pattern(91, 4096)))
                        .await
                        .0
                        .map_err(|e| e.to_string())
                });
                spool_reactor::sleep(std::time::Duration::from_nanos(delay * 250)).await;
                b.close().await.unwrap();
                let deleted = store.delete_blob(ids.b).await.map_err(|e| e.to_string());
                flag.store(true, Ordering::SeqCst);
                let wrote = writer.await.unwrap();
                (deleted, wrote)
            })
            .unwrap();
        let mut after_delete = 0u64;
        let out = loop {
            if let Some(out) = handle.try_take() {
                break Some(out.unwrap());
            }
            if deleted_flag.load(Ordering::SeqCst) {
                after_delete += 1;
                if after_delete > 100_000 {
                    break None;
                }
            }
            if !sim.step() {
                break None;
            }
        };
        sim.stop();
        match out {
            Some((Ok(()), Err(_))) => raced += 1,
            Some(_) => {}
            None => {
                raced += 1;
                broken.push(format!(
                    "seed {seed}: close and delete {} ns into a thin write: the write never completes",
                    delay * 250
                ));
            }
        }
    }
    assert!(raced > 0, "no delete overlapped an allocation");
    assert!(
        broken.is_empty(),
        "{} broken:\n{}",
        broken.len(),
        broken.join("\n")
    );
}
