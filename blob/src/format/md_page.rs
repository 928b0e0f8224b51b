//! The 4 KiB metadata page: id u64 @0, sequence u32 @8, reserved u32 @12, descriptors @16
//! (4072 bytes), next u32 @4088, crc u32 @4092.

use super::{page_crc, read_u32, read_u64, stored_crc, write_u32, write_u64, PAGE_SIZE};

/// Offset of the descriptor area.
pub const DESC_OFFSET: usize = 16;
/// Bytes of the descriptor area.
pub const DESC_AREA_LEN: usize = 4072;
/// Offset of the `next` field.
pub const NEXT_OFFSET: usize = 4088;

/// The fixed fields of a metadata page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MdPageHeader {
    /// The blob that owns the page.
    pub id: u64,
    /// Position in the chain (0 for the root and for extent pages).
    pub sequence: u32,
    /// The next page of the chain, or `INVALID_MD_PAGE`.
    pub next: u32,
    /// The stored CRC.
    pub crc: u32,
    /// Whether the stored CRC matches the page's bytes.
    pub crc_ok: bool,
}

impl MdPageHeader {
    /// Reads the fixed fields of `page` (which must be 4096 bytes) and checks its CRC.
    pub fn decode(page: &[u8]) -> MdPageHeader {
        debug_assert_eq!(page.len(), PAGE_SIZE);
        let crc = stored_crc(page);
        MdPageHeader {
            id: read_u64(page, 0),
            sequence: read_u32(page, 8),
            next: read_u32(page, NEXT_OFFSET),
            crc,
            crc_ok: crc == page_crc(page),
        }
    }
}

/// The descriptor area of a 4096-byte page.
pub fn descriptor_area(page: &[u8]) -> &[u8] {
    &page[DESC_OFFSET..DESC_OFFSET + DESC_AREA_LEN]
}

/// Builds a sealed page: header fields, `descriptors` (at most 4072 bytes, rest zero), CRC.
pub fn encode_page(id: u64, sequence: u32, next: u32, descriptors: &[u8]) -> Vec<u8> {
    let mut page = vec![0u8; PAGE_SIZE];
    write_u64(&mut page, 0, id);
    write_u32(&mut page, 8, sequence);
    let len = descriptors.len().min(DESC_AREA_LEN);
    page[DESC_OFFSET..DESC_OFFSET + len].copy_from_slice(&descriptors[..len]);
    write_u32(&mut page, NEXT_OFFSET, next);
    super::seal_page(&mut page);
    page
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::INVALID_MD_PAGE;

    #[test]
    fn fields_sit_at_their_offsets_and_the_crc_covers_them() {
        let page = encode_page(0x1_0000_0003, 2, INVALID_MD_PAGE, &[3, 24, 0, 0, 0]);
        assert_eq!(read_u64(&page, 0), 0x1_0000_0003);
        assert_eq!(read_u32(&page, 8), 2);
        assert_eq!(read_u32(&page, 12), 0);
        assert_eq!(&page[16..21], &[3, 24, 0, 0, 0]);
        assert_eq!(read_u32(&page, 4088), u32::MAX);
        let header = MdPageHeader::decode(&page);
        assert!(header.crc_ok);
        assert_eq!(header.sequence, 2);
        let mut bad = page.clone();
        bad[4000] = 1;
        assert!(!MdPageHeader::decode(&bad).crc_ok);
    }
}
