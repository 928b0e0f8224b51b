//! Mask regions: a 5-byte header (type u8, length in bits u32) then the bitmap, bit `i` at
//! byte `5 + i/8`, bit `i % 8` (least significant first), spread over whole pages with no CRC.

use super::{read_u32, write_u32, PAGE_SIZE};

/// Bytes of the mask header.
pub const MASK_HEADER_LEN: usize = 5;

/// Which mask a region holds (the header's type byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskKind {
    /// Metadata pages in use (roots, continuations, extent pages).
    UsedPages = 0,
    /// Clusters in use (metadata clusters and allocated data clusters).
    UsedClusters = 1,
    /// Md pages that are a blob's root page.
    UsedBlobIds = 2,
}

/// Why a mask region was refused (SPDK asserts here; Spool fails the load with -EILSEQ).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaskError {
    /// The region is shorter than the header plus the bitmap.
    #[error("{kind:?} mask: region of {region_bytes} bytes cannot hold {bits} bits")]
    TooShort {
        /// The mask.
        kind: MaskKind,
        /// Bytes of the region.
        region_bytes: usize,
        /// Bits the header (or the store) asks for.
        bits: u64,
    },
    /// The type byte names another mask.
    #[error("{kind:?} mask: header type is {found}, expected {}", *kind as u8)]
    Type {
        /// The mask expected.
        kind: MaskKind,
        /// The type byte found.
        found: u8,
    },
    /// The length in bits disagrees with the store's geometry.
    #[error("{kind:?} mask: header says {found} bits, the store has {expected}")]
    Length {
        /// The mask.
        kind: MaskKind,
        /// Bits in the header.
        found: u32,
        /// Bits the geometry implies.
        expected: u32,
    },
}

/// Pages a mask of `bits` bits occupies: `ceil((5 + ceil(bits / 8)) / 4096)`.
pub fn mask_pages(bits: u64) -> u64 {
    (MASK_HEADER_LEN as u64 + bits.div_ceil(8)).div_ceil(PAGE_SIZE as u64)
}

/// Pages of a mask region of `region_len` pages that a mask of `bits` bits uses: only
/// those are read or written (a super block may give a mask a longer region; its tail is
/// never touched, so the cost follows the mask, not a number in the super block).
pub fn mask_region_pages(region_len: u32, bits: u64) -> u32 {
    // mask_pages(bits) <= region_len once check_geometry passed; min() keeps it so anyway.
    mask_pages(bits).min(u64::from(region_len)) as u32
}

/// Encodes `bits` (a bitmap of `len_bits` bits, LSB-first bytes) as `pages` whole pages.
pub fn encode_mask(kind: MaskKind, len_bits: u32, bitmap: &[u8], pages: u32) -> Vec<u8> {
    let mut region = vec![0u8; pages as usize * PAGE_SIZE];
    region[0] = kind as u8;
    write_u32(&mut region, 1, len_bits);
    let bytes = (len_bits as usize).div_ceil(8);
    let room = region.len().saturating_sub(MASK_HEADER_LEN);
    let copied = bytes.min(bitmap.len()).min(room);
    region[MASK_HEADER_LEN..MASK_HEADER_LEN + copied].copy_from_slice(&bitmap[..copied]);
    // Bits past len_bits in the last byte stay clear.
    if !len_bits.is_multiple_of(8) && copied == bytes && bytes > 0 {
        let last = MASK_HEADER_LEN + bytes - 1;
        region[last] &= (1u8 << (len_bits % 8)) - 1;
    }
    region
}

/// Decodes a mask region, checking the type and that the length is `expected_bits`;
/// returns the bitmap bytes (`ceil(bits/8)` of them).
pub fn decode_mask(
    kind: MaskKind,
    region: &[u8],
    expected_bits: u32,
) -> Result<Vec<u8>, MaskError> {
    if region.len() < MASK_HEADER_LEN {
        return Err(MaskError::TooShort {
            kind,
            region_bytes: region.len(),
            bits: u64::from(expected_bits),
        });
    }
    if region[0] != kind as u8 {
        return Err(MaskError::Type {
            kind,
            found: region[0],
        });
    }
    let found = read_u32(region, 1);
    if found != expected_bits {
        return Err(MaskError::Length {
            kind,
            found,
            expected: expected_bits,
        });
    }
    let bytes = (found as usize).div_ceil(8);
    if region.len() < MASK_HEADER_LEN + bytes {
        return Err(MaskError::TooShort {
            kind,
            region_bytes: region.len(),
            bits: u64::from(found),
        });
    }
    let mut bitmap = region[MASK_HEADER_LEN..MASK_HEADER_LEN + bytes].to_vec();
    if !found.is_multiple_of(8) && bytes > 0 {
        bitmap[bytes - 1] &= (1u8 << (found % 8)) - 1;
    }
    Ok(bitmap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_counts_follow_the_formula_at_the_page_boundary() {
        assert_eq!(mask_pages(0), 1);
        assert_eq!(mask_pages(64), 1);
        assert_eq!(mask_pages(8 * 4091), 1);
        assert_eq!(mask_pages(8 * 4091 + 1), 2);
    }

    #[test]
    fn round_trips_and_places_bits_lsb_first() {
        let region = encode_mask(MaskKind::UsedClusters, 12, &[0b1000_0101, 0xFF], 1);
        assert_eq!(region.len(), 4096);
        assert_eq!(region[0], 1);
        assert_eq!(read_u32(&region, 1), 12);
        assert_eq!(region[5], 0b1000_0101);
        assert_eq!(region[6], 0x0F, "bits past the length are cleared");
        let bitmap = decode_mask(MaskKind::UsedClusters, &region, 12).unwrap();
        assert_eq!(bitmap, vec![0b1000_0101, 0x0F]);
        assert_eq!(
            decode_mask(MaskKind::UsedPages, &region, 12),
            Err(MaskError::Type {
                kind: MaskKind::UsedPages,
                found: 1
            })
        );
        assert!(matches!(
            decode_mask(MaskKind::UsedClusters, &region, 13),
            Err(MaskError::Length { .. })
        ));
        assert!(matches!(
            decode_mask(MaskKind::UsedClusters, &region[..3], 12),
            Err(MaskError::TooShort { .. })
        ));
    }
}
