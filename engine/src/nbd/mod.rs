//! The NBD protocol (NetworkBlockDevice/nbd `doc/proto.md`) as a library with no I/O: bytes
//! in, bytes and events out. The connection that owns a socket and drives these on a reactor
//! is built on top (see `docs/nbd.md`).
//!
//! Table of contents:
//! - [`wire`]: magics, codes, flags, and every header and payload, with encoders and
//!   decoders (each with its byte layout).
//! - [`handshake`]: [`Handshake`], the fixed newstyle option haggling as a state machine,
//!   ending in [`Outcome::Done`] with the [`Negotiated`] parameters.
//! - [`request`]: [`RequestDecoder`] (requests, checked against what was negotiated, with
//!   WRITE payloads handed to the caller's buffers) and [`ReplyEncoder`] (simple and
//!   structured replies, block status).
//! - [`limits`]: every bound on buffering, lengths and counts.

pub mod handshake;
pub mod limits;
pub mod request;
pub mod wire;

pub use handshake::{
    BlockSizes, CloseReason, ConfigError, ExportInfo, Features, Handshake, HandshakeError,
    HandshakeOptions, Negotiated, Outcome, Step,
};
pub use request::{
    check_request, Command, Decoded, Event, PendingPayload, RejectReason, Rejection, ReplyEncoder,
    ReplyError, Request, RequestDecoder, RequestError,
};
pub use wire::{Errno, WireError};
