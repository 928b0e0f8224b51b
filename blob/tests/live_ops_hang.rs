//! Goal (issue 14): thin first writes on two reactors, running while the metadata reactor
//! loops through the live operations (snapshot, clone, write the clone, resize, delete the
//! clone, inflate or decouple the origin or neither, delete the snapshot: merged into the
//! origin when it is still its parent; the clone is written from both reactors and those
//! writes are dropped where they stand before its delete, as a stopped export drops its
//! requests), with power cuts and dirty loads in between (after a
//! load, the leftovers of an interrupted round are deleted, merging into the origin, while
//! it is written), never hang: every operation and every write finishes. Method: the
//! deterministic simulation over many seeds, each life bounded in steps (a hang fails the
//! test naming its seed and where it stood; rerun with SEED=n).

mod common;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::{buf_of, create_thin, pattern};
use spool_bdev::{Bdev, BdevDesc, CrashBdev};
use spool_blob::{Blobstore, InitOptions, LoadOptions};
use spool_reactor::{ReactorId, Sim, SimOptions};

const CLUSTER: u64 = 64 << 10;
const UNITS_PER_CLUSTER: u64 = CLUSTER / 4096;
const CLUSTERS: u64 = 16;
const DEVICE: u64 = 16 << 20;
const ROUNDS: u64 = 4;
const LIVES: u64 = 3;
/// Steps without any progress (no write acknowledged, no operation finished) that count as
/// a hang.
const STALL_STEPS: u64 = 400_000;

/// Where a life is (for a hang's report).
#[derive(Default)]
struct Progress {
    stage: Mutex<String>,
    writes: AtomicU64,
}

impl Progress {
    fn set(&self, what: String) {
        *self.stage.lock().unwrap() = what;
    }
    fn snapshot(&self) -> (String, u64) {
        (
            self.stage.lock().unwrap().clone(),
            self.writes.load(Ordering::SeqCst),
        )
    }
}

/// `io` until `cut` is raised (then it is dropped where it stands: `None`).
async fn until_cut<F: Future>(io: F, cut: &AtomicBool) -> Option<F::Output> {
    let mut io = std::pin::pin!(io);
    loop {
        let tick = spool_reactor::sleep(std::time::Duration::from_micros(30));
        let mut tick = std::pin::pin!(tick);
        let done = std::future::poll_fn(|cx| {
            if let std::task::Poll::Ready(output) = io.as_mut().poll(cx) {
                return std::task::Poll::Ready(Some(output));
            }
            tick.as_mut().poll(cx).map(|_| None)
        })
        .await;
        if done.is_some() {
            return done;
        }
        if cut.load(Ordering::SeqCst) {
            return None;
        }
    }
}

/// Writers on every reactor: 4 KiB and 8 KiB writes at random units of the origin's first
/// `CLUSTERS` clusters until `stop`.
fn start_writers(
    reactors: &[ReactorId],
    io: &Arc<spool_blob::BlobIo>,
    stop: &Arc<AtomicBool>,
    seed: u64,
    progress: &Arc<Progress>,
) -> Vec<spool_reactor::RemoteHandle<()>> {
    let mut writers = Vec::new();
    for (n, &reactor) in reactors.iter().enumerate() {
        for w in 0..2u64 {
            let (io, stop, progress) = (Arc::clone(io), Arc::clone(stop), Arc::clone(progress));
            writers.push(
                spool_reactor::spawn_on(reactor, move || async move {
                    let channel = io.channel().unwrap();
                    let mut rng =
                        fastrand::Rng::with_seed(seed ^ ((n as u64 * 2 + w + 1) * 0x9E37));
                    let span = CLUSTERS * UNITS_PER_CLUSTER;
                    let mut k = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        let unit = rng.u64(0..span - 1);
                        let len = if rng.u8(0..4) == 0 { 2 } else { 1 };
                        k += 1;
                        let (result, _) = channel
                            .write(&io, unit, buf_of(&pattern(k, (len * 4096) as usize)))
                            .await;
                        result.unwrap_or_else(|err| panic!("write unit {unit}: {err}"));
                        progress.writes.fetch_add(1, Ordering::SeqCst);
                        if rng.u8(0..3) == 0 {
                            spool_reactor::yield_now().await;
                        }
                    }
                })
                .unwrap(),
            );
        }
    }
    writers
}

/// One life: init (or load the image), then rounds of live operations under writers.
async fn life(
    reactors: Vec<ReactorId>,
    desc: BdevDesc,
    first: bool,
    origin: Arc<AtomicU64>,
    seed: u64,
    progress: Arc<Progress>,
) {
    let store = if first {
        let store = Blobstore::init(
            desc,
            &InitOptions {
                cluster_size: CLUSTER,
                ..InitOptions::default()
            },
        )
        .await
        .unwrap();
        origin.store(create_thin(&store, CLUSTERS).await, Ordering::SeqCst);
        store
    } else {
        progress.set("load".into());
        Blobstore::load(desc, &LoadOptions::default())
            .await
            .unwrap()
            .0
    };
    let origin = origin.load(Ordering::SeqCst);
    let blob = store.open_blob(origin).await.unwrap();
    let io = blob.io();
    let stop = Arc::new(AtomicBool::new(false));
    let writers = start_writers(&reactors, &io, &stop, seed, &progress);
    let mut rng = fastrand::Rng::with_seed(seed);
    // What an interrupted round left: clones first, then the snapshots (the origin's parent
    // is merged into it).
    loop {
        let leftovers: Vec<u64> = store
            .blob_ids()
            .into_iter()
            .filter(|&id| id != origin && store.clones_of(id).len() <= 1)
            .filter(|&id| store.clones_of(id) != [origin] || store.parent_of(origin) == Some(id))
            .collect();
        let Some(&id) = leftovers
            .iter()
            .find(|&&id| store.clones_of(id).is_empty())
            .or(leftovers.first())
        else {
            break;
        };
        progress.set(format!(
            "cleanup: delete {id:#x} (clones {:?})",
            store.clones_of(id)
        ));
        if std::env::var_os("VERBOSE").is_some() {
            eprintln!(
                "cleanup: delete {id:#x} (clones {:?}, origin {origin:#x})",
                store.clones_of(id)
            );
        }
        store.delete_blob(id).await.unwrap();
    }
    for round in 0..ROUNDS {
        progress.set(format!("round {round}: snapshot"));
        let snap = store.create_snapshot(origin, &[]).await.unwrap();
        progress.set(format!("round {round}: clone"));
        let clone = store.create_clone(snap, &[]).await.unwrap();
        let c = store.open_blob(clone).await.unwrap();
        progress.set(format!("round {round}: clone write"));
        // The clone is written from both reactors, then its writes are dropped where they
        // stand (an export stopped with requests in flight), and it is closed and deleted.
        let cut_clone = Arc::new(AtomicBool::new(false));
        let clone_writers: Vec<_> = reactors
            .iter()
            .enumerate()
            .map(|(n, &reactor)| {
                let (cio, cut_clone) = (c.io(), Arc::clone(&cut_clone));
                let wseed = rng.u64(..);
                spool_reactor::spawn_on(reactor, move || async move {
                    let channel = cio.channel().unwrap();
                    let mut rng = fastrand::Rng::with_seed(wseed);
                    let mut k = 0u64;
                    loop {
                        let unit = rng.u64(0..CLUSTERS * UNITS_PER_CLUSTER);
                        k += 1;
                        let write =
                            channel.write(&cio, unit, buf_of(&pattern(n as u64 * 1000 + k, 4096)));
                        match until_cut(write, &cut_clone).await {
                            Some((result, _)) => result.unwrap(),
                            None => break,
                        }
                    }
                })
                .unwrap()
            })
            .collect();
        spool_reactor::sleep(std::time::Duration::from_micros(rng.u64(50..2_000))).await;
        cut_clone.store(true, Ordering::SeqCst);
        for handle in clone_writers {
            handle.await.unwrap();
        }
        c.close().await.unwrap();
        progress.set(format!("round {round}: delete clone"));
        store.delete_blob(clone).await.unwrap();
        progress.set(format!("round {round}: resize"));
        blob.resize(CLUSTERS + 1 + round % 3).await.unwrap();
        match rng.u8(0..3) {
            0 => {}
            1 => {
                progress.set(format!("round {round}: inflate origin"));
                store.inflate_blob(origin).await.unwrap();
            }
            _ => {
                progress.set(format!("round {round}: decouple origin"));
                store.decouple_parent(origin).await.unwrap();
            }
        }
        progress.set(format!("round {round}: delete snapshot"));
        store.delete_blob(snap).await.unwrap();
    }
    progress.set("stopping writers".into());
    stop.store(true, Ordering::SeqCst);
    for handle in writers {
        handle.await.unwrap();
    }
    progress.set("closing".into());
    drop(io);
    blob.close().await.unwrap();
    store.unload().await.unwrap();
    progress.set("done".into());
}

/// Runs one life of `seed` on `image` (None: a new device); cuts the power after `cut`
/// steps if given. Returns the image the next life starts from, or why it hung.
fn run_life(
    seed: u64,
    image: Option<Vec<u8>>,
    origin: &Arc<AtomicU64>,
    cut: Option<u64>,
) -> Result<Vec<u8>, String> {
    let mut sim = Sim::new(SimOptions { seed, reactors: 2 });
    let reactors = sim.reactors();
    let crash = Arc::new(match &image {
        Some(image) => CrashBdev::from_image("sim", 4096, image).unwrap(),
        None => CrashBdev::new("sim", 4096, DEVICE / 4096).unwrap(),
    });
    let desc = BdevDesc::open(Arc::clone(&crash) as Arc<dyn Bdev>).unwrap();
    let progress = Arc::new(Progress::default());
    let (p, all, o) = (Arc::clone(&progress), reactors.clone(), Arc::clone(origin));
    let first = image.is_none();
    let handle = sim
        .spawn_on(reactors[0], move || life(all, desc, first, o, seed, p))
        .unwrap();
    let mut steps = 0u64;
    let mut seen = progress.snapshot();
    let mut since = 0u64;
    loop {
        if let Some(result) = handle.try_take() {
            if std::env::var_os("VERBOSE").is_some() {
                eprintln!("seed {seed}: life done in {steps} steps");
            }
            sim.stop();
            result.map_err(|err| format!("the life failed: {err}"))?;
            return Ok(crash.live_image());
        }
        if cut.is_some_and(|cut| steps >= cut) {
            let rng = std::cell::RefCell::new(fastrand::Rng::with_seed(seed ^ steps));
            let image = crash.cut_power(|_| rng.borrow_mut().bool());
            if std::env::var_os("VERBOSE").is_some() {
                eprintln!("seed {seed}: cut at {:?}", progress.snapshot());
            }
            sim.stop();
            return Ok(image);
        }
        if !sim.step() {
            if let Some(result) = handle.try_take() {
                sim.stop();
                result.map_err(|err| format!("the life failed: {err}"))?;
                return Ok(crash.live_image());
            }
            return Err(format!(
                "hang: nothing left to run at {:?} after {steps} steps",
                progress.snapshot()
            ));
        }
        steps += 1;
        if steps.is_multiple_of(1_000) {
            let now = progress.snapshot();
            if now != seen {
                seen = now;
                since = steps;
            } else if steps - since > STALL_STEPS {
                return Err(format!(
                    "hang: no progress for {} steps at {:?} (stage, writes acknowledged)",
                    steps - since,
                    seen
                ));
            }
        }
    }
}

/// Every life of `seed`: all but the last end in a power cut at a seeded step.
fn run_seed(seed: u64) -> Result<(), String> {
    let origin = Arc::new(AtomicU64::new(0));
    let mut image = None;
    let mut rng = fastrand::Rng::with_seed(seed.wrapping_mul(0x2545_F491_4F6C_DD1D));
    for n in 0..LIVES {
        let cut = (n + 1 < LIVES).then(|| rng.u64(1_000..25_000));
        image = Some(
            run_life(seed ^ (n << 40), image, &origin, cut)
                .map_err(|what| format!("seed {seed}, life {n} (cut {cut:?}): {what}"))?,
        );
    }
    Ok(())
}

#[test]
fn live_ops_with_thin_writers_and_power_cuts_never_hang() {
    let seeds: Vec<u64> = match std::env::var("SEED") {
        Ok(seed) => vec![seed.parse().unwrap()],
        Err(_) => {
            let n: u64 = std::env::var("SEEDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(8);
            (0..n).collect()
        }
    };
    let mut failures = Vec::new();
    for seed in seeds {
        if let Err(what) = run_seed(seed) {
            eprintln!("{what}");
            failures.push(what);
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
