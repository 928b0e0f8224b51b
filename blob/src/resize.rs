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
            // A cluster an unpersisted shrink cut off is still named by the durable map at
            // its old index: reusing it at another index would put this write where a crash
            // shows it at the wrong offset (seed 86541517). Only same-index spares are reused;
            // the rest of the grow takes free clusters.
            let mut spare = state.pending_release.borrow_mut();
            let mut from_spare: Vec<Option<u32>> = Vec::with_capacity(grow);
            for index in old_len..new_len {
                let found = spare.iter().position(|&(at, _)| at == index);
                from_spare.push(found.map(|position| spare.swap_remove(position).1));
            }
            let needed = from_spare.iter().filter(|c| c.is_none()).count();
            let give_back_spares = |spare: &mut Vec<(usize, u32)>, from_spare: &[Option<u32>]| {
                for (offset, cluster) in from_spare.iter().enumerate() {
                    if let Some(cluster) = cluster {
                        spare.push((old_len + offset, *cluster));
                    }
                }
            };
            let available = store.free_cluster_count();
            if available < needed as u64 {
                give_back_spares(&mut spare, &from_spare);
                return Err(BlobError::NoSpace(format!(
                    "blob {:#x}: growing by {grow} clusters needs {needed} free, {available} are",
                    state.id
                )));
            }
            let mut fresh = Vec::with_capacity(needed);
            while fresh.len() < needed {
                match store.shared().claim_cluster() {
                    Some(cluster) => fresh.push(cluster),
                    None => {
                        // Another reactor took clusters meanwhile: give back what we claimed.
                        for cluster in fresh {
                            store.shared().release_cluster(cluster);
                        }
                        give_back_spares(&mut spare, &from_spare);
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
            if let Err(err) = reserve_clusters(store, &fresh) {
                for &cluster in &fresh {
                    store.shared().release_cluster(cluster);
                }
                give_back_spares(&mut spare, &from_spare);
                return Err(reserve_error(
                    state.id,
                    needed as u64,
                    store.cluster_size(),
                    err,
                ));
            }
            let mut fresh = fresh.into_iter();
            let claimed: Vec<u32> = from_spare
                .iter()
                .map(|spared| spared.or_else(|| fresh.next()).unwrap_or(0))
                .collect();
            meta.clusters.extend(claimed);
        }
    } else {
        let cut = meta.clusters.split_off(new_len);
        state.pending_release.borrow_mut().extend(
            cut.into_iter()
                .enumerate()
                .filter(|&(_, cluster)| cluster != 0)
                .map(|(offset, cluster)| (new_len + offset, cluster)),
        );
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
    for &cluster in meta.clusters.iter().chain(
        state
            .pending_release
            .borrow()
            .iter()
            .map(|(_, cluster)| cluster),
    ) {
        if cluster != 0 {
            store.shared().release_cluster(cluster);
        }
    }
}
