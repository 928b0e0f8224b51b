//! Socket readiness on a reactor: one `mio::Poll` (epoll) per reactor, polled without
//! blocking by a reactor poller on every loop pass, like SPDK's sock group poller. Sockets
//! register here and their futures park their wakers until the poller sees them ready.
//!
//! mio is edge-triggered: a source reports readable (writable) once per transition. Each
//! source keeps a `readable` / `writable` flag that the poller sets and the socket clears
//! when a non-blocking call returns `WouldBlock`; a future waits only while its flag is
//! clear, so no edge is lost. Everything here lives on one reactor thread (no locks).

use std::cell::RefCell;
use std::io;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use mio::{Events, Interest, Token};
use slab::Slab;
use spool_reactor::{
    poller_register, wake_source_register, PollStatus, PollerHandle, WakeKind, WakeSource,
};

/// Events taken from epoll per poller pass.
const EVENTS_PER_PASS: usize = 256;

/// Which direction a future waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    /// Data (or a connection, or the peer's close) to read.
    Read,
    /// Room in the send buffer.
    Write,
}

#[derive(Default)]
struct SourceState {
    readable: bool,
    writable: bool,
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
}

/// The calling reactor's readiness poller (one per reactor thread, made on first use).
pub(crate) struct Readiness {
    /// The epoll fd in the reactor's wait set, when the reactor sleeps in the kernel
    /// (declared before `poll`: it leaves the wait set before the fd closes).
    _wake_source: Option<WakeSource>,
    poll: RefCell<mio::Poll>,
    events: RefCell<Events>,
    sources: RefCell<Slab<SourceState>>,
    poller: RefCell<Option<PollerHandle>>,
}

thread_local! {
    static READINESS: RefCell<Option<Rc<Readiness>>> = const { RefCell::new(None) };
}

impl Readiness {
    /// The calling reactor's instance, registering its poller on first use.
    pub(crate) fn current() -> io::Result<Rc<Readiness>> {
        if let Some(existing) = READINESS.with(|slot| slot.borrow().clone()) {
            return Ok(existing);
        }
        let poll = mio::Poll::new()?;
        // A sleeping reactor wakes when any socket here becomes ready: the poller below
        // takes every event on each pass, so a new one is a new edge of the epoll fd.
        let wake_source = wake_source_register(poll.as_raw_fd(), WakeKind::Readable)
            .map_err(|err| io::Error::other(err.to_string()))?;
        let readiness = Rc::new(Readiness {
            _wake_source: wake_source,
            poll: RefCell::new(poll),
            events: RefCell::new(Events::with_capacity(EVENTS_PER_PASS)),
            sources: RefCell::new(Slab::new()),
            poller: RefCell::new(None),
        });
        let weak = Rc::downgrade(&readiness);
        let handle = poller_register("net-readiness", None, move || match weak.upgrade() {
            Some(readiness) => readiness.poll_once(),
            None => PollStatus::Idle,
        })
        .map_err(|err| io::Error::other(err.to_string()))?;
        *readiness.poller.borrow_mut() = Some(handle);
        READINESS.with(|slot| *slot.borrow_mut() = Some(Rc::clone(&readiness)));
        Ok(readiness)
    }

    /// Registers `source` for both directions; returns its token.
    pub(crate) fn register(&self, source: &mut impl mio::event::Source) -> io::Result<Token> {
        let key = self.sources.borrow_mut().insert(SourceState {
            // Assume ready until a call says otherwise: the first read or write just tries.
            readable: true,
            writable: true,
            ..SourceState::default()
        });
        let token = Token(key);
        let registered = self.poll.borrow().registry().register(
            source,
            token,
            Interest::READABLE | Interest::WRITABLE,
        );
        if let Err(err) = registered {
            self.sources.borrow_mut().remove(key);
            return Err(err);
        }
        Ok(token)
    }

    /// Deregisters `source` (best effort) and forgets its state.
    pub(crate) fn deregister(&self, source: &mut impl mio::event::Source, token: Token) {
        let _ = self.poll.borrow().registry().deregister(source);
        let mut sources = self.sources.borrow_mut();
        if sources.contains(token.0) {
            sources.remove(token.0);
        }
    }

    /// Marks `token` not ready in `direction` (a call returned `WouldBlock`).
    pub(crate) fn clear(&self, token: Token, direction: Direction) {
        if let Some(state) = self.sources.borrow_mut().get_mut(token.0) {
            match direction {
                Direction::Read => state.readable = false,
                Direction::Write => state.writable = false,
            }
        }
    }

    /// Ready if `token` is ready in `direction`, else parks the waker until it is.
    pub(crate) fn poll_ready(
        &self,
        token: Token,
        direction: Direction,
        cx: &mut Context<'_>,
    ) -> Poll<()> {
        let mut sources = self.sources.borrow_mut();
        let Some(state) = sources.get_mut(token.0) else {
            return Poll::Ready(()); // deregistered: the call will report the error
        };
        let (ready, waker) = match direction {
            Direction::Read => (state.readable, &mut state.read_waker),
            Direction::Write => (state.writable, &mut state.write_waker),
        };
        if ready {
            Poll::Ready(())
        } else {
            match waker {
                Some(parked) if parked.will_wake(cx.waker()) => {}
                _ => *waker = Some(cx.waker().clone()),
            }
            Poll::Pending
        }
    }

    /// One non-blocking epoll pass: sets the flags of ready sources and wakes their futures.
    fn poll_once(&self) -> PollStatus {
        let mut events = self.events.borrow_mut();
        if let Err(err) = self
            .poll
            .borrow_mut()
            .poll(&mut events, Some(Duration::ZERO))
        {
            if err.kind() == io::ErrorKind::Interrupted {
                // Ready sources may be left unread: look again next pass, not asleep.
                return PollStatus::Busy;
            }
            tracing::error!(%err, "epoll wait failed");
            return PollStatus::Idle;
        }
        // A full batch may have left events in epoll; those are no new edge for a sleeping
        // reactor, so take them next pass.
        let full = events.iter().count() >= EVENTS_PER_PASS;
        let mut woken = Vec::new();
        {
            let mut sources = self.sources.borrow_mut();
            for event in events.iter() {
                let Some(state) = sources.get_mut(event.token().0) else {
                    continue;
                };
                let hangup = event.is_read_closed() || event.is_write_closed() || event.is_error();
                if event.is_readable() || hangup {
                    state.readable = true;
                    woken.extend(state.read_waker.take());
                }
                if event.is_writable() || hangup {
                    state.writable = true;
                    woken.extend(state.write_waker.take());
                }
            }
        }
        // Woken outside the borrow: a waker may run code that registers a socket.
        let busy = !woken.is_empty() || full;
        for waker in woken {
            waker.wake();
        }
        if busy {
            PollStatus::Busy
        } else {
            PollStatus::Idle
        }
    }
}

/// Runs `call` until it does not return `WouldBlock`, waiting for readiness in between.
pub(crate) async fn retry<T, S>(
    readiness: &Readiness,
    token: Token,
    direction: Direction,
    source: &mut S,
    mut call: impl FnMut(&mut S) -> io::Result<T>,
) -> io::Result<T> {
    loop {
        std::future::poll_fn(|cx| readiness.poll_ready(token, direction, cx)).await;
        match call(source) {
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                readiness.clear(token, direction);
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}
