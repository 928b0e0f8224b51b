//! The blobstore's typed error. Every variant maps to a negative errno kind, as SPDK's
//! completions carry (`errno()`), so callers and the CLI can report both.

use crate::format::layout::LayoutError;
use crate::format::mask::MaskError;
use crate::format::super_block::SuperBlockError;

/// What went wrong in a blobstore or blob operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BlobError {
    /// The super block is not a valid one for this device (-EILSEQ).
    #[error("{0}")]
    SuperBlock(#[from] SuperBlockError),
    /// A mask region is malformed (-EILSEQ).
    #[error("{0}")]
    Mask(#[from] MaskError),
    /// The device cannot hold a store with these options.
    #[error("{0}")]
    Layout(#[from] LayoutError),
    /// The store's type is not the one asked for (-ENXIO).
    #[error("blobstore type is {found:?}, expected {wanted:?}")]
    BstypeMismatch {
        /// The type asked for.
        wanted: String,
        /// The type on disk.
        found: String,
    },
    /// A blob's metadata is corrupt (-EINVAL): the blob cannot be opened.
    #[error("blob {id:#x}: corrupt metadata: {reason}")]
    CorruptBlob {
        /// The blob.
        id: u64,
        /// What is wrong, naming the md page.
        reason: String,
    },
    /// The store's metadata cannot be replayed (-EILSEQ).
    #[error("corrupt metadata region: {0}")]
    CorruptStore(String),
    /// No blob has this id (-ENOENT).
    #[error("blob {0:#x} does not exist")]
    NoSuchBlob(u64),
    /// The blob has no such xattr (-ENOENT).
    #[error("blob {id:#x} has no xattr {name:?}")]
    NoSuchXattr {
        /// The blob.
        id: u64,
        /// The xattr.
        name: String,
    },
    /// No super blob is set (-ENOENT).
    #[error("no super blob is set")]
    NoSuperBlob,
    /// The object is in use (-EBUSY).
    #[error("{0}")]
    Busy(String),
    /// A name that must be unique is taken (-EEXIST), as an lvol name in its store.
    #[error("{0}")]
    Exists(String),
    /// No object has this name, alias or uuid (-ENOENT), as an lvol looked up by name.
    #[error("{0}")]
    NotFound(String),
    /// The store is not an lvol store SPDK's lvol layer could open (-ENODEV, as SPDK's
    /// `spdk_lvs_load` says when the super blob is missing or cannot be opened).
    #[error("not an lvol store: {0}")]
    NotLvolStore(String),
    /// The blob's data or metadata is read-only (-EPERM).
    #[error("blob {id:#x} is read-only: cannot {what}")]
    ReadOnly {
        /// The blob.
        id: u64,
        /// The refused operation.
        what: &'static str,
    },
    /// Not enough free clusters (-ENOSPC).
    #[error("no space: {0}")]
    NoSpace(String),
    /// An operation that copies clusters into a blob (inflate, decouple) needs more free
    /// clusters than the store has (-ENOSPC): checked before anything is copied.
    #[error("blob {id:#x}: {what} needs {needed} clusters to allocate, {free} are free")]
    NoRoom {
        /// The blob.
        id: u64,
        /// The operation.
        what: &'static str,
        /// Clusters it needs.
        needed: u64,
        /// Clusters the store has free.
        free: u64,
    },
    /// The host filesystem under a file-backed store could not reserve a thick blob's new
    /// clusters (-ENOSPC): nothing changed.
    #[error("blob {id:#x}: the host filesystem cannot reserve {bytes} bytes for its {clusters} new clusters: No space left on device")]
    HostNoSpace {
        /// The blob (for a create: the id it would have had).
        id: u64,
        /// Clusters it needed.
        clusters: u64,
        /// Bytes it needed.
        bytes: u64,
    },
    /// Init was asked to stop (see `InitOptions::stop`) and did, while clearing the
    /// metadata area (-EINTR): no super block was written, so the device holds no store (the
    /// start of any old one's metadata is cleared).
    #[error("init stopped after clearing {done} of {total} bytes of the metadata area; the device holds no store")]
    InitStopped {
        /// Bytes of the md area cleared.
        done: u64,
        /// Bytes of the md area.
        total: u64,
    },
    /// A long operation (inflate, decouple) was asked to stop and did, between two clusters
    /// (-EINTR): `done` of `total` clusters were copied; running it again finishes it.
    #[error("blob {id:#x}: {what} stopped after {done} of {total} clusters")]
    Stopped {
        /// The blob.
        id: u64,
        /// The operation.
        what: &'static str,
        /// Clusters copied.
        done: u64,
        /// Clusters it had to copy.
        total: u64,
    },
    /// The store was loaded read-only ([`crate::LoadOptions::read_only`]): no metadata
    /// change is written (-EROFS).
    #[error("the store is open read-only: cannot {0}")]
    StoreReadOnly(&'static str),
    /// No free metadata page (-ENOMEM, as SPDK reports it).
    #[error("no free metadata page: {0}")]
    NoMdPages(String),
    /// A bad argument (-EINVAL).
    #[error("{0}")]
    InvalidArgument(String),
    /// The handle was closed (-EBADF).
    #[error("blob {0:#x} is not open")]
    NotOpen(u64),
    /// A metadata operation was called off the metadata reactor (-EPERM).
    #[error("blobstore metadata operations run on reactor {md_reactor}; called from {caller}")]
    WrongThread {
        /// The metadata reactor.
        md_reactor: String,
        /// Where the call came from.
        caller: String,
    },
    /// The blob uses a feature this build does not implement (-ENOTSUP).
    #[error("{0}")]
    Unsupported(String),
    /// The store was unloaded or destroyed (-ENODEV).
    #[error("the blobstore is unloaded")]
    Unloaded,
    /// An operation on another reactor failed with this errno.
    #[error("{what}: errno {errno}")]
    Remote {
        /// The negative errno.
        errno: i32,
        /// What failed.
        what: String,
    },
    /// A device error.
    #[error(transparent)]
    Bdev(#[from] spool_bdev::BdevError),
    /// A reactor error.
    #[error(transparent)]
    Reactor(#[from] spool_reactor::ReactorError),
    /// A DMA buffer could not be allocated.
    #[error(transparent)]
    Dma(#[from] spool_bdev::dma::DmaError),
}

impl BlobError {
    /// The negative errno kind of this error.
    pub fn errno(&self) -> i32 {
        match self {
            Self::SuperBlock(_) | Self::Mask(_) | Self::CorruptStore(_) => -libc::EILSEQ,
            Self::Layout(LayoutError::TooSmall { .. }) => -libc::ENOSPC,
            Self::Layout(LayoutError::MetadataTooLarge { .. }) => -libc::ENOMEM,
            Self::Layout(_) => -libc::EINVAL,
            Self::BstypeMismatch { .. } => -libc::ENXIO,
            Self::CorruptBlob { .. } | Self::InvalidArgument(_) => -libc::EINVAL,
            Self::NoSuchBlob(_) | Self::NoSuchXattr { .. } | Self::NoSuperBlob => -libc::ENOENT,
            Self::Busy(_) => -libc::EBUSY,
            Self::Exists(_) => -libc::EEXIST,
            Self::NotFound(_) => -libc::ENOENT,
            Self::NotLvolStore(_) => -libc::ENODEV,
            Self::ReadOnly { .. } | Self::WrongThread { .. } => -libc::EPERM,
            Self::NoSpace(_) | Self::NoRoom { .. } | Self::HostNoSpace { .. } => -libc::ENOSPC,
            Self::StoreReadOnly(_) => -libc::EROFS,
            Self::Stopped { .. } | Self::InitStopped { .. } => -libc::EINTR,
            Self::NoMdPages(_) => -libc::ENOMEM,
            Self::NotOpen(_) => -libc::EBADF,
            Self::Unsupported(_) => -libc::ENOTSUP,
            Self::Unloaded => -libc::ENODEV,
            Self::Remote { errno, .. } => *errno,
            Self::Bdev(err) => err.errno(),
            Self::Reactor(err) => err.errno(),
            Self::Dma(err) => err.errno(),
        }
    }

    pub(crate) fn corrupt(id: u64, reason: impl Into<String>) -> BlobError {
        BlobError::CorruptBlob {
            id,
            reason: reason.into(),
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = BlobError> = std::result::Result<T, E>;
