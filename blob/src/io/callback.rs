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
//! - as with a future still held, a request in flight is the caller's to see called back
//!   before the blob's last close and the store's unload (as in SPDK): they wait only for the
//!   requests of dropped futures, so a write still in flight may land after they returned
//!   (review18cb's ignored tests show it);
//! - a panic in the callback is contained and logged (the bdev's policy for its callbacks on
//!   the fast path, the reactor's task policy on the other);
//! - if the reactor stops while a request of the task path is still running, the task is
//!   dropped with every other task of that reactor, and its callback is not called.

use std::rc::Rc;
use std::sync::Arc;

use spool_bdev::{DmaBuf, IoCallback, IoDone};
use spool_reactor::Channel;

use super::{BlobChannel, BlobIo, ChannelContext, ChannelShared};
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

/// The fast path's callback requests in flight on one channel, by the bdev request's tag:
/// one column per field, so a request's entry is written and read field by field in place
/// (a struct moved in and out of a slab was copied through the stack with wide loads over
/// narrow stores, a store-forwarding stall of a few ns per I/O).
#[derive(Default)]
pub(crate) struct PendingTable {
    callbacks: Vec<Option<Rc<dyn BlobIoCallback>>>,
    tags: Vec<u64>,
    /// The blob's slot in the channel's per-blob table (its in-flight count).
    slots: Vec<usize>,
    free: Vec<u32>,
    in_flight: usize,
    /// Keeps the channel (and its bdev channels) open while a request is in flight, as
    /// SPDK's cb_arg holds its channel: set by the first request, dropped after the last.
    channel: Option<Channel<ChannelContext>>,
}

impl PendingTable {
    /// Records a request; its key (the bdev tag).
    #[inline]
    fn insert(
        &mut self,
        callback: Rc<dyn BlobIoCallback>,
        tag: u64,
        slot: usize,
        channel: &Channel<ChannelContext>,
    ) -> usize {
        if self.in_flight == 0 {
            self.channel = Some(channel.clone());
        }
        self.in_flight += 1;
        match self.free.pop() {
            Some(key) => {
                let key = key as usize;
                self.callbacks[key] = Some(callback);
                self.tags[key] = tag;
                self.slots[key] = slot;
                key
            }
            None => {
                self.callbacks.push(Some(callback));
                self.tags.push(tag);
                self.slots.push(slot);
                self.callbacks.len() - 1
            }
        }
    }

    /// Takes the request `key` out: (its callback, its tag, its blob slot, the channel hold
    /// to drop after the callback when it was the last request).
    #[inline]
    #[allow(clippy::type_complexity)]
    fn remove(
        &mut self,
        key: usize,
    ) -> Option<(
        Rc<dyn BlobIoCallback>,
        u64,
        usize,
        Option<Channel<ChannelContext>>,
    )> {
        let callback = self.callbacks.get_mut(key)?.take()?;
        self.free.push(key as u32);
        self.in_flight -= 1;
        let hold = if self.in_flight == 0 {
            self.channel.take()
        } else {
            None
        };
        Some((callback, self.tags[key], self.slots[key], hold))
    }
}

impl IoCallback for ChannelShared {
    #[inline]
    fn io_done(self: Rc<Self>, done: IoDone) {
        let Some((callback, tag, slot, hold)) =
            self.callbacks.borrow_mut().remove(done.tag as usize)
        else {
            // Unreachable: every tag given to the bdev is an entry until its completion.
            tracing::error!(
                tag = done.tag,
                "a blob callback completion without its entry"
            );
            return;
        };
        self.finish(slot);
        let error = match done.result() {
            Ok(()) => None,
            Err(err) => Some(Box::new(BlobError::from(err))),
        };
        callback.io_done(BlobIoDone {
            buf: done.buf,
            tag,
            error,
        });
        drop(hold);
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
        let key =
            self.shared
                .callbacks
                .borrow_mut()
                .insert(callback, tag, blob.slot, &self.channel);
        let bdev_callback: Rc<dyn IoCallback> = Rc::clone(&self.shared) as Rc<dyn IoCallback>;
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
            let removed = self.shared.callbacks.borrow_mut().remove(key);
            self.shared.finish(blob.slot);
            if let Some((callback, tag, _, hold)) = removed {
                self.submit_by_task(blob, offset, refused.buf, write, callback, tag);
                drop(hold);
            }
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
