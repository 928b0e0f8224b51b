//! The panic policy: a panic in code the reactor calls (a message closure, a `spawn_on`
//! constructor, a poller, a timer's waker, a task) is contained where it is called, logged
//! with `tracing::error` naming what panicked, and the reactor goes on. A daemon serving many
//! clients must not lose every connection on a reactor to one bad request. Containment happens
//! at the innermost call, where the reactor holds no borrow of its own state, so nothing is
//! left half-updated or borrowed; the panicking closure's own guards unwind as usual.

use std::any::Any;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::core::ReactorCore;
use crate::sim::TraceKind;

/// Runs `f`; if it panics, logs and traces the panic as `what` (`name` says which one, when
/// there are several, e.g. a poller's name) and returns `None`.
#[inline]
pub(crate) fn contain<R>(
    core: &ReactorCore,
    what: &'static str,
    name: &str,
    f: impl FnOnce() -> R,
) -> Option<R> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(value) => Some(value),
        Err(payload) => {
            report(core, what, name, payload.as_ref());
            drop_payload(payload);
            None
        }
    }
}

/// Logs a contained panic, and records it in a simulation's trace.
pub(crate) fn report(core: &ReactorCore, what: &'static str, name: &str, payload: &dyn Any) {
    tracing::error!(
        reactor = core.id.0,
        what,
        which = name,
        panic = panic_message(payload),
        "a {what} panicked on reactor {}; the panic is contained and the reactor goes on",
        core.id
    );
    core.trace_event(TraceKind::Panic(what));
}

/// The text of a panic payload (`panic!` gives a `&str` or a `String`).
pub(crate) fn panic_message(payload: &dyn Any) -> &str {
    if let Some(text) = payload.downcast_ref::<&'static str>() {
        text
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text
    } else {
        "(a panic payload that is not a string)"
    }
}

/// Drops a panic payload; a payload whose destructor panics too is leaked instead.
fn drop_payload(payload: Box<dyn Any + Send>) {
    if let Err(again) = catch_unwind(AssertUnwindSafe(move || drop(payload))) {
        std::mem::forget(again);
    }
}

pin_project_lite::pin_project! {
    /// A task's future, whose destructor is contained like its `poll`: async-task drops a
    /// cancelled (or finished, or panicked) task's future inside `abort_on_panic`, so a
    /// destructor that panicked there would abort the process. The panic is logged and
    /// traced as `task drop` and the reactor goes on; the future's remaining fields are still
    /// dropped as Rust unwinds through its drop glue.
    pub(crate) struct DropContained<F> {
        #[pin]
        inner: Option<F>,
    }

    impl<F> PinnedDrop for DropContained<F> {
        fn drop(this: Pin<&mut Self>) {
            let mut inner = this.project().inner;
            // `Pin::set` drops the future in place (allowed for a pinned value); if its drop
            // panics, the slot still ends up `None`, so nothing is dropped twice.
            if let Err(payload) = catch_unwind(AssertUnwindSafe(|| inner.set(None))) {
                let reported = crate::context::with_current(|core| {
                    report(core, "task drop", "", payload.as_ref());
                });
                if reported.is_none() {
                    tracing::error!(
                        panic = panic_message(payload.as_ref()),
                        "a task's future panicked while being dropped off its reactor; contained"
                    );
                }
                drop_payload(payload);
            }
        }
    }
}

impl<F> DropContained<F> {
    /// Wraps `future`.
    pub(crate) fn new(future: F) -> DropContained<F> {
        DropContained {
            inner: Some(future),
        }
    }
}

impl<F: Future> Future for DropContained<F> {
    type Output = F::Output;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        match self.project().inner.as_pin_mut() {
            Some(future) => future.poll(cx),
            // Only after the drop above began; async-task never polls then.
            None => Poll::Pending,
        }
    }
}
