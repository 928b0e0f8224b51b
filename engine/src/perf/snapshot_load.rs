//! [`Layer::Snap`](super::Layer::Snap) (`spool perf --layer snap`): the snapshot call's
//! latency and the pause it causes to writers under load (issue 14).
//!
//! A store is initialised on the target and one thick volume of `1 / (snapshots + 2)` of its
//! clusters is created (so that every snapshot's copy-on-write fits). Every chosen core keeps
//! `qd` random `bs` writes in flight on it while the metadata reactor (the first core) takes
//! `snapshots + 1` snapshots of it, `snap_gap_ms` apart (from one call's return to the next
//! call). After the first snapshot every first write to a cluster copies it (the cluster is
//! read from the snapshot and written whole), so each later snapshot is called in the middle
//! of a copy-on-write storm: the case where the call used to return late. The first
//! snapshot (of the thick volume, with nothing to copy) is reported apart.
//!
//! For each counted snapshot the run records the call's latency, the longest gap between two
//! write completions (all cores together) that overlaps the call (the write pause: while the
//! volume is frozen nothing completes), and the longest latency of a write whose life overlaps
//! the call. The same two figures over the second half of the time between calls (no
//! snapshot running) are the baseline. The report gives medians, p99 and maxima over the
//! snapshots.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use spool_bdev::{BdevDesc, DmaBuf};
use spool_blob::{Blob, BlobIo, BlobOptions, Blobstore, InitOptions};
use spool_reactor::{now_ns, IdleMode, Runtime, RuntimeOptions};

use crate::error::step;
use crate::perf::PerfConfig;
use crate::target::{open_target, TargetSpec};
use crate::EngineError;

/// Writes before the first snapshot, ms (the job settles).
const WARMUP_MS: u64 = 100;

/// Figures over the counted snapshots, milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Spread {
    /// Median.
    pub p50: f64,
    /// 99th percentile (the largest but one from 100 snapshots on).
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl Spread {
    fn of(mut values: Vec<f64>) -> Spread {
        values.sort_by(f64::total_cmp);
        let at = |q: f64| {
            let index = ((values.len() as f64 * q).ceil() as usize).saturating_sub(1);
            values.get(index).copied().unwrap_or(0.0)
        };
        Spread {
            p50: at(0.5),
            p99: at(0.99),
            max: values.last().copied().unwrap_or(0.0),
        }
    }
}

/// What `spool perf --layer snap` measured.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotLoadReport {
    /// The target as given.
    pub target: String,
    /// Bytes per cluster.
    pub cluster_size: u64,
    /// Bytes of the volume written to.
    pub volume_bytes: u64,
    /// Bytes per write.
    pub bs: u64,
    /// Writes in flight per core.
    pub qd: u32,
    /// Cores writing (the first one also takes the snapshots).
    pub cores: Vec<usize>,
    /// Snapshots counted (the first, of the thick volume, is not).
    pub snapshots: u64,
    /// Time between one call's return and the next call, ms.
    pub gap_ms: u64,
    /// Writes per second over the whole run.
    pub write_iops: f64,
    /// The first snapshot's call (nothing to copy yet), ms.
    pub first_call_ms: f64,
    /// The snapshot call's latency, ms.
    pub call_ms: Spread,
    /// How long each call kept the volume's I/O frozen (from the gate, after which new
    /// writes wait, to their release on every channel), ms: the write pause the snapshot
    /// itself causes ([`spool_blob::Blobstore::freeze_stats`]).
    pub frozen_ms: Spread,
    /// The longest gap between write completions overlapping each call, ms.
    pub pause_ms: Spread,
    /// The longest gap between write completions between calls (baseline), ms.
    pub baseline_gap_ms: Spread,
    /// The longest latency of a write overlapping each call, ms.
    pub write_max_ms: Spread,
    /// The longest write latency between calls (baseline), ms.
    pub baseline_write_max_ms: Spread,
}

/// One write: completion time and latency, ns.
type Completion = (u64, u64);

thread_local! {
    /// The store and the volume, kept on the metadata reactor between set-up and tear-down.
    static HELD: RefCell<Option<(Blobstore, Blob)>> = const { RefCell::new(None) };
}

/// Runs the snapshot-under-load job as `config` says (target, its options, cluster size,
/// cores, qd, bs, seed, snapshots and gap).
pub fn run(config: &PerfConfig) -> Result<SnapshotLoadReport, EngineError> {
    if config.snapshots == 0 {
        return Err(EngineError::InvalidArgument(
            "--snapshots must be at least 1".into(),
        ));
    }
    let spec = TargetSpec::parse(&config.target)?;
    super::refuse_before_creating(&spec, config, true)?;
    let target = open_target(&spec, &config.target_options)?;
    let desc = BdevDesc::open(Arc::clone(&target.bdev))?;
    super::check_store_fits(config, desc.size_bytes())?;
    let runtime = Runtime::start(&RuntimeOptions {
        cores: config.cores.clone(),
        idle: IdleMode::Busy,
        pin: true,
    })?;
    let result = run_on(&runtime, desc, config);
    let stopped = runtime.stop();
    if !stopped.panicked.is_empty() {
        return Err(EngineError::Failed {
            reason: format!("reactors {:?} panicked", stopped.panicked),
            errno: -libc::EIO,
        });
    }
    drop(target);
    result
}

fn run_on(
    runtime: &Runtime,
    desc: BdevDesc,
    config: &PerfConfig,
) -> Result<SnapshotLoadReport, EngineError> {
    let md = runtime.reactors()[0];
    let (cluster_size, snapshots) = (config.cluster_size, config.snapshots);
    let volume = runtime.block_on(md, move || setup(desc, cluster_size, snapshots))??;
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for (index, reactor) in runtime.reactors().iter().copied().enumerate() {
        let (io, stop) = (Arc::clone(&volume), Arc::clone(&stop));
        let (qd, bs) = (config.qd, config.bs);
        let seed = config.seed.wrapping_add(index as u64 * 0x1000_0000_0000);
        writers.push(runtime.spawn_on(reactor, move || writer(io, qd, bs, seed, stop))?);
    }
    let (volume_id, gap_ms) = (volume.id(), config.snap_gap_ms);
    let stop_after = Arc::clone(&stop);
    let windows = runtime.block_on(md, move || async move {
        let windows = take_snapshots(volume_id, snapshots, gap_ms).await;
        stop_after.store(true, Ordering::Release);
        windows
    })?;
    let mut completions = Vec::new();
    let mut first_error = None;
    for handle in writers {
        match handle.wait() {
            Ok(Ok(done)) => completions.extend(done),
            Ok(Err(err)) => {
                first_error.get_or_insert(err);
            }
            Err(err) => {
                first_error.get_or_insert(err.into());
            }
        }
    }
    runtime.block_on(md, teardown)??;
    if let Some(err) = first_error {
        return Err(err);
    }
    let windows = windows?;
    completions.sort_unstable();
    Ok(summarise(config, &volume, &windows, &completions))
}

/// On the metadata reactor: a store on `desc` and a thick volume of `1 / (snapshots + 2)` of
/// its clusters; returns the volume's I/O handle.
async fn setup(
    desc: BdevDesc,
    cluster_size: u64,
    snapshots: u64,
) -> Result<Arc<BlobIo>, EngineError> {
    let store = Blobstore::init(
        desc,
        &InitOptions {
            cluster_size,
            ..InitOptions::default()
        },
    )
    .await
    .map_err(step("blobstore init"))?;
    let clusters = store.free_cluster_count() / (snapshots + 2);
    if clusters == 0 {
        return Err(EngineError::InvalidArgument(format!(
            "{} free clusters cannot hold a volume and {snapshots} snapshots of it",
            store.free_cluster_count()
        )));
    }
    let volume = store
        .create_and_open(&BlobOptions {
            num_clusters: clusters,
            ..BlobOptions::default()
        })
        .await
        .map_err(step("create the volume"))?;
    let io = volume.io();
    HELD.with(|held| *held.borrow_mut() = Some((store, volume)));
    Ok(io)
}

/// On the metadata reactor: closes the volume and unloads the store.
async fn teardown() -> Result<(), EngineError> {
    let Some((store, volume)) = HELD.with(|held| held.borrow_mut().take()) else {
        return Ok(());
    };
    volume.close().await?;
    Ok(store.unload().await?)
}

/// One snapshot call: its start and end, and how long it kept the volume frozen, ns.
type Call = (u64, u64, u64);

/// On the metadata reactor: `snapshots + 1` snapshots of the volume, `gap_ms` apart.
async fn take_snapshots(
    volume: u64,
    snapshots: u64,
    gap_ms: u64,
) -> Result<Vec<Call>, EngineError> {
    let Some(store) = HELD.with(|held| held.borrow().as_ref().map(|(store, _)| store.clone()))
    else {
        return Err(EngineError::Failed {
            reason: "the store is gone".into(),
            errno: -libc::ENODEV,
        });
    };
    spool_reactor::sleep(Duration::from_millis(WARMUP_MS)).await;
    let mut windows = Vec::new();
    for taken in 0..=snapshots {
        crate::perf::stop_point(|| {
            format!(
                "{taken} of {} snapshots taken (no table: too few to report)",
                snapshots + 1
            )
        })?;
        let started = now_ns();
        store
            .create_snapshot(volume, &[])
            .await
            .map_err(step("snapshot"))?;
        windows.push((started, now_ns(), store.freeze_stats().last_ns));
        spool_reactor::sleep(Duration::from_millis(gap_ms)).await;
    }
    Ok(windows)
}

/// On each reactor: `qd` tasks writing `bs` bytes at random offsets of the volume until
/// `stop`; every completion's time and latency.
async fn writer(
    io: Arc<BlobIo>,
    qd: u32,
    bs: u64,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> Result<Vec<Completion>, EngineError> {
    let channel = io.channel().map_err(step("open blob channel"))?;
    let unit = io.io_unit_size();
    let blocks = (io.num_io_units() * unit / bs).max(1);
    let done = Rc::new(RefCell::new(Vec::with_capacity(1 << 20)));
    let mut tasks = Vec::new();
    for slot in 0..u64::from(qd) {
        let (io, channel, stop, done) = (
            Arc::clone(&io),
            channel.clone(),
            Arc::clone(&stop),
            Rc::clone(&done),
        );
        tasks.push(spool_reactor::spawn_local(async move {
            let mut rng = fastrand::Rng::with_seed(seed.wrapping_add(slot));
            let mut buf = DmaBuf::alloc(bs as usize)?;
            buf.as_mut_slice().fill(slot as u8);
            while !stop.load(Ordering::Acquire) {
                let offset = rng.u64(0..blocks) * bs / unit;
                let started = now_ns();
                let (result, back) = channel.write(&io, offset, buf).await;
                result.map_err(step("write"))?;
                buf = back;
                let now = now_ns();
                done.borrow_mut().push((now, now - started));
            }
            Ok::<(), EngineError>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let done = done.take();
    Ok(done)
}

/// The longest gap between consecutive completions (of `sorted`) that overlaps `[from, to]`,
/// and the longest latency of a write whose life overlaps it (`submitted_after`: only writes
/// submitted after that time count), ns.
fn window_figures(sorted: &[Completion], from: u64, to: u64, submitted_after: u64) -> (u64, u64) {
    let first = sorted.partition_point(|&(done, _)| done <= from);
    let mut gap = 0;
    let mut index = first.max(1);
    while index < sorted.len() && sorted[index - 1].0 < to {
        gap = gap.max(sorted[index].0 - sorted[index - 1].0);
        index += 1;
    }
    let mut worst = 0;
    for &(done, latency) in &sorted[first..] {
        let submitted = done - latency;
        if submitted >= to && done > to.saturating_add(10_000_000_000) {
            break;
        }
        if submitted < to && submitted >= submitted_after {
            worst = worst.max(latency);
        }
    }
    (gap, worst)
}

fn summarise(
    config: &PerfConfig,
    volume: &BlobIo,
    windows: &[Call],
    sorted: &[Completion],
) -> SnapshotLoadReport {
    let ms = |ns: u64| ns as f64 / 1e6;
    let (mut calls, mut frozen, mut pauses, mut gaps, mut worst, mut base_worst) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    let half_gap = config.snap_gap_ms * 500_000;
    for pair in windows.windows(2) {
        let (previous_end, (start, end, frozen_ns)) = (pair[0].1, pair[1]);
        calls.push(ms(end - start));
        frozen.push(ms(frozen_ns));
        let (gap, latency) = window_figures(sorted, start, end, 0);
        pauses.push(ms(gap));
        worst.push(ms(latency));
        let base_from = start.saturating_sub(half_gap).max(previous_end);
        let (gap, latency) = window_figures(sorted, base_from, start, previous_end);
        gaps.push(ms(gap));
        base_worst.push(ms(latency));
    }
    let run_ns = match (sorted.first(), sorted.last()) {
        (Some(first), Some(last)) => (last.0 - first.0).max(1),
        _ => 1,
    };
    SnapshotLoadReport {
        target: config.target.clone(),
        cluster_size: config.cluster_size,
        volume_bytes: volume.num_io_units() * volume.io_unit_size(),
        bs: config.bs,
        qd: config.qd,
        cores: config.cores.clone(),
        snapshots: calls.len() as u64,
        gap_ms: config.snap_gap_ms,
        write_iops: sorted.len() as f64 / (run_ns as f64 / 1e9),
        first_call_ms: windows.first().map_or(0.0, |&(s, e, _)| ms(e - s)),
        call_ms: Spread::of(calls),
        frozen_ms: Spread::of(frozen),
        pause_ms: Spread::of(pauses),
        baseline_gap_ms: Spread::of(gaps),
        write_max_ms: Spread::of(worst),
        baseline_write_max_ms: Spread::of(base_worst),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_and_latencies_overlapping_a_window() {
        // Completions at 10, 20, 50, 55 (latencies 5, 5, 40, 2): the 20..50 gap overlaps
        // 30..40; the write done at 50 was submitted at 10, inside... before 40.
        let sorted = [(10, 5), (20, 5), (50, 40), (55, 2)];
        assert_eq!(window_figures(&sorted, 30, 40, 0), (30, 40));
        // Only writes submitted from 12 on count.
        assert_eq!(window_figures(&sorted, 30, 40, 12), (30, 0));
        assert_eq!(Spread::of(vec![3.0, 1.0, 2.0]).p50, 2.0);
    }
}
