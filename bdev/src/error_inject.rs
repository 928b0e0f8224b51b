//! The error-injection bdev: a test wrapper around any device that fails chosen requests with
//! chosen errnos, and passes the others through untouched.
//!
//! Fault model: a request either fails as a whole with the errno of a rule, without reaching
//! the inner device (nothing of a failed write is stored, nothing of a failed read is read),
//! or goes to the inner device unchanged. No partial writes, torn blocks, corruption, or
//! latency are injected here; those belong to the crash device and the simulation.
//!
//! Invariants:
//! - The wrapper has the inner device's geometry, iovec alignment, supported kinds and
//!   unmap semantics; only its name is its own.
//! - Rules are kept in the order they were added, behind a `Mutex` (this is a test device;
//!   the lock is skipped while there are no rules). Every rule whose filters (kinds, range)
//!   match a request counts it, whether or not an older rule already fails it; the request
//!   fails with the errno of the oldest rule that fires. A rule fires on a matching request
//!   when it is the `nth` match (if set) and fewer than `count` requests were failed by it
//!   (if set). Decisions are taken at submission, on the submitting reactor, so under a
//!   simulation they replay from the seed.
//! - A failed request completes from the channel's poller through [`Deferred`] (never inline
//!   in `submit`); a passed request is submitted to the inner device's backend, created with
//!   the same request slots, which completes the slot itself.
//! - Counters: requests seen per kind (every request that reached the wrapper, i.e. passed
//!   channel validation) and requests failed by injection.

use std::ops::Range;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use spool_reactor::PollStatus;

use crate::deferred::Deferred;
use crate::device::{Bdev, ChannelBackend};
use crate::error::BdevError;
use crate::io::{slot_index, IoKind, IoSlots, Submission};

const KINDS: usize = 5;

/// Identifies a rule added to an [`ErrorBdev`]; ids are never reused by one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleId(u64);

#[derive(Debug, Clone, PartialEq, Eq)]
enum RangeFilter {
    Bytes(Range<u64>),
    Blocks(Range<u64>),
}

/// Which requests to fail and with what errno; built with chained filters, e.g.
/// `ErrorRule::new(-libc::EIO).kinds(&[IoKind::Write]).range_bytes(0..8192).nth(3)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorRule {
    errno: i32,
    kinds: Option<[bool; KINDS]>,
    range: Option<RangeFilter>,
    nth: Option<u64>,
    count: Option<u64>,
}

impl ErrorRule {
    /// A rule failing every request with `errno` (negative, e.g. `-libc::EIO`; a positive
    /// value is negated and 0 becomes `-EIO`, so a failed request never reports success).
    pub fn new(errno: i32) -> ErrorRule {
        let errno = match errno {
            0 => -libc::EIO,
            positive if positive > 0 => -positive,
            negative => negative,
        };
        ErrorRule {
            errno,
            kinds: None,
            range: None,
            nth: None,
            count: None,
        }
    }

    /// Restricts the rule to these kinds (an empty list matches no request).
    #[must_use]
    pub fn kinds(mut self, kinds: &[IoKind]) -> ErrorRule {
        let mut set = [false; KINDS];
        for &kind in kinds {
            set[kind as usize] = true;
        }
        self.kinds = Some(set);
        self
    }

    /// Restricts the rule to requests overlapping this byte range (a flush covers the whole
    /// device, so it overlaps any non-empty range).
    #[must_use]
    pub fn range_bytes(mut self, range: Range<u64>) -> ErrorRule {
        self.range = Some(RangeFilter::Bytes(range));
        self
    }

    /// Restricts the rule to requests overlapping this block range (as
    /// [`ErrorRule::range_bytes`], in blocks of the device).
    #[must_use]
    pub fn range_blocks(mut self, range: Range<u64>) -> ErrorRule {
        self.range = Some(RangeFilter::Blocks(range));
        self
    }

    /// Fails only the `n`th matching request (1-based, counted by this rule since it was
    /// added); `n == 0` never fires.
    #[must_use]
    pub fn nth(mut self, n: u64) -> ErrorRule {
        self.nth = Some(n);
        self
    }

    /// Fails at most `n` requests, then lets every request through (without it: forever).
    #[must_use]
    pub fn count(mut self, n: u64) -> ErrorRule {
        self.count = Some(n);
        self
    }

    /// The (negative) errno failed requests complete with.
    pub fn errno(&self) -> i32 {
        self.errno
    }

    fn matches(
        &self,
        kind: IoKind,
        offset_bytes: u64,
        len_bytes: u64,
        block_size: u64,
        size_bytes: u64,
    ) -> bool {
        if let Some(kinds) = &self.kinds {
            if !kinds[kind as usize] {
                return false;
            }
        }
        let Some(filter) = &self.range else {
            return true;
        };
        let (start, end) = match filter {
            RangeFilter::Bytes(range) => (range.start, range.end),
            RangeFilter::Blocks(range) => (
                range.start.saturating_mul(block_size),
                range.end.saturating_mul(block_size),
            ),
        };
        let (io_start, io_end) = if kind == IoKind::Flush {
            (0, size_bytes)
        } else {
            (offset_bytes, offset_bytes.saturating_add(len_bytes))
        };
        start < end && io_start < end && start < io_end
    }
}

/// What one rule has done so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RuleStats {
    /// Requests that matched the rule's filters.
    pub matched: u64,
    /// Requests the rule failed.
    pub injected: u64,
}

#[derive(Debug)]
struct ActiveRule {
    id: RuleId,
    rule: ErrorRule,
    stats: RuleStats,
}

impl ActiveRule {
    /// Counts a matching request; true if this rule fails it.
    fn fires(&mut self) -> bool {
        self.stats.matched += 1;
        let turn = self.rule.nth.is_none_or(|n| self.stats.matched == n);
        let budget = self.rule.count.is_none_or(|n| self.stats.injected < n);
        turn && budget
    }
}

#[derive(Debug, Default)]
struct Shared {
    rules: Mutex<Vec<ActiveRule>>,
    /// Rules in `rules`, readable without the lock (the fast path with no rules).
    rule_count: AtomicUsize,
    next_id: AtomicU64,
    seen: [AtomicU64; KINDS],
    injected: AtomicU64,
}

impl Shared {
    fn rules(&self) -> MutexGuard<'_, Vec<ActiveRule>> {
        // A panic while holding the lock leaves the rules consistent (each update is a
        // counter bump or a Vec edit), so a poisoned lock is still usable.
        self.rules.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts the request and returns the errno to fail it with, if any rule fires.
    fn decide(
        &self,
        kind: IoKind,
        offset_bytes: u64,
        len_bytes: u64,
        block_size: u64,
        size_bytes: u64,
    ) -> Option<i32> {
        self.seen[kind as usize].fetch_add(1, Ordering::Relaxed);
        if self.rule_count.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut verdict = None;
        for active in self.rules().iter_mut() {
            if !active
                .rule
                .matches(kind, offset_bytes, len_bytes, block_size, size_bytes)
            {
                continue;
            }
            if active.fires() && verdict.is_none() {
                active.stats.injected += 1;
                verdict = Some(active.rule.errno);
            }
        }
        if verdict.is_some() {
            self.injected.fetch_add(1, Ordering::Relaxed);
        }
        verdict
    }
}

/// A device that forwards to `inner` except for the requests its rules fail. Rules and
/// counters can be changed and read from any thread at any time.
pub struct ErrorBdev {
    name: String,
    inner: Arc<dyn Bdev>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ErrorBdev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ErrorBdev")
            .field("name", &self.name)
            .field("inner", &self.inner.name())
            .field("rules", &self.shared.rule_count.load(Ordering::Relaxed))
            .field("injected", &self.injected_count())
            .finish()
    }
}

impl ErrorBdev {
    /// Wraps `inner` under the name `name`, with no rules (every request passes through).
    pub fn new(name: impl Into<String>, inner: Arc<dyn Bdev>) -> ErrorBdev {
        ErrorBdev {
            name: name.into(),
            inner,
            shared: Arc::new(Shared::default()),
        }
    }

    /// The wrapped device.
    pub fn inner(&self) -> &Arc<dyn Bdev> {
        &self.inner
    }

    /// Adds `rule` after the existing ones; it applies to requests submitted from now on.
    pub fn add_rule(&self, rule: ErrorRule) -> RuleId {
        let id = RuleId(self.shared.next_id.fetch_add(1, Ordering::Relaxed));
        let mut rules = self.shared.rules();
        rules.push(ActiveRule {
            id,
            rule,
            stats: RuleStats::default(),
        });
        self.shared.rule_count.store(rules.len(), Ordering::Release);
        id
    }

    /// Removes the rule `id`; false if it is not there (already removed or cleared).
    pub fn remove_rule(&self, id: RuleId) -> bool {
        let mut rules = self.shared.rules();
        let before = rules.len();
        rules.retain(|active| active.id != id);
        self.shared.rule_count.store(rules.len(), Ordering::Release);
        rules.len() != before
    }

    /// Removes every rule: from now on every request passes through.
    pub fn clear_rules(&self) {
        let mut rules = self.shared.rules();
        rules.clear();
        self.shared.rule_count.store(0, Ordering::Release);
    }

    /// What the rule `id` has matched and failed so far; `None` once it is removed.
    pub fn rule_stats(&self, id: RuleId) -> Option<RuleStats> {
        self.shared
            .rules()
            .iter()
            .find(|active| active.id == id)
            .map(|active| active.stats)
    }

    /// Requests failed by injection since the device was built (all rules, removed included).
    pub fn injected_count(&self) -> u64 {
        self.shared.injected.load(Ordering::Relaxed)
    }

    /// Requests of `kind` that reached this device (failed or passed) since it was built.
    pub fn seen_count(&self, kind: IoKind) -> u64 {
        self.shared.seen[kind as usize].load(Ordering::Relaxed)
    }
}

impl Bdev for ErrorBdev {
    fn name(&self) -> &str {
        &self.name
    }

    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }

    fn block_count(&self) -> u64 {
        self.inner.block_count()
    }

    fn iov_len_align(&self) -> u32 {
        self.inner.iov_len_align()
    }

    fn supports(&self, kind: IoKind) -> bool {
        self.inner.supports(kind)
    }

    fn unmap_reads_zeroes(&self) -> bool {
        self.inner.unmap_reads_zeroes()
    }

    fn create_channel(&self, slots: Rc<IoSlots>) -> Result<Box<dyn ChannelBackend>, BdevError> {
        let inner = self.inner.create_channel(Rc::clone(&slots))?;
        let block_size = u64::from(self.inner.block_size());
        Ok(Box::new(ErrorChannel {
            slots,
            inner,
            shared: Arc::clone(&self.shared),
            block_size,
            size_bytes: block_size.saturating_mul(self.inner.block_count()),
            failed: Deferred::default(),
            errnos: Vec::new(),
        }))
    }
}

struct ErrorChannel {
    /// The channel's table (shared with the inner backend), to fail requests from the poller.
    slots: Rc<IoSlots>,
    inner: Box<dyn ChannelBackend>,
    shared: Arc<Shared>,
    block_size: u64,
    size_bytes: u64,
    /// Requests failed by a rule, waiting for their completion turn.
    failed: Deferred,
    /// The errno of each failed slot, indexed by slot id.
    errnos: Vec<i32>,
}

impl ChannelBackend for ErrorChannel {
    fn submit(&mut self, io: Submission<'_>) {
        let (kind, offset_bytes, len_bytes) = (io.kind(), io.offset_bytes(), io.len_bytes());
        let verdict = self.shared.decide(
            kind,
            offset_bytes,
            len_bytes,
            self.block_size,
            self.size_bytes,
        );
        match verdict {
            Some(errno) => {
                let Some(slot) = io.accept(&self.slots) else {
                    return;
                };
                let index = slot_index(slot);
                if self.errnos.len() <= index {
                    self.errnos.resize(index + 1, -libc::EIO);
                }
                self.errnos[index] = errno;
                self.failed.push(slot);
            }
            None => self.inner.submit(io),
        }
    }

    fn poll(&mut self) -> PollStatus {
        let inner = self.inner.poll();
        if self.failed.is_empty() {
            return inner;
        }
        let (errnos, slots) = (&self.errnos, &self.slots);
        let completed = self.failed.drain_due(|slot| {
            let errno = errnos.get(slot_index(slot)).copied().unwrap_or(-libc::EIO);
            slots.complete(slot, errno);
        });
        inner.max(self.failed.status(completed))
    }
}

impl Drop for ErrorChannel {
    /// Requests failed by a rule and still queued complete with -ECANCELED; the inner
    /// channel, dropped next, cancels its own.
    fn drop(&mut self) {
        self.failed.cancel_all(&self.slots);
    }
}
