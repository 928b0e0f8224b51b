//! Spool's engine: what turns command-line words into running reactors and open devices.
//! It holds the daemon (`spool serve`), target parsing and opening, the offline runner of
//! the blobstore commands, the perf runner and the import/export copy.
//!
//! Table of contents:
//! - [`target`]: `null`, `malloc:SIZE` or a path, parsed and opened as a bdev.
//! - [`offline`]: one blobstore command on an image: open, load or init, run, unload.
//! - [`transfer`]: files into blobs and back (`spool import`, `spool export`).
//! - [`perf`]: the perf runner (`spool perf`): per-core I/O jobs, metadata rates, reports.
//! - [`guard`]: guard rails: what a file holds before it is overwritten or copied raw.
//! - [`lock`]: [`ImageLock`], one writer per image across processes.
//! - [`net`]: TCP and Unix sockets polled by the reactors (listeners, streams).
//! - `staged`: new files made under a temporary name and linked into place.
//! - [`signals`]: SIGINT and SIGTERM as a request to stop cleanly (a second one is fatal).
//! - [`nbd`]: the NBD protocol with no I/O: wire format, handshake, request decoding and
//!   replies.
//! - [`rpc`]: JSON-RPC management while serving (SPDK's methods and shapes).
//! - [`serve`]: the daemon (`spool serve`): the store on the reactors, volumes exported over
//!   NBD, drained and unloaded cleanly on a stop.
//! - [`size`]: human sizes ("1G", "512MiB", "4096", "0x1000").
//! - [`words`]: OS errors in words (one place; a full host filesystem said as such).
//! - [`error`]: [`EngineError`], wrapping the lower crates' errors with their errno kinds.

#![warn(clippy::unwrap_used)]

pub mod error;
pub mod guard;
pub mod lock;
pub mod nbd;
pub mod net;
pub mod offline;
pub mod perf;
pub mod rpc;
pub mod serve;
pub mod signals;
pub mod size;
mod staged;
pub mod target;
pub mod transfer;
pub mod words;

pub use crate::error::EngineError;
pub use crate::lock::{ImageLock, StagedImage};
pub use crate::offline::{run_offline, run_offline_locked, store_io_unit, OpenInfo, StoreOpen};
pub use crate::size::{parse_bytes, parse_size};
pub use crate::target::{
    open_image, open_target, prepare_file, OpenedTarget, TargetOptions, TargetSpec,
};
