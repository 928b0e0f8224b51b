//! Store loads at scale: the clean and the dirty load of a store holding many blobs, on a
//! malloc device (RAM), as `spool perf --layer md` times them once, repeated here so the
//! figures have medians (`benches/store_load.rs`).
//!
//! - [`build_store`]: a store with `blobs` empty blobs (each one md page, as `spool perf
//!   --layer md` creates them), unloaded cleanly.
//! - [`make_dirty`]: the same store after a crash (one metadata change, no unload).
//! - [`timed_loads`]: `iters` loads, each timed alone (clean loads are unloaded afterwards,
//!   dirty loads dropped without an unload so the next is dirty again); [`timed_loads_cpu`]
//!   with the reactor thread's CPU time.
//! - [`alternating_loads`]: clean and dirty loads of one store in turn (`spool perf`'s way).
//! - [`MemoryProbe`]: the heap a loaded store keeps per blob, and its peak during the load,
//!   from a counting allocator the bench binary installs.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use spool_bdev::{Bdev, BdevDesc, MallocBdev};
use spool_blob::{BlobOptions, Blobstore, InitOptions, LoadOptions};
use spool_reactor::Runtime;

/// Device of the load benches: 4 GiB, as `spool perf --target malloc:4G`.
pub const LOAD_DEVICE_BYTES: u64 = 4 << 30;

/// A malloc device of `bytes` with 4 KiB blocks.
///
/// # Panics
/// If the memory cannot be allocated.
pub fn malloc_device(bytes: u64) -> Arc<MallocBdev> {
    Arc::new(MallocBdev::new("load-bench", 4096, bytes / 4096).expect("malloc device"))
}

fn desc_of(bdev: &Arc<MallocBdev>) -> BdevDesc {
    BdevDesc::open(Arc::clone(bdev) as Arc<dyn Bdev>).expect("open the malloc device")
}

/// Md pages `spool perf --layer md` gives a store of `blobs` blobs: one each, and 64 more.
pub fn md_pages_for(blobs: u64) -> u32 {
    u32::try_from(blobs + 64).expect("md pages fit 32 bits")
}

/// Initialises a store on `bdev` with `cluster_size` and `md_pages` md pages, creates
/// `blobs` empty blobs and unloads it cleanly.
///
/// # Panics
/// On any store error (a broken benchmark environment).
pub fn build_store(
    runtime: &Runtime,
    bdev: &Arc<MallocBdev>,
    cluster_size: u64,
    md_pages: u32,
    blobs: u64,
) {
    let desc = desc_of(bdev);
    runtime
        .block_on(runtime.reactors()[0], move || async move {
            let store = Blobstore::init(
                desc,
                &InitOptions {
                    cluster_size,
                    md_pages: Some(md_pages),
                    ..InitOptions::default()
                },
            )
            .await
            .expect("init");
            for _ in 0..blobs {
                store
                    .create_blob(&BlobOptions::default())
                    .await
                    .expect("create");
            }
            store.unload().await.expect("unload");
        })
        .expect("build task");
}

/// Loads the store on `bdev`, creates one blob (the super block turns dirty) and drops the
/// store without unloading it: every later load replays the metadata.
///
/// # Panics
/// On any store error.
pub fn make_dirty(runtime: &Runtime, bdev: &Arc<MallocBdev>) {
    let desc = desc_of(bdev);
    runtime
        .block_on(runtime.reactors()[0], move || async move {
            let (store, _) = Blobstore::load(desc, &LoadOptions::default())
                .await
                .expect("load");
            store
                .create_blob(&BlobOptions::default())
                .await
                .expect("create");
            drop(store);
        })
        .expect("dirty task");
}

/// Loads the store on `bdev` `iters` times and returns the time the loads took (the unload
/// after a clean load is not counted). Each load must find `blobs` blobs and must (or must
/// not, for a clean store) replay the metadata.
///
/// # Panics
/// On a load error or a load that finds other blobs.
pub fn timed_loads(
    runtime: &Runtime,
    bdev: &Arc<MallocBdev>,
    blobs: u64,
    dirty: bool,
    iters: u64,
) -> Duration {
    let desc = desc_of(bdev);
    runtime
        .block_on(runtime.reactors()[0], move || async move {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let started = Instant::now();
                let (store, report) = Blobstore::load(desc.clone(), &LoadOptions::default())
                    .await
                    .expect("load");
                total += started.elapsed();
                assert_eq!(report.blobs as u64, blobs, "blobs found by the load");
                assert_eq!(report.recovered, dirty, "recovery ran");
                if dirty {
                    drop(store);
                } else {
                    store.unload().await.expect("unload");
                }
            }
            total
        })
        .expect("load task")
}

/// CPU time the calling thread has used (`CLOCK_THREAD_CPUTIME_ID`): on the reactor thread,
/// a load's own work (decoding and the malloc device's copies, which its poller makes on
/// the same thread) without the time other processes took the core away, the figure to
/// compare on a shared machine.
pub fn thread_cpu_time() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec; the call only writes it.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

/// Wall-clock and reactor-thread CPU time of a series of loads.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadTimes {
    /// Wall-clock time of the loads alone.
    pub wall: Duration,
    /// CPU time the reactor thread spent in them ([`thread_cpu_time`]).
    pub cpu: Duration,
}

/// [`timed_loads`] with the reactor thread's CPU time too.
///
/// # Panics
/// On a load error or a load that finds other blobs.
pub fn timed_loads_cpu(
    runtime: &Runtime,
    bdev: &Arc<MallocBdev>,
    blobs: u64,
    dirty: bool,
    iters: u64,
) -> LoadTimes {
    let desc = desc_of(bdev);
    runtime
        .block_on(runtime.reactors()[0], move || async move {
            let mut times = LoadTimes::default();
            for _ in 0..iters {
                let (started, cpu) = (Instant::now(), thread_cpu_time());
                let (store, report) = Blobstore::load(desc.clone(), &LoadOptions::default())
                    .await
                    .expect("load");
                times.wall += started.elapsed();
                times.cpu += thread_cpu_time().saturating_sub(cpu);
                assert_eq!(report.blobs as u64, blobs, "blobs found by the load");
                assert_eq!(report.recovered, dirty, "recovery ran");
                if dirty {
                    drop(store);
                } else {
                    store.unload().await.expect("unload");
                }
            }
            times
        })
        .expect("load task")
}

/// `rounds` pairs of loads of the clean store on `bdev`, alternating as `spool perf --layer
/// md` does: a clean load, a metadata change and a crash (the store dropped), a dirty load,
/// the change undone and an unload. Returns the clean and the dirty loads' times; neither
/// kind always runs second, with caches the other warmed.
///
/// # Panics
/// On a store error or a load that finds other blobs.
pub fn alternating_loads(
    runtime: &Runtime,
    bdev: &Arc<MallocBdev>,
    blobs: u64,
    rounds: usize,
) -> (Vec<LoadTimes>, Vec<LoadTimes>) {
    let desc = desc_of(bdev);
    runtime
        .block_on(runtime.reactors()[0], move || async move {
            let mut clean = Vec::with_capacity(rounds);
            let mut dirty = Vec::with_capacity(rounds);
            for _ in 0..rounds {
                let (started, cpu) = (Instant::now(), thread_cpu_time());
                let (store, report) = Blobstore::load(desc.clone(), &LoadOptions::default())
                    .await
                    .expect("clean load");
                clean.push(LoadTimes {
                    wall: started.elapsed(),
                    cpu: thread_cpu_time().saturating_sub(cpu),
                });
                assert!(!report.recovered, "the store was clean");
                assert_eq!(report.blobs as u64, blobs, "blobs found by the clean load");
                let marker = store
                    .create_blob(&BlobOptions::default())
                    .await
                    .expect("create");
                drop(store);
                let (started, cpu) = (Instant::now(), thread_cpu_time());
                let (store, report) = Blobstore::load(desc.clone(), &LoadOptions::default())
                    .await
                    .expect("dirty load");
                dirty.push(LoadTimes {
                    wall: started.elapsed(),
                    cpu: thread_cpu_time().saturating_sub(cpu),
                });
                assert!(report.recovered, "the store was dirty");
                assert_eq!(
                    report.blobs as u64,
                    blobs + 1,
                    "blobs found by the dirty load"
                );
                store.delete_blob(marker).await.expect("delete");
                store.unload().await.expect("unload");
            }
            (clean, dirty)
        })
        .expect("load task")
}

/// Heap bytes in use now and the most since the last reset, kept by [`CountingAlloc`].
static LIVE: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);

/// A global allocator that forwards to the system allocator and counts live heap bytes and
/// their peak, for [`MemoryProbe`]. Install it in a bench binary with `#[global_allocator]`.
pub struct CountingAlloc;

fn grew(bytes: usize) {
    let live = LIVE.fetch_add(bytes as u64, Ordering::Relaxed) + bytes as u64;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

fn shrank(bytes: usize) {
    LIVE.fetch_sub(bytes as u64, Ordering::Relaxed);
}

// SAFETY: every call is forwarded unchanged to the system allocator; the counters are plain
// atomics, which never allocate.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as our caller's.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            grew(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as our caller's.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            grew(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        shrank(layout.size());
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as our caller's.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            shrank(layout.size());
            grew(new_size);
        }
        new
    }
}

/// What a load costs in heap memory (only meaningful with [`CountingAlloc`] installed).
#[derive(Debug, Clone, Copy)]
pub struct MemoryProbe {
    /// Heap bytes the loaded store holds (live after the load minus live before).
    pub retained: u64,
    /// The most heap bytes in use during the load, above what was live before it.
    pub peak: u64,
}

impl MemoryProbe {
    /// Loads the store on `bdev` once and measures its heap: what stays while it is loaded
    /// and the peak during the load. DMA buffers come from their own pool (mapped once, not
    /// heap) and are not counted.
    ///
    /// # Panics
    /// On a load error.
    pub fn measure(runtime: &Runtime, bdev: &Arc<MallocBdev>) -> MemoryProbe {
        let desc = desc_of(bdev);
        runtime
            .block_on(runtime.reactors()[0], move || async move {
                let before = LIVE.load(Ordering::Relaxed);
                PEAK.store(before, Ordering::Relaxed);
                let (store, report) = Blobstore::load(desc, &LoadOptions::default())
                    .await
                    .expect("load");
                let after = LIVE.load(Ordering::Relaxed);
                let peak = PEAK.load(Ordering::Relaxed);
                drop(report);
                let probe = MemoryProbe {
                    retained: after.saturating_sub(before),
                    peak: peak.saturating_sub(before),
                };
                if store.super_block().clean == 1 {
                    store.unload().await.expect("unload");
                }
                probe
            })
            .expect("memory task")
    }

    /// Loads the (clean) store on `bdev`, opens its first `count` blobs and returns the heap
    /// they hold per open blob; closes them and unloads.
    ///
    /// # Panics
    /// On a store error.
    pub fn per_open_blob(runtime: &Runtime, bdev: &Arc<MallocBdev>, count: usize) -> f64 {
        let desc = desc_of(bdev);
        runtime
            .block_on(runtime.reactors()[0], move || async move {
                let (store, _) = Blobstore::load(desc, &LoadOptions::default())
                    .await
                    .expect("load");
                let ids: Vec<u64> = store.blob_ids().into_iter().take(count).collect();
                let mut open = Vec::with_capacity(ids.len());
                let before = LIVE.load(Ordering::Relaxed);
                for &id in &ids {
                    open.push(store.open_blob(id).await.expect("open"));
                }
                let held = LIVE.load(Ordering::Relaxed).saturating_sub(before);
                for blob in open {
                    blob.close().await.expect("close");
                }
                store.unload().await.expect("unload");
                held as f64 / ids.len().max(1) as f64
            })
            .expect("memory task")
    }
}
