//! Loading a store: validate the super block, then either read the masks (clean) or replay
//! every metadata chain to rebuild them (dirty shutdown, or a pre-v3 store), and finally
//! rebuild the snapshot/clone graph from the blobs' `SNAP` xattrs.
//!
//! Recovery differs from the seed's in three places (each tested): a continuation page is
//! checked against its root's id and its place in the chain, not against its own index; the
//! metadata clusters claimed are `ceil((md_start + md_len) / pages_per_cluster)`; and the
//! free count comes from the rebuilt bitmap, so a cluster referenced twice (a crash in the
//! middle of a snapshot) is not counted twice.
//!
//! A recovery of a store Spool held dirty reads only the md pages of its root superset
//! (`superset.rs`, docs/format.md "Bounded recovery") when the record is trusted, else
//! every md page as SPDK does; either way it then follows the chains and extent pages.
//!
//! Cost (`docs/performance.md`, "Loading a store"): both paths read the md region in
//! batched runs of up to 256 KiB, four in flight, and decode each page in the device buffer it
//! was read into: nothing is copied or kept per page. A page's CRC is computed once, and
//! only for pages that can matter (a clean load reads only the roots in use and the pages
//! their chains and extent tables name; a replay checksums only pages whose header makes
//! them a root). A one-page chain without extent pages, almost every blob, is parsed on the
//! spot; the few others are finished afterwards, reading the chain and extent pages they
//! name in rounds of batched reads, a bounded number at a time ([`finish`]). No cluster map
//! is built (a run is claimed a word at a time, an extent page entry by entry), so a blob's
//! declared size costs nothing. The store then keeps no per-blob state beyond its mask bits
//! and the clone graph's entries.

use std::collections::{BTreeMap, HashMap, HashSet};

use spool_bdev::{BdevChannel, BdevDesc};

use super::md_io::{flush, read_page, read_regions};
use super::md_scan::{self, read_runs, CachedPage, Lookup, PageCache};
use super::{Blobstore, Geometry, MdState};
use crate::bitmap::BitSet;
use crate::error::{BlobError, Result};
use crate::format::layout::md_clusters;
use crate::format::mask::{decode_mask, mask_region_pages, MaskKind};
use crate::format::md_page::{MdPageHeader, NEXT_OFFSET};
use crate::format::root_superset::RootSuperset;
use crate::format::super_block::{
    bstype_matches, bstype_name, Bstype, SuperBlock, SuperBlockError,
};
use crate::format::{
    page_to_blobid, read_u32, read_u64, INVALID_MD_PAGE, PAGE_SIZE, PAGE_SIZE_U64,
};
use crate::meta::{
    parse_decoded_chain, visit_extent_page, BlobMeta, ClusterCheck, ExtentPageOf, ParsedChain,
    XATTR_SNAPSHOT_PENDING, XATTR_SNAPSHOT_REMOVING,
};

/// Options of [`Blobstore::load`].
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// The type the caller expects; all zero matches any store.
    pub bstype: Bstype,
    /// A dirty load scans the whole md region even when Spool's root superset is trusted
    /// (SPDK's cost; for measurements, and for a store SPDK may also have written).
    pub full_scan: bool,
    /// Load without writing anything, for readers of an image they may not write: a dirty
    /// store is replayed in memory only (and stays dirty on disk), snapshots and merges a
    /// crash interrupted are left as they are (listed in [`LoadReport::repaired`]), every
    /// metadata change fails with -EROFS, and unload writes nothing.
    pub read_only: bool,
}

/// What a load found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Whether the metadata was replayed (dirty shutdown or no blob-id mask).
    pub recovered: bool,
    /// Blobs found.
    pub blobs: usize,
    /// Blobs whose metadata could not be parsed while building the clone graph, whose
    /// parent is not a blob, or (clean load) whose pages or clusters the masks did not
    /// mark: they fail to open with the reason until a load that writes the store.
    pub unreadable: Vec<(u64, String)>,
    /// Snapshots a crash interrupted, finished or removed at this load (or a mark left
    /// as it is, "not repaired"), and blob-id bits cleared over zeroed md pages.
    pub repaired: Vec<String>,
    /// Recovery only: the scan read just the pages of Spool's root superset (a trusted
    /// marker and record), not the whole md region.
    pub bounded: bool,
    /// Recovery only: md pages the scan for roots read (the superset's, or `md_len`).
    pub md_pages_scanned: u64,
}

struct RangeCheck {
    total_clusters: u64,
    md_len: u32,
}

impl ClusterCheck for RangeCheck {
    fn cluster_ok(&self, cluster: u32) -> bool {
        u64::from(cluster) < self.total_clusters
    }
    fn md_page_ok(&self, page: u32) -> bool {
        page < self.md_len
    }
}

impl Blobstore {
    /// Loads the store on `desc`, with the calling reactor as its metadata reactor.
    /// Errors: -EILSEQ for a bad super block, mask or unreplayable metadata; -ENXIO for a
    /// bstype mismatch; -EINVAL for a device block size that does not divide 4096.
    pub async fn load(desc: BdevDesc, options: &LoadOptions) -> Result<(Blobstore, LoadReport)> {
        let block_size = u64::from(desc.block_size());
        if block_size > PAGE_SIZE_U64 || !PAGE_SIZE_U64.is_multiple_of(block_size) {
            return Err(BlobError::InvalidArgument(format!(
                "device block size {block_size} does not divide the 4096-byte metadata page"
            )));
        }
        let device_bytes = desc.size_bytes();
        if device_bytes < PAGE_SIZE_U64 {
            return Err(SuperBlockError::Truncated(device_bytes as usize).into());
        }
        let channel = desc.channel()?;
        let page = read_page(&channel, 0).await?;
        let block = SuperBlock::decode(&page)?;
        if !bstype_matches(&options.bstype, &block.bstype) {
            return Err(BlobError::BstypeMismatch {
                wanted: bstype_name(&options.bstype),
                found: bstype_name(&block.bstype),
            });
        }
        block.check_geometry(device_bytes, desc.block_size())?;
        let total_clusters = block.total_clusters(device_bytes);
        let geometry = Geometry {
            cluster_size: u64::from(block.cluster_size),
            io_unit_size: u64::from(block.effective_io_unit()),
            block_size,
            md_start: u64::from(block.md_start),
            md_len: block.md_len,
            total_clusters,
            md_clusters: md_clusters(block.md_start, block.md_len, block.cluster_size),
            cluster_shift: super::shift_of(u64::from(block.cluster_size)),
            io_unit_shift: super::shift_of(u64::from(block.effective_io_unit())),
        };
        if geometry.md_clusters > total_clusters {
            return Err(SuperBlockError::Field {
                field: "md_len",
                reason: format!(
                    "metadata needs {} clusters, the store has {total_clusters}",
                    geometry.md_clusters
                ),
            }
            .into());
        }
        let recovered = !block.masks_trusted();
        let check = RangeCheck {
            total_clusters,
            md_len: block.md_len,
        };
        let mut scan = (false, 0u64);
        let (used_md_pages, used_clusters, used_blobids, found) = if recovered {
            let superset = if options.full_scan {
                None
            } else {
                read_root_superset(&channel, &block).await
            };
            scan = (
                superset.is_some(),
                superset
                    .as_ref()
                    .map_or(u64::from(block.md_len), RootSuperset::page_count),
            );
            let replayed = replay(&channel, &geometry, &check, superset.as_ref()).await?;
            (
                replayed.used_md_pages,
                replayed.used_clusters,
                replayed.used_blobids,
                replayed.found,
            )
        } else {
            let (mut md_pages, mut clusters, mut blobids) =
                read_masks(&channel, &block, total_clusters).await?;
            for cluster in 0..geometry.md_clusters {
                if !clusters.get(cluster) {
                    tracing::warn!(
                        cluster,
                        "metadata cluster not marked used on disk; marking it"
                    );
                    clusters.set(cluster);
                }
            }
            let mut masks = GraphMasks {
                claimed: BitSet::new(md_pages.len()),
                md_pages: &mut md_pages,
                clusters: &mut clusters,
            };
            let found = read_graph(&channel, &geometry, &check, &mut masks, &blobids).await?;
            masks.drop_ghosts(&found, &mut blobids);
            (md_pages, clusters, blobids, found)
        };
        let mut state = MdState {
            super_block: block.clone(),
            clean_on_disk: block.clean == 1,
            used_md_pages,
            used_blobids,
            root_superset: None,
            root_superset_lost: false,
            open_blobs: HashMap::new(),
            loading: HashMap::new(),
            awaiting_parent: HashMap::new(),
            clones: BTreeMap::new(),
            parents: HashMap::new(),
            unreadable: HashMap::new(),
            pinned_extent_pages: HashMap::new(),
            unloaded: false,
            read_only: options.read_only,
        };
        if state.super_block.size == 0 {
            state.super_block.size = device_bytes;
        }
        // No record is kept yet: the dirty mark (or, after a recovery, below) sets one up.
        state.super_block.root_superset_nonce = None;
        let mut report = LoadReport {
            recovered,
            bounded: scan.0,
            md_pages_scanned: scan.1,
            blobs: state.used_blobids.count_set() as usize,
            ..LoadReport::default()
        };
        // The snapshot graph, from each blob's SNAP xattr; snapshots left half-made.
        let Repairs { pending, removing } = found.apply(&mut state, &mut report);
        let removing = merges_to_repair(&state, removing, &mut report);
        drop(channel);
        let inner = Blobstore::new_inner(desc, geometry, &used_clusters, state)?;
        let store = Blobstore::register(inner);
        if options.read_only {
            if !pending.is_empty() || !removing.is_empty() {
                report.repaired.push(format!(
                    "{} interrupted snapshot(s) and {} interrupted merge(s) left as they are (read-only load)",
                    pending.len(),
                    removing.len()
                ));
            }
            return Ok((store, report));
        }
        if recovered {
            store.write_masks().await?;
            flush(&store.inner.md_channel).await?;
            // A new record (new nonce) for the blobs found, before anything can be created.
            store.start_root_superset(false).await?;
        }
        if !pending.is_empty() {
            let done = crate::snapshot::repair_pending_snapshots(&store, pending).await?;
            report.repaired.extend(done);
        }
        if !removing.is_empty() {
            let done = crate::snapshot::repair_interrupted_merges(&store, removing).await?;
            report.repaired.extend(done);
        }
        Ok((store, report))
    }
}

/// The root superset a dirty load may trust instead of scanning the whole md region: the
/// super block says dirty and carries Spool's marker, and the blob-id mask region holds a
/// record with the marker's nonce, the store's geometry and a good CRC (docs/format.md,
/// "Bounded recovery"). `None` (with the reason logged) means the full scan: no marker
/// (a store SPDK wrote or Spool unloaded clean), SPDK's mask written over the record by
/// its recovery or unload, a torn record, a read error.
async fn read_root_superset(channel: &BdevChannel, block: &SuperBlock) -> Option<RootSuperset> {
    let nonce = block.root_superset_nonce?;
    if block.clean != 0 {
        return None;
    }
    let region_pages = super::superset::record_region_pages(block);
    let start = u64::from(block.used_blobid_mask_start) * PAGE_SIZE_U64;
    let untrusted = |reason: String| {
        tracing::info!(%reason, "root superset not trusted: the dirty load scans the whole md region");
        None
    };
    let first = match read_page(channel, start).await {
        Ok(page) => page,
        Err(err) => return untrusted(err.to_string()),
    };
    let len = match RootSuperset::decode_header(&first, nonce, block.md_len, region_pages) {
        Ok(len) => len,
        Err(err) => return untrusted(err.to_string()),
    };
    let bytes = if len <= first.len() {
        first
    } else {
        match read_regions(channel, &[(start, len.div_ceil(PAGE_SIZE) * PAGE_SIZE)]).await {
            Ok(mut regions) => regions.pop().unwrap_or_default(),
            Err(err) => return untrusted(err.to_string()),
        }
    };
    match RootSuperset::decode(&bytes, nonce, block.md_len, region_pages) {
        Ok(record) => Some(record),
        Err(err) => untrusted(err.to_string()),
    }
}

/// Reads the three masks (all requests at once) and decodes them.
async fn read_masks(
    channel: &BdevChannel,
    block: &SuperBlock,
    total_clusters: u64,
) -> Result<(BitSet, BitSet, BitSet)> {
    // Only the pages the bits need: a longer region's tail is never read.
    let region = |start: u32, len: u32, bits: u64| {
        (
            u64::from(start) * PAGE_SIZE_U64,
            mask_region_pages(len, bits) as usize * PAGE_SIZE,
        )
    };
    let md_bits = u64::from(block.md_len);
    let regions = read_regions(
        channel,
        &[
            region(
                block.used_page_mask_start,
                block.used_page_mask_len,
                md_bits,
            ),
            region(
                block.used_cluster_mask_start,
                block.used_cluster_mask_len,
                total_clusters,
            ),
            region(
                block.used_blobid_mask_start,
                block.used_blobid_mask_len,
                md_bits,
            ),
        ],
    )
    .await?;
    let pages = decode_mask(MaskKind::UsedPages, &regions[0], block.md_len)?;
    let clusters = decode_mask(MaskKind::UsedClusters, &regions[1], total_clusters as u32)?;
    let blobids = decode_mask(MaskKind::UsedBlobIds, &regions[2], block.md_len)?;
    let md_len = u64::from(block.md_len);
    Ok((
        BitSet::from_bytes(md_len, &pages),
        BitSet::from_bytes(total_clusters, &clusters),
        BitSet::from_bytes(md_len, &blobids),
    ))
}

/// A blob's place in the snapshot graph, from its chain: the snapshot markers it carries
/// and its parent (or why its `SNAP` xattr is unreadable).
struct GraphInfo {
    /// `SNAPTMP`: a snapshot of this original still being made.
    pending: Option<u64>,
    /// `SNAPRM`: a snapshot being merged into this clone.
    removing: Option<u64>,
    /// The parent named by `SNAP`.
    parent: Result<Option<u64>>,
}

impl GraphInfo {
    fn of(meta: &BlobMeta) -> GraphInfo {
        let marked = |name: &str| {
            meta.xattr(true, name.as_bytes())
                .and_then(|value| <[u8; 8]>::try_from(value).ok())
                .map(u64::from_le_bytes)
        };
        GraphInfo {
            pending: marked(XATTR_SNAPSHOT_PENDING),
            removing: marked(XATTR_SNAPSHOT_REMOVING),
            parent: meta.parent_id(),
        }
    }

    /// Nothing to record: no marker, no parent.
    fn is_plain(&self) -> bool {
        self.pending.is_none() && self.removing.is_none() && matches!(self.parent, Ok(None))
    }
}

/// What a load learnt from the blobs' chains, by root md page: the graph entries of the
/// blobs that have one (most have none and cost nothing here) or whose chain could not be
/// read, and (recovery) the blobs found damaged. Gathered in any order, applied in root
/// order (the order the clone lists, repairs and reports keep).
#[derive(Default)]
struct Found {
    graph: Vec<(u32, Result<GraphInfo>)>,
    damaged: Vec<(u32, BlobError)>,
    /// Clean load: blobs whose metadata uses pages or clusters the masks do not mark (the
    /// load claimed them), with what was missing. Reported unreadable: they refuse to open
    /// until the store is reloaded with the repaired masks.
    disagree: Vec<(u32, BlobError)>,
    /// Clean load: blob-id bits over zeroed md pages (no blob there).
    ghosts: Vec<u32>,
}

impl Found {
    fn graph(&mut self, root: u32, info: Result<GraphInfo>) {
        if info.as_ref().map_or(true, |info| !info.is_plain()) {
            self.graph.push((root, info));
        }
    }

    /// Fills the clone graph and the report; returns the snapshots to repair.
    fn apply(mut self, state: &mut MdState, report: &mut LoadReport) -> Repairs {
        self.damaged.append(&mut self.disagree);
        self.damaged.sort_by_key(|(root, _)| *root);
        self.graph.sort_by_key(|(root, _)| *root);
        let damaged: HashSet<u32> = self.damaged.iter().map(|(root, _)| *root).collect();
        for (root, err) in &self.damaged {
            state
                .unreadable
                .insert(page_to_blobid(*root), reason_of(err));
        }
        report.unreadable = self
            .damaged
            .into_iter()
            .map(|(root, err)| (page_to_blobid(root), err.to_string()))
            .collect();
        for &page in &self.ghosts {
            report.repaired.push(format!(
                "the blob-id mask marked md page {page}, which is zeroed (no blob {:#x}): \
                 bit cleared",
                page_to_blobid(page)
            ));
        }
        let mut repairs = Repairs::default();
        for (root, info) in self.graph {
            let id = page_to_blobid(root);
            let parent = info.and_then(|info| {
                if let Some(original) = info.pending {
                    repairs.pending.push((id, original));
                }
                if let Some(clone) = info.removing {
                    repairs.removing.push((id, clone));
                }
                info.parent
            });
            let is_blob = |blob: u64| {
                crate::format::blobid_to_page(blob)
                    .is_some_and(|page| state.used_blobids.get(u64::from(page)))
            };
            let parent = parent.and_then(|parent| match parent {
                // No edge to a free id: a blob made there later would inherit the clone.
                Some(parent) if !is_blob(parent) => Err(BlobError::corrupt(
                    id,
                    format!("its parent {parent:#x} (SNAP xattr) is not a blob in this store"),
                )),
                parent => Ok(parent),
            });
            match parent {
                Ok(Some(parent)) => {
                    state.clones.entry(parent).or_default().push(id);
                    state.parents.insert(id, parent);
                }
                Ok(None) => {}
                Err(err) => {
                    if !damaged.contains(&root) {
                        tracing::warn!(blob = format!("{id:#x}"), %err, "blob metadata unreadable");
                        state.unreadable.insert(id, reason_of(&err));
                        report.unreadable.push((id, err.to_string()));
                    }
                }
            }
        }
        repairs
    }
}

/// What is wrong with a blob, without the blob's name (its open error adds it).
fn reason_of(err: &BlobError) -> String {
    match err {
        BlobError::CorruptBlob { reason, .. } => reason.clone(),
        other => other.to_string(),
    }
}

/// Whether `clone`'s parent chain reaches `grand` (`None`: the chain's end) without passing
/// `grand`'s side: after a committed merge the clone reads through the snapshot's parent,
/// directly or through snapshots of the clone taken since (which a failed delete of the
/// merged snapshot leaves in between).
fn reads_through_to(state: &MdState, clone: u64, grand: Option<u64>) -> bool {
    let mut at = state.parents.get(&clone).copied();
    for _ in 0..=state.parents.len() {
        if at == grand {
            return true;
        }
        match at {
            Some(id) => at = state.parents.get(&id).copied(),
            None => return false,
        }
    }
    false
}

/// The interrupted merges (`SNAPRM`: `(snapshot, clone)`) a load may repair: the clone must
/// be another blob that is the snapshot's clone (merge not committed) or reads through its
/// parent (merge committed; snapshots of the clone taken since may be in between), and the
/// snapshot may have no clone but that one (a merge only ever marks a
/// snapshot with exactly one clone, the one it names). A mark naming anything else (a bit
/// flip, a hostile image) is reported "not repaired" and the snapshot is left as it is: never
/// deleted on a mark naming nothing, nor with the clusters other clones read through.
fn merges_to_repair(
    state: &MdState,
    removing: Vec<(u64, u64)>,
    report: &mut LoadReport,
) -> Vec<(u64, u64)> {
    removing
        .into_iter()
        .filter(|&(snapshot, clone)| {
            let is_blob = crate::format::blobid_to_page(clone)
                .is_some_and(|page| state.used_blobids.get(u64::from(page)));
            let parent = state.parents.get(&clone);
            let other_clone = state
                .clones
                .get(&snapshot)
                .is_some_and(|clones| clones.iter().any(|&other| other != clone));
            let why = if clone == snapshot {
                "it names the snapshot itself"
            } else if !is_blob {
                "the clone it names is not a blob"
            } else if other_clone {
                "the snapshot has a clone other than the one it names (a merge marks a \
                 snapshot with one clone)"
            } else if parent != Some(&snapshot)
                && !reads_through_to(state, clone, state.parents.get(&snapshot).copied())
            {
                "the blob it names is a clone of neither the snapshot nor its parent"
            } else {
                return true;
            };
            tracing::warn!(
                blob = format!("{snapshot:#x}"),
                why,
                "merge mark left as it is"
            );
            report.repaired.push(format!(
                "merge of snapshot {snapshot:#x} into {clone:#x}: not repaired: {why}"
            ));
            false
        })
        .collect()
}

/// Snapshots a load found half-made, in root order.
#[derive(Default)]
struct Repairs {
    /// Snapshots still being made: `(snapshot, original)`.
    pending: Vec<(u64, u64)>,
    /// Snapshots being merged into their clone: `(snapshot, clone)`.
    removing: Vec<(u64, u64)>,
}

/// The header fields of an md page that make it a one-page root chain of the blob whose id
/// its page number gives (id, sequence 0, no next page), read before its CRC is checked:
/// pages failing this need no CRC to be skipped or deferred.
fn one_page_root(page: &[u8], number: u32) -> bool {
    read_u64(page, 0) == page_to_blobid(number)
        && read_u32(page, 8) == 0
        && read_u32(page, NEXT_OFFSET) == INVALID_MD_PAGE
}

/// The masks a clean load trusts, completed with what the blobs it reads use.
struct GraphMasks<'a> {
    /// The used-md-page mask as read, plus every page a listed blob's chain or extent
    /// table names.
    md_pages: &'a mut BitSet,
    /// The used-cluster mask as read, plus every cluster a listed blob maps (the runs of
    /// its run-length map, the entries of its extent pages).
    clusters: &'a mut BitSet,
    /// The md pages some blob claimed (a ghost's page is freed only when none did).
    claimed: BitSet,
}

impl GraphMasks<'_> {
    /// Clears the blob-id bits over zeroed pages (no blob there, nothing to keep) and their
    /// used-md-page bits unless a blob uses the page.
    fn drop_ghosts(&mut self, found: &Found, used_blobids: &mut BitSet) {
        for &page in &found.ghosts {
            used_blobids.clear(u64::from(page));
            if !self.claimed.get(u64::from(page)) {
                self.md_pages.clear(u64::from(page));
            }
        }
    }

    /// Claims md page `page`; false when the on-disk mask did not mark it.
    fn claim_page(&mut self, page: u32) -> bool {
        self.claimed.set(u64::from(page));
        self.md_pages.set_range(u64::from(page), 1)
    }

    /// Claims what a blob's chain uses: its chain pages (those read and its own), and when
    /// it parsed, its extent pages and the cluster runs the parse saw. What the on-disk
    /// masks did not mark is added to `missing` (the blob keeps its graph entry: its clone
    /// edges still protect what it shares). Its extent pages' clusters are claimed as they
    /// are read ([`GraphMasks::claim_cluster`]).
    fn claim_chain(
        &mut self,
        missing: &mut Missing,
        chain: impl Iterator<Item = u32>,
        parsed: Option<&ParsedChain>,
        runs: &[(u32, u32)],
    ) {
        for page in chain {
            if !self.claim_page(page) {
                missing.pages.push(format!("md page {page}"));
            }
        }
        if let Some(parsed) = parsed {
            for &(index, page) in &parsed.pending_extent_pages {
                if !self.claim_page(page) {
                    missing
                        .pages
                        .push(format!("extent page {index} (md page {page})"));
                }
            }
        }
        for &(first, len) in runs {
            if !self.clusters.set_range(u64::from(first), u64::from(len)) {
                missing.clusters(first, len);
            }
        }
    }

    /// Claims device cluster `cluster` (an extent page's entry, not 0); what the on-disk
    /// mask did not mark is added to `missing`.
    fn claim_cluster(&mut self, missing: &mut Missing, cluster: u32) {
        if !self.clusters.set_range(u64::from(cluster), 1) {
            missing.clusters(cluster, 1);
        }
    }
}

/// What a blob uses that the on-disk masks of a clean load did not mark.
#[derive(Default)]
struct Missing {
    /// The md pages, named.
    pages: Vec<String>,
    /// The clusters, as `(first, last)` ranges (neighbours joined).
    clusters: Vec<(u32, u32)>,
}

impl Missing {
    /// Adds clusters `first..first + len` (`len > 0`, no overflow).
    fn clusters(&mut self, first: u32, len: u32) {
        let last = first + (len - 1);
        match self.clusters.last_mut() {
            Some((_, end)) if u64::from(*end) + 1 == u64::from(first) => *end = last,
            _ => self.clusters.push((first, last)),
        }
    }

    /// Records blob `root` in `found.disagree` when it used anything not marked.
    fn report(self, found: &mut Found, root: u32) {
        if self.pages.is_empty() && self.clusters.is_empty() {
            return;
        }
        let mut what = Vec::new();
        if !self.pages.is_empty() {
            what.push(format!(
                "{} not marked in the used-md-page mask",
                self.pages.join(", ")
            ));
        }
        if !self.clusters.is_empty() {
            let ranges: Vec<String> = self
                .clusters
                .iter()
                .map(|(first, last)| format!("{first}..={last}"))
                .collect();
            what.push(format!(
                "clusters {} not marked in the used-cluster mask",
                ranges.join(", ")
            ));
        }
        let err = BlobError::corrupt(
            page_to_blobid(root),
            format!(
                "the masks disagree with its metadata: {}; claimed now (nothing of it is \
                 handed out); it opens once a command that writes the store has loaded it \
                 (any change, or `spool check --repair`: ls, info, export and dump write \
                 nothing)",
                what.join("; ")
            ),
        );
        tracing::warn!(%err, "mask disagreement");
        found.disagree.push((root, err));
    }
}

/// The cluster check of a load's parse: no cluster map is built (a blob's size costs
/// nothing); each allocated run is range-checked and kept for the caller to claim.
struct RunCheck<'a> {
    range: &'a RangeCheck,
    runs: std::cell::RefCell<Vec<(u32, u32)>>,
}

impl RunCheck<'_> {
    /// The runs seen since the last call.
    fn take_runs(&self) -> Vec<(u32, u32)> {
        std::mem::take(&mut *self.runs.borrow_mut())
    }
}

impl ClusterCheck for RunCheck<'_> {
    fn cluster_ok(&self, cluster: u32) -> bool {
        self.range.cluster_ok(cluster)
    }
    fn md_page_ok(&self, page: u32) -> bool {
        self.range.md_page_ok(page)
    }
    fn builds_map(&self) -> bool {
        false
    }
    fn cluster_run_ok(&self, first: u32, len: u32) -> bool {
        let ok = u64::from(first) + u64::from(len) <= self.range.total_clusters;
        if ok {
            self.runs.borrow_mut().push((first, len));
        }
        ok
    }
}

/// A clean load's view of the blobs: the masks are trusted for what they mark, and every
/// root the blob-id mask lists is read for the snapshot graph and to list the blobs whose
/// metadata cannot be read. What a listed blob uses (chain pages, the extent pages its
/// table names, the clusters of its run-length map and of its extent pages) is claimed in
/// the masks, so a mask that disagrees with the pages never hands out a page or cluster a
/// blob uses; such a blob is reported. Roots are read in batched runs straight from the
/// device buffers; a one-page chain without extent pages (almost every blob) is parsed
/// there, CRC checked once, nothing copied, no cluster map built; the others are walked
/// page by page afterwards, and their extent pages read (what a blob's clusters cost).
async fn read_graph(
    channel: &BdevChannel,
    geometry: &Geometry,
    check: &RangeCheck,
    masks: &mut GraphMasks<'_>,
    used_blobids: &BitSet,
) -> Result<Found> {
    let mut found = Found::default();
    let run_check = RunCheck {
        range: check,
        runs: Default::default(),
    };
    let mut deferred: Vec<BlobLoad> = Vec::new();
    let roots = || used_blobids.iter_set().map(|page| page as u32);
    let mut wanted = roots().peekable();
    read_runs(channel, geometry, md_scan::runs(roots()), |first, bytes| {
        let end = first + (bytes.len() / PAGE_SIZE) as u32;
        while let Some(root) = wanted.next_if(|&page| page < end) {
            let at = (root - first) as usize * PAGE_SIZE;
            let page = &bytes[at..at + PAGE_SIZE];
            if one_page_root(page, root) {
                let header = MdPageHeader::decode(page);
                if header.crc_ok {
                    let id = page_to_blobid(root);
                    let parsed = parse_decoded_chain(id, &[page], &[header], &run_check);
                    let runs = run_check.take_runs();
                    if parsed
                        .as_ref()
                        .is_ok_and(|parsed| !parsed.pending_extent_pages.is_empty())
                    {
                        // Its extent pages are elsewhere: finished with the others.
                        deferred.push(BlobLoad::new(root));
                        continue;
                    }
                    let mut missing = Missing::default();
                    masks.claim_chain(
                        &mut missing,
                        std::iter::once(root),
                        parsed.as_ref().ok(),
                        &runs,
                    );
                    missing.report(&mut found, root);
                    found.graph(root, parsed.map(|parsed| GraphInfo::of(&parsed.meta)));
                    continue;
                }
            }
            if page.iter().all(|&byte| byte == 0) {
                found.ghosts.push(root);
                continue;
            }
            deferred.push(BlobLoad::new(root));
        }
    })
    .await?;
    finish(
        deferred,
        Mode::Graph,
        channel,
        geometry,
        check,
        &run_check,
        &mut found,
        None,
        Some(masks),
    )
    .await?;
    Ok(found)
}

/// The masks a replay rebuilt, and what it learnt of each blob.
struct Replayed {
    used_md_pages: BitSet,
    used_clusters: BitSet,
    used_blobids: BitSet,
    found: Found,
}

impl Replayed {
    /// Claims the cluster runs a parse saw (a word at a time, whatever their length).
    fn claim_runs(&mut self, runs: &[(u32, u32)]) {
        for &(first, len) in runs {
            self.used_clusters
                .set_range(u64::from(first), u64::from(len));
        }
    }
}

/// Rebuilds the three masks from the md region (SPDK's recovery): every page with a good
/// CRC whose header makes it the root of the blob its page number names is a blob; its
/// chain, the extent pages its extent table names and its clusters are claimed. A blob
/// whose chain or extent pages are unreadable or invalid does not fail the load: it is
/// reported damaged (it will not open), its id, root and the chain pages that could be read
/// stay claimed, and the clusters of the parts that could be parsed stay claimed too, so
/// nothing of it is handed out while readable parts remain; every other blob loads as it is.
///
/// The whole region (only the root superset's pages when a record is trusted, see
/// docs/format.md "Bounded recovery") is read in batched runs; a page is only checksummed when its header
/// makes it a root, a one-page root whose blob has no extent page (almost all) is replayed
/// straight from the device buffer, and the other blobs are finished by reading the pages
/// they name. No cluster map is built: a run-length run is claimed a word at a time and an
/// extent page entry by entry, so the replay costs what the pages hold, never the sizes they
/// declare (a thin blob of 2^26 clusters costs what an empty one does).
async fn replay(
    channel: &BdevChannel,
    geometry: &Geometry,
    check: &RangeCheck,
    superset: Option<&RootSuperset>,
) -> Result<Replayed> {
    let md_len = u64::from(geometry.md_len);
    let mut out = Replayed {
        used_md_pages: BitSet::new(md_len),
        used_clusters: BitSet::new(geometry.total_clusters),
        used_blobids: BitSet::new(md_len),
        found: Found::default(),
    };
    for cluster in 0..geometry.md_clusters {
        out.used_clusters.set(cluster);
    }
    let run_check = RunCheck {
        range: check,
        runs: Default::default(),
    };
    let mut deferred = Vec::new();
    // Roots are looked for in the superset's pages only when a record is trusted: every
    // other page reached (continuations, extent pages) is read on demand by `finish`.
    let runs: Box<dyn Iterator<Item = (u32, u32)>> = match superset {
        Some(superset) => Box::new(md_scan::runs(superset.pages())),
        None => Box::new(md_scan::whole_region(geometry.md_len)),
    };
    read_runs(channel, geometry, runs, |first, bytes| {
        for (offset, page) in bytes.chunks_exact(PAGE_SIZE).enumerate() {
            let root = first + offset as u32;
            let id = page_to_blobid(root);
            if read_u64(page, 0) != id || read_u32(page, 8) != 0 {
                continue;
            }
            let header = MdPageHeader::decode(page);
            if !header.crc_ok {
                continue;
            }
            out.used_blobids.set(u64::from(root));
            out.used_md_pages.set(u64::from(root));
            if header.next != INVALID_MD_PAGE {
                deferred.push(BlobLoad::new(root));
                continue;
            }
            let parsed = parse_decoded_chain(id, &[page], &[header], &run_check);
            let runs = run_check.take_runs();
            match parsed {
                Ok(parsed) if parsed.pending_extent_pages.is_empty() => {
                    out.found.graph(root, Ok(GraphInfo::of(&parsed.meta)));
                    out.claim_runs(&runs);
                }
                // Its extent pages are elsewhere: finished (root read again, parsed
                // again) with the others.
                Ok(_) => deferred.push(BlobLoad::new(root)),
                Err(err) => damaged(&mut out.found, root, err),
            }
        }
    })
    .await?;
    let mut found = std::mem::take(&mut out.found);
    finish(
        deferred,
        Mode::Replay,
        channel,
        geometry,
        check,
        &run_check,
        &mut found,
        Some(&mut out),
        None,
    )
    .await?;
    out.found = found;
    Ok(out)
}

/// Records a blob the replay found damaged.
fn damaged(found: &mut Found, root: u32, err: BlobError) {
    tracing::warn!(blob = format!("{:#x}", page_to_blobid(root)), %err, "blob metadata damaged; the store loads without it");
    found.damaged.push((root, err));
}

/// What [`finish`] does with each blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A clean load: parse the chain for the snapshot graph, claim what it uses in the
    /// masks read (its extent pages' clusters included).
    Graph,
    /// A recovery: claim its pages and clusters in the masks rebuilt.
    Replay,
}

/// Blobs [`finish`] works on at once (each holds its chain's pages until it is done).
const ACTIVE_BLOBS: usize = 256;
/// Chain pages cached before [`finish`] stops taking more blobs (16 MiB).
const CHAIN_PAGES_BUDGET: usize = 4096;
/// Extent pages one blob reads per round (all blobs' together at most
/// `ACTIVE_BLOBS * EXTENT_PAGES_PER_ROUND` pages, 64 MiB, dropped after the round).
const EXTENT_PAGES_PER_ROUND: usize = 64;

/// Finishes the blobs the scan could not: walks each chain, parses it and claims what it
/// uses, its extent pages' clusters included, reading what they need in rounds of batched
/// reads (one round per chain page depth, then per batch of extent pages), a bounded number
/// of blobs and pages at a time. No cluster map is built.
#[allow(clippy::too_many_arguments)]
async fn finish(
    deferred: Vec<BlobLoad>,
    mode: Mode,
    channel: &BdevChannel,
    geometry: &Geometry,
    check: &RangeCheck,
    run_check: &RunCheck<'_>,
    found: &mut Found,
    mut claims: Option<&mut Replayed>,
    mut masks: Option<&mut GraphMasks<'_>>,
) -> Result<()> {
    // Every page is read: a clean load checks the pages a chain uses against the mask
    // afterwards (claiming them), rather than taking a clear bit for a bad page.
    let mut chain_pages = PageCache::new(None);
    let mut extent_pages = PageCache::new(None);
    let mut queue = deferred.into_iter();
    let mut active: Vec<BlobLoad> = Vec::new();
    loop {
        while active.len() < ACTIVE_BLOBS && chain_pages.len() < CHAIN_PAGES_BUDGET {
            match queue.next() {
                Some(blob) => active.push(blob),
                None => break,
            }
        }
        if active.is_empty() {
            return Ok(());
        }
        let mut needs = Needs::default();
        active.retain_mut(|blob| {
            let step = Step {
                mode,
                md_len: geometry.md_len,
                check,
                run_check,
                chain_pages: &chain_pages,
                extent_pages: &extent_pages,
            };
            !blob.advance(
                &step,
                found,
                claims.as_deref_mut(),
                masks.as_deref_mut(),
                &mut needs,
            )
        });
        // Extent pages serve the round after the one that asked for them only.
        extent_pages.clear();
        if active.is_empty() {
            chain_pages.clear();
            continue;
        }
        chain_pages.fetch(channel, geometry, needs.chain).await?;
        extent_pages.fetch(channel, geometry, needs.extent).await?;
    }
}

/// Pages the blobs of a round of [`finish`] asked for.
#[derive(Default)]
struct Needs {
    chain: Vec<u32>,
    extent: Vec<u32>,
}

/// What a blob of [`finish`] may use in a round.
struct Step<'a, 'm> {
    mode: Mode,
    md_len: u32,
    /// The range check of extent page entries.
    check: &'a RangeCheck,
    /// The parse's check (no cluster map built; the runs kept for the claims).
    run_check: &'a RunCheck<'a>,
    chain_pages: &'a PageCache<'m>,
    extent_pages: &'a PageCache<'m>,
}

/// One blob being finished: walking its chain, then claiming its extent pages' clusters.
struct BlobLoad {
    root: u32,
    walk: ChainWalk,
    extents: Option<Extents>,
    /// Clean load: what it uses that the on-disk masks did not mark.
    missing: Missing,
}

/// A parsed blob reading its extent pages, `next` the first not claimed yet.
struct Extents {
    blob: ExtentPageOf,
    pages: Vec<(usize, u32)>,
    next: usize,
    first_error: Option<BlobError>,
}

impl BlobLoad {
    fn new(root: u32) -> BlobLoad {
        BlobLoad {
            root,
            walk: ChainWalk::new(root),
            extents: None,
            missing: Missing::default(),
        }
    }

    /// Goes as far as the cached pages allow; returns whether the blob is done (else it
    /// added what it needs to `needs`).
    fn advance(
        &mut self,
        step: &Step<'_, '_>,
        found: &mut Found,
        mut claims: Option<&mut Replayed>,
        mut masks: Option<&mut GraphMasks<'_>>,
        needs: &mut Needs,
    ) -> bool {
        let id = page_to_blobid(self.root);
        if self.extents.is_none() {
            match self.walk.advance(step.chain_pages, step.md_len) {
                WalkStep::NeedPage(page) => {
                    needs.chain.push(page);
                    return false;
                }
                WalkStep::Failed(err) => {
                    // The pages walked so far that read fine and are this blob's stay
                    // claimed: nothing of a damaged blob is handed out.
                    if let Some(out) = claims.as_deref_mut() {
                        for page in self.walk.readable(step.chain_pages) {
                            out.used_md_pages.set(u64::from(page));
                        }
                    }
                    // A listed blob's root and readable pages are never handed out.
                    if let Some(masks) = masks.as_deref_mut() {
                        masks.claim_page(self.root);
                        for page in self.walk.readable(step.chain_pages) {
                            masks.claim_page(page);
                        }
                    }
                    self.fail(step.mode, found, err);
                    return true;
                }
                WalkStep::Done => {}
            }
            let cached: Vec<&CachedPage> = self
                .walk
                .chain
                .iter()
                .filter_map(|&page| match step.chain_pages.get(page) {
                    Lookup::Page(cached) => Some(cached),
                    Lookup::Unusable | Lookup::NotRead => None,
                })
                .collect();
            debug_assert_eq!(
                cached.len(),
                self.walk.chain.len(),
                "a walked chain is cached"
            );
            if let Some(out) = claims.as_deref_mut() {
                for &page in &self.walk.chain {
                    out.used_md_pages.set(u64::from(page));
                }
            }
            let pages: Vec<&[u8]> = cached.iter().map(|page| &page.bytes[..]).collect();
            let headers: Vec<MdPageHeader> = cached.iter().map(|page| page.header).collect();
            let parsed = parse_decoded_chain(id, &pages, &headers, step.run_check);
            let runs = step.run_check.take_runs();
            if let Some(masks) = masks.as_deref_mut() {
                masks.claim_chain(
                    &mut self.missing,
                    self.walk.chain.iter().copied(),
                    parsed.as_ref().ok(),
                    &runs,
                );
            }
            let parsed = match parsed {
                Ok(parsed) => parsed,
                Err(err) => {
                    std::mem::take(&mut self.missing).report(found, self.root);
                    self.fail(step.mode, found, err);
                    return true;
                }
            };
            if let Some(out) = claims.as_deref_mut() {
                out.claim_runs(&runs);
            }
            found.graph(self.root, Ok(GraphInfo::of(&parsed.meta)));
            self.extents = Some(Extents {
                blob: ExtentPageOf {
                    id,
                    num_clusters: parsed.num_clusters,
                    thin: parsed.meta.is_thin(),
                },
                pages: parsed.pending_extent_pages,
                next: 0,
                first_error: None,
            });
        }
        let Some(extents) = self.extents.as_mut() else {
            return true;
        };
        let missing = &mut self.missing;
        while let Some(&(index, page)) = extents.pages.get(extents.next) {
            let applied = match step.extent_pages.get(page) {
                Lookup::NotRead => {
                    needs.extent.extend(
                        extents.pages[extents.next..]
                            .iter()
                            .map(|&(_, page)| page)
                            .take(EXTENT_PAGES_PER_ROUND),
                    );
                    return false;
                }
                Lookup::Unusable => Err(BlobError::corrupt(
                    id,
                    format!("extent page {index} (md page {page}) is unreadable or has a bad CRC"),
                )),
                Lookup::Page(cached) => visit_extent_page(
                    &extents.blob,
                    index,
                    &cached.bytes,
                    &cached.header,
                    step.check,
                    |_, cluster| {
                        if cluster == 0 {
                            return;
                        }
                        if let Some(out) = claims.as_deref_mut() {
                            out.used_clusters.set(u64::from(cluster));
                        }
                        if let Some(masks) = masks.as_deref_mut() {
                            masks.claim_cluster(missing, cluster);
                        }
                    },
                ),
            };
            match applied {
                Ok(()) => {
                    if let Some(out) = claims.as_deref_mut() {
                        out.used_md_pages.set(u64::from(page));
                    }
                }
                Err(err) => {
                    extents.first_error.get_or_insert(err);
                }
            }
            extents.next += 1;
        }
        // A blob with an unusable extent page is damaged (it cannot open); one that only
        // used clusters the masks did not mark opens once the repaired masks are written.
        match extents.first_error.take() {
            Some(err) => damaged(found, self.root, err),
            None => std::mem::take(missing).report(found, self.root),
        }
        true
    }

    /// The chain could not be walked or parsed: a damaged blob (replay; its graph entry
    /// would only repeat it) or an unreadable one (clean load).
    fn fail(&self, mode: Mode, found: &mut Found, err: BlobError) {
        match mode {
            Mode::Replay => damaged(found, self.root, err),
            Mode::Graph => found.graph(self.root, Err(err)),
        }
    }
}

/// Where a [`ChainWalk`] stands.
enum WalkStep {
    /// The next page is not read yet.
    NeedPage(u32),
    /// The chain is invalid.
    Failed(BlobError),
    /// Every page of the chain is in `chain`.
    Done,
}

/// The md pages of the chain rooted at `root`, in order, found a page at a time: every
/// `next` in range, never revisited, each page usable, owned by the root's blob and
/// numbered in sequence.
struct ChainWalk {
    id: u64,
    chain: Vec<u32>,
    seen: HashSet<u32>,
}

impl ChainWalk {
    fn new(root: u32) -> ChainWalk {
        ChainWalk {
            id: page_to_blobid(root),
            chain: vec![root],
            seen: HashSet::new(),
        }
    }

    /// The pages of the chain so far that were read, have a good CRC and carry this
    /// blob's id (what a damaged chain keeps claimed).
    fn readable<'a>(&'a self, pages: &'a PageCache<'_>) -> impl Iterator<Item = u32> + 'a {
        self.chain.iter().copied().filter(move |&page| {
            matches!(pages.get(page), Lookup::Page(cached) if cached.header.id == self.id)
        })
    }

    /// Checks the chain's pages from the last one not checked yet.
    fn advance(&mut self, pages: &PageCache<'_>, md_len: u32) -> WalkStep {
        let id = self.id;
        loop {
            let Some(&current) = self.chain.last() else {
                return WalkStep::Failed(BlobError::corrupt(id, "empty chain"));
            };
            let header = match pages.get(current) {
                Lookup::NotRead => return WalkStep::NeedPage(current),
                Lookup::Unusable => {
                    return WalkStep::Failed(BlobError::corrupt(
                        id,
                        format!("md page {current} of the chain is unreadable or has a bad CRC"),
                    ))
                }
                Lookup::Page(cached) => cached.header,
            };
            let sequence = self.chain.len() as u32 - 1;
            if header.id != id || header.sequence != sequence {
                return WalkStep::Failed(BlobError::corrupt(
                    id,
                    format!(
                        "md page {current} belongs to blob {:#x} at sequence {}, expected this blob at sequence {sequence}",
                        header.id, header.sequence
                    ),
                ));
            }
            if header.next == INVALID_MD_PAGE {
                return WalkStep::Done;
            }
            if header.next >= md_len {
                return WalkStep::Failed(BlobError::corrupt(
                    id,
                    format!(
                        "md page {current}: next page {} is outside the md region",
                        header.next
                    ),
                ));
            }
            if self.seen.is_empty() {
                self.seen.insert(self.chain[0]);
            }
            if !self.seen.insert(header.next) {
                return WalkStep::Failed(BlobError::corrupt(
                    id,
                    format!(
                        "md page {current}: the chain loops back to page {}",
                        header.next
                    ),
                ));
            }
            self.chain.push(header.next);
        }
    }
}

#[cfg(test)]
#[path = "load_tests.rs"]
mod tests;
