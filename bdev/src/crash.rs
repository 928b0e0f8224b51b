//! The crash bdev: a memory device that records every write since the last flush, so a test
//! can cut the power at any moment and get the image a real device could have left.
//!
//! Fault model (what a power cut may do, and all it may do):
//! - Data made durable by a completed flush survives. A flush makes durable exactly the
//!   writes that had completed when it was *submitted*; a write completing after the flush
//!   was submitted stays pending, even if it completes before the flush does.
//! - Each write completed since then (writes, and unmaps and write-zeroes recorded as writes
//!   of zeros) independently reached the media or did not, whole: the test chooses the subset
//!   ([`CrashBdev::cut_power`]). The survivors are applied in completion order on top of the
//!   durable image, so of two overlapping survivors the later-completed one wins. Writes are
//!   not torn below request granularity, and nothing outside written ranges changes.
//! - Requests in flight at the cut never reach the media: they complete with -EIO and move
//!   no data (the device counts power epochs and compares the request's with the current).
//! - [`CrashBdev::cut_power_with`] widens this for the whole-engine simulation: a pending
//!   write may also be torn (only some of its blocks reach the media, each block whole), and
//!   the survivors are applied in an order the caller chooses (reordering: of two
//!   overlapping survivors, either may win). Every block then holds its durable content or
//!   the content of one pending write covering it; nothing else.
//! - Test switches: latency spikes ([`CrashBdev::set_latency_spikes`], simulation only) and a
//!   planted bug, a flush that completes without making anything durable
//!   ([`CrashBdev::testing_flush_lies`]), which the simulation's self-test must catch.
//!
//! Invariants:
//! - Reads see the live image: the durable image plus every pending write, in completion
//!   order. `durable + all pending == live` at all times.
//! - Data moves at completion time (from the channel's poller, through [`Deferred`]), so
//!   under a simulation both completion order and latency come from the seed, and a crash
//!   test replays exactly from it.
//! - State sits behind one `Mutex` (this is a test device, not a fast one); no operation
//!   panics on a poisoned lock.

use std::rc::Rc;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use spool_reactor::PollStatus;

use crate::deferred::Deferred;
use crate::device::{check_block_size, Bdev, ChannelBackend};
use crate::dma::DmaBuf;
use crate::error::BdevError;
use crate::io::{slot_index, IoKind, IoRequest, IoSlots, Submission};

/// A pending write reaching the media at a [`CrashBdev::cut_power_with`]: whole, or torn.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Survivor {
    /// The write's completion number ([`PendingWrite::index`]).
    pub index: u64,
    /// `None`: every block of it; `Some(blocks)`: only these blocks, counted from the
    /// write's first block (a torn write; blocks outside the write are ignored).
    pub blocks: Option<Vec<u64>>,
}

/// A write completed since the last flush that covered it, and so not yet durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PendingWrite {
    /// The write's completion number: writes are numbered 0, 1, 2... in completion order
    /// since the device was built (numbers are not reused across power cuts).
    pub index: u64,
    /// Where it starts on the device, bytes.
    pub offset_bytes: u64,
    /// How many bytes it wrote.
    pub len_bytes: u64,
}

impl PendingWrite {
    /// The byte range it wrote.
    pub fn range(&self) -> std::ops::Range<u64> {
        self.offset_bytes..self.offset_bytes + self.len_bytes
    }
}

#[derive(Debug)]
struct Recorded {
    write: PendingWrite,
    data: Vec<u8>,
}

#[derive(Debug)]
struct State {
    durable: Vec<u8>,
    live: Vec<u8>,
    /// Writes completed and not yet durable, in completion order.
    pending: Vec<Recorded>,
    /// Writes completed since the device was built (the next write's index).
    completed_writes: u64,
    /// Power cuts so far: requests submitted in an earlier epoch fail with -EIO.
    epoch: u64,
    /// Planted bug: flushes succeed without making anything durable.
    flush_lies: bool,
    /// Latency spikes: one request in `spike_one_in` (0: none) waits `spike_ns` more.
    spike_one_in: u64,
    spike_ns: u64,
}

impl State {
    fn apply(image: &mut [u8], recorded: &Recorded) {
        let start = recorded.write.offset_bytes as usize;
        if let Some(target) = image.get_mut(start..start + recorded.data.len()) {
            target.copy_from_slice(&recorded.data);
        }
    }
}

/// A memory device that keeps a durable image and the writes since the last flush, for
/// crash-consistency tests.
#[derive(Debug)]
pub struct CrashBdev {
    name: String,
    block_size: u32,
    block_count: u64,
    state: Arc<Mutex<State>>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // Each update leaves the state consistent before any call that could panic, so a
    // poisoned lock still guards a usable state.
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl CrashBdev {
    /// A zeroed device; the block size must be a power of two of at least 512 and the block
    /// count non-zero.
    pub fn new(
        name: impl Into<String>,
        block_size: u32,
        block_count: u64,
    ) -> Result<CrashBdev, BdevError> {
        crate::device::check_geometry(block_size, block_count)?;
        let size = u64::from(block_size)
            .checked_mul(block_count)
            .and_then(|size| usize::try_from(size).ok())
            .ok_or_else(|| {
                BdevError::InvalidArgument(format!(
                    "{block_count} blocks of {block_size} bytes do not fit in memory"
                ))
            })?;
        CrashBdev::from_image(name, block_size, &vec![0; size])
    }

    /// A device whose durable (and live) image is a copy of `image`, a non-zero multiple of
    /// `block_size` bytes: reload a device from what [`CrashBdev::cut_power`] returned.
    pub fn from_image(
        name: impl Into<String>,
        block_size: u32,
        image: &[u8],
    ) -> Result<CrashBdev, BdevError> {
        check_block_size(block_size)?;
        if image.is_empty() || !image.len().is_multiple_of(block_size as usize) {
            return Err(BdevError::InvalidArgument(format!(
                "image of {} bytes is not a non-zero multiple of the block size {block_size}",
                image.len()
            )));
        }
        Ok(CrashBdev {
            name: name.into(),
            block_size,
            block_count: (image.len() / block_size as usize) as u64,
            state: Arc::new(Mutex::new(State {
                durable: image.to_vec(),
                live: image.to_vec(),
                pending: Vec::new(),
                completed_writes: 0,
                epoch: 0,
                flush_lies: false,
                spike_one_in: 0,
                spike_ns: 0,
            })),
        })
    }

    /// The writes completed and not yet durable, in completion order.
    pub fn pending_writes(&self) -> Vec<PendingWrite> {
        lock(&self.state)
            .pending
            .iter()
            .map(|recorded| recorded.write)
            .collect()
    }

    /// Writes completed since the device was built (across power cuts).
    pub fn completed_writes(&self) -> u64 {
        lock(&self.state).completed_writes
    }

    /// How many writes are pending (completed since the flushes that made the rest durable).
    pub fn writes_since_flush_count(&self) -> usize {
        lock(&self.state).pending.len()
    }

    /// A copy of the image that survives a power cut losing every pending write.
    pub fn durable_image(&self) -> Vec<u8> {
        lock(&self.state).durable.clone()
    }

    /// A copy of the image reads see now (durable plus every pending write).
    pub fn live_image(&self) -> Vec<u8> {
        lock(&self.state).live.clone()
    }

    /// Cuts the power with exactly the pending writes `keep` selects reaching the media:
    /// returns the durable image with those applied in completion order, and resets the
    /// device to it (durable and live, no pending writes; requests in flight will fail with
    /// -EIO). `keep` runs under the device's lock: it must not call into this device.
    pub fn cut_power(&self, keep: impl Fn(&PendingWrite) -> bool) -> Vec<u8> {
        let mut state = lock(&self.state);
        let mut image = state.durable.clone();
        for recorded in &state.pending {
            if keep(&recorded.write) {
                State::apply(&mut image, recorded);
            }
        }
        state.pending.clear();
        state.durable.clone_from(&image);
        state.live.clone_from(&image);
        state.epoch += 1;
        image
    }

    /// Cuts the power with exactly `survivors` reaching the media, applied in the order
    /// given (so an older write may land over a newer one it overlaps), each whole or torn
    /// to the blocks it names; every other pending write is lost. Returns (and resets the
    /// device to) the image, as [`CrashBdev::cut_power`]. Indices that name no pending write
    /// are ignored.
    pub fn cut_power_with(&self, survivors: &[Survivor]) -> Vec<u8> {
        let mut state = lock(&self.state);
        let mut image = state.durable.clone();
        let block = self.block_size as usize;
        for survivor in survivors {
            let Some(recorded) = state
                .pending
                .iter()
                .find(|recorded| recorded.write.index == survivor.index)
            else {
                continue;
            };
            match &survivor.blocks {
                None => State::apply(&mut image, recorded),
                Some(blocks) => {
                    let start = recorded.write.offset_bytes as usize;
                    for &n in blocks {
                        let Ok(n) = usize::try_from(n) else { continue };
                        let from = n.saturating_mul(block);
                        let (Some(data), Some(target)) = (
                            recorded.data.get(from..from.saturating_add(block)),
                            image.get_mut(start + from..(start + from).saturating_add(block)),
                        ) else {
                            continue;
                        };
                        target.copy_from_slice(data);
                    }
                }
            }
        }
        state.pending.clear();
        state.durable.clone_from(&image);
        state.live.clone_from(&image);
        state.epoch += 1;
        image
    }

    /// Test support (a planted bug): while set, a flush completes successfully without
    /// making any write durable, as a device lying about its cache would.
    #[doc(hidden)]
    pub fn testing_flush_lies(&self, lies: bool) {
        lock(&self.state).flush_lies = lies;
    }

    /// Under a simulation, one request in `one_in` (drawn from the seed; 0 turns spikes
    /// off) completes `spike_ns` later than its normal simulated latency.
    pub fn set_latency_spikes(&self, one_in: u64, spike_ns: u64) {
        let mut state = lock(&self.state);
        state.spike_one_in = one_in;
        state.spike_ns = spike_ns;
    }

    /// After a power cut whose image was taken: frees the device's images and pending
    /// writes, for a crashed process whose objects (holding this device) are leaked rather
    /// than dropped. Every request from now on fails (-EIO if submitted before, -EINVAL
    /// after); the device is useless.
    pub fn discard_media(&self) {
        let mut state = lock(&self.state);
        state.durable = Vec::new();
        state.live = Vec::new();
        state.pending = Vec::new();
        state.epoch += 1;
    }

    /// Cuts the power losing every pending write: returns (and resets to) the durable image.
    pub fn cut_power_keep_none(&self) -> Vec<u8> {
        self.cut_power(|_| false)
    }

    /// Cuts the power after every pending write reached the media: returns (and resets to)
    /// the live image.
    pub fn cut_power_keep_all(&self) -> Vec<u8> {
        self.cut_power(|_| true)
    }
}

impl Bdev for CrashBdev {
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
        Ok(Box::new(CrashChannel {
            slots,
            state: Arc::clone(&self.state),
            pending: Deferred::default(),
            meta: Vec::new(),
        }))
    }
}

/// What a request's submission saw, kept per slot until its completion.
#[derive(Debug, Clone, Copy, Default)]
struct SlotMeta {
    /// The power epoch it was submitted in.
    epoch: u64,
    /// For a flush: writes completed when it was submitted (those it makes durable).
    flush_mark: u64,
}

struct CrashChannel {
    slots: Rc<IoSlots>,
    state: Arc<Mutex<State>>,
    pending: Deferred,
    meta: Vec<SlotMeta>,
}

/// The byte range `offset..offset + len` of an image of `size` bytes, if inside it.
fn span(offset: u64, len: u64, size: usize) -> Option<std::ops::Range<usize>> {
    let start = usize::try_from(offset).ok()?;
    let end = start.checked_add(usize::try_from(len).ok()?)?;
    (end <= size).then_some(start..end)
}

fn execute(state: &mut State, meta: SlotMeta, request: &mut IoRequest) -> i32 {
    if meta.epoch != state.epoch {
        return -libc::EIO;
    }
    if request.kind == IoKind::Flush {
        if state.flush_lies {
            return 0;
        }
        let made_durable = state
            .pending
            .partition_point(|recorded| recorded.write.index < meta.flush_mark);
        for recorded in state.pending.drain(..made_durable) {
            State::apply(&mut state.durable, &recorded);
        }
        return 0;
    }
    let Some(range) = span(request.offset_bytes, request.len_bytes, state.live.len()) else {
        return -libc::EINVAL;
    };
    let data = match request.kind {
        IoKind::Read | IoKind::Write
            if request.bufs.iter().map(DmaBuf::len).sum::<usize>() != range.len() =>
        {
            return -libc::EINVAL;
        }
        IoKind::Read => {
            let mut at = range.start;
            for buf in &mut request.bufs {
                let len = buf.len();
                buf.copy_from_slice(&state.live[at..at + len]);
                at += len;
            }
            return 0;
        }
        IoKind::Write => {
            let mut data = Vec::with_capacity(range.len());
            for buf in &request.bufs {
                data.extend_from_slice(buf);
            }
            data
        }
        IoKind::Unmap | IoKind::WriteZeroes | IoKind::Flush => vec![0; range.len()],
    };
    state.live[range].copy_from_slice(&data);
    let write = PendingWrite {
        index: state.completed_writes,
        offset_bytes: request.offset_bytes,
        len_bytes: request.len_bytes,
    };
    state.completed_writes += 1;
    state.pending.push(Recorded { write, data });
    0
}

impl ChannelBackend for CrashChannel {
    fn submit(&mut self, io: Submission<'_>) {
        let Some(slot) = io.accept(&self.slots) else {
            return;
        };
        let kind = self.slots.with(slot, |request| request.kind);
        let (meta, spike) = {
            let state = lock(&self.state);
            let spike = if state.spike_one_in > 0 {
                spool_reactor::sim_rng_u64()
                    .filter(|draw| draw % state.spike_one_in == 0)
                    .map_or(0, |_| state.spike_ns)
            } else {
                0
            };
            let meta = SlotMeta {
                epoch: state.epoch,
                flush_mark: if kind == IoKind::Flush {
                    state.completed_writes
                } else {
                    0
                },
            };
            (meta, spike)
        };
        let index = slot_index(slot);
        if self.meta.len() <= index {
            self.meta.resize(index + 1, SlotMeta::default());
        }
        self.meta[index] = meta;
        self.pending.push_after(slot, spike);
    }

    fn poll(&mut self) -> PollStatus {
        if self.pending.is_empty() {
            return PollStatus::Idle;
        }
        let slots = &self.slots;
        let (state, metas) = (&self.state, &self.meta);
        let pending = &mut self.pending;
        let completed = pending.drain_due(|slot| {
            let meta = metas.get(slot_index(slot)).copied().unwrap_or_default();
            let status = slots.with(slot, |request| execute(&mut lock(state), meta, request));
            slots.complete(slot, status);
        });
        self.pending.status(completed)
    }
}

impl Drop for CrashChannel {
    /// Requests still queued complete with -ECANCELED and never reach the media (as if cut
    /// off before the device saw them).
    fn drop(&mut self) {
        self.pending.cancel_all(&self.slots);
    }
}
