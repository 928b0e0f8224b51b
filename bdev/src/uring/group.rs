//! The per-reactor io_uring "poll group": one [`Ring`] per reactor (per ring configuration),
//! shared by the channels of every uring bdev on that reactor, driven by one active poller.
//!
//! # Invariants
//!
//! * Only this module pushes SQEs (through [`Ring::push`]) and reaps CQEs for uring bdevs.
//! * `user_data` of every SQE is `(channel index << 32) | slot`. A slot has at most one SQE
//!   in the ring at a time (multi-step requests such as short-I/O resubmission or the
//!   write-zeroes fallback issue their steps one after another), so a CQE names exactly one
//!   step of one request.
//! * A channel's table entry holds a strong `Rc<IoSlots>` (and the channel's zero buffer)
//!   until every SQE it pushed has been reaped, even after the channel itself was destroyed:
//!   the buffers the kernel reads or writes are owned by those slots, so they cannot be freed
//!   under the kernel, and a CQE never finds its channel's state gone. A channel index is
//!   reused only after its entry was removed, i.e. when none of its SQEs is left in the ring.
//! * [`GroupState::ring`] is the first field, so when a group is destroyed the ring is dropped
//!   first; its `Drop` waits for every operation still in flight before the slots and
//!   buffers (the later fields) are released.
//! * A channel's SQEs that were pushed but not yet submitted are submitted before its file
//!   slot is unregistered, so a later channel reusing that file slot never receives them.
//! * Submission: channel `submit` only pushes SQEs (no syscall). The group poller makes at most
//!   one `io_uring_enter` per reactor loop pass, and only when SQEs were pushed since the last
//!   one; completions are read from the CQ ring without a syscall. A push that finds the SQ full
//!   parks the slot in the channel's overflow queue, retried at the start of the next pass.
//! * No allocation per I/O once the per-channel tables have grown to the queue depth in use.

// SQEs carry raw pointers into request buffers that the kernel accesses asynchronously;
// pushing them is `unsafe` (the contract of `Ring::push`). Only the push call sites here use it.
#![allow(unsafe_code)]

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use spool_reactor::{poller_register, IoDevice, PollStatus, PollerHandle};

use crate::dma::{dma_regions, DmaBuf};
use crate::error::BdevError;
use crate::io::{IoKind, IoRequest, IoSlots, SlotId};
use crate::uring::bdev::DeviceShared;
use crate::uring::blk;
use crate::uring::sys::{Ring, RingError, RingOp, RingOptions};

/// Bytes of the zeroed buffer a channel writes from when unmap/write-zeroes fall back to
/// writing zeros (allocated on first use, kept for the channel's life).
pub const ZERO_FILL_CHUNK: usize = 1 << 20;

/// Short reads/writes resubmitted for one request before it fails with -EIO.
pub const SHORT_IO_RETRIES_MAX: u8 = 8;

/// Largest byte count one read/write SQE asks for (a CQE result is an `i32`); longer requests
/// are issued in steps.
const RW_STEP_MAX: u64 = 1 << 30;

/// Idle time of the SQPOLL kernel thread, when SQPOLL is enabled.
const SQPOLL_IDLE_MS: u32 = 100;

/// Initial capacity of a channel's overflow queue (it grows only if more requests overflow).
const OVERFLOW_INITIAL: usize = 64;

/// The ring configuration a group is created with; bdevs with the same key share a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct RingKey {
    /// SQ entries.
    pub entries: u32,
    /// SQPOLL on.
    pub sqpoll: bool,
    /// SQPOLL thread CPU (None unless `sqpoll`).
    pub sqpoll_cpu: Option<u32>,
}

/// The process-wide group device for `key`, registered on first use.
pub(crate) fn group_device(key: RingKey) -> IoDevice<GroupCtx> {
    static GROUPS: OnceLock<Mutex<HashMap<RingKey, IoDevice<GroupCtx>>>> = OnceLock::new();
    let mut groups = GROUPS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    groups
        .entry(key)
        .or_insert_with(|| {
            IoDevice::register(
                format!("uring-group(entries={},sqpoll={})", key.entries, key.sqpoll),
                move |_reactor| GroupCtx::create(key),
                |_reactor, context| drop(context),
            )
        })
        .clone()
}

/// Counters of one reactor's uring group, for diagnostics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UringGroupStats {
    /// Process-unique id of this group's ring.
    pub group_id: u64,
    /// Channels (of any uring bdev) attached to this ring now, including destroyed channels
    /// still draining I/O.
    pub channels: usize,
    /// Operations pushed whose completion has not been reaped yet.
    pub in_flight: usize,
    /// SQEs pushed so far.
    pub sqes_pushed: u64,
    /// `io_uring_enter` submissions made so far (at most one per loop pass).
    pub enters: u64,
    /// CQEs reaped so far.
    pub completions: u64,
    /// Requests that found the SQ full and waited in an overflow queue.
    pub overflowed: u64,
    /// Short reads/writes that were resubmitted.
    pub short_resubmits: u64,
    /// Reads/writes pushed with the fixed-buffer opcodes.
    pub fixed_rw: u64,
    /// DMA regions registered with the ring as fixed buffers.
    pub fixed_regions: usize,
    /// Whether the ring uses SQPOLL.
    pub sqpoll: bool,
}

/// One reactor's group context: the shared state and the group's poller.
pub(crate) struct GroupCtx {
    /// Dropped first: unregisters the poller (which holds the other reference to `state`).
    _poller: PollerHandle,
    /// The ring and channel table.
    pub state: Rc<RefCell<GroupState>>,
}

impl GroupCtx {
    fn create(key: RingKey) -> Result<GroupCtx, i32> {
        let options = RingOptions {
            entries: key.entries,
            sqpoll_idle_ms: key.sqpoll.then_some(SQPOLL_IDLE_MS),
            sqpoll_cpu: if key.sqpoll { key.sqpoll_cpu } else { None },
        };
        let mut ring = Ring::new(&options).map_err(|err| {
            tracing::error!(%err, ?key, "creating the reactor's io_uring failed");
            err.errno()
        })?;
        let regions_tried = dma_regions().len();
        if let Err(err) = ring.register_dma_regions() {
            tracing::warn!(%err, "registering DMA buffers with io_uring failed");
        }
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let state = Rc::new(RefCell::new(GroupState {
            ring,
            channels: Vec::new(),
            free_indices: Vec::new(),
            unsubmitted: 0,
            overflow_waiting: 0,
            ready: Vec::new(),
            retry: Vec::new(),
            regions_tried,
            stats: UringGroupStats {
                group_id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                ..UringGroupStats::default()
            },
        }));
        let poll_state = Rc::clone(&state);
        let poller = poller_register("uring-group", None, move || {
            match poll_state.try_borrow_mut() {
                Ok(mut group) => group.poll(),
                // Unreachable in practice (nothing borrows the group across a loop pass);
                // try again next pass.
                Err(_) => PollStatus::Busy,
            }
        })
        .map_err(|err| err.errno())?;
        Ok(GroupCtx {
            _poller: poller,
            state,
        })
    }
}

/// What a request slot is doing in the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Phase {
    /// Read or write of the request's buffers.
    #[default]
    Rw,
    /// fdatasync.
    Fsync,
    /// fallocate(PUNCH_HOLE | KEEP_SIZE).
    Punch,
    /// fallocate(ZERO_RANGE | KEEP_SIZE).
    ZeroRange,
    /// Writing zeros from the channel's zero buffer, in chunks.
    ZeroFill,
}

/// Progress of one request slot.
#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    phase: Phase,
    /// Read or write (of the request's buffers, or of zeros).
    write: bool,
    /// Bytes done so far.
    done: u64,
    /// Bytes the SQE in flight asked for.
    issued: u64,
    /// Bytes the request covers.
    total: u64,
    /// Short transfers seen.
    shorts: u8,
}

/// One channel attached to the group.
struct ChannelEntry {
    slots: Rc<IoSlots>,
    dev: Arc<DeviceShared>,
    /// Registered file slot in the ring.
    file: u32,
    /// SQEs of this channel in the ring (pushed, not yet reaped).
    in_flight: u32,
    /// Slots waiting for SQ space, in order.
    overflow: VecDeque<SlotId>,
    /// Per-slot progress, indexed by slot (grows with the slot table).
    progress: Vec<Progress>,
    /// The zero-fill fallback's source buffer.
    zero_buf: Option<DmaBuf>,
    /// False once the channel was destroyed (the entry only drains its SQEs then).
    open: bool,
}

/// Why a step could not be pushed.
enum IssueError {
    /// The SQ is full: park the slot and retry next pass.
    Full,
    /// The request fails with this negative errno.
    Fail(i32),
}

/// What a CQE means for its request.
enum Outcome {
    /// The request is finished with this status.
    Done(i32),
    /// Issue the next step.
    Again,
}

/// One reactor's ring and the channels using it.
pub(crate) struct GroupState {
    /// Must stay the first field: dropped first, it waits for every operation in flight
    /// before the buffers owned by `channels` are released.
    ring: Ring,
    channels: Vec<Option<ChannelEntry>>,
    free_indices: Vec<u32>,
    /// SQEs pushed since the last submit.
    unsubmitted: usize,
    /// Slots waiting in overflow queues, over all channels.
    overflow_waiting: usize,
    /// Completions decided without the ring (ioctls, push failures), delivered by the poller.
    ready: Vec<(u32, SlotId, i32)>,
    /// Slots whose next step is issued after the current reap.
    retry: Vec<(u32, SlotId)>,
    /// DMA regions below this index were offered to `register_dma_regions` already.
    regions_tried: usize,
    stats: UringGroupStats,
}

#[inline]
fn user_data(channel: u32, slot: SlotId) -> u64 {
    (u64::from(channel) << 32) | u64::from(slot)
}

impl GroupState {
    /// Attaches a channel of `dev` whose requests live in `slots`; returns its index.
    pub(crate) fn add_channel(
        &mut self,
        dev: Arc<DeviceShared>,
        slots: Rc<IoSlots>,
    ) -> Result<u32, BdevError> {
        use std::os::fd::AsRawFd;
        let file = self
            .ring
            .register_file(dev.file.as_raw_fd())
            .map_err(|err| BdevError::Open {
                name: dev.path.display().to_string(),
                reason: format!("registering the file with the reactor's io_uring: {err}"),
                errno: err.errno(),
            })?;
        let entry = ChannelEntry {
            slots,
            dev,
            file,
            in_flight: 0,
            overflow: VecDeque::with_capacity(OVERFLOW_INITIAL),
            progress: Vec::new(),
            zero_buf: None,
            open: true,
        };
        let index = match self.free_indices.pop() {
            Some(index) => {
                self.channels[index as usize] = Some(entry);
                index
            }
            None => {
                self.channels.push(Some(entry));
                // At most FILE_SLOTS channels can be attached, far below u32::MAX.
                (self.channels.len() - 1) as u32
            }
        };
        Ok(index)
    }

    /// Detaches channel `index` (its channel is being destroyed): requests not yet in the ring
    /// are cancelled, and the entry stays until its SQEs in the ring have completed.
    pub(crate) fn close_channel(&mut self, index: u32) {
        // Hand pushed-but-unsubmitted SQEs to the kernel before the file slot can be reused.
        if self.unsubmitted > 0 {
            self.submit();
        }
        let Some(entry) = self
            .channels
            .get_mut(index as usize)
            .and_then(Option::as_mut)
        else {
            return;
        };
        entry.open = false;
        if let Err(err) = self.ring.unregister_file(entry.file) {
            tracing::warn!(%err, "unregistering a uring bdev file from the ring failed");
        }
        while let Some(slot) = entry.overflow.pop_front() {
            self.overflow_waiting -= 1;
            entry.slots.complete(slot, -libc::ECANCELED);
        }
        self.ready.retain(|&(channel, slot, status)| {
            if channel == index {
                entry.slots.complete(slot, status);
                false
            } else {
                true
            }
        });
        if entry.in_flight == 0 {
            self.channels[index as usize] = None;
            self.free_indices.push(index);
        }
    }

    /// Starts the validated request in `slot` of channel `index`.
    pub(crate) fn start_request(&mut self, index: u32, slot: SlotId) {
        let Some(entry) = self
            .channels
            .get_mut(index as usize)
            .and_then(Option::as_mut)
        else {
            return;
        };
        let (kind, offset, total) = entry
            .slots
            .with(slot, |req| (req.kind, req.offset_bytes, req.len_bytes));
        let dev = &entry.dev;
        let phase = match kind {
            IoKind::Read | IoKind::Write => Phase::Rw,
            IoKind::Flush => Phase::Fsync,
            IoKind::Unmap | IoKind::WriteZeroes => {
                let zeroes = kind == IoKind::WriteZeroes;
                let flag = if zeroes {
                    &dev.zeroes_fill
                } else {
                    &dev.unmap_fill
                };
                if flag.load(Ordering::Relaxed) {
                    Phase::ZeroFill
                } else if dev.block_device {
                    // A blocking ioctl on the reactor: acceptable for these rare operations.
                    let result = if zeroes {
                        blk::zeroout(&dev.file, offset, total)
                    } else {
                        blk::discard(&dev.file, offset, total)
                    };
                    match result {
                        Ok(()) => {
                            self.ready.push((index, slot, 0));
                            return;
                        }
                        Err(errno) if falls_back(errno) => {
                            note_fallback(dev, zeroes, errno);
                            Phase::ZeroFill
                        }
                        Err(errno) => {
                            self.ready.push((index, slot, errno));
                            return;
                        }
                    }
                } else if zeroes {
                    Phase::ZeroRange
                } else {
                    Phase::Punch
                }
            }
        };
        let slot_index = slot as usize;
        if entry.progress.len() <= slot_index {
            entry.progress.resize(slot_index + 1, Progress::default());
        }
        entry.progress[slot_index] = Progress {
            phase,
            write: kind != IoKind::Read,
            done: 0,
            issued: 0,
            total,
            shorts: 0,
        };
        self.issue_or_park(index, slot);
    }

    /// Issues the next step of `slot`, or parks it in the overflow queue when the SQ is full
    /// (or others are already waiting, to keep order).
    fn issue_or_park(&mut self, index: u32, slot: SlotId) {
        let Some(entry) = self
            .channels
            .get_mut(index as usize)
            .and_then(Option::as_mut)
        else {
            return;
        };
        if !entry.overflow.is_empty() {
            entry.overflow.push_back(slot);
            self.overflow_waiting += 1;
            self.stats.overflowed += 1;
            return;
        }
        match issue(
            &mut self.ring,
            entry,
            index,
            slot,
            &mut self.regions_tried,
            &mut self.stats,
        ) {
            Ok(()) => self.unsubmitted += 1,
            Err(IssueError::Full) => {
                entry.overflow.push_back(slot);
                self.overflow_waiting += 1;
                self.stats.overflowed += 1;
            }
            Err(IssueError::Fail(errno)) => self.ready.push((index, slot, errno)),
        }
    }

    /// Retries parked slots while the SQ has room.
    fn drain_overflow(&mut self) {
        for index in 0..self.channels.len() {
            let Some(entry) = self.channels[index].as_mut() else {
                continue;
            };
            let channel = index as u32;
            while let Some(&slot) = entry.overflow.front() {
                match issue(
                    &mut self.ring,
                    entry,
                    channel,
                    slot,
                    &mut self.regions_tried,
                    &mut self.stats,
                ) {
                    Ok(()) => self.unsubmitted += 1,
                    Err(IssueError::Full) => return,
                    Err(IssueError::Fail(errno)) => entry.slots.complete(slot, errno),
                }
                entry.overflow.pop_front();
                self.overflow_waiting -= 1;
            }
        }
    }

    /// One `io_uring_enter` for everything pushed since the last one.
    fn submit(&mut self) {
        self.stats.enters += 1;
        match self.ring.submit() {
            Ok(submitted) => self.unsubmitted = self.unsubmitted.saturating_sub(submitted),
            // EAGAIN/EBUSY: the kernel is short of resources; the SQEs stay queued and are
            // submitted on a later pass, after completions were reaped.
            Err(err) if matches!(err.errno(), e if e == -libc::EAGAIN || e == -libc::EBUSY) => {}
            Err(err) => {
                tracing::warn!(%err, "io_uring submit failed; retrying next pass");
            }
        }
    }

    /// The group poller: deliver ready completions, retry overflow, submit, reap.
    pub(crate) fn poll(&mut self) -> PollStatus {
        let mut busy = false;
        if !self.ready.is_empty() {
            busy = true;
            let mut ready = std::mem::take(&mut self.ready);
            for &(index, slot, status) in &ready {
                if let Some(Some(entry)) = self.channels.get(index as usize) {
                    entry.slots.complete(slot, status);
                }
            }
            ready.clear();
            if self.ready.is_empty() {
                self.ready = ready;
            }
        }
        if self.overflow_waiting > 0 {
            busy = true;
            self.drain_overflow();
        }
        if self.unsubmitted > 0 {
            busy = true;
            self.submit();
        }
        let GroupState {
            ring,
            channels,
            free_indices,
            retry,
            stats,
            ..
        } = self;
        let reaped = ring.reap(|user_data, result| {
            let index = (user_data >> 32) as u32;
            let slot = user_data as SlotId;
            let Some(Some(entry)) = channels.get_mut(index as usize) else {
                tracing::error!(user_data, "io_uring completion for an unknown channel");
                return;
            };
            entry.in_flight -= 1;
            if !entry.open {
                // The channel is gone; its requests were all abandoned: just release them.
                entry.slots.complete(slot, result.min(0));
                if entry.in_flight == 0 {
                    channels[index as usize] = None;
                    free_indices.push(index);
                }
                return;
            }
            match on_completion(entry, slot, result, stats) {
                Outcome::Done(status) => entry.slots.complete(slot, status),
                Outcome::Again => retry.push((index, slot)),
            }
        });
        if reaped > 0 {
            busy = true;
            self.stats.completions += reaped as u64;
        }
        if !self.retry.is_empty() {
            let mut retry = std::mem::take(&mut self.retry);
            for &(index, slot) in &retry {
                self.issue_or_park(index, slot);
            }
            retry.clear();
            self.retry = retry;
        }
        if busy {
            PollStatus::Busy
        } else if self.ring.in_flight() > 0 {
            PollStatus::Waiting
        } else {
            PollStatus::Idle
        }
    }

    /// A snapshot of the counters.
    pub(crate) fn stats(&self) -> UringGroupStats {
        UringGroupStats {
            channels: self.channels.iter().filter(|c| c.is_some()).count(),
            in_flight: self.ring.in_flight(),
            fixed_rw: self.ring.fixed_rw_pushed(),
            fixed_regions: self.ring.fixed_region_count(),
            sqpoll: self.ring.is_sqpoll(),
            ..self.stats
        }
    }
}

/// Whether a failed fallocate/ioctl means "not supported here; write zeros instead".
fn falls_back(errno: i32) -> bool {
    errno == -libc::EOPNOTSUPP || errno == -libc::EINVAL
}

fn note_fallback(dev: &DeviceShared, zeroes: bool, errno: i32) {
    let flag = if zeroes {
        &dev.zeroes_fill
    } else {
        &dev.unmap_fill
    };
    if !flag.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            path = %dev.path.display(),
            errno,
            op = if zeroes { "write_zeroes" } else { "unmap" },
            "not supported by the file or device; falling back to writing zeros"
        );
    }
}

/// Decides what the CQE `result` of `slot`'s step means.
fn on_completion(
    entry: &mut ChannelEntry,
    slot: SlotId,
    result: i32,
    stats: &mut UringGroupStats,
) -> Outcome {
    let Some(progress) = entry.progress.get_mut(slot as usize) else {
        return Outcome::Done(-libc::EIO);
    };
    if result < 0 {
        if matches!(progress.phase, Phase::Punch | Phase::ZeroRange) && falls_back(result) {
            note_fallback(&entry.dev, progress.phase == Phase::ZeroRange, result);
            progress.phase = Phase::ZeroFill;
            progress.done = 0;
            return Outcome::Again;
        }
        return Outcome::Done(result);
    }
    match progress.phase {
        Phase::Fsync | Phase::Punch | Phase::ZeroRange => Outcome::Done(0),
        Phase::Rw | Phase::ZeroFill => {
            let got = u64::from(result.unsigned_abs());
            if got == 0 {
                // End of file (the file shrank under us) or no progress: never hang.
                return Outcome::Done(-libc::EIO);
            }
            progress.done += got.min(progress.issued);
            if got < progress.issued {
                progress.shorts += 1;
                stats.short_resubmits += 1;
                if progress.shorts > SHORT_IO_RETRIES_MAX {
                    return Outcome::Done(-libc::EIO);
                }
            }
            if progress.done >= progress.total {
                Outcome::Done(0)
            } else {
                Outcome::Again
            }
        }
    }
}

/// Fills `req.iovecs` with the request's buffers from byte `skip` on, at most `cap` bytes;
/// returns the bytes described.
fn fill_iovecs(req: &mut IoRequest, mut skip: u64, cap: u64) -> u64 {
    req.iovecs.clear();
    let mut total = 0u64;
    for buf in &mut req.bufs {
        let len = buf.len() as u64;
        if skip >= len {
            skip -= len;
            continue;
        }
        let take = (len - skip).min(cap - total);
        req.iovecs.push(libc::iovec {
            iov_base: buf.as_mut_ptr().wrapping_add(skip as usize).cast(),
            iov_len: take as usize,
        });
        skip = 0;
        total += take;
        if total >= cap {
            break;
        }
    }
    total
}

/// Registers DMA regions again when `region` is new since the last attempt (the pool grew).
#[inline]
fn ensure_fixed(ring: &mut Ring, region: Option<u16>, regions_tried: &mut usize) {
    if let Some(region) = region {
        let index = usize::from(region);
        if index >= *regions_tried && !ring.is_fixed_region(region) {
            if let Err(err) = ring.register_dma_regions() {
                tracing::warn!(%err, "registering new DMA regions with io_uring failed");
            }
            *regions_tried = index + 1;
        }
    }
}

/// Pushes the next step of `slot` (per its progress) to the ring.
fn issue(
    ring: &mut Ring,
    entry: &mut ChannelEntry,
    index: u32,
    slot: SlotId,
    regions_tried: &mut usize,
    stats: &mut UringGroupStats,
) -> Result<(), IssueError> {
    let ud = user_data(index, slot);
    let file = entry.file;
    let Some(progress) = entry.progress.get_mut(slot as usize) else {
        return Err(IssueError::Fail(-libc::EIO));
    };
    let remaining = progress.total.saturating_sub(progress.done);
    let done = progress.done;
    let (result, issued) = match progress.phase {
        Phase::Rw => {
            let write = progress.write;
            entry.slots.with(slot, |req| {
                let offset = req.offset_bytes + done;
                if let [buf] = req.bufs.as_mut_slice() {
                    let len = remaining.min(RW_STEP_MAX);
                    let region = buf.fixed_region();
                    ensure_fixed(ring, region, regions_tried);
                    let ptr = buf.as_mut_ptr().wrapping_add(done as usize);
                    let op = if write {
                        RingOp::Write {
                            file,
                            buf: ptr.cast_const(),
                            len: len as u32,
                            offset,
                            fixed_region: region,
                        }
                    } else {
                        RingOp::Read {
                            file,
                            buf: ptr,
                            len: len as u32,
                            offset,
                            fixed_region: region,
                        }
                    };
                    // SAFETY: `ptr..ptr + len` lies inside `buf` (done + len <= buf.len()), a
                    // DmaBuf owned by this slot's request. The slot is completed, and its
                    // buffers handed back or dropped, only after this SQE's CQE is reaped
                    // (`GroupState::poll`); a destroyed channel's entry keeps the slots alive
                    // until then, and a dropped group drops its ring (which waits) first.
                    (unsafe { ring.push(&op, ud) }, len)
                } else {
                    let len = fill_iovecs(req, done, RW_STEP_MAX);
                    let count = req.iovecs.len() as u32;
                    let iovecs = req.iovecs.as_ptr();
                    let op = if write {
                        RingOp::Writev {
                            file,
                            iovecs,
                            count,
                            offset,
                        }
                    } else {
                        RingOp::Readv {
                            file,
                            iovecs,
                            count,
                            offset,
                        }
                    };
                    // SAFETY: the iovec array is the slot's `iovecs` scratch, whose heap
                    // memory is neither touched nor freed until this SQE's CQE is reaped (it
                    // is only rewritten when the slot's next step is issued); every iovec
                    // points inside a DmaBuf owned by the slot. Both stay alive until the CQE
                    // is reaped, as for the single-buffer case above.
                    (unsafe { ring.push(&op, ud) }, len)
                }
            })
        }
        Phase::Fsync => {
            let op = RingOp::Fsync {
                file,
                datasync: true,
            };
            // SAFETY: an fsync references no memory.
            (unsafe { ring.push(&op, ud) }, 0)
        }
        Phase::Punch | Phase::ZeroRange => {
            let mode = if progress.phase == Phase::Punch {
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
            } else {
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
            };
            let offset = entry.slots.with(slot, |req| req.offset_bytes);
            let op = RingOp::Fallocate {
                file,
                mode,
                offset,
                len: remaining,
            };
            // SAFETY: a fallocate references no memory.
            (unsafe { ring.push(&op, ud) }, 0)
        }
        Phase::ZeroFill => {
            if entry.zero_buf.is_none() {
                match DmaBuf::alloc_zeroed(ZERO_FILL_CHUNK) {
                    Ok(buf) => entry.zero_buf = Some(buf),
                    Err(err) => return Err(IssueError::Fail(err.errno())),
                }
            }
            let Some(zero) = entry.zero_buf.as_ref() else {
                return Err(IssueError::Fail(-libc::ENOMEM));
            };
            let len = remaining.min(zero.len() as u64);
            let region = zero.fixed_region();
            ensure_fixed(ring, region, regions_tried);
            let offset = entry.slots.with(slot, |req| req.offset_bytes) + done;
            let op = RingOp::Write {
                file,
                buf: zero.as_ptr(),
                len: len as u32,
                offset,
                fixed_region: region,
            };
            // SAFETY: the zero buffer belongs to this channel's entry, which is removed (and
            // the buffer freed) only after every SQE of the channel has been reaped; the ring,
            // dropped first, waits for them otherwise. It is never written after allocation.
            (unsafe { ring.push(&op, ud) }, len)
        }
    };
    match result {
        Ok(()) => {
            progress.issued = issued;
            entry.in_flight += 1;
            stats.sqes_pushed += 1;
            Ok(())
        }
        Err(RingError::SqFull) => Err(IssueError::Full),
        Err(err) => Err(IssueError::Fail(err.errno())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    fn entry_with(slots: Rc<IoSlots>, progress: Progress) -> ChannelEntry {
        let dev = Arc::new(DeviceShared {
            file: tempfile::tempfile().expect("tempfile"),
            path: "test".into(),
            block_device: false,
            unmap_fill: AtomicBool::new(false),
            zeroes_fill: AtomicBool::new(false),
        });
        ChannelEntry {
            slots,
            dev,
            file: 0,
            in_flight: 0,
            overflow: VecDeque::new(),
            progress: vec![progress],
            zero_buf: None,
            open: true,
        }
    }

    #[test]
    fn iovecs_skip_done_bytes_and_respect_the_cap() {
        let slots = IoSlots::default();
        let slot = slots.acquire(IoKind::Read, 0, 12288).expect("slot");
        slots.with(slot, |req| {
            for len in [6144, 2048, 4096] {
                req.bufs.push(DmaBuf::alloc(len).expect("alloc"));
            }
            assert_eq!(fill_iovecs(req, 0, u64::MAX), 12288);
            assert_eq!(req.iovecs.len(), 3);
            assert_eq!(fill_iovecs(req, 7000, u64::MAX), 12288 - 7000);
            assert_eq!(req.iovecs.len(), 2);
            assert_eq!(req.iovecs[0].iov_len, 8192 - 7000);
            let base = req.bufs[1].as_ptr() as usize;
            assert_eq!(req.iovecs[0].iov_base as usize, base + (7000 - 6144));
            assert_eq!(fill_iovecs(req, 1000, 6000), 6000);
            assert_eq!(req.iovecs.len(), 2);
            assert_eq!(req.iovecs[1].iov_len, 6000 - (6144 - 1000));
        });
    }

    #[test]
    fn short_transfers_resume_and_stalls_fail_with_eio() {
        let mut stats = UringGroupStats::default();
        let rw = Progress {
            phase: Phase::Rw,
            write: false,
            done: 0,
            issued: 8192,
            total: 8192,
            shorts: 0,
        };
        let mut entry = entry_with(Rc::new(IoSlots::default()), rw);
        assert!(matches!(
            on_completion(&mut entry, 0, 4096, &mut stats),
            Outcome::Again
        ));
        assert_eq!(entry.progress[0].done, 4096);
        entry.progress[0].issued = 4096;
        assert!(matches!(
            on_completion(&mut entry, 0, 4096, &mut stats),
            Outcome::Done(0)
        ));
        assert_eq!(stats.short_resubmits, 1);
        // End of file: 0 bytes is an error, never a retry loop.
        entry.progress[0] = rw;
        assert!(matches!(
            on_completion(&mut entry, 0, 0, &mut stats),
            Outcome::Done(e) if e == -libc::EIO
        ));
        // Endless short transfers give up after SHORT_IO_RETRIES_MAX.
        entry.progress[0] = Progress {
            total: 1 << 20,
            issued: 1 << 20,
            ..rw
        };
        let mut outcomes = 0;
        while let Outcome::Again = on_completion(&mut entry, 0, 512, &mut stats) {
            outcomes += 1;
        }
        assert_eq!(outcomes, usize::from(SHORT_IO_RETRIES_MAX));
        entry.progress[0] = rw;
        assert!(matches!(
            on_completion(&mut entry, 0, -libc::EIO, &mut stats),
            Outcome::Done(e) if e == -libc::EIO
        ));
    }

    #[test]
    fn refused_fallocate_switches_to_zero_fill_and_remembers() {
        let mut stats = UringGroupStats::default();
        let punch = Progress {
            phase: Phase::Punch,
            total: 8192,
            ..Progress::default()
        };
        let mut entry = entry_with(Rc::new(IoSlots::default()), punch);
        assert!(matches!(
            on_completion(&mut entry, 0, -libc::EOPNOTSUPP, &mut stats),
            Outcome::Again
        ));
        assert_eq!(entry.progress[0].phase, Phase::ZeroFill);
        assert!(entry.dev.unmap_fill.load(Ordering::Relaxed));
        assert!(!entry.dev.zeroes_fill.load(Ordering::Relaxed));
        // Other errors are reported as they are.
        entry.progress[0] = Progress {
            phase: Phase::ZeroRange,
            ..punch
        };
        assert!(matches!(
            on_completion(&mut entry, 0, -libc::EIO, &mut stats),
            Outcome::Done(e) if e == -libc::EIO
        ));
    }
}
