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
    /// Bytes already moved of the FIFO's head slot (a drain in parts stopped inside it).
    head_done: usize,
}

/// What one step of [`Deferred::drain_due_in_parts`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartDone {
    /// Bytes moved by this step.
    pub moved: usize,
    /// Whether the slot is finished (completed by the step).
    pub finished: bool,
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
            head_done: 0,
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

    /// As [`Deferred::drain_due`] for a device that moves data at completion time, in parts:
    /// one pass moves at most `budget` bytes (at least one part), so what else the reactor
    /// has to do (a metadata step, a message) waits for at most that much, even behind one
    /// large request. `step(slot, from, allowance)` moves the slot's bytes from `from` (the
    /// bytes earlier passes moved), at most `allowance` of them, and says how many it moved
    /// and whether the slot is finished (then it has completed the slot itself). An
    /// unfinished slot stays at the head of the queue, in order, for the next pass.
    /// Simulated slots are moved whole (their completion time is the seed's). Returns how
    /// many slots finished, plus one if a part moved without finishing its slot (the pass
    /// did work).
    #[inline]
    pub fn drain_due_in_parts(
        &mut self,
        budget: usize,
        mut step: impl FnMut(SlotId, usize, usize) -> PartDone,
    ) -> usize {
        let mut count = 0;
        let mut spent = 0usize;
        let fifo_len = self.fifo.len();
        for _ in 0..fifo_len {
            let Some(&slot) = self.fifo.front() else {
                break;
            };
            let allowance = budget.saturating_sub(spent).max(1);
            let part = step(slot, self.head_done, allowance);
            spent = spent.saturating_add(part.moved);
            if !part.finished {
                self.head_done += part.moved;
                count += 1;
                break;
            }
            self.fifo.pop_front();
            self.head_done = 0;
            count += 1;
            if spent >= budget {
                break;
            }
        }
        if !self.timed.is_empty() {
            count += self.drain_timed(&mut |slot| {
                step(slot, 0, usize::MAX);
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
        self.head_done = 0;
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
