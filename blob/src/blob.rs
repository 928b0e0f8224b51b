//! Blobs: the in-memory state of an open blob ([`BlobState`], one per blob however many
//! opens) and the handle callers hold ([`Blob`]) with its metadata operations (close,
//! resize, xattrs, read-only). Create, open and delete are in `blob_lifecycle`.

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::rc::Rc;
use std::sync::Arc;

use crate::error::{BlobError, Result};
use crate::format::EXTENTS_PER_PAGE;
use crate::io::BlobIo;
use crate::meta::{BlobMeta, ExtentForm};
use crate::store::Blobstore;
use crate::sync::LocalMutex;

/// Most snapshots a blob may read through (its parent, grandparent, ...): an open refuses a
/// deeper chain, and a snapshot or clone that would make one is refused (`-EINVAL`).
pub const MAX_CHAIN_DEPTH: usize = 1024;

/// Options of [`Blobstore::create_blob`].
#[derive(Debug, Clone)]
pub struct BlobOptions {
    /// Size in clusters.
    pub num_clusters: u64,
    /// Thin provisioned: clusters are allocated on first write.
    pub thin: bool,
    /// Public xattrs set at creation.
    pub xattrs: Vec<(String, Vec<u8>)>,
    /// Internal xattrs set at creation.
    pub internal_xattrs: Vec<(String, Vec<u8>)>,
    /// How the clusters are recorded (default: extent table).
    pub form: ExtentForm,
}

impl Default for BlobOptions {
    fn default() -> Self {
        BlobOptions {
            num_clusters: 0,
            thin: false,
            xattrs: Vec::new(),
            internal_xattrs: Vec::new(),
            form: ExtentForm::Table,
        }
    }
}

/// One open blob's metadata-reactor state.
pub(crate) struct BlobState {
    pub(crate) id: u64,
    pub(crate) meta: RefCell<BlobMeta>,
    /// The chain's md pages as on disk, root first (empty before the first persist).
    pub(crate) pages: RefCell<Vec<u32>>,
    pub(crate) dirty: Cell<bool>,
    pub(crate) open_ref: Cell<u32>,
    pub(crate) persist_lock: LocalMutex,
    pub(crate) io: Arc<BlobIo>,
    pub(crate) parent: RefCell<Option<Blob>>,
    /// Clusters cut off by a shrink, `(blob cluster index, device cluster)`, released once
    /// the shrink is on disk. Until then the durable map may still name each one at its
    /// index, so a grow reuses one only at that same index (`resize`).
    pub(crate) pending_release: RefCell<Vec<(usize, u32)>>,
    /// Extent pages cut off by a shrink, released once the shrink is on disk.
    pub(crate) pending_extent_release: RefCell<Vec<u32>>,
    /// Extent pages whose contents changed since the last persist.
    pub(crate) dirty_extent_pages: RefCell<BTreeSet<usize>>,
    /// Effective read-only state (SPDK: set_read_only takes effect at the next sync).
    pub(crate) data_ro: Cell<bool>,
    pub(crate) md_ro: Cell<bool>,
    /// Clusters inserted by thin writes whose metadata is not on disk yet: hidden from
    /// I/O reactors until it is.
    pub(crate) unpublished: RefCell<Vec<(usize, u32)>>,
    /// Whether this process has written the blob's chain (a persist that only inserts
    /// clusters into existing extent pages then writes only those pages).
    pub(crate) chain_written: Cell<bool>,
    /// Whether a change since the last persist rewrites the chain (see `mark_changed`).
    pub(crate) chain_changed: Cell<bool>,
    /// Thin inserts made so far (each takes the next number) and the highest one on disk:
    /// inserts wait for a persist that covers them (group commit).
    pub(crate) insert_seq: Cell<u64>,
    pub(crate) durable_seq: Cell<u64>,
    /// Notified at the end of every persist.
    pub(crate) persisted: crate::sync::LocalNotify,
    /// The number of the last metadata write that rewrote one of its extent pages in place
    /// (a later root names that page, so a flush must cover it first); 0 for none. A blob
    /// opened again starts from the last write made so far (one may be from before its close).
    pub(crate) in_place_write: Cell<u64>,
    /// The number of its last metadata write that the map on disk depends on (a root, or an
    /// extent page rewritten in place); 0 for none (see `persist::Deps::After`).
    pub(crate) last_write: Cell<u64>,
    /// Thin inserts whose writer has gone (their in-place extent page write failed after
    /// it may have reached the disk): the blob owns the clusters, the next persist publishes
    /// them, and whoever takes one out of the map releases it.
    pub(crate) kept_inserts: RefCell<Vec<(usize, u32)>>,
    /// The errno of the last persist that undid thin inserts (0: none yet): what their
    /// writers return (a full md region is -ENOMEM, not an I/O error).
    pub(crate) undone_errno: Cell<i32>,
    /// Clones of it being made now (a merge-on-delete of it waits for none).
    pub(crate) cloning: Cell<u32>,
    /// A snapshot, inflate, decouple, merge or resize is running on it (SPDK's
    /// `locked_operation_in_progress`): another one is refused with -EBUSY.
    pub(crate) op_in_progress: Cell<Option<&'static str>>,
    /// A snapshot is handing the blob's map over: thin inserts wait (see
    /// `persist::insert_cluster`) until it ends, notified on `handover_done`.
    pub(crate) handover: Cell<bool>,
    pub(crate) handover_done: crate::sync::LocalNotify,
}

impl BlobState {
    pub(crate) fn new(meta: BlobMeta, pages: Vec<u32>, io: Arc<BlobIo>) -> Rc<BlobState> {
        let data_ro = meta.data_ro();
        let md_ro = meta.md_ro();
        Rc::new(BlobState {
            id: meta.id,
            meta: RefCell::new(meta),
            pages: RefCell::new(pages),
            dirty: Cell::new(false),
            open_ref: Cell::new(1),
            persist_lock: LocalMutex::default(),
            io,
            parent: RefCell::new(None),
            pending_release: RefCell::new(Vec::new()),
            pending_extent_release: RefCell::new(Vec::new()),
            dirty_extent_pages: RefCell::new(BTreeSet::new()),
            data_ro: Cell::new(data_ro),
            md_ro: Cell::new(md_ro),
            unpublished: RefCell::new(Vec::new()),
            chain_written: Cell::new(false),
            chain_changed: Cell::new(true),
            insert_seq: Cell::new(0),
            durable_seq: Cell::new(0),
            persisted: crate::sync::LocalNotify::default(),
            in_place_write: Cell::new(0),
            last_write: Cell::new(0),
            kept_inserts: RefCell::new(Vec::new()),
            undone_errno: Cell::new(0),
            cloning: Cell::new(0),
            op_in_progress: Cell::new(None),
            handover: Cell::new(false),
            handover_done: crate::sync::LocalNotify::default(),
        })
    }

    /// Starts an operation that must not interleave with another on this blob (snapshot,
    /// inflate, decouple, merge, resize): -EBUSY naming the running one. The guard ends it
    /// when dropped, however the operation ends (or is dropped).
    pub(crate) fn begin_op(&self, what: &'static str) -> Result<OpGuard<'_>> {
        if let Some(running) = self.op_in_progress.get() {
            return Err(BlobError::Busy(format!(
                "blob {:#x}: cannot {what} while a {running} is in progress",
                self.id
            )));
        }
        self.op_in_progress.set(Some(what));
        Ok(OpGuard { state: self })
    }

    /// Marks the metadata changed in a way that rewrites the chain (anything but a thin
    /// insert into an extent page that exists).
    pub(crate) fn mark_changed(&self) {
        self.dirty.set(true);
        self.chain_changed.set(true);
    }

    /// Sets the parent snapshot handle, and with it where I/O reactors read unallocated
    /// clusters from; returns the previous handle (for the caller to close).
    pub(crate) fn replace_parent(&self, parent: Option<Blob>) -> Option<Blob> {
        self.io.set_parent(parent.as_ref().map(Blob::io));
        std::mem::replace(&mut *self.parent.borrow_mut(), parent)
    }

    /// Gives I/O reactors the current map, with clusters not yet on disk hidden.
    pub(crate) fn publish_map(&self) {
        let mut clusters = self.meta.borrow().clusters.clone();
        for &(index, _) in self.unpublished.borrow().iter() {
            if let Some(slot) = clusters.get_mut(index) {
                *slot = 0;
            }
        }
        self.io.replace_map(&clusters);
    }

    /// Marks extent pages covering clusters `range` as needing a write.
    pub(crate) fn touch_clusters(&self, range: std::ops::Range<usize>) {
        if self.meta.borrow().form != ExtentForm::Table || range.is_empty() {
            return;
        }
        let per = EXTENTS_PER_PAGE as usize;
        let mut dirty = self.dirty_extent_pages.borrow_mut();
        for page in range.start / per..=(range.end - 1) / per {
            dirty.insert(page);
        }
    }
}

/// An operation in progress on a blob (see [`BlobState::begin_op`]); ends it on drop.
pub(crate) struct OpGuard<'a> {
    state: &'a BlobState,
}

impl Drop for OpGuard<'_> {
    fn drop(&mut self) {
        self.state.op_in_progress.set(None);
    }
}

/// A handle on an open blob. Every open returns a handle on the same in-memory blob; each
/// must be given back with [`Blob::close`]. Lives on the metadata reactor; use
/// [`Blob::io`] for a handle that I/O reactors can use.
#[derive(Clone)]
pub struct Blob {
    pub(crate) state: Rc<BlobState>,
    pub(crate) store: Blobstore,
}

impl std::fmt::Debug for Blob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blob")
            .field("id", &format_args!("{:#x}", self.state.id))
            .finish()
    }
}

impl Blob {
    /// The blob's id.
    pub fn id(&self) -> u64 {
        self.state.id
    }

    /// Size in clusters.
    pub fn num_clusters(&self) -> u64 {
        self.state.meta.borrow().clusters.len() as u64
    }

    /// Size in io_units.
    pub fn num_io_units(&self) -> u64 {
        self.num_clusters() * self.store.geometry().units_per_cluster()
    }

    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.num_clusters() * self.store.cluster_size()
    }

    /// Clusters that have a device cluster.
    pub fn num_allocated_clusters(&self) -> u64 {
        self.state
            .meta
            .borrow()
            .clusters
            .iter()
            .filter(|&&c| c != 0)
            .count() as u64
    }

    /// The device cluster behind each blob cluster (0 = unallocated).
    pub fn cluster_map(&self) -> Vec<u32> {
        self.state.meta.borrow().clusters.clone()
    }

    /// Whether the blob is thin provisioned.
    pub fn is_thin(&self) -> bool {
        self.state.meta.borrow().is_thin()
    }

    /// Whether its data or metadata is read-only now.
    pub fn is_read_only(&self) -> bool {
        self.state.data_ro.get() || self.state.md_ro.get()
    }

    /// Whether its data is read-only now.
    pub fn is_data_read_only(&self) -> bool {
        self.state.data_ro.get()
    }

    /// Whether its metadata is read-only now.
    pub fn is_md_read_only(&self) -> bool {
        self.state.md_ro.get()
    }

    /// The raw flag words.
    pub fn flags(&self) -> crate::format::descriptor::Flags {
        self.state.meta.borrow().flags
    }

    /// The extent form.
    pub fn extent_form(&self) -> ExtentForm {
        self.state.meta.borrow().form
    }

    /// The parent snapshot, if this blob is a clone.
    pub fn parent_id(&self) -> Option<u64> {
        self.state.parent.borrow().as_ref().map(Blob::id)
    }

    /// Whether it is a clone (has a parent snapshot).
    pub fn is_clone(&self) -> bool {
        self.state.parent.borrow().is_some()
    }

    /// A `Send` handle for I/O from any reactor through a [`crate::BlobChannel`].
    pub fn io(&self) -> Arc<BlobIo> {
        Arc::clone(&self.state.io)
    }

    /// The value of public xattr `name`.
    pub fn xattr(&self, name: &str) -> Option<Vec<u8>> {
        self.state
            .meta
            .borrow()
            .xattr(false, name.as_bytes())
            .map(<[u8]>::to_vec)
    }

    /// The value of internal xattr `name`.
    pub fn internal_xattr(&self, name: &str) -> Option<Vec<u8>> {
        self.state
            .meta
            .borrow()
            .xattr(true, name.as_bytes())
            .map(<[u8]>::to_vec)
    }

    /// Public xattr names, in order.
    pub fn xattr_names(&self) -> Vec<String> {
        names(&self.state.meta.borrow().xattrs)
    }

    /// Internal xattr names, in order.
    pub fn internal_xattr_names(&self) -> Vec<String> {
        names(&self.state.meta.borrow().internal_xattrs)
    }

    /// Public xattrs as raw pairs.
    pub fn xattrs(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.state.meta.borrow().xattrs.clone()
    }

    /// Internal xattrs as raw pairs.
    pub fn internal_xattrs(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.state.meta.borrow().internal_xattrs.clone()
    }

    fn check_md_writable(&self, what: &'static str) -> Result<()> {
        self.store.check_md_thread()?;
        if self.state.md_ro.get() {
            return Err(BlobError::ReadOnly {
                id: self.id(),
                what,
            });
        }
        Ok(())
    }

    /// Sets public xattr `name` (in memory; persisted by sync or close). -EPERM when the
    /// metadata is read-only; -EINVAL when name + value exceed what a page holds.
    pub fn set_xattr(&self, name: &str, value: &[u8]) -> Result<()> {
        self.set_xattr_raw(false, name, value)
    }

    /// Sets internal xattr `name` (sets the INTERNAL_XATTR flag).
    pub fn set_internal_xattr(&self, name: &str, value: &[u8]) -> Result<()> {
        self.set_xattr_raw(true, name, value)
    }

    fn set_xattr_raw(&self, internal: bool, name: &str, value: &[u8]) -> Result<()> {
        self.check_md_writable("set an xattr")?;
        self.state
            .meta
            .borrow_mut()
            .set_xattr(internal, name.as_bytes(), value)?;
        self.state.mark_changed();
        Ok(())
    }

    /// Removes public xattr `name`: -ENOENT if absent, -EPERM when read-only.
    pub fn remove_xattr(&self, name: &str) -> Result<()> {
        self.remove_xattr_raw(false, name)
    }

    /// Removes internal xattr `name` (clears INTERNAL_XATTR with the last one).
    pub fn remove_internal_xattr(&self, name: &str) -> Result<()> {
        self.remove_xattr_raw(true, name)
    }

    fn remove_xattr_raw(&self, internal: bool, name: &str) -> Result<()> {
        self.check_md_writable("remove an xattr")?;
        if !self
            .state
            .meta
            .borrow_mut()
            .remove_xattr(internal, name.as_bytes())
        {
            return Err(BlobError::NoSuchXattr {
                id: self.id(),
                name: name.to_string(),
            });
        }
        self.state.mark_changed();
        Ok(())
    }

    /// Marks the blob read-only; takes effect (writes refused) at the next sync.
    pub fn set_read_only(&self) -> Result<()> {
        self.store.check_md_thread()?;
        self.state.meta.borrow_mut().flags.data_ro |= crate::format::descriptor::FLAG_READ_ONLY;
        self.state.mark_changed();
        Ok(())
    }

    /// Writes the metadata if it changed. A no-op on a blob whose metadata is read-only.
    ///
    /// Dropping the returned future does not cancel the operation: it runs to completion as its
    /// own task on the metadata reactor (the caller's future only waits for its result).
    pub async fn sync_md(&self) -> Result<()> {
        self.store.check_md_thread()?;
        let blob = self.clone();
        crate::detach::detached_op(
            self.store.begin_md_op()?,
            async move { blob.sync_md_now().await },
            crate::detach::forget,
        )
        .await
    }

    /// The body of `sync_md`, which runs it as its own task.
    async fn sync_md_now(&self) -> Result<()> {
        self.store.check_md_thread()?;
        if self.state.md_ro.get() {
            return Ok(());
        }
        crate::persist::persist(&self.store, &self.state).await?;
        let meta = self.state.meta.borrow();
        if meta.data_ro() {
            self.state.data_ro.set(true);
            self.state.io.set_data_ro(true);
        }
        if meta.md_ro() {
            self.state.md_ro.set(true);
        }
        Ok(())
    }

    /// Resizes to `num_clusters`. A thick blob claims its new clusters now (-ENOSPC with
    /// nothing claimed if there are not enough); a thin blob grows without allocating; a
    /// shrink releases clusters once the new size is on disk. Persisted by sync or close.
    /// -EPERM when the metadata is read-only, -EBUSY while another resize, a snapshot, an
    /// inflate, a decouple or a merge runs on it (as SPDK's per-blob operation lock).
    ///
    /// Dropping the returned future does not cancel the operation: it runs to completion as its
    /// own task on the metadata reactor (the caller's future only waits for its result).
    pub async fn resize(&self, num_clusters: u64) -> Result<()> {
        self.store.check_md_thread()?;
        let blob = self.clone();
        crate::detach::detached_op(
            self.store.begin_md_op()?,
            async move { blob.resize_now(num_clusters).await },
            crate::detach::forget,
        )
        .await
    }

    /// The body of `resize`, which runs it as its own task.
    async fn resize_now(&self, num_clusters: u64) -> Result<()> {
        self.check_md_writable("resize")?;
        let _op = self.state.begin_op("resize")?;
        // I/O is frozen around the map change: nothing in flight uses the old map.
        let io = self.io();
        let result = match crate::freeze::freeze(&self.store, &io).await {
            Ok(()) => {
                let resized = crate::resize::resize(&self.store, &self.state, num_clusters);
                let thawed = crate::freeze::unfreeze(&self.store, &io).await;
                resized.and(thawed)
            }
            Err(err) => Err(err),
        };
        result
    }

    /// Test support: sets an internal xattr even on a read-only blob and writes it now (the
    /// crash tests use it to leave the marks an interrupted operation leaves).
    #[doc(hidden)]
    pub async fn set_internal_xattr_unchecked(&self, name: &str, value: &[u8]) {
        if self
            .state
            .meta
            .borrow_mut()
            .set_xattr(true, name.as_bytes(), value)
            .is_ok()
        {
            self.state.mark_changed();
            let _ = crate::persist::persist(&self.store, &self.state).await;
        }
    }

    /// Another handle on the same open blob (refcount + 1); close it separately.
    pub(crate) fn reopen(&self) -> Blob {
        self.state.open_ref.set(self.state.open_ref.get() + 1);
        Blob {
            state: Rc::clone(&self.state),
            store: self.store.clone(),
        }
    }

    /// Gives this handle back: persists if dirty, and frees the blob when the last handle is
    /// closed. If the persist does not commit, the error is returned and the handle is still
    /// given back; a blob whose last handle that was stays in memory with its changes (the
    /// next open gets it, unload writes it). An error from a step after the commit is
    /// returned too.
    ///
    /// The last close waits (at most about 5 s) until no request of the blob's dropped I/O is
    /// still on the device (-EBUSY, the handle given back all the same, if one still is). I/O
    /// whose futures are still held is the caller's to finish before closing, as in SPDK.
    ///
    /// Dropping the returned future does not cancel the operation: it runs to completion as its
    /// own task on the metadata reactor (the caller's future only waits for its result).
    pub async fn close(self) -> Result<()> {
        self.store.check_md_thread()?;
        crate::detach::detached_op(
            self.store.md_op_running(),
            async move { self.close_now().await },
            crate::detach::forget,
        )
        .await
    }

    /// Gives back a handle an operation of the store opened for itself (a snapshot's handles
    /// on the original and on the new snapshot), from inside that operation's own task.
    /// While other handles remain only the count drops: no task, no persist, so the call
    /// does not wait for reactor passes (each one long while copy-on-writes run). Whatever
    /// is dirty then is written by its own owners: thin inserts persist themselves, and the
    /// operation wrote its own changes before. The last handle closes as [`Blob::close`].
    pub(crate) async fn close_within_op(self) -> Result<()> {
        let refs = self.state.open_ref.get();
        if refs > 1 {
            self.state.open_ref.set(refs - 1);
            return Ok(());
        }
        self.close_now().await
    }

    /// The body of `close`, which runs it as its own task.
    async fn close_now(self) -> Result<()> {
        self.store.check_md_thread()?;
        let mut late = None;
        // Read-only metadata included: only the store's own changes make such a blob dirty
        // (a snapshot's finished root that failed to reach the disk), never the user's.
        if self.state.dirty.get() {
            match crate::persist::persist_outcome(
                &self.store,
                &self.state,
                crate::persist::Deps::Own,
            )
            .await
            {
                Ok(after_commit) => late = after_commit,
                Err(err) => {
                    // The handle is given back all the same; the last one leaves the blob in
                    // memory (dirty) for the next open, and unload writes it first.
                    let refs = self.state.open_ref.get();
                    self.state.open_ref.set(refs.saturating_sub(1));
                    return Err(err);
                }
            }
        }
        let refs = self.state.open_ref.get();
        self.state.open_ref.set(refs.saturating_sub(1));
        if refs <= 1 {
            self.store
                .inner
                .state
                .borrow_mut()
                .open_blobs
                .remove(&self.state.id);
            self.state.io.mark_closed();
            // Requests of the blob's dropped I/O the device may still carry: nothing of the
            // blob lands after its last close returned (a delete next frees its clusters).
            let io = &self.state.io;
            if !crate::io::wait_until_zero(|| io.held()).await {
                late = late.or(Some(BlobError::Busy(format!(
                    "blob {:#x} closed with {} dropped request(s) still on the device",
                    self.state.id,
                    io.held()
                ))));
            }
            let parent = self.state.replace_parent(None);
            if let Some(parent) = parent {
                Box::pin(parent.close()).await?;
            }
        }
        late.map_or(Ok(()), Err)
    }
}

fn names(list: &[(Vec<u8>, Vec<u8>)]) -> Vec<String> {
    list.iter()
        .map(|(name, _)| String::from_utf8_lossy(name).into_owned())
        .collect()
}
