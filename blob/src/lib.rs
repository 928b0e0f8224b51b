//! Spool's blobstore: SPDK's on-disk format byte for byte, blobs, thin provisioning,
//! snapshots and clones, per-reactor blob I/O channels, and dirty-shutdown recovery.
//!
//! A store is initialised or loaded on one reactor, its *metadata reactor*: every metadata
//! operation ([`Blobstore`] and [`Blob`] methods) runs there, and a call from elsewhere is
//! refused with [`BlobError::WrongThread`]. I/O runs on any reactor through that reactor's
//! [`BlobChannel`] and a [`BlobIo`] handle.
//!
//! Table of contents:
//! - [`format`](mod@format): pure encode/decode of the on-disk structures (fuzzed, no I/O).
//! - [`meta`]: a blob's metadata and its (de)serialisation to md pages.
//! - [`store`]: [`Blobstore`]: init, load (clean and recovery), unload, destroy, super blob.
//! - `blob`: [`Blob`] handles and the blob metadata operations; `blob_lifecycle`: create,
//!   open, delete.
//! - `persist`, `resize`: the metadata write path (crash-safe order, group commit of thin
//!   inserts) and size changes.
//! - `io`: [`BlobChannel`] and [`BlobIo`]: reads, writes, thin allocation (`io::thin`).
//! - `detach`: work that finishes whatever its caller does (metadata operations, persists,
//!   thin allocations run as their own tasks; the caller's future only waits).
//! - `freeze`: freezing and draining a blob's I/O on every channel.
//! - `snapshot`: snapshots, clones, inflate, decouple, merge-on-delete, load-time repair.
//! - [`lvol`]: [`LvolStore`]: logical volumes (names, uuids, aliases) as SPDK's lvol layer
//!   keeps them in xattrs, over the blobstore.
//! - [`check`]: the offline checker and repairer behind `spool check`.
//! - [`bitmap`]: bit arrays for the masks and the lock-free used-cluster map.
//! - [`error`]: [`BlobError`] with errno kinds.

#![warn(clippy::unwrap_used)]

pub mod bitmap;
mod blob;
mod blob_lifecycle;
pub mod check;
mod detach;
pub mod error;
pub mod format;
mod freeze;
mod io;
pub mod lvol;
pub mod meta;
mod persist;
mod resize;
mod snapshot;
mod steps;
pub mod store;
mod sync;

pub use crate::blob::{Blob, BlobOptions};
pub use crate::error::{BlobError, Result};
pub use crate::freeze::FreezeStats;
pub use crate::io::{
    BlobChannel, BlobIo, BlobIoCallback, BlobIoDone, BlobIoFuture, ChannelContext,
};
pub use crate::lvol::{Lvol, LvolInfo, LvolStore, LvsInitOptions};
pub use crate::meta::ExtentForm;
pub use crate::store::{Blobstore, Geometry, InitOptions, LoadOptions, LoadReport};
