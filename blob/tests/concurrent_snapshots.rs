//! Goal: writers on a thin blob, on several reactors, while snapshots and resizes run in a
//! loop, lose nothing: afterwards every io_unit holds the last acknowledged write (each unit
//! has one writer, so "last" is well defined), and every snapshot holds, for each unit, a
//! value the blob had at the snapshot's freeze point: a write no older than the last one
//! acknowledged before the snapshot started and no newer than the last one submitted before it
//! ended. Checked again after unload and load. Method: the deterministic simulation over many
//! seeds (a failure names its seed: rerun with SEED=n), and real threads.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::{buf_of, create_thin, malloc, pattern, read};
use spool_blob::{Blobstore, InitOptions, LoadOptions};
use spool_reactor::ReactorId;

const CLUSTER: u64 = 64 << 10;
const UNITS_PER_CLUSTER: u64 = CLUSTER / 4096;
const CLUSTERS: u64 = 8;
const WRITERS: u64 = 4;
const WRITES_EACH: u64 = 40;
const SNAPSHOTS: usize = 4;

/// One acknowledged write: which unit, the data seed, and the logical times it was submitted
/// and acknowledged.
#[derive(Debug, Clone, Copy)]
struct Done {
    unit: u64,
    seed: u64,
    submitted: u64,
    acked: u64,
}

fn data(seed: u64) -> Vec<u8> {
    pattern(seed, 4096)
}

async fn scenario(
    reactors: Vec<ReactorId>,
    desc: spool_bdev::BdevDesc,
    desc_again: spool_bdev::BdevDesc,
    rng_seed: u64,
) {
    let store = Blobstore::init(
        desc,
        &InitOptions {
            cluster_size: CLUSTER,
            ..InitOptions::default()
        },
    )
    .await
    .unwrap();
    let id = create_thin(&store, CLUSTERS).await;
    let blob = store.open_blob(id).await.unwrap();
    let io = blob.io();
    let clock = Arc::new(AtomicU64::new(1));
    let acked_count = Arc::new(AtomicU64::new(0));
    let log: Arc<Mutex<Vec<Vec<Done>>>> = Arc::new(Mutex::new(vec![Vec::new(); WRITERS as usize]));
    let mut handles = Vec::new();
    for writer in 0..WRITERS {
        let reactor = reactors[1 + writer as usize % (reactors.len() - 1)];
        let (io, clock, log) = (Arc::clone(&io), Arc::clone(&clock), Arc::clone(&log));
        let acked_count = Arc::clone(&acked_count);
        handles.push(
            spool_reactor::spawn_on(reactor, move || async move {
                let channel = io.channel().unwrap();
                let mut rng = fastrand::Rng::with_seed(rng_seed ^ ((writer + 1) * 0x9E37));
                let owned = CLUSTERS * UNITS_PER_CLUSTER / WRITERS;
                for n in 0..WRITES_EACH {
                    let unit = rng.u64(0..owned) * WRITERS + writer;
                    let seed = (writer << 32) | (n + 1);
                    let submitted = clock.fetch_add(1, Ordering::SeqCst);
                    let (result, _) = channel.write(&io, unit, buf_of(&data(seed))).await;
                    result.unwrap();
                    let acked = clock.fetch_add(1, Ordering::SeqCst);
                    log.lock().unwrap()[writer as usize].push(Done {
                        unit,
                        seed,
                        submitted,
                        acked,
                    });
                    acked_count.fetch_add(1, Ordering::SeqCst);
                    if rng.u8(0..4) == 0 {
                        spool_reactor::yield_now().await;
                    }
                }
            })
            .unwrap(),
        );
    }
    // Meanwhile: snapshots and resizes, on the metadata reactor.
    let mut snapshots = Vec::new();
    let total = WRITERS * WRITES_EACH;
    for round in 0..SNAPSHOTS {
        // Spread the snapshots over the writes.
        let target = total * (round as u64 + 1) / (SNAPSHOTS as u64 + 2);
        while acked_count.load(Ordering::SeqCst) < target {
            spool_reactor::sleep(std::time::Duration::from_micros(20)).await;
        }
        let start = clock.fetch_add(1, Ordering::SeqCst);
        let snap = store.create_snapshot(id, &[]).await.unwrap();
        let end = clock.fetch_add(1, Ordering::SeqCst);
        snapshots.push((snap, start, end));
        blob.resize(CLUSTERS + 1 + round as u64).await.unwrap();
    }
    for handle in handles {
        handle.await.unwrap();
    }
    let log = log.lock().unwrap().clone();
    // The snapshots really ran among the writes (checked under simulation, where the
    // schedule is the seed's; real threads may finish the writes during one snapshot).
    let (first_end, last_start) = (snapshots[0].2, snapshots[SNAPSHOTS - 1].1);
    let all: Vec<&Done> = log.iter().flatten().collect();
    assert!(
        all.iter().any(|d| d.acked < last_start),
        "no write finished before the last snapshot"
    );
    if spool_reactor::is_simulated() {
        assert!(
            all.iter().any(|d| d.acked > first_end),
            "every write finished before the first snapshot"
        );
    }
    let verify = |store: Blobstore, snapshots: Vec<(u64, u64, u64)>, log: Vec<Vec<Done>>| async move {
        let channel = store.channel().unwrap();
        let blob = store.open_blob(id).await.unwrap();
        // The blob: the last write per unit.
        let mut last: BTreeMap<u64, u64> = BTreeMap::new();
        for writes in &log {
            for done in writes {
                last.insert(done.unit, done.seed);
            }
        }
        let content = read(&channel, &blob.io(), 0, (CLUSTERS * CLUSTER) as usize).await;
        for unit in 0..CLUSTERS * UNITS_PER_CLUSTER {
            let got = &content[(unit * 4096) as usize..((unit + 1) * 4096) as usize];
            match last.get(&unit) {
                Some(&seed) => assert!(
                    got == data(seed).as_slice(),
                    "blob unit {unit}: not the last write"
                ),
                None => assert!(
                    got.iter().all(|&b| b == 0),
                    "blob unit {unit}: never written, not zero"
                ),
            }
        }
        // Each snapshot: per unit, a write between the bounds (or zeros).
        for &(snap, start, end) in &snapshots {
            let s = store.open_blob(snap).await.unwrap();
            let content = read(&channel, &s.io(), 0, (CLUSTERS * CLUSTER) as usize).await;
            for unit in 0..CLUSTERS * UNITS_PER_CLUSTER {
                let writes: Vec<&Done> = log[(unit % WRITERS) as usize]
                    .iter()
                    .filter(|d| d.unit == unit)
                    .collect();
                let lower = writes.iter().rposition(|d| d.acked < start);
                let upper = writes.iter().rposition(|d| d.submitted < end);
                let got = &content[(unit * 4096) as usize..((unit + 1) * 4096) as usize];
                let mut allowed: Vec<Vec<u8>> = Vec::new();
                if lower.is_none() {
                    allowed.push(vec![0u8; 4096]);
                }
                if let Some(upper) = upper {
                    for done in &writes[lower.unwrap_or(0)..=upper] {
                        allowed.push(data(done.seed));
                    }
                }
                assert!(
                    allowed.iter().any(|a| a.as_slice() == got),
                    "snapshot {snap:#x} (clock {start}..{end}) unit {unit}: a value the blob never had then"
                );
            }
            s.close().await.unwrap();
        }
        blob.close().await.unwrap();
        drop(channel);
        store
    };
    drop(io);
    blob.close().await.unwrap();
    let store = verify(store, snapshots.clone(), log.clone()).await;
    store.unload().await.unwrap();
    let (store, _) = Blobstore::load(desc_again, &LoadOptions::default())
        .await
        .unwrap();
    let store = verify(store, snapshots, log).await;
    store.unload().await.unwrap();
}

#[test]
fn writers_snapshots_and_resizes_under_simulation_over_many_seeds() {
    let seeds: Vec<u64> = match std::env::var("SEED") {
        Ok(seed) => vec![seed.parse().unwrap()],
        Err(_) => (0..24).collect(),
    };
    for seed in seeds {
        let mut sim = spool_reactor::Sim::new(spool_reactor::SimOptions { seed, reactors: 3 });
        let reactors = sim.reactors();
        let (_bdev, desc) = malloc(16 << 20);
        let again = desc.clone();
        let all = reactors.clone();
        let result = sim.block_on(reactors[0], move || scenario(all, desc, again, seed));
        assert!(
            result.is_ok(),
            "seed {seed}: {result:?} (rerun with SEED={seed})"
        );
        sim.stop();
    }
}

#[test]
fn writers_snapshots_and_resizes_on_real_reactors() {
    let cores = if std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2 {
        vec![0, 1]
    } else {
        vec![0, 0]
    };
    for round in 0..4u64 {
        let rt = spool_reactor::Runtime::start(&spool_reactor::RuntimeOptions {
            cores: if cores[0] == cores[1] {
                vec![0]
            } else {
                cores.clone()
            },
            idle: spool_reactor::IdleMode::Sleep,
            pin: false,
        })
        .unwrap();
        let mut reactors = rt.reactors();
        if reactors.len() == 1 {
            reactors.push(reactors[0]);
        }
        let (_bdev, desc) = malloc(16 << 20);
        let again = desc.clone();
        let all = reactors.clone();
        rt.block_on(reactors[0], move || scenario(all, desc, again, round))
            .unwrap();
        rt.stop();
    }
}
