//! Targets: what `--target` names. `null` (a null bdev), `malloc:SIZE` (RAM), or a path (an
//! io_uring bdev over a file or block device; a missing file is created at the requested
//! size and fully written first, so measurements never read unallocated extents).

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use spool_bdev::Bdev;

use crate::guard::{describe_path, refuse_new_file_in_dev};
use crate::lock::ImageLock;
use crate::size::parse_size;
use crate::EngineError;

/// A parsed `--target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetSpec {
    /// The null bdev.
    Null,
    /// A RAM bdev of this many bytes.
    Malloc(u64),
    /// A file or block device.
    Path(PathBuf),
}

impl TargetSpec {
    /// Parses `null`, `malloc:SIZE` or a path.
    pub fn parse(text: &str) -> Result<TargetSpec, EngineError> {
        if text.is_empty() {
            return Err(EngineError::InvalidArgument(
                "empty target (expected null, malloc:SIZE or a path)".into(),
            ));
        }
        if text == "null" {
            return Ok(TargetSpec::Null);
        }
        if let Some(size) = text.strip_prefix("malloc:") {
            return Ok(TargetSpec::Malloc(parse_size(size)?));
        }
        if text == "malloc" {
            return Err(EngineError::InvalidArgument(
                "malloc needs a size: malloc:SIZE (e.g. malloc:1G)".into(),
            ));
        }
        Ok(TargetSpec::Path(PathBuf::from(text)))
    }
}

/// How to open a target.
#[derive(Debug, Clone)]
pub struct TargetOptions {
    /// Size of a null device, or of a file that has to be created.
    pub size_bytes: u64,
    /// Block size of null and malloc devices and of files.
    pub block_size: u32,
    /// io_uring submission queue depth per reactor.
    pub ring_entries: u32,
    /// Use SQPOLL (a kernel thread polls the submission queue; costs a core).
    pub sqpoll: bool,
    /// io_uring: submit as soon as this many SQEs are queued (0: once per loop pass); see
    /// [`spool_bdev::UringOptions::submit_batch`].
    pub submit_batch: u32,
    /// Open a path `O_RDONLY` (readers that never write: see
    /// [`spool_bdev::UringOptions::read_only`]).
    pub read_only: bool,
}

impl Default for TargetOptions {
    fn default() -> Self {
        TargetOptions {
            size_bytes: 1 << 30,
            block_size: 4096,
            ring_entries: 256,
            sqpoll: false,
            submit_batch: spool_bdev::DEFAULT_SUBMIT_BATCH,
            read_only: false,
        }
    }
}

/// Said of a file target that refused `O_DIRECT` (tmpfs, `/dev/null`): its I/O goes
/// through the page cache.
pub const BUFFERED: &str = "buffered (O_DIRECT refused)";

/// The null target's kind in reports: no device does any work, so what is measured is the
/// stack's own cost.
pub const NULL_KIND: &str = "no device";

/// An open target.
pub struct OpenedTarget {
    /// The device.
    pub bdev: Arc<dyn Bdev>,
    /// What it really is, for reports: [`NULL_KIND`], "RAM" (malloc), "uring, block device",
    /// "uring, file on ext4" (the filesystem by its statfs type; "tmpfs (RAM)").
    pub kind: String,
    /// For a path: its [`ImageLock`], held as long as the target is (nothing else writes
    /// the image meanwhile).
    pub lock: Option<ImageLock>,
}

/// `malloc:SIZE` as a user would type it: the largest binary suffix that divides it.
/// Bytes of memory the host can give without swapping (`MemAvailable` of `/proc/meminfo`);
/// `None` where that cannot be read.
fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

fn malloc_label(size_bytes: u64) -> String {
    for (shift, suffix) in [(50, "P"), (40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if size_bytes >= 1 << shift && size_bytes.is_multiple_of(1 << shift) {
            return format!("malloc:{}{suffix}", size_bytes >> shift);
        }
    }
    format!("malloc:{size_bytes}")
}

/// A RAM device of `size_bytes` (a multiple of `block_size`), named `malloc0`. Memory the
/// host cannot give is said in words naming `malloc:SIZE`, with what to do.
pub fn malloc_bdev(
    size_bytes: u64,
    block_size: u32,
) -> Result<spool_bdev::MallocBdev, EngineError> {
    let no_memory = || {
        EngineError::File {
        path: malloc_label(size_bytes),
        reason: format!(
            "not enough memory for {size_bytes} bytes of RAM device: give a smaller malloc:SIZE (or a file or block device as the target)"
        ),
        errno: -libc::ENOMEM,
    }
    };
    // The allocation is made in small chunks, each of which the kernel grants (overcommit):
    // past the memory the host has, filling them with zeros ends in the OOM killer, not in
    // ENOMEM. What the host says it can give without swapping is the limit.
    if available_memory().is_some_and(|available| size_bytes > available) {
        return Err(no_memory());
    }
    spool_bdev::MallocBdev::new("malloc0", block_size, size_bytes / u64::from(block_size)).map_err(
        |err| match err.errno() {
            code if code == -libc::ENOMEM => EngineError::File {
                path: malloc_label(size_bytes),
                reason: format!(
                    "not enough memory for {size_bytes} bytes of RAM device: give a smaller malloc:SIZE (or a file or block device as the target)"
                ),
                errno: code,
            },
            _ => err.into(),
        },
    )
}

/// Opens `spec`. A path is locked for as long as the target lives (see [`ImageLock`]:
/// shared when `options.read_only`, exclusive otherwise); a
/// missing file is created, locked before its first byte is written (as [`prepare_file`]),
/// except under `/dev`, where a missing path is a mistyped device and is refused (-ENODEV).
pub fn open_target(
    spec: &TargetSpec,
    options: &TargetOptions,
) -> Result<OpenedTarget, EngineError> {
    if !options.block_size.is_power_of_two() || options.block_size < 512 {
        return Err(EngineError::InvalidArgument(format!(
            "--block-size {} is not a block size: a power of two from 512 (512 or 4096)",
            options.block_size
        )));
    }
    let block_size = u64::from(options.block_size);
    match spec {
        TargetSpec::Null => {
            let bdev = spool_bdev::NullBdev::new(
                "null0",
                options.block_size,
                options.size_bytes / block_size,
            )?;
            Ok(OpenedTarget {
                bdev: Arc::new(bdev),
                kind: NULL_KIND.into(),
                lock: None,
            })
        }
        TargetSpec::Malloc(size_bytes) => {
            if size_bytes % block_size != 0 {
                return Err(EngineError::InvalidArgument(format!(
                    "malloc size {size_bytes} is not a multiple of the block size {block_size}"
                )));
            }
            let bdev = malloc_bdev(*size_bytes, options.block_size)?;
            Ok(OpenedTarget {
                bdev: Arc::new(bdev),
                kind: "RAM".into(),
                lock: None,
            })
        }
        TargetSpec::Path(path) => {
            let lock = if path.exists() && options.read_only {
                ImageLock::shared(path)?
            } else if path.exists() {
                ImageLock::exclusive(path)?
            } else {
                refuse_new_file_in_dev(path)?;
                // Not missing but unreachable (a loop of symbolic links, a file where a
                // directory should be): said as it is, never as a link to nothing.
                if let Err(err) = std::fs::metadata(path) {
                    if err.kind() != std::io::ErrorKind::NotFound {
                        return Err(EngineError::File {
                            path: path.display().to_string(),
                            reason: crate::words::io_words(&err),
                            errno: -err.raw_os_error().unwrap_or(libc::EIO),
                        });
                    }
                }
                if let Ok(target) = std::fs::read_link(path) {
                    // A dangling symbolic link: the name is taken, its target missing.
                    return Err(EngineError::File {
                        path: path.display().to_string(),
                        reason: format!(
                            "a symbolic link to {}, which does not exist: give the link's target as the target, or remove the link",
                            target.display()
                        ),
                        errno: -libc::ENOENT,
                    });
                }
                ImageLock::create(path, options.size_bytes, |_| {})?
            };
            let (bdev, uring_kind) = open_image(path, options)?;
            // Said in the report, not only in a log line nobody asked for: buffered I/O
            // measures the page cache as much as the device.
            let buffered = if uring_kind.ends_with(BUFFERED) {
                format!(", {BUFFERED}")
            } else {
                String::new()
            };
            Ok(OpenedTarget {
                bdev,
                kind: format!("uring, {}{buffered}", describe_path(path)),
                lock: Some(lock),
            })
        }
    }
}

/// Opens the existing image at `path` through the io_uring bdev, without locking it (the
/// caller holds its [`ImageLock`]); returns the device and what it is ("uring file" or
/// "uring block device", followed by [`BUFFERED`] when the file refused `O_DIRECT`).
pub fn open_image(
    path: &Path,
    options: &TargetOptions,
) -> Result<(Arc<dyn Bdev>, String), EngineError> {
    open_image_as(path, path, options)
}

/// Like [`open_image`], for a file still at a temporary path (`path`) that will be linked to
/// `shown`: the bdev is named, and errors speak, after `shown` (what the user asked for).
pub fn open_image_as(
    path: &Path,
    shown: &Path,
    options: &TargetOptions,
) -> Result<(Arc<dyn Bdev>, String), EngineError> {
    crate::guard::refuse_special_file(path).map_err(|_| EngineError::File {
        path: shown.display().to_string(),
        reason: "not a regular file or block device: give the store's file or block device".into(),
        // Not a bad argument (exit 2) but a failure every command says alike (exit 1).
        errno: -libc::ENOTBLK,
    })?;
    let meta = std::fs::metadata(path).ok();
    let is_block = meta
        .as_ref()
        .is_some_and(|meta| meta.file_type().is_block_device());
    // A regular file with every byte allocated (what `init --preallocate` makes) keeps its
    // reservation: freed clusters are zeroed in place, not punched out of the file.
    let fully_allocated = meta.as_ref().is_some_and(|meta| {
        use std::os::unix::fs::MetadataExt;
        meta.is_file() && meta.len() > 0 && meta.blocks().saturating_mul(512) >= meta.len()
    });
    let uring_options = spool_bdev::UringOptions {
        keep_allocated: fully_allocated,
        block_size: options.block_size,
        ring_entries: options.ring_entries,
        sqpoll: options.sqpoll,
        submit_batch: options.submit_batch,
        read_only: options.read_only,
        name: Some(shown.display().to_string()),
        ..spool_bdev::UringOptions::default()
    };
    let bdev = spool_bdev::UringBdev::open(path, &uring_options).map_err(|err| match err {
        // Said of the path as given, in words (no bdev name, no errno).
        spool_bdev::BdevError::Open { reason, errno, .. } => EngineError::File {
            path: shown.display().to_string(),
            reason: match -errno {
                libc::EINVAL if reason.contains("not a regular file") => {
                    "not a regular file or block device: give the store's file or block device"
                        .to_string()
                }
                libc::EINVAL if reason.contains("smaller than one block") => {
                    format!("too small to hold a blobstore: {reason}")
                }
                libc::EISDIR => {
                    "is a directory, not an image: give the store's file or block device".into()
                }
                code if reason.contains("os error") || reason.contains("errno") => {
                    let words = crate::words::errno_words(code);
                    match reason.split_once(": ") {
                        Some((what, _)) => format!("{what}: {words}"),
                        None => words,
                    }
                }
                _ => reason,
            },
            errno,
        },
        other => other.into(),
    })?;
    let kind = if is_block {
        "uring block device"
    } else {
        "uring file"
    };
    let kind = if bdev.is_direct() {
        kind.to_string()
    } else {
        format!("{kind}, {BUFFERED}")
    };
    Ok((Arc::new(bdev), kind))
}

/// Creates `path` with `size_bytes` of written data (zeros, written in 4 MiB pieces and
/// synced), calling `progress` with the bytes written so far. Refuses to touch an existing
/// path. A written file, unlike a sparse or merely fallocated one, makes reads hit the media.
/// The file is locked while it is written (see [`ImageLock::create`], which keeps the lock).
pub fn prepare_file(
    path: &Path,
    size_bytes: u64,
    progress: impl FnMut(u64),
) -> Result<(), EngineError> {
    ImageLock::create(path, size_bytes, progress).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(TargetSpec::parse("null").unwrap(), TargetSpec::Null);
        assert_eq!(
            TargetSpec::parse("malloc:64M").unwrap(),
            TargetSpec::Malloc(64 << 20)
        );
        assert_eq!(
            TargetSpec::parse("/tmp/x").unwrap(),
            TargetSpec::Path("/tmp/x".into())
        );
        assert_eq!(
            TargetSpec::parse("malloc").unwrap_err().errno(),
            -libc::EINVAL
        );
        assert_eq!(
            TargetSpec::parse("malloc:lots").unwrap_err().errno(),
            -libc::EINVAL
        );
        assert_eq!(TargetSpec::parse("").unwrap_err().errno(), -libc::EINVAL);
    }

    #[test]
    fn prepare_file_writes_every_byte_and_refuses_existing_paths() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let mut seen = 0;
        prepare_file(&path, 9 << 20, |written| seen = written).unwrap();
        assert_eq!(seen, 9 << 20);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 9 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 >= 9 << 20, "every block is allocated");
        let err = prepare_file(&path, 4096, |_| {}).unwrap_err();
        assert_eq!(err.errno(), -libc::EEXIST, "{err}");
    }
}
