//! The blobstore: one store on one bdev, its metadata owned by one reactor (the metadata
//! reactor, where it was initialised or loaded).
//!
//! - `claim`: a claimed thin cluster, released on drop unless inserted.
//! - `md_io`: page-granular reads and writes on the metadata reactor's bdev channel.
//! - `lifecycle`: init, unload, destroy, super blob.
//! - `load`: the clean load (masks) and the dirty-shutdown recovery (replay).
//! - `md_scan`: the load's batched reads of the md region.
//! - `superset`: the root superset a dirty load reads instead of the whole md region.
//!
//! Metadata state lives in [`Blobstore`] (`Rc`, not `Send`): calling its methods from a task
//! on another reactor returns [`BlobError::WrongThread`]. What I/O reactors need (geometry,
//! the used-cluster map, the device) lives in the `Send + Sync` [`StoreShared`].

pub(crate) mod claim;
pub(crate) mod durability;
mod lifecycle;
mod load;
pub(crate) mod md_io;
mod md_ops;
pub(crate) use md_ops::MdOpRunning;
mod md_scan;
mod superset;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use spool_bdev::{BdevChannel, BdevDesc};
use spool_reactor::{IoDevice, ReactorId};

use crate::bitmap::{AtomicBitmap, BitSet};
use crate::blob::BlobState;
use crate::error::{BlobError, Result};
use crate::format::super_block::{Bstype, SuperBlock};
use crate::format::PAGE_SIZE_U64;
use crate::io::ChannelContext;
use crate::sync::LocalEvent;

pub use lifecycle::InitOptions;
pub use load::{LoadOptions, LoadReport};

/// A store's fixed geometry, in bytes and pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Geometry {
    /// Bytes per cluster.
    pub cluster_size: u64,
    /// Bytes per io_unit (the unit of blob I/O offsets and lengths).
    pub io_unit_size: u64,
    /// Bytes per device block.
    pub block_size: u64,
    /// First md page, in pages from the start of the device.
    pub md_start: u64,
    /// Md pages.
    pub md_len: u32,
    /// Clusters of the store.
    pub total_clusters: u64,
    /// Clusters used by the super block, masks and md region.
    pub md_clusters: u64,
    /// log2 of the cluster size when it is a power of two (the I/O fast path shifts).
    pub cluster_shift: Option<u32>,
    /// log2 of the io_unit size (always a power of two on a valid store).
    pub io_unit_shift: Option<u32>,
}

/// log2 of `value` when it is a power of two.
pub(crate) fn shift_of(value: u64) -> Option<u32> {
    value.is_power_of_two().then(|| value.trailing_zeros())
}

impl Geometry {
    /// Pages per cluster.
    pub fn pages_per_cluster(&self) -> u64 {
        self.cluster_size / PAGE_SIZE_U64
    }

    /// io_units per cluster.
    pub fn units_per_cluster(&self) -> u64 {
        self.cluster_size / self.io_unit_size
    }

    /// Device byte offset of md page `page`.
    pub fn md_page_offset(&self, page: u32) -> u64 {
        (self.md_start + u64::from(page)) * PAGE_SIZE_U64
    }

    /// Data clusters (total minus metadata).
    pub fn total_data_clusters(&self) -> u64 {
        self.total_clusters - self.md_clusters
    }
}

/// What every reactor may read: geometry, the device, the used-cluster map.
pub struct StoreShared {
    /// Unique per loaded store (keys the metadata reactor's registry).
    pub(crate) store_id: u64,
    /// Fixed geometry.
    pub(crate) geometry: Geometry,
    /// Clusters in use; I/O reactors claim thin clusters here without a lock.
    pub(crate) used_clusters: AtomicBitmap,
    /// Where metadata operations run.
    pub(crate) md_reactor: ReactorId,
    /// Hint for the next cluster search.
    pub(crate) cluster_hint: AtomicU64,
    /// Whether the device reads zeros where it was unmapped.
    pub(crate) desc_reads_zeroes: bool,
    /// The store as an io device: each reactor's [`crate::BlobChannel`] context.
    pub(crate) io_device: IoDevice<ChannelContext>,
    /// Indexes of open blobs in the channels' per-blob tables.
    pub(crate) slots: crate::io::SlotAllocator,
    /// Free clusters known to read as zeros (unmapped on a device whose unmapped blocks
    /// read zeros, since init or since their release): a thin write to one needs no
    /// zero-fill. Empty after a load (history unknown): those get zero-filled.
    pub(crate) zeroed: AtomicBitmap,
    /// Thin allocations holding a claimed cluster not yet in a map or released (unload
    /// waits for none).
    pub(crate) claims_outstanding: AtomicU64,
    /// Device requests of dropped blob I/O still on the device, all blobs (see
    /// `crate::io::HeldCount`): unload and destroy wait for none.
    pub(crate) held_io: Arc<AtomicU64>,
    /// The device, to reserve a thick blob's clusters on the host ([`spool_bdev::Bdev::reserve`]).
    pub(crate) bdev: Arc<dyn spool_bdev::Bdev>,
    /// Releases of a cluster that was already free (test support: must stay 0).
    pub(crate) released_twice: AtomicU64,
    /// How long blobs' I/O stayed frozen (see [`Blobstore::freeze_stats`]).
    pub(crate) freeze_windows: crate::freeze::FreezeWindows,
}

impl StoreShared {
    /// Claims a free data cluster (first fit from the hint) and says whether it is known to
    /// read as zeros.
    pub(crate) fn claim_cluster_zeroed(&self) -> Option<(u32, bool)> {
        let hint = self.cluster_hint.load(Ordering::Relaxed);
        let cluster = self.used_clusters.claim_first(hint)?;
        self.cluster_hint.store(cluster + 1, Ordering::Relaxed);
        // Every claim takes the mark: a cluster released later without a durable unmap
        // must not look zeroed to its next owner.
        let zeroed = self.zeroed.release(cluster);
        u32::try_from(cluster).ok().map(|cluster| (cluster, zeroed))
    }

    /// Claims a free data cluster (first fit from the hint); it no longer counts as zeroed.
    pub(crate) fn claim_cluster(&self) -> Option<u32> {
        self.claim_cluster_zeroed().map(|(cluster, _)| cluster)
    }

    /// Thin allocations holding a claimed cluster now.
    pub(crate) fn claims_outstanding(&self) -> u64 {
        self.claims_outstanding.load(Ordering::Acquire)
    }

    /// Device requests of dropped blob I/O still on the device now.
    pub(crate) fn held_io(&self) -> u64 {
        self.held_io.load(Ordering::Acquire)
    }

    /// Returns a data cluster to the free pool (never a metadata cluster).
    pub(crate) fn release_cluster(&self, cluster: u32) {
        if u64::from(cluster) >= self.geometry.md_clusters {
            if !self.used_clusters.release(u64::from(cluster)) {
                // Already free: a second release of one cluster (a bug; between the two, a
                // claim elsewhere could have taken it). Counted for the tests.
                self.released_twice.fetch_add(1, Ordering::AcqRel);
                tracing::warn!(cluster, "a cluster released while already free");
            }
            let hint = self.cluster_hint.load(Ordering::Relaxed);
            if u64::from(cluster) < hint {
                self.cluster_hint
                    .store(u64::from(cluster), Ordering::Relaxed);
            }
        }
    }
}

/// A blob being loaded: its result (the state, or the errno) once known.
pub(crate) type LoadingBlob = LocalEvent<Result<Rc<BlobState>, i32>>;

/// Metadata-reactor state.
pub(crate) struct MdState {
    /// The super block as it should be written next (clean flag aside).
    pub(crate) super_block: SuperBlock,
    /// Whether the on-disk super block still says clean (must be cleared before the first
    /// metadata write).
    pub(crate) clean_on_disk: bool,
    /// Md pages in use.
    pub(crate) used_md_pages: BitSet,
    /// Md pages that are a blob's root.
    pub(crate) used_blobids: BitSet,
    /// The root superset record durable on disk (with the super block's marker), which
    /// covers every root page a create has written since; `None` while none is kept (the
    /// store clean on disk, unloading, or no room for one).
    pub(crate) root_superset: Option<crate::format::root_superset::RootSuperset>,
    /// An unload dropped the record and then failed (the store stays usable): the masks may
    /// have overwritten the record, or not. The next create sets a new record up first.
    pub(crate) root_superset_lost: bool,
    /// Open blobs.
    pub(crate) open_blobs: HashMap<u64, Rc<BlobState>>,
    /// Blobs being loaded: later opens wait for the first.
    pub(crate) loading: HashMap<u64, Rc<LoadingBlob>>,
    /// Blob being loaded -> the parent its load is opening now: an open that would wait on
    /// a load which (through these edges) waits on it is a snapshot cycle, refused.
    pub(crate) awaiting_parent: HashMap<u64, u64>,
    /// Snapshot id -> its clones, in the order they were found or made.
    pub(crate) clones: BTreeMap<u64, Vec<u64>>,
    /// Clone id -> its parent snapshot.
    pub(crate) parents: HashMap<u64, u64>,
    /// Blobs the load reported unreadable, with the reason: they refuse to open (with that
    /// reason) until the store is loaded again.
    pub(crate) unreadable: HashMap<u64, String>,
    /// Extent pages a half-made snapshot's root on disk names while they are still its
    /// original's: page -> (the snapshot, whether the original has dropped it since). A
    /// dropped one is neither zeroed nor given back until the snapshot is gone.
    pub(crate) pinned_extent_pages: HashMap<u32, (u64, bool)>,
    /// Set by unload and destroy.
    pub(crate) unloaded: bool,
    /// Loaded read-only ([`crate::LoadOptions::read_only`]): nothing is written.
    pub(crate) read_only: bool,
}

pub(crate) struct StoreInner {
    pub(crate) shared: Arc<StoreShared>,
    pub(crate) md_channel: BdevChannel,
    pub(crate) md_thread: std::thread::ThreadId,
    pub(crate) state: RefCell<MdState>,
    /// Serialises super-block writes (the dirty mark, set_super, unload).
    pub(crate) super_lock: crate::sync::LocalMutex,
    /// Which metadata writes are durable, and releases waiting for a flush.
    pub(crate) durability: durability::Durability,
    /// Metadata operations running now (unload and destroy wait for them).
    pub(crate) md_ops: md_ops::MdOps,
}

/// An open blobstore. Cheap to clone; lives on the metadata reactor (not `Send`).
#[derive(Clone)]
pub struct Blobstore {
    pub(crate) inner: Rc<StoreInner>,
}

thread_local! {
    /// Stores whose metadata reactor runs on this thread, by store id (for messages from
    /// I/O reactors, which only carry the id).
    static REGISTRY: RefCell<HashMap<u64, Weak<StoreInner>>> = RefCell::new(HashMap::new());
}

fn next_store_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl Blobstore {
    pub(crate) fn register(inner: Rc<StoreInner>) -> Blobstore {
        let id = inner.shared.store_id;
        REGISTRY.with(|registry| {
            registry.borrow_mut().insert(id, Rc::downgrade(&inner));
        });
        Blobstore { inner }
    }

    /// The store with `store_id` whose metadata reactor is the calling one.
    pub(crate) fn lookup(store_id: u64) -> Option<Blobstore> {
        REGISTRY.with(|registry| {
            let store = registry.borrow().get(&store_id)?.upgrade()?;
            Some(Blobstore { inner: store })
        })
    }

    pub(crate) fn unregister(&self) {
        let id = self.inner.shared.store_id;
        REGISTRY.with(|registry| {
            registry.borrow_mut().remove(&id);
        });
    }

    /// Fails unless called on the metadata reactor of a store that is still loaded.
    pub(crate) fn check_md_thread(&self) -> Result<()> {
        let here = spool_reactor::reactor_id().ok();
        let same_thread = std::thread::current().id() == self.inner.md_thread;
        if here != Some(self.inner.shared.md_reactor) || !same_thread {
            return Err(BlobError::WrongThread {
                md_reactor: self.inner.shared.md_reactor.to_string(),
                caller: here.map_or_else(
                    || "outside any reactor".into(),
                    |id| format!("reactor {id}"),
                ),
            });
        }
        if self.inner.state.borrow().unloaded {
            return Err(BlobError::Unloaded);
        }
        Ok(())
    }

    pub(crate) fn shared(&self) -> &Arc<StoreShared> {
        &self.inner.shared
    }

    /// The store's geometry.
    pub fn geometry(&self) -> &Geometry {
        &self.inner.shared.geometry
    }

    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        self.geometry().cluster_size
    }

    /// Bytes per metadata page (always 4096).
    pub fn page_size(&self) -> u64 {
        PAGE_SIZE_U64
    }

    /// Bytes per io_unit: the unit of blob I/O.
    pub fn io_unit_size(&self) -> u64 {
        self.geometry().io_unit_size
    }

    /// How long blob I/O has stayed frozen (snapshot, resize, merge), since the store was
    /// loaded: each window runs from the freeze's gate (new I/O of the blob waits from then)
    /// to its unfreeze (the waiting I/O released on every channel), so it bounds the pause a
    /// writer of that blob sees from the operation.
    pub fn freeze_stats(&self) -> crate::freeze::FreezeStats {
        self.inner.shared.freeze_windows.stats()
    }

    /// Free data clusters now.
    pub fn free_cluster_count(&self) -> u64 {
        self.inner.shared.used_clusters.free_count()
    }

    /// Data clusters in all (total minus metadata).
    pub fn total_data_cluster_count(&self) -> u64 {
        self.geometry().total_data_clusters()
    }

    /// The store's type tag.
    pub fn bstype(&self) -> Bstype {
        self.inner.state.borrow().super_block.bstype
    }

    /// Sets the type tag in memory; it is written with the next super block write (unload,
    /// set_super, or the first metadata change after a load).
    pub fn set_bstype(&self, bstype: Bstype) {
        self.inner.state.borrow_mut().super_block.bstype = bstype;
    }

    /// The super block as read at load (or written at init), with the in-memory changes since
    /// (super blob, bstype); its `clean` field keeps the value found on disk at load.
    pub fn super_block(&self) -> SuperBlock {
        self.inner.state.borrow().super_block.clone()
    }

    /// The ids of every blob, in ascending md page order.
    pub fn blob_ids(&self) -> Vec<u64> {
        let state = self.inner.state.borrow();
        state
            .used_blobids
            .iter_set()
            .map(|page| crate::format::page_to_blobid(page as u32))
            .collect()
    }

    /// The parent snapshot of blob `id`, if it is a clone.
    pub fn parent_of(&self, id: u64) -> Option<u64> {
        self.inner.state.borrow().parents.get(&id).copied()
    }

    /// How many snapshots blob `id` reads through (its parent, grandparent, ...), counted
    /// up to [`crate::blob::MAX_CHAIN_DEPTH`] + 1 (a loop counts as that many).
    pub(crate) fn ancestor_count(&self, id: u64) -> usize {
        let state = self.inner.state.borrow();
        let mut count = 0;
        let mut next = state.parents.get(&id).copied();
        while let Some(ancestor) = next {
            count += 1;
            if count > crate::blob::MAX_CHAIN_DEPTH {
                break;
            }
            next = state.parents.get(&ancestor).copied();
        }
        count
    }

    /// The clones of snapshot `id` (empty if none).
    pub fn clones_of(&self, id: u64) -> Vec<u64> {
        self.inner
            .state
            .borrow()
            .clones
            .get(&id)
            .cloned()
            .unwrap_or_default()
    }

    /// Whether blob `id` is a snapshot with at least one clone (SPDK's `is_snapshot`).
    pub fn is_snapshot(&self, id: u64) -> bool {
        self.inner
            .state
            .borrow()
            .clones
            .get(&id)
            .is_some_and(|clones| !clones.is_empty())
    }

    /// Md pages in use (for inspection and tests).
    pub fn used_md_pages(&self) -> Vec<u64> {
        self.inner.state.borrow().used_md_pages.iter_set().collect()
    }

    /// Clusters in use, metadata clusters included (for inspection and tests).
    pub fn used_clusters(&self) -> Vec<u64> {
        self.inner
            .shared
            .used_clusters
            .snapshot()
            .iter_set()
            .collect()
    }

    /// Number of blobs open now (handles not yet closed; not the blobs kept in memory only
    /// because their last close could not write their metadata).
    pub fn open_blob_count(&self) -> usize {
        self.inner
            .state
            .borrow()
            .open_blobs
            .values()
            .filter(|state| state.open_ref.get() > 0)
            .count()
    }

    /// Blobs whose last handle was closed but whose metadata could not be written then (or
    /// whose delete did not commit): kept in memory so nothing they hold is lost; the next
    /// open reuses them and unload writes them first.
    pub(crate) fn orphans(&self) -> Vec<Rc<BlobState>> {
        self.inner
            .state
            .borrow()
            .open_blobs
            .values()
            .filter(|state| state.open_ref.get() == 0)
            .cloned()
            .collect()
    }

    /// Deletes the half-made snapshots whose earlier removal failed (best effort; unload
    /// retries and reports what still fails). A new snapshot calls it first.
    pub(crate) async fn retry_abandoned_snapshots(&self) {
        for state in self.orphans() {
            let half_made = state
                .meta
                .borrow()
                .xattr(true, crate::meta::XATTR_SNAPSHOT_PENDING.as_bytes())
                .is_some();
            if half_made {
                state.open_ref.set(1);
                let blob = crate::blob::Blob {
                    state: Rc::clone(&state),
                    store: self.clone(),
                };
                if let Err(err) = self.delete_open(blob).await {
                    tracing::warn!(blob = format!("{:#x}", state.id), %err, "half-made snapshot still not removed");
                }
            }
        }
    }

    /// Pins `pages` for half-made snapshot `snap` (see `MdState::pinned_extent_pages`).
    pub(crate) fn pin_extent_pages(&self, snap: u64, pages: &[u32]) {
        let mut state = self.inner.state.borrow_mut();
        for &page in pages {
            state.pinned_extent_pages.insert(page, (snap, false));
        }
    }

    /// Unpins the pages snapshot `snap` pinned; those its original dropped meanwhile are
    /// returned (the caller frees them once the snapshot's root is gone).
    pub(crate) fn unpin_extent_pages(&self, snap: u64) -> Vec<u32> {
        let mut state = self.inner.state.borrow_mut();
        let mut dropped = Vec::new();
        state
            .pinned_extent_pages
            .retain(|&page, &mut (owner, released)| {
                if owner != snap {
                    return true;
                }
                if released {
                    dropped.push(page);
                }
                false
            });
        dropped
    }

    /// Of the md pages a commit just dropped, keeps back those a half-made snapshot still
    /// names (marked dropped, for its delete to free); returns the rest.
    pub(crate) fn hold_pinned_pages(&self, pages: Vec<u32>) -> Vec<u32> {
        let mut state = self.inner.state.borrow_mut();
        if state.pinned_extent_pages.is_empty() {
            return pages;
        }
        pages
            .into_iter()
            .filter(|page| match state.pinned_extent_pages.get_mut(page) {
                Some(pin) => {
                    pin.1 = true;
                    false
                }
                None => true,
            })
            .collect()
    }

    /// Whether a half-made snapshot of blob `id` whose removal failed is still held.
    pub(crate) fn abandoned_snapshot_of(&self, id: u64) -> bool {
        self.orphans().iter().any(|state| {
            state
                .meta
                .borrow()
                .xattr(true, crate::meta::XATTR_SNAPSHOT_PENDING.as_bytes())
                .is_some_and(|value| value == id.to_le_bytes())
        })
    }

    /// Writes every orphan's metadata and lets it go (unload calls it first).
    pub(crate) async fn settle_orphans(&self) -> Result<()> {
        for state in self.orphans() {
            let half_made = state
                .meta
                .borrow()
                .xattr(true, crate::meta::XATTR_SNAPSHOT_PENDING.as_bytes())
                .is_some();
            if half_made {
                // A snapshot abandoned before it was taken whose delete failed: delete it now
                // (its map is already cleared in memory: only its own pages go).
                state.open_ref.set(1);
                let blob = crate::blob::Blob {
                    state: Rc::clone(&state),
                    store: self.clone(),
                };
                self.delete_open(blob).await?;
                continue;
            }
            // Read-only metadata too: an orphan's changes are the store's own (a merged
            // snapshot without the clusters its clone took), not the user's.
            if state.dirty.get() {
                if let Some(err) =
                    crate::persist::persist_outcome(self, &state, crate::persist::Deps::Own).await?
                {
                    tracing::warn!(blob = format!("{:#x}", state.id), %err, "orphan written; a step after the commit failed");
                }
            }
            if state.open_ref.get() == 0 {
                self.inner.state.borrow_mut().open_blobs.remove(&state.id);
                state.io.mark_closed();
                if let Some(parent) = state.replace_parent(None) {
                    parent.close().await?;
                }
            }
        }
        Ok(())
    }

    #[allow(dead_code)] // used by clone creation (snapshot issue)
    pub(crate) fn link_clone(&self, parent: u64, clone: u64) {
        let mut state = self.inner.state.borrow_mut();
        let clones = state.clones.entry(parent).or_default();
        if !clones.contains(&clone) {
            clones.push(clone);
        }
        state.parents.insert(clone, parent);
    }

    pub(crate) fn unlink_clone(&self, clone: u64) {
        let mut state = self.inner.state.borrow_mut();
        if let Some(parent) = state.parents.remove(&clone) {
            if let Some(clones) = state.clones.get_mut(&parent) {
                clones.retain(|&id| id != clone);
                if clones.is_empty() {
                    state.clones.remove(&parent);
                }
            }
        }
    }

    pub(crate) fn new_inner(
        desc: BdevDesc,
        geometry: Geometry,
        used_clusters: &BitSet,
        state: MdState,
    ) -> Result<Rc<StoreInner>> {
        let md_reactor = spool_reactor::reactor_id()?;
        // A channel of its own: metadata writes and flushes do not queue behind the data
        // I/O of the metadata reactor (copy-on-writes of whole clusters, under load).
        let md_channel = desc.private_channel()?;
        let store_id = next_store_id();
        let first_data = geometry.md_clusters;
        let io_device = crate::io::register_device(&desc);
        let desc_reads_zeroes = desc.bdev().unmap_reads_zeroes();
        let shared = Arc::new(StoreShared {
            store_id,
            geometry,
            used_clusters: AtomicBitmap::from_set(used_clusters),
            md_reactor,
            cluster_hint: AtomicU64::new(first_data),
            io_device,
            desc_reads_zeroes,
            slots: crate::io::SlotAllocator::default(),
            zeroed: AtomicBitmap::from_set(&BitSet::new(used_clusters.len())),
            claims_outstanding: AtomicU64::new(0),
            held_io: Arc::new(AtomicU64::new(0)),
            bdev: Arc::clone(desc.bdev()),
            released_twice: AtomicU64::new(0),
            freeze_windows: crate::freeze::FreezeWindows::default(),
        });
        Ok(Rc::new(StoreInner {
            shared,
            md_channel,
            md_thread: std::thread::current().id(),
            state: RefCell::new(state),
            super_lock: crate::sync::LocalMutex::default(),
            durability: durability::Durability::default(),
            md_ops: md_ops::MdOps::default(),
        }))
    }
}

impl Blobstore {
    /// Flushes the metadata channel. On success every metadata write completed before it is
    /// durable, and the releases waiting for such a flush are handed back.
    pub(crate) async fn flush_md(&self) -> Result<()> {
        let durability = &self.inner.durability;
        let (number, covers) = durability.flush_started();
        md_io::flush(&self.inner.md_channel).await?;
        for release in durability.flush_done(number, covers) {
            self.apply_release(release);
        }
        Ok(())
    }

    /// Frees the releases an earlier failed flush held back, with a flush, if there are any.
    pub(crate) async fn drain_releases(&self) -> Result<()> {
        if self.inner.durability.queued_len() == 0 {
            return Ok(());
        }
        self.flush_md().await
    }

    /// The ordering barrier: a flush, so that no write issued after it can become durable
    /// before the writes completed before it (skipped only by the crash harness's self-test).
    pub(crate) async fn barrier(&self) -> Result<()> {
        if self.inner.durability.skip_barriers.get() {
            return Ok(());
        }
        self.flush_md().await
    }

    /// Gives `release` back to the free pool now (the caller knows the write that dropped it
    /// is durable).
    pub(crate) fn apply_release(&self, release: durability::Release) {
        match release {
            durability::Release::Cluster { cluster, unmapped } => {
                if unmapped && self.shared().desc_reads_zeroes {
                    self.shared().zeroed.set(u64::from(cluster));
                }
                self.shared().release_cluster(cluster);
            }
            durability::Release::MdPage(page) => {
                self.inner
                    .state
                    .borrow_mut()
                    .used_md_pages
                    .clear(u64::from(page));
            }
        }
    }

    /// Test support: skip every ordering flush, as a store with the ordering bug would (the
    /// crash harness must catch it).
    #[doc(hidden)]
    pub fn testing_skip_ordering_flushes(&self, skip: bool) {
        self.inner.durability.skip_barriers.set(skip);
    }

    /// Test support: how many times a cluster was released while already free (each one a
    /// bug: a claim between the two releases would hand the cluster out twice).
    #[doc(hidden)]
    pub fn testing_clusters_released_twice(&self) -> u64 {
        self.inner.shared.released_twice.load(Ordering::Acquire)
    }

    /// Clusters and md pages waiting for a flush before they return to the free pool (after
    /// a flush failed past an operation's commit point); the next successful flush frees them.
    pub fn releases_waiting_for_flush(&self) -> usize {
        self.inner.durability.queued_len()
    }
}

/// Reads md page `page` (relative to md_start).
pub(crate) async fn read_md_page(
    channel: &BdevChannel,
    geometry: &Geometry,
    page: u32,
) -> Result<Vec<u8>> {
    md_io::read_page(channel, geometry.md_page_offset(page)).await
}
