//! [`BlobIo`]: what I/O reactors know of an open blob (its cluster map, the gate word of
//! the fast path's checks, the parent snapshot), and the slot numbers that index it in every
//! channel's per-blob table.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};

use super::{channel_of, BlobChannel, HeldCount};
use crate::error::{BlobError, Result};
use crate::meta::BlobMeta;
use crate::store::StoreShared;

/// A blob's cluster map as I/O reactors see it: published entries only.
pub(crate) struct ClusterMap {
    pub(super) clusters: Box<[AtomicU32]>,
}

impl ClusterMap {
    pub(super) fn of(clusters: &[u32]) -> ClusterMap {
        ClusterMap {
            clusters: clusters.iter().map(|&c| AtomicU32::new(c)).collect(),
        }
    }
}

/// Gate bit: the handle was closed.
pub(super) const GATE_CLOSED: u32 = 1;
/// Gate bit: the blob's data is read-only.
pub(super) const GATE_READ_ONLY: u32 = 2;
/// Gate bit: the blob's I/O is frozen.
pub(super) const GATE_FROZEN: u32 = 4;

/// The gate bits that send an I/O off the fast path.
#[inline]
pub(super) fn gate_refusing(write: bool) -> u32 {
    if write {
        GATE_CLOSED | GATE_FROZEN | GATE_READ_ONLY
    } else {
        GATE_CLOSED | GATE_FROZEN
    }
}

/// What I/O reactors know of an open blob. Obtained from [`crate::Blob::io`]; `Send + Sync`.
pub struct BlobIo {
    pub(super) id: u64,
    pub(super) store: Arc<StoreShared>,
    pub(super) map: ArcSwap<ClusterMap>,
    /// `GATE_*` bits: what the I/O fast path checks, in one load.
    pub(super) gate: AtomicU32,
    pub(super) parent: ArcSwapOption<BlobIo>,
    /// Freeze depth: while above 0, new I/O waits on its channel (snapshot, resize).
    pub(super) frozen: AtomicU32,
    /// When the outermost freeze set the gate (`spool_reactor::now_ns`), for the store's
    /// freeze windows.
    pub(crate) frozen_since_ns: AtomicU64,
    /// Snapshots of the blob running: while above 0 (and frozen), writes parked in a thin
    /// allocation wait before they unpark (see `io::thin::Parked`).
    pub(super) handing_over: AtomicU32,
    /// This open blob's index in every channel's per-blob table (in-flight count, cached
    /// map); unique among the store's live `BlobIo`s, reused after drop.
    pub(super) slot: usize,
    /// Changes whenever `map` is replaced (store-wide unique), so channels know their
    /// cached map is stale.
    pub(super) map_generation: AtomicU64,
    /// Device requests of this blob's dropped I/O still on the device (shared with them).
    pub(super) held: Arc<HeldCount>,
}

impl Drop for BlobIo {
    fn drop(&mut self) {
        self.store.slots.release(self.slot);
    }
}

/// Dense indexes for the per-channel blob tables.
#[derive(Default)]
pub(crate) struct SlotAllocator {
    free: std::sync::Mutex<(Vec<usize>, usize)>,
    generation: AtomicU64,
}

impl SlotAllocator {
    pub(super) fn acquire(&self) -> usize {
        let mut guard = self
            .free
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (free, next) = &mut *guard;
        free.pop().unwrap_or_else(|| {
            *next += 1;
            *next - 1
        })
    }

    pub(super) fn release(&self, slot: usize) {
        let mut guard = self
            .free
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        guard.0.push(slot);
    }

    pub(super) fn next_generation(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::AcqRel) + 1
    }
}

impl std::fmt::Debug for BlobIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobIo")
            .field("id", &format_args!("{:#x}", self.id))
            .finish()
    }
}

impl BlobIo {
    pub(crate) fn new(store: &Arc<StoreShared>, meta: &BlobMeta) -> Arc<BlobIo> {
        Arc::new(BlobIo {
            id: meta.id,
            store: Arc::clone(store),
            map: ArcSwap::from_pointee(ClusterMap::of(&meta.clusters)),
            gate: AtomicU32::new(if meta.data_ro() { GATE_READ_ONLY } else { 0 }),
            parent: ArcSwapOption::empty(),
            frozen: AtomicU32::new(0),
            frozen_since_ns: AtomicU64::new(0),
            handing_over: AtomicU32::new(0),
            slot: store.slots.acquire(),
            map_generation: AtomicU64::new(store.slots.next_generation()),
            held: HeldCount::new(&store.held_io),
        })
    }

    /// The blob's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Size in io_units.
    pub fn num_io_units(&self) -> u64 {
        self.map.load().clusters.len() as u64 * self.store.geometry.units_per_cluster()
    }

    /// Bytes per io_unit.
    pub fn io_unit_size(&self) -> u64 {
        self.store.geometry.io_unit_size
    }

    /// Bytes per cluster of the blob's store.
    pub fn cluster_size(&self) -> u64 {
        self.store.geometry.cluster_size
    }

    /// Size in clusters.
    pub fn num_clusters(&self) -> u64 {
        self.map.load().clusters.len() as u64
    }

    /// Whether blob cluster `index` shows data of its own or of an ancestor snapshot; false
    /// means a read there returns zeros without touching the device (a hole: the blob is
    /// thin, the cluster is unallocated and no parent has it). Past the end: false. What the
    /// answer says may change as soon as it is given (a write may allocate the cluster).
    pub fn cluster_has_data(&self, index: u64) -> bool {
        let Ok(index) = usize::try_from(index) else {
            return false;
        };
        if index >= self.map.load().clusters.len() {
            return false;
        }
        self.published(index) != 0 || super::thin::chain_owns(self, index)
    }

    /// This reactor's channel to the blob's store.
    pub fn channel(&self) -> Result<BlobChannel> {
        channel_of(&self.store)
    }

    /// Device requests of this blob's dropped I/O still on the device.
    pub(crate) fn held(&self) -> u64 {
        self.held.get()
    }

    /// This blob's index in the channels' per-blob tables.
    pub(crate) fn slot(&self) -> usize {
        self.slot
    }

    /// Raises the freeze depth; returns the depth before.
    pub(crate) fn freeze_enter(&self) -> u32 {
        let before = self.frozen.fetch_add(1, Ordering::AcqRel);
        if before == 0 {
            self.gate.fetch_or(GATE_FROZEN, Ordering::AcqRel);
        }
        before
    }

    /// Lowers the freeze depth; returns the depth after.
    pub(crate) fn freeze_leave(&self) -> u32 {
        let after = self.frozen.fetch_sub(1, Ordering::AcqRel) - 1;
        if after == 0 {
            self.gate.fetch_and(!GATE_FROZEN, Ordering::AcqRel);
        }
        after
    }

    /// Whether a fill of blob cluster `index` that read through parent `read_through`
    /// (`None`: through no parent) still shows what the blob shows there now: no snapshot
    /// in the chain between the blob and that parent (one taken since) has the cluster.
    pub(crate) fn fill_still_valid(&self, index: usize, read_through: Option<u64>) -> bool {
        let mut next = self.parent.load_full();
        while let Some(parent) = next {
            if Some(parent.id) == read_through {
                return true;
            }
            if parent.published(index) != 0 {
                return false;
            }
            next = parent.parent.load_full();
        }
        read_through.is_none()
    }

    /// A snapshot of the blob starts (before its freeze) or ends (after its unfreeze).
    pub(crate) fn set_handing_over(&self, on: bool) {
        if on {
            self.handing_over.fetch_add(1, Ordering::AcqRel);
        } else {
            self.handing_over.fetch_sub(1, Ordering::AcqRel);
        }
    }

    pub(super) fn handing_over(&self) -> bool {
        self.handing_over.load(Ordering::Acquire) != 0
    }

    pub(super) fn is_frozen(&self) -> bool {
        self.gate.load(Ordering::Acquire) & GATE_FROZEN != 0
    }

    pub(crate) fn set_parent(&self, parent: Option<Arc<BlobIo>>) {
        self.parent.store(parent);
    }

    pub(crate) fn replace_map(&self, clusters: &[u32]) {
        self.map.store(Arc::new(ClusterMap::of(clusters)));
        self.map_generation
            .store(self.store.slots.next_generation(), Ordering::Release);
    }

    /// The cluster I/O reactors see at blob cluster `index` (0: none yet).
    pub(crate) fn published(&self, index: usize) -> u32 {
        self.map
            .load()
            .clusters
            .get(index)
            .map_or(0, |slot| slot.load(Ordering::Acquire))
    }

    pub(crate) fn publish(&self, index: usize, cluster: u32) {
        if let Some(slot) = self.map.load().clusters.get(index) {
            slot.store(cluster, Ordering::Release);
        }
    }

    pub(crate) fn set_data_ro(&self, data_ro: bool) {
        if data_ro {
            self.gate.fetch_or(GATE_READ_ONLY, Ordering::AcqRel);
        } else {
            self.gate.fetch_and(!GATE_READ_ONLY, Ordering::AcqRel);
        }
    }

    pub(crate) fn mark_closed(&self) {
        self.gate.fetch_or(GATE_CLOSED, Ordering::AcqRel);
    }

    pub(super) fn check(&self, offset: u64, len: u64, write: bool) -> Result<()> {
        let gate = self.gate.load(Ordering::Acquire);
        if gate & GATE_CLOSED != 0 {
            return Err(BlobError::NotOpen(self.id));
        }
        if write && gate & GATE_READ_ONLY != 0 {
            return Err(BlobError::ReadOnly {
                id: self.id,
                what: "write",
            });
        }
        let size = self.num_io_units();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(BlobError::InvalidArgument(format!(
                "blob {:#x}: io_units {offset}..{} reach past its {size} io_units",
                self.id,
                offset.saturating_add(len)
            )));
        }
        Ok(())
    }
}
