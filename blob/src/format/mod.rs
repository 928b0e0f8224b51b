//! SPDK's on-disk blobstore format, byte for byte: pure encode and decode, no I/O.
//!
//! Everything here works on byte slices, so it can be fuzzed and tested without a device.
//! - [`super_block`]: page 0 of the device.
//! - [`mask`]: the three bit-mask regions (used md pages, used clusters, used blob ids).
//! - [`md_page`]: the 4 KiB metadata page header and CRC.
//! - [`descriptor`]: the descriptors inside a metadata page.
//! - [`layout`]: where init puts each region.
//! - [`root_superset`]: Spool's record of where roots can be, for a bounded dirty load.
//!
//! See `docs/format.md` for the layout in prose.

pub mod descriptor;
pub mod layout;
pub mod mask;
pub mod md_page;
pub mod root_superset;
pub mod super_block;

/// Bytes in a metadata page (and the unit of every on-disk region's offsets).
pub const PAGE_SIZE: usize = 4096;
/// [`PAGE_SIZE`] as a `u64`, for offset arithmetic.
pub const PAGE_SIZE_U64: u64 = PAGE_SIZE as u64;
/// Byte offset of the CRC in the super block and in every metadata page.
pub const CRC_OFFSET: usize = 4092;
/// "No metadata page": the `next` of the last page of a chain.
pub const INVALID_MD_PAGE: u32 = u32::MAX;
/// "No blob" (no super blob, no parent).
pub const BLOBID_INVALID: u64 = u64::MAX;
/// The high bit every blob id carries above its root md page index.
pub const BLOBID_HIGH_BIT: u64 = 1 << 32;
/// Clusters described by one extent page.
pub const EXTENTS_PER_PAGE: u32 = 512;

/// The blob id whose root metadata page is md page `page`.
pub fn page_to_blobid(page: u32) -> u64 {
    BLOBID_HIGH_BIT | u64::from(page)
}

/// The md page index of blob `id`'s root page (its low 32 bits), or `None` when `id` lacks
/// the high bit or has other high bits set (no such blob can exist).
pub fn blobid_to_page(id: u64) -> Option<u32> {
    if id >> 32 == 1 {
        Some(id as u32)
    } else {
        None
    }
}

/// Standard CRC-32C (Castagnoli) of `bytes`: the checksum of the super block and md pages
/// over their first 4092 bytes. Hardware accelerated by the `crc32c` crate where available.
pub fn crc32c(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// The CRC a 4 KiB page should carry: CRC-32C of its bytes before [`CRC_OFFSET`].
pub fn page_crc(page: &[u8]) -> u32 {
    crc32c(&page[..CRC_OFFSET.min(page.len())])
}

/// Reads the CRC stored in a 4 KiB page.
pub fn stored_crc(page: &[u8]) -> u32 {
    read_u32(page, CRC_OFFSET)
}

/// Computes and stores the CRC of a 4 KiB page.
pub fn seal_page(page: &mut [u8]) {
    let crc = page_crc(page);
    write_u32(page, CRC_OFFSET, crc);
}

/// Little-endian u16 at `at`; the caller guarantees the bounds.
pub(crate) fn read_u16(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

/// Little-endian u32 at `at`; the caller guarantees the bounds.
pub(crate) fn read_u32(bytes: &[u8], at: usize) -> u32 {
    let mut raw = [0u8; 4];
    raw.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(raw)
}

/// Little-endian u64 at `at`; the caller guarantees the bounds.
pub(crate) fn read_u64(bytes: &[u8], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(raw)
}

pub(crate) fn write_u16(bytes: &mut [u8], at: usize, value: u16) {
    bytes[at..at + 2].copy_from_slice(&value.to_le_bytes());
}

pub(crate) fn write_u32(bytes: &mut [u8], at: usize, value: u32) {
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
}

pub(crate) fn write_u64(bytes: &mut [u8], at: usize, value: u64) {
    bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_is_the_standard_castagnoli_checksum() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn blob_ids_carry_the_high_bit_over_the_page_index() {
        assert_eq!(page_to_blobid(0), 0x1_0000_0000);
        assert_eq!(page_to_blobid(7), 0x1_0000_0007);
        assert_eq!(blobid_to_page(0x1_0000_0007), Some(7));
        assert_eq!(blobid_to_page(7), None);
        assert_eq!(blobid_to_page(0x3_0000_0007), None);
        assert_eq!(blobid_to_page(BLOBID_INVALID), None);
    }
}
