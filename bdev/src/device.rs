//! The two traits a block device module implements: [`Bdev`] (the device, shared by all
//! reactors) and [`ChannelBackend`] (its per-reactor context).

use std::rc::Rc;

use spool_reactor::PollStatus;

use crate::error::BdevError;
use crate::io::{IoKind, IoSlots, Submission};

/// A block device. Shared by every reactor (`Send + Sync`); each reactor does I/O through its
/// own [`ChannelBackend`], made by [`Bdev::create_channel`] on that reactor. Callers use it
/// through [`crate::BdevDesc`] and [`crate::BdevChannel`], which validate every request
/// (block-aligned, in range) before it reaches the device.
pub trait Bdev: Send + Sync + 'static {
    /// The device's name (unique among open bdevs by convention).
    fn name(&self) -> &str;

    /// Bytes per block: every offset and length is a multiple of it. A power of two of at
    /// least 512 ([`crate::BdevDesc::open`] refuses the device otherwise).
    fn block_size(&self) -> u32;

    /// Number of blocks: non-zero, and `block_size * block_count` must fit a `u64`
    /// ([`crate::BdevDesc::open`] refuses the device otherwise). Read once, at open.
    fn block_count(&self) -> u64;

    /// The alignment, in bytes, each buffer length of a vectored request must have (512 for
    /// O_DIRECT devices, 1 for memory): a power of two no larger than the block size (0 means
    /// 1). Buffers themselves are always 4 KiB aligned.
    fn iov_len_align(&self) -> u32 {
        1
    }

    /// Whether the device implements `kind`; unsupported kinds fail with -ENOTSUP before
    /// reaching it.
    fn supports(&self, kind: IoKind) -> bool {
        let _ = kind;
        true
    }

    /// Whether reads of unmapped blocks return zeros.
    fn unmap_reads_zeroes(&self) -> bool {
        false
    }

    /// Reserves the backing space of `len` bytes at `offset` so later writes there cannot
    /// fail for lack of it: a file-backed device allocates the range (`fallocate`, as qemu-img's
    /// `preallocation=falloc`); a device with nothing to reserve (a block device, RAM, null)
    /// succeeds at once, as this default does. A blocking call on the caller's thread, not a
    /// queued request. A full host gives [`BdevError::Reserve`] with -ENOSPC.
    fn reserve(&self, offset: u64, len: u64) -> Result<(), BdevError> {
        let _ = (offset, len);
        Ok(())
    }

    /// Creates the calling reactor's context. `slots` is the channel's request table, opaque
    /// outside this crate: the crate's backends keep it to complete requests from their
    /// pollers, and accept only submissions of that table. A wrapper passes it on to the
    /// backend it wraps (a backend handed another table fails its requests with -EINVAL).
    fn create_channel(&self, slots: Rc<IoSlots>) -> Result<Box<dyn ChannelBackend>, BdevError>;
}

/// One reactor's context for a device: it starts requests and reports their completions.
///
/// A safe trait: nothing an implementation does can make a crate backend's device (the
/// kernel, for io_uring) touch memory the request does not own. Requests, their buffers
/// and their completion are reachable only through the [`Submission`] (see `docs/bdev.md`).
///
/// Dropping a crate backend completes every request it still holds with `-ECANCELED` (the
/// io_uring one: those not in the kernel yet; those in it complete when reaped, with their
/// status if finished, else -ECANCELED), so a wrapper that drops or replaces its inner
/// channel never leaves a request hanging.
pub trait ChannelBackend {
    /// Starts the validated request `io`. The crate's backends keep its buffers in its slot
    /// until they complete it (exactly once). A wrapper may forward `io` to the backend it
    /// wraps, or complete it with [`Submission::complete`]; dropping or forgetting it cancels
    /// the request (-ECANCELED), and so does a panic here (the slot and buffers are released).
    fn submit(&mut self, io: Submission<'_>);

    /// Called every reactor loop pass: push queued work to the device, reap completions.
    fn poll(&mut self) -> PollStatus;
}

/// Checks a device geometry: the block size must be a power of two of at least 512, the
/// block count non-zero, and the size in bytes (`block_size * block_count`) must fit a `u64`;
/// anything else is `InvalidArgument` (-EINVAL) naming the value. [`crate::BdevDesc::open`]
/// applies it (and more) to every device it opens.
pub fn check_geometry(block_size: u32, block_count: u64) -> Result<(), BdevError> {
    check_block_size(block_size)?;
    if block_count == 0 {
        return Err(BdevError::InvalidArgument("block count is 0".into()));
    }
    if u64::from(block_size).checked_mul(block_count).is_none() {
        return Err(BdevError::InvalidArgument(format!(
            "{block_count} blocks of {block_size} bytes overflow a 64-bit size"
        )));
    }
    Ok(())
}

/// Checks a block size: a power of two of at least 512, else `InvalidArgument` (-EINVAL).
pub fn check_block_size(block_size: u32) -> Result<(), BdevError> {
    if block_size < 512 || !block_size.is_power_of_two() {
        return Err(BdevError::InvalidArgument(format!(
            "block size {block_size} is not a power of two >= 512"
        )));
    }
    Ok(())
}
