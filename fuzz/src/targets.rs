//! The fuzz targets: each takes raw bytes, runs one parser of on-disk bytes on them, checks
//! the invariants that must hold whatever the bytes, and returns a short *outcome class*
//! (the error kind, or what an accepted input looked like) that the driver uses as cheap
//! feedback. A target panics only when the code under test breaks a promise: a panic or
//! out-of-bounds access inside the parser, or a violated invariant asserted here.
//!
//! Input layouts (every byte string is valid: missing bytes read as zero):
//!
//! | target | knobs | payload |
//! |---|---|---|
//! | `super_block` | flags u8 (bit 0 reseal CRC, bit 1 fix signature and version, bit 2 device = the block's own `size`), device_bytes u64, block-size selector u8 (512 << n%4) | page 0 bytes (any length) |
//! | `mask` | kind u8 (n%3; bit 7: expect the header's own length), expected_bits u32 | the mask region (any length) |
//! | `descriptors` | none | a descriptor area (any length; 4072 on disk) |
//! | `md_chain` | layout u8 (bits 0-1 chain pages - 1, bits 2-5 reseal page i, bit 6 the id is the first page's), id u64, total_clusters u32, md_len u32 | 1 to 4 pages of 4096 bytes: the chain, then extent pages |
//! | `extent_page` | flags u8 (bit 0 thin, bit 1 reseal), clusters u16 (n%2049), index selector u8, total_clusters u32 | one 4096-byte page |
//! | `store_load` | see [`crate::store`] | patches to a base image |

use std::fmt::Display;

use spool_blob::bitmap::BitSet;
use spool_blob::format::descriptor::{self, Descriptor, DescriptorWriter, Flags, DESC_HEADER_LEN};
use spool_blob::format::mask::{decode_mask, encode_mask, mask_pages, MaskKind};
use spool_blob::format::md_page::{encode_page, DESC_AREA_LEN};
use spool_blob::format::super_block::{bstype_name, SuperBlock, SIGNATURE};
use spool_blob::format::{seal_page, EXTENTS_PER_PAGE, INVALID_MD_PAGE, PAGE_SIZE};
use spool_blob::meta::{
    apply_extent_page, encode_extent_page, parse_chain, serialize_chain, BlobMeta, ClusterCheck,
};
use spool_blob::ExtentForm;

use crate::input::{exact, Input};

/// Bytes of knobs in front of a `super_block` input.
pub const SUPER_BLOCK_KNOBS: usize = 10;
/// Bytes of knobs in front of a `mask` input.
pub const MASK_KNOBS: usize = 5;
/// Bytes of knobs in front of an `md_chain` input.
pub const MD_CHAIN_KNOBS: usize = 17;
/// Bytes of knobs in front of an `extent_page` input.
pub const EXTENT_PAGE_KNOBS: usize = 8;
/// Blobs with more clusters than this are parsed but not re-checked or round-tripped (their
/// cluster map alone would take most of the time).
pub const FULL_CHECK_CLUSTERS: usize = 1 << 20;
/// Most pages an `md_chain` input holds.
pub const MD_CHAIN_MAX_PAGES: usize = 4;

/// An outcome class: `prefix: message` with every token that holds a digit replaced by `#`
/// and every quoted string by `"_"`, so that errors differing only in numbers or in the
/// bytes they quote (a signature, a bstype, an xattr name) fall in one class.
pub fn class(prefix: &str, message: impl Display) -> String {
    let text = message.to_string();
    let mut out = String::with_capacity(prefix.len() + 2 + text.len());
    out.push_str(prefix);
    out.push_str(": ");
    let mut token = String::new();
    let flush = |token: &mut String, out: &mut String| {
        if token.chars().any(|c| c.is_ascii_digit()) {
            out.push('#');
        } else {
            out.push_str(token);
        }
        token.clear();
    };
    let mut quoted = false;
    let mut escaped = false;
    for c in text.chars() {
        if quoted {
            match (escaped, c) {
                (false, '\\') => escaped = true,
                (false, '"') => {
                    quoted = false;
                    out.push_str("_\"");
                }
                _ => escaped = false,
            }
        } else if c.is_ascii_alphanumeric() {
            token.push(c);
        } else {
            flush(&mut token, &mut out);
            out.push(c);
            quoted = c == '"';
        }
    }
    flush(&mut token, &mut out);
    if quoted {
        out.push_str("_\"");
    }
    out
}

// ---------------------------------------------------------------------------------------------
// super block
// ---------------------------------------------------------------------------------------------

/// `SuperBlock::decode` then `check_geometry`. Never panics unless a promise is broken.
pub fn target_super_block(data: &[u8]) {
    let _ = super_block(data);
}

/// [`target_super_block`], returning the outcome class.
pub fn super_block(data: &[u8]) -> String {
    let mut input = Input::new(data);
    let flags = input.u8();
    let device_bytes = input.u64();
    let block_size = 512u32 << (input.u8() % 4);
    let mut page = input.rest().to_vec();
    if flags & 2 != 0 && page.len() >= 12 {
        page[..8].copy_from_slice(SIGNATURE);
        let version = u32::from_le_bytes([page[8], page[9], page[10], page[11]]) % 3 + 1;
        page[8..12].copy_from_slice(&version.to_le_bytes());
    }
    if flags & 1 != 0 && page.len() >= PAGE_SIZE {
        seal_page(&mut page);
    }
    let block = match SuperBlock::decode(&page) {
        Ok(block) => block,
        Err(err) => return class("decode", err),
    };
    let encoded = block.encode();
    assert_eq!(
        SuperBlock::decode(&encoded).as_ref(),
        Ok(&block),
        "decode(encode(block)) differs from the block"
    );
    assert_eq!(
        encoded[..12],
        page[..12],
        "encode changed signature/version"
    );
    assert_eq!(encoded[16..92], page[16..92], "encode changed a field");
    let _ = (block.masks_trusted(), bstype_name(&block.bstype));
    let device = if flags & 4 != 0 && block.size != 0 {
        block.size
    } else {
        device_bytes
    };
    if let Err(err) = block.check_geometry(device, block_size) {
        return class("geometry", err);
    }
    // What check_geometry promises the loader.
    let size = block.effective_size(device);
    assert!(size <= device, "store larger than the device");
    assert!(
        block.cluster_size != 0 && block.cluster_size % 4096 == 0,
        "cluster size {} accepted",
        block.cluster_size
    );
    let io_unit = block.effective_io_unit();
    assert!(
        io_unit.is_power_of_two() && (512..=4096).contains(&io_unit) && io_unit >= block_size,
        "io_unit {io_unit} accepted with block size {block_size}"
    );
    let total = block.total_clusters(device);
    assert!(
        total >= 1 && total <= u64::from(u32::MAX),
        "{total} clusters accepted"
    );
    let pages = size / PAGE_SIZE as u64;
    for (name, start, len) in [
        (
            "used_page_mask",
            block.used_page_mask_start,
            block.used_page_mask_len,
        ),
        (
            "used_cluster_mask",
            block.used_cluster_mask_start,
            block.used_cluster_mask_len,
        ),
        (
            "used_blobid_mask",
            block.used_blobid_mask_start,
            block.used_blobid_mask_len,
        ),
        ("md", block.md_start, block.md_len),
    ] {
        assert!(
            u64::from(start) + u64::from(len) <= pages,
            "{name} region {start}+{len} past the store's {pages} pages accepted"
        );
        assert!(
            len == 0 || start != 0,
            "{name} region over the super block accepted"
        );
    }
    assert!(block.md_start != 0 && block.md_len != 0, "empty md region");
    "geometry ok".into()
}

// ---------------------------------------------------------------------------------------------
// masks
// ---------------------------------------------------------------------------------------------

/// `decode_mask(kind, region, expected_bits)`, with the re-encoding round trip.
pub fn target_mask(data: &[u8]) {
    let _ = mask(data);
}

/// The mask kind a selector byte names.
pub fn mask_kind(selector: u8) -> MaskKind {
    match selector % 3 {
        0 => MaskKind::UsedPages,
        1 => MaskKind::UsedClusters,
        _ => MaskKind::UsedBlobIds,
    }
}

/// [`target_mask`], returning the outcome class.
pub fn mask(data: &[u8]) -> String {
    let mut input = Input::new(data);
    let selector = input.u8();
    let kind = mask_kind(selector & 0x7F);
    let mut expected = input.u32();
    let region = input.rest();
    if selector & 0x80 != 0 && region.len() >= 5 {
        expected = u32::from_le_bytes([region[1], region[2], region[3], region[4]]);
    }
    let bitmap = match decode_mask(kind, region, expected) {
        Ok(bitmap) => bitmap,
        Err(err) => return class("mask", err),
    };
    let bits = u64::from(expected);
    assert_eq!(
        bitmap.len() as u64,
        bits.div_ceil(8),
        "bitmap of {} bytes for {bits} bits",
        bitmap.len()
    );
    if bits % 8 != 0 {
        let last = bitmap[bitmap.len() - 1];
        assert_eq!(last >> (bits % 8), 0, "bits past the length are set");
    }
    let set = BitSet::from_bytes(bits, &bitmap);
    assert!(set.iter_set().all(|bit| bit < bits));
    assert_eq!(set.to_bytes(), bitmap, "BitSet round trip");
    let pages = mask_pages(bits);
    let pages = u32::try_from(pages).unwrap_or(u32::MAX);
    let region2 = encode_mask(kind, expected, &bitmap, pages);
    assert_eq!(
        decode_mask(kind, &region2, expected).as_deref(),
        Ok(&bitmap[..]),
        "encode/decode round trip"
    );
    format!("mask ok: {kind:?}, {} bits set", set.count_set().min(2))
}

// ---------------------------------------------------------------------------------------------
// descriptors
// ---------------------------------------------------------------------------------------------

/// A descriptor with every field copied out (which touches every byte the iterator hands
/// out: the pairs and words are iterated to the end).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnedDescriptor {
    /// Run-length extents.
    ExtentRle(Vec<(u32, u32)>),
    /// An xattr: internal, name, value.
    Xattr(bool, Vec<u8>, Vec<u8>),
    /// The flag words.
    Flags(Flags),
    /// Extent table: clusters, entries.
    ExtentTable(u64, Vec<(u32, u32)>),
    /// Extent page: start cluster, clusters.
    ExtentPage(u32, Vec<u32>),
    /// Unknown type and length.
    Unknown(u8, u32),
}

impl OwnedDescriptor {
    /// Copies every field of `descriptor`, checking `len()`/`is_empty()` against the items.
    pub fn of(descriptor: &Descriptor<'_>) -> OwnedDescriptor {
        match descriptor {
            Descriptor::ExtentRle(runs) => {
                let list: Vec<(u32, u32)> = runs.iter().collect();
                assert_eq!(list.len(), runs.len(), "Pairs::len disagrees with iter");
                assert_eq!(list.is_empty(), runs.is_empty());
                OwnedDescriptor::ExtentRle(list)
            }
            Descriptor::Xattr {
                internal,
                name,
                value,
            } => OwnedDescriptor::Xattr(*internal, name.to_vec(), value.to_vec()),
            Descriptor::Flags(flags) => OwnedDescriptor::Flags(*flags),
            Descriptor::ExtentTable {
                num_clusters,
                entries,
            } => {
                let list: Vec<(u32, u32)> = entries.iter().collect();
                assert_eq!(list.len(), entries.len(), "Pairs::len disagrees with iter");
                assert_eq!(list.is_empty(), entries.is_empty());
                OwnedDescriptor::ExtentTable(*num_clusters, list)
            }
            Descriptor::ExtentPage {
                start_cluster,
                clusters,
            } => {
                let list: Vec<u32> = clusters.iter().collect();
                assert_eq!(list.len(), clusters.len(), "Words::len disagrees with iter");
                assert_eq!(list.is_empty(), clusters.is_empty());
                OwnedDescriptor::ExtentPage(*start_cluster, list)
            }
            Descriptor::Unknown { kind, len } => OwnedDescriptor::Unknown(*kind, *len),
        }
    }

    /// Bytes of the descriptor's body on disk.
    pub fn body_len(&self) -> usize {
        match self {
            OwnedDescriptor::ExtentRle(runs) => runs.len() * 8,
            OwnedDescriptor::Xattr(_, name, value) => 4 + name.len() + value.len(),
            OwnedDescriptor::Flags(_) => 24,
            OwnedDescriptor::ExtentTable(_, entries) => 8 + entries.len() * 8,
            OwnedDescriptor::ExtentPage(_, clusters) => 4 + clusters.len() * 4,
            OwnedDescriptor::Unknown(_, len) => *len as usize,
        }
    }

    /// Appends it to `writer`; false if it does not fit whole (or is unknown).
    pub fn write(&self, writer: &mut DescriptorWriter) -> bool {
        match self {
            OwnedDescriptor::ExtentRle(runs) => writer.extent_rle(runs) == runs.len(),
            OwnedDescriptor::Xattr(internal, name, value) => writer.xattr(*internal, name, value),
            OwnedDescriptor::Flags(flags) => writer.flags(*flags),
            OwnedDescriptor::ExtentTable(clusters, entries) => {
                writer.extent_table(*clusters, entries) == Some(entries.len())
            }
            OwnedDescriptor::ExtentPage(start, clusters) => writer.extent_page(*start, clusters),
            OwnedDescriptor::Unknown(..) => false,
        }
    }
}

/// Walks `area` to the end: every descriptor, and the error that stops the walk.
pub fn walk_area(area: &[u8]) -> (Vec<OwnedDescriptor>, Option<descriptor::DescriptorError>) {
    let mut walk = descriptor::descriptors(area);
    let mut found = Vec::new();
    let mut error = None;
    let limit = area.len() / DESC_HEADER_LEN + 1;
    for item in walk.by_ref() {
        match item {
            Ok(descriptor) => found.push(OwnedDescriptor::of(&descriptor)),
            Err(err) => {
                assert!(error.is_none(), "the walk went on after an error: {err}");
                error = Some(err);
            }
        }
        assert!(
            found.len() <= limit,
            "more descriptors than the area has headers"
        );
    }
    assert!(walk.next().is_none(), "the walk resumed after its end");
    (found, error)
}

/// Iterates every descriptor of the area (and every pair and word of each), then re-encodes
/// the known ones and checks they decode to the same list.
pub fn target_descriptors(data: &[u8]) {
    let _ = descriptors(data);
}

/// [`target_descriptors`], returning the outcome class.
pub fn descriptors(data: &[u8]) -> String {
    let (found, error) = walk_area(data);
    let used: usize = found.iter().map(|d| DESC_HEADER_LEN + d.body_len()).sum();
    assert!(
        used <= data.len(),
        "descriptors of {used} bytes in an area of {}",
        data.len()
    );
    let known: Vec<OwnedDescriptor> = found
        .iter()
        .filter(|d| !matches!(d, OwnedDescriptor::Unknown(..)))
        .cloned()
        .collect();
    let mut writer = DescriptorWriter::default();
    if known.iter().all(|d| d.write(&mut writer)) {
        let area = exact(writer.bytes(), DESC_AREA_LEN);
        let (again, again_error) = walk_area(&area);
        assert!(
            again_error.is_none(),
            "re-encoded descriptors fail to decode: {again_error:?}"
        );
        assert_eq!(again, known, "re-encoded descriptors decode differently");
    }
    // Which kinds were seen (a set, so that the classes stay few).
    let kinds: std::collections::BTreeSet<char> = found
        .iter()
        .map(|d| match d {
            OwnedDescriptor::Flags(_) => 'f',
            OwnedDescriptor::ExtentPage(..) => 'p',
            OwnedDescriptor::ExtentRle(_) => 'r',
            OwnedDescriptor::ExtentTable(..) => 't',
            OwnedDescriptor::Unknown(..) => 'u',
            OwnedDescriptor::Xattr(false, ..) => 'x',
            OwnedDescriptor::Xattr(true, ..) => 'y',
        })
        .collect();
    let kinds: String = kinds.into_iter().collect();
    match error {
        Some(err) => class(&format!("descriptors {kinds}"), err),
        None => format!("descriptors {kinds}"),
    }
}

// ---------------------------------------------------------------------------------------------
// metadata chains and extent pages
// ---------------------------------------------------------------------------------------------

/// A [`ClusterCheck`] from two limits, as the loader's range check.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Clusters of the store: a cluster is fine below this (and not 0).
    pub total_clusters: u32,
    /// Md pages of the store: a page is fine below this.
    pub md_len: u32,
}

impl ClusterCheck for Limits {
    fn cluster_ok(&self, cluster: u32) -> bool {
        cluster != 0 && cluster < self.total_clusters
    }
    fn md_page_ok(&self, page: u32) -> bool {
        page < self.md_len
    }
}

/// `parse_chain` over 1-4 pages, `apply_extent_page` for each extent page it asks for (from
/// the input's remaining pages), and the `serialize_chain` round trip for what parses.
pub fn target_md_chain(data: &[u8]) {
    let _ = md_chain(data);
}

/// [`target_md_chain`], returning the outcome class.
pub fn md_chain(data: &[u8]) -> String {
    let mut input = Input::new(data);
    let layout = input.u8();
    let mut id = input.u64();
    let limits = Limits {
        total_clusters: input.u32(),
        md_len: input.u32(),
    };
    let payload = input.rest();
    let count = payload
        .len()
        .div_ceil(PAGE_SIZE)
        .clamp(1, MD_CHAIN_MAX_PAGES);
    let mut pages: Vec<Vec<u8>> = (0..count)
        .map(|i| exact(payload.get(i * PAGE_SIZE..).unwrap_or(&[]), PAGE_SIZE))
        .collect();
    for (i, page) in pages.iter_mut().enumerate() {
        if layout & (4 << i) != 0 {
            seal_page(page);
        }
    }
    let chain_len = (usize::from(layout & 3) + 1).min(count);
    if layout & 0x40 != 0 {
        id = u64::from_le_bytes(exact(&pages[0][..8], 8).try_into().unwrap_or([0; 8]));
    }
    let (chain, extents) = pages.split_at(chain_len);
    let refs: Vec<&[u8]> = chain.iter().map(Vec::as_slice).collect();
    let mut parsed = match parse_chain(id, &refs, &limits) {
        Ok(parsed) => parsed,
        Err(err) => return class("chain", err),
    };
    if parsed.meta.clusters.len() > FULL_CHECK_CLUSTERS {
        // Legal (up to MAX_BLOB_CLUSTERS) but a cluster map of up to 1 GiB: re-checking and
        // round-tripping it would take most of the fuzzing time.
        return format!("chain ok: {:?}, large", parsed.meta.form);
    }
    check_meta_shape(&parsed.meta, &limits);
    let pending = parsed.pending_extent_pages.clone();
    if !pending.is_empty() {
        if extents.is_empty() {
            return format!("chain ok: {:?}, extent pages missing", parsed.meta.form);
        }
        for (k, &(index, page)) in pending.iter().enumerate() {
            assert!(
                index < parsed.meta.extent_pages_needed(),
                "pending extent page {index} past the blob's end"
            );
            assert!(
                limits.md_page_ok(page),
                "pending extent page at md page {page} outside the md region"
            );
            let bytes = &extents[k % extents.len()];
            if let Err(err) = apply_extent_page(&mut parsed.meta, index, bytes, &limits) {
                return class("extent page", err);
            }
        }
        check_meta_shape(&parsed.meta, &limits);
    }
    round_trip(&parsed.meta, &limits);
    format!(
        "chain ok: {:?} thin={} extents={} xattrs={}",
        parsed.meta.form,
        parsed.meta.is_thin(),
        pending.len().min(2),
        (parsed.meta.xattrs.len() + parsed.meta.internal_xattrs.len()).min(2)
    )
}

/// What every parsed blob must look like.
fn check_meta_shape(meta: &BlobMeta, limits: &Limits) {
    for &cluster in &meta.clusters {
        assert!(
            cluster == 0 || limits.cluster_ok(cluster),
            "cluster {cluster} accepted outside the store"
        );
    }
    if meta.form == ExtentForm::Table {
        assert!(
            meta.extent_pages.len() >= meta.extent_pages_needed(),
            "{} extent pages for {} clusters",
            meta.extent_pages.len(),
            meta.clusters.len()
        );
    }
}

/// Any meta that parses must serialise and re-parse to the same value.
fn round_trip(meta: &BlobMeta, limits: &Limits) {
    let areas = match serialize_chain(meta) {
        Ok(areas) => areas,
        Err(err) => panic!("a parsed blob does not serialise: {err}"),
    };
    let pages: Vec<Vec<u8>> = areas
        .iter()
        .enumerate()
        .map(|(i, area)| {
            assert!(area.bytes().len() <= DESC_AREA_LEN);
            let next = if i + 1 < areas.len() {
                i as u32 + 1
            } else {
                INVALID_MD_PAGE
            };
            encode_page(meta.id, i as u32, next, area.bytes())
        })
        .collect();
    let refs: Vec<&[u8]> = pages.iter().map(Vec::as_slice).collect();
    let mut parsed = match parse_chain(meta.id, &refs, limits) {
        Ok(parsed) => parsed,
        Err(err) => panic!("a serialised blob does not parse: {err}\nmeta: {meta:?}"),
    };
    for &(index, _) in &parsed.pending_extent_pages.clone() {
        let page = encode_extent_page(meta, index);
        if let Err(err) = apply_extent_page(&mut parsed.meta, index, &page, limits) {
            panic!("a re-encoded extent page {index} does not apply: {err}\nmeta: {meta:?}");
        }
    }
    assert_eq!(
        &parsed.meta, meta,
        "serialize_chain round trip changed the blob"
    );
}

/// `apply_extent_page` on a blob of up to 2048 clusters at any valid extent-page index.
pub fn target_extent_page(data: &[u8]) {
    let _ = extent_page(data);
}

/// [`target_extent_page`], returning the outcome class.
pub fn extent_page(data: &[u8]) -> String {
    let mut input = Input::new(data);
    let flags = input.u8();
    let clusters = usize::from(input.u16()) % (4 * EXTENTS_PER_PAGE as usize + 1);
    let selector = usize::from(input.u8());
    let limits = Limits {
        total_clusters: input.u32(),
        md_len: u32::MAX,
    };
    let mut page = exact(input.rest(), PAGE_SIZE);
    if flags & 2 != 0 {
        seal_page(&mut page);
    }
    let mut meta = BlobMeta::new(0x1_0000_0000, flags & 1 != 0, ExtentForm::Table);
    // As parse_chain leaves a table-form blob: every cluster unknown until its extent page.
    meta.clusters = vec![0; clusters];
    meta.extent_pages = vec![1; meta.extent_pages_needed()];
    let index = selector % meta.extent_pages_needed().max(1);
    let before = meta.clone();
    if let Err(err) = apply_extent_page(&mut meta, index, &page, &limits) {
        return class("extent page", err);
    }
    assert_eq!(
        meta.clusters.len(),
        before.clusters.len(),
        "blob size changed"
    );
    let start = index * EXTENTS_PER_PAGE as usize;
    let end = (start + EXTENTS_PER_PAGE as usize).min(meta.clusters.len());
    for (i, (&now, &was)) in meta.clusters.iter().zip(&before.clusters).enumerate() {
        if (start..end).contains(&i) {
            assert!(
                now == 0 || limits.cluster_ok(now),
                "cluster {now} accepted outside the store"
            );
            assert!(
                now != 0 || meta.is_thin(),
                "an unallocated cluster accepted in a thick blob"
            );
        } else {
            assert_eq!(now, was, "cluster {i} outside the extent page changed");
        }
    }
    format!("extent page ok: thin={}", meta.is_thin())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_hide_numbers() {
        assert_eq!(
            class("x", "blob 0x100000001: page 12 of 4072 bytes"),
            "x: blob #: page # of # bytes"
        );
        assert_eq!(
            class("x", r#"signature is "S\"P 12", not "SPDKBLOB""#),
            r#"x: signature is "_", not "_""#
        );
    }

    #[test]
    fn empty_inputs_are_handled() {
        for run in [super_block, mask, descriptors, md_chain, extent_page] {
            let _ = run(&[]);
            let _ = run(&[0xFF; 64]);
        }
    }
}
