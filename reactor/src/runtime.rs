//! The production driver: one OS thread per selected core, pinned, each running its reactor's
//! loop until told to stop.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle as ThreadHandle;
use std::time::Duration;

use crossbeam_channel::RecvTimeoutError;

use crate::clock::Clock;
use crate::context::CurrentGuard;
use crate::core::{ReactorCore, ReactorId, ReactorRemote, Shared};
use crate::limits::{
    ADAPTIVE_SPIN_NS, IDLE_SLEEP_NS_MAX, REACTORS_MAX, YIELD_AFTER_WAITING_PASSES,
};
use crate::message::{broadcast_shared, spawn_on_shared, Message};
use crate::oneshot::RemoteHandle;
use crate::wakeup::WaitSet;
use crate::ReactorError;

/// What a reactor does when a loop pass finds nothing to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IdleMode {
    /// Spin: poll again at once (lowest latency, one core fully used). The default. While
    /// the only outstanding work is I/O in the kernel, the reactor yields its core every few
    /// idle passes (a `sched_yield`, returning at once when nothing else is runnable) so the
    /// kernel workers completing that I/O are not starved.
    #[default]
    Busy,
    /// Sleep on the message queue until a message, the next timer, or at most 1 ms, whenever
    /// nothing is pending: no poller did work or has I/O in flight, and nothing is queued.
    Sleep,
    /// Spin while there is work and for a short while after
    /// ([`crate::limits::ADAPTIVE_SPIN_NS`]), then block in the kernel until a message, an
    /// I/O completion or socket readiness a device registered as a wake source, or the next
    /// timer (SPDK's interrupt mode, entered on its own when idle). I/O in flight does not
    /// keep the reactor awake when its device signals completions (`PollStatus::Armed`). The
    /// core is given back to whatever else needs it, at the price of a wake-up (a few
    /// microseconds) after every idle period.
    Adaptive,
    /// As `Adaptive` with no spin: block in the kernel as soon as a loop pass finds nothing
    /// to do (and every outstanding I/O has a wake source). The reactor uses only the CPU
    /// its work takes, so on a core it shares (with the client, other daemons, compilers)
    /// the scheduler runs it promptly when a request arrives instead of preempting it for
    /// whole time slices with requests in flight, as it does a spinning reactor; each
    /// request batch then costs a wake-up (a few microseconds) instead of none.
    Interrupt,
}

impl IdleMode {
    /// How long a reactor in this mode spins with nothing to do before it blocks in the
    /// kernel; `None` when it never blocks there.
    fn kernel_sleep_after_ns(self) -> Option<u64> {
        match self {
            IdleMode::Adaptive => Some(ADAPTIVE_SPIN_NS),
            IdleMode::Interrupt => Some(0),
            IdleMode::Busy | IdleMode::Sleep => None,
        }
    }
}

/// How to start a [`Runtime`].
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// The cores to run reactors on, one reactor each; reactor `i` runs on `cores[i]`.
    pub cores: Vec<usize>,
    /// Busy polling or sleeping when idle.
    pub idle: IdleMode,
    /// Pin each reactor thread to its core (a failure to pin is a warning, not an error).
    pub pin: bool,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        RuntimeOptions {
            cores: vec![0],
            idle: IdleMode::Busy,
            pin: true,
        }
    }
}

/// What a stop found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopReport {
    /// Channels still alive after every reactor stopped (0 on a clean stop).
    pub leaked_channels: usize,
    /// Reactors whose threads panicked.
    pub panicked: Vec<ReactorId>,
}

/// Running reactors, one per core. Dropping it stops them.
pub struct Runtime {
    shared: Arc<Shared>,
    cores: Vec<usize>,
    threads: Vec<(ReactorId, ThreadHandle<()>)>,
    pinned: Arc<AtomicUsize>,
}

impl Runtime {
    /// Starts one reactor thread per core in `options.cores` and waits until all are running.
    pub fn start(options: &RuntimeOptions) -> Result<Runtime, ReactorError> {
        validate_cores(&options.cores)?;
        let mut receivers = Vec::new();
        let mut reactors = Vec::new();
        let mut wait_sets = Vec::new();
        for index in 0..options.cores.len() {
            let (sender, receiver) = crossbeam_channel::unbounded();
            let id = ReactorId(
                u32::try_from(index)
                    .map_err(|_| ReactorError::BadCores("too many cores".into()))?,
            );
            let (wait_set, doorbell) = match options.idle {
                IdleMode::Adaptive | IdleMode::Interrupt => {
                    let (wait_set, doorbell) = WaitSet::new().map_err(|err| {
                        ReactorError::Io(format!("creating a reactor's wait set: {err}"))
                    })?;
                    (Some(wait_set), Some(doorbell))
                }
                IdleMode::Busy | IdleMode::Sleep => (None, None),
            };
            wait_sets.push(wait_set);
            reactors.push(ReactorRemote {
                id,
                sender,
                stopped: AtomicBool::new(false),
                doorbell,
                mail: Arc::new(AtomicBool::new(false)),
            });
            receivers.push(receiver);
        }
        let shared = Arc::new(Shared::new(reactors));
        let pinned = Arc::new(AtomicUsize::new(0));
        let (started_tx, started_rx) = crossbeam_channel::bounded(options.cores.len());
        let mut runtime = Runtime {
            shared: Arc::clone(&shared),
            cores: options.cores.clone(),
            threads: Vec::new(),
            pinned: Arc::clone(&pinned),
        };
        for (index, (receiver, wait_set)) in receivers.into_iter().zip(wait_sets).enumerate() {
            let id = shared.reactors[index].id;
            let core_id = options.cores[index];
            let thread_shared = Arc::clone(&shared);
            let thread_started = started_tx.clone();
            let thread_pinned = Arc::clone(&pinned);
            let pin = options.pin;
            let idle = options.idle;
            let thread = std::thread::Builder::new()
                .name(format!("spool-reactor-{index}"))
                .spawn(move || {
                    if pin && pin_to_core(core_id) {
                        thread_pinned.fetch_add(1, Ordering::Relaxed);
                    }
                    let core = ReactorCore::new(id, thread_shared, Clock::real(), receiver, None);
                    if let Some(wait_set) = wait_set {
                        let _ = core.wait_set.set(wait_set);
                    }
                    let _ = thread_started.send(());
                    reactor_loop(&core, idle);
                })
                .map_err(|err| ReactorError::ThreadSpawn(err.to_string()))?;
            runtime.threads.push((id, thread));
        }
        for _ in 0..options.cores.len() {
            started_rx
                .recv()
                .map_err(|_| ReactorError::ThreadSpawn("a reactor thread died at start".into()))?;
        }
        Ok(runtime)
    }

    /// The reactors, in core order.
    pub fn reactors(&self) -> Vec<ReactorId> {
        self.shared
            .reactors
            .iter()
            .map(|remote| remote.id)
            .collect()
    }

    /// The core reactor `id` runs on.
    pub fn core_of(&self, id: ReactorId) -> Option<usize> {
        self.cores.get(id.index()).copied()
    }

    /// How many reactor threads were pinned successfully.
    pub fn pinned_count(&self) -> usize {
        self.pinned.load(Ordering::Relaxed)
    }

    /// Runs `run` on reactor `target` in a later loop pass.
    pub fn send_msg(
        &self,
        target: ReactorId,
        run: impl FnOnce() + Send + 'static,
    ) -> Result<(), ReactorError> {
        self.shared.send(target, Message::Run(Box::new(run)))
    }

    /// Builds and spawns a future on reactor `target`; the handle yields its output.
    pub fn spawn_on<F, Fut, T>(
        &self,
        target: ReactorId,
        make: F,
    ) -> Result<RemoteHandle<T>, ReactorError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        spawn_on_shared(&self.shared, target, make)
    }

    /// Runs a future on reactor `target` and blocks this (non-reactor) thread for its output.
    pub fn block_on<F, Fut, T>(&self, target: ReactorId, make: F) -> Result<T, ReactorError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        self.spawn_on(target, make)?.wait()
    }

    /// Runs `run` on every reactor; the handle completes when all have run it.
    pub fn broadcast(
        &self,
        run: impl Fn(ReactorId) + Send + Sync + 'static,
    ) -> Result<RemoteHandle<()>, ReactorError> {
        broadcast_shared(&self.shared, run)
    }

    /// Channels alive now, across all devices and reactors.
    pub fn live_channels(&self) -> usize {
        self.shared.live_channels.load(Ordering::Acquire)
    }

    /// Stops every reactor (cancelling its tasks and destroying its channels on its own
    /// thread), joins the threads, and reports leaks and panics.
    pub fn stop(mut self) -> StopReport {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> StopReport {
        for remote in &self.shared.reactors {
            let _ = remote.post(Message::Stop);
        }
        let mut panicked = Vec::new();
        for (id, thread) in self.threads.drain(..) {
            if thread.join().is_err() {
                panicked.push(id);
            }
        }
        StopReport {
            leaked_channels: self.live_channels(),
            panicked,
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            let report = self.stop_inner();
            if report.leaked_channels != 0 || !report.panicked.is_empty() {
                tracing::warn!(?report, "runtime dropped with leaks or panics");
            }
        }
    }
}

fn validate_cores(cores: &[usize]) -> Result<(), ReactorError> {
    if cores.is_empty() {
        return Err(ReactorError::BadCores("no cores given".into()));
    }
    if cores.len() > REACTORS_MAX {
        return Err(ReactorError::BadCores(format!(
            "{} cores, at most {REACTORS_MAX}",
            cores.len()
        )));
    }
    let mut seen = std::collections::BTreeSet::new();
    for &core in cores {
        if !seen.insert(core) {
            return Err(ReactorError::BadCores(format!("core {core} given twice")));
        }
    }
    let online = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    if let Some(ids) = core_affinity::get_core_ids() {
        let known: Vec<usize> = ids.iter().map(|id| id.id).collect();
        if let Some(bad) = cores.iter().find(|core| !known.contains(core)) {
            return Err(ReactorError::BadCores(format!(
                "core {bad} is not available (cores: {known:?})"
            )));
        }
    } else if let Some(bad) = cores.iter().find(|&&core| core >= online) {
        return Err(ReactorError::BadCores(format!(
            "core {bad} is not available ({online} online)"
        )));
    }
    Ok(())
}

fn pin_to_core(core_id: usize) -> bool {
    let pinned = core_affinity::set_for_current(core_affinity::CoreId { id: core_id });
    if !pinned {
        tracing::warn!(core_id, "could not pin reactor thread; it runs unpinned");
    }
    pinned
}

/// The loop of a reactor thread: iterate until a stop message, then shut down in place.
fn reactor_loop(core: &std::rc::Rc<ReactorCore>, idle: IdleMode) {
    let _current = CurrentGuard::enter(core);
    // The event loop is the one loop meant to run unbounded: it ends only on a stop message.
    let mut waiting_passes = 0u32;
    // When a kernel-sleeping reactor's current idle stretch began (None while it has work).
    let mut idle_since_ns: Option<u64> = None;
    let idle_spin = idle.kernel_sleep_after_ns();
    loop {
        let status = core.poll_once();
        if core.stopping.get() {
            break;
        }
        if status.did_work {
            waiting_passes = 0;
            idle_since_ns = None;
            continue;
        }
        if let (Some(spin_ns), false) = (idle_spin, status.unwakeable) {
            let now_ns = core.clock.now_ns();
            let since = *idle_since_ns.get_or_insert(now_ns);
            if now_ns.saturating_sub(since) >= spin_ns {
                adaptive_sleep(core, now_ns);
                idle_since_ns = None;
                waiting_passes = 0;
                continue;
            }
        }
        if status.waiting {
            // Only the kernel has work for us (I/O in flight). Let whatever else is runnable
            // on this core go first every few passes: on a small machine those are the kernel
            // workers completing our own I/O (io_uring's io-wq). With nothing else runnable,
            // the yield returns at once. Both idle modes do this: neither may sleep now.
            waiting_passes += 1;
            if waiting_passes >= YIELD_AFTER_WAITING_PASSES {
                waiting_passes = 0;
                std::thread::yield_now();
            }
        } else if idle == IdleMode::Sleep && !core.has_queued_work() {
            idle_sleep(core);
        }
    }
    core.shutdown();
}

/// Blocks an adaptive reactor in the kernel until its doorbell rings, a wake source fires,
/// or its next deadline (timers, timed pollers, device hints) comes. A deadline nearer than
/// a millisecond (`epoll_wait`'s resolution) is spun for instead; a later one is slept for
/// in whole milliseconds, rounded down, and spun for the rest.
fn adaptive_sleep(core: &ReactorCore, now_ns: u64) {
    let Some(wait_set) = core.wait_set.get() else {
        return;
    };
    let timeout = match core.next_deadline_ns() {
        None => None,
        Some(deadline) => {
            let wait_ms = deadline.saturating_sub(now_ns) / 1_000_000;
            if wait_ms == 0 {
                return;
            }
            Some(Duration::from_millis(wait_ms))
        }
    };
    wait_set.sleep(timeout, || core.has_queued_work());
}

fn idle_sleep(core: &ReactorCore) {
    let now_ns = core.clock.now_ns();
    let wait_ns = core
        .next_deadline_ns()
        .map_or(IDLE_SLEEP_NS_MAX, |deadline| {
            deadline.saturating_sub(now_ns)
        })
        .min(IDLE_SLEEP_NS_MAX);
    match core.mailbox.recv_timeout(Duration::from_nanos(wait_ns)) {
        Ok(message) => core.handle_message(message),
        Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {}
    }
}
