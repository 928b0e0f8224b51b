//! One metadata page of `dump`: its header, CRC check, role, mask membership and
//! descriptors.

use serde::Serialize;
use spool_blob::format::descriptor::{
    descriptors, Descriptor, Flags, FLAG_EXTENT_TABLE, FLAG_EXTERNAL_SNAPSHOT, FLAG_INTERNAL_XATTR,
    FLAG_READ_ONLY, FLAG_THIN_PROV,
};
use spool_blob::format::md_page::{descriptor_area, MdPageHeader};
use spool_blob::format::{blobid_to_page, INVALID_MD_PAGE};

use crate::blob_cmd::dump::MaskDump;
use crate::blob_cmd::text::{escape, hex, id_hex, show_value};

/// One decoded descriptor.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DescriptorDump {
    /// The three flag words, with the bits named.
    Flags {
        /// invalid_flags.
        invalid: u64,
        /// data_ro_flags.
        data_ro: u64,
        /// md_ro_flags.
        md_ro: u64,
        /// The bits by name ("THIN_PROV", "READ_ONLY", "clear_method=default", ...).
        decoded: Vec<String>,
    },
    /// A public or internal xattr.
    Xattr {
        /// Internal (type 4) or public (type 2).
        internal: bool,
        /// Name, lossy UTF-8.
        name: String,
        /// Value as lowercase hex.
        value: String,
        /// Value as text: escaped, trailing NULs counted; the internal `SNAP` xattr (an
        /// 8-byte little-endian blob id) as `parent 0x...`.
        text: String,
    },
    /// Run-length extents: `[first device cluster, count]`, cluster 0 = unallocated.
    ExtentRle {
        /// The runs.
        runs: Vec<[u32; 2]>,
    },
    /// Extent table: the blob's size and `[md page, count]` entries (page 0 = none).
    ExtentTable {
        /// The blob's size in clusters.
        num_clusters: u64,
        /// The entries.
        entries: Vec<[u32; 2]>,
    },
    /// Extent page: the device cluster of each blob cluster from `start_cluster` on.
    ExtentPage {
        /// The blob cluster of the first entry.
        start_cluster: u32,
        /// Device clusters, 0 = unallocated.
        clusters: Vec<u32>,
    },
    /// A descriptor type this build does not know.
    Unknown {
        /// Its type byte.
        kind: u8,
        /// Its length.
        length: u32,
    },
    /// The walk stopped here: the descriptor is malformed.
    Error {
        /// What is wrong.
        message: String,
    },
}

/// The internal xattr SPDK names a clone's parent with (`BLOB_SNAPSHOT`).
const SNAP_XATTR: &[u8] = b"SNAP";

/// An xattr's value as text: the `SNAP` internal xattr decoded as the parent's id, the others
/// escaped with trailing NULs counted.
fn xattr_text(internal: bool, name: &[u8], value: &[u8]) -> String {
    if internal && name == SNAP_XATTR {
        if let Ok(bytes) = <[u8; 8]>::try_from(value) {
            return format!("parent {}", id_hex(u64::from_le_bytes(bytes)));
        }
    }
    show_value(value)
}

/// One md page with a non-zero id.
#[derive(Debug, Clone, Serialize)]
pub struct PageDump {
    /// Md page index (from md_start).
    pub index: u64,
    /// The owning blob's id as the page says.
    pub id: u64,
    /// Position in the chain.
    pub sequence: u32,
    /// Next page of the chain (`None`: the last).
    pub next: Option<u32>,
    /// The stored CRC, as hex.
    pub crc: String,
    /// Whether the CRC matches.
    pub crc_ok: bool,
    /// "root", "continuation", "extent page" or "other" (an id that is not this page's blob).
    pub role: &'static str,
    /// Whether the used-md-pages mask has it (`None`: the mask did not decode).
    pub in_md_mask: Option<bool>,
    /// Whether the used-blob-ids mask has it.
    pub in_blobid_mask: Option<bool>,
    /// The descriptors in order.
    pub descriptors: Vec<DescriptorDump>,
}

fn flag_names(flags: &Flags) -> Vec<String> {
    let mut names = Vec::new();
    let named = [
        (FLAG_THIN_PROV, "THIN_PROV"),
        (FLAG_INTERNAL_XATTR, "INTERNAL_XATTR"),
        (FLAG_EXTENT_TABLE, "EXTENT_TABLE"),
        (FLAG_EXTERNAL_SNAPSHOT, "EXTERNAL_SNAPSHOT"),
    ];
    let mut known = 0;
    for (bit, name) in named {
        known |= bit;
        if flags.invalid & bit != 0 {
            names.push(name.to_string());
        }
    }
    if flags.invalid & !known != 0 {
        names.push(format!("invalid:unknown {:#x}", flags.invalid & !known));
    }
    if flags.data_ro & FLAG_READ_ONLY != 0 {
        names.push("READ_ONLY".into());
    }
    if flags.data_ro & !FLAG_READ_ONLY != 0 {
        names.push(format!(
            "data_ro:unknown {:#x}",
            flags.data_ro & !FLAG_READ_ONLY
        ));
    }
    let method = ["default", "none", "unmap", "write_zeroes"][(flags.md_ro & 3) as usize];
    names.push(format!("clear_method={method}"));
    if flags.md_ro & !3 != 0 {
        names.push(format!("md_ro:unknown {:#x}", flags.md_ro & !3));
    }
    names
}

fn descriptor_dump(descriptor: Descriptor<'_>) -> DescriptorDump {
    match descriptor {
        Descriptor::Flags(flags) => DescriptorDump::Flags {
            invalid: flags.invalid,
            data_ro: flags.data_ro,
            md_ro: flags.md_ro,
            decoded: flag_names(&flags),
        },
        Descriptor::Xattr {
            internal,
            name,
            value,
        } => DescriptorDump::Xattr {
            internal,
            name: String::from_utf8_lossy(name).into_owned(),
            value: hex(value),
            text: xattr_text(internal, name, value),
        },
        Descriptor::ExtentRle(runs) => DescriptorDump::ExtentRle {
            runs: runs
                .iter()
                .map(|(cluster, count)| [cluster, count])
                .collect(),
        },
        Descriptor::ExtentTable {
            num_clusters,
            entries,
        } => DescriptorDump::ExtentTable {
            num_clusters,
            entries: entries.iter().map(|(page, count)| [page, count]).collect(),
        },
        Descriptor::ExtentPage {
            start_cluster,
            clusters,
        } => DescriptorDump::ExtentPage {
            start_cluster,
            clusters: clusters.iter().collect(),
        },
        Descriptor::Unknown { kind, len } => DescriptorDump::Unknown { kind, length: len },
    }
}

impl PageDump {
    /// Decodes md page `index` (4096 bytes); `None` when its id is 0 (a free page).
    pub fn decode(index: u64, page: &[u8], masks: &[MaskDump]) -> Option<PageDump> {
        let header = MdPageHeader::decode(page);
        if header.id == 0 {
            return None;
        }
        let mut list = Vec::new();
        for item in descriptors(descriptor_area(page)) {
            match item {
                Ok(descriptor) => list.push(descriptor_dump(descriptor)),
                Err(err) => list.push(DescriptorDump::Error {
                    message: err.to_string(),
                }),
            }
        }
        let is_extent_page = list
            .iter()
            .any(|d| matches!(d, DescriptorDump::ExtentPage { .. }));
        let own_root = blobid_to_page(header.id).map(u64::from) == Some(index);
        let role = if is_extent_page {
            "extent page"
        } else if header.sequence == 0 && own_root {
            "root"
        } else if header.sequence > 0 && blobid_to_page(header.id).is_some() {
            "continuation"
        } else {
            "other"
        };
        Some(PageDump {
            index,
            id: header.id,
            sequence: header.sequence,
            next: (header.next != INVALID_MD_PAGE).then_some(header.next),
            crc: format!("{:#010x}", header.crc),
            crc_ok: header.crc_ok,
            role,
            in_md_mask: masks.first().and_then(|mask| mask.get(index)),
            in_blobid_mask: masks.get(2).and_then(|mask| mask.get(index)),
            descriptors: list,
        })
    }

    /// What looks wrong with this page, one line each.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let what = format!("md page {} (blob {})", self.index, id_hex(self.id));
        if !self.crc_ok {
            problems.push(format!("{what}: CRC mismatch (stored {})", self.crc));
        }
        for descriptor in &self.descriptors {
            if let DescriptorDump::Error { message } = descriptor {
                problems.push(format!("{what}: {}", escape(message.as_bytes())));
            }
        }
        problems
    }
}
