//! Per-volume I/O counters, SPDK's `bdev_get_iostat` figures: kept per reactor (a
//! connection's requests only touch their own reactor's table: no lock, no atomic), summed
//! over the reactors when asked.

use std::cell::RefCell;
use std::collections::HashMap;

/// Counters of one volume on one reactor (or summed). Latencies in nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoStat {
    /// Bytes read.
    pub bytes_read: u64,
    /// READ requests completed.
    pub num_read_ops: u64,
    /// Bytes written (WRITE and WRITE_ZEROES).
    pub bytes_written: u64,
    /// WRITE and WRITE_ZEROES requests completed.
    pub num_write_ops: u64,
    /// Bytes trimmed.
    pub bytes_unmapped: u64,
    /// TRIM requests completed.
    pub num_unmap_ops: u64,
    /// Sum of read latencies.
    pub read_latency_ns: u64,
    /// Longest read.
    pub max_read_latency_ns: u64,
    /// Shortest read (0: none yet).
    pub min_read_latency_ns: u64,
    /// Sum of write latencies.
    pub write_latency_ns: u64,
    /// Longest write.
    pub max_write_latency_ns: u64,
    /// Shortest write (0: none yet).
    pub min_write_latency_ns: u64,
    /// Sum of trim latencies.
    pub unmap_latency_ns: u64,
    /// Longest trim.
    pub max_unmap_latency_ns: u64,
    /// Shortest trim (0: none yet).
    pub min_unmap_latency_ns: u64,
}

/// What kind of I/O a request counts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IoKind {
    /// READ.
    Read,
    /// WRITE, WRITE_ZEROES.
    Write,
    /// TRIM.
    Unmap,
}

fn record(sum: &mut u64, max: &mut u64, min: &mut u64, latency: u64) {
    *sum += latency;
    *max = (*max).max(latency);
    *min = if *min == 0 {
        latency
    } else {
        (*min).min(latency)
    };
}

impl IoStat {
    /// Counts one successful I/O of `bytes` that took `latency_ns`.
    pub(crate) fn count(&mut self, kind: IoKind, bytes: u64, latency_ns: u64) {
        match kind {
            IoKind::Read => {
                self.bytes_read += bytes;
                self.num_read_ops += 1;
                record(
                    &mut self.read_latency_ns,
                    &mut self.max_read_latency_ns,
                    &mut self.min_read_latency_ns,
                    latency_ns,
                );
            }
            IoKind::Write => {
                self.bytes_written += bytes;
                self.num_write_ops += 1;
                record(
                    &mut self.write_latency_ns,
                    &mut self.max_write_latency_ns,
                    &mut self.min_write_latency_ns,
                    latency_ns,
                );
            }
            IoKind::Unmap => {
                self.bytes_unmapped += bytes;
                self.num_unmap_ops += 1;
                record(
                    &mut self.unmap_latency_ns,
                    &mut self.max_unmap_latency_ns,
                    &mut self.min_unmap_latency_ns,
                    latency_ns,
                );
            }
        }
    }

    /// Adds `other` (another reactor's counters) into these.
    pub fn add(&mut self, other: &IoStat) {
        let min = |a: u64, b: u64| match (a, b) {
            (0, b) => b,
            (a, 0) => a,
            (a, b) => a.min(b),
        };
        self.bytes_read += other.bytes_read;
        self.num_read_ops += other.num_read_ops;
        self.bytes_written += other.bytes_written;
        self.num_write_ops += other.num_write_ops;
        self.bytes_unmapped += other.bytes_unmapped;
        self.num_unmap_ops += other.num_unmap_ops;
        self.read_latency_ns += other.read_latency_ns;
        self.max_read_latency_ns = self.max_read_latency_ns.max(other.max_read_latency_ns);
        self.min_read_latency_ns = min(self.min_read_latency_ns, other.min_read_latency_ns);
        self.write_latency_ns += other.write_latency_ns;
        self.max_write_latency_ns = self.max_write_latency_ns.max(other.max_write_latency_ns);
        self.min_write_latency_ns = min(self.min_write_latency_ns, other.min_write_latency_ns);
        self.unmap_latency_ns += other.unmap_latency_ns;
        self.max_unmap_latency_ns = self.max_unmap_latency_ns.max(other.max_unmap_latency_ns);
        self.min_unmap_latency_ns = min(self.min_unmap_latency_ns, other.min_unmap_latency_ns);
    }
}

/// One reactor's counters, by blob id.
#[derive(Default)]
pub(crate) struct IoStats {
    by_blob: RefCell<HashMap<u64, IoStat>>,
}

impl IoStats {
    /// Counts one successful I/O on blob `id`.
    pub(crate) fn count(&self, id: u64, kind: IoKind, bytes: u64, latency_ns: u64) {
        self.by_blob
            .borrow_mut()
            .entry(id)
            .or_default()
            .count(kind, bytes, latency_ns);
    }

    /// A copy of every blob's counters.
    pub(crate) fn snapshot(&self) -> HashMap<u64, IoStat> {
        self.by_blob.borrow().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_sum_and_keep_extremes() {
        let mut a = IoStat::default();
        a.count(IoKind::Read, 4096, 10);
        a.count(IoKind::Read, 4096, 30);
        let mut b = IoStat::default();
        b.count(IoKind::Read, 8192, 5);
        b.count(IoKind::Write, 512, 7);
        a.add(&b);
        assert_eq!((a.num_read_ops, a.bytes_read), (3, 16384));
        assert_eq!(
            (
                a.min_read_latency_ns,
                a.max_read_latency_ns,
                a.read_latency_ns
            ),
            (5, 30, 45)
        );
        assert_eq!((a.num_write_ops, a.min_write_latency_ns), (1, 7));
        assert_eq!(a.num_unmap_ops, 0);
    }
}
