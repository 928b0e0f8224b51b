//! The model a simulation checks the store against: per blob and io_unit, the values a read
//! may return now (`live`) and the values the unit may hold after a power cut (`crash`).
//!
//! A value is the id of the write that wrote it (0: zeros). A completed write makes its
//! value the only live one and adds it to the crash set; a failed or interrupted write adds
//! its value to both (it may or may not have landed, per block); a completed flush makes
//! the crash set the live set (no acknowledged-and-flushed write may be lost). After a
//! restart the values read back must be in the crash sets; they then become the only
//! value of both sets. Sizes and existence follow the same rule: a resize, create,
//! snapshot, clone or delete is certain after a restart only once a flush covered it.
//!
//! A metadata operation that fails on an injected fault is modelled by what it can really
//! do (SPDK semantics), never by "anything goes":
//! - a failed **resize** leaves the size in memory as the blob reports it and on disk old
//!   or new ([`ModelBlob::md_unsettled`]: until the next restart a flush does not settle
//!   the size, since a device flush does not write a blob's dirty metadata); units below
//!   the smaller size keep their crash sets, a grown part reads zeros (thin, or through to
//!   a clone's parent) or [`ANY`] (thick), a shrunk part may keep its old values;
//! - a failed **snapshot, clone, inflate or decouple** does not change what the blob reads
//!   (a snapshot moves the map under a new parent, inflate/decouple copy the parent's data)
//!   nor its size;
//! - only a failed **delete** (or merge-delete of a snapshot) may make that blob vanish
//!   ([`ModelBlob::may_vanish`]); if it stays it reads as before;
//! - **strays** (blobs the model does not know) may appear only after a failed create,
//!   snapshot or clone (the ids those create), never with an id whose delete completed
//!   ([`Model::completed_deletes`]) unless a failed create ran after that delete and may
//!   have reused its md page.
//!
//! Escape hatches where the content is genuinely unpredictable: a stray's units are
//! [`ANY`] (the model does not know what the failed op had copied), as are a thick blob's
//! new clusters. A blob a failed operation touched is *tainted* for the rest of the life:
//! live reads (Read, NBD) skip it, but its size, existence and crash sets are checked after
//! the restart like any other blob's.

use std::collections::{BTreeMap, BTreeSet};

/// io_unit (and device block) size, bytes.
pub const UNIT: u64 = 4096;

/// The value of a unit whose content is not specified: a thick blob's new cluster, which the
/// blob layer does not zero (as SPDK); any bytes are accepted until a write lands there.
/// With `Switches::strict_thick_zeros` such units must read zeros instead.
pub const ANY: u64 = u64::MAX;

/// One io_unit's possible values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitState {
    /// What a read may return now.
    pub live: BTreeSet<u64>,
    /// What the unit may hold after a power cut.
    pub crash: BTreeSet<u64>,
}

impl Default for UnitState {
    fn default() -> Self {
        UnitState {
            live: BTreeSet::from([0]),
            crash: BTreeSet::from([0]),
        }
    }
}

/// One blob of the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelBlob {
    /// Thin provisioned.
    pub thin: bool,
    /// A snapshot (read-only).
    pub snapshot: bool,
    /// Size now, clusters.
    pub clusters: u64,
    /// Sizes it may have after a power cut.
    pub crash_sizes: BTreeSet<u64>,
    /// Every io_unit ever inside it (the vector only grows).
    pub units: Vec<UnitState>,
    /// Covered by a completed flush: must exist after a power cut.
    pub durable: bool,
    /// A metadata operation on it failed in this life: live reads skip it (its size,
    /// existence and crash sets are still checked after a restart).
    pub tainted: bool,
    /// Its on-disk metadata may lag memory (a failed resize, sync or close): a flush does
    /// not settle its size, and units at or past the smallest crash size keep their old
    /// values as possible, until the next restart.
    pub md_unsettled: bool,
    /// A delete of it failed: it may be gone after a restart.
    pub may_vanish: bool,
}

impl ModelBlob {
    /// A new blob of `clusters` clusters: reading zeros (thin), or anything (`fresh`, the
    /// value of a thick blob's new clusters).
    pub fn new(thin: bool, clusters: u64, units_per_cluster: u64, fresh: u64) -> ModelBlob {
        let unit = UnitState {
            live: BTreeSet::from([fresh]),
            crash: BTreeSet::from([fresh]),
        };
        ModelBlob {
            thin,
            snapshot: false,
            clusters,
            crash_sizes: BTreeSet::from([clusters]),
            units: vec![unit; (clusters * units_per_cluster) as usize],
            durable: false,
            tainted: false,
            md_unsettled: false,
            may_vanish: false,
        }
    }
}

/// The whole model.
#[derive(Debug, Clone, Default)]
pub struct Model {
    /// Blobs that exist now, by id.
    pub blobs: BTreeMap<u64, ModelBlob>,
    /// Blobs deleted by an operation that failed on an injected fault: a power cut may
    /// bring them back (none today: a failed delete keeps its blob in the model, with
    /// [`ModelBlob::may_vanish`]).
    pub deleted: BTreeMap<u64, ModelBlob>,
    /// A create, snapshot or clone failed on an injected fault: blobs the model does not
    /// know may appear after a restart (adopted with [`ANY`] content).
    pub strays_allowed: bool,
    /// Ids whose delete completed since the last restart: never accepted back as strays.
    pub completed_deletes: BTreeSet<u64>,
    /// io_units per cluster.
    pub units_per_cluster: u64,
    /// The next write's value id.
    pub next_value: u64,
}

impl Model {
    /// An empty model.
    pub fn new(units_per_cluster: u64) -> Model {
        Model {
            units_per_cluster,
            next_value: 1,
            ..Model::default()
        }
    }

    /// A fresh value id for a write.
    pub fn value(&mut self) -> u64 {
        let value = self.next_value;
        self.next_value += 1;
        value
    }

    /// Ids of the blobs that exist, in order.
    pub fn ids(&self) -> Vec<u64> {
        self.blobs.keys().copied().collect()
    }

    /// The `pick`th blob (modulo) among those `filter` accepts.
    pub fn pick(&self, pick: u32, filter: impl Fn(&ModelBlob) -> bool) -> Option<u64> {
        let ids: Vec<u64> = self
            .blobs
            .iter()
            .filter(|(_, blob)| filter(blob))
            .map(|(&id, _)| id)
            .collect();
        if ids.is_empty() {
            None
        } else {
            Some(ids[pick as usize % ids.len()])
        }
    }

    /// Records writes to blob `id`: `(first unit, units, value, completed)` each, issued
    /// together (so where two overlap either may win).
    pub fn writes(&mut self, id: u64, writes: &[(u64, u64, u64, bool)]) {
        let Some(blob) = self.blobs.get_mut(&id) else {
            return;
        };
        let mut by_unit: BTreeMap<u64, Vec<(u64, bool)>> = BTreeMap::new();
        for &(unit, units, value, completed) in writes {
            for u in unit..unit + units {
                by_unit.entry(u).or_default().push((value, completed));
            }
        }
        for (u, values) in by_unit {
            let Some(state) = blob.units.get_mut(u as usize) else {
                continue;
            };
            // A completed write replaced the old value; which of the batch's values won
            // (or whether a failed one landed) is not known.
            if values.iter().any(|&(_, completed)| completed) {
                state.live.clear();
            }
            for (value, _) in values {
                state.live.insert(value);
                state.crash.insert(value);
            }
        }
    }

    /// A completed flush: every acknowledged write and metadata change is durable.
    pub fn flush(&mut self) {
        let upc = self.units_per_cluster;
        for blob in self.blobs.values_mut() {
            blob.durable = true;
            if blob.md_unsettled {
                // The size on disk may still be any earlier one: units past the smallest
                // keep their old values as possible (a shrink not on disk keeps them).
                blob.crash_sizes.insert(blob.clusters);
                let settled = (blob.crash_sizes.first().copied().unwrap_or(0) * upc) as usize;
                for (index, unit) in blob.units.iter_mut().enumerate() {
                    if index < settled {
                        unit.crash.clone_from(&unit.live);
                    } else {
                        unit.crash.extend(unit.live.iter().copied());
                    }
                }
                continue;
            }
            blob.crash_sizes = BTreeSet::from([blob.clusters]);
            for unit in &mut blob.units {
                unit.crash.clone_from(&unit.live);
            }
        }
        self.deleted.clear();
    }

    /// Blob `id` resized to `clusters` (completed); units it grows by read what its parent
    /// `parent` reads there (a clone: unallocated clusters read through, zeros past the
    /// parent's end), else `fresh` (zeros for a thin blob, [`ANY`] or zeros for a thick one).
    pub fn resize(&mut self, id: u64, clusters: u64, parent: Option<u64>, fresh: u64) {
        let upc = self.units_per_cluster;
        let through: Option<(u64, Vec<UnitState>)> = parent
            .and_then(|parent| self.blobs.get(&parent))
            .map(|parent| (parent.clusters * upc, parent.units.clone()));
        let Some(blob) = self.blobs.get_mut(&id) else {
            return;
        };
        let old_units = (blob.clusters * upc) as usize;
        let new_units = (clusters * upc) as usize;
        if blob.units.len() < new_units {
            blob.units.resize(new_units, UnitState::default());
        }
        for (index, unit) in blob
            .units
            .iter_mut()
            .enumerate()
            .take(new_units)
            .skip(old_units)
        {
            match &through {
                Some((size, units)) if (index as u64) < *size => {
                    unit.live.clone_from(&units[index].live);
                    unit.crash.extend(units[index].crash.iter().copied());
                    unit.crash.extend(units[index].live.iter().copied());
                }
                Some(_) => {
                    unit.live = BTreeSet::from([0]);
                    unit.crash.insert(0);
                }
                None => {
                    unit.live = BTreeSet::from([fresh]);
                    unit.crash.insert(fresh);
                }
            }
        }
        // Units past the new end read zeros if the blob grows again (and may still hold
        // their old values after a cut that loses the resize).
        for unit in blob.units.iter_mut().skip(new_units) {
            unit.live = BTreeSet::from([0]);
            unit.crash.insert(0);
        }
        blob.clusters = clusters;
        blob.crash_sizes.insert(clusters);
    }

    /// A snapshot `snap` of blob `id` (completed): it reads what `id` reads now.
    pub fn snapshot(&mut self, id: u64, snap: u64) {
        let Some(blob) = self.blobs.get(&id) else {
            return;
        };
        let mut copy = blob.clone();
        copy.snapshot = true;
        copy.thin = true;
        copy.durable = false;
        copy.tainted = false;
        copy.md_unsettled = false;
        copy.may_vanish = false;
        copy.crash_sizes = BTreeSet::from([blob.clusters]);
        self.blobs.insert(snap, copy);
    }

    /// A snapshot `snap` of blob `id` taken while `racing` writes `(unit, units, value)` to
    /// `id` ran: the snapshot reads what `before` (the blob before the writes) read, or any
    /// racing write's value, per unit.
    pub fn snapshot_racing(&mut self, before: &ModelBlob, snap: u64, racing: &[(u64, u64, u64)]) {
        let mut copy = before.clone();
        copy.snapshot = true;
        copy.thin = true;
        copy.durable = false;
        copy.tainted = false;
        copy.md_unsettled = false;
        copy.may_vanish = false;
        copy.crash_sizes = BTreeSet::from([before.clusters]);
        for &(unit, units, value) in racing {
            for u in unit..unit + units {
                if let Some(state) = copy.units.get_mut(u as usize) {
                    state.live.insert(value);
                    state.crash.insert(value);
                }
            }
        }
        self.blobs.insert(snap, copy);
    }

    /// A clone `clone` of snapshot `snap` (completed).
    pub fn clone_of(&mut self, snap: u64, clone: u64) {
        let Some(blob) = self.blobs.get(&snap) else {
            return;
        };
        let mut copy = blob.clone();
        copy.snapshot = false;
        copy.thin = true;
        copy.durable = false;
        copy.tainted = false;
        copy.md_unsettled = false;
        copy.may_vanish = false;
        copy.crash_sizes = BTreeSet::from([blob.clusters]);
        self.blobs.insert(clone, copy);
    }

    /// Blob `id` deleted (completed). A delete is durable when it returns (its zeroed root
    /// is flushed before it releases anything, docs/blob.md "Write ordering"), so the blob
    /// may not come back after a cut, and its id may be reused at once.
    pub fn delete(&mut self, id: u64) {
        self.blobs.remove(&id);
        self.deleted.remove(&id);
        self.completed_deletes.insert(id);
    }

    /// Blob `id` touched by a failed metadata operation: live reads skip it this life.
    pub fn taint(&mut self, id: u64) {
        if let Some(blob) = self.blobs.get_mut(&id) {
            blob.tainted = true;
        }
    }

    /// Blob `id`'s metadata on disk may lag memory (a failed resize, sync or close).
    pub fn unsettle(&mut self, id: u64) {
        self.taint(id);
        if let Some(blob) = self.blobs.get_mut(&id) {
            blob.md_unsettled = true;
        }
    }

    /// A delete of blob `id` failed: it may vanish after a restart.
    pub fn failed_delete(&mut self, id: u64) {
        self.taint(id);
        if let Some(blob) = self.blobs.get_mut(&id) {
            blob.may_vanish = true;
        }
    }

    /// A create, snapshot or clone failed: its new id may appear after a restart (and may
    /// be the id of a blob deleted before it, whose md page it may have reused).
    pub fn failed_create(&mut self) {
        self.strays_allowed = true;
        self.completed_deletes.clear();
    }
}
