//! The bdev layer's typed error, each variant with an errno kind like SPDK's.

use crate::io::IoKind;

/// What went wrong with a bdev request or device. `errno()` gives the negative errno kind.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BdevError {
    /// The request's offset or length is not a multiple of the block size (or an iovec of
    /// the device's iovec alignment). It never reached the device.
    #[error(
        "{kind:?} at byte {offset_bytes} length {len_bytes}: not aligned to {align_bytes} bytes"
    )]
    Misaligned {
        /// The operation.
        kind: IoKind,
        /// Requested offset, bytes.
        offset_bytes: u64,
        /// Requested length, bytes.
        len_bytes: u64,
        /// The alignment that was required.
        align_bytes: u64,
    },
    /// The request reaches past the end of the device (or has length 0). It never reached
    /// the device.
    #[error("{kind:?} at byte {offset_bytes} length {len_bytes}: outside the device's {size_bytes} bytes")]
    OutOfRange {
        /// The operation.
        kind: IoKind,
        /// Requested offset, bytes.
        offset_bytes: u64,
        /// Requested length, bytes.
        len_bytes: u64,
        /// The device's size, bytes.
        size_bytes: u64,
    },
    /// The device does not support this operation.
    #[error("{kind:?} is not supported by bdev '{bdev}'")]
    Unsupported {
        /// The device.
        bdev: String,
        /// The operation.
        kind: IoKind,
    },
    /// The device completed the request with this negative errno.
    #[error("{kind:?} failed on the device: {} (errno {errno})", std::io::Error::from_raw_os_error(-errno))]
    Io {
        /// The operation.
        kind: IoKind,
        /// The negative errno the device reported.
        errno: i32,
    },
    /// Reserving backing space failed ([`crate::Bdev::reserve`]); -ENOSPC when the host
    /// filesystem is full.
    #[error("{bdev}: reserving {len} bytes at offset {offset} on the host failed: {}", std::io::Error::from_raw_os_error(-errno))]
    Reserve {
        /// The device.
        bdev: String,
        /// Byte offset of the range.
        offset: u64,
        /// Bytes of the range.
        len: u64,
        /// The negative errno.
        errno: i32,
    },
    /// The channel has as many requests in flight as it may hold.
    #[error("too many requests in flight on this channel (at most {max})")]
    QueueFull {
        /// The bound.
        max: usize,
    },
    /// Opening or creating the device failed.
    #[error("bdev '{name}': {reason} (errno {errno})")]
    Open {
        /// The device name or path.
        name: String,
        /// What failed.
        reason: String,
        /// The negative errno.
        errno: i32,
    },
    /// A bad argument when building a device (size, block size, name).
    #[error("invalid bdev argument: {0}")]
    InvalidArgument(String),
    /// A reactor-level failure (not on a reactor, channel creation failed).
    #[error(transparent)]
    Reactor(#[from] spool_reactor::ReactorError),
    /// A DMA buffer could not be allocated.
    #[error(transparent)]
    Dma(#[from] crate::dma::DmaError),
}

impl BdevError {
    /// The negative errno kind of this error, as SPDK would report it.
    pub fn errno(&self) -> i32 {
        match self {
            Self::Misaligned { .. } | Self::OutOfRange { .. } | Self::InvalidArgument(_) => {
                -libc::EINVAL
            }
            Self::Unsupported { .. } => -libc::ENOTSUP,
            Self::Io { errno, .. } | Self::Open { errno, .. } | Self::Reserve { errno, .. } => {
                *errno
            }
            Self::QueueFull { .. } => -libc::ENOMEM,
            Self::Reactor(err) => err.errno(),
            Self::Dma(err) => err.errno(),
        }
    }
}
