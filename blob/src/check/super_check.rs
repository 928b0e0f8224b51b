//! Phase 1: the super block. A page that is not a super block at all (no signature, an
//! unknown version, a device too small) stops the check ([`CheckError::NotABlobstore`]);
//! anything else wrong is a problem, and the check goes on when the geometry is usable.

use super::image::Image;
use super::report::{Problem, ProblemKind};
use super::CheckError;
use crate::format::layout::md_clusters;
use crate::format::super_block::{SuperBlock, SuperBlockError};
use crate::format::{read_u32, seal_page, stored_crc, PAGE_SIZE, PAGE_SIZE_U64};

/// The store's shape, from a super block whose geometry passed.
#[derive(Debug, Clone)]
pub struct StoreShape {
    /// The super block as on disk (fields exactly as stored).
    pub block: SuperBlock,
    /// Bytes of the device.
    pub device_bytes: u64,
    /// Clusters of the store.
    pub total_clusters: u64,
    /// Clusters of the super block, masks and md region.
    pub md_clusters: u64,
    /// Whether a load would trust the masks (clean and a blob-id mask exists).
    pub masks_trusted: bool,
}

impl StoreShape {
    /// Device page of md page `page`.
    pub fn md_device_page(&self, page: u32) -> u64 {
        u64::from(self.block.md_start) + u64::from(page)
    }

    /// Md pages of the region.
    pub fn md_len(&self) -> u32 {
        self.block.md_len
    }
}

fn field(name: &str, expected: impl Into<String>, found: impl Into<String>) -> Problem {
    Problem {
        kind: ProblemKind::SuperBlockField,
        page: None,
        blob: None,
        field: format!("super.{name}"),
        expected: expected.into(),
        found: found.into(),
    }
}

/// Reads and checks page 0. Returns the shape when the geometry is usable (`None`: the rest
/// of the store cannot be located, the problems say why).
pub fn check_super(
    image: &Image<'_>,
    problems: &mut Vec<Problem>,
) -> Result<Option<StoreShape>, CheckError> {
    let device_bytes = image.len();
    if device_bytes < PAGE_SIZE_U64 {
        return Err(CheckError::NotABlobstore(format!(
            "the device is {device_bytes} bytes, smaller than one 4096-byte super block"
        )));
    }
    let mut page = image.read_pages(0, 1)?;
    let stored = stored_crc(&page);
    let mut resealed = page.clone();
    seal_page(&mut resealed);
    let computed = stored_crc(&resealed);
    let block = match SuperBlock::decode(&resealed) {
        Ok(block) => block,
        Err(err @ (SuperBlockError::Signature(_) | SuperBlockError::Version(_))) => {
            return Err(CheckError::NotABlobstore(err.to_string()))
        }
        Err(err) => return Err(CheckError::NotABlobstore(err.to_string())),
    };
    if stored != computed {
        problems.push(Problem {
            kind: ProblemKind::SuperBlockCrc,
            page: None,
            blob: None,
            field: "super.crc".into(),
            expected: format!("{computed:#010x}"),
            found: format!("{stored:#010x}"),
        });
    }
    page.truncate(PAGE_SIZE);
    let length = read_u32(&page, 12);
    if length != PAGE_SIZE as u32 {
        problems.push(field("length", "4096", length.to_string()));
    }
    if block.clean > 1 {
        problems.push(field("clean", "0 or 1", block.clean.to_string()));
    }
    if let Err(err) = block.check_geometry(device_bytes, 512) {
        let (name, reason) = match err {
            SuperBlockError::Field { field, reason } => (field.to_string(), reason),
            other => ("geometry".to_string(), other.to_string()),
        };
        problems.push(field(&name, "a region inside the device", reason));
        return Ok(None);
    }
    let total_clusters = block.total_clusters(device_bytes);
    let md = md_clusters(block.md_start, block.md_len, block.cluster_size);
    if md > total_clusters {
        problems.push(field(
            "md_len",
            format!("metadata within the store's {total_clusters} clusters"),
            format!("{md} clusters of metadata"),
        ));
        return Ok(None);
    }
    Ok(Some(StoreShape {
        masks_trusted: block.masks_trusted(),
        block,
        device_bytes,
        total_clusters,
        md_clusters: md,
    }))
}
