//! A one-value channel between reactors (and from reactors to outside threads), awaitable on
//! a reactor and waitable off one. Used on control paths (messages, walks), never per I/O.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use crate::ReactorError;

struct State<T> {
    value: Option<T>,
    sender_gone: bool,
    /// Why the sender went without sending, when it was not a plain cancel.
    failure: Option<ReactorError>,
    waker: Option<Waker>,
}

impl<T> State<T> {
    /// What the receiver gets once the sender went without a value.
    fn gone_error(&self) -> ReactorError {
        self.failure.clone().unwrap_or(ReactorError::Cancelled)
    }
}

struct Inner<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
}

impl<T> Inner<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A poisoned lock means a panic while holding it; the state is still consistent (every
        // critical section only moves one field), so keep going.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The sending half: `send` once; dropping it unsent tells the receiver the work was cancelled.
pub(crate) struct OneshotSender<T> {
    inner: Option<Arc<Inner<T>>>,
}

impl<T> OneshotSender<T> {
    /// Drops the sender without a value, telling the receiver `err` instead of `Cancelled`.
    pub(crate) fn fail(mut self, err: ReactorError) {
        if let Some(inner) = self.inner.take() {
            inner.lock().failure = Some(err);
            drop(OneshotSender { inner: Some(inner) });
        }
    }

    pub(crate) fn send(mut self, value: T) {
        if let Some(inner) = self.inner.take() {
            let waker = {
                let mut state = inner.lock();
                state.value = Some(value);
                state.waker.take()
            };
            inner.ready.notify_all();
            if let Some(waker) = waker {
                waker.wake();
            }
        }
    }
}

impl<T> Drop for OneshotSender<T> {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            // Dropped by a panic on a reactor (the task or visit that was to send panicked):
            // say so, rather than a plain cancel.
            let panicked_on = std::thread::panicking()
                .then(crate::context::reactor_id)
                .and_then(Result::ok);
            let waker = {
                let mut state = inner.lock();
                state.sender_gone = true;
                if let (None, Some(reactor)) = (&state.failure, panicked_on) {
                    state.failure = Some(ReactorError::Panicked(reactor));
                }
                state.waker.take()
            };
            inner.ready.notify_all();
            if let Some(waker) = waker {
                waker.wake();
            }
        }
    }
}

/// The result of work sent to a reactor: `.await` it on a reactor, or [`RemoteHandle::wait`]
/// for it on an ordinary thread. Yields `Err(Cancelled)` if the work was dropped unfinished,
/// `Err(Panicked)` if it panicked (the panic contained on its reactor).
pub struct RemoteHandle<T> {
    inner: Arc<Inner<T>>,
}

pub(crate) fn oneshot<T>() -> (OneshotSender<T>, RemoteHandle<T>) {
    let inner = Arc::new(Inner {
        state: Mutex::new(State {
            value: None,
            sender_gone: false,
            failure: None,
            waker: None,
        }),
        ready: Condvar::new(),
    });
    (
        OneshotSender {
            inner: Some(Arc::clone(&inner)),
        },
        RemoteHandle { inner },
    )
}

impl<T> RemoteHandle<T> {
    /// Takes the result if it is there: `None` while the work is still running.
    pub fn try_take(&self) -> Option<Result<T, ReactorError>> {
        let mut state = self.inner.lock();
        match state.value.take() {
            Some(value) => Some(Ok(value)),
            None if state.sender_gone => Some(Err(state.gone_error())),
            None => None,
        }
    }

    /// Blocks this (non-reactor) thread until the result arrives. Never call it on a reactor:
    /// it would stall that reactor's loop.
    pub fn wait(self) -> Result<T, ReactorError> {
        let mut state = self.inner.lock();
        loop {
            if let Some(value) = state.value.take() {
                return Ok(value);
            }
            if state.sender_gone {
                return Err(state.gone_error());
            }
            state = self
                .inner
                .ready
                .wait(state)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// Like [`RemoteHandle::wait`], giving up after `timeout` (`None` then).
    pub fn wait_timeout(self, timeout: Duration) -> Option<Result<T, ReactorError>> {
        let deadline = std::time::Instant::now() + timeout;
        let mut state = self.inner.lock();
        loop {
            if let Some(value) = state.value.take() {
                return Some(Ok(value));
            }
            if state.sender_gone {
                return Some(Err(state.gone_error()));
            }
            let left = deadline.checked_duration_since(std::time::Instant::now())?;
            state = self
                .inner
                .ready
                .wait_timeout(state, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }
}

impl<T> Future for RemoteHandle<T> {
    type Output = Result<T, ReactorError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.inner.lock();
        if let Some(value) = state.value.take() {
            return Poll::Ready(Ok(value));
        }
        if state.sender_gone {
            return Poll::Ready(Err(state.gone_error()));
        }
        match &state.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => state.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}
