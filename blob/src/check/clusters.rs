//! Phase 4, clusters: every cluster a blob maps inside the store, outside the metadata
//! clusters, and owned by one blob at most. Claimed as each blob is parsed, so nothing keeps a
//! blob's cluster map: memory follows the clusters in use, whatever a hostile map claims.

use std::collections::HashMap;

use super::chains::BlobRecord;
use super::report::{Problem, ProblemKind};
use super::super_check::StoreShape;
use crate::bitmap::BitSet;
use crate::meta::{BlobMeta, XATTR_SNAPSHOT, XATTR_SNAPSHOT_PENDING, XATTR_SNAPSHOT_REMOVING};

/// Problems of one kind listed one by one (per blob for bad indexes, per store for shared
/// clusters); the rest are counted in one more problem.
pub const MAX_LISTED: usize = 64;

/// The clusters claimed so far.
pub struct Claims {
    /// The metadata clusters and every in-range cluster a blob maps (a damaged blob's too:
    /// its data may be there).
    pub used: BitSet,
    /// Owner of each claimed cluster (the first blob to map it).
    owners: HashMap<u32, u64>,
    /// Blobs carrying `SNAPTMP` or `SNAPRM`, with the blob each names.
    markers: HashMap<u64, Vec<u64>>,
    /// Pairs of blobs sharing clusters outside a marked snapshot or merge.
    pub shared: Vec<(u64, u64)>,
    /// Each blob's parent (its `SNAP` xattr).
    parents: HashMap<u64, u64>,
    /// Snapshots half merged (`SNAPRM`) and the clone each names.
    removing: HashMap<u64, u64>,
    /// Snapshots half made (`SNAPTMP`) and the original each names.
    half_made: HashMap<u64, u64>,
    /// Shared clusters found, judged once every blob's parent and markers are known (a
    /// merged snapshot's clusters may have moved on to a later snapshot of its clone).
    pending: Vec<(u64, u64, Problem)>,
    unlisted: u64,
}

/// Shared clusters held for judgement at most (the rest are counted as shared).
const MAX_PENDING: usize = 16 * MAX_LISTED;

/// The blobs `meta`'s `SNAPTMP` and `SNAPRM` markers name.
fn markers_of(meta: &BlobMeta) -> Vec<u64> {
    [XATTR_SNAPSHOT_PENDING, XATTR_SNAPSHOT_REMOVING]
        .iter()
        .filter_map(|name| {
            meta.xattr(true, name.as_bytes())
                .and_then(|v| <[u8; 8]>::try_from(v).ok())
                .map(u64::from_le_bytes)
        })
        .collect()
}

impl Claims {
    /// Nothing claimed but the metadata clusters.
    pub fn new(shape: &StoreShape) -> Claims {
        let mut used = BitSet::new(shape.total_clusters);
        for cluster in 0..shape.md_clusters {
            used.set(cluster);
        }
        Claims {
            used,
            owners: HashMap::new(),
            markers: HashMap::new(),
            shared: Vec::new(),
            parents: HashMap::new(),
            removing: HashMap::new(),
            half_made: HashMap::new(),
            pending: Vec::new(),
            unlisted: 0,
        }
    }

    /// The blob that claimed `cluster` first.
    pub fn owner(&self, cluster: u32) -> Option<u64> {
        self.owners.get(&cluster).copied()
    }

    /// Whether `a` and `b` may share clusters: one is a snapshot half made of, or half
    /// merged into, the other (the marker's problem covers it).
    pub(crate) fn marked_pair(&self, a: u64, b: u64) -> bool {
        let names = |x: u64, y: u64| self.markers.get(&x).is_some_and(|v| v.contains(&y));
        names(a, b) || names(b, a)
    }

    /// Whether `id` is a snapshot half made (`SNAPTMP`) that its original does not read
    /// through: never taken, so its map is a stale copy of the original's (which may since
    /// have released those extent pages and clusters to other blobs), and the load frees
    /// only its own md pages. Known once every blob was claimed.
    pub(crate) fn untaken_snapshot(&self, id: u64) -> bool {
        self.half_made
            .get(&id)
            .is_some_and(|original| self.parents.get(original) != Some(&id))
    }

    /// Whether `merged` is a snapshot half merged (`SNAPRM`) whose clone, or a snapshot of
    /// the clone taken since (on the clone's parent chain), is `other`: the clusters the
    /// clone took may be there, and the load forgets them before the snapshot goes.
    fn merged_into_chain(&self, merged: u64, other: u64) -> bool {
        let Some(&clone) = self.removing.get(&merged) else {
            return false;
        };
        let mut next = Some(clone);
        for _ in 0..=self.parents.len() {
            match next {
                Some(id) if id == other => return true,
                Some(id) if id != merged => next = self.parents.get(&id).copied(),
                _ => return false,
            }
        }
        false
    }

    /// Claims the clusters of a parsed blob (its map is consumed: `meta.clusters` is left
    /// empty, its size and allocated count are kept in the record). A cluster outside the
    /// store or in the metadata damages the blob.
    pub fn take(
        &mut self,
        shape: &StoreShape,
        record: &mut BlobRecord,
        problems: &mut Vec<Problem>,
    ) {
        let Some(meta) = record.meta.as_mut() else {
            return;
        };
        let named = |name: &str| {
            meta.xattr(true, name.as_bytes())
                .and_then(|v| <[u8; 8]>::try_from(v).ok())
                .map(u64::from_le_bytes)
        };
        if let Some(parent) = named(XATTR_SNAPSHOT) {
            self.parents.insert(record.id, parent);
        }
        if let Some(clone) = named(XATTR_SNAPSHOT_REMOVING) {
            self.removing.insert(record.id, clone);
        }
        if let Some(original) = named(XATTR_SNAPSHOT_PENDING) {
            self.half_made.insert(record.id, original);
        }
        let clusters = std::mem::take(&mut meta.clusters);
        let markers = markers_of(meta);
        let (id, root) = (record.id, record.root());

        if !markers.is_empty() {
            self.markers.insert(id, markers);
        }
        record.num_clusters = Some(clusters.len() as u64);
        let mut bad: Option<String> = None;
        let mut bad_count = 0u64;
        for (blob_cluster, &cluster) in clusters.iter().enumerate() {
            if cluster == 0 {
                continue;
            }
            record.allocated += 1;
            let wrong = if u64::from(cluster) >= shape.total_clusters {
                Some((
                    ProblemKind::ClusterOutOfRange,
                    format!("a cluster below {}", shape.total_clusters),
                    format!("cluster {cluster} is outside the store"),
                ))
            } else if u64::from(cluster) < shape.md_clusters {
                Some((
                    ProblemKind::ClusterInMetadata,
                    format!(
                        "a cluster at or above {} (past the metadata)",
                        shape.md_clusters
                    ),
                    format!("cluster {cluster} holds metadata"),
                ))
            } else {
                None
            };
            if let Some((kind, expected, reason)) = wrong {
                bad_count += 1;
                if bad_count <= MAX_LISTED as u64 {
                    problems.push(Problem {
                        kind,
                        page: Some(root),
                        blob: Some(id),
                        field: format!("cluster[{blob_cluster}]"),
                        expected,
                        found: cluster.to_string(),
                    });
                }
                bad.get_or_insert(reason);
                continue;
            }
            let already = self.used.get(u64::from(cluster));
            self.used.set(u64::from(cluster));
            let owner = *self.owners.entry(cluster).or_insert(id);
            if !already {
                continue;
            }
            if owner != id && self.marked_pair(id, owner) {
                continue;
            }
            if self.pending.len() < MAX_PENDING {
                self.pending.push((
                    owner,
                    id,
                    Problem {
                        kind: ProblemKind::ClusterShared,
                        page: Some(root),
                        blob: Some(id),
                        field: format!("cluster[{blob_cluster}]"),
                        expected: "a cluster no other blob (or blob cluster) maps".into(),
                        found: if owner == id {
                            format!("cluster {cluster}, mapped twice by this blob")
                        } else {
                            format!("cluster {cluster}, also owned by blob {owner:#x}")
                        },
                    },
                ));
            } else {
                self.unlisted += 1;
            }
        }
        if bad_count > MAX_LISTED as u64 {
            problems.push(Problem {
                kind: ProblemKind::ClusterOutOfRange,
                page: Some(root),
                blob: Some(id),
                field: "clusters".into(),
                expected: "no further bad cluster indexes".into(),
                found: format!("{} more", bad_count - MAX_LISTED as u64),
            });
        }
        if let Some(reason) = bad {
            record.damage(reason);
        }
    }

    /// Judges the shared clusters found (now that every blob's parent and markers are
    /// known): lists them, and adds the count of those not listed.
    pub fn finish(&mut self, problems: &mut Vec<Problem>) {
        let mut listed = 0;
        for (owner, id, problem) in std::mem::take(&mut self.pending) {
            if owner != id
                && (self.merged_into_chain(owner, id)
                    || self.merged_into_chain(id, owner)
                    || self.untaken_snapshot(owner)
                    || self.untaken_snapshot(id))
            {
                continue;
            }
            if owner != id && !self.shared.contains(&(owner, id)) && self.shared.len() < MAX_LISTED
            {
                self.shared.push((owner, id));
            }
            if listed < MAX_LISTED {
                listed += 1;
                problems.push(problem);
            } else {
                self.unlisted += 1;
            }
        }
        if self.unlisted > 0 {
            problems.push(Problem {
                kind: ProblemKind::ClusterShared,
                page: None,
                blob: None,
                field: "clusters".into(),
                expected: "no further shared clusters".into(),
                found: format!(
                    "{} more cluster references to clusters already owned",
                    self.unlisted
                ),
            });
        }
    }
}
