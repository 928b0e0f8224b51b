//! How a request becomes SQEs, and what each completion means for it: the steps of one
//! request slot of a channel attached to the poll group.
//!
//! # Invariants
//!
//! * Only this module pushes SQEs (through [`Ring::push`], in [`issue`]) for uring bdevs; the
//!   group poller (`group.rs`) submits them and reaps their CQEs.
//! * A slot has at most one SQE in the ring at a time (multi-step requests such as short-I/O
//!   resubmission or the write-zeroes fallback issue their steps one after another), so a CQE
//!   names exactly one step of one request ([`on_completion`] decides what it means).
//! * The buffers (and iovec scratch) an SQE points into are owned by its slot, which is
//!   completed only after that SQE's CQE is reaped or the SQE is retracted. Nothing outside
//!   the crate can reach a request's fields or complete its slot (`io.rs`), and a request is
//!   started only from its [`Submission`], which is accepted only for the channel's own table.
//! * [`issue`] is the one place a read or write is turned into kernel pointers: it checks that
//!   the bytes asked for lie inside the slot's buffers (and that there are at most
//!   [`IOVECS_MAX`] iovecs) and fails the request with `-EINVAL` otherwise, never issuing it.
//! * `user_data` carries the slot's tag, generation included: a CQE of an earlier use of a
//!   reused slot is logged and ignored by the group poller, never completes the current one.
//! * Reads and writes ask for at most [`RW_STEP_MAX`] bytes per SQE; a short transfer is
//!   resumed where it stopped, at most [`SHORT_IO_RETRIES_MAX`] times, and a transfer of
//!   0 bytes fails with `-EIO` (never a retry loop).
//! * Unmap and write-zeroes use fallocate (files) or a blocking ioctl (block devices). When
//!   the file or device refuses them (`EOPNOTSUPP`/`EINVAL`), they fall back to writing zeros
//!   from the channel's [`ZERO_FILL_CHUNK`] zero buffer, and the device remembers it.

// SQEs carry raw pointers into request buffers that the kernel accesses asynchronously;
// pushing them is `unsafe` (the contract of `Ring::push`). Only the push call sites here use it.
#![allow(unsafe_code)]

use std::sync::atomic::Ordering;

use crate::dma::DmaBuf;
use crate::io::{slot_index, IoKind, IoRequest, SlotId, Submission};
use crate::limits::IOVECS_MAX;
use crate::uring::bdev::DeviceShared;
use crate::uring::blk;
use crate::uring::channels::{user_data, ChannelEntry};
use crate::uring::group::{GroupState, UringGroupStats};
use crate::uring::sys::{Ring, RingError, RingOp};

/// Bytes of the zeroed buffer a channel writes from when unmap/write-zeroes fall back to
/// writing zeros (allocated on first use, kept for the channel's life).
pub const ZERO_FILL_CHUNK: usize = 1 << 20;

/// Short reads/writes resubmitted for one request before it fails with -EIO.
pub const SHORT_IO_RETRIES_MAX: u8 = 8;

/// Largest byte count one read/write SQE asks for (a CQE result is an `i32`); longer requests
/// are issued in steps.
const RW_STEP_MAX: u64 = 1 << 30;

/// Why a read or write failed the length check of [`issue`] (its errno is -EINVAL).
const TOO_LONG: &str = "request longer than its buffers, or too many iovecs";

/// What a request slot is doing in the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum Phase {
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
pub(super) struct Progress {
    pub(super) phase: Phase,
    /// Read or write (of the request's buffers, or of zeros).
    pub(super) write: bool,
    /// Bytes done so far.
    pub(super) done: u64,
    /// Bytes the SQE in flight asked for.
    pub(super) issued: u64,
    /// Bytes the request covers.
    pub(super) total: u64,
    /// Short transfers seen.
    pub(super) shorts: u8,
}

/// Why a step could not be pushed.
pub(super) enum IssueError {
    /// The SQ is full: park the slot and retry next pass.
    Full,
    /// The request fails with this negative errno.
    Fail(i32),
}

/// What a CQE means for its request.
pub(super) enum Outcome {
    /// The request is finished with this status.
    Done(i32),
    /// Issue the next step.
    Again,
}

impl GroupState {
    /// Starts the validated request `io` on channel `index` (failed with -EINVAL if it is not
    /// a request of that channel's table, -ECANCELED if the channel is gone).
    pub(crate) fn start_request(&mut self, index: u32, io: Submission<'_>) {
        let Some(entry) = self
            .channels
            .get_mut(index as usize)
            .and_then(Option::as_mut)
        else {
            return;
        };
        let Some(slot) = io.accept(&entry.slots) else {
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
                // A file whose space stays reserved is unmapped as zeroed, never punched.
                let zeroes = kind == IoKind::WriteZeroes || dev.keep_allocated;
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
        let at = slot_index(slot);
        if entry.progress.len() <= at {
            entry.progress.resize(at + 1, Progress::default());
        }
        entry.progress[at] = Progress {
            phase,
            write: kind != IoKind::Read,
            done: 0,
            issued: 0,
            total,
            shorts: 0,
        };
        self.issue_or_park(index, slot);
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
pub(super) fn on_completion(
    entry: &mut ChannelEntry,
    slot: SlotId,
    result: i32,
    stats: &mut UringGroupStats,
) -> Outcome {
    let Some(progress) = entry.progress.get_mut(slot_index(slot)) else {
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
pub(super) fn fill_iovecs(req: &mut IoRequest, mut skip: u64, cap: u64) -> u64 {
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
pub(super) fn issue(
    ring: &mut Ring,
    entry: &mut ChannelEntry,
    index: u32,
    slot: SlotId,
    regions_tried: &mut usize,
    stats: &mut UringGroupStats,
) -> Result<(), IssueError> {
    let ud = user_data(index, slot);
    let file = entry.file;
    let Some(progress) = entry.progress.get_mut(slot_index(slot)) else {
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
                    // The length check: the step must lie inside the buffer.
                    if done
                        .checked_add(len)
                        .is_none_or(|end| end > buf.len() as u64)
                    {
                        return (Err(RingError::InvalidArgument(TOO_LONG)), 0);
                    }
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
                    // SAFETY: `ptr..ptr + len` lies inside `buf`: `done + len <= buf.len()` was
                    // checked just above (the length check), and `buf` is a DmaBuf owned by
                    // this slot's request, which only this crate can reach (`io.rs`). The slot
                    // is completed, and its buffers handed back or dropped, only after this
                    // SQE's CQE is reaped (`GroupState::poll`) or retracted
                    // (`GroupState::fail_ring`); a destroyed channel's entry keeps the slots
                    // alive until then, and a group frees its entries only after `Ring::close`
                    // succeeded (it leaks them otherwise).
                    (unsafe { ring.push(&op, ud) }, len)
                } else {
                    let len = fill_iovecs(req, done, RW_STEP_MAX);
                    // The length check: the buffers must hold the whole step (`fill_iovecs`
                    // only describes bytes inside them), in at most IOVECS_MAX iovecs.
                    if len != remaining.min(RW_STEP_MAX) || req.iovecs.len() > IOVECS_MAX {
                        return (Err(RingError::InvalidArgument(TOO_LONG)), 0);
                    }
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
                    // is only rewritten when the slot's next step is issued, and is
                    // crate-private, `io.rs`); every iovec points inside a DmaBuf owned by the
                    // slot (`fill_iovecs` describes only bytes inside them, and the length
                    // check above refused a request its buffers cannot hold). Both stay alive
                    // until the CQE is reaped, as for the single-buffer case above.
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
            // SAFETY: `len <= zero.len()` (the `min` above), so the kernel reads only the
            // zero buffer. It belongs to this channel's entry, which is removed (and
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
