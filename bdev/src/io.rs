//! Requests: what a bdev is asked to do, and the pooled slots that carry each request and its
//! buffers from submission to completion.
//!
//! A channel owns an [`IoSlots`] table. Submitting takes a free slot, moves the caller's
//! buffers into it, and hands the device backend a [`Submission`]: a move-only handle on the
//! request, the only way to start it. The crate's own backends accept it (the slot's tag
//! then names the request), read the request (and write data into its buffers) with short
//! borrows through `IoSlots::with`, and complete it with `IoSlots::complete`, from their
//! poller or, for an immediate failure, from `submit` itself. Completing never runs a waker:
//! it queues the waiter, and whoever drives the completions (the channel's poller, the
//! io_uring group's poller) wakes the queued waiters with [`IoSlots::wake_completed`] once it
//! holds no borrow (of this table, of a backend, of the group), so a waker may use or drop
//! any channel. The awaiting future then takes the buffers back. A future dropped before completion leaves its slot "abandoned": the
//! buffers stay parked in the slot until the device completes, so the device never writes
//! into freed memory, and so does whatever the caller handed the request to hold
//! (`IoFuture::hold_until_done`: a dropped blob I/O's held-request count), dropped by
//! `wake_completed` once the device is done.
//!
//! # What is closed, and why
//!
//! The request's fields, `IoSlots::with` and every way to complete a slot are crate-private:
//! the io_uring backend hands the kernel pointers into a request's buffers, and its `// SAFETY:`
//! arguments rely on nobody else changing the request (its length, its buffers, its iovec
//! scratch) or completing its slot while the kernel uses them. Code outside the crate sees a
//! [`Submission`]: it can read the request, forward it once to another backend, or complete it
//! with a status without starting it. So none of these compile outside the crate:
//!
//! ```compile_fail,E0624
//! // Hole 1: a 16 KiB read into a 4 KiB buffer.
//! fn grow(slots: &spool_bdev::IoSlots, slot: spool_bdev::SlotId) {
//!     slots.with(slot, |request| request.len_bytes = 16384);
//! }
//! ```
//!
//! ```compile_fail,E0624
//! // Hole 2: take the buffers back while the kernel writes into them.
//! fn steal(slots: &spool_bdev::IoSlots, slot: spool_bdev::SlotId) {
//!     slots.with(slot, |request| drop(std::mem::take(&mut request.bufs)));
//! }
//! ```
//!
//! ```compile_fail,E0624
//! // Hole 2: complete the slot early (the caller gets its buffer back, the kernel still
//! // writes into it, and the slot is reused under the old SQE's user_data).
//! fn complete_early(slots: &spool_bdev::IoSlots, slot: spool_bdev::SlotId) {
//!     slots.complete(slot, 0);
//! }
//! ```
//!
//! ```compile_fail,E0624
//! // Hole 2: forge a submission for a slot someone else is using.
//! fn forge(slots: &spool_bdev::IoSlots, slot: spool_bdev::SlotId) -> spool_bdev::Submission<'_> {
//!     spool_bdev::Submission::new(slots, slot)
//! }
//! ```
//!
//! ```compile_fail,E0599
//! // Hole 2: submit one request twice (two SQEs for one slot).
//! use spool_bdev::Submission;
//! fn twice(io: Submission<'_>) -> (Submission<'_>, Submission<'_>) {
//!     (io.clone(), io)
//! }
//! ```
//!
//! A slot's tag ([`SlotId`]) carries the slot's generation, bumped at every reuse: a
//! completion for an earlier use of the slot (a stale io_uring CQE) is logged and ignored,
//! never delivered to the request now in the slot.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::task::Waker;

use crate::callback::{IoCallback, IoDone, PendingCallback};
use crate::dma::DmaBuf;
use crate::limits::CHANNEL_IO_MAX;

/// The wakes a poller delivers in one pass, across any number of channels. No task runs
/// while a poller does, so a waiter woken once in the batch need not be woken again: with one
/// task driving many requests, this saves an atomic operation per completion. Create one per
/// poll pass, never keep one across passes.
#[derive(Debug, Default)]
pub struct WakeBatch {
    last_woken: Option<WakerIdentity>,
}

/// The text of a panic payload (`panic!` gives a `&str` or a `String`).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    if let Some(text) = payload.downcast_ref::<&'static str>() {
        text
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text
    } else {
        "(a panic payload that is not a string)"
    }
}

/// Drops a panic payload; a payload whose own drop panics is leaked instead.
fn drop_payload(payload: Box<dyn std::any::Any + Send>) {
    if let Err(again) =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(payload)))
    {
        std::mem::forget(again);
    }
}

/// Runs `f` (user code: a waker, a hold's drop), containing a panic in it: logged as `what`.
fn contain_user_code(what: &str, f: impl FnOnce()) {
    if let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        report_contained(what, payload);
    }
}

/// Logs a contained panic of `what` (user code) and drops its payload.
#[cold]
pub(crate) fn report_contained(what: &str, payload: Box<dyn std::any::Any + Send>) {
    tracing::error!(
        panic = panic_message(payload.as_ref()),
        "{what} panicked; the panic is contained"
    );
    drop_payload(payload);
}

/// Which waker this is, by address: two wakers with equal identities wake the same task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct WakerIdentity(*const (), *const std::task::RawWakerVTable);

impl WakerIdentity {
    fn of(waker: &Waker) -> WakerIdentity {
        WakerIdentity(waker.data(), std::ptr::from_ref(waker.vtable()))
    }
}

/// The operation of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoKind {
    /// Read into the request's buffers.
    Read,
    /// Write from the request's buffers.
    Write,
    /// Deallocate a range (reads of it afterwards return zeros on devices that say so).
    Unmap,
    /// Write zeros over a range.
    WriteZeroes,
    /// Make completed writes durable.
    Flush,
}

/// A request's tag in its channel's table: the slot's index in the low [`SLOT_INDEX_BITS`]
/// bits, the slot's generation (bumped each time the slot is taken) above them. It fits the
/// low half of an io_uring `user_data`.
pub type SlotId = u32;

/// Bits of a [`SlotId`] that hold the slot index (enough for [`CHANNEL_IO_MAX`] slots).
pub const SLOT_INDEX_BITS: u32 = CHANNEL_IO_MAX.trailing_zeros();

const _: () = assert!(CHANNEL_IO_MAX.is_power_of_two() && SLOT_INDEX_BITS < 32);

const SLOT_INDEX_MASK: u32 = (1 << SLOT_INDEX_BITS) - 1;

/// Generations wrap within the bits above the index.
const GENERATION_MASK: u32 = u32::MAX >> SLOT_INDEX_BITS;

/// The slot index a tag names.
#[inline]
pub(crate) fn slot_index(tag: SlotId) -> usize {
    (tag & SLOT_INDEX_MASK) as usize
}

/// The generation a tag names.
#[inline]
fn tag_generation(tag: SlotId) -> u32 {
    tag >> SLOT_INDEX_BITS
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Free,
    InFlight,
    Done(i32),
    Abandoned,
}

/// One request as the crate's backends see it. Crate-private: see the module docs.
pub(crate) struct IoRequest {
    /// The operation.
    pub(crate) kind: IoKind,
    /// Where it starts on the device, bytes (a multiple of the block size).
    pub(crate) offset_bytes: u64,
    /// How many bytes it covers (the sum of the buffers' lengths for reads and writes).
    pub(crate) len_bytes: u64,
    /// The data buffers, in device order (empty for unmap, write_zeroes, flush).
    pub(crate) bufs: Vec<DmaBuf>,
    /// Scratch space a backend may use for kernel iovecs; kept across uses of the slot.
    pub(crate) iovecs: Vec<libc::iovec>,
    /// Bumped each time the slot is taken (see [`SlotId`]).
    generation: u32,
    state: SlotState,
    /// The last waiter's waker, kept across uses of the slot so the same task reusing it
    /// (the free list is LIFO) does not clone it again.
    waker: Option<Waker>,
    /// Whether the current request's future has registered `waker` (until then, `waker` may
    /// be a previous request's and must not be woken).
    waker_current: bool,
    /// What the request's owner keeps alive until the device is done with the request (see
    /// [`IoFuture::hold_until_done`](crate::IoFuture::hold_until_done)): dropped when the
    /// slot is released, never while the device may still use the request's buffers.
    held: Option<Held>,
    /// A callback request's callback ([`crate::callback`]): called, instead of a waker, once
    /// the request completes. Set only for requests made by `BdevChannel::read_with` and
    /// `write_with`, which have no future.
    pub(crate) callback: Option<PendingCallback>,
}

/// Something kept alive until a request leaves its slot (see `IoRequest::held`).
pub(crate) type Held = Box<dyn std::any::Any>;

impl IoRequest {
    fn empty() -> IoRequest {
        IoRequest {
            kind: IoKind::Read,
            offset_bytes: 0,
            len_bytes: 0,
            bufs: Vec::new(),
            iovecs: Vec::new(),
            generation: 0,
            state: SlotState::Free,
            waker: None,
            waker_current: false,
            held: None,
            callback: None,
        }
    }
}

/// The request slots of one channel. Grows on demand up to [`CHANNEL_IO_MAX`], never shrinks.
/// Opaque outside the crate: a backend outside it can only pass it on to the backend it wraps.
pub struct IoSlots {
    requests: RefCell<Vec<IoRequest>>,
    /// Indices of free slots.
    free: RefCell<Vec<u32>>,
    /// Tags of the requests completed with a registered waiter not woken yet, in completion
    /// order (see [`IoSlots::wake_completed`]).
    wakes: RefCell<VecDeque<SlotId>>,
    /// What abandoned requests held (`IoRequest::held`), released by their completion and
    /// dropped by [`IoSlots::wake_completed`]: its drop is user code, which must not run
    /// under the borrows `complete`'s caller may hold.
    released_holds: RefCell<Vec<Held>>,
    /// One bit per slot: set while the slot's [`Submission`] is out (handed to a backend, not
    /// consumed yet). Per slot, not one marker for the table: a backend's `submit` may start
    /// (nested) submissions of its own on the same table, and each submit call's check
    /// ([`Submission::finish`]) must see its own request only. Fixed size: no allocation.
    unconsumed: [Cell<u64>; UNCONSUMED_WORDS],
}

/// Words of [`IoSlots::unconsumed`]: one bit per slot.
const UNCONSUMED_WORDS: usize = CHANNEL_IO_MAX.div_ceil(64);

/// The word of [`IoSlots::unconsumed`] and the bit in it for `slot`.
#[inline]
fn unconsumed_bit(slot: SlotId) -> (usize, u64) {
    let index = slot_index(slot);
    (index / 64, 1 << (index % 64))
}

impl IoSlots {
    /// An empty table.
    pub(crate) fn new() -> IoSlots {
        IoSlots {
            requests: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
            wakes: RefCell::new(VecDeque::new()),
            released_holds: RefCell::new(Vec::new()),
            unconsumed: std::array::from_fn(|_| Cell::new(0)),
        }
    }

    /// Takes a free slot and fills it; `None` when [`CHANNEL_IO_MAX`] requests are in flight.
    pub(crate) fn acquire(
        &self,
        kind: IoKind,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> Option<SlotId> {
        let mut requests = self.requests.borrow_mut();
        let index = match self.free.borrow_mut().pop() {
            Some(index) => index,
            None if requests.len() < CHANNEL_IO_MAX => {
                requests.push(IoRequest::empty());
                u32::try_from(requests.len() - 1).ok()?
            }
            None => return None,
        };
        let request = &mut requests[index as usize];
        debug_assert_eq!(request.state, SlotState::Free);
        debug_assert!(request.held.is_none(), "a free slot holds nothing");
        debug_assert!(request.callback.is_none(), "a free slot calls nobody");
        request.kind = kind;
        request.offset_bytes = offset_bytes;
        request.len_bytes = len_bytes;
        request.state = SlotState::InFlight;
        request.waker_current = false;
        request.generation = request.generation.wrapping_add(1) & GENERATION_MASK;
        Some((request.generation << SLOT_INDEX_BITS) | index)
    }

    /// Runs `f` on the request `slot` names. Keep it short: no other slot access may nest in it.
    #[inline]
    pub(crate) fn with<R>(&self, slot: SlotId, f: impl FnOnce(&mut IoRequest) -> R) -> R {
        let mut requests = self.requests.borrow_mut();
        let request = &mut requests[slot_index(slot)];
        debug_assert_eq!(request.generation, tag_generation(slot), "stale slot tag");
        f(request)
    }

    /// Marks `slot`'s submission out (see [`IoSlots::unconsumed`]).
    #[inline]
    fn set_unconsumed(&self, slot: SlotId) {
        let (word, bit) = unconsumed_bit(slot);
        let cell = &self.unconsumed[word];
        cell.set(cell.get() | bit);
    }

    /// Clears `slot`'s "submission out" mark; returns whether it was set.
    #[inline]
    fn take_unconsumed(&self, slot: SlotId) -> bool {
        let (word, bit) = unconsumed_bit(slot);
        let cell = &self.unconsumed[word];
        let was = cell.get();
        cell.set(was & !bit);
        was & bit != 0
    }

    /// Whether `slot` names the request now in its slot (not an earlier use of the slot).
    #[inline]
    pub(crate) fn is_current(&self, slot: SlotId) -> bool {
        self.requests
            .borrow()
            .get(slot_index(slot))
            .is_some_and(|request| request.generation == tag_generation(slot))
    }

    /// Completes the request `slot` names with `status` (0 or a negative errno) and queues its
    /// waiter for [`IoSlots::wake_completed`] (no waker runs here: the caller may hold any
    /// borrow). A request whose waiter went away is released here, dropping its buffers; what
    /// it held is queued for `wake_completed` to drop. A tag of an earlier use of the slot, or
    /// a second completion, is logged and ignored.
    ///
    /// Returns true when this queued the table's first waiter (or hold to drop) since the last
    /// `wake_completed`: the caller (a poller serving many tables) notes the table then.
    #[inline]
    pub(crate) fn complete(&self, slot: SlotId, status: i32) -> bool {
        let (released, wake) = {
            let mut requests = self.requests.borrow_mut();
            let Some(request) = requests.get_mut(slot_index(slot)) else {
                tracing::error!(slot, "completion for a slot that does not exist; ignored");
                return false;
            };
            if request.generation != tag_generation(slot) {
                tracing::warn!(
                    slot,
                    current = request.generation,
                    "stale completion for an earlier use of a reused slot; ignored"
                );
                return false;
            }
            match request.state {
                SlotState::InFlight => {
                    request.state = SlotState::Done(status);
                    (
                        None,
                        (request.waker_current && request.waker.is_some())
                            || request.callback.is_some(),
                    )
                }
                SlotState::Abandoned => {
                    request.state = SlotState::Free;
                    (
                        Some((std::mem::take(&mut request.bufs), request.held.take())),
                        false,
                    )
                }
                state => {
                    tracing::error!(slot, ?state, "slot completed twice; ignored");
                    return false;
                }
            }
        };
        if let Some((bufs, held)) = released {
            drop(bufs);
            self.free.borrow_mut().push(slot & SLOT_INDEX_MASK);
            let Some(held) = held else {
                return false;
            };
            let first = !self.has_wakes();
            self.released_holds.borrow_mut().push(held);
            return first;
        }
        if wake {
            let first = !self.has_wakes();
            self.wakes.borrow_mut().push_back(slot);
            return first;
        }
        false
    }

    /// Keeps `held` with the request `slot` names until the request leaves its slot (see
    /// [`IoFuture::hold_until_done`](crate::IoFuture::hold_until_done)); a second hold is
    /// kept alongside the first.
    pub(crate) fn hold(&self, slot: SlotId, held: Held) {
        self.with(slot, |request| {
            request.held = Some(match request.held.take() {
                Some(earlier) => Box::new((earlier, held)),
                None => held,
            });
        });
    }

    /// Wakes the waiters of the requests completed since the last call, in completion order,
    /// skipping a waiter `batch` woke already, and drops what completed abandoned requests
    /// held. No borrow of this table is held while a waker runs or a hold drops, so either
    /// may read or use any channel, drop it, or complete more requests (queued here and
    /// handled by this same call). Returns how many wakers ran and holds were dropped.
    ///
    /// A callback request completed during this call (a callback's next request that its
    /// backend completed at once, e.g. a failure it retries) is left queued for the next
    /// call, the next pass of the channel's poller: a callback that keeps retrying cannot hold
    /// the reactor inside one call. Whenever something is left, this call ran user code
    /// (returns more than 0), so its poller reports work and the reactor does not sleep.
    pub(crate) fn wake_completed(&self, batch: &mut WakeBatch) -> usize {
        let mut woken = 0;
        // Entries queued before this call; those past them were queued by what this call ran.
        let mut queued_before = self.wakes.borrow().len();
        loop {
            let held = self.released_holds.borrow_mut().pop();
            if let Some(held) = held {
                woken += 1;
                contain_user_code("dropping what a completed abandoned request held", || {
                    drop(held);
                });
                continue;
            }
            let Some(slot) = self.wakes.borrow_mut().pop_front() else {
                return woken;
            };
            let fresh = queued_before == 0;
            queued_before = queued_before.saturating_sub(1);
            let waker = {
                let mut requests = self.requests.borrow_mut();
                let Some(request) = requests.get_mut(slot_index(slot)) else {
                    continue;
                };
                if request.callback.is_some() {
                    if fresh {
                        drop(requests);
                        self.wakes.borrow_mut().push_front(slot);
                        return woken;
                    }
                    // A callback request: freed here (the device is done with it), then its
                    // callback called with no borrow held.
                    let SlotState::Done(status) = request.state else {
                        continue;
                    };
                    if request.generation != tag_generation(slot) {
                        continue;
                    }
                    if request.bufs.len() != 1 {
                        // Not made by the API (one buffer per callback request); freed uncalled.
                        let completed = take_callback(request, status);
                        drop(requests);
                        self.free.borrow_mut().push(slot & SLOT_INDEX_MASK);
                        drop(completed);
                        continue;
                    }
                    // The hot path, kept free of an `Option<DmaBuf>`: moved through memory,
                    // its niche byte at offset 0 made the copy stall on store forwarding.
                    request.state = SlotState::Free;
                    let pending = request.callback.take();
                    let kind = request.kind;
                    let buf = request.bufs.swap_remove(0);
                    drop(requests);
                    // Freed before the call: the callback's next request may take the slot.
                    self.free.borrow_mut().push(slot & SLOT_INDEX_MASK);
                    woken += 1;
                    if let Some(PendingCallback { callback, tag }) = pending {
                        crate::callback::deliver(callback, IoDone::new(buf, tag, status, kind));
                    }
                    continue;
                }
                // Still the completed request (not released and reused since), still awaited.
                if request.generation != tag_generation(slot)
                    || !matches!(request.state, SlotState::Done(_))
                    || !request.waker_current
                {
                    continue;
                }
                let Some(waker) = &request.waker else {
                    continue;
                };
                let identity = WakerIdentity::of(waker);
                if batch.last_woken == Some(identity) {
                    continue;
                }
                batch.last_woken = Some(identity);
                // Taken out (not cloned) so it runs with no borrow held; put back below.
                request.waker.take()
            };
            let Some(waker) = waker else {
                continue;
            };
            woken += 1;
            // A waker is user code: a panic in it (or in a request it started, or in a drop it
            // ran) is contained here, so the poller driving the wakes (the io_uring group's,
            // serving every uring channel of the reactor) and the other waiters go on (see
            // docs/architecture.md, "Cancellation and panic safety"). No borrow is held here.
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                waker.wake_by_ref();
                // Keep it for the next use of the slot (see `IoRequest::waker`), unless the
                // waker itself made the slot register another one; a spare is dropped only
                // once the borrow ends (its drop is user code too).
                let spare = {
                    let mut requests = self.requests.borrow_mut();
                    match requests.get_mut(slot_index(slot)) {
                        Some(request) if request.waker.is_none() => {
                            request.waker = Some(waker);
                            None
                        }
                        _ => Some(waker),
                    }
                };
                drop(spare);
            }));
            if let Err(payload) = outcome {
                tracing::error!(
                    slot,
                    panic = panic_message(payload.as_ref()),
                    "a waker panicked while being woken for a completed request; the panic \
                     is contained and the other waiters are woken"
                );
                drop_payload(payload);
            }
        }
    }

    /// Whether a waiter (or a hold to drop) is queued for [`IoSlots::wake_completed`].
    #[inline]
    pub(crate) fn has_wakes(&self) -> bool {
        !self.wakes.borrow().is_empty() || !self.released_holds.borrow().is_empty()
    }

    /// The status if `slot` completed, else registers `waker` and returns None.
    ///
    /// A waker it replaces is dropped only after the table's borrow ends: its drop is user
    /// code, which may use any channel (this one too).
    #[inline]
    pub(crate) fn poll_done(&self, slot: SlotId, waker: &Waker) -> Option<i32> {
        let (status, replaced) = {
            let mut requests = self.requests.borrow_mut();
            let request = &mut requests[slot_index(slot)];
            debug_assert_eq!(request.generation, tag_generation(slot), "stale slot tag");
            match request.state {
                SlotState::Done(status) => (Some(status), None),
                SlotState::InFlight => {
                    let replaced = match &request.waker {
                        Some(current) if current.will_wake(waker) => None,
                        _ => request.waker.replace(waker.clone()),
                    };
                    request.waker_current = true;
                    (None, replaced)
                }
                state => panic!("slot {slot} polled in state {state:?}"),
            }
        };
        drop(replaced);
        status
    }

    /// Frees a completed slot, handing its buffers back through `take`; what the request
    /// held is dropped after the table's borrow ends.
    #[inline]
    pub(crate) fn release<R>(&self, slot: SlotId, take: impl FnOnce(&mut Vec<DmaBuf>) -> R) -> R {
        let (out, held) = {
            let mut requests = self.requests.borrow_mut();
            let request = &mut requests[slot_index(slot)];
            debug_assert_eq!(request.generation, tag_generation(slot), "stale slot tag");
            debug_assert!(matches!(request.state, SlotState::Done(_)));
            request.state = SlotState::Free;
            (take(&mut request.bufs), request.held.take())
        };
        self.free.borrow_mut().push(slot & SLOT_INDEX_MASK);
        drop(held);
        out
    }

    /// Gives up on `slot` (its future was dropped): released now if done, else on completion.
    /// Its waker (user code in its drop), buffers and hold are dropped after the table's
    /// borrow ends; an in-flight request keeps its buffers and hold until it completes.
    pub(crate) fn abandon(&self, slot: SlotId) {
        let (done, waker) = {
            let mut requests = self.requests.borrow_mut();
            let request = &mut requests[slot_index(slot)];
            debug_assert_eq!(request.generation, tag_generation(slot), "stale slot tag");
            let waker = request.waker.take();
            let done = match request.state {
                SlotState::Done(_) => {
                    request.state = SlotState::Free;
                    Some((std::mem::take(&mut request.bufs), request.held.take()))
                }
                SlotState::InFlight => {
                    request.state = SlotState::Abandoned;
                    None
                }
                _ => None,
            };
            (done, waker)
        };
        if let Some((bufs, held)) = done {
            drop(bufs);
            self.free.borrow_mut().push(slot & SLOT_INDEX_MASK);
            drop(held);
        }
        drop(waker);
    }

    /// Requests in flight (submitted, not yet completed or released).
    pub fn in_flight(&self) -> usize {
        self.requests.borrow().len() - self.free.borrow().len()
    }
}

/// Frees a completed callback request (`status` is its `Done` status): takes its callback,
/// its buffer and its status (`None` if it had no callback or no buffer, which the API does
/// not make; a callback is then dropped uncalled).
fn take_callback(request: &mut IoRequest, status: i32) -> Option<(Rc<dyn IoCallback>, IoDone)> {
    request.state = SlotState::Free;
    // `pop`, not `take`: the slot keeps its list's capacity for the next request.
    let buf = request.bufs.pop();
    if !request.bufs.is_empty() {
        request.bufs.clear();
    }
    let PendingCallback { callback, tag } = request.callback.take()?;
    Some((callback, IoDone::new(buf?, tag, status, request.kind)))
}

impl Drop for IoSlots {
    /// Calls the callbacks of callback requests not delivered yet: completed ones with their
    /// status, ones still in flight with `-ECANCELED`. The table goes only when nothing holds
    /// it (a backend keeps it alive while it holds requests), so no device uses their buffers
    /// any more. Each call is contained; none runs under a borrow of the table.
    fn drop(&mut self) {
        let mut undelivered = Vec::new();
        for request in self.requests.get_mut().iter_mut() {
            if request.callback.is_none() {
                continue;
            }
            let status = match request.state {
                SlotState::Done(status) => status,
                SlotState::InFlight | SlotState::Abandoned => -libc::ECANCELED,
                SlotState::Free => continue,
            };
            undelivered.push(take_callback(request, status));
        }
        for (callback, done) in undelivered.into_iter().flatten() {
            crate::callback::deliver(callback, done);
        }
    }
}

/// A request handed to a backend's [`crate::ChannelBackend::submit`]: the only way to start it.
///
/// It is neither `Clone` nor constructible outside the crate, and it borrows the channel's
/// table for the length of the `submit` call, so a request is started at most once, only
/// during its submission, and only by whoever holds this value. A backend outside the crate
/// may read the request, forward the submission to the backend it wraps, or complete it with
/// a status without starting it ([`Submission::complete`]). Dropped unused, it completes the
/// request with `-ECANCELED` (a request is never left hanging). Forgotten (`std::mem::forget`
/// is safe), it is still completed with `-ECANCELED`, when the channel's submit call returns
/// (or unwinds): the channel checks that the submission it made was consumed.
pub struct Submission<'a> {
    slots: &'a IoSlots,
    slot: SlotId,
}

impl<'a> Submission<'a> {
    /// The submission of the request `slot` names in `slots`.
    #[inline]
    pub(crate) fn new(slots: &'a IoSlots, slot: SlotId) -> Submission<'a> {
        slots.set_unconsumed(slot);
        Submission { slots, slot }
    }

    /// Ends the submission of `slot` made by [`Submission::new`]: if nothing consumed it
    /// (accepted, completed or dropped it; a backend may `std::mem::forget` it), the request
    /// is completed with `-ECANCELED` so it never hangs. Called when the backend's `submit`
    /// returns or unwinds; the submission borrowed the table for that call only, so it can no
    /// longer be used.
    #[inline]
    pub(crate) fn finish(slots: &IoSlots, slot: SlotId) {
        if slots.take_unconsumed(slot) {
            tracing::warn!(slot, "a request was forgotten by its backend; cancelled");
            slots.complete(slot, -libc::ECANCELED);
        }
    }

    /// Marks the submission consumed (see [`Submission::finish`]).
    #[inline]
    fn consume(slots: &IoSlots, slot: SlotId) {
        slots.take_unconsumed(slot);
    }

    /// The operation.
    pub fn kind(&self) -> IoKind {
        self.slots.with(self.slot, |request| request.kind)
    }

    /// Where the request starts on the device, bytes.
    pub fn offset_bytes(&self) -> u64 {
        self.slots.with(self.slot, |request| request.offset_bytes)
    }

    /// How many bytes the request covers.
    pub fn len_bytes(&self) -> u64 {
        self.slots.with(self.slot, |request| request.len_bytes)
    }

    /// Completes the request now, without starting it: with `status` if negative (an errno),
    /// else with success (the buffers are handed back untouched).
    pub fn complete(self, status: i32) {
        let (slots, slot) = self.into_parts();
        slots.complete(slot, status.min(0));
    }

    /// Takes the request for a backend whose requests live in `slots`: its tag, for the
    /// backend to complete later. A submission from another table (a wrapper that created the
    /// backend with one table and forwards another's requests) is failed with `-EINVAL`
    /// instead: the backend would otherwise start a slot of its own table that someone else
    /// is using.
    #[inline]
    pub(crate) fn accept(self, slots: &IoSlots) -> Option<SlotId> {
        let (own, slot) = self.into_parts();
        if std::ptr::eq(own, slots) {
            Some(slot)
        } else {
            tracing::error!(
                slot,
                "a request was forwarded to a backend created for another channel; failed"
            );
            own.complete(slot, -libc::EINVAL);
            None
        }
    }

    #[inline]
    fn into_parts(self) -> (&'a IoSlots, SlotId) {
        let parts = (self.slots, self.slot);
        Submission::consume(self.slots, self.slot);
        std::mem::forget(self);
        parts
    }
}

impl Drop for Submission<'_> {
    fn drop(&mut self) {
        Submission::consume(self.slots, self.slot);
        tracing::warn!(
            slot = self.slot,
            "a request was dropped by its backend; cancelled"
        );
        self.slots.complete(self.slot, -libc::ECANCELED);
    }
}

impl std::fmt::Debug for Submission<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Submission")
            .field("slot", &self.slot)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Wake, Waker};

    use super::*;

    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_reused_slot_never_wakes_the_previous_waiter() {
        let slots = IoSlots::new();
        let first = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let first_waker = Waker::from(Arc::clone(&first));
        let slot = slots.acquire(IoKind::Read, 0, 4096).unwrap();
        assert_eq!(slots.poll_done(slot, &first_waker), None);
        slots.complete(slot, 0);
        assert_eq!(
            first.0.load(Ordering::SeqCst),
            0,
            "completing runs no waker"
        );
        assert_eq!(slots.wake_completed(&mut WakeBatch::default()), 1);
        assert_eq!(
            first.0.load(Ordering::SeqCst),
            1,
            "the waiter is woken once"
        );
        assert_eq!(slots.poll_done(slot, &first_waker), Some(0));
        slots.release(slot, |_| ());
        // The next request takes the same slot (LIFO) and completes before its future polls.
        let again = slots.acquire(IoKind::Write, 4096, 4096).unwrap();
        assert_eq!(slot_index(again), slot_index(slot));
        slots.complete(again, -5);
        assert_eq!(slots.wake_completed(&mut WakeBatch::default()), 0);
        assert_eq!(
            first.0.load(Ordering::SeqCst),
            1,
            "the previous waiter is not woken"
        );
        let second = Arc::new(CountingWaker(AtomicUsize::new(0)));
        assert_eq!(
            slots.poll_done(again, &Waker::from(Arc::clone(&second))),
            Some(-5)
        );
        slots.release(again, |_| ());
        assert_eq!(slots.in_flight(), 0);
    }

    #[test]
    fn a_stale_completion_never_completes_the_reused_slot_and_never_panics() {
        let slots = IoSlots::new();
        let old = slots.acquire(IoKind::Flush, 0, 0).unwrap();
        slots.complete(old, 0);
        assert_eq!(slots.poll_done(old, Waker::noop()), Some(0));
        slots.release(old, |_| ());
        let new = slots.acquire(IoKind::Flush, 0, 0).unwrap();
        assert_eq!(
            slot_index(new),
            slot_index(old),
            "the slot is reused (LIFO)"
        );
        assert_ne!(new, old, "with a new generation");
        // The old request's completion arrives again (a stale io_uring CQE): ignored.
        slots.complete(old, -5);
        assert!(!slots.is_current(old));
        assert_eq!(slots.poll_done(new, Waker::noop()), None, "still in flight");
        slots.complete(new, 0);
        // A second completion is ignored too (it used to panic).
        slots.complete(new, -5);
        assert_eq!(slots.poll_done(new, Waker::noop()), Some(0));
        slots.release(new, |_| ());
        assert_eq!(slots.in_flight(), 0);
    }

    #[test]
    fn a_dropped_submission_cancels_and_a_foreign_one_fails() {
        let slots = IoSlots::new();
        let other = IoSlots::new();
        let dropped = slots.acquire(IoKind::Flush, 0, 0).unwrap();
        drop(Submission::new(&slots, dropped));
        assert_eq!(
            slots.poll_done(dropped, Waker::noop()),
            Some(-libc::ECANCELED)
        );
        // A backend created for `other` is handed a request of `slots`: it fails, and
        // nothing of `other` (whose slot of the same index may be in use) is touched.
        let busy = other.acquire(IoKind::Flush, 0, 0).unwrap();
        let foreign = slots.acquire(IoKind::Flush, 0, 0).unwrap();
        assert_eq!(Submission::new(&slots, foreign).accept(&other), None);
        assert_eq!(slots.poll_done(foreign, Waker::noop()), Some(-libc::EINVAL));
        assert_eq!(other.poll_done(busy, Waker::noop()), None);
        let own = other.acquire(IoKind::Flush, 0, 0).unwrap();
        assert_eq!(Submission::new(&other, own).accept(&other), Some(own));
        assert_eq!(other.poll_done(own, Waker::noop()), None);
    }

    #[test]
    fn an_abandoned_request_is_released_at_completion() {
        let slots = IoSlots::new();
        let slot = slots.acquire(IoKind::Read, 0, 4096).unwrap();
        slots.with(slot, |request| {
            request.bufs.push(DmaBuf::alloc(4096).unwrap())
        });
        slots.abandon(slot);
        assert_eq!(
            slots.in_flight(),
            1,
            "the buffers stay parked while the device works"
        );
        slots.complete(slot, 0);
        assert_eq!(slots.in_flight(), 0);
        assert!(
            slots.with(slot, |request| request.bufs.is_empty()),
            "the parked buffers were freed"
        );
    }

    /// Counts its drops.
    struct CountsDrop(std::rc::Rc<std::cell::Cell<u32>>);

    impl Drop for CountsDrop {
        fn drop(&mut self) {
            self.0.set(self.0.get() + 1);
        }
    }

    #[test]
    fn a_hold_lives_until_the_device_is_done_with_the_request() {
        let slots = IoSlots::new();
        let drops = std::rc::Rc::new(std::cell::Cell::new(0));
        let hold = || Box::new(CountsDrop(std::rc::Rc::clone(&drops)));
        // Abandoned in flight: kept with the parked buffers until the device completes, then
        // dropped by `wake_completed` (not under `complete`'s caller's borrows).
        let slot = slots.acquire(IoKind::Write, 0, 4096).unwrap();
        slots.hold(slot, hold());
        slots.hold(slot, hold());
        slots.abandon(slot);
        assert_eq!(drops.get(), 0, "the device may still use the request");
        assert!(slots.complete(slot, 0), "the table is noted for its poller");
        assert_eq!(drops.get(), 0, "not dropped inside complete");
        assert!(slots.has_wakes());
        assert_eq!(slots.wake_completed(&mut WakeBatch::default()), 1);
        assert_eq!(drops.get(), 2, "both holds, at the device's completion");
        assert!(!slots.has_wakes());
        // Completed and taken by its future: dropped at release.
        let slot = slots.acquire(IoKind::Write, 0, 4096).unwrap();
        slots.hold(slot, hold());
        slots.complete(slot, 0);
        assert_eq!(slots.poll_done(slot, Waker::noop()), Some(0));
        slots.release(slot, |_| ());
        assert_eq!(drops.get(), 3);
        // Abandoned after the device completed: dropped at once.
        let slot = slots.acquire(IoKind::Write, 0, 4096).unwrap();
        slots.hold(slot, hold());
        slots.complete(slot, 0);
        slots.abandon(slot);
        assert_eq!(drops.get(), 4);
        assert_eq!(slots.in_flight(), 0);
    }

    thread_local! {
        /// The table `ReadingWaker` reads when woken.
        static READ_TABLE: std::cell::RefCell<Option<std::rc::Rc<IoSlots>>> =
            const { std::cell::RefCell::new(None) };
    }

    /// A waker that reads the table it was woken from (as `BdevChannel::in_flight` does).
    struct ReadingWaker(AtomicUsize);

    impl Wake for ReadingWaker {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            let in_flight = READ_TABLE.with(|table| table.borrow().as_ref().map(|t| t.in_flight()));
            self.0
                .store(in_flight.map_or(0, |n| n + 100), Ordering::SeqCst);
        }
    }

    #[test]
    fn a_waker_may_read_the_table_it_is_woken_from() {
        let slots = std::rc::Rc::new(IoSlots::new());
        READ_TABLE.with(|table| *table.borrow_mut() = Some(std::rc::Rc::clone(&slots)));
        let reader = Arc::new(ReadingWaker(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&reader));
        let slot = slots.acquire(IoKind::Read, 0, 4096).unwrap();
        assert_eq!(slots.poll_done(slot, &waker), None);
        assert!(slots.complete(slot, 0), "the first queued waiter");
        assert!(slots.has_wakes());
        assert_eq!(
            reader.0.load(Ordering::SeqCst),
            0,
            "no waker runs in complete"
        );
        assert_eq!(slots.wake_completed(&mut WakeBatch::default()), 1);
        assert_eq!(
            reader.0.load(Ordering::SeqCst),
            101,
            "the waker read the table (1 in flight)"
        );
        assert!(!slots.has_wakes());
        assert_eq!(slots.poll_done(slot, &waker), Some(0));
        slots.release(slot, |_| ());
        assert_eq!(slots.in_flight(), 0);
        READ_TABLE.with(|table| table.borrow_mut().take());
    }

    #[test]
    fn a_forgotten_submission_is_cancelled_when_its_submit_call_ends() {
        let slots = IoSlots::new();
        let forgotten = slots.acquire(IoKind::Flush, 0, 0).unwrap();
        std::mem::forget(Submission::new(&slots, forgotten));
        assert_eq!(slots.poll_done(forgotten, Waker::noop()), None);
        Submission::finish(&slots, forgotten);
        assert_eq!(
            slots.poll_done(forgotten, Waker::noop()),
            Some(-libc::ECANCELED)
        );
        // A consumed submission is left alone: accepted (still in flight), completed.
        let accepted = slots.acquire(IoKind::Flush, 0, 0).unwrap();
        assert_eq!(
            Submission::new(&slots, accepted).accept(&slots),
            Some(accepted)
        );
        Submission::finish(&slots, accepted);
        assert_eq!(slots.poll_done(accepted, Waker::noop()), None);
        let completed = slots.acquire(IoKind::Flush, 0, 0).unwrap();
        Submission::new(&slots, completed).complete(-libc::EIO);
        Submission::finish(&slots, completed);
        assert_eq!(slots.poll_done(completed, Waker::noop()), Some(-libc::EIO));
    }

    #[test]
    fn a_nested_submission_never_clears_the_outer_ones_mark() {
        let slots = IoSlots::new();
        let outer = slots.acquire(IoKind::Flush, 0, 0).unwrap();
        let outer_submission = Submission::new(&slots, outer);
        // A nested submit during the outer one (consumed: failed with -EBUSY) and its check.
        let nested = slots.acquire(IoKind::Flush, 0, 0).unwrap();
        Submission::new(&slots, nested).complete(-libc::EBUSY);
        Submission::finish(&slots, nested);
        // The outer submission is forgotten: its own check still cancels it.
        std::mem::forget(outer_submission);
        Submission::finish(&slots, outer);
        assert_eq!(
            slots.poll_done(outer, Waker::noop()),
            Some(-libc::ECANCELED)
        );
        assert_eq!(slots.poll_done(nested, Waker::noop()), Some(-libc::EBUSY));
    }

    thread_local! {
        /// Set by `ReadsTableOnDrop` when its drop could read the table.
        static DROP_READ: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
    }

    /// A waker whose drop reads the table (must not be dropped under the table's borrow).
    struct ReadsTableOnDrop;

    impl Wake for ReadsTableOnDrop {
        fn wake(self: Arc<Self>) {}
    }

    impl Drop for ReadsTableOnDrop {
        fn drop(&mut self) {
            let in_flight = READ_TABLE.with(|table| table.borrow().as_ref().map(|t| t.in_flight()));
            DROP_READ.with(|read| read.set(in_flight));
        }
    }

    #[test]
    fn a_waker_is_never_dropped_under_the_tables_borrow() {
        let slots = std::rc::Rc::new(IoSlots::new());
        READ_TABLE.with(|table| *table.borrow_mut() = Some(std::rc::Rc::clone(&slots)));
        // Replaced by poll_done.
        let slot = slots.acquire(IoKind::Read, 0, 4096).unwrap();
        assert_eq!(
            slots.poll_done(slot, &Waker::from(Arc::new(ReadsTableOnDrop))),
            None
        );
        assert_eq!(slots.poll_done(slot, Waker::noop()), None);
        assert_eq!(DROP_READ.with(std::cell::Cell::take), Some(1));
        // Forgotten by abandon.
        let other = slots.acquire(IoKind::Read, 0, 4096).unwrap();
        assert_eq!(
            slots.poll_done(other, &Waker::from(Arc::new(ReadsTableOnDrop))),
            None
        );
        slots.abandon(other);
        assert_eq!(DROP_READ.with(std::cell::Cell::take), Some(2));
        READ_TABLE.with(|table| table.borrow_mut().take());
    }
}
