//! The poll group's channel table: one entry per channel (of any uring bdev on the reactor)
//! attached to the group, addressed by the channel index carried in every SQE's `user_data`.
//!
//! # Invariants
//!
//! * `user_data` of every SQE is `(channel index << 32) | slot tag` ([`user_data`]); the tag
//!   carries the slot generation, so a CQE of an earlier use of a reused slot is recognised.
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

use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;

use crate::dma::DmaBuf;
use crate::error::BdevError;
use crate::io::{IoSlots, SlotId};
use crate::uring::bdev::DeviceShared;
use crate::uring::group::{complete_noted, GroupState};
use crate::uring::request::Progress;

/// Initial capacity of a channel's overflow queue (it grows only if more requests overflow).
const OVERFLOW_INITIAL: usize = 64;

/// One channel attached to the group.
pub(super) struct ChannelEntry {
    pub(super) slots: Rc<IoSlots>,
    pub(super) dev: Arc<DeviceShared>,
    /// Registered file slot in the ring.
    pub(super) file: u32,
    /// SQEs of this channel in the ring (pushed, not yet reaped).
    pub(super) in_flight: u32,
    /// Slots waiting for SQ space, in order.
    pub(super) overflow: VecDeque<SlotId>,
    /// Per-slot progress, indexed by slot (grows with the slot table).
    pub(super) progress: Vec<Progress>,
    /// The zero-fill fallback's source buffer.
    pub(super) zero_buf: Option<DmaBuf>,
    /// False once the channel was destroyed (the entry only drains its SQEs then).
    pub(super) open: bool,
}

/// The `user_data` of an SQE for `slot` of channel `channel`.
#[inline]
pub(super) fn user_data(channel: u32, slot: SlotId) -> u64 {
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
        let wake_lists = &mut self.wake_lists;
        while let Some(slot) = entry.overflow.pop_front() {
            self.overflow_waiting -= 1;
            complete_noted(wake_lists, &entry.slots, slot, -libc::ECANCELED);
        }
        self.ready.retain(|&(channel, slot, status)| {
            if channel == index {
                complete_noted(wake_lists, &entry.slots, slot, status);
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
    pub(super) fn remove_entry(&mut self, index: u32) {
        let Some(entry) = self.channels.get_mut(index as usize).and_then(Option::take) else {
            return;
        };
        debug_assert_eq!(entry.in_flight, 0);
        if let Err(err) = self.ring.unregister_file(entry.file) {
            // The slot stays marked in use in the ring, so it is never handed out again.
            tracing::warn!(%err, "unregistering a uring bdev file from the ring failed");
        }
        self.free_indices.push(index);
        // Not dropped here: the entry may hold the last reference to the channel's table,
        // whose cached wakers' drops are user code that may use (or drop) other uring
        // channels, and the group is borrowed now. Dropped once the borrow ends (see
        // `GroupState::take_removed`).
        self.removed.push(entry);
    }

    /// The entries removed since the last call, for the caller to drop once it no longer
    /// borrows the group (see `remove_entry`).
    pub(super) fn take_removed(&mut self) -> Vec<ChannelEntry> {
        std::mem::take(&mut self.removed)
    }
}

/// Drops removed channel entries (see `GroupState::take_removed`), with no borrow of the
/// group held. Their tables' cached wakers run user code in their drops: a panic there is
/// contained and logged, so the group's poller goes on (docs/architecture.md, "Cancellation
/// and panic safety").
pub(super) fn drop_removed(removed: Vec<ChannelEntry>) {
    if removed.is_empty() {
        return;
    }
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(removed))).is_err() {
        tracing::error!(
            "dropping a closed uring channel's table panicked (a cached waker's drop); the \
             panic is contained"
        );
    }
}
