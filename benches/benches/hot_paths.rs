//! Criterion benches of Spool's hot paths, each reported per operation:
//!
//! - `messages/roundtrip`: a message to another reactor whose closure messages back.
//! - `messages/one_way_batch`: messages queued to one reactor, per message.
//! - `messages/spawn_on_roundtrip`: `spawn_on` + awaiting its `RemoteHandle`.
//! - `request_pool/runtime`, `request_pool/sim`: one null read at a time through the channel.
//! - `null_path_qd1`, `null_path_qd32`: 1 or 32 tasks looping null reads on one reactor, per
//!   I/O (qd 1 is the latency path: every I/O pays its own wake and poll).
//! - `null_callback_qd1`, `null_callback_qd32`: the same reads as callback requests, each
//!   completion submitting the next (no task wake per I/O; `spool perf`'s bdev job).
//! - `blob_null_path_qd1`, `blob_null_path_qd32`: the same through a thick blob (the blob
//!   layer's cost per I/O is the difference).
//! - `blob_null_callback_qd1`, `blob_null_callback_qd32`: blob callback requests
//!   (`BlobChannel::read_with`, `spool perf --layer blob`'s job); compare with
//!   `null_callback_*`.
//! - `ring_nop/batch32`: io_uring Nops pushed, submitted and reaped in batches of 32.
//! - `dma_alloc_free/4k`: `DmaBuf::alloc(4096)` and its drop, from an idle pool (a chunk is
//!   split on alloc and merged on free) and with a neighbouring block held (no split/merge).
//!
//! Reactor loops run inside reactor tasks and time themselves (`iter_custom`); each group
//! starts its runtime once and stops it at the end. Run with `cargo bench -p spool-benches`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use spool_bdev::DmaBuf;
use spool_benches::{
    blob_null_callback_reads, blob_null_reads_concurrent, null_callback_reads, null_desc,
    null_reads, null_reads_concurrent, one_way_batch, ping_pong, spawn_on_roundtrip, start_runtime,
    stop_runtime, NopRing,
};
use spool_reactor::{Sim, SimOptions};

/// Reads in flight in the queue-depth bench (what `spool perf --target null` defaults to).
const QUEUE_DEPTH: u64 = 32;

/// Nops per submit in the ring bench.
const RING_BATCH: usize = 32;

/// Messages between two reactors (one if the machine has a single core).
fn messages(c: &mut Criterion) {
    let runtime = start_runtime(2);
    let reactors = runtime.reactors();
    let home = reactors[0];
    let peer = *reactors.last().expect("a runtime has a reactor");
    if home == peer {
        eprintln!("messages: one core only, so messages go from a reactor to itself");
    }
    let mut group = c.benchmark_group("messages");
    group.throughput(Throughput::Elements(1));
    group.bench_function("roundtrip", |b| {
        b.iter_custom(|iters| {
            runtime
                .block_on(home, move || ping_pong(peer, iters))
                .expect("ping_pong task")
        });
    });
    group.bench_function("one_way_batch", |b| {
        b.iter_custom(|iters| {
            runtime
                .block_on(home, move || one_way_batch(peer, iters))
                .expect("one_way_batch task")
        });
    });
    group.bench_function("spawn_on_roundtrip", |b| {
        b.iter_custom(|iters| {
            runtime
                .block_on(home, move || spawn_on_roundtrip(peer, iters))
                .expect("spawn_on_roundtrip task")
        });
    });
    group.finish();
    stop_runtime(runtime);
}

/// One request at a time through the null bdev's channel: a slot from the pool and back.
fn request_pool(c: &mut Criterion) {
    let mut group = c.benchmark_group("request_pool");
    group.throughput(Throughput::Elements(1));

    let runtime = start_runtime(1);
    let home = runtime.reactors()[0];
    let desc = null_desc();
    group.bench_function("runtime", |b| {
        b.iter_custom(|iters| {
            let desc = desc.clone();
            runtime
                .block_on(home, move || null_reads(desc, iters))
                .expect("null_reads task")
        });
    });
    stop_runtime(runtime);

    // The same loop stepped by the simulation: seeded completion latencies mean many loop
    // passes per I/O, so this shows the cost of the simulation, not of the I/O path.
    let mut sim = Sim::new(SimOptions {
        seed: 0x5_9001,
        reactors: 1,
    });
    let home = sim.reactors()[0];
    group.bench_function("sim", |b| {
        b.iter_custom(|iters| {
            let desc = desc.clone();
            sim.block_on(home, move || null_reads(desc, iters))
                .expect("null_reads under sim")
        });
    });
    let report = sim.stop();
    assert_eq!(report.leaked_channels, 0, "sim leaked channels");
    group.finish();
}

/// `qd` concurrent readers on one reactor's null channel: ns per I/O at that depth.
fn null_path(c: &mut Criterion, name: &str, qd: u64) {
    let runtime = start_runtime(1);
    let home = runtime.reactors()[0];
    let desc = null_desc();
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Elements(1));
    group.bench_function("read_4k", |b| {
        b.iter_custom(|iters| {
            let desc = desc.clone();
            runtime
                .block_on(home, move || null_reads_concurrent(desc, qd, iters))
                .expect("null_reads_concurrent task")
        });
    });
    group.finish();
    stop_runtime(runtime);
}

/// `qd` concurrent readers through a thick blob on a null bdev: ns per I/O of the blob path.
fn blob_null_path(c: &mut Criterion, name: &str, qd: u64) {
    blob_bench(c, name, qd, blob_null_reads_concurrent);
}

/// A blob-layer bench on one reactor: `reads(desc, qd, iters)` on a fresh null bdev per
/// sample (each makes its own store).
fn blob_bench<F, Fut>(c: &mut Criterion, name: &str, qd: u64, reads: F)
where
    F: Fn(spool_bdev::BdevDesc, u64, u64) -> Fut + Copy + Send + 'static,
    Fut: std::future::Future<Output = Duration> + 'static,
{
    let runtime = start_runtime(1);
    let home = runtime.reactors()[0];
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Elements(1));
    group.bench_function("read_4k", |b| {
        b.iter_custom(|iters| {
            let desc = null_desc();
            runtime
                .block_on(home, move || reads(desc, qd, iters))
                .expect("blob bench task")
        });
    });
    group.finish();
    stop_runtime(runtime);
}

/// `qd` lanes of callback reads on one reactor's null channel: ns per I/O at that depth.
fn null_callback_path(c: &mut Criterion, name: &str, qd: u64) {
    let runtime = start_runtime(1);
    let home = runtime.reactors()[0];
    let desc = null_desc();
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Elements(1));
    group.bench_function("read_4k", |b| {
        b.iter_custom(|iters| {
            let desc = desc.clone();
            runtime
                .block_on(home, move || null_callback_reads(desc, qd, iters))
                .expect("null_callback_reads task")
        });
    });
    group.finish();
    stop_runtime(runtime);
}

/// `qd` lanes of blob callback reads through a thick blob on a null bdev.
fn blob_null_callback_path(c: &mut Criterion, name: &str, qd: u64) {
    blob_bench(c, name, qd, blob_null_callback_reads);
}

/// One blob callback read at a time: the blob layer's qd 1 path without a task wake; its
/// difference from `null_callback_qd1` is the blob layer's cost.
fn blob_null_callback_qd1(c: &mut Criterion) {
    blob_null_callback_path(c, "blob_null_callback_qd1", 1);
}

/// 32 lanes of blob callback reads.
fn blob_null_callback_qd32(c: &mut Criterion) {
    blob_null_callback_path(c, "blob_null_callback_qd32", QUEUE_DEPTH);
}

/// One callback read at a time: the qd 1 latency path without a task wake.
fn null_callback_qd1(c: &mut Criterion) {
    null_callback_path(c, "null_callback_qd1", 1);
}

/// 32 lanes of callback reads.
fn null_callback_qd32(c: &mut Criterion) {
    null_callback_path(c, "null_callback_qd32", QUEUE_DEPTH);
}

/// 32 concurrent readers on one reactor's null channel: ns per I/O at queue depth 32.
fn null_path_qd32(c: &mut Criterion) {
    null_path(c, "null_path_qd32", QUEUE_DEPTH);
}

/// The same through a thick blob.
fn blob_null_path_qd32(c: &mut Criterion) {
    blob_null_path(c, "blob_null_path_qd32", QUEUE_DEPTH);
}

/// One reader at a time on the null channel: the whole latency path per I/O (submit, the
/// device's poller completion, the wake, the task's poll), nothing amortised over a batch.
fn null_path_qd1(c: &mut Criterion) {
    null_path(c, "null_path_qd1", 1);
}

/// The same through a thick blob: the blob layer's cost at queue depth 1 is the difference.
fn blob_null_path_qd1(c: &mut Criterion) {
    blob_null_path(c, "blob_null_path_qd1", 1);
}

/// Nops through the io_uring ring, per operation; skipped where io_uring is unavailable.
fn ring_nop(c: &mut Criterion) {
    let mut ring = match NopRing::new() {
        Ok(ring) => ring,
        Err(err) => {
            eprintln!("ring_nop: skipped, io_uring unavailable: {err}");
            return;
        }
    };
    let mut group = c.benchmark_group("ring_nop");
    group.throughput(Throughput::Elements(1));
    group.bench_function("batch32", |b| {
        b.iter_custom(|iters| ring.run(RING_BATCH, iters));
    });
    group.finish();
}

/// A 4 KiB DMA buffer from the global pool and back.
fn dma_alloc_free(c: &mut Criterion) {
    // Map the first chunk outside the measurement.
    drop(DmaBuf::alloc(4096).expect("dma buffer"));
    let mut group = c.benchmark_group("dma_alloc_free");
    group.throughput(Throughput::Elements(1));
    group.bench_function("4k", |b| {
        b.iter(|| {
            let buf = DmaBuf::alloc(black_box(4096)).expect("dma buffer");
            black_box(&buf);
        });
    });
    // With a neighbouring 4 KiB block held, the buddy allocator neither splits a chunk on
    // alloc nor merges it back on free: the steady state of a busy pool.
    let neighbour = DmaBuf::alloc(4096).expect("dma buffer");
    group.bench_function("4k_with_neighbour", |b| {
        b.iter(|| {
            let buf = DmaBuf::alloc(black_box(4096)).expect("dma buffer");
            black_box(&buf);
        });
    });
    drop(neighbour);
    group.finish();
}

/// Short runs: the whole suite finishes in well under two minutes.
fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20)
}

criterion_group! {
    name = hot_paths;
    config = config();
    targets = messages, request_pool, null_path_qd1, null_callback_qd1, blob_null_path_qd1, blob_null_callback_qd1, null_path_qd32, null_callback_qd32, blob_null_path_qd32, blob_null_callback_qd32, ring_nop, dma_alloc_free
}
criterion_main!(hot_paths);
