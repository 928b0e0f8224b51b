//! The malloc bdev: a block device in RAM, shared by every reactor without locks.
//!
//! Invariants:
//! - The image is `block_size * block_count` bytes, allocated and zeroed when the device is
//!   built, stored as 8-byte words (`AtomicU64`) and never resized. Every copy is made of
//!   relaxed whole-word loads and stores, so concurrent requests from several reactors are
//!   free of data races without `unsafe` or locks. Requests that overlap and run at the same
//!   time see some interleaving of whole words, as two DMA engines would give.
//! - Offsets and lengths reaching the device are block aligned (the channel validated them),
//!   and blocks are at least 512 bytes, so every request covers whole words. A request's
//!   buffers may split a word between two of them; the copy loops carry the split word across.
//! - Data moves at completion time, when the slot's turn comes out of
//!   [`Deferred::drain_due_within`] on the channel's poller (at most `PASS_BYTES` a pass,
//!   in order), not at submission: a read in flight with a write sees the write
//!   only if the write completed first, which the simulation orders from its seed.
//! - Flush is a no-op (RAM is as durable as this device gets); unmap and write-zeroes write
//!   zeros, so reads of unmapped blocks return zeros.
//! - The I/O path allocates nothing: one copy per request plus a queue push and pop.

use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use spool_reactor::PollStatus;

use crate::deferred::Deferred;
use crate::device::{Bdev, ChannelBackend};
use crate::dma::DmaBuf;
use crate::error::BdevError;
use crate::io::{IoKind, IoRequest, IoSlots, Submission};

const WORD: usize = 8;

/// Bytes one poll of a channel copies at most (at least one request): a pass with a queue
/// of 1 MiB copies (copy-on-write of large clusters) then takes about a millisecond
/// instead of tens, and the reactor's other work is not held behind all of them. A 4 KiB
/// job at queue depth 32 (128 KiB) still completes in one pass.
const PASS_BYTES: usize = 256 << 10;

/// A RAM block device of `block_count` blocks of `block_size` bytes, zeroed at creation.
#[derive(Debug)]
pub struct MallocBdev {
    name: String,
    block_size: u32,
    block_count: u64,
    memory: Arc<Memory>,
}

/// The device image as 8-byte words, shared by the device and its channels.
#[derive(Debug)]
struct Memory {
    words: Box<[AtomicU64]>,
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
        let words = image_words(block_size, block_count)?;
        let memory = Memory::zeroed(&name, words)?;
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
        store_from(&device.memory.words, image);
        Ok(device)
    }

    /// The device's size in bytes.
    pub fn size_bytes(&self) -> u64 {
        u64::from(self.block_size) * self.block_count
    }

    /// A copy of the whole image as it is now (each word as of some moment during the copy
    /// if I/O is running concurrently).
    pub fn snapshot(&self) -> Vec<u8> {
        let mut image = vec![0u8; self.memory.words.len() * WORD];
        load_into(&self.memory.words, &mut image);
        image
    }
}

/// The number of 8-byte words an image of this geometry takes, after checking it.
fn image_words(block_size: u32, block_count: u64) -> Result<usize, BdevError> {
    crate::device::check_geometry(block_size, block_count)?;
    u64::from(block_size)
        .checked_mul(block_count)
        .and_then(|bytes| usize::try_from(bytes / WORD as u64).ok())
        .ok_or_else(|| {
            BdevError::InvalidArgument(format!(
                "{block_count} blocks of {block_size} bytes do not fit in memory"
            ))
        })
}

impl Memory {
    fn zeroed(name: &str, words: usize) -> Result<Memory, BdevError> {
        let mut vec: Vec<AtomicU64> = Vec::new();
        vec.try_reserve_exact(words)
            .map_err(|err| BdevError::Open {
                name: name.to_owned(),
                reason: format!("cannot allocate {} bytes: {err}", words * WORD),
                errno: -libc::ENOMEM,
            })?;
        vec.resize_with(words, || AtomicU64::new(0));
        Ok(Memory {
            words: vec.into_boxed_slice(),
        })
    }
}

/// Stores `src` (a multiple of 8 bytes) into `dst` word by word.
#[inline]
fn store_from(dst: &[AtomicU64], src: &[u8]) {
    debug_assert_eq!(src.len(), dst.len() * WORD);
    for (word, chunk) in dst.iter().zip(src.chunks_exact(WORD)) {
        let mut bytes = [0u8; WORD];
        bytes.copy_from_slice(chunk);
        word.store(u64::from_ne_bytes(bytes), Ordering::Relaxed);
    }
}

/// Loads `src` into `dst` (a multiple of 8 bytes) word by word.
#[inline]
fn load_into(src: &[AtomicU64], dst: &mut [u8]) {
    debug_assert_eq!(dst.len(), src.len() * WORD);
    for (word, chunk) in src.iter().zip(dst.chunks_exact_mut(WORD)) {
        chunk.copy_from_slice(&word.load(Ordering::Relaxed).to_ne_bytes());
    }
}

/// Copies device words `words` into the scatter list `bufs`, in order. The buffers' lengths
/// sum to `words.len() * 8`; a word split between two buffers is loaded once and shared.
#[inline]
fn read_scatter(words: &[AtomicU64], bufs: &mut [DmaBuf]) {
    if let [buf] = bufs {
        // The common case: one buffer covering whole words.
        load_into(words, buf.as_mut_slice());
        return;
    }
    let mut next = 0usize; // next word to load
    let mut split = [0u8; WORD]; // a loaded word partly handed out
    let mut split_used = WORD; // bytes of `split` already handed out
    for buf in bufs.iter_mut() {
        let mut dst = buf.as_mut_slice();
        if split_used < WORD {
            let take = (WORD - split_used).min(dst.len());
            dst[..take].copy_from_slice(&split[split_used..split_used + take]);
            split_used += take;
            dst = &mut dst[take..];
        }
        let whole = dst.len() / WORD;
        let (body, tail) = dst.split_at_mut(whole * WORD);
        load_into(&words[next..next + whole], body);
        next += whole;
        if !tail.is_empty() {
            split = words[next].load(Ordering::Relaxed).to_ne_bytes();
            next += 1;
            tail.copy_from_slice(&split[..tail.len()]);
            split_used = tail.len();
        }
    }
    debug_assert_eq!(next, words.len());
}

/// Copies the gather list `bufs` into device words `words`, in order. The buffers' lengths
/// sum to `words.len() * 8`; a word split between two buffers is assembled, then stored whole.
#[inline]
fn write_gather(words: &[AtomicU64], bufs: &[DmaBuf]) {
    if let [buf] = bufs {
        store_from(words, buf.as_slice());
        return;
    }
    let mut next = 0usize; // next word to store
    let mut split = [0u8; WORD]; // a word being assembled across buffers
    let mut split_len = 0usize; // bytes of `split` filled
    for buf in bufs {
        let mut src = buf.as_slice();
        if split_len > 0 {
            let take = (WORD - split_len).min(src.len());
            split[split_len..split_len + take].copy_from_slice(&src[..take]);
            split_len += take;
            src = &src[take..];
            if split_len == WORD {
                words[next].store(u64::from_ne_bytes(split), Ordering::Relaxed);
                next += 1;
                split_len = 0;
            }
        }
        let whole = src.len() / WORD;
        let (body, tail) = src.split_at(whole * WORD);
        store_from(&words[next..next + whole], body);
        next += whole;
        if !tail.is_empty() {
            split[..tail.len()].copy_from_slice(tail);
            split_len = tail.len();
        }
    }
    debug_assert_eq!(split_len, 0);
    debug_assert_eq!(next, words.len());
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
    /// Moves the data of `request`; 0 or a negative errno.
    #[inline]
    fn execute(words: &[AtomicU64], request: &mut IoRequest) -> i32 {
        if request.kind == IoKind::Flush {
            return 0;
        }
        let (Ok(offset), Ok(len)) = (
            usize::try_from(request.offset_bytes),
            usize::try_from(request.len_bytes),
        ) else {
            return -libc::EINVAL;
        };
        let first = offset / WORD;
        let Some(range) = first
            .checked_add(len / WORD)
            .and_then(|end| words.get(first..end))
        else {
            // Validated by the channel; never reached, but no panic on the I/O path.
            return -libc::EINVAL;
        };
        if matches!(request.kind, IoKind::Read | IoKind::Write)
            && request.bufs.iter().map(DmaBuf::len).sum::<usize>() != len
        {
            // Also guaranteed by the channel: the buffers cover exactly the range.
            return -libc::EINVAL;
        }
        match request.kind {
            IoKind::Read => read_scatter(range, &mut request.bufs),
            IoKind::Write => write_gather(range, &request.bufs),
            IoKind::Unmap | IoKind::WriteZeroes => {
                for word in range {
                    word.store(0, Ordering::Relaxed);
                }
            }
            IoKind::Flush => {}
        }
        0
    }
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
        let words = &self.memory.words;
        let pending = &mut self.pending;
        let completed = pending.drain_due_within(PASS_BYTES, |slot| {
            let (status, bytes) = slots.with(slot, |request| {
                (Self::execute(words, request), request.len_bytes)
            });
            slots.complete(slot, status);
            usize::try_from(bytes).unwrap_or(usize::MAX)
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
