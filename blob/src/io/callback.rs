//! Blob I/O with completion callbacks: [`BlobChannel::read_with`] and
//! [`BlobChannel::write_with`], the blob layer's counterpart of the bdev's
//! `BdevChannel::read_with` (SPDK's `spdk_blob_io_read(.., cb_fn, cb_arg)`).
//!
//! A request inside one allocated cluster of a blob that is not frozen (the fast path of
//! [`BlobChannel::read`]) becomes one bdev callback request with the caller's buffer: its
//! completion, called by the bdev channel's poller, ends the I/O's in-flight count on this
//! channel and calls the caller's [`BlobIoCallback`] in the same step. No task is woken per
//! I/O. Every other request (split across clusters, touching an unallocated cluster of a
//! thin blob, frozen, refused by validation) runs the future path of [`BlobChannel::read`] in
//! a task on this reactor and calls the callback when it ends, so its semantics (the freeze
//! queue, thin allocation, the error codes) are the future path's exactly.
//!
//! Guarantees:
//! - the callback is called exactly once per request, never from inside `read_with` or
//!   `write_with` (an error found at once is delivered from a later reactor pass), with the
//!   caller's buffer, only after no device may still read or write it;
//! - while the request is in flight it is counted in the blob's in-flight I/O on this
//!   channel, as a future's: a snapshot's or resize's freeze waits for it, and the channel
//!   stays open until it is done (the request holds it, as SPDK's cb_arg holds its channel);
//! - a panic in the callback is contained and logged (the bdev's policy for its callbacks on
//!   the fast path, the reactor's task policy on the other);
//! - if the reactor stops while a request of the task path is still running, the task is
//!   dropped with every other task of that reactor, and its callback is not called.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use spool_bdev::{DmaBuf, IoCallback, IoDone};
use spool_reactor::Channel;

use super::{BlobChannel, BlobIo, ChannelContext};
use crate::error::BlobError;

/// What a blob callback request hands back. Small (built and moved once per I/O): the error,
/// when there is one, is boxed.
#[derive(Debug)]
pub struct BlobIoDone {
    /// The request's buffer, no longer used by any device.
    pub buf: DmaBuf,
    /// The tag given at submission (the caller's own).
    pub tag: u64,
    error: Option<Box<BlobError>>,
}

impl BlobIoDone {
    /// `Ok`, or the error the request failed with.
    #[inline]
    pub fn result(&self) -> Result<(), &BlobError> {
        match &self.error {
            None => Ok(()),
            Some(error) => Err(error),
        }
    }

    /// 0, or the negative errno the request failed with.
    #[inline]
    pub fn errno(&self) -> i32 {
        self.error.as_ref().map_or(0, |error| error.errno())
    }

    /// The buffer and the result, taken apart.
    #[inline]
    pub fn into_parts(self) -> (Result<(), BlobError>, DmaBuf) {
        (self.error.map_or(Ok(()), |error| Err(*error)), self.buf)
    }
}

/// Called once per completed blob callback request (see the module docs).
pub trait BlobIoCallback {
    /// The request tagged `done.tag` completed. Runs on the channel's reactor with no borrow
    /// of the channel held: it may submit its next request on the same channel.
    fn io_done(self: Rc<Self>, done: BlobIoDone);
}

/// A fast-path request in flight: whom to call, and what to release first.
struct Pending {
    callback: Rc<dyn BlobIoCallback>,
    tag: u64,
    /// The blob's slot in the channel's per-blob table (its in-flight count).
    slot: usize,
    /// Keeps the channel (and its bdev channels) open while the request is in flight.
    channel: Channel<ChannelContext>,
}

/// A channel's fast-path requests in flight, indexed by the bdev request's tag. It is the
/// bdev callback of all of them: one `Rc` per channel, cloned per request.
#[derive(Default)]
pub(crate) struct CallbackTable {
    pending: RefCell<slab::Slab<Pending>>,
}

impl IoCallback for CallbackTable {
    #[inline]
    fn io_done(self: Rc<Self>, done: IoDone) {
        let Some(pending) = self.pending.borrow_mut().try_remove(done.tag as usize) else {
            // Unreachable: every tag given to the bdev is an entry until its completion.
            tracing::error!(
                tag = done.tag,
                "a blob callback completion without its entry"
            );
            return;
        };
        pending.channel.finish(pending.slot);
        let error = match done.result() {
            Ok(()) => None,
            Err(err) => Some(Box::new(BlobError::from(err))),
        };
        pending.callback.io_done(BlobIoDone {
            buf: done.buf,
            tag: pending.tag,
            error,
        });
    }
}

impl BlobChannel {
    /// Reads `buf.len()` bytes (a multiple of the io_unit) at io_unit `offset` of `blob`, and
    /// calls `callback` with `tag` when done (see the module docs). Inside one allocated
    /// cluster this is one bdev callback request with the caller's buffer.
    #[inline]
    pub fn read_with(
        &self,
        blob: &Arc<BlobIo>,
        offset: u64,
        buf: DmaBuf,
        callback: Rc<dyn BlobIoCallback>,
        tag: u64,
    ) {
        self.submit_with(blob, offset, buf, false, callback, tag);
    }

    /// Writes all of `buf` (a multiple of the io_unit) at io_unit `offset` of `blob`, calling
    /// `callback` back as [`BlobChannel::read_with`] does.
    #[inline]
    pub fn write_with(
        &self,
        blob: &Arc<BlobIo>,
        offset: u64,
        buf: DmaBuf,
        callback: Rc<dyn BlobIoCallback>,
        tag: u64,
    ) {
        self.submit_with(blob, offset, buf, true, callback, tag);
    }

    #[inline]
    fn submit_with(
        &self,
        blob: &Arc<BlobIo>,
        offset: u64,
        buf: DmaBuf,
        write: bool,
        callback: Rc<dyn BlobIoCallback>,
        tag: u64,
    ) {
        let Some(device) = self.fast_target(blob, offset, buf.len() as u64, write) else {
            self.submit_by_task(blob, offset, buf, write, callback, tag);
            return;
        };
        let table = &self.channel.callbacks;
        let key = table.pending.borrow_mut().insert(Pending {
            callback,
            tag,
            slot: blob.slot,
            channel: self.channel.clone(),
        });
        let bdev_callback: Rc<dyn IoCallback> = Rc::clone(table) as Rc<dyn IoCallback>;
        let started = if write {
            self.bdev()
                .write_with(buf, device, bdev_callback, key as u64)
        } else {
            self.bdev()
                .read_with(buf, device, bdev_callback, key as u64)
        };
        if let Err(refused) = started {
            // Not on the device (a full queue, a range the device refuses): undo the count
            // and let the task path give the request its answer, from a later pass.
            let pending = table.pending.borrow_mut().remove(key);
            self.channel.finish(blob.slot);
            self.submit_by_task(
                blob,
                offset,
                refused.buf,
                write,
                pending.callback,
                pending.tag,
            );
        }
    }

    /// The request through the future path, in a task on this reactor; the callback gets its
    /// outcome.
    #[cold]
    fn submit_by_task(
        &self,
        blob: &Arc<BlobIo>,
        offset: u64,
        buf: DmaBuf,
        write: bool,
        callback: Rc<dyn BlobIoCallback>,
        tag: u64,
    ) {
        let channel = self.clone();
        let blob = Arc::clone(blob);
        drop(spool_reactor::spawn_local(async move {
            let (result, buf) = if write {
                channel.write(&blob, offset, buf).await
            } else {
                channel.read(&blob, offset, buf).await
            };
            callback.io_done(BlobIoDone {
                buf,
                tag,
                error: result.err().map(Box::new),
            });
        }));
    }
}
