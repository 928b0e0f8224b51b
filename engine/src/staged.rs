//! A new file made out of sight: created under a temporary name next to its final path,
//! prepared there (locked, filled), and only then linked into place without replacing
//! anything. Another process never sees the final path half-made or unlocked.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// How many temporary names to try before giving up (a collision needs a stale file left by
/// a crashed process that had our pid).
const TEMP_NAME_ATTEMPTS_MAX: u32 = 16;

/// The temporary name of a staged file; the name is removed on drop unless published.
#[derive(Debug)]
pub(crate) struct StagedName {
    /// The temporary path; `None` once published.
    temp_path: Option<PathBuf>,
}

/// Creates an empty file under a fresh temporary name in the directory of `final_path`;
/// returns it open for reading and writing, with the guard of its name.
pub(crate) fn create_staged(final_path: &Path) -> std::io::Result<(File, StagedName)> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = directory_of(final_path);
    let base = final_path
        .file_name()
        .map_or_else(|| "image".into(), |name| name.to_string_lossy());
    let mut last_err = None;
    for _ in 0..TEMP_NAME_ATTEMPTS_MAX {
        // At most as long as any valid image name (NAME_MAX is 255): the final name's first
        // 200 bytes (cut on a char boundary) keep it recognisable.
        let mut stem: String = String::new();
        for c in base.chars() {
            if stem.len() + c.len_utf8() > 200 {
                break;
            }
            stem.push(c);
        }
        let temp_path = dir.join(format!(
            ".{stem}.spool-new.{}.{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&temp_path)
        {
            Ok(file) => {
                let name = StagedName {
                    temp_path: Some(temp_path),
                };
                return Ok((file, name));
            }
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => last_err = Some(err),
            Err(err) => return Err(err),
        }
    }
    Err(last_err.unwrap_or_else(|| std::io::Error::from_raw_os_error(libc::EEXIST)))
}

impl StagedName {
    /// The temporary path (`None` once published).
    pub(crate) fn temp_path(&self) -> Option<&Path> {
        self.temp_path.as_deref()
    }

    /// Gives the file its final name, failing with `EEXIST` if `final_path` exists (it is
    /// never replaced), and syncs the directory so the name is durable. On success the
    /// temporary name is gone; on failure it is still there (dropping the guard removes it).
    pub(crate) fn publish(mut self, final_path: &Path) -> std::io::Result<()> {
        let Some(temp_path) = self.temp_path.as_deref() else {
            return Err(std::io::Error::from_raw_os_error(libc::ENOENT));
        };
        match std::fs::hard_link(temp_path, final_path) {
            Ok(()) => {
                // The inode now lives on under its final name; the temporary one goes.
                if let Some(temp_path) = self.temp_path.take() {
                    let _ = std::fs::remove_file(temp_path);
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => return Err(err),
            Err(link_err) => {
                // A filesystem without hard links: an atomic no-replace rename does the same.
                rename_noreplace(temp_path, final_path).map_err(|rename_err| {
                    if rename_err.raw_os_error() == Some(libc::EEXIST) {
                        rename_err
                    } else {
                        link_err
                    }
                })?;
                self.temp_path = None;
            }
        }
        let dir = directory_of(final_path);
        if let Err(err) = File::open(dir).and_then(|dir| dir.sync_all()) {
            tracing::warn!(dir = %dir.display(), %err, "could not sync the directory of a new file");
        }
        Ok(())
    }
}

impl StagedName {
    /// Renames the file over `final_path`, replacing what is there (the caller has synced
    /// the file's data), and syncs the directory so the new name is durable. On failure the
    /// temporary name is still there (dropping the guard removes it).
    pub(crate) fn replace(mut self, final_path: &Path) -> std::io::Result<()> {
        let Some(temp_path) = self.temp_path.as_deref() else {
            return Err(std::io::Error::from_raw_os_error(libc::ENOENT));
        };
        std::fs::rename(temp_path, final_path)?;
        self.temp_path = None;
        let dir = directory_of(final_path);
        if let Err(err) = File::open(dir).and_then(|dir| dir.sync_all()) {
            tracing::warn!(dir = %dir.display(), %err, "could not sync the directory of a replaced file");
        }
        Ok(())
    }
}

impl Drop for StagedName {
    fn drop(&mut self) {
        if let Some(temp_path) = self.temp_path.take() {
            let _ = std::fs::remove_file(temp_path);
        }
    }
}

/// The directory `path` is in ("." for a bare name).
fn directory_of(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// `renameat2(from, to, RENAME_NOREPLACE)`: EEXIST if `to` exists. (std has no
/// no-replace rename; this one syscall is the crate's only unsafe code.)
#[allow(unsafe_code)]
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    let c_path = |path: &Path| {
        CString::new(path.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))
    };
    let (from, to) = (c_path(from)?, c_path(to)?);
    // SAFETY: both paths are valid NUL-terminated strings that outlive the call; the syscall
    // reads them and takes no other pointer.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
