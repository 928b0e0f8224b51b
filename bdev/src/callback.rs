//! Completion callbacks: a request whose completion calls the submitter's code directly from
//! the poller that completed it, as SPDK's `spdk_bdev_read(.., cb, cb_arg)` does, instead of
//! waking a task that then polls an [`IoFuture`](crate::IoFuture).
//!
//! Made with [`BdevChannel::read_with`](crate::BdevChannel::read_with) and
//! [`BdevChannel::write_with`](crate::BdevChannel::write_with). The request takes the same
//! path as a future's (validation, a pooled slot, the backend's `submit`, the backend's
//! completion, which only queues it), and differs only at the end: where a waiter's waker
//! would run, the poller (`IoSlots::wake_completed`, with no borrow of the table, the backend
//! or an io_uring group held) frees the slot and calls [`IoCallback::io_done`] with the status
//! and the buffer. Per I/O that saves the task wake, the run-queue push and pop and the
//! task's poll.
//!
//! Guarantees, as for futures (see `docs/bdev.md`):
//! - the buffer comes back only after the device completed the request (the slot is freed
//!   in the same step), never while a device may still read or write it;
//! - the callback is called exactly once for a request `read_with`/`write_with` accepted
//!   (returned `Ok`), never from inside that call (an immediate failure, such as `-EBUSY`
//!   from a nested submit, is delivered by the poller too), and never for a refused one
//!   (the error and the buffer come back from the call instead);
//! - a channel dropped with requests in flight still calls each callback once: its backend
//!   completes what it holds (`-ECANCELED` for the memory devices; io_uring requests in the
//!   kernel complete as their CQEs are reaped) and, when the table itself goes, every
//!   callback not yet called is called with its status, or `-ECANCELED` if the device never
//!   completed it (no device can hold the buffer then: a backend holds the table alive);
//! - a panic in a callback is contained around that call and logged with `tracing::error`;
//!   the poller and the other callbacks go on (the reactor's panic policy,
//!   docs/architecture.md);
//! - a request a callback makes that completes at once (its backend fails it inside
//!   `submit`) is called back on the next poller pass, so a callback retrying it cannot hold
//!   the reactor.
//!
//! A callback keeps what it captures alive while its request is in flight: one that holds
//! its own channel (to submit the next request) keeps the channel open until its requests
//! are done, as SPDK's cb_arg does.

use std::rc::Rc;

use crate::dma::DmaBuf;
use crate::error::BdevError;
use crate::io::IoKind;

/// What a callback request hands back: its status, its buffer and the caller's tag. Small on
/// purpose (it is built and moved once per I/O): the typed error is made on demand by
/// [`IoDone::result`].
#[derive(Debug)]
pub struct IoDone {
    /// The request's buffer, no longer used by the device.
    pub buf: DmaBuf,
    /// The tag given at submission (the caller's own: which of its requests this is).
    pub tag: u64,
    status: i32,
    kind: IoKind,
}

impl IoDone {
    /// `Ok`, or the device's error (`BdevError::Io` with its negative errno).
    #[inline]
    pub fn result(&self) -> Result<(), BdevError> {
        if self.status < 0 {
            Err(BdevError::Io {
                kind: self.kind,
                errno: self.status,
            })
        } else {
            Ok(())
        }
    }

    /// 0, or the negative errno the request failed with.
    #[inline]
    pub fn errno(&self) -> i32 {
        self.status.min(0)
    }

    /// The operation.
    #[inline]
    pub fn kind(&self) -> IoKind {
        self.kind
    }
}

/// Called once per completed callback request (see the module docs). Takes the `Rc` it was
/// submitted with, so the callback may submit its next request with the same `Rc` without
/// touching the reference count.
pub trait IoCallback {
    /// The request tagged `done.tag` completed. Runs on the channel's reactor, from a poller,
    /// with no borrow of the channel held: it may submit on this channel or any other, or
    /// drop channels.
    fn io_done(self: Rc<Self>, done: IoDone);
}

/// A callback waiting in a request slot.
pub(crate) struct PendingCallback {
    /// Whom to call.
    pub(crate) callback: Rc<dyn IoCallback>,
    /// The caller's tag.
    pub(crate) tag: u64,
}

impl IoDone {
    /// What a request completed with `status` hands back.
    #[inline(always)]
    pub(crate) fn new(buf: DmaBuf, tag: u64, status: i32, kind: IoKind) -> IoDone {
        IoDone {
            buf,
            tag,
            status,
            kind,
        }
    }
}

/// Calls `callback` with `done`, containing a panic in it. Inlined into its caller (as is
/// building `done`): a completed request returned through memory from a separate function
/// (an `Option` of it, whose niche is the buffer's first byte) made the copy stall on store
/// forwarding, about 10 % of a qd 1 I/O.
#[inline(always)]
pub(crate) fn deliver(callback: Rc<dyn IoCallback>, done: IoDone) {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        callback.io_done(done);
    }));
    if let Err(payload) = outcome {
        crate::io::report_contained("a completion callback", payload);
    }
}
