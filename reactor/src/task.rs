//! Spawning futures on a reactor's executor, and awaiting their results.
//!
//! Tasks are `async_task` tasks (the executor core smol and glommio build on): one allocation
//! per spawn, none per wake. A wake on the owning thread pushes onto the reactor's run queue;
//! a wake from another thread travels as a message, so a task is only ever polled, and its
//! future only ever dropped, on the reactor that spawned it.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use crate::contain::DropContained;
use crate::context;
use crate::core::{ReactorCore, ReactorId};
use crate::message::Message;
use crate::ReactorError;

/// The live tasks of one reactor, so a stop can cancel them on their own thread.
#[derive(Default)]
pub(crate) struct TaskSet {
    live: RefCell<slab::Slab<async_task::Task<(), u64>>>,
    finished: Rc<RefCell<Vec<usize>>>,
}

impl TaskSet {
    /// Drops the handles of tasks that finished since the last call. Inlined check, so a pass
    /// where no task finished (nearly all) makes no call.
    #[inline]
    pub(crate) fn reap_finished(&self) {
        if !self.finished.borrow().is_empty() {
            self.reap_finished_slow();
        }
    }

    #[cold]
    fn reap_finished_slow(&self) {
        let mut finished = self.finished.borrow_mut();
        if finished.is_empty() {
            return;
        }
        let done: Vec<_> = {
            let mut live = self.live.borrow_mut();
            finished
                .drain(..)
                .filter_map(|key| live.try_remove(key))
                .collect()
        };
        drop(finished);
        // Dropped outside the tables' borrows; a panicked task's payload is dropped here too,
        // and a payload whose own drop panics is contained (its second payload is leaked).
        for task in done {
            if let Err(payload) =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(task)))
            {
                tracing::error!("dropping a finished task's panic payload panicked; contained");
                std::mem::forget(payload);
            }
        }
    }

    /// Cancels every live task; their futures drop when the run queue is drained.
    pub(crate) fn cancel_all(&self) {
        let tasks: Vec<_> = self.live.borrow_mut().drain().collect();
        drop(tasks);
    }

    /// How many tasks are alive.
    pub(crate) fn count(&self) -> usize {
        self.live.borrow().len()
    }
}

/// Where a task's result goes, and who waits for it.
struct JoinState<T> {
    value: RefCell<Option<T>>,
    done: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl<T> JoinState<T> {
    fn finish(&self, value: Option<T>) {
        *self.value.borrow_mut() = value;
        self.done.set(true);
        if let Some(waker) = self.waker.borrow_mut().take() {
            waker.wake();
        }
    }
}

/// Marks the join state done (without a value) if the task's future is dropped before it
/// completes: a cancel at stop, or a panic inside the task.
struct CancelGuard<T> {
    state: Rc<JoinState<T>>,
    finished: Rc<RefCell<Vec<usize>>>,
    key: usize,
    armed: bool,
}

impl<T> Drop for CancelGuard<T> {
    fn drop(&mut self) {
        if self.armed {
            if std::thread::panicking() {
                tracing::error!("a reactor task panicked; it is cancelled and the reactor goes on");
                context::with_current(|core| {
                    core.trace_event(crate::sim::TraceKind::Panic("task"))
                });
            }
            self.state.finish(None);
            // A panicked task leaves the live table like a finished one (a cancelled one is
            // already out of it; removing it again is a no-op).
            self.finished.borrow_mut().push(self.key);
        }
    }
}

/// The result of a task spawned on this reactor. Dropping it detaches the task (it runs on).
pub struct JoinHandle<T> {
    state: Rc<JoinState<T>>,
}

impl<T> JoinHandle<T> {
    /// True once the task has completed or was cancelled.
    pub fn is_finished(&self) -> bool {
        self.state.done.get()
    }
}

impl<T> Future for JoinHandle<T> {
    type Output = Result<T, ReactorError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.state.done.get() {
            return Poll::Ready(
                self.state
                    .value
                    .borrow_mut()
                    .take()
                    .ok_or(ReactorError::Cancelled),
            );
        }
        let mut waker = self.state.waker.borrow_mut();
        match waker.as_ref() {
            Some(current) if current.will_wake(cx.waker()) => {}
            _ => *waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

/// Spawns `future` on the calling reactor. It is first polled on a later pass of the loop.
///
/// # Panics
/// Off a reactor (a programming error: there is no executor to run it on).
pub fn spawn_local<F>(future: F) -> JoinHandle<F::Output>
where
    F: Future + 'static,
    F::Output: 'static,
{
    let core = context::current().expect("spawn_local called off a reactor");
    spawn_on_core(&core, future)
}

pub(crate) fn spawn_on_core<F>(core: &ReactorCore, future: F) -> JoinHandle<F::Output>
where
    F: Future + 'static,
    F::Output: 'static,
{
    let state = Rc::new(JoinState {
        value: RefCell::new(None),
        done: Cell::new(false),
        waker: RefCell::new(None),
    });
    let mut live = core.tasks.live.borrow_mut();
    let entry = live.vacant_entry();
    let key = entry.key();
    let finished = Rc::clone(&core.tasks.finished);
    let task_state = Rc::clone(&state);
    let wrapped = async move {
        let mut guard = CancelGuard {
            state: task_state,
            finished,
            key,
            armed: true,
        };
        let value = future.await;
        guard.armed = false;
        guard.state.finish(Some(value));
        guard.finished.borrow_mut().push(key);
    };
    let schedule = wake_router(core);
    let (runnable, task) = async_task::Builder::new()
        .metadata(key as u64)
        .propagate_panic(true)
        .spawn_local(move |_| DropContained::new(wrapped), schedule);
    entry.insert(task);
    drop(live);
    runnable.schedule();
    JoinHandle { state }
}

/// The schedule function of a task owned by `core`: push locally, or send it home.
fn wake_router(core: &ReactorCore) -> impl Fn(async_task::Runnable<u64>) + Send + Sync + 'static {
    let owner: ReactorId = core.id;
    let runtime_id = core.shared.runtime_id;
    let remote = &core.shared.reactors[owner.index()];
    let sender = remote.sender.clone();
    let doorbell = remote.doorbell.clone();
    let mail = Arc::clone(&remote.mail);
    move |runnable| {
        if let Err(runnable) = context::run_queue_push(runtime_id, owner, runnable) {
            // A wake from another thread: the task must run (and drop) on its owner. If the
            // owner has stopped, its tasks were cancelled and their futures already dropped.
            match sender.send(Message::Wake(runnable)) {
                Ok(()) => {
                    mail.store(true, Ordering::Release);
                    if let Some(doorbell) = &doorbell {
                        doorbell.ring_if_sleeping();
                    }
                }
                Err(crossbeam_channel::SendError(Message::Wake(runnable))) => {
                    std::mem::forget(runnable);
                }
                Err(_) => {}
            }
        }
    }
}

/// Yields once: the task goes to the back of the run queue and is polled on the next pass.
pub fn yield_now() -> impl Future<Output = ()> {
    YieldNow { yielded: false }
}

struct YieldNow {
    yielded: bool,
}

impl Future for YieldNow {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.yielded {
            return Poll::Ready(());
        }
        self.yielded = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}
