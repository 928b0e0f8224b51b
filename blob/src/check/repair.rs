//! Repair: what can be fixed without guessing, written in place, then a clean super block.
//!
//! - The three masks are rebuilt from the md pages: orphaned md pages, clusters and blob
//!   ids are freed, missing bits set.
//! - A blob whose metadata does not parse (or maps clusters it cannot own) keeps its md
//!   pages and every cluster the on-disk mask gave it that no intact blob owns (its data is
//!   never freed), and is marked read-only when its root page's FLAGS can be edited. It
//!   stays listed as damaged.
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
    let mut report = RepairReport::default();
    // Dirty first: a repair cut short leaves a store every load replays, never clean masks
    // half written.
    let mut dirty = shape.block.clone();
    dirty.clean = 0;
    image.write_pages(0, &dirty.encode())?;
    image.sync()?;
    let mut masks = rebuilt.clone();
    let disk_clusters = checked.disk.as_ref().and_then(|d| d.clusters.as_ref());
    // Damaged blobs keep their pages (already in the rebuilt page mask) and clusters.
    let any_damaged = checked.records.iter().any(|r| r.damage.is_some());
    for record in checked.records.iter().filter(|r| r.damage.is_some()) {
        let reason = record.damage.clone().unwrap_or_default();
        if record.root_broken {
            report.changes.push(format!(
                "blob {:#x}: root md page {} fails its CRC ({reason}): its blob-id bit is cleared (no load can open it), its md page and clusters are kept",
                record.id,
                record.root()
            ));
        } else if mark_read_only(&image, checked, record)? {
            report.changes.push(format!(
                "blob {:#x}: damaged ({reason}): marked read-only; its md pages and clusters are kept",
                record.id
            ));
        } else {
            report.changes.push(format!(
                "blob {:#x}: damaged ({reason}): left as it is, with its md pages and clusters",
                record.id
            ));
        }
    }
    if any_damaged {
        match disk_clusters {
            Some(disk) => {
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
            None => report.not_repaired.push(
                "the on-disk cluster mask is not trusted (dirty store or bad header): the clusters of damaged blobs cannot be told apart from free ones; a load would free them".into(),
            ),
        }
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
    let disk = checked.disk.as_ref();
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
