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
    waker: Option<Waker>,
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
        let released = {
            let mut requests = self.requests.borrow_mut();
            let request = &mut requests[slot as usize];
            match request.state {
                SlotState::InFlight => {
                    request.state = SlotState::Done(status);
                    // Wake by reference and keep the waker: the slot is usually taken again
                    // by the same task (the free list is LIFO), which then skips the clone.
                    // Waking only queues the task; it cannot re-enter this table.
                    if let Some(waker) = &request.waker {
                        waker.wake_by_ref();
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
