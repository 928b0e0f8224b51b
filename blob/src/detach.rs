//! Work that finishes whatever its caller does (the cancellation rule in
//! docs/architecture.md): a metadata operation, a persist, a thin allocation runs as its own
//! task on the calling reactor, and the caller's future only waits for its result. Dropping
//! that future detaches the task; it runs to completion (its guards are never dropped half-way
//! by a client that went away), and a result nobody takes is handed to a clean-up (an opened
//! blob is closed again).

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use spool_reactor::{JoinHandle, ReactorError};

use crate::error::{BlobError, Result};

/// The future of [`detached`]: the task's result. Dropping it does not cancel the task.
pub(crate) struct Detached<T: 'static> {
    handle: Option<JoinHandle<Option<Result<T>>>>,
    abandoned: Rc<Cell<bool>>,
    cleanup: fn(Result<T>),
}

/// Spawns `work` on the calling reactor and returns a future of its result. If that future is
/// dropped before the result was taken, `cleanup` gets the result (when the task finishes).
pub(crate) fn detached<T: 'static>(
    work: impl Future<Output = Result<T>> + 'static,
    cleanup: fn(Result<T>),
) -> Detached<T> {
    detached_keeping((), work, cleanup)
}

/// [`detached`], with `keep` held by the task until the work and its clean-up are done.
fn detached_keeping<T: 'static, K: 'static>(
    keep: K,
    work: impl Future<Output = Result<T>> + 'static,
    cleanup: fn(Result<T>),
) -> Detached<T> {
    let abandoned = Rc::new(Cell::new(false));
    if !spool_reactor::in_reactor() {
        // No executor to run it on: report it (the caller's thread check would have).
        return Detached {
            handle: None,
            abandoned,
            cleanup,
        };
    }
    let seen = Rc::clone(&abandoned);
    let handle = spool_reactor::spawn_local(async move {
        let result = work.await;
        let output = if seen.get() {
            cleanup(result);
            None
        } else {
            Some(result)
        };
        drop(keep);
        output
    });
    Detached {
        handle: Some(handle),
        abandoned,
        cleanup,
    }
}

/// [`detached`] for a metadata operation of a store: `running` (its count in the store's
/// running operations) is held by the task until the work and its clean-up are done (a
/// clean-up's own follow-up, such as `close_unclaimed`'s close, is counted before this one
/// ends), so `unload` waits for it even after its caller dropped the returned future.
pub(crate) fn detached_op<T: 'static>(
    running: crate::store::MdOpRunning,
    work: impl Future<Output = Result<T>> + 'static,
    cleanup: fn(Result<T>),
) -> Detached<T> {
    detached_keeping(running, work, cleanup)
}

/// A clean-up for results that need none.
pub(crate) fn forget<T>(_: Result<T>) {}

/// A clean-up for an opened blob nobody waits for: close it again.
pub(crate) fn close_unclaimed(result: Result<crate::Blob>) {
    if let Ok(blob) = result {
        let id = blob.id();
        if !spool_reactor::in_reactor() {
            // Dropped off any reactor (its reactor stopped): nothing can close it now.
            tracing::warn!(
                blob = format!("{id:#x}"),
                "an opened blob nobody took stays open"
            );
            return;
        }
        // Counted as a running metadata operation from now on, so an unload waiting for the
        // open waits for this close too.
        let running = blob.store.md_op_running();
        spool_reactor::spawn_local(async move {
            let _running = running;
            if let Err(err) = blob.close().await {
                tracing::warn!(blob = format!("{id:#x}"), %err, "closing a blob whose opener went away");
            }
        });
    }
}

impl<T: 'static> Future for Detached<T> {
    type Output = Result<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        let this = self.get_mut();
        let Some(handle) = this.handle.as_mut() else {
            return Poll::Ready(Err(BlobError::Reactor(ReactorError::NotOnReactor)));
        };
        match Pin::new(handle).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(output) => {
                this.handle = None;
                Poll::Ready(match output {
                    Ok(Some(result)) => result,
                    Ok(None) => Err(BlobError::Reactor(ReactorError::Cancelled)),
                    Err(err) => Err(BlobError::Reactor(err)),
                })
            }
        }
    }
}

impl<T: 'static> Drop for Detached<T> {
    fn drop(&mut self) {
        let Some(mut handle) = self.handle.take() else {
            return;
        };
        self.abandoned.set(true);
        // Finished but not taken: the result is here now; otherwise the task cleans up.
        if handle.is_finished() {
            let mut cx = Context::from_waker(Waker::noop());
            if let Poll::Ready(Ok(Some(result))) = Pin::new(&mut handle).poll(&mut cx) {
                (self.cleanup)(result);
            }
        }
    }
}
