//! A blob's metadata in memory, and its translation to and from metadata pages.
//!
//! Pure code: [`parse_chain`] turns the pages of a chain into a [`BlobMeta`] (plus the extent
//! pages it still has to read), [`apply_extent_page`] adds one extent page, and
//! [`serialize_chain`] / [`encode_extent_page`] produce page bodies. The store does the I/O.

use crate::error::{BlobError, Result};
use crate::format::descriptor::{
    descriptors, Descriptor, DescriptorWriter, Flags, DATA_RO_FLAGS_KNOWN, FLAG_EXTENT_TABLE,
    FLAG_INTERNAL_XATTR, FLAG_READ_ONLY, FLAG_THIN_PROV, INVALID_FLAGS_KNOWN, MD_RO_FLAGS_KNOWN,
};
use crate::format::md_page::{descriptor_area, encode_page, MdPageHeader, DESC_AREA_LEN};
use crate::format::{EXTENTS_PER_PAGE, INVALID_MD_PAGE};

/// Largest blob, in clusters, this build keeps a cluster map for (2^26: 64 TiB at 1 MiB
/// clusters, 256 TiB at the lvol store's 4 MiB). Larger metadata is refused instead of
/// exhausting memory.
pub const MAX_BLOB_CLUSTERS: u64 = 1 << 26;
/// Largest xattr name + value: what fits one descriptor in an otherwise empty page.
pub const MAX_XATTR_BYTES: usize = DESC_AREA_LEN - 5 - 4;
/// Internal xattr naming a clone's parent snapshot (8 bytes, little-endian id).
pub const XATTR_SNAPSHOT: &str = "SNAP";
/// Internal xattr marking a snapshot still being made (the original's id).
pub const XATTR_SNAPSHOT_PENDING: &str = "SNAPTMP";
/// Internal xattr marking a snapshot being merged into its only clone (the clone's id).
pub const XATTR_SNAPSHOT_REMOVING: &str = "SNAPRM";

/// How a blob records its clusters on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentForm {
    /// Run-length extents in the chain (SPDK before 20.01; `--rle`).
    Rle,
    /// An extent table in the chain pointing at extent pages of 512 clusters (the default).
    Table,
}

/// Everything a blob's metadata chain says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobMeta {
    /// The blob's id.
    pub id: u64,
    /// The raw flag words (unknown bits kept).
    pub flags: Flags,
    /// Public xattrs in order.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Internal xattrs in order.
    pub internal_xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Device cluster of each blob cluster; 0 = unallocated.
    pub clusters: Vec<u32>,
    /// Extent form.
    pub form: ExtentForm,
    /// With an extent table: the md page of each extent page, 0 = none yet.
    pub extent_pages: Vec<u32>,
}

impl BlobMeta {
    /// A new, empty blob.
    pub fn new(id: u64, thin: bool, form: ExtentForm) -> BlobMeta {
        let mut invalid = 0;
        if thin {
            invalid |= FLAG_THIN_PROV;
        }
        if form == ExtentForm::Table {
            invalid |= FLAG_EXTENT_TABLE;
        }
        BlobMeta {
            id,
            flags: Flags {
                invalid,
                data_ro: 0,
                md_ro: 0,
            },
            xattrs: Vec::new(),
            internal_xattrs: Vec::new(),
            clusters: Vec::new(),
            form,
            extent_pages: Vec::new(),
        }
    }

    /// Whether the blob is thin provisioned.
    pub fn is_thin(&self) -> bool {
        self.flags.invalid & FLAG_THIN_PROV != 0
    }

    /// Whether its data is read-only: the READ_ONLY bit or an unknown data_ro bit.
    pub fn data_ro(&self) -> bool {
        self.flags.data_ro & FLAG_READ_ONLY != 0 || self.flags.data_ro & !DATA_RO_FLAGS_KNOWN != 0
    }

    /// Whether its metadata is read-only: data read-only, or an unknown md_ro bit.
    pub fn md_ro(&self) -> bool {
        self.data_ro() || self.flags.md_ro & !MD_RO_FLAGS_KNOWN != 0
    }

    /// The value of xattr `name` (public or internal list).
    pub fn xattr(&self, internal: bool, name: &[u8]) -> Option<&[u8]> {
        let list = if internal {
            &self.internal_xattrs
        } else {
            &self.xattrs
        };
        list.iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_slice())
    }

    /// Sets xattr `name`, replacing a previous value; keeps INTERNAL_XATTR in step.
    pub fn set_xattr(&mut self, internal: bool, name: &[u8], value: &[u8]) -> Result<()> {
        if name.len() + value.len() > MAX_XATTR_BYTES {
            return Err(BlobError::InvalidArgument(format!(
                "xattr {:?}: name ({} bytes) + value ({} bytes) exceed the {MAX_XATTR_BYTES} bytes one metadata page holds",
                String::from_utf8_lossy(name),
                name.len(),
                value.len()
            )));
        }
        let list = if internal {
            &mut self.internal_xattrs
        } else {
            &mut self.xattrs
        };
        match list.iter_mut().find(|(key, _)| key == name) {
            Some(entry) => entry.1 = value.to_vec(),
            None => list.push((name.to_vec(), value.to_vec())),
        }
        if internal {
            self.flags.invalid |= FLAG_INTERNAL_XATTR;
        }
        Ok(())
    }

    /// Removes xattr `name`; returns whether it existed.
    pub fn remove_xattr(&mut self, internal: bool, name: &[u8]) -> bool {
        let list = if internal {
            &mut self.internal_xattrs
        } else {
            &mut self.xattrs
        };
        let before = list.len();
        list.retain(|(key, _)| key != name);
        let removed = list.len() != before;
        if internal && self.internal_xattrs.is_empty() {
            self.flags.invalid &= !FLAG_INTERNAL_XATTR;
        }
        removed
    }

    /// The parent snapshot named by the `SNAP` internal xattr.
    pub fn parent_id(&self) -> Result<Option<u64>> {
        match self.xattr(true, XATTR_SNAPSHOT.as_bytes()) {
            None => Ok(None),
            Some(value) => {
                let raw: [u8; 8] = value.try_into().map_err(|_| {
                    BlobError::corrupt(
                        self.id,
                        format!("SNAP xattr is {} bytes, not 8", value.len()),
                    )
                })?;
                Ok(Some(u64::from_le_bytes(raw)))
            }
        }
    }

    /// Number of extent pages needed for the current size.
    pub fn extent_pages_needed(&self) -> usize {
        self.clusters.len().div_ceil(EXTENTS_PER_PAGE as usize)
    }
}

/// The result of parsing a chain: the metadata (clusters still missing for an extent
/// table) and the extent pages to read, `(extent page number, md page)`.
#[derive(Debug)]
pub struct ParsedChain {
    /// The blob so far.
    pub meta: BlobMeta,
    /// Extent pages still to read and apply.
    pub pending_extent_pages: Vec<(usize, u32)>,
    /// The blob's size in clusters (its extent table's, or its runs' total), known whether
    /// or not the parse built the cluster map.
    pub num_clusters: u64,
}

/// How a parse checks cluster indexes.
pub trait ClusterCheck {
    /// Whether device cluster `cluster` may back a blob (in range and, on open, marked used).
    fn cluster_ok(&self, cluster: u32) -> bool;
    /// Whether md page `page` is inside the md region.
    fn md_page_ok(&self, page: u32) -> bool;
    /// Whether the parse builds the cluster map. A check that says no (a load's graph
    /// pass, which needs only the xattrs) gets each allocated run through
    /// [`ClusterCheck::cluster_run_ok`] instead, and the parsed blob's `clusters` stays
    /// empty: a run costs the same whatever its length.
    fn builds_map(&self) -> bool {
        true
    }
    /// Whether the allocated clusters `first..first + len` (`len > 0`, no overflow) may
    /// back a blob; only asked when [`ClusterCheck::builds_map`] is false.
    fn cluster_run_ok(&self, first: u32, len: u32) -> bool {
        (first..=first + (len - 1)).all(|cluster| self.cluster_ok(cluster))
    }
}

/// Parses the chain `pages` (root first, each 4096 bytes, already read in `next` order)
/// of blob `id`. Validates CRC, ids, sequence numbers and every descriptor.
pub fn parse_chain(id: u64, pages: &[&[u8]], check: &dyn ClusterCheck) -> Result<ParsedChain> {
    let headers: Vec<MdPageHeader> = pages
        .iter()
        .map(|page| MdPageHeader::decode(page))
        .collect();
    parse_decoded_chain(id, pages, &headers, check)
}

/// [`parse_chain`] with each page's header already decoded (`headers[i]` is
/// `MdPageHeader::decode(pages[i])`): a load that decoded them, CRC included, while scanning
/// does not check each CRC again.
pub(crate) fn parse_decoded_chain(
    id: u64,
    pages: &[&[u8]],
    headers: &[MdPageHeader],
    check: &dyn ClusterCheck,
) -> Result<ParsedChain> {
    debug_assert_eq!(pages.len(), headers.len());
    let Some(root) = headers.first() else {
        return Err(BlobError::corrupt(id, "empty chain"));
    };
    if root.id != id {
        return Err(BlobError::NoSuchBlob(id));
    }
    let mut meta = BlobMeta::new(id, false, ExtentForm::Rle);
    meta.flags = Flags::default();
    let mut saw_flags = false;
    let mut saw_rle = false;
    let mut table: Option<(u64, Vec<u32>)> = None;
    let mut rle_total: u64 = 0;
    // An unallocated run seen without building the map (`ClusterCheck::builds_map`).
    let mut saw_unallocated = false;
    for (sequence, (page, header)) in pages.iter().zip(headers).enumerate() {
        if !header.crc_ok {
            return Err(BlobError::corrupt(
                id,
                format!("md page {sequence} of the chain: CRC mismatch"),
            ));
        }
        if header.id != id {
            return Err(BlobError::corrupt(
                id,
                format!(
                    "md page {sequence} of the chain belongs to blob {:#x}",
                    header.id
                ),
            ));
        }
        if header.sequence as usize != sequence {
            return Err(BlobError::corrupt(
                id,
                format!(
                    "md page {sequence} of the chain has sequence number {}",
                    header.sequence
                ),
            ));
        }
        for descriptor in descriptors(descriptor_area(page)) {
            let descriptor = descriptor.map_err(|err| {
                BlobError::corrupt(id, format!("md page {sequence} of the chain: {err}"))
            })?;
            match descriptor {
                Descriptor::Flags(flags) => {
                    if flags.invalid & !INVALID_FLAGS_KNOWN != 0 {
                        return Err(BlobError::corrupt(
                            id,
                            format!(
                                "unknown invalid_flags bits {:#x} (written by a newer version or an external-snapshot clone)",
                                flags.invalid & !INVALID_FLAGS_KNOWN
                            ),
                        ));
                    }
                    meta.flags = flags;
                    saw_flags = true;
                }
                Descriptor::Xattr {
                    internal,
                    name,
                    value,
                } => {
                    let list = if internal {
                        &mut meta.internal_xattrs
                    } else {
                        &mut meta.xattrs
                    };
                    list.push((name.to_vec(), value.to_vec()));
                }
                Descriptor::ExtentRle(runs) => {
                    saw_rle = true;
                    let builds_map = check.builds_map();
                    for (cluster, len) in runs.iter() {
                        if cluster == 0 && saw_flags && meta.flags.invalid & FLAG_THIN_PROV == 0 {
                            return Err(BlobError::corrupt(
                                id,
                                "unallocated cluster in a thick blob",
                            ));
                        }
                        rle_total += u64::from(len);
                        if rle_total > MAX_BLOB_CLUSTERS {
                            return Err(BlobError::corrupt(
                                id,
                                format!("extents describe more than {MAX_BLOB_CLUSTERS} clusters"),
                            ));
                        }
                        if !builds_map {
                            if cluster == 0 {
                                saw_unallocated |= len != 0;
                            } else if len != 0 {
                                let last = cluster.checked_add(len - 1).ok_or_else(|| {
                                    BlobError::corrupt(id, "extent run overflows the cluster index")
                                })?;
                                if !check.cluster_run_ok(cluster, len) {
                                    return Err(BlobError::corrupt(
                                        id,
                                        format!("extent run of clusters {cluster}..={last} is outside the store or not allocated"),
                                    ));
                                }
                            }
                            continue;
                        }
                        for step in 0..len {
                            let device = if cluster == 0 {
                                0
                            } else {
                                let device = cluster.checked_add(step).ok_or_else(|| {
                                    BlobError::corrupt(id, "extent run overflows the cluster index")
                                })?;
                                if !check.cluster_ok(device) {
                                    return Err(BlobError::corrupt(
                                        id,
                                        format!("extent points at cluster {device}, which is outside the store or not allocated"),
                                    ));
                                }
                                device
                            };
                            meta.clusters.push(device);
                        }
                    }
                }
                Descriptor::ExtentTable {
                    num_clusters,
                    entries,
                } => {
                    if num_clusters > MAX_BLOB_CLUSTERS {
                        return Err(BlobError::corrupt(id, format!("extent table of {num_clusters} clusters is larger than this build supports")));
                    }
                    let (recorded, list) = table.get_or_insert_with(|| (num_clusters, Vec::new()));
                    if *recorded != num_clusters {
                        return Err(BlobError::corrupt(
                            id,
                            "extent table descriptors disagree on the blob size",
                        ));
                    }
                    let max_pages = num_clusters.div_ceil(u64::from(EXTENTS_PER_PAGE));
                    for (page, count) in entries.iter() {
                        if page == 0 {
                            if list.len() as u64 + u64::from(count) > max_pages {
                                return Err(BlobError::corrupt(
                                    id,
                                    "extent table lists more pages than the blob has",
                                ));
                            }
                            list.extend(std::iter::repeat_n(0, count as usize));
                        } else {
                            if !check.md_page_ok(page) {
                                return Err(BlobError::corrupt(id, format!("extent table points at md page {page}, outside the md region")));
                            }
                            if list.len() as u64 >= max_pages {
                                return Err(BlobError::corrupt(
                                    id,
                                    "extent table lists more pages than the blob has",
                                ));
                            }
                            list.push(page);
                        }
                    }
                }
                Descriptor::ExtentPage { .. } => {
                    return Err(BlobError::corrupt(
                        id,
                        "an extent page descriptor inside the chain",
                    ));
                }
                Descriptor::Unknown { .. } => {}
            }
        }
    }
    if !saw_flags {
        // Version 1/2 blobs have no flags descriptor: all zero.
        meta.flags = Flags::default();
    }
    let flag_table = meta.flags.invalid & FLAG_EXTENT_TABLE != 0;
    if saw_rle && table.is_some() {
        return Err(BlobError::corrupt(
            id,
            "both run-length extents and an extent table",
        ));
    }
    if saw_rle && flag_table {
        return Err(BlobError::corrupt(
            id,
            "EXTENT_TABLE flag set but run-length extents found",
        ));
    }
    if table.is_some() && !flag_table {
        return Err(BlobError::corrupt(
            id,
            "extent table found without the EXTENT_TABLE flag",
        ));
    }
    let thin = meta.is_thin();
    if !thin && (saw_unallocated || meta.clusters.contains(&0)) {
        return Err(BlobError::corrupt(
            id,
            "unallocated cluster in a thick blob",
        ));
    }
    let mut pending = Vec::new();
    let size = table
        .as_ref()
        .map_or(rle_total, |(num_clusters, _)| *num_clusters);
    if let Some((num_clusters, pages)) = table {
        meta.form = ExtentForm::Table;
        let needed = num_clusters.div_ceil(u64::from(EXTENTS_PER_PAGE)) as usize;
        if check.builds_map() {
            meta.clusters = vec![0; num_clusters as usize];
        }
        if pages.len() < needed {
            // SPDK may leave trailing unallocated extent pages out of the table.
            meta.extent_pages = pages;
            meta.extent_pages.resize(needed, 0);
        } else {
            meta.extent_pages = pages;
        }
        for (index, &page) in meta.extent_pages.iter().enumerate() {
            if page != 0 {
                pending.push((index, page));
            }
        }
        if !thin && pending.len() < needed {
            return Err(BlobError::corrupt(
                id,
                "a thick blob with unallocated extent pages",
            ));
        }
    } else {
        meta.form = if flag_table {
            ExtentForm::Table
        } else {
            ExtentForm::Rle
        };
    }
    Ok(ParsedChain {
        meta,
        pending_extent_pages: pending,
        num_clusters: size,
    })
}

/// Applies extent page number `index` (bytes `page`) to `meta`.
pub fn apply_extent_page(
    meta: &mut BlobMeta,
    index: usize,
    page: &[u8],
    check: &dyn ClusterCheck,
) -> Result<()> {
    apply_decoded_extent_page(meta, index, page, &MdPageHeader::decode(page), check)
}

/// [`apply_extent_page`] with the page's header already decoded (`header` is
/// `MdPageHeader::decode(page)`).
pub(crate) fn apply_decoded_extent_page(
    meta: &mut BlobMeta,
    index: usize,
    page: &[u8],
    header: &MdPageHeader,
    check: &dyn ClusterCheck,
) -> Result<()> {
    let blob = ExtentPageOf {
        id: meta.id,
        num_clusters: meta.clusters.len() as u64,
        thin: meta.is_thin(),
    };
    let clusters = &mut meta.clusters;
    visit_extent_page(&blob, index, page, header, check, |slot, device| {
        clusters[slot] = device;
    })
}

/// The blob an extent page is checked for: [`visit_extent_page`] needs no cluster map.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ExtentPageOf {
    /// The blob's id (for errors).
    pub(crate) id: u64,
    /// The blob's size in clusters: entries past it are ignored.
    pub(crate) num_clusters: u64,
    /// Whether the blob is thin (a thick blob's entries may not be 0).
    pub(crate) thin: bool,
}

/// Checks extent page number `index` (bytes `page`, header `header`) of `blob` and calls
/// `visit(blob cluster, device cluster)` for each of its entries inside the blob, in order,
/// up to the first that `check` refuses (0 = unallocated is visited too). The entries
/// visited before an error stay visited (what a replay claims of a damaged page). Costs
/// what the page holds (at most [`EXTENTS_PER_PAGE`] entries), whatever the blob's size.
pub(crate) fn visit_extent_page(
    blob: &ExtentPageOf,
    index: usize,
    page: &[u8],
    header: &MdPageHeader,
    check: &dyn ClusterCheck,
    mut visit: impl FnMut(usize, u32),
) -> Result<()> {
    let id = blob.id;
    if !header.crc_ok {
        return Err(BlobError::corrupt(
            id,
            format!("extent page {index}: CRC mismatch"),
        ));
    }
    if header.sequence != 0 || header.next != INVALID_MD_PAGE {
        return Err(BlobError::corrupt(
            id,
            format!("extent page {index}: sequence or next set"),
        ));
    }
    let mut walk = descriptors(descriptor_area(page));
    let first = walk
        .next()
        .transpose()
        .map_err(|err| BlobError::corrupt(id, format!("extent page {index}: {err}")))?;
    let Some(Descriptor::ExtentPage {
        start_cluster,
        clusters,
    }) = first
    else {
        return Err(BlobError::corrupt(
            id,
            format!("extent page {index}: no extent page descriptor"),
        ));
    };
    if walk.next().is_some() {
        return Err(BlobError::corrupt(
            id,
            format!("extent page {index}: more than one descriptor"),
        ));
    }
    let start = index * EXTENTS_PER_PAGE as usize;
    if start_cluster as usize != start {
        return Err(BlobError::corrupt(
            id,
            format!("extent page {index} starts at cluster {start_cluster}, expected {start}"),
        ));
    }
    if clusters.len() > EXTENTS_PER_PAGE as usize {
        return Err(BlobError::corrupt(
            id,
            format!(
                "extent page {index} has {} entries, more than {EXTENTS_PER_PAGE}",
                clusters.len()
            ),
        ));
    }
    let expected = usize::try_from(blob.num_clusters)
        .unwrap_or(usize::MAX)
        .saturating_sub(start)
        .min(EXTENTS_PER_PAGE as usize);
    // Entries past the blob's end (an extent page rewritten in place by a grow whose root
    // page never made it to disk) describe nothing the blob owns: ignored. Entries the
    // page lacks inside the blob are unallocated.
    let mut unallocated = clusters.len() < expected;
    for (offset, device) in clusters.iter().enumerate().take(expected) {
        if device != 0 && !check.cluster_ok(device) {
            return Err(BlobError::corrupt(
                id,
                format!("extent page {index} points at cluster {device}, which is outside the store or not allocated"),
            ));
        }
        unallocated |= device == 0;
        visit(start + offset, device);
    }
    if !blob.thin && unallocated {
        return Err(BlobError::corrupt(
            id,
            "unallocated cluster in a thick blob",
        ));
    }
    Ok(())
}

/// Descriptor areas of the chain, root first: FLAGS, xattrs, internal xattrs, extents.
/// Fails only when one xattr cannot fit an empty page (refused earlier by `set_xattr`).
pub fn serialize_chain(meta: &BlobMeta) -> Result<Vec<DescriptorWriter>> {
    let mut pages = vec![DescriptorWriter::default()];
    let flags_written = pages[0].flags(meta.flags);
    debug_assert!(flags_written);
    for (internal, list) in [(false, &meta.xattrs), (true, &meta.internal_xattrs)] {
        for (name, value) in list {
            if !current(&mut pages).xattr(internal, name, value) {
                pages.push(DescriptorWriter::default());
                if !current(&mut pages).xattr(internal, name, value) {
                    return Err(BlobError::InvalidArgument(format!(
                        "xattr {:?} does not fit a metadata page",
                        String::from_utf8_lossy(name)
                    )));
                }
            }
        }
    }
    match meta.form {
        ExtentForm::Rle => {
            let runs = rle_runs(&meta.clusters);
            let mut rest = runs.as_slice();
            while !rest.is_empty() {
                let written = current(&mut pages).extent_rle(rest);
                if written == 0 {
                    pages.push(DescriptorWriter::default());
                    continue;
                }
                rest = &rest[written..];
            }
        }
        ExtentForm::Table => {
            let entries = table_entries(&meta.extent_pages);
            let mut rest = entries.as_slice();
            let num_clusters = meta.clusters.len() as u64;
            loop {
                match current(&mut pages).extent_table(num_clusters, rest) {
                    Some(written) => {
                        rest = &rest[written..];
                        if rest.is_empty() {
                            break;
                        }
                    }
                    None => pages.push(DescriptorWriter::default()),
                }
            }
        }
    }
    Ok(pages)
}

fn current(pages: &mut [DescriptorWriter]) -> &mut DescriptorWriter {
    let last = pages.len() - 1;
    &mut pages[last]
}

/// Run-length encoding of a cluster map: contiguous allocated clusters merge, runs of
/// unallocated clusters merge, and an allocated cluster never merges into an unallocated run.
pub fn rle_runs(clusters: &[u32]) -> Vec<(u32, u32)> {
    let mut runs: Vec<(u32, u32)> = Vec::new();
    for &cluster in clusters {
        if let Some((start, len)) = runs.last_mut() {
            let contiguous = if *start == 0 {
                cluster == 0
            } else {
                cluster != 0 && u64::from(*start) + u64::from(*len) == u64::from(cluster)
            };
            if contiguous && *len < u32::MAX {
                *len += 1;
                continue;
            }
        }
        runs.push((cluster, 1));
    }
    runs
}

/// Extent-table entries: `(page, 1)` for each allocated extent page, `(0, n)` for runs of
/// unallocated ones.
pub fn table_entries(extent_pages: &[u32]) -> Vec<(u32, u32)> {
    let mut entries: Vec<(u32, u32)> = Vec::new();
    for &page in extent_pages {
        match entries.last_mut() {
            Some((0, count)) if page == 0 => *count += 1,
            _ => entries.push((page, 1)),
        }
    }
    entries
}

/// The sealed md page holding extent page `index` of `meta`.
pub fn encode_extent_page(meta: &BlobMeta, index: usize) -> Vec<u8> {
    let start = index * EXTENTS_PER_PAGE as usize;
    let end = (start + EXTENTS_PER_PAGE as usize).min(meta.clusters.len());
    let mut writer = DescriptorWriter::default();
    let written = writer.extent_page(start as u32, &meta.clusters[start.min(end)..end]);
    debug_assert!(written);
    encode_page(meta.id, 0, INVALID_MD_PAGE, writer.bytes())
}

#[cfg(test)]
#[path = "meta_tests.rs"]
mod tests;
