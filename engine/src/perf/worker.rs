//! One core's share of a perf run: a job on the core's reactor that keeps `qd` I/Os in
//! flight until the deadline and records every latency in the core's histogram.
//!
//! The job is SPDK bdevperf's: each request is a callback request
//! ([`BdevChannel::read_with`] on the bdev layer, see `spool_bdev::callback`;
//! [`BlobChannel::read_with`] on the blob layer, see `spool_blob::io::callback`), and its
//! completion, called directly by the channel's poller, records it and submits its
//! successor. No task is woken per I/O; the job's task only starts the first `qd` requests
//! and waits for the last one. Every request takes the whole path: validation, a pooled slot, the device's submit, the device
//! poller's completion, and the hand-back of the buffer. Buffers are allocated once; nothing
//! allocates per I/O.
//!
//! Latency is bdevperf's: from the submission to the moment the job handles the completion.
//! The clock (a TSC read through the reactor's [`ReactorClock`], no system call) is read once
//! per completion as the job reaches it, so the time a completed request waits while the job
//! handles the ones before it counts; that reading is also the submission time of the request
//! that replaces it. Every moment of the run is thus covered by `qd` latencies, and the mean
//! obeys Little's law (mean = qd / IOPS, as bdevperf's does). fio's `clat` differs: it starts
//! when the request is handed to the engine, leaving out the submission itself.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use hdrhistogram::Histogram;
use spool_bdev::{BdevChannel, BdevDesc, DmaBuf, IoCallback, IoDone};
use spool_blob::{BlobChannel, BlobIo, BlobIoCallback, BlobIoDone};
use spool_reactor::ReactorClock;

use crate::error::step;
use crate::perf::RwMode;
use crate::signals::stop_requested;
use crate::EngineError;

/// What every core's job needs to know.
#[derive(Debug, Clone)]
pub struct JobConfig {
    /// The pattern.
    pub rw: RwMode,
    /// Read percentage for randrw.
    pub rwmix_read_pct: u8,
    /// Bytes per I/O.
    pub bs: u64,
    /// I/Os in flight on this core.
    pub qd: u32,
    /// How long to run.
    pub duration_ns: u64,
    /// The byte range this core works in (sequential jobs split the device by core).
    pub region_start: u64,
    /// Length of that range.
    pub region_len: u64,
    /// Seed of the random offsets.
    pub seed: u64,
}

/// What a core measured.
pub struct CoreResult {
    /// I/Os completed successfully.
    pub ops: u64,
    /// Wall time from the first submission to the last completion, ns.
    pub elapsed_ns: u64,
    /// Latency of every successful I/O, ns.
    pub latency_ns: Histogram<u64>,
    /// I/Os that failed.
    pub errors: u64,
    /// The first failure, if any.
    pub first_error: Option<JobFailure>,
    /// (ns since the job started, I/Os completed by then), every progress period
    /// ([`PROGRESS_PERIOD`]) and at the end: the IOPS-over-time series.
    pub timeline: Vec<(u64, u64)>,
}

/// How often a job publishes its count and samples its timeline.
pub const PROGRESS_PERIOD: Duration = Duration::from_millis(100);

/// A job's first failed request.
#[derive(Debug, Clone)]
pub struct JobFailure {
    /// What failed: "read at byte 4096: ..." (the request, then the error).
    pub message: String,
    /// The error's negative errno.
    pub errno: i32,
}

impl JobFailure {
    fn of(is_read: bool, offset: u64, err: impl Into<EngineError>) -> JobFailure {
        let err = err.into();
        let what = if is_read { "read" } else { "write" };
        JobFailure {
            message: format!("{what} at byte {offset}: {err}"),
            errno: err.errno(),
        }
    }
}

/// Chooses offsets and directions for the job.
struct Pattern {
    config: JobConfig,
    rng: fastrand::Rng,
    blocks: u64,
    seq_cursor: u64,
}

impl Pattern {
    fn new(config: &JobConfig) -> Pattern {
        Pattern {
            config: config.clone(),
            rng: fastrand::Rng::with_seed(config.seed),
            blocks: (config.region_len / config.bs).max(1),
            seq_cursor: 0,
        }
    }

    /// The next request: (is_read, offset).
    #[inline]
    fn next(&mut self) -> (bool, u64) {
        let config = &self.config;
        let block = match config.rw {
            RwMode::Read | RwMode::Write => {
                let block = self.seq_cursor;
                self.seq_cursor = (block + 1) % self.blocks;
                block
            }
            _ => self.rng.u64(0..self.blocks),
        };
        let is_read = match config.rw {
            RwMode::Randread | RwMode::Read => true,
            RwMode::Randwrite | RwMode::Write => false,
            RwMode::Randrw => self.rng.u8(0..100) < config.rwmix_read_pct,
        };
        (is_read, config.region_start + block * config.bs)
    }
}

/// Where a job's I/Os go: a bdev, or a blob of a blobstore on it (`--layer blob`).
#[derive(Clone)]
pub enum JobTarget {
    /// The bdev layer.
    Bdev(BdevDesc),
    /// The blob layer: offsets are blob bytes, sent in io_units through a blob channel.
    Blob(Arc<BlobIo>),
}

/// Runs the job on the calling reactor; `progress` receives the running op count.
pub async fn run_core(
    target: JobTarget,
    config: JobConfig,
    progress: Arc<AtomicU64>,
) -> Result<CoreResult, EngineError> {
    match target {
        JobTarget::Bdev(desc) => {
            let channel = desc.channel().map_err(step("open channel"))?;
            run_job(BdevTarget(channel), config, progress).await
        }
        JobTarget::Blob(blob) => {
            let unit = blob.io_unit_size();
            if !unit.is_power_of_two() {
                return Err(EngineError::InvalidArgument(format!(
                    "the store's io_unit of {unit} bytes is not a power of two"
                )));
            }
            let target = BlobTarget {
                channel: blob.channel().map_err(step("open blob channel"))?,
                blob,
                unit_shift: unit.trailing_zeros(),
            };
            run_job(target, config, progress).await
        }
    }
}

fn fill_pattern(buf: &mut DmaBuf, seed: u64) {
    for (index, byte) in buf.as_mut_slice().iter_mut().enumerate() {
        *byte = (index as u64).wrapping_mul(31).wrapping_add(seed) as u8;
    }
}

/// The job's histogram: 1 ns to an hour, 3 significant digits.
fn latency_histogram() -> Result<Histogram<u64>, EngineError> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).map_err(|err| EngineError::Failed {
        reason: err.to_string(),
        errno: -libc::EINVAL,
    })
}

/// What the job knows of one of its requests (indexed by the request's tag).
#[derive(Debug, Clone, Copy, Default)]
struct RequestInfo {
    submitted_ns: u64,
    is_read: bool,
    offset: u64,
}

/// The job's mutable state, borrowed by each completion for its length only.
struct JobState {
    pattern: Pattern,
    requests: Vec<RequestInfo>,
    latency_ns: Histogram<u64>,
    errors: u64,
    first_error: Option<JobFailure>,
    /// Requests started and not completed yet.
    in_flight: usize,
    /// The job's task, woken when the last request is done.
    waiter: Option<std::task::Waker>,
    /// (ns since start, I/Os completed), every [`PROGRESS_PERIOD`] as completions see it.
    timeline: Vec<(u64, u64)>,
    /// When the next timeline sample (and progress update) is due, ns on the job's clock.
    next_sample_ns: u64,
}

impl JobState {
    fn new(config: &JobConfig, qd: usize, start_ns: u64) -> Result<JobState, EngineError> {
        Ok(JobState {
            pattern: Pattern::new(config),
            requests: vec![RequestInfo::default(); qd],
            latency_ns: latency_histogram()?,
            errors: 0,
            first_error: None,
            in_flight: 0,
            waiter: None,
            timeline: vec![(0, 0)],
            next_sample_ns: start_ns + PROGRESS_PERIOD.as_nanos() as u64,
        })
    }
}

/// A layer's channel as the job drives it: starts one callback request. The job is generic
/// over it, so each layer's job is compiled for that layer alone.
trait CallbackTarget: Sized + 'static {
    /// Starts a read or write of `buf` at byte `offset` of the target, called back on `job`
    /// with `tag`; `Err` when the channel refused it at once.
    fn start(
        job: &Rc<Job<Self>>,
        is_read: bool,
        buf: DmaBuf,
        offset: u64,
        tag: u64,
    ) -> Result<(), JobFailure>;
}

/// The bdev layer: bdev callback requests.
struct BdevTarget(BdevChannel);

impl CallbackTarget for BdevTarget {
    #[inline]
    fn start(
        job: &Rc<Job<Self>>,
        is_read: bool,
        buf: DmaBuf,
        offset: u64,
        tag: u64,
    ) -> Result<(), JobFailure> {
        let callback: Rc<dyn IoCallback> = Rc::clone(job) as Rc<dyn IoCallback>;
        let channel = &job.target.0;
        let started = if is_read {
            channel.read_with(buf, offset, callback, tag)
        } else {
            channel.write_with(buf, offset, callback, tag)
        };
        started.map_err(|refused| JobFailure::of(is_read, offset, *refused.error))
    }
}

/// The blob layer: blob callback requests on one blob, byte offsets made io_units.
struct BlobTarget {
    channel: BlobChannel,
    blob: Arc<BlobIo>,
    unit_shift: u32,
}

impl CallbackTarget for BlobTarget {
    #[inline]
    fn start(
        job: &Rc<Job<Self>>,
        is_read: bool,
        buf: DmaBuf,
        offset: u64,
        tag: u64,
    ) -> Result<(), JobFailure> {
        let callback: Rc<dyn BlobIoCallback> = Rc::clone(job) as Rc<dyn BlobIoCallback>;
        let target = &job.target;
        let unit = offset >> target.unit_shift;
        if is_read {
            target
                .channel
                .read_with(&target.blob, unit, buf, callback, tag);
        } else {
            target
                .channel
                .write_with(&target.blob, unit, buf, callback, tag);
        }
        Ok(())
    }
}

/// A job: the completion callback of every request it makes.
struct Job<T> {
    target: T,
    clock: ReactorClock,
    deadline_ns: u64,
    start_ns: u64,
    /// I/Os completed successfully.
    completed: Cell<u64>,
    /// Where the running count is published for the progress line.
    progress: Arc<AtomicU64>,
    state: RefCell<JobState>,
}

impl<T: CallbackTarget> Job<T> {
    /// Starts request `tag` at `now`: `Ok` once the channel took it, else the failure.
    #[inline]
    fn start(
        self: &Rc<Self>,
        state: &mut JobState,
        tag: usize,
        buf: DmaBuf,
        now: u64,
    ) -> Result<(), JobFailure> {
        let (is_read, offset) = state.pattern.next();
        state.requests[tag] = RequestInfo {
            submitted_ns: now,
            is_read,
            offset,
        };
        T::start(self, is_read, buf, offset, tag as u64)
    }

    /// Request `tag` completed with `failure` (`None`: success): records it and starts its
    /// successor with `buf`, or ends it.
    #[inline]
    fn completed(self: Rc<Self>, tag: usize, failure: Option<EngineError>, buf: DmaBuf) {
        // The completion reaches the job now: its latency ends, its successor's begins.
        let handled = self.clock.now_ns();
        let mut state = self.state.borrow_mut();
        let request = state.requests[tag];
        match failure {
            None => {
                state
                    .latency_ns
                    .saturating_record(handled.saturating_sub(request.submitted_ns).max(1));
                self.completed.set(self.completed.get() + 1);
            }
            Some(err) => {
                state.errors += 1;
                state
                    .first_error
                    .get_or_insert_with(|| JobFailure::of(request.is_read, request.offset, err));
            }
        }
        if handled >= state.next_sample_ns {
            // Sampled here rather than by a timed poller: the job reads the clock per
            // completion anyway, and a reactor with nothing timed registered skips its
            // per-pass clock read.
            let done = self.completed.get();
            self.progress.store(done, Ordering::Relaxed);
            state
                .timeline
                .push((handled.saturating_sub(self.start_ns), done));
            state.next_sample_ns = handled + PROGRESS_PERIOD.as_nanos() as u64;
        }
        // A stop signal ends submissions like the deadline does.
        if handled < self.deadline_ns && state.errors == 0 && stop_requested().is_none() {
            match self.start(&mut state, tag, buf, handled) {
                Ok(()) => return,
                Err(err) => {
                    state.errors += 1;
                    state.first_error.get_or_insert(err);
                }
            }
        }
        state.in_flight -= 1;
        if state.in_flight == 0 {
            if let Some(waiter) = state.waiter.take() {
                drop(state);
                waiter.wake();
            }
        }
    }
}

impl IoCallback for Job<BdevTarget> {
    #[inline]
    fn io_done(self: Rc<Self>, done: IoDone) {
        let failure = done.result().err().map(EngineError::from);
        self.completed(done.tag as usize, failure, done.buf);
    }
}

impl BlobIoCallback for Job<BlobTarget> {
    #[inline]
    fn io_done(self: Rc<Self>, done: BlobIoDone) {
        let tag = done.tag as usize;
        let (result, buf) = done.into_parts();
        self.completed(tag, result.err().map(EngineError::from), buf);
    }
}

/// The job (see the module docs): callbacks, no task wake per I/O.
async fn run_job<T: CallbackTarget>(
    target: T,
    config: JobConfig,
    progress: Arc<AtomicU64>,
) -> Result<CoreResult, EngineError> {
    let bs = usize::try_from(config.bs)
        .map_err(|err| EngineError::InvalidArgument(format!("--bs {}: {err}", config.bs)))?;
    let mut buffers = Vec::with_capacity(config.qd as usize);
    for index in 0..config.qd {
        let mut buf = DmaBuf::alloc(bs)?;
        fill_pattern(&mut buf, u64::from(index));
        buffers.push(buf);
    }
    let clock = ReactorClock::current();
    let start_ns = clock.now_ns();
    let job = Rc::new(Job {
        target,
        clock: clock.clone(),
        deadline_ns: start_ns + config.duration_ns,
        start_ns,
        completed: Cell::new(0),
        progress,
        state: RefCell::new(JobState::new(&config, buffers.len(), start_ns)?),
    });
    {
        // Callbacks run from the channel's poller, never inside `read_with`: holding the
        // state across the first submissions is safe.
        let mut state = job.state.borrow_mut();
        let now = clock.now_ns();
        for (tag, buf) in buffers.into_iter().enumerate() {
            match job.start(&mut state, tag, buf, now) {
                Ok(()) => state.in_flight += 1,
                Err(err) => {
                    state.errors += 1;
                    state.first_error.get_or_insert(err);
                    break;
                }
            }
        }
    }
    poll_fn(|cx| {
        let mut state = job.state.borrow_mut();
        if state.in_flight == 0 {
            return Poll::Ready(());
        }
        if !state
            .waiter
            .as_ref()
            .is_some_and(|waiter| waiter.will_wake(cx.waker()))
        {
            state.waiter = Some(cx.waker().clone());
        }
        Poll::Pending
    })
    .await;
    let elapsed_ns = clock.now_ns() - start_ns;
    let ops = job.completed.get();
    job.progress.store(ops, Ordering::Relaxed);
    let state = job.state.replace(JobState::new(&config, 0, start_ns)?);
    let mut timeline = state.timeline;
    timeline.push((elapsed_ns, ops));
    Ok(CoreResult {
        ops,
        elapsed_ns,
        latency_ns: state.latency_ns,
        errors: state.errors,
        first_error: state.first_error,
        timeline,
    })
}
