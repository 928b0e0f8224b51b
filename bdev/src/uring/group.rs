//! The per-reactor io_uring "poll group": one [`Ring`] per reactor (per ring configuration),
//! shared by the channels of every uring bdev on that reactor, driven by one active poller.
//!
//! This module holds the group's context and state and its poller (submit, reap, overflow,
//! ring retirement); `channels.rs` holds the channel table and its entries' invariants, and
//! `request.rs` how a request becomes SQEs and what its completions mean.
//!
//! # Invariants
//!
//! * Only the group pushes SQEs (`request.rs`, through [`Ring::push`]) and reaps CQEs (this
//!   module's poller) for uring bdevs; every SQE's `user_data` names its channel and slot.
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
//! * Submission: channel `submit` pushes SQEs and makes one `io_uring_enter` each time
//!   `submit_batch` of them are queued (none with `submit_batch` 0); the group poller submits
//!   what is left once per reactor loop pass, and only when SQEs were pushed since the last
//!   enter. Completions are read from the CQ ring without a syscall. A push that finds the SQ
//!   full parks the slot in the channel's overflow queue, retried at the start of the next pass.
//! * No allocation per I/O once the per-channel tables have grown to the queue depth in use.
//! * No waker runs while the group is borrowed: completing a slot only queues its waiter
//!   (`IoSlots::complete`), the group notes each table with queued waiters
//!   (`GroupState::wake_lists`), and the poller wakes them after releasing the group, so a
//!   waker may use, create or drop channels of this group (dropping the last one closes its
//!   entry and, once drained, releases its registered file slot).
//! * A closed channel's request is never resumed: its next CQE completes it with its status
//!   if that CQE finished it, else with -ECANCELED (never a success for an unfinished
//!   transfer).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};

use spool_reactor::{
    poller_register, sleeps_in_kernel, wake_source_register, IoDevice, PollStatus, PollerHandle,
    WakeKind, WakeSource,
};

use crate::dma::dma_regions;
use crate::io::{IoSlots, SlotId, WakeBatch};
use crate::uring::channels::{drop_removed, user_data, ChannelEntry};
use crate::uring::request::{issue, on_completion, IssueError, Outcome};
use crate::uring::sys::{Ring, RingOptions};

/// Idle time of the SQPOLL kernel thread, when SQPOLL is enabled.
const SQPOLL_IDLE_MS: u32 = 100;

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
    /// Submit as soon as this many SQEs are queued (0: only at the end of a loop pass).
    pub submit_batch: u32,
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
                format!(
                    "uring-group(entries={},sqpoll={},submit_batch={})",
                    key.entries, key.sqpoll, key.submit_batch
                ),
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
    /// Submission calls made so far, failed ones included (one per `submit_batch` SQEs
    /// queued, plus at most one per loop pass for the rest). Each is an `io_uring_enter`
    /// except with SQPOLL, where most need no syscall.
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
        let state = Rc::new(RefCell::new(GroupState::new(
            ring,
            key.entries,
            key.submit_batch,
        )));
        let poll_state = Rc::clone(&state);
        let poller = poller_register("uring-group", None, move || {
            let (status, drained, mut wake_lists, removed) = match poll_state.try_borrow_mut() {
                Ok(mut group) => {
                    let status = group.poll();
                    let drained = if group.drain_poller.is_some() && !group.has_pending_io() {
                        group.drain_poller.take()
                    } else {
                        None
                    };
                    let removed = group.take_removed();
                    (
                        status,
                        drained,
                        std::mem::take(&mut group.wake_lists),
                        removed,
                    )
                }
                // Unreachable in practice (nothing borrows the group across a loop pass);
                // try again next pass.
                Err(_) => (PollStatus::Busy, None, Vec::new(), Vec::new()),
            };
            // Closed channels' entries (and maybe their tables, with cached wakers) go now
            // that the group is released.
            drop_removed(removed);
            // Wake the waiters of this pass's completions now that the group is released.
            if wake_lists.capacity() > 0 {
                let mut batch = WakeBatch::default();
                for slots in wake_lists.drain(..) {
                    slots.wake_completed(&mut batch);
                }
                // Keep the list's capacity (no allocation per pass), unless a waker noted
                // tables meanwhile (then theirs is kept, for the next pass).
                if let Ok(mut group) = poll_state.try_borrow_mut() {
                    if group.wake_lists.is_empty() {
                        group.wake_lists = wake_lists;
                    }
                }
            }
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

/// One reactor's ring and the channels using it.
pub(crate) struct GroupState {
    /// The ring's completion eventfd in the reactor's wait set, when the reactor sleeps in
    /// the kernel (declared before `ring`: it leaves the wait set before the fd closes).
    wake_source: Option<WakeSource>,
    /// Closed (waited for) by `Drop` before the buffers owned by `channels` are released.
    pub(super) ring: Ring,
    pub(super) channels: Vec<Option<ChannelEntry>>,
    pub(super) free_indices: Vec<u32>,
    /// `user_data` of the SQEs pushed but not consumed by the kernel yet, in push order.
    queued: VecDeque<u64>,
    /// Submit at once when `queued` reaches this length (0: only in the poller).
    submit_batch: usize,
    /// Set when a batch submission failed or left a full batch queued (the kernel is short of
    /// resources): no more batch submissions until the poller's next pass, so a struggling
    /// kernel sees one retry per pass, not one per request.
    batch_held: bool,
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
    pub(super) overflow_waiting: usize,
    /// Completions decided without the ring (ioctls, push failures), delivered by the poller.
    pub(super) ready: Vec<(u32, SlotId, i32)>,
    /// Slots whose next step is issued after the current reap.
    retry: Vec<(u32, SlotId)>,
    /// DMA regions below this index were offered to `register_dma_regions` already.
    regions_tried: usize,
    /// Tables with waiters queued by completions, to wake once the group is released (see
    /// the module docs); each table is listed once per batch of queued waiters.
    pub(super) wake_lists: Vec<Rc<IoSlots>>,
    /// Entries of closed channels removed from `channels`, dropped only once the group is no
    /// longer borrowed (see `GroupState::take_removed`).
    pub(super) removed: Vec<ChannelEntry>,
    stats: UringGroupStats,
}

/// Completes `slot` of `slots` with `status`, noting the table in `wake_lists` when it queued
/// the table's first waiter (the group poller wakes them after releasing the group).
#[inline]
pub(super) fn complete_noted(
    wake_lists: &mut Vec<Rc<IoSlots>>,
    slots: &Rc<IoSlots>,
    slot: SlotId,
    status: i32,
) {
    if slots.complete(slot, status) {
        wake_lists.push(Rc::clone(slots));
    }
}

impl GroupState {
    /// A group driving `ring` (created with `entries` SQ entries) that submits as soon as
    /// `submit_batch` SQEs are queued (0: only once per loop pass, in the poller).
    fn new(mut ring: Ring, entries: u32, submit_batch: u32) -> GroupState {
        let regions_tried = dma_regions().len();
        if let Err(err) = ring.register_dma_regions() {
            tracing::warn!(%err, "registering DMA buffers with io_uring failed");
        }
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let wake_source = if sleeps_in_kernel() {
            let registered = ring
                .completion_eventfd()
                .map_err(|err| err.to_string())
                .and_then(|fd| {
                    wake_source_register(fd, WakeKind::EventFd).map_err(|err| err.to_string())
                });
            match registered {
                Ok(source) => source,
                Err(err) => {
                    // The reactor then spins while this ring has I/O in flight.
                    tracing::warn!(%err, "io_uring completions cannot wake a sleeping reactor");
                    None
                }
            }
        } else {
            None
        };
        GroupState {
            wake_source,
            ring,
            channels: Vec::new(),
            free_indices: Vec::new(),
            queued: VecDeque::with_capacity(entries as usize),
            submit_batch: submit_batch as usize,
            batch_held: false,
            enter_failures: 0,
            failed: None,
            finished: Vec::new(),
            drain_poller: None,
            overflow_waiting: 0,
            ready: Vec::new(),
            retry: Vec::new(),
            regions_tried,
            wake_lists: Vec::new(),
            removed: Vec::new(),
            stats: UringGroupStats {
                group_id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                ..UringGroupStats::default()
            },
        }
    }

    /// Whether anything is still in flight, queued or attached (the group must stay).
    fn has_pending_io(&self) -> bool {
        self.ring.in_flight() > 0
            || !self.ready.is_empty()
            || self.channels.iter().any(Option::is_some)
    }

    /// Issues the next step of `slot`, or parks it in the overflow queue when the SQ is full
    /// (or others are already waiting, to keep order).
    pub(super) fn issue_or_park(&mut self, index: u32, slot: SlotId) {
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
            Ok(()) => {
                self.queued.push_back(user_data(index, slot));
                // Start the device on a small batch now rather than on the whole pass's
                // worth later (see `UringOptions::submit_batch`).
                if self.submit_batch != 0
                    && !self.batch_held
                    && self.queued.len() >= self.submit_batch
                {
                    self.submit_batch_now();
                }
            }
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
                    Err(IssueError::Fail(errno)) => {
                        complete_noted(&mut self.wake_lists, &entry.slots, slot, errno);
                    }
                }
                entry.overflow.pop_front();
                self.overflow_waiting -= 1;
            }
        }
    }

    /// Forgets the `queued` entries the kernel consumed (it consumes SQEs in order).
    fn trim_consumed(&mut self) {
        let unconsumed = self.ring.unconsumed();
        let consumed = self.queued.len().saturating_sub(unconsumed);
        self.queued.drain(..consumed);
    }

    /// A submission from a channel's push once a batch is queued. A failure is not counted
    /// toward retiring the ring (the poller's own submission, once per pass, does that); it
    /// holds further batch submissions until the next pass.
    fn submit_batch_now(&mut self) {
        self.stats.enters += 1;
        let result = self.ring.submit();
        self.trim_consumed();
        if result.is_err() || self.queued.len() >= self.submit_batch {
            self.batch_held = true;
        }
    }

    /// One `io_uring_enter` for everything pushed since the last one.
    fn submit(&mut self) {
        self.stats.enters += 1;
        let result = self.ring.submit();
        self.trim_consumed();
        match result {
            Ok(_) => self.enter_failures = 0,
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
                    complete_noted(&mut self.wake_lists, &entry.slots, slot, errno);
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
                complete_noted(&mut self.wake_lists, &entry.slots, slot, errno);
            }
        }
        while let Some(index) = self.finished.pop() {
            self.remove_entry(index);
        }
    }

    /// The group poller: deliver ready completions, retry overflow, submit, reap.
    pub(crate) fn poll(&mut self) -> PollStatus {
        let mut busy = false;
        self.batch_held = false;
        if !self.ready.is_empty() {
            busy = true;
            let mut ready = std::mem::take(&mut self.ready);
            for &(index, slot, status) in &ready {
                if let Some(Some(entry)) = self.channels.get(index as usize) {
                    complete_noted(&mut self.wake_lists, &entry.slots, slot, status);
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
            wake_lists,
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
            if !entry.slots.is_current(slot) {
                // The generation check: a CQE of an earlier use of a reused slot (the slot
                // was completed before its SQE's CQE, a bug) must not complete the request
                // now in it.
                tracing::error!(
                    user_data,
                    "stale io_uring completion for a reused slot; ignored"
                );
                if !entry.open && entry.in_flight == 0 {
                    finished.push(index);
                }
                return;
            }
            if !entry.open {
                // The channel is gone (its requests are abandoned, unless a wrapper dropped
                // its inner channel under a live request): the request ends here, never
                // resumed. With its status if this CQE finished it; else (a short transfer,
                // a step or a fallback left) with -ECANCELED, never a success.
                let status =
                    match on_completion(entry, slot, result, &mut UringGroupStats::default()) {
                        Outcome::Done(status) => status,
                        Outcome::Again => -libc::ECANCELED,
                    };
                complete_noted(wake_lists, &entry.slots, slot, status);
                if entry.in_flight == 0 {
                    // Removed (and its file slot released) right after this reap.
                    finished.push(index);
                }
                return;
            }
            match on_completion(entry, slot, result, stats) {
                Outcome::Done(status) => complete_noted(wake_lists, &entry.slots, slot, status),
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
            if self.wake_source.is_some() {
                PollStatus::Armed
            } else {
                PollStatus::Waiting
            }
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

#[cfg(test)]
#[path = "group_tests.rs"]
mod tests;
