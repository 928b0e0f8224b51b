//! The engine's umbrella error: its own failures plus the lower crates', each with an errno.

/// What went wrong starting or serving. `errno()` gives the negative errno kind.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// A bad argument (target, size, core list) with the reason.
    #[error("{0}")]
    InvalidArgument(String),
    /// A file could not be prepared (created, sized, written).
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What failed, with the OS error.
        reason: String,
        /// The negative errno.
        errno: i32,
    },
    /// A stop signal (SIGINT, SIGTERM) interrupted the work; what was done is undone.
    #[error("{0}")]
    Interrupted(String),
    /// Something named does not exist (-ENOENT): an export, a volume.
    #[error("{0}")]
    NotFound(String),
    /// Something with that name exists already (-EEXIST).
    #[error("{0}")]
    Exists(String),
    /// In use (-EBUSY): an export with clients, a volume that is exported.
    #[error("{0}")]
    Busy(String),
    /// A bdev failure.
    #[error(transparent)]
    Bdev(#[from] spool_bdev::BdevError),
    /// A reactor failure.
    #[error(transparent)]
    Reactor(#[from] spool_reactor::ReactorError),
    /// A blobstore failure (load, init, a blob operation, unload).
    #[error(transparent)]
    Blob(#[from] spool_blob::BlobError),
}

impl EngineError {
    /// The negative errno kind of this error.
    pub fn errno(&self) -> i32 {
        match self {
            Self::InvalidArgument(_) => -libc::EINVAL,
            Self::Interrupted(_) => -libc::EINTR,
            Self::NotFound(_) => -libc::ENOENT,
            Self::Exists(_) => -libc::EEXIST,
            Self::Busy(_) => -libc::EBUSY,
            Self::File { errno, .. } => *errno,
            Self::Bdev(err) => err.errno(),
            Self::Reactor(err) => err.errno(),
            Self::Blob(err) => err.errno(),
        }
    }
}
