//! Waking a sleeping reactor: what lets an adaptive reactor ([`crate::IdleMode::Adaptive`])
//! block in the kernel when it has nothing to do, and still wake at once for a message, an
//! I/O completion or a ready socket (SPDK calls this interrupt mode).
//!
//! Each reactor of an adaptive runtime has a `Doorbell` (an eventfd) that other threads ring
//! after queueing a message for it while it sleeps, and a `WaitSet` (an epoll instance,
//! (mio's `Poll`, the crate tokio builds on) holding the doorbell and the wake sources its devices registered with
//! [`wake_source_register`]): an io_uring's eventfd, a socket group's epoll fd. A sleeping
//! reactor blocks in `epoll_wait` on its wait set, bounded by its next timer.
//!
//! No wake-up is lost: the reactor says it sleeps (`sleeping = true`), then looks at its
//! mailbox once more before it blocks; a sender queues its message, then looks at `sleeping`.
//! Both sides put a sequentially consistent fence between their write and their read, so at
//! least one of them sees the other's write: either the reactor finds the message, or the
//! sender rings. Wake sources need no such handshake: the kernel signals their fds for every
//! completion or readiness change after the reactor last polled them, and `epoll_wait`
//! returns at once for one signalled before it was called.

use std::io;
use std::os::fd::RawFd;
use std::rc::{Rc, Weak};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Token};
use slab::Slab;

use crate::context;
use crate::core::ReactorCore;
use crate::ReactorError;

/// Events taken from the wait set per sleep. More are taken on the next sleep; the pollers
/// consume the sources' work whatever was reported.
const WAIT_EVENTS_MAX: usize = 16;

/// The token of the doorbell; wake sources use their slab key + 1.
const DOORBELL_TOKEN: Token = Token(0);

/// A reactor's doorbell: an eventfd (mio's `Waker`) other threads ring after queueing a
/// message while the reactor sleeps.
#[derive(Debug)]
pub(crate) struct Doorbell {
    waker: mio::Waker,
    sleeping: AtomicBool,
    rings: AtomicU64,
}

impl Doorbell {
    /// Ringing `doorbell` wakes a sleep on `poll`.
    fn new(poll: &mio::Poll) -> io::Result<Doorbell> {
        Ok(Doorbell {
            waker: mio::Waker::new(poll.registry(), DOORBELL_TOKEN)?,
            sleeping: AtomicBool::new(false),
            rings: AtomicU64::new(0),
        })
    }

    /// Called by a sender after it queued a message: rings if the reactor sleeps or is about
    /// to (see the module's handshake).
    #[inline]
    pub(crate) fn ring_if_sleeping(&self) {
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::Relaxed) {
            self.rings.fetch_add(1, Ordering::Relaxed);
            if let Err(err) = self.waker.wake() {
                tracing::error!(%err, "ringing a reactor's doorbell failed");
            }
        }
    }

    /// The reactor's side of the handshake, before it looks at its mailbox a last time.
    fn enter_sleep(&self) {
        self.sleeping.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }

    fn leave_sleep(&self) {
        self.sleeping.store(false, Ordering::Relaxed);
    }
}

/// What kind of file descriptor a wake source is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WakeKind {
    /// An eventfd the kernel signals (an io_uring's completion eventfd). Every signal is a
    /// new edge, so nothing needs to reset it; its poller finds the work itself.
    EventFd,
    /// A descriptor whose owner's poller consumes every readiness it reports before the
    /// reactor sleeps (an epoll fd whose events a poller takes): a new readiness is an edge.
    Readable,
}

/// A reactor's wait set: an epoll instance (mio's `Poll`) holding its doorbell and the wake
/// sources. Registrations are edge-triggered.
pub(crate) struct WaitSet {
    poll: std::cell::RefCell<mio::Poll>,
    events: std::cell::RefCell<Events>,
    doorbell: std::sync::Arc<Doorbell>,
    sources: std::cell::RefCell<Slab<RawFd>>,
    sleeps: std::cell::Cell<u64>,
}

impl WaitSet {
    /// A wait set and the doorbell that wakes it (made before the reactor's thread starts,
    /// so senders can ring it from the first message on).
    pub(crate) fn new() -> io::Result<(WaitSet, std::sync::Arc<Doorbell>)> {
        let poll = mio::Poll::new()?;
        let doorbell = std::sync::Arc::new(Doorbell::new(&poll)?);
        let set = WaitSet {
            poll: std::cell::RefCell::new(poll),
            events: std::cell::RefCell::new(Events::with_capacity(WAIT_EVENTS_MAX)),
            doorbell: std::sync::Arc::clone(&doorbell),
            sources: std::cell::RefCell::new(Slab::new()),
            sleeps: std::cell::Cell::new(0),
        };
        Ok((set, doorbell))
    }

    fn register(&self, fd: RawFd) -> io::Result<usize> {
        let key = self.sources.borrow_mut().insert(fd);
        let registered = self.poll.borrow().registry().register(
            &mut SourceFd(&fd),
            Token(key + 1),
            Interest::READABLE,
        );
        if let Err(err) = registered {
            self.sources.borrow_mut().remove(key);
            return Err(err);
        }
        Ok(key)
    }

    fn deregister(&self, key: usize) {
        let removed = {
            let mut sources = self.sources.borrow_mut();
            sources.contains(key).then(|| sources.remove(key))
        };
        if let Some(fd) = removed {
            // A source whose fd closed first has left the epoll set already, and its number
            // may now belong to a newer source: leave that one registered.
            if self.sources.borrow().iter().any(|(_, &other)| other == fd) {
                return;
            }
            let _ = self.poll.borrow().registry().deregister(&mut SourceFd(&fd));
        }
    }

    /// Sleeps until the doorbell rings, a wake source fires, or `timeout` passes (None: no
    /// limit), unless `has_work` says there is work after the reactor said it sleeps.
    pub(crate) fn sleep(&self, timeout: Option<Duration>, has_work: impl FnOnce() -> bool) {
        self.doorbell.enter_sleep();
        if has_work() {
            self.doorbell.leave_sleep();
            return;
        }
        self.sleeps.set(self.sleeps.get() + 1);
        let mut events = self.events.borrow_mut();
        let result = self.poll.borrow_mut().poll(&mut events, timeout);
        self.doorbell.leave_sleep();
        if let Err(err) = result {
            if err.kind() != io::ErrorKind::Interrupted {
                tracing::error!(%err, "waiting on the reactor's wait set failed");
            }
        }
    }

    /// Times this reactor blocked in the kernel.
    pub(crate) fn sleeps(&self) -> u64 {
        self.sleeps.get()
    }

    /// Times other threads rang this reactor's doorbell.
    pub(crate) fn rings(&self) -> u64 {
        self.doorbell.rings.load(Ordering::Relaxed)
    }
}

/// A registered wake source; dropping it removes the fd from the reactor's wait set. Drop it
/// before closing the fd (a source dropped after its fd closed leaves alone a newer source
/// that got the same fd number).
pub struct WakeSource {
    key: usize,
    core: Weak<ReactorCore>,
}

impl std::fmt::Debug for WakeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WakeSource")
            .field("key", &self.key)
            .finish()
    }
}

impl Drop for WakeSource {
    fn drop(&mut self) {
        if let Some(core) = self.core.upgrade() {
            if let Some(wait_set) = core.wait_set.get() {
                wait_set.deregister(self.key);
            }
        }
    }
}

/// True when the calling reactor may sleep in the kernel when idle (an adaptive runtime's
/// reactor): devices that can signal an fd should then register it with
/// [`wake_source_register`] and report [`crate::PollStatus::Armed`] while they wait on it.
/// False off a reactor, in a simulation and for busy or message-sleeping reactors.
pub fn sleeps_in_kernel() -> bool {
    context::current().is_ok_and(|core| core.wait_set.get().is_some())
}

/// Adds `fd` to the calling reactor's wait set, so a sleeping reactor wakes when it signals
/// (see [`WakeKind`]). `None` when the reactor never sleeps in the kernel (see
/// [`sleeps_in_kernel`]). The fd must stay open while the returned source lives.
pub fn wake_source_register(fd: RawFd, kind: WakeKind) -> Result<Option<WakeSource>, ReactorError> {
    let _ = kind; // both kinds are edge-triggered registrations; the kind documents the contract
    let core: Rc<ReactorCore> = context::current()?;
    let Some(wait_set) = core.wait_set.get() else {
        return Ok(None);
    };
    let key = wait_set
        .register(fd)
        .map_err(|err| ReactorError::Io(format!("registering a wake source: {err}")))?;
    Ok(Some(WakeSource {
        key,
        core: Rc::downgrade(&core),
    }))
}

/// Wake-up counters of the calling reactor: (times it blocked in the kernel, times other
/// threads rang its doorbell). Zeros for a reactor that never sleeps in the kernel.
pub fn wakeup_counts() -> (u64, u64) {
    context::current().map_or((0, 0), |core| {
        core.wait_set
            .get()
            .map_or((0, 0), |set| (set.sleeps(), set.rings()))
    })
}
