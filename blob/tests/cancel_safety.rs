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

use cancel::{poll_then_drop, within, Polled};
use common::{buf_of, create_thin, malloc, pattern};
use cuts::{base_image, Ids, CLUSTER};
use spool_bdev::{Bdev, BdevDesc, DmaBuf, MallocBdev};
use spool_blob::{
    Blob, BlobChannel, BlobError, BlobIo, BlobOptions, Blobstore, InitOptions, LoadOptions,
};
use spool_reactor::{ReactorId, RemoteHandle, Sim, SimOptions};

/// Steps the simulation until `handle` has its result, at most `steps` steps.
fn run_bounded<T>(sim: &mut Sim, handle: &RemoteHandle<T>, steps: u64) -> Option<T> {
    for step in 0..steps {
        if let Some(result) = handle.try_take() {
            if std::env::var_os("CANCEL_STEPS").is_some() {
                eprintln!("finished after {step} steps");
            }
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

/// Step bound of one harness run (runs take under 1,500 steps).
const RUN_STEPS: u64 = 200_000;

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
                            let second = within(write, WEDGED)
                                .await
                                .map(|(result, _)| result.is_ok());
                            (matches!(seen, Polled::Completed(_)), second)
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

/// The open blobs an I/O operation uses (`Send`: built on the metadata reactor, used on
/// either).
struct Ios {
    a: Arc<BlobIo>,
    b: Arc<BlobIo>,
    c: Arc<BlobIo>,
}

type IoFuture<'a> = Pin<Box<dyn Future<Output = Result<(), BlobError>> + 'a>>;
/// An I/O operation under test: the engine future, borrowing the channel and the blobs.
type IoOp = for<'a> fn(&'a BlobChannel, &'a Ios) -> IoFuture<'a>;

type MdFuture = Pin<Box<dyn Future<Output = Result<(), BlobError>>>>;
/// A metadata operation under test: the store, the base ids, an extra thick blob `d` (not
/// open), and open handles on A and B.
type MdOp = fn(Blobstore, Ids, u64, Blob, Blob) -> MdFuture;

#[derive(Clone, Copy)]
enum Op {
    /// Run on the I/O reactor (`false`) or the metadata reactor (`true`).
    Io(bool, IoOp),
    Md(MdOp),
}

fn write_at<'a>(channel: &'a BlobChannel, io: &'a BlobIo, unit: u64, len: usize) -> IoFuture<'a> {
    Box::pin(async move {
        channel
            .write(io, unit, buf_of(&pattern(unit + 100, len)))
            .await
            .0
    })
}

fn ops() -> Vec<(&'static str, Op)> {
    vec![
        (
            "read thick",
            Op::Io(false, |ch, ios| {
                Box::pin(async move {
                    ch.read(&ios.a, 0, DmaBuf::alloc(2 * CLUSTER as usize).unwrap())
                        .await
                        .0
                })
            }),
        ),
        (
            "read clone (parent data)",
            Op::Io(false, |ch, ios| {
                Box::pin(async move {
                    ch.read(&ios.c, 8, DmaBuf::alloc(CLUSTER as usize).unwrap())
                        .await
                        .0
                })
            }),
        ),
        (
            "write thick",
            Op::Io(false, |ch, ios| write_at(ch, &ios.a, 3, 8192)),
        ),
        (
            "thin first write (I/O reactor)",
            Op::Io(false, |ch, ios| write_at(ch, &ios.b, 33, 4096)),
        ),
        (
            "thin first write (metadata reactor)",
            Op::Io(true, |ch, ios| write_at(ch, &ios.b, 33, 4096)),
        ),
        (
            "thin write across clusters",
            Op::Io(false, |ch, ios| write_at(ch, &ios.b, 30, 4 * 4096)),
        ),
        (
            "clone copy-on-write",
            Op::Io(false, |ch, ios| write_at(ch, &ios.c, 15, 4096)),
        ),
        ("flush", Op::Io(false, |ch, _| Box::pin(ch.flush()))),
        (
            "unmap",
            Op::Io(false, |ch, ios| Box::pin(ch.unmap(&ios.a, 0, 16))),
        ),
        (
            "write_zeroes (thin allocation)",
            Op::Io(false, |ch, ios| Box::pin(ch.write_zeroes(&ios.b, 44, 8))),
        ),
        (
            "snapshot",
            Op::Md(|store, ids, _, _, _| {
                Box::pin(async move { store.create_snapshot(ids.b, &[]).await.map(|_| ()) })
            }),
        ),
        (
            "clone",
            Op::Md(|store, ids, _, _, _| {
                Box::pin(async move { store.create_clone(ids.s, &[]).await.map(|_| ()) })
            }),
        ),
        (
            "resize (thick grow)",
            Op::Md(|_, _, _, a, _| Box::pin(async move { a.resize(4).await })),
        ),
        (
            "resize (thin shrink)",
            Op::Md(|_, _, _, _, b| Box::pin(async move { b.resize(2).await })),
        ),
        (
            "create",
            Op::Md(|store, _, _, _, _| {
                Box::pin(async move {
                    store
                        .create_blob(&BlobOptions {
                            num_clusters: 2,
                            ..BlobOptions::default()
                        })
                        .await
                        .map(|_| ())
                })
            }),
        ),
        (
            "open and close",
            Op::Md(|store, ids, _, _, _| {
                Box::pin(async move { store.open_blob(ids.s).await?.close().await })
            }),
        ),
        (
            "sync_md",
            Op::Md(|_, _, _, a, _| {
                Box::pin(async move {
                    a.set_xattr("cancel", &[7; 100])?;
                    a.sync_md().await
                })
            }),
        ),
        (
            "decouple",
            Op::Md(|store, ids, _, _, _| {
                Box::pin(async move { store.decouple_parent(ids.c).await })
            }),
        ),
        (
            "delete",
            Op::Md(|store, _, d, _, _| Box::pin(async move { store.delete_blob(d).await })),
        ),
        (
            "inflate",
            Op::Md(|store, ids, _, _, _| Box::pin(async move { store.inflate_blob(ids.c).await })),
        ),
    ]
}

/// What one run (an operation dropped after `polls` polls, then the checks) saw.
struct Run {
    completed: bool,
    broken: Vec<String>,
    free: u64,
    md_pages: Vec<u64>,
    image: Vec<u8>,
}

fn err(what: &str) -> impl Fn(BlobError) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// Writes then reads back 4 KiB at `unit` of `io` from reactor `on`, each bounded by
/// [`WEDGED`].
async fn io_works(on: ReactorId, io: Arc<BlobIo>, unit: u64) -> Result<(), String> {
    spool_reactor::spawn_on(on, move || async move {
        let channel = io.channel().map_err(err("channel"))?;
        let data = pattern(unit + 7, 4096);
        match within(channel.write(&io, unit, buf_of(&data)), WEDGED).await {
            None => return Err(format!("a write at unit {unit} is wedged")),
            Some((result, _)) => result.map_err(err("a later write"))?,
        }
        match within(
            channel.read(&io, unit, DmaBuf::alloc(4096).unwrap()),
            WEDGED,
        )
        .await
        {
            None => Err(format!("a read at unit {unit} is wedged")),
            Some((result, buf)) => {
                result.map_err(err("a later read"))?;
                if buf.to_vec() != data {
                    return Err(format!("unit {unit} does not read back what was written"));
                }
                Ok(())
            }
        }
    })
    .map_err(|e| e.to_string())?
    .await
    .map_err(|e| e.to_string())?
}

/// Awaits `future` for at most [`WEDGED`].
async fn bounded<T>(
    what: &str,
    future: impl Future<Output = Result<T, BlobError>>,
) -> Result<T, String> {
    within(future, WEDGED)
        .await
        .ok_or_else(|| format!("{what} is wedged"))?
        .map_err(err(what))
}

/// The checks after the drop: later I/O to the same clusters on both reactors, no freeze left
/// (a resize and a snapshot work), every handle closes.
async fn check_after(
    store: &Blobstore,
    ids: Ids,
    reactors: [ReactorId; 2],
    blobs: Vec<Blob>,
) -> Result<(), String> {
    for blob in &blobs {
        let units = blob.num_io_units();
        for unit in [1u64, 15, 16, 33, 47] {
            if unit < units {
                for &on in &reactors {
                    io_works(on, blob.io(), unit).await?;
                }
            }
        }
    }
    for blob in &blobs {
        bounded(
            "a resize after the drop",
            blob.resize(blob.num_clusters() + 1),
        )
        .await?;
    }
    bounded(
        "a snapshot after the drop",
        store.create_snapshot(ids.b, &[]),
    )
    .await?;
    for blob in blobs {
        bounded("closing a blob", blob.close()).await?;
    }
    if store.open_blob_count() != 0 {
        return Err(format!("{} blob(s) left open", store.open_blob_count()));
    }
    Ok(())
}

/// One run on a fresh copy of `image`: `op` polled `polls` times and dropped, then the checks.
fn run_one(seed: u64, image: &[u8], ids: Ids, op: Op, polls: usize) -> Run {
    let mut sim = Sim::new(SimOptions { seed, reactors: 2 });
    let reactors = sim.reactors();
    let (md, other) = (reactors[0], reactors[1]);
    let bdev = Arc::new(MallocBdev::from_image("cancel", 4096, image).unwrap());
    let desc = BdevDesc::open(Arc::clone(&bdev) as Arc<dyn Bdev>).unwrap();
    let handle = sim
        .spawn_on(md, move || async move {
            let mut broken = Vec::new();
            let (store, _) = Blobstore::load(desc, &LoadOptions::default())
                .await
                .unwrap();
            let d = store
                .create_blob(&BlobOptions {
                    num_clusters: 1,
                    ..BlobOptions::default()
                })
                .await
                .unwrap();
            let a = store.open_blob(ids.a).await.unwrap();
            let b = store.open_blob(ids.b).await.unwrap();
            let c = store.open_blob(ids.c).await.unwrap();
            let seen = match op {
                Op::Io(on_md, make) => {
                    let ios = Ios {
                        a: a.io(),
                        b: b.io(),
                        c: c.io(),
                    };
                    spool_reactor::spawn_on(if on_md { md } else { other }, move || async move {
                        let channel = ios.a.channel().unwrap();
                        let seen = poll_then_drop(make(&channel, &ios), polls, WEDGED).await;
                        match seen {
                            Polled::Completed(result) => {
                                Polled::Completed(result.map_err(|e| e.to_string()))
                            }
                            Polled::Dropped => Polled::Dropped,
                            Polled::Stuck(n) => Polled::Stuck(n),
                        }
                    })
                    .unwrap()
                    .await
                    .unwrap()
                }
                Op::Md(make) => {
                    let future = make(store.clone(), ids, d, a.clone(), b.clone());
                    match poll_then_drop(future, polls, WEDGED).await {
                        Polled::Completed(result) => {
                            Polled::Completed(result.map_err(|e| e.to_string()))
                        }
                        Polled::Dropped => Polled::Dropped,
                        Polled::Stuck(n) => Polled::Stuck(n),
                    }
                }
            };
            let completed = match seen {
                Polled::Completed(Err(e)) => {
                    broken.push(format!("the operation failed: {e}"));
                    true
                }
                Polled::Completed(Ok(())) => true,
                Polled::Dropped => false,
                Polled::Stuck(n) => {
                    broken.push(format!("never woken after poll {n}"));
                    false
                }
            };
            // What the dropped future started finishes on its own.
            spool_reactor::sleep(Duration::from_millis(20)).await;
            if let Err(e) = check_after(&store, ids, [md, other], vec![a, b, c]).await {
                broken.push(e);
            }
            let twice = store.testing_clusters_released_twice();
            if twice != 0 {
                broken.push(format!("{twice} cluster(s) released while already free"));
            }
            let free = store.free_cluster_count();
            let md_pages = store.used_md_pages();
            let image = bdev.snapshot();
            if let Err(e) = store.unload().await {
                broken.push(format!("unload: {e}"));
            }
            Run {
                completed,
                broken,
                free,
                md_pages,
                image,
            }
        })
        .unwrap();
    let run = run_bounded(&mut sim, &handle, RUN_STEPS).unwrap_or_else(|| Run {
        completed: true, // a wedged run ends the sweep of this operation
        broken: vec![format!("the run did not finish within {RUN_STEPS} steps")],
        free: 0,
        md_pages: Vec::new(),
        image: Vec::new(),
    });
    sim.stop();
    run
}

/// Free clusters and used md pages a fresh load of `image` computes.
fn loaded_counts(image: &[u8]) -> (u64, Vec<u64>) {
    let bdev = Arc::new(MallocBdev::from_image("count", 4096, image).unwrap());
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

/// The harness: every operation, dropped after every number of polls until it completes,
/// under several seeds.
#[test]
fn every_operation_dropped_at_every_await_point_leaves_nothing_behind() {
    let seeds: Vec<u64> = match std::env::var("SEED") {
        Ok(s) => vec![s.parse().unwrap()],
        Err(_) => vec![3, 11, 29],
    };
    let (image, ids) = base_image();
    let mut broken = Vec::new();
    let mut runs = 0;
    let only = std::env::var("CANCEL_OPS").ok();
    for (name, op) in ops() {
        if only.as_deref().is_some_and(|only| !name.contains(only)) {
            continue;
        }
        for &seed in &seeds {
            for polls in 1.. {
                assert!(polls <= 500, "{name}: still pending after 500 polls");
                let run = run_one(seed, &image, ids, op, polls);
                runs += 1;
                let what = format!("{name}, seed {seed}, dropped after {polls} poll(s)");
                for problem in &run.broken {
                    broken.push(format!("{what}: {problem}"));
                }
                if run.image.is_empty() {
                    break;
                }
                let (free, md_pages) = loaded_counts(&run.image);
                if free != run.free {
                    broken.push(format!(
                        "{what}: {} free clusters in memory, a load computes {free}",
                        run.free
                    ));
                }
                if md_pages != run.md_pages {
                    broken.push(format!(
                        "{what}: md pages in use {:?}, a load computes {md_pages:?}",
                        run.md_pages
                    ));
                }
                if run.completed {
                    break;
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "{} broken expectations in {runs} runs:\n{}",
        broken.len(),
        broken.join("\n")
    );
}
