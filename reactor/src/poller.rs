//! Pollers: functions a reactor calls every loop (active) or every period (timed).

use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};
use std::time::Duration;

use crate::context;
use crate::core::{LazyNow, ReactorCore};
use crate::sim::TraceKind;
use crate::ReactorError;

/// What a poller found, ordered `Idle < Waiting < Busy` (so `a.max(b)` combines two). The
/// reactor uses it to decide whether it may sleep (idle mode),
/// yield its core to the kernel (busy mode, while waiting on it), or, in a simulation, jump
/// virtual time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PollStatus {
    /// Nothing was done and nothing is outstanding.
    Idle,
    /// Nothing was done; work is outstanding in the kernel, and a wake source of this
    /// reactor (see [`crate::wake_source_register`]) fires when it completes, so an
    /// adaptive reactor may sleep until then. Other reactors treat it as `Waiting`.
    Armed,
    /// Nothing was done, but work is outstanding elsewhere (I/O in flight in the kernel): the
    /// reactor must not sleep, and may briefly yield its core so kernel workers can run.
    Waiting,
    /// Something was done (completions reaped, work submitted).
    Busy,
}

/// What one pass over a reactor's pollers found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct PollersStatus {
    /// A poller reported `Busy`.
    pub(crate) busy: bool,
    /// A poller reported `Waiting` (or `Armed`).
    pub(crate) waiting: bool,
    /// A poller reported `Waiting`: work outstanding that no wake source signals.
    pub(crate) unwakeable: bool,
}

struct PollerEntry {
    id: u64,
    name: &'static str,
    period_ns: u64,
    next_run_ns: u64,
    poll: Box<dyn FnMut() -> PollStatus>,
}

/// The pollers of one reactor. A poller registered while the pollers run joins at the end of
/// that pass; one unregistered then is skipped at once (as SPDK does) and dropped at the end
/// of the pass.
#[derive(Default)]
pub(crate) struct PollerSet {
    entries: RefCell<Vec<PollerEntry>>,
    added: RefCell<Vec<PollerEntry>>,
    removed: RefCell<Vec<u64>>,
    polling: Cell<bool>,
    next_id: Cell<u64>,
}

impl PollerSet {
    /// Runs the active pollers and the timed ones that are due; true if any reported work.
    #[inline]
    pub(crate) fn poll(&self, core: &ReactorCore, now: &LazyNow) -> PollersStatus {
        let mut entries = std::mem::take(&mut *self.entries.borrow_mut());
        self.polling.set(true);
        let mut status = PollersStatus::default();
        for entry in &mut entries {
            // A poller unregistered earlier in this pass (its handle dropped by another
            // poller, a timer or a message) must not run again: its owner has let go of it.
            if self.is_removed(entry.id) {
                continue;
            }
            if entry.period_ns != 0 {
                let now_ns = now.get(core);
                if now_ns < entry.next_run_ns {
                    continue;
                }
                entry.next_run_ns = now_ns.saturating_add(entry.period_ns);
            }
            let poll = &mut entry.poll;
            let Some(outcome) = crate::contain::contain(core, "poller", entry.name, poll) else {
                // A panicking poller is unregistered: its state is suspect, and running it
                // again would most likely panic again every pass.
                self.removed.borrow_mut().push(entry.id);
                continue;
            };
            match outcome {
                PollStatus::Idle => {}
                PollStatus::Armed => status.waiting = true,
                PollStatus::Waiting => {
                    status.waiting = true;
                    status.unwakeable = true;
                }
                PollStatus::Busy => {
                    status.busy = true;
                    if core.sim.is_some() {
                        core.trace_event(TraceKind::PollerBusy(entry.id));
                    }
                }
            }
        }
        self.polling.set(false);
        // Most passes change nothing: then the list goes straight back.
        let changed = !self.added.borrow().is_empty() || !self.removed.borrow().is_empty();
        let removed_now = if changed {
            Some(self.apply_changes(&mut entries))
        } else {
            None
        };
        let previous = std::mem::replace(&mut *self.entries.borrow_mut(), entries);
        debug_assert!(
            previous.is_empty(),
            "pollers registered behind the poll loop's back"
        );
        // What `take` left there: an empty list without an allocation, whose drop is a call
        // that does nothing (about 2 % of a qd 1 pass). Anything else is dropped as usual.
        if previous.capacity() == 0 {
            std::mem::forget(previous);
        } else {
            drop(previous);
        }
        if let Some(removed_now) = removed_now.filter(|removed| !removed.is_empty()) {
            crate::contain::contain(core, "poller drop", "", move || drop(removed_now));
        }
        status
    }

    /// True when `id` was unregistered during the pass now running.
    #[inline]
    fn is_removed(&self, id: u64) -> bool {
        let removed = self.removed.borrow();
        !removed.is_empty() && removed.contains(&id)
    }

    /// Applies pending additions and removals; returns the removed entries so the caller can
    /// drop them after releasing every borrow (their drop may unregister other pollers).
    fn apply_changes(&self, entries: &mut Vec<PollerEntry>) -> Vec<PollerEntry> {
        let mut removed_entries = Vec::new();
        let removed: Vec<u64> = std::mem::take(&mut *self.removed.borrow_mut());
        if !removed.is_empty() {
            let mut index = 0;
            while index < entries.len() {
                if removed.contains(&entries[index].id) {
                    removed_entries.push(entries.swap_remove(index));
                } else {
                    index += 1;
                }
            }
            entries.sort_by_key(|entry| entry.id);
        }
        entries.append(&mut self.added.borrow_mut());
        removed_entries
    }

    fn register(&self, entry: PollerEntry) {
        if self.polling.get() {
            self.added.borrow_mut().push(entry);
        } else {
            self.entries.borrow_mut().push(entry);
        }
    }

    fn unregister(&self, id: u64) {
        let dropped = {
            let mut added = self.added.borrow_mut();
            added
                .iter()
                .position(|entry| entry.id == id)
                .map(|index| added.remove(index))
        };
        if dropped.is_some() {
            return;
        }
        self.removed.borrow_mut().push(id);
        if !self.polling.get() {
            let mut entries = std::mem::take(&mut *self.entries.borrow_mut());
            let removed_now = self.apply_changes(&mut entries);
            *self.entries.borrow_mut() = entries;
            drop(removed_now);
        }
    }

    /// The earliest time a timed poller is due.
    pub(crate) fn next_deadline_ns(&self) -> Option<u64> {
        self.entries
            .borrow()
            .iter()
            .filter(|entry| entry.period_ns != 0)
            .map(|entry| entry.next_run_ns)
            .min()
    }

    /// Names of the registered pollers (for diagnostics).
    pub(crate) fn names(&self) -> Vec<&'static str> {
        self.entries
            .borrow()
            .iter()
            .map(|entry| entry.name)
            .collect()
    }

    /// Drops every poller (at stop).
    pub(crate) fn clear(&self) {
        let entries = std::mem::take(&mut *self.entries.borrow_mut());
        let added = std::mem::take(&mut *self.added.borrow_mut());
        drop(entries);
        drop(added);
    }
}

/// A registered poller. Dropping the handle unregisters it; [`PollerHandle::detach`] keeps it
/// for the reactor's life.
pub struct PollerHandle {
    id: u64,
    core: Weak<ReactorCore>,
}

impl PollerHandle {
    /// Keeps the poller registered until the reactor stops.
    pub fn detach(mut self) {
        self.core = Weak::new();
    }
}

impl Drop for PollerHandle {
    fn drop(&mut self) {
        if let Some(core) = self.core.upgrade() {
            core.pollers.unregister(self.id);
        }
    }
}

/// Registers `poll` on the calling reactor: every loop iteration when `period` is None, else
/// at most once per `period` (on the reactor's clock, virtual in a simulation).
pub fn poller_register(
    name: &'static str,
    period: Option<Duration>,
    poll: impl FnMut() -> PollStatus + 'static,
) -> Result<PollerHandle, ReactorError> {
    let core: Rc<ReactorCore> = context::current()?;
    let id = core.pollers.next_id.get();
    core.pollers.next_id.set(id + 1);
    let period_ns = period.map_or(0, |period| {
        u64::try_from(period.as_nanos()).unwrap_or(u64::MAX).max(1)
    });
    let next_run_ns = core.clock.now_ns().saturating_add(period_ns);
    core.pollers.register(PollerEntry {
        id,
        name,
        period_ns,
        next_run_ns,
        poll: Box::new(poll),
    });
    Ok(PollerHandle {
        id,
        core: Rc::downgrade(&core),
    })
}
