//! Writing a blob's metadata, crash-safely, in SPDK's commit order: extent pages and
//! continuation pages first, then the root page (the commit point), then the old pages are
//! zeroed and released and the clusters a shrink cut off are freed.
//!
//! Ordering on devices with a volatile cache (the rule is in `store::durability` and the
//! table in docs/blob.md): the pages only the new root reaches are written first; then one
//! flush (the barrier) when the commit write depends on anything not yet durable (those
//! pages, the data of the clusters thin writes inserted, extent pages this blob rewrote in
//! place earlier, or, for [`Deps::All`], any earlier metadata write of the operation); then
//! the commit write; then, when the old state held pages or clusters the new one does not, a
//! flush before they are zeroed, unmapped and given back. A single-page chain with nothing
//! to depend on (the common create or xattr change) is still one write and no flush.

use std::collections::BTreeSet;
use std::rc::Rc;

use crate::blob::BlobState;
use crate::error::{BlobError, Result};
use crate::format::md_page::encode_page;
use crate::format::{blobid_to_page, EXTENTS_PER_PAGE, INVALID_MD_PAGE, PAGE_SIZE_U64};
use crate::meta::{encode_extent_page, serialize_chain, ExtentForm};
use crate::store::claim::ClusterClaim;
use crate::store::durability::Release;
use crate::store::md_io::{write_pages, zero_bytes};
use crate::store::Blobstore;

/// What a persist's commit write depends on besides the blob's own pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Deps {
    /// Only its own pages and the data it maps.
    Own,
    /// Also every metadata write made before it (another blob's root the same operation
    /// wrote first: a snapshot's map before the original drops it, a clone's new root
    /// before the snapshot's goes).
    All,
    /// Also metadata write number `n` (another blob's last write: a snapshot's map root
    /// names the original's clusters and extent pages, so the original's own last root, or
    /// extent page rewritten in place, must be durable first, or a cut could keep the
    /// snapshot's map without the original's, and the load, removing the snapshot as one
    /// never taken, would leak what only the snapshot's map names).
    After(u64),
}

/// How a persist ended: `Err` when it did not commit (everything it claimed is given
/// back, the blob stays dirty); `Ok(None)` when it committed and finished; `Ok(Some(err))`
/// when it committed (the new state is what the blob is now) but a step after the commit
/// failed. Whatever it released then waits for the next successful flush.
pub(crate) type Outcome = Result<Option<BlobError>>;

/// Persists `state` if it is dirty; a failure after the commit point is returned as an
/// error too (see [`persist_outcome`] to tell the two apart).
pub(crate) async fn persist(store: &Blobstore, state: &Rc<BlobState>) -> Result<()> {
    match persist_outcome(store, state, Deps::Own).await? {
        None => Ok(()),
        Some(err) => Err(err),
    }
}

/// Persists `state` if it is dirty, after every earlier metadata write is durable.
pub(crate) async fn persist_after_all(store: &Blobstore, state: &Rc<BlobState>) -> Outcome {
    persist_outcome(store, state, Deps::All).await
}

/// Persists `state` if it is dirty. Serialised per blob; every end (success or not)
/// notifies the inserts waiting for a persist. The persist runs as its own task: dropping
/// this future does not leave it half-done (the blob marked clean with nothing written, its
/// claimed pages held, its inserts neither published nor undone); it finishes regardless.
pub(crate) async fn persist_outcome(
    store: &Blobstore,
    state: &Rc<BlobState>,
    deps: Deps,
) -> Outcome {
    let (store, state) = (store.clone(), Rc::clone(state));
    crate::detach::detached_op(
        store.md_op_running(),
        async move {
            let result = persist_locked(&store, &state, deps).await;
            state.persisted.notify();
            result
        },
        crate::detach::forget,
    )
    .await
}

async fn persist_locked(store: &Blobstore, state: &BlobState, deps: Deps) -> Outcome {
    let _guard = state.persist_lock.lock().await;
    // Releases an earlier failed flush held back are freed by this one (a retry frees them
    // even when it has nothing else to write).
    if let Err(err) = store.drain_releases().await {
        undo_inserts(store, state, err.errno());
        return Err(err);
    }
    if !state.dirty.get() {
        return Ok(None);
    }
    if let Err(err) = store.mark_dirty().await {
        undo_inserts(store, state, err.errno());
        return Err(err);
    }
    let geometry = store.geometry().clone();
    let root = blobid_to_page(state.id).ok_or(BlobError::NoSuchBlob(state.id))?;
    // Plan: claim pages, encode everything, while holding no borrow across an await.
    let mut claimed: Vec<u32> = Vec::new();
    let mut fresh: Vec<usize> = Vec::new();
    let plan = plan_writes(store, state, root, &mut claimed, &mut fresh);
    let plan = match plan {
        Ok(plan) => plan,
        Err(err) => {
            give_back_fresh_extent_pages(state, &fresh);
            release_md_pages(store, &claimed);
            undo_inserts(store, state, err.errno());
            return Err(err);
        }
    };
    state.dirty.set(false);
    state.chain_changed.set(false);
    // What this plan drops, taken now: a shrink made while it is in flight leaves its own
    // releases for the persist that writes the smaller size.
    let cut_clusters: Vec<(usize, u32)> = std::mem::take(&mut *state.pending_release.borrow_mut());
    let cut_extent_pages: Vec<u32> =
        std::mem::take(&mut *state.pending_extent_release.borrow_mut());
    let plan_seq = state.insert_seq.get();
    let inserted: Vec<(usize, u32)> = std::mem::take(&mut *state.unpublished.borrow_mut());
    let channel = &store.inner.md_channel;
    let durability = &store.inner.durability;
    // Set once the in-place extent page writes (the commit of an insert-only persist) are
    // issued: some of them may then be on disk even if the request failed.
    let in_place_issued = std::cell::Cell::new(false);
    let result: Result<()> = async {
        // Pages only the new root reaches: harmless on disk until it is written.
        let pre_commit = plan.root_bytes.is_some() && !plan.before_root.is_empty();
        if pre_commit {
            let written = write_pages(channel, &plan.before_root).await;
            durability.wrote();
            written?;
        }
        let barrier = pre_commit
            || !inserted.is_empty()
            || !durability.is_durable(state.in_place_write.get())
            || (deps == Deps::All && durability.any_unflushed())
            || matches!(deps, Deps::After(n) if !durability.is_durable(n));
        if barrier {
            store.barrier().await?;
        }
        match &plan.root_bytes {
            Some(root_bytes) => {
                let written = write_pages(
                    channel,
                    &[(geometry.md_page_offset(root), root_bytes.clone())],
                )
                .await;
                state.last_write.set(durability.wrote());
                written
            }
            None => {
                in_place_issued.set(true);
                let written = write_pages(channel, &plan.before_root).await;
                let number = durability.wrote();
                state.in_place_write.set(number);
                state.last_write.set(number);
                written
            }
        }
    }
    .await;
    if let (Err(err), true) = (&result, in_place_issued.get()) {
        // Some extent pages may have reached the disk mapping the inserted clusters: they
        // stay in the map (not published), and the next persist rewrites the pages and
        // publishes them. Each writer still owns its cluster's release until it leaves: one
        // that gives up now hands it to the blob (`kept_inserts`, in `insert_cluster`); one
        // still waiting runs the next persist and releases it itself if that undoes it.
        state.dirty.set(true);
        for &(index, _) in &inserted {
            state.touch_clusters(index..index + 1);
        }
        state
            .unpublished
            .borrow_mut()
            .extend(inserted.iter().copied());
        state.pending_release.borrow_mut().extend(cut_clusters);
        state
            .pending_extent_release
            .borrow_mut()
            .extend(cut_extent_pages);
        return Err(BlobError::Remote {
            errno: err.errno(),
            what: format!(
                "blob {:#x}: rewriting its extent pages in place (the next persist retries)",
                state.id
            ),
        });
    }
    if let Err(err) = result {
        undo_failed_persist(store, state, &plan, &inserted, &fresh, err.errno());
        // Not committed: what the plan would have dropped is still the blob's to drop.
        let mut pending = state.pending_release.borrow_mut();
        let later = std::mem::replace(&mut *pending, cut_clusters);
        pending.extend(later);
        drop(pending);
        let mut pending = state.pending_extent_release.borrow_mut();
        let later = std::mem::replace(&mut *pending, cut_extent_pages);
        pending.extend(later);
        return Err(err);
    }
    if plan.root_bytes.is_some() {
        state.chain_written.set(true);
    }
    // Committed: I/O reactors may now see the clusters thin writes inserted.
    state.durable_seq.set(state.durable_seq.get().max(plan_seq));
    {
        // Only inserts still in the map: a kept one a shrink cut off was released by it.
        let meta = state.meta.borrow();
        for &(index, cluster) in &inserted {
            if meta.clusters.get(index) == Some(&cluster) {
                state.io.publish(index, cluster);
            }
        }
        state
            .kept_inserts
            .borrow_mut()
            .retain(|entry| !inserted.contains(entry));
    }
    // What the old root used and the new one does not: zeroed and released once the new
    // root is durable.
    let old_pages: Vec<u32> = std::mem::replace(&mut *state.pages.borrow_mut(), plan.chain.clone());
    let new_set: BTreeSet<u32> = plan.chain.iter().copied().collect();
    let mut stale: Vec<u32> = old_pages
        .into_iter()
        .filter(|page| !new_set.contains(page))
        .collect();
    stale.extend(cut_extent_pages);
    stale.extend(plan.replaced_extent_pages.iter().map(|&(_, old)| old));
    let stale = store.hold_pinned_pages(stale);
    let cut_clusters = cut_clusters
        .into_iter()
        .map(|(_, cluster)| cluster)
        .collect();
    Ok(finish_releases(store, &stale, stale.clone(), cut_clusters).await)
}

/// Takes the thin inserts waiting for a persist out of the map (their writers release the
/// clusters and fail): for a persist that fails before it wrote anything.
fn undo_inserts(store: &Blobstore, state: &BlobState, errno: i32) {
    let inserted: Vec<(usize, u32)> = std::mem::take(&mut *state.unpublished.borrow_mut());
    if inserted.is_empty() {
        return;
    }
    state.undone_errno.set(errno);
    {
        let mut meta = state.meta.borrow_mut();
        for &(index, cluster) in &inserted {
            if meta.clusters.get(index) == Some(&cluster) {
                meta.clusters[index] = 0;
            }
        }
    }
    release_kept(store, state, &inserted);
}

/// Of `undone` (inserts just taken out of the map), releases those whose writer has gone
/// (kept after a failed in-place write): nobody else will.
fn release_kept(store: &Blobstore, state: &BlobState, undone: &[(usize, u32)]) {
    let mut kept = state.kept_inserts.borrow_mut();
    kept.retain(|entry| {
        if undone.contains(entry) {
            store.shared().release_cluster(entry.1);
            false
        } else {
            true
        }
    });
}

/// Undoes what a persist that did not commit changed in memory: the thin inserts it carried
/// (their writers release the clusters and fail), extent pages moved or claimed for it, and
/// the continuation pages it claimed. The blob stays dirty: a retry rewrites it all.
fn undo_failed_persist(
    store: &Blobstore,
    state: &BlobState,
    plan: &Plan,
    inserted: &[(usize, u32)],
    fresh: &[usize],
    errno: i32,
) {
    state.mark_changed();
    if !inserted.is_empty() {
        state.undone_errno.set(errno);
    }
    {
        let mut meta = state.meta.borrow_mut();
        for &(index, cluster) in inserted {
            if meta.clusters.get(index) == Some(&cluster) {
                meta.clusters[index] = 0;
            }
        }
    }
    release_kept(store, state, inserted);
    state.touch_clusters(0..state.meta.borrow().clusters.len());
    // Moved extent pages go back to their old pages (the old root points there); fresh
    // ones and continuation pages are unreferenced by the old root: give them back.
    let mut given_back = Vec::new();
    {
        let mut meta = state.meta.borrow_mut();
        for &(index, old) in &plan.replaced_extent_pages {
            if let Some(slot) = meta.extent_pages.get_mut(index) {
                given_back.push(*slot);
                *slot = old;
            }
        }
    }
    given_back.extend(give_back_fresh_extent_pages(state, fresh));
    release_md_pages(store, &given_back);
    release_md_pages(store, &plan.new_continuation);
}

/// Forgets the extent pages a persist claimed for extent table slots that had none (a retry
/// claims them again); returns the pages.
fn give_back_fresh_extent_pages(state: &BlobState, fresh: &[usize]) -> Vec<u32> {
    let mut meta = state.meta.borrow_mut();
    let mut pages = Vec::new();
    for &index in fresh {
        if let Some(slot) = meta.extent_pages.get_mut(index) {
            if *slot != 0 {
                pages.push(*slot);
                *slot = 0;
            }
        }
        state.dirty_extent_pages.borrow_mut().insert(index);
    }
    pages
}

/// After a commit write that dropped `release_pages` and `clusters`: once a flush makes it
/// durable, zeroes `zero_pages` (best effort), unmaps the clusters (best effort) and gives
/// everything back; a cluster unmapped on a device that reads zeros there is marked so only
/// once a second flush makes the unmap durable. If a flush fails, what it would have freed
/// waits for the next successful one. Returns the first failure.
pub(crate) async fn finish_releases(
    store: &Blobstore,
    zero_pages: &[u32],
    release_pages: Vec<u32>,
    clusters: Vec<u32>,
) -> Option<BlobError> {
    if release_pages.is_empty() && clusters.is_empty() {
        return None;
    }
    let durability = &store.inner.durability;
    if let Err(err) = store.barrier().await {
        for page in release_pages {
            durability.queue(Release::MdPage(page));
        }
        for cluster in clusters {
            durability.queue(Release::Cluster {
                cluster,
                unmapped: false,
            });
        }
        return Some(err);
    }
    let mut first_error = None;
    let channel = &store.inner.md_channel;
    let geometry = store.geometry().clone();
    for &page in zero_pages {
        let zeroed = zero_bytes(channel, geometry.md_page_offset(page), PAGE_SIZE_U64).await;
        durability.wrote();
        if let Err(err) = zeroed {
            first_error.get_or_insert(err);
        }
    }
    release_md_pages(store, &release_pages);
    let cluster_size = store.cluster_size();
    let mut unmapped = Vec::new();
    for cluster in clusters {
        let done = channel
            .unmap(u64::from(cluster) * cluster_size, cluster_size)
            .await
            .is_ok();
        if done && store.shared().desc_reads_zeroes {
            unmapped.push(cluster);
        } else {
            store.shared().release_cluster(cluster);
        }
    }
    if !unmapped.is_empty() {
        durability.wrote();
        for cluster in unmapped {
            durability.queue(Release::Cluster {
                cluster,
                unmapped: true,
            });
        }
        if let Err(err) = store.flush_md().await {
            first_error.get_or_insert(err);
        }
    }
    first_error
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
    claim_md_page_from(store, from, 0)
}

/// Claims an md page for an extent page: never md page 0, since an extent table entry of 0
/// means "no extent page" (SPDK's `bs_allocate_cluster` starts its search at 1 for the same
/// reason). An extent page put on page 0 would be named by no root: the clusters it maps
/// (a thin write's insert) would be lost at the next load.
fn claim_extent_md_page(store: &Blobstore, from: u32) -> Result<u32> {
    claim_md_page_from(store, from.max(1), 1)
}

/// Claims the first free md page at or after `from`, else the first at or after `lowest`.
fn claim_md_page_from(store: &Blobstore, from: u32, lowest: u32) -> Result<u32> {
    let mut md = store.inner.state.borrow_mut();
    let page = md
        .used_md_pages
        .first_clear(u64::from(from))
        .or_else(|| md.used_md_pages.first_clear(u64::from(lowest)))
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
    fresh: &mut Vec<usize>,
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
                let page = claim_extent_md_page(store, root)?;
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
                let page = match claim_extent_md_page(store, root) {
                    Ok(page) => page,
                    Err(err) => {
                        unplan_moves(&mut meta, &mut marked, &replaced, &dirty);
                        return Err(err);
                    }
                };
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
        // From here a failure (no md page for the chain) undoes the moves as well: the
        // caller gives the claimed pages back, and the extent table must not keep naming
        // them (the next persist would write a root pointing at a page never written).
        let chain = plan_chain(store, &meta, root, claimed);
        if chain.is_err() {
            unplan_moves(&mut meta, &mut marked, &replaced, &dirty);
        }
        let (chain, new_continuation, root_bytes, continuation_writes) = chain?;
        before_root.extend(continuation_writes);
        return Ok(Plan {
            before_root,
            root_bytes: Some(root_bytes),
            chain,
            new_continuation,
            replaced_extent_pages: replaced,
        });
    }
    let (chain, new_continuation, root_bytes, continuation_writes) =
        plan_chain(store, &meta, root, claimed)?;
    before_root.extend(continuation_writes);
    Ok(Plan {
        before_root,
        root_bytes: Some(root_bytes),
        chain,
        new_continuation,
        replaced_extent_pages: replaced,
    })
}

/// Takes back, in memory, what a plan that failed after moving extent pages changed: each
/// moved page's slot names its old page again, and every extent page it was to write is
/// marked dirty again (the caller releases the claimed pages; fresh slots are its own).
fn unplan_moves(
    meta: &mut crate::meta::BlobMeta,
    marked: &mut std::collections::BTreeSet<usize>,
    replaced: &[(usize, u32)],
    dirty: &[usize],
) {
    for &(index, old) in replaced {
        if let Some(slot) = meta.extent_pages.get_mut(index) {
            *slot = old;
        }
    }
    marked.extend(dirty.iter().copied());
}

/// Claims the chain's continuation pages and encodes the chain: `(chain, the new
/// continuation pages, the root page, the continuation pages' writes)`. Pages it claims go
/// into `claimed` (the caller gives them back on error).
#[allow(clippy::type_complexity)]
fn plan_chain(
    store: &Blobstore,
    meta: &crate::meta::BlobMeta,
    root: u32,
    claimed: &mut Vec<u32>,
) -> Result<(Vec<u32>, Vec<u32>, Vec<u8>, Vec<(u64, Vec<u8>)>)> {
    let geometry = store.geometry();
    let state_id = meta.id;
    let areas = serialize_chain(meta)?;
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
    let mut writes = Vec::new();
    for (sequence, area) in areas.iter().enumerate() {
        let next = chain.get(sequence + 1).copied().unwrap_or(INVALID_MD_PAGE);
        let bytes = encode_page(state_id, sequence as u32, next, area.bytes());
        if sequence == 0 {
            root_bytes = bytes;
        } else {
            writes.push((geometry.md_page_offset(chain[sequence]), bytes));
        }
    }
    Ok((chain, new_continuation, root_bytes, writes))
}

/// Deletes `state` from disk: zero the root (the commit point: the blob is gone), then,
/// once that is durable, zero the other pages and release every page, the blob id and every
/// cluster. With [`Deps::All`] a flush first makes every earlier metadata write durable (a
/// merge's clone root before the snapshot goes). `Err` when it did not commit (nothing
/// changed); `Ok(Some(err))` when it committed but a later step failed (what it released
/// then waits for the next successful flush).
pub(crate) async fn delete(store: &Blobstore, state: &Rc<BlobState>, deps: Deps) -> Outcome {
    // Its own task, as a persist (see `persist_outcome`): never stopped between the commit
    // and the bookkeeping that follows it.
    let (store, state) = (store.clone(), Rc::clone(state));
    crate::detach::detached_op(
        store.md_op_running(),
        async move {
            let outcome = delete_locked(&store, &state, deps).await;
            // Thin inserts waiting for a persist of this blob see its end (and the blob
            // gone, if it committed).
            state.persisted.notify();
            outcome
        },
        crate::detach::forget,
    )
    .await
}

async fn delete_locked(store: &Blobstore, state: &BlobState, deps: Deps) -> Outcome {
    let _guard = state.persist_lock.lock().await;
    store.drain_releases().await?;
    store.mark_dirty().await?;
    let geometry = store.geometry().clone();
    let root = blobid_to_page(state.id).ok_or(BlobError::NoSuchBlob(state.id))?;
    let channel = &store.inner.md_channel;
    let durability = &store.inner.durability;
    if (deps == Deps::All && durability.any_unflushed())
        || !durability.is_durable(state.in_place_write.get())
    {
        store.barrier().await?;
    }
    let zeroed = zero_bytes(channel, geometry.md_page_offset(root), PAGE_SIZE_U64).await;
    durability.wrote();
    zeroed?;
    // Committed: the blob is gone.
    store
        .inner
        .state
        .borrow_mut()
        .used_blobids
        .clear(u64::from(root));
    let mut pages: Vec<u32> = state.pages.borrow().iter().skip(1).copied().collect();
    pages.extend(
        state
            .meta
            .borrow()
            .extent_pages
            .iter()
            .copied()
            .filter(|&p| p != 0),
    );
    pages.extend(state.pending_extent_release.borrow_mut().drain(..));
    let mut release_pages = pages.clone();
    release_pages.push(root);
    let mut clusters: Vec<u32> = state
        .pending_release
        .borrow_mut()
        .drain(..)
        .map(|(_, cluster)| cluster)
        .collect();
    // Inserts whose writers still wait release their clusters themselves when they see the
    // blob gone; kept ones (writer gone) are released here with the rest.
    let kept = std::mem::take(&mut *state.kept_inserts.borrow_mut());
    let waiting: Vec<u32> = std::mem::take(&mut *state.unpublished.borrow_mut())
        .into_iter()
        .filter(|entry| !kept.contains(entry))
        .map(|(_, cluster)| cluster)
        .collect();
    {
        let mut meta = state.meta.borrow_mut();
        clusters.extend(
            std::mem::take(&mut meta.clusters)
                .into_iter()
                .filter(|&c| c != 0 && !waiting.contains(&c)),
        );
        meta.extent_pages.clear();
    }
    state.pages.borrow_mut().clear();
    state.dirty.set(false);
    state.io.replace_map(&[]);
    Ok(finish_releases(store, &pages, release_pages, clusters).await)
}

/// The metadata reactor's half of a thin write, as sent from any reactor: finds the store
/// (`-ENODEV` if it is gone) and runs [`insert_cluster`]. The claim is released on every
/// path that does not leave the cluster in the blob's map.
pub(crate) async fn insert_claimed(
    store_id: u64,
    blob_id: u64,
    index: u64,
    read_through: Option<u64>,
    claim: ClusterClaim,
) -> std::result::Result<(), i32> {
    match Blobstore::lookup(store_id) {
        Some(store) => insert_cluster(&store, blob_id, index, read_through, claim).await,
        None => Err(-libc::ENODEV),
    }
}

/// Inserts the claimed cluster as blob cluster `index` of open blob `blob_id` and persists.
/// `Err(-EEXIST)` when another write already inserted one there (returned only once that
/// one is on disk and visible), or when a snapshot taken since the fill read through
/// `read_through` (the blob's parent then) has the cluster: the fill missed its data, and
/// the write is redone. While a snapshot hands the blob's map over the insert waits (it goes
/// into the blob's new map afterwards). The metadata owns the cluster from the moment it is in the
/// map; if a failed persist takes it out again, it is released here (the claim's holder
/// never releases it after handing it over).
pub(crate) async fn insert_cluster(
    store: &Blobstore,
    blob_id: u64,
    index: u64,
    read_through: Option<u64>,
    claim: ClusterClaim,
) -> std::result::Result<(), i32> {
    let cluster = claim.cluster();
    let state = store
        .inner
        .state
        .borrow()
        .open_blobs
        .get(&blob_id)
        .cloned()
        .ok_or(-libc::EBADF)?;
    let index = index as usize;
    while state.handover.get() {
        state.handover_done.wait().await;
    }
    if !state.io.fill_still_valid(index, read_through) {
        return Err(-libc::EEXIST);
    }
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
    state.meta.borrow_mut().clusters[index] = claim.hand_over();
    state.unpublished.borrow_mut().push((index, cluster));
    state.touch_clusters(index..index + 1);
    state.dirty.set(true);
    let seq = state.insert_seq.get() + 1;
    state.insert_seq.set(seq);
    // Group commit: one persist carries every insert made while the previous one ran.
    let result = loop {
        let mapped = state.meta.borrow().clusters.get(index) == Some(&cluster);
        if !mapped {
            // A snapshot racing the write persisted the blob, carrying this insert, then
            // handed the map (this cluster included) to the new snapshot, which the blob now
            // reads through: the write is durable and visible (seed 821966165).
            if state.durable_seq.get() >= seq && handed_to_parent(&state, index, cluster) {
                break Ok(());
            }
            // Else a failed persist undid it: its error (-ENOMEM for a full md region).
            break Err(match state.undone_errno.get() {
                0 => -libc::EIO,
                errno => errno,
            });
        }
        if state.durable_seq.get() >= seq {
            break Ok(());
        }
        if let Err(errno) = wait_for_persist(store, &state).await {
            // An earlier persist may have committed it before this one failed.
            let mapped = state.meta.borrow().clusters.get(index) == Some(&cluster);
            if state.durable_seq.get() >= seq
                && (mapped || handed_to_parent(&state, index, cluster))
            {
                break Ok(());
            }
            break Err(errno);
        }
    };
    if result.is_err() {
        if state.meta.borrow().clusters.get(index) != Some(&cluster) {
            // Undone: nothing references it (I/O reactors never saw it published).
            store.shared().release_cluster(cluster);
        } else if state.io.published(index) != cluster
            && !state.kept_inserts.borrow().contains(&(index, cluster))
        {
            // Still in the map, not committed (an in-place write that failed may have put
            // it on disk; a persist may be carrying it now): the writer leaves, the blob
            // keeps it, and whoever undoes it from now on releases it (`release_kept`, a
            // delete); a persist that commits it drops it from the list. Until this point
            // the release was the writer's alone: never both.
            state.kept_inserts.borrow_mut().push((index, cluster));
        }
    }
    result
}

/// Whether blob cluster `index` of `state`'s parent is `cluster`: a snapshot took the map
/// with this insert in it (a committed insert's cluster is never released while mapped, and a
/// parent's map gains no cluster any other way at that index).
fn handed_to_parent(state: &BlobState, index: usize, cluster: u32) -> bool {
    state
        .parent
        .borrow()
        .as_ref()
        .is_some_and(|parent| parent.state.meta.borrow().clusters.get(index) == Some(&cluster))
}

/// Runs a persist if none is running, else waits for the running one to finish.
async fn wait_for_persist(
    store: &Blobstore,
    state: &Rc<BlobState>,
) -> std::result::Result<(), i32> {
    if state.persist_lock.is_locked() {
        state.persisted.wait().await;
        Ok(())
    } else {
        // A failure after the commit point still committed the inserts it carried: the
        // caller sees them durable (`durable_seq`) and keeps its cluster.
        persist_outcome(store, state, Deps::Own)
            .await
            .map(|_| ())
            .map_err(|err| err.errno())
    }
}
