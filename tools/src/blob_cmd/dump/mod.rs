//! `spool dump IMAGE [--json]`: every metadata page with a non-zero id decoded, with its
//! CRC checked, plus the super block and the three masks (SPDK's `blobcli -D`).
//!
//! A diagnostic: it reads the image's raw bytes (never loading the store, never writing) and
//! decodes with `spool_blob::format`, so it works on stores that do not load. A super block
//! with a bad CRC is still decoded (and flagged); only an image with no super block at all
//! (too small, wrong signature or version) is an error. What looks wrong is listed under
//! `problems`.
//!
//! - this module: the report ([`DumpReport`]) and how it is collected.
//! - `pages`: one md page's descriptors.
//! - `render`: the text form.

mod pages;
mod render;

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;

use serde::Serialize;
use spool_blob::format::layout::md_clusters;
use spool_blob::format::mask::{decode_mask, MaskKind};
use spool_blob::format::super_block::{bstype_name, SuperBlock, SuperBlockError};
use spool_blob::format::{seal_page, stored_crc, BLOBID_INVALID, PAGE_SIZE, PAGE_SIZE_U64};

use crate::blob_cmd::args::DumpArgs;
use crate::blob_cmd::store_cmds::to_json;
use crate::blob_cmd::text::{emit, hex};
use crate::error::ToolError;

pub use pages::{DescriptorDump, PageDump};

/// Md pages read per request.
const BATCH_PAGES: u64 = 256;

/// The super block's fields as on disk.
#[derive(Debug, Clone, Serialize)]
pub struct SuperDump {
    /// The first 8 bytes ("SPDKBLOB").
    pub signature: String,
    /// Format version.
    pub version: u32,
    /// The `length` field (4096).
    pub length: u32,
    /// The stored CRC, as hex.
    pub crc: String,
    /// Whether the stored CRC matches the page.
    pub crc_ok: bool,
    /// The clean flag.
    pub clean: u32,
    /// The super blob's id, if set.
    pub super_blob: Option<u64>,
    /// Bytes per cluster.
    pub cluster_size: u32,
    /// Used-md-pages mask: first page and pages.
    pub used_page_mask_start: u32,
    /// Used-md-pages mask pages.
    pub used_page_mask_len: u32,
    /// Used-clusters mask: first page.
    pub used_cluster_mask_start: u32,
    /// Used-clusters mask pages.
    pub used_cluster_mask_len: u32,
    /// Used-blob-ids mask: first page.
    pub used_blobid_mask_start: u32,
    /// Used-blob-ids mask pages (0 before format version 3).
    pub used_blobid_mask_len: u32,
    /// First md page.
    pub md_start: u32,
    /// Md pages.
    pub md_len: u32,
    /// Type tag as text (up to the first NUL).
    pub bstype: String,
    /// Type tag as hex (all 16 bytes).
    pub bstype_hex: String,
    /// The `size` field (0: the device's size).
    pub size: u64,
    /// The `io_unit_size` field (0: 4096).
    pub io_unit_size: u32,
    /// Clusters of the store (size / cluster_size).
    pub total_clusters: u64,
    /// Clusters the super block, masks and md region take.
    pub md_clusters: u64,
}

/// One mask region, decoded.
#[derive(Debug, Clone, Serialize)]
pub struct MaskDump {
    /// "used_md_pages", "used_clusters" or "used_blobids".
    pub mask: &'static str,
    /// First page of the region.
    pub start: u32,
    /// Pages of the region.
    pub pages: u32,
    /// Bits the store's geometry says the mask has.
    pub bits: u64,
    /// Bits set (when it decoded).
    pub set_count: Option<u64>,
    /// Runs of set bits, `[first, last]` inclusive (when it decoded).
    pub set_ranges: Option<Vec<[u64; 2]>>,
    /// Why it did not decode (or "absent" for a store without that mask).
    pub error: Option<String>,
    /// The bitmap (LSB first), for membership checks (not printed).
    #[serde(skip)]
    pub bitmap: Option<Vec<u8>>,
}

/// Whether bit `index` of an LSB-first `bitmap` is set (false past its end).
fn bit(bitmap: &[u8], index: u64) -> bool {
    usize::try_from(index / 8)
        .ok()
        .and_then(|at| bitmap.get(at))
        .is_some_and(|byte| byte & (1 << (index % 8)) != 0)
}

impl MaskDump {
    /// Whether bit `index` is set (`None` when the mask did not decode).
    pub fn get(&self, index: u64) -> Option<bool> {
        Some(bit(self.bitmap.as_ref()?, index))
    }
}

/// Everything `dump` found.
#[derive(Debug, Clone, Serialize)]
pub struct DumpReport {
    /// The image path as given.
    pub image: String,
    /// Bytes of the image.
    pub image_bytes: u64,
    /// Page 0.
    pub super_block: SuperDump,
    /// The three masks.
    pub masks: Vec<MaskDump>,
    /// Every md page with a non-zero id, in page order.
    pub pages: Vec<PageDump>,
    /// What looks wrong, one line each (empty for a healthy store).
    pub problems: Vec<String>,
}

fn failed(image: &str, what: impl std::fmt::Display) -> ToolError {
    ToolError::Failed(format!("{image}: {what}"))
}

/// An error that names the image already (or should), in words.
fn failed_in_words(image: &str, err: impl std::fmt::Display) -> ToolError {
    let message = spool_engine::words::scrub(&err.to_string());
    if message.starts_with(image) {
        ToolError::Failed(message)
    } else {
        failed(image, message)
    }
}

/// Reads `len` bytes at `offset`, or says why not (past the end, I/O error).
fn read_at(file: &File, image_bytes: u64, offset: u64, len: u64) -> Result<Vec<u8>, String> {
    let end = offset.checked_add(len).ok_or("offset overflows")?;
    if end > image_bytes {
        return Err(format!(
            "bytes {offset}..{end} reach past the end of the image ({image_bytes} bytes)"
        ));
    }
    let mut buf = vec![0u8; usize::try_from(len).map_err(|_| "too large to read")?];
    file.read_exact_at(&mut buf, offset)
        .map_err(|err| spool_engine::words::failure(&format!("read at byte {offset}"), &err))?;
    Ok(buf)
}

fn super_dump(page: &[u8], block: &SuperBlock, crc_ok: bool, image_bytes: u64) -> SuperDump {
    let u32_at =
        |at: usize| u32::from_le_bytes([page[at], page[at + 1], page[at + 2], page[at + 3]]);
    SuperDump {
        signature: String::from_utf8_lossy(&page[..8]).into_owned(),
        version: block.version,
        length: u32_at(12),
        crc: format!("{:#010x}", stored_crc(page)),
        crc_ok,
        clean: block.clean,
        super_blob: (block.super_blob != BLOBID_INVALID).then_some(block.super_blob),
        cluster_size: block.cluster_size,
        used_page_mask_start: block.used_page_mask_start,
        used_page_mask_len: block.used_page_mask_len,
        used_cluster_mask_start: block.used_cluster_mask_start,
        used_cluster_mask_len: block.used_cluster_mask_len,
        used_blobid_mask_start: block.used_blobid_mask_start,
        used_blobid_mask_len: block.used_blobid_mask_len,
        md_start: block.md_start,
        md_len: block.md_len,
        bstype: bstype_name(&block.bstype),
        bstype_hex: hex(&block.bstype),
        size: block.size,
        io_unit_size: block.io_unit_size,
        total_clusters: block.total_clusters(image_bytes),
        md_clusters: md_clusters(block.md_start, block.md_len, block.cluster_size),
    }
}

/// Decodes page 0: the block, and whether its CRC was right (a wrong one is repaired in a
/// copy so the fields can still be shown).
fn decode_super(image: &str, page: &[u8]) -> Result<(SuperBlock, bool), ToolError> {
    match SuperBlock::decode(page) {
        Ok(block) => Ok((block, true)),
        Err(SuperBlockError::Crc { .. }) => {
            let mut sealed = page.to_vec();
            seal_page(&mut sealed);
            let block = SuperBlock::decode(&sealed).map_err(|err| failed(image, err))?;
            Ok((block, false))
        }
        Err(err) => Err(crate::blob_cmd::not_a_store(image, &err.to_string())),
    }
}

fn set_ranges(bitmap: &[u8], bits: u64) -> Vec<[u64; 2]> {
    let mut ranges: Vec<[u64; 2]> = Vec::new();
    for index in (0..bits).filter(|&index| bit(bitmap, index)) {
        match ranges.last_mut() {
            Some(last) if last[1] + 1 == index => last[1] = index,
            _ => ranges.push([index, index]),
        }
    }
    ranges
}

fn mask_dump(
    file: &File,
    image_bytes: u64,
    (kind, mask, start, pages, bits): (MaskKind, &'static str, u32, u32, u64),
) -> MaskDump {
    let mut dump = MaskDump {
        mask,
        start,
        pages,
        bits,
        set_count: None,
        set_ranges: None,
        error: None,
        bitmap: None,
    };
    if pages == 0 {
        dump.error = Some("absent (a store from before format version 3)".into());
        return dump;
    }
    let decoded = u32::try_from(bits)
        .map_err(|_| format!("{bits} bits do not fit the 32-bit length field"))
        .and_then(|bits32| {
            let region = read_at(
                file,
                image_bytes,
                u64::from(start) * PAGE_SIZE_U64,
                u64::from(pages) * PAGE_SIZE_U64,
            )?;
            decode_mask(kind, &region, bits32).map_err(|err| err.to_string())
        });
    match decoded {
        Ok(bitmap) => {
            let ranges = set_ranges(&bitmap, bits);
            dump.set_count = Some(ranges.iter().map(|[first, last]| last - first + 1).sum());
            dump.set_ranges = Some(ranges);
            dump.bitmap = Some(bitmap);
        }
        Err(err) => dump.error = Some(err),
    }
    dump
}

/// Reads and decodes the whole metadata of `image`.
pub fn collect(image: &str) -> Result<DumpReport, ToolError> {
    spool_engine::offline::check_image_exists(std::path::Path::new(image))
        .map_err(|err| failed_in_words(image, err))?;
    let mut file = File::open(image)
        .map_err(|err| failed(image, spool_engine::words::failure("open", &err)))?;
    // Readers share the image; a command writing it makes this fail at once (-EBUSY) rather
    // than decode metadata halfway through a change.
    let _lock = spool_engine::ImageLock::shared(std::path::Path::new(image))?;
    let image_bytes = file
        .seek(SeekFrom::End(0))
        .map_err(|err| failed(image, err))?;
    if image_bytes < PAGE_SIZE_U64 {
        return Err(failed(
            image,
            format!("{image_bytes} bytes: too small to hold a super block (4096 bytes)"),
        ));
    }
    let page0 = read_at(&file, image_bytes, 0, PAGE_SIZE_U64).map_err(|err| failed(image, err))?;
    let (block, crc_ok) = decode_super(image, &page0)?;
    let super_block = super_dump(&page0, &block, crc_ok, image_bytes);
    let mut problems = Vec::new();
    if !crc_ok {
        problems.push(format!(
            "super block: CRC mismatch (stored {}, computed {:#010x})",
            super_block.crc,
            spool_blob::format::page_crc(&page0)
        ));
    }
    if let Err(err) = block.check_geometry(image_bytes, 512) {
        problems.push(err.to_string());
    }
    let md_bits = u64::from(block.md_len);
    let masks: Vec<MaskDump> = [
        (
            MaskKind::UsedPages,
            "used_md_pages",
            block.used_page_mask_start,
            block.used_page_mask_len,
            md_bits,
        ),
        (
            MaskKind::UsedClusters,
            "used_clusters",
            block.used_cluster_mask_start,
            block.used_cluster_mask_len,
            super_block.total_clusters,
        ),
        (
            MaskKind::UsedBlobIds,
            "used_blobids",
            block.used_blobid_mask_start,
            block.used_blobid_mask_len,
            md_bits,
        ),
    ]
    .into_iter()
    .map(|spec| mask_dump(&file, image_bytes, spec))
    .collect();
    for mask in &masks {
        if let (Some(err), true) = (&mask.error, mask.pages != 0) {
            problems.push(format!("{} mask: {err}", mask.mask));
        }
    }
    let pages = read_pages(image, &file, image_bytes, &block, &masks, &mut problems)?;
    Ok(DumpReport {
        image: image.to_string(),
        image_bytes,
        super_block,
        masks,
        pages,
        problems,
    })
}

/// Reads and decodes the md region a batch at a time. A stop signal (Ctrl-C, SIGTERM,
/// SIGHUP) ends it between two batches: a large store's md region (4 GiB for 4 TiB of 1 MiB
/// clusters) takes a while to read, and nothing was printed or written yet.
fn read_pages(
    image: &str,
    file: &File,
    image_bytes: u64,
    block: &SuperBlock,
    masks: &[MaskDump],
    problems: &mut Vec<String>,
) -> Result<Vec<PageDump>, ToolError> {
    let md_len = u64::from(block.md_len);
    let md_start = u64::from(block.md_start);
    let mut pages = Vec::new();
    let mut first = 0u64;
    while first < md_len {
        if let Some(signal) = spool_engine::signals::stop_requested() {
            return Err(ToolError::Interrupted {
                signal,
                done: format!(
                    "{first} of {md_len} md pages of {image} read (nothing was printed; the image was only read)"
                ),
                report: None,
            });
        }
        let count = BATCH_PAGES.min(md_len - first);
        let offset = (md_start + first) * PAGE_SIZE_U64;
        let available = image_bytes.saturating_sub(offset) / PAGE_SIZE_U64;
        let count = count.min(available);
        if count == 0 {
            problems.push(format!(
                "md region: md pages {first}..{md_len} lie past the end of the image"
            ));
            break;
        }
        let bytes = match read_at(file, image_bytes, offset, count * PAGE_SIZE_U64) {
            Ok(bytes) => bytes,
            Err(err) => {
                problems.push(format!("md pages {first}..{}: {err}", first + count));
                break;
            }
        };
        for (at, page) in bytes.chunks_exact(PAGE_SIZE).enumerate() {
            let index = first + at as u64;
            if let Some(dump) = PageDump::decode(index, page, masks) {
                problems.extend(dump.problems());
                pages.push(dump);
            } else if masks[0].get(index) == Some(true) {
                problems.push(format!(
                    "md page {index}: marked used in the md page mask but its id is 0"
                ));
            }
        }
        first += count;
    }
    Ok(pages)
}

/// `spool dump IMAGE [--json]`: exit 2 (after the whole dump) when it lists problems.
pub fn dump(args: &DumpArgs) -> Result<(), ToolError> {
    let report = collect(&args.image)?;
    if args.json {
        emit(&format!("{}\n", to_json(&report)?))?;
    } else {
        emit(&render::text(&report))?;
    }
    match report.problems.len() {
        0 => Ok(()),
        count => Err(ToolError::Problems(format!(
            "{}: {count} problem(s) found (listed under problems)",
            args.image
        ))),
    }
}
