//! Snapshots and clones (the metadata reactor's side).
//!
//! A snapshot takes over its blob's clusters; the blob becomes a thin clone of it. Order, and
//! what a crash at each step leaves (the load-time repair is in [`repair_pending_snapshots`]):
//! 1. a new blob S is created with the internal xattr `SNAPTMP` = the original's id (crash:
//!    S is deleted at load);
//! 2. the original's I/O is frozen and drained (see `freeze`), then its metadata is synced
//!    (drained, it is clean as a rule: thin inserts end once persisted; under load, a sync
//!    before the freeze waited behind the writers' group commits);
//! 3. S gets the original's cluster map (and its extent pages, as SPDK moves them) and is
//!    written once the original's last metadata write is durable (a flush first if not:
//!    otherwise S's map could reach the disk naming a cluster the original's root on disk
//!    does not, and the load below would leak it) (crash: the original still owns
//!    everything; S is deleted at load, freeing only its own metadata pages: an extent page
//!    the original's table no longer names is S's own). From S's durable map until S is
//!    finished or deleted, the extent pages are pinned: a persist of the original that
//!    drops one (after a failure restored its map) neither zeroes nor frees it; S's delete
//!    frees it (`Blobstore::pin_extent_pages`). Nor is the original deleted while a
//!    half-made S of it is held;
//! 4. a flush makes S durable, then the original gets `SNAP` = S, thin, an empty map, and
//!    is written (crash: S is finished at load);
//! 5. a flush makes the original durable, then S loses `SNAPTMP`, becomes read-only and is
//!    written; I/O is unfrozen and replayed.
//!
//! The two flushes are what make any subset of the unflushed writes safe: without the
//! first, the original could reach the disk naming an S that has no map; without the
//! second, a finished S could sit beside an original that still owns the same clusters.

use crate::blob::{Blob, BlobOptions};
use crate::error::{BlobError, Result};
use crate::format::descriptor::{FLAG_INTERNAL_XATTR, FLAG_READ_ONLY, FLAG_THIN_PROV};
use crate::meta::{XATTR_SNAPSHOT, XATTR_SNAPSHOT_PENDING, XATTR_SNAPSHOT_REMOVING};
use std::rc::Rc;

use crate::persist::Deps;
use crate::store::Blobstore;

impl Blobstore {
    /// Snapshots blob `id`: returns the new snapshot's id. The blob keeps its id and data and
    /// becomes a thin clone of the snapshot. `xattrs` go to the snapshot. -EINVAL when the
    /// blob is read-only; -ENOENT when it does not exist.
    ///
    /// Dropping the returned future does not cancel the operation: it runs to completion as its
    /// own task on the metadata reactor (the caller's future only waits for its result).
    pub async fn create_snapshot(&self, id: u64, xattrs: &[(String, Vec<u8>)]) -> Result<u64> {
        self.check_md_thread()?;
        let (store, xattrs) = (self.clone(), xattrs.to_vec());
        crate::detach::detached_op(
            self.begin_md_op()?,
            async move { store.create_snapshot_now(id, &xattrs).await },
            crate::detach::forget,
        )
        .await
    }

    /// The body of `create_snapshot`, which runs it as its own task.
    async fn create_snapshot_now(&self, id: u64, xattrs: &[(String, Vec<u8>)]) -> Result<u64> {
        self.check_md_thread()?;
        let mut steps = crate::steps::Steps::start("snapshot");
        let orig = self.open_blob(id).await?;
        steps.mark("open");
        let result = match orig.state.begin_op("snapshot") {
            Ok(_op) => self.snapshot_of(&orig, xattrs, &mut steps).await,
            Err(err) => Err(err),
        };
        let closed = orig.close_within_op().await;
        steps.mark("close_orig");
        let snapshot = result?;
        closed?;
        Ok(snapshot)
    }

    async fn snapshot_of(
        &self,
        orig: &Blob,
        xattrs: &[(String, Vec<u8>)],
        steps: &mut crate::steps::Steps,
    ) -> Result<u64> {
        if orig.is_read_only() {
            return Err(BlobError::InvalidArgument(format!(
                "blob {:#x} is read-only: a snapshot needs a writable blob",
                orig.id()
            )));
        }
        // The original then reads through one snapshot more: never more than an open
        // follows (`check_ancestry`), or it would not open after a reload.
        let depth = self.ancestor_count(orig.id());
        if depth >= crate::blob::MAX_CHAIN_DEPTH {
            return Err(BlobError::InvalidArgument(format!(
                "blob {:#x} reads through {depth} snapshots: a snapshot would make {} (at most {})",
                orig.id(),
                depth + 1,
                crate::blob::MAX_CHAIN_DEPTH
            )));
        }
        self.retry_abandoned_snapshots().await;
        steps.mark("retry");
        let snap = self
            .create_and_open(&BlobOptions {
                num_clusters: 0,
                thin: true,
                xattrs: xattrs.to_vec(),
                internal_xattrs: vec![(
                    XATTR_SNAPSHOT_PENDING.into(),
                    orig.id().to_le_bytes().to_vec(),
                )],
                form: orig.extent_form(),
            })
            .await?;
        steps.mark("create_snap");
        let io = orig.io();
        let _handing_over = HandingOver::start(&orig.state);
        if let Err(err) = crate::freeze::freeze_for_snapshot(self, &io).await {
            self.abandon_snapshot(snap, orig).await;
            return Err(err);
        }
        steps.mark("freeze");
        // Drained, the original is clean as a rule (a thin insert ends once persisted); a
        // change of its own (a resize, an xattr) is written now, so that S takes a map
        // whose extent pages are on disk.
        if let Err(err) = crate::persist::persist(self, &orig.state).await {
            if let Err(undo) = crate::freeze::unfreeze(self, &io).await {
                tracing::warn!(blob = format!("{:#x}", orig.id()), %undo, "releasing I/O after a failed snapshot");
            }
            self.abandon_snapshot(snap, orig).await;
            return Err(err);
        }
        steps.mark("persist_orig");
        let result = self.move_clusters(orig, &snap, steps).await;
        let thawed = crate::freeze::unfreeze(self, &io).await;
        steps.mark("unfreeze");
        let snap_id = snap.id();
        match result {
            Ok(()) => {
                snap.close_within_op().await?;
                steps.mark("close_snap");
                thawed?;
                Ok(snap_id)
            }
            Err((err, committed)) => {
                if committed {
                    // The original points at S on disk: S stays (finished at load).
                    let _ = snap.close().await;
                } else {
                    self.abandon_snapshot(snap, orig).await;
                }
                Err(err)
            }
        }
    }

    /// Steps 3 to 5 with I/O frozen. On error, says whether the original's new metadata
    /// reached the disk (then S must stay).
    async fn move_clusters(
        &self,
        orig: &Blob,
        snap: &Blob,
        steps: &mut crate::steps::Steps,
    ) -> Result<(), (BlobError, bool)> {
        let snap_id = snap.id();
        let old_parent = orig.parent_id();
        {
            let om = orig.state.meta.borrow();
            let mut sm = snap.state.meta.borrow_mut();
            sm.flags.invalid = om.flags.invalid | FLAG_INTERNAL_XATTR;
            sm.clusters = om.clusters.clone();
            sm.extent_pages = om.extent_pages.clone();
            if let Some(parent) = old_parent {
                sm.set_xattr(true, XATTR_SNAPSHOT.as_bytes(), &parent.to_le_bytes())
                    .map_err(|err| (err, false))?;
            }
        }
        snap.state.mark_changed();
        snap.state.publish_map();
        // S's map must not reach the disk before the original's own (its last root or
        // in-place extent page write, e.g. a thin insert's): see `Deps::After`.
        let orig_written = orig.state.last_write.get();
        match crate::persist::persist_outcome(self, &snap.state, Deps::After(orig_written)).await {
            Err(err) => return Err((err, false)),
            Ok(late) => warn_late(snap_id, "snapshot map", late),
        }
        // S's root on disk now names the original's extent pages: until S is finished or
        // deleted, the original must not zero or give any of them back (a failed snapshot
        // whose S could not be removed, then the original's next persist moving the page:
        // seeds 850029280, 595970084, 771648179).
        let shared: Vec<u32> = snap
            .state
            .meta
            .borrow()
            .extent_pages
            .iter()
            .copied()
            .filter(|&page| page != 0)
            .collect();
        self.pin_extent_pages(snap_id, &shared);
        steps.mark("persist_snap_map");
        // The original becomes a thin clone of S with an empty map, once S is durable.
        let saved = orig.state.meta.borrow().clone();
        // Undoes the change in memory when the original's new root does not commit. Its
        // extent pages are marked dirty, so that its next persist moves them (as after any
        // failed persist, `undo_failed_persist`): S's root on disk names them, and a page
        // the original kept naming would be taken by its next snapshot, whose pin replaces
        // S's; the load's removal of S (never taken) would then free and zero it under
        // that snapshot. A persist that failed before planning (no md page for the
        // original's longer chain, a failed flush of queued releases) leaves them clean.
        let restore = |saved: crate::meta::BlobMeta| {
            let clusters = saved.clusters.len();
            *orig.state.meta.borrow_mut() = saved;
            orig.state.mark_changed();
            orig.state.touch_clusters(0..clusters);
            snap.state.meta.borrow_mut().extent_pages.clear();
        };
        {
            let mut om = orig.state.meta.borrow_mut();
            if let Err(err) = om.set_xattr(true, XATTR_SNAPSHOT.as_bytes(), &snap_id.to_le_bytes())
            {
                drop(om);
                restore(saved);
                return Err((err, false));
            }
            om.flags.invalid |= FLAG_THIN_PROV;
            let clusters = om.clusters.len();
            om.clusters = vec![0; clusters];
            let pages = om.extent_pages.len();
            om.extent_pages = vec![0; pages];
        }
        orig.state.mark_changed();
        orig.state.dirty_extent_pages.borrow_mut().clear();
        match crate::persist::persist_after_all(self, &orig.state).await {
            Err(err) => {
                restore(saved);
                return Err((err, false));
            }
            Ok(late) => warn_late(orig.id(), "snapshot's original", late),
        }
        // The pages are S's alone now (the original's root no longer names them).
        self.unpin_extent_pages(snap_id);
        steps.mark("persist_orig_thin");
        // In memory: the parent handle moves to S, the original reads through S.
        let moved_parent = orig.state.replace_parent(Some(snap.reopen()));
        snap.state.replace_parent(moved_parent);
        orig.state.publish_map();
        self.unlink_clone(orig.id());
        if let Some(parent) = old_parent {
            self.link_clone(parent, snap_id);
        }
        self.link_clone(snap_id, orig.id());
        // Finish S once the original is durable: no longer pending, read-only.
        {
            let mut sm = snap.state.meta.borrow_mut();
            sm.remove_xattr(true, XATTR_SNAPSHOT_PENDING.as_bytes());
            sm.flags.data_ro |= FLAG_READ_ONLY;
        }
        snap.state.mark_changed();
        // From here S is a snapshot whatever fails: the original names it on disk, and the
        // load-time repair finishes it, so in memory it is read-only already.
        snap.state.data_ro.set(true);
        snap.state.md_ro.set(true);
        snap.state.io.set_data_ro(true);
        match crate::persist::persist_after_all(self, &snap.state).await {
            Err(err) => return Err((err, true)),
            Ok(late) => warn_late(snap_id, "finished snapshot", late),
        }
        steps.mark("persist_snap_final");
        // The finished S durable before the call returns: a later operation on the original
        // (a delete, a decouple) must never reach the disk while S still looks half-made,
        // or the load would take S for a snapshot never taken and remove it.
        self.barrier().await.map_err(|err| (err, true))
    }

    /// Deletes a half-made snapshot's own metadata pages only: its cluster map is still the
    /// original's, and so is any of its extent pages in `orig_extent_pages` (the original's
    /// extent table: a snapshot Spool made has pages of its own, freed here; one SPDK or an
    /// earlier Spool made shares the original's).
    async fn delete_untaken_snapshot(&self, snap: Blob, orig_extent_pages: &[u32]) -> Result<()> {
        {
            let mut sm = snap.state.meta.borrow_mut();
            sm.clusters.clear();
            let own: Vec<u32> = sm
                .extent_pages
                .iter()
                .copied()
                .filter(|&page| page != 0 && !orig_extent_pages.contains(&page))
                .collect();
            sm.extent_pages = own;
        }
        snap.state.publish_map();
        self.delete_open(snap).await
    }

    /// Removes a snapshot that never took over anything (see `delete_untaken_snapshot`).
    async fn abandon_snapshot(&self, snap: Blob, orig: &Blob) {
        let id = snap.id();
        let orig_pages = orig.state.meta.borrow().extent_pages.clone();
        if let Err(err) = self.delete_untaken_snapshot(snap, &orig_pages).await {
            tracing::warn!(blob = format!("{id:#x}"), %err, "half-made snapshot left for load-time repair");
        }
    }

    /// Creates a thin clone of snapshot `id` (which must be read-only in data and metadata,
    /// else -EINVAL): its reads show the snapshot's data until written. Returns its id.
    ///
    /// Dropping the returned future does not cancel the operation: it runs to completion as its
    /// own task on the metadata reactor (the caller's future only waits for its result).
    pub async fn create_clone(&self, id: u64, xattrs: &[(String, Vec<u8>)]) -> Result<u64> {
        self.check_md_thread()?;
        let (store, xattrs) = (self.clone(), xattrs.to_vec());
        crate::detach::detached_op(
            self.begin_md_op()?,
            async move { store.create_clone_now(id, &xattrs).await },
            crate::detach::forget,
        )
        .await
    }

    /// The body of `create_clone`, which runs it as its own task.
    async fn create_clone_now(&self, id: u64, xattrs: &[(String, Vec<u8>)]) -> Result<u64> {
        self.check_md_thread()?;
        let snapshot = self.open_blob(id).await?;
        // The snapshot stays open, its operation guard held, until the clone is linked: a
        // merge-on-delete of the snapshot cannot start in between (it would not see the
        // new clone and take the snapshot away from under it).
        // A snapshot whose merge into its clone committed but whose delete did not finish
        // (`SNAPRM` names a clone that no longer reads through it) is gone at the next load
        // once it has no other clone: a clone made of it now would read through a blob the
        // user already asked to delete, and that load removes it after that clone is deleted
        // (simulation seed 7200285). The delete, retried, finishes it.
        let merged_away = snapshot
            .state
            .meta
            .borrow()
            .xattr(true, XATTR_SNAPSHOT_REMOVING.as_bytes())
            .and_then(|value| <[u8; 8]>::try_from(value).ok())
            .map(u64::from_le_bytes)
            .is_some_and(|clone| self.parent_of(clone) != Some(id));
        let made = match snapshot.state.op_in_progress.get() {
            Some("merge") => Err(BlobError::Busy(format!(
                "blob {id:#x}: cannot clone while a merge is in progress"
            ))),
            _ if merged_away => Err(BlobError::Busy(format!(
                "blob {id:#x}: its delete merged it into its clone but did not finish: delete it again"
            ))),
            _ => {
                let _cloning = CloneInProgress::new(&snapshot.state);
                self.clone_of(&snapshot, xattrs).await
            }
        };
        let closed = snapshot.close().await;
        let clone = made?;
        closed?;
        Ok(clone)
    }

    async fn clone_of(&self, snapshot: &Blob, xattrs: &[(String, Vec<u8>)]) -> Result<u64> {
        let id = snapshot.id();
        if !(snapshot.is_data_read_only() && snapshot.is_md_read_only()) {
            return Err(BlobError::InvalidArgument(format!(
                "blob {id:#x} is not read-only: only a snapshot (or a read-only blob) can be cloned"
            )));
        }
        // The clone reads through the snapshot and its ancestors: no more than an open follows.
        let depth = self.ancestor_count(id) + 1;
        if depth > crate::blob::MAX_CHAIN_DEPTH {
            return Err(BlobError::InvalidArgument(format!(
                "a clone of blob {id:#x} would read through {depth} snapshots (at most {})",
                crate::blob::MAX_CHAIN_DEPTH
            )));
        }
        let clone = self
            .create_blob(&BlobOptions {
                num_clusters: snapshot.num_clusters(),
                thin: true,
                xattrs: xattrs.to_vec(),
                internal_xattrs: vec![(XATTR_SNAPSHOT.into(), id.to_le_bytes().to_vec())],
                form: snapshot.extent_form(),
            })
            .await?;
        self.link_clone(id, clone);
        Ok(clone)
    }
}

/// A snapshot of the blob runs: from before its freeze until after its unfreeze, thin
/// inserts into the blob wait (they go into its new map afterwards), and writes parked in
/// a thin allocation wait before any other device write (see `freeze::freeze_for_snapshot`).
struct HandingOver<'a> {
    state: &'a crate::blob::BlobState,
}

impl<'a> HandingOver<'a> {
    fn start(state: &'a crate::blob::BlobState) -> HandingOver<'a> {
        state.handover.set(true);
        state.io.set_handing_over(true);
        HandingOver { state }
    }
}

impl Drop for HandingOver<'_> {
    fn drop(&mut self) {
        self.state.io.set_handing_over(false);
        self.state.handover.set(false);
        self.state.handover_done.notify();
    }
}

/// A clone of a snapshot being made: a merge-on-delete of that snapshot is refused meanwhile.
struct CloneInProgress<'a> {
    state: &'a crate::blob::BlobState,
}

impl<'a> CloneInProgress<'a> {
    fn new(state: &'a crate::blob::BlobState) -> CloneInProgress<'a> {
        state.cloning.set(state.cloning.get() + 1);
        CloneInProgress { state }
    }
}

impl Drop for CloneInProgress<'_> {
    fn drop(&mut self) {
        self.state
            .cloning
            .set(self.state.cloning.get().saturating_sub(1));
    }
}

/// Undoes, in the clone's memory, a merge whose root did not commit: the clusters it took
/// from the snapshot (at `taken`) go back to unallocated, and its parent link is restored.
fn restore_merge(
    clone: &crate::blob::BlobState,
    snap: &crate::blob::BlobState,
    taken: &[usize],
    saved_parent: Option<&[u8]>,
) {
    let sm = snap.meta.borrow();
    let mut cm = clone.meta.borrow_mut();
    for &index in taken {
        let from_snap = sm.clusters.get(index).copied().unwrap_or(0);
        if let Some(slot) = cm.clusters.get_mut(index) {
            if *slot == from_snap {
                *slot = 0;
            }
        }
    }
    match saved_parent {
        Some(value) => {
            let _ = cm.set_xattr(true, XATTR_SNAPSHOT.as_bytes(), value);
        }
        None => {
            cm.remove_xattr(true, XATTR_SNAPSHOT.as_bytes());
        }
    }
}

/// Writes `parent`'s root if it is dirty, before a blob stops reading through it (an
/// inflate, a decouple, a delete). A snapshot that committed (its original reads through it)
/// but whose finished root failed to reach the disk is still `SNAPTMP` there; once no blob
/// reads through it, a load would take it for one never taken and remove it, leaking the
/// clusters only it owns. Returns whether a write was needed (the caller's commit must then
/// follow a flush of it); an error means nothing was changed.
pub(crate) async fn settle_parent(store: &Blobstore, parent: &Blob) -> Result<bool> {
    if !parent.state.dirty.get() {
        return Ok(false);
    }
    crate::persist::persist(store, &parent.state).await?;
    Ok(true)
}

/// Logs a failure that came after a persist's commit point: the operation goes on (its
/// state is what the blob is now); what it released waits for the next successful flush.
fn warn_late(id: u64, what: &str, late: Option<BlobError>) {
    if let Some(err) = late {
        tracing::warn!(blob = format!("{id:#x}"), %err, "{what}: committed, but a step after the commit failed");
    }
}

/// Cluster indexes of `blob` that read zeros now only because they lie past the end of its
/// parent `parent`, and would show data (of `new_parent` or one of its ancestors) once the
/// blob reads through `new_parent` instead: what a merge (the delete of `parent`, its only
/// clone `blob`) or a decouple must give clusters of their own first, filled with what they
/// show now (zeros), or the re-pointing would change the blob's data (found by the
/// simulation, seed 964254536: a clone grown past its 0-cluster snapshot read the
/// grandparent's data once that snapshot was deleted). SPDK re-points without them, and
/// there the blob's data changes; the image format is the same either way.
fn past_parent_end_shown_by(blob: &Blob, parent: &Blob, new_parent: Option<&Blob>) -> Vec<u64> {
    let Some(new_parent) = new_parent else {
        return Vec::new();
    };
    let map = blob.cluster_map();
    let start = parent.num_clusters() as usize;
    if map.len() <= start {
        return Vec::new();
    }
    // The maps of the chain from the new parent up: an index past one's end reads zeros
    // there (and nothing above it shows through).
    let mut chain = vec![new_parent.cluster_map()];
    let mut next = new_parent
        .state
        .parent
        .borrow()
        .as_ref()
        .map(|p| Rc::clone(&p.state));
    while let Some(state) = next {
        chain.push(state.meta.borrow().clusters.clone());
        next = state.parent.borrow().as_ref().map(|p| Rc::clone(&p.state));
    }
    let shows_data = |index: usize| {
        for ancestor in &chain {
            match ancestor.get(index) {
                None => return false,
                Some(&cluster) if cluster != 0 => return true,
                Some(_) => {}
            }
        }
        false
    };
    (start..map.len())
        .filter(|&index| map[index] == 0 && shows_data(index))
        .map(|index| index as u64)
        .collect()
}

impl Blobstore {
    /// Inflates blob `id`: every cluster it does not own is allocated and filled with what it
    /// showed (its parent's data, or zeros); it then has no parent and is thick. A thick blob
    /// is left as it is. -ENOSPC (nothing changed) without enough free clusters.
    ///
    /// Dropping the returned future does not cancel the operation: it runs to completion as its
    /// own task on the metadata reactor (the caller's future only waits for its result).
    pub async fn inflate_blob(&self, id: u64) -> Result<()> {
        self.inflate_blob_until(id, Rc::new(|| false)).await
    }

    /// Like [`Blobstore::inflate_blob`], but `stop` is asked before each cluster is copied:
    /// once it says true, the copy stops there with [`BlobError::Stopped`] (how many of how
    /// many clusters were copied). The blob is then as a thin blob is after that many first
    /// writes: it still reads through its parent, owns the clusters copied, and a later
    /// inflate finishes the job. For commands a signal may interrupt (`spool inflate`).
    pub async fn inflate_blob_until(&self, id: u64, stop: Rc<dyn Fn() -> bool>) -> Result<()> {
        self.check_md_thread()?;
        let store = self.clone();
        crate::detach::detached_op(
            self.begin_md_op()?,
            async move { store.take_over_clusters(id, true, stop).await },
            crate::detach::forget,
        )
        .await
    }

    /// Decouples blob `id` from its parent: the clusters the parent itself owns are copied,
    /// and the blob's parent becomes the grandparent (or none); it stays thin. -EINVAL when it
    /// has no parent.
    ///
    /// Dropping the returned future does not cancel the operation: it runs to completion as its
    /// own task on the metadata reactor (the caller's future only waits for its result).
    pub async fn decouple_parent(&self, id: u64) -> Result<()> {
        self.decouple_parent_until(id, Rc::new(|| false)).await
    }

    /// Like [`Blobstore::decouple_parent`], stopping as [`Blobstore::inflate_blob_until`]
    /// does when `stop` says so (the parent link is then unchanged).
    pub async fn decouple_parent_until(&self, id: u64, stop: Rc<dyn Fn() -> bool>) -> Result<()> {
        self.check_md_thread()?;
        let store = self.clone();
        crate::detach::detached_op(
            self.begin_md_op()?,
            async move { store.take_over_clusters(id, false, stop).await },
            crate::detach::forget,
        )
        .await
    }

    async fn take_over_clusters(
        &self,
        id: u64,
        all: bool,
        stop: Rc<dyn Fn() -> bool>,
    ) -> Result<()> {
        self.check_md_thread()?;
        let blob = self.open_blob(id).await?;
        let result = match blob
            .state
            .begin_op(if all { "inflate" } else { "decouple" })
        {
            Ok(_op) => self.take_over_open(&blob, all, &*stop).await,
            Err(err) => Err(err),
        };
        let closed = blob.close().await;
        result?;
        closed
    }

    async fn take_over_open(&self, blob: &Blob, all: bool, stop: &dyn Fn() -> bool) -> Result<()> {
        let id = blob.id();
        let parent = blob.state.parent.borrow().clone();
        if !all && parent.is_none() {
            return Err(BlobError::InvalidArgument(format!(
                "blob {id:#x} has no parent to decouple from"
            )));
        }
        if !blob.is_thin() {
            return Ok(());
        }
        if blob.is_read_only() {
            return Err(BlobError::ReadOnly {
                id,
                what: "inflate or decouple",
            });
        }
        // The blob is about to stop reading through its parent: a parent whose root is not
        // durable (a snapshot whose finished root failed to reach the disk) is written first,
        // and the new root below waits for every earlier metadata write (`Deps::All`).
        let parent_was_dirty = match &parent {
            Some(parent) => settle_parent(self, parent).await?,
            None => false,
        };
        let parent_map = parent.as_ref().map(Blob::cluster_map).unwrap_or_default();
        let mut needed: Vec<u64> = blob
            .cluster_map()
            .iter()
            .enumerate()
            .filter(|&(index, &cluster)| {
                cluster == 0 && (all || parent_map.get(index).is_some_and(|&p| p != 0))
            })
            .map(|(index, _)| index as u64)
            .collect();
        if let (false, Some(parent)) = (all, &parent) {
            // Past the parent's end the blob reads zeros; through the grandparent it may not.
            let grandparent = parent.state.parent.borrow();
            needed.extend(past_parent_end_shown_by(blob, parent, grandparent.as_ref()));
        }
        let free = self.free_cluster_count();
        if needed.len() as u64 > free {
            return Err(BlobError::NoRoom {
                id,
                what: if all { "inflate" } else { "decouple" },
                needed: needed.len() as u64,
                free,
            });
        }
        let channel = self.channel()?;
        let io = blob.io();
        let total = needed.len() as u64;
        for (done, index) in needed.into_iter().enumerate() {
            if stop() {
                // Each cluster copied so far is an ordinary first write: nothing to undo.
                return Err(BlobError::Stopped {
                    id,
                    what: if all { "inflate" } else { "decouple" },
                    done: done as u64,
                    total,
                });
            }
            channel.touch_cluster(&io, index).await?;
        }
        // Re-point: inflate drops the parent; decouple moves to the grandparent.
        let grandparent = if all {
            None
        } else {
            parent.as_ref().and_then(Blob::parent_id)
        };
        let new_parent = match grandparent {
            Some(g) => Some(self.open_blob(g).await?),
            None => None,
        };
        // What is restored if the root does not commit: only the parent link and the thin
        // flag (the map may gain concurrent thin inserts meanwhile: I/O is not frozen).
        let (saved_parent_xattr, saved_invalid) = {
            let meta = blob.state.meta.borrow();
            (
                meta.xattr(true, XATTR_SNAPSHOT.as_bytes())
                    .map(<[u8]>::to_vec),
                meta.flags.invalid,
            )
        };
        {
            let mut meta = blob.state.meta.borrow_mut();
            match grandparent {
                Some(g) => meta.set_xattr(true, XATTR_SNAPSHOT.as_bytes(), &g.to_le_bytes()),
                None => {
                    meta.remove_xattr(true, XATTR_SNAPSHOT.as_bytes());
                    Ok(())
                }
            }?;
            if all {
                meta.flags.invalid &= !FLAG_THIN_PROV;
            }
        }
        let old_parent = blob.state.replace_parent(new_parent);
        blob.state.mark_changed();
        // The root follows a flush of the extent pages the touches rewrote in place (and of
        // the parent's root when it was just written).
        let deps = if parent_was_dirty {
            Deps::All
        } else {
            Deps::Own
        };
        let persisted = crate::persist::persist_outcome(self, &blob.state, deps).await;
        if let Err(err) = persisted {
            // Not committed: the blob keeps its parent (on disk and in memory).
            {
                let mut meta = blob.state.meta.borrow_mut();
                match &saved_parent_xattr {
                    Some(value) => meta.set_xattr(true, XATTR_SNAPSHOT.as_bytes(), value)?,
                    None => {
                        meta.remove_xattr(true, XATTR_SNAPSHOT.as_bytes());
                    }
                }
                meta.flags.invalid = saved_invalid;
            }
            blob.state.mark_changed();
            let new_parent = blob.state.replace_parent(old_parent);
            if let Some(new_parent) = new_parent {
                let _ = new_parent.close().await;
            }
            return Err(err);
        }
        self.unlink_clone(id);
        if let Some(g) = grandparent {
            self.link_clone(g, id);
        }
        let closed = match old_parent {
            Some(old) => old.close().await,
            None => Ok(()),
        };
        match persisted {
            Ok(Some(late)) => Err(late),
            _ => closed,
        }
    }
}

impl Blobstore {
    /// Deletes snapshot `snap_id`, whose only clone is `clone_id`, by merging it into the
    /// clone: the clone takes the snapshot's clusters where it has none and the snapshot's
    /// parent as its own, then the snapshot goes. Crash-safe: the snapshot is first marked
    /// `SNAPRM` = clone; the load-time repair finishes or undoes the merge.
    pub(crate) async fn merge_into_clone(&self, snap_id: u64, clone_id: u64) -> Result<()> {
        let clone = self.open_blob(clone_id).await?;
        let snap = self.open_blob(snap_id).await?;
        // Our handle and the clone's parent handle; any more is someone else's. The clone
        // may be open elsewhere (an exported volume being written, as SPDK merges into an
        // open lvol): its I/O is frozen and drained while its map and parent change hands.
        if snap.state.open_ref.get() > 2 {
            snap.close().await?;
            clone.close().await?;
            return Err(BlobError::Busy(format!(
                "snapshot {snap_id:#x} is open elsewhere"
            )));
        }
        // Both guards are held until the snapshot is gone: no clone, snapshot, resize or
        // inflate of either can slip in between the merge and the delete.
        let (clone_state, snap_state) = (Rc::clone(&clone.state), Rc::clone(&snap.state));
        let guards = (clone_state.begin_op("merge"), snap_state.begin_op("merge"));
        let result = match &guards {
            // A clone made (or being made) while this call opened the blobs: no longer a
            // one-clone merge.
            (Ok(_), Ok(_))
                if self.clones_of(snap_id) != [clone_id] || snap_state.cloning.get() > 0 =>
            {
                Err(BlobError::Busy(format!(
                    "snapshot {snap_id:#x} gained a clone: it has {} now",
                    self.clones_of(snap_id).len()
                )))
            }
            (Ok(_), Ok(_)) => self.merge_open(&snap, &clone).await,
            (Err(err), _) | (_, Err(err)) => Err(BlobError::Busy(err.to_string())),
        };
        match result {
            Ok(()) => {
                let closed = clone.close().await;
                // The snapshot's root goes only once the clone's new root is durable.
                let deleted = self.delete_open_with(snap, Deps::All).await;
                deleted.and(closed)
            }
            Err(err) => {
                if self.parent_of(clone_id) == Some(snap_id) {
                    // The merge never committed: take the SNAPRM mark away again, or a later
                    // load would take it for a finished merge once the clone moves on.
                    let removed = snap
                        .state
                        .meta
                        .borrow_mut()
                        .remove_xattr(true, XATTR_SNAPSHOT_REMOVING.as_bytes());
                    if removed {
                        snap.state.mark_changed();
                        if let Err(undo) = crate::persist::persist(self, &snap.state).await {
                            tracing::warn!(blob = format!("{snap_id:#x}"), %undo, "SNAPRM mark left after a merge that did not commit");
                        }
                    }
                }
                let _ = snap.close().await;
                let _ = clone.close().await;
                Err(err)
            }
        }
    }

    async fn merge_open(&self, snap: &Blob, clone: &Blob) -> Result<()> {
        let clone_id = clone.id();
        // The clone's clusters past the snapshot's end read zeros; once it reads through the
        // snapshot's parent they would show that one's data: they get clusters of their own
        // first (ordinary first writes of zeros; nothing to undo if the merge fails).
        let hidden = {
            let grand = snap.state.parent.borrow();
            past_parent_end_shown_by(clone, snap, grand.as_ref())
        };
        if !hidden.is_empty() {
            let free = self.free_cluster_count();
            if hidden.len() as u64 > free {
                return Err(BlobError::NoRoom {
                    id: clone_id,
                    what: "delete (the merge into the clone)",
                    needed: hidden.len() as u64,
                    free,
                });
            }
            let channel = self.channel()?;
            let io = clone.io();
            for index in hidden {
                channel.touch_cluster(&io, index).await?;
            }
        }
        snap.state.meta.borrow_mut().set_xattr(
            true,
            XATTR_SNAPSHOT_REMOVING.as_bytes(),
            &clone_id.to_le_bytes(),
        )?;
        snap.state.mark_changed();
        crate::persist::persist(self, &snap.state).await?;
        let io = clone.io();
        crate::freeze::freeze(self, &io).await?;
        let merged = self.merge_frozen(snap, clone).await;
        let thawed = crate::freeze::unfreeze(self, &io).await;
        let taken = merged?;
        // The snapshot keeps only what the clone did not take; deleting it frees that (if the
        // delete fails, the snapshot stays in memory without them and is written so).
        {
            let mut sm = snap.state.meta.borrow_mut();
            for &index in &taken {
                sm.clusters[index] = 0;
            }
            // A thick map may not have holes (its chain would no longer parse, and the
            // snapshot would not open after a reload): a snapshot left with holes by a
            // delete that fails below is written thin (found by the simulation, seed 1388).
            if !taken.is_empty() {
                sm.flags.invalid |= FLAG_THIN_PROV;
            }
        }
        snap.state
            .touch_clusters(0..snap.state.meta.borrow().clusters.len());
        snap.state.mark_changed();
        thawed
    }

    /// The clone takes the snapshot's clusters and parent (with its I/O frozen); returns the
    /// cluster indexes it took. On error before the commit nothing changed.
    async fn merge_frozen(&self, snap: &Blob, clone: &Blob) -> Result<Vec<usize>> {
        let (snap_id, clone_id) = (snap.id(), clone.id());
        let grand = snap.parent_id();
        let new_parent = match grand {
            Some(g) => Some(self.open_blob(g).await?),
            None => None,
        };
        // What is restored if the clone's root does not commit: the clusters it took and its
        // parent link only (a kept thin insert of the clone must survive the restore).
        let saved_parent = clone
            .state
            .meta
            .borrow()
            .xattr(true, XATTR_SNAPSHOT.as_bytes())
            .map(<[u8]>::to_vec);
        let taken = {
            let sm = snap.state.meta.borrow();
            let mut cm = clone.state.meta.borrow_mut();
            let mut taken = Vec::new();
            for (index, slot) in cm.clusters.iter_mut().enumerate() {
                let from_snap = sm.clusters.get(index).copied().unwrap_or(0);
                if *slot == 0 && from_snap != 0 {
                    *slot = from_snap;
                    taken.push(index);
                }
            }
            let repointed = match grand {
                Some(g) => cm.set_xattr(true, XATTR_SNAPSHOT.as_bytes(), &g.to_le_bytes()),
                None => {
                    cm.remove_xattr(true, XATTR_SNAPSHOT.as_bytes());
                    Ok(())
                }
            };
            repointed
                .map(|()| taken.clone())
                .map_err(|err| (err, taken))
        };
        let taken = match taken {
            Ok(taken) => Ok(taken),
            Err((err, partial)) => {
                restore_merge(&clone.state, &snap.state, &partial, saved_parent.as_deref());
                Err(err)
            }
        };
        let persisted = match taken {
            Ok(indexes) => {
                for &index in &indexes {
                    clone.state.touch_clusters(index..index + 1);
                }
                clone.state.mark_changed();
                // The SNAPRM mark must be durable before the clone's new root.
                match crate::persist::persist_after_all(self, &clone.state).await {
                    Ok(late) => Ok((indexes, late)),
                    Err(err) => {
                        restore_merge(&clone.state, &snap.state, &indexes, saved_parent.as_deref());
                        Err(err)
                    }
                }
            }
            Err(err) => Err(err),
        };
        let (taken, late) = match persisted {
            Ok(done) => done,
            Err(err) => {
                clone.state.mark_changed();
                if let Some(new_parent) = new_parent {
                    let _ = new_parent.close().await;
                }
                return Err(err);
            }
        };
        warn_late(clone_id, "merged clone", late);
        // Committed: the clone owns the clusters and reads through the grandparent.
        let old_parent = clone.state.replace_parent(new_parent);
        clone.state.publish_map();
        self.unlink_clone(clone_id);
        self.unlink_clone(snap_id);
        if let Some(g) = grand {
            self.link_clone(g, clone_id);
        }
        if let Some(old) = old_parent {
            old.close().await?;
        }
        Ok(taken)
    }

    /// A snapshot marked `SNAPRM` whose clone no longer reads through it (the merge
    /// committed): forgets, in memory, the clusters the clone took, so that deleting it
    /// frees only its own. What the clone took may since have moved on to a snapshot of the
    /// clone (taken after the merge, before the snapshot's delete was finished): every
    /// blob on the clone's parent chain counts, up to the chain's end or back to `snap`.
    pub(crate) async fn forget_merged_clusters(&self, snap: &Blob) -> Result<()> {
        let removing = snap
            .state
            .meta
            .borrow()
            .xattr(true, XATTR_SNAPSHOT_REMOVING.as_bytes())
            .and_then(|value| <[u8; 8]>::try_from(value).ok())
            .map(u64::from_le_bytes);
        let Some(clone_id) = removing else {
            return Ok(());
        };
        if self.parent_of(clone_id) == Some(snap.id()) {
            return Ok(()); // the merge never committed
        }
        // Only a clone that does not exist took nothing. One that cannot be read now (a
        // read error, damaged metadata) may still map the clusters: the snapshot is not
        // deleted then (the error is returned; a load reports the merge not repaired), or
        // its delete would free clusters the clone owns.
        let mut taken: Vec<Vec<u32>> = Vec::new();
        let mut next = Some(clone_id);
        let mut seen = std::collections::HashSet::new();
        while let Some(id) = next.filter(|&id| id != snap.id() && seen.insert(id)) {
            match self.open_blob(id).await {
                Ok(blob) => {
                    taken.push(blob.cluster_map());
                    blob.close().await?;
                }
                Err(BlobError::NoSuchBlob(_)) => {}
                Err(err) => return Err(err),
            }
            next = self.parent_of(id);
        }
        let mut sm = snap.state.meta.borrow_mut();
        for (index, slot) in sm.clusters.iter_mut().enumerate() {
            if *slot != 0 && taken.iter().any(|map| map.get(index) == Some(&*slot)) {
                *slot = 0;
            }
        }
        Ok(())
    }
}

/// Load-time repair of snapshots a crash interrupted (blobs still carrying `SNAPTMP`): when
/// the original already points at the snapshot, the snapshot is finished (read-only, mark
/// removed); otherwise the original still owns its clusters and the snapshot's own metadata
/// pages are freed. Returns what it did, for the load report.
pub(crate) async fn repair_pending_snapshots(
    store: &Blobstore,
    pending: Vec<(u64, u64)>,
) -> Result<Vec<String>> {
    let mut done = Vec::new();
    for (snap_id, orig_id) in pending {
        match repair_pending_snapshot(store, snap_id, orig_id).await {
            Ok(what) => done.push(what),
            Err(err) => {
                tracing::warn!(blob = format!("{snap_id:#x}"), %err, "half-made snapshot left as it is");
                done.push(format!(
                    "snapshot {snap_id:#x} of {orig_id:#x}: not repaired: {err}"
                ));
            }
        }
    }
    Ok(done)
}

async fn repair_pending_snapshot(store: &Blobstore, snap_id: u64, orig_id: u64) -> Result<String> {
    let (orig_points_here, orig_extent_pages) = match store.open_blob(orig_id).await {
        Ok(orig) => {
            let here = orig.state.meta.borrow().parent_id().ok().flatten() == Some(snap_id);
            let pages = orig.state.meta.borrow().extent_pages.clone();
            orig.close().await?;
            (here, pages)
        }
        // Only a missing original means it never took the snapshot; an original that
        // cannot be read may still name it, so the snapshot is left for a repair tool.
        Err(BlobError::NoSuchBlob(_)) => (false, Vec::new()),
        Err(err) => return Err(err),
    };
    // Any blob reading through S means S was taken (its finished root failed to reach the
    // disk, and the original has moved on since: a second snapshot, a decouple).
    let taken = orig_points_here || !store.clones_of(snap_id).is_empty();
    let snap = store.open_blob(snap_id).await?;
    if taken {
        {
            let mut sm = snap.state.meta.borrow_mut();
            sm.remove_xattr(true, XATTR_SNAPSHOT_PENDING.as_bytes());
            sm.flags.data_ro |= FLAG_READ_ONLY;
        }
        snap.state.mark_changed();
        crate::persist::persist(store, &snap.state).await?;
        snap.close().await?;
        Ok(format!("snapshot {snap_id:#x} of {orig_id:#x}: finished"))
    } else {
        store
            .delete_untaken_snapshot(snap, &orig_extent_pages)
            .await?;
        Ok(format!(
            "snapshot {snap_id:#x} of {orig_id:#x}: removed (never taken)"
        ))
    }
}

/// Load-time repair of merges a crash interrupted (snapshots still carrying `SNAPRM`): if
/// the clone still reads through the snapshot, the merge never committed and the mark is
/// removed; otherwise the clone already owns the clusters it took, and the snapshot is
/// deleted freeing only the clusters the clone does not reference.
pub(crate) async fn repair_interrupted_merges(
    store: &Blobstore,
    removing: Vec<(u64, u64)>,
) -> Result<Vec<String>> {
    let mut done = Vec::new();
    for (snap_id, clone_id) in removing {
        match repair_interrupted_merge(store, snap_id, clone_id).await {
            Ok(what) => done.push(what),
            Err(err) => {
                tracing::warn!(blob = format!("{snap_id:#x}"), %err, "interrupted merge left as it is");
                done.push(format!(
                    "merge of snapshot {snap_id:#x} into {clone_id:#x}: not repaired: {err}"
                ));
            }
        }
    }
    Ok(done)
}

async fn repair_interrupted_merge(
    store: &Blobstore,
    snap_id: u64,
    clone_id: u64,
) -> Result<String> {
    if store.parent_of(clone_id) == Some(snap_id) {
        let snap = store.open_blob(snap_id).await?;
        snap.state
            .meta
            .borrow_mut()
            .remove_xattr(true, XATTR_SNAPSHOT_REMOVING.as_bytes());
        snap.state.mark_changed();
        crate::persist::persist(store, &snap.state).await?;
        snap.close().await?;
        return Ok(format!(
            "merge of snapshot {snap_id:#x} into {clone_id:#x}: undone"
        ));
    }
    // Deleting it forgets the clusters the clone took first (forget_merged_clusters).
    let snap = store.open_blob(snap_id).await?;
    store.unlink_clone(snap_id);
    store.delete_open(snap).await?;
    Ok(format!(
        "merge of snapshot {snap_id:#x} into {clone_id:#x}: finished"
    ))
}
