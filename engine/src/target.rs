//! Targets: what `--target` names. `null` (a null bdev), `malloc:SIZE` (RAM), or a path (an
//! io_uring bdev over a file or block device; a missing file is created at the requested
//! size and fully written first, so measurements never read unallocated extents).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use spool_bdev::Bdev;

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
}

impl Default for TargetOptions {
    fn default() -> Self {
        TargetOptions {
            size_bytes: 1 << 30,
            block_size: 4096,
            ring_entries: 256,
            sqpoll: false,
            submit_batch: spool_bdev::DEFAULT_SUBMIT_BATCH,
        }
    }
}

/// An open target.
pub struct OpenedTarget {
    /// The device.
    pub bdev: Arc<dyn Bdev>,
    /// What it is, for reports ("null", "malloc", "uring file", "uring block device").
    pub kind: String,
    /// True when the file did not exist and was created.
    pub created: bool,
}

/// Opens `spec`; a missing file path is first created with [`prepare_file`].
pub fn open_target(
    spec: &TargetSpec,
    options: &TargetOptions,
) -> Result<OpenedTarget, EngineError> {
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
                kind: "null".into(),
                created: false,
            })
        }
        TargetSpec::Malloc(size_bytes) => {
            if size_bytes % block_size != 0 {
                return Err(EngineError::InvalidArgument(format!(
                    "malloc size {size_bytes} is not a multiple of the block size {block_size}"
                )));
            }
            let bdev = spool_bdev::MallocBdev::new(
                "malloc0",
                options.block_size,
                size_bytes / block_size,
            )?;
            Ok(OpenedTarget {
                bdev: Arc::new(bdev),
                kind: "malloc".into(),
                created: false,
            })
        }
        TargetSpec::Path(path) => {
            let created = !path.exists();
            if created {
                prepare_file(path, options.size_bytes, |_| {})?;
            }
            let is_block = std::fs::metadata(path)
                .map(|meta| meta.file_type().is_block_device())
                .unwrap_or(false);
            let uring_options = spool_bdev::UringOptions {
                block_size: options.block_size,
                ring_entries: options.ring_entries,
                sqpoll: options.sqpoll,
                submit_batch: options.submit_batch,
                ..spool_bdev::UringOptions::default()
            };
            let bdev = spool_bdev::UringBdev::open(path, &uring_options)?;
            let kind = if is_block {
                "uring block device"
            } else {
                "uring file"
            };
            Ok(OpenedTarget {
                bdev: Arc::new(bdev),
                kind: kind.into(),
                created,
            })
        }
    }
}

fn file_error(path: &Path, what: &str, err: &std::io::Error) -> EngineError {
    EngineError::File {
        path: path.display().to_string(),
        reason: format!("{what}: {err}"),
        errno: -err.raw_os_error().unwrap_or(libc::EIO),
    }
}

/// Creates `path` with `size_bytes` of written data (zeros, written in 4 MiB pieces and
/// synced), calling `progress` with the bytes written so far. Refuses to touch an existing
/// path. A written file, unlike a sparse or merely fallocated one, makes reads hit the media.
pub fn prepare_file(
    path: &Path,
    size_bytes: u64,
    mut progress: impl FnMut(u64),
) -> Result<(), EngineError> {
    const CHUNK_BYTES: usize = 4 << 20;
    if size_bytes == 0 {
        return Err(EngineError::InvalidArgument(format!(
            "{}: size 0",
            path.display()
        )));
    }
    let mut file: File = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|err| file_error(path, "create", &err))?;
    let result = (|| {
        file.set_len(size_bytes)
            .map_err(|err| file_error(path, "set size", &err))?;
        let zeros = vec![0u8; CHUNK_BYTES];
        let mut written = 0u64;
        while written < size_bytes {
            let piece = usize::try_from((size_bytes - written).min(CHUNK_BYTES as u64))
                .unwrap_or(CHUNK_BYTES);
            file.write_all(&zeros[..piece])
                .map_err(|err| file_error(path, "write", &err))?;
            written += piece as u64;
            progress(written);
        }
        file.sync_all()
            .map_err(|err| file_error(path, "sync", &err))
    })();
    if result.is_err() {
        // Leave nothing half-made behind: the path did not exist before.
        let _ = std::fs::remove_file(path);
    }
    result
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
