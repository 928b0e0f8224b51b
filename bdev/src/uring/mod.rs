//! The io_uring bdev: regular files and block devices through one io_uring per reactor.
//!
//! * [`UringBdev`] (`bdev.rs`): opening, geometry, and the per-reactor channel backend.
//! * `group.rs`: the reactor's poll group, one [`sys::Ring`] shared by the channels of every
//!   uring bdev on that reactor, one active poller that submits (what is left after the
//!   `submit_batch`-sized enters the channels made) and routes completions by
//!   `user_data = (channel index << 32) | slot`.
//! * `channels.rs`: the group's channel table; an entry (its slots, buffers, registered file
//!   slot) outlives its channel until the channel's last SQE was reaped.
//! * `request.rs`: how a request becomes SQEs (the only `Ring::push` calls) and what each
//!   completion means: multi-step I/O, short-I/O resubmission, the zero-writing fallbacks.
//! * `blk.rs`: the blocking block-device ioctls (logical block size, discard, zero-out).
//! * [`sys`]: the kernel edge; the only code that pushes SQEs and reaps CQEs.
//!
//! Invariants (detailed in each file): no allocation per I/O in steady state; at depth, about
//! one `io_uring_enter` per `submit_batch` I/Os plus one per loop pass for the remainder (at
//! queue depth 1, one per I/O), and completions reaped from the ring without one (except one
//! enter when the kernel flags pending completion work);
//! a request's buffers (and iovec scratch) stay owned by its slot until its last CQE is
//! reaped, including after its future or its channel is dropped; unmap and write-zeroes fall
//! back to writing zeros when the file or device refuses them, and the fallback is remembered.
//!
//! Lifetimes: a closed channel keeps its registered-file slot until its last queued SQE is
//! reaped (so no other file can inherit its writes); a group whose last channel closed with
//! I/O in flight keeps polling until it drained, then unregisters itself (the reactor never
//! blocks on it; only a stopping reactor waits for its ring to close). A ring whose enter keeps
//! failing ([`ENTER_FAILURES_MAX`] times in a row) is retired: the SQEs the kernel never took
//! are retracted and their requests, and every later one, fail with that errno.

mod bdev;
mod blk;
mod channels;
mod group;
mod request;
pub mod sys;

pub use self::bdev::{UringBdev, UringOptions, DEFAULT_SUBMIT_BATCH};
pub use self::group::{UringGroupStats, ENTER_FAILURES_MAX};
pub use self::request::{SHORT_IO_RETRIES_MAX, ZERO_FILL_CHUNK};
