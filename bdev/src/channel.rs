//! How callers use a bdev: [`BdevDesc`] (an open device, shareable across reactors) and
//! [`BdevChannel`] (the calling reactor's channel, where requests are made and awaited).
//!
//! Every request is validated here (supported, block-aligned, in range, iovec lengths)
//! and fails with -EINVAL before reaching the device. Requests own their buffers while in
//! flight and hand them back with the result (`(Result, buffers)`), so nothing the device
//! writes into can be freed under it. Nothing on this path allocates once the channel's slot
//! table has grown to the queue depth in use.

use std::cell::RefCell;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};

use spool_reactor::{poller_register, Channel, IoDevice, PollStatus, PollerHandle};

use crate::callback::{IoCallback, PendingCallback};
use crate::device::{check_geometry, Bdev, ChannelBackend};
use crate::dma::DmaBuf;
use crate::error::BdevError;
use crate::io::{IoKind, IoSlots, SlotId, Submission, WakeBatch};
use crate::limits::{CHANNEL_IO_MAX, IOVECS_MAX};

/// The device facts validation needs, read and checked once when the device is opened
/// ([`BdevDesc::open`]); every channel of the descriptor validates against this copy, so a
/// device whose answers change later cannot move the bounds.
#[derive(Debug, Clone)]
struct Geometry {
    name: String,
    block_size: u64,
    block_count: u64,
    size_bytes: u64,
    iov_len_align: u64,
    supported: [bool; 5],
}

impl Geometry {
    /// Reads `bdev`'s geometry and checks it: the block size a power of two of at least 512,
    /// the block count non-zero, the size in bytes representable (`u64`), and the iovec
    /// alignment (0 meaning 1) a power of two no larger than the block size. Anything else
    /// is `InvalidArgument` (-EINVAL) naming the device and the value.
    fn of(bdev: &dyn Bdev) -> Result<Geometry, BdevError> {
        let name = bdev.name();
        let refuse =
            |reason: String| BdevError::InvalidArgument(format!("bdev '{name}': {reason}"));
        let (block_size, block_count) = (bdev.block_size(), bdev.block_count());
        check_geometry(block_size, block_count).map_err(|err| refuse(err.to_string()))?;
        let size_bytes = u64::from(block_size)
            .checked_mul(block_count)
            .ok_or_else(|| {
                refuse(format!(
                    "{block_count} blocks of {block_size} bytes overflow a 64-bit size"
                ))
            })?;
        let iov_len_align = bdev.iov_len_align().max(1);
        if !iov_len_align.is_power_of_two() || iov_len_align > block_size {
            return Err(refuse(format!(
                "iovec alignment {iov_len_align} is not a power of two <= the block size \
                 {block_size}"
            )));
        }
        let kinds = [
            IoKind::Read,
            IoKind::Write,
            IoKind::Unmap,
            IoKind::WriteZeroes,
            IoKind::Flush,
        ];
        Ok(Geometry {
            name: name.to_owned(),
            block_size: u64::from(block_size),
            block_count,
            size_bytes,
            iov_len_align: u64::from(iov_len_align),
            supported: kinds.map(|kind| bdev.supports(kind)),
        })
    }

    fn check(&self, kind: IoKind, offset_bytes: u64, len_bytes: u64) -> Result<(), BdevError> {
        if !self.supported[kind as usize] {
            return Err(BdevError::Unsupported {
                bdev: self.name.clone(),
                kind,
            });
        }
        if kind == IoKind::Flush {
            return Ok(());
        }
        if !offset_bytes.is_multiple_of(self.block_size)
            || !len_bytes.is_multiple_of(self.block_size)
        {
            return Err(BdevError::Misaligned {
                kind,
                offset_bytes,
                len_bytes,
                align_bytes: self.block_size,
            });
        }
        let end = offset_bytes.checked_add(len_bytes);
        if len_bytes == 0 || end.is_none_or(|end| end > self.size_bytes) {
            return Err(BdevError::OutOfRange {
                kind,
                offset_bytes,
                len_bytes,
                size_bytes: self.size_bytes,
            });
        }
        Ok(())
    }

    fn check_iovecs(
        &self,
        kind: IoKind,
        offset_bytes: u64,
        bufs: &[DmaBuf],
    ) -> Result<u64, BdevError> {
        if bufs.len() > IOVECS_MAX {
            return Err(BdevError::InvalidArgument(format!(
                "{} iovecs, at most {IOVECS_MAX}",
                bufs.len()
            )));
        }
        let mut len_bytes = 0u64;
        for buf in bufs {
            let len = buf.len() as u64;
            if !len.is_multiple_of(self.iov_len_align) {
                return Err(BdevError::Misaligned {
                    kind,
                    offset_bytes,
                    len_bytes: len,
                    align_bytes: self.iov_len_align,
                });
            }
            len_bytes += len;
        }
        self.check(kind, offset_bytes, len_bytes)?;
        Ok(len_bytes)
    }
}

/// One reactor's context for one open bdev: its request table, the backend, and the poller
/// that drives the backend every loop pass.
pub struct ChannelContext {
    geometry: Geometry,
    slots: Rc<IoSlots>,
    backend: Rc<RefCell<Box<dyn ChannelBackend>>>,
    _poller: PollerHandle,
}

/// An open bdev. Clone it freely and send it to any reactor; each reactor gets its own
/// channel from [`BdevDesc::channel`].
#[derive(Clone)]
pub struct BdevDesc {
    bdev: Arc<dyn Bdev>,
    geometry: Arc<Geometry>,
    device: IoDevice<ChannelContext>,
}

impl BdevDesc {
    /// Opens `bdev` for I/O: checks its geometry (see below), then registers it as an io
    /// device whose per-reactor context is a channel of the backend.
    ///
    /// The geometry is read once, here, and fixed for the descriptor's life: the block size
    /// must be a power of two of at least 512, the block count non-zero, `block_size *
    /// block_count` must fit a `u64`, and the iovec alignment must be a power of two no
    /// larger than the block size. A device reporting anything else (`Bdev` is a safe trait:
    /// its methods may return any value) is refused with `InvalidArgument` (-EINVAL).
    pub fn open(bdev: Arc<dyn Bdev>) -> Result<BdevDesc, BdevError> {
        let geometry = Arc::new(Geometry::of(bdev.as_ref())?);
        let for_create = Arc::clone(&bdev);
        let for_context = Arc::clone(&geometry);
        let device = IoDevice::register(
            format!("bdev:{}", bdev.name()),
            move |_reactor| create_context(&for_create, &for_context),
            |_reactor, context| drop(context),
        );
        Ok(BdevDesc {
            bdev,
            geometry,
            device,
        })
    }

    /// The device.
    pub fn bdev(&self) -> &Arc<dyn Bdev> {
        &self.bdev
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        self.bdev.name()
    }

    /// Bytes per block (as checked at open).
    pub fn block_size(&self) -> u32 {
        // Checked at open: a power of two of at most 2^31.
        self.geometry.block_size as u32
    }

    /// Number of blocks (as checked at open).
    pub fn block_count(&self) -> u64 {
        self.geometry.block_count
    }

    /// The device's size in bytes (as checked at open: it fits a `u64`).
    pub fn size_bytes(&self) -> u64 {
        self.geometry.size_bytes
    }

    /// The calling reactor's channel (shared with other callers on this reactor).
    pub fn channel(&self) -> Result<BdevChannel, BdevError> {
        Ok(BdevChannel {
            channel: self.device.get_channel()?,
        })
    }

    /// A new channel on the calling reactor that is shared with nobody: its requests queue
    /// and complete apart from those of [`BdevDesc::channel`] (the blobstore's metadata I/O
    /// does not wait behind its reactor's data I/O). Each call makes another one, with its
    /// own poller; it goes when its last clone drops.
    pub fn private_channel(&self) -> Result<BdevChannel, BdevError> {
        let (bdev, geometry) = (Arc::clone(&self.bdev), Arc::clone(&self.geometry));
        let device = IoDevice::register(
            format!("bdev:{}:private", self.bdev.name()),
            move |_reactor| create_context(&bdev, &geometry),
            |_reactor, context| drop(context),
        );
        Ok(BdevChannel {
            channel: device.get_channel()?,
        })
    }

    /// The reactors that hold a channel now.
    pub fn channel_holders(&self) -> Vec<spool_reactor::ReactorId> {
        self.device.channel_holders()
    }
}

fn create_context(bdev: &Arc<dyn Bdev>, geometry: &Geometry) -> Result<ChannelContext, i32> {
    let slots = Rc::new(IoSlots::new());
    let backend = bdev.create_channel(Rc::clone(&slots)).map_err(|err| {
        tracing::error!(bdev = bdev.name(), %err, "channel create failed");
        err.errno()
    })?;
    let backend = Rc::new(RefCell::new(backend));
    let poll_backend = Rc::clone(&backend);
    let poll_slots = Rc::clone(&slots);
    let poller = poller_register("bdev", None, move || {
        let status = match poll_backend.try_borrow_mut() {
            Ok(mut backend) => backend.poll(),
            // Unreachable in practice: the backend is borrowed only during a submit call.
            Err(_) => PollStatus::Busy,
        };
        // Wake the waiters of what completed (here, in a wrapped backend, or in the reactor's
        // io_uring group) only now, with no borrow held: a waker may use or drop channels.
        if poll_slots.has_wakes() && poll_slots.wake_completed(&mut WakeBatch::default()) > 0 {
            return PollStatus::Busy;
        }
        status
    })
    .map_err(|err| err.errno())?;
    Ok(ChannelContext {
        geometry: geometry.clone(),
        slots,
        backend,
        _poller: poller,
    })
}

/// The calling reactor's channel to an open bdev: where reads, writes, unmaps, write-zeroes
/// and flushes are made. Not `Send`: it belongs to its reactor.
#[derive(Clone)]
pub struct BdevChannel {
    channel: Channel<ChannelContext>,
}

impl BdevChannel {
    /// Bytes per block.
    pub fn block_size(&self) -> u64 {
        self.channel.geometry.block_size
    }

    /// The device's size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.channel.geometry.size_bytes
    }

    /// Requests this channel has in flight.
    pub fn in_flight(&self) -> usize {
        self.channel.slots.in_flight()
    }

    /// Reads `buf.len()` bytes at `offset_bytes` into `buf`; yields the result and the buffer.
    pub fn read(&self, buf: DmaBuf, offset_bytes: u64) -> IoFuture<'_, DmaBuf> {
        let len_bytes = buf.len() as u64;
        self.submit_one(IoKind::Read, buf, offset_bytes, len_bytes)
    }

    /// Writes all of `buf` at `offset_bytes`; yields the result and the buffer.
    pub fn write(&self, buf: DmaBuf, offset_bytes: u64) -> IoFuture<'_, DmaBuf> {
        let len_bytes = buf.len() as u64;
        self.submit_one(IoKind::Write, buf, offset_bytes, len_bytes)
    }

    /// Reads `buf.len()` bytes at `offset_bytes` into `buf` and calls `callback` with the
    /// result, the buffer and `tag` when the device completes, directly from the poller that
    /// completed it (no task is woken: see [`crate::callback`]). A request refused before
    /// reaching the device (validation, a full queue) is not called back: the error and the
    /// buffer come back here. An accepted one (`Ok`) is called back exactly once, never from
    /// inside this call, even if the channel is dropped first.
    #[inline]
    pub fn read_with(
        &self,
        buf: DmaBuf,
        offset_bytes: u64,
        callback: Rc<dyn IoCallback>,
        tag: u64,
    ) -> Result<(), Refused> {
        self.submit_with(IoKind::Read, buf, offset_bytes, callback, tag)
    }

    /// Writes all of `buf` at `offset_bytes`, calling `callback` back as
    /// [`BdevChannel::read_with`] does.
    #[inline]
    pub fn write_with(
        &self,
        buf: DmaBuf,
        offset_bytes: u64,
        callback: Rc<dyn IoCallback>,
        tag: u64,
    ) -> Result<(), Refused> {
        self.submit_with(IoKind::Write, buf, offset_bytes, callback, tag)
    }

    /// Reads into `bufs` in order (a scatter list; lengths may cross block boundaries as long
    /// as each is a multiple of the device's iovec alignment and the total is block-aligned).
    pub fn readv(&self, bufs: Vec<DmaBuf>, offset_bytes: u64) -> IoFuture<'_, Vec<DmaBuf>> {
        self.submit_vec(IoKind::Read, bufs, offset_bytes)
    }

    /// Writes `bufs` in order (a gather list), as [`BdevChannel::readv`].
    pub fn writev(&self, bufs: Vec<DmaBuf>, offset_bytes: u64) -> IoFuture<'_, Vec<DmaBuf>> {
        self.submit_vec(IoKind::Write, bufs, offset_bytes)
    }

    /// Deallocates `len_bytes` at `offset_bytes`. Like every request here, it is submitted
    /// when called; the future only waits for it.
    pub fn unmap(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> impl Future<Output = Result<(), BdevError>> + '_ {
        let request = self.submit_none(IoKind::Unmap, offset_bytes, len_bytes);
        async move { request.await.0 }
    }

    /// Writes zeros over `len_bytes` at `offset_bytes`.
    pub fn write_zeroes(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> impl Future<Output = Result<(), BdevError>> + '_ {
        let request = self.submit_none(IoKind::WriteZeroes, offset_bytes, len_bytes);
        async move { request.await.0 }
    }

    /// [`BdevChannel::unmap`] as the request's own [`IoFuture`] (output `()`): its owner can
    /// [`IoFuture::hold_until_done`] something until the device is done with the request,
    /// even if the future is dropped first.
    pub fn unmap_request(&self, offset_bytes: u64, len_bytes: u64) -> IoFuture<'_, ()> {
        self.submit_none(IoKind::Unmap, offset_bytes, len_bytes)
    }

    /// [`BdevChannel::write_zeroes`] as the request's own [`IoFuture`], as
    /// [`BdevChannel::unmap_request`].
    pub fn write_zeroes_request(&self, offset_bytes: u64, len_bytes: u64) -> IoFuture<'_, ()> {
        self.submit_none(IoKind::WriteZeroes, offset_bytes, len_bytes)
    }

    /// Makes every write completed before this call durable.
    pub fn flush(&self) -> impl Future<Output = Result<(), BdevError>> + '_ {
        let request = self.submit_none(IoKind::Flush, 0, 0);
        async move { request.await.0 }
    }

    #[inline]
    fn submit_one(
        &self,
        kind: IoKind,
        buf: DmaBuf,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> IoFuture<'_, DmaBuf> {
        let context: &ChannelContext = &self.channel;
        if let Err(err) = context.geometry.check(kind, offset_bytes, len_bytes) {
            return IoFuture::failed(context, kind, err, vec![buf]);
        }
        let Some(slot) = context.slots.acquire(kind, offset_bytes, len_bytes) else {
            return IoFuture::failed(
                context,
                kind,
                BdevError::QueueFull {
                    max: CHANNEL_IO_MAX,
                },
                vec![buf],
            );
        };
        context.slots.with(slot, |request| request.bufs.push(buf));
        self.start(context, kind, slot, Vec::new())
    }

    fn submit_vec(
        &self,
        kind: IoKind,
        mut bufs: Vec<DmaBuf>,
        offset_bytes: u64,
    ) -> IoFuture<'_, Vec<DmaBuf>> {
        let context: &ChannelContext = &self.channel;
        let len_bytes = match context.geometry.check_iovecs(kind, offset_bytes, &bufs) {
            Ok(len_bytes) => len_bytes,
            Err(err) => return IoFuture::failed(context, kind, err, bufs),
        };
        let Some(slot) = context.slots.acquire(kind, offset_bytes, len_bytes) else {
            return IoFuture::failed(
                context,
                kind,
                BdevError::QueueFull {
                    max: CHANNEL_IO_MAX,
                },
                bufs,
            );
        };
        // Swap the caller's list into the slot; the slot's (empty) list waits in the future
        // and is swapped back at completion, so neither side allocates.
        context
            .slots
            .with(slot, |request| std::mem::swap(&mut request.bufs, &mut bufs));
        self.start(context, kind, slot, bufs)
    }

    fn submit_none(&self, kind: IoKind, offset_bytes: u64, len_bytes: u64) -> IoFuture<'_, ()> {
        let context: &ChannelContext = &self.channel;
        if let Err(err) = context.geometry.check(kind, offset_bytes, len_bytes) {
            return IoFuture::failed(context, kind, err, Vec::new());
        }
        let Some(slot) = context.slots.acquire(kind, offset_bytes, len_bytes) else {
            return IoFuture::failed(
                context,
                kind,
                BdevError::QueueFull {
                    max: CHANNEL_IO_MAX,
                },
                Vec::new(),
            );
        };
        self.start(context, kind, slot, Vec::new())
    }

    #[inline]
    fn submit_with(
        &self,
        kind: IoKind,
        buf: DmaBuf,
        offset_bytes: u64,
        callback: Rc<dyn IoCallback>,
        tag: u64,
    ) -> Result<(), Refused> {
        let context: &ChannelContext = &self.channel;
        let len_bytes = buf.len() as u64;
        if let Err(error) = context.geometry.check(kind, offset_bytes, len_bytes) {
            return Err(Refused {
                error: Box::new(error),
                buf,
            });
        }
        let Some(slot) = context.slots.acquire(kind, offset_bytes, len_bytes) else {
            return Err(Refused {
                error: Box::new(BdevError::QueueFull {
                    max: CHANNEL_IO_MAX,
                }),
                buf,
            });
        };
        context.slots.with(slot, |request| {
            request.bufs.push(buf);
            request.callback = Some(PendingCallback { callback, tag });
        });
        // The slot now owns the buffer and the callback: whatever `submit` does (completes at
        // once, forgets the submission, panics), the completion reaches the callback through
        // the poller, once.
        let finish = FinishSubmission {
            slots: &context.slots,
            slot,
        };
        let submission = Submission::new(&context.slots, slot);
        match context.backend.try_borrow_mut() {
            Ok(mut backend) => backend.submit(submission),
            Err(_) => submission.complete(-libc::EBUSY),
        }
        drop(finish);
        Ok(())
    }

    /// Hands the request in `slot` to the backend. The future that owns the slot exists
    /// before the backend runs, and the submission is checked when `submit` returns or
    /// unwinds: a backend that panics leaks neither the slot nor the buffers (unwinding drops
    /// the future, which releases the slot now or at its completion), and one that forgets
    /// the submission gets the request cancelled instead of left hanging.
    #[inline]
    fn start<'a, T: IoOutput>(
        &'a self,
        context: &'a ChannelContext,
        kind: IoKind,
        slot: SlotId,
        spare: Vec<DmaBuf>,
    ) -> IoFuture<'a, T> {
        let future = IoFuture {
            context,
            kind,
            slot: Some(slot),
            early: None,
            spare,
            _output: PhantomData,
        };
        let finish = FinishSubmission {
            slots: &context.slots,
            slot,
        };
        let submission = Submission::new(&context.slots, slot);
        match context.backend.try_borrow_mut() {
            Ok(mut backend) => backend.submit(submission),
            // The backend is submitting already: its `submit` started a request on its own
            // channel. Fail this one instead of panicking.
            Err(_) => submission.complete(-libc::EBUSY),
        }
        drop(finish);
        future
    }
}

/// A callback request refused before it reached the device ([`BdevChannel::read_with`]):
/// why, and the caller's buffer back. Its callback is not called.
#[derive(Debug)]
pub struct Refused {
    /// Why (`-EINVAL` validation errors, `-ENOMEM` for a full queue, ...).
    pub error: Box<BdevError>,
    /// The buffer, untouched.
    pub buf: DmaBuf,
}

/// Ends a submission when the backend's `submit` returns or unwinds (see
/// `Submission::finish`): runs before the future is dropped on unwinding (declared after it).
struct FinishSubmission<'a> {
    slots: &'a IoSlots,
    slot: SlotId,
}

impl Drop for FinishSubmission<'_> {
    #[inline]
    fn drop(&mut self) {
        Submission::finish(self.slots, self.slot);
    }
}

/// What a finished request hands back besides its status: one buffer, a list, or nothing.
pub trait IoOutput: Sized {
    /// Builds the output from the request's buffer list (`spare` is the caller-side list to
    /// swap with, for vectored requests).
    fn take(bufs: &mut Vec<DmaBuf>, spare: Vec<DmaBuf>) -> Self;
}

impl IoOutput for DmaBuf {
    #[inline]
    fn take(bufs: &mut Vec<DmaBuf>, _spare: Vec<DmaBuf>) -> Self {
        bufs.pop()
            .expect("a single-buffer request holds its buffer until completion")
    }
}

impl IoOutput for Vec<DmaBuf> {
    fn take(bufs: &mut Vec<DmaBuf>, spare: Vec<DmaBuf>) -> Self {
        std::mem::replace(bufs, spare)
    }
}

impl IoOutput for () {
    fn take(_bufs: &mut Vec<DmaBuf>, _spare: Vec<DmaBuf>) -> Self {}
}

/// A request in flight on a channel. Resolves to the status and the request's buffers.
/// Dropping it before completion parks the buffers until the device is done with them.
pub struct IoFuture<'a, T: IoOutput> {
    context: &'a ChannelContext,
    kind: IoKind,
    slot: Option<SlotId>,
    early: Option<Box<(BdevError, Vec<DmaBuf>)>>,
    spare: Vec<DmaBuf>,
    _output: PhantomData<fn() -> T>,
}

impl<'a, T: IoOutput> IoFuture<'a, T> {
    fn failed(
        context: &'a ChannelContext,
        kind: IoKind,
        err: BdevError,
        bufs: Vec<DmaBuf>,
    ) -> Self {
        IoFuture {
            context,
            kind,
            slot: None,
            early: Some(Box::new((err, bufs))),
            spare: Vec::new(),
            _output: PhantomData,
        }
    }
}

impl<T: IoOutput> IoFuture<'_, T> {
    /// Keeps `held` alive until the device has finished with this request: it is stored with
    /// the request and dropped when the request leaves its slot, that is when this future
    /// completes or, if it is dropped first, when the device completes the request (the
    /// buffers are parked until then the same way). Dropped at once when the request never
    /// reached the device or has already been taken.
    ///
    /// For a caller that counts its requests in flight (a blob channel, for a freeze): handing
    /// the count here before dropping the future keeps it counted for as long as the device
    /// may still read or write the request's buffers. Its drop runs on this reactor, with no
    /// borrow of this channel held; it should only give back what it holds.
    pub fn hold_until_done(&mut self, held: Box<dyn std::any::Any>) {
        match self.slot {
            Some(slot) => self.context.slots.hold(slot, held),
            None => drop(held),
        }
    }
}

impl<T: IoOutput> Future for IoFuture<'_, T> {
    type Output = (Result<(), BdevError>, T);

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let Some(early) = this.early.take() {
            let (err, mut bufs) = *early;
            return Poll::Ready((Err(err), T::take(&mut bufs, Vec::new())));
        }
        let Some(slot) = this.slot else {
            panic!("IoFuture polled after completion");
        };
        let Some(status) = this.context.slots.poll_done(slot, cx.waker()) else {
            return Poll::Pending;
        };
        this.slot = None;
        let spare = std::mem::take(&mut this.spare);
        let output = this
            .context
            .slots
            .release(slot, |bufs| T::take(bufs, spare));
        let result = if status < 0 {
            Err(BdevError::Io {
                kind: this.kind,
                errno: status,
            })
        } else {
            Ok(())
        };
        Poll::Ready((result, output))
    }
}

impl<T: IoOutput> Drop for IoFuture<'_, T> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.context.slots.abandon(slot);
        }
    }
}
