//! Reading (and, for repair, writing) an image with plain positioned file I/O: the checker
//! works on stores that do not load, so it never goes through the bdev or the store.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;

use super::CheckError;
use crate::format::{PAGE_SIZE, PAGE_SIZE_U64};

/// Most md pages read by one request (1 MiB).
pub(crate) const BATCH_PAGES: u32 = 256;

/// An image: a regular file or a block device.
pub struct Image<'f> {
    file: &'f File,
    len: u64,
}

impl<'f> Image<'f> {
    /// Wraps an open file; its size is found by seeking to the end (block devices report a
    /// zero length in their metadata).
    pub fn new(file: &'f File) -> Result<Image<'f>, CheckError> {
        let mut handle = file;
        let len = handle
            .seek(SeekFrom::End(0))
            .map_err(|err| CheckError::io("find the size of", 0, &err))?;
        Ok(Image { file, len })
    }

    /// Bytes of the device.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the device has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Reads `count` pages from device page `first` (bounds checked against the device).
    pub fn read_pages(&self, first: u64, count: u32) -> Result<Vec<u8>, CheckError> {
        let offset = first.saturating_mul(PAGE_SIZE_U64);
        let bytes = count as usize * PAGE_SIZE;
        if offset.saturating_add(bytes as u64) > self.len {
            return Err(CheckError::OutOfDevice {
                offset,
                bytes: bytes as u64,
                device_bytes: self.len,
            });
        }
        let mut buf = vec![0u8; bytes];
        self.file
            .read_exact_at(&mut buf, offset)
            .map_err(|err| CheckError::io("read", offset, &err))?;
        Ok(buf)
    }

    /// Writes whole pages at device page `first`.
    pub fn write_pages(&self, first: u64, bytes: &[u8]) -> Result<(), CheckError> {
        let offset = first.saturating_mul(PAGE_SIZE_U64);
        if offset.saturating_add(bytes.len() as u64) > self.len {
            return Err(CheckError::OutOfDevice {
                offset,
                bytes: bytes.len() as u64,
                device_bytes: self.len,
            });
        }
        self.file
            .write_all_at(bytes, offset)
            .map_err(|err| CheckError::io("write", offset, &err))
    }

    /// Flushes written pages to the media.
    pub fn sync(&self) -> Result<(), CheckError> {
        self.file
            .sync_all()
            .map_err(|err| CheckError::io("sync", 0, &err))
    }
}
