//! Timers: [`sleep`] futures on the reactor's clock, fired from a per-reactor heap.

use std::cell::{Cell, RefCell};
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use crate::context;
use crate::core::ReactorCore;
use crate::limits::TIMER_BATCH_MAX;
use crate::sim::TraceKind;

struct TimerEntry {
    deadline_ns: u64,
    seq: u64,
    waker: Waker,
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

/// Pending timers of one reactor, earliest first (ties in registration order).
#[derive(Default)]
pub(crate) struct TimerHeap {
    heap: RefCell<BinaryHeap<Reverse<TimerEntry>>>,
    seq: Cell<u64>,
}

impl TimerHeap {
    fn insert(&self, deadline_ns: u64, waker: Waker) {
        let seq = self.seq.get();
        self.seq.set(seq + 1);
        self.heap.borrow_mut().push(Reverse(TimerEntry {
            deadline_ns,
            seq,
            waker,
        }));
    }

    /// Wakes the timers due at `now_ns` (at most [`TIMER_BATCH_MAX`]); true if any fired.
    #[inline]
    pub(crate) fn fire_due(&self, core: &ReactorCore, now_ns: u64) -> bool {
        let mut fired = 0;
        while fired < TIMER_BATCH_MAX {
            let entry = {
                let mut heap = self.heap.borrow_mut();
                match heap.peek() {
                    Some(Reverse(entry)) if entry.deadline_ns <= now_ns => heap.pop(),
                    _ => None,
                }
            };
            let Some(Reverse(entry)) = entry else { break };
            fired += 1;
            if core.sim.is_some() {
                core.trace_event(TraceKind::TimerFired);
            }
            entry.waker.wake();
        }
        fired > 0
    }

    pub(crate) fn next_deadline_ns(&self) -> Option<u64> {
        self.heap
            .borrow()
            .peek()
            .map(|Reverse(entry)| entry.deadline_ns)
    }

    pub(crate) fn clear(&self) {
        let heap = std::mem::take(&mut *self.heap.borrow_mut());
        drop(heap);
    }
}

/// A future that completes once the reactor's clock reaches its deadline.
pub struct Sleep {
    deadline_ns: u64,
    registered: Option<Waker>,
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
            return Poll::Ready(());
        }
        let fresh = match &self.registered {
            Some(waker) => !waker.will_wake(cx.waker()),
            None => true,
        };
        if fresh {
            core.timers.insert(self.deadline_ns, cx.waker().clone());
            self.registered = Some(cx.waker().clone());
        }
        Poll::Pending
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
