//! Goal: a power cut at any metadata write of create, snapshot, clone, inflate, decouple,
//! resize, delete and thin allocation leaves a store that loads, where no cluster is owned
//! twice, no cluster is leaked, and the data written before the operation reads back.
//! Method: each operation runs under the simulation on the crash bdev; for every k, the
//! power is cut once the operation's k-th write has completed, keeping a seeded subset of the
//! writes not yet flushed; the image is loaded and checked. Each cut point is tried with
//! eight subsets (`SUBSETS_PER_CUT`: keep all, keep none, and six where each pending write
//! survives or not on its own, from the seed and its index); `SPOOL_CRASH_SUBSETS=N` tries
//! more. `the_harness_catches_a_missing_flush` plants the bug (a store that skips its
//! ordering flushes) and requires the checks to fail. A storm of thin writes with
//! flushes is cut at seeded points: every write acknowledged before the last completed flush
//! reads back.

mod common;
mod cuts;

use cuts::{base_image, check, run_sim, Ids, ZEROS_EXCEPT};

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use common::{buf_of, create_thick, create_thin, pattern, read};
use spool_bdev::{Bdev, BdevDesc, CrashBdev, MallocBdev};
use spool_blob::{BlobOptions, Blobstore, LoadOptions};
use spool_reactor::{Sim, SimOptions};

type Op = fn(Blobstore, Ids) -> Pin<Box<dyn Future<Output = ()>>>;

/// Runs `op` on a copy of `base`, cutting the power after its `k`-th write (None: never),
/// keeping the pending writes `keep` picks. Returns the image and the op's write count.
fn run_op(base: &[u8], ids: Ids, op: Op, k: Option<u64>, seed: u64) -> (Vec<u8>, u64) {
    let bdev = Arc::new(CrashBdev::from_image("crash", 4096, base).unwrap());
    let desc = BdevDesc::open(Arc::clone(&bdev) as Arc<dyn Bdev>).expect("open bdev");
    let mut sim = Sim::new(SimOptions { seed, reactors: 1 });
    let reactor = sim.reactors()[0];
    let start = Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
    let started = Arc::clone(&start);
    let probe = Arc::clone(&bdev);
    let handle = sim
        .spawn_on(reactor, move || async move {
            let (store, _) = Blobstore::load(desc, &LoadOptions::default())
                .await
                .unwrap();
            started.store(
                probe.completed_writes(),
                std::sync::atomic::Ordering::SeqCst,
            );
            op(store.clone(), ids).await;
            store.unload().await.unwrap();
        })
        .unwrap();
    let mut cut = None;
    loop {
        let base_count = start.load(std::sync::atomic::Ordering::SeqCst);
        if let Some(k) = k {
            if base_count != u64::MAX && bdev.completed_writes() >= base_count + k {
                cut = Some(bdev.cut_power(|write| survives(seed, write.index)));
                break;
            }
        }
        if handle.try_take().is_some() {
            break;
        }
        if !sim.step() {
            break;
        }
    }
    let writes = bdev.completed_writes()
        - start
            .load(std::sync::atomic::Ordering::SeqCst)
            .min(bdev.completed_writes());
    sim.stop();
    let image = cut.unwrap_or_else(|| bdev.cut_power_keep_all());
    (image, writes)
}

/// Whether pending write `index` reaches the media at a cut made with `seed`: seeds that are
/// 0 or 1 mod [`SUBSETS_PER_CUT`] keep every pending write or none; the others decide each
/// write on its own, from the seed and the write's index.
fn survives(seed: u64, index: u64) -> bool {
    match seed % SUBSETS_PER_CUT {
        0 => true,
        1 => false,
        _ => {
            let mixed = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17)
                ^ index.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
            fastrand::Rng::with_seed(mixed).bool()
        }
    }
}

/// Subsets tried at each cut point: keep all, keep none, and six per-write random subsets.
/// `SPOOL_CRASH_SUBSETS` raises it for a soak.
const SUBSETS_PER_CUT: u64 = 8;

fn subsets_per_cut() -> u64 {
    std::env::var("SPOOL_CRASH_SUBSETS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(SUBSETS_PER_CUT, |n: u64| n.max(SUBSETS_PER_CUT))
}

/// Runs `op` to completion, then once per cut point and subset; returns the failures
/// (`what` and the panic message) instead of stopping at the first.
fn crash_failures(name: &str, op: Op) -> Vec<String> {
    let (base, ids) = base_image();
    let (complete, writes) = run_op(&base, ids, op, None, 0);
    check(complete, ids, &format!("{name}: completed"));
    assert!(writes > 0, "{name}: the operation wrote nothing");
    let mut failures = Vec::new();
    for k in 0..writes {
        for n in 0..subsets_per_cut() {
            // Subset n of cut k: the seed's residue picks the kind of subset.
            let seed = k * 1_000 + n;
            let (image, _) = run_op(&base, ids, op, Some(k), seed);
            let what = format!("{name}: cut after write {k} (seed {seed})");
            let outcome = std::panic::catch_unwind(|| check(image, ids, &what));
            if let Err(panic) = outcome {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failures.push(message);
            }
        }
    }
    failures
}

fn crash_everywhere(name: &str, op: Op) {
    let failures = crash_failures(name, op);
    assert!(
        failures.is_empty(),
        "{} failing cut(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn create() {
    crash_everywhere("create", |store, _| {
        Box::pin(async move {
            let xattrs = (0..20)
                .map(|i| (format!("x{i}"), vec![i as u8; 300]))
                .collect();
            store
                .create_blob(&BlobOptions {
                    num_clusters: 3,
                    xattrs,
                    ..BlobOptions::default()
                })
                .await
                .unwrap();
        })
    });
}

#[test]
fn snapshot() {
    crash_everywhere("snapshot", |store, ids| {
        Box::pin(async move {
            store.create_snapshot(ids.b, &[]).await.unwrap();
        })
    });
}

#[test]
fn clone() {
    crash_everywhere("clone", |store, ids| {
        Box::pin(async move {
            store.create_clone(ids.s, &[]).await.unwrap();
        })
    });
}

#[test]
fn inflate_and_decouple() {
    crash_everywhere("inflate", |store, ids| {
        Box::pin(async move {
            store.inflate_blob(ids.c).await.unwrap();
        })
    });
    crash_everywhere("decouple", |store, ids| {
        Box::pin(async move {
            store.decouple_parent(ids.c).await.unwrap();
        })
    });
}

#[test]
fn resize() {
    crash_everywhere("resize", |store, ids| {
        Box::pin(async move {
            let blob = store.open_blob(ids.a).await.unwrap();
            blob.resize(5).await.unwrap();
            blob.sync_md().await.unwrap();
            blob.resize(2).await.unwrap();
            blob.close().await.unwrap();
        })
    });
}

#[test]
fn shrink_rle() {
    // A one-page RLE chain has no stale page to zero: the shrink's clusters must still wait
    // for the new size to be durable before anyone reuses them.
    crash_everywhere("shrink rle", |store, _| {
        Box::pin(async move {
            let id = store
                .create_blob(&BlobOptions {
                    num_clusters: 4,
                    form: spool_blob::ExtentForm::Rle,
                    ..BlobOptions::default()
                })
                .await
                .unwrap();
            let blob = store.open_blob(id).await.unwrap();
            let channel = store.channel().unwrap();
            channel
                .write(&blob.io(), 0, buf_of(&pattern(5, 4 * 65536)))
                .await
                .0
                .unwrap();
            channel.flush().await.unwrap();
            blob.resize(1).await.unwrap();
            blob.sync_md().await.unwrap();
            drop(channel);
            blob.close().await.unwrap();
            // Reuse the released clusters at once, in a one-page root that needs no flush.
            let other = store
                .create_blob(&BlobOptions {
                    num_clusters: 3,
                    form: spool_blob::ExtentForm::Rle,
                    ..BlobOptions::default()
                })
                .await
                .unwrap();
            let blob = store.open_blob(other).await.unwrap();
            let channel = store.channel().unwrap();
            channel
                .write(&blob.io(), 0, buf_of(&pattern(6, 3 * 65536)))
                .await
                .0
                .unwrap();
            drop(channel);
            blob.close().await.unwrap();
        })
    });
}

#[test]
fn delete() {
    crash_everywhere("delete", |store, ids| {
        Box::pin(async move {
            let id = create_thick(&store, 2).await;
            store.delete_blob(id).await.unwrap();
            // A snapshot with one clone: merged into the clone.
            store.delete_blob(ids.s).await.unwrap();
        })
    });
}

#[test]
fn thin_allocation() {
    crash_everywhere("thin allocation", |store, ids| {
        Box::pin(async move {
            let blob = store.open_blob(ids.b).await.unwrap();
            let channel = store.channel().unwrap();
            for cluster in [0u64, 2, 3] {
                channel
                    .write(&blob.io(), cluster * 16 + 1, buf_of(&pattern(9, 4096)))
                    .await
                    .0
                    .unwrap();
            }
            drop(channel);
            blob.close().await.unwrap();
        })
    });
}

#[test]
fn clone_copy_on_write() {
    // C reads cluster 0 through S: its first write there copies S's cluster, then maps it.
    crash_everywhere("clone copy-on-write", |store, ids| {
        Box::pin(async move {
            clone_writes(store, ids).await;
        })
    });
}

/// C's first write to its cluster 1 (zero-filled; gives C an extent page), then to its
/// cluster 0 (a copy of S's cluster; the extent page is rewritten in place).
async fn clone_writes(store: Blobstore, ids: Ids) {
    let blob = store.open_blob(ids.c).await.unwrap();
    let channel = store.channel().unwrap();
    for unit in [16u64, 15] {
        channel
            .write(&blob.io(), unit, buf_of(&pattern(9, 4096)))
            .await
            .0
            .unwrap();
    }
    drop(channel);
    blob.close().await.unwrap();
}

#[test]
fn released_clusters_reused() {
    crash_everywhere("released clusters reused", |store, ids| {
        Box::pin(async move {
            reuse_released(store, ids).await;
        })
    });
}

/// A new thin blob X gets an extent page (its cluster 1 written); A's clusters are
/// released (unmapped); X's cluster 0 then takes one of them, writing only its data where
/// the unmap promised zeros, and rewrites its extent page in place.
async fn reuse_released(store: Blobstore, ids: Ids) {
    let written = [17u64, 1];
    let id = store
        .create_blob(&BlobOptions {
            num_clusters: 2,
            thin: true,
            xattrs: vec![(
                ZEROS_EXCEPT.into(),
                written.iter().flat_map(|u| u.to_le_bytes()).collect(),
            )],
            ..BlobOptions::default()
        })
        .await
        .unwrap();
    let x = store.open_blob(id).await.unwrap();
    let channel = store.channel().unwrap();
    for (n, unit) in written.into_iter().enumerate() {
        if n == 1 {
            let a = store.open_blob(ids.a).await.unwrap();
            a.resize(0).await.unwrap();
            a.close().await.unwrap();
        }
        channel
            .write(&x.io(), unit, buf_of(&pattern(9, 4096)))
            .await
            .0
            .unwrap();
    }
    drop(channel);
    x.close().await.unwrap();
}

#[test]
fn the_harness_catches_a_missing_flush() {
    // The self-test: a store that skips its ordering flushes must fail these checks.
    type Planted = (&'static str, Op);
    let planted: [Planted; 3] = [
        ("snapshot", |store, ids| {
            Box::pin(async move {
                store.testing_skip_ordering_flushes(true);
                store.create_snapshot(ids.b, &[]).await.unwrap();
            })
        }),
        ("clone copy-on-write", |store, ids| {
            Box::pin(async move {
                store.testing_skip_ordering_flushes(true);
                clone_writes(store, ids).await;
            })
        }),
        ("delete with merge", |store, ids| {
            Box::pin(async move {
                store.testing_skip_ordering_flushes(true);
                store.delete_blob(ids.s).await.unwrap();
            })
        }),
    ];
    for (name, op) in planted {
        let failures = crash_failures(&format!("{name} without its flushes"), op);
        assert!(
            !failures.is_empty(),
            "{name}: the harness did not catch the skipped ordering flushes"
        );
        eprintln!(
            "{name} without its flushes: {} failing cut(s), e.g. {}",
            failures.len(),
            failures[0]
        );
    }
}

/// What the storm's writers report: the blob, each acknowledged write `(unit, seed)` in ack
/// order, and how many of those a completed flush covers.
#[derive(Default)]
struct StormLog {
    blob: Option<u64>,
    acked: Vec<(u64, u64)>,
    flushed: usize,
}

#[test]
fn a_storm_of_thin_writes_cut_at_random_points() {
    let (base, ids) = base_image();
    for seed in 0..24u64 {
        let bdev = Arc::new(CrashBdev::from_image("crash", 4096, &base).unwrap());
        let desc = BdevDesc::open(Arc::clone(&bdev) as Arc<dyn Bdev>).expect("open bdev");
        let mut sim = Sim::new(SimOptions { seed, reactors: 2 });
        let reactors = sim.reactors();
        let log = Arc::new(std::sync::Mutex::new(StormLog::default()));
        let shared = Arc::clone(&log);
        let writer_reactor = reactors[1];
        let handle = sim
            .spawn_on(reactors[0], move || async move {
                let (store, _) = Blobstore::load(desc, &LoadOptions::default())
                    .await
                    .unwrap();
                let id = create_thin(&store, 48).await;
                let blob = store.open_blob(id).await.unwrap();
                shared.lock().unwrap().blob = Some(id);
                let io = blob.io();
                let mut writers = Vec::new();
                for writer in 0..4u64 {
                    let (io, shared) = (Arc::clone(&io), Arc::clone(&shared));
                    writers.push(
                        spool_reactor::spawn_on(writer_reactor, move || async move {
                            let channel = io.channel().unwrap();
                            for n in 0..40u64 {
                                // Distinct units, spread over the clusters.
                                let unit = ((n * 4 + writer) * 7) % (48 * 16);
                                let data_seed = 1000 + writer * 100 + n;
                                let (result, _) = channel
                                    .write(&io, unit, buf_of(&pattern(data_seed, 4096)))
                                    .await;
                                if result.is_err() {
                                    return; // the power went
                                }
                                let covered = {
                                    let mut log = shared.lock().unwrap();
                                    log.acked.push((unit, data_seed));
                                    log.acked.len()
                                };
                                if n % 8 == 7 {
                                    if channel.flush().await.is_err() {
                                        return;
                                    }
                                    let mut log = shared.lock().unwrap();
                                    log.flushed = log.flushed.max(covered);
                                }
                            }
                        })
                        .unwrap(),
                    );
                }
                for writer in writers {
                    let _ = writer.await;
                }
                blob.close().await.unwrap();
            })
            .unwrap();
        // Cut the power at a seeded step.
        let cut_at = 200 + fastrand::Rng::with_seed(seed).u64(0..2400);
        let mut steps = 0;
        while steps < cut_at && handle.try_take().is_none() && sim.step() {
            steps += 1;
        }
        let image = bdev.cut_power(|write| survives(seed ^ 0xABCD, write.index));
        sim.stop();
        let (blob, acked, flushed) = {
            let log = log.lock().unwrap();
            (log.blob, log.acked.clone(), log.flushed)
        };
        let what = format!(
            "storm seed {seed} (cut at step {cut_at}, {} acked, {flushed} flushed)",
            acked.len()
        );
        check(image.clone(), ids, &what);
        // Every write acknowledged before the last completed flush reads back.
        let Some(blob) = blob else { continue };
        if flushed == 0 {
            continue;
        }
        let bdev = Arc::new(MallocBdev::from_image("check", 4096, &image).unwrap());
        let desc = BdevDesc::open(bdev as Arc<dyn Bdev>).expect("open bdev");
        run_sim(3, move || async move {
            let (store, _) = Blobstore::load(desc, &LoadOptions::default())
                .await
                .unwrap();
            let b = store
                .open_blob(blob)
                .await
                .unwrap_or_else(|err| panic!("{what}: the storm's blob is gone: {err}"));
            let channel = store.channel().unwrap();
            for &(unit, data_seed) in &acked[..flushed] {
                let back = read(&channel, &b.io(), unit, 4096).await;
                assert!(
                    back == pattern(data_seed, 4096),
                    "{what}: flushed write at unit {unit} lost"
                );
            }
            drop(channel);
            b.close().await.unwrap();
            store.unload().await.unwrap();
        });
    }
}
