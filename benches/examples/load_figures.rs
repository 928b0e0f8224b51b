//! The load figures of `docs/performance.md` ("Loading a store"), as a table: for each store
//! size given (default 1,000, 10,000 and 100,000 blobs, on a 4 GiB malloc device with 1 MiB
//! clusters and one md page per blob plus 64, as `spool perf --target malloc:4G --layer md`
//! builds it), the clean and the dirty load's wall-clock and reactor-thread CPU time
//! (medians of `--loads` loads each, alternating as `spool perf` does), the heap the loaded
//! store keeps per blob, the peak heap during a clean load, and the heap per open blob.
//!
//! ```sh
//! cargo run --release -p spool-benches --example load_figures -- 1000 10000 100000 --loads 7
//! # the capacity sweep: more clusters (bytes per cluster), a larger md region
//! cargo run --release -p spool-benches --example load_figures -- 1000 --cluster-size 4096
//! cargo run --release -p spool-benches --example load_figures -- 1000 --md-pages 262144
//! ```
//!
//! On a shared machine compare the CPU columns (time the core was taken away is not in
//! them) or alternate runs of two builds and compare medians.

use std::time::Duration;

use spool_benches::load::{
    alternating_loads, build_store, malloc_device, md_pages_for, CountingAlloc, LoadTimes,
    MemoryProbe, LOAD_DEVICE_BYTES,
};
use spool_benches::{start_runtime, stop_runtime};

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

fn median(mut values: Vec<Duration>) -> f64 {
    values.sort();
    values
        .get(values.len() / 2)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

/// Median wall-clock and CPU milliseconds of `times`.
fn medians(times: &[LoadTimes]) -> (f64, f64) {
    (
        median(times.iter().map(|t| t.wall).collect()),
        median(times.iter().map(|t| t.cpu).collect()),
    )
}

fn main() {
    let mut sizes = Vec::new();
    let mut loads = 5u64;
    let mut cluster_size = 1u64 << 20;
    let mut md_pages = None;
    let mut args = std::env::args().skip(1);
    let number = |args: &mut std::iter::Skip<std::env::Args>, flag: &str| -> u64 {
        args.next()
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("{flag} N"))
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--loads" => loads = number(&mut args, "--loads"),
            "--cluster-size" => cluster_size = number(&mut args, "--cluster-size"),
            "--md-pages" => {
                md_pages = Some(u32::try_from(number(&mut args, "--md-pages")).expect("md pages"))
            }
            _ => sizes.push(arg.parse::<u64>().expect("a blob count")),
        }
    }
    if sizes.is_empty() {
        sizes = vec![1_000, 10_000, 100_000];
    }
    let runtime = start_runtime(1);
    println!(
        "{:>8} {:>14} {:>14} {:>14} {:>14} {:>12} {:>12} {:>12}",
        "blobs",
        "clean wall ms",
        "clean cpu ms",
        "dirty wall ms",
        "dirty cpu ms",
        "kept B/blob",
        "peak B/blob",
        "open B/blob"
    );
    for blobs in sizes {
        let bdev = malloc_device(LOAD_DEVICE_BYTES);
        let pages = md_pages.unwrap_or_else(|| md_pages_for(blobs));
        build_store(&runtime, &bdev, cluster_size, pages, blobs);
        let open = MemoryProbe::per_open_blob(&runtime, &bdev, 10_000);
        let memory = MemoryProbe::measure(&runtime, &bdev);
        let (clean, dirty) = alternating_loads(&runtime, &bdev, blobs, loads as usize);
        let (clean_wall, clean_cpu) = medians(&clean);
        let (dirty_wall, dirty_cpu) = medians(&dirty);
        println!(
            "{blobs:>8} {clean_wall:>14.2} {clean_cpu:>14.2} {dirty_wall:>14.2} {dirty_cpu:>14.2} {:>12.2} {:>12.1} {:>12.0}",
            memory.retained as f64 / blobs as f64,
            memory.peak as f64 / blobs as f64,
            open
        );
    }
    stop_runtime(runtime);
}
