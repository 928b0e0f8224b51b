//! What each reactor of the daemon keeps for its connections: the exports, its channel to
//! the store, its buffer cache and its stop notice. One instance per reactor thread,
//! installed at start by a broadcast and removed at shutdown (before the store unloads, so
//! no channel outlives it). Everything here is used from its own reactor only: no locks.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};

use slab::Slab;
use spool_blob::BlobChannel;

use super::buffers::BufferCache;
use super::shared::DaemonShared;
use super::volumes::ExportSet;

/// One reactor's share of the daemon.
pub(crate) struct ReactorServe {
    exports: RefCell<Arc<ExportSet>>,
    /// Daemon-wide counters and settings.
    pub(crate) shared: Arc<DaemonShared>,
    /// DMA buffers for requests.
    pub(crate) buffers: BufferCache,
    /// This reactor's I/O counters per volume.
    pub(crate) iostats: super::iostat::IoStats,
    /// Aligned writes in flight here on volumes that never saw a read-modify-write.
    pub(crate) uncounted_writes: Cell<usize>,
    channel: RefCell<Option<BlobChannel>>,
    stopping: Cell<bool>,
    stop_wakers: RefCell<Slab<std::task::Waker>>,
}

thread_local! {
    static SERVE: RefCell<Option<Rc<ReactorServe>>> = const { RefCell::new(None) };
}

impl ReactorServe {
    /// Installs this reactor's state (replacing any earlier one).
    pub(crate) fn install(exports: Arc<ExportSet>, shared: Arc<DaemonShared>) {
        let state = ReactorServe::new(exports, shared);
        SERVE.with(|slot| *slot.borrow_mut() = Some(state));
    }

    /// A reactor's state, not installed (the simulation's byte-pipe server keeps its own:
    /// its reactors share one thread, so one thread-local slot cannot tell them apart).
    pub(crate) fn new(exports: Arc<ExportSet>, shared: Arc<DaemonShared>) -> Rc<ReactorServe> {
        Rc::new(ReactorServe {
            exports: RefCell::new(exports),
            shared,
            buffers: BufferCache::default(),
            iostats: super::iostat::IoStats::default(),
            uncounted_writes: Cell::new(0),
            channel: RefCell::new(None),
            stopping: Cell::new(false),
            stop_wakers: RefCell::new(Slab::new()),
        })
    }

    /// This reactor's state, if the daemon runs here.
    pub(crate) fn current() -> Option<Rc<ReactorServe>> {
        SERVE.with(|slot| slot.borrow().clone())
    }

    /// Removes this reactor's state; its channel closes once the last connection that holds
    /// the state is gone (the daemon waits for that first).
    pub(crate) fn remove() {
        let state = SERVE.with(|slot| slot.borrow_mut().take());
        if let Some(state) = state {
            state.channel.borrow_mut().take();
        }
    }

    /// The exported volumes now (a connection keeps the set it started with).
    pub(crate) fn exports(&self) -> Arc<ExportSet> {
        Arc::clone(&self.exports.borrow())
    }

    /// Replaces the exported volumes (connections already serving a volume keep it).
    #[allow(dead_code)]
    pub(crate) fn set_exports(&self, exports: Arc<ExportSet>) {
        *self.exports.borrow_mut() = exports;
    }

    /// This reactor's channel to the store (opened on first use).
    pub(crate) fn channel(&self) -> spool_blob::Result<BlobChannel> {
        if let Some(channel) = self.channel.borrow().as_ref() {
            return Ok(channel.clone());
        }
        let exports = self.exports();
        let volume = exports.volumes.first().ok_or_else(|| {
            spool_blob::BlobError::InvalidArgument("no volume is exported".into())
        })?;
        let channel = volume.io.channel()?;
        *self.channel.borrow_mut() = Some(channel.clone());
        Ok(channel)
    }

    /// Forgets this reactor's channel (its store was destroyed; the next use opens one to
    /// the store of the volumes exported then).
    pub(crate) fn reset_channel(&self) {
        self.channel.borrow_mut().take();
    }

    /// Whether the daemon is stopping (set on every reactor by [`Self::fire_stop`]).
    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.get()
    }

    /// Marks the daemon stopping on this reactor and wakes everything that waits for it.
    pub(crate) fn fire_stop(&self) {
        self.stopping.set(true);
        let wakers: Vec<_> = self.stop_wakers.borrow_mut().drain().collect();
        for waker in wakers {
            waker.wake();
        }
    }

    /// Resolves once the daemon is stopping.
    pub(crate) fn stopped(self: &Rc<Self>) -> StopNotice {
        StopNotice {
            state: Rc::clone(self),
            key: None,
        }
    }
}

/// The future of [`ReactorServe::stopped`]; cancel-safe (dropping it unregisters it).
pub(crate) struct StopNotice {
    state: Rc<ReactorServe>,
    key: Option<usize>,
}

impl Future for StopNotice {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.state.stopping.get() {
            return Poll::Ready(());
        }
        let key = self.key;
        let mut wakers = self.state.stop_wakers.borrow_mut();
        match key.and_then(|key| wakers.get_mut(key)) {
            Some(parked) => {
                if !parked.will_wake(cx.waker()) {
                    *parked = cx.waker().clone();
                }
            }
            None => {
                let key = wakers.insert(cx.waker().clone());
                drop(wakers);
                self.key = Some(key);
            }
        }
        Poll::Pending
    }
}

impl Drop for StopNotice {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            let mut wakers = self.state.stop_wakers.borrow_mut();
            if wakers.contains(key) {
                wakers.remove(key);
            }
        }
    }
}
