//! The malloc bdev: a block device in RAM, shared by every reactor.
//!
//! Invariants:
//! - The image is `block_size * block_count` bytes, allocated zeroed when the device is built
//!   (lazily backed by the kernel), cut into chunks of [`CHUNK_BYTES`] (the last may be
//!   shorter), each its own buffer behind its own `RwLock`, never resized. A copy takes the
//!   lock of one chunk at a time (shared to read, exclusive to write) and moves that chunk's
//!   share with one `copy_from_slice` (a `memcpy`), so concurrent requests from several
//!   reactors are free of data races without `unsafe`, and no reactor holds two locks (no
//!   deadlock). Requests that overlap and run at the same time see some interleaving of whole
//!   chunks' shares, as two DMA engines would give. A 4 KiB request at a 4 KiB-aligned offset
//!   lies in one chunk: one uncontended lock and one `memcpy`. (Until issue 18 the image was
//!   8-byte relaxed atomics copied word by word: 71 % of a randwrite qd 32 profile.)
//! - Offsets and lengths reaching the device are block aligned (the channel validated them);
//!   a request's buffers may split anywhere, and the copy walks buffers and chunks together.
//! - Data moves at completion time, when the slot's turn comes out of
//!   [`Deferred::drain_due_in_parts`] on the channel's poller, not at submission: a read in
//!   flight with a write sees the write only if the write completed first, which the
//!   simulation orders from its seed. One pass of a channel moves at most `PASS_BYTES`, in
//!   order, also inside a request: a 1 MiB copy moves in eight passes and completes after its
//!   last part, so a small request on another channel of the reactor (the metadata's) is
//!   not held behind it. Under a simulation requests move whole.
//! - Flush is a no-op (RAM is as durable as this device gets); unmap and write-zeroes write
//!   zeros, so reads of unmapped blocks return zeros.
//! - The I/O path allocates nothing: one copy per request plus a queue push and pop.

use std::rc::Rc;
use std::sync::{Arc, PoisonError, RwLock};

use spool_reactor::PollStatus;

use crate::deferred::{Deferred, PartDone};
use crate::device::{Bdev, ChannelBackend};
use crate::dma::DmaBuf;
use crate::error::BdevError;
use crate::io::{IoKind, IoRequest, IoSlots, Submission};

/// Bytes of one chunk of the image (one lock): large enough that a 1 GiB image has 16,384
/// locks (128 KiB of them) and a 1 MiB request takes 16, small enough that two reactors
/// writing different places rarely meet on one.
const CHUNK_BYTES: usize = 64 << 10;

/// Bytes one poll of a channel moves at most (a larger request moves in parts over several
/// passes): a pass behind a queue of 1 MiB copies (copy-on-write of large clusters) takes
/// an eighth of one copy, not tens of them, so the reactor's other work (a snapshot's
/// metadata steps) waits that long per step. A 4 KiB job at queue depth 32 (128 KiB) still
/// completes in one pass. (256 KiB left a snapshot's write pause at about 1.2 ms under a
/// 1 MiB copy storm, 128 KiB about 0.6 ms, with large-request throughput unchanged:
/// docs/performance.md, "Fourth round".)
const PASS_BYTES: usize = 128 << 10;

/// A RAM block device of `block_count` blocks of `block_size` bytes, zeroed at creation.
#[derive(Debug)]
pub struct MallocBdev {
    name: String,
    block_size: u32,
    block_count: u64,
    memory: Arc<Memory>,
}

/// The device image in chunks, shared by the device and its channels.
#[derive(Debug)]
struct Memory {
    chunks: Box<[RwLock<Box<[u8]>>]>,
    len: usize,
}

impl MallocBdev {
    /// A zeroed device; the block size must be a power of two of at least 512, the block
    /// count non-zero, and the whole image is allocated now (an error if it cannot be).
    pub fn new(
        name: impl Into<String>,
        block_size: u32,
        block_count: u64,
    ) -> Result<MallocBdev, BdevError> {
        let name = name.into();
        let len = image_bytes(block_size, block_count)?;
        let memory = Memory::zeroed(&name, len)?;
        Ok(MallocBdev {
            name,
            block_size,
            block_count,
            memory: Arc::new(memory),
        })
    }

    /// A device holding a copy of `image`, whose length must be a non-zero multiple of
    /// `block_size` (a power of two of at least 512).
    pub fn from_image(
        name: impl Into<String>,
        block_size: u32,
        image: &[u8],
    ) -> Result<MallocBdev, BdevError> {
        crate::device::check_block_size(block_size)?;
        if image.is_empty() || !image.len().is_multiple_of(block_size as usize) {
            return Err(BdevError::InvalidArgument(format!(
                "image of {} bytes is not a non-zero multiple of the block size {block_size}",
                image.len()
            )));
        }
        let block_count = (image.len() / block_size as usize) as u64;
        let device = MallocBdev::new(name, block_size, block_count)?;
        device.memory.write(0, image.len(), std::iter::once(image));
        Ok(device)
    }

    /// The device's size in bytes.
    pub fn size_bytes(&self) -> u64 {
        u64::from(self.block_size) * self.block_count
    }

    /// A copy of the whole image as it is now (each chunk as of some moment during the copy
    /// if I/O is running concurrently).
    pub fn snapshot(&self) -> Vec<u8> {
        let mut image = vec![0u8; self.memory.len];
        self.memory
            .read(0, image.len(), std::iter::once(&mut image[..]));
        image
    }
}

/// The number of bytes an image of this geometry takes, after checking it.
fn image_bytes(block_size: u32, block_count: u64) -> Result<usize, BdevError> {
    crate::device::check_geometry(block_size, block_count)?;
    u64::from(block_size)
        .checked_mul(block_count)
        .and_then(|bytes| usize::try_from(bytes).ok())
        .ok_or_else(|| {
            BdevError::InvalidArgument(format!(
                "{block_count} blocks of {block_size} bytes do not fit in memory"
            ))
        })
}

impl Memory {
    fn zeroed(name: &str, len: usize) -> Result<Memory, BdevError> {
        let no_memory = |err: std::collections::TryReserveError| BdevError::Open {
            name: name.to_owned(),
            reason: format!("cannot allocate {len} bytes: {err}"),
            errno: -libc::ENOMEM,
        };
        let count = len.div_ceil(CHUNK_BYTES);
        let mut chunks = Vec::new();
        chunks.try_reserve_exact(count).map_err(no_memory)?;
        for index in 0..count {
            let bytes = CHUNK_BYTES.min(len - index * CHUNK_BYTES);
            let mut chunk = Vec::new();
            chunk.try_reserve_exact(bytes).map_err(no_memory)?;
            chunk.resize(bytes, 0);
            chunks.push(RwLock::new(chunk.into_boxed_slice()));
        }
        Ok(Memory {
            chunks: chunks.into_boxed_slice(),
            len,
        })
    }

    /// Calls `each(chunk, start, len)` for the chunks covering `len` bytes at `offset`, in
    /// order: `start` is where the share begins inside the chunk.
    #[inline]
    fn walk(
        &self,
        offset: usize,
        len: usize,
        mut each: impl FnMut(&RwLock<Box<[u8]>>, usize, usize),
    ) {
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let (index, start) = (at / CHUNK_BYTES, at % CHUNK_BYTES);
            let share = (CHUNK_BYTES - start).min(end - at);
            each(&self.chunks[index], start, share);
            at += share;
        }
    }

    /// Copies `len` bytes of the image from byte `offset` into `bufs`, in order (their
    /// lengths sum to `len`).
    #[inline]
    fn read<'b>(&self, offset: usize, len: usize, mut bufs: impl Iterator<Item = &'b mut [u8]>) {
        let mut dst: &mut [u8] = &mut [];
        self.walk(offset, len, |chunk, start, share| {
            let chunk = chunk.read().unwrap_or_else(PoisonError::into_inner);
            let mut src = &chunk[start..start + share];
            while !src.is_empty() {
                if dst.is_empty() {
                    let Some(next) = bufs.next() else { return };
                    dst = next;
                    continue;
                }
                let take = src.len().min(dst.len());
                let (head, rest) = std::mem::take(&mut dst).split_at_mut(take);
                head.copy_from_slice(&src[..take]);
                dst = rest;
                src = &src[take..];
            }
        });
    }

    /// Copies `bufs`, in order, into `len` bytes of the image from byte `offset` (their
    /// lengths sum to `len`).
    #[inline]
    fn write<'b>(&self, offset: usize, len: usize, mut bufs: impl Iterator<Item = &'b [u8]>) {
        let mut src: &[u8] = &[];
        self.walk(offset, len, |chunk, start, share| {
            let mut chunk = chunk.write().unwrap_or_else(PoisonError::into_inner);
            let mut dst = &mut chunk[start..start + share];
            while !dst.is_empty() {
                if src.is_empty() {
                    let Some(next) = bufs.next() else { return };
                    src = next;
                    continue;
                }
                let take = src.len().min(dst.len());
                let (head, rest) = std::mem::take(&mut dst).split_at_mut(take);
                head.copy_from_slice(&src[..take]);
                dst = rest;
                src = &src[take..];
            }
        });
    }

    /// Writes zeros over `len` bytes at `offset`.
    fn zero(&self, offset: usize, len: usize) {
        self.walk(offset, len, |chunk, start, share| {
            chunk.write().unwrap_or_else(PoisonError::into_inner)[start..start + share].fill(0);
        });
    }
}

impl Bdev for MallocBdev {
    fn name(&self) -> &str {
        &self.name
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn block_count(&self) -> u64 {
        self.block_count
    }

    fn unmap_reads_zeroes(&self) -> bool {
        true
    }

    fn create_channel(&self, slots: Rc<IoSlots>) -> Result<Box<dyn ChannelBackend>, BdevError> {
        Ok(Box::new(MallocChannel {
            slots,
            memory: Arc::clone(&self.memory),
            pending: Deferred::default(),
        }))
    }
}

struct MallocChannel {
    slots: Rc<IoSlots>,
    memory: Arc<Memory>,
    pending: Deferred,
}

impl MallocChannel {
    /// Moves at most `allowance` bytes of `request`'s data, from byte `from` of it (what
    /// earlier passes moved); finished when the last byte has moved or the request failed
    /// (its status is then in `status`: 0 or a negative errno).
    #[inline]
    fn execute_part(
        memory: &Memory,
        request: &mut IoRequest,
        from: usize,
        allowance: usize,
    ) -> (PartDone, i32) {
        let failed = |errno: i32| {
            (
                PartDone {
                    moved: 0,
                    finished: true,
                },
                -errno,
            )
        };
        if request.kind == IoKind::Flush {
            return (
                PartDone {
                    moved: 0,
                    finished: true,
                },
                0,
            );
        }
        let (Ok(offset), Ok(len)) = (
            usize::try_from(request.offset_bytes),
            usize::try_from(request.len_bytes),
        ) else {
            return failed(libc::EINVAL);
        };
        if offset.checked_add(len).is_none_or(|end| end > memory.len) || from > len {
            // Validated by the channel; never reached, but no panic on the I/O path.
            return failed(libc::EINVAL);
        }
        if matches!(request.kind, IoKind::Read | IoKind::Write)
            && request.bufs.iter().map(DmaBuf::len).sum::<usize>() != len
        {
            // Also guaranteed by the channel: the buffers cover exactly the range.
            return failed(libc::EINVAL);
        }
        let part = (len - from).min(allowance);
        match request.kind {
            IoKind::Read => memory.read(
                offset + from,
                part,
                window_mut(&mut request.bufs, from, part),
            ),
            IoKind::Write => memory.write(offset + from, part, window(&request.bufs, from, part)),
            IoKind::Unmap | IoKind::WriteZeroes => memory.zero(offset + from, part),
            IoKind::Flush => {}
        }
        (
            PartDone {
                moved: part,
                finished: from + part == len,
            },
            0,
        )
    }
}

/// The slices of `bufs` (in order) covering `len` bytes from byte `skip` of their
/// concatenation.
fn window(bufs: &[DmaBuf], mut skip: usize, mut len: usize) -> impl Iterator<Item = &[u8]> {
    bufs.iter().filter_map(move |buf| {
        let bytes = buf.as_slice();
        if skip >= bytes.len() {
            skip -= bytes.len();
            return None;
        }
        let take = (bytes.len() - skip).min(len);
        let piece = &bytes[skip..skip + take];
        skip = 0;
        len -= take;
        (take > 0).then_some(piece)
    })
}

/// As [`window`], for writing into the buffers.
fn window_mut(
    bufs: &mut [DmaBuf],
    mut skip: usize,
    mut len: usize,
) -> impl Iterator<Item = &mut [u8]> {
    bufs.iter_mut().filter_map(move |buf| {
        let bytes = buf.as_mut_slice();
        if skip >= bytes.len() {
            skip -= bytes.len();
            return None;
        }
        let take = (bytes.len() - skip).min(len);
        let piece = &mut bytes[skip..skip + take];
        skip = 0;
        len -= take;
        (take > 0).then_some(piece)
    })
}

impl ChannelBackend for MallocChannel {
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
        let memory = &*self.memory;
        let pending = &mut self.pending;
        let completed = pending.drain_due_in_parts(PASS_BYTES, |slot, from, allowance| {
            let (part, status) = slots.with(slot, |request| {
                Self::execute_part(memory, request, from, allowance)
            });
            if part.finished {
                slots.complete(slot, status);
            }
            part
        });
        self.pending.status(completed)
    }
}

impl Drop for MallocChannel {
    /// Requests still queued complete with -ECANCELED, moving no data (a wrapper may drop its
    /// inner channel with requests queued in it).
    fn drop(&mut self) {
        self.pending.cancel_all(&self.slots);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|index| (index as u8).wrapping_mul(37).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn copies_cross_chunks_and_buffer_splits_both_ways() {
        // Two and a half chunks: the last chunk is shorter.
        let len = CHUNK_BYTES * 2 + CHUNK_BYTES / 2;
        let memory = Memory::zeroed("t", len).unwrap();
        assert_eq!(memory.chunks.len(), 3);
        let mut model = vec![0u8; len];
        // A write straddling both chunk boundaries, from three buffers of odd lengths.
        let offset = CHUNK_BYTES - 4096;
        let data = pattern(7, CHUNK_BYTES + 8192 + 512);
        let (a, rest) = data.split_at(1000);
        let (b, c) = rest.split_at(CHUNK_BYTES);
        memory.write(offset, data.len(), [a, b, c].into_iter());
        model[offset..offset + data.len()].copy_from_slice(&data);
        memory.zero(CHUNK_BYTES * 2 - 512, 1024);
        model[CHUNK_BYTES * 2 - 512..CHUNK_BYTES * 2 + 512].fill(0);
        // Read it all back through a different split.
        let mut first = vec![0u8; 3];
        let mut second = vec![0u8; CHUNK_BYTES + 5];
        let mut third = vec![0u8; len - 3 - (CHUNK_BYTES + 5)];
        memory.read(
            0,
            len,
            [&mut first[..], &mut second[..], &mut third[..]].into_iter(),
        );
        let read: Vec<u8> = [first, second, third].concat();
        assert_eq!(read.len(), len);
        assert!(read == model, "the image differs from the model");
        let mut image = vec![0u8; len];
        memory.read(0, len, std::iter::once(&mut image[..]));
        assert!(image == model);
    }
}
