//! The command line's error: what to print and which exit code to use.

use spool_engine::perf::PerfReport;
use spool_engine::EngineError;

/// A failed command. Printed as one line `error: ...`.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// Bad arguments (exit code 2).
    #[error("{0}")]
    Usage(String),
    /// The engine refused (bad target, device error). A stop or a benchmark's failed I/O
    /// become [`ToolError::Interrupted`] and [`ToolError::Io`] instead (see the `From`).
    #[error(transparent)]
    Engine(EngineError),
    /// A reactor failure.
    #[error(transparent)]
    Reactor(#[from] spool_reactor::ReactorError),
    /// A blobstore operation failed.
    #[error(transparent)]
    Blob(#[from] spool_blob::BlobError),
    /// A command failed; the message names the object and the reason (exit code 1).
    #[error("{0}")]
    Failed(String),
    /// The run itself failed.
    #[error("{0}")]
    Run(String),
    /// No blob matches a BLOB argument (exit 1); said naming the image, with where to look,
    /// once the store is unloaded (see `blob_cmd::with_store`).
    #[error("{0}")]
    NoSuchBlob(String),
    /// A check ran to its end and found problems (listed on stdout); exit code 2, as
    /// `fsck`-like tools do.
    #[error("{0}")]
    Problems(String),
    /// A stop signal interrupted the command; what was done is said, what was in flight
    /// finished, the store was unloaded cleanly (exit 130 for SIGINT, 143 for SIGTERM).
    #[error("interrupted by {} after {done}", signal.name())]
    Interrupted {
        /// The signal.
        signal: spool_engine::signals::StopSignal,
        /// What was done before it ("1048576 of 2147483648 bytes").
        done: String,
        /// A benchmark's partial report.
        report: Option<Box<PerfReport>>,
    },
    /// `spool check` found problems (exit code 2); they were printed.
    #[error("{0} problem(s) found")]
    Inconsistent(usize),
    /// I/O failed during the run; the partial report is kept.
    #[error("I/O failed: {first}")]
    Io {
        /// What was measured before the failure.
        report: Box<PerfReport>,
        /// The first failure.
        first: String,
    },
}

impl ToolError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            ToolError::Usage(_) | ToolError::Inconsistent(_) | ToolError::Problems(_) => 2,
            ToolError::Interrupted { signal, .. } => signal.exit_code(),
            ToolError::Engine(err) if err.errno() == -libc::EINVAL => 2,
            ToolError::Reactor(err) if err.errno() == -libc::EINVAL => 2,
            _ => 1,
        }
    }
}

impl From<EngineError> for ToolError {
    fn from(err: EngineError) -> Self {
        match err {
            EngineError::Stopped {
                signal,
                done,
                report,
            } => ToolError::Interrupted {
                signal,
                done,
                report,
            },
            EngineError::IoFailed { report, first, .. } => ToolError::Io {
                report,
                first: spool_engine::words::scrub(&first),
            },
            other => ToolError::Engine(other),
        }
    }
}

impl From<spool_bdev::dma::DmaError> for ToolError {
    fn from(err: spool_bdev::dma::DmaError) -> Self {
        ToolError::Blob(err.into())
    }
}
