//! Single-reactor async primitives: a FIFO mutex (serialises a blob's metadata persists) and
//! a one-shot event (lets concurrent opens of a loading blob share its result). Neither is
//! `Send`; both live on the metadata reactor.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

/// A FIFO async mutex for one reactor.
#[derive(Default)]
pub(crate) struct LocalMutex {
    locked: Cell<bool>,
    waiters: RefCell<VecDeque<Waker>>,
}

/// Holding this means holding the lock; dropping it releases and wakes the next waiter.
pub(crate) struct LocalMutexGuard<'a> {
    mutex: &'a LocalMutex,
}

impl LocalMutex {
    /// Whether someone holds the lock now.
    pub(crate) fn is_locked(&self) -> bool {
        self.locked.get()
    }

    /// Waits for the lock.
    pub(crate) fn lock(&self) -> impl Future<Output = LocalMutexGuard<'_>> + '_ {
        std::future::poll_fn(move |cx: &mut Context<'_>| {
            if self.locked.get() {
                self.waiters.borrow_mut().push_back(cx.waker().clone());
                Poll::Pending
            } else {
                self.locked.set(true);
                Poll::Ready(LocalMutexGuard { mutex: self })
            }
        })
    }
}

impl Drop for LocalMutexGuard<'_> {
    fn drop(&mut self) {
        self.mutex.locked.set(false);
        // Wake every waiter; the first to run takes the lock, the others queue again.
        let waiters: Vec<Waker> = self.mutex.waiters.borrow_mut().drain(..).collect();
        for waker in waiters {
            waker.wake();
        }
    }
}

/// A value set once and awaited by any number of tasks.
pub(crate) struct LocalEvent<T: Clone> {
    value: RefCell<Option<T>>,
    waiters: RefCell<Vec<Waker>>,
}

impl<T: Clone> LocalEvent<T> {
    /// An unset event.
    pub(crate) fn new() -> Rc<LocalEvent<T>> {
        Rc::new(LocalEvent {
            value: RefCell::new(None),
            waiters: RefCell::new(Vec::new()),
        })
    }

    /// Sets the value and wakes every waiter.
    pub(crate) fn set(&self, value: T) {
        *self.value.borrow_mut() = Some(value);
        for waker in self.waiters.borrow_mut().drain(..) {
            waker.wake();
        }
    }

    /// Waits for the value.
    pub(crate) fn wait(self: &Rc<Self>) -> EventWait<T> {
        EventWait {
            event: Rc::clone(self),
        }
    }
}

/// The future of [`LocalEvent::wait`].
pub(crate) struct EventWait<T: Clone> {
    event: Rc<LocalEvent<T>>,
}

impl<T: Clone> Future for EventWait<T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        if let Some(value) = self.event.value.borrow().as_ref() {
            return Poll::Ready(value.clone());
        }
        self.event.waiters.borrow_mut().push(cx.waker().clone());
        Poll::Pending
    }
}

/// Wakes every waiter each time it is notified (waiters then re-check their condition):
/// a group commit's "a persist finished".
#[derive(Default)]
pub(crate) struct LocalNotify {
    generation: Cell<u64>,
    waiters: RefCell<Vec<Waker>>,
}

impl LocalNotify {
    /// Wakes everyone waiting now.
    pub(crate) fn notify(&self) {
        self.generation.set(self.generation.get() + 1);
        for waker in self.waiters.borrow_mut().drain(..) {
            waker.wake();
        }
    }

    /// Waits for the next notification.
    pub(crate) fn wait(&self) -> impl Future<Output = ()> + '_ {
        let seen = self.generation.get();
        std::future::poll_fn(move |cx: &mut Context<'_>| {
            if self.generation.get() != seen {
                Poll::Ready(())
            } else {
                self.waiters.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            }
        })
    }
}
