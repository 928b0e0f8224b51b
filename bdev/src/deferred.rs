//! Completions a memory-backed device delivers from its poller rather than inline: in FIFO
//! order at the next loop pass in production, or, under a simulation, each after a latency
//! drawn from the seed (so both latency and completion order replay from it).

use std::collections::VecDeque;

use crate::io::{IoSlots, SlotId};
use crate::limits::SIM_LATENCY_NS_MAX;

#[derive(Debug, Clone, Copy)]
struct Pending {
    ready_at_ns: u64,
    seq: u64,
    slot: SlotId,
}

/// A queue of submitted slots waiting for their (possibly simulated) completion time.
#[derive(Debug)]
pub struct Deferred {
    fifo: VecDeque<SlotId>,
    timed: Vec<Pending>,
    /// Scratch list for the due entries of one drain (kept to avoid an allocation per poll).
    due: Vec<Pending>,
    seq: u64,
    simulated: bool,
}

impl Default for Deferred {
    /// An empty queue for the calling reactor: simulated if that reactor is (decided once,
    /// here, so the I/O path does not ask per request).
    fn default() -> Self {
        Deferred {
            fifo: VecDeque::new(),
            timed: Vec::new(),
            due: Vec::new(),
            seq: 0,
            simulated: spool_reactor::is_simulated(),
        }
    }
}

impl Deferred {
    /// Queues `slot`: for the next pass, or at a seeded latency under a simulation.
    #[inline]
    pub fn push(&mut self, slot: SlotId) {
        self.push_after(slot, 0);
    }

    /// As [`Deferred::push`], with `extra_ns` added to the simulated latency (a latency
    /// spike); outside a simulation the extra time is ignored.
    #[inline]
    pub fn push_after(&mut self, slot: SlotId, extra_ns: u64) {
        if !self.simulated {
            self.fifo.push_back(slot);
            return;
        }
        match spool_reactor::sim_rng_u64() {
            None => self.fifo.push_back(slot),
            Some(draw) => {
                let ready_at_ns =
                    spool_reactor::now_ns() + draw % (SIM_LATENCY_NS_MAX + 1) + extra_ns;
                self.timed.push(Pending {
                    ready_at_ns,
                    seq: self.seq,
                    slot,
                });
                self.seq += 1;
                spool_reactor::wake_at(ready_at_ns);
            }
        }
    }

    /// Hands every slot whose time has come to `complete`, oldest first (simulated ones in
    /// order of their ready time); returns how many.
    #[inline]
    pub fn drain_due(&mut self, mut complete: impl FnMut(SlotId)) -> usize {
        let mut count = 0;
        // Bound to what was queued at entry: completions may queue more.
        let fifo_len = self.fifo.len();
        for _ in 0..fifo_len {
            let Some(slot) = self.fifo.pop_front() else {
                break;
            };
            complete(slot);
            count += 1;
        }
        if !self.timed.is_empty() {
            count += self.drain_timed(&mut complete);
        }
        count
    }

    /// As [`Deferred::drain_due`], except that the FIFO part stops once `complete` has
    /// reported `budget` bytes of work (after at least one slot; it returns each slot's
    /// bytes): a device that moves data at completion time bounds one pass's work, so what
    /// else the reactor has to do (a metadata step, a message) waits for at most that much.
    /// The rest stays queued, in order, for the next pass.
    #[inline]
    pub fn drain_due_within(
        &mut self,
        budget: usize,
        mut complete: impl FnMut(SlotId) -> usize,
    ) -> usize {
        let mut count = 0;
        let mut spent = 0usize;
        let fifo_len = self.fifo.len();
        for _ in 0..fifo_len {
            if count > 0 && spent >= budget {
                break;
            }
            let Some(slot) = self.fifo.pop_front() else {
                break;
            };
            spent = spent.saturating_add(complete(slot));
            count += 1;
        }
        if !self.timed.is_empty() {
            count += self.drain_timed(&mut |slot| {
                complete(slot);
            });
        }
        count
    }

    fn drain_timed(&mut self, complete: &mut impl FnMut(SlotId)) -> usize {
        let now_ns = spool_reactor::now_ns();
        let mut due = std::mem::take(&mut self.due);
        due.clear();
        self.timed.retain(|pending| {
            if pending.ready_at_ns <= now_ns {
                due.push(*pending);
                false
            } else {
                true
            }
        });
        due.sort_by_key(|pending| (pending.ready_at_ns, pending.seq));
        for pending in &due {
            complete(pending.slot);
        }
        if let Some(next) = self.timed.iter().map(|pending| pending.ready_at_ns).min() {
            spool_reactor::wake_at(next);
        }
        let count = due.len();
        self.due = due;
        count
    }

    /// The poll status after a drain that completed `completed` requests: `Busy` if any,
    /// `Waiting` if some wait for the next pass, else `Idle`. Simulated entries due later
    /// count as idle: they told the simulation their time with `wake_at`, so it may jump
    /// its clock to them.
    pub fn status(&self, completed: usize) -> spool_reactor::PollStatus {
        if completed > 0 {
            spool_reactor::PollStatus::Busy
        } else if self.fifo.is_empty() {
            spool_reactor::PollStatus::Idle
        } else {
            spool_reactor::PollStatus::Waiting
        }
    }

    /// Completes every slot still waiting with `-ECANCELED`, oldest first: what a channel
    /// does when it is dropped, so none of its queued requests hangs.
    pub(crate) fn cancel_all(&mut self, slots: &IoSlots) {
        let count = self.len();
        if count > 0 {
            tracing::debug!(
                count,
                "channel dropped with queued requests; cancelling them"
            );
        }
        for slot in self.fifo.drain(..) {
            slots.complete(slot, -libc::ECANCELED);
        }
        self.timed
            .sort_by_key(|pending| (pending.ready_at_ns, pending.seq));
        for pending in self.timed.drain(..) {
            slots.complete(pending.slot, -libc::ECANCELED);
        }
    }

    /// Slots still waiting.
    pub fn len(&self) -> usize {
        self.fifo.len() + self.timed.len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
