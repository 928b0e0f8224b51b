//! The super block: page 0 of the device, describing the whole store.
//!
//! Byte layout (little-endian, packed): signature `SPDKBLOB` @0, version u32 @8, length u32
//! @12, clean u32 @16, super_blob u64 @20, cluster_size u32 @28, used-page mask start/len @32/36,
//! used-cluster mask start/len @40/44, md_start/md_len @48/52, `bstype[16]` @56, used-blobid mask
//! start/len @72/76, size u64 @80, io_unit_size u32 @88, reserved to 4092, crc u32 @4092.

use super::mask::mask_pages;
use super::{
    page_crc, read_u32, read_u64, stored_crc, write_u32, write_u64, BLOBID_INVALID, CRC_OFFSET,
    PAGE_SIZE,
};

/// The signature every super block starts with.
pub const SIGNATURE: &[u8; 8] = b"SPDKBLOB";
/// The version Spool writes (SPDK's since v18.01).
pub const VERSION: u32 = 3;
/// The oldest version a load accepts.
pub const INITIAL_VERSION: u32 = 1;
/// Bytes of the bstype field.
pub const BSTYPE_LEN: usize = 16;

/// A blobstore type tag: 16 bytes, all zero for an untyped store (and, when a caller passes
/// it to load, a wildcard that matches any store).
pub type Bstype = [u8; BSTYPE_LEN];

/// The decoded super block. Fields hold exactly what is on disk (no defaults applied), so
/// [`SuperBlock::encode`] of a decoded block reproduces its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuperBlock {
    /// Format version, 1 to 3.
    pub version: u32,
    /// 1 after a clean unload, 0 while loaded or after a crash.
    pub clean: u32,
    /// The super blob's id, or [`BLOBID_INVALID`].
    pub super_blob: u64,
    /// Bytes per cluster.
    pub cluster_size: u32,
    /// First page of the used-md-pages mask.
    pub used_page_mask_start: u32,
    /// Pages of the used-md-pages mask.
    pub used_page_mask_len: u32,
    /// First page of the used-clusters mask.
    pub used_cluster_mask_start: u32,
    /// Pages of the used-clusters mask.
    pub used_cluster_mask_len: u32,
    /// First page of the metadata region.
    pub md_start: u32,
    /// Pages in the metadata region.
    pub md_len: u32,
    /// The store's type tag.
    pub bstype: Bstype,
    /// First page of the used-blob-ids mask.
    pub used_blobid_mask_start: u32,
    /// Pages of the used-blob-ids mask; 0 on pre-v3 stores (forces recovery on every load).
    pub used_blobid_mask_len: u32,
    /// Store size in bytes; 0 on old stores means "the device's size".
    pub size: u64,
    /// Bytes per io_unit; 0 on old stores means 4096.
    pub io_unit_size: u32,
    /// Spool's bounded-recovery marker in the reserved bytes (see
    /// [`super::root_superset`]): the nonce of the root superset record, or `None`.
    pub root_superset_nonce: Option<u64>,
}

/// Why a super block was refused. Each maps to SPDK's `-EILSEQ` on load.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SuperBlockError {
    /// Fewer than 4096 bytes were given.
    #[error("super block is {0} bytes, needs 4096 (device too small or truncated)")]
    Truncated(usize),
    /// The version is outside 1..=3.
    #[error("super block version {0} is not supported (this build reads versions 1 to 3)")]
    Version(u32),
    /// The first 8 bytes are not `SPDKBLOB`.
    #[error("super block signature is {0:?}, not \"SPDKBLOB\" (not a blobstore, or destroyed)")]
    Signature(String),
    /// The stored CRC does not match the bytes.
    #[error("super block CRC mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Crc {
        /// The CRC on disk.
        stored: u32,
        /// The CRC of the bytes.
        computed: u32,
    },
    /// A field is out of range for this device (named, with the reason).
    #[error("super block field {field}: {reason}")]
    Field {
        /// The field's name.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

impl SuperBlock {
    /// Decodes and checks page 0 in SPDK's order (version, signature, CRC). Geometry against
    /// a device is checked separately by [`SuperBlock::check_geometry`].
    pub fn decode(page: &[u8]) -> Result<SuperBlock, SuperBlockError> {
        if page.len() < PAGE_SIZE {
            return Err(SuperBlockError::Truncated(page.len()));
        }
        let version = read_u32(page, 8);
        if !(INITIAL_VERSION..=VERSION).contains(&version) {
            return Err(SuperBlockError::Version(version));
        }
        if &page[..8] != SIGNATURE {
            return Err(SuperBlockError::Signature(
                String::from_utf8_lossy(&page[..8]).into_owned(),
            ));
        }
        let stored = stored_crc(page);
        let computed = page_crc(page);
        if stored != computed {
            return Err(SuperBlockError::Crc { stored, computed });
        }
        let mut bstype = [0u8; BSTYPE_LEN];
        bstype.copy_from_slice(&page[56..56 + BSTYPE_LEN]);
        Ok(SuperBlock {
            version,
            clean: read_u32(page, 16),
            super_blob: read_u64(page, 20),
            cluster_size: read_u32(page, 28),
            used_page_mask_start: read_u32(page, 32),
            used_page_mask_len: read_u32(page, 36),
            used_cluster_mask_start: read_u32(page, 40),
            used_cluster_mask_len: read_u32(page, 44),
            md_start: read_u32(page, 48),
            md_len: read_u32(page, 52),
            bstype,
            used_blobid_mask_start: read_u32(page, 72),
            used_blobid_mask_len: read_u32(page, 76),
            size: read_u64(page, 80),
            io_unit_size: read_u32(page, 88),
            root_superset_nonce: super::root_superset::decode_marker(page),
        })
    }

    /// Encodes into a 4096-byte page with the CRC sealed. The `length` field is 4096.
    pub fn encode(&self) -> Vec<u8> {
        let mut page = vec![0u8; PAGE_SIZE];
        page[..8].copy_from_slice(SIGNATURE);
        write_u32(&mut page, 8, self.version);
        write_u32(&mut page, 12, PAGE_SIZE as u32);
        write_u32(&mut page, 16, self.clean);
        write_u64(&mut page, 20, self.super_blob);
        write_u32(&mut page, 28, self.cluster_size);
        write_u32(&mut page, 32, self.used_page_mask_start);
        write_u32(&mut page, 36, self.used_page_mask_len);
        write_u32(&mut page, 40, self.used_cluster_mask_start);
        write_u32(&mut page, 44, self.used_cluster_mask_len);
        write_u32(&mut page, 48, self.md_start);
        write_u32(&mut page, 52, self.md_len);
        page[56..56 + BSTYPE_LEN].copy_from_slice(&self.bstype);
        write_u32(&mut page, 72, self.used_blobid_mask_start);
        write_u32(&mut page, 76, self.used_blobid_mask_len);
        write_u64(&mut page, 80, self.size);
        write_u32(&mut page, 88, self.io_unit_size);
        if let Some(nonce) = self.root_superset_nonce {
            super::root_superset::encode_marker(&mut page, nonce);
        }
        let crc = page_crc(&page);
        write_u32(&mut page, CRC_OFFSET, crc);
        page
    }

    /// The store size in bytes: `size`, or the device's size when `size` is 0.
    pub fn effective_size(&self, device_bytes: u64) -> u64 {
        if self.size == 0 {
            device_bytes
        } else {
            self.size
        }
    }

    /// Bytes per io_unit: `io_unit_size`, or 4096 when it is 0.
    pub fn effective_io_unit(&self) -> u32 {
        if self.io_unit_size == 0 {
            PAGE_SIZE as u32
        } else {
            self.io_unit_size
        }
    }

    /// Whether the masks can be trusted (clean unload and a blob-id mask exists); otherwise
    /// a load must replay the metadata.
    pub fn masks_trusted(&self) -> bool {
        self.clean == 1 && self.used_blobid_mask_len != 0
    }

    /// Total clusters of the store on a device of `device_bytes`.
    pub fn total_clusters(&self, device_bytes: u64) -> u64 {
        self.effective_size(device_bytes) / u64::from(self.cluster_size.max(1))
    }

    /// Checks every region against a device of `device_bytes` and block size `block_size`,
    /// so nothing later indexes outside the device or divides by zero.
    pub fn check_geometry(
        &self,
        device_bytes: u64,
        block_size: u32,
    ) -> Result<(), SuperBlockError> {
        let field = |field: &'static str, reason: String| SuperBlockError::Field { field, reason };
        let size = self.effective_size(device_bytes);
        if size > device_bytes {
            return Err(field(
                "size",
                format!("{size} bytes is larger than the device's {device_bytes} bytes"),
            ));
        }
        let page = PAGE_SIZE as u32;
        if self.cluster_size == 0 || !self.cluster_size.is_multiple_of(page) {
            return Err(field(
                "cluster_size",
                format!("{} is not a non-zero multiple of 4096", self.cluster_size),
            ));
        }
        let io_unit = self.effective_io_unit();
        if !io_unit.is_power_of_two() || io_unit > page || io_unit < 512 {
            return Err(field(
                "io_unit_size",
                format!("{io_unit} is not a power of two between 512 and 4096"),
            ));
        }
        if io_unit < block_size {
            return Err(field(
                "io_unit_size",
                format!("{io_unit} is smaller than the device's block size {block_size}"),
            ));
        }
        let total_clusters = self.total_clusters(device_bytes);
        if total_clusters == 0 {
            return Err(field(
                "cluster_size",
                format!("{} is larger than the store", self.cluster_size),
            ));
        }
        if total_clusters > u64::from(u32::MAX) {
            return Err(field(
                "size",
                format!("{total_clusters} clusters do not fit 32-bit cluster indexes"),
            ));
        }
        let pages = size / PAGE_SIZE as u64;
        let region = |name: &'static str, start: u32, len: u32| -> Result<(), SuperBlockError> {
            if start == 0 && len != 0 {
                return Err(field(name, "starts at page 0, over the super block".into()));
            }
            if u64::from(start) + u64::from(len) > pages {
                return Err(field(
                    name,
                    format!(
                        "pages {start}..{} reach past the store's {pages} pages",
                        u64::from(start) + u64::from(len)
                    ),
                ));
            }
            Ok(())
        };
        region(
            "used_page_mask",
            self.used_page_mask_start,
            self.used_page_mask_len,
        )?;
        region(
            "used_cluster_mask",
            self.used_cluster_mask_start,
            self.used_cluster_mask_len,
        )?;
        region(
            "used_blobid_mask",
            self.used_blobid_mask_start,
            self.used_blobid_mask_len,
        )?;
        region("md", self.md_start, self.md_len)?;
        // Each mask must hold its bits (a load writes the masks back after recovery and at
        // unload), and no two regions may overlap (or writing one would wipe another).
        let md_bits = u64::from(self.md_len);
        let needs = [
            (
                "used_page_mask",
                self.used_page_mask_len,
                mask_pages(md_bits),
                false,
            ),
            (
                "used_cluster_mask",
                self.used_cluster_mask_len,
                mask_pages(total_clusters),
                false,
            ),
            // A pre-v3 store has no blob-id mask (len 0): it is recovered on every load.
            (
                "used_blobid_mask",
                self.used_blobid_mask_len,
                mask_pages(md_bits),
                true,
            ),
        ];
        for (name, len, needed, may_be_absent) in needs {
            if u64::from(len) < needed && !(may_be_absent && len == 0) {
                return Err(field(
                    name,
                    format!("{len} page(s) cannot hold its bits; it needs {needed}"),
                ));
            }
        }
        // Sorted by start, each region is checked against the next one; a region of no
        // pages (a pre-v3 store's blob-id mask) overlaps nothing and is left out, or it
        // could sit between two that overlap and hide them from each other.
        let mut regions: Vec<(&'static str, u32, u32)> = [
            (
                "used_page_mask",
                self.used_page_mask_start,
                self.used_page_mask_len,
            ),
            (
                "used_cluster_mask",
                self.used_cluster_mask_start,
                self.used_cluster_mask_len,
            ),
            (
                "used_blobid_mask",
                self.used_blobid_mask_start,
                self.used_blobid_mask_len,
            ),
            ("md", self.md_start, self.md_len),
        ]
        .into_iter()
        .filter(|&(_, _, len)| len != 0)
        .collect();
        regions.sort_by_key(|&(_, start, _)| start);
        for pair in regions.windows(2) {
            let ((a, a_start, a_len), (b, b_start, b_len)) = (pair[0], pair[1]);
            if u64::from(a_start) + u64::from(a_len) > u64::from(b_start) {
                return Err(field(
                    b,
                    format!(
                        "pages {b_start}..{} overlap {a} (pages {a_start}..{})",
                        u64::from(b_start) + u64::from(b_len),
                        u64::from(a_start) + u64::from(a_len)
                    ),
                ));
            }
        }
        // The masks live in the metadata clusters (SPDK's layout puts them between the
        // super block and the md region): a mask region in a data cluster would be written
        // over a blob's data at the next unload or recovery.
        let md_area_pages =
            super::layout::md_clusters(self.md_start, self.md_len, self.cluster_size)
                * u64::from(self.cluster_size / page);
        for (name, start, len) in [
            (
                "used_page_mask",
                self.used_page_mask_start,
                self.used_page_mask_len,
            ),
            (
                "used_cluster_mask",
                self.used_cluster_mask_start,
                self.used_cluster_mask_len,
            ),
            (
                "used_blobid_mask",
                self.used_blobid_mask_start,
                self.used_blobid_mask_len,
            ),
        ] {
            let end = u64::from(start) + u64::from(len);
            if len != 0 && end > md_area_pages {
                return Err(field(
                    name,
                    format!(
                        "pages {start}..{end} lie outside the metadata clusters (pages \
                         0..{md_area_pages}): a mask there would be written over blob data"
                    ),
                ));
            }
        }
        if self.md_start == 0 {
            return Err(field("md_start", "0 is the super block".into()));
        }
        if self.md_len == 0 {
            return Err(field("md_len", "0 metadata pages".into()));
        }
        if self.md_len > u32::MAX - 1 {
            return Err(field(
                "md_len",
                format!("{} pages is too many", self.md_len),
            ));
        }
        Ok(())
    }
}

impl Default for SuperBlock {
    fn default() -> Self {
        SuperBlock {
            version: VERSION,
            clean: 0,
            super_blob: BLOBID_INVALID,
            cluster_size: 1 << 20,
            used_page_mask_start: 0,
            used_page_mask_len: 0,
            used_cluster_mask_start: 0,
            used_cluster_mask_len: 0,
            md_start: 0,
            md_len: 0,
            bstype: [0; BSTYPE_LEN],
            used_blobid_mask_start: 0,
            used_blobid_mask_len: 0,
            size: 0,
            io_unit_size: 0,
            root_superset_nonce: None,
        }
    }
}

/// A bstype from a name: its bytes, NUL-padded to 16 (an error if longer).
pub fn bstype_from_name(name: &str) -> Option<Bstype> {
    let bytes = name.as_bytes();
    if bytes.len() > BSTYPE_LEN {
        return None;
    }
    let mut bstype = [0u8; BSTYPE_LEN];
    bstype[..bytes.len()].copy_from_slice(bytes);
    Some(bstype)
}

/// A bstype as text: up to the first NUL, lossy UTF-8 (empty for an untyped store).
pub fn bstype_name(bstype: &Bstype) -> String {
    let end = bstype.iter().position(|&b| b == 0).unwrap_or(BSTYPE_LEN);
    String::from_utf8_lossy(&bstype[..end]).into_owned()
}

/// Whether a store of type `on_disk` may be loaded by a caller asking for `wanted`: equal,
/// or `wanted` all zero (the wildcard).
pub fn bstype_matches(wanted: &Bstype, on_disk: &Bstype) -> bool {
    wanted.iter().all(|&b| b == 0) || wanted == on_disk
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SuperBlock {
        SuperBlock {
            clean: 1,
            used_page_mask_start: 1,
            used_page_mask_len: 1,
            used_cluster_mask_start: 2,
            used_cluster_mask_len: 1,
            used_blobid_mask_start: 3,
            used_blobid_mask_len: 1,
            md_start: 4,
            md_len: 64,
            size: 64 << 20,
            io_unit_size: 4096,
            root_superset_nonce: None,
            bstype: bstype_from_name("LVOLSTORE").unwrap(),
            ..SuperBlock::default()
        }
    }

    #[test]
    fn encodes_at_the_documented_offsets_and_round_trips() {
        let page = sample().encode();
        assert_eq!(&page[0..8], b"SPDKBLOB");
        assert_eq!(read_u32(&page, 8), 3);
        assert_eq!(read_u32(&page, 12), 4096);
        assert_eq!(read_u32(&page, 16), 1);
        assert_eq!(read_u64(&page, 20), u64::MAX);
        assert_eq!(read_u32(&page, 28), 1 << 20);
        assert_eq!(read_u32(&page, 48), 4);
        assert_eq!(read_u32(&page, 52), 64);
        assert_eq!(&page[56..65], b"LVOLSTORE");
        assert_eq!(read_u32(&page, 72), 3);
        assert_eq!(read_u64(&page, 80), 64 << 20);
        assert_eq!(read_u32(&page, 88), 4096);
        assert!(page[92..4092].iter().all(|&b| b == 0));
        assert_eq!(read_u32(&page, 4092), crate::format::crc32c(&page[..4092]));
        assert_eq!(SuperBlock::decode(&page).unwrap(), sample());
    }

    #[test]
    fn refuses_each_corruption_with_its_reason() {
        let good = sample().encode();
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(
            SuperBlock::decode(&bad),
            Err(SuperBlockError::Signature(_))
        ));
        for version in [0u32, 4, 99] {
            let mut bad = sample();
            bad.version = version;
            assert_eq!(
                SuperBlock::decode(&bad.encode()),
                Err(SuperBlockError::Version(version))
            );
        }
        let mut bad = good.clone();
        bad[100] ^= 1;
        assert!(matches!(
            SuperBlock::decode(&bad),
            Err(SuperBlockError::Crc { .. })
        ));
        assert_eq!(
            SuperBlock::decode(&good[..100]),
            Err(SuperBlockError::Truncated(100))
        );
        let decoded = SuperBlock::decode(&good).unwrap();
        assert!(decoded.check_geometry(64 << 20, 4096).is_ok());
        assert!(matches!(
            decoded.check_geometry(32 << 20, 4096),
            Err(SuperBlockError::Field { field: "size", .. })
        ));
        let mut zero_cluster = decoded.clone();
        zero_cluster.cluster_size = 0;
        assert!(zero_cluster.check_geometry(64 << 20, 4096).is_err());
    }

    #[test]
    fn masks_must_hold_their_bits_and_regions_must_not_overlap() {
        let mut short = sample();
        short.used_cluster_mask_len = 0;
        let err = short.check_geometry(64 << 20, 4096).unwrap_err();
        assert!(err.to_string().contains("used_cluster_mask"), "{err}");
        let mut overlap = sample();
        overlap.used_cluster_mask_len = 3; // pages 2..5 cover the blob-id mask and md page 4
        let err = overlap.check_geometry(64 << 20, 4096).unwrap_err();
        assert!(err.to_string().contains("overlap"), "{err}");
        let mut pre_v3 = sample();
        pre_v3.used_blobid_mask_len = 0;
        pre_v3.used_blobid_mask_start = 0;
        assert!(
            pre_v3.check_geometry(64 << 20, 4096).is_ok(),
            "no blob-id mask is allowed"
        );
    }

    #[test]
    fn an_empty_region_between_two_does_not_hide_their_overlap() {
        // The fuzz finding `store_load-reload-blob-set-differs`: a pre-v3 store (no blob-id
        // mask, its start left at page 3) whose used-cluster mask claims pages 2..6, over md
        // pages 0 and 1 (device pages 4 and 5). Sorted by start, the empty blob-id mask sat
        // between the cluster mask and the md region, so the overlap went unseen and every
        // mask write zeroed the first two md pages.
        let mut block = sample();
        block.used_blobid_mask_len = 0;
        block.used_cluster_mask_len = 4;
        let err = block.check_geometry(64 << 20, 4096).unwrap_err();
        assert_eq!(
            err.to_string(),
            SuperBlockError::Field {
                field: "md",
                reason: "pages 4..68 overlap used_cluster_mask (pages 2..6)".into()
            }
            .to_string()
        );
        // An empty region anywhere else is still fine, wherever it starts.
        for start in [0, 1, 3, 4, 30, 67, 68] {
            let mut ok = sample();
            ok.used_blobid_mask_len = 0;
            ok.used_blobid_mask_start = start;
            assert!(ok.check_geometry(64 << 20, 4096).is_ok(), "start {start}");
        }
    }

    #[test]
    fn bstype_zero_is_a_wildcard() {
        let lvs = bstype_from_name("LVOLSTORE").unwrap();
        let other = bstype_from_name("BLOBFS").unwrap();
        assert!(bstype_matches(&[0; 16], &lvs));
        assert!(bstype_matches(&lvs, &lvs));
        assert!(!bstype_matches(&other, &lvs));
        assert!(!bstype_matches(&lvs, &[0; 16]));
        assert_eq!(bstype_name(&lvs), "LVOLSTORE");
        assert!(bstype_from_name("seventeen-bytes!!").is_none());
    }
}
