//! Deleting a damaged blob offline: what `spool delete` does with a blob whose metadata does
//! not parse (one `spool check --repair` kept), once the operator decides to give it up.
//!
//! The blob's root page is zeroed (the super block written dirty first, so a cut leaves a
//! store every load replays, and the replay no longer finds the blob), then the repair
//! rebuilds the masks: the pages of its chain and its extent pages, and the clusters only
//! it named, are freed with it, and its blob id. Refused (nothing written) when the blob is
//! not damaged (a normal delete handles it), is the store's super blob, or is the parent of
//! a readable clone (as SPDK refuses to delete a snapshot with clones).

use super::image::{Image, ImageIo};
use super::repair::{repair_image, RepairReport};
use super::{check_image, CheckError};
use crate::format::PAGE_SIZE;
use crate::meta::XATTR_SNAPSHOT;

/// Deletes damaged blob `id` from the store in `file` and repairs the store (see the module
/// doc); returns the repair's report. The caller holds the image exclusively.
pub fn forget_damaged_blob(file: &dyn ImageIo, id: u64) -> Result<RepairReport, CheckError> {
    let checked = check_image(file, &mut |_| {})?;
    let Some(shape) = &checked.shape else {
        return Err(CheckError::Unrepairable(
            "the super block's geometry is unusable, so the metadata cannot be located".into(),
        ));
    };
    let Some(record) = checked.records.iter().find(|r| r.id == id) else {
        return Err(CheckError::NoSuchBlob(id));
    };
    if record.damage.is_none() {
        return Err(CheckError::NotDamaged(id));
    }
    if shape.block.super_blob == id {
        return Err(CheckError::Unrepairable(format!(
            "blob {id:#x} is the store's super blob (an lvol store's name and uuid): deleting it would unmake the store"
        )));
    }
    let clones: Vec<u64> = checked
        .records
        .iter()
        .filter(|r| {
            r.meta
                .as_ref()
                .and_then(|m| m.xattr(true, XATTR_SNAPSHOT.as_bytes()))
                .is_some_and(|parent| parent == id.to_le_bytes())
        })
        .map(|r| r.id)
        .collect();
    if !clones.is_empty() {
        let named: Vec<String> = clones.iter().map(|c| format!("{c:#x}")).collect();
        return Err(CheckError::Unrepairable(format!(
            "blob {id:#x} is the parent of {} (they read through it): delete or inflate them first",
            named.join(", ")
        )));
    }
    let image = Image::new(file)?;
    let mut dirty = shape.block.clone();
    dirty.clean = 0;
    image.write_pages(0, &dirty.encode())?;
    image.sync()?;
    image.write_pages(shape.md_device_page(record.root()), &[0u8; PAGE_SIZE])?;
    image.sync()?;
    let again = check_image(file, &mut |_| {})?;
    let mut report = repair_image(file, &again)?;
    report.changes.insert(
        0,
        format!(
            "blob {id:#x}: damaged ({}): deleted; its md pages and the clusters only it named are freed",
            record.damage.as_deref().unwrap_or_default()
        ),
    );
    Ok(report)
}
