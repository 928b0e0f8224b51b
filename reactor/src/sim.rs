//! The simulation driver: every reactor of a runtime stepped by one thread, in an order drawn
//! from a seeded generator, on a virtual clock. Simulated devices draw their latencies and
//! completion orders from the same seed (through [`crate::sim_rng_u64`]), so a run is a pure
//! function of its seed: a failing interleaving replays exactly, and the trace of two runs
//! with one seed is identical.
//!
//! Clock: each step advances virtual time by a seeded amount up to
//! [`crate::limits::SIM_STEP_NS_MAX`]. When no reactor has queued work and several steps in a
//! row did nothing, time jumps to the earliest deadline any reactor knows (timers, timed
//! pollers, device hints). With no deadline left, the simulation is quiescent.
//!
//! One thread runs at most one simulation at a time.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::clock::Clock;
use crate::context::CurrentGuard;
use crate::core::{ReactorCore, ReactorId, ReactorRemote, Shared};
use crate::limits::{REACTORS_MAX, SIM_STEPS_MAX, SIM_STEP_NS_MAX};
use crate::message::{broadcast_shared, spawn_on_shared, Message};
use crate::oneshot::RemoteHandle;
use crate::runtime::StopReport;
use crate::ReactorError;

/// How to build a [`Sim`].
#[derive(Debug, Clone, Copy)]
pub struct SimOptions {
    /// The seed every random choice derives from.
    pub seed: u64,
    /// How many reactors to simulate.
    pub reactors: usize,
}

/// What happened, as recorded by a simulation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TraceKind {
    /// A message ran.
    Message,
    /// The task with this id was polled.
    TaskRun(u64),
    /// The poller with this id reported work.
    PollerBusy(u64),
    /// A timer fired.
    TimerFired,
    /// Virtual time jumped to the next deadline.
    ClockJump,
    /// An event recorded with [`crate::trace`].
    User(String),
    /// A panic was contained: "message", "spawn_on constructor", "poller", "timer waker",
    /// "task" or "poller drop".
    Panic(&'static str),
}

/// One recorded event: at which step, at what virtual time, on which reactor.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TraceEvent {
    /// The simulation step.
    pub step: u64,
    /// Virtual time, ns.
    pub now_ns: u64,
    /// The reactor it happened on.
    pub reactor: ReactorId,
    /// What happened.
    pub kind: TraceKind,
}

/// Simulation state reachable from every simulated reactor.
pub(crate) struct SimShared {
    pub(crate) rng: RefCell<fastrand::Rng>,
    pub(crate) step: Cell<u64>,
    trace: RefCell<Vec<TraceEvent>>,
}

impl SimShared {
    pub(crate) fn record(&self, event: TraceEvent) {
        self.trace.borrow_mut().push(event);
    }
}

/// A seeded, single-threaded run of several reactors.
pub struct Sim {
    seed: u64,
    shared: Arc<Shared>,
    cores: Vec<Rc<ReactorCore>>,
    sim: Rc<SimShared>,
    clock: Rc<Cell<u64>>,
    schedule_rng: fastrand::Rng,
    idle_steps: u64,
    stopped: bool,
}

impl Sim {
    /// Builds `options.reactors` simulated reactors on this thread.
    ///
    /// # Panics
    /// If `reactors` is 0 or above [`REACTORS_MAX`] (a test-construction error).
    pub fn new(options: SimOptions) -> Sim {
        assert!(
            options.reactors > 0,
            "a simulation needs at least one reactor"
        );
        assert!(
            options.reactors <= REACTORS_MAX,
            "too many simulated reactors"
        );
        let mut receivers = Vec::new();
        let mut reactors = Vec::new();
        for index in 0..options.reactors {
            let (sender, receiver) = crossbeam_channel::unbounded();
            let id = ReactorId(u32::try_from(index).expect("bounded by REACTORS_MAX"));
            reactors.push(ReactorRemote {
                id,
                sender,
                stopped: AtomicBool::new(false),
                doorbell: None,
                mail: Arc::new(AtomicBool::new(false)),
            });
            receivers.push(receiver);
        }
        let shared = Arc::new(Shared::new(reactors));
        let clock = Rc::new(Cell::new(0));
        // Two streams from one seed: scheduling choices, and device draws.
        let sim = Rc::new(SimShared {
            rng: RefCell::new(fastrand::Rng::with_seed(
                options.seed ^ 0x5DEE_CE66_D1CE_5EED,
            )),
            step: Cell::new(0),
            trace: RefCell::new(Vec::new()),
        });
        let cores = receivers
            .into_iter()
            .enumerate()
            .map(|(index, receiver)| {
                ReactorCore::new(
                    shared.reactors[index].id,
                    Arc::clone(&shared),
                    Clock::Virtual(Rc::clone(&clock)),
                    receiver,
                    Some(Rc::clone(&sim)),
                )
            })
            .collect();
        Sim {
            seed: options.seed,
            shared,
            cores,
            sim,
            clock,
            schedule_rng: fastrand::Rng::with_seed(options.seed),
            idle_steps: 0,
            stopped: false,
        }
    }

    /// The seed this simulation replays from.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The simulated reactors.
    pub fn reactors(&self) -> Vec<ReactorId> {
        self.shared
            .reactors
            .iter()
            .map(|remote| remote.id)
            .collect()
    }

    /// Virtual time now, ns.
    pub fn now_ns(&self) -> u64 {
        self.clock.get()
    }

    /// Runs `run` on reactor `target` when it is next stepped.
    pub fn send_msg(
        &self,
        target: ReactorId,
        run: impl FnOnce() + Send + 'static,
    ) -> Result<(), ReactorError> {
        self.shared.send(target, Message::Run(Box::new(run)))
    }

    /// Builds and spawns a future on reactor `target`; drive the simulation to get its output.
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

    /// Runs `run` on every reactor; the handle completes when all have run it.
    pub fn broadcast(
        &self,
        run: impl Fn(ReactorId) + Send + Sync + 'static,
    ) -> Result<RemoteHandle<()>, ReactorError> {
        broadcast_shared(&self.shared, run)
    }

    /// Spawns a future on `target` and steps the simulation until it completes.
    pub fn block_on<F, Fut, T>(&mut self, target: ReactorId, make: F) -> Result<T, ReactorError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        let handle = self.spawn_on(target, make)?;
        self.run_until(&handle)
    }

    /// Steps until `handle` has its result, the simulation goes quiescent, or the step bound.
    pub fn run_until<T>(&mut self, handle: &RemoteHandle<T>) -> Result<T, ReactorError> {
        let start = self.sim.step.get();
        loop {
            if let Some(result) = handle.try_take() {
                return result;
            }
            let steps = self.sim.step.get() - start;
            if steps >= SIM_STEPS_MAX {
                return Err(ReactorError::SimStalled {
                    steps,
                    why: "step bound reached",
                });
            }
            if !self.step() {
                if let Some(result) = handle.try_take() {
                    return result;
                }
                return Err(ReactorError::SimStalled {
                    steps,
                    why: "nothing left to run",
                });
            }
        }
    }

    /// Steps until nothing is left to run (or the step bound); returns the steps taken.
    pub fn run_until_quiescent(&mut self) -> u64 {
        let start = self.sim.step.get();
        while self.sim.step.get() - start < SIM_STEPS_MAX && self.step() {}
        self.sim.step.get() - start
    }

    /// One step: advance virtual time a seeded amount, pick a reactor by the seed, run one
    /// iteration of its loop. False when the simulation is quiescent (nothing can happen).
    pub fn step(&mut self) -> bool {
        let step = self.sim.step.get() + 1;
        self.sim.step.set(step);
        let advance_ns = self.schedule_rng.u64(0..=SIM_STEP_NS_MAX);
        self.clock.set(self.clock.get() + advance_ns);
        let index = self.schedule_rng.usize(0..self.cores.len());
        let core = Rc::clone(&self.cores[index]);
        let status = {
            let _current = CurrentGuard::enter(&core);
            core.poll_once()
        };
        // A poller waiting on the kernel (real I/O under a simulation) is progress still to
        // come: neither jump time past it nor call the simulation quiescent.
        if status.did_work || status.waiting {
            self.idle_steps = 0;
            return true;
        }
        self.idle_steps += 1;
        let idle_bound = 4 * self.cores.len() as u64;
        if self.idle_steps < idle_bound || self.cores.iter().any(|core| core.has_queued_work()) {
            return true;
        }
        self.jump_to_next_deadline()
    }

    fn jump_to_next_deadline(&mut self) -> bool {
        let now_ns = self.clock.get();
        let next = self
            .cores
            .iter()
            .filter_map(|core| core.next_deadline_ns())
            .min();
        match next {
            Some(deadline_ns) => {
                if deadline_ns > now_ns {
                    self.clock.set(deadline_ns);
                    self.sim.record(TraceEvent {
                        step: self.sim.step.get(),
                        now_ns: deadline_ns,
                        reactor: ReactorId(0),
                        kind: TraceKind::ClockJump,
                    });
                }
                self.idle_steps = 0;
                true
            }
            None => false,
        }
    }

    /// The events recorded so far.
    pub fn trace(&self) -> Vec<TraceEvent> {
        self.sim.trace.borrow().clone()
    }

    /// Channels alive now, across all devices and reactors.
    pub fn live_channels(&self) -> usize {
        self.shared.live_channels.load(Ordering::Acquire)
    }

    /// Stops every reactor (cancelling tasks and destroying channels in place) and reports
    /// what leaked.
    pub fn stop(mut self) -> StopReport {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> StopReport {
        if !self.stopped {
            self.stopped = true;
            for core in &self.cores {
                let _current = CurrentGuard::enter(core);
                core.shutdown();
            }
        }
        StopReport {
            leaked_channels: self.live_channels(),
            panicked: Vec::new(),
        }
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}
