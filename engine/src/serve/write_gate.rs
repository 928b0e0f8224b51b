//! Read-modify-write without lost writes. A request that is not aligned to the io_unit (from
//! a client that did not agree to the block sizes) is served by reading the io_units around
//! it, patching them and writing them back; any write to those io_units in between, from
//! this or another connection or reactor, would be undone. So per volume, a read-modify-
//! write runs alone: it waits for the aligned writes in flight to finish, runs with no other
//! read-modify-write, and aligned writes wait while one is pending.
//!
//! The aligned write path pays nothing until a volume sees its first unaligned write: until
//! then it only counts its writes in a per-reactor counter (a `Cell`). The first
//! read-modify-write switches the volume to counted writes (two atomic operations each) and,
//! before going on, waits on every reactor for the writes that started uncounted.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::time::Duration;

use spool_reactor::sleep;

use super::local::ReactorServe;

/// How long a waiter sleeps between looks (waiting is rare: only around unaligned writes).
const POLL: Duration = Duration::from_micros(20);

const NEVER: u8 = 0;
const SWITCHING: u8 = 1;
const COUNTED: u8 = 2;

/// One volume's write gate.
#[derive(Default)]
pub(crate) struct WriteGate {
    mode: AtomicU8,
    counted_writes: AtomicUsize,
    rmw_pending: AtomicUsize,
    rmw_running: AtomicBool,
}

/// An aligned write in flight; counted out when dropped.
pub(crate) enum WriteGuard<'a> {
    /// Counted on this reactor only (the volume never saw a read-modify-write).
    Local(std::rc::Rc<ReactorServe>),
    /// Counted on the volume.
    Counted(&'a WriteGate),
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        match self {
            WriteGuard::Local(state) => {
                state
                    .uncounted_writes
                    .set(state.uncounted_writes.get().saturating_sub(1));
            }
            WriteGuard::Counted(gate) => {
                gate.counted_writes.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

/// A read-modify-write running alone on its volume.
pub(crate) struct RmwGuard<'a>(&'a WriteGate);

impl Drop for RmwGuard<'_> {
    fn drop(&mut self) {
        self.0.rmw_running.store(false, Ordering::SeqCst);
        self.0.rmw_pending.fetch_sub(1, Ordering::SeqCst);
    }
}

impl WriteGate {
    /// Admits an aligned write (waiting while a read-modify-write is pending).
    pub(crate) async fn write(&self, state: &std::rc::Rc<ReactorServe>) -> WriteGuard<'_> {
        if self.mode.load(Ordering::Acquire) == NEVER {
            state.uncounted_writes.set(state.uncounted_writes.get() + 1);
            return WriteGuard::Local(std::rc::Rc::clone(state));
        }
        loop {
            while self.rmw_pending.load(Ordering::SeqCst) > 0 {
                sleep(POLL).await;
            }
            self.counted_writes.fetch_add(1, Ordering::SeqCst);
            if self.rmw_pending.load(Ordering::SeqCst) == 0 {
                return WriteGuard::Counted(self);
            }
            self.counted_writes.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Waits until a read-modify-write may run alone, and holds that until dropped.
    pub(crate) async fn read_modify_write(&self) -> RmwGuard<'_> {
        self.switch_to_counted().await;
        self.rmw_pending.fetch_add(1, Ordering::SeqCst);
        while self.counted_writes.load(Ordering::SeqCst) > 0 {
            sleep(POLL).await;
        }
        while self
            .rmw_running
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            sleep(POLL).await;
        }
        RmwGuard(self)
    }

    async fn switch_to_counted(&self) {
        match self
            .mode
            .compare_exchange(NEVER, SWITCHING, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => {
                // Writes that started uncounted finish first, on every reactor.
                let reactors = ReactorServe::current()
                    .map(|state| state.shared.reactors.clone())
                    .unwrap_or_default();
                for reactor in reactors {
                    let drained = spool_reactor::spawn_on(reactor, || async {
                        if let Some(state) = ReactorServe::current() {
                            while state.uncounted_writes.get() > 0 {
                                sleep(POLL).await;
                            }
                        }
                    });
                    if let Ok(drained) = drained {
                        let _ = drained.await;
                    }
                }
                self.mode.store(COUNTED, Ordering::SeqCst);
            }
            Err(_) => {
                while self.mode.load(Ordering::SeqCst) != COUNTED {
                    sleep(POLL).await;
                }
            }
        }
    }
}
