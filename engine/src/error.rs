//! The engine's umbrella error: its own failures plus the lower crates', each with an errno.

use crate::perf::report::PerfReport;
use crate::signals::StopSignal;

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
    /// No such device (-ENODEV): no store, or no lvol store, where one is needed.
    #[error("{0}")]
    NoDevice(String),
    /// A stop signal ended a long run (a benchmark, a transfer) early: what was in flight
    /// finished and what was done is kept; `done` says how much.
    #[error("interrupted by {} after {done}", signal.name())]
    Stopped {
        /// The signal.
        signal: StopSignal,
        /// What was done before it ("1048576 of 2147483648 bytes ...").
        done: String,
        /// A benchmark's partial report.
        report: Option<Box<PerfReport>>,
    },
    /// A benchmark's I/O failed; what was measured up to then is kept.
    #[error("I/O failed: {first}")]
    IoFailed {
        /// What was measured before the failure.
        report: Box<PerfReport>,
        /// The first failure.
        first: String,
        /// Its negative errno.
        errno: i32,
    },
    /// A step of a longer run failed: which step, and why.
    #[error("{step}: {source}")]
    Step {
        /// The step ("blobstore init", "create", "open channel").
        step: String,
        /// The failure.
        source: Box<EngineError>,
    },
    /// A run failed for a reason no lower layer reported (a lost completion, a panicked
    /// reactor, a check that did not hold).
    #[error("{reason}")]
    Failed {
        /// What went wrong.
        reason: String,
        /// The negative errno.
        errno: i32,
    },
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
            Self::Interrupted(_) | Self::Stopped { .. } => -libc::EINTR,
            Self::NotFound(_) => -libc::ENOENT,
            Self::Exists(_) => -libc::EEXIST,
            Self::Busy(_) => -libc::EBUSY,
            Self::NoDevice(_) => -libc::ENODEV,
            Self::IoFailed { errno, .. } | Self::Failed { errno, .. } => *errno,
            Self::Step { source, .. } => source.errno(),
            Self::File { errno, .. } => *errno,
            Self::Bdev(err) => err.errno(),
            Self::Reactor(err) => err.errno(),
            Self::Blob(err) => err.errno(),
        }
    }
}

/// Wraps a failure as the failure of `step`: `.map_err(step("blobstore init"))`.
pub fn step<E: Into<EngineError>>(step: &str) -> impl FnOnce(E) -> EngineError + '_ {
    move |err| EngineError::Step {
        step: step.to_string(),
        source: Box::new(err.into()),
    }
}

impl From<spool_bdev::dma::DmaError> for EngineError {
    fn from(err: spool_bdev::dma::DmaError) -> Self {
        EngineError::Blob(err.into())
    }
}
