//! The null bdev: every request succeeds without touching data, completed from the channel's
//! poller on the next loop pass. It measures the cost of the stack itself.

use std::rc::Rc;

use spool_reactor::PollStatus;

use crate::deferred::Deferred;
use crate::device::{Bdev, ChannelBackend};
use crate::error::BdevError;
use crate::io::{IoSlots, Submission};

/// A device of `block_count` blocks of `block_size` bytes that stores nothing.
#[derive(Debug)]
pub struct NullBdev {
    name: String,
    block_size: u32,
    block_count: u64,
}

impl NullBdev {
    /// A null device; the block size must be a power of two of at least 512.
    pub fn new(
        name: impl Into<String>,
        block_size: u32,
        block_count: u64,
    ) -> Result<NullBdev, BdevError> {
        crate::device::check_geometry(block_size, block_count)?;
        Ok(NullBdev {
            name: name.into(),
            block_size,
            block_count,
        })
    }
}

impl Bdev for NullBdev {
    fn name(&self) -> &str {
        &self.name
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn block_count(&self) -> u64 {
        self.block_count
    }

    fn create_channel(&self, slots: Rc<IoSlots>) -> Result<Box<dyn ChannelBackend>, BdevError> {
        Ok(Box::new(NullChannel {
            slots,
            pending: Deferred::default(),
        }))
    }
}

struct NullChannel {
    slots: Rc<IoSlots>,
    pending: Deferred,
}

impl ChannelBackend for NullChannel {
    #[inline]
    fn submit(&mut self, io: Submission<'_>) {
        if let Some(slot) = io.accept(&self.slots) {
            self.pending.push(slot);
        }
    }

    #[inline]
    fn poll(&mut self) -> PollStatus {
        if self.pending.is_empty() {
            return PollStatus::Idle;
        }
        let slots = &self.slots;
        let completed = self.pending.drain_due(|slot| {
            slots.complete(slot, 0);
        });
        self.pending.status(completed)
    }
}

impl Drop for NullChannel {
    /// Requests still queued complete with -ECANCELED (a wrapper may drop its inner channel).
    fn drop(&mut self) {
        self.pending.cancel_all(&self.slots);
    }
}
