//! Phases 4 and 5: who owns what. Every md page claimed at most once, every extent page
//! pointed to once, every cluster inside the store, outside the metadata and owned by one
//! blob at most; then the three masks against the state rebuilt from the md pages.

use super::chains::BlobRecord;
use super::clusters::Claims;
use super::image::Image;
use super::report::{Problem, ProblemKind};
use super::super_check::StoreShape;
use super::CheckError;
use crate::bitmap::BitSet;
use crate::format::mask::{decode_mask, mask_region_pages, MaskKind};

/// Mask differences listed one by one per mask and direction; the rest are counted.
pub const MAX_LISTED_BITS: usize = 64;

/// The masks as the md pages say they should be.
#[derive(Debug, Clone)]
pub struct Rebuilt {
    /// Md pages in use: chains and extent pages (damaged blobs' pages included).
    pub used_pages: BitSet,
    /// Clusters in use: the metadata clusters, every cluster a blob maps in range, and every
    /// cluster a damaged blob's pages still name ([`super::chains::salvage_clusters`]).
    pub used_clusters: BitSet,
    /// Root pages of the blobs (a blob whose root page is unusable has none).
    pub used_blobids: BitSet,
}

fn owner_of_page(records: &[BlobRecord], page: u32, skip: u64) -> Option<u64> {
    records
        .iter()
        .filter(|r| r.id != skip)
        .find(|r| r.chain.contains(&page) || r.extent_pages.contains(&page))
        .map(|r| r.id)
}

/// Claims every md page, reporting double use; returns the rebuilt masks, the clusters
/// from `claims` (phase 4's cluster half, [`super::clusters`]).
pub fn claim_all(
    shape: &StoreShape,
    records: &[BlobRecord],
    claims: &Claims,
    problems: &mut Vec<Problem>,
) -> Rebuilt {
    let md_len = u64::from(shape.md_len());
    let mut rebuilt = Rebuilt {
        used_pages: BitSet::new(md_len),
        used_clusters: claims.used.clone(),
        used_blobids: BitSet::new(md_len),
    };
    // Pages: chains first (a root's page is its own), then extent pages.
    let mut shared = Vec::new();
    for record in records.iter() {
        if !record.root_broken {
            rebuilt.used_blobids.set(u64::from(record.root()));
        }
        for &page in &record.chain {
            if rebuilt.used_pages.get(u64::from(page)) {
                shared.push((page, record.id, false));
            }
            rebuilt.used_pages.set(u64::from(page));
        }
    }
    for record in records.iter() {
        for &page in &record.extent_pages {
            if rebuilt.used_pages.get(u64::from(page)) {
                shared.push((page, record.id, true));
            }
            rebuilt.used_pages.set(u64::from(page));
        }
    }
    if shared.len() > MAX_LISTED_BITS {
        problems.push(Problem {
            kind: ProblemKind::PageShared,
            page: None,
            blob: None,
            field: "md pages".into(),
            expected: "no further shared md pages".into(),
            found: format!(
                "{} more md pages used twice",
                shared.len() - MAX_LISTED_BITS
            ),
        });
        shared.truncate(MAX_LISTED_BITS);
    }
    for (page, blob, extent) in shared {
        let owner = owner_of_page(records, page, blob);
        // A snapshot half made holds its original's extent pages until the original's new
        // root is written (the marker's problem covers it).
        if extent
            && owner.is_some_and(|o| {
                claims.marked_pair(blob, o)
                    || claims.untaken_snapshot(blob)
                    || claims.untaken_snapshot(o)
            })
        {
            continue;
        }
        let other = owner.map_or("another reference of the same blob".to_string(), |o| {
            format!("also used by blob {o:#x}")
        });
        problems.push(Problem {
            kind: if extent {
                ProblemKind::ExtentPageShared
            } else {
                ProblemKind::PageShared
            },
            page: Some(page),
            blob: Some(blob),
            field: if extent { "extent_table" } else { "next" }.into(),
            expected: "an md page no other chain or extent table uses".into(),
            found: other,
        });
    }
    rebuilt
}

/// The masks as on disk (`None` for one whose header is wrong: its problem is listed).
pub struct DiskMasks {
    /// Used md pages.
    pub pages: Option<BitSet>,
    /// Used clusters.
    pub clusters: Option<BitSet>,
    /// Used blob ids.
    pub blobids: Option<BitSet>,
}

/// Reads the three masks, reporting bad headers.
pub fn read_masks(
    image: &Image<'_>,
    shape: &StoreShape,
    problems: &mut Vec<Problem>,
) -> Result<DiskMasks, CheckError> {
    let block = &shape.block;
    let md_bits = block.md_len;
    let cluster_bits = shape.total_clusters as u32;
    let regions = [
        (
            MaskKind::UsedPages,
            block.used_page_mask_start,
            block.used_page_mask_len,
            md_bits,
            "used_page_mask",
        ),
        (
            MaskKind::UsedClusters,
            block.used_cluster_mask_start,
            block.used_cluster_mask_len,
            cluster_bits,
            "used_cluster_mask",
        ),
        (
            MaskKind::UsedBlobIds,
            block.used_blobid_mask_start,
            block.used_blobid_mask_len,
            md_bits,
            "used_blobid_mask",
        ),
    ];
    let mut out = Vec::new();
    for (kind, start, len, bits, name) in regions {
        if len == 0 {
            out.push(None);
            continue;
        }
        let pages = mask_region_pages(len, u64::from(bits));
        let region = image.read_pages(u64::from(start), pages)?;
        match decode_mask(kind, &region, bits) {
            Ok(bytes) => out.push(Some(BitSet::from_bytes(u64::from(bits), &bytes))),
            Err(err) => {
                problems.push(Problem {
                    kind: ProblemKind::MaskHeader,
                    page: None,
                    blob: None,
                    field: name.into(),
                    expected: format!("type {} and {bits} bits", kind as u8),
                    found: err.to_string(),
                });
                out.push(None);
            }
        }
    }
    let blobids = out.pop().flatten();
    let clusters = out.pop().flatten();
    let pages = out.pop().flatten();
    Ok(DiskMasks {
        pages,
        clusters,
        blobids,
    })
}

/// Compares one mask with its rebuilt state.
pub fn compare_mask(
    name: &str,
    disk: &BitSet,
    rebuilt: &BitSet,
    describe: &dyn Fn(u64) -> (Option<u32>, Option<u64>),
    problems: &mut Vec<Problem>,
) {
    let mut missing = 0usize;
    let mut extra = 0usize;
    let len = disk.len().min(rebuilt.len());
    for bit in rebuilt.iter_set().filter(|&b| b < len && !disk.get(b)) {
        missing += 1;
        if missing <= MAX_LISTED_BITS {
            let (page, blob) = describe(bit);
            problems.push(Problem {
                kind: ProblemKind::MaskBitMissing,
                page,
                blob,
                field: format!("{name}[{bit}]"),
                expected: "set (in use)".into(),
                found: "clear".into(),
            });
        }
    }
    for bit in disk.iter_set().filter(|&b| b < len && !rebuilt.get(b)) {
        extra += 1;
        if extra <= MAX_LISTED_BITS {
            let (page, blob) = describe(bit);
            problems.push(Problem {
                kind: ProblemKind::MaskBitExtra,
                page,
                blob,
                field: format!("{name}[{bit}]"),
                expected: "clear (nothing uses it)".into(),
                found: "set".into(),
            });
        }
    }
    for (count, kind, what) in [
        (missing, ProblemKind::MaskBitMissing, "clear"),
        (extra, ProblemKind::MaskBitExtra, "set"),
    ] {
        if count > MAX_LISTED_BITS {
            problems.push(Problem {
                kind,
                page: None,
                blob: None,
                field: name.into(),
                expected: "no further differences".into(),
                found: format!("{} more bits {what}", count - MAX_LISTED_BITS),
            });
        }
    }
}
