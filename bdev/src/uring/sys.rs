//! The kernel edge of the io_uring bdev: the only place that pushes SQEs and reaps CQEs.
//!
//! [`Ring`] wraps one `io_uring` instance (from the `io-uring` crate). It knows nothing of
//! reactors or bdevs: callers describe an operation with a [`RingOp`], tag it with a `u64`
//! `user_data`, [`Ring::push`] it, [`Ring::submit`], and later [`Ring::reap`] completions as
//! `(user_data, result)` pairs, where `result` is a byte count or a negative errno.
//!
//! * **Files** are always used as registered ("fixed") files: a sparse table of [`FILE_SLOTS`]
//!   slots is registered when the ring is created; [`Ring::register_file`] fills a slot.
//! * **Buffers**: [`Ring::register_dma_regions`] registers the chunks of the DMA pool
//!   ([`crate::dma::dma_regions`]) as fixed buffers, using a sparse table of
//!   [`DMA_POOL_CHUNKS_MAX`] entries so chunks mapped later can be added by calling it again.
//!   Reads and writes whose buffer lies in a registered chunk use `READ_FIXED`/`WRITE_FIXED`;
//!   all others use plain `READ`/`WRITE`. If registration is impossible (old kernel,
//!   `RLIMIT_MEMLOCK`), the ring logs a warning and keeps using the plain opcodes.
//! * **Back-pressure**: the ring never holds more operations in flight than its completion queue
//!   has slots, so CQEs cannot overflow; [`Ring::push`] returns [`RingError::SqFull`] instead.
//! * **Completions without interrupts to the reactor**: rings are set up with
//!   `IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG` (when the kernel has them and SQPOLL
//!   is off). The kernel then no longer interrupts a reactor spinning in userspace (an IPI, a
//!   VM exit on a virtual machine) to post each completion; it raises `IORING_SQ_TASKRUN` in the
//!   shared ring instead, and [`Ring::reap`] sees the flag and makes one `io_uring_enter` to
//!   run the pending completion work. (`DEFER_TASKRUN` is not used: it ties completion work
//!   to one thread.)
//! * **Closing**: [`Ring::close`] waits for every operation in flight and reports whether it
//!   could; only after it returned `Ok` (or once every CQE was reaped) may memory handed to
//!   [`Ring::push`] be freed. When it fails, the kernel may still access that memory: the owner
//!   must leak it. Dropping a `Ring` calls `close` as a best effort but cannot report failure.
//! * **Retracting**: after a persistent `io_uring_enter` failure, [`Ring::retract_queued`] (not
//!   SQPOLL) gives up the SQEs the kernel never consumed: the ring then never submits again
//!   (later enters pass `to_submit = 0`), so those SQEs are never executed and their memory is
//!   the caller's again.

// io_uring operations take raw pointers to caller memory that the kernel reads/writes
// asynchronously, and buffer registration hands raw addresses to the kernel: both need `unsafe`.
// Every unsafe block states its invariant.
#![allow(unsafe_code)]

use std::cell::Cell;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use io_uring::{opcode, register::Probe, types, IoUring};

use crate::dma::{dma_regions, DMA_POOL_CHUNKS_MAX};

/// Number of registered-file slots every ring has.
pub const FILE_SLOTS: u32 = 64;

/// Largest submission queue size accepted by [`Ring::new`] (the kernel's limit).
pub const MAX_ENTRIES: u32 = 32768;

/// Consecutive `EAGAIN`/`EBUSY` results (without any completion in between) [`Ring::close`]
/// tolerates before giving up. With [`CLOSE_BUSY_BACKOFF`] between tries this gives the kernel
/// about a second to find the memory it lacked; past that the failure is treated as
/// persistent (the caller then leaks the memory the kernel may still use).
pub const CLOSE_BUSY_RETRIES_MAX: u32 = 1000;

/// Pause between two `EAGAIN`/`EBUSY` tries in [`Ring::close`].
pub const CLOSE_BUSY_BACKOFF: std::time::Duration = std::time::Duration::from_millis(1);

/// How a [`Ring`] is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingOptions {
    /// Submission queue size (rounded up to a power of two by the kernel; the CQ is twice that).
    pub entries: u32,
    /// `Some(ms)` enables `IORING_SETUP_SQPOLL` with this kernel-thread idle time.
    pub sqpoll_idle_ms: Option<u32>,
    /// Pins the SQPOLL kernel thread to this CPU (only valid with `sqpoll_idle_ms`).
    pub sqpoll_cpu: Option<u32>,
}

impl Default for RingOptions {
    /// 256 entries, no SQPOLL.
    fn default() -> Self {
        RingOptions {
            entries: 256,
            sqpoll_idle_ms: None,
            sqpoll_cpu: None,
        }
    }
}

/// Why a ring operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// `io_uring_setup` failed (io_uring disabled, not supported, or out of resources).
    #[error("io_uring setup failed: {source}")]
    Setup {
        /// The error from the kernel.
        #[source]
        source: std::io::Error,
    },
    /// An `io_uring_register` call failed.
    #[error("io_uring register ({what}) failed: {source}")]
    Register {
        /// Which registration.
        what: &'static str,
        /// The error from the kernel.
        #[source]
        source: std::io::Error,
    },
    /// `io_uring_enter` failed; `-EAGAIN`/`-EBUSY` mean "reap completions, then retry".
    #[error("io_uring_enter failed: {source}")]
    Enter {
        /// The error from the kernel.
        #[source]
        source: std::io::Error,
    },
    /// The submission queue is full, or the ring already has a CQ slot's worth of operations
    /// in flight; submit and reap, then push again.
    #[error("io_uring submission queue full")]
    SqFull,
    /// The operation names a file slot that is out of range or not registered.
    #[error("io_uring file slot {slot} is not registered")]
    BadFile {
        /// The rejected slot.
        slot: u32,
    },
    /// All [`FILE_SLOTS`] file slots are in use.
    #[error("all {FILE_SLOTS} io_uring file slots are in use")]
    NoFileSlot,
    /// An argument was invalid (described by the message).
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
    /// The ring's queued SQEs were retracted ([`Ring::retract_queued`]); it accepts no more.
    #[error("io_uring ring retired after a persistent submission failure")]
    Retired,
    /// The kernel lacks a feature this module requires (described by the message).
    #[error("kernel io_uring lacks {0}")]
    Unsupported(&'static str),
}

impl RingError {
    /// The negative errno equivalent of this error (e.g. `-EAGAIN` for [`RingError::SqFull`]).
    pub fn errno(&self) -> i32 {
        let os = |e: &std::io::Error| -e.raw_os_error().unwrap_or(libc::EIO);
        match self {
            RingError::Setup { source }
            | RingError::Register { source, .. }
            | RingError::Enter { source } => os(source),
            RingError::SqFull => -libc::EAGAIN,
            RingError::BadFile { .. } => -libc::EBADF,
            RingError::NoFileSlot => -libc::ENFILE,
            RingError::InvalidArgument(_) => -libc::EINVAL,
            RingError::Retired => -libc::EIO,
            RingError::Unsupported(_) => -libc::EOPNOTSUPP,
        }
    }
}

/// One operation to push; `file` is always a slot returned by [`Ring::register_file`].
///
/// The pointers are not dereferenced by [`Ring::push`] itself but by the kernel later; see the
/// safety contract of [`Ring::push`].
#[derive(Debug, Clone, Copy)]
pub enum RingOp {
    /// Does nothing; completes with result 0 (useful for probing and wake-ups).
    Nop,
    /// Reads `len` bytes at `offset` into `buf`.
    Read {
        /// Registered file slot.
        file: u32,
        /// Destination.
        buf: *mut u8,
        /// Bytes to read.
        len: u32,
        /// File offset in bytes.
        offset: u64,
        /// The DMA chunk holding `buf` ([`crate::dma::DmaBuf::fixed_region`]), if any.
        fixed_region: Option<u16>,
    },
    /// Writes `len` bytes from `buf` at `offset`.
    Write {
        /// Registered file slot.
        file: u32,
        /// Source.
        buf: *const u8,
        /// Bytes to write.
        len: u32,
        /// File offset in bytes.
        offset: u64,
        /// The DMA chunk holding `buf` ([`crate::dma::DmaBuf::fixed_region`]), if any.
        fixed_region: Option<u16>,
    },
    /// Reads into `count` buffers described by `iovecs`, starting at `offset`.
    Readv {
        /// Registered file slot.
        file: u32,
        /// Array of `count` iovecs.
        iovecs: *const libc::iovec,
        /// Number of iovecs.
        count: u32,
        /// File offset in bytes.
        offset: u64,
    },
    /// Writes from `count` buffers described by `iovecs`, starting at `offset`.
    Writev {
        /// Registered file slot.
        file: u32,
        /// Array of `count` iovecs.
        iovecs: *const libc::iovec,
        /// Number of iovecs.
        count: u32,
        /// File offset in bytes.
        offset: u64,
    },
    /// `fsync` (or `fdatasync` when `datasync`) of the whole file.
    Fsync {
        /// Registered file slot.
        file: u32,
        /// Sync data only (`IORING_FSYNC_DATASYNC`).
        datasync: bool,
    },
    /// `fallocate(mode, offset, len)`, e.g. `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`.
    Fallocate {
        /// Registered file slot.
        file: u32,
        /// `fallocate` mode flags.
        mode: i32,
        /// Start of the range in bytes.
        offset: u64,
        /// Length of the range in bytes.
        len: u64,
    },
}

impl RingOp {
    /// The file slot this op uses, if any.
    fn file(&self) -> Option<u32> {
        match *self {
            RingOp::Nop => None,
            RingOp::Read { file, .. }
            | RingOp::Write { file, .. }
            | RingOp::Readv { file, .. }
            | RingOp::Writev { file, .. }
            | RingOp::Fsync { file, .. }
            | RingOp::Fallocate { file, .. } => Some(file),
        }
    }
}

/// What the running kernel's io_uring offers, as found by [`probe_support`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingSupport {
    /// `READ_FIXED`/`WRITE_FIXED` are available.
    pub fixed_rw: bool,
    /// Sparse buffer tables can be registered (Linux 5.19+), so the table can grow later.
    pub sparse_buffers: bool,
    /// `IORING_OP_FALLOCATE` is available.
    pub fallocate: bool,
}

/// Checks that a [`Ring`] can work on this kernel: creates a small ring, checks the opcodes this
/// module uses, and round-trips a `NOP`. An `Err` means the io_uring bdev cannot be used.
pub fn probe_support() -> Result<RingSupport, RingError> {
    let mut ring = Ring::new(&RingOptions {
        entries: 8,
        ..RingOptions::default()
    })?;
    let mut probe = Probe::new();
    ring.ring
        .submitter()
        .register_probe(&mut probe)
        .map_err(|_| RingError::Unsupported("IORING_REGISTER_PROBE (Linux 5.6+)"))?;
    for (code, name) in [
        (opcode::Read::CODE, "IORING_OP_READ"),
        (opcode::Write::CODE, "IORING_OP_WRITE"),
        (opcode::Readv::CODE, "IORING_OP_READV"),
        (opcode::Writev::CODE, "IORING_OP_WRITEV"),
        (opcode::Fsync::CODE, "IORING_OP_FSYNC"),
    ] {
        if !probe.is_supported(code) {
            return Err(RingError::Unsupported(name));
        }
    }
    // SAFETY: a NOP references no memory.
    unsafe { ring.push(&RingOp::Nop, 0)? };
    ring.submit_and_wait(1)?;
    let mut nop_result = None;
    ring.reap(|_, res| nop_result = Some(res));
    if nop_result != Some(0) {
        return Err(RingError::Unsupported("a working IORING_OP_NOP"));
    }
    let sparse_buffers = ring.ring.submitter().register_buffers_sparse(1).is_ok();
    Ok(RingSupport {
        fixed_rw: probe.is_supported(opcode::ReadFixed::CODE)
            && probe.is_supported(opcode::WriteFixed::CODE),
        sparse_buffers,
        fallocate: probe.is_supported(opcode::Fallocate::CODE),
    })
}

/// State of the ring's fixed-buffer table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BufTable {
    /// Nothing registered yet.
    None,
    /// A sparse table of `DMA_POOL_CHUNKS_MAX` slots; chunks can be added at any time.
    Sparse,
    /// A fixed table of the chunks that existed at registration (kernel without sparse tables).
    Static,
    /// Registration failed; plain opcodes only.
    Failed,
}

/// One io_uring instance with a registered file table and (optionally) the DMA pool registered
/// as fixed buffers. Not `Sync`: one thread drives it.
pub struct Ring {
    ring: IoUring,
    /// Which file slots are in use.
    files: Vec<bool>,
    buf_table: BufTable,
    /// `(addr, len)` of each DMA region registered as a fixed buffer, indexed by region.
    fixed: Vec<Option<(usize, usize)>>,
    /// Operations pushed whose CQE has not been reaped yet.
    in_flight: usize,
    /// Completion queue size; `in_flight` never exceeds it.
    cq_capacity: usize,
    sqpoll: bool,
    /// Reads/writes pushed with the fixed-buffer opcodes (for tests and diagnostics).
    fixed_rw_pushed: u64,
    /// Set by [`Ring::retract_queued`]: no SQE is ever submitted again.
    retired: bool,
    /// A [`Ring::close`] failed: `Drop` does not wait again.
    close_failed: bool,
    /// The eventfd the kernel signals for every completion, once asked for.
    completion_eventfd: Option<OwnedFd>,
    _not_sync: PhantomData<Cell<()>>,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("in_flight", &self.in_flight)
            .field("cq_capacity", &self.cq_capacity)
            .field("files_in_use", &self.files.iter().filter(|&&u| u).count())
            .field("buf_table", &self.buf_table)
            .field("fixed_regions", &self.fixed_region_count())
            .field("sqpoll", &self.sqpoll)
            .finish()
    }
}

fn enter_err(source: std::io::Error) -> RingError {
    RingError::Enter { source }
}

fn is_eintr(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINTR)
}

impl Ring {
    /// Creates a ring per `opts` and registers an empty table of [`FILE_SLOTS`] files.
    pub fn new(opts: &RingOptions) -> Result<Ring, RingError> {
        if opts.entries == 0 || opts.entries > MAX_ENTRIES {
            return Err(RingError::InvalidArgument("entries must be in 1..=32768"));
        }
        let mut builder = IoUring::builder();
        match (opts.sqpoll_idle_ms, opts.sqpoll_cpu) {
            (Some(idle), cpu) => {
                builder.setup_sqpoll(idle);
                if let Some(cpu) = cpu {
                    builder.setup_sqpoll_cpu(cpu);
                }
            }
            (None, Some(_)) => {
                return Err(RingError::InvalidArgument(
                    "sqpoll_cpu requires sqpoll_idle_ms",
                ));
            }
            (None, None) => {}
        }
        let cooperative = opts.sqpoll_idle_ms.is_none();
        let mut cooperative_builder = builder.clone();
        cooperative_builder
            .setup_coop_taskrun()
            .setup_taskrun_flag();
        let built = if cooperative {
            cooperative_builder.build(opts.entries)
        } else {
            builder.build(opts.entries)
        };
        let ring = match built {
            Ok(ring) => ring,
            // Kernels before 5.19 refuse the cooperative flags: plain setup then.
            Err(err) if cooperative && err.raw_os_error() == Some(libc::EINVAL) => builder
                .build(opts.entries)
                .map_err(|source| RingError::Setup { source })?,
            Err(source) => return Err(RingError::Setup { source }),
        };
        let submitter = ring.submitter();
        if let Err(sparse_err) = submitter.register_files_sparse(FILE_SLOTS) {
            // Kernels before 5.19 lack sparse registration but accept -1 entries.
            let empty = [-1; FILE_SLOTS as usize];
            submitter.register_files(&empty).map_err(|source| {
                tracing::debug!(%sparse_err, "sparse file table registration failed");
                RingError::Register {
                    what: "files",
                    source,
                }
            })?;
        }
        let cq_capacity = ring.params().cq_entries() as usize;
        let sqpoll = ring.params().is_setup_sqpoll();
        Ok(Ring {
            ring,
            files: vec![false; FILE_SLOTS as usize],
            buf_table: BufTable::None,
            fixed: Vec::new(),
            in_flight: 0,
            cq_capacity,
            sqpoll,
            fixed_rw_pushed: 0,
            retired: false,
            close_failed: false,
            completion_eventfd: None,
            _not_sync: PhantomData,
        })
    }

    /// An eventfd the kernel signals whenever it posts a completion to this ring, made and
    /// registered on the first call (a reactor that sleeps in the kernel waits on it). The
    /// ring keeps it open for its life.
    pub fn completion_eventfd(&mut self) -> Result<RawFd, RingError> {
        if let Some(fd) = &self.completion_eventfd {
            return Ok(fd.as_raw_fd());
        }
        // SAFETY: eventfd takes no pointers; the result is checked before use.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(RingError::Register {
                what: "completion eventfd (create)",
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: `raw` is a new eventfd nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        self.ring
            .submitter()
            .register_eventfd(fd.as_raw_fd())
            .map_err(|source| RingError::Register {
                what: "completion eventfd",
                source,
            })?;
        let raw = fd.as_raw_fd();
        self.completion_eventfd = Some(fd);
        Ok(raw)
    }

    /// Registers `fd` in a free file slot and returns the slot; the ring holds its own reference
    /// to the file until [`Ring::unregister_file`] (or drop), so `fd` may be closed meanwhile.
    pub fn register_file(&mut self, fd: RawFd) -> Result<u32, RingError> {
        if fd < 0 {
            return Err(RingError::InvalidArgument("negative file descriptor"));
        }
        let slot = self
            .files
            .iter()
            .position(|&used| !used)
            .ok_or(RingError::NoFileSlot)?;
        let slot = slot as u32;
        self.ring
            .submitter()
            .register_files_update(slot, &[fd])
            .map_err(|source| RingError::Register {
                what: "files_update",
                source,
            })?;
        self.files[slot as usize] = true;
        Ok(slot)
    }

    /// Empties file slot `slot`; operations already in flight on it still complete normally.
    pub fn unregister_file(&mut self, slot: u32) -> Result<(), RingError> {
        if !self.slot_in_use(slot) {
            return Err(RingError::BadFile { slot });
        }
        self.ring
            .submitter()
            .register_files_update(slot, &[-1])
            .map_err(|source| RingError::Register {
                what: "files_update",
                source,
            })?;
        self.files[slot as usize] = false;
        Ok(())
    }

    fn slot_in_use(&self, slot: u32) -> bool {
        self.files.get(slot as usize).copied().unwrap_or(false)
    }

    /// Registers every DMA pool chunk not yet registered as a fixed buffer and returns how many
    /// chunks are registered now. Never fails because of registration itself: if the kernel
    /// refuses (old kernel, `RLIMIT_MEMLOCK`), it logs a warning and the affected chunks keep
    /// using the plain opcodes. Call it again after the pool grew to add the new chunks.
    pub fn register_dma_regions(&mut self) -> Result<usize, RingError> {
        let regions = dma_regions();
        if self.buf_table == BufTable::None {
            match self
                .ring
                .submitter()
                .register_buffers_sparse(DMA_POOL_CHUNKS_MAX as u32)
            {
                Ok(()) => self.buf_table = BufTable::Sparse,
                Err(sparse_err) => {
                    if regions.is_empty() {
                        // Nothing to register yet; try again on the next call.
                        return Ok(0);
                    }
                    // Kernel without sparse tables: register what exists now, once.
                    let iovecs: Vec<libc::iovec> = regions.iter().map(region_iovec).collect();
                    // SAFETY: every iovec describes a whole DMA pool chunk, and chunks are never
                    // unmapped while the process lives (dma.rs), so they outlive the ring.
                    match unsafe { self.ring.submitter().register_buffers(&iovecs) } {
                        Ok(()) => {
                            self.buf_table = BufTable::Static;
                            for r in &regions {
                                self.mark_fixed(r.index, r.addr, r.len);
                            }
                        }
                        Err(e) => {
                            tracing::warn!(
                                %sparse_err, error = %e,
                                "io_uring buffer registration failed; DMA buffers use non-fixed opcodes"
                            );
                            self.buf_table = BufTable::Failed;
                        }
                    }
                    return Ok(self.fixed_region_count());
                }
            }
        }
        if self.buf_table != BufTable::Sparse {
            return Ok(self.fixed_region_count());
        }
        let missing: Vec<_> = regions
            .iter()
            .filter(|r| !self.is_fixed_region(r.index))
            .copied()
            .collect();
        // Register in runs of consecutive indices (usually one run).
        let mut start = 0;
        while start < missing.len() {
            let mut end = start + 1;
            while end < missing.len() && missing[end].index == missing[end - 1].index + 1 {
                end += 1;
            }
            let run = &missing[start..end];
            let iovecs: Vec<libc::iovec> = run.iter().map(region_iovec).collect();
            // SAFETY: as above, DMA pool chunks are never unmapped while the process lives; the
            // target slots are inside the sparse table of DMA_POOL_CHUNKS_MAX entries because
            // region indices are below DMA_POOL_CHUNKS_MAX.
            let res = unsafe {
                self.ring.submitter().register_buffers_update(
                    u32::from(run[0].index),
                    &iovecs,
                    None,
                )
            };
            if let Err(e) = res {
                tracing::warn!(
                    error = %e, first_region = run[0].index, regions = run.len(),
                    "io_uring fixed-buffer update failed; these DMA chunks use non-fixed opcodes"
                );
                break;
            }
            for r in run {
                self.mark_fixed(r.index, r.addr, r.len);
            }
            start = end;
        }
        Ok(self.fixed_region_count())
    }

    fn mark_fixed(&mut self, index: u16, addr: usize, len: usize) {
        let i = usize::from(index);
        if self.fixed.len() <= i {
            self.fixed.resize(i + 1, None);
        }
        self.fixed[i] = Some((addr, len));
    }

    /// Whether DMA region `region` is registered with this ring as a fixed buffer.
    pub fn is_fixed_region(&self, region: u16) -> bool {
        self.fixed
            .get(usize::from(region))
            .is_some_and(Option::is_some)
    }

    /// How many DMA regions are registered with this ring as fixed buffers.
    pub fn fixed_region_count(&self) -> usize {
        self.fixed.iter().filter(|r| r.is_some()).count()
    }

    /// Whether `len` bytes at `buf` lie inside registered region `region`.
    fn fixed_index_for(&self, region: Option<u16>, buf: usize, len: u32) -> Option<u16> {
        let region = region?;
        let (addr, rlen) = (*self.fixed.get(usize::from(region))?)?;
        let end = buf.checked_add(len as usize)?;
        (buf >= addr && end <= addr + rlen).then_some(region)
    }

    /// Queues `op` tagged with `user_data` (not yet submitted). Returns
    /// [`RingError::SqFull`] when the SQ is full or a CQ's worth of ops is in flight,
    /// [`RingError::BadFile`] for an unregistered file slot, and [`RingError::Retired`] after
    /// [`Ring::retract_queued`]; nothing is queued on error.
    ///
    /// # Safety
    ///
    /// Every pointer in `op` (the buffer of `Read`/`Write`, the iovec array of `Readv`/`Writev`
    /// and every buffer it describes) must be valid for the access the kernel makes (writes for
    /// reads, reads for writes) for its full length, and that memory must not be freed, moved,
    /// or accessed in a conflicting way by Rust code until one of these happened:
    ///
    /// * the CQE carrying `user_data` has been reaped by [`Ring::reap`];
    /// * [`Ring::close`] returned `Ok` (every operation completed);
    /// * [`Ring::retract_queued`] returned `Some` while this SQE had not been consumed by the
    ///   kernel yet (it is then never executed).
    ///
    /// Dropping the `Ring` is not enough by itself: its `Drop` waits, but if that wait fails the
    /// kernel may still access the memory afterwards. An owner that frees such memory after the
    /// ring is gone must call [`Ring::close`] first and leak the memory if it fails.
    pub unsafe fn push(&mut self, op: &RingOp, user_data: u64) -> Result<(), RingError> {
        if self.retired {
            return Err(RingError::Retired);
        }
        if let Some(slot) = op.file() {
            if !self.slot_in_use(slot) {
                return Err(RingError::BadFile { slot });
            }
        }
        if self.in_flight >= self.cq_capacity {
            return Err(RingError::SqFull);
        }
        let mut fixed_rw = false;
        let entry = match *op {
            RingOp::Nop => opcode::Nop::new().build(),
            RingOp::Read {
                file,
                buf,
                len,
                offset,
                fixed_region,
            } => match self.fixed_index_for(fixed_region, buf as usize, len) {
                Some(index) => {
                    fixed_rw = true;
                    opcode::ReadFixed::new(types::Fixed(file), buf, len, index)
                        .offset(offset)
                        .build()
                }
                None => opcode::Read::new(types::Fixed(file), buf, len)
                    .offset(offset)
                    .build(),
            },
            RingOp::Write {
                file,
                buf,
                len,
                offset,
                fixed_region,
            } => match self.fixed_index_for(fixed_region, buf as usize, len) {
                Some(index) => {
                    fixed_rw = true;
                    opcode::WriteFixed::new(types::Fixed(file), buf, len, index)
                        .offset(offset)
                        .build()
                }
                None => opcode::Write::new(types::Fixed(file), buf, len)
                    .offset(offset)
                    .build(),
            },
            RingOp::Readv {
                file,
                iovecs,
                count,
                offset,
            } => opcode::Readv::new(types::Fixed(file), iovecs, count)
                .offset(offset)
                .build(),
            RingOp::Writev {
                file,
                iovecs,
                count,
                offset,
            } => opcode::Writev::new(types::Fixed(file), iovecs, count)
                .offset(offset)
                .build(),
            RingOp::Fsync { file, datasync } => {
                let flags = if datasync {
                    types::FsyncFlags::DATASYNC
                } else {
                    types::FsyncFlags::empty()
                };
                opcode::Fsync::new(types::Fixed(file)).flags(flags).build()
            }
            RingOp::Fallocate {
                file,
                mode,
                offset,
                len,
            } => opcode::Fallocate::new(types::Fixed(file), len)
                .offset(offset)
                .mode(mode)
                .build(),
        }
        .user_data(user_data);
        // SAFETY: the caller guarantees (this fn's contract) that every pointer in `op` stays
        // valid until the CQE is reaped; the fixed file slot was checked to be registered, and a
        // fixed buffer index is only used when the buffer lies inside that registered region.
        unsafe { self.ring.submission().push(&entry) }.map_err(|_| RingError::SqFull)?;
        self.in_flight += 1;
        if fixed_rw {
            self.fixed_rw_pushed += 1;
        }
        Ok(())
    }

    /// Free SQ slots: how many [`Ring::push`] calls can succeed before the next submit (also
    /// limited by the CQ back-pressure rule).
    pub fn sq_space_left(&self) -> usize {
        // SAFETY: `Ring` is not `Sync`, and every other `SubmissionQueue` view is created under
        // `&mut self` and dropped before that method returns, so no other view exists now; this
        // one is only read (its drop re-stores the unchanged tail).
        let sq = unsafe { self.ring.submission_shared() };
        let sq_free = sq.capacity() - sq.len();
        sq_free.min(self.cq_capacity - self.in_flight)
    }

    /// Operations pushed whose completion has not been reaped yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Whether this ring was created with SQPOLL.
    pub fn is_sqpoll(&self) -> bool {
        self.sqpoll
    }

    /// Reads and writes pushed so far with the fixed-buffer opcodes.
    pub fn fixed_rw_pushed(&self) -> u64 {
        self.fixed_rw_pushed
    }

    /// Hands queued SQEs to the kernel without waiting (with SQPOLL and an awake kernel thread,
    /// without a syscall) and returns how many were submitted. Retries on `EINTR`. After
    /// [`Ring::retract_queued`] it submits nothing and returns `Ok(0)`.
    pub fn submit(&mut self) -> Result<usize, RingError> {
        if self.retired {
            return Ok(0);
        }
        loop {
            match self.ring.submit() {
                Ok(n) => return Ok(n),
                Err(e) if is_eintr(&e) => continue,
                Err(e) => return Err(enter_err(e)),
            }
        }
    }

    /// Submits queued SQEs and blocks until at least `want` completions are ready to reap;
    /// `want` larger than [`Ring::in_flight`] is rejected instead of waiting forever.
    pub fn submit_and_wait(&mut self, want: usize) -> Result<usize, RingError> {
        if want > self.in_flight {
            return Err(RingError::InvalidArgument(
                "waiting for more completions than in flight",
            ));
        }
        let mut submitted = 0;
        loop {
            let result = if self.retired {
                self.enter_without_submitting(want)
            } else {
                self.ring.submit_and_wait(want)
            };
            match result {
                Ok(n) => submitted += n,
                // EINTR is only reported when nothing was submitted by this call.
                Err(e) if is_eintr(&e) => {}
                Err(e) => return Err(enter_err(e)),
            }
            // A signal can end the wait early even when SQEs were submitted: check, re-wait.
            if self.ring.completion().len() >= want {
                return Ok(submitted);
            }
        }
    }

    /// Calls `f(user_data, result)` for every ready completion (`result` = bytes transferred or
    /// a negative errno) and returns how many there were. No syscall: the in-flight limit of
    /// [`Ring::push`] means the CQ can never overflow into the kernel's backlog.
    pub fn reap(&mut self, mut f: impl FnMut(u64, i32)) -> usize {
        if self.in_flight > 0
            && self.ring.completion().is_empty()
            && self.ring.submission().taskrun()
        {
            // Completion work is pending in the kernel (cooperative task running): one enter
            // runs it and posts the CQEs. It submits nothing (the caller decides when SQEs go,
            // and a retired ring's SQEs must never go). A failure is retried on the next reap.
            if let Err(err) = self.enter_without_submitting(0) {
                if !is_eintr(&err) {
                    tracing::debug!(%err, "io_uring enter to run completion work failed");
                }
            }
        }
        let mut n = 0;
        for cqe in &mut self.ring.completion() {
            n += 1;
            self.in_flight = self.in_flight.saturating_sub(1);
            f(cqe.user_data(), cqe.result());
        }
        n
    }

    /// `io_uring_enter(to_submit = 0, min_complete = want, GETEVENTS)`: runs pending completion
    /// work and waits for `want` CQEs without consuming any queued SQE.
    fn enter_without_submitting(&self, want: usize) -> std::io::Result<usize> {
        let want = u32::try_from(want).unwrap_or(u32::MAX);
        // SAFETY: no submission and no extended argument: the kernel only reads the ring's own
        // shared memory.
        unsafe {
            self.ring.submitter().enter::<libc::sigset_t>(
                0,
                want,
                io_uring::EnterFlags::GETEVENTS.bits(),
                None,
            )
        }
    }

    /// Gives up the SQEs pushed but not consumed by the kernel yet, after a persistent
    /// submission failure: they are never submitted (every later enter passes `to_submit = 0`),
    /// [`Ring::push`] refuses further operations, and [`Ring::in_flight`] drops by their count,
    /// which is returned. Operations the kernel already consumed still complete and must be
    /// reaped as usual. The retracted SQEs are the *last* ones pushed (the SQ is FIFO).
    ///
    /// Returns `None` (and changes nothing) with SQPOLL: the kernel thread may consume queued
    /// SQEs at any moment, so they cannot be retracted and stay in flight.
    pub fn retract_queued(&mut self) -> Option<usize> {
        if self.sqpoll {
            return None;
        }
        // The view loads the kernel's head: `len` counts exactly the SQEs not consumed yet.
        let queued = self.ring.submission().len();
        self.retired = true;
        self.in_flight = self.in_flight.saturating_sub(queued);
        Some(queued)
    }

    /// SQEs pushed that the kernel has not consumed yet (loads the kernel's SQ head: exact with
    /// and without SQPOLL, where [`Ring::submit`]'s count is not a count of consumed SQEs).
    pub fn unconsumed(&mut self) -> usize {
        self.ring.submission().len()
    }

    /// Whether [`Ring::retract_queued`] retired this ring.
    pub fn is_retired(&self) -> bool {
        self.retired
    }

    /// Waits until no operation is in flight (submitting those still queued, which therefore
    /// run), discarding their results. Retries `EINTR`, and `EAGAIN`/`EBUSY` after reaping (up
    /// to [`CLOSE_BUSY_RETRIES_MAX`] times in a row).
    ///
    /// `Ok` means the kernel is done with every buffer handed to [`Ring::push`]. `Err` means it
    /// may still read or write some of them, now or later: the caller must then never free or
    /// reuse that memory (leak it, e.g. with `std::mem::forget`). Blocks the calling thread.
    pub fn close(&mut self) -> Result<(), RingError> {
        let mut busy_tries = 0u32;
        while self.in_flight > 0 {
            let waited = self.submit_and_wait(1);
            let reaped = self.reap(|_, _| {});
            match waited {
                Ok(_) => busy_tries = 0,
                Err(err) if is_transient(&err) => {
                    if reaped > 0 {
                        busy_tries = 0;
                        continue;
                    }
                    busy_tries += 1;
                    if busy_tries > CLOSE_BUSY_RETRIES_MAX {
                        self.close_failed = true;
                        return Err(err);
                    }
                    std::thread::sleep(CLOSE_BUSY_BACKOFF);
                }
                Err(err) => {
                    self.close_failed = true;
                    return Err(err);
                }
            }
        }
        Ok(())
    }
}

/// `EAGAIN`/`EBUSY` from `io_uring_enter`: reap completions, then try again.
fn is_transient(err: &RingError) -> bool {
    let errno = err.errno();
    errno == -libc::EAGAIN || errno == -libc::EBUSY
}

impl Drop for Ring {
    /// Best effort: waits for operations still in flight (see [`Ring::close`]). If that wait
    /// fails, the ring is closed anyway and the kernel may still access the memory of those
    /// operations: owners that free such memory after the ring must call [`Ring::close`]
    /// themselves first and leak the memory when it fails (see [`Ring::push`]).
    fn drop(&mut self) {
        if self.in_flight == 0 || self.close_failed {
            return;
        }
        tracing::warn!(
            in_flight = self.in_flight,
            "io_uring dropped with operations in flight; waiting for them, results discarded"
        );
        if let Err(e) = self.close() {
            tracing::error!(
                error = %e, in_flight = self.in_flight,
                "waiting for in-flight io_uring operations failed; their memory may still be \
                 accessed by the kernel"
            );
        }
    }
}

fn region_iovec(r: &crate::dma::DmaRegion) -> libc::iovec {
    libc::iovec {
        iov_base: r.as_mut_ptr().cast(),
        iov_len: r.len,
    }
}

#[cfg(test)]
#[path = "sys_tests.rs"]
mod tests;
