//! Measurement, run by hand (docs/performance.md, "Dirty load: bounded by the metadata in
//! use"): a sparse 1 TiB and a 4 TiB store, each holding 1,000 volumes (half thin 10 GiB, half
//! thick 64 MiB, each with a `name` xattr) and 100 snapshots (of every tenth volume), left
//! dirty as by a kill -9 (no unload), then loaded with Spool's bounded recovery and with the
//! full scan (`LoadOptions::full_scan`, SPDK's cost), alternating, several runs each; prints
//! medians and the md pages each read.
//!
//! ```text
//! cargo test --release -p spool-engine --test dirty_load_bench -- --ignored --nocapture
//! ```
//! `SPOOL_BENCH_DIR` picks the directory of the sparse files (default: the temp dir; the
//! files take a few MiB of disk each), `SPOOL_BENCH_SIZES` the sizes in TiB (default `1,4`),
//! `SPOOL_BENCH_RUNS` the runs per mode (default 5).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use spool_bdev::BdevDesc;
use spool_blob::{BlobOptions, Blobstore, ExtentForm, InitOptions, LoadOptions};
use spool_engine::target::{open_image, TargetOptions};
use spool_reactor::{IdleMode, Runtime, RuntimeOptions};

const TIB: u64 = 1 << 40;
const VOLUMES: u64 = 1000;

/// Runs `job` on a one-reactor runtime with the store device at `path` open.
fn on_device<T: Send + 'static, Fut: std::future::Future<Output = T> + 'static>(
    path: &Path,
    job: impl FnOnce(BdevDesc) -> Fut + Send + 'static,
) -> T {
    let (bdev, _) = open_image(path, &TargetOptions::default()).expect("open the image");
    let desc = BdevDesc::open(Arc::clone(&bdev)).expect("open bdev");
    let runtime = Runtime::start(&RuntimeOptions {
        cores: vec![0],
        idle: IdleMode::Sleep,
        pin: false,
    })
    .expect("runtime");
    let reactor = runtime.reactors()[0];
    let out = runtime
        .block_on(reactor, move || job(desc))
        .expect("block_on");
    let _ = runtime.stop();
    out
}

/// Makes the dirty store: init, 1,000 volumes, 100 snapshots, a flush, no unload.
fn make_dirty_store(path: &Path, bytes: u64) -> u64 {
    let file = std::fs::File::create(path).expect("create");
    file.set_len(bytes).expect("set_len");
    drop(file);
    on_device(path, |desc| async move {
        let store = Blobstore::init(desc, &InitOptions::default())
            .await
            .expect("init");
        let mut ids = Vec::new();
        for n in 0..VOLUMES {
            let thin = n % 2 == 0;
            let id = store
                .create_blob(&BlobOptions {
                    num_clusters: if thin { 10 << 10 } else { 64 },
                    thin,
                    form: ExtentForm::Table,
                    xattrs: vec![("name".into(), format!("volume-{n}\0").into_bytes())],
                    ..BlobOptions::default()
                })
                .await
                .expect("create");
            ids.push(id);
        }
        for id in ids.iter().step_by(10) {
            store.create_snapshot(*id, &[]).await.expect("snapshot");
        }
        let channel = store.channel().expect("channel");
        channel.flush().await.expect("flush");
        drop(channel);
        let md_pages_used = store.root_superset_pages().unwrap_or(0);
        // A kill -9: the store is never unloaded.
        std::mem::forget(store);
        md_pages_used
    })
}

/// One dirty load: its time, the md pages its scan read, the blobs found, the md pages in
/// use, whether bounded.
fn dirty_load(path: &Path, full_scan: bool) -> (Duration, u64, usize, usize, bool) {
    on_device(path, move |desc| async move {
        let options = LoadOptions {
            full_scan,
            ..LoadOptions::default()
        };
        let started = Instant::now();
        let (store, report) = Blobstore::load(desc, &options).await.expect("load");
        let took = started.elapsed();
        assert!(report.recovered, "the store was dirty");
        let blobs = store.blob_ids().len();
        let in_use = store.used_md_pages().len();
        // Stays dirty for the next run.
        std::mem::forget(store);
        (took, report.md_pages_scanned, blobs, in_use, report.bounded)
    })
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

#[test]
#[ignore = "measurement: cargo test --release -p spool-engine --test dirty_load_bench -- --ignored --nocapture"]
fn dirty_load_time_against_store_size() {
    let dir = match std::env::var("SPOOL_BENCH_DIR") {
        Ok(dir) => tempfile::tempdir_in(dir).expect("bench dir"),
        Err(_) => tempfile::tempdir().expect("temp dir"),
    };
    let sizes: Vec<u64> = env_or("SPOOL_BENCH_SIZES", "1,4".to_string())
        .split(',')
        .filter_map(|size| size.trim().parse().ok())
        .collect();
    let runs: usize = env_or("SPOOL_BENCH_RUNS", 5);
    println!(
        "| store | blobs | md pages in use | md region = pages SPDK's recovery reads | \
         bounded: pages scanned | bounded: median | full scan: pages scanned | full scan: median |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for tib in sizes {
        let path = dir.path().join(format!("dirty-{tib}t.img"));
        let made = Instant::now();
        let superset = make_dirty_store(&path, tib * TIB);
        eprintln!(
            "{tib} TiB: made in {:?}, root superset {superset} pages",
            made.elapsed()
        );
        let (mut bounded, mut full) = (Vec::new(), Vec::new());
        let (mut bounded_pages, mut full_pages, mut blobs, mut in_use) = (0, 0, 0, 0);
        for _ in 0..runs {
            let (took, pages, found, used, was_bounded) = dirty_load(&path, false);
            assert!(was_bounded, "the record was not trusted");
            bounded.push(took);
            bounded_pages = pages;
            blobs = found;
            in_use = used;
            let (took, pages, found, _, was_bounded) = dirty_load(&path, true);
            assert!(!was_bounded);
            assert_eq!(found, blobs, "both scans find the same blobs");
            full.push(took);
            full_pages = pages;
        }
        eprintln!("{tib} TiB: bounded {bounded:?}, full {full:?}");
        println!(
            "| {tib} TiB | {blobs} | {in_use} | {full_pages} | {bounded_pages} | {:.1} ms | {full_pages} | {:.1} ms |",
            median(bounded).as_secs_f64() * 1e3,
            median(full).as_secs_f64() * 1e3,
        );
        let _ = std::fs::remove_file(&path);
    }
}
