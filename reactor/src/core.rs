//! The state of one reactor and one iteration of its loop.

use std::cell::{Cell, OnceCell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

use crate::clock::Clock;
use crate::limits::{MSG_BATCH_MAX, TASK_BATCH_MAX};
use crate::message::Message;
use crate::poller::PollerSet;
use crate::sim::{SimShared, TraceEvent, TraceKind};
use crate::task::TaskSet;
use crate::timer::TimerHeap;
use crate::wakeup::{Doorbell, WaitSet};

/// The index of a reactor in its runtime (0-based, dense). Reactor 0 is the first core given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReactorId(pub u32);

impl ReactorId {
    /// The id as an index into per-reactor tables.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for ReactorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Tasks ready to be polled on one reactor, in wake order.
#[derive(Default)]
pub(crate) struct RunQueue {
    queue: RefCell<VecDeque<async_task::Runnable<u64>>>,
}

impl RunQueue {
    #[inline]
    pub(crate) fn push(&self, runnable: async_task::Runnable<u64>) {
        self.queue.borrow_mut().push_back(runnable);
    }

    #[inline]
    fn pop(&self) -> Option<async_task::Runnable<u64>> {
        self.queue.borrow_mut().pop_front()
    }

    pub(crate) fn len(&self) -> usize {
        self.queue.borrow().len()
    }
}

/// The part of a reactor other threads may touch: its id, mailbox and pinned core.
pub(crate) struct ReactorRemote {
    pub(crate) id: ReactorId,
    pub(crate) sender: Sender<Message>,
    pub(crate) stopped: AtomicBool,
    /// Rung after a message is queued, when the reactor may sleep in the kernel (adaptive
    /// runtimes only).
    pub(crate) doorbell: Option<Arc<Doorbell>>,
    /// Set by every sender after it queued a message; the reactor clears it before it drains
    /// its mailbox. A pass with no mail costs one relaxed load instead of a channel poll.
    pub(crate) mail: Arc<AtomicBool>,
}

impl ReactorRemote {
    /// Queues `message`; rings the doorbell if the reactor may be asleep. Gives the message
    /// back if the reactor's mailbox is gone.
    #[inline]
    pub(crate) fn post(&self, message: Message) -> Result<(), Message> {
        self.sender.send(message).map_err(|err| err.0)?;
        self.mail.store(true, Ordering::Release);
        if let Some(doorbell) = &self.doorbell {
            doorbell.ring_if_sleeping();
        }
        Ok(())
    }
}

/// State shared by every reactor of one runtime or simulation.
pub(crate) struct Shared {
    /// Unique per runtime or simulation in this process: io devices are process-wide, so
    /// their channel holders are keyed by (runtime, reactor).
    pub(crate) runtime_id: u64,
    pub(crate) reactors: Vec<ReactorRemote>,
    /// Channels alive across all devices; a clean stop brings it to zero.
    pub(crate) live_channels: AtomicUsize,
}

impl Shared {
    pub(crate) fn new(reactors: Vec<ReactorRemote>) -> Shared {
        static NEXT_RUNTIME_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Shared {
            runtime_id: NEXT_RUNTIME_ID.fetch_add(1, Ordering::Relaxed),
            reactors,
            live_channels: AtomicUsize::new(0),
        }
    }

    pub(crate) fn remote(&self, id: ReactorId) -> Result<&ReactorRemote, crate::ReactorError> {
        self.reactors
            .get(id.index())
            .ok_or(crate::ReactorError::NoSuchReactor(id))
    }

    /// Queues a message for reactor `id`; fails if it has stopped.
    pub(crate) fn send(&self, id: ReactorId, message: Message) -> Result<(), crate::ReactorError> {
        let remote = self.remote(id)?;
        if remote.stopped.load(Ordering::Acquire) {
            return Err(crate::ReactorError::Stopped(id));
        }
        remote
            .post(message)
            .map_err(|_| crate::ReactorError::Stopped(id))
    }
}

/// The time of one loop pass, read from the reactor's clock at its first use in the pass (if
/// any), then the same for the rest of the pass.
#[derive(Default)]
pub(crate) struct LazyNow(Cell<Option<u64>>);

impl LazyNow {
    /// The pass's time, reading `core`'s clock the first time.
    #[inline]
    pub(crate) fn get(&self, core: &ReactorCore) -> u64 {
        match self.0.get() {
            Some(now_ns) => now_ns,
            None => {
                let now_ns = core.clock.now_ns();
                self.0.set(Some(now_ns));
                now_ns
            }
        }
    }
}

/// What one loop iteration found.
#[derive(Debug, Clone, Copy)]
pub(crate) struct IterationStatus {
    /// Something ran: a message, a task, a timer, or a poller that reported work.
    pub(crate) did_work: bool,
    /// A poller has work outstanding in the kernel (I/O in flight).
    pub(crate) waiting: bool,
    /// Some of that work has no wake source: the reactor must not sleep in the kernel.
    pub(crate) unwakeable: bool,
}

/// Everything one reactor owns. Lives on its thread (or the simulation thread) only.
pub(crate) struct ReactorCore {
    pub(crate) id: ReactorId,
    pub(crate) shared: Arc<Shared>,
    pub(crate) clock: Clock,
    pub(crate) run_queue: Rc<RunQueue>,
    pub(crate) mailbox: Receiver<Message>,
    /// This reactor's [`ReactorRemote::mail`] flag.
    mail: Arc<AtomicBool>,
    pub(crate) tasks: TaskSet,
    pub(crate) pollers: PollerSet,
    pub(crate) timers: TimerHeap,
    /// io device id -> this reactor's channel context (weak: the users hold it).
    pub(crate) channels: RefCell<HashMap<u64, Weak<dyn std::any::Any>>>,
    /// Earliest deadline a device hinted at this iteration (see [`crate::wake_at`]).
    pub(crate) deadline_hint_ns: Cell<Option<u64>>,
    pub(crate) stopping: Cell<bool>,
    pub(crate) sim: Option<Rc<SimShared>>,
    pub(crate) self_weak: RefCell<Weak<ReactorCore>>,
    /// The epoll set an adaptive reactor sleeps on (unset for other reactors).
    pub(crate) wait_set: OnceCell<WaitSet>,
}

impl ReactorCore {
    pub(crate) fn new(
        id: ReactorId,
        shared: Arc<Shared>,
        clock: Clock,
        mailbox: Receiver<Message>,
        sim: Option<Rc<SimShared>>,
    ) -> Rc<ReactorCore> {
        let mail = Arc::clone(&shared.reactors[id.index()].mail);
        let core = Rc::new(ReactorCore {
            id,
            shared,
            mail,
            clock,
            run_queue: Rc::new(RunQueue::default()),
            mailbox,
            tasks: TaskSet::default(),
            pollers: PollerSet::default(),
            timers: TimerHeap::default(),
            channels: RefCell::new(HashMap::new()),
            deadline_hint_ns: Cell::new(None),
            stopping: Cell::new(false),
            sim,
            self_weak: RefCell::new(Weak::new()),
            wait_set: OnceCell::new(),
        });
        *core.self_weak.borrow_mut() = Rc::downgrade(&core);
        crate::context::run_queue_install(core.shared.runtime_id, id, Rc::clone(&core.run_queue));
        core
    }

    /// Records a trace event when simulated.
    pub(crate) fn trace_event(&self, kind: TraceKind) {
        if let Some(sim) = &self.sim {
            sim.record(TraceEvent {
                step: sim.step.get(),
                now_ns: self.clock.now_ns(),
                reactor: self.id,
                kind,
            });
        }
    }

    /// True when messages or runnable tasks are waiting.
    pub(crate) fn has_queued_work(&self) -> bool {
        self.run_queue.len() > 0 || !self.mailbox.is_empty()
    }

    /// One iteration: messages, active pollers, due timed pollers, due timers, runnable tasks.
    /// The caller has made this reactor current. Returns true when something ran (a message,
    /// a task, a timer, or a poller that reported work).
    /// One iteration: messages, active pollers, due timed pollers, due timers, runnable tasks.
    /// The caller has made this reactor current. Says whether something ran (a message, a
    /// task, a timer, or a poller that reported work) and whether a poller waits on the kernel.
    #[inline]
    pub(crate) fn poll_once(&self) -> IterationStatus {
        let mut did_work = self.poll_messages();
        // The clock is read once per pass, and only if something timed is registered (a
        // timed poller, a timer): on this VM a TSC read is about 10 % of a null qd 1 I/O.
        let now = LazyNow::default();
        // Devices renew their wake-up hints as they poll; a hint stays until then, so a
        // simulation jumping to another reactor's deadline cannot lose this one's.
        self.deadline_hint_ns.set(None);
        let pollers = self.pollers.poll(self, &now);
        did_work |= pollers.busy;
        did_work |= self.timers.fire_due(self, &now);
        did_work |= self.run_tasks();
        IterationStatus {
            did_work,
            waiting: pollers.waiting,
            unwakeable: pollers.unwakeable,
        }
    }

    /// The earliest time something is known to become due: timers, timed pollers, and the
    /// hints devices left with [`crate::wake_at`]. A hint stays until this reactor polls
    /// again (its devices renew it there), so a simulation that jumps to another reactor's
    /// earlier deadline does not forget this one's.
    pub(crate) fn next_deadline_ns(&self) -> Option<u64> {
        let hint = self.deadline_hint_ns.get();
        [
            self.timers.next_deadline_ns(),
            self.pollers.next_deadline_ns(),
            hint,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Handles up to [`MSG_BATCH_MAX`] messages. Senders raise the mail flag after queueing, so
    /// a pass with an empty mailbox only loads the flag; the flag is cleared before the
    /// mailbox is drained (a message queued meanwhile raises it again) and raised again when
    /// the batch bound leaves messages queued, so none waits longer than it did before.
    #[inline]
    fn poll_messages(&self) -> bool {
        // The swap (not a store) reads the latest raise: a sender whose raise it overwrites
        // has its message visible to the drain below (Release in `post`, Acquire here).
        if !self.mail.load(Ordering::Relaxed) || !self.mail.swap(false, Ordering::Acquire) {
            return false;
        }
        let mut handled = 0;
        while handled < MSG_BATCH_MAX {
            let Ok(message) = self.mailbox.try_recv() else {
                return handled > 0;
            };
            handled += 1;
            self.handle_message(message);
        }
        self.mail.store(true, Ordering::Relaxed);
        true
    }

    pub(crate) fn handle_message(&self, message: Message) {
        match message {
            Message::Run(run) => {
                self.trace_event(TraceKind::Message);
                crate::contain::contain(self, "message", "", run);
            }
            Message::Wake(runnable) => self.run_queue.push(runnable),
            Message::Stop => self.stopping.set(true),
        }
    }

    fn run_tasks(&self) -> bool {
        let batch = self.run_queue.len().min(TASK_BATCH_MAX);
        for _ in 0..batch {
            let Some(runnable) = self.run_queue.pop() else {
                break;
            };
            if self.sim.is_some() {
                self.trace_event(TraceKind::TaskRun(*runnable.metadata()));
            }
            runnable.run();
        }
        self.tasks.reap_finished();
        batch > 0
    }

    /// Cancels every task, drops pollers and timers, and forgets channels: the stop path. Runs
    /// on the reactor's own thread with it current, so futures drop where they were made.
    pub(crate) fn shutdown(&self) {
        self.stopping.set(true);
        if let Ok(remote) = self.shared.remote(self.id) {
            remote.stopped.store(true, Ordering::Release);
        }
        // Cancelling a task drops its future when its runnable runs; dropping futures,
        // pollers or messages can wake (or, in a destructor, spawn) more tasks, so repeat
        // until a round finds nothing left. Each round only drops things, so it ends.
        for round in 0..crate::limits::STOP_DRAIN_ROUNDS_MAX {
            self.tasks.cancel_all();
            while let Some(runnable) = self.run_queue.pop() {
                runnable.run();
            }
            self.tasks.reap_finished();
            if round == 0 {
                self.pollers.clear();
                self.timers.clear();
            }
            // Messages that raced with the stop: wakes are run (their tasks are cancelled),
            // closures are dropped here, on the owner.
            while let Ok(message) = self.mailbox.try_recv() {
                match message {
                    Message::Wake(runnable) => self.run_queue.push(runnable),
                    Message::Run(_) | Message::Stop => {}
                }
            }
            if self.run_queue.len() == 0 && self.tasks.count() == 0 {
                break;
            }
        }
        self.channels.borrow_mut().clear();
        crate::context::run_queue_remove(self.id);
    }
}
