//! Timers: [`sleep`] futures on the reactor's clock, fired from a per-reactor heap.

use std::cell::{Cell, RefCell};
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::future::Future;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use crate::context;
use crate::core::{LazyNow, ReactorCore};
use crate::limits::TIMER_BATCH_MAX;
use crate::sim::TraceKind;

struct TimerEntry {
    deadline_ns: u64,
    seq: u64,
    key: usize,
}

impl PartialEq for TimerEntry {
    fn eq(&self, other: &Self) -> bool {
        (self.deadline_ns, self.seq) == (other.deadline_ns, other.seq)
    }
}
impl Eq for TimerEntry {}
impl PartialOrd for TimerEntry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for TimerEntry {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.deadline_ns, self.seq).cmp(&(other.deadline_ns, other.seq))
    }
}

/// Pending timers of one reactor, earliest first (ties in registration order). A timer is
/// live while its waker is in `wakers` under its key with its sequence number; a cancelled
/// timer's heap entry is skipped when it surfaces, and the heap is rebuilt when cancelled
/// entries outnumber live ones, so dropped sleeps neither fire nor pile up.
#[derive(Default)]
pub(crate) struct TimerHeap {
    heap: RefCell<BinaryHeap<Reverse<TimerEntry>>>,
    wakers: RefCell<slab::Slab<(u64, Waker)>>,
    seq: Cell<u64>,
}

/// Identifies one registered timer: its slot in the waker table and its sequence number.
#[derive(Debug, Clone, Copy)]
struct TimerKey {
    key: usize,
    seq: u64,
}

impl TimerHeap {
    fn insert(&self, deadline_ns: u64, waker: Waker) -> TimerKey {
        let seq = self.seq.get();
        self.seq.set(seq + 1);
        let key = self.wakers.borrow_mut().insert((seq, waker));
        let mut heap = self.heap.borrow_mut();
        heap.push(Reverse(TimerEntry {
            deadline_ns,
            seq,
            key,
        }));
        let live = self.wakers.borrow().len();
        if heap.len() > 2 * live + 64 {
            let wakers = self.wakers.borrow();
            heap.retain(|Reverse(entry)| {
                wakers
                    .get(entry.key)
                    .is_some_and(|(seq, _)| *seq == entry.seq)
            });
        }
        TimerKey { key, seq }
    }

    /// Replaces the waker of a live timer (the future moved to another waker).
    fn rewake(&self, timer: TimerKey, waker: &Waker) {
        if let Some((seq, current)) = self.wakers.borrow_mut().get_mut(timer.key) {
            if *seq == timer.seq && !current.will_wake(waker) {
                *current = waker.clone();
            }
        }
    }

    /// Forgets a timer that has not fired (its future was dropped).
    fn cancel(&self, timer: TimerKey) {
        let mut wakers = self.wakers.borrow_mut();
        if wakers
            .get(timer.key)
            .is_some_and(|(seq, _)| *seq == timer.seq)
        {
            wakers.remove(timer.key);
        }
    }

    /// Takes the waker of a heap entry if its timer is still live.
    fn take_live(&self, entry: &TimerEntry) -> Option<Waker> {
        let mut wakers = self.wakers.borrow_mut();
        if wakers
            .get(entry.key)
            .is_some_and(|(seq, _)| *seq == entry.seq)
        {
            return Some(wakers.remove(entry.key).1);
        }
        None
    }

    /// Wakes the timers due at the pass's time `now` (at most [`TIMER_BATCH_MAX`]); true if
    /// any fired. With no timer queued the clock is not read.
    #[inline]
    pub(crate) fn fire_due(&self, core: &ReactorCore, now: &LazyNow) -> bool {
        let mut fired = 0;
        let mut popped = 0;
        while popped < TIMER_BATCH_MAX {
            let entry = {
                let mut heap = self.heap.borrow_mut();
                match heap.peek() {
                    Some(Reverse(entry)) if entry.deadline_ns <= now.get(core) => heap.pop(),
                    _ => None,
                }
            };
            let Some(Reverse(entry)) = entry else { break };
            popped += 1;
            let Some(waker) = self.take_live(&entry) else {
                continue;
            };
            fired += 1;
            if core.sim.is_some() {
                core.trace_event(TraceKind::TimerFired);
            }
            crate::contain::contain(core, "timer waker", "", || waker.wake());
        }
        fired > 0
    }

    /// The earliest deadline of a live timer (cancelled entries on top are discarded).
    pub(crate) fn next_deadline_ns(&self) -> Option<u64> {
        let mut heap = self.heap.borrow_mut();
        let wakers = self.wakers.borrow();
        while let Some(Reverse(entry)) = heap.peek() {
            if wakers
                .get(entry.key)
                .is_some_and(|(seq, _)| *seq == entry.seq)
            {
                return Some(entry.deadline_ns);
            }
            heap.pop();
        }
        None
    }

    /// Timers registered and not yet fired or cancelled.
    pub(crate) fn live_count(&self) -> usize {
        self.wakers.borrow().len()
    }

    pub(crate) fn clear(&self) {
        let heap = std::mem::take(&mut *self.heap.borrow_mut());
        let wakers = std::mem::take(&mut *self.wakers.borrow_mut());
        drop(heap);
        drop(wakers);
    }
}

/// A future that completes once the reactor's clock reaches its deadline. Dropping it before
/// then cancels its timer.
pub struct Sleep {
    deadline_ns: u64,
    registered: Option<(TimerKey, Weak<ReactorCore>)>,
}

/// Completes after `duration` on the calling reactor's clock (virtual in a simulation).
/// Resolution is one loop iteration.
pub fn sleep(duration: Duration) -> Sleep {
    let duration_ns = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
    Sleep {
        deadline_ns: crate::now_ns().saturating_add(duration_ns),
        registered: None,
    }
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Ok(core) = context::current() else {
            return Poll::Ready(());
        };
        if core.clock.now_ns() >= self.deadline_ns {
            if let Some((timer, _)) = self.registered.take() {
                core.timers.cancel(timer);
            }
            return Poll::Ready(());
        }
        match &self.registered {
            Some((timer, _)) => core.timers.rewake(*timer, cx.waker()),
            None => {
                let timer = core.timers.insert(self.deadline_ns, cx.waker().clone());
                self.registered = Some((timer, Rc::downgrade(&core)));
            }
        }
        Poll::Pending
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Some((timer, core)) = self.registered.take() {
            if let Some(core) = core.upgrade() {
                core.timers.cancel(timer);
            }
        }
    }
}

/// Tells the calling reactor that something of this iteration becomes due at `deadline_ns`
/// (a simulated device's next completion). Idle sleep and the simulation's clock jumps never
/// pass it.
pub fn wake_at(deadline_ns: u64) {
    context::with_current(|core: &std::rc::Rc<ReactorCore>| {
        let hint = core
            .deadline_hint_ns
            .get()
            .map_or(deadline_ns, |current| current.min(deadline_ns));
        core.deadline_hint_ns.set(Some(hint));
    });
}
