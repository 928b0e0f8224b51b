//! `spool perf --layer md`: metadata rates on the target, on one reactor (the metadata
//! reactor): create (each create writes its blob's metadata: SPDK's create + sync), open +
//! close, delete, each over `--blobs` blobs, and the time to load the store clean (after an
//! unload) and dirty (after a crash: the store is dropped without unloading, so the load
//! replays every metadata page).

use std::time::Instant;

use serde::Serialize;
use spool_bdev::BdevDesc;
use spool_blob::{BlobOptions, Blobstore, InitOptions, LoadOptions};

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
    /// Milliseconds to load the store with `blobs` blobs after a clean unload.
    pub clean_load_ms: f64,
    /// Milliseconds to load it after a crash (recovery replays the metadata).
    pub dirty_load_ms: f64,
    /// Md pages of the store.
    pub md_pages: u32,
}

impl MetadataReport {
    /// The report as a table for people.
    pub fn to_table(&self) -> String {
        format!(
            "spool perf --layer md: {} blobs, {} md pages\n{:>22} {:>12}\n{:>22} {:>12.0}\n{:>22} {:>12.0}\n{:>22} {:>12.0}\n{:>22} {:>12.1}\n{:>22} {:>12.1}\n",
            self.blobs,
            self.md_pages,
            "phase",
            "rate",
            "create+sync ops/s",
            self.create_per_s,
            "open+close ops/s",
            self.open_close_per_s,
            "delete ops/s",
            self.delete_per_s,
            "clean load ms",
            self.clean_load_ms,
            "dirty load ms",
            self.dirty_load_ms,
        )
    }
}

fn rate(count: u64, started: Instant) -> f64 {
    count as f64 / started.elapsed().as_secs_f64().max(1e-9)
}

/// Runs the phases on the calling reactor over `desc`.
pub async fn run(desc: BdevDesc, blobs: u64, cluster_size: u64) -> Result<MetadataReport, String> {
    let md_pages = u32::try_from(blobs + 64).map_err(|_| format!("--blobs {blobs} is too many"))?;
    let store = Blobstore::init(
        desc.clone(),
        &InitOptions {
            cluster_size,
            md_pages: Some(md_pages),
            ..InitOptions::default()
        },
    )
    .await
    .map_err(|err| format!("blobstore init: {err}"))?;
    let started = Instant::now();
    let mut ids = Vec::with_capacity(blobs as usize);
    for _ in 0..blobs {
        ids.push(
            store
                .create_blob(&BlobOptions::default())
                .await
                .map_err(|err| format!("create: {err}"))?,
        );
    }
    let create_per_s = rate(blobs, started);
    store
        .unload()
        .await
        .map_err(|err| format!("unload: {err}"))?;

    let started = Instant::now();
    let (store, _) = Blobstore::load(desc.clone(), &LoadOptions::default())
        .await
        .map_err(|err| format!("clean load: {err}"))?;
    let clean_load_ms = started.elapsed().as_secs_f64() * 1e3;

    let started = Instant::now();
    for &id in &ids {
        let blob = store
            .open_blob(id)
            .await
            .map_err(|err| format!("open: {err}"))?;
        blob.close().await.map_err(|err| format!("close: {err}"))?;
    }
    let open_close_per_s = rate(blobs, started);

    // A metadata change makes the on-disk super block dirty; then "crash" (no unload).
    let marker = store
        .create_blob(&BlobOptions::default())
        .await
        .map_err(|err| format!("create: {err}"))?;
    std::mem::forget(store);
    let started = Instant::now();
    let (store, report) = Blobstore::load(desc, &LoadOptions::default())
        .await
        .map_err(|err| format!("dirty load: {err}"))?;
    let dirty_load_ms = started.elapsed().as_secs_f64() * 1e3;
    if !report.recovered || report.blobs as u64 != blobs + 1 {
        return Err(format!(
            "dirty load found {} blobs (recovered: {}), expected {}",
            report.blobs,
            report.recovered,
            blobs + 1
        ));
    }

    let started = Instant::now();
    for &id in &ids {
        store
            .delete_blob(id)
            .await
            .map_err(|err| format!("delete: {err}"))?;
    }
    let delete_per_s = rate(blobs, started);
    store
        .delete_blob(marker)
        .await
        .map_err(|err| format!("delete: {err}"))?;
    store
        .unload()
        .await
        .map_err(|err| format!("unload: {err}"))?;
    Ok(MetadataReport {
        blobs,
        create_per_s,
        open_close_per_s,
        delete_per_s,
        clean_load_ms,
        dirty_load_ms,
        md_pages,
    })
}
