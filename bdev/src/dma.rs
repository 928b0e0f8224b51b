//! DMA buffers: owned, 4 KiB-aligned byte buffers carved from a process-global pool.
//!
//! # Design
//!
//! The pool grows in 2 MiB *chunks*. Each chunk is first mapped as one explicit 2 MiB hugepage
//! (`mmap(MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB | MAP_HUGE_2MB)`), then populated explicitly
//! with `madvise(MADV_POPULATE_WRITE)` (not `MAP_POPULATE`, whose failure is silent: under a
//! hugetlb cgroup limit the mapping succeeds and the first write raises SIGBUS). When either
//! step fails (the machine-wide hugepage pool is empty, too small, or disabled, a cgroup limit,
//! a kernel before 5.14), the chunk is unmapped (logged at warn for a populate failure) and is an
//! ordinary anonymous mapping aligned to 2 MiB instead (map 4 MiB, unmap the unaligned head and
//! tail), hinted with `MADV_HUGEPAGE` so transparent hugepages may back it, and prefaulted with
//! `MADV_POPULATE_WRITE` where the kernel has it. Callers see the same behaviour either way; only
//! [`DmaBuf::is_hugepage`] and [`DmaPoolStats::hugepage_chunks`] tell the difference. The
//! hugepage attempt is repeated for every new chunk because the machine's hugepage pool is shared
//! and changes size under us.
//!
//! Chunks are split into power-of-two size classes from 4 KiB to 2 MiB with a buddy scheme:
//! every class has a free list ordered by address, a request takes the lowest free block of the
//! smallest class that fits (splitting a larger block if needed), and a freed block is merged
//! with its buddy whenever the buddy is free too. Requests larger than 2 MiB get a mapping of
//! their own (ordinary pages, rounded up to 4 KiB), which is unmapped when the buffer is dropped;
//! such buffers have no [`DmaBuf::fixed_region`].
//!
//! Chunks are **never unmapped** while the process lives, so their addresses can be registered
//! with io_uring as fixed buffers once and stay valid ([`dma_regions`]). The pool is capped at
//! [`DMA_POOL_CHUNKS_MAX`] chunks; past that allocation fails with [`DmaError::PoolExhausted`].
//!
//! Allocation takes a mutex and may call `mmap`: it is **not** meant for the I/O hot path.
//! Callers preallocate their buffers and reuse them.
//!
//! # Environment
//!
//! `SPOOL_HUGEPAGES=0` (read once, when the global pool is first used) disables the hugepage
//! attempt; every chunk then uses ordinary pages. Any other value, or no variable, means "try".
//!
//! # Why libc and not `hugepage-rs`
//!
//! `hugepage-rs` only does the `MAP_HUGETLB` mapping: it has no fallback to ordinary pages, and
//! on failure it returns a null pointer (or panics in its `Box`). The machine's hugepage pool is
//! shared and variable, so the fallback is a requirement, and the whole mapping logic is a few
//! dozen lines of `libc` calls.

// This module owns raw memory: it calls mmap/munmap/madvise and hands out slices into the
// mappings, which cannot be done without `unsafe`. Every unsafe block states its invariant.
#![allow(unsafe_code)]

use std::collections::BTreeSet;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::{Mutex, MutexGuard, OnceLock};

/// Alignment (and granularity) of every DMA buffer, in bytes.
pub const DMA_ALIGN: usize = 4096;

/// Size of one pool chunk (one 2 MiB hugepage when hugepages are available), in bytes.
pub const DMA_CHUNK_SIZE: usize = 2 << 20;

/// Most chunks the global pool will ever map (4096 chunks = 8 GiB); fits in a `u16` region index.
pub const DMA_POOL_CHUNKS_MAX: usize = 4096;

/// Environment variable that disables the hugepage attempt when set to `0`.
pub const SPOOL_HUGEPAGES_ENV: &str = "SPOOL_HUGEPAGES";

/// log2 of the smallest size class (4 KiB).
const MIN_CLASS_SHIFT: u32 = 12;
/// log2 of the largest size class (2 MiB, one whole chunk).
const MAX_CLASS_SHIFT: u32 = 21;
/// Number of size classes (4 KiB, 8 KiB, ..., 2 MiB).
const NUM_CLASSES: usize = (MAX_CLASS_SHIFT - MIN_CLASS_SHIFT + 1) as usize;

const _: () = assert!(1usize << MAX_CLASS_SHIFT == DMA_CHUNK_SIZE);
const _: () = assert!(1usize << MIN_CLASS_SHIFT == DMA_ALIGN);
const _: () = assert!(DMA_POOL_CHUNKS_MAX <= u16::MAX as usize + 1);

/// Why a DMA buffer could not be allocated.
#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    /// The requested length was zero or too large to round up to a page multiple.
    #[error("invalid DMA buffer length {len}")]
    InvalidLength {
        /// The rejected length.
        len: usize,
    },
    /// The pool already holds [`DMA_POOL_CHUNKS_MAX`] chunks and none has room.
    #[error("DMA pool exhausted ({max_chunks} chunks of 2 MiB in use)")]
    PoolExhausted {
        /// The chunk cap that was hit.
        max_chunks: usize,
    },
    /// `mmap` failed for both the hugepage and the ordinary mapping.
    #[error("mapping DMA memory failed: {source}")]
    Map {
        /// The error from the last `mmap` attempt.
        #[source]
        source: std::io::Error,
    },
}

impl DmaError {
    /// The negative errno equivalent of this error (`-EINVAL`, `-ENOMEM`, or `mmap`'s errno).
    pub fn errno(&self) -> i32 {
        match self {
            DmaError::InvalidLength { .. } => -libc::EINVAL,
            DmaError::PoolExhausted { .. } => -libc::ENOMEM,
            DmaError::Map { source } => -source.raw_os_error().unwrap_or(libc::ENOMEM),
        }
    }
}

/// One pool chunk as seen by io_uring buffer registration: `len` bytes at `addr`, index `index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaRegion {
    /// The chunk index; equals [`DmaBuf::fixed_region`] of every buffer inside this chunk.
    pub index: u16,
    /// Start address of the chunk (2 MiB-aligned); valid for the life of the process.
    pub addr: usize,
    /// Length of the chunk in bytes ([`DMA_CHUNK_SIZE`]).
    pub len: usize,
    /// Whether the chunk is backed by an explicit (hugetlb) 2 MiB page.
    pub hugepage: bool,
}

impl DmaRegion {
    /// The chunk's start address as a pointer (never null, never freed).
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.addr as *mut u8
    }

    /// Whether the `len` bytes at `ptr` lie entirely inside this region.
    pub fn contains(&self, ptr: *const u8, len: usize) -> bool {
        let p = ptr as usize;
        p >= self.addr
            && p.checked_add(len)
                .is_some_and(|end| end <= self.addr + self.len)
    }
}

/// A snapshot of pool usage counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DmaPoolStats {
    /// Chunks mapped so far (never decreases).
    pub chunks: usize,
    /// How many of those chunks are explicit 2 MiB hugepages.
    pub hugepage_chunks: usize,
    /// Bytes handed out from chunks (counting each buffer's rounded-up size class).
    pub bytes_in_use: usize,
    /// Buffers currently handed out from chunks.
    pub buffers_in_use: usize,
    /// Bytes free inside chunks (`chunks * DMA_CHUNK_SIZE - bytes_in_use`).
    pub bytes_free: usize,
    /// Oversized buffers (each with its own mapping) currently alive.
    pub oversized_buffers: usize,
    /// Bytes mapped for oversized buffers currently alive.
    pub oversized_bytes: usize,
}

/// A mapped chunk.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    base: usize,
    hugepage: bool,
}

/// The mutable part of a pool.
#[derive(Debug)]
struct PoolState {
    chunks: Vec<Chunk>,
    /// Free blocks per size class (index 0 = 4 KiB), as `(chunk index, offset in chunk)`.
    free: [BTreeSet<(u16, usize)>; NUM_CLASSES],
    bytes_in_use: usize,
    buffers_in_use: usize,
    oversized_buffers: usize,
    oversized_bytes: usize,
}

/// How a chunk is tried as hugepage memory: the mapping flags and the populate step. The
/// production value is [`HugepageAttempt::HUGETLB`]; unit tests substitute either step (an
/// ordinary mapping standing in for a hugetlb one, a populate step that fails) to exercise the
/// fallback on machines without hugepages.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HugepageAttempt {
    /// Extra `mmap` flags of the hugepage mapping.
    pub(crate) map_flags: libc::c_int,
    /// Faults in every page of `[base, base + len)` for writing, or says why it could not.
    pub(crate) populate: fn(base: usize, len: usize) -> std::io::Result<()>,
}

impl HugepageAttempt {
    /// One explicit 2 MiB hugetlb page, populated with `MADV_POPULATE_WRITE`.
    pub(crate) const HUGETLB: HugepageAttempt = HugepageAttempt {
        map_flags: libc::MAP_HUGETLB | libc::MAP_HUGE_2MB,
        populate: populate_write,
    };
}

/// A DMA pool: the process-global one, or a private one in tests.
#[derive(Debug)]
pub(crate) struct Pool {
    hugepage: Option<HugepageAttempt>,
    max_chunks: usize,
    state: Mutex<PoolState>,
}

impl Pool {
    /// A new, empty pool. `try_hugepage == false` is the `SPOOL_HUGEPAGES=0` path.
    pub(crate) const fn new(try_hugepage: bool, max_chunks: usize) -> Pool {
        let hugepage = if try_hugepage {
            Some(HugepageAttempt::HUGETLB)
        } else {
            None
        };
        Pool::with_attempt(hugepage, max_chunks)
    }

    /// A new, empty pool that tries hugepage chunks the way `hugepage` says (None: never).
    pub(crate) const fn with_attempt(hugepage: Option<HugepageAttempt>, max_chunks: usize) -> Pool {
        Pool {
            hugepage,
            max_chunks,
            state: Mutex::new(PoolState {
                chunks: Vec::new(),
                free: [const { BTreeSet::new() }; NUM_CLASSES],
                bytes_in_use: 0,
                buffers_in_use: 0,
                oversized_buffers: 0,
                oversized_bytes: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // The critical sections never leave the state half-updated on unwind (they only panic
        // on allocation failure, which aborts), so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Allocates a buffer of `len` bytes from this pool.
    pub(crate) fn alloc(&'static self, len: usize) -> Result<DmaBuf, DmaError> {
        let cap = round_up(len, DMA_ALIGN).ok_or(DmaError::InvalidLength { len })?;
        if len == 0 {
            return Err(DmaError::InvalidLength { len });
        }
        if cap > DMA_CHUNK_SIZE {
            return self.alloc_oversized(len, cap);
        }
        let class = class_of(cap);
        let mut st = self.lock();
        let (region, offset) = self.take_block(&mut st, class)?;
        let chunk = st.chunks[usize::from(region)];
        st.bytes_in_use += class_size(class);
        st.buffers_in_use += 1;
        drop(st);
        let ptr = NonNull::new((chunk.base + offset) as *mut u8).ok_or(DmaError::Map {
            source: std::io::Error::from_raw_os_error(libc::EFAULT),
        })?;
        Ok(DmaBuf {
            ptr,
            len,
            backing: Backing::Pooled {
                pool: self,
                region,
                class: class as u8,
                hugepage: chunk.hugepage,
            },
        })
    }

    /// Allocates a buffer of `len` bytes from this pool with every byte zero.
    pub(crate) fn alloc_zeroed(&'static self, len: usize) -> Result<DmaBuf, DmaError> {
        let mut buf = self.alloc(len)?;
        buf.as_mut_slice().fill(0);
        Ok(buf)
    }

    /// Finds (or makes, by splitting or mapping a new chunk) a free block of `class`.
    fn take_block(&self, st: &mut PoolState, class: usize) -> Result<(u16, usize), DmaError> {
        let from = match (class..NUM_CLASSES).find(|&c| !st.free[c].is_empty()) {
            Some(c) => c,
            None => {
                if st.chunks.len() >= self.max_chunks {
                    return Err(DmaError::PoolExhausted {
                        max_chunks: self.max_chunks,
                    });
                }
                let (base, hugepage) = map_chunk(self.hugepage.as_ref())?;
                let index = st.chunks.len() as u16;
                st.chunks.push(Chunk { base, hugepage });
                st.free[NUM_CLASSES - 1].insert((index, 0));
                NUM_CLASSES - 1
            }
        };
        let Some((region, offset)) = st.free[from].pop_first() else {
            // Unreachable: `from` was chosen (or just filled) as a non-empty class.
            return Err(DmaError::PoolExhausted {
                max_chunks: self.max_chunks,
            });
        };
        // Split down to the wanted class, putting the upper halves on the free lists.
        for c in (class..from).rev() {
            st.free[c].insert((region, offset + class_size(c)));
        }
        Ok((region, offset))
    }

    /// Returns a block to its free list, merging it with free buddies.
    fn free_block(&self, region: u16, addr: usize, class: usize) {
        let mut st = self.lock();
        let base = st.chunks[usize::from(region)].base;
        let in_use = class_size(class);
        let mut offset = addr - base;
        let mut class = class;
        while class + 1 < NUM_CLASSES {
            let buddy = offset ^ class_size(class);
            if !st.free[class].remove(&(region, buddy)) {
                break;
            }
            offset = offset.min(buddy);
            class += 1;
        }
        st.free[class].insert((region, offset));
        st.bytes_in_use -= in_use;
        st.buffers_in_use -= 1;
    }

    fn alloc_oversized(&'static self, len: usize, cap: usize) -> Result<DmaBuf, DmaError> {
        let p =
            map_anonymous(cap, 0).map_err(|source| DmaError::Map { source })? as *mut libc::c_void;
        let ptr = NonNull::new(p.cast::<u8>()).ok_or(DmaError::Map {
            source: std::io::Error::from_raw_os_error(libc::EFAULT),
        })?;
        let mut st = self.lock();
        st.oversized_buffers += 1;
        st.oversized_bytes += cap;
        drop(st);
        Ok(DmaBuf {
            ptr,
            len,
            backing: Backing::Own { pool: self, cap },
        })
    }

    fn free_oversized(&self, ptr: NonNull<u8>, cap: usize) {
        // SAFETY: `ptr`/`cap` describe a mapping made by `alloc_oversized` and owned by exactly
        // one `DmaBuf`, which is being dropped, so nothing references it any more.
        let rc = unsafe { libc::munmap(ptr.as_ptr().cast(), cap) };
        if rc != 0 {
            tracing::warn!(
                error = %std::io::Error::last_os_error(),
                "munmap of an oversized DMA buffer failed; leaking it"
            );
        }
        let mut st = self.lock();
        st.oversized_buffers -= 1;
        st.oversized_bytes -= cap;
    }

    /// The chunks mapped so far.
    pub(crate) fn regions(&self) -> Vec<DmaRegion> {
        let st = self.lock();
        st.chunks
            .iter()
            .enumerate()
            .map(|(i, c)| DmaRegion {
                index: i as u16,
                addr: c.base,
                len: DMA_CHUNK_SIZE,
                hugepage: c.hugepage,
            })
            .collect()
    }

    /// A snapshot of the counters.
    pub(crate) fn stats(&self) -> DmaPoolStats {
        let st = self.lock();
        let chunks = st.chunks.len();
        DmaPoolStats {
            chunks,
            hugepage_chunks: st.chunks.iter().filter(|c| c.hugepage).count(),
            bytes_in_use: st.bytes_in_use,
            buffers_in_use: st.buffers_in_use,
            bytes_free: chunks * DMA_CHUNK_SIZE - st.bytes_in_use,
            oversized_buffers: st.oversized_buffers,
            oversized_bytes: st.oversized_bytes,
        }
    }
}

fn round_up(n: usize, to: usize) -> Option<usize> {
    n.checked_add(to - 1).map(|v| v & !(to - 1))
}

/// The size class index for a page-multiple `cap <= DMA_CHUNK_SIZE`.
fn class_of(cap: usize) -> usize {
    let shift = cap
        .next_power_of_two()
        .trailing_zeros()
        .max(MIN_CLASS_SHIFT);
    (shift - MIN_CLASS_SHIFT) as usize
}

const fn class_size(class: usize) -> usize {
    1usize << (class as u32 + MIN_CLASS_SHIFT)
}

/// Maps one 2 MiB-aligned chunk: hugepage first when `hugepage` says how, ordinary pages
/// otherwise (or when the hugepage chunk cannot be mapped or populated). Returns the base
/// address and whether it is a hugepage.
pub(crate) fn map_chunk(hugepage: Option<&HugepageAttempt>) -> Result<(usize, bool), DmaError> {
    if let Some(attempt) = hugepage {
        if let Some(base) = map_hugepage_chunk(attempt) {
            return Ok((base, true));
        }
    }
    map_plain_chunk().map(|base| (base, false))
}

/// `madvise(MADV_POPULATE_WRITE)` over `[base, base + len)`: faults every page in writable,
/// and fails (ENOMEM, EFAULT, ...) where a first write would instead kill the process with
/// SIGBUS, e.g. a hugetlb page over a cgroup's `hugetlb.2MB.max`. Kernels before 5.14 do not
/// know the advice (EINVAL), so a hugetlb chunk cannot be proven backed there and is not used.
fn populate_write(base: usize, len: usize) -> std::io::Result<()> {
    // SAFETY: callers pass a live anonymous mapping the pool just created and nothing else
    // references; populating it does not change its contents (fresh zero pages).
    let rc = unsafe { libc::madvise(base as *mut libc::c_void, len, libc::MADV_POPULATE_WRITE) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn map_anonymous(len: usize, extra_flags: libc::c_int) -> std::io::Result<usize> {
    // SAFETY: an anonymous private mapping with a null hint creates new memory and affects no
    // existing mapping; the result is checked against MAP_FAILED before use.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | extra_flags,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(p as usize)
}

/// Maps and populates one hugepage chunk, or returns None (after a log line) when either step
/// fails. `MAP_POPULATE` is not used: its failure is silent, and under a hugetlb cgroup limit
/// the mapping succeeds, is reported as hugepage memory, and the first write raises SIGBUS.
/// The explicit populate step fails instead, and the chunk falls back to ordinary pages.
fn map_hugepage_chunk(attempt: &HugepageAttempt) -> Option<usize> {
    let p = match map_anonymous(DMA_CHUNK_SIZE, attempt.map_flags) {
        Ok(address) => address as *mut libc::c_void,
        Err(error) => {
            tracing::debug!(%error, "2 MiB hugepage mapping failed; using ordinary pages for this DMA chunk");
            return None;
        }
    };
    let base = p as usize;
    if !base.is_multiple_of(DMA_CHUNK_SIZE) {
        // hugetlb mappings are always hugepage-aligned; be defensive anyway.
        // SAFETY: unmapping exactly the mapping created just above, which nothing references.
        unsafe { libc::munmap(p, DMA_CHUNK_SIZE) };
        return None;
    }
    if let Err(error) = (attempt.populate)(base, DMA_CHUNK_SIZE) {
        tracing::warn!(
            %error,
            "2 MiB hugepage mapped but could not be populated (hugetlb limit?); using ordinary \
             pages for this DMA chunk"
        );
        // SAFETY: unmapping exactly the mapping created above; no buffer was carved from it.
        unsafe { libc::munmap(p, DMA_CHUNK_SIZE) };
        return None;
    }
    Some(base)
}

fn map_plain_chunk() -> Result<usize, DmaError> {
    let span = 2 * DMA_CHUNK_SIZE;
    let start = map_anonymous(span, 0).map_err(|source| DmaError::Map { source })?;
    let base = (start + DMA_CHUNK_SIZE - 1) & !(DMA_CHUNK_SIZE - 1);
    let head = base - start;
    let tail = span - head - DMA_CHUNK_SIZE;
    if head > 0 {
        // SAFETY: [start, base) is the unaligned head of the mapping made above; nothing uses it.
        unsafe { libc::munmap(start as *mut libc::c_void, head) };
    }
    if tail > 0 {
        // SAFETY: [base + 2 MiB, start + 4 MiB) is the unused tail of the same mapping.
        unsafe { libc::munmap((base + DMA_CHUNK_SIZE) as *mut libc::c_void, tail) };
    }
    // Both hints are best-effort: THP may back the chunk (THP is often in `madvise` mode), and
    // prefaulting keeps the first I/O from paying page faults. Failures are harmless.
    // SAFETY: [base, base + 2 MiB) is a live mapping owned by the pool; madvise with these
    // advice values does not change its contents.
    unsafe {
        libc::madvise(
            base as *mut libc::c_void,
            DMA_CHUNK_SIZE,
            libc::MADV_HUGEPAGE,
        );
        libc::madvise(
            base as *mut libc::c_void,
            DMA_CHUNK_SIZE,
            libc::MADV_POPULATE_WRITE,
        );
    }
    Ok(base)
}

/// The process-global pool; created on first use, reading `SPOOL_HUGEPAGES` once.
fn global_pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let try_hugepage = std::env::var_os(SPOOL_HUGEPAGES_ENV).is_none_or(|v| v != "0");
        Pool::new(try_hugepage, DMA_POOL_CHUNKS_MAX)
    })
}

/// The chunks of the global pool that exist now, in index order (for io_uring registration).
pub fn dma_regions() -> Vec<DmaRegion> {
    global_pool().regions()
}

/// A snapshot of the global pool's usage counters.
pub fn dma_pool_stats() -> DmaPoolStats {
    global_pool().stats()
}

/// Where a buffer's memory came from.
enum Backing {
    /// A block of size class `class` inside chunk `region` of `pool`.
    Pooled {
        pool: &'static Pool,
        region: u16,
        class: u8,
        hugepage: bool,
    },
    /// A mapping of its own, `cap` bytes, accounted in `pool`.
    Own { pool: &'static Pool, cap: usize },
}

/// An owned, 4096-byte-aligned, DMA-able buffer of `len` bytes; dropping it returns the memory.
pub struct DmaBuf {
    ptr: NonNull<u8>,
    len: usize,
    backing: Backing,
}

// SAFETY: a DmaBuf exclusively owns its block (like Box<[u8]>); the pool it returns the block to
// is behind a Mutex, so dropping it on another thread is fine.
unsafe impl Send for DmaBuf {}
// SAFETY: `&DmaBuf` only gives out `&[u8]` and raw pointers, like `&Box<[u8]>`; there is no
// interior mutability.
unsafe impl Sync for DmaBuf {}

impl DmaBuf {
    /// Allocates `len > 0` bytes from the global pool; the contents are unspecified but readable.
    pub fn alloc(len: usize) -> Result<DmaBuf, DmaError> {
        global_pool().alloc(len)
    }

    /// Allocates a buffer of `len > 0` bytes from the global pool with every byte zero.
    pub fn alloc_zeroed(len: usize) -> Result<DmaBuf, DmaError> {
        global_pool().alloc_zeroed(len)
    }

    /// The buffer's length in bytes, as requested (always > 0).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a `DmaBuf` has at least one byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The usable capacity: `len` rounded up to the buffer's block size (a multiple of 4096).
    pub fn capacity(&self) -> usize {
        match self.backing {
            Backing::Pooled { class, .. } => class_size(usize::from(class)),
            Backing::Own { cap, .. } => cap,
        }
    }

    /// Changes the length to `len` bytes of the same block, `0 < len <= capacity()`, so a
    /// cached buffer can be reused for a request of another size without allocating. Bytes
    /// past the old length keep whatever they held (they are readable: the pool's memory is
    /// always initialised). Fails with [`DmaError::InvalidLength`] otherwise.
    pub fn set_len(&mut self, len: usize) -> Result<(), DmaError> {
        if len == 0 || len > self.capacity() {
            return Err(DmaError::InvalidLength { len });
        }
        self.len = len;
        Ok(())
    }

    /// The buffer's bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `len` (<= capacity) bytes of a live, readable mapping that this
        // DmaBuf owns exclusively until drop; mmap memory is always initialised.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The buffer's bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` guarantees no other reference exists.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The start address (4096-aligned, valid for `len` bytes until drop).
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// The start address for writing (4096-aligned, valid for `len` bytes until drop).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The index of the pool chunk holding this buffer (an io_uring fixed-buffer index), or
    /// `None` for an oversized buffer with its own mapping.
    pub fn fixed_region(&self) -> Option<u16> {
        match self.backing {
            Backing::Pooled { region, .. } => Some(region),
            Backing::Own { .. } => None,
        }
    }

    /// Whether the buffer lives on an explicit 2 MiB hugepage.
    pub fn is_hugepage(&self) -> bool {
        match self.backing {
            Backing::Pooled { hugepage, .. } => hugepage,
            Backing::Own { .. } => false,
        }
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        match self.backing {
            Backing::Pooled {
                pool,
                region,
                class,
                ..
            } => {
                pool.free_block(region, self.ptr.as_ptr() as usize, usize::from(class));
            }
            Backing::Own { pool, cap } => pool.free_oversized(self.ptr, cap),
        }
    }
}

impl fmt::Debug for DmaBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaBuf")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .field("capacity", &self.capacity())
            .field("fixed_region", &self.fixed_region())
            .field("hugepage", &self.is_hugepage())
            .finish()
    }
}

impl Deref for DmaBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl DerefMut for DmaBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl AsRef<[u8]> for DmaBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl AsMut<[u8]> for DmaBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

#[cfg(test)]
#[path = "dma_tests.rs"]
mod tests;
