//! An offline checker (and repairer) for a store that may be damaged: `spool check`.
//!
//! Unlike a load, which stops at the first fault or repairs quietly, the check reads the
//! image's raw bytes and lists *every* inconsistency ([`Problem`]) with the md page, blob
//! and field, what was expected and what was found. It reuses the format decoders and the
//! blob layer's chain parser, but walks the store its own way, bounded everywhere (hostile
//! bytes cannot make it loop, allocate without limit or panic).
//!
//! Phases, in order ([`check_image`]):
//! 1. [`super_check`]: the super block (signature, version, CRC, fields, geometry).
//! 2. [`chains::scan`]: the md region in batched reads, finding every valid root page.
//! 3. [`chains::walk_blob`]: each blob's chain (CRC, id, sequence, next, loops),
//!    descriptors and extent pages.
//! 4. [`cross::claim_all`]: md pages and extent pages used once, clusters in range, outside
//!    the metadata, owned once; a damaged blob's clusters claimed as far as its pages still
//!    name them ([`chains::salvage_clusters`]).
//! 5. [`cross::compare_mask`]: the three masks against that state (only when a load would
//!    trust them: a dirty store's masks are rebuilt by every load).
//! 6. [`graph`]: parents, snapshot and merge markers, the super blob, lvol names and uuids.
//!
//! [`repair`] fixes what can be fixed without guessing and writes a clean store.

pub mod chains;
pub mod clusters;
pub mod cross;
pub mod forget;
pub mod graph;
pub mod image;
pub mod repair;
pub mod report;
pub mod super_check;

pub use report::{BlobSummary, CheckReport, Problem, ProblemKind};

use self::chains::BlobRecord;
use self::cross::{DiskMasks, Rebuilt};
use self::image::{Image, ImageIo};
use self::super_check::StoreShape;
use crate::format::page_to_blobid;
use crate::format::super_block::bstype_name;
use crate::lvol::xattr::LVS_BSTYPE;

/// Why a check could not run at all (exit code 1 of `spool check`).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The device could not be read or written (-EIO or the system's errno).
    #[error("cannot {what} the device at byte {offset}: {reason}")]
    Io {
        /// The operation.
        what: &'static str,
        /// Byte offset.
        offset: u64,
        /// The system's message.
        reason: String,
        /// Negative errno.
        errno: i32,
    },
    /// A read or write would reach past the device (-ENXIO).
    #[error("{bytes} bytes at byte {offset} reach past the device's {device_bytes} bytes")]
    OutOfDevice {
        /// Byte offset.
        offset: u64,
        /// Bytes asked for.
        bytes: u64,
        /// Bytes of the device.
        device_bytes: u64,
    },
    /// Page 0 is not a blobstore's super block (-EILSEQ).
    #[error("not a blobstore: {0}")]
    NotABlobstore(String),
    /// A repair was asked of a store whose super block cannot locate its metadata (-EILSEQ).
    #[error("cannot repair: {0}")]
    Unrepairable(String),
    /// An offline delete was asked of a blob whose metadata parses (-EINVAL): a load
    /// deletes it.
    #[error("blob {0:#x} is not damaged: delete it with the store loaded")]
    NotDamaged(u64),
    /// An offline delete was asked of a blob the md region does not hold (-ENOENT).
    #[error("no blob {0:#x} is found in the md region")]
    NoSuchBlob(u64),
    /// The caller asked the scan to stop ([`image::ImageIo::stop_requested`]) after `scanned`
    /// of `md_len` md pages (-EINTR); nothing was written.
    #[error("stopped after {scanned} of {md_len} md pages scanned")]
    Stopped {
        /// Md pages scanned.
        scanned: u64,
        /// Md pages of the store.
        md_len: u64,
    },
}

impl CheckError {
    pub(crate) fn io(what: &'static str, offset: u64, err: &std::io::Error) -> CheckError {
        CheckError::Io {
            what,
            offset,
            reason: err.to_string(),
            errno: -err.raw_os_error().unwrap_or(libc::EIO),
        }
    }

    /// The negative errno of this error.
    pub fn errno(&self) -> i32 {
        match self {
            CheckError::Io { errno, .. } => *errno,
            CheckError::OutOfDevice { .. } => -libc::ENXIO,
            CheckError::NotABlobstore(_) | CheckError::Unrepairable(_) => -libc::EILSEQ,
            CheckError::NotDamaged(_) => -libc::EINVAL,
            CheckError::NoSuchBlob(_) => -libc::ENOENT,
            CheckError::Stopped { .. } => -libc::EINTR,
        }
    }
}

/// A finished check: the report, and what a repair needs (the rebuilt state).
pub struct Checked {
    /// What was found.
    pub report: CheckReport,
    /// The store's shape (`None`: the super block cannot locate the metadata).
    pub(crate) shape: Option<StoreShape>,
    /// Every blob, by id.
    pub(crate) records: Vec<BlobRecord>,
    /// The masks as the metadata says.
    pub(crate) rebuilt: Option<Rebuilt>,
    /// The masks as on disk.
    pub(crate) disk: Option<DiskMasks>,
    /// Pairs of blobs sharing clusters (outside a marked snapshot or merge).
    pub(crate) shared: Vec<(u64, u64)>,
}

/// Checks the store on `file` (a [`std::fs::File`], or bytes in memory; read only: nothing
/// is written). `progress` gets one line
/// per phase, and lines during long scans.
pub fn check_image(
    file: &dyn ImageIo,
    progress: &mut dyn FnMut(String),
) -> Result<Checked, CheckError> {
    let image = Image::new(file)?;
    let mut problems = Vec::new();
    progress("phase 1: super block".into());
    let shape = super_check::check_super(&image, &mut problems)?;
    let mut report = CheckReport {
        device_bytes: image.len(),
        ..CheckReport::default()
    };
    let Some(shape) = shape else {
        // The clean flag as the super block holds it (a clean store on a shrunk device is
        // still one that was unloaded cleanly).
        if image.len() >= crate::format::PAGE_SIZE_U64 {
            let page = image.read_pages(0, 1)?;
            report.clean = crate::format::read_u32(&page, 16);
        }
        report.problems = problems;
        report.notes.push(
            "the super block's geometry is unusable: the masks and metadata were not checked"
                .into(),
        );
        return Ok(Checked {
            report,
            shape: None,
            records: Vec::new(),
            rebuilt: None,
            disk: None,
            shared: Vec::new(),
        });
    };
    report.clean = shape.block.clean;
    report.total_clusters = shape.total_clusters;
    report.md_clusters = shape.md_clusters;
    report.md_len = shape.md_len();
    progress(format!("phase 2: md region ({} pages)", shape.md_len()));
    let scan = chains::scan(&image, &shape, progress)?;
    for (page, why) in &scan.unreadable {
        problems.push(Problem {
            kind: ProblemKind::PageUnreadable,
            page: Some(*page),
            blob: None,
            field: "page".into(),
            expected: "a page the device reads".into(),
            found: why.clone(),
        });
    }
    progress(format!(
        "phase 3: chains of {} blob(s)",
        scan.roots.len() + scan.broken_roots.len()
    ));
    check_root_superset(&image, &shape, &scan.roots, &mut report, &mut problems)?;
    let mut records = Vec::with_capacity(scan.roots.len());
    let mut claims = clusters::Claims::new(&shape);
    for &root in &scan.roots {
        let mut record = chains::walk_blob(&image, &shape, root, &mut problems)?;
        claims.take(&shape, &mut record, &mut problems);
        records.push(record);
    }
    claims.finish(&mut problems);
    progress("phase 4: md page and cluster ownership".into());
    let disk = if shape.masks_trusted {
        Some(cross::read_masks(&image, &shape, &mut problems)?)
    } else {
        report.notes.push(if shape.block.used_blobid_mask_len == 0 {
            "the store has no blob-id mask (format before version 3): every load replays the metadata; masks not compared".into()
        } else {
            "the store is dirty (clean = 0): a load replays the metadata and rebuilds the masks; masks not compared".into()
        });
        None
    };
    // A root page with a bad CRC is a damaged blob when the clean blob-id mask marks it
    // (or, on a dirty store, simply a damaged page: a replay skips it).
    for &root in &scan.broken_roots {
        records.push(chains::broken_root(&image, &shape, root, &mut problems)?);
    }
    // A damaged blob's clusters stay claimed as far as its pages still name them (after
    // every intact blob claimed its own): keeping a cluster costs space, freeing one may
    // lose data.
    for record in records
        .iter_mut()
        .filter(|r| r.damage.is_some() && r.meta.is_none())
    {
        record.salvaged = chains::salvage_clusters(&image, &shape, record, &mut claims.used)?;
    }
    records.sort_by_key(|r| r.id);
    let rebuilt = cross::claim_all(&shape, &records, &claims, &mut problems);
    if let Some(disk) = &disk {
        progress("phase 5: masks".into());
        let describe_page = |bit: u64| {
            let page = bit as u32;
            let owner = records
                .iter()
                .find(|r| r.chain.contains(&page) || r.extent_pages.contains(&page))
                .map(|r| r.id);
            (Some(page), owner)
        };
        if let Some(mask) = &disk.pages {
            cross::compare_mask(
                "used_page_mask",
                mask,
                &rebuilt.used_pages,
                &describe_page,
                &mut problems,
            );
        }
        let describe_cluster =
            |bit: u64| (None, u32::try_from(bit).ok().and_then(|c| claims.owner(c)));
        if let Some(mask) = &disk.clusters {
            cross::compare_mask(
                "used_cluster_mask",
                mask,
                &rebuilt.used_clusters,
                &describe_cluster,
                &mut problems,
            );
        }
        let describe_id = |bit: u64| (Some(bit as u32), Some(page_to_blobid(bit as u32)));
        if let Some(mask) = &disk.blobids {
            cross::compare_mask(
                "used_blobid_mask",
                mask,
                &rebuilt.used_blobids,
                &describe_id,
                &mut problems,
            );
        }
    }
    progress("phase 6: snapshots, clones and lvol names".into());
    let lvs = bstype_name(&shape.block.bstype) == LVS_BSTYPE;
    graph::check_graph(&records, shape.block.super_blob, lvs, &mut problems);
    report.used_clusters = rebuilt.used_clusters.count_set();
    report.used_md_pages = rebuilt.used_pages.count_set();
    report.blobs = records.iter().map(summary).collect();
    // Descriptors no SPDK version defines: not an error (SPDK and Spool skip them, for
    // forward compatibility), but what they held is ignored by every load, and a changed
    // type byte on a page whose CRC was resealed looks just like this (a clone's `SNAP`
    // xattr lost that way leaves it reading zeros where it read its parent).
    for record in &records {
        for &(page, kind, len) in &record.unknown_descriptors {
            report.notes.push(format!(
                "blob {:#x} md page {page}: descriptor type {kind} ({len} bytes) is unknown to SPDK and Spool: their loads skip it, ignoring what it holds",
                record.id
            ));
        }
    }
    report.problems = problems;
    Ok(Checked {
        report,
        shape: Some(shape),
        records,
        rebuilt: Some(rebuilt),
        disk,
        shared: claims.shared,
    })
}

/// On a dirty store carrying Spool's bounded-recovery marker, checks that the root superset
/// record covers every root page found (the bounded dirty load reads only those pages, so
/// a root outside it is a blob the next load would not find). A record that does not
/// decode is no problem: the load then scans the whole region, as SPDK's does (a note
/// says so).
fn check_root_superset(
    image: &Image<'_>,
    shape: &super_check::StoreShape,
    roots: &[u32],
    report: &mut CheckReport,
    problems: &mut Vec<Problem>,
) -> Result<(), CheckError> {
    use crate::format::root_superset::RootSuperset;
    let block = &shape.block;
    let Some(nonce) = block.root_superset_nonce.filter(|_| block.clean == 0) else {
        return Ok(());
    };
    let region_pages = block.used_blobid_mask_len;
    if region_pages == 0
        || u64::from(block.used_blobid_mask_start) + u64::from(region_pages)
            > image.len() / crate::format::PAGE_SIZE_U64
    {
        return Ok(());
    }
    let bytes = image.read_pages(u64::from(block.used_blobid_mask_start), region_pages)?;
    let record = match RootSuperset::decode(&bytes, nonce, block.md_len, region_pages) {
        Ok(record) => record,
        Err(err) => {
            report.notes.push(format!(
                "the root superset record is not used ({err}): the next load scans the whole md region"
            ));
            return Ok(());
        }
    };
    let missed: Vec<u32> = roots
        .iter()
        .copied()
        .filter(|&root| !record.covers(root))
        .collect();
    for &root in missed.iter().take(clusters::MAX_LISTED) {
        problems.push(Problem {
            kind: ProblemKind::RootOutsideSuperset,
            page: Some(root),
            blob: Some(crate::format::page_to_blobid(root)),
            field: "root_superset".into(),
            expected: format!(
                "a root page inside the chunks the record covers (chunk {} of {} pages)",
                record.chunk_of(root),
                1u64 << record.shift
            ),
            found: "a blob root outside them: the bounded dirty load would not find the blob"
                .into(),
        });
    }
    if missed.len() > clusters::MAX_LISTED {
        problems.push(Problem {
            kind: ProblemKind::RootOutsideSuperset,
            page: None,
            blob: None,
            field: "root_superset".into(),
            expected: "no further roots outside the record".into(),
            found: format!("{} more", missed.len() - clusters::MAX_LISTED),
        });
    }
    Ok(())
}

fn summary(record: &BlobRecord) -> BlobSummary {
    let meta = record.meta.as_ref();
    BlobSummary {
        id: record.id,
        clusters: record.num_clusters,
        allocated: record.allocated,
        md_pages: (record.chain.len() + record.extent_pages.len()) as u64,
        parent: meta.and_then(|m| m.parent_id().ok().flatten()),
        read_only: meta.is_some_and(|m| m.data_ro()),
        damaged: record.damage.clone(),
    }
}
