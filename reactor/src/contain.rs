//! The panic policy: a panic in code the reactor calls (a message closure, a `spawn_on`
//! constructor, a poller, a timer's waker, a task) is contained where it is called, logged
//! with `tracing::error` naming what panicked, and the reactor goes on. A daemon serving many
//! clients must not lose every connection on a reactor to one bad request. Containment happens
//! at the innermost call, where the reactor holds no borrow of its own state, so nothing is
//! left half-updated or borrowed; the panicking closure's own guards unwind as usual.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};

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
