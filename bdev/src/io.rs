//! Requests: what a bdev is asked to do, and the pooled slots that carry each request and its
//! buffers from submission to completion.
//!
//! A channel owns an [`IoSlots`] table. Submitting takes a free slot, moves the caller's
//! buffers into it, and hands the slot id to the device backend. The backend reads the
//! request (and writes data into its buffers) with short borrows through [`IoSlots::with`],
//! and completes it with [`IoSlots::complete`], from its poller or, for an immediate failure,
//! from `submit` itself. The awaiting future then takes the buffers back. A future dropped
//! before completion leaves its slot "abandoned": the buffers stay parked in the slot until
//! the device completes, so the device never writes into freed memory.

use std::cell::RefCell;
use std::task::Waker;

use crate::dma::DmaBuf;
use crate::limits::CHANNEL_IO_MAX;

/// The completions a poller delivers in one pass, across any number of channels. No task runs
/// while a poller does, so a waiter woken once in the batch need not be woken again: with one
/// task driving many requests, this saves an atomic operation per completion. Create one per
/// poll pass, never keep one across passes.
#[derive(Debug, Default)]
pub struct WakeBatch {
    last_woken: Option<WakerIdentity>,
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

/// Index of a request slot in its channel's table.
pub type SlotId = u32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Free,
    InFlight,
    Done(i32),
    Abandoned,
}

/// One request as the backend sees it.
pub struct IoRequest {
    /// The operation.
    pub kind: IoKind,
    /// Where it starts on the device, bytes (a multiple of the block size).
    pub offset_bytes: u64,
    /// How many bytes it covers (the sum of the buffers' lengths for reads and writes).
    pub len_bytes: u64,
    /// The data buffers, in device order (empty for unmap, write_zeroes, flush).
    pub bufs: Vec<DmaBuf>,
    /// Scratch space a backend may use for kernel iovecs; kept across uses of the slot.
    pub iovecs: Vec<libc::iovec>,
    state: SlotState,
    /// The last waiter's waker, kept across uses of the slot so the same task reusing it
    /// (the free list is LIFO) does not clone it again.
    waker: Option<Waker>,
    /// Whether the current request's future has registered `waker` (until then, `waker` may
    /// be a previous request's and must not be woken).
    waker_current: bool,
}

impl IoRequest {
    fn empty() -> IoRequest {
        IoRequest {
            kind: IoKind::Read,
            offset_bytes: 0,
            len_bytes: 0,
            bufs: Vec::new(),
            iovecs: Vec::new(),
            state: SlotState::Free,
            waker: None,
            waker_current: false,
        }
    }
}

/// The request slots of one channel. Grows on demand up to [`CHANNEL_IO_MAX`], never shrinks.
#[derive(Default)]
pub struct IoSlots {
    requests: RefCell<Vec<IoRequest>>,
    free: RefCell<Vec<SlotId>>,
}

impl IoSlots {
    /// Takes a free slot and fills it; `None` when [`CHANNEL_IO_MAX`] requests are in flight.
    pub(crate) fn acquire(
        &self,
        kind: IoKind,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> Option<SlotId> {
        let mut requests = self.requests.borrow_mut();
        let slot = match self.free.borrow_mut().pop() {
            Some(slot) => slot,
            None if requests.len() < CHANNEL_IO_MAX => {
                requests.push(IoRequest::empty());
                SlotId::try_from(requests.len() - 1).ok()?
            }
            None => return None,
        };
        let request = &mut requests[slot as usize];
        debug_assert_eq!(request.state, SlotState::Free);
        request.kind = kind;
        request.offset_bytes = offset_bytes;
        request.len_bytes = len_bytes;
        request.state = SlotState::InFlight;
        request.waker_current = false;
        Some(slot)
    }

    /// Runs `f` on the request in `slot`. Keep it short: no other slot access may nest in it.
    #[inline]
    pub fn with<R>(&self, slot: SlotId, f: impl FnOnce(&mut IoRequest) -> R) -> R {
        f(&mut self.requests.borrow_mut()[slot as usize])
    }

    /// Completes the request in `slot` with `status` (0 or a negative errno) and wakes its
    /// waiter. A request whose waiter went away is released here, dropping its buffers.
    #[inline]
    pub fn complete(&self, slot: SlotId, status: i32) {
        self.complete_deduplicated(slot, status, &mut None);
    }

    /// Completes a request as part of `batch` (see [`WakeBatch`]): its waiter is not woken
    /// again if an earlier completion of the batch already woke it.
    #[inline]
    pub fn complete_in(&self, slot: SlotId, status: i32, batch: &mut WakeBatch) {
        self.complete_deduplicated(slot, status, &mut batch.last_woken);
    }

    /// Completes several requests from a poller: like [`IoSlots::complete`] for each slot
    /// `complete_each` reports, but a waiter woken once in the batch is not woken again (no
    /// task runs during a poller, so a second wake would only repeat the first; with one task
    /// driving many requests, this saves an atomic operation per completion).
    #[inline]
    pub fn complete_batch<R>(
        &self,
        complete_each: impl FnOnce(&mut dyn FnMut(SlotId, i32)) -> R,
    ) -> R {
        let mut last_woken = None;
        complete_each(&mut |slot, status| self.complete_deduplicated(slot, status, &mut last_woken))
    }

    #[inline]
    fn complete_deduplicated(
        &self,
        slot: SlotId,
        status: i32,
        last_woken: &mut Option<WakerIdentity>,
    ) {
        let released = {
            let mut requests = self.requests.borrow_mut();
            let request = &mut requests[slot as usize];
            match request.state {
                SlotState::InFlight => {
                    request.state = SlotState::Done(status);
                    // Wake by reference and keep the waker (see `waker`). Waking only queues
                    // the task; it cannot re-enter this table.
                    if request.waker_current {
                        if let Some(waker) = &request.waker {
                            let identity = WakerIdentity::of(waker);
                            if *last_woken != Some(identity) {
                                waker.wake_by_ref();
                                *last_woken = Some(identity);
                            }
                        }
                    }
                    None
                }
                SlotState::Abandoned => {
                    request.state = SlotState::Free;
                    Some(std::mem::take(&mut request.bufs))
                }
                state => panic!("slot {slot} completed twice (state {state:?})"),
            }
        };
        if let Some(bufs) = released {
            drop(bufs);
            self.free.borrow_mut().push(slot);
        }
    }

    /// The status if `slot` completed, else registers `waker` and returns None.
    #[inline]
    pub(crate) fn poll_done(&self, slot: SlotId, waker: &Waker) -> Option<i32> {
        let mut requests = self.requests.borrow_mut();
        let request = &mut requests[slot as usize];
        match request.state {
            SlotState::Done(status) => Some(status),
            SlotState::InFlight => {
                match &request.waker {
                    Some(current) if current.will_wake(waker) => {}
                    _ => request.waker = Some(waker.clone()),
                }
                request.waker_current = true;
                None
            }
            state => panic!("slot {slot} polled in state {state:?}"),
        }
    }

    /// Frees a completed slot, handing its buffers back through `take`.
    #[inline]
    pub(crate) fn release<R>(&self, slot: SlotId, take: impl FnOnce(&mut Vec<DmaBuf>) -> R) -> R {
        let out = {
            let mut requests = self.requests.borrow_mut();
            let request = &mut requests[slot as usize];
            debug_assert!(matches!(request.state, SlotState::Done(_)));
            request.state = SlotState::Free;
            take(&mut request.bufs)
        };
        self.free.borrow_mut().push(slot);
        out
    }

    /// Gives up on `slot` (its future was dropped): released now if done, else on completion.
    pub(crate) fn abandon(&self, slot: SlotId) {
        let done = {
            let mut requests = self.requests.borrow_mut();
            let request = &mut requests[slot as usize];
            request.waker = None;
            match request.state {
                SlotState::Done(_) => {
                    request.state = SlotState::Free;
                    Some(std::mem::take(&mut request.bufs))
                }
                SlotState::InFlight => {
                    request.state = SlotState::Abandoned;
                    None
                }
                _ => None,
            }
        };
        if let Some(bufs) = done {
            drop(bufs);
            self.free.borrow_mut().push(slot);
        }
    }

    /// Requests in flight (submitted, not yet completed or released).
    pub fn in_flight(&self) -> usize {
        self.requests.borrow().len() - self.free.borrow().len()
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
        let slots = IoSlots::default();
        let first = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let first_waker = Waker::from(Arc::clone(&first));
        let slot = slots.acquire(IoKind::Read, 0, 4096).unwrap();
        assert_eq!(slots.poll_done(slot, &first_waker), None);
        slots.complete(slot, 0);
        assert_eq!(
            first.0.load(Ordering::SeqCst),
            1,
            "the waiter is woken once"
        );
        assert_eq!(slots.poll_done(slot, &first_waker), Some(0));
        slots.release(slot, |_| ());
        // The next request takes the same slot (LIFO) and completes before its future polls.
        let again = slots.acquire(IoKind::Write, 4096, 4096).unwrap();
        assert_eq!(again, slot);
        slots.complete(again, -5);
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
    fn an_abandoned_request_is_released_at_completion() {
        let slots = IoSlots::default();
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
}
