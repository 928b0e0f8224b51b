//! A perf run's numbers: per core and in total, as a table or as one JSON object.

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
    /// The layer measured: "bdev" or "blob".
    pub layer: String,
    /// The pattern.
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

impl PerfReport {
    /// The report as a table for people.
    pub fn to_table(&self) -> String {
        let config = &self.config;
        let mut out = format!(
            "spool perf: {} ({}, {} layer, {:.2} GiB), {} bs={} qd={} time={}s{}\n",
            config.target,
            config.kind,
            config.layer,
            config.size_bytes as f64 / f64::from(1u32 << 30),
            config.rw,
            config.bs,
            config.qd,
            config.time_s,
            if config.rw == "randrw" {
                format!(" rwmix={}", config.rwmix)
            } else {
                String::new()
            },
        );
        out.push_str(&format!(
            "{:>6} {:>12} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9}\n",
            "core", "IOPS", "MiB/s", "mean_us", "p50_us", "p99_us", "p99.9_us", "max_us", "ns/IO"
        ));
        for core in &self.cores {
            out.push_str(&row(
                &core.core.to_string(),
                core.iops,
                core.mib_s,
                &core.lat_us,
            ));
        }
        out.push_str(&row(
            "total",
            self.total.iops,
            self.total.mib_s,
            &self.total.lat_us,
        ));
        if self.total.errors > 0 {
            out.push_str(&format!("errors: {}\n", self.total.errors));
        }
        out
    }
}

fn row(name: &str, iops: f64, mib_s: f64, lat: &LatencyUs) -> String {
    let ns_per_io = if iops > 0.0 { 1e9 / iops } else { 0.0 };
    format!(
        "{:>6} {:>12.0} {:>10.1} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>9.1}\n",
        name, iops, mib_s, lat.mean, lat.p50, lat.p99, lat.p999, lat.max, ns_per_io
    )
}
