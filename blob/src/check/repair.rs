//! Repair: what can be fixed without guessing, written in place, then a clean super block.
//!
//! - The three masks are rebuilt from the md pages: orphaned md pages, clusters and blob
//!   ids are freed, missing bits set.
//! - A damaged blob (metadata that does not parse, or clusters it cannot own) is never
//!   deleted and nothing it may still use is freed; it is marked read-only when its root
//!   page's FLAGS can be edited, and stays listed as damaged. It keeps:
//!   - what the check rebuilt for it: the md pages its walk reached, the in-range clusters
//!     of its map, and every cluster its pages still name
//!     ([`super::chains::salvage_clusters`], CRC-failing bytes included: they can only add
//!     kept clusters);
//!   - with trusted on-disk masks (clean store), every md page and cluster they mark that
//!     no readable blob uses: the pages past a broken link (unreachable from a broken root)
//!     as much as its clusters;
//!   - a broken root (CRC mismatch) keeps its blob-id bit when the trusted mask had it set:
//!     a clean load then lists it as unreadable, as SPDK's iteration skips a blob that does
//!     not open, rather than forgetting it; its id is not reused, and rewriting the root page
//!     brings it back. (A dirty load's replay skips such a root, in SPDK and Spool alike.)
//!
//!   Policy when the masks are not trusted (dirty store, bad mask header) and a damaged
//!   blob's clusters are not all known (some page of it unreadable or failing its CRC): the
//!   store is left dirty ([`RepairReport::left_dirty`]) and the masks are not written. The
//!   alternatives were worse: writing it clean frees whatever only the unreadable bytes
//!   name (a guess that loses data), and the only safe superset (every cluster no intact
//!   blob owns) would fill the store for good. Leaving it dirty writes nothing false; the
//!   caller must not load it on the user's behalf (a replay frees those clusters), and says
//!   so, so the operator can copy the image first. Repairing again refuses again the same
//!   way; once every damaged blob's clusters are known, the repair writes the store clean.
//!   Repairs are idempotent: what one keeps, the next keeps.
//! - Two blobs owning one cluster are both marked read-only (which one is right is a guess).
//! - A writable parent of a clone is marked read-only.
//! - The super block gets its CRC, length and clean = 1. It is written with clean = 0
//!   (and synced) before anything else, so a repair cut short leaves a dirty store, which
//!   every load replays, and with clean = 1 only after the rest is written and synced.
//!
//! Half-done snapshots and merges (`SNAPTMP`, `SNAPRM`) are finished or rolled back by the
//! store's own load ([`crate::Blobstore::load`]), which the caller runs after this (see
//! `spool check --repair`), so they are repaired exactly the way a load repairs them.
//! Dangling parents, duplicate lvol names or uuids and a missing super blob are reported as
//! not repaired: fixing them would mean choosing for the user.

use std::collections::BTreeSet;

use super::chains::BlobRecord;
use super::image::{Image, ImageIo};
use super::report::ProblemKind;
use super::{CheckError, Checked};
use crate::format::descriptor::FLAG_READ_ONLY;
use crate::format::mask::{encode_mask, mask_region_pages, MaskKind};
use crate::format::{read_u64, seal_page, write_u64};

/// What a repair did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepairReport {
    /// Every change written, one line each.
    pub changes: Vec<String>,
    /// Problems left as they are, with the reason.
    pub not_repaired: Vec<String>,
    /// Whether the store was left dirty (clean = 0, masks not rewritten) because a
    /// damaged blob's clusters are not known and the on-disk masks are not trusted: the
    /// caller must not load it on the user's behalf (a load would free those clusters).
    pub left_dirty: bool,
}

/// Sets the read-only bit in `record`'s root page FLAGS. Returns whether it changed.
fn mark_read_only(
    image: &Image<'_>,
    checked: &Checked,
    record: &BlobRecord,
) -> Result<bool, CheckError> {
    let (Some(shape), Some(at)) = (&checked.shape, record.flags_at) else {
        return Ok(false);
    };
    if record.root_broken {
        return Ok(false);
    }
    let device_page = shape.md_device_page(record.root());
    let mut page = image.read_pages(device_page, 1)?;
    let data_ro = read_u64(&page, at + 8);
    if data_ro & FLAG_READ_ONLY != 0 {
        return Ok(false);
    }
    write_u64(&mut page, at + 8, data_ro | FLAG_READ_ONLY);
    seal_page(&mut page);
    image.write_pages(device_page, &page)?;
    Ok(true)
}

/// Refuses (before anything is written) a repair that would reseal a super block failing
/// its CRC whose fields the metadata contradicts: the CRC says those bytes are not what was
/// written, and sealing them would turn every blob past a wrong size or region into damage.
/// A failing CRC with nothing else wrong is resealed as it is.
fn refuse_to_bless_a_corrupt_super_block(checked: &Checked) -> Result<(), CheckError> {
    let problems = &checked.report.problems;
    if !problems
        .iter()
        .any(|p| p.kind == ProblemKind::SuperBlockCrc)
    {
        return Ok(());
    }
    let contradicted: Vec<&str> = problems
        .iter()
        .filter(|p| {
            matches!(
                p.kind,
                ProblemKind::SuperBlockField
                    | ProblemKind::ClusterOutOfRange
                    | ProblemKind::ClusterInMetadata
                    | ProblemKind::ExtentPageOutOfRange
                    | ProblemKind::PageNext
                    | ProblemKind::MaskHeader
            )
        })
        .map(|p| p.kind.name())
        .collect();
    if contradicted.is_empty() {
        return Ok(());
    }
    Err(CheckError::Unrepairable(format!(
        "the super block fails its CRC and the metadata contradicts its fields ({}): repairing would mean guessing their true values, so nothing was written",
        contradicted.join(", ")
    )))
}

/// Repairs the store on `file` (opened for writing, locked by the caller) from the check
/// `checked` made of it. The caller checks again afterwards.
pub fn repair_image(file: &dyn ImageIo, checked: &Checked) -> Result<RepairReport, CheckError> {
    let image = Image::new(file)?;
    let (Some(shape), Some(rebuilt)) = (&checked.shape, &checked.rebuilt) else {
        return Err(CheckError::Unrepairable(
            "the super block's geometry is unusable, so the metadata cannot be located (see the problems listed)".into(),
        ));
    };
    refuse_to_bless_a_corrupt_super_block(checked)?;
    // A page the device cannot read may be a blob's root: rebuilding the masks without it
    // would free that blob's clusters for good.
    if let Some(unreadable) = checked
        .report
        .problems
        .iter()
        .find(|p| p.kind == ProblemKind::PageUnreadable)
    {
        return Err(CheckError::Unrepairable(format!(
            "md page {} cannot be read ({}): whatever it holds would be lost; copy the image to a healthy device (e.g. with ddrescue) and repair the copy",
            unreadable.page.unwrap_or_default(),
            unreadable.found
        )));
    }
    let mut report = RepairReport::default();
    // Dirty first: a repair cut short leaves a store every load replays, never clean masks
    // half written.
    let mut dirty = shape.block.clone();
    dirty.clean = 0;
    image.write_pages(0, &dirty.encode())?;
    image.sync()?;
    let mut masks = rebuilt.clone();
    let disk = checked.disk.as_ref();
    let disk_pages = disk.and_then(|d| d.pages.as_ref());
    let disk_clusters = disk.and_then(|d| d.clusters.as_ref());
    let disk_blobids = disk.and_then(|d| d.blobids.as_ref());
    // Damaged blobs keep their pages and clusters: those the walk reached and their pages
    // still name are in the rebuilt masks already; the rest are kept below from the trusted
    // on-disk masks, or (untrusted masks) the store is left dirty.
    let damaged: Vec<&BlobRecord> = checked
        .records
        .iter()
        .filter(|r| r.damage.is_some())
        .collect();
    let unknown: Vec<&BlobRecord> = damaged
        .iter()
        .copied()
        .filter(|r| !r.clusters_known)
        .collect();
    let leave_dirty = disk_clusters.is_none() && !unknown.is_empty();
    for &record in &damaged {
        let reason = record.damage.clone().unwrap_or_default();
        let kept = if leave_dirty {
            "the repair frees none of its md pages or clusters but leaves the store dirty (see \"not repaired\")".to_string()
        } else if record.salvaged > 0 {
            format!(
                "its md pages and clusters are kept ({} cluster(s) named only by its damaged metadata among them)",
                record.salvaged
            )
        } else {
            "its md pages and clusters are kept".to_string()
        };
        if record.root_broken {
            let root = u64::from(record.root());
            let bit = match disk_blobids {
                Some(ids) if ids.get(root) => {
                    masks.used_blobids.set(root);
                    "its blob-id bit is kept (a clean load lists it as unreadable; rewriting the root page brings it back)"
                }
                Some(_) => "its blob-id bit stays clear (the on-disk mask did not list it)",
                None => "it gets no blob-id bit (the mask is not trusted, and a dirty load's replay skips a root failing its CRC)",
            };
            report.changes.push(format!(
                "blob {:#x}: root md page {} fails its CRC ({reason}): {bit}; {kept}",
                record.id,
                record.root()
            ));
        } else if mark_read_only(&image, checked, record)? {
            report.changes.push(format!(
                "blob {:#x}: damaged ({reason}): marked read-only; {kept}",
                record.id
            ));
        } else {
            report.changes.push(format!(
                "blob {:#x}: damaged ({reason}): left as it is; {kept}",
                record.id
            ));
        }
    }
    if !damaged.is_empty() {
        if let Some(disk) = disk_pages {
            let held: Vec<u64> = disk
                .iter_set()
                .filter(|&p| !masks.used_pages.get(p))
                .collect();
            for &page in &held {
                masks.used_pages.set(page);
            }
            if !held.is_empty() {
                report.changes.push(format!(
                    "{} md page(s) marked used on disk and used by no blob the walk could read are kept for the damaged blob(s)",
                    held.len()
                ));
            }
        }
        if let Some(disk) = disk_clusters {
            let held: Vec<u64> = disk
                .iter_set()
                .filter(|&c| !masks.used_clusters.get(c))
                .collect();
            for &cluster in &held {
                masks.used_clusters.set(cluster);
            }
            if !held.is_empty() {
                report.changes.push(format!(
                    "{} cluster(s) marked used on disk and owned by no intact blob are kept for the damaged blob(s)",
                    held.len()
                ));
            }
        }
    }
    if leave_dirty {
        for record in &unknown {
            report.not_repaired.push(format!(
                "blob {:#x}: some of its md pages cannot be read or trusted, and the on-disk cluster mask is not trusted (dirty store or bad header), so which clusters hold its data is not known",
                record.id
            ));
        }
        report.not_repaired.push(
            "the store is left dirty (masks not rewritten): writing it clean would free whatever clusters only those pages name. Any load replays the metadata and frees them: copy the image first if that data matters".into(),
        );
    }
    // Shared clusters and writable parents: read-only, nothing freed.
    let mut read_only: BTreeSet<u64> = checked.shared.iter().flat_map(|&(a, b)| [a, b]).collect();
    for problem in &checked.report.problems {
        match problem.kind {
            ProblemKind::ParentNotReadOnly => {
                if let Some(blob) = problem.blob {
                    read_only.insert(blob);
                }
            }
            ProblemKind::DanglingParent
            | ProblemKind::ParentCycle
            | ProblemKind::LvolNameDuplicate
            | ProblemKind::LvolUuidDuplicate
            | ProblemKind::LvsMetadata
            | ProblemKind::SuperBlobMissing => {
                report
                    .not_repaired
                    .push(format!("{problem}: needs a decision (left as it is)"));
            }
            _ => {}
        }
    }
    for id in read_only {
        let Some(record) = checked
            .records
            .iter()
            .find(|r| r.id == id && r.damage.is_none())
        else {
            continue;
        };
        if mark_read_only(&image, checked, record)? {
            report.changes.push(format!(
                "blob {id:#x}: shares clusters with another blob or is a writable parent: marked read-only"
            ));
        }
    }
    if leave_dirty {
        image.sync()?;
        report.left_dirty = true;
        return Ok(report);
    }
    // The masks.
    let block = &shape.block;
    let writes = [
        (
            MaskKind::UsedPages,
            block.used_page_mask_start,
            block.used_page_mask_len,
            &masks.used_pages,
            "used-md-page",
        ),
        (
            MaskKind::UsedClusters,
            block.used_cluster_mask_start,
            block.used_cluster_mask_len,
            &masks.used_clusters,
            "used-cluster",
        ),
        (
            MaskKind::UsedBlobIds,
            block.used_blobid_mask_start,
            block.used_blobid_mask_len,
            &masks.used_blobids,
            "used-blob-id",
        ),
    ];
    let on_disk = [
        disk.and_then(|d| d.pages.as_ref()),
        disk.and_then(|d| d.clusters.as_ref()),
        disk.and_then(|d| d.blobids.as_ref()),
    ];
    for ((kind, start, len, bits, name), old) in writes.into_iter().zip(on_disk) {
        if len == 0 {
            continue;
        }
        let pages = mask_region_pages(len, bits.len());
        let region = encode_mask(kind, bits.len() as u32, &bits.to_bytes(), pages);
        if old == Some(bits) {
            continue;
        }
        image.write_pages(u64::from(start), &region)?;
        let what = match old {
            Some(old) => {
                let set = bits.iter_set().filter(|&b| !old.get(b)).count();
                let cleared = old.iter_set().filter(|&b| !bits.get(b)).count();
                format!("{set} bit(s) set, {cleared} cleared")
            }
            None => format!("{} bit(s) set", bits.count_set()),
        };
        report
            .changes
            .push(format!("{name} mask rewritten from the metadata: {what}"));
    }
    // The super block last, clean (written dirty above).
    let mut block = block.clone();
    let super_problem = checked.report.problems.iter().any(|p| {
        matches!(
            p.kind,
            ProblemKind::SuperBlockCrc | ProblemKind::SuperBlockField
        )
    });
    image.sync()?;
    let was_clean = block.clean == 1;
    block.clean = 1;
    // A clean super block never carries Spool's bounded-recovery marker (a load writes a
    // new one with its first metadata change).
    block.root_superset_nonce = None;
    image.write_pages(0, &block.encode())?;
    if !was_clean || super_problem {
        report.changes.push(if super_problem {
            "super block rewritten: length 4096, clean = 1, CRC sealed".into()
        } else {
            "super block: clean = 1".into()
        });
    }
    image.sync()?;
    Ok(report)
}
