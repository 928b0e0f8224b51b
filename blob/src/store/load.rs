//! Loading a store: validate the super block, then either read the masks (clean) or replay
//! every metadata chain to rebuild them (dirty shutdown, or a pre-v3 store), and finally
//! rebuild the snapshot/clone graph from the blobs' `SNAP` xattrs.
//!
//! Recovery differs from the seed's in three places (each tested): a continuation page is
//! checked against its root's id and its place in the chain, not against its own index; the
//! metadata clusters claimed are `ceil((md_start + md_len) / pages_per_cluster)`; and the
//! free count comes from the rebuilt bitmap, so a cluster referenced twice (a crash in the
//! middle of a snapshot) is not counted twice.

use std::collections::{BTreeMap, HashMap, HashSet};

use spool_bdev::BdevDesc;

use super::md_io::{flush, read_bytes, read_page};
use super::{Blobstore, Geometry, MdState};
use crate::bitmap::BitSet;
use crate::error::{BlobError, Result};
use crate::format::layout::md_clusters;
use crate::format::mask::{decode_mask, MaskKind};
use crate::format::md_page::MdPageHeader;
use crate::format::super_block::{
    bstype_matches, bstype_name, Bstype, SuperBlock, SuperBlockError,
};
use crate::format::{page_to_blobid, INVALID_MD_PAGE, PAGE_SIZE, PAGE_SIZE_U64};
use crate::meta::{
    apply_extent_page, parse_chain, ClusterCheck, XATTR_SNAPSHOT_PENDING, XATTR_SNAPSHOT_REMOVING,
};

/// Options of [`Blobstore::load`].
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// The type the caller expects; all zero matches any store.
    pub bstype: Bstype,
}

/// What a load found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Whether the metadata was replayed (dirty shutdown or no blob-id mask).
    pub recovered: bool,
    /// Blobs found.
    pub blobs: usize,
    /// Blobs whose metadata could not be parsed while building the clone graph (they
    /// fail to open with the reason).
    pub unreadable: Vec<(u64, String)>,
    /// Snapshots a crash interrupted, finished or removed at this load.
    pub repaired: Vec<String>,
}

/// Pages read per metadata region request.
const SCAN_PAGES: u64 = 256;

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
        let masks = if recovered {
            None
        } else {
            Some(read_masks(&channel, &block, total_clusters).await?)
        };
        let scan_mask = masks.as_ref().map(|(pages, _, _)| pages.clone());
        let pages = scan_md_region(&channel, &geometry, scan_mask.as_ref()).await?;
        let check = RangeCheck {
            total_clusters,
            md_len: block.md_len,
        };
        let mut damaged = Vec::new();
        let (used_md_pages, used_clusters, used_blobids) = match masks {
            Some((md_pages, mut clusters, blobids)) => {
                for cluster in 0..geometry.md_clusters {
                    if !clusters.get(cluster) {
                        tracing::warn!(
                            cluster,
                            "metadata cluster not marked used on disk; marking it"
                        );
                        clusters.set(cluster);
                    }
                }
                (md_pages, clusters, blobids)
            }
            None => {
                let replayed = replay(&pages, &geometry, &check);
                damaged = replayed.damaged;
                (
                    replayed.used_md_pages,
                    replayed.used_clusters,
                    replayed.used_blobids,
                )
            }
        };
        let mut state = MdState {
            super_block: block.clone(),
            clean_on_disk: block.clean == 1,
            used_md_pages,
            used_blobids,
            open_blobs: HashMap::new(),
            loading: HashMap::new(),
            awaiting_parent: HashMap::new(),
            clones: BTreeMap::new(),
            parents: HashMap::new(),
            unloaded: false,
        };
        if state.super_block.size == 0 {
            state.super_block.size = device_bytes;
        }
        let mut report = LoadReport {
            recovered,
            unreadable: damaged,
            ..LoadReport::default()
        };
        // The snapshot graph, from each blob's SNAP xattr; snapshots left half-made.
        let mut pending = Vec::new();
        let mut removing = Vec::new();
        for root in state.used_blobids.iter_set() {
            let id = page_to_blobid(root as u32);
            report.blobs += 1;
            match chain_of(&pages, root as u32, block.md_len)
                .and_then(|chain| {
                    let refs: Vec<&[u8]> = chain.iter().map(|&p| pages[&p].as_slice()).collect();
                    parse_chain(id, &refs, &check)
                })
                .and_then(|parsed| {
                    let marked = |name: &str| {
                        parsed
                            .meta
                            .xattr(true, name.as_bytes())
                            .and_then(|value| <[u8; 8]>::try_from(value).ok())
                            .map(u64::from_le_bytes)
                    };
                    if let Some(orig) = marked(XATTR_SNAPSHOT_PENDING) {
                        pending.push((id, orig));
                    }
                    if let Some(clone) = marked(XATTR_SNAPSHOT_REMOVING) {
                        removing.push((id, clone));
                    }
                    parsed.meta.parent_id()
                }) {
                Ok(Some(parent)) => {
                    state.clones.entry(parent).or_default().push(id);
                    state.parents.insert(id, parent);
                }
                Ok(None) => {}
                Err(err) => {
                    if !report.unreadable.iter().any(|(known, _)| *known == id) {
                        tracing::warn!(blob = format!("{id:#x}"), %err, "blob metadata unreadable");
                        report.unreadable.push((id, err.to_string()));
                    }
                }
            }
        }
        drop(channel);
        let inner = Blobstore::new_inner(desc, geometry, &used_clusters, state)?;
        let store = Blobstore::register(inner);
        if recovered {
            store.write_masks().await?;
            flush(&store.inner.md_channel).await?;
        }
        if !pending.is_empty() {
            report.repaired = crate::snapshot::repair_pending_snapshots(&store, pending).await?;
        }
        if !removing.is_empty() {
            let done = crate::snapshot::repair_interrupted_merges(&store, removing).await?;
            report.repaired.extend(done);
        }
        Ok((store, report))
    }
}

async fn read_masks(
    channel: &spool_bdev::BdevChannel,
    block: &SuperBlock,
    total_clusters: u64,
) -> Result<(BitSet, BitSet, BitSet)> {
    let region =
        |start: u32, len: u32| (u64::from(start) * PAGE_SIZE_U64, len as usize * PAGE_SIZE);
    let (offset, len) = region(block.used_page_mask_start, block.used_page_mask_len);
    let pages = decode_mask(
        MaskKind::UsedPages,
        &read_bytes(channel, offset, len).await?,
        block.md_len,
    )?;
    let (offset, len) = region(block.used_cluster_mask_start, block.used_cluster_mask_len);
    let clusters = decode_mask(
        MaskKind::UsedClusters,
        &read_bytes(channel, offset, len).await?,
        total_clusters as u32,
    )?;
    let (offset, len) = region(block.used_blobid_mask_start, block.used_blobid_mask_len);
    let blobids = decode_mask(
        MaskKind::UsedBlobIds,
        &read_bytes(channel, offset, len).await?,
        block.md_len,
    )?;
    let md_len = u64::from(block.md_len);
    Ok((
        BitSet::from_bytes(md_len, &pages),
        BitSet::from_bytes(total_clusters, &clusters),
        BitSet::from_bytes(md_len, &blobids),
    ))
}

/// Reads the md region in 1 MiB pieces (only pieces holding a page of `only` when given)
/// and keeps every page with a good CRC and a non-zero id.
async fn scan_md_region(
    channel: &spool_bdev::BdevChannel,
    geometry: &Geometry,
    only: Option<&BitSet>,
) -> Result<HashMap<u32, Vec<u8>>> {
    let mut pages = HashMap::new();
    let md_len = u64::from(geometry.md_len);
    let mut first = 0u64;
    while first < md_len {
        let count = SCAN_PAGES.min(md_len - first);
        let wanted = only.is_none_or(|mask| (first..first + count).any(|page| mask.get(page)));
        if wanted {
            let bytes = read_bytes(
                channel,
                geometry.md_page_offset(first as u32),
                count as usize * PAGE_SIZE,
            )
            .await?;
            for (index, page) in bytes.chunks_exact(PAGE_SIZE).enumerate() {
                let number = first + index as u64;
                if only.is_some_and(|mask| !mask.get(number)) {
                    continue;
                }
                let header = MdPageHeader::decode(page);
                if header.crc_ok && header.id != 0 {
                    pages.insert(number as u32, page.to_vec());
                }
            }
        }
        first += count;
    }
    Ok(pages)
}

/// The md pages of the chain rooted at `root`, in order: every `next` in range, never
/// revisited, each page present, owned by the root's blob and numbered in sequence.
fn chain_of(pages: &HashMap<u32, Vec<u8>>, root: u32, md_len: u32) -> Result<Vec<u32>> {
    let id = page_to_blobid(root);
    let mut chain = vec![root];
    let mut seen = HashSet::from([root]);
    let mut current = root;
    loop {
        let page = pages.get(&current).ok_or_else(|| {
            BlobError::corrupt(
                id,
                format!("md page {current} of the chain is unreadable or has a bad CRC"),
            )
        })?;
        let header = MdPageHeader::decode(page);
        let sequence = chain.len() as u32 - 1;
        if header.id != id || header.sequence != sequence {
            return Err(BlobError::corrupt(
                id,
                format!(
                    "md page {current} belongs to blob {:#x} at sequence {}, expected this blob at sequence {sequence}",
                    header.id, header.sequence
                ),
            ));
        }
        if header.next == INVALID_MD_PAGE {
            return Ok(chain);
        }
        if header.next >= md_len {
            return Err(BlobError::corrupt(
                id,
                format!(
                    "md page {current}: next page {} is outside the md region",
                    header.next
                ),
            ));
        }
        if !seen.insert(header.next) {
            return Err(BlobError::corrupt(
                id,
                format!(
                    "md page {current}: the chain loops back to page {}",
                    header.next
                ),
            ));
        }
        chain.push(header.next);
        current = header.next;
    }
}

/// The masks a replay rebuilt, and the blobs whose metadata it could not read whole.
struct Replayed {
    used_md_pages: BitSet,
    used_clusters: BitSet,
    used_blobids: BitSet,
    damaged: Vec<(u64, String)>,
}

/// Rebuilds the three masks from the pages: every valid root page and its chain, and the
/// extent pages its extent table names. A blob whose chain or extent pages are unreadable or
/// invalid does not fail the load: it is reported damaged (it will not open), its id, root
/// and the chain pages that could be read stay claimed, and the clusters of the parts that
/// could be parsed stay claimed too, so nothing of it is handed out while readable parts
/// remain; every other blob loads as it is.
fn replay(pages: &HashMap<u32, Vec<u8>>, geometry: &Geometry, check: &RangeCheck) -> Replayed {
    let md_len = u64::from(geometry.md_len);
    let mut out = Replayed {
        used_md_pages: BitSet::new(md_len),
        used_clusters: BitSet::new(geometry.total_clusters),
        used_blobids: BitSet::new(md_len),
        damaged: Vec::new(),
    };
    for cluster in 0..geometry.md_clusters {
        out.used_clusters.set(cluster);
    }
    let mut roots: Vec<u32> = pages
        .iter()
        .filter(|(&number, page)| {
            let header = MdPageHeader::decode(page);
            header.sequence == 0 && header.id == page_to_blobid(number)
        })
        .map(|(&number, _)| number)
        .collect();
    roots.sort_unstable();
    for root in roots {
        let id = page_to_blobid(root);
        out.used_blobids.set(u64::from(root));
        out.used_md_pages.set(u64::from(root));
        if let Err(err) = replay_blob(pages, geometry, check, root, &mut out) {
            tracing::warn!(blob = format!("{id:#x}"), %err, "blob metadata damaged; the store loads without it");
            out.damaged.push((id, err.to_string()));
        }
    }
    out
}

/// Claims one blob's chain pages, extent pages and clusters, as far as they can be read.
fn replay_blob(
    pages: &HashMap<u32, Vec<u8>>,
    geometry: &Geometry,
    check: &RangeCheck,
    root: u32,
    out: &mut Replayed,
) -> Result<()> {
    let id = page_to_blobid(root);
    let chain = chain_of(pages, root, geometry.md_len)?;
    for &page in &chain {
        out.used_md_pages.set(u64::from(page));
    }
    let refs: Vec<&[u8]> = chain.iter().map(|p| pages[p].as_slice()).collect();
    let mut parsed = parse_chain(id, &refs, check)?;
    let claim = |meta: &crate::meta::BlobMeta, used: &mut BitSet| {
        for &cluster in &meta.clusters {
            if cluster != 0 {
                used.set(u64::from(cluster));
            }
        }
    };
    let mut first_error = None;
    for &(index, page) in &parsed.pending_extent_pages {
        let applied = match pages.get(&page) {
            Some(bytes) => apply_extent_page(&mut parsed.meta, index, bytes, check),
            None => Err(BlobError::corrupt(
                id,
                format!("extent page {index} (md page {page}) is unreadable or has a bad CRC"),
            )),
        };
        match applied {
            Ok(()) => out.used_md_pages.set(u64::from(page)),
            Err(err) => {
                first_error.get_or_insert(err);
            }
        }
    }
    claim(&parsed.meta, &mut out.used_clusters);
    first_error.map_or(Ok(()), Err)
}
