//! What the metadata reactor knows about durability: which metadata writes a completed flush
//! covers, and what is released only once a flush has made the write that dropped it durable.
//!
//! The ordering rule (docs/blob.md, "Write ordering"): a device may keep any subset of the
//! writes not yet covered by a flush, so
//! - a write that makes something reachable (a root page, an extent page rewritten in place)
//!   follows a flush that covers everything it depends on (data it maps, pages it names, the
//!   other blobs' roots its operation wrote before it);
//! - a cluster or md page goes back to the free pool only once the write that dropped it is
//!   covered by a completed flush, and a cluster is known to read zeros only once its unmap is.
//!
//! Every metadata write is counted at completion ([`Durability::wrote`]); a flush records the
//! count when it is submitted and, once it completes, everything up to that count is durable.
//! Releases whose flush failed wait in a queue that the next successful flush drains, so an
//! error after an operation's commit point never loses or double-hands a cluster.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;

/// Something to give back once a flush covers the write that dropped it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Release {
    /// A data cluster; `unmapped` when its unmap completed (it reads zeros once durable).
    Cluster { cluster: u32, unmapped: bool },
    /// A metadata page.
    MdPage(u32),
}

/// Write and flush counters, and the releases waiting for a flush.
#[derive(Debug, Default)]
pub(crate) struct Durability {
    /// Metadata writes completed so far (each gets the next number).
    written: Cell<u64>,
    /// The highest write number a completed flush covers.
    durable: Cell<u64>,
    /// Flushes submitted so far (each gets the next number).
    flushes_started: Cell<u64>,
    /// Releases in queue order, each with the number of flushes started when it was queued:
    /// a flush with a higher number covers it.
    queued: RefCell<VecDeque<(u64, Release)>>,
    /// Test support: skip the ordering flushes (the crash harness's self-test plants this
    /// bug and must catch it).
    pub(crate) skip_barriers: Cell<bool>,
    /// Test support: never grow the root superset ahead of a create (the bounded
    /// recovery's crash tests plant this bug and must catch it).
    pub(crate) skip_superset: Cell<bool>,
}

impl Durability {
    /// Records a completed metadata write; returns its number.
    pub(crate) fn wrote(&self) -> u64 {
        let n = self.written.get() + 1;
        self.written.set(n);
        n
    }

    /// The number of the last metadata write completed so far.
    pub(crate) fn last_write(&self) -> u64 {
        self.written.get()
    }

    /// Whether write number `n` is covered by a completed flush.
    pub(crate) fn is_durable(&self, n: u64) -> bool {
        n <= self.durable.get()
    }

    /// Whether any metadata write is not yet covered by a completed flush.
    pub(crate) fn any_unflushed(&self) -> bool {
        self.written.get() > self.durable.get()
    }

    /// Called as a flush is submitted: `(its number, the writes it covers)`.
    pub(crate) fn flush_started(&self) -> (u64, u64) {
        let n = self.flushes_started.get() + 1;
        self.flushes_started.set(n);
        (n, self.written.get())
    }

    /// Called when flush `number` (covering writes up to `covers`) succeeded: returns the
    /// releases it makes safe, in queue order.
    pub(crate) fn flush_done(&self, number: u64, covers: u64) -> Vec<Release> {
        self.durable.set(self.durable.get().max(covers));
        let mut queued = self.queued.borrow_mut();
        let mut ready = Vec::new();
        while queued.front().is_some_and(|&(stamp, _)| stamp < number) {
            if let Some((_, release)) = queued.pop_front() {
                ready.push(release);
            }
        }
        ready
    }

    /// Queues `release` for the next flush that starts from now on.
    pub(crate) fn queue(&self, release: Release) {
        self.queued
            .borrow_mut()
            .push_back((self.flushes_started.get(), release));
    }

    /// Releases still waiting for a flush.
    pub(crate) fn queued_len(&self) -> usize {
        self.queued.borrow().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flush_covers_only_what_completed_before_it_started() {
        let d = Durability::default();
        let first = d.wrote();
        let (flush, covers) = d.flush_started();
        let second = d.wrote();
        d.queue(Release::MdPage(7));
        assert!(
            d.flush_done(flush, covers).is_empty(),
            "queued after the flush started"
        );
        assert!(d.is_durable(first));
        assert!(!d.is_durable(second));
        assert!(d.any_unflushed());
        let (flush, covers) = d.flush_started();
        assert_eq!(d.flush_done(flush, covers), vec![Release::MdPage(7)]);
        assert!(d.is_durable(second));
        assert_eq!(d.queued_len(), 0);
    }
}
