//! Spool's reactor: one run-to-completion loop per pinned core.
//!
//! Each reactor owns a single-threaded executor (futures, as glommio does), its pollers and
//! timers, a message queue, and the per-reactor contexts ("channels") of io devices. A reactor
//! loop iteration polls, in this fixed order: a bounded batch of messages, the active pollers,
//! the due timed pollers, the due timers, and then the tasks made runnable so far. Nothing in
//! an iteration blocks.
//!
//! Two drivers run the same loop:
//! - [`Runtime`]: one OS thread per selected core, pinned with `core_affinity` (production).
//! - [`Sim`]: every reactor stepped by one thread in a seeded order with a virtual clock, so a
//!   failing interleaving replays exactly from its seed (tests).
//!
//! Table of contents:
//! - [`limits`]: every bound and why it was chosen.
//! - [`error`]: [`ReactorError`] with errno kinds.
//! - `clock`: real (TSC via quanta) or virtual time.
//! - `core`: the per-reactor state and one loop iteration.
//! - `task`: spawning futures, [`JoinHandle`].
//! - `poller`: active and timed pollers.
//! - `timer`: [`sleep`] and the timer heap.
//! - `wakeup`: how an adaptive reactor sleeps in the kernel and what wakes it.
//! - `message`: messages between reactors, [`send_msg`], [`spawn_on`], [`broadcast`].
//! - `oneshot`: the cross-reactor completion used by messages and walks.
//! - `io_device`: [`IoDevice`], [`Channel`], [`IoDevice::for_each_channel`].
//! - `contain`: the panic policy: contain, log, go on.
//! - `runtime`: the threaded driver.
//! - `sim`: the seeded simulation driver and its trace.

#![warn(clippy::unwrap_used)]

pub mod limits;

mod clock;
mod contain;
mod context;
mod core;
mod error;
mod io_device;
mod message;
mod oneshot;
mod poller;
mod runtime;
mod sim;
mod task;
mod timer;
mod wakeup;

pub use crate::clock::{now_ns, ReactorClock};
pub use crate::context::{
    in_reactor, is_simulated, reactor_count, reactor_id, sim_rng_u64, stats, trace, ReactorStats,
};
pub use crate::core::ReactorId;
pub use crate::error::ReactorError;
pub use crate::io_device::{Channel, IoDevice};
pub use crate::message::{broadcast, send_msg, spawn_on};
pub use crate::oneshot::RemoteHandle;
pub use crate::poller::{poller_register, PollStatus, PollerHandle};
pub use crate::runtime::{IdleMode, Runtime, RuntimeOptions, StopReport};
pub use crate::sim::{Sim, SimOptions, TraceEvent, TraceKind};
pub use crate::task::{spawn_local, yield_now, JoinHandle};
pub use crate::timer::{sleep, wake_at};
pub use crate::wakeup::{
    sleeps_in_kernel, wake_source_register, wakeup_counts, WakeKind, WakeSource,
};
