//! The image lock: one `spool` process at a time writes an image.
//!
//! An [`ImageLock`] holds an advisory `flock` on the image file for as long as it lives
//! (the kernel drops it when the file closes, however the process ends). Exclusive locks are
//! taken by every command that loads a store (it writes the clean flag at least) and by
//! `spool perf` on a path; shared locks by readers that never write (`spool dump`). A block
//! device opened exclusively is also claimed with `O_EXCL`, so the kernel refuses it while
//! it is mounted or claimed by another process, through any of its device nodes or
//! partitions (a `flock` only covers one node).
//!
//! Taking a lock never waits: a held image fails at once with -EBUSY, naming the image.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::staged::create_staged;
use crate::EngineError;

/// A held lock on an image; dropping it releases the lock.
#[derive(Debug)]
pub struct ImageLock {
    /// The open file whose description carries the lock.
    _file: File,
    /// The locked path.
    path: PathBuf,
}

/// Why a lock attempt found the image busy.
const BUSY_REASON: &str =
    "in use by another process (it holds the image lock); try again when it is done";

fn file_error(path: &Path, reason: String, errno: i32) -> EngineError {
    EngineError::File {
        path: path.display().to_string(),
        reason,
        errno,
    }
}

fn io_errno(err: &std::io::Error) -> i32 {
    -err.raw_os_error().unwrap_or(libc::EIO)
}

/// What a new image file holds when [`ImageLock`] creates it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Contents {
    /// Zeros written to every byte (and synced).
    Written,
    /// A hole of the size: no space taken until written.
    Sparse,
    /// Space reserved with `fallocate`, nothing written.
    Reserved,
}

impl ImageLock {
    /// Locks the existing image at `path` for writing (exclusive; block devices are also
    /// claimed with `O_EXCL`).
    pub fn exclusive(path: &Path) -> Result<ImageLock, EngineError> {
        crate::guard::refuse_special_file(path)?;
        let is_block = std::fs::metadata(path)
            .map(|meta| meta.file_type().is_block_device())
            .unwrap_or(false);
        let mut options = OpenOptions::new();
        options.read(true);
        if is_block {
            options.custom_flags(libc::O_EXCL);
        }
        let file = options.open(path).map_err(|err| {
            if is_block && err.raw_os_error() == Some(libc::EBUSY) {
                file_error(
                    path,
                    "in use (mounted, or claimed by another process)".into(),
                    -libc::EBUSY,
                )
            } else {
                file_error(path, crate::words::io_words(&err), io_errno(&err))
            }
        })?;
        Self::lock(file, path, true)
    }

    /// Locks the existing image at `path` for reading only (shared with other readers,
    /// refused while a writer holds it).
    pub fn shared(path: &Path) -> Result<ImageLock, EngineError> {
        crate::guard::refuse_special_file(path)?;
        let file = File::open(path)
            .map_err(|err| file_error(path, crate::words::io_words(&err), io_errno(&err)))?;
        Self::lock(file, path, false)
    }

    /// Creates `path` (refusing an existing one) with `size_bytes` of zeros (written in 4 MiB
    /// pieces and synced), calling `progress` with the bytes written so far, and returns it
    /// locked exclusively. A written file, unlike a sparse or merely fallocated one, makes
    /// reads hit the media.
    ///
    /// The file is made under a temporary name in the same directory, locked before anything
    /// is written, filled, and only then linked to `path` without replacing anything (`EEXIST`
    /// if `path` appeared meanwhile). So no other process can see `path` unlocked or half
    /// written, and on any failure only the temporary file existed; it is removed.
    pub fn create(
        path: &Path,
        size_bytes: u64,
        progress: impl FnMut(u64),
    ) -> Result<ImageLock, EngineError> {
        Self::create_with(path, size_bytes, Contents::Written, progress)
    }

    /// Like [`ImageLock::create`], but the file is made sparse (`set_len` only, no byte
    /// written): instant at any size, and it takes disk space only as it is written. For
    /// stores that are written through their metadata (the daemon's embedded default).
    pub fn create_sparse(path: &Path, size_bytes: u64) -> Result<ImageLock, EngineError> {
        Self::create_with(path, size_bytes, Contents::Sparse, |_| {})
    }

    /// Like [`ImageLock::create_sparse`], but every byte's disk space is reserved with
    /// `fallocate` (no byte written: reads of it still return zeros without reaching the
    /// media), so later writes cannot fail for lack of space. Fails with the filesystem's
    /// error (`-ENOSPC`, `-EOPNOTSUPP`) and leaves nothing behind.
    pub fn create_preallocated(path: &Path, size_bytes: u64) -> Result<ImageLock, EngineError> {
        Self::create_with(path, size_bytes, Contents::Reserved, |_| {})
    }

    /// Like [`ImageLock::create_sparse`], but the file is left under its temporary name,
    /// locked: the caller prepares it (formats a store on [`StagedImage::temp_path`]) and
    /// then [`StagedImage::publish`]es it, so `path` only ever appears fully prepared. A
    /// process killed before publishing leaves at most the temporary file
    /// (`.NAME.spool-new.*`), never `path`; dropping the [`StagedImage`] removes it.
    pub fn stage_sparse(path: &Path, size_bytes: u64) -> Result<StagedImage, EngineError> {
        Self::stage_with(path, size_bytes, Contents::Sparse, |_| {})
    }

    /// Like [`ImageLock::stage_sparse`], with every byte's disk space reserved as
    /// [`ImageLock::create_preallocated`] does.
    pub fn stage_preallocated(path: &Path, size_bytes: u64) -> Result<StagedImage, EngineError> {
        Self::stage_with(path, size_bytes, Contents::Reserved, |_| {})
    }

    fn create_with(
        path: &Path,
        size_bytes: u64,
        contents: Contents,
        progress: impl FnMut(u64),
    ) -> Result<ImageLock, EngineError> {
        Self::stage_with(path, size_bytes, contents, progress)?.publish()
    }

    fn stage_with(
        path: &Path,
        size_bytes: u64,
        contents: Contents,
        mut progress: impl FnMut(u64),
    ) -> Result<StagedImage, EngineError> {
        let fill = contents == Contents::Written;
        const CHUNK_BYTES: usize = 4 << 20;
        if size_bytes == 0 {
            return Err(EngineError::InvalidArgument(format!(
                "{}: size 0",
                path.display()
            )));
        }
        let too_large = || {
            file_error(
                path,
                format!(
                    "a size of {size_bytes} bytes is larger than a file on this filesystem can be (or than the file size limit, ulimit -f): give a smaller --size"
                ),
                -libc::EFBIG,
            )
        };
        // A file's size is an off_t: a larger one cannot even be asked for.
        if i64::try_from(size_bytes).is_err() {
            return Err(too_large());
        }
        let create_error = |what: &str, err: &std::io::Error| {
            if err.raw_os_error() == Some(libc::EFBIG) {
                return too_large();
            }
            let advice = match err.raw_os_error() {
                Some(libc::EROFS) => Some(
                    "give a path on a filesystem that can be written (or remount it read-write)",
                ),
                Some(libc::EACCES) => Some("give a path in a directory you can write"),
                _ => None,
            };
            if let Some(advice) = advice {
                return file_error(
                    path,
                    format!(
                        "cannot be created: {}: {advice}",
                        crate::words::io_words(err)
                    ),
                    io_errno(err),
                );
            }
            file_error(path, crate::words::failure(what, err), io_errno(err))
        };
        // Refuse an existing path before writing anything; publishing checks again, atomically.
        if path.symlink_metadata().is_ok() {
            let err = std::io::Error::from_raw_os_error(libc::EEXIST);
            return Err(create_error("create", &err));
        }
        // From here every early return drops `name`, removing the temporary file.
        let (mut file, name) = create_staged(path).map_err(|err| create_error("create", &err))?;
        let handle = file
            .try_clone()
            .map_err(|err| create_error("create", &err))?;
        let temp_path = name.temp_path().unwrap_or(path).to_path_buf();
        let lock = Self::lock(handle, &temp_path, true)?;
        let filled = (|| {
            file.set_len(size_bytes)
                .map_err(|err| create_error("set size", &err))?;
            if contents == Contents::Reserved {
                reserve_space(&file, path, size_bytes, false).map_err(|err| match err {
                    EngineError::Stopped { signal, done, .. } => EngineError::Stopped {
                        signal,
                        done: format!("{done} while creating it; nothing was created"),
                        report: None,
                    },
                    other => other,
                })?;
            }
            let zeros = vec![0u8; if fill { CHUNK_BYTES } else { 0 }];
            let mut written = if fill { 0 } else { size_bytes };
            while written < size_bytes {
                let piece = usize::try_from((size_bytes - written).min(CHUNK_BYTES as u64))
                    .unwrap_or(CHUNK_BYTES);
                let mut rest = &zeros[..piece];
                while !rest.is_empty() {
                    match file.write(rest) {
                        Ok(0) => {
                            let err = std::io::Error::from(std::io::ErrorKind::WriteZero);
                            return Err(create_error("write", &err));
                        }
                        Ok(n) => {
                            rest = &rest[n..];
                            written += n as u64;
                        }
                        Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(err) if is_host_full(&err) => {
                            return Err(host_full_while_creating(path, written, size_bytes, &err))
                        }
                        Err(err) => return Err(create_error("write", &err)),
                    }
                }
                progress(written);
                // A stop signal ends the fill at once: the temporary file is removed below
                // (before a second signal could end the process without clean-up).
                if let Some(signal) = crate::signals::stop_requested() {
                    return Err(EngineError::Stopped {
                        signal,
                        done: format!(
                            "{written} of {size_bytes} bytes of {} written while creating it; nothing was created",
                            path.display()
                        ),
                        report: None,
                    });
                }
            }
            file.sync_all().map_err(|err| {
                if fill && is_host_full(&err) {
                    // Delayed allocation: the filesystem may find it full only at the sync.
                    host_full_while_creating(path, written, size_bytes, &err)
                } else {
                    create_error("sync", &err)
                }
            })
        })();
        if let Err(err) = filled {
            // Removed while still locked (the lock drops after it).
            drop(name);
            return Err(err);
        }
        Ok(StagedImage {
            lock,
            name,
            final_path: path.to_path_buf(),
        })
    }

    /// The locked path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(file: File, path: &Path, exclusive: bool) -> Result<ImageLock, EngineError> {
        let attempt = if exclusive {
            file.try_lock()
        } else {
            file.try_lock_shared()
        };
        match attempt {
            Ok(()) => Ok(ImageLock {
                _file: file,
                path: path.to_path_buf(),
            }),
            Err(std::fs::TryLockError::WouldBlock) => {
                Err(file_error(path, BUSY_REASON.into(), -libc::EBUSY))
            }
            Err(std::fs::TryLockError::Error(err)) => Err(file_error(
                path,
                format!("locking the image failed: {err}"),
                io_errno(&err),
            )),
        }
    }
}

/// A new image file still under its temporary name, locked exclusively (see
/// [`ImageLock::stage_sparse`]). Dropping it unpublished removes the file.
#[derive(Debug)]
pub struct StagedImage {
    /// The lock, on the temporary path until published.
    lock: ImageLock,
    /// The temporary name (removed on drop unless published).
    name: crate::staged::StagedName,
    /// Where [`StagedImage::publish`] links the file.
    final_path: PathBuf,
}

impl StagedImage {
    /// The temporary path the file is at until published (prepare it there).
    pub fn temp_path(&self) -> &Path {
        self.lock.path()
    }

    /// The lock held on the temporary file (for [`crate::run_offline_locked`] on
    /// [`StagedImage::temp_path`]).
    pub fn lock(&self) -> &ImageLock {
        &self.lock
    }

    /// Links the prepared file to its final path without replacing anything (`EEXIST` if the
    /// path appeared meanwhile; the temporary file is removed then) and returns the lock,
    /// now naming the final path.
    pub fn publish(self) -> Result<ImageLock, EngineError> {
        let StagedImage {
            mut lock,
            name,
            final_path,
        } = self;
        // A failed publish removes the temporary file itself, still under the lock.
        name.publish(&final_path).map_err(|err| {
            file_error(
                &final_path,
                crate::words::failure("create", &err),
                io_errno(&err),
            )
        })?;
        lock.path = final_path;
        Ok(lock)
    }
}

/// Whether `err` is the host filesystem being full (ENOSPC, or EDQUOT: the user's quota).
fn is_host_full(err: &std::io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

/// A new file's fill that the host filesystem refused, said as import says it: "the host
/// filesystem is full after N of M bytes written while creating it", and what to do.
fn host_full_while_creating(
    path: &Path,
    written: u64,
    size_bytes: u64,
    err: &std::io::Error,
) -> EngineError {
    let cause = if err.raw_os_error() == Some(libc::EDQUOT) {
        "disk quota exceeded"
    } else {
        "No space left on device"
    };
    file_error(
        path,
        format!(
            "the host filesystem is full after {written} of {size_bytes} bytes written while creating it ({cause}); nothing was created: free space on the host, or give a smaller --size"
        ),
        io_errno(err),
    )
}

/// Reserves the disk space of the first `len` bytes of `file` (at `path`, for messages) with
/// `fallocate`, in 256 MiB pieces so that a stop signal is acted on within one piece
/// ([`EngineError::Stopped`] saying how much was reserved); `keep_size` leaves the file's
/// size as it is (an existing image). Contents are never changed.
pub fn reserve_space(
    file: &File,
    path: &Path,
    len: u64,
    keep_size: bool,
) -> Result<(), EngineError> {
    const PIECE_BYTES: u64 = 256 << 20;
    let flags = if keep_size {
        rustix::fs::FallocateFlags::KEEP_SIZE
    } else {
        rustix::fs::FallocateFlags::empty()
    };
    // All or nothing up front, as one fallocate call would be: pieces must not fill the
    // filesystem (or a tmpfs, the host's memory) before finding that the whole cannot fit.
    if let (Ok(stats), Ok(meta)) = (rustix::fs::fstatvfs(file), file.metadata()) {
        use std::os::unix::fs::MetadataExt;
        let free = stats.f_bavail.saturating_mul(stats.f_frsize);
        let needed = len.saturating_sub(meta.blocks().saturating_mul(512));
        if needed > free {
            let err = std::io::Error::from_raw_os_error(libc::ENOSPC);
            return Err(file_error(
                path,
                crate::words::failure("reserving the file's space (fallocate)", &err),
                -libc::ENOSPC,
            ));
        }
    }
    let mut reserved = 0;
    while reserved < len {
        if let Some(signal) = crate::signals::stop_requested() {
            return Err(EngineError::Stopped {
                signal,
                done: format!("{reserved} of {len} bytes of {} reserved", path.display()),
                report: None,
            });
        }
        let piece = PIECE_BYTES.min(len - reserved);
        rustix::fs::fallocate(file, flags, reserved, piece).map_err(|err| {
            let err = std::io::Error::from(err);
            file_error(
                path,
                crate::words::failure("reserving the file's space (fallocate)", &err),
                io_errno(&err),
            )
        })?;
        reserved += piece;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_excludes_everyone_and_shared_excludes_writers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("image");
        let created = ImageLock::create(&path, 1 << 20, |_| {}).expect("create");
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), 1 << 20);
        for err in [
            ImageLock::exclusive(&path).expect_err("held"),
            ImageLock::shared(&path).expect_err("held"),
        ] {
            assert_eq!(err.errno(), -libc::EBUSY);
            assert!(
                err.to_string().contains("in use by another process"),
                "{err}"
            );
        }
        drop(created);
        let reader = ImageLock::shared(&path).expect("shared");
        let _second_reader = ImageLock::shared(&path).expect("readers share");
        assert_eq!(
            ImageLock::exclusive(&path)
                .expect_err("readers hold it")
                .errno(),
            -libc::EBUSY
        );
        drop(reader);
        drop(_second_reader);
        ImageLock::exclusive(&path).expect("free again");
    }

    #[test]
    fn create_refuses_existing_paths_and_zero_sizes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("image");
        std::fs::write(&path, b"keep me").expect("write");
        let err = ImageLock::create(&path, 4096, |_| {}).expect_err("exists");
        assert_eq!(err.errno(), -libc::EEXIST);
        assert_eq!(std::fs::read(&path).expect("read"), b"keep me", "untouched");
        let fresh = dir.path().join("fresh");
        let err = ImageLock::create(&fresh, 0, |_| {}).expect_err("size 0");
        assert_eq!(err.errno(), -libc::EINVAL);
        assert!(!fresh.exists());
    }

    #[test]
    fn create_never_exposes_an_unlocked_file_to_another_locker() {
        // Another process polls the path and locks whatever it finds. `create` must never
        // lose the file to it (EBUSY, leaving an empty file behind): the path appears only
        // once the file is locked and filled.
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("image");
        let done = Arc::new(AtomicBool::new(false));
        let racer = {
            let (path, done) = (path.clone(), Arc::clone(&done));
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    if let Ok(file) = File::open(&path) {
                        let _ = file.try_lock();
                    }
                }
            })
        };
        for round in 0..500 {
            match ImageLock::create(&path, 4096, |_| {}) {
                Ok(lock) => {
                    assert_eq!(std::fs::metadata(&path).expect("meta").len(), 4096);
                    // Removed under the lock, as init does on failure.
                    std::fs::remove_file(&path).expect("remove");
                    drop(lock);
                }
                Err(err) => {
                    done.store(true, Ordering::Relaxed);
                    let left = std::fs::metadata(&path).map(|meta| meta.len()).ok();
                    let _ = racer.join();
                    panic!("round {round}: create lost its file: {err} (left behind: {left:?})");
                }
            }
        }
        done.store(true, Ordering::Relaxed);
        racer.join().expect("racer");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .expect("read_dir")
            .map(|entry| entry.expect("entry").file_name())
            .collect();
        assert!(
            leftovers.is_empty(),
            "no temporary file is left: {leftovers:?}"
        );
    }

    #[test]
    fn create_fails_with_eexist_when_the_path_appears_while_it_fills() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("image");
        let err = ImageLock::create(&path, 8 << 20, |written| {
            if written == 4 << 20 {
                std::fs::write(&path, b"someone else's").expect("write");
            }
        })
        .expect_err("the path appeared");
        assert_eq!(err.errno(), -libc::EEXIST);
        assert_eq!(
            std::fs::read(&path).expect("read"),
            b"someone else's",
            "not replaced"
        );
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("read_dir")
            .map(|entry| entry.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 1, "the temporary file is removed: {names:?}");
    }
}
