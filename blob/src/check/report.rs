//! What a check finds: one [`Problem`] per inconsistency, each naming the md page, blob and
//! field, with what was expected and what was found.

/// The kind of an inconsistency: one per on-disk field or rule a check verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProblemKind {
    /// The super block's CRC does not match its bytes.
    SuperBlockCrc,
    /// A super block field is out of range (length, clean, sizes, region bounds).
    SuperBlockField,
    /// The super blob the super block names is not a blob.
    SuperBlobMissing,
    /// A mask region's header (type byte or length in bits) is wrong.
    MaskHeader,
    /// A mask leaves clear a bit the metadata uses (page, cluster or blob id).
    MaskBitMissing,
    /// A mask sets a bit nothing uses (an orphaned md page, cluster or blob id).
    MaskBitExtra,
    /// An md page's CRC does not match its bytes.
    PageCrc,
    /// A chain page's sequence number is not its place in the chain.
    PageSequence,
    /// A chain's `next` points outside the md region.
    PageNext,
    /// A chain page belongs to another blob (its id field).
    PageBlobId,
    /// A chain comes back to a page it already visited.
    ChainLoop,
    /// An md page is used twice (by two chains, or a chain and an extent page).
    PageShared,
    /// A descriptor runs past its page or has an impossible length.
    Descriptor,
    /// A blob's descriptors are individually valid but do not make a blob.
    BlobMetadata,
    /// An extent page is malformed (CRC, sequence, next, descriptor).
    ExtentPage,
    /// An extent table points outside the md region.
    ExtentPageOutOfRange,
    /// An extent page is pointed to twice.
    ExtentPageShared,
    /// A blob's cluster is past the end of the store.
    ClusterOutOfRange,
    /// A blob's cluster is one of the metadata clusters.
    ClusterInMetadata,
    /// A cluster is owned by two blobs.
    ClusterShared,
    /// A `SNAP` xattr names no blob (or is not 8 bytes).
    DanglingParent,
    /// A blob's parent (a snapshot) is writable.
    ParentNotReadOnly,
    /// A parent chain comes back to a blob already on it.
    ParentCycle,
    /// A snapshot half made (`SNAPTMP` left by a crash).
    SnapshotPending,
    /// A merge half done (`SNAPRM` left by a crash).
    MergePending,
    /// An lvol store's super blob is missing or lacks the store's `name` or `uuid`.
    LvsMetadata,
    /// Two lvols share a name.
    LvolNameDuplicate,
    /// Two lvols share a uuid.
    LvolUuidDuplicate,
    /// A dirty Spool store's root superset record (bounded recovery) misses a blob's root
    /// page: the bounded dirty load, which reads only the pages the record covers, would
    /// not find that blob.
    RootOutsideSuperset,
    /// The device could not read an md page (a bad sector): what it held is unknown.
    PageUnreadable,
}

impl ProblemKind {
    /// The kind's name in reports (snake case, stable: scripts match on it).
    pub fn name(self) -> &'static str {
        match self {
            ProblemKind::SuperBlockCrc => "super_block_crc",
            ProblemKind::SuperBlockField => "super_block_field",
            ProblemKind::SuperBlobMissing => "super_blob_missing",
            ProblemKind::MaskHeader => "mask_header",
            ProblemKind::MaskBitMissing => "mask_bit_missing",
            ProblemKind::MaskBitExtra => "mask_bit_extra",
            ProblemKind::PageCrc => "page_crc",
            ProblemKind::PageSequence => "page_sequence",
            ProblemKind::PageNext => "page_next",
            ProblemKind::PageBlobId => "page_blob_id",
            ProblemKind::ChainLoop => "chain_loop",
            ProblemKind::PageShared => "page_shared",
            ProblemKind::Descriptor => "descriptor",
            ProblemKind::BlobMetadata => "blob_metadata",
            ProblemKind::ExtentPage => "extent_page",
            ProblemKind::ExtentPageOutOfRange => "extent_page_out_of_range",
            ProblemKind::ExtentPageShared => "extent_page_shared",
            ProblemKind::ClusterOutOfRange => "cluster_out_of_range",
            ProblemKind::ClusterInMetadata => "cluster_in_metadata",
            ProblemKind::ClusterShared => "cluster_shared",
            ProblemKind::DanglingParent => "dangling_parent",
            ProblemKind::ParentNotReadOnly => "parent_not_read_only",
            ProblemKind::ParentCycle => "parent_cycle",
            ProblemKind::SnapshotPending => "snapshot_pending",
            ProblemKind::MergePending => "merge_pending",
            ProblemKind::LvsMetadata => "lvs_metadata",
            ProblemKind::LvolNameDuplicate => "lvol_name_duplicate",
            ProblemKind::LvolUuidDuplicate => "lvol_uuid_duplicate",
            ProblemKind::RootOutsideSuperset => "root_outside_superset",
            ProblemKind::PageUnreadable => "page_unreadable",
        }
    }
}

/// One inconsistency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// What rule is broken.
    pub kind: ProblemKind,
    /// The md page concerned (index in the md region), if any.
    pub page: Option<u32>,
    /// The blob concerned, if any.
    pub blob: Option<u64>,
    /// The field or structure (e.g. `super.md_len`, `used_cluster_mask[17]`, `next`).
    pub field: String,
    /// What a consistent store holds there.
    pub expected: String,
    /// What this one holds.
    pub found: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:", self.kind.name())?;
        if let Some(blob) = self.blob {
            write!(f, " blob {blob:#x}")?;
        }
        if let Some(page) = self.page {
            write!(f, " md page {page}")?;
        }
        write!(
            f,
            " {}: expected {}, found {}",
            self.field, self.expected, self.found
        )
    }
}

/// A blob as the check saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobSummary {
    /// The blob id.
    pub id: u64,
    /// Clusters of the blob (its size), when its metadata parsed.
    pub clusters: Option<u64>,
    /// Allocated (backed) clusters.
    pub allocated: u64,
    /// Md pages of its chain plus its extent pages.
    pub md_pages: u64,
    /// Its parent snapshot.
    pub parent: Option<u64>,
    /// Whether it is read-only (data_ro).
    pub read_only: bool,
    /// Why its metadata cannot be used (a damaged blob keeps its pages and clusters).
    pub damaged: Option<String>,
}

/// The result of a check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Bytes of the device.
    pub device_bytes: u64,
    /// The super block's clean flag.
    pub clean: u32,
    /// Clusters of the store.
    pub total_clusters: u64,
    /// Clusters holding the super block, masks and md region.
    pub md_clusters: u64,
    /// Md pages of the region.
    pub md_len: u32,
    /// Blobs found (every valid root page), in id order.
    pub blobs: Vec<BlobSummary>,
    /// Clusters the metadata uses (md clusters included).
    pub used_clusters: u64,
    /// Md pages the metadata uses.
    pub used_md_pages: u64,
    /// Everything inconsistent, in the order found (super block, masks, pages, blobs,
    /// clusters, graph, lvols).
    pub problems: Vec<Problem>,
    /// Things worth knowing that are not problems (a dirty store's masks are not compared).
    pub notes: Vec<String>,
}

impl CheckReport {
    /// Whether the store is consistent.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    /// Problems of `kind`.
    pub fn of_kind(&self, kind: ProblemKind) -> impl Iterator<Item = &Problem> {
        self.problems.iter().filter(move |p| p.kind == kind)
    }

    /// The problems a crash may not leave: all but what the next load repairs (a
    /// half-made snapshot, whose original may already read through it and so is not yet
    /// read-only, and a half-done merge). A store Spool left at any power cut has none.
    pub fn beyond_crash_repair(&self) -> impl Iterator<Item = &Problem> {
        let pending: Vec<u64> = self
            .of_kind(ProblemKind::SnapshotPending)
            .filter_map(|p| p.blob)
            .collect();
        self.problems.iter().filter(move |p| match p.kind {
            ProblemKind::SnapshotPending | ProblemKind::MergePending => false,
            ProblemKind::ParentNotReadOnly => !p.blob.is_some_and(|b| pending.contains(&b)),
            _ => true,
        })
    }
}
