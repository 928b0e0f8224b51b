//! Logical volumes over a blobstore, as SPDK's lvol layer (lib/lvol, v24.01) keeps them on
//! disk, so that SPDK opens a store Spool made and Spool opens one SPDK made: an *lvol store*
//! is a blobstore of bstype `LVOLSTORE` whose super blob holds the store's name and uuid;
//! each *lvol* is a blob holding its own name and uuid (formats in [`xattr`]). An lvol's alias
//! is `store_name/lvol_name`; its uuid is what SPDK names its bdev.
//!
//! [`LvolStore`] is a view over an open [`Blobstore`], on its metadata reactor like the
//! blobstore's own methods. It keeps the names and uuids in memory (SPDK's `lvs->lvols`),
//! read once at [`LvolStore::open`] and kept in step by its own operations, so lookups need no
//! I/O; everything else (sizes, flags, parents) is read from the blobstore when asked. Change
//! lvols through it, not through the [`Blobstore`] underneath, or its table goes stale.
//!
//! Names are unique in a store: a name being created or renamed to is reserved before the
//! first `.await`, so two concurrent operations cannot both take it (SPDK's `pending_lvols`).
//! Every operation runs to completion as its own task once started, like the blobstore's
//! (dropping its future does not leave the table half-updated).
//!
//! - [`xattr`]: the xattr bytes (pure: encode, decode, name checks).
//! - `store`: create, open, load, rename, unload, destroy of the store.
//! - `volume`: create, snapshot, clone, lookup, list, rename, resize, read-only, inflate,
//!   decouple, delete of lvols.

mod store;
mod volume;
pub mod xattr;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use crate::store::Blobstore;

pub use store::LvsInitOptions;
/// The uuid type of stores and lvols (the `uuid` crate's).
pub use uuid::Uuid;

/// The default cluster size of an lvol store (`SPDK_LVS_OPTS_CLUSTER_SZ`, 4 MiB).
pub const LVS_CLUSTER_SIZE_DEFAULT: u64 = 4 << 20;

/// An lvol store: a [`Blobstore`] of bstype `LVOLSTORE` with its lvols' names and uuids.
/// Cheap to clone; lives on the store's metadata reactor (not `Send`).
#[derive(Clone)]
pub struct LvolStore {
    inner: Rc<LvsInner>,
}

impl std::fmt::Debug for LvolStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.inner.state.borrow();
        f.debug_struct("LvolStore")
            .field("name", &state.name)
            .field("uuid", &state.uuid)
            .field("lvols", &state.lvols.len())
            .finish()
    }
}

struct LvsInner {
    store: Blobstore,
    super_blob: u64,
    state: RefCell<LvsState>,
}

/// The store's names, uuids and reservations (metadata reactor only).
struct LvsState {
    name: String,
    uuid: Uuid,
    /// Lvols by blob id.
    lvols: BTreeMap<u64, LvolEntry>,
    /// Names an operation in flight is creating or renaming to.
    pending_names: BTreeSet<String>,
    /// Blobs that could not be opened when the store was opened: id and reason.
    unreadable: Vec<(u64, String)>,
}

/// What the store remembers of one lvol.
#[derive(Debug, Clone)]
struct LvolEntry {
    name: String,
    uuid: Uuid,
}

/// One lvol as a lookup finds it: what names it (no I/O was needed to get this).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lvol {
    /// Its blob's id.
    pub id: u64,
    /// Its name in the store.
    pub name: String,
    /// Its uuid; nil when its blob has none (or a bad one), as SPDK then uses.
    pub uuid: Uuid,
    /// The name SPDK gives its bdev: the uuid as text, or `store_uuid_blobid` when nil.
    pub unique_id: String,
    /// `store_name/lvol_name`, SPDK's alias of its bdev.
    pub alias: String,
}

/// One lvol with what its blob says now (what `bdev_lvol_get_lvols` and `bdev_get_bdevs`
/// report of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LvolInfo {
    /// Its names and uuid.
    pub lvol: Lvol,
    /// Size in clusters.
    pub num_clusters: u64,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Clusters with a device cluster of their own.
    pub num_allocated_clusters: u64,
    /// Thin provisioned.
    pub thin: bool,
    /// Its data is read-only (snapshots, and lvols set read-only).
    pub read_only: bool,
    /// A snapshot with at least one clone (SPDK's `spdk_blob_is_snapshot`).
    pub snapshot: bool,
    /// A clone of a snapshot.
    pub clone: bool,
    /// Its parent snapshot (a clone's), by id and name.
    pub parent: Option<(u64, String)>,
    /// Its clones (a snapshot's), by id and name, in the order the store knows them.
    pub clones: Vec<(u64, String)>,
}

impl LvolStore {
    /// The blobstore underneath.
    pub fn blobstore(&self) -> &Blobstore {
        &self.inner.store
    }

    /// The store's name (its super blob's `name`).
    pub fn name(&self) -> String {
        self.inner.state.borrow().name.clone()
    }

    /// The store's uuid (its super blob's `uuid`).
    pub fn uuid(&self) -> Uuid {
        self.inner.state.borrow().uuid
    }

    /// The super blob's id (not an lvol).
    pub fn super_blob_id(&self) -> u64 {
        self.inner.super_blob
    }

    /// Lvols in the store.
    pub fn lvol_count(&self) -> usize {
        self.inner.state.borrow().lvols.len()
    }

    /// Blobs that could not be opened when the store was opened (id and reason): they are
    /// not lvols of this view, and their names are unknown.
    pub fn unreadable_blobs(&self) -> Vec<(u64, String)> {
        self.inner.state.borrow().unreadable.clone()
    }

    /// The [`Lvol`] of the entry for blob `id` (names as the store knows them now).
    fn lvol_of(&self, id: u64, entry: &LvolEntry) -> Lvol {
        let state = self.inner.state.borrow();
        Lvol {
            id,
            name: entry.name.clone(),
            uuid: entry.uuid,
            unique_id: if entry.uuid.is_nil() {
                xattr::fallback_unique_id(&state.uuid, id)
            } else {
                entry.uuid.hyphenated().to_string()
            },
            alias: format!("{}/{}", state.name, entry.name),
        }
    }
}

/// A name reserved for an operation in flight (see [`LvolStore`]); released on drop.
struct NameReservation<'a> {
    store: &'a LvolStore,
    name: String,
}

impl Drop for NameReservation<'_> {
    fn drop(&mut self) {
        self.store
            .inner
            .state
            .borrow_mut()
            .pending_names
            .remove(&self.name);
    }
}
