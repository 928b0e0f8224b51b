//! A perf run's numbers: per core and in total. They serialise as the JSON object
//! `spool perf --json` prints (the field names are that output's contract: `ci/` scripts and
//! tests read them).

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latency figures in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyUs {
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
}

impl LatencyUs {
    /// Summarises a histogram of nanoseconds.
    pub fn of(histogram: &Histogram<u64>) -> LatencyUs {
        let us = |ns: u64| ns as f64 / 1000.0;
        if histogram.is_empty() {
            return LatencyUs {
                mean: 0.0,
                p50: 0.0,
                p99: 0.0,
                p999: 0.0,
                max: 0.0,
            };
        }
        LatencyUs {
            mean: histogram.mean() / 1000.0,
            p50: us(histogram.value_at_quantile(0.50)),
            p99: us(histogram.value_at_quantile(0.99)),
            p999: us(histogram.value_at_quantile(0.999)),
            max: us(histogram.max()),
        }
    }
}

/// One core's figures.
#[derive(Debug, Clone, Serialize)]
pub struct CoreFigures {
    /// The CPU core.
    pub core: usize,
    /// I/Os per second.
    pub iops: f64,
    /// MiB per second.
    pub mib_s: f64,
    /// Latency.
    pub lat_us: LatencyUs,
    /// I/Os completed.
    pub ops: u64,
    /// I/Os failed.
    pub errors: u64,
}

/// All cores together.
#[derive(Debug, Clone, Serialize)]
pub struct TotalFigures {
    /// I/Os per second (sum over cores).
    pub iops: f64,
    /// MiB per second.
    pub mib_s: f64,
    /// Latency over every I/O of every core.
    pub lat_us: LatencyUs,
    /// I/Os completed.
    pub ops: u64,
    /// I/Os failed.
    pub errors: u64,
}

/// The run's settings, echoed in the JSON.
#[derive(Debug, Clone, Serialize)]
pub struct RunConfig {
    /// The target as given.
    pub target: String,
    /// What the target is.
    pub kind: String,
    /// The layer measured: "bdev" or "blob" ([`Layer::name`](super::Layer::name)).
    pub layer: String,
    /// The pattern ([`RwMode::name`](super::RwMode::name)).
    pub rw: String,
    /// Read percentage (randrw).
    pub rwmix: u8,
    /// Bytes per I/O.
    pub bs: u64,
    /// In flight per core.
    pub qd: u32,
    /// Seconds.
    pub time_s: f64,
    /// Bytes the job addresses (the device, or the blob).
    pub size_bytes: u64,
}

/// One core's series for a picture of the run (`spool perf --plot`); not in the JSON.
#[derive(Debug, Clone, Default)]
pub struct CoreSeries {
    /// The CPU core.
    pub core: usize,
    /// The latency histogram: (bucket's upper bound in microseconds, percent of the core's
    /// I/Os in the bucket), buckets growing by [`LATENCY_BUCKET_GROWTH`] from 10 ns.
    pub latency: Vec<(f64, f64)>,
    /// IOPS over time: (seconds since the job started, IOPS over the period that ends then).
    pub iops: Vec<(f64, f64)>,
}

/// The ratio between the upper bounds of consecutive buckets of [`CoreSeries::latency`].
pub const LATENCY_BUCKET_GROWTH: f64 = 1.25;

impl CoreSeries {
    /// `core`'s series from its latency histogram (ns) and its timeline of (ns since start,
    /// I/Os completed by then).
    pub fn of(core: usize, histogram: &Histogram<u64>, timeline: &[(u64, u64)]) -> CoreSeries {
        let total = histogram.len().max(1) as f64;
        let latency = if histogram.is_empty() {
            Vec::new()
        } else {
            histogram
                .iter_log(10, LATENCY_BUCKET_GROWTH)
                .map(|step| {
                    (
                        step.value_iterated_to() as f64 / 1000.0,
                        step.count_since_last_iteration() as f64 * 100.0 / total,
                    )
                })
                .collect()
        };
        let iops = timeline
            .windows(2)
            .filter(|pair| pair[1].0 > pair[0].0)
            .map(|pair| {
                let ((t0, n0), (t1, n1)) = (pair[0], pair[1]);
                (
                    t1 as f64 / 1e9,
                    n1.saturating_sub(n0) as f64 / ((t1 - t0) as f64 / 1e9),
                )
            })
            .collect();
        CoreSeries {
            core,
            latency,
            iops,
        }
    }
}

/// A finished run.
#[derive(Debug, Clone, Serialize)]
pub struct PerfReport {
    /// Totals.
    pub total: TotalFigures,
    /// Per core.
    pub cores: Vec<CoreFigures>,
    /// Settings.
    pub config: RunConfig,
    /// Per core, the series `spool perf --plot` draws (left out of the JSON).
    #[serde(skip)]
    pub series: Vec<CoreSeries>,
}
