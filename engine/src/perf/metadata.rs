//! [`Layer::Md`](super::Layer::Md) (`spool perf --layer md`): metadata rates on the target, on one reactor (the metadata
//! reactor): create (each create writes its blob's metadata: SPDK's create + sync), open +
//! close, delete, each over `--blobs` blobs, and the time to load the store clean (after an
//! unload) and dirty (after a crash: the store is dropped without unloading, so the load
//! replays every metadata page): three of each, alternating, reported as medians.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Instant;

use serde::Serialize;
use spool_bdev::BdevDesc;
use spool_blob::{BlobOptions, Blobstore, InitOptions, LoadOptions};

use crate::error::step;
use crate::perf::stop_point;
use crate::EngineError;

/// What the metadata run measured.
#[derive(Debug, Clone, Serialize)]
pub struct MetadataReport {
    /// Blobs per phase.
    pub blobs: u64,
    /// Creates per second (each writes the blob's metadata page).
    pub create_per_s: f64,
    /// Open + close pairs per second (each open reads the blob's metadata).
    pub open_close_per_s: f64,
    /// Deletes per second.
    pub delete_per_s: f64,
    /// Milliseconds to load the store with `blobs` blobs after a clean unload (the median
    /// of three, alternating with the dirty loads).
    pub clean_load_ms: f64,
    /// Milliseconds to load it after a crash (recovery replays the metadata; the median of
    /// three).
    pub dirty_load_ms: f64,
    /// Md pages of the store.
    pub md_pages: u32,
    /// 4 KiB writes per second to clusters a thick blob already has (qd 32).
    pub thick_write_per_s: f64,
    /// 4 KiB first writes per second to a thin blob, each allocating a cluster (qd 32).
    pub thin_first_write_per_s: f64,
    /// Milliseconds a snapshot took with no I/O running.
    pub snapshot_ms: f64,
    /// Milliseconds a snapshot of a blob under 4 KiB random writes at qd 32 took to return
    /// (the writers' copy-on-write work shares the core with it).
    pub loaded_snapshot_ms: f64,
    /// The longest write latency while that snapshot ran, microseconds (the I/O pause).
    pub snapshot_pause_us: f64,
    /// Milliseconds to create a clone of that snapshot.
    pub clone_ms: f64,
}

/// Clean and dirty loads timed per run, alternating; each kind's median is reported.
const LOAD_ROUNDS: usize = 3;

/// The median of `samples` (0 when empty).
fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples.get(samples.len() / 2).copied().unwrap_or(0.0)
}

fn rate(count: u64, started: Instant) -> f64 {
    count as f64 / started.elapsed().as_secs_f64().max(1e-9)
}

/// Runs the phases on the calling reactor over `desc` (whose contents are replaced by a new
/// store of `cluster_size` clusters): `blobs` blobs per phase.
pub async fn run(
    desc: BdevDesc,
    blobs: u64,
    cluster_size: u64,
) -> Result<MetadataReport, EngineError> {
    let md_pages = super::md_pages_for(blobs)?;
    let store = Blobstore::init(
        desc.clone(),
        &InitOptions {
            cluster_size,
            md_pages: Some(md_pages),
            ..InitOptions::default()
        },
    )
    .await
    .map_err(step("blobstore init"))?;
    // I/O phases first, on the fresh store (its free clusters are known to read zeros).
    let io = match io_phases(&store).await {
        Ok(io) => io,
        Err(err) => return Err(unloading(store, err).await),
    };
    let started = Instant::now();
    let mut ids = Vec::with_capacity(blobs as usize);
    for created in 0..blobs {
        if let Err(err) = stop_point(|| {
            format!("{created} of {blobs} blobs created (no table: the phases did not run)")
        }) {
            return Err(unloading(store, err).await);
        }
        ids.push(
            store
                .create_blob(&BlobOptions::default())
                .await
                .map_err(step("create"))?,
        );
    }
    let create_per_s = rate(blobs, started);
    store.unload().await.map_err(step("unload"))?;

    // Clean and dirty loads alternate, `LOAD_ROUNDS` of each, so neither kind always runs on
    // colder caches; each kind's median is reported. The first clean load's store also times
    // open + close; the last dirty load's store times the deletes.
    let mut clean_ms = Vec::with_capacity(LOAD_ROUNDS);
    let mut dirty_ms = Vec::with_capacity(LOAD_ROUNDS);
    let mut open_close_per_s = 0.0;
    let mut loaded = None;
    for round in 0..LOAD_ROUNDS {
        stop_point(|| {
            format!("{round} of {LOAD_ROUNDS} load rounds (no table: the phases did not finish)")
        })?;
        let started = Instant::now();
        let (store, _) = Blobstore::load(desc.clone(), &LoadOptions::default())
            .await
            .map_err(step("clean load"))?;
        clean_ms.push(started.elapsed().as_secs_f64() * 1e3);

        if round == 0 {
            let started = Instant::now();
            for (opened, &id) in ids.iter().enumerate() {
                if let Err(err) = stop_point(|| {
                    format!("{opened} of {blobs} blobs opened and closed (no table: the phases did not finish)")
                }) {
                    return Err(unloading(store, err).await);
                }
                let blob = store.open_blob(id).await.map_err(step("open"))?;
                blob.close().await.map_err(step("close"))?;
            }
            open_close_per_s = rate(blobs, started);
        }

        // A metadata change makes the on-disk super block dirty; then "crash" (no unload).
        let marker = store
            .create_blob(&BlobOptions::default())
            .await
            .map_err(step("create"))?;
        std::mem::forget(store);
        let started = Instant::now();
        let (store, report) = Blobstore::load(desc.clone(), &LoadOptions::default())
            .await
            .map_err(step("dirty load"))?;
        dirty_ms.push(started.elapsed().as_secs_f64() * 1e3);
        if !report.recovered || report.blobs as u64 != blobs + 1 {
            return Err(EngineError::Failed {
                reason: format!(
                    "dirty load found {} blobs (recovered: {}), expected {}",
                    report.blobs,
                    report.recovered,
                    blobs + 1
                ),
                errno: -libc::EIO,
            });
        }
        // Undo the change so the next round's clean load sees the same store.
        store.delete_blob(marker).await.map_err(step("delete"))?;
        if round + 1 < LOAD_ROUNDS {
            store.unload().await.map_err(step("unload"))?;
        } else {
            loaded = Some(store);
        }
    }
    let clean_load_ms = median(&mut clean_ms);
    let dirty_load_ms = median(&mut dirty_ms);
    let store = loaded.ok_or_else(|| EngineError::Failed {
        reason: "no load round ran".into(),
        errno: -libc::EINVAL,
    })?;

    let started = Instant::now();
    for (deleted, &id) in ids.iter().enumerate() {
        if let Err(err) = stop_point(|| {
            format!("{deleted} of {blobs} blobs deleted (no table: the phases did not finish)")
        }) {
            return Err(unloading(store, err).await);
        }
        store.delete_blob(id).await.map_err(step("delete"))?;
    }
    let delete_per_s = rate(blobs, started);
    store.unload().await.map_err(step("unload"))?;
    Ok(MetadataReport {
        thick_write_per_s: io.thick_write_per_s,
        thin_first_write_per_s: io.thin_first_write_per_s,
        snapshot_ms: io.snapshot_ms,
        loaded_snapshot_ms: io.loaded_snapshot_ms,
        snapshot_pause_us: io.snapshot_pause_us,
        clone_ms: io.clone_ms,
        blobs,
        create_per_s,
        open_close_per_s,
        delete_per_s,
        clean_load_ms,
        dirty_load_ms,
        md_pages,
    })
}

/// Unloads `store` after `err` ended the run early (a stop signal), and returns `err`.
async fn unloading(store: Blobstore, err: EngineError) -> EngineError {
    if let Err(unload) = store.unload().await {
        tracing::warn!(%unload, "unload after an interrupted metadata run failed");
    }
    err
}

/// Queue depth of the I/O phases.
pub(crate) const IO_QD: u64 = 32;

struct IoPhases {
    loaded_snapshot_ms: f64,
    thick_write_per_s: f64,
    thin_first_write_per_s: f64,
    snapshot_ms: f64,
    snapshot_pause_us: f64,
    clone_ms: f64,
}

/// `IO_QD` tasks write 4 KiB at the start of clusters `0..clusters` of `io`, each cluster
/// once; returns writes per second.
async fn cluster_writes(
    channel: &spool_blob::BlobChannel,
    io: &std::sync::Arc<spool_blob::BlobIo>,
    clusters: u64,
    units_per_cluster: u64,
) -> Result<f64, EngineError> {
    let next = Rc::new(Cell::new(0u64));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..IO_QD {
        let (next, channel, io) = (Rc::clone(&next), channel.clone(), std::sync::Arc::clone(io));
        tasks.push(spool_reactor::spawn_local(async move {
            let mut buf = spool_bdev::DmaBuf::alloc(4096)?;
            loop {
                let index = next.get();
                if index >= clusters {
                    return Ok::<(), EngineError>(());
                }
                next.set(index + 1);
                let (result, back) = channel.write(&io, index * units_per_cluster, buf).await;
                result.map_err(step("write"))?;
                buf = back;
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(rate(clusters, started))
}

/// Thick vs thin first writes, then the pause a snapshot causes under random writes, and
/// the snapshot's and a clone's latency. Cleans up after itself.
async fn io_phases(store: &Blobstore) -> Result<IoPhases, EngineError> {
    let units_per_cluster = store.cluster_size() / store.io_unit_size();
    let clusters = (store.free_cluster_count() / 3).min(8192);
    if clusters < IO_QD {
        return Err(EngineError::Failed {
            reason: format!(
                "only {} free clusters: use a larger target",
                store.free_cluster_count()
            ),
            errno: -libc::ENOSPC,
        });
    }
    let channel = store.channel()?;
    let thick = store
        .create_and_open(&BlobOptions {
            num_clusters: clusters,
            ..BlobOptions::default()
        })
        .await
        .map_err(step("create"))?;
    let thick_write_per_s =
        cluster_writes(&channel, &thick.io(), clusters, units_per_cluster).await?;
    let thin = store
        .create_and_open(&BlobOptions {
            num_clusters: clusters,
            thin: true,
            ..BlobOptions::default()
        })
        .await
        .map_err(step("create"))?;
    let thin_id = thin.id();
    let thin_first_write_per_s =
        cluster_writes(&channel, &thin.io(), clusters, units_per_cluster).await?;
    thin.close().await?;
    // The snapshot pause: random 4 KiB writes at qd 32 on the thick blob while it is
    // snapshotted; the longest write latency in that window.
    let stop = Rc::new(Cell::new(false));
    let worst_ns = Rc::new(Cell::new(0u64));
    let window = Rc::new(Cell::new(false));
    let mut writers = Vec::new();
    for seed in 0..IO_QD {
        let (stop, worst_ns, window) = (Rc::clone(&stop), Rc::clone(&worst_ns), Rc::clone(&window));
        let (channel, io) = (channel.clone(), thick.io());
        writers.push(spool_reactor::spawn_local(async move {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut buf = spool_bdev::DmaBuf::alloc(4096)?;
            let units = io.num_io_units();
            while !stop.get() {
                let started = spool_reactor::now_ns();
                let (result, back) = channel.write(&io, rng.u64(0..units), buf).await;
                result.map_err(step("write"))?;
                buf = back;
                if window.get() {
                    worst_ns.set(worst_ns.get().max(spool_reactor::now_ns() - started));
                }
            }
            Ok::<(), EngineError>(())
        }));
    }
    spool_reactor::sleep(std::time::Duration::from_millis(200)).await;
    window.set(true);
    let started = Instant::now();
    let snap = store
        .create_snapshot(thick.id(), &[])
        .await
        .map_err(step("snapshot"))?;
    let loaded_snapshot_ms = started.elapsed().as_secs_f64() * 1e3;
    // Writes that waited for the freeze complete right after it.
    spool_reactor::sleep(std::time::Duration::from_millis(5)).await;
    window.set(false);
    stop.set(true);
    for writer in writers {
        writer.await??;
    }
    let started = Instant::now();
    let clone = store.create_clone(snap, &[]).await.map_err(step("clone"))?;
    let clone_ms = started.elapsed().as_secs_f64() * 1e3;
    let thick_id = thick.id();
    thick.close().await?;
    // Snapshot latency without I/O competing for the core.
    let started = Instant::now();
    let quiet = store
        .create_snapshot(thin_id, &[])
        .await
        .map_err(step("snapshot"))?;
    let snapshot_ms = started.elapsed().as_secs_f64() * 1e3;
    drop(channel);
    for id in [clone, thick_id, snap, thin_id, quiet] {
        store.delete_blob(id).await.map_err(step("delete"))?;
    }
    Ok(IoPhases {
        loaded_snapshot_ms,
        thick_write_per_s,
        thin_first_write_per_s,
        snapshot_ms,
        snapshot_pause_us: worst_ns.get() as f64 / 1e3,
        clone_ms,
    })
}
