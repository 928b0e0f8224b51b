//! The checker target: patch a store image as [`crate::store`] does, run `spool check`'s
//! checker on it in memory, repair it, and require the repaired store to check without mask
//! or super block problems and to load.
//!
//! Input layout: the store target's (base, flags, patches; see [`crate::store`]).
//!
//! Checks beyond "no panic": every problem names a md page inside the md region; a repair
//! that runs leaves `clean = 1` (or `clean = 0` when it says it left the store dirty: a
//! damaged blob's clusters unknown on a dirty store), no super block problem, and (when no
//! blob is damaged) masks equal to the metadata; the repaired store loads with `Blobstore::load` and unloads.

use std::cell::RefCell;
use std::sync::Arc;

use spool_bdev::{Bdev, BdevDesc, MallocBdev};
use spool_blob::check::repair::repair_image;
use spool_blob::check::{check_image, ProblemKind};
use spool_blob::format::super_block::SuperBlock;
use spool_blob::format::PAGE_SIZE;
use spool_blob::{Blobstore, LoadOptions};

use crate::store::{bases, patch, run_on_reactor};
use crate::targets::class;

/// Runs [`store_check`], ignoring its outcome class.
pub fn target_store_check(data: &[u8]) {
    let _ = store_check(data);
}

/// Checks, repairs, checks again and loads the patched image; returns the outcome class.
pub fn store_check(data: &[u8]) -> String {
    let patched = match patch(data) {
        Ok(patched) => patched,
        Err(err) => panic!("no base images: {err}"),
    };
    let image = match patched.image() {
        Ok(image) => RefCell::new(image),
        Err(err) => panic!("no base images: {err}"),
    };
    let checked = match check_image(&image, &mut |_| {}) {
        Ok(checked) => checked,
        Err(err) => return class("check refused", err),
    };
    let md_len = checked.report.md_len;
    for problem in &checked.report.problems {
        if let Some(page) = problem.page {
            assert!(
                page < md_len,
                "{problem}: page past the md region ({md_len})"
            );
        }
    }
    let mut kinds: Vec<&str> = checked
        .report
        .problems
        .iter()
        .map(|p| p.kind.name())
        .collect();
    kinds.sort_unstable();
    kinds.dedup();
    kinds.truncate(3);
    let repaired = match repair_image(&image, &checked) {
        Ok(repaired) => repaired,
        Err(err) => return class(&format!("repair refused ({})", kinds.join(",")), err),
    };
    let again = check_image(&image, &mut |_| {})
        .unwrap_or_else(|err| panic!("the repaired store cannot be checked: {err}"));
    // A repair leaves the store dirty (and says so) only when a damaged blob's clusters are
    // not known and the masks are not trusted; otherwise it writes it clean.
    assert_eq!(
        again.report.clean,
        u32::from(!repaired.left_dirty),
        "a repaired store is clean unless the repair left it dirty ({:?})",
        repaired.not_repaired
    );
    let damaged = again.report.blobs.iter().any(|b| b.damaged.is_some());
    for problem in &again.report.problems {
        let wrong = match problem.kind {
            ProblemKind::SuperBlockCrc | ProblemKind::SuperBlockField => true,
            ProblemKind::MaskBitMissing | ProblemKind::MaskBitExtra | ProblemKind::MaskHeader => {
                !damaged
            }
            _ => false,
        };
        assert!(!wrong, "after repair ({:?}): {problem}", repaired.changes);
    }
    // `spool` opens a file with the store's io_unit as its block size (the base's device
    // may have had larger blocks than a patched io_unit allows).
    let image = image.into_inner();
    let block_size = match (bases(), SuperBlock::decode(&image[..PAGE_SIZE])) {
        (Ok(bases), Ok(block)) => bases[patched.base]
            .block_size
            .min(block.effective_io_unit()),
        (Err(err), _) => panic!("no base images: {err}"),
        (_, Err(err)) => panic!("a repaired store's super block does not decode: {err}"),
    };
    let loaded = run_on_reactor(move || async move {
        let bdev = MallocBdev::from_image("fuzz-check", block_size, &image)
            .map_err(|err| class("bdev", err))?;
        let desc =
            BdevDesc::open(Arc::new(bdev) as Arc<dyn Bdev>).map_err(|err| class("bdev", err))?;
        let (store, report) = Blobstore::load(desc, &LoadOptions::default())
            .await
            .map_err(|err| format!("LOAD FAILED: {err}"))?;
        store
            .unload()
            .await
            .map_err(|err| format!("UNLOAD FAILED: {err}"))?;
        Ok::<_, String>(report.unreadable.len())
    });
    match loaded {
        Ok(Ok(unreadable)) => format!(
            "{} ({}), loads, unreadable={}",
            if repaired.left_dirty {
                "left dirty"
            } else {
                "repaired"
            },
            kinds.join(","),
            unreadable.min(2)
        ),
        Ok(Err(err)) if err.starts_with("LOAD") || err.starts_with("UNLOAD") => {
            panic!(
                "the repaired store does not load: {err} (changes: {:?})",
                repaired.changes
            )
        }
        Ok(Err(err)) => err,
        Err(trouble) => panic!("{trouble}"),
    }
}
