//! The perf runner behind `spool perf` (SPDK bdevperf's job): a fixed-depth I/O job on every
//! chosen core against one target, reported as IOPS, bandwidth and latency percentiles per
//! core and in total; or, with [`Layer::Md`], the blobstore's metadata rates.
//!
//! The caller (the `spool` command line) turns its arguments into a [`PerfConfig`], runs
//! [`run`] or [`run_metadata`], watches the run through [`PerfEvent`]s and prints the
//! [`PerfReport`] or [`MetadataReport`]; nothing here prints.
//!
//! - `worker`: one core's job (`qd` requests in flight, latencies in a histogram).
//! - `blob_layer`: the store and the thick blob that [`Layer::Blob`] measures through.
//! - [`metadata`]: [`Layer::Md`], metadata rates and load times.
//! - [`report`]: the figures, serialisable as the JSON `spool perf --json` prints.
//! - [`snapshot_load`]: [`Layer::Snap`], snapshot call latency and write pause under load.

mod blob_layer;
pub mod metadata;
pub mod report;
pub mod snapshot_load;
mod worker;

pub use crate::perf::metadata::MetadataReport;
pub use crate::perf::report::PerfReport;
pub use crate::perf::snapshot_load::SnapshotLoadReport;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use spool_bdev::BdevDesc;
use spool_blob::format::layout::LayoutError;
use spool_reactor::{IdleMode, Runtime, RuntimeOptions};

use crate::perf::report::{CoreFigures, CoreSeries, LatencyUs, RunConfig, TotalFigures};
use crate::perf::worker::{run_core, CoreResult, JobConfig, JobTarget};
use crate::signals::stop_requested;
use crate::target::{open_target, TargetOptions, TargetSpec};
use crate::EngineError;

/// Which layer a run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    /// The bdev: I/O straight to the device.
    Bdev,
    /// The blobstore: a store is initialised on the target and the job runs on one thick
    /// blob over all of it (the target's contents are replaced).
    Blob,
    /// Metadata rates (see [`run_metadata`]; the target's contents are replaced).
    Md,
    /// Snapshot call latency and write pause under random writes (see [`snapshot_load`];
    /// the target's contents are replaced).
    Snap,
}

impl Layer {
    /// The layer's name as the command line spells it.
    pub fn name(self) -> &'static str {
        match self {
            Layer::Bdev => "bdev",
            Layer::Blob => "blob",
            Layer::Md => "md",
            Layer::Snap => "snap",
        }
    }
}

/// The I/O pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RwMode {
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random mix of reads and writes (see [`PerfConfig::rwmix`]).
    Randrw,
}

impl RwMode {
    /// The fio name of the pattern.
    pub fn name(self) -> &'static str {
        match self {
            RwMode::Randread => "randread",
            RwMode::Randwrite => "randwrite",
            RwMode::Read => "read",
            RwMode::Write => "write",
            RwMode::Randrw => "randrw",
        }
    }

    /// Whether the pattern is sequential.
    pub fn is_sequential(self) -> bool {
        matches!(self, RwMode::Read | RwMode::Write)
    }
}

/// What to run: a perf job's settings, parsed.
#[derive(Debug, Clone)]
pub struct PerfConfig {
    /// The target as given: `null`, `malloc:SIZE` or a path (see [`TargetSpec::parse`]).
    pub target: String,
    /// How to open it (size of a null device or of a file to create, block size, io_uring
    /// settings).
    pub target_options: TargetOptions,
    /// What to measure.
    pub layer: Layer,
    /// Cluster size of the store [`Layer::Blob`] and [`Layer::Md`] create.
    pub cluster_size: u64,
    /// Blobs per phase of [`Layer::Md`].
    pub blobs: u64,
    /// Snapshots [`Layer::Snap`] counts (it takes one more first).
    pub snapshots: u64,
    /// Milliseconds between one snapshot call's return and the next call ([`Layer::Snap`]).
    pub snap_gap_ms: u64,
    /// The I/O pattern.
    pub rw: RwMode,
    /// Percentage of reads for [`RwMode::Randrw`] (0 to 100).
    pub rwmix: u8,
    /// Bytes per I/O (a multiple of the device block size).
    pub bs: u64,
    /// I/Os in flight per core.
    pub qd: u32,
    /// Seconds to run (above 0, at most 86400).
    pub time_s: f64,
    /// The cores to run reactors on ([`Layer::Md`] uses the first).
    pub cores: Vec<usize>,
    /// Seed of the random offsets (the same seed gives the same offset sequence).
    pub seed: u64,
}

impl Default for PerfConfig {
    /// `spool perf`'s defaults: 4 KiB random reads at depth 32 for 10 s on core 0 of
    /// `spool-perf.img`, measured at the bdev.
    fn default() -> Self {
        PerfConfig {
            target: "spool-perf.img".into(),
            target_options: TargetOptions::default(),
            layer: Layer::Bdev,
            cluster_size: 1 << 20,
            blobs: 10_000,
            snapshots: 20,
            snap_gap_ms: 20,
            rw: RwMode::Randread,
            rwmix: 70,
            bs: 4096,
            qd: 32,
            time_s: 10.0,
            cores: vec![0],
            seed: 0x5EED,
        }
    }
}

/// What a run tells its caller while it goes.
#[derive(Debug, Clone)]
pub enum PerfEvent {
    /// The target is a missing file: it is created now, `bytes` long and fully written
    /// (this can take a while).
    Creating {
        /// The file.
        path: PathBuf,
        /// Its size.
        bytes: u64,
    },
    /// The jobs are running (about every 250 ms until the run's time is up or a stop signal
    /// arrives).
    Progress {
        /// Time since the jobs started.
        elapsed: Duration,
        /// I/Os completed so far, all cores together (each core publishes its count every
        /// 100 ms).
        ops: u64,
    },
}

/// How long past its deadline a job may take before its completion counts as lost.
const GRACE: Duration = Duration::from_secs(60);

/// How often [`run`] reports [`PerfEvent::Progress`].
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Fails with [`EngineError::Stopped`] (saying `done()`) when a stop signal has arrived: the
/// check a long phase makes between two steps.
pub(crate) fn stop_point(done: impl FnOnce() -> String) -> Result<(), EngineError> {
    match stop_requested() {
        Some(signal) => Err(EngineError::Stopped {
            signal,
            done: done(),
            report: None,
        }),
        None => Ok(()),
    }
}

/// Refuses, before a missing target file is made (so a refused job leaves no file behind),
/// what the job would be refused for once it is: a `--size` under one block, and for an I/O
/// job (`io_job`) a `--bs` that is not a whole number of blocks or is larger than the file
/// would be. An existing target, or a block size `open_target` refuses, is left to the
/// checks after opening.
pub(crate) fn refuse_before_creating(
    spec: &TargetSpec,
    config: &PerfConfig,
    io_job: bool,
) -> Result<(), EngineError> {
    let block = u64::from(config.target_options.block_size);
    // A null device of `--size` too: one under a block has no block to do I/O on.
    if matches!(spec, TargetSpec::Null)
        && block.is_power_of_two()
        && block >= 512
        && config.target_options.size_bytes < block
    {
        return Err(EngineError::InvalidArgument(format!(
            "null: --size {} is smaller than one block of {block} bytes: a null device needs at least one block",
            config.target_options.size_bytes
        )));
    }
    let TargetSpec::Path(path) = spec else {
        return Ok(());
    };
    if path.symlink_metadata().is_ok() || !block.is_power_of_two() || block < 512 {
        return Ok(());
    }
    let size = config.target_options.size_bytes;
    if size < block {
        return Err(EngineError::InvalidArgument(format!(
            "{}: --size {size} is smaller than one block of {block} bytes: a target file needs at least one block",
            path.display()
        )));
    }
    let device = size / block * block;
    check_store_fits(config, device)?;
    let bs = config.bs;
    if io_job && (bs == 0 || !bs.is_multiple_of(block) || bs > device) {
        return Err(EngineError::InvalidArgument(format!(
            "--bs {bs} must be a multiple of the block size {block} and at most the device size {device}"
        )));
    }
    Ok(())
}

/// The metadata pages a `--layer md` store of `blobs` blobs gets (one per blob, plus room).
pub(crate) fn md_pages_for(blobs: u64) -> Result<u32, EngineError> {
    u32::try_from(blobs.saturating_add(64)).map_err(|_| {
        EngineError::InvalidArgument(format!(
            "--blobs {blobs} is more than a store can have metadata pages for: give fewer --blobs"
        ))
    })
}

/// Refuses, before anything is written, the store settings a device of `device_bytes` cannot
/// take for `config.layer` (a bad argument, exit 2), naming the option to change. The bdev
/// layer makes no store: nothing to check.
pub(crate) fn check_store_fits(config: &PerfConfig, device_bytes: u64) -> Result<(), EngineError> {
    let md_pages = match config.layer {
        Layer::Bdev => return Ok(()),
        Layer::Md => Some(md_pages_for(config.blobs)?),
        Layer::Blob | Layer::Snap => None,
    };
    let cluster = config.cluster_size;
    let bad = |reason: String| Err(EngineError::InvalidArgument(reason));
    match spool_blob::format::layout::Layout::compute(device_bytes, cluster, md_pages) {
        Ok(layout) if layout.md_clusters >= layout.total_clusters => bad(format!(
            "--cluster-size {cluster} leaves no cluster for data on the {device_bytes}-byte target (its metadata takes all {}): give a smaller --cluster-size or a larger target",
            layout.total_clusters
        )),
        // `--layer md` ends with I/O phases on blobs of a third of the free clusters, at
        // least one per I/O in flight: found now, not after the metadata phases have run.
        Ok(layout)
            if md_pages.is_some()
                && (layout.total_clusters - layout.md_clusters) / 3 < metadata::IO_QD =>
        {
            bad(format!(
                "--layer md needs at least {} clusters for data (its I/O phases), the {device_bytes}-byte target leaves {} of {cluster} bytes: give a larger target (or a smaller --cluster-size)",
                metadata::IO_QD * 3,
                layout.total_clusters - layout.md_clusters
            ))
        }
        Ok(_) => Ok(()),
        Err(LayoutError::ClusterSize(_)) => bad(format!(
            "--cluster-size {cluster} is not a multiple of 4096 bytes: give one (e.g. 1M)"
        )),
        Err(LayoutError::TooSmall { .. }) => bad(format!(
            "--cluster-size {cluster} is larger than the {device_bytes}-byte target: give a smaller --cluster-size (or a larger target)"
        )),
        Err(LayoutError::MetadataTooLarge {
            md_clusters,
            total_clusters,
        }) => match md_pages {
            Some(_) => bad(format!(
                "--blobs {} needs {md_clusters} clusters of metadata, the target has {total_clusters} of {cluster} bytes: give fewer --blobs (or a larger target)",
                config.blobs
            )),
            None => bad(format!(
                "--cluster-size {cluster}: the metadata needs {md_clusters} clusters, the target has {total_clusters}: give a larger --cluster-size (or a larger target)"
            )),
        },
        Err(LayoutError::TooLarge(reason)) => bad(format!("--cluster-size {cluster}: {reason}")),
    }
}

fn run_failed(reason: String, errno: i32) -> EngineError {
    EngineError::Failed { reason, errno }
}

/// Runs a bdev or blob layer job as `config` says, telling `events` how it goes; the report,
/// or the first error.
///
/// Bad settings are [`EngineError::InvalidArgument`]. A stop signal ends the run early with
/// [`EngineError::Stopped`], and a failed I/O ends it with [`EngineError::IoFailed`]; both
/// carry the report of what was measured.
pub fn run(
    config: &PerfConfig,
    events: &mut dyn FnMut(PerfEvent),
) -> Result<PerfReport, EngineError> {
    if !(config.time_s > 0.0 && config.time_s <= 86_400.0) {
        return Err(EngineError::InvalidArgument(format!(
            "--time {} must be above 0 and at most 86400 seconds",
            config.time_s
        )));
    }
    let bs = config.bs;
    let spec = TargetSpec::parse(&config.target)?;
    refuse_before_creating(&spec, config, true)?;
    if let TargetSpec::Path(path) = &spec {
        if !path.exists() {
            events(PerfEvent::Creating {
                path: path.clone(),
                bytes: config.target_options.size_bytes,
            });
        }
    }
    // A path stays locked (created locked when missing) while `target` lives.
    let target = open_target(&spec, &config.target_options)?;
    let desc = BdevDesc::open(Arc::clone(&target.bdev))?;
    check_store_fits(config, desc.size_bytes())?;
    let block_size = u64::from(desc.block_size());
    if bs == 0 || !bs.is_multiple_of(block_size) || bs > desc.size_bytes() {
        return Err(EngineError::InvalidArgument(format!(
            "--bs {bs} must be a multiple of the block size {block_size} and at most the device size {}",
            desc.size_bytes()
        )));
    }
    let runtime = Runtime::start(&RuntimeOptions {
        cores: config.cores.clone(),
        idle: IdleMode::Busy,
        pin: true,
    })?;
    let duration_ns = (config.time_s * 1e9) as u64;
    let md_reactor = runtime.reactors()[0];
    let (target_of_jobs, region_bytes) = match config.layer {
        Layer::Bdev => (JobTarget::Bdev(desc.clone()), desc.size_bytes()),
        Layer::Blob => {
            let cluster_size = config.cluster_size;
            let setup_desc = desc.clone();
            let blob = runtime.block_on(md_reactor, move || {
                blob_layer::setup(setup_desc, cluster_size)
            })??;
            let bytes = blob.num_io_units() * blob.io_unit_size();
            (JobTarget::Blob(blob), bytes)
        }
        Layer::Md | Layer::Snap => {
            return Err(EngineError::InvalidArgument(format!(
                "--layer {} is not an I/O job (see run_metadata, snapshot_load::run)",
                config.layer.name()
            )))
        }
    };
    if bs > region_bytes {
        return Err(EngineError::InvalidArgument(format!(
            "--bs {bs} is larger than the {region_bytes} bytes the job can address"
        )));
    }
    let reactors = runtime.reactors();
    let mut counters = Vec::new();
    let mut handles = Vec::new();
    for (index, reactor) in reactors.iter().copied().enumerate() {
        let job = job_config(config, duration_ns, region_bytes, index, reactors.len());
        let counter = Arc::new(AtomicU64::new(0));
        counters.push(Arc::clone(&counter));
        let target = target_of_jobs.clone();
        handles.push(runtime.spawn_on(reactor, move || run_core(target, job, counter))?);
    }
    drop(target_of_jobs);
    watch(config.time_s, &counters, events);
    let mut results = Vec::new();
    // A job ends at its deadline plus one last completion per request; far past that,
    // a completion was lost: report it instead of hanging.
    for handle in handles {
        let Some(result) = handle.wait_timeout(Duration::from_nanos(duration_ns) + GRACE) else {
            return Err(run_failed(
                format!(
                    "a core's job did not finish within {}s of its deadline",
                    GRACE.as_secs()
                ),
                -libc::ETIMEDOUT,
            ));
        };
        results.push(result??);
    }
    if config.layer == Layer::Blob {
        runtime.block_on(md_reactor, blob_layer::teardown)??;
    }
    let stopped = runtime.stop();
    if !stopped.panicked.is_empty() {
        return Err(run_failed(
            format!("reactors {:?} panicked", stopped.panicked),
            -libc::EIO,
        ));
    }
    let run_config = RunConfig {
        target: config.target.clone(),
        kind: target.kind.clone(),
        layer: config.layer.name().into(),
        rw: config.rw.name().into(),
        rwmix: config.rwmix,
        bs,
        qd: config.qd,
        time_s: config.time_s,
        size_bytes: region_bytes,
    };
    let report = summarise(&config.cores, &results, bs, run_config)?;
    if let Some(signal) = stop_requested() {
        let ran_s = results
            .iter()
            .map(|result| result.elapsed_ns)
            .max()
            .unwrap_or(0) as f64
            / 1e9;
        return Err(EngineError::Stopped {
            signal,
            done: format!("{ran_s:.1} of {} s (partial results above)", config.time_s),
            report: Some(Box::new(report)),
        });
    }
    if let Some(first) = results.iter().find_map(|result| result.first_error.clone()) {
        return Err(EngineError::IoFailed {
            report: Box::new(report),
            first: first.message,
            errno: first.errno,
        });
    }
    Ok(report)
}

fn job_config(
    config: &PerfConfig,
    duration_ns: u64,
    size_bytes: u64,
    index: usize,
    cores: usize,
) -> JobConfig {
    let bs = config.bs;
    // Sequential jobs split the device so cores do not read the same blocks in lockstep;
    // random jobs all use the whole device.
    let (region_start, region_len) = if config.rw.is_sequential() && cores > 1 {
        let share = (size_bytes / cores as u64) / bs * bs;
        (share * index as u64, share.max(bs))
    } else {
        (0, size_bytes / bs * bs)
    };
    JobConfig {
        rw: config.rw,
        rwmix_read_pct: config.rwmix,
        bs,
        qd: config.qd,
        duration_ns,
        region_start,
        region_len,
        seed: config.seed.wrapping_add(index as u64 * 0x1000_0000_0000),
    }
}

/// Reports progress to `events` until the run's time is up or a stop is requested.
fn watch(time_s: f64, counters: &[Arc<AtomicU64>], events: &mut dyn FnMut(PerfEvent)) {
    let total = Duration::from_millis((time_s * 1000.0) as u64);
    let started = Instant::now();
    while started.elapsed() < total && stop_requested().is_none() {
        std::thread::sleep(PROGRESS_EVERY.min(total.saturating_sub(started.elapsed())));
        let ops = counters
            .iter()
            .map(|counter| counter.load(Ordering::Relaxed))
            .sum();
        events(PerfEvent::Progress {
            elapsed: started.elapsed(),
            ops,
        });
    }
}

fn summarise(
    cores: &[usize],
    results: &[CoreResult],
    bs: u64,
    config: RunConfig,
) -> Result<PerfReport, EngineError> {
    let histogram_failed = |err: &dyn std::fmt::Display| run_failed(err.to_string(), -libc::EIO);
    let mut merged = Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3)
        .map_err(|err| histogram_failed(&err))?;
    let mut core_figures = Vec::new();
    let mut series = Vec::new();
    for (&core, result) in cores.iter().zip(results) {
        series.push(CoreSeries::of(core, &result.latency_ns, &result.timeline));
        merged
            .add(&result.latency_ns)
            .map_err(|err| histogram_failed(&err))?;
        let iops = result.ops as f64 / (result.elapsed_ns.max(1) as f64 / 1e9);
        core_figures.push(CoreFigures {
            core,
            iops,
            mib_s: iops * bs as f64 / f64::from(1u32 << 20),
            lat_us: LatencyUs::of(&result.latency_ns),
            ops: result.ops,
            errors: result.errors,
        });
    }
    let iops: f64 = core_figures.iter().map(|core| core.iops).sum();
    let total = TotalFigures {
        iops,
        mib_s: iops * bs as f64 / f64::from(1u32 << 20),
        lat_us: LatencyUs::of(&merged),
        ops: results.iter().map(|result| result.ops).sum(),
        errors: results.iter().map(|result| result.errors).sum(),
    };
    Ok(PerfReport {
        total,
        cores: core_figures,
        config,
        series,
    })
}

/// Runs [`Layer::Md`]: metadata rates on the target, on the first of `config.cores` (see
/// [`metadata`]). Uses the target, its options, `cluster_size`, `blobs` and `cores`.
pub fn run_metadata(config: &PerfConfig) -> Result<MetadataReport, EngineError> {
    let spec = TargetSpec::parse(&config.target)?;
    refuse_before_creating(&spec, config, false)?;
    // A path stays locked (created locked when missing) while `target` lives.
    let target = open_target(&spec, &config.target_options)?;
    let desc = BdevDesc::open(Arc::clone(&target.bdev))?;
    check_store_fits(config, desc.size_bytes())?;
    let runtime = Runtime::start(&RuntimeOptions {
        cores: config.cores.iter().copied().take(1).collect(),
        idle: IdleMode::Busy,
        pin: true,
    })?;
    let (blobs, cluster_size) = (config.blobs, config.cluster_size);
    let reactor = runtime.reactors()[0];
    let result = runtime.block_on(reactor, move || metadata::run(desc, blobs, cluster_size));
    let stopped = runtime.stop();
    if !stopped.panicked.is_empty() {
        return Err(run_failed(
            format!("reactors {:?} panicked", stopped.panicked),
            -libc::EIO,
        ));
    }
    drop(target);
    result?
}
