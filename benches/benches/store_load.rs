//! Criterion benches of the store load at scale (`docs/performance.md`, "Loading a store"):
//!
//! - `store_load/clean/N`: the load of a store of N empty blobs after a clean unload (the
//!   masks are read, then every blob's metadata), N = 1,000, 10,000 and 100,000, on a 4 GiB
//!   malloc device with 1 MiB clusters, as `spool perf --target malloc:4G --layer md`.
//! - `store_load/dirty/N`: the same store after a crash (the load replays the md region).
//! - `store_load_capacity/clean/clusters/C`: a clean load of 1,000 blobs on the same 4 GiB
//!   device with 1 MiB, 64 KiB and 4 KiB clusters (C = 4,096 to 1,048,576 clusters), and
//!   `store_load_capacity/{clean,dirty}/md_pages/P` with an md region of P = 16,384 and
//!   262,144 pages: the clean load's time must not follow the capacity.
//!
//! After each store's benches, the heap it holds once loaded, per blob, the peak heap during
//! the load, and the heap an open blob holds are printed (a counting global allocator is
//! installed in this binary).
//! Filter as usual: `cargo bench -p spool-benches --bench store_load -- clean/100000`.

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use spool_bdev::MallocBdev;
use spool_benches::load::{
    build_store, make_dirty, malloc_device, md_pages_for, timed_loads, CountingAlloc, MemoryProbe,
    LOAD_DEVICE_BYTES,
};
use spool_benches::{start_runtime, stop_runtime};

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Store sizes, in blobs.
const SIZES: [u64; 3] = [1_000, 10_000, 100_000];

fn print_memory(what: &str, blobs: u64, probe: MemoryProbe) {
    println!(
        "{what}: {blobs} blobs: {} bytes kept while loaded ({:.1} per blob), peak {} bytes during the load ({:.1} per blob)",
        probe.retained,
        probe.retained as f64 / blobs as f64,
        probe.peak,
        probe.peak as f64 / blobs as f64
    );
}

/// Clean and dirty loads of stores of 1k, 10k and 100k blobs.
fn store_load(c: &mut Criterion) {
    let runtime = start_runtime(1);
    let mut group = c.benchmark_group("store_load");
    for blobs in SIZES {
        let mut store: Option<Arc<MallocBdev>> = None;
        let mut fixture = |runtime: &spool_reactor::Runtime| {
            Arc::clone(store.get_or_insert_with(|| {
                let bdev = malloc_device(LOAD_DEVICE_BYTES);
                build_store(runtime, &bdev, 1 << 20, md_pages_for(blobs), blobs);
                bdev
            }))
        };
        group.throughput(Throughput::Elements(blobs));
        let mut clean = None;
        group.bench_function(BenchmarkId::new("clean", blobs), |b| {
            let bdev = fixture(&runtime);
            clean.get_or_insert_with(|| {
                let open = MemoryProbe::per_open_blob(&runtime, &bdev, 10_000);
                (MemoryProbe::measure(&runtime, &bdev), open)
            });
            b.iter_custom(|iters| timed_loads(&runtime, &bdev, blobs, false, iters));
        });
        if let Some((probe, open)) = clean {
            print_memory("clean load", blobs, probe);
            println!("open blobs: {open:.0} bytes of heap per open blob");
        }
        let mut dirty = None;
        group.bench_function(BenchmarkId::new("dirty", blobs), |b| {
            let bdev = fixture(&runtime);
            dirty.get_or_insert_with(|| {
                make_dirty(&runtime, &bdev);
                MemoryProbe::measure(&runtime, &bdev)
            });
            b.iter_custom(|iters| timed_loads(&runtime, &bdev, blobs + 1, true, iters));
        });
        if let Some(probe) = dirty {
            print_memory("dirty load", blobs + 1, probe);
        }
    }
    group.finish();
    stop_runtime(runtime);
}

/// A load of 1,000 blobs as the device's capacity grows: `clusters/N` with 1 MiB, 64 KiB
/// and 4 KiB clusters on the same 4 GiB device (the used-cluster mask grows 256-fold), and
/// `md_pages/N` with an md region of 1,064 pages to 262,144 (1 GiB; SPDK's default is one
/// page per cluster, so the region grows with the capacity): the clean load must stay flat,
/// the dirty load reads the whole region (that is what a replay is).
fn store_load_capacity(c: &mut Criterion) {
    let runtime = start_runtime(1);
    let mut group = c.benchmark_group("store_load_capacity");
    let blobs = 1_000;
    let cases = [
        ("clusters", 1u64 << 20, md_pages_for(blobs)),
        ("clusters", 64 << 10, md_pages_for(blobs)),
        ("clusters", 4 << 10, md_pages_for(blobs)),
        ("md_pages", 1 << 20, 16_384),
        ("md_pages", 1 << 20, 262_144),
    ];
    for (what, cluster_size, md_pages) in cases {
        let size = match what {
            "clusters" => LOAD_DEVICE_BYTES / cluster_size,
            _ => u64::from(md_pages),
        };
        let mut store: Option<Arc<MallocBdev>> = None;
        let mut fixture = |runtime: &spool_reactor::Runtime| {
            Arc::clone(store.get_or_insert_with(|| {
                let bdev = malloc_device(LOAD_DEVICE_BYTES);
                build_store(runtime, &bdev, cluster_size, md_pages, blobs);
                bdev
            }))
        };
        group.bench_function(BenchmarkId::new(format!("clean/{what}"), size), |b| {
            let bdev = fixture(&runtime);
            b.iter_custom(|iters| timed_loads(&runtime, &bdev, blobs, false, iters));
        });
        if what == "md_pages" {
            let mut dirty = false;
            group.bench_function(BenchmarkId::new(format!("dirty/{what}"), size), |b| {
                let bdev = fixture(&runtime);
                if !dirty {
                    make_dirty(&runtime, &bdev);
                    dirty = true;
                }
                b.iter_custom(|iters| timed_loads(&runtime, &bdev, blobs + 1, true, iters));
            });
        }
    }
    group.finish();
    stop_runtime(runtime);
}

/// Few samples: a load of 100,000 blobs is a fraction of a second, a store takes seconds
/// to build.
fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .sample_size(10)
}

criterion_group! {
    name = loads;
    config = config();
    targets = store_load, store_load_capacity
}
criterion_main!(loads);
