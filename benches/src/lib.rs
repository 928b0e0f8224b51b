//! Shared pieces of Spool's hot-path benchmarks (`benches/hot_paths.rs`).
//!
//! Each measured loop here runs *inside* a reactor task (or, for the ring and the DMA pool, on
//! the calling thread) and returns the elapsed wall time of exactly `iters` operations, the
//! shape criterion's `iter_custom` wants. Setup (channels, buffers, warm-up of the slot table)
//! happens before the clock starts.
//!
//! - [`bench_cores`], [`start_runtime`], [`stop_runtime`]: reactors on cores that exist.
//! - [`ping_pong`], [`one_way_batch`], [`spawn_on_roundtrip`]: messages between reactors.
//! - [`null_desc`], [`null_reads`], [`null_reads_concurrent`]: the null bdev's channel path.
//! - [`null_callback_reads`]: the same with callback requests (no task wake per I/O).
//! - [`blob_null_reads_concurrent`]: the same through the blobstore (a thick blob on null).
//! - [`NopRing`]: submissions and completions through the io_uring ring itself.
//! - [`load`]: clean and dirty loads of a store with many blobs, and their memory.

pub mod load;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use spool_bdev::uring::sys::{Ring, RingError, RingOp, RingOptions};
use spool_bdev::{BdevDesc, DmaBuf, NullBdev};
use spool_reactor::{
    send_msg, spawn_local, spawn_on, IdleMode, ReactorId, Runtime, RuntimeOptions,
};

/// Block size of the benchmark null bdev, bytes (one 4 KiB read per I/O, as `spool perf`).
pub const NULL_BLOCK_SIZE: u32 = 4096;

/// Blocks of the benchmark null bdev (4 GiB: offsets wrap well inside it).
pub const NULL_BLOCK_COUNT: u64 = 1 << 20;

/// Messages a sender keeps in flight in [`one_way_batch`] before waiting for the last of them,
/// so a long sample does not queue millions of closures.
pub const ONE_WAY_WINDOW: u64 = 4096;

/// The cores reactors may run on: those `core_affinity` reports (the set `Runtime::start`
/// validates against), else `0..available_parallelism`.
pub fn bench_cores() -> Vec<usize> {
    match core_affinity::get_core_ids() {
        Some(ids) if !ids.is_empty() => ids.iter().map(|id| id.id).collect(),
        _ => {
            let online =
                std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
            (0..online).collect()
        }
    }
}

/// Starts a busy-polling runtime with `want` reactors, pinned to the first `want` available
/// cores; fewer when the machine has fewer cores (at least one).
///
/// # Panics
/// If the runtime cannot start (a broken benchmark environment).
pub fn start_runtime(want: usize) -> Runtime {
    let cores: Vec<usize> = bench_cores().into_iter().take(want.max(1)).collect();
    Runtime::start(&RuntimeOptions {
        cores,
        idle: IdleMode::Busy,
        pin: true,
    })
    .expect("benchmark runtime starts")
}

/// Stops `runtime` and checks that the benchmarks left no channel behind and no reactor
/// panicked.
///
/// # Panics
/// On a leak or a panicked reactor.
pub fn stop_runtime(runtime: Runtime) {
    let report = runtime.stop();
    assert_eq!(report.leaked_channels, 0, "benchmark leaked channels");
    assert!(report.panicked.is_empty(), "reactors panicked: {report:?}");
}

/// A one-shot flag set (and its task woken) by a message closure on the task's own reactor.
/// The waker travels inside the message, so no lock is taken on the way back.
struct Flag {
    set: AtomicBool,
}

/// Waits until `flag` is set; registers nothing (the waker was handed out beforehand).
struct WaitFlag<'a> {
    flag: &'a Flag,
}

impl Future for WaitFlag<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<()> {
        if self.flag.set.swap(false, Ordering::Acquire) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// The calling task's waker.
async fn current_waker() -> Waker {
    std::future::poll_fn(|cx| Poll::Ready(cx.waker().clone())).await
}

/// Sends one message to `target` whose closure sends one back to `home`; the one back sets
/// the flag and wakes the waiting task there.
fn send_round_trip(home: ReactorId, target: ReactorId, flag: &Arc<Flag>, waker: &Waker) {
    let (flag, waker) = (Arc::clone(flag), waker.clone());
    send_msg(target, move || {
        send_msg(home, move || {
            flag.set.store(true, Ordering::Release);
            waker.wake();
        })
        .expect("home reactor is running");
    })
    .expect("peer reactor is running");
}

/// On a reactor: `iters` round trips of a message to `peer` and back (each a message there
/// whose closure sends a message back that wakes this task); returns the elapsed time.
///
/// # Panics
/// Off a reactor, or if `peer` has stopped.
pub async fn ping_pong(peer: ReactorId, iters: u64) -> Duration {
    let home = spool_reactor::reactor_id().expect("ping_pong runs on a reactor");
    let flag = Arc::new(Flag {
        set: AtomicBool::new(false),
    });
    let waker = current_waker().await;
    let start = Instant::now();
    for _ in 0..iters {
        send_round_trip(home, peer, &flag, &waker);
        WaitFlag { flag: &flag }.await;
    }
    start.elapsed()
}

/// On a reactor: sends `iters` messages to `peer` (each closure carries and consumes a `u64`,
/// so it is a real boxed closure), in windows of [`ONE_WAY_WINDOW`], waiting after each window
/// for its last message (messages from one sender run in order) to come back; returns the
/// elapsed time.
///
/// # Panics
/// Off a reactor, or if `peer` has stopped.
pub async fn one_way_batch(peer: ReactorId, iters: u64) -> Duration {
    let home = spool_reactor::reactor_id().expect("one_way_batch runs on a reactor");
    let flag = Arc::new(Flag {
        set: AtomicBool::new(false),
    });
    let waker = current_waker().await;
    let start = Instant::now();
    let mut sent = 0;
    while sent < iters {
        let window = (iters - sent).min(ONE_WAY_WINDOW);
        for index in 0..window - 1 {
            let value = sent + index;
            send_msg(peer, move || {
                std::hint::black_box(value);
            })
            .expect("peer reactor is running");
        }
        // The last message of the window answers, and its answer wakes us.
        send_round_trip(home, peer, &flag, &waker);
        WaitFlag { flag: &flag }.await;
        sent += window;
    }
    start.elapsed()
}

/// On a reactor: `iters` times, spawns an empty future on `peer` with the public
/// [`spawn_on`] and awaits its `RemoteHandle` (message + task spawn + oneshot completion);
/// returns the elapsed time.
///
/// # Panics
/// Off a reactor, or if `peer` has stopped.
pub async fn spawn_on_roundtrip(peer: ReactorId, iters: u64) -> Duration {
    let start = Instant::now();
    for index in 0..iters {
        let value = spawn_on(peer, move || async move { index })
            .expect("peer reactor is running")
            .await
            .expect("the spawned task completes");
        std::hint::black_box(value);
    }
    start.elapsed()
}

/// Opens a fresh null bdev of [`NULL_BLOCK_COUNT`] blocks of [`NULL_BLOCK_SIZE`] bytes.
///
/// # Panics
/// Never for these constants.
pub fn null_desc() -> BdevDesc {
    let bdev = NullBdev::new("bench-null", NULL_BLOCK_SIZE, NULL_BLOCK_COUNT)
        .expect("valid null bdev geometry");
    BdevDesc::open(Arc::new(bdev)).expect("valid null bdev geometry")
}

/// The offset of the `index`-th read of a loop: sequential 4 KiB blocks, wrapping.
fn offset_of(index: u64) -> u64 {
    (index % NULL_BLOCK_COUNT) * u64::from(NULL_BLOCK_SIZE)
}

/// On a reactor: `iters` sequential 4 KiB reads through this reactor's channel of `desc`, one
/// at a time (take a request slot, submit, complete from the poller, give the slot back);
/// returns the elapsed time. The channel and buffer are set up, and one read done, before the
/// clock starts.
///
/// # Panics
/// Off a reactor, or if a read fails.
pub async fn null_reads(desc: BdevDesc, iters: u64) -> Duration {
    let channel = desc.channel().expect("null channel");
    let mut buf = DmaBuf::alloc(NULL_BLOCK_SIZE as usize).expect("dma buffer");
    let (warm, back) = channel.read(buf, 0).await;
    warm.expect("warm-up read");
    buf = back;
    let start = Instant::now();
    for index in 0..iters {
        let (result, back) = channel.read(buf, offset_of(index)).await;
        result.expect("null read");
        buf = back;
    }
    start.elapsed()
}

/// On a reactor: `iters` 4 KiB reads in total, issued by `depth` tasks each looping reads on
/// this reactor's channel of `desc` (so `depth` are in flight at once); returns the elapsed time
/// from the first submission to the last completion. Buffers are allocated, and the channel's
/// slot table grown to `depth`, before the clock starts.
///
/// # Panics
/// Off a reactor, if `depth` is 0, or if a read fails.
pub async fn null_reads_concurrent(desc: BdevDesc, depth: u64, iters: u64) -> Duration {
    assert!(depth > 0, "depth must be at least 1");
    let channel = desc.channel().expect("null channel");
    let mut bufs = Vec::new();
    for _ in 0..depth {
        bufs.push(DmaBuf::alloc(NULL_BLOCK_SIZE as usize).expect("dma buffer"));
    }
    // Grow the slot table to `depth` outside the measurement.
    {
        let futures: Vec<_> = bufs.drain(..).map(|buf| channel.read(buf, 0)).collect();
        for future in futures {
            let (result, buf) = future.await;
            result.expect("warm-up read");
            bufs.push(buf);
        }
    }
    let start = Instant::now();
    let mut handles = Vec::new();
    for (worker, buf) in (0..depth).zip(bufs) {
        // Spread `iters` over the workers; the first `iters % depth` do one more.
        let count = iters / depth + u64::from(worker < iters % depth);
        let channel = channel.clone();
        handles.push(spawn_local(async move {
            let mut buf = buf;
            for index in 0..count {
                let (result, back) = channel.read(buf, offset_of(worker + index * depth)).await;
                result.expect("null read");
                buf = back;
            }
        }));
    }
    for handle in handles {
        handle.await.expect("reader task completes");
    }
    start.elapsed()
}

/// The lanes of a callback benchmark: how many reads each lane has left, how many lanes still
/// run, and the task waiting for the last one.
struct Lanes {
    depth: u64,
    left: std::cell::RefCell<Vec<u64>>,
    running: std::cell::Cell<u64>,
    waiter: std::cell::RefCell<Option<Waker>>,
}

impl Lanes {
    /// `iters` reads over `depth` lanes (fewer lanes when there are fewer reads).
    fn new(depth: u64, iters: u64) -> Lanes {
        let lanes = depth.min(iters.max(1));
        Lanes {
            depth: lanes,
            left: std::cell::RefCell::new(
                (0..lanes)
                    .map(|lane| iters / lanes + u64::from(lane < iters % lanes))
                    .collect(),
            ),
            running: std::cell::Cell::new(lanes),
            waiter: std::cell::RefCell::new(None),
        }
    }

    /// Takes one read of `lane`: the reads it has left after this one, or `None` (and the
    /// lane ends) when it had none.
    fn take(&self, lane: u64) -> Option<u64> {
        let next = {
            let mut left = self.left.borrow_mut();
            let remaining = &mut left[lane as usize];
            if *remaining == 0 {
                None
            } else {
                *remaining -= 1;
                Some(*remaining)
            }
        };
        if next.is_none() {
            self.running.set(self.running.get() - 1);
            if self.running.get() == 0 {
                if let Some(waiter) = self.waiter.borrow_mut().take() {
                    waiter.wake();
                }
            }
        }
        next
    }

    /// Waits until every lane has ended.
    async fn finished(&self) {
        std::future::poll_fn(|cx| {
            if self.running.get() == 0 {
                Poll::Ready(())
            } else {
                *self.waiter.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
    }
}

/// The chain of callback reads [`null_callback_reads`] drives: each completion submits the
/// next read of its lane until the lane's count is done.
struct CallbackLanes {
    channel: spool_bdev::BdevChannel,
    lanes: Lanes,
}

impl CallbackLanes {
    fn start(self: &std::rc::Rc<Self>, lane: u64, index: u64, buf: DmaBuf) {
        let this: std::rc::Rc<dyn spool_bdev::IoCallback> = self.clone();
        if self
            .channel
            .read_with(buf, offset_of(index), this, lane)
            .is_err()
        {
            panic!("null read refused");
        }
    }
}

impl spool_bdev::IoCallback for CallbackLanes {
    fn io_done(self: std::rc::Rc<Self>, done: spool_bdev::IoDone) {
        done.result().expect("null read");
        let lane = done.tag;
        if let Some(remaining) = self.lanes.take(lane) {
            self.start(lane, lane + remaining * self.lanes.depth, done.buf);
        }
    }
}

/// On a reactor: `iters` 4 KiB null reads, `depth` at a time, as callback requests
/// (`BdevChannel::read_with`): each completion, called from the channel's poller, submits its
/// lane's next read, as `spool perf`'s bdev job and SPDK's bdevperf do. Compare with
/// [`null_reads_concurrent`] (a task per lane, a wake per I/O).
pub async fn null_callback_reads(desc: BdevDesc, depth: u64, iters: u64) -> Duration {
    assert!(depth > 0, "depth must be at least 1");
    let channel = desc.channel().expect("null channel");
    // Grow the slot table to `depth` outside the measurement.
    {
        let futures: Vec<_> = (0..depth)
            .map(|_| channel.read(DmaBuf::alloc(NULL_BLOCK_SIZE as usize).expect("dma"), 0))
            .collect();
        for future in futures {
            future.await.0.expect("warm-up read");
        }
    }
    let chain = std::rc::Rc::new(CallbackLanes {
        channel,
        lanes: Lanes::new(depth, iters),
    });
    let bufs = lane_buffers(&chain.lanes);
    let start = Instant::now();
    start_lanes(&chain.lanes, bufs, |lane, buf| chain.start(lane, lane, buf));
    chain.lanes.finished().await;
    start.elapsed()
}

/// As [`null_reads_concurrent`], through the blob layer: a store on a null bdev with one
/// thick blob over it, read at the same offsets through a blob channel. The difference of the
/// two is the blob layer's cost per I/O.
///
/// # Panics
/// If the store cannot be set up (a broken benchmark environment).
pub async fn blob_null_reads_concurrent(desc: BdevDesc, depth: u64, iters: u64) -> Duration {
    assert!(depth > 0, "depth must be at least 1");
    let store = spool_blob::Blobstore::init(desc, &spool_blob::InitOptions::default())
        .await
        .expect("blobstore on null");
    let clusters = store.free_cluster_count();
    let blob = store
        .create_and_open(&spool_blob::BlobOptions {
            num_clusters: clusters,
            ..spool_blob::BlobOptions::default()
        })
        .await
        .expect("thick blob");
    let io = blob.io();
    let units = io.num_io_units();
    let channel = store.channel().expect("blob channel");
    let mut bufs = Vec::new();
    for _ in 0..depth {
        bufs.push(DmaBuf::alloc(NULL_BLOCK_SIZE as usize).expect("dma buffer"));
    }
    {
        let futures: Vec<_> = bufs
            .drain(..)
            .map(|buf| channel.read(&io, 0, buf))
            .collect();
        for future in futures {
            let (result, buf) = future.await;
            result.expect("warm-up read");
            bufs.push(buf);
        }
    }
    let start = Instant::now();
    let mut handles = Vec::new();
    for (worker, buf) in (0..depth).zip(bufs) {
        let count = iters / depth + u64::from(worker < iters % depth);
        let channel = channel.clone();
        let io = Arc::clone(&io);
        handles.push(spawn_local(async move {
            let mut buf = buf;
            for index in 0..count {
                let unit = (offset_of(worker + index * depth) / u64::from(NULL_BLOCK_SIZE)) % units;
                let (result, back) = channel.read(&io, unit, buf).await;
                result.expect("blob read");
                buf = back;
            }
        }));
    }
    for handle in handles {
        handle.await.expect("reader task completes");
    }
    let elapsed = start.elapsed();
    drop(channel);
    blob.close().await.expect("close");
    store.unload().await.expect("unload");
    elapsed
}

/// The chain of blob callback reads [`blob_null_callback_reads`] drives, as
/// [`CallbackLanes`] on the blob layer.
struct BlobCallbackLanes {
    channel: spool_blob::BlobChannel,
    blob: Arc<spool_blob::BlobIo>,
    units: u64,
    lanes: Lanes,
}

impl BlobCallbackLanes {
    fn start(self: &std::rc::Rc<Self>, lane: u64, index: u64, buf: DmaBuf) {
        let unit = (offset_of(index) / u64::from(NULL_BLOCK_SIZE)) % self.units;
        let this: std::rc::Rc<dyn spool_blob::BlobIoCallback> = self.clone();
        self.channel.read_with(&self.blob, unit, buf, this, lane);
    }
}

impl spool_blob::BlobIoCallback for BlobCallbackLanes {
    fn io_done(self: std::rc::Rc<Self>, done: spool_blob::BlobIoDone) {
        done.result().expect("blob read");
        let lane = done.tag;
        if let Some(remaining) = self.lanes.take(lane) {
            self.start(lane, lane + remaining * self.lanes.depth, done.buf);
        }
    }
}

/// One read buffer per lane, made before the clock starts.
fn lane_buffers(lanes: &Lanes) -> Vec<DmaBuf> {
    (0..lanes.depth)
        .map(|_| DmaBuf::alloc(NULL_BLOCK_SIZE as usize).expect("dma buffer"))
        .collect()
}

/// Starts each lane's first read with `start(lane, buf)` (a lane with no read ends at once).
fn start_lanes(lanes: &Lanes, bufs: Vec<DmaBuf>, mut start: impl FnMut(u64, DmaBuf)) {
    for (lane, buf) in (0..lanes.depth).zip(bufs) {
        if lanes.take(lane).is_some() {
            start(lane, buf);
        }
    }
}

/// As [`null_callback_reads`], through the blob layer (`BlobChannel::read_with`) over a store
/// on a null bdev with one thick blob: the difference of the two is the blob layer's cost per
/// callback I/O.
///
/// # Panics
/// If the store cannot be set up (a broken benchmark environment).
pub async fn blob_null_callback_reads(desc: BdevDesc, depth: u64, iters: u64) -> Duration {
    assert!(depth > 0, "depth must be at least 1");
    let store = spool_blob::Blobstore::init(desc, &spool_blob::InitOptions::default())
        .await
        .expect("blobstore on null");
    let clusters = store.free_cluster_count();
    let blob = store
        .create_and_open(&spool_blob::BlobOptions {
            num_clusters: clusters,
            ..spool_blob::BlobOptions::default()
        })
        .await
        .expect("thick blob");
    let io = blob.io();
    let channel = store.channel().expect("blob channel");
    // Grow the bdev slot table to `depth` outside the measurement.
    {
        let futures: Vec<_> = (0..depth)
            .map(|_| {
                channel.read(
                    &io,
                    0,
                    DmaBuf::alloc(NULL_BLOCK_SIZE as usize).expect("dma"),
                )
            })
            .collect();
        for future in futures {
            future.await.0.expect("warm-up read");
        }
    }
    let chain = std::rc::Rc::new(BlobCallbackLanes {
        channel: channel.clone(),
        units: io.num_io_units(),
        blob: Arc::clone(&io),
        lanes: Lanes::new(depth, iters),
    });
    let bufs = lane_buffers(&chain.lanes);
    let start = Instant::now();
    start_lanes(&chain.lanes, bufs, |lane, buf| chain.start(lane, lane, buf));
    chain.lanes.finished().await;
    let elapsed = start.elapsed();
    drop(chain);
    drop(channel);
    blob.close().await.expect("close");
    store.unload().await.expect("unload");
    elapsed
}

/// An io_uring ring used only for `Nop`s: measures a submission and completion through the
/// ring itself, with no file or buffer.
pub struct NopRing {
    ring: Ring,
}

impl NopRing {
    /// Creates the ring (default options: 256 entries, no SQPOLL); an error when io_uring is
    /// unavailable here (old kernel, seccomp, `io_uring_disabled`).
    pub fn new() -> Result<NopRing, RingError> {
        Ok(NopRing {
            ring: Ring::new(&RingOptions::default())?,
        })
    }

    /// Pushes `batch` Nops, submits them with one `io_uring_enter`, and reaps all `batch`
    /// completions (waiting in the kernel only if some are not posted yet).
    ///
    /// # Panics
    /// If the ring rejects a push or a submit (`batch` larger than the SQ, or a kernel error).
    #[allow(unsafe_code)]
    pub fn nop_batch(&mut self, batch: usize) {
        for index in 0..batch {
            // SAFETY: a Nop carries no pointer, so there is no memory the kernel could touch
            // and nothing to keep alive until its completion is reaped.
            unsafe { self.ring.push(&RingOp::Nop, index as u64) }.expect("nop fits in the SQ");
        }
        self.ring.submit().expect("io_uring submit");
        let mut reaped = 0;
        loop {
            reaped += self.ring.reap(|_, result| {
                debug_assert_eq!(result, 0, "a nop completes with 0");
            });
            if reaped >= batch {
                break;
            }
            // Nops usually complete inside the submit; if not, wait in the kernel for the rest.
            self.ring
                .submit_and_wait(batch - reaped)
                .expect("io_uring wait");
        }
    }

    /// `iters` Nops in batches of `batch` (the last batch may be shorter); returns the elapsed
    /// time.
    pub fn run(&mut self, batch: usize, iters: u64) -> Duration {
        let batch = batch.max(1);
        let start = Instant::now();
        let mut left = iters;
        while left > 0 {
            let this = usize::try_from(left).map_or(batch, |left| left.min(batch));
            self.nop_batch(this);
            left -= this as u64;
        }
        start.elapsed()
    }
}

impl std::fmt::Debug for NopRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NopRing").field("ring", &self.ring).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use spool_reactor::{Sim, SimOptions};

    #[test]
    fn message_benches_run_a_few_iterations() {
        let runtime = start_runtime(2);
        let reactors = runtime.reactors();
        let (home, peer) = (reactors[0], *reactors.last().expect("one reactor at least"));
        for iters in [0, 1, 5] {
            runtime
                .block_on(home, move || ping_pong(peer, iters))
                .expect("ping_pong");
            runtime
                .block_on(home, move || spawn_on_roundtrip(peer, iters))
                .expect("spawn_on_roundtrip");
        }
        for iters in [1, ONE_WAY_WINDOW - 1, ONE_WAY_WINDOW, ONE_WAY_WINDOW + 3] {
            runtime
                .block_on(home, move || one_way_batch(peer, iters))
                .expect("one_way_batch");
        }
        stop_runtime(runtime);
    }

    #[test]
    fn null_benches_run_on_a_runtime_and_a_sim() {
        let runtime = start_runtime(1);
        let home = runtime.reactors()[0];
        let desc = null_desc();
        for iters in [0, 1, 100] {
            let one = desc.clone();
            runtime
                .block_on(home, move || null_reads(one, iters))
                .expect("null_reads");
            let many = desc.clone();
            runtime
                .block_on(home, move || null_reads_concurrent(many, 32, iters))
                .expect("null_reads_concurrent");
        }
        stop_runtime(runtime);

        let mut sim = Sim::new(SimOptions {
            seed: 7,
            reactors: 1,
        });
        let home = sim.reactors()[0];
        let one = null_desc();
        sim.block_on(home, move || null_reads(one, 10))
            .expect("null_reads under sim");
        let report = sim.stop();
        assert_eq!(report.leaked_channels, 0);
    }

    #[test]
    fn nop_ring_reaps_every_nop_or_is_unavailable() {
        let Ok(mut ring) = NopRing::new() else {
            return;
        };
        ring.run(32, 100);
        assert_eq!(ring.ring.in_flight(), 0);
    }
}
