//! `spool perf`: runs a fixed-depth I/O job on every chosen core against one target and
//! reports IOPS, bandwidth and latency percentiles per core and in total.

pub mod blob_layer;
pub mod metadata;
pub mod report;
pub mod worker;

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use spool_bdev::BdevDesc;
use spool_engine::{open_target, parse_size, TargetOptions, TargetSpec};
use spool_reactor::{IdleMode, Runtime, RuntimeOptions};

use crate::cli::{Layer, PerfArgs, RwMode};
use crate::error::ToolError;
use crate::perf::report::{CoreFigures, LatencyUs, PerfReport, RunConfig, TotalFigures};
use crate::perf::worker::{run_core, CoreResult, JobConfig, JobTarget};

/// Parses a core list: "0", "0,1", "0-3", "0,2-3".
pub fn parse_cores(text: &str) -> Result<Vec<usize>, ToolError> {
    let bad = || {
        ToolError::Usage(format!(
            "bad core list '{text}' (expected e.g. 0 or 0,1 or 0-1)"
        ))
    };
    let mut cores = Vec::new();
    for part in text.split(',') {
        let part = part.trim();
        if let Some((first, last)) = part.split_once('-') {
            let first: usize = first.trim().parse().map_err(|_| bad())?;
            let last: usize = last.trim().parse().map_err(|_| bad())?;
            if first > last || last - first > 1024 {
                return Err(bad());
            }
            cores.extend(first..=last);
        } else {
            cores.push(part.parse().map_err(|_| bad())?);
        }
    }
    Ok(cores)
}

/// Runs `spool perf` with `args`; the report, or the first error.
pub fn run(args: &PerfArgs) -> Result<PerfReport, ToolError> {
    if !(args.time > 0.0 && args.time <= 86_400.0) {
        return Err(ToolError::Usage(format!(
            "--time {} must be above 0 and at most 86400 seconds",
            args.time
        )));
    }
    let cores = parse_cores(&args.cores)?;
    let bs = parse_size(&args.bs)?;
    let spec = TargetSpec::parse(&args.target)?;
    let target_options = TargetOptions {
        size_bytes: parse_size(&args.size)?,
        block_size: args.block_size,
        sqpoll: args.sqpoll,
        submit_batch: args.submit_batch,
        ..TargetOptions::default()
    };
    if matches!(spec, TargetSpec::Path(ref path) if !path.exists()) && !args.quiet {
        eprintln!(
            "spool perf: creating {} ({} bytes, fully written)",
            args.target, target_options.size_bytes
        );
    }
    // A path stays locked (created locked when missing) while `target` lives.
    let target = open_target(&spec, &target_options)?;
    let desc = BdevDesc::open(Arc::clone(&target.bdev)).map_err(spool_engine::EngineError::from)?;
    let block_size = u64::from(desc.block_size());
    if bs % block_size != 0 || bs > desc.size_bytes() {
        return Err(ToolError::Usage(format!("--bs {bs} must be a multiple of the block size {block_size} and at most the device size {}", desc.size_bytes())));
    }
    let runtime = Runtime::start(&RuntimeOptions {
        cores: cores.clone(),
        idle: IdleMode::Busy,
        pin: true,
    })?;
    let duration_ns = (args.time * 1e9) as u64;
    let md_reactor = runtime.reactors()[0];
    let (target_of_jobs, region_bytes) = match args.layer {
        Layer::Bdev => (JobTarget::Bdev(desc.clone()), desc.size_bytes()),
        Layer::Blob => {
            let cluster_size = parse_size(&args.cluster_size)?;
            let setup_desc = desc.clone();
            let blob = runtime
                .block_on(md_reactor, move || {
                    blob_layer::setup(setup_desc, cluster_size)
                })?
                .map_err(ToolError::Run)?;
            let bytes = blob.num_io_units() * blob.io_unit_size();
            (JobTarget::Blob(blob), bytes)
        }
        Layer::Md => {
            return Err(ToolError::Usage(
                "--layer md measures metadata, not I/O (see run_metadata)".into(),
            ))
        }
    };
    if bs > region_bytes {
        return Err(ToolError::Usage(format!(
            "--bs {bs} is larger than the {region_bytes} bytes the job can address"
        )));
    }
    let mut progress = Vec::new();
    let mut handles = Vec::new();
    for (index, reactor) in runtime.reactors().into_iter().enumerate() {
        let config = job_config(args, bs, duration_ns, region_bytes, index, cores.len());
        let counter = Arc::new(AtomicU64::new(0));
        progress.push(Arc::clone(&counter));
        let target = target_of_jobs.clone();
        handles.push(runtime.spawn_on(reactor, move || run_core(target, config, counter))?);
    }
    drop(target_of_jobs);
    show_progress(args, &progress);
    let mut results = Vec::new();
    // A job ends at its deadline plus one last completion per request; far past that,
    // a completion was lost: report it instead of hanging.
    let grace = Duration::from_secs(60);
    for handle in handles {
        let Some(result) = handle.wait_timeout(Duration::from_nanos(duration_ns) + grace) else {
            return Err(ToolError::Run(format!(
                "a core's job did not finish within {}s of its deadline",
                grace.as_secs()
            )));
        };
        results.push(result?.map_err(ToolError::Run)?);
    }
    if args.layer == Layer::Blob {
        runtime
            .block_on(md_reactor, blob_layer::teardown)?
            .map_err(ToolError::Run)?;
    }
    let report = runtime.stop();
    if !report.panicked.is_empty() {
        return Err(ToolError::Run(format!(
            "reactors {:?} panicked",
            report.panicked
        )));
    }
    let config = RunConfig {
        target: args.target.clone(),
        kind: target.kind.clone(),
        layer: args.layer.name().into(),
        rw: args.rw.name().into(),
        rwmix: args.rwmix,
        bs,
        qd: args.qd,
        time_s: args.time,
        size_bytes: region_bytes,
    };
    let perf_report = summarise(&cores, &results, bs, config)?;
    if let Some(signal) = spool_engine::signals::stop_requested() {
        let ran_s = results
            .iter()
            .map(|result| result.elapsed_ns)
            .max()
            .unwrap_or(0) as f64
            / 1e9;
        return Err(ToolError::Interrupted {
            signal,
            done: format!("{ran_s:.1} of {} s (partial results above)", args.time),
            report: Some(Box::new(perf_report)),
        });
    }
    if let Some(first) = results.iter().find_map(|result| result.first_error.clone()) {
        return Err(ToolError::Io {
            report: Box::new(perf_report),
            first,
        });
    }
    Ok(perf_report)
}

fn job_config(
    args: &PerfArgs,
    bs: u64,
    duration_ns: u64,
    size_bytes: u64,
    index: usize,
    cores: usize,
) -> JobConfig {
    // Sequential jobs split the device so cores do not read the same blocks in lockstep;
    // random jobs all use the whole device.
    let sequential = matches!(args.rw, RwMode::Read | RwMode::Write);
    let (region_start, region_len) = if sequential && cores > 1 {
        let share = (size_bytes / cores as u64) / bs * bs;
        (share * index as u64, share.max(bs))
    } else {
        (0, size_bytes / bs * bs)
    };
    JobConfig {
        rw: args.rw,
        rwmix_read_pct: args.rwmix,
        bs,
        qd: args.qd,
        duration_ns,
        region_start,
        region_len,
        seed: args.seed.wrapping_add(index as u64 * 0x1000_0000_0000),
    }
}

/// Shows a progress line on stderr until the run's time is up.
fn show_progress(args: &PerfArgs, counters: &[Arc<AtomicU64>]) {
    let total_ms = (args.time * 1000.0) as u64;
    let started = Instant::now();
    let ops = || {
        counters
            .iter()
            .map(|counter| counter.load(Ordering::Relaxed))
            .sum::<u64>()
    };
    let terminal = std::io::stderr().is_terminal() && !args.quiet;
    let bar = terminal.then(|| {
        let bar = indicatif::ProgressBar::new(total_ms);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let mut last_line = Instant::now();
    let mut last_ops = 0;
    let mut last_at = Instant::now();
    while started.elapsed() < Duration::from_millis(total_ms)
        && spool_engine::signals::stop_requested().is_none()
    {
        std::thread::sleep(
            Duration::from_millis(250)
                .min(Duration::from_millis(total_ms).saturating_sub(started.elapsed())),
        );
        let now_ops = ops();
        let rate =
            (now_ops - last_ops.min(now_ops)) as f64 / last_at.elapsed().as_secs_f64().max(1e-3);
        last_ops = now_ops;
        last_at = Instant::now();
        if let Some(bar) = &bar {
            bar.set_position(started.elapsed().as_millis() as u64);
            bar.set_message(format!("{:.0} IOPS", rate));
        } else if !args.quiet && last_line.elapsed() >= Duration::from_secs(1) {
            eprintln!(
                "spool perf: {:>5.1}s {:>12.0} IOPS",
                started.elapsed().as_secs_f64(),
                rate
            );
            last_line = Instant::now();
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
}

fn summarise(
    cores: &[usize],
    results: &[CoreResult],
    bs: u64,
    config: RunConfig,
) -> Result<PerfReport, ToolError> {
    let mut merged = Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3)
        .map_err(|err| ToolError::Run(err.to_string()))?;
    let mut core_figures = Vec::new();
    for (index, result) in results.iter().enumerate() {
        merged
            .add(&result.latency_ns)
            .map_err(|err| ToolError::Run(err.to_string()))?;
        let iops = result.ops as f64 / (result.elapsed_ns.max(1) as f64 / 1e9);
        core_figures.push(CoreFigures {
            core: cores[index],
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
    })
}

/// Runs `spool perf --layer md`: metadata rates on the target (on the first chosen core).
pub fn run_metadata(args: &PerfArgs) -> Result<metadata::MetadataReport, ToolError> {
    let cores = parse_cores(&args.cores)?;
    let cluster_size = parse_size(&args.cluster_size)?;
    let spec = TargetSpec::parse(&args.target)?;
    let target_options = TargetOptions {
        size_bytes: parse_size(&args.size)?,
        block_size: args.block_size,
        sqpoll: args.sqpoll,
        submit_batch: args.submit_batch,
        ..TargetOptions::default()
    };
    // A path stays locked (created locked when missing) while `target` lives.
    let target = open_target(&spec, &target_options)?;
    let desc = BdevDesc::open(Arc::clone(&target.bdev)).map_err(spool_engine::EngineError::from)?;
    let runtime = Runtime::start(&RuntimeOptions {
        cores: cores[..1].to_vec(),
        idle: IdleMode::Busy,
        pin: true,
    })?;
    let blobs = args.blobs;
    let reactor = runtime.reactors()[0];
    let result = runtime.block_on(reactor, move || metadata::run(desc, blobs, cluster_size));
    let stopped = runtime.stop();
    if !stopped.panicked.is_empty() {
        return Err(ToolError::Run(format!(
            "reactors {:?} panicked",
            stopped.panicked
        )));
    }
    result?.map_err(ToolError::Run)
}
