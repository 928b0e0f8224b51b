//! Descriptors: the typed records inside a metadata page's 4072-byte area.
//!
//! Each starts with a 5-byte header (type u8, length u32 = bytes after the header). A walk
//! stops at a type-0 descriptor of length 0 or when fewer than 5 bytes remain; type 0 with a
//! length is padding and is skipped, and unknown types are skipped (forward compatibility is
//! signalled through flags, not descriptor types).

use super::{read_u16, read_u32, read_u64, write_u16, write_u32, write_u64};
use crate::format::md_page::DESC_AREA_LEN;

/// Bytes of a descriptor header.
pub const DESC_HEADER_LEN: usize = 5;
/// Descriptor type: padding (length 0 ends the page).
pub const TYPE_PADDING: u8 = 0;
/// Descriptor type: run-length extents.
pub const TYPE_EXTENT_RLE: u8 = 1;
/// Descriptor type: public xattr.
pub const TYPE_XATTR: u8 = 2;
/// Descriptor type: the three flag words.
pub const TYPE_FLAGS: u8 = 3;
/// Descriptor type: internal xattr.
pub const TYPE_XATTR_INTERNAL: u8 = 4;
/// Descriptor type: extent table (points at extent pages).
pub const TYPE_EXTENT_TABLE: u8 = 5;
/// Descriptor type: extent page body.
pub const TYPE_EXTENT_PAGE: u8 = 6;

/// invalid_flags bit: thin provisioned.
pub const FLAG_THIN_PROV: u64 = 1 << 0;
/// invalid_flags bit: the blob has internal xattrs.
pub const FLAG_INTERNAL_XATTR: u64 = 1 << 1;
/// invalid_flags bit: extents are an extent table with extent pages.
pub const FLAG_EXTENT_TABLE: u64 = 1 << 2;
/// invalid_flags bit: clone of an external snapshot (not supported by Spool: refuses open).
pub const FLAG_EXTERNAL_SNAPSHOT: u64 = 1 << 3;
/// invalid_flags bits this build understands.
pub const INVALID_FLAGS_KNOWN: u64 = FLAG_THIN_PROV | FLAG_INTERNAL_XATTR | FLAG_EXTENT_TABLE;
/// data_ro_flags bit: read-only (snapshots, set_read_only).
pub const FLAG_READ_ONLY: u64 = 1 << 0;
/// data_ro_flags bits this build understands.
pub const DATA_RO_FLAGS_KNOWN: u64 = FLAG_READ_ONLY;
/// md_ro_flags bits this build understands (the clear method, bits 0-1).
pub const MD_RO_FLAGS_KNOWN: u64 = 0x3;

/// The FLAGS descriptor's three words, kept raw (unknown bits survive a rewrite).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Flags {
    /// Bits an implementation must understand to open the blob at all.
    pub invalid: u64,
    /// Bits an implementation must understand to write the blob's data.
    pub data_ro: u64,
    /// Bits an implementation must understand to change the blob's metadata.
    pub md_ro: u64,
}

/// One decoded descriptor, borrowing the page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Descriptor<'a> {
    /// Runs of device clusters (`cluster 0` = unallocated run).
    ExtentRle(ExtentRuns<'a>),
    /// A public (`internal == false`) or internal xattr.
    Xattr {
        /// Whether it is an internal xattr (type 4).
        internal: bool,
        /// Name bytes (no NUL).
        name: &'a [u8],
        /// Raw value bytes.
        value: &'a [u8],
    },
    /// The flag words.
    Flags(Flags),
    /// Extent table: the blob's size in clusters and its extent-page entries.
    ExtentTable {
        /// The blob's size in clusters.
        num_clusters: u64,
        /// `(page index, page count)` pairs; index 0 means that many unallocated pages.
        entries: Pairs<'a>,
    },
    /// Extent page body: clusters from `start_cluster` on.
    ExtentPage {
        /// The blob cluster of the first entry (a multiple of 512).
        start_cluster: u32,
        /// Device cluster per blob cluster, 0 = unallocated.
        clusters: Words<'a>,
    },
    /// A type this build does not know (skipped).
    Unknown {
        /// The type byte.
        kind: u8,
        /// Its length.
        len: u32,
    },
}

/// Run-length extents: `(first device cluster, cluster count)` pairs.
pub type ExtentRuns<'a> = Pairs<'a>;

/// A packed array of little-endian `(u32, u32)` pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pairs<'a>(&'a [u8]);

impl<'a> Pairs<'a> {
    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.0.len() / 8
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.len() < 8
    }

    /// The pairs in order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, u32)> + 'a {
        self.0
            .chunks_exact(8)
            .map(|pair| (read_u32(pair, 0), read_u32(pair, 4)))
    }
}

/// A packed array of little-endian `u32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Words<'a>(&'a [u8]);

impl<'a> Words<'a> {
    /// Number of words.
    pub fn len(&self) -> usize {
        self.0.len() / 4
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.len() < 4
    }

    /// The words in order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + 'a {
        self.0.chunks_exact(4).map(|word| read_u32(word, 0))
    }
}

/// Why a descriptor could not be decoded (the page is corrupt: -EINVAL on open).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DescriptorError {
    /// The descriptor's length reaches past the 4072-byte area.
    #[error("descriptor type {kind} at byte {at} of length {len} overruns the page")]
    Overrun {
        /// Type byte.
        kind: u8,
        /// Offset in the area.
        at: usize,
        /// Its length field.
        len: u32,
    },
    /// The length does not fit the type's layout.
    #[error("descriptor type {kind} at byte {at}: {reason}")]
    BadLength {
        /// Type byte.
        kind: u8,
        /// Offset in the area.
        at: usize,
        /// What is wrong.
        reason: String,
    },
}

/// Walks the descriptors of a descriptor area (see the module doc for the rules).
#[derive(Debug, Clone)]
pub struct DescriptorIter<'a> {
    area: &'a [u8],
    at: usize,
    done: bool,
}

/// Walks `area` (a page's 4072-byte descriptor area).
pub fn descriptors(area: &[u8]) -> DescriptorIter<'_> {
    DescriptorIter {
        area,
        at: 0,
        done: false,
    }
}

impl<'a> Iterator for DescriptorIter<'a> {
    type Item = Result<Descriptor<'a>, DescriptorError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.done || self.at + DESC_HEADER_LEN > self.area.len() {
                return None;
            }
            let at = self.at;
            let kind = self.area[at];
            let len = read_u32(self.area, at + 1);
            if kind == TYPE_PADDING && len == 0 {
                self.done = true;
                return None;
            }
            let body_start = at + DESC_HEADER_LEN;
            let body_end = body_start as u64 + u64::from(len);
            if body_end > self.area.len() as u64 {
                self.done = true;
                return Some(Err(DescriptorError::Overrun { kind, at, len }));
            }
            let body = &self.area[body_start..body_end as usize];
            self.at = body_end as usize;
            if kind == TYPE_PADDING {
                continue;
            }
            let decoded = decode_body(kind, at, body);
            if decoded.is_err() {
                self.done = true;
            }
            return Some(decoded);
        }
    }
}

fn bad(kind: u8, at: usize, reason: String) -> DescriptorError {
    DescriptorError::BadLength { kind, at, reason }
}

fn decode_body(kind: u8, at: usize, body: &[u8]) -> Result<Descriptor<'_>, DescriptorError> {
    let len = body.len();
    match kind {
        TYPE_EXTENT_RLE => {
            if len == 0 || !len.is_multiple_of(8) {
                return Err(bad(
                    kind,
                    at,
                    format!("extent list of {len} bytes is not a non-zero multiple of 8"),
                ));
            }
            Ok(Descriptor::ExtentRle(Pairs(body)))
        }
        TYPE_XATTR | TYPE_XATTR_INTERNAL => {
            if len < 4 {
                return Err(bad(
                    kind,
                    at,
                    format!("xattr of {len} bytes has no name/value lengths"),
                ));
            }
            let name_len = usize::from(read_u16(body, 0));
            let value_len = usize::from(read_u16(body, 2));
            if 4 + name_len + value_len != len {
                return Err(bad(
                    kind,
                    at,
                    format!(
                        "xattr lengths disagree: name {name_len} + value {value_len} + 4 != {len}"
                    ),
                ));
            }
            Ok(Descriptor::Xattr {
                internal: kind == TYPE_XATTR_INTERNAL,
                name: &body[4..4 + name_len],
                value: &body[4 + name_len..],
            })
        }
        TYPE_FLAGS => {
            if len != 24 {
                return Err(bad(
                    kind,
                    at,
                    format!("flags descriptor is {len} bytes, not 24"),
                ));
            }
            Ok(Descriptor::Flags(Flags {
                invalid: read_u64(body, 0),
                data_ro: read_u64(body, 8),
                md_ro: read_u64(body, 16),
            }))
        }
        TYPE_EXTENT_TABLE => {
            if len < 8 || !(len - 8).is_multiple_of(8) {
                return Err(bad(
                    kind,
                    at,
                    format!("extent table of {len} bytes is not 8 + 8*n"),
                ));
            }
            Ok(Descriptor::ExtentTable {
                num_clusters: read_u64(body, 0),
                entries: Pairs(&body[8..]),
            })
        }
        TYPE_EXTENT_PAGE => {
            if len < 4 || !(len - 4).is_multiple_of(4) {
                return Err(bad(
                    kind,
                    at,
                    format!("extent page of {len} bytes is not 4 + 4*n"),
                ));
            }
            Ok(Descriptor::ExtentPage {
                start_cluster: read_u32(body, 0),
                clusters: Words(&body[4..]),
            })
        }
        _ => Ok(Descriptor::Unknown {
            kind,
            len: len as u32,
        }),
    }
}

/// Appends descriptors to a descriptor area, refusing what does not fit.
#[derive(Debug, Clone)]
pub struct DescriptorWriter {
    area: Vec<u8>,
}

impl Default for DescriptorWriter {
    fn default() -> Self {
        DescriptorWriter {
            area: Vec::with_capacity(DESC_AREA_LEN),
        }
    }
}

impl DescriptorWriter {
    /// Bytes still free.
    pub fn remaining(&self) -> usize {
        DESC_AREA_LEN - self.area.len()
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.area.is_empty()
    }

    /// The bytes written so far.
    pub fn bytes(&self) -> &[u8] {
        &self.area
    }

    fn push(&mut self, kind: u8, body_len: usize, fill: impl FnOnce(&mut [u8])) -> bool {
        if DESC_HEADER_LEN + body_len > self.remaining() {
            return false;
        }
        let start = self.area.len();
        self.area.resize(start + DESC_HEADER_LEN + body_len, 0);
        self.area[start] = kind;
        write_u32(&mut self.area, start + 1, body_len as u32);
        fill(&mut self.area[start + DESC_HEADER_LEN..]);
        true
    }

    /// Appends the FLAGS descriptor.
    pub fn flags(&mut self, flags: Flags) -> bool {
        self.push(TYPE_FLAGS, 24, |body| {
            write_u64(body, 0, flags.invalid);
            write_u64(body, 8, flags.data_ro);
            write_u64(body, 16, flags.md_ro);
        })
    }

    /// Appends an xattr (public or internal); names and values are at most 65535 bytes.
    pub fn xattr(&mut self, internal: bool, name: &[u8], value: &[u8]) -> bool {
        let (Ok(name_len), Ok(value_len)) = (u16::try_from(name.len()), u16::try_from(value.len()))
        else {
            return false;
        };
        let kind = if internal {
            TYPE_XATTR_INTERNAL
        } else {
            TYPE_XATTR
        };
        self.push(kind, 4 + name.len() + value.len(), |body| {
            write_u16(body, 0, name_len);
            write_u16(body, 2, value_len);
            body[4..4 + name.len()].copy_from_slice(name);
            body[4 + name.len()..].copy_from_slice(value);
        })
    }

    /// Appends as many RLE runs as fit (at least one); returns how many were written.
    pub fn extent_rle(&mut self, runs: &[(u32, u32)]) -> usize {
        let room = self.remaining().saturating_sub(DESC_HEADER_LEN) / 8;
        let count = room.min(runs.len());
        if count == 0 {
            return 0;
        }
        self.push(TYPE_EXTENT_RLE, count * 8, |body| {
            for (i, &(cluster, len)) in runs[..count].iter().enumerate() {
                write_u32(body, i * 8, cluster);
                write_u32(body, i * 8 + 4, len);
            }
        });
        count
    }

    /// Appends an extent-table descriptor with as many entries as fit (possibly none when
    /// `entries` is empty); returns how many entries were written, or `None` if not even the
    /// header and one entry (or the bare header for an empty table) fit.
    pub fn extent_table(&mut self, num_clusters: u64, entries: &[(u32, u32)]) -> Option<usize> {
        let room = self.remaining().checked_sub(DESC_HEADER_LEN + 8)? / 8;
        let count = room.min(entries.len());
        if count == 0 && !entries.is_empty() {
            return None;
        }
        self.push(TYPE_EXTENT_TABLE, 8 + count * 8, |body| {
            write_u64(body, 0, num_clusters);
            for (i, &(page, pages)) in entries[..count].iter().enumerate() {
                write_u32(body, 8 + i * 8, page);
                write_u32(body, 8 + i * 8 + 4, pages);
            }
        });
        Some(count)
    }

    /// Appends an extent-page descriptor (must be alone in its page; at most 512 entries fit
    /// by convention).
    pub fn extent_page(&mut self, start_cluster: u32, clusters: &[u32]) -> bool {
        self.push(TYPE_EXTENT_PAGE, 4 + clusters.len() * 4, |body| {
            write_u32(body, 0, start_cluster);
            for (i, &cluster) in clusters.iter().enumerate() {
                write_u32(body, 4 + i * 4, cluster);
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn area_of(writer: &DescriptorWriter) -> Vec<u8> {
        let mut area = writer.bytes().to_vec();
        area.resize(DESC_AREA_LEN, 0);
        area
    }

    #[test]
    fn writes_and_reads_back_every_type_in_order() {
        let mut writer = DescriptorWriter::default();
        let flags = Flags {
            invalid: FLAG_THIN_PROV | FLAG_EXTENT_TABLE,
            data_ro: 0,
            md_ro: 0,
        };
        assert!(writer.flags(flags));
        assert!(writer.xattr(false, b"name", b"hello\0"));
        assert!(writer.xattr(true, b"SNAP", &7u64.to_le_bytes()));
        assert_eq!(writer.extent_rle(&[(5, 2), (0, 3)]), 2);
        assert_eq!(writer.extent_table(700, &[(3, 1), (0, 1)]), Some(2));
        let area = area_of(&writer);
        // FLAGS header bytes: type 3, length 24.
        assert_eq!(&area[..5], &[3, 24, 0, 0, 0]);
        let parsed: Vec<_> = descriptors(&area).collect::<Result<_, _>>().unwrap();
        assert_eq!(parsed.len(), 5);
        assert_eq!(parsed[0], Descriptor::Flags(flags));
        assert!(matches!(
            parsed[1],
            Descriptor::Xattr {
                internal: false,
                name: b"name",
                value: b"hello\0"
            }
        ));
        assert!(matches!(
            parsed[2],
            Descriptor::Xattr {
                internal: true,
                name: b"SNAP",
                ..
            }
        ));
        let Descriptor::ExtentRle(runs) = &parsed[3] else {
            panic!()
        };
        assert_eq!(runs.iter().collect::<Vec<_>>(), vec![(5, 2), (0, 3)]);
        let Descriptor::ExtentTable {
            num_clusters,
            entries,
        } = &parsed[4]
        else {
            panic!()
        };
        assert_eq!(*num_clusters, 700);
        assert_eq!(entries.iter().collect::<Vec<_>>(), vec![(3, 1), (0, 1)]);
    }

    #[test]
    fn refuses_overruns_and_inconsistent_lengths() {
        let mut area = vec![0u8; DESC_AREA_LEN];
        area[0] = TYPE_XATTR;
        area[1..5].copy_from_slice(&5000u32.to_le_bytes());
        assert!(matches!(
            descriptors(&area).next(),
            Some(Err(DescriptorError::Overrun { .. }))
        ));
        area[1..5].copy_from_slice(&10u32.to_le_bytes());
        area[5..7].copy_from_slice(&2u16.to_le_bytes());
        area[7..9].copy_from_slice(&2u16.to_le_bytes());
        assert!(matches!(
            descriptors(&area).next(),
            Some(Err(DescriptorError::BadLength { .. }))
        ));
        let mut flags = vec![0u8; DESC_AREA_LEN];
        flags[0] = TYPE_FLAGS;
        flags[1] = 23;
        assert!(matches!(
            descriptors(&flags).next(),
            Some(Err(DescriptorError::BadLength { .. }))
        ));
        let mut rle = vec![0u8; DESC_AREA_LEN];
        rle[0] = TYPE_EXTENT_RLE;
        assert!(
            matches!(descriptors(&rle).next(), Some(Err(_))),
            "an empty extent list is refused"
        );
    }

    #[test]
    fn skips_padding_and_unknown_types_and_stops_at_the_end_marker() {
        let mut area = vec![0u8; DESC_AREA_LEN];
        // Padding of length 3, an unknown type 9 of length 2, then FLAGS, then the end marker.
        area[1] = 3;
        area[8] = 9;
        area[9] = 2;
        let mut writer = DescriptorWriter::default();
        writer.flags(Flags::default());
        area[15..15 + writer.bytes().len()].copy_from_slice(writer.bytes());
        let parsed: Vec<_> = descriptors(&area).collect::<Result<_, _>>().unwrap();
        assert_eq!(
            parsed,
            vec![
                Descriptor::Unknown { kind: 9, len: 2 },
                Descriptor::Flags(Flags::default())
            ]
        );
    }

    #[test]
    fn a_full_area_without_an_end_marker_is_fine() {
        let mut writer = DescriptorWriter::default();
        // One xattr filling the area exactly: 5 + 4 + name + value = 4072.
        assert!(writer.xattr(false, b"k", &vec![7u8; DESC_AREA_LEN - 10]));
        assert_eq!(writer.remaining(), 0);
        let area = area_of(&writer);
        let parsed: Vec<_> = descriptors(&area).collect::<Result<_, _>>().unwrap();
        assert_eq!(parsed.len(), 1);
    }
}
