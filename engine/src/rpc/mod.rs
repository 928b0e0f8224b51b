//! Management while serving: JSON-RPC 2.0 on a Unix socket, with SPDK's method names,
//! parameters, result shapes and error codes wherever SPDK has the same operation, so SPDK's
//! own client (`spdk-rpc`, scripts/rpc.py) drives Spool unchanged.
//!
//! Table of contents:
//! - [`jsonrpc`]: the framing and JSON-RPC objects, with no I/O (fuzzed).
//! - [`client`]: a blocking client (`spool rpc`, tests).
//! - `server`: the socket on the metadata reactor; one task per client.
//! - `methods`: the method table and parameter decoding; `framework`, `bdev`, `lvol`, `nbd`:
//!   the methods by family.

mod bdev;
pub mod client;
mod framework;
pub mod jsonrpc;
mod lvol;
pub(crate) mod methods;
mod nbd;
pub(crate) mod server;

pub use server::MAX_RPC_CLIENTS;
