//! Writing a blob's metadata, crash-safely, in SPDK's commit order: extent pages and
//! continuation pages first, then the root page (the commit point), then the old pages are
//! zeroed and released and the clusters a shrink cut off are freed.
//!
//! Ordering on devices with a volatile cache: a flush separates the pages the new root
//! depends on from the root, and the root from the zeroing of the pages the old root used,
//! whenever there are such pages. A single-page chain with no new extent pages (the common
//! create or xattr change) is one write.

use std::collections::BTreeSet;

use crate::blob::BlobState;
use crate::error::{BlobError, Result};
use crate::format::md_page::encode_page;
use crate::format::{blobid_to_page, EXTENTS_PER_PAGE, INVALID_MD_PAGE, PAGE_SIZE_U64};
use crate::meta::{encode_extent_page, serialize_chain, ExtentForm};
use crate::store::md_io::{flush, write_pages, zero_bytes};
use crate::store::Blobstore;

/// Persists `state` if it is dirty. Serialised per blob; every end (success or not)
/// notifies the inserts waiting for a persist.
pub(crate) async fn persist(store: &Blobstore, state: &BlobState) -> Result<()> {
    let result = persist_locked(store, state).await;
    state.persisted.notify();
    result
}

async fn persist_locked(store: &Blobstore, state: &BlobState) -> Result<()> {
    let _guard = state.persist_lock.lock().await;
    if !state.dirty.get() {
        return Ok(());
    }
    store.mark_dirty().await?;
    let geometry = store.geometry().clone();
    let root = blobid_to_page(state.id).ok_or(BlobError::NoSuchBlob(state.id))?;
    // Plan: claim pages, encode everything, while holding no borrow across an await.
    let mut claimed: Vec<u32> = Vec::new();
    let plan = plan_writes(store, state, root, &mut claimed);
    let plan = match plan {
        Ok(plan) => plan,
        Err(err) => {
            release_md_pages(store, &claimed);
            return Err(err);
        }
    };
    state.dirty.set(false);
    state.chain_changed.set(false);
    let plan_seq = state.insert_seq.get();
    let inserted: Vec<(usize, u32)> = std::mem::take(&mut *state.unpublished.borrow_mut());
    let channel = &store.inner.md_channel;
    let result: Result<()> = async {
        match &plan.root_bytes {
            Some(root_bytes) => {
                if !plan.before_root.is_empty() {
                    write_pages(channel, &plan.before_root).await?;
                    flush(channel).await?;
                }
                write_pages(
                    channel,
                    &[(geometry.md_page_offset(root), root_bytes.clone())],
                )
                .await?;
            }
            None => write_pages(channel, &plan.before_root).await?,
        }
        Ok(())
    }
    .await;
    if let Err(err) = result {
        state.mark_changed();
        // Thin inserts this persist carried are undone: their writers release the
        // clusters and fail (the metadata never reached the disk).
        {
            let mut meta = state.meta.borrow_mut();
            for &(index, cluster) in &inserted {
                if meta.clusters.get(index) == Some(&cluster) {
                    meta.clusters[index] = 0;
                }
            }
        }
        state.touch_clusters(0..state.meta.borrow().clusters.len());
        // Moved extent pages go back to their old pages (the old root points there); newly
        // claimed ones stay recorded in memory (a retry rewrites them); continuation pages
        // are unreferenced by the old root: give them back.
        {
            let mut meta = state.meta.borrow_mut();
            let mut given_back = Vec::new();
            for &(index, old) in &plan.replaced_extent_pages {
                if let Some(slot) = meta.extent_pages.get_mut(index) {
                    given_back.push(*slot);
                    *slot = old;
                }
            }
            drop(meta);
            release_md_pages(store, &given_back);
        }
        release_md_pages(store, &plan.new_continuation);
        return Err(err);
    }
    if plan.root_bytes.is_some() {
        state.chain_written.set(true);
    }
    // Committed: I/O reactors may now see the clusters thin writes inserted.
    state.durable_seq.set(state.durable_seq.get().max(plan_seq));
    for &(index, cluster) in &inserted {
        state.io.publish(index, cluster);
    }
    // Zero and release what the old root used and the new one does not.
    let old_pages: Vec<u32> = std::mem::replace(&mut *state.pages.borrow_mut(), plan.chain.clone());
    let new_set: BTreeSet<u32> = plan.chain.iter().copied().collect();
    let mut stale: Vec<u32> = old_pages
        .into_iter()
        .filter(|page| !new_set.contains(page))
        .collect();
    stale.extend(state.pending_extent_release.borrow_mut().drain(..));
    stale.extend(plan.replaced_extent_pages.iter().map(|&(_, old)| old));
    if !stale.is_empty() {
        flush(channel).await?;
        for &page in &stale {
            zero_bytes(channel, geometry.md_page_offset(page), PAGE_SIZE_U64).await?;
        }
        release_md_pages(store, &stale);
    }
    release_clusters(store, state).await;
    Ok(())
}

struct Plan {
    /// Extent pages and continuation pages: written (then flushed) before the root.
    before_root: Vec<(u64, Vec<u8>)>,
    /// The root page; `None` when only extent pages change (written in place).
    root_bytes: Option<Vec<u8>>,
    /// Extent pages moved to new pages: `(extent page number, old md page)`.
    replaced_extent_pages: Vec<(usize, u32)>,
    /// The new chain, root first.
    chain: Vec<u32>,
    new_continuation: Vec<u32>,
}

fn claim_md_page(store: &Blobstore, from: u32) -> Result<u32> {
    let mut md = store.inner.state.borrow_mut();
    let page = md
        .used_md_pages
        .first_clear(u64::from(from))
        .or_else(|| md.used_md_pages.first_clear(0))
        .ok_or_else(|| BlobError::NoMdPages("every metadata page is in use".into()))?;
    md.used_md_pages.set(page);
    Ok(page as u32)
}

fn release_md_pages(store: &Blobstore, pages: &[u32]) {
    let mut md = store.inner.state.borrow_mut();
    for &page in pages {
        md.used_md_pages.clear(u64::from(page));
    }
}

fn plan_writes(
    store: &Blobstore,
    state: &BlobState,
    root: u32,
    claimed: &mut Vec<u32>,
) -> Result<Plan> {
    let geometry = store.geometry();
    let mut before_root = Vec::new();
    let mut replaced = Vec::new();
    let mut meta = state.meta.borrow_mut();
    if meta.form == ExtentForm::Table {
        let needed = meta.extent_pages_needed();
        meta.extent_pages.resize(needed, 0);
        let per = EXTENTS_PER_PAGE as usize;
        let mut marked = state.dirty_extent_pages.borrow_mut();
        let mut fresh = Vec::new();
        // Only a touched extent page can have gained its first cluster.
        let touched: Vec<usize> = marked
            .iter()
            .copied()
            .filter(|&index| index < needed)
            .collect();
        for index in touched {
            let start = index * per;
            let end = (start + per).min(meta.clusters.len());
            let has_clusters = meta.clusters[start..end].iter().any(|&c| c != 0);
            if meta.extent_pages[index] == 0 && has_clusters {
                let page = claim_md_page(store, root)?;
                claimed.push(page);
                meta.extent_pages[index] = page;
                fresh.push(index);
                marked.insert(index);
            }
        }
        let dirty: Vec<usize> = marked
            .iter()
            .copied()
            .filter(|&index| index < needed && meta.extent_pages[index] != 0)
            .collect();
        marked.clear();
        if fresh.is_empty() && !state.chain_changed.get() && state.chain_written.get() {
            // Only extent pages changed (thin inserts): each is rewritten in place, one
            // single-page write each; the chain on disk already points at them.
            let writes = dirty
                .iter()
                .map(|&index| {
                    let page = meta.extent_pages[index];
                    (
                        geometry.md_page_offset(page),
                        encode_extent_page(&meta, index),
                    )
                })
                .collect();
            return Ok(Plan {
                before_root: writes,
                root_bytes: None,
                chain: state.pages.borrow().clone(),
                new_continuation: Vec::new(),
                replaced_extent_pages: Vec::new(),
            });
        }
        // The chain changes too: an extent page already on disk is never rewritten in place
        // (the old root may still need it): it moves to a new page, the old one is freed
        // once the new root is on disk.
        for &index in &dirty {
            if !fresh.contains(&index) {
                let page = claim_md_page(store, root)?;
                claimed.push(page);
                replaced.push((index, meta.extent_pages[index]));
                meta.extent_pages[index] = page;
            }
        }
        for &index in &dirty {
            let page = meta.extent_pages[index];
            before_root.push((
                geometry.md_page_offset(page),
                encode_extent_page(&meta, index),
            ));
        }
    }
    let areas = serialize_chain(&meta)?;
    let mut chain = vec![root];
    let mut new_continuation = Vec::new();
    for _ in 1..areas.len() {
        let from = chain.last().copied().unwrap_or(root);
        let page = claim_md_page(store, from)?;
        claimed.push(page);
        new_continuation.push(page);
        chain.push(page);
    }
    let mut root_bytes = Vec::new();
    for (sequence, area) in areas.iter().enumerate() {
        let next = chain.get(sequence + 1).copied().unwrap_or(INVALID_MD_PAGE);
        let bytes = encode_page(state.id, sequence as u32, next, area.bytes());
        if sequence == 0 {
            root_bytes = bytes;
        } else {
            before_root.push((geometry.md_page_offset(chain[sequence]), bytes));
        }
    }
    Ok(Plan {
        before_root,
        root_bytes: Some(root_bytes),
        chain,
        new_continuation,
        replaced_extent_pages: replaced,
    })
}

/// Frees the clusters a shrink cut off (best-effort unmap first).
async fn release_clusters(store: &Blobstore, state: &BlobState) {
    let clusters: Vec<u32> = state.pending_release.borrow_mut().drain(..).collect();
    let cluster_size = store.cluster_size();
    for cluster in clusters {
        let unmapped = store
            .inner
            .md_channel
            .unmap(u64::from(cluster) * cluster_size, cluster_size)
            .await
            .is_ok();
        if unmapped && store.shared().desc_reads_zeroes {
            store.shared().zeroed.set(u64::from(cluster));
        }
        store.shared().release_cluster(cluster);
    }
}

/// Deletes `state` from disk: zero the root (the commit point: the blob is gone), flush,
/// zero the other pages, release every page, the blob id and every cluster.
pub(crate) async fn delete(store: &Blobstore, state: &BlobState) -> Result<()> {
    let _guard = state.persist_lock.lock().await;
    store.mark_dirty().await?;
    let geometry = store.geometry().clone();
    let root = blobid_to_page(state.id).ok_or(BlobError::NoSuchBlob(state.id))?;
    let channel = &store.inner.md_channel;
    zero_bytes(channel, geometry.md_page_offset(root), PAGE_SIZE_U64).await?;
    {
        let mut md = store.inner.state.borrow_mut();
        md.used_blobids.clear(u64::from(root));
    }
    flush(channel).await?;
    let mut pages: Vec<u32> = state.pages.borrow().iter().skip(1).copied().collect();
    {
        let meta = state.meta.borrow();
        pages.extend(meta.extent_pages.iter().copied().filter(|&p| p != 0));
    }
    pages.extend(state.pending_extent_release.borrow_mut().drain(..));
    for &page in &pages {
        zero_bytes(channel, geometry.md_page_offset(page), PAGE_SIZE_U64).await?;
    }
    pages.push(root);
    release_md_pages(store, &pages);
    {
        let mut meta = state.meta.borrow_mut();
        let clusters = std::mem::take(&mut meta.clusters);
        state
            .pending_release
            .borrow_mut()
            .extend(clusters.into_iter().filter(|&c| c != 0));
        meta.extent_pages.clear();
    }
    state.io.replace_map(&[]);
    release_clusters(store, state).await;
    Ok(())
}

/// The metadata reactor's half of a thin write: insert device `cluster` as blob cluster
/// `index` of open blob `blob_id` and persist. `Err(-EEXIST)` when another write already
/// inserted one there (returned only once that one is on disk and visible).
pub(crate) async fn insert_cluster(
    store: &Blobstore,
    blob_id: u64,
    index: u64,
    cluster: u32,
) -> std::result::Result<(), i32> {
    let state = store
        .inner
        .state
        .borrow()
        .open_blobs
        .get(&blob_id)
        .cloned()
        .ok_or(-libc::EBADF)?;
    let index = index as usize;
    let existing = {
        let meta = state.meta.borrow();
        *meta.clusters.get(index).ok_or(-libc::EINVAL)?
    };
    if existing != 0 {
        // Report the race once the winner's insert is on disk (visible) or undone.
        loop {
            let now = state
                .meta
                .borrow()
                .clusters
                .get(index)
                .copied()
                .unwrap_or(0);
            if now == 0 || state.io.published(index) != 0 {
                return Err(-libc::EEXIST);
            }
            wait_for_persist(store, &state).await?;
        }
    }
    state.meta.borrow_mut().clusters[index] = cluster;
    state.unpublished.borrow_mut().push((index, cluster));
    state.touch_clusters(index..index + 1);
    state.dirty.set(true);
    let seq = state.insert_seq.get() + 1;
    state.insert_seq.set(seq);
    // Group commit: one persist carries every insert made while the previous one ran.
    loop {
        if state.meta.borrow().clusters.get(index) != Some(&cluster) {
            return Err(-libc::EIO); // a failed persist undid it
        }
        if state.durable_seq.get() >= seq {
            return Ok(());
        }
        wait_for_persist(store, &state).await?;
    }
}

/// Runs a persist if none is running, else waits for the running one to finish.
async fn wait_for_persist(store: &Blobstore, state: &BlobState) -> std::result::Result<(), i32> {
    if state.persist_lock.is_locked() {
        state.persisted.wait().await;
        Ok(())
    } else {
        persist(store, state).await.map_err(|err| err.errno())
    }
}
