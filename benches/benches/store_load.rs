//! Criterion benches of the store load at scale (`docs/performance.md`, "Loading a store"):
//!
//! - `store_load/clean/N`: the load of a store of N empty blobs after a clean unload (the
//!   masks are read, then every blob's metadata), N = 1,000, 10,000 and 100,000, on a 4 GiB
//!   malloc device with 1 MiB clusters, as `spool perf --target malloc:4G --layer md`.
//! - `store_load/dirty/N`: the same store after a crash (the load replays the md region).
//! - `store_load_capacity/clean/C`: a clean load of 1,000 blobs on the same 4 GiB device
//!   with 1 MiB, 64 KiB and 4 KiB clusters (C = 4,096 to 1,048,576 clusters): the time must
//!   not follow the capacity.
//!
//! After each store's benches, the heap it holds once loaded, per blob, and the peak heap
//! during the load are printed (a counting global allocator is installed in this binary).
//! Filter as usual: `cargo bench -p spool-benches --bench store_load -- clean/100000`.

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use spool_bdev::MallocBdev;
use spool_benches::load::{
    build_store, make_dirty, malloc_device, timed_loads, CountingAlloc, MemoryProbe,
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
                build_store(runtime, &bdev, 1 << 20, blobs);
                bdev
            }))
        };
        group.throughput(Throughput::Elements(blobs));
        let mut clean = None;
        group.bench_function(BenchmarkId::new("clean", blobs), |b| {
            let bdev = fixture(&runtime);
            clean.get_or_insert_with(|| MemoryProbe::measure(&runtime, &bdev));
            b.iter_custom(|iters| timed_loads(&runtime, &bdev, blobs, false, iters));
        });
        if let Some(probe) = clean {
            print_memory("clean load", blobs, probe);
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

/// A clean load of 1,000 blobs as the cluster count grows 256-fold on the same device.
fn store_load_capacity(c: &mut Criterion) {
    let runtime = start_runtime(1);
    let mut group = c.benchmark_group("store_load_capacity");
    let blobs = 1_000;
    for cluster_size in [1u64 << 20, 64 << 10, 4 << 10] {
        let clusters = LOAD_DEVICE_BYTES / cluster_size;
        let mut store: Option<Arc<MallocBdev>> = None;
        group.bench_function(BenchmarkId::new("clean", clusters), |b| {
            let bdev = Arc::clone(store.get_or_insert_with(|| {
                let bdev = malloc_device(LOAD_DEVICE_BYTES);
                build_store(&runtime, &bdev, cluster_size, blobs);
                bdev
            }));
            b.iter_custom(|iters| timed_loads(&runtime, &bdev, blobs, false, iters));
        });
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
