//! Goal: two reactors racing to allocate the same cluster of a thin blob end with one
//! cluster allocated, both writes' data present, and the loser's claimed cluster (not some
//! other one, as the seed released) back in the free pool. Method: the deterministic
//! simulation over many seeds (a failure names its seed), and real threads.

mod common;

use std::sync::Arc;

use common::{create_thin, malloc, pattern, read, write};
use spool_blob::{Blobstore, InitOptions};
use spool_reactor::{ReactorId, Sim, SimOptions};

/// Writers on `reactors` each write their own 4 KiB piece of cluster 1 (and some of
/// cluster 2), all at once; then every piece is checked.
async fn race(reactors: Vec<ReactorId>, desc: spool_bdev::BdevDesc) {
    let store = Blobstore::init(desc, &InitOptions::default())
        .await
        .unwrap();
    let free = store.free_cluster_count();
    let id = create_thin(&store, 4).await;
    let blob = store.open_blob(id).await.unwrap();
    let io = blob.io();
    let mut handles = Vec::new();
    for (n, &reactor) in reactors.iter().enumerate() {
        for piece in 0..3u64 {
            let io = Arc::clone(&io);
            let unit = 256 + n as u64 * 8 + piece * 2 + if piece == 2 { 256 } else { 0 };
            handles.push((
                unit,
                n as u64 * 10 + piece,
                spool_reactor::spawn_on(reactor, move || async move {
                    let channel = io.channel().unwrap();
                    write(&channel, &io, unit, &pattern(n as u64 * 10 + piece, 4096)).await;
                })
                .unwrap(),
            ));
        }
    }
    let mut expected = Vec::new();
    for (unit, seed, handle) in handles {
        handle.await.unwrap();
        expected.push((unit, seed));
    }
    assert_eq!(
        blob.num_allocated_clusters(),
        2,
        "clusters 1 and 2, once each"
    );
    assert_eq!(
        store.free_cluster_count(),
        free - 2,
        "losers' clusters were released"
    );
    assert_eq!(
        store.testing_clusters_released_twice(),
        0,
        "a cluster released twice"
    );
    let channel = store.channel().unwrap();
    for (unit, seed) in expected {
        assert_eq!(
            read(&channel, &io, unit, 4096).await,
            pattern(seed, 4096),
            "piece at unit {unit}"
        );
    }
    // Everything else in the two clusters reads as zeros.
    let cluster1 = read(&channel, &io, 256, 1 << 20).await;
    let written: usize = cluster1
        .chunks(4096)
        .filter(|c| c.iter().any(|&b| b != 0))
        .count();
    assert_eq!(written, reactors.len() * 2);
    drop(channel);
    blob.close().await.unwrap();
    store.unload().await.unwrap();
}

#[test]
fn racing_first_writes_under_simulation_over_many_seeds() {
    let seeds: Vec<u64> = match std::env::var("SEED") {
        Ok(s) => vec![s.parse().unwrap()],
        Err(_) => (0..64).collect(),
    };
    for seed in seeds {
        let mut sim = Sim::new(SimOptions { seed, reactors: 3 });
        let reactors = sim.reactors();
        let (_bdev, desc) = malloc(32 << 20);
        let all = reactors.clone();
        let result = sim.block_on(reactors[0], move || race(all, desc));
        assert!(result.is_ok(), "seed {seed}: {result:?}");
        sim.stop();
    }
}

#[test]
fn racing_first_writes_on_two_real_reactors() {
    let cores = if std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2 {
        vec![0, 1]
    } else {
        vec![0]
    };
    for _ in 0..20 {
        let rt = spool_reactor::Runtime::start(&spool_reactor::RuntimeOptions {
            cores: cores.clone(),
            idle: spool_reactor::IdleMode::Sleep,
            pin: false,
        })
        .unwrap();
        let reactors = rt.reactors();
        let (_bdev, desc) = malloc(32 << 20);
        let all = reactors.clone();
        rt.block_on(reactors[0], move || race(all, desc)).unwrap();
        rt.stop();
    }
}
