//! Phases 2 and 3: scan the md region for root pages, then walk every blob's chain and
//! extent pages, parsing them with the blob layer's decoders ([`crate::meta::parse_chain`],
//! [`crate::meta::apply_extent_page`]). Every walk is bounded: a chain by the pages it has
//! visited (a loop is a problem, not a hang) and by [`MAX_CHAIN_PAGES`].

use std::collections::HashSet;

use super::image::{Image, BATCH_PAGES};
use super::report::{Problem, ProblemKind};
use super::super_check::StoreShape;
use super::CheckError;
use crate::bitmap::BitSet;
use crate::format::descriptor::{
    descriptors, Descriptor, FLAG_EXTERNAL_SNAPSHOT, INVALID_FLAGS_KNOWN, TYPE_FLAGS,
};
use crate::format::md_page::{descriptor_area, MdPageHeader, DESC_OFFSET};
use crate::format::{page_to_blobid, read_u32, read_u64, seal_page, INVALID_MD_PAGE, PAGE_SIZE};
use crate::meta::{apply_extent_page, parse_chain, BlobMeta, ClusterCheck};

/// Longest chain a check follows (256 MiB of metadata); longer ones are reported.
pub const MAX_CHAIN_PAGES: usize = 1 << 16;

/// What the scan of the md region found.
pub struct Scan {
    /// Pages that are a valid root: good CRC, id naming the page, sequence 0.
    pub roots: Vec<u32>,
    /// Pages placed and numbered as a root (id naming the page, sequence 0) whose CRC fails.
    pub broken_roots: Vec<u32>,
    /// Pages holding any non-zero byte.
    pub nonzero: BitSet,
    /// Pages the device could not read (`(page, why)`): reported, the rest still checked.
    pub unreadable: Vec<(u32, String)>,
}

/// A blob as the walk found it.
#[derive(Debug, Clone)]
pub struct BlobRecord {
    /// The blob id.
    pub id: u64,
    /// Its chain, root first (the pages reached before any fault).
    pub chain: Vec<u32>,
    /// Its extent pages (those inside the md region).
    pub extent_pages: Vec<u32>,
    /// Its metadata, when it parsed.
    pub meta: Option<BlobMeta>,
    /// The public xattrs its readable chain pages name (`(name, value)`), also when its
    /// metadata does not parse: a damaged lvol's name and uuid stay taken.
    pub readable_xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Why it cannot be used (`meta` is `None`, or its clusters are unusable).
    pub damage: Option<String>,
    /// Descriptors of a type no SPDK version defines (`(md page, type, length)`): SPDK's
    /// and Spool's loads skip them, so whatever they held is ignored (the check notes them).
    pub unknown_descriptors: Vec<(u32, u8, u32)>,
    /// Byte offset of the FLAGS descriptor's body in the root page, if it has one.
    pub flags_at: Option<usize>,
    /// Whether the root page itself is unusable (bad CRC): no blob for a load.
    pub root_broken: bool,
    /// Whether the blob's clusters are all known: its whole chain and every extent page
    /// read, checked and parsed (a blob damaged only by the clusters it maps still has
    /// them known). When false, some of its clusters may be named only by a page that
    /// cannot be trusted (see [`salvage_clusters`]).
    pub clusters_known: bool,
    /// The page where the walk stopped on a CRC mismatch, when its header still names
    /// this blob: its descriptors are read only to keep the clusters they name.
    pub unsure_page: Option<u32>,
    /// Clusters a salvage kept for this damaged blob that nothing claimed before it (see
    /// [`salvage_clusters`]).
    pub salvaged: u64,
    /// Clusters of the blob (its size), once its map was claimed.
    pub num_clusters: Option<u64>,
    /// Allocated clusters of its map.
    pub allocated: u64,
}

impl BlobRecord {
    /// The root md page.
    pub fn root(&self) -> u32 {
        self.id as u32
    }

    /// Marks it damaged (the first reason is kept).
    pub fn damage(&mut self, reason: impl Into<String>) {
        if self.damage.is_none() {
            self.damage = Some(reason.into());
        }
    }
}

/// Accepts every index: the check tests ranges itself, to name each fault.
struct AnyIndex;

impl ClusterCheck for AnyIndex {
    fn cluster_ok(&self, _cluster: u32) -> bool {
        true
    }
    fn md_page_ok(&self, _page: u32) -> bool {
        true
    }
}

/// Reads the md region in batches and finds the root pages.
pub fn scan(
    image: &Image<'_>,
    shape: &StoreShape,
    progress: &mut dyn FnMut(String),
) -> Result<Scan, CheckError> {
    let md_len = shape.md_len();
    let mut scan = Scan {
        roots: Vec::new(),
        broken_roots: Vec::new(),
        nonzero: BitSet::new(u64::from(md_len)),
        unreadable: Vec::new(),
    };
    let report_every = (md_len / 10).max(BATCH_PAGES * 64);
    let mut next_report = report_every;
    let mut first = 0u32;
    while first < md_len {
        if image.stop_requested() {
            return Err(CheckError::Stopped {
                scanned: u64::from(first),
                md_len: u64::from(md_len),
            });
        }
        // A sparse file's holes read as zeros: skip them rather than read them.
        if let Some(data) = image.next_data_page(shape.md_device_page(first)) {
            let data_md_page = data.saturating_sub(shape.md_device_page(0));
            if data_md_page >= u64::from(md_len) {
                break;
            }
            // `data` rounds down to its page: never past a page that may hold data.
            first = first.max(data_md_page as u32);
        }
        let count = BATCH_PAGES.min(md_len - first);
        let pages = read_batch(image, shape, first, count, &mut scan.unreadable)?;
        for (number, page) in pages.iter().flat_map(|(start, bytes)| {
            bytes
                .chunks_exact(PAGE_SIZE)
                .enumerate()
                .map(move |(offset, page)| (start + offset as u32, page))
        }) {
            if page.iter().all(|&b| b == 0) {
                continue;
            }
            scan.nonzero.set(u64::from(number));
            if read_u64(page, 0) == page_to_blobid(number) && read_u32(page, 8) == 0 {
                if MdPageHeader::decode(page).crc_ok {
                    scan.roots.push(number);
                } else {
                    scan.broken_roots.push(number);
                }
            }
        }
        first += count;
        if first >= next_report && first < md_len {
            progress(format!("md region: {first} of {md_len} pages scanned"));
            next_report = next_report.saturating_add(report_every);
        }
    }
    Ok(scan)
}

/// Reads `count` md pages from `first` in one request; if the device fails it, page by page,
/// so one bad sector costs only its page (recorded in `unreadable`). Returns the runs read,
/// as `(first page, bytes)`.
fn read_batch(
    image: &Image<'_>,
    shape: &StoreShape,
    first: u32,
    count: u32,
    unreadable: &mut Vec<(u32, String)>,
) -> Result<Vec<(u32, Vec<u8>)>, CheckError> {
    match image.read_pages(shape.md_device_page(first), count) {
        Ok(bytes) => return Ok(vec![(first, bytes)]),
        Err(CheckError::Io { .. }) => {}
        Err(err) => return Err(err),
    }
    let mut runs = Vec::new();
    for number in first..first + count {
        match image.read_pages(shape.md_device_page(number), 1) {
            Ok(bytes) => runs.push((number, bytes)),
            Err(err @ CheckError::Io { .. }) => unreadable.push((number, err.to_string())),
            Err(err) => return Err(err),
        }
    }
    Ok(runs)
}

fn problem(
    kind: ProblemKind,
    page: u32,
    blob: u64,
    field: &str,
    expected: impl Into<String>,
    found: impl Into<String>,
) -> Problem {
    Problem {
        kind,
        page: Some(page),
        blob: Some(blob),
        field: field.into(),
        expected: expected.into(),
        found: found.into(),
    }
}

/// A page read's result with a device read failure (a bad sector) as `None`: the scan
/// already reported the page, and the walk goes on without it.
fn readable(read: Result<Vec<u8>, CheckError>) -> Result<Option<Vec<u8>>, CheckError> {
    match read {
        Ok(bytes) => Ok(Some(bytes)),
        Err(CheckError::Io { .. }) => Ok(None),
        Err(err) => Err(err),
    }
}

fn md_page(image: &Image<'_>, shape: &StoreShape, page: u32) -> Result<Vec<u8>, CheckError> {
    image.read_pages(shape.md_device_page(page), 1)
}

/// Walks the chain of the blob rooted at `root` (a valid root page), parses it and its
/// extent pages; every fault is a problem and makes the blob damaged.
pub fn walk_blob(
    image: &Image<'_>,
    shape: &StoreShape,
    root: u32,
    problems: &mut Vec<Problem>,
) -> Result<BlobRecord, CheckError> {
    let id = page_to_blobid(root);
    let md_len = shape.md_len();
    let mut record = BlobRecord {
        id,
        chain: vec![root],
        extent_pages: Vec::new(),
        meta: None,
        readable_xattrs: Vec::new(),
        unknown_descriptors: Vec::new(),
        damage: None,
        flags_at: None,
        root_broken: false,
        clusters_known: true,
        unsure_page: None,
        salvaged: 0,
        num_clusters: None,
        allocated: 0,
    };
    let mut pages = vec![md_page(image, shape, root)?];
    let mut visited = HashSet::from([root]);
    loop {
        let current = *record.chain.last().unwrap_or(&root);
        let next = read_u32(pages.last().map_or(&[][..], |p| &p[..]), PAGE_SIZE - 8);
        if next == INVALID_MD_PAGE {
            break;
        }
        if next >= md_len {
            problems.push(problem(
                ProblemKind::PageNext,
                current,
                id,
                "next",
                format!("an md page below {md_len}, or {INVALID_MD_PAGE:#x}"),
                next.to_string(),
            ));
            record.damage(format!(
                "md page {current}: next {next} is outside the md region"
            ));
            break;
        }
        if visited.contains(&next) {
            problems.push(problem(
                ProblemKind::ChainLoop,
                current,
                id,
                "next",
                "a page not already in the chain",
                format!("md page {next}, visited before"),
            ));
            record.damage(format!("chain loops back to md page {next}"));
            break;
        }
        if record.chain.len() >= MAX_CHAIN_PAGES {
            problems.push(problem(
                ProblemKind::PageNext,
                current,
                id,
                "next",
                format!("a chain of at most {MAX_CHAIN_PAGES} pages"),
                "a longer chain".to_string(),
            ));
            record.damage("chain too long");
            break;
        }
        let Some(bytes) = readable(md_page(image, shape, next))? else {
            // The scan reported the page (`page_unreadable`); the repair refuses.
            record.damage(format!("md page {next} cannot be read"));
            break;
        };
        let header = MdPageHeader::decode(&bytes);
        let sequence = record.chain.len();
        if !header.crc_ok {
            problems.push(problem(
                ProblemKind::PageCrc,
                next,
                id,
                "crc",
                format!("{:#010x}", crate::format::page_crc(&bytes)),
                format!("{:#010x}", header.crc),
            ));
            record.damage(format!(
                "md page {next} (chain page {sequence}): CRC mismatch"
            ));
            if header.id == id {
                record.unsure_page = Some(next);
            }
            break;
        }
        if header.id != id {
            problems.push(problem(
                ProblemKind::PageBlobId,
                next,
                id,
                "id",
                format!("{id:#x} (the chain's blob)"),
                format!("{:#x}", header.id),
            ));
            record.damage(format!("md page {next} belongs to blob {:#x}", header.id));
            break;
        }
        if header.sequence as usize != sequence {
            problems.push(problem(
                ProblemKind::PageSequence,
                next,
                id,
                "sequence",
                sequence.to_string(),
                header.sequence.to_string(),
            ));
            record.damage(format!(
                "md page {next}: sequence {} in place {sequence}",
                header.sequence
            ));
            break;
        }
        visited.insert(next);
        record.chain.push(next);
        pages.push(bytes);
    }
    // Descriptors page by page, so a fault names its page and offset.
    let chain = record.chain.clone();
    for (index, (&number, bytes)) in chain.iter().zip(&pages).enumerate() {
        for descriptor in descriptors(descriptor_area(bytes)) {
            match descriptor {
                Err(err) => {
                    problems.push(problem(
                        ProblemKind::Descriptor,
                        number,
                        id,
                        "descriptor",
                        "a descriptor inside the page with its type's length",
                        err.to_string(),
                    ));
                    record.damage(format!("md page {number}: {err}"));
                }
                Ok(Descriptor::Flags(_)) if index == 0 && record.flags_at.is_none() => {
                    record.flags_at = flags_offset(bytes);
                }
                Ok(Descriptor::Xattr {
                    internal: false,
                    name,
                    value,
                }) => {
                    record.readable_xattrs.push((name.to_vec(), value.to_vec()));
                }
                Ok(Descriptor::Unknown { kind, len }) => {
                    record.unknown_descriptors.push((number, kind, len));
                }
                Ok(_) => {}
            }
        }
    }
    if record.damage.is_some() {
        record.clusters_known = false;
        return Ok(record);
    }
    // An esnap clone (SPDK's EXTERNAL_SNAPSHOT flag, SPDK 23.05+) is valid metadata that
    // Spool only declines to open: checked as if the flag were clear, never damaged.
    if let Some(at) = record.flags_at {
        let invalid = read_u64(&pages[0], at);
        let spdk_known = INVALID_FLAGS_KNOWN | FLAG_EXTERNAL_SNAPSHOT;
        if invalid & FLAG_EXTERNAL_SNAPSHOT != 0 && invalid & !spdk_known == 0 {
            let root_copy = &mut pages[0];
            root_copy[at..at + 8]
                .copy_from_slice(&(invalid & !FLAG_EXTERNAL_SNAPSHOT).to_le_bytes());
            seal_page(root_copy);
        }
    }
    let refs: Vec<&[u8]> = pages.iter().map(|p| &p[..]).collect();
    let mut parsed = match parse_chain(id, &refs, &AnyIndex) {
        Ok(parsed) => parsed,
        Err(err) => {
            problems.push(problem(
                ProblemKind::BlobMetadata,
                root,
                id,
                "descriptors",
                "metadata that makes a blob",
                err.to_string(),
            ));
            record.damage(err.to_string());
            record.clusters_known = false;
            return Ok(record);
        }
    };
    let pending = std::mem::take(&mut parsed.pending_extent_pages);
    if pending.len() > md_len as usize {
        problems.push(problem(
            ProblemKind::ExtentPageShared,
            root,
            id,
            "extent_table",
            format!("at most {md_len} extent pages (each md page once)"),
            format!("{} extent page references", pending.len()),
        ));
        record.damage("its extent table names more extent pages than the md region has");
        record.clusters_known = false;
        return Ok(record);
    }
    for (index, page) in pending {
        if page >= md_len {
            problems.push(problem(
                ProblemKind::ExtentPageOutOfRange,
                root,
                id,
                &format!("extent_table[{index}]"),
                format!("an md page below {md_len}"),
                page.to_string(),
            ));
            record.damage(format!(
                "extent page {index} at md page {page}, outside the md region"
            ));
            continue;
        }
        record.extent_pages.push(page);
        let Some(bytes) = readable(md_page(image, shape, page))? else {
            record.damage(format!(
                "extent page {index} at md page {page} cannot be read"
            ));
            continue;
        };
        // Spool's load reads a page whose id field is 0 as no page at all (a zeroed one:
        // `md_scan`), so the blob would not open: named here as the load would see it.
        if MdPageHeader::decode(&bytes).id == 0 {
            problems.push(problem(
                ProblemKind::ExtentPage,
                page,
                id,
                &format!("extent page {index}"),
                format!("an extent page whose id field is the blob's ({id:#x})"),
                "id 0 (a load takes the page for a zeroed one: the blob does not open)",
            ));
            record.damage(format!("extent page {index} at md page {page} has id 0"));
            continue;
        }
        if let Err(err) = apply_extent_page(&mut parsed.meta, index, &bytes, &AnyIndex) {
            problems.push(problem(
                ProblemKind::ExtentPage,
                page,
                id,
                &format!("extent page {index}"),
                "a sealed extent page (sequence 0, no next, one extent descriptor)",
                err.to_string(),
            ));
            record.damage(err.to_string());
        }
    }
    if record.damage.is_none() {
        record.meta = Some(parsed.meta);
    }
    record.clusters_known = record.damage.is_none();
    Ok(record)
}

/// A record for a page placed as a root whose CRC fails: a damaged blob with no metadata.
pub fn broken_root(
    image: &Image<'_>,
    shape: &StoreShape,
    root: u32,
    problems: &mut Vec<Problem>,
) -> Result<BlobRecord, CheckError> {
    let id = page_to_blobid(root);
    let bytes = md_page(image, shape, root)?;
    let header = MdPageHeader::decode(&bytes);
    problems.push(problem(
        ProblemKind::PageCrc,
        root,
        id,
        "crc",
        format!("{:#010x}", crate::format::page_crc(&bytes)),
        format!("{:#010x}", header.crc),
    ));
    Ok(BlobRecord {
        id,
        chain: vec![root],
        extent_pages: Vec::new(),
        meta: None,
        readable_xattrs: Vec::new(),
        unknown_descriptors: Vec::new(),
        damage: Some(format!("root md page {root}: CRC mismatch")),
        flags_at: None,
        root_broken: true,
        clusters_known: false,
        unsure_page: None,
        salvaged: 0,
        num_clusters: None,
        allocated: 0,
    })
}

/// Run lengths a salvage follows at most, in all (hostile runs cannot make it spin).
const MAX_SALVAGED: u64 = 1 << 32;

/// Marks in `used` every cluster a damaged blob's pages still name, and returns how many
/// were not marked before: the runs of every run-length descriptor that decodes in its
/// chain pages and in the page where its walk stopped on a CRC mismatch (when that page's
/// header still names the blob), and the entries of every extent page its extent tables
/// name whose header names the blob. Bytes failing a CRC are not trusted to be right, but a
/// cluster kept on their word costs space at worst, while one freed may be the blob's data:
/// so they may add clusters, never remove any. Indexes outside the store are skipped.
pub fn salvage_clusters(
    image: &Image<'_>,
    shape: &StoreShape,
    record: &BlobRecord,
    used: &mut BitSet,
) -> Result<u64, CheckError> {
    let md_len = shape.md_len();
    let before = used.count_set();
    let mut budget = MAX_SALVAGED;
    let mut extent_pages: Vec<u32> = record.extent_pages.clone();
    let pages = record.chain.iter().chain(record.unsure_page.iter());
    for &number in pages {
        let Some(bytes) = readable(md_page(image, shape, number))? else {
            continue;
        };
        for descriptor in descriptors(descriptor_area(&bytes)) {
            match descriptor {
                Ok(Descriptor::ExtentRle(runs)) => {
                    for (first, count) in runs.iter().filter(|&(first, _)| first != 0) {
                        let count = u64::from(count).min(budget);
                        budget -= count;
                        used.set_range(u64::from(first), count);
                    }
                }
                Ok(Descriptor::ExtentTable { entries, .. }) => {
                    for (page, _) in entries.iter() {
                        if page != 0 && page < md_len && extent_pages.len() < md_len as usize {
                            extent_pages.push(page);
                        }
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }
    extent_pages.sort_unstable();
    extent_pages.dedup();
    for page in extent_pages {
        let Some(bytes) = readable(md_page(image, shape, page))? else {
            continue;
        };
        if read_u64(&bytes, 0) != record.id {
            continue;
        }
        for descriptor in descriptors(descriptor_area(&bytes)) {
            match descriptor {
                Ok(Descriptor::ExtentPage { clusters, .. }) => {
                    for cluster in clusters.iter().filter(|&c| c != 0) {
                        if u64::from(cluster) < used.len() {
                            used.set(u64::from(cluster));
                        }
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }
    Ok(used.count_set() - before)
}

/// Byte offset in `page` of the first FLAGS descriptor's body (its invalid_flags field).
pub fn flags_offset(page: &[u8]) -> Option<usize> {
    let area = descriptor_area(page);
    let mut at = 0usize;
    while at + 5 <= area.len() {
        let kind = area[at];
        let len = read_u32(area, at + 1) as usize;
        if kind == 0 && len == 0 {
            return None;
        }
        if kind == TYPE_FLAGS && len == 24 && at + 5 + 24 <= area.len() {
            return Some(DESC_OFFSET + at + 5);
        }
        at = at.checked_add(5 + len)?;
    }
    None
}
