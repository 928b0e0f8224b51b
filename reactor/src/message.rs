//! Messages between reactors: run a closure there, spawn a future there, or run a closure on
//! every reactor with one completion. Order is kept per sender (one FIFO queue per reactor).

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::context;
use crate::core::{ReactorId, Shared};
use crate::oneshot::{oneshot, OneshotSender, RemoteHandle};
use crate::ReactorError;

/// What travels in a reactor's queue.
pub(crate) enum Message {
    /// Run this closure on the receiving reactor.
    Run(Box<dyn FnOnce() + Send>),
    /// A task of the receiving reactor was woken on another thread.
    Wake(async_task::Runnable<u64>),
    /// Stop the loop.
    Stop,
}

/// Runs `run` on reactor `target` in a later loop pass. Messages from one sender to one
/// target run in the order sent. Callable on a reactor (use [`crate::Runtime::send_msg`] or
/// [`crate::Sim::send_msg`] from elsewhere).
pub fn send_msg(
    target: ReactorId,
    run: impl FnOnce() + Send + 'static,
) -> Result<(), ReactorError> {
    // Borrow the current reactor's shared state: no refcount traffic per message.
    context::with_current(|core| core.shared.send(target, Message::Run(Box::new(run))))
        .unwrap_or(Err(ReactorError::NotOnReactor))
}

/// Builds a future on reactor `target` (so it may hold that reactor's `!Send` state), spawns
/// it there, and returns a handle to its output, awaitable from any reactor.
pub fn spawn_on<F, Fut, T>(target: ReactorId, make: F) -> Result<RemoteHandle<T>, ReactorError>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
    T: Send + 'static,
{
    let shared = context::current()?.shared.clone();
    spawn_on_shared(&shared, target, make)
}

pub(crate) fn spawn_on_shared<F, Fut, T>(
    shared: &Arc<Shared>,
    target: ReactorId,
    make: F,
) -> Result<RemoteHandle<T>, ReactorError>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
    T: Send + 'static,
{
    let (sender, handle) = oneshot();
    let run = move || {
        let Ok(core) = context::current() else {
            return;
        };
        match crate::contain::contain(&core, "spawn_on constructor", "", make) {
            Some(future) => {
                crate::task::spawn_on_core(&core, async move {
                    sender.send(future.await);
                });
            }
            None => sender.fail(ReactorError::Panicked(core.id)),
        }
    };
    shared.send(target, Message::Run(Box::new(run)))?;
    Ok(handle)
}

/// Runs `run` once on every reactor (each in its own loop); the handle completes when all
/// have run it.
pub fn broadcast(
    run: impl Fn(ReactorId) + Send + Sync + 'static,
) -> Result<RemoteHandle<()>, ReactorError> {
    let shared = context::current()?.shared.clone();
    broadcast_shared(&shared, run)
}

pub(crate) fn broadcast_shared(
    shared: &Arc<Shared>,
    run: impl Fn(ReactorId) + Send + Sync + 'static,
) -> Result<RemoteHandle<()>, ReactorError> {
    struct Broadcast<F> {
        run: F,
        left: AtomicUsize,
        done: Mutex<Option<OneshotSender<()>>>,
    }
    let (sender, handle) = oneshot();
    let reactors: Vec<ReactorId> = shared.reactors.iter().map(|remote| remote.id).collect();
    let state = Arc::new(Broadcast {
        run,
        left: AtomicUsize::new(reactors.len()),
        done: Mutex::new(Some(sender)),
    });
    for id in reactors {
        let state = Arc::clone(&state);
        shared.send(
            id,
            Message::Run(Box::new(move || {
                (state.run)(id);
                if state.left.fetch_sub(1, Ordering::AcqRel) == 1 {
                    let done = state
                        .done
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .take();
                    if let Some(done) = done {
                        done.send(());
                    }
                }
            })),
        )?;
    }
    Ok(handle)
}
