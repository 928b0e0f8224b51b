//! `spool perf`: its arguments become a [`spool_engine::perf::PerfConfig`], the engine runs
//! the job ([`spool_engine::perf`]), and this module shows progress and prints the report
//! as a table (the JSON is the report serialised).

use std::io::IsTerminal;
use std::os::unix::fs::FileTypeExt;
use std::time::Duration;

use spool_engine::perf::report::LatencyUs;
use spool_engine::perf::{
    self, MetadataReport, PerfConfig, PerfEvent, PerfReport, SnapshotLoadReport,
};
use spool_engine::{parse_size, TargetOptions};

use crate::cli::{Layer, PerfArgs, RwMode};
use crate::error::ToolError;

impl From<Layer> for perf::Layer {
    fn from(layer: Layer) -> Self {
        match layer {
            Layer::Bdev => perf::Layer::Bdev,
            Layer::Blob => perf::Layer::Blob,
            Layer::Md => perf::Layer::Md,
            Layer::Snap => perf::Layer::Snap,
        }
    }
}

impl From<RwMode> for perf::RwMode {
    fn from(rw: RwMode) -> Self {
        match rw {
            RwMode::Randread => perf::RwMode::Randread,
            RwMode::Randwrite => perf::RwMode::Randwrite,
            RwMode::Read => perf::RwMode::Read,
            RwMode::Write => perf::RwMode::Write,
            RwMode::Randrw => perf::RwMode::Randrw,
        }
    }
}

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

/// Whether the job writes its target: a write pattern, or a layer that formats a store.
fn writes_target(args: &PerfArgs) -> bool {
    args.layer != Layer::Bdev || !matches!(args.rw, RwMode::Randread | RwMode::Read)
}

/// Refuses a missing PATH under /dev (a mistyped device), and, unless `--force`, a job that
/// would write over a blobstore on a PATH target, or over what `init` refuses to format (see
/// [`spool_engine::guard::foreign_contents`]): a filesystem, a partition table, a disk
/// image, and on a block device any non-zero byte in its first MiB. A regular file with
/// unrecognised data is written (perf's own write jobs leave such data, and running the
/// same job again is what benchmarking is).
fn refuse_overwriting_a_store(args: &PerfArgs) -> Result<(), ToolError> {
    let path = std::path::Path::new(&args.target);
    if matches!(args.target.as_str(), "null" | "malloc") || args.target.starts_with("malloc:") {
        return Ok(());
    }
    spool_engine::guard::refuse_new_file_in_dev(path)?;
    if args.force || !writes_target(args) || !path.exists() {
        return Ok(());
    }
    if spool_engine::guard::holds_blobstore(path) {
        return Err(ToolError::Failed(format!(
            "{}: holds a blobstore (SPDKBLOB super block) that this job would overwrite: point --target elsewhere, or add --force to lose it",
            args.target
        )));
    }
    let is_block = std::fs::metadata(path).is_ok_and(|meta| meta.file_type().is_block_device());
    match spool_engine::guard::foreign_contents(path) {
        Some(found) if is_block || found != spool_engine::guard::UNRECOGNISED_DATA => {
            Err(ToolError::Failed(format!(
                "{}: holds {found}, not a blobstore; this job would overwrite it: point --target elsewhere, or add --force to lose it",
                args.target
            )))
        }
        _ => Ok(()),
    }
}

/// The bytes of `--size` (1 GiB when not given). Given for a PATH that exists with another
/// size, it is not used (an existing target is used as it is, a block device whole), and a
/// warning on stderr says so: a working set other than the one asked for is never measured
/// without a word.
fn size_bytes(args: &PerfArgs) -> Result<u64, ToolError> {
    let Some(text) = &args.size else {
        return Ok(parse_size("1G")?);
    };
    let size = parse_size(text)?;
    if matches!(args.target.as_str(), "null" | "malloc") || args.target.starts_with("malloc:") {
        return Ok(size);
    }
    match std::fs::metadata(&args.target) {
        Ok(meta) if meta.file_type().is_block_device() => eprintln!(
            "warning: {}: a block device is used whole; --size {size} is for creating a file and is not used",
            args.target
        ),
        Ok(meta) if meta.is_file() && meta.len() != size => eprintln!(
            "warning: {}: exists with {} bytes and is used as it is; --size {size} is for creating a file and is not used (remove the file to create it with --size)",
            args.target,
            meta.len()
        ),
        _ => {}
    }
    Ok(size)
}

/// The engine's settings for `args`. The cluster size is parsed only for the layers that
/// create a store.
fn config(args: &PerfArgs) -> Result<PerfConfig, ToolError> {
    refuse_overwriting_a_store(args)?;
    let cores = parse_cores(&args.cores)?;
    let bs = parse_size(&args.bs)?;
    let target_options = TargetOptions {
        size_bytes: size_bytes(args)?,
        block_size: args.block_size,
        sqpoll: args.sqpoll,
        submit_batch: args.submit_batch,
        // A read job opens its target read-only: it works on an image nobody may write.
        read_only: !writes_target(args),
        ..TargetOptions::default()
    };
    let cluster_size = match args.layer {
        Layer::Bdev => PerfConfig::default().cluster_size,
        Layer::Blob | Layer::Md | Layer::Snap => parse_size(&args.cluster_size)?,
    };
    Ok(PerfConfig {
        target: args.target.clone(),
        target_options,
        layer: args.layer.into(),
        cluster_size,
        blobs: args.blobs,
        snapshots: args.snapshots,
        snap_gap_ms: args.snap_gap,
        rw: args.rw.into(),
        rwmix: args.rwmix,
        bs,
        qd: args.qd,
        time_s: args.time,
        cores,
        seed: args.seed,
    })
}

/// Runs `spool perf` (`--layer bdev` or `blob`) with `args`; the report, or the first error
/// (a stop signal or a failed I/O keeps the partial report: [`ToolError::Interrupted`],
/// [`ToolError::Io`]).
pub fn run(args: &PerfArgs) -> Result<PerfReport, ToolError> {
    let config = config(args)?;
    let mut progress = ProgressLine::new(args);
    let report = perf::run(&config, &mut |event| match event {
        PerfEvent::Creating { bytes, .. } => {
            if !args.quiet {
                eprintln!(
                    "spool perf: creating {} ({bytes} bytes, fully written)",
                    args.target
                );
            }
        }
        PerfEvent::Progress { elapsed, ops } => progress.update(elapsed, ops),
    });
    progress.finish();
    Ok(report?)
}

/// Runs `spool perf --layer md`: metadata rates on the target (on the first chosen core).
pub fn run_metadata(args: &PerfArgs) -> Result<MetadataReport, ToolError> {
    Ok(perf::run_metadata(&config(args)?)?)
}

/// Runs `spool perf --layer snap`: snapshot call latency and write pause under load.
pub fn run_snapshot_load(args: &PerfArgs) -> Result<SnapshotLoadReport, ToolError> {
    Ok(perf::snapshot_load::run(&config(args)?)?)
}

/// The progress line on stderr while the jobs run: a bar on a terminal, else a line a
/// second (none with --quiet).
struct ProgressLine {
    /// The bar's length, ms.
    total_ms: u64,
    /// Whether stderr gets a bar (made at the first sample) rather than lines.
    terminal: bool,
    bar: Option<indicatif::ProgressBar>,
    quiet: bool,
    /// The previous sample: time into the run and ops.
    last: (Duration, u64),
    /// Time into the run of the last line printed.
    last_line: Duration,
}

impl ProgressLine {
    fn new(args: &PerfArgs) -> ProgressLine {
        ProgressLine {
            total_ms: (args.time * 1000.0) as u64,
            terminal: std::io::stderr().is_terminal() && !args.quiet,
            bar: None,
            quiet: args.quiet,
            last: (Duration::ZERO, 0),
            last_line: Duration::ZERO,
        }
    }

    fn update(&mut self, elapsed: Duration, ops: u64) {
        let (last_elapsed, last_ops) = self.last;
        let rate = (ops - last_ops.min(ops)) as f64
            / elapsed.saturating_sub(last_elapsed).as_secs_f64().max(1e-3);
        self.last = (elapsed, ops);
        if self.terminal {
            let total_ms = self.total_ms;
            let bar = self.bar.get_or_insert_with(|| {
                let bar = indicatif::ProgressBar::new(total_ms).with_elapsed(elapsed);
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{spinner} [{elapsed_precise}] {bar:30} {msg}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                bar
            });
            bar.set_position(elapsed.as_millis() as u64);
            bar.set_message(format!("{:.0} IOPS", rate));
        } else if !self.quiet && elapsed.saturating_sub(self.last_line) >= Duration::from_secs(1) {
            eprintln!(
                "spool perf: {:>5.1}s {:>12.0} IOPS",
                elapsed.as_secs_f64(),
                rate
            );
            self.last_line = elapsed;
        }
    }

    fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}

/// A bdev or blob layer report as a table for people.
pub fn table(report: &PerfReport) -> String {
    let config = &report.config;
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
    // 1e9/IOPS is the stack's own cost per I/O only where no device does any work.
    let stack_cost = config.kind == spool_engine::target::NULL_KIND;
    out.push_str(&format!(
        "{:>6} {:>12} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "core", "IOPS", "MiB/s", "mean_us", "p50_us", "p99_us", "p99.9_us", "max_us"
    ));
    out.push_str(if stack_cost { " stack_ns/IO\n" } else { "\n" });
    for core in &report.cores {
        out.push_str(&row(
            &core.core.to_string(),
            core.iops,
            core.mib_s,
            &core.lat_us,
            stack_cost,
        ));
    }
    out.push_str(&row(
        "total",
        report.total.iops,
        report.total.mib_s,
        &report.total.lat_us,
        stack_cost,
    ));
    if report.total.errors > 0 {
        out.push_str(&format!("errors: {}\n", report.total.errors));
    }
    out
}

/// One table row; with `stack_cost`, a last column of 1e9/IOPS (ns of one core per I/O).
fn row(name: &str, iops: f64, mib_s: f64, lat: &LatencyUs, stack_cost: bool) -> String {
    let mut line = format!(
        "{:>6} {:>12.0} {:>10.1} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2}",
        name, iops, mib_s, lat.mean, lat.p50, lat.p99, lat.p999, lat.max
    );
    if stack_cost {
        let ns_per_io = if iops > 0.0 { 1e9 / iops } else { 0.0 };
        line.push_str(&format!(" {ns_per_io:>11.1}"));
    }
    line.push('\n');
    line
}

/// A metadata report as a table for people.
pub fn metadata_table(report: &MetadataReport) -> String {
    let rows = [
        ("create+sync ops/s", format!("{:.0}", report.create_per_s)),
        (
            "open+close ops/s",
            format!("{:.0}", report.open_close_per_s),
        ),
        ("delete ops/s", format!("{:.0}", report.delete_per_s)),
        ("clean load ms", format!("{:.1}", report.clean_load_ms)),
        ("dirty load ms", format!("{:.1}", report.dirty_load_ms)),
        ("thick write/s", format!("{:.0}", report.thick_write_per_s)),
        (
            "thin first write/s",
            format!("{:.0}", report.thin_first_write_per_s),
        ),
        ("snapshot ms", format!("{:.2}", report.snapshot_ms)),
        (
            "snapshot under I/O ms",
            format!("{:.2}", report.loaded_snapshot_ms),
        ),
        (
            "snapshot pause us",
            format!("{:.0}", report.snapshot_pause_us),
        ),
        ("clone ms", format!("{:.2}", report.clone_ms)),
    ];
    let mut out = format!(
        "spool perf --layer md: {} blobs, {} md pages\n{:>22} {:>12}\n",
        report.blobs, report.md_pages, "phase", "rate"
    );
    for (name, value) in rows {
        out.push_str(&format!("{name:>22} {value:>12}\n"));
    }
    out
}

/// A `--layer snap` report as a table for people.
pub fn snapshot_table(report: &SnapshotLoadReport) -> String {
    let mut out = format!(
        "spool perf --layer snap: {}, cluster {} KiB, volume {} MiB, bs={} qd={} cores {:?}, {} snapshots {} ms apart, {:.0} writes/s\n",
        report.target,
        report.cluster_size >> 10,
        report.volume_bytes >> 20,
        report.bs,
        report.qd,
        report.cores,
        report.snapshots,
        report.gap_ms,
        report.write_iops,
    );
    out.push_str(&format!(
        "first snapshot (nothing to copy): {:.2} ms\n{:>34} {:>9} {:>9} {:>9}\n",
        report.first_call_ms, "ms", "p50", "p99", "max"
    ));
    let rows = [
        ("snapshot call", report.call_ms),
        ("writes frozen by the call", report.frozen_ms),
        ("write pause during the call", report.pause_ms),
        ("completion gap between calls", report.baseline_gap_ms),
        ("longest write during the call", report.write_max_ms),
        ("longest write between calls", report.baseline_write_max_ms),
    ];
    for (name, spread) in rows {
        out.push_str(&format!(
            "{name:>34} {:>9.2} {:>9.2} {:>9.2}\n",
            spread.p50, spread.p99, spread.max
        ));
    }
    out
}
