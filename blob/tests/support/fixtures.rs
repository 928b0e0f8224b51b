//! Loading the SPDK-written fixture images (`shared/fixtures/spdk/`) and their manifests.
//!
//! Each fixture `NAME` is a pair of files: `NAME.img.gz` (the whole device image, gzip -9) and
//! `NAME.json` (the truth about it, read back with SPDK v24.01's own tools). This module finds
//! them, gunzips and verifies the images, parses the manifests into typed structs ([`Manifest`],
//! [`BlobManifest`], ...) and rebuilds each blob's logical content from its
//! `content_by_cluster` description ([`expected_content`]).
//!
//! It depends only on the dev-dependencies (serde, serde_json, flate2, sha2, tempfile), never on
//! the blobstore itself, so it can check the fixtures even while the blobstore does not build
//! them. Every helper panics with a message naming the fixture when something is wrong: these
//! are test helpers, and a broken fixture is a failed test.
//!
//! Not every test binary uses every helper, hence the module-wide `dead_code` allowance.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;
use serde::{Deserialize, Deserializer};
use sha2::{Digest, Sha256};

/// Environment variable that overrides where the fixtures are looked for.
pub const FIXTURES_DIR_ENV: &str = "SPOOL_FIXTURES_DIR";

/// The blobstore's metadata page size (SPDK's `SPDK_BS_PAGE_SIZE`); every fixture uses it.
pub const PAGE_SIZE: u64 = 4096;

/// SPDK blob ids are `1 << 32 | md page index` (`bs_page_to_blobid`).
pub const BLOBID_HIGH_BIT: u64 = 1 << 32;

/// Bits of a blob's `invalid_flags` (SPDK's `SPDK_BLOB_THIN_PROV`).
pub const INVALID_FLAG_THIN_PROV: u64 = 1 << 0;
/// Bits of a blob's `invalid_flags` (SPDK's `SPDK_BLOB_INTERNAL_XATTR`).
pub const INVALID_FLAG_INTERNAL_XATTR: u64 = 1 << 1;
/// Bits of a blob's `invalid_flags` (SPDK's `SPDK_BLOB_EXTENT_TABLE`).
pub const INVALID_FLAG_EXTENT_TABLE: u64 = 1 << 2;
/// Bit of a blob's `data_ro_flags` (SPDK's `SPDK_BLOB_READ_ONLY`).
pub const DATA_RO_FLAG_READ_ONLY: u64 = 1 << 0;

// ---------------------------------------------------------------------------------------------
// Locating fixtures
// ---------------------------------------------------------------------------------------------

/// The folder holding the fixture images and manifests.
///
/// `$SPOOL_FIXTURES_DIR` when set (and not empty); otherwise the repository's copy in
/// `<workspace>/fixtures/spdk`, else `<workspace>/../shared/fixtures/spdk`.
pub fn fixtures_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(FIXTURES_DIR_ENV) {
        if !dir.is_empty() {
            return PathBuf::from(dir);
        }
    }
    // The copy in the repository (fixtures/spdk), else the shared folder beside it.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let in_repo = root.join("fixtures").join("spdk");
    let dir = if in_repo.is_dir() {
        in_repo
    } else {
        root.join("..").join("shared").join("fixtures").join("spdk")
    };
    dir.canonicalize().unwrap_or(dir)
}

/// Every fixture name (`NAME` for which both `NAME.json` and `NAME.img.gz` exist), sorted.
///
/// Panics if the fixtures folder cannot be read.
pub fn fixture_names() -> Vec<String> {
    let dir = fixtures_dir();
    let entries = fs::read_dir(&dir).unwrap_or_else(|e| {
        panic!(
            "cannot read the fixtures folder {} ({e}); set {FIXTURES_DIR_ENV} to override",
            dir.display()
        )
    });
    let mut names: Vec<String> = entries
        .filter_map(|entry| {
            let file_name = entry.ok()?.file_name().into_string().ok()?;
            let stem = file_name.strip_suffix(".json")?;
            dir.join(format!("{stem}.img.gz"))
                .is_file()
                .then(|| stem.to_string())
        })
        .collect();
    names.sort();
    names
}

/// Path of fixture `name`'s manifest (`NAME.json`).
pub fn manifest_path(name: &str) -> PathBuf {
    fixtures_dir().join(format!("{name}.json"))
}

/// Path of fixture `name`'s compressed image (`NAME.img.gz`).
pub fn image_gz_path(name: &str) -> PathBuf {
    fixtures_dir().join(format!("{name}.img.gz"))
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// Parses fixture `name`'s manifest. Panics if it is missing or does not match the schema.
pub fn load_manifest(name: &str) -> Manifest {
    let path = manifest_path(name);
    let text = fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read manifest {}: {e}", path.display()));
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("cannot parse manifest {}: {e}", path.display()))
}

/// Gunzips fixture `name`'s image without checking it against the manifest.
pub fn gunzip_image(name: &str) -> Vec<u8> {
    let path = image_gz_path(name);
    let file = fs::File::open(&path)
        .unwrap_or_else(|e| panic!("cannot open image {}: {e}", path.display()));
    let mut out = Vec::new();
    GzDecoder::new(std::io::BufReader::new(file))
        .read_to_end(&mut out)
        .unwrap_or_else(|e| panic!("cannot gunzip image {}: {e}", path.display()));
    out
}

/// Fixture `name`'s raw device image (gunzipped), after checking that its size and sha256 are
/// the manifest's `image_bytes` and `image_sha256`. Panics on any mismatch.
pub fn load_image(name: &str) -> Vec<u8> {
    let manifest = load_manifest(name);
    let image = gunzip_image(name);
    verify_image(&manifest, &image);
    image
}

/// Panics unless `image` has the size and sha256 that `manifest` records.
pub fn verify_image(manifest: &Manifest, image: &[u8]) {
    assert_eq!(
        image.len() as u64,
        manifest.image_bytes,
        "{}: gunzipped image size",
        manifest.name
    );
    assert_eq!(
        sha256_hex(image),
        manifest.image_sha256,
        "{}: gunzipped image sha256",
        manifest.name
    );
}

/// Writes fixture `name`'s verified raw image to `dir/NAME.img` (for tests that open the image
/// as a file, e.g. through a file-backed bdev) and returns that path. The file is writable, so a
/// test may modify its copy; the fixture itself is never touched.
pub fn write_image_to(name: &str, dir: &Path) -> PathBuf {
    let image = load_image(name);
    let path = dir.join(format!("{name}.img"));
    fs::write(&path, &image).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    path
}

/// Like [`write_image_to`], into a fresh temporary folder. Keep the returned [`tempfile::TempDir`]
/// alive as long as the file is in use: dropping it deletes the folder.
pub fn image_in_tempdir(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("create a temporary folder");
    let path = write_image_to(name, dir.path());
    (dir, path)
}

/// Lower-case hex sha256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    to_hex(&Sha256::digest(data))
}

/// Lower-case hex of `bytes`, two digits a byte.
pub fn to_hex(bytes: &[u8]) -> String {
    use fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        write!(s, "{b:02x}").expect("writing to a String cannot fail");
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Expected content
// ---------------------------------------------------------------------------------------------

/// The byte of pattern `P(s)` at blob logical offset `o`: `(o*31 + s) % 251`.
pub fn pattern_byte(seed: u64, offset: u64) -> u8 {
    ((offset.wrapping_mul(31).wrapping_add(seed)) % 251) as u8
}

/// The whole logical content of `blob` (`num_clusters * cluster_size` bytes, as `blobcli -d`
/// returns it), rebuilt from its `content_by_cluster`. Panics if `content_by_cluster` does not
/// list the clusters `0..num_clusters` in order, each covered exactly by its segments.
pub fn expected_content(manifest: &Manifest, blob: &BlobManifest) -> Vec<u8> {
    let cs = manifest.super_block.cluster_size;
    let what = format!("{} blob {:#x}", manifest.name, blob.id);
    assert_eq!(
        blob.content_by_cluster.len() as u64,
        blob.num_clusters,
        "{what}: content_by_cluster has one entry per cluster"
    );
    let mut out = vec![0u8; usize_of(blob.num_clusters * cs)];
    for (i, cluster) in blob.content_by_cluster.iter().enumerate() {
        assert_eq!(
            cluster.cluster, i as u64,
            "{what}: content_by_cluster order"
        );
        let mut next = 0;
        for seg in &cluster.segments {
            assert_eq!(
                seg.offset_in_cluster, next,
                "{what} cluster {i}: segments must be contiguous"
            );
            next = seg.offset_in_cluster + seg.length;
            assert!(
                next <= cs,
                "{what} cluster {i}: segment past the cluster end"
            );
            let logical = cluster.cluster * cs + seg.offset_in_cluster;
            let range = usize_of(logical)..usize_of(logical + seg.length);
            seg.content.fill_at(&mut out[range], logical);
        }
        assert_eq!(
            next, cs,
            "{what} cluster {i}: segments must cover the cluster"
        );
    }
    out
}

/// Device clusters that a clean blobstore marks used: the metadata clusters (`0..md_clusters`)
/// plus every cluster allocated to any blob, sorted. For a clean image this equals the on-disk
/// used-cluster mask; for the dirty image it is what recovery rebuilds.
pub fn expected_used_clusters(manifest: &Manifest) -> Vec<u64> {
    let mut used: BTreeSet<u64> = (0..manifest.super_block.md_clusters).collect();
    for blob in &manifest.blobs {
        used.extend(blob.allocated_clusters.iter().map(|&(_, device)| device));
    }
    used.into_iter().collect()
}

/// Metadata pages in use: every page of every blob's md chain plus every extent page, sorted.
pub fn expected_used_md_pages(manifest: &Manifest) -> Vec<u64> {
    let mut used = BTreeSet::new();
    for blob in &manifest.blobs {
        used.extend(blob.md_chain.iter().map(|p| p.md_page));
        used.extend(blob.extent_pages.iter().map(|p| p.md_page));
    }
    used.into_iter().collect()
}

/// Bits of the used-blob-id mask: each blob's first md page, sorted.
pub fn expected_used_blobids(manifest: &Manifest) -> Vec<u64> {
    let used: BTreeSet<u64> = manifest.blobs.iter().map(|b| b.md_page).collect();
    used.into_iter().collect()
}

fn usize_of(n: u64) -> usize {
    usize::try_from(n).expect("fixture sizes fit in usize")
}

// ---------------------------------------------------------------------------------------------
// Manifest schema
// ---------------------------------------------------------------------------------------------

/// One fixture's manifest (`NAME.json`). Fields not listed here (free-text notes) are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    /// Fixture name, e.g. `p1-blobcli-basic`.
    pub name: String,
    /// File name of the compressed image, e.g. `p1-blobcli-basic.img.gz`.
    pub image: String,
    /// Size of the gunzipped image in bytes.
    pub image_bytes: u64,
    /// Lower-case hex sha256 of the gunzipped image.
    pub image_sha256: String,
    /// Which SPDK program wrote the image.
    pub written_by: String,
    /// The steps that made the image, in order (free text).
    pub how_made: Vec<String>,
    /// The decoded super block (page 0), plus a few derived counts.
    pub super_block: SuperBlock,
    /// `blobcli -D`'s super block lines, verbatim (key -> value).
    #[serde(rename = "blobcli_D_super")]
    pub blobcli_d_super: BTreeMap<String, String>,
    /// `blobcli -s bs` output, verbatim (key -> value).
    pub blobcli_s_bs: BTreeMap<String, String>,
    /// The three used-masks as stored on disk (stale in the dirty image).
    pub masks_on_disk: MasksOnDisk,
    /// Every metadata page in use, in page order.
    pub md_pages_in_use: Vec<MdPageInUse>,
    /// Every blob, in md page order.
    pub blobs: Vec<BlobManifest>,
    /// Whether the read-only readback left the image untouched.
    pub image_unchanged_by_readonly_readback: bool,
    /// Disagreements between SPDK's dump and the raw parse (empty in every fixture).
    pub crosscheck_problems: Vec<serde_json::Value>,
    /// Only for the dirty image: what SPDK's own recovery (`blobcli -R` on a copy) reported.
    #[serde(default)]
    pub recovery: Option<Recovery>,
}

impl Manifest {
    /// The blob with this id, if the manifest lists it.
    pub fn blob(&self, id: u64) -> Option<&BlobManifest> {
        self.blobs.iter().find(|b| b.id == id)
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.super_block.cluster_size
    }

    /// Whether the image was stored with `clean = 1`.
    pub fn is_clean(&self) -> bool {
        self.super_block.clean != 0
    }
}

/// The decoded super block.
#[derive(Debug, Clone, Deserialize)]
pub struct SuperBlock {
    /// `"SPDKBLOB"`.
    pub signature: String,
    /// On-disk format version (3).
    pub version: u32,
    /// Super block length in bytes (4096).
    pub length: u32,
    /// 1 if the blobstore was unloaded cleanly, 0 if it needs recovery.
    pub clean: u32,
    /// The super blob id, `None` when none is set.
    pub super_blob: Option<u64>,
    /// The super blob id as stored (`0xffffffffffffffff` = none), parsed from `super_blob_hex`.
    #[serde(rename = "super_blob_hex", deserialize_with = "de_hex_u64")]
    pub super_blob_raw: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// First page of the used-md-page mask.
    pub used_page_mask_start: u64,
    /// Length of the used-md-page mask, in pages.
    pub used_page_mask_len: u64,
    /// First page of the used-cluster mask.
    pub used_cluster_mask_start: u64,
    /// Length of the used-cluster mask, in pages.
    pub used_cluster_mask_len: u64,
    /// First page of the used-blob-id mask.
    pub used_blobid_mask_start: u64,
    /// Length of the used-blob-id mask, in pages.
    pub used_blobid_mask_len: u64,
    /// First metadata page (in pages from the device start).
    pub md_start: u64,
    /// Number of metadata pages.
    pub md_len: u64,
    /// The blobstore type as text (NULs trimmed): `""` or `"LVOLSTORE"`.
    pub bstype: String,
    /// The blobstore type exactly as stored: 16 bytes, NUL-padded (from `bstype_hex`).
    #[serde(rename = "bstype_hex", deserialize_with = "de_hex_16")]
    pub bstype_raw: [u8; 16],
    /// Device size in bytes as recorded in the super block.
    pub size: u64,
    /// I/O unit size in bytes.
    pub io_unit_size: u64,
    /// The super block's CRC32C (parsed from hex).
    #[serde(deserialize_with = "de_hex_u32")]
    pub crc: u32,
    /// `size / cluster_size`.
    pub total_clusters: u64,
    /// Clusters holding metadata (the first `md_clusters` device clusters).
    pub md_clusters: u64,
    /// Free clusters as `blobcli -s bs` reports them (after recovery, for the dirty image).
    pub free_clusters: u64,
    /// Where `free_clusters` comes from (free text).
    pub free_clusters_note: String,
}

/// The three used-masks as stored on disk.
#[derive(Debug, Clone, Deserialize)]
pub struct MasksOnDisk {
    /// Used metadata pages (one bit per md page).
    pub used_md_pages: Mask,
    /// Used device clusters.
    pub used_clusters: Mask,
    /// Used blob ids (one bit per md page that starts a blob).
    pub used_blobids: Mask,
}

/// One on-disk bit mask.
#[derive(Debug, Clone, Deserialize)]
pub struct Mask {
    /// Length of the mask in bits, as stored.
    pub length_bits: u64,
    /// The indices of the set bits, ascending.
    pub set_bits: Vec<u64>,
}

/// One metadata page in use.
#[derive(Debug, Clone, Deserialize)]
pub struct MdPageInUse {
    /// The md page index (relative to `md_start`).
    pub index: u64,
    /// The page's blob id field (for extent pages this may not be the owner; see the README).
    #[serde(rename = "blob_id_hex", deserialize_with = "de_hex_u64")]
    pub blob_id: u64,
    /// The page's sequence number within its chain.
    pub sequence: u32,
    /// The next page of the chain, `None` when the field is `0xFFFFFFFF` (invalid).
    pub next: Option<u32>,
    /// The page's CRC32C.
    #[serde(deserialize_with = "de_hex_u32")]
    pub crc: u32,
    /// Which masks have this page: `"md"` (used md pages) and/or `"blob"` (used blob ids).
    pub in_used_mask: Vec<String>,
}

/// One blob.
#[derive(Debug, Clone, Deserialize)]
pub struct BlobManifest {
    /// The blob id (`1 << 32 | md_page`).
    pub id: u64,
    /// The blob's first md page.
    pub md_page: u64,
    /// The blob's md chain (not including extent pages), in order.
    pub md_chain: Vec<MdChainPage>,
    /// Size in clusters.
    pub num_clusters: u64,
    /// Size in bytes (`num_clusters * cluster_size`).
    pub size_bytes: u64,
    /// THIN_PROV is set.
    pub thin_provisioned: bool,
    /// READ_ONLY (data_ro bit 0) is set.
    pub read_only: bool,
    /// The three flag words.
    pub flags: BlobFlags,
    /// User xattrs, name -> value bytes exactly as stored (NULs included).
    #[serde(deserialize_with = "de_hex_map")]
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// User xattrs rendered as text with a note on trailing NULs (for messages only).
    pub xattrs_as_text: BTreeMap<String, String>,
    /// Internal xattrs (e.g. `SNAP`), name -> value bytes.
    #[serde(deserialize_with = "de_hex_map")]
    pub internal_xattrs: BTreeMap<String, Vec<u8>>,
    /// The parent snapshot's id (from the `SNAP` internal xattr), if any.
    pub parent_snapshot_id: Option<u64>,
    /// Ids of this snapshot's clones.
    #[serde(deserialize_with = "de_hex_u64_list")]
    pub clones: Vec<u64>,
    /// The extent table descriptor.
    pub extent_table: ExtentTable,
    /// The extent pages named by the extent table, in table order.
    pub extent_pages: Vec<ExtentPage>,
    /// The RLE extent descriptor (`null` in every fixture: they all use extent tables).
    pub extent_rle: Option<serde_json::Value>,
    /// Allocated clusters as `(blob cluster, device cluster)`, ascending by blob cluster.
    pub allocated_clusters: Vec<(u64, u64)>,
    /// `allocated_clusters.len()`.
    pub num_allocated_clusters: u64,
    /// Lower-case hex sha256 of the whole logical blob (`num_clusters * cluster_size` bytes).
    pub sha256: String,
    /// Per blob cluster: its content and the device cluster that backs it.
    pub content_by_cluster: Vec<ClusterContent>,
}

impl BlobManifest {
    /// A user xattr's value bytes.
    pub fn xattr(&self, name: &str) -> Option<&[u8]> {
        self.xattrs.get(name).map(Vec::as_slice)
    }

    /// The device cluster backing blob cluster `cluster`, if allocated in this blob.
    pub fn device_cluster(&self, cluster: u64) -> Option<u64> {
        self.allocated_clusters
            .iter()
            .find(|&&(c, _)| c == cluster)
            .map(|&(_, d)| d)
    }
}

/// One page of a blob's md chain.
#[derive(Debug, Clone, Deserialize)]
pub struct MdChainPage {
    /// The md page index.
    pub md_page: u64,
    /// Its sequence number (0, 1, 2, ...).
    pub sequence: u32,
    /// The next page, `None` for the last page (`0xFFFFFFFF` on disk).
    pub next: Option<u32>,
    /// The page's CRC32C.
    #[serde(deserialize_with = "de_hex_u32")]
    pub crc: u32,
}

/// A blob's three flag words, parsed from the manifest's hex strings.
#[derive(Debug, Clone, Deserialize)]
pub struct BlobFlags {
    /// `invalid_flags` (THIN_PROV = 1, INTERNAL_XATTR = 2, EXTENT_TABLE = 4).
    #[serde(rename = "invalid_flags", deserialize_with = "de_hex_u64")]
    pub invalid: u64,
    /// `data_ro_flags` (READ_ONLY = 1).
    #[serde(rename = "data_ro_flags", deserialize_with = "de_hex_u64")]
    pub data_ro: u64,
    /// `md_ro_flags`.
    #[serde(rename = "md_ro_flags", deserialize_with = "de_hex_u64")]
    pub md_ro: u64,
    /// The set flags by name, e.g. `["THIN_PROV", "EXTENT_TABLE"]`.
    pub decoded: Vec<String>,
}

/// The extent table descriptor.
#[derive(Debug, Clone, Deserialize)]
pub struct ExtentTable {
    /// The blob size in clusters, as the descriptor records it.
    pub num_clusters: u64,
    /// Run-length entries of extent page indices (`page_idx` 0 = no extent page).
    pub entries: Vec<ExtentTableEntry>,
}

/// One run of the extent table.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct ExtentTableEntry {
    /// The md page index of the extent page (0 = unallocated run).
    pub page_idx: u32,
    /// How many consecutive table slots this run covers.
    pub num_pages: u32,
}

/// One extent page.
#[derive(Debug, Clone, Deserialize)]
pub struct ExtentPage {
    /// The md page index.
    pub md_page: u64,
    /// The page's blob id field as stored (not rewritten when SPDK moves the page to a snapshot).
    #[serde(rename = "page_id_field_hex", deserialize_with = "de_hex_u64")]
    pub page_id_field: u64,
    /// Whether `page_id_field` equals the owning blob's id.
    pub page_id_field_equals_owner: bool,
    /// The first blob cluster this page describes.
    pub start_cluster_idx: u64,
    /// How many cluster entries the page holds.
    pub entries: u64,
    /// The page's CRC32C.
    #[serde(deserialize_with = "de_hex_u32")]
    pub crc: u32,
}

/// One blob cluster's content and backing.
#[derive(Debug, Clone, Deserialize)]
pub struct ClusterContent {
    /// The blob cluster index.
    pub cluster: u64,
    /// Summary, e.g. `"P(11)"` or `"zeros @[0x0,0x40000); P(13) @[0x40000,0x42000); ..."`.
    pub content: String,
    /// The cluster's content as half-open segments, offsets relative to the cluster start.
    pub segments: Vec<Segment>,
    /// Whether this blob has the cluster allocated.
    pub allocated: bool,
    /// The device cluster backing it (`None` = not allocated here: reads go to the parent, or
    /// give zeros).
    pub device_cluster: Option<u64>,
}

/// One segment of a cluster.
#[derive(Debug, Clone, Deserialize)]
pub struct Segment {
    /// Start, in bytes from the cluster start.
    pub offset_in_cluster: u64,
    /// Length in bytes.
    pub length: u64,
    /// What the bytes are.
    pub content: Pattern,
}

/// A data pattern as the manifests name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum Pattern {
    /// `P(s)`: byte at blob logical offset `o` is `(o*31 + s) % 251`.
    P(u64),
    /// `fill 0xNN`: every byte is `NN`.
    Fill(u8),
    /// `zeros`: every byte is 0.
    Zeros,
}

impl Pattern {
    /// Fills `buf` with this pattern, `buf[0]` being at blob logical offset `logical_offset`.
    pub fn fill_at(&self, buf: &mut [u8], logical_offset: u64) {
        match *self {
            Pattern::Zeros => buf.fill(0),
            Pattern::Fill(b) => buf.fill(b),
            Pattern::P(seed) => {
                // Incremental form of (o*31 + s) % 251: fast enough in debug builds.
                let mut v = u32::from(pattern_byte(seed, logical_offset));
                for byte in buf {
                    *byte = v as u8;
                    v += 31;
                    if v >= 251 {
                        v -= 251;
                    }
                }
            }
        }
    }

    /// The byte at blob logical offset `offset`.
    pub fn byte_at(&self, offset: u64) -> u8 {
        match *self {
            Pattern::Zeros => 0,
            Pattern::Fill(b) => b,
            Pattern::P(seed) => pattern_byte(seed, offset),
        }
    }
}

impl TryFrom<String> for Pattern {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl std::str::FromStr for Pattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "zeros" {
            return Ok(Pattern::Zeros);
        }
        if let Some(hex) = s.strip_prefix("fill 0x") {
            return u8::from_str_radix(hex, 16)
                .map(Pattern::Fill)
                .map_err(|e| format!("bad fill pattern {s:?}: {e}"));
        }
        if let Some(seed) = s.strip_prefix("P(").and_then(|r| r.strip_suffix(')')) {
            return seed
                .parse()
                .map(Pattern::P)
                .map_err(|e| format!("bad P(s) pattern {s:?}: {e}"));
        }
        Err(format!("unknown content pattern {s:?}"))
    }
}

/// Formats as the manifests spell it: `P(7)`, `fill 0xAB`, `zeros`.
impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::P(s) => write!(f, "P({s})"),
            Pattern::Fill(b) => write!(f, "fill 0x{b:02X}"),
            Pattern::Zeros => f.write_str("zeros"),
        }
    }
}

/// The manifests' one-line summary of a cluster's segments: the pattern alone for one
/// segment, else `"PAT @[0xSTART,0xEND); PAT @[...)"`. Matches [`ClusterContent::content`].
pub fn describe_segments(segments: &[Segment]) -> String {
    match segments {
        [only] => only.content.to_string(),
        _ => segments
            .iter()
            .map(|s| {
                format!(
                    "{} @[{:#x},{:#x})",
                    s.content,
                    s.offset_in_cluster,
                    s.offset_in_cluster + s.length
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
    }
}

/// What SPDK's own recovery of the dirty image (`blobcli -R` on a copy) reported.
#[derive(Debug, Clone, Deserialize)]
pub struct Recovery {
    /// `blobcli -R`'s exit code (0).
    #[serde(rename = "blobcli_-R_exit_code")]
    pub exit_code: i32,
    /// Its messages, e.g. `"Performing recovery on blobstore"`, `"Recover: blob 0x1"`.
    #[serde(rename = "blobcli_-R_messages")]
    pub messages: Vec<String>,
    /// Super block fields after recovery.
    pub super_after_recovery: SuperAfterRecovery,
    /// The masks as recovery rebuilt them.
    pub masks_after_recovery: MasksAfterRecovery,
    /// Md pages that `blobcli -D` showed after recovery.
    pub md_pages_in_dump_after_recovery: Vec<u64>,
    /// `blobcli -s bs` after recovery, verbatim (includes `"# free clusters"`).
    pub show_bs_after_recovery: BTreeMap<String, String>,
    /// Blob ids that `blobcli -l blobs` listed after recovery.
    #[serde(deserialize_with = "de_hex_u64_list")]
    pub blobs_listed_after_recovery: Vec<u64>,
}

impl Recovery {
    /// The free-cluster count after recovery (`"# free clusters"` of `show_bs_after_recovery`).
    pub fn free_clusters(&self) -> u64 {
        let v = self
            .show_bs_after_recovery
            .get("# free clusters")
            .expect("show_bs_after_recovery has \"# free clusters\"");
        v.trim()
            .parse()
            .unwrap_or_else(|e| panic!("bad free-cluster count {v:?}: {e}"))
    }
}

/// Super block fields after recovery.
#[derive(Debug, Clone, Deserialize)]
pub struct SuperAfterRecovery {
    /// `clean` after recovery (1).
    pub clean: u32,
    /// Used-md-page mask length, in pages.
    pub used_page_mask_len: u64,
    /// Used-cluster mask length, in pages.
    pub used_cluster_mask_len: u64,
    /// Used-blob-id mask length, in pages.
    pub used_blobid_mask_len: u64,
}

/// The masks after recovery, as lists of set bits (no length, unlike [`Mask`]).
#[derive(Debug, Clone, Deserialize)]
pub struct MasksAfterRecovery {
    /// Used md pages.
    pub used_md_pages: Vec<u64>,
    /// Used device clusters.
    pub used_clusters: Vec<u64>,
    /// Used blob ids (md page indices).
    pub used_blobids: Vec<u64>,
}

// ---------------------------------------------------------------------------------------------
// Hex decoding for serde
// ---------------------------------------------------------------------------------------------

/// Parses a hex number with an optional `0x` prefix.
pub fn parse_hex_u64(s: &str) -> Result<u64, String> {
    let digits = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    u64::from_str_radix(digits, 16).map_err(|e| format!("bad hex number {s:?}: {e}"))
}

/// Decodes a hex byte string (`"68656c6c6f00"` -> `b"hello\0"`).
pub fn parse_hex_bytes(s: &str) -> Result<Vec<u8>, String> {
    if !s.len().is_multiple_of(2) {
        return Err(format!("odd-length hex string {s:?}"));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            s.get(i..i + 2)
                .and_then(|d| u8::from_str_radix(d, 16).ok())
                .ok_or_else(|| format!("bad hex byte string {s:?}"))
        })
        .collect()
}

fn de_hex_u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let s = String::deserialize(d)?;
    parse_hex_u64(&s).map_err(serde::de::Error::custom)
}

fn de_hex_u32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let v = de_hex_u64(d)?;
    u32::try_from(v).map_err(|_| serde::de::Error::custom(format!("{v:#x} does not fit in u32")))
}

fn de_hex_u64_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|s| parse_hex_u64(s).map_err(serde::de::Error::custom))
        .collect()
}

fn de_hex_16<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 16], D::Error> {
    let s = String::deserialize(d)?;
    let bytes = parse_hex_bytes(&s).map_err(serde::de::Error::custom)?;
    <[u8; 16]>::try_from(bytes.as_slice())
        .map_err(|_| serde::de::Error::custom(format!("expected 16 bytes, got {s:?}")))
}

fn de_hex_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, Vec<u8>>, D::Error> {
    BTreeMap::<String, String>::deserialize(d)?
        .into_iter()
        .map(|(k, v)| {
            parse_hex_bytes(&v)
                .map(|b| (k, b))
                .map_err(serde::de::Error::custom)
        })
        .collect()
}
