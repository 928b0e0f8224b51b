//! Blob I/O from any reactor: [`BlobIo`] (a `Send` view of an open blob: its cluster map
//! and flags) and [`BlobChannel`] (a reactor's channel to the store, over that reactor's
//! bdev channel).
//!
//! Offsets and lengths are in io_units. An I/O inside one allocated cluster (or across
//! physically contiguous allocated clusters, as on a thick blob) goes to the device as one
//! request with the caller's buffer: no copy. Other I/Os are split at cluster boundaries:
//! unallocated parts read as the parent snapshot's data or zeros, and a write to an
//! unallocated cluster of a thin blob allocates it: claim a free cluster (lock-free), write
//! the whole cluster (the parent's data or zeros, with the new data over it), then ask the
//! metadata reactor to insert it into the map and persist the metadata; only then is the
//! write acknowledged. Another write to a cluster whose allocation is in flight on the same
//! channel waits for it; a lost race (another reactor inserted first) releases the claimed
//! cluster and redoes the write against the winner's.

use std::cell::RefCell;
use std::collections::HashMap;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Poll, Waker};

use spool_bdev::{BdevChannel, DmaBuf, IoFuture, IoOutput};
use spool_reactor::{Channel, IoDevice};

use crate::error::{BlobError, Result};
use crate::store::{Blobstore, StoreShared};
use crate::sync::LocalEvent;

mod blob_io;
mod callback;
mod held;
mod thin;

pub use blob_io::BlobIo;
pub(crate) use blob_io::SlotAllocator;
use blob_io::{gate_refusing, ClusterMap};
pub use callback::{BlobIoCallback, BlobIoDone};
pub(crate) use held::{wait_until_zero, HeldCount};

/// (blob id, blob cluster index) of a thin allocation in flight.
type AllocKey = (u64, u64);

/// A reactor's context for one store: its bdev channel and the thin allocations it has in
/// flight.
pub struct ChannelContext {
    bdev: BdevChannel,
    /// The thin allocations' fills (copies of whole clusters), on a bdev channel of their
    /// own: a 4 KiB write does not queue behind them (nor does a snapshot's drain).
    fill: BdevChannel,
    allocating: RefCell<HashMap<AllocKey, Rc<LocalEvent<()>>>>,
    /// I/Os waiting for a frozen blob, by blob id, in arrival order.
    frozen_waiters: RefCell<HashMap<u64, VecDeque<Waker>>>,
    /// The per-blob counts and the callback requests in flight, shared with those requests'
    /// completions (see [`ChannelShared`]).
    shared: Rc<ChannelShared>,
}

/// The part of a channel's context its callback requests' completions reach directly (one
/// object, no pointer chase through the channel): per open blob (by its slot) the I/Os in
/// flight on this channel and the cached map, and the fast path's callback requests (see
/// [`BlobChannel::read_with`]). (A dropped I/O's request still on the device is counted in
/// the blob's [`HeldCount`] instead: it outlives this channel.)
#[derive(Default)]
pub(crate) struct ChannelShared {
    blobs: RefCell<Vec<ChannelBlob>>,
    callbacks: RefCell<callback::PendingTable>,
}

/// A channel's view of one open blob.
#[derive(Default)]
struct ChannelBlob {
    inflight: u64,
    /// Of `inflight`, the writes (and allocation tasks) parked in a thin allocation (see
    /// [`Parked`]): a snapshot's freeze does not wait for them.
    parked: u64,
    generation: u64,
    map: Option<Arc<ClusterMap>>,
}

impl ChannelContext {
    /// I/Os of the blob in `slot` in flight on this channel.
    pub(crate) fn inflight(&self, slot: usize) -> u64 {
        self.shared
            .blobs
            .borrow()
            .get(slot)
            .map_or(0, |blob| blob.inflight)
    }

    /// I/Os of the blob in `slot` in flight on this channel that a snapshot's freeze waits
    /// for: all but those parked in a thin allocation.
    pub(crate) fn inflight_unparked(&self, slot: usize) -> u64 {
        self.shared
            .blobs
            .borrow()
            .get(slot)
            .map_or(0, |blob| blob.inflight.saturating_sub(blob.parked))
    }

    fn admit(&self, slot: usize) {
        entry(&mut self.shared.blobs.borrow_mut(), slot).inflight += 1;
    }

    fn park(&self, slot: usize) {
        entry(&mut self.shared.blobs.borrow_mut(), slot).parked += 1;
    }

    fn unpark(&self, slot: usize) {
        if let Some(blob) = self.shared.blobs.borrow_mut().get_mut(slot) {
            blob.parked = blob.parked.saturating_sub(1);
        }
    }

    fn finish(&self, slot: usize) {
        self.shared.finish(slot);
    }

    /// Wakes, in arrival order, the I/Os of blob `id` that wait on this channel.
    pub(crate) fn release_frozen(&self, id: u64) {
        let waiters = self.frozen_waiters.borrow_mut().remove(&id);
        for waker in waiters.into_iter().flatten() {
            waker.wake();
        }
    }
}

impl ChannelShared {
    /// Ends an I/O of the blob in `slot` on this channel.
    #[inline]
    fn finish(&self, slot: usize) {
        if let Some(blob) = self.blobs.borrow_mut().get_mut(slot) {
            blob.inflight = blob.inflight.saturating_sub(1);
        }
    }
}

/// The channel's entry for the blob in `slot`, made on first use.
#[inline]
fn entry(blobs: &mut Vec<ChannelBlob>, slot: usize) -> &mut ChannelBlob {
    if blobs.len() <= slot {
        blobs.resize_with(slot + 1, ChannelBlob::default);
    }
    &mut blobs[slot]
}

/// An admitted I/O: counted in its blob's in-flight count on this channel until dropped.
struct Admitted<'a> {
    channel: &'a ChannelContext,
    blob: &'a BlobIo,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.channel.finish(self.blob.slot);
    }
}

/// A device write of a blob I/O made on an async path (split, vectored): if the I/O's future
/// is dropped while the write is on the device, the write is counted in the blob's held
/// requests ([`HeldCount`]; the I/O's `Admitted` goes with the future) until the device
/// completes it.
struct CountedWrite<'a, T: IoOutput> {
    request: IoFuture<'a, T>,
    blob: &'a BlobIo,
    done: bool,
}

impl<T: IoOutput> std::future::Future for CountedWrite<'_, T> {
    type Output = (std::result::Result<(), spool_bdev::BdevError>, T);

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Self::Output> {
        let output = std::pin::Pin::new(&mut self.request).poll(cx);
        if output.is_ready() {
            self.done = true;
        }
        output
    }
}

impl<T: IoOutput> Drop for CountedWrite<'_, T> {
    fn drop(&mut self) {
        if !self.done {
            self.request.hold_until_done(self.blob.held.hold());
        }
    }
}

pub(crate) fn register_device(desc: &spool_bdev::BdevDesc) -> IoDevice<ChannelContext> {
    let desc = desc.clone();
    IoDevice::register(
        format!("blobstore:{}", desc.name()),
        move |_reactor| {
            let bdev = desc.channel().map_err(|err| err.errno())?;
            let fill = desc.private_channel().map_err(|err| err.errno())?;
            Ok(ChannelContext {
                bdev,
                fill,
                allocating: RefCell::new(HashMap::new()),
                frozen_waiters: RefCell::new(HashMap::new()),
                shared: Rc::default(),
            })
        },
        |_reactor, context| drop(context),
    )
}

fn channel_of(store: &Arc<StoreShared>) -> Result<BlobChannel> {
    let channel = store.io_device.get_channel()?;
    Ok(BlobChannel {
        shared: Rc::clone(&channel.shared),
        channel,
        store: Arc::clone(store),
        fill: false,
    })
}

impl Blobstore {
    /// The calling reactor's channel to this store.
    pub fn channel(&self) -> Result<BlobChannel> {
        channel_of(self.shared())
    }
}

/// Where a piece of an I/O goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// Device byte offset.
    Device(u64),
    /// Blob cluster `index` has no device cluster.
    Unallocated { index: u64 },
}

/// One piece of an I/O: `len` bytes at blob byte `offset`.
#[derive(Debug, Clone, Copy)]
struct Piece {
    offset: u64,
    len: u64,
    target: Target,
}

/// A reactor's channel to a store: where blob I/O is made. Not `Send`.
#[derive(Clone)]
pub struct BlobChannel {
    channel: Channel<ChannelContext>,
    /// The channel's [`ChannelShared`], held here for the fast path (one pointer less).
    shared: Rc<ChannelShared>,
    store: Arc<StoreShared>,
    /// Device requests go to the channel's fill channel (a thin allocation's copy).
    fill: bool,
}

impl BlobChannel {
    /// Waits while `blob` is frozen (queued on this channel, in order), then counts the I/O
    /// in flight until the returned guard drops.
    async fn admit<'a>(&'a self, blob: &'a BlobIo) -> Admitted<'a> {
        std::future::poll_fn(|cx| {
            if blob.is_frozen() {
                self.channel
                    .frozen_waiters
                    .borrow_mut()
                    .entry(blob.id)
                    .or_default()
                    .push_back(cx.waker().clone());
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
        self.channel.admit(blob.slot);
        Admitted {
            channel: &self.channel,
            blob,
        }
    }

    #[inline]
    fn bdev(&self) -> &BdevChannel {
        if self.fill {
            &self.channel.fill
        } else {
            &self.channel.bdev
        }
    }

    /// This channel, its device requests made on the fill channel (a thin allocation's).
    fn for_fill(&self) -> BlobChannel {
        BlobChannel {
            channel: self.channel.clone(),
            shared: Rc::clone(&self.shared),
            store: Arc::clone(&self.store),
            fill: true,
        }
    }

    /// Writes `bufs` at device byte `device` for `blob`, counted as in flight until the device
    /// is done even if this future is dropped first (see [`CountedWrite`]).
    fn device_writev<'a>(
        &'a self,
        blob: &'a BlobIo,
        bufs: Vec<DmaBuf>,
        device: u64,
    ) -> CountedWrite<'a, Vec<DmaBuf>> {
        CountedWrite {
            request: self.bdev().writev(bufs, device),
            blob,
            done: false,
        }
    }

    /// Writes `buf` at device byte `device` for `blob`, as [`BlobChannel::device_writev`].
    fn device_write<'a>(
        &'a self,
        blob: &'a BlobIo,
        buf: DmaBuf,
        device: u64,
    ) -> CountedWrite<'a, DmaBuf> {
        CountedWrite {
            request: self.bdev().write(buf, device),
            blob,
            done: false,
        }
    }

    /// Unmaps `len` bytes at device byte `device` for `blob`, counted as in flight until the
    /// device is done even if this future is dropped first (see [`CountedWrite`]): a late
    /// unmap discards whatever the cluster holds by then.
    fn device_unmap<'a>(&'a self, blob: &'a BlobIo, device: u64, len: u64) -> CountedWrite<'a, ()> {
        CountedWrite {
            request: self.bdev().unmap_request(device, len),
            blob,
            done: false,
        }
    }

    /// Writes zeros over `len` bytes at device byte `device` for `blob` (zero-filled writes on
    /// a device without write_zeroes), every request counted as [`BlobChannel::device_write`].
    async fn device_zero(&self, blob: &BlobIo, device: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let request = CountedWrite {
            request: self.bdev().write_zeroes_request(device, len),
            blob,
            done: false,
        };
        match request.await.0 {
            Ok(()) => Ok(()),
            Err(err) if err.errno() == -libc::ENOTSUP => {
                let most = len.min(crate::store::md_io::MD_IO_MAX_BYTES as u64);
                let mut done = 0u64;
                while done < len {
                    let piece = (len - done).min(most) as usize;
                    let mut zeros = DmaBuf::alloc(piece)?;
                    zeros.fill(0);
                    self.device_write(blob, zeros, device + done).await.0?;
                    done += piece as u64;
                }
                Ok(())
            }
            Err(err) => Err(err.into()),
        }
    }

    fn unit(&self) -> u64 {
        self.store.geometry.io_unit_size
    }

    /// Splits blob bytes `[offset, offset + len)` into pieces per cluster, merging
    /// physically contiguous allocated clusters.
    fn pieces(&self, blob: &BlobIo, offset: u64, len: u64) -> Vec<Piece> {
        let cluster_size = self.store.geometry.cluster_size;
        let map = blob.map.load();
        let mut pieces: Vec<Piece> = Vec::new();
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let index = at / cluster_size;
            let within = at % cluster_size;
            let take = (cluster_size - within).min(end - at);
            let cluster = map.clusters[index as usize].load(Ordering::Acquire);
            let target = if cluster == 0 {
                Target::Unallocated { index }
            } else {
                Target::Device(u64::from(cluster) * cluster_size + within)
            };
            if let (Some(last), Target::Device(device)) = (pieces.last_mut(), target) {
                if let Target::Device(last_device) = last.target {
                    if last_device + last.len == device {
                        last.len += take;
                        at += take;
                        continue;
                    }
                }
            }
            pieces.push(Piece {
                offset: at,
                len: take,
                target,
            });
            at += take;
        }
        pieces
    }

    /// -EINVAL for a blob of another store: its clusters are not this channel's device's
    /// (review18cb: a write went to this store's device at the other store's addresses).
    fn check_store(&self, blob: &BlobIo) -> Result<()> {
        if Arc::ptr_eq(&blob.store, &self.store) {
            Ok(())
        } else {
            Err(BlobError::InvalidArgument(format!(
                "blob {:#x} is not of this channel's store",
                blob.id
            )))
        }
    }

    fn byte_range(
        &self,
        blob: &BlobIo,
        offset_units: u64,
        len_bytes: u64,
        write: bool,
    ) -> Result<(u64, u64)> {
        self.check_store(blob)?;
        let unit = self.unit();
        if !len_bytes.is_multiple_of(unit) {
            return Err(BlobError::InvalidArgument(format!(
                "buffer of {len_bytes} bytes is not a multiple of the {unit}-byte io_unit"
            )));
        }
        blob.check(offset_units, len_bytes / unit, write)?;
        Ok((offset_units * unit, len_bytes))
    }

    /// Reads `buf.len()` bytes (a multiple of the io_unit) at io_unit `offset`. Inside one
    /// allocated extent this is one device request with the caller's buffer (no copy, no
    /// allocation); the future yields the result and the buffer.
    pub fn read<'a>(&'a self, blob: &'a BlobIo, offset: u64, buf: DmaBuf) -> BlobIoFuture<'a> {
        self.submit(blob, offset, buf, false)
    }

    /// Writes all of `buf` (a multiple of the io_unit) at io_unit `offset`; as
    /// [`BlobChannel::read`], one device request when the range is allocated and contiguous.
    pub fn write<'a>(&'a self, blob: &'a BlobIo, offset: u64, buf: DmaBuf) -> BlobIoFuture<'a> {
        self.submit(blob, offset, buf, true)
    }

    #[inline]
    fn submit<'a>(
        &'a self,
        blob: &'a BlobIo,
        offset: u64,
        buf: DmaBuf,
        write: bool,
    ) -> BlobIoFuture<'a> {
        if let Some(device) = self.fast_target(blob, offset, buf.len() as u64, write) {
            let request = if write {
                self.bdev().write(buf, device)
            } else {
                self.bdev().read(buf, device)
            };
            return BlobIoFuture::Direct(DirectIo {
                request,
                admitted: Some(Admitted {
                    channel: &self.channel,
                    blob,
                }),
            });
        }
        BlobIoFuture::Split(Box::pin(async move {
            let _admitted = self.admit(blob).await;
            let (start, len) = match self.byte_range(blob, offset, buf.len() as u64, write) {
                Ok(range) => range,
                Err(err) => return (Err(err), buf),
            };
            let pieces = self.pieces(blob, start, len);
            if let [Piece {
                target: Target::Device(device),
                ..
            }] = pieces.as_slice()
            {
                // Physically contiguous clusters (a thick blob): still one request.
                let (result, buf) = if write {
                    self.device_write(blob, buf, *device).await
                } else {
                    self.bdev().read(buf, *device).await
                };
                return (result.map_err(BlobError::from), buf);
            }
            let mut buf = buf;
            let result = if write {
                self.write_pieces(blob, &pieces, start, &buf).await
            } else {
                self.read_pieces(blob, &pieces, start, &mut buf).await
            };
            (result, buf)
        }))
    }

    /// The device offset for `len` bytes at io_unit `offset` when the request is valid and
    /// lies in one allocated cluster (the common case): every check of the slow path, one
    /// map load, shifts instead of divisions. `None` sends the request down the slow path,
    /// which reports errors and splits.
    #[inline]
    fn fast_target(&self, blob: &BlobIo, offset: u64, len: u64, write: bool) -> Option<u64> {
        let geometry = &self.store.geometry;
        let unit_shift = geometry.io_unit_shift?;
        let cluster_shift = geometry.cluster_shift?;
        if len == 0
            || len & (geometry.io_unit_size - 1) != 0
            || blob.gate.load(Ordering::Acquire) & gate_refusing(write) != 0
            || !Arc::ptr_eq(&blob.store, &self.store)
        {
            return None;
        }
        let start = offset
            .checked_shl(unit_shift)
            .filter(|s| s >> unit_shift == offset)?;
        let last = start.checked_add(len - 1)?;
        let index = start >> cluster_shift;
        if last >> cluster_shift != index {
            return None;
        }
        // The channel's cached map (refreshed when a resize or snapshot replaced it); the
        // I/O is counted in flight here, in the same borrow.
        let mut blobs = self.shared.blobs.borrow_mut();
        let entry = entry(&mut blobs, blob.slot);
        let generation = blob.map_generation.load(Ordering::Acquire);
        if entry.generation != generation || entry.map.is_none() {
            entry.map = Some(blob.map.load_full());
            entry.generation = generation;
        }
        let cluster = entry
            .map
            .as_ref()?
            .clusters
            .get(index as usize)?
            .load(Ordering::Acquire);
        if cluster == 0 {
            return None;
        }
        entry.inflight += 1;
        Some((u64::from(cluster) << cluster_shift) | (start & (geometry.cluster_size - 1)))
    }

    async fn read_pieces(
        &self,
        blob: &BlobIo,
        pieces: &[Piece],
        start: u64,
        out: &mut [u8],
    ) -> Result<()> {
        for piece in pieces {
            let at = (piece.offset - start) as usize;
            let dest = &mut out[at..at + piece.len as usize];
            self.read_piece(blob, piece, dest).await?;
        }
        Ok(())
    }

    async fn read_piece(&self, blob: &BlobIo, piece: &Piece, dest: &mut [u8]) -> Result<()> {
        match piece.target {
            Target::Device(device) => {
                let (result, tmp) = self.bdev().read(DmaBuf::alloc(dest.len())?, device).await;
                result?;
                dest.copy_from_slice(&tmp);
                Ok(())
            }
            Target::Unallocated { .. } => self.read_backing(blob, piece.offset, dest).await,
        }
    }

    /// Reads what an unallocated range of `blob` shows: its parent's data at the same
    /// offset (zeros past the parent's end), or zeros.
    fn read_backing<'a>(
        &'a self,
        blob: &'a BlobIo,
        offset: u64,
        dest: &'a mut [u8],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + 'a>> {
        self.read_parent(blob.parent.load_full(), offset, dest)
    }

    /// Reads what `parent` shows at `offset` (zeros past its end, or with no parent): what
    /// an unallocated range of its child shows.
    fn read_parent<'a>(
        &'a self,
        parent: Option<Arc<BlobIo>>,
        offset: u64,
        dest: &'a mut [u8],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + 'a>> {
        Box::pin(async move {
            let Some(parent) = parent else {
                dest.fill(0);
                return Ok(());
            };
            let parent_bytes = parent.num_io_units() * self.unit();
            let inside = parent_bytes.saturating_sub(offset).min(dest.len() as u64) as usize;
            dest[inside..].fill(0);
            if inside == 0 {
                return Ok(());
            }
            let pieces = self.pieces(&parent, offset, inside as u64);
            self.read_pieces(&parent, &pieces, offset, &mut dest[..inside])
                .await
        })
    }

    async fn write_pieces(
        &self,
        blob: &BlobIo,
        pieces: &[Piece],
        start: u64,
        data: &[u8],
    ) -> Result<()> {
        let end = start + data.len() as u64;
        let mut pieces = pieces.to_vec();
        // The map the pieces were planned against (the caller planned them just now).
        let mut planned = blob.map.load_full();
        let mut next = 0;
        let mut parked = None;
        while let Some(&piece) = pieces.get(next) {
            next += 1;
            let at = (piece.offset - start) as usize;
            let src = &data[at..at + piece.len as usize];
            match piece.target {
                Target::Device(device) => {
                    if let Some(guard) = parked.take() {
                        // A snapshot may have taken the blob's clusters while the write was
                        // parked: the rest is planned again against the map now.
                        thin::Parked::unpark(guard, blob).await;
                        planned = blob.map.load_full();
                        pieces = self.pieces(blob, piece.offset, end - piece.offset);
                        next = 0;
                        continue;
                    }
                    let mut tmp = DmaBuf::alloc(src.len())?;
                    tmp.copy_from_slice(src);
                    self.device_write(blob, tmp, device).await.0?;
                }
                Target::Unallocated { index } => {
                    self.write_unallocated(blob, index, piece.offset, Some(src), Some(&mut parked))
                        .await?;
                    // Parked meanwhile and unparked inside (a later piece's cluster was
                    // allocated by then): a snapshot may have handed the map over, taking
                    // the clusters the rest was planned against (sim seed 4111: the rest
                    // went to the new snapshot's cluster and the blob lost it). Still
                    // parked, the next device piece unparks and plans again.
                    let now = blob.map.load_full();
                    if parked.is_none() && !Arc::ptr_eq(&now, &planned) {
                        let done = piece.offset + piece.len;
                        planned = now;
                        pieces = self.pieces(blob, done, end - done);
                        next = 0;
                    }
                }
            }
        }
        Ok(())
    }

    /// Reads into `bufs` in order from io_unit `offset`.
    pub async fn readv(
        &self,
        blob: &BlobIo,
        offset: u64,
        bufs: Vec<DmaBuf>,
    ) -> (Result<()>, Vec<DmaBuf>) {
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        if total == 0 {
            return (Ok(()), bufs);
        }
        let _admitted = self.admit(blob).await;
        let (start, len) = match self.byte_range(blob, offset, total, false) {
            Ok(range) => range,
            Err(err) => return (Err(err), bufs),
        };
        let pieces = self.pieces(blob, start, len);
        if let [Piece {
            target: Target::Device(device),
            ..
        }] = pieces.as_slice()
        {
            let (result, bufs) = self.bdev().readv(bufs, *device).await;
            return (result.map_err(BlobError::from), bufs);
        }
        let mut flat = vec![0u8; total as usize];
        let result = self.read_pieces(blob, &pieces, start, &mut flat).await;
        let mut bufs = bufs;
        if result.is_ok() {
            let mut at = 0;
            for buf in &mut bufs {
                let n = buf.len();
                buf.copy_from_slice(&flat[at..at + n]);
                at += n;
            }
        }
        (result, bufs)
    }

    /// Writes `bufs` in order at io_unit `offset`.
    pub async fn writev(
        &self,
        blob: &BlobIo,
        offset: u64,
        bufs: Vec<DmaBuf>,
    ) -> (Result<()>, Vec<DmaBuf>) {
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        if total == 0 {
            let checked = self
                .check_store(blob)
                .and_then(|()| blob.check(offset, 0, true));
            return (checked, bufs);
        }
        let _admitted = self.admit(blob).await;
        let (start, len) = match self.byte_range(blob, offset, total, true) {
            Ok(range) => range,
            Err(err) => return (Err(err), bufs),
        };
        let pieces = self.pieces(blob, start, len);
        if let [Piece {
            target: Target::Device(device),
            ..
        }] = pieces.as_slice()
        {
            let (result, bufs) = self.device_writev(blob, bufs, *device).await;
            return (result.map_err(BlobError::from), bufs);
        }
        let flat: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
        let result = self.write_pieces(blob, &pieces, start, &flat).await;
        (result, bufs)
    }

    /// Deallocates `len` io_units at `offset` on the device where the blob has clusters
    /// (the blob keeps them; unallocated parts are a no-op). Advisory: a device without
    /// unmap succeeds.
    pub async fn unmap(&self, blob: &BlobIo, offset: u64, len: u64) -> Result<()> {
        let _admitted = self.admit(blob).await;
        self.check_store(blob)?;
        blob.check(offset, len, true)?;
        let unit = self.unit();
        for piece in self.pieces(blob, offset * unit, len * unit) {
            if let Target::Device(device) = piece.target {
                match self.device_unmap(blob, device, piece.len).await.0 {
                    Ok(()) => {}
                    Err(err) if err.errno() == -libc::ENOTSUP => {}
                    Err(err) => return Err(err.into()),
                }
            }
        }
        Ok(())
    }

    /// Makes every write completed on the device before this call durable (the device's
    /// flush; a device without a volatile cache succeeds at once). Thin writes are
    /// acknowledged only once their metadata is written, so a flush after them also makes
    /// their allocation durable.
    pub async fn flush(&self) -> Result<()> {
        crate::store::md_io::flush(self.bdev()).await
    }

    /// Writes zeros over `len` io_units at `offset`; allocates unallocated clusters of a
    /// thin blob (as SPDK does).
    pub async fn write_zeroes(&self, blob: &BlobIo, offset: u64, len: u64) -> Result<()> {
        let _admitted = self.admit(blob).await;
        self.check_store(blob)?;
        blob.check(offset, len, true)?;
        let unit = self.unit();
        let end = (offset + len) * unit;
        let mut pieces = self.pieces(blob, offset * unit, len * unit);
        let mut planned = blob.map.load_full();
        let mut next = 0;
        let mut parked = None;
        while let Some(&piece) = pieces.get(next) {
            next += 1;
            match piece.target {
                Target::Device(device) => {
                    if let Some(guard) = parked.take() {
                        // As in `write_pieces`: planned again after a park.
                        thin::Parked::unpark(guard, blob).await;
                        planned = blob.map.load_full();
                        pieces = self.pieces(blob, piece.offset, end - piece.offset);
                        next = 0;
                        continue;
                    }
                    self.device_zero(blob, device, piece.len).await?;
                }
                Target::Unallocated { index } => {
                    let zeros = vec![0u8; piece.len as usize];
                    self.write_unallocated(
                        blob,
                        index,
                        piece.offset,
                        Some(&zeros),
                        Some(&mut parked),
                    )
                    .await?;
                    // As in `write_pieces`: planned again if unparked inside after a hand-over.
                    let now = blob.map.load_full();
                    if parked.is_none() && !Arc::ptr_eq(&now, &planned) {
                        let done = piece.offset + piece.len;
                        planned = now;
                        pieces = self.pieces(blob, done, end - done);
                        next = 0;
                    }
                }
            }
        }
        Ok(())
    }
}

/// The future of [`BlobChannel::read`] and [`BlobChannel::write`]: yields the result and the
/// buffer. A request inside one allocated cluster is the bdev's own future (no allocation).
pub enum BlobIoFuture<'a> {
    /// One device request with the caller's buffer.
    Direct(DirectIo<'a>),
    /// Split at cluster boundaries, or touching unallocated clusters.
    Split(std::pin::Pin<Box<dyn std::future::Future<Output = (Result<()>, DmaBuf)> + 'a>>),
    /// Refused before reaching the device.
    Failed(Option<(BlobError, DmaBuf)>),
}

impl std::future::Future for BlobIoFuture<'_> {
    type Output = (Result<()>, DmaBuf);

    #[inline]
    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match self.get_mut() {
            BlobIoFuture::Direct(direct) => {
                let output = std::pin::Pin::new(&mut direct.request).poll(cx);
                if output.is_ready() {
                    direct.admitted = None;
                }
                output.map(|(result, buf)| (result.map_err(BlobError::from), buf))
            }
            BlobIoFuture::Split(future) => future.as_mut().poll(cx),
            BlobIoFuture::Failed(failed) => match failed.take() {
                Some(output) => std::task::Poll::Ready((Err(output.0), output.1)),
                None => std::task::Poll::Pending,
            },
        }
    }
}

/// A blob I/O that is one bdev request, counted in the blob's in-flight total until the
/// device has completed it: dropped before that, the request is counted in the blob's held
/// requests ([`HeldCount`]) until the device completes it (a freeze, the blob's last close,
/// unload and destroy wait for it).
pub struct DirectIo<'a> {
    request: spool_bdev::IoFuture<'a, DmaBuf>,
    admitted: Option<Admitted<'a>>,
}

impl Drop for DirectIo<'_> {
    fn drop(&mut self) {
        if let Some(admitted) = self.admitted.take() {
            // Held first, then out of the channel's count: never counted nowhere.
            self.request.hold_until_done(admitted.blob.held.hold());
            drop(admitted);
        }
    }
}
