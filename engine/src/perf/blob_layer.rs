//! [`Layer::Blob`](super::Layer::Blob) (`spool perf --layer blob`): the job runs through the blobstore. A store is initialised on
//! the target and one thick blob takes every data cluster; the jobs address the blob, so each
//! I/O pays the blob layer's cost (bounds and read-only checks, the cluster lookup) on top of
//! the bdev's. The store is unloaded cleanly at the end.

use std::cell::RefCell;
use std::sync::Arc;

use spool_bdev::BdevDesc;
use spool_blob::{Blob, BlobIo, BlobOptions, Blobstore, InitOptions};

use crate::error::step;
use crate::EngineError;

thread_local! {
    /// The store and the open blob, kept on the metadata reactor between set-up and
    /// tear-down (they are not `Send`).
    static HELD: RefCell<Option<(Blobstore, Blob)>> = const { RefCell::new(None) };
}

/// On the calling (metadata) reactor: init a store on `desc` with `cluster_size` clusters,
/// create and open one thick blob over all free clusters; returns its I/O handle.
pub async fn setup(desc: BdevDesc, cluster_size: u64) -> Result<Arc<BlobIo>, EngineError> {
    let store = Blobstore::init(
        desc,
        &InitOptions {
            cluster_size,
            // Keep a fully written file allocated: reads must reach the media, as on the
            // bdev layer.
            unmap_data: false,
            ..InitOptions::default()
        },
    )
    .await
    .map_err(step("blobstore init"))?;
    let clusters = store.free_cluster_count();
    // Kept open from creation: on the null target nothing written can be read back.
    let blob = store
        .create_and_open(&BlobOptions {
            num_clusters: clusters,
            ..BlobOptions::default()
        })
        .await
        .map_err(|err| step(&format!("create a blob of {clusters} clusters"))(err))?;
    let io = blob.io();
    HELD.with(|held| *held.borrow_mut() = Some((store, blob)));
    Ok(io)
}

/// On the same reactor as [`setup`]: close the blob and unload the store.
pub async fn teardown() -> Result<(), EngineError> {
    let Some((store, blob)) = HELD.with(|held| held.borrow_mut().take()) else {
        return Ok(());
    };
    blob.close().await?;
    Ok(store.unload().await?)
}
