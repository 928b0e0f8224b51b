//! Reading (and, for repair, writing) an image with plain positioned I/O: the checker works
//! on stores that do not load, so it never goes through the bdev or the store. An image is
//! anything [`ImageIo`]: a file or block device, or bytes in memory (tests, fuzzing).

use std::cell::RefCell;
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;

use super::CheckError;
use crate::format::{PAGE_SIZE, PAGE_SIZE_U64};

/// Most md pages read by one request (4 MiB).
pub(crate) const BATCH_PAGES: u32 = 1024;

/// Positioned I/O on a device image.
pub trait ImageIo {
    /// Bytes of the device.
    fn size(&self) -> std::io::Result<u64>;
    /// Fills `buf` from byte `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
    /// Writes `buf` at byte `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()>;
    /// Makes the writes durable.
    fn sync(&self) -> std::io::Result<()>;
    /// Where the next byte that may be non-zero lies at or after `offset`: `Some(offset)`
    /// or later, `Some(u64::MAX)` when everything from `offset` on reads as zeros, or
    /// `None` when the image cannot tell (then every byte must be read). Lets a scan skip
    /// the holes of a sparse file instead of reading gigabytes of zeros.
    fn next_data(&self, offset: u64) -> Option<u64> {
        let _ = offset;
        None
    }
    /// Whether the caller asked the scan to stop (a command line's Ctrl-C): the md region
    /// scan checks it between two batches and ends with [`CheckError::Stopped`]. Never, by
    /// default.
    fn stop_requested(&self) -> bool {
        false
    }
}

impl ImageIo for File {
    /// Found by seeking to the end (block devices report a zero length in their metadata).
    fn size(&self) -> std::io::Result<u64> {
        let mut handle = self;
        handle.seek(SeekFrom::End(0))
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.read_exact_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.write_all_at(buf, offset)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.sync_all()
    }
    /// `lseek(SEEK_DATA)`: a regular file's filesystem knows its holes. A block device or a
    /// filesystem without the call answers with an error: `None`, read everything.
    fn next_data(&self, offset: u64) -> Option<u64> {
        match rustix::fs::seek(self, rustix::fs::SeekFrom::Data(offset)) {
            Ok(found) => Some(found),
            // No data at or after `offset` in a regular file: the rest is a hole.
            Err(rustix::io::Errno::NXIO) if self.metadata().is_ok_and(|meta| meta.is_file()) => {
                Some(u64::MAX)
            }
            Err(_) => None,
        }
    }
}

/// An image in memory (its length is the device's).
impl ImageIo for RefCell<Vec<u8>> {
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.borrow().len() as u64)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let image = self.borrow();
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let range = image
            .get(start..start.saturating_add(buf.len()))
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(range);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let mut image = self.borrow_mut();
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let range = image
            .get_mut(start..start.saturating_add(buf.len()))
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::WriteZero))?;
        range.copy_from_slice(buf);
        Ok(())
    }
    fn sync(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An image and its size.
pub struct Image<'f> {
    file: &'f dyn ImageIo,
    len: u64,
}

impl<'f> Image<'f> {
    /// Wraps an image, finding its size.
    pub fn new(file: &'f dyn ImageIo) -> Result<Image<'f>, CheckError> {
        let len = file
            .size()
            .map_err(|err| CheckError::io("find the size of", 0, &err))?;
        Ok(Image { file, len })
    }

    /// Bytes of the device.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the caller asked the scan to stop (see [`ImageIo::stop_requested`]).
    pub fn stop_requested(&self) -> bool {
        self.file.stop_requested()
    }

    /// Whether the device has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first device page at or after `page` that may hold a non-zero byte (`None`: the
    /// image cannot tell; `Some(u64::MAX)`: none does).
    pub fn next_data_page(&self, page: u64) -> Option<u64> {
        let found = self.file.next_data(page.saturating_mul(PAGE_SIZE_U64))?;
        Some(if found == u64::MAX {
            u64::MAX
        } else {
            found / PAGE_SIZE_U64
        })
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
            .read_at(&mut buf, offset)
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
            .write_at(bytes, offset)
            .map_err(|err| CheckError::io("write", offset, &err))
    }

    /// Flushes written pages to the media.
    pub fn sync(&self) -> Result<(), CheckError> {
        self.file
            .sync()
            .map_err(|err| CheckError::io("sync", 0, &err))
    }
}
