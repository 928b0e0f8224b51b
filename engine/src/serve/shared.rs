//! What every reactor of the daemon shares: connection counts (for `--max-connections` and
//! the drain at shutdown), the reactors connections are spread over, and the settings each
//! connection follows. Only atomics: nothing here is on a request's path.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use spool_reactor::ReactorId;

use crate::nbd::HandshakeOptions;

/// Settings and counters shared by the daemon's reactors.
pub(crate) struct DaemonShared {
    /// The reactors serving connections, in the order new connections go round them.
    pub(crate) reactors: Vec<ReactorId>,
    /// Connections open at most at once; more are closed at accept.
    pub(crate) max_connections: usize,
    /// How long a client may take to finish its handshake.
    pub(crate) handshake_timeout: Duration,
    /// How long a connection stays open after a stop, once its requests are answered, for
    /// the client to send `NBD_CMD_DISC` (new requests get `ESHUTDOWN` meanwhile).
    pub(crate) shutdown_grace: Duration,
    /// The handshake's server choices.
    pub(crate) handshake: HandshakeOptions,
    /// Connections open now (accepted and not yet closed).
    pub(crate) open: AtomicUsize,
    /// Connections accepted since start.
    pub(crate) accepted: AtomicU64,
    /// Connections refused at accept because `max_connections` were open.
    pub(crate) refused: AtomicU64,
    next: AtomicUsize,
}

impl DaemonShared {
    /// Shared state for connections spread over `reactors`.
    pub(crate) fn new(
        reactors: Vec<ReactorId>,
        max_connections: usize,
        handshake_timeout: Duration,
        shutdown_grace: Duration,
        handshake: HandshakeOptions,
    ) -> DaemonShared {
        DaemonShared {
            reactors,
            max_connections,
            handshake_timeout,
            shutdown_grace,
            handshake,
            open: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            next: AtomicUsize::new(0),
        }
    }

    /// Counts a new connection in if there is room; `false` when `max_connections` are open.
    pub(crate) fn try_open(&self) -> bool {
        let admitted = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < self.max_connections).then_some(open + 1)
            })
            .is_ok();
        if admitted {
            self.accepted.fetch_add(1, Ordering::Relaxed);
        } else {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        admitted
    }

    /// Counts a connection out.
    pub(crate) fn close(&self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }

    /// The reactor the next connection goes to (round robin).
    pub(crate) fn next_reactor(&self) -> Option<ReactorId> {
        let index = self.next.fetch_add(1, Ordering::Relaxed);
        self.reactors
            .get(index % self.reactors.len().max(1))
            .copied()
    }
}
