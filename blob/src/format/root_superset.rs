//! The root superset: Spool's record of where blob root pages can be, so a dirty load reads
//! those md pages only instead of the whole md region (docs/format.md, "Bounded recovery").
//!
//! Two pieces, both invisible to SPDK's loader:
//! - the **marker**, 16 bytes at the start of the super block's reserved area (offset 92):
//!   `SPOOLRS1` then a random nonce u64. Spool writes it only in a super block with
//!   `clean = 0`; a clean super block never carries it.
//! - the **record**, written over the used-blob-id mask region while the store is dirty (no
//!   loader reads the masks of a dirty store): a 64-byte header then a bitmap with one bit
//!   per chunk of `1 << shift` md pages, set when the chunk may hold a blob's root page.
//!
//! Header (little-endian): magic `SPOOLRSS` @0 (its first byte is not a mask type, 0-2),
//! version u32 @8, nonce u64 @12, md_len u32 @20, shift u32 @24, bits u32 @28, CRC-32C u32
//! @32 over the header (this field zero) and the bitmap bytes; zero to @64; bitmap @64.
//!
//! A dirty load trusts the record only when the super block's marker carries the same
//! nonce, the header matches the store's geometry and the CRC is good; anything else (no
//! marker, SPDK's blob-id mask written there by its recovery or clean unload, a torn write)
//! means the full scan.

use super::{crc32c, read_u32, read_u64, write_u32, write_u64, PAGE_SIZE};

/// Offset of the marker in the super block (the first reserved byte).
pub const MARKER_OFFSET: usize = 92;
/// The marker's magic.
pub const MARKER_MAGIC: &[u8; 8] = b"SPOOLRS1";
/// Bytes of the marker (magic, nonce).
pub const MARKER_LEN: usize = 16;
/// The record's magic.
pub const RECORD_MAGIC: &[u8; 8] = b"SPOOLRSS";
/// The record format version.
pub const RECORD_VERSION: u32 = 1;
/// Bytes of the record header; the bitmap follows.
pub const RECORD_HEADER_LEN: usize = 64;
/// Smallest chunk: 64 md pages (256 KiB), one batched read of a load.
pub const MIN_SHIFT: u32 = 6;
/// Offset of the CRC in the header.
const CRC_AT: usize = 32;

/// Reads the marker's nonce from a super block page, if it carries one.
pub fn decode_marker(page: &[u8]) -> Option<u64> {
    let magic = page.get(MARKER_OFFSET..MARKER_OFFSET + 8)?;
    if magic != MARKER_MAGIC || page.len() < MARKER_OFFSET + MARKER_LEN {
        return None;
    }
    Some(read_u64(page, MARKER_OFFSET + 8))
}

/// Writes the marker with `nonce` into a super block page (before its CRC is sealed).
pub fn encode_marker(page: &mut [u8], nonce: u64) {
    page[MARKER_OFFSET..MARKER_OFFSET + 8].copy_from_slice(MARKER_MAGIC);
    write_u64(page, MARKER_OFFSET + 8, nonce);
}

/// The chunk shift a record of a store with `md_len` md pages uses in a region of
/// `region_pages` pages: the smallest at least [`MIN_SHIFT`] whose bitmap fits. `None` when
/// the region cannot hold even one bit (no blob-id mask region: a pre-v3 store).
pub fn chunk_shift(md_len: u32, region_pages: u32) -> Option<u32> {
    let room = (region_pages as usize * PAGE_SIZE).checked_sub(RECORD_HEADER_LEN)?;
    if room == 0 {
        return None;
    }
    (MIN_SHIFT..32).find(|&shift| chunk_count(md_len, shift).div_ceil(8) as usize <= room)
}

/// Chunks of `1 << shift` pages covering `md_len` pages.
pub fn chunk_count(md_len: u32, shift: u32) -> u64 {
    u64::from(md_len).div_ceil(1u64 << shift)
}

/// A decoded (or to be encoded) record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootSuperset {
    /// The nonce the super block's marker must carry.
    pub nonce: u64,
    /// The store's md pages.
    pub md_len: u32,
    /// log2 of md pages per chunk.
    pub shift: u32,
    /// One bit per chunk, LSB first: set when the chunk may hold a root page.
    pub bitmap: Vec<u8>,
}

/// Why a record was not trusted (the load then scans the whole md region).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The region does not start with the record's magic (a mask, zeros, another layout).
    #[error("no root superset record (the region holds something else, e.g. a mask)")]
    Magic,
    /// A header field disagrees with the store or the marker.
    #[error("root superset record: {0}")]
    Field(String),
    /// The CRC does not match (a torn or partial write).
    #[error("root superset record: CRC mismatch")]
    Crc,
}

impl RecordError {
    /// The errno a caller would report (the load itself falls back instead of failing).
    pub fn errno(&self) -> i32 {
        -libc::EILSEQ
    }
}

impl RootSuperset {
    /// An empty record for a store of `md_len` pages with chunks of `1 << shift` pages.
    pub fn new(nonce: u64, md_len: u32, shift: u32) -> RootSuperset {
        let bits = chunk_count(md_len, shift);
        RootSuperset {
            nonce,
            md_len,
            shift,
            bitmap: vec![0; bits.div_ceil(8) as usize],
        }
    }

    /// Chunks in the bitmap.
    pub fn chunks(&self) -> u64 {
        chunk_count(self.md_len, self.shift)
    }

    /// The chunk holding md page `page`.
    pub fn chunk_of(&self, page: u32) -> u64 {
        u64::from(page) >> self.shift
    }

    /// Whether chunk `chunk` is in the set.
    pub fn has_chunk(&self, chunk: u64) -> bool {
        let byte = (chunk / 8) as usize;
        chunk < self.chunks()
            && self
                .bitmap
                .get(byte)
                .is_some_and(|b| b & (1 << (chunk % 8)) != 0)
    }

    /// Whether md page `page` is covered.
    pub fn covers(&self, page: u32) -> bool {
        self.has_chunk(self.chunk_of(page))
    }

    /// Adds chunk `chunk` (ignored past the last one).
    pub fn add_chunk(&mut self, chunk: u64) {
        if chunk < self.chunks() {
            self.bitmap[(chunk / 8) as usize] |= 1 << (chunk % 8);
        }
    }

    /// The md pages covered, ascending.
    pub fn pages(&self) -> impl Iterator<Item = u32> + '_ {
        let chunk_pages = 1u64 << self.shift;
        let md_len = u64::from(self.md_len);
        (0..self.chunks())
            .filter(|&chunk| self.has_chunk(chunk))
            .flat_map(move |chunk| {
                let first = chunk * chunk_pages;
                first..(first + chunk_pages).min(md_len)
            })
            .map(|page| page as u32)
    }

    /// Md pages covered.
    pub fn page_count(&self) -> u64 {
        let chunk_pages = 1u64 << self.shift;
        (0..self.chunks())
            .filter(|&chunk| self.has_chunk(chunk))
            .map(|chunk| chunk_pages.min(u64::from(self.md_len) - chunk * chunk_pages))
            .sum()
    }

    /// Bytes the encoded record takes (header and bitmap), before padding to pages.
    pub fn encoded_len(&self) -> usize {
        RECORD_HEADER_LEN + self.bitmap.len()
    }

    /// Whole pages the encoded record takes.
    pub fn encoded_pages(&self) -> usize {
        self.encoded_len().div_ceil(PAGE_SIZE)
    }

    /// Encodes into whole pages (zero padded).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.encoded_pages() * PAGE_SIZE];
        out[..8].copy_from_slice(RECORD_MAGIC);
        write_u32(&mut out, 8, RECORD_VERSION);
        write_u64(&mut out, 12, self.nonce);
        write_u32(&mut out, 20, self.md_len);
        write_u32(&mut out, 24, self.shift);
        write_u32(&mut out, 28, self.chunks() as u32);
        out[RECORD_HEADER_LEN..RECORD_HEADER_LEN + self.bitmap.len()].copy_from_slice(&self.bitmap);
        let crc = crc32c(&out[..self.encoded_len()]);
        write_u32(&mut out, CRC_AT, crc);
        out
    }

    /// Decodes the header from the region's first bytes: the record's length in bytes, so a
    /// caller reads the rest. Checks the magic, version, nonce and geometry.
    pub fn decode_header(
        bytes: &[u8],
        nonce: u64,
        md_len: u32,
        region_pages: u32,
    ) -> Result<usize, RecordError> {
        if bytes.len() < RECORD_HEADER_LEN || &bytes[..8] != RECORD_MAGIC {
            return Err(RecordError::Magic);
        }
        let field = |what: String| Err(RecordError::Field(what));
        let version = read_u32(bytes, 8);
        if version != RECORD_VERSION {
            return field(format!(
                "version {version}, this build reads {RECORD_VERSION}"
            ));
        }
        let found = read_u64(bytes, 12);
        if found != nonce {
            return field(format!(
                "nonce {found:#x}, the super block's marker has {nonce:#x} (another session's record)"
            ));
        }
        if read_u32(bytes, 20) != md_len {
            return field(format!(
                "md_len {}, the store has {md_len}",
                read_u32(bytes, 20)
            ));
        }
        let shift = read_u32(bytes, 24);
        if !(MIN_SHIFT..32).contains(&shift) {
            return field(format!("chunk shift {shift}"));
        }
        let bits = u64::from(read_u32(bytes, 28));
        if bits != chunk_count(md_len, shift) {
            return field(format!(
                "{bits} chunk bits for {md_len} pages of shift {shift}"
            ));
        }
        let len = RECORD_HEADER_LEN + bits.div_ceil(8) as usize;
        if len > region_pages as usize * PAGE_SIZE {
            return field(format!(
                "{len} bytes do not fit the {region_pages}-page region"
            ));
        }
        Ok(len)
    }

    /// Decodes a whole record (at least the length [`RootSuperset::decode_header`] gave).
    pub fn decode(
        bytes: &[u8],
        nonce: u64,
        md_len: u32,
        region_pages: u32,
    ) -> Result<RootSuperset, RecordError> {
        let len = Self::decode_header(bytes, nonce, md_len, region_pages)?;
        let Some(record) = bytes.get(..len) else {
            return Err(RecordError::Field(format!(
                "{} bytes read, the record has {len}",
                bytes.len()
            )));
        };
        let mut copy = record.to_vec();
        let stored = read_u32(&copy, CRC_AT);
        write_u32(&mut copy, CRC_AT, 0);
        if crc32c(&copy) != stored {
            return Err(RecordError::Crc);
        }
        Ok(RootSuperset {
            nonce,
            md_len,
            shift: read_u32(record, 24),
            bitmap: record[RECORD_HEADER_LEN..].to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_refuses_what_is_not_its_own() {
        let shift = chunk_shift(100_000, 4).unwrap();
        assert_eq!(shift, MIN_SHIFT);
        let mut record = RootSuperset::new(7, 100_000, shift);
        record.add_chunk(0);
        record.add_chunk(3);
        assert!(record.covers(63) && !record.covers(64) && record.covers(200));
        assert_eq!(record.page_count(), 128);
        assert_eq!(record.pages().count(), 128);
        let bytes = record.encode();
        assert_eq!(
            RootSuperset::decode(&bytes, 7, 100_000, 4),
            Ok(record.clone())
        );
        assert!(matches!(
            RootSuperset::decode(&bytes, 8, 100_000, 4),
            Err(RecordError::Field(_))
        ));
        let mut torn = bytes.clone();
        torn[RECORD_HEADER_LEN] ^= 0x10;
        assert_eq!(
            RootSuperset::decode(&torn, 7, 100_000, 4),
            Err(RecordError::Crc)
        );
        // SPDK's blob-id mask: type 2, then the length.
        let mut mask = vec![0u8; 4096];
        mask[0] = 2;
        assert_eq!(
            RootSuperset::decode(&mask, 7, 100_000, 4),
            Err(RecordError::Magic)
        );
        // Hostile headers never panic.
        for cut in 0..RECORD_HEADER_LEN + 2 {
            let _ = RootSuperset::decode(&bytes[..cut], 7, 100_000, 4);
        }
    }

    #[test]
    fn the_chunk_grows_until_the_bitmap_fits_the_region() {
        // A region sized for a bitmap of every md page always fits one bit per 64 pages.
        assert_eq!(chunk_shift(4 << 20, 129), Some(MIN_SHIFT));
        assert_eq!(chunk_shift(u32::MAX, 1), Some(18));
        assert_eq!(chunk_shift(10, 0), None);
    }

    #[test]
    fn the_marker_sits_in_the_reserved_bytes() {
        let mut page = vec![0u8; 4096];
        assert_eq!(decode_marker(&page), None);
        encode_marker(&mut page, 0xfeed);
        assert_eq!(decode_marker(&page), Some(0xfeed));
        assert_eq!(&page[92..100], b"SPOOLRS1");
    }
}
