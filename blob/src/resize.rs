//! Changing a blob's size in memory (the metadata reactor's half of resize; the caller
//! persists it).

use crate::blob::BlobState;
use crate::error::{BlobError, Result};
use crate::format::EXTENTS_PER_PAGE;
use crate::meta::{ExtentForm, MAX_BLOB_CLUSTERS};
use crate::store::Blobstore;
use spool_bdev::BdevError;

/// Sets `state`'s size to `num_clusters` (see [`crate::Blob::resize`]).
pub(crate) fn resize(store: &Blobstore, state: &BlobState, num_clusters: u64) -> Result<()> {
    if num_clusters > MAX_BLOB_CLUSTERS {
        return Err(BlobError::InvalidArgument(format!(
            "{num_clusters} clusters is more than the {MAX_BLOB_CLUSTERS} this build supports per blob"
        )));
    }
    let new_len = num_clusters as usize;
    let mut meta = state.meta.borrow_mut();
    let old_len = meta.clusters.len();
    if new_len == old_len {
        return Ok(());
    }
    if new_len > old_len {
        let grow = new_len - old_len;
        if meta.is_thin() {
            meta.clusters.resize(new_len, 0);
        } else {
            let mut spare = state.pending_release.borrow_mut();
            let available = store.free_cluster_count() + spare.len() as u64;
            if available < grow as u64 {
                return Err(BlobError::NoSpace(format!(
                    "blob {:#x}: growing by {grow} clusters needs {grow} free, {available} are",
                    state.id
                )));
            }
            let mut claimed = Vec::with_capacity(grow);
            let mut from_spare = 0;
            while claimed.len() < grow {
                let next = match spare.pop() {
                    Some(cluster) => {
                        from_spare += 1;
                        Some(cluster)
                    }
                    None => store.shared().claim_cluster(),
                };
                match next {
                    Some(cluster) => claimed.push(cluster),
                    None => {
                        // Another reactor took clusters meanwhile: give back what we claimed.
                        for cluster in claimed {
                            store.shared().release_cluster(cluster);
                        }
                        return Err(BlobError::NoSpace(format!(
                            "blob {:#x}: not enough free clusters to grow by {grow}",
                            state.id
                        )));
                    }
                }
            }
            // A thick blob's clusters are reserved on the host now (a file: fallocate), so
            // its writes cannot later fail for lack of space; a full host fails here, with
            // nothing changed.
            if let Err(err) = reserve_clusters(store, &claimed) {
                let (spared, claimed_now) = claimed.split_at(from_spare);
                for &cluster in claimed_now {
                    store.shared().release_cluster(cluster);
                }
                spare.extend(spared.iter().rev().copied());
                return Err(reserve_error(
                    state.id,
                    grow as u64,
                    store.cluster_size(),
                    err,
                ));
            }
            meta.clusters.extend(claimed);
        }
    } else {
        let cut = meta.clusters.split_off(new_len);
        state
            .pending_release
            .borrow_mut()
            .extend(cut.into_iter().filter(|&cluster| cluster != 0));
    }
    if meta.form == ExtentForm::Table {
        let needed = new_len.div_ceil(EXTENTS_PER_PAGE as usize);
        if meta.extent_pages.len() > needed {
            let cut = meta.extent_pages.split_off(needed);
            state
                .pending_extent_release
                .borrow_mut()
                .extend(cut.into_iter().filter(|&page| page != 0));
            state
                .dirty_extent_pages
                .borrow_mut()
                .retain(|&page| page < needed);
        } else {
            meta.extent_pages.resize(needed, 0);
        }
    }
    let changed = old_len.min(new_len).saturating_sub(1)..old_len.max(new_len).min(new_len);
    drop(meta);
    state.touch_clusters(changed);
    state.publish_map();
    state.mark_changed();
    Ok(())
}

/// Reserves `clusters` (device cluster indexes) on the host, one call per contiguous run.
fn reserve_clusters(store: &Blobstore, clusters: &[u32]) -> std::result::Result<(), BdevError> {
    let cluster_size = store.cluster_size();
    let bdev = &store.shared().bdev;
    let mut index = 0;
    while index < clusters.len() {
        let first = clusters[index];
        let mut run = 1;
        while index + run < clusters.len()
            && u64::from(clusters[index + run]) == u64::from(first) + run as u64
        {
            run += 1;
        }
        bdev.reserve(u64::from(first) * cluster_size, run as u64 * cluster_size)?;
        index += run;
    }
    Ok(())
}

/// A failed reservation in words: a full host says so, naming the bytes.
fn reserve_error(id: u64, clusters: u64, cluster_size: u64, err: BdevError) -> BlobError {
    if err.errno() == -libc::ENOSPC {
        return BlobError::HostNoSpace {
            id,
            clusters,
            bytes: clusters * cluster_size,
        };
    }
    BlobError::Bdev(err)
}

/// Releases every cluster a never-persisted blob claimed (a failed create).
pub(crate) fn release_all(store: &Blobstore, state: &BlobState) {
    let meta = state.meta.borrow();
    for &cluster in meta
        .clusters
        .iter()
        .chain(state.pending_release.borrow().iter())
    {
        if cluster != 0 {
            store.shared().release_cluster(cluster);
        }
    }
}
