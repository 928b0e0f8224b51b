//! [`UringBdev`]: a regular file or block device driven through the reactor's shared
//! io_uring (see the `group` module).
//!
//! Invariants: the file is opened once, `O_RDWR | O_DIRECT | O_CLOEXEC` (buffered if the
//! filesystem refuses `O_DIRECT`, or if asked to); the geometry is fixed at open (a file that
//! grows later is not seen, one that shrinks makes reads past its end fail with -EIO); each
//! reactor's channel registers the file in that reactor's ring and unregisters it once the
//! channel was destroyed and none of its I/O is left in the ring (queued or in flight).

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use spool_reactor::{Channel, IoDevice, PollStatus};

use crate::device::{Bdev, ChannelBackend};
use crate::error::BdevError;
use crate::io::{IoKind, IoSlots, Submission};
use crate::uring::blk;
use crate::uring::channels::drop_removed;
use crate::uring::group::{draining_groups, group_device, GroupCtx, RingKey, UringGroupStats};
use crate::uring::sys::{probe_support, RingSupport, MAX_ENTRIES};

/// How to open a [`UringBdev`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UringOptions {
    /// Block size for regular files (a power of two >= 512; default 4096). Block devices use
    /// their logical block size instead.
    pub block_size: u32,
    /// Submission queue entries of the reactor's ring (default 256). Bdevs opened with the same
    /// `ring_entries`/`sqpoll`/`sqpoll_cpu` share one ring per reactor.
    pub ring_entries: u32,
    /// Use an SQPOLL kernel thread (default false: on a 2-core machine it takes a core).
    pub sqpoll: bool,
    /// Pin the SQPOLL thread to this CPU (only with `sqpoll`).
    pub sqpoll_cpu: Option<u32>,
    /// The bdev's name (default: the path).
    pub name: Option<String>,
    /// Open with `O_DIRECT` (default true); false opens buffered.
    pub direct: bool,
    /// Hand queued SQEs to the kernel as soon as this many are waiting (default
    /// [`DEFAULT_SUBMIT_BATCH`]), instead of only at the end of the reactor's loop pass; 0
    /// submits only at the end of each pass. Part of the ring configuration, like
    /// `ring_entries`.
    pub submit_batch: u32,
    /// Open `O_RDONLY` (default false: `O_RDWR`): for readers of an image they may not write
    /// (mode 0444, immutable, a read-only mount). Writes, unmaps and write-zeroes then fail
    /// with -ENOTSUP before reaching the file.
    pub read_only: bool,
    /// Keep a regular file's space allocated: unmap zeroes the range (fallocate ZERO_RANGE,
    /// or written zeros) instead of punching a hole (default false). For a file whose space
    /// was reserved on purpose (`spool init --preallocate`), which a punched hole would give
    /// back to the host. Ignored for block devices.
    pub keep_allocated: bool,
}

/// The default [`UringOptions::submit_batch`]. The kernel spends microseconds building each
/// O_DIRECT request (about 5 us per 4 KiB read on this project's virtio VM) and, when one
/// `io_uring_enter` carries several, plugs them and starts none until it built the last. With
/// 32 SQEs per enter the disk waited that long for the first one; batches of 2 to 6 measured
/// best (`docs/performance.md`), one enter per SQE was worse (a syscall and a device kick per
/// I/O).
pub const DEFAULT_SUBMIT_BATCH: u32 = 4;

impl Default for UringOptions {
    fn default() -> Self {
        UringOptions {
            block_size: 4096,
            ring_entries: 256,
            sqpoll: false,
            sqpoll_cpu: None,
            name: None,
            direct: true,
            submit_batch: DEFAULT_SUBMIT_BATCH,
            read_only: false,
            keep_allocated: false,
        }
    }
}

/// The device state every channel shares (the channels' group entries keep it alive).
#[derive(Debug)]
pub(crate) struct DeviceShared {
    /// The open file (used for registration and block-device ioctls).
    pub file: File,
    /// The path it was opened from.
    pub path: PathBuf,
    /// Whether it is a block device (else a regular file).
    pub block_device: bool,
    /// Unmap has fallen back to writing zeros.
    pub unmap_fill: AtomicBool,
    /// Write-zeroes has fallen back to writing zeros.
    pub zeroes_fill: AtomicBool,
    /// Unmap zeroes instead of punching a hole (a regular file whose space stays reserved).
    pub keep_allocated: bool,
}

/// A block device backed by a regular file or a block device, doing I/O through io_uring.
pub struct UringBdev {
    name: String,
    dev: Arc<DeviceShared>,
    block_size: u32,
    block_count: u64,
    iov_len_align: u32,
    direct: bool,
    read_only: bool,
    group: IoDevice<GroupCtx>,
}

impl std::fmt::Debug for UringBdev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringBdev")
            .field("name", &self.name)
            .field("path", &self.dev.path)
            .field("block_device", &self.dev.block_device)
            .field("block_size", &self.block_size)
            .field("block_count", &self.block_count)
            .field("iov_len_align", &self.iov_len_align)
            .field("direct", &self.direct)
            .field("read_only", &self.read_only)
            .finish()
    }
}

fn open_error(path: &Path, reason: impl Into<String>, errno: i32) -> BdevError {
    BdevError::Open {
        name: path.display().to_string(),
        reason: reason.into(),
        errno,
    }
}

fn io_errno(err: &std::io::Error) -> i32 {
    -err.raw_os_error().unwrap_or(libc::EIO)
}

/// The kernel's io_uring support, probed once per process.
fn ring_support() -> Result<RingSupport, (String, i32)> {
    static SUPPORT: OnceLock<Result<RingSupport, (String, i32)>> = OnceLock::new();
    SUPPORT
        .get_or_init(|| probe_support().map_err(|err| (err.to_string(), err.errno())))
        .clone()
}

/// The logical block size of the block device holding a file (`st_dev`), from sysfs; None when
/// unknown (tmpfs, overlay, ...).
fn backing_logical_block_size(dev: u64) -> Option<u32> {
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let base = format!("/sys/dev/block/{major}:{minor}");
    // A whole disk has `queue/`; a partition's queue is its parent's.
    [
        format!("{base}/queue/logical_block_size"),
        format!("{base}/../queue/logical_block_size"),
    ]
    .iter()
    .find_map(|path| std::fs::read_to_string(path).ok()?.trim().parse().ok())
}

impl UringBdev {
    /// Opens `path` (a regular file or a block device) for I/O through io_uring.
    pub fn open(path: impl AsRef<Path>, options: &UringOptions) -> Result<UringBdev, BdevError> {
        let path = path.as_ref();
        if options.ring_entries == 0 || options.ring_entries > MAX_ENTRIES {
            return Err(BdevError::InvalidArgument(format!(
                "ring_entries {} is not in 1..={MAX_ENTRIES}",
                options.ring_entries
            )));
        }
        if options.sqpoll_cpu.is_some() && !options.sqpoll {
            return Err(BdevError::InvalidArgument(
                "sqpoll_cpu is set but sqpoll is off".into(),
            ));
        }
        let support = ring_support().map_err(|(reason, errno)| {
            open_error(path, format!("io_uring unusable: {reason}"), errno)
        })?;
        let (file, direct) = Self::open_file(path, options.direct, options.read_only)?;
        let metadata = file
            .metadata()
            .map_err(|err| open_error(path, format!("stat: {err}"), io_errno(&err)))?;
        let file_type = metadata.file_type();
        let block_device = file_type.is_block_device();
        let (block_size, size_bytes, iov_len_align) = if block_device {
            let logical = blk::logical_block_size(&file)
                .map_err(|errno| open_error(path, "BLKSSZGET (logical block size)", errno))?;
            let size = (&file)
                .seek(SeekFrom::End(0))
                .map_err(|err| open_error(path, format!("device size: {err}"), io_errno(&err)))?;
            (logical, size, if direct { logical } else { 1 })
        } else if file_type.is_file() {
            let block_size = options.block_size;
            if block_size < 512 || !block_size.is_power_of_two() {
                return Err(open_error(
                    path,
                    format!("block size {block_size} is not a power of two >= 512"),
                    -libc::EINVAL,
                ));
            }
            let align = if direct {
                backing_logical_block_size(metadata.dev()).map_or(512, |lbs| lbs.max(512))
            } else {
                1
            };
            if !block_size.is_multiple_of(align) {
                return Err(open_error(
                    path,
                    format!("block size {block_size} is below the O_DIRECT alignment {align}"),
                    -libc::EINVAL,
                ));
            }
            (block_size, metadata.len(), align)
        } else if file_type.is_dir() {
            return Err(open_error(path, "is a directory", -libc::EISDIR));
        } else {
            return Err(open_error(
                path,
                "not a regular file or block device",
                -libc::EINVAL,
            ));
        };
        let block_count = size_bytes / u64::from(block_size);
        if block_count == 0 {
            return Err(open_error(
                path,
                format!("size {size_bytes} bytes is smaller than one block of {block_size} bytes"),
                -libc::EINVAL,
            ));
        }
        let no_fallocate = !block_device && !support.fallocate;
        let dev = Arc::new(DeviceShared {
            file,
            path: path.to_path_buf(),
            block_device,
            unmap_fill: AtomicBool::new(no_fallocate),
            zeroes_fill: AtomicBool::new(no_fallocate),
            keep_allocated: options.keep_allocated && !block_device,
        });
        let group = group_device(RingKey {
            entries: options.ring_entries,
            sqpoll: options.sqpoll,
            sqpoll_cpu: options.sqpoll_cpu,
            submit_batch: options.submit_batch,
        });
        Ok(UringBdev {
            name: options
                .name
                .clone()
                .unwrap_or_else(|| path.display().to_string()),
            dev,
            block_size,
            block_count,
            iov_len_align,
            direct,
            read_only: options.read_only,
            group,
        })
    }

    fn open_file(path: &Path, direct: bool, read_only: bool) -> Result<(File, bool), BdevError> {
        let open = |flags: i32| {
            OpenOptions::new()
                .read(true)
                .write(!read_only)
                .custom_flags(libc::O_CLOEXEC | flags)
                .open(path)
        };
        if direct {
            match open(libc::O_DIRECT) {
                Ok(file) => return Ok((file, true)),
                Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::warn!(
                        path = %path.display(),
                        "O_DIRECT refused (EINVAL); falling back to buffered I/O"
                    );
                }
                Err(err) => return Err(open_error(path, format!("open: {err}"), io_errno(&err))),
            }
        }
        open(0)
            .map(|file| (file, false))
            .map_err(|err| open_error(path, format!("open: {err}"), io_errno(&err)))
    }

    /// Whether the file is open with `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Whether the bdev is a block device (else a regular file).
    pub fn is_block_device(&self) -> bool {
        self.dev.block_device
    }

    /// The path the bdev was opened from.
    pub fn path(&self) -> &Path {
        &self.dev.path
    }

    /// Whether unmap has fallen back to writing zeros (the file or device refused it).
    pub fn unmap_writes_zeros(&self) -> bool {
        self.dev.unmap_fill.load(Ordering::Relaxed)
    }

    /// Whether write-zeroes has fallen back to writing zeros (the file or device refused it).
    pub fn write_zeroes_writes_zeros(&self) -> bool {
        self.dev.zeroes_fill.load(Ordering::Relaxed)
    }

    /// Counters of the calling reactor's ring used by this bdev; None off a reactor. (If the
    /// reactor has no such ring yet, one is created for the call and its zero counters are
    /// returned: `IoDevice::channel_holders` cannot tell, since reactor ids of different
    /// runtimes in one process collide.)
    pub fn group_stats(&self) -> Option<UringGroupStats> {
        let group = self.group.get_channel().ok()?;
        let stats = group.state.try_borrow().ok()?.stats();
        Some(stats)
    }

    /// How many rings of the calling reactor (thread) outlive their last uring channel: they
    /// were released with I/O still in flight and keep being polled, without blocking the
    /// reactor, until the kernel completed it; then they are freed. For diagnostics and tests.
    pub fn draining_rings() -> usize {
        draining_groups()
    }
}

impl Bdev for UringBdev {
    fn name(&self) -> &str {
        &self.name
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn block_count(&self) -> u64 {
        self.block_count
    }

    fn iov_len_align(&self) -> u32 {
        self.iov_len_align
    }

    fn unmap_reads_zeroes(&self) -> bool {
        !self.dev.block_device
    }

    fn reserve(&self, offset: u64, len: u64) -> Result<(), BdevError> {
        if self.dev.block_device || self.read_only || len == 0 {
            return Ok(());
        }
        match blk::reserve_file_range(&self.dev.file, offset, len) {
            Ok(()) => Ok(()),
            // A filesystem that cannot reserve: writes allocate as they come, as before.
            Err(errno) if errno == -libc::EOPNOTSUPP => Ok(()),
            Err(errno) => Err(BdevError::Reserve {
                bdev: self.name.clone(),
                offset,
                len,
                errno,
            }),
        }
    }

    fn supports(&self, kind: IoKind) -> bool {
        !self.read_only || matches!(kind, IoKind::Read | IoKind::Flush)
    }

    fn create_channel(&self, slots: Rc<IoSlots>) -> Result<Box<dyn ChannelBackend>, BdevError> {
        let group = self.group.get_channel()?;
        let index = group
            .state
            .try_borrow_mut()
            .map_err(|_| BdevError::InvalidArgument("uring group busy".into()))?
            .add_channel(Arc::clone(&self.dev), slots)?;
        Ok(Box::new(UringChannel { group, index }))
    }
}

/// One reactor's channel of a uring bdev: a handle on its entry in the reactor's group.
struct UringChannel {
    group: Channel<GroupCtx>,
    index: u32,
}

impl ChannelBackend for UringChannel {
    #[inline]
    fn submit(&mut self, io: Submission<'_>) {
        match self.group.state.try_borrow_mut() {
            Ok(mut group) => group.start_request(self.index, io),
            // Unreachable in practice: nothing holds the group across a task's poll.
            Err(_) => io.complete(-libc::EBUSY),
        }
    }

    #[inline]
    fn poll(&mut self) -> PollStatus {
        // The group's poller submits and reaps for every channel on this reactor.
        PollStatus::Idle
    }
}

impl Drop for UringChannel {
    fn drop(&mut self) {
        let removed = match self.group.state.try_borrow_mut() {
            Ok(mut group) => {
                group.close_channel(self.index);
                group.take_removed()
            }
            Err(_) => {
                tracing::error!(
                    channel = self.index,
                    "uring group busy while destroying a channel; its entry is leaked"
                );
                Vec::new()
            }
        };
        // Dropped with the group released (see `GroupState::take_removed`).
        drop_removed(removed);
    }
}
