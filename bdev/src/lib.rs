//! Spool's block device layer.
//!
//! Table of contents:
//! - [`device`]: the [`Bdev`] and [`ChannelBackend`] traits device modules implement.
//! - [`channel`]: [`BdevDesc`] (an open device) and [`BdevChannel`] (per-reactor I/O,
//!   validated, buffers owned by the request while in flight).
//! - [`io`]: requests and the pooled request slots of a channel.
//! - [`callback`]: requests whose completion calls the submitter directly ([`IoCallback`]).
//! - [`deferred`]: completion queues for memory devices (FIFO, or seeded under simulation).
//! - [`dma`]: DMA-able, 4 KiB-aligned buffers from a pool backed by 2 MiB hugepages when the
//!   machine has them, ordinary aligned memory when it has not.
//! - [`uring`]: the io_uring bdev (and its kernel edge in `uring::sys`).
//! - [`null`]: a device that completes without touching data.
//! - [`limits`]: every bound and why.
//! - [`error`]: [`BdevError`] with errno kinds.

#![warn(clippy::unwrap_used)]

pub mod callback;
pub mod channel;
pub mod crash;
pub mod deferred;
pub mod device;
pub mod dma;
pub mod error;
pub mod error_inject;
pub mod io;
pub mod limits;
pub mod malloc;
pub mod null;
pub mod uring;

pub use crate::callback::{IoCallback, IoDone};
pub use crate::channel::{BdevChannel, BdevDesc, IoFuture, IoOutput, Refused};
pub use crate::crash::{CrashBdev, PendingWrite, Survivor};
pub use crate::device::{Bdev, ChannelBackend};
pub use crate::dma::DmaBuf;
pub use crate::error::BdevError;
pub use crate::error_inject::{ErrorBdev, ErrorRule, RuleId, RuleStats};
pub use crate::io::{IoKind, IoSlots, SlotId, Submission, WakeBatch};
pub use crate::malloc::MallocBdev;
pub use crate::null::NullBdev;
pub use crate::uring::{UringBdev, UringGroupStats, UringOptions, DEFAULT_SUBMIT_BATCH};
