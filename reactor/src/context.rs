//! Which reactor is running on this thread, and where a wake for each reactor goes.
//!
//! A production thread hosts one reactor; a simulation thread hosts all of them and switches
//! "current" as it steps each one. Wakes look up the target reactor's run queue in this
//! thread's table; a wake for a reactor that lives on another thread goes to it as a message.

use std::cell::RefCell;
use std::rc::Rc;

use crate::core::{ReactorCore, ReactorId, RunQueue};

/// A run queue and the runtime its reactor belongs to.
type OwnedRunQueue = (u64, Rc<RunQueue>);

thread_local! {
    static CURRENT: RefCell<Option<Rc<ReactorCore>>> = const { RefCell::new(None) };
    static RUN_QUEUES: RefCell<Vec<Option<OwnedRunQueue>>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with the reactor current on this thread, or returns None off a reactor.
#[inline]
pub(crate) fn with_current<R>(f: impl FnOnce(&Rc<ReactorCore>) -> R) -> Option<R> {
    CURRENT.with(|current| current.borrow().as_ref().map(f))
}

/// The reactor current on this thread; `Err(NotOnReactor)` off a reactor.
pub(crate) fn current() -> Result<Rc<ReactorCore>, crate::ReactorError> {
    with_current(Rc::clone).ok_or(crate::ReactorError::NotOnReactor)
}

/// Makes `core` current until the guard drops, restoring whatever was current before.
pub(crate) struct CurrentGuard {
    previous: Option<Rc<ReactorCore>>,
}

impl CurrentGuard {
    pub(crate) fn enter(core: &Rc<ReactorCore>) -> CurrentGuard {
        let previous = CURRENT.with(|current| current.borrow_mut().replace(Rc::clone(core)));
        CurrentGuard { previous }
    }
}

impl Drop for CurrentGuard {
    fn drop(&mut self) {
        let previous = self.previous.take();
        CURRENT.with(|current| *current.borrow_mut() = previous);
    }
}

/// Declares that reactor `id` of runtime `runtime_id` has its run queue on this thread.
pub(crate) fn run_queue_install(runtime_id: u64, id: ReactorId, queue: Rc<RunQueue>) {
    RUN_QUEUES.with(|queues| {
        let mut queues = queues.borrow_mut();
        let index = id.index();
        if queues.len() <= index {
            queues.resize(index + 1, None);
        }
        queues[index] = Some((runtime_id, queue));
    });
}

/// Forgets reactor `id`'s run queue on this thread (at stop).
pub(crate) fn run_queue_remove(id: ReactorId) {
    RUN_QUEUES.with(|queues| {
        if let Some(slot) = queues.borrow_mut().get_mut(id.index()) {
            *slot = None;
        }
    });
}

/// Pushes a runnable onto reactor `id`'s queue if that queue (of runtime `runtime_id`: ids
/// restart at 0 in every runtime) lives on this thread; gives the runnable back otherwise.
#[inline]
pub(crate) fn run_queue_push(
    runtime_id: u64,
    id: ReactorId,
    runnable: async_task::Runnable<u64>,
) -> Result<(), async_task::Runnable<u64>> {
    RUN_QUEUES.with(|queues| {
        let queues = queues.borrow();
        match queues.get(id.index()) {
            Some(Some((owner_runtime, queue))) if *owner_runtime == runtime_id => {
                queue.push(runnable);
                Ok(())
            }
            _ => Err(runnable),
        }
    })
}

/// True when called from a reactor (a runtime thread or a simulation step).
pub fn in_reactor() -> bool {
    with_current(|_| ()).is_some()
}

/// The id of the calling reactor; `Err(NotOnReactor)` off a reactor.
pub fn reactor_id() -> Result<ReactorId, crate::ReactorError> {
    with_current(|core| core.id).ok_or(crate::ReactorError::NotOnReactor)
}

/// How many reactors the calling reactor's runtime (or simulation) has; 0 off a reactor.
pub fn reactor_count() -> usize {
    with_current(|core| core.shared.reactors.len()).unwrap_or(0)
}

/// True when the calling reactor is stepped by a [`crate::Sim`].
pub fn is_simulated() -> bool {
    with_current(|core| core.sim.is_some()).unwrap_or(false)
}

/// A draw from the simulation's seeded generator, or None outside a simulation. Simulated
/// devices take their latencies and completion orders from here so a seed replays exactly.
pub fn sim_rng_u64() -> Option<u64> {
    with_current(|core| core.sim.as_ref().map(|sim| sim.rng.borrow_mut().u64(..))).flatten()
}

/// Records a user event in the simulation trace (no-op outside a simulation). `describe` is
/// only called in a simulation.
pub fn trace(describe: impl FnOnce() -> String) {
    with_current(|core| {
        if core.sim.is_some() {
            core.trace_event(crate::sim::TraceKind::User(describe()));
        }
    });
}

/// A snapshot of the calling reactor's state, for diagnostics and leak checks in tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReactorStats {
    /// Tasks spawned and not yet finished.
    pub tasks: usize,
    /// Names of the registered pollers.
    pub pollers: Vec<&'static str>,
    /// Channels this reactor holds, across devices.
    pub channels: usize,
    /// Timers registered and neither fired nor cancelled.
    pub timers: usize,
}

/// The calling reactor's [`ReactorStats`]; `Err(NotOnReactor)` off a reactor.
pub fn stats() -> Result<ReactorStats, crate::ReactorError> {
    let core = current()?;
    let channels = core
        .channels
        .borrow()
        .values()
        .filter(|weak| weak.strong_count() > 0)
        .count();
    Ok(ReactorStats {
        tasks: core.tasks.count(),
        pollers: core.pollers.names(),
        channels,
        timers: core.timers.live_count(),
    })
}
