//! The reactor's typed error, each variant mapped to an errno kind like SPDK's.

use crate::core::ReactorId;

/// What went wrong in a reactor operation. `errno()` gives the negative errno kind.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReactorError {
    /// No reactor with that id exists in this runtime.
    #[error("reactor {0} does not exist")]
    NoSuchReactor(ReactorId),
    /// The target reactor has stopped (or is stopping) and takes no more messages.
    #[error("reactor {0} has stopped")]
    Stopped(ReactorId),
    /// The call needs to run on a reactor thread, and the caller is not on one.
    #[error("not called from a reactor")]
    NotOnReactor,
    /// A runtime was asked for no cores, too many, or a core this machine does not have.
    #[error("bad core list: {0}")]
    BadCores(String),
    /// The OS refused to start a reactor thread.
    #[error("could not start reactor thread: {0}")]
    ThreadSpawn(String),
    /// An io device's create callback failed on a reactor, with that errno.
    #[error("io device '{device}': channel create failed on reactor {reactor}: errno {errno}")]
    ChannelCreate {
        /// The device's name.
        device: String,
        /// The reactor the channel was wanted on.
        reactor: ReactorId,
        /// The negative errno the create callback returned.
        errno: i32,
    },
    /// The io device was unregistered.
    #[error("io device '{0}' is unregistered")]
    DeviceGone(String),
    /// An io device still has channels and cannot be unregistered.
    #[error("io device '{0}' still has channels")]
    DeviceBusy(String),
    /// The task producing the awaited result was cancelled (its reactor stopped).
    #[error("task was cancelled before it completed")]
    Cancelled,
    /// A simulation reached its step bound, or nothing was left to run, before the awaited
    /// result arrived.
    #[error("simulation stalled after {steps} steps: {why}")]
    SimStalled {
        /// Steps run.
        steps: u64,
        /// Why it stopped.
        why: &'static str,
    },
    /// Work sent to this reactor panicked there (a `spawn_on` constructor or the future it
    /// built, a `for_each_channel` visit): the panic was contained and logged, and the
    /// reactor goes on.
    #[error("work on reactor {0} panicked (contained; the reactor goes on)")]
    Panicked(ReactorId),
    /// A system call the reactor needs failed (creating its doorbell or wait set,
    /// registering a wake source).
    #[error("reactor system call failed: {0}")]
    Io(String),
}

impl ReactorError {
    /// The negative errno kind of this error, as SPDK would report it.
    pub fn errno(&self) -> i32 {
        match self {
            Self::NoSuchReactor(_) | Self::BadCores(_) => -libc::EINVAL,
            Self::Stopped(_) | Self::DeviceGone(_) => -libc::ENODEV,
            Self::NotOnReactor => -libc::EPERM,
            Self::ThreadSpawn(_) => -libc::EAGAIN,
            Self::ChannelCreate { errno, .. } => *errno,
            Self::DeviceBusy(_) => -libc::EBUSY,
            Self::Cancelled => -libc::ECANCELED,
            Self::SimStalled { .. } => -libc::ETIMEDOUT,
            Self::Panicked(_) | Self::Io(_) => -libc::EIO,
        }
    }
}
