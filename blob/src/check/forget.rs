//! Deleting a damaged blob offline: what `spool delete` does with a blob whose metadata does
//! not parse (one `spool check --repair` kept), once the operator decides to give it up.
//!
//! The blob's root page is zeroed, then the store is checked and repaired again: the masks
//! are rebuilt and the pages of its chain and its extent pages, and the clusters only it
//! named, are freed with it, and its blob id. Before the zeroing:
//! - on a clean store (masks trusted), its bit in the blob-id mask is cleared and the store
//!   stays clean: a cut leaves a clean store whose loads no longer list it (its pages and
//!   clusters still marked: a leak, never a loss), and the second check still trusts the
//!   masks, so what they keep for the store's other damaged blobs stays kept (writing the
//!   store dirty instead made the second check forget them, and the next load freed a
//!   damaged blob's clusters the operator had not deleted);
//! - on a dirty store, the super block is written dirty again (every load replays, and the
//!   replay no longer finds the blob).
//!
//! Refused (nothing written) when the blob is not damaged (a normal delete handles it), is
//! the store's super blob, or is the parent of a readable clone (as SPDK refuses to delete a
//! snapshot with clones).

use super::image::{Image, ImageIo};
use super::repair::{repair_image, RepairReport};
use super::{check_image, CheckError};
use crate::format::mask::MASK_HEADER_LEN;
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
    let ids_trusted = checked
        .disk
        .as_ref()
        .is_some_and(|disk| disk.blobids.is_some());
    if shape.masks_trusted && ids_trusted {
        clear_mask_bit(
            &image,
            shape.block.used_blobid_mask_start,
            u64::from(record.root()),
        )?;
    } else {
        let mut dirty = shape.block.clone();
        dirty.clean = 0;
        image.write_pages(0, &dirty.encode())?;
    }
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

/// Clears bit `bit` of the mask region starting at device page `start` (header of
/// [`MASK_HEADER_LEN`] bytes, then the bits, least significant first).
fn clear_mask_bit(image: &Image<'_>, start: u32, bit: u64) -> Result<(), CheckError> {
    let byte = MASK_HEADER_LEN as u64 + bit / 8;
    let page = u64::from(start) + byte / PAGE_SIZE as u64;
    let mut bytes = image.read_pages(page, 1)?;
    bytes[(byte % PAGE_SIZE as u64) as usize] &= !(1u8 << (bit % 8));
    image.write_pages(page, &bytes)
}
