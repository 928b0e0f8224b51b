//! Sockets on the reactors, for the daemon's NBD (and later RPC) connections: no thread per
//! client and no blocking call. Each reactor polls one epoll instance without blocking on
//! every loop pass (`readiness`); listeners and streams are futures over non-blocking
//! sockets (`socket`). mio provides the epoll registration and the socket types (the
//! standard crate for this in Rust, used under tokio); Spool only adds the reactor glue.

mod readiness;
mod socket;

pub use socket::{Accepted, ListenAddr, Listener, ReadHalf, Stream, WriteHalf};
