//! One core's share of a perf run: `qd` tasks on the core's reactor, each keeping one I/O in
//! flight until the deadline, recording every latency in the core's histogram.
//!
//! The loop reads the clock once per I/O: the completion time of one I/O is the submission
//! time of the next. Buffers are allocated once per task; nothing allocates per I/O.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use spool_bdev::{BdevChannel, BdevDesc, DmaBuf};
use spool_reactor::{now_ns, poller_register, spawn_local, PollStatus};

use crate::cli::RwMode;

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
    pub first_error: Option<String>,
}

struct CoreState {
    deadline_ns: u64,
    latency_ns: RefCell<Histogram<u64>>,
    ops: Cell<u64>,
    errors: Cell<u64>,
    first_error: RefCell<Option<String>>,
    seq_cursor: Cell<u64>,
}

/// Runs the job on the calling reactor; `progress` receives the running op count.
pub async fn run_core(
    desc: BdevDesc,
    config: JobConfig,
    progress: Arc<AtomicU64>,
) -> Result<CoreResult, String> {
    let channel = desc
        .channel()
        .map_err(|err| format!("open channel: {err}"))?;
    let histogram =
        Histogram::new_with_bounds(1, 3_600_000_000_000, 3).map_err(|err| err.to_string())?;
    let start_ns = now_ns();
    let state = Rc::new(CoreState {
        deadline_ns: start_ns + config.duration_ns,
        latency_ns: RefCell::new(histogram),
        ops: Cell::new(0),
        errors: Cell::new(0),
        first_error: RefCell::new(None),
        seq_cursor: Cell::new(0),
    });
    let published = Rc::clone(&state);
    let progress_poller = poller_register(
        "perf-progress",
        Some(Duration::from_millis(100)),
        move || {
            progress.store(published.ops.get(), Ordering::Relaxed);
            PollStatus::Idle
        },
    )
    .map_err(|err| err.to_string())?;
    let mut tasks = Vec::with_capacity(config.qd as usize);
    for index in 0..config.qd {
        let buf = DmaBuf::alloc(usize::try_from(config.bs).map_err(|err| err.to_string())?)
            .map_err(|err| err.to_string())?;
        tasks.push(spawn_local(io_task(
            channel.clone(),
            Rc::clone(&state),
            config.clone(),
            buf,
            u64::from(index),
        )));
    }
    for task in tasks {
        task.await.map_err(|err| err.to_string())?;
    }
    let elapsed_ns = now_ns() - start_ns;
    progress_poller_finish(progress_poller);
    drop(channel);
    let state = Rc::try_unwrap(state)
        .map_err(|_| "perf state still shared after all tasks ended".to_string())?;
    Ok(CoreResult {
        ops: state.ops.get(),
        elapsed_ns,
        latency_ns: state.latency_ns.into_inner(),
        errors: state.errors.get(),
        first_error: state.first_error.into_inner(),
    })
}

/// Unregisters the progress poller, releasing its share of the core state.
fn progress_poller_finish(poller: spool_reactor::PollerHandle) {
    drop(poller);
}

/// One in-flight slot of the job: submit, await, record, repeat until the deadline.
async fn io_task(
    channel: BdevChannel,
    state: Rc<CoreState>,
    config: JobConfig,
    mut buf: DmaBuf,
    index: u64,
) {
    fill_pattern(&mut buf, index);
    let mut rng = fastrand::Rng::with_seed(config.seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let blocks = (config.region_len / config.bs).max(1);
    let mut submitted_ns = now_ns();
    while submitted_ns < state.deadline_ns {
        let offset = match config.rw {
            RwMode::Read | RwMode::Write => {
                let cursor = state.seq_cursor.get();
                state.seq_cursor.set((cursor + 1) % blocks);
                config.region_start + cursor * config.bs
            }
            _ => config.region_start + rng.u64(0..blocks) * config.bs,
        };
        let is_read = match config.rw {
            RwMode::Randread | RwMode::Read => true,
            RwMode::Randwrite | RwMode::Write => false,
            RwMode::Randrw => rng.u8(0..100) < config.rwmix_read_pct,
        };
        let (result, back) = if is_read {
            channel.read(buf, offset).await
        } else {
            channel.write(buf, offset).await
        };
        buf = back;
        let completed_ns = now_ns();
        if let Err(err) = result {
            state.errors.set(state.errors.get() + 1);
            state.first_error.borrow_mut().get_or_insert_with(|| {
                format!(
                    "{} at byte {offset}: {err}",
                    if is_read { "read" } else { "write" }
                )
            });
            return;
        }
        state
            .latency_ns
            .borrow_mut()
            .saturating_record((completed_ns - submitted_ns).max(1));
        state.ops.set(state.ops.get() + 1);
        submitted_ns = completed_ns;
    }
}

fn fill_pattern(buf: &mut DmaBuf, seed: u64) {
    for (index, byte) in buf.as_mut_slice().iter_mut().enumerate() {
        *byte = (index as u64).wrapping_mul(31).wrapping_add(seed) as u8;
    }
}
