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

/// A finished run.
#[derive(Debug, Clone, Serialize)]
pub struct PerfReport {
    /// Totals.
    pub total: TotalFigures,
    /// Per core.
    pub cores: Vec<CoreFigures>,
    /// Settings.
    pub config: RunConfig,
}
