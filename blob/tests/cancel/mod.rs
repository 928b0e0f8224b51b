//! Dropping a future at a chosen await point (included with `mod cancel;`): poll it `n` times
//! with a waker of our own, letting the reactor (and the simulation) run between polls, then
//! drop it; and a virtual-time timeout.

#![allow(dead_code)]

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

/// The waker handed to the future under test: records that it was woken and wakes the task
/// that drives the future.
#[derive(Default)]
struct Flag {
    woken: AtomicBool,
    driver: Mutex<Option<Waker>>,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        let driver = self
            .driver
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(waker) = driver {
            waker.wake();
        }
    }
}

/// What [`poll_then_drop`] saw.
#[derive(Debug)]
pub enum Polled<T> {
    /// The future completed within the polls allowed.
    Completed(T),
    /// It was dropped pending after this many polls.
    Dropped,
    /// It was never woken again after a poll (a lost wake-up): dropped after this many polls.
    Stuck(usize),
}

/// Polls `future` up to `polls` times, each poll after the previous one's wake (the reactor
/// runs everything else meanwhile), and drops it if it is still pending. A future that is not
/// woken within `patience` of virtual time after a poll counts as stuck.
pub async fn poll_then_drop<F: Future>(
    future: F,
    polls: usize,
    patience: Duration,
) -> Polled<F::Output> {
    let mut future = pin!(future);
    let flag = Arc::new(Flag::default());
    let waker = Waker::from(Arc::clone(&flag));
    for polled in 1..=polls {
        flag.woken.store(false, Ordering::Release);
        if let Poll::Ready(output) = future.as_mut().poll(&mut Context::from_waker(&waker)) {
            return Polled::Completed(output);
        }
        if polled == polls {
            break;
        }
        let woken = std::future::poll_fn(|cx| {
            *flag
                .driver
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(cx.waker().clone());
            if flag.woken.load(Ordering::Acquire) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        });
        if within(woken, patience).await.is_none() {
            return Polled::Stuck(polled);
        }
    }
    Polled::Dropped
}

/// `future`'s output, or `None` if it is still pending after `limit` of (virtual) time.
pub async fn within<F: Future>(future: F, limit: Duration) -> Option<F::Output> {
    let mut future = pin!(future);
    let mut timer = pin!(spool_reactor::sleep(limit));
    std::future::poll_fn(|cx| {
        if let Poll::Ready(output) = future.as_mut().poll(cx) {
            return Poll::Ready(Some(output));
        }
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}
