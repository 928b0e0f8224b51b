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
//! * A channel's registered file slot stays registered (reserved) until its entry is removed,
//!   i.e. until none of its SQEs is left in the ring, queued or in flight. `register_file`
//!   takes the lowest free slot, so releasing it earlier would let another bdev's channel
//!   take it and receive the closed channel's queued writes (with SQPOLL, or after an
//!   `EAGAIN`/`EBUSY` enter, pushed SQEs can stay queued for a while).
//! * Group lifetime: when the reactor's last uring channel is destroyed while operations are
//!   still in flight, the group is not dropped (dropping it would block the reactor until the
//!   disk finished them): its poller keeps running, owned by the group itself
//!   ([`GroupState::drain_poller`]), and unregisters itself once nothing is in flight; the
//!   group is freed at the end of that loop pass. Only when the reactor stops with I/O still
//!   in flight is a group dropped early: its `Drop` then blocks in [`Ring::close`] until the
//!   kernel is done, which is acceptable because the reactor is exiting.
//! * A group is freed only after [`Ring::close`] returned `Ok` (the kernel is done with every
//!   buffer). If it fails, the channel table (slots, buffers, zero buffers) is leaked with
//!   `std::mem::forget` instead of freed under the kernel.
//! * Submission failures: `EAGAIN`/`EBUSY` enters are retried on later passes. After
//!   [`ENTER_FAILURES_MAX`] other failures in a row, the ring is retired: the SQEs the kernel
//!   never consumed are retracted ([`Ring::retract_queued`]) and their requests, those waiting
//!   for SQ space, and every later request on this group fail with the errno (the group is
//!   replaced once the reactor's uring channels are all gone). With SQPOLL the queued SQEs
//!   cannot be retracted (the kernel thread may take them at any time): they stay in flight,
//!   and only new and parked requests fail.
//! * Submission: channel `submit` only pushes SQEs (no syscall). The group poller makes at most
//!   one `io_uring_enter` per reactor loop pass, and only when SQEs were pushed since the last
//!   one; completions are read from the CQ ring without a syscall. A push that finds the SQ full
//!   parks the slot in the channel's overflow queue, retried at the start of the next pass.
//! * No allocation per I/O once the per-channel tables have grown to the queue depth in use.

// SQEs carry raw pointers into request buffers that the kernel accesses asynchronously;
// pushing them is `unsafe` (the contract of `Ring::push`). Only the push call sites here use it.
#![allow(unsafe_code)]

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use spool_reactor::{poller_register, IoDevice, PollStatus, PollerHandle};

use crate::dma::{dma_regions, DmaBuf};
use crate::error::BdevError;
use crate::io::{IoKind, IoRequest, IoSlots, SlotId, WakeBatch};
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

/// Consecutive failed `io_uring_enter` submissions (other than `EAGAIN`/`EBUSY`) after which
/// the ring is retired and its unsubmitted requests fail. One pass apart each, this rides out
/// a transient failure (e.g. a signal-related error or a brief resource shortage reported as
/// another errno) while still failing requests within microseconds to milliseconds, instead
/// of leaving them hanging forever.
pub const ENTER_FAILURES_MAX: u32 = 64;

thread_local! {
    /// Groups on this thread whose channels are all gone, still reaping I/O in flight.
    static DRAINING_GROUPS: Cell<usize> = const { Cell::new(0) };
}

/// Groups on the calling thread (reactor) whose last channel was destroyed while I/O was in
/// flight, and that stay alive (polled) until it completes.
pub(crate) fn draining_groups() -> usize {
    DRAINING_GROUPS.try_with(Cell::get).unwrap_or(0)
}

/// The poller of a group whose context was destroyed with I/O in flight, owned by the group
/// until it drained; counted in [`draining_groups`].
struct DrainingPoller {
    _handle: PollerHandle,
}

impl DrainingPoller {
    fn new(handle: PollerHandle) -> DrainingPoller {
        let _ = DRAINING_GROUPS.try_with(|count| count.set(count.get() + 1));
        DrainingPoller { _handle: handle }
    }
}

impl Drop for DrainingPoller {
    fn drop(&mut self) {
        let _ = DRAINING_GROUPS.try_with(|count| count.set(count.get().saturating_sub(1)));
    }
}

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
    /// 0, or the negative errno of the persistent submission failure after which the ring was
    /// retired (every later request on this group fails with it).
    pub ring_error: i32,
}

/// One reactor's group context: the shared state and the group's poller.
pub(crate) struct GroupCtx {
    /// The group's poller (which holds the other reference to `state`). On drop, it is either
    /// unregistered (nothing in flight) or handed to the group to drain (see the module docs).
    poller: Option<PollerHandle>,
    /// The ring and channel table.
    pub state: Rc<RefCell<GroupState>>,
}

impl Drop for GroupCtx {
    fn drop(&mut self) {
        let Some(poller) = self.poller.take() else {
            return;
        };
        if let Ok(mut group) = self.state.try_borrow_mut() {
            if group.has_pending_io() {
                // Keep polling until the kernel is done, without blocking the reactor now.
                tracing::debug!(
                    in_flight = group.ring.in_flight(),
                    "last uring channel gone with I/O in flight; the ring drains in the background"
                );
                group.drain_poller = Some(DrainingPoller::new(poller));
                return;
            }
        }
        // Nothing in flight: unregistering drops the poller's reference, then `state` drops
        // the group, whose ring closes at once.
        drop(poller);
    }
}

impl GroupCtx {
    fn create(key: RingKey) -> Result<GroupCtx, i32> {
        let options = RingOptions {
            entries: key.entries,
            sqpoll_idle_ms: key.sqpoll.then_some(SQPOLL_IDLE_MS),
            sqpoll_cpu: if key.sqpoll { key.sqpoll_cpu } else { None },
        };
        let ring = Ring::new(&options).map_err(|err| {
            tracing::error!(%err, ?key, "creating the reactor's io_uring failed");
            err.errno()
        })?;
        let state = Rc::new(RefCell::new(GroupState::new(ring, key.entries)));
        let poll_state = Rc::clone(&state);
        let poller = poller_register("uring-group", None, move || {
            let (status, drained) = match poll_state.try_borrow_mut() {
                Ok(mut group) => {
                    let status = group.poll();
                    let drained = if group.drain_poller.is_some() && !group.has_pending_io() {
                        group.drain_poller.take()
                    } else {
                        None
                    };
                    (status, drained)
                }
                // Unreachable in practice (nothing borrows the group across a loop pass);
                // try again next pass.
                Err(_) => (PollStatus::Busy, None),
            };
            // A drained group whose context is gone: unregister this very poller. The reactor
            // removes it at the end of this pass, dropping the last reference to the group.
            drop(drained);
            status
        })
        .map_err(|err| err.errno())?;
        Ok(GroupCtx {
            poller: Some(poller),
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
    /// Closed (waited for) by `Drop` before the buffers owned by `channels` are released.
    ring: Ring,
    channels: Vec<Option<ChannelEntry>>,
    free_indices: Vec<u32>,
    /// `user_data` of the SQEs pushed but not consumed by the kernel yet, in push order.
    queued: VecDeque<u64>,
    /// Failed submissions in a row (not counting `EAGAIN`/`EBUSY`).
    enter_failures: u32,
    /// The errno the ring was retired with; every later request fails with it.
    failed: Option<i32>,
    /// Closed channels whose last SQE was just reaped; removed after the reap.
    finished: Vec<u32>,
    /// Set when the group's context was destroyed with I/O in flight: the group's own poller,
    /// kept until everything drained (see the module docs).
    drain_poller: Option<DrainingPoller>,
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
    /// A group driving `ring` (created with `entries` SQ entries).
    fn new(mut ring: Ring, entries: u32) -> GroupState {
        let regions_tried = dma_regions().len();
        if let Err(err) = ring.register_dma_regions() {
            tracing::warn!(%err, "registering DMA buffers with io_uring failed");
        }
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        GroupState {
            ring,
            channels: Vec::new(),
            free_indices: Vec::new(),
            queued: VecDeque::with_capacity(entries as usize),
            enter_failures: 0,
            failed: None,
            finished: Vec::new(),
            drain_poller: None,
            overflow_waiting: 0,
            ready: Vec::new(),
            retry: Vec::new(),
            regions_tried,
            stats: UringGroupStats {
                group_id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                ..UringGroupStats::default()
            },
        }
    }

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
    /// are cancelled, and the entry (with its file slot) stays until its SQEs in the ring,
    /// queued or in flight, have completed.
    pub(crate) fn close_channel(&mut self, index: u32) {
        let Some(entry) = self
            .channels
            .get_mut(index as usize)
            .and_then(Option::as_mut)
        else {
            return;
        };
        entry.open = false;
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
            self.remove_entry(index);
        }
    }

    /// Removes channel `index`'s entry, none of whose SQEs is left in the ring, and only now
    /// releases its file slot.
    fn remove_entry(&mut self, index: u32) {
        let Some(entry) = self.channels.get_mut(index as usize).and_then(Option::take) else {
            return;
        };
        debug_assert_eq!(entry.in_flight, 0);
        if let Err(err) = self.ring.unregister_file(entry.file) {
            // The slot stays marked in use in the ring, so it is never handed out again.
            tracing::warn!(%err, "unregistering a uring bdev file from the ring failed");
        }
        self.free_indices.push(index);
    }

    /// Whether anything is still in flight, queued or attached (the group must stay).
    fn has_pending_io(&self) -> bool {
        self.ring.in_flight() > 0
            || !self.ready.is_empty()
            || self.channels.iter().any(Option::is_some)
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
        if let Some(errno) = self.failed {
            self.ready.push((index, slot, errno));
            return;
        }
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
            Ok(()) => self.queued.push_back(user_data(index, slot)),
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
                    Ok(()) => self.queued.push_back(user_data(channel, slot)),
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
            Ok(submitted) => {
                self.enter_failures = 0;
                // The kernel consumes SQEs in order.
                let accepted = submitted.min(self.queued.len());
                self.queued.drain(..accepted);
            }
            // EAGAIN/EBUSY: the kernel is short of resources; the SQEs stay queued and are
            // submitted on a later pass, after completions were reaped.
            Err(err) if matches!(err.errno(), e if e == -libc::EAGAIN || e == -libc::EBUSY) => {}
            Err(err) => {
                self.enter_failures = self.enter_failures.saturating_add(1);
                if self.enter_failures == 1 {
                    tracing::warn!(%err, "io_uring submit failed; retrying on the next passes");
                }
                if self.enter_failures >= ENTER_FAILURES_MAX {
                    self.fail_ring(err.errno());
                }
            }
        }
    }

    /// Retires the ring after a persistent submission failure: the requests whose SQEs the
    /// kernel never consumed, those parked for SQ space, and every later one fail with
    /// `errno` (see the module docs).
    fn fail_ring(&mut self, errno: i32) {
        if self.failed.is_some() {
            return;
        }
        self.failed = Some(errno);
        self.stats.ring_error = errno;
        let queued = self.queued.len();
        match self.ring.retract_queued() {
            Some(retracted) => {
                tracing::error!(
                    errno,
                    retracted,
                    in_flight = self.ring.in_flight(),
                    "io_uring submission keeps failing; failing its unsubmitted requests and \
                     every later one on this reactor's ring"
                );
                // The retracted SQEs are the last ones pushed; any before them were consumed
                // after all and complete normally.
                let keep = queued.saturating_sub(retracted);
                let dead: Vec<u64> = self.queued.drain(keep..).collect();
                self.queued.clear();
                for user_data in dead {
                    let index = (user_data >> 32) as u32;
                    let slot = user_data as SlotId;
                    let Some(Some(entry)) = self.channels.get_mut(index as usize) else {
                        continue;
                    };
                    entry.in_flight -= 1;
                    entry.slots.complete(slot, errno);
                    if !entry.open && entry.in_flight == 0 {
                        self.finished.push(index);
                    }
                }
            }
            None => tracing::error!(
                errno,
                queued,
                "io_uring (SQPOLL) submission keeps failing; its queued requests cannot be \
                 retracted and stay in flight; later requests on this reactor's ring fail"
            ),
        }
        for entry in self.channels.iter_mut().flatten() {
            while let Some(slot) = entry.overflow.pop_front() {
                self.overflow_waiting -= 1;
                entry.slots.complete(slot, errno);
            }
        }
        while let Some(index) = self.finished.pop() {
            self.remove_entry(index);
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
        if !self.queued.is_empty() {
            busy = true;
            self.submit();
        }
        let GroupState {
            ring,
            channels,
            finished,
            retry,
            stats,
            ..
        } = self;
        let mut wakes = WakeBatch::default();
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
                entry.slots.complete_in(slot, result.min(0), &mut wakes);
                if entry.in_flight == 0 {
                    // Removed (and its file slot released) right after this reap.
                    finished.push(index);
                }
                return;
            }
            match on_completion(entry, slot, result, stats) {
                Outcome::Done(status) => entry.slots.complete_in(slot, status, &mut wakes),
                Outcome::Again => retry.push((index, slot)),
            }
        });
        if reaped > 0 {
            busy = true;
            self.stats.completions += reaped as u64;
        }
        while let Some(index) = self.finished.pop() {
            self.remove_entry(index);
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

impl Drop for GroupState {
    /// Frees the channel table only once the kernel is done with it. Outside a reactor stop
    /// nothing is in flight here (a draining group is kept until it is); at a stop, this
    /// blocks the exiting reactor until the kernel finished the I/O still in flight.
    fn drop(&mut self) {
        if self.ring.in_flight() > 0 {
            tracing::warn!(
                in_flight = self.ring.in_flight(),
                "uring group destroyed with I/O in flight (reactor stopping); waiting for it"
            );
        }
        if let Err(err) = self.ring.close() {
            tracing::error!(
                %err, in_flight = self.ring.in_flight(),
                "waiting for in-flight io_uring I/O failed; leaking its buffers so the kernel \
                 never writes into freed memory"
            );
            // The slots (request buffers, iovec scratch) and zero buffers the kernel may still
            // access are never freed.
            std::mem::forget(std::mem::take(&mut self.channels));
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
                    // (`GroupState::poll`) or retracted (`GroupState::fail_ring`); a destroyed
                    // channel's entry keeps the slots alive until then, and a group frees its
                    // entries only after `Ring::close` succeeded (it leaks them otherwise).
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
            // the buffer freed) only after every SQE of the channel has been reaped or
            // retracted; a dropped group frees it only after `Ring::close` succeeded (it leaks
            // it otherwise). It is never written after allocation.
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

    fn shared(file: std::fs::File) -> Arc<DeviceShared> {
        Arc::new(DeviceShared {
            file,
            path: "test".into(),
            block_device: false,
            unmap_fill: AtomicBool::new(false),
            zeroes_fill: AtomicBool::new(false),
        })
    }

    /// A 64 KiB temp file: the device to attach, and a handle to read it back.
    fn test_device() -> (Arc<DeviceShared>, std::fs::File) {
        let file = tempfile::tempfile().expect("tempfile");
        file.set_len(65536).expect("set_len");
        let reader = file.try_clone().expect("clone");
        (shared(file), reader)
    }

    fn test_group() -> GroupState {
        let ring = Ring::new(&RingOptions {
            entries: 8,
            ..RingOptions::default()
        })
        .expect("ring");
        GroupState::new(ring, 8)
    }

    /// Starts a 4 KiB write of `byte`s at `offset` on channel `index`.
    fn start_write(
        group: &mut GroupState,
        index: u32,
        slots: &IoSlots,
        offset: u64,
        byte: u8,
    ) -> SlotId {
        let slot = slots.acquire(IoKind::Write, offset, 4096).expect("slot");
        slots.with(slot, |req| {
            let mut buf = DmaBuf::alloc(4096).expect("alloc");
            buf.fill(byte);
            req.bufs.push(buf);
        });
        group.start_request(index, slot);
        slot
    }

    fn status(slots: &IoSlots, slot: SlotId) -> Option<i32> {
        slots.poll_done(slot, std::task::Waker::noop())
    }

    fn bytes_at(file: &std::fs::File, offset: u64) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut out = vec![0u8; 4096];
        file.read_exact_at(&mut out, offset).expect("read");
        out
    }

    /// Polls until `done` holds (bounded).
    fn poll_until(group: &mut GroupState, mut done: impl FnMut(&GroupState) -> bool) {
        for _ in 0..100_000 {
            if done(group) {
                return;
            }
            group.poll();
            std::thread::yield_now();
        }
        panic!("condition never held");
    }

    fn file_slot(group: &GroupState, index: u32) -> Option<u32> {
        group.channels[index as usize]
            .as_ref()
            .map(|entry| entry.file)
    }

    #[test]
    fn a_closed_channel_keeps_its_file_slot_until_its_queued_sqes_completed() {
        let mut group = test_group();
        let (dev_a, file_a) = test_device();
        let (dev_b, file_b) = test_device();
        let slots_a = Rc::new(IoSlots::default());
        let a = group.add_channel(dev_a, Rc::clone(&slots_a)).expect("a");
        let a_file = file_slot(&group, a).expect("a attached");
        let slot = start_write(&mut group, a, &slots_a, 0, 0xaa);
        assert_eq!(group.queued.len(), 1, "pushed, not submitted");
        // The request's future and its channel go away while the SQE is still queued.
        slots_a.abandon(slot);
        group.close_channel(a);
        assert_eq!(
            file_slot(&group, a),
            Some(a_file),
            "entry and file slot kept"
        );
        // Another bdev's channel must not get the closed channel's file slot.
        let slots_b = Rc::new(IoSlots::default());
        let b = group.add_channel(dev_b, Rc::clone(&slots_b)).expect("b");
        assert_ne!(file_slot(&group, b), Some(a_file));
        poll_until(&mut group, |g| g.channels[a as usize].is_none());
        assert_eq!(group.ring.in_flight(), 0);
        assert_eq!(
            bytes_at(&file_a, 0),
            vec![0xaa; 4096],
            "landed on its own file"
        );
        assert_eq!(
            bytes_at(&file_b, 0),
            vec![0; 4096],
            "not on the other bdev's file"
        );
        // Once drained, the slot is released and reused.
        let (dev_c, _file_c) = test_device();
        let c = group.add_channel(dev_c, Rc::default()).expect("c");
        assert_eq!(file_slot(&group, c), Some(a_file));
    }

    #[test]
    fn a_closed_channel_with_nothing_in_flight_is_removed_at_once() {
        let mut group = test_group();
        let (dev, _file) = test_device();
        let a = group.add_channel(dev, Rc::default()).expect("a");
        let a_file = file_slot(&group, a).expect("attached");
        group.close_channel(a);
        assert!(group.channels[a as usize].is_none());
        assert_eq!(group.stats().channels, 0);
        let (dev, _file) = test_device();
        let b = group.add_channel(dev, Rc::default()).expect("b");
        assert_eq!(file_slot(&group, b), Some(a_file), "file slot released");
    }

    #[test]
    fn a_retired_ring_fails_unsubmitted_requests_and_never_submits_them() {
        let mut group = test_group();
        let (dev, file) = test_device();
        let slots = Rc::new(IoSlots::default());
        let a = group.add_channel(dev, Rc::clone(&slots)).expect("a");
        // One write accepted by the kernel, then one pushed but not submitted.
        let accepted = start_write(&mut group, a, &slots, 0, 0x11);
        group.submit();
        assert!(group.queued.is_empty());
        let queued = start_write(&mut group, a, &slots, 4096, 0x22);
        assert_eq!(group.queued.len(), 1);
        // What `submit` does after ENTER_FAILURES_MAX failed enters in a row.
        group.fail_ring(-libc::ENXIO);
        assert_eq!(
            status(&slots, queued),
            Some(-libc::ENXIO),
            "failed, not hanging"
        );
        assert_eq!(group.stats().ring_error, -libc::ENXIO);
        assert!(group.queued.is_empty());
        // The accepted one still completes normally.
        poll_until(&mut group, |_| status(&slots, accepted).is_some());
        assert_eq!(status(&slots, accepted), Some(0));
        assert_eq!(group.ring.in_flight(), 0);
        // Later requests fail at once, delivered by the poller.
        let later = start_write(&mut group, a, &slots, 8192, 0x33);
        assert_eq!(group.poll(), PollStatus::Busy);
        assert_eq!(status(&slots, later), Some(-libc::ENXIO));
        for _ in 0..100 {
            group.poll();
        }
        assert_eq!(bytes_at(&file, 0), vec![0x11; 4096]);
        assert_eq!(
            bytes_at(&file, 4096),
            vec![0; 4096],
            "retracted SQE never ran"
        );
        assert_eq!(bytes_at(&file, 8192), vec![0; 4096]);
        assert_eq!(group.poll(), PollStatus::Idle);
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
