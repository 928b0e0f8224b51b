//! Goal: a device error (EIO or ENOSPC) at any request of any metadata operation leaves the
//! running store right: the error comes back, a retry succeeds, the free clusters and md
//! pages in memory equal what a fresh load of the device computes, unload works, and a
//! power cut right after the error or after the unload loses nothing acknowledged.
//! Method: each operation runs once on an error bdev over the crash bdev to count its
//! requests of each kind; then, for every kind and every n, on a fresh copy of the base
//! image, the n-th request of that kind fails (with EIO, and for writes and flushes also
//! with ENOSPC) and the checks above run. Reads of a load are swept the same way.

mod common;
mod cuts;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use common::{buf_of, create_thick, pattern, read};
use cuts::{base_image, check, run_sim, Ids, CLUSTER};
use spool_bdev::{Bdev, BdevDesc, CrashBdev, ErrorBdev, ErrorRule, IoKind, MallocBdev};
use spool_blob::{BlobError, BlobOptions, Blobstore, LoadOptions};
use spool_reactor::{Sim, SimOptions};

type OpFuture = Pin<Box<dyn Future<Output = Result<(), BlobError>>>>;
/// An operation under test; it closes every blob it opens, whatever happens.
type Op = fn(Blobstore, Ids) -> OpFuture;

const KINDS: [IoKind; 5] = [
    IoKind::Write,
    IoKind::Flush,
    IoKind::Read,
    IoKind::WriteZeroes,
    IoKind::Unmap,
];

/// Runs `f` on an open blob and closes it whatever `f` returned.
async fn with_blob<F, Fut>(store: &Blobstore, id: u64, f: F) -> Result<(), BlobError>
where
    F: FnOnce(spool_blob::Blob) -> Fut,
    Fut: Future<Output = Result<(), BlobError>>,
{
    let blob = store.open_blob(id).await?;
    let result = f(blob.clone()).await;
    let closed = blob.close().await;
    result.and(closed)
}

async fn write_units(store: &Blobstore, id: u64, units: &[u64]) -> Result<(), BlobError> {
    let channel = store.channel()?;
    with_blob(store, id, |blob| async move {
        for &unit in units {
            channel
                .write(&blob.io(), unit, buf_of(&pattern(9, 4096)))
                .await
                .0?;
        }
        Ok(())
    })
    .await
}

fn ops() -> Vec<(&'static str, Op)> {
    vec![
        ("create", |store, _| {
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
                    .map(|_| ())
            })
        }),
        ("snapshot", |store, ids| {
            Box::pin(async move { store.create_snapshot(ids.b, &[]).await.map(|_| ()) })
        }),
        ("clone", |store, ids| {
            Box::pin(async move { store.create_clone(ids.s, &[]).await.map(|_| ()) })
        }),
        ("inflate", |store, ids| {
            Box::pin(async move { store.inflate_blob(ids.c).await })
        }),
        ("decouple", |store, ids| {
            Box::pin(async move { store.decouple_parent(ids.c).await })
        }),
        ("grow", |store, ids| {
            Box::pin(async move {
                with_blob(&store, ids.a, |blob| async move {
                    blob.resize(5).await?;
                    blob.sync_md().await
                })
                .await
            })
        }),
        ("shrink", |store, ids| {
            Box::pin(async move {
                with_blob(&store, ids.a, |blob| async move {
                    blob.resize(1).await?;
                    blob.sync_md().await
                })
                .await
            })
        }),
        ("delete", |store, ids| {
            Box::pin(async move { store.delete_blob(ids.c).await })
        }),
        ("delete with merge", |store, ids| {
            Box::pin(async move { store.delete_blob(ids.s).await })
        }),
        ("thin allocation", |store, ids| {
            Box::pin(async move { write_units(&store, ids.b, &[1, 33, 49]).await })
        }),
        ("clone copy-on-write", |store, ids| {
            Box::pin(async move { write_units(&store, ids.c, &[16, 15]).await })
        }),
    ]
}

/// Whether `err` on a retry means the first attempt already finished the job (a delete
/// that committed before its error).
fn already_done(name: &str, err: &BlobError) -> bool {
    name.starts_with("delete") && err.errno() == -libc::ENOENT
}

/// What one faulted run saw.
struct Run {
    /// The first attempt's result, as text (`None`: it succeeded).
    first: Option<String>,
    /// Whether the rule failed a request.
    fired: bool,
    /// Free clusters and md pages in memory after the retry.
    free: u64,
    md_pages: Vec<u64>,
    /// The device right after the error: durable only, and everything.
    durable_at_error: Vec<u8>,
    live_at_error: Vec<u8>,
    /// The device after the retry, before unload (not clean: a load recomputes).
    live_before_unload: Vec<u8>,
    /// The device after unload.
    unloaded: Vec<u8>,
}

/// Runs `op` on a copy of `base`, failing the `n`-th request of `kind` with `errno`
/// (n = 0: no failure); returns what it saw, or the first broken expectation.
fn faulted_run(
    base: &[u8],
    ids: Ids,
    name: &'static str,
    op: Op,
    fault: Option<(IoKind, u64, i32)>,
) -> Result<(Run, [u64; 5]), String> {
    let crash = Arc::new(CrashBdev::from_image("crash", 4096, base).unwrap());
    let faulty = Arc::new(ErrorBdev::new(
        "faulty",
        Arc::clone(&crash) as Arc<dyn Bdev>,
    ));
    let desc = BdevDesc::open(Arc::clone(&faulty) as Arc<dyn Bdev>).expect("open bdev");
    let images: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let (probe, shots) = (Arc::clone(&crash), Arc::clone(&images));
    let errors = Arc::clone(&faulty);
    let mut sim = Sim::new(SimOptions {
        seed: 5,
        reactors: 1,
    });
    let reactor = sim.reactors()[0];
    let out = sim.block_on(reactor, move || async move {
        let (store, _) = Blobstore::load(desc, &LoadOptions::default())
            .await
            .map_err(|err| format!("{name}: the base does not load: {err}"))?;
        let before = KINDS.map(|kind| errors.seen_count(kind));
        let rule = fault
            .map(|(kind, n, errno)| errors.add_rule(ErrorRule::new(errno).kinds(&[kind]).nth(n)));
        let first = op(store.clone(), ids).await;
        let counts = {
            let after = KINDS.map(|kind| errors.seen_count(kind));
            [0, 1, 2, 3, 4].map(|i| after[i] - before[i])
        };
        let fired = match rule {
            Some(rule) => {
                let stats = errors.rule_stats(rule).unwrap();
                errors.remove_rule(rule);
                stats.injected > 0
            }
            None => false,
        };
        shots.lock().unwrap().push(probe.durable_image());
        shots.lock().unwrap().push(probe.live_image());
        if let Err(err) = &first {
            let retried = op(store.clone(), ids).await;
            match retried {
                Ok(()) => {}
                Err(err2) if already_done(name, &err2) => {}
                Err(err2) => {
                    return Err(format!(
                        "{name}: after `{err}`, the retry failed too: {err2}"
                    ))
                }
            }
        }
        let twice = store.testing_clusters_released_twice();
        if twice != 0 {
            return Err(format!(
                "{name}: {twice} cluster(s) released while already free (first attempt: {first:?})"
            ));
        }
        let free = store.free_cluster_count();
        let md_pages = store.used_md_pages();
        shots.lock().unwrap().push(probe.live_image());
        store
            .unload()
            .await
            .map_err(|err| format!("{name}: unload after the error failed: {err}"))?;
        shots.lock().unwrap().push(probe.live_image());
        Ok((
            first.err().map(|e| e.to_string()),
            fired,
            free,
            md_pages,
            counts,
        ))
    });
    sim.stop();
    let (first, fired, free, md_pages, counts) =
        out.map_err(|err| format!("{name}: {err:?}"))??;
    let mut shots = std::mem::take(&mut *images.lock().unwrap()).into_iter();
    let mut next = || shots.next().unwrap();
    Ok((
        Run {
            first,
            fired,
            free,
            md_pages,
            durable_at_error: next(),
            live_at_error: next(),
            live_before_unload: next(),
            unloaded: next(),
        },
        counts,
    ))
}

/// Free clusters and used md pages a load of `image` computes.
fn loaded_counts(image: &[u8]) -> (u64, Vec<u64>) {
    let bdev = Arc::new(MallocBdev::from_image("count", 4096, image).unwrap());
    let desc = BdevDesc::open(bdev as Arc<dyn Bdev>).expect("open bdev");
    run_sim(4, move || async move {
        let (store, _) = Blobstore::load(desc, &LoadOptions::default())
            .await
            .unwrap();
        let counts = (store.free_cluster_count(), store.used_md_pages());
        store.unload().await.unwrap();
        counts
    })
}

/// Checks one faulted run; returns the broken expectations.
fn check_run(ids: Ids, what: &str, run: Run) -> Vec<String> {
    let mut broken = Vec::new();
    let (free, md_pages) = loaded_counts(&run.live_before_unload);
    if free != run.free {
        broken.push(format!(
            "{what}: {} free clusters in memory, a load computes {free}",
            run.free
        ));
    }
    if md_pages != run.md_pages {
        broken.push(format!(
            "{what}: md pages in use differ from a fresh load's: {:?} vs {md_pages:?}",
            run.md_pages
        ));
    }
    for (image, when) in [
        (
            run.durable_at_error,
            "power cut at the error (pending writes lost)",
        ),
        (
            run.live_at_error,
            "power cut at the error (pending writes kept)",
        ),
        (run.unloaded, "after retry and unload"),
    ] {
        let label = format!("{what}, {when}");
        if let Err(panic) = std::panic::catch_unwind(|| check(image, ids, &label)) {
            broken.push(
                panic
                    .downcast_ref::<String>()
                    .cloned()
                    .unwrap_or_else(|| format!("{label}: check panicked")),
            );
        }
    }
    broken
}

fn sweep(name: &'static str, op: Op) -> Vec<String> {
    let (base, ids) = base_image();
    let (clean, counts) = match faulted_run(&base, ids, name, op, None) {
        Ok(done) => done,
        Err(err) => return vec![err],
    };
    if let Some(err) = &clean.first {
        return vec![format!("{name}: fails without any fault: {err}")];
    }
    let mut broken = check_run(ids, &format!("{name}: no fault"), clean);
    for (i, kind) in KINDS.into_iter().enumerate() {
        let errnos: &[i32] = match kind {
            IoKind::Write | IoKind::Flush => &[-libc::EIO, -libc::ENOSPC],
            _ => &[-libc::EIO],
        };
        for n in 1..=counts[i] {
            for &errno in errnos {
                let what = format!("{name}: {kind:?} #{n} fails with {errno}");
                match faulted_run(&base, ids, name, op, Some((kind, n, errno))) {
                    Ok((run, _)) => {
                        assert!(run.fired, "{what}: the fault never fired");
                        let first = run.first.clone();
                        let mut found = check_run(ids, &what, run);
                        if !found.is_empty() {
                            found.push(format!("{what}: first attempt: {first:?}"));
                        }
                        broken.extend(found);
                    }
                    Err(err) => broken.push(format!("{what}: {err}")),
                }
            }
        }
    }
    broken
}

#[test]
fn every_request_of_every_operation_can_fail() {
    let mut broken = Vec::new();
    for (name, op) in ops() {
        broken.extend(sweep(name, op));
    }
    assert!(
        broken.is_empty(),
        "{} broken expectation(s):\n{}",
        broken.len(),
        broken.join("\n")
    );
}

#[test]
fn a_failed_load_leaves_the_device_loadable() {
    let (base, ids) = base_image();
    let crash = Arc::new(CrashBdev::from_image("crash", 4096, &base).unwrap());
    let faulty = Arc::new(ErrorBdev::new(
        "faulty",
        Arc::clone(&crash) as Arc<dyn Bdev>,
    ));
    let mut n = 1;
    loop {
        let rule = faulty.add_rule(ErrorRule::new(-libc::EIO).kinds(&[IoKind::Read]).nth(n));
        let desc = BdevDesc::open(Arc::clone(&faulty) as Arc<dyn Bdev>).expect("open bdev");
        let loaded = run_sim(6, move || async move {
            match Blobstore::load(desc, &LoadOptions::default()).await {
                Ok((store, _)) => {
                    store.unload().await.unwrap();
                    true
                }
                Err(err) => {
                    assert_eq!(err.errno(), -libc::EIO, "read #{n}: {err}");
                    false
                }
            }
        });
        let fired = faulty.rule_stats(rule).unwrap().injected > 0;
        faulty.remove_rule(rule);
        check(
            crash.live_image(),
            ids,
            &format!("load with read #{n} failing"),
        );
        if !fired {
            assert!(loaded, "read #{n}: the load failed without a fault");
            break;
        }
        assert!(!loaded, "read #{n} failed but the load said it succeeded");
        n += 1;
    }
    assert!(n > 3, "the load made only {n} reads");
}

#[test]
fn a_failed_unload_never_leaves_a_clean_flag_over_later_changes() {
    // Finding 6: clean = 1 reaches the device, its flush fails; a blob made afterwards must
    // survive a power cut (the next change writes clean = 0 again).
    let (base, ids) = base_image();
    let mut failed_unloads = 0;
    let faults = (1..=4u64)
        .map(|n| (IoKind::Flush, n))
        .chain((1..=6u64).map(|n| (IoKind::Write, n)));
    for (kind, n) in faults {
        let crash = Arc::new(CrashBdev::from_image("crash", 4096, &base).unwrap());
        let faulty = Arc::new(ErrorBdev::new(
            "faulty",
            Arc::clone(&crash) as Arc<dyn Bdev>,
        ));
        let desc = BdevDesc::open(Arc::clone(&faulty) as Arc<dyn Bdev>).expect("open bdev");
        let errors = Arc::clone(&faulty);
        let made = run_sim(7, move || async move {
            let (store, _) = Blobstore::load(desc, &LoadOptions::default())
                .await
                .unwrap();
            // A change first: the store is dirty on disk when the unload starts.
            create_thick(&store, 1).await;
            let rule = errors.add_rule(ErrorRule::new(-libc::EIO).kinds(&[kind]).nth(n));
            let failed = store.clone().unload().await.is_err();
            errors.remove_rule(rule);
            if !failed {
                return None; // fewer requests of this kind than n
            }
            let id = create_thick(&store, 1).await;
            let blob = store.open_blob(id).await.unwrap();
            let channel = store.channel().unwrap();
            channel
                .write(&blob.io(), 0, buf_of(&pattern(77, CLUSTER as usize)))
                .await
                .0
                .unwrap();
            channel.flush().await.unwrap();
            drop(channel);
            blob.close().await.unwrap();
            Some(id)
        });
        let Some(made) = made else { continue };
        failed_unloads += 1;
        {
            let image = crash.cut_power_keep_none();
            let blobs = check(
                image.clone(),
                ids,
                &format!("unload failing at {kind:?} #{n}"),
            );
            assert!(
                blobs >= 6,
                "{kind:?} #{n}: the blob made after the failed unload is gone"
            );
            let bdev = Arc::new(MallocBdev::from_image("check", 4096, &image).unwrap());
            let desc = BdevDesc::open(bdev as Arc<dyn Bdev>).expect("open bdev");
            run_sim(8, move || async move {
                let (store, _) = Blobstore::load(desc, &LoadOptions::default())
                    .await
                    .unwrap();
                let blob = store
                    .open_blob(made)
                    .await
                    .unwrap_or_else(|err| panic!("{kind:?} #{n}: blob made after: {err}"));
                let channel = store.channel().unwrap();
                let back = read(&channel, &blob.io(), 0, CLUSTER as usize).await;
                assert!(
                    back == pattern(77, CLUSTER as usize),
                    "{kind:?} #{n}: data lost"
                );
                drop(channel);
                blob.close().await.unwrap();
                store.unload().await.unwrap();
            });
        }
    }
    assert!(
        failed_unloads >= 5,
        "only {failed_unloads} faults made the unload fail"
    );
}
