//! Block-device ioctls of the uring bdev: logical block size, discard, zero-out; and the
//! file's space reservation (`fallocate` mode 0), the other blocking syscall it makes.
//!
//! These are ordinary blocking syscalls. The size query runs at open; discard and zero-out
//! run on the reactor when a block device is asked to unmap or write zeros, which stalls that
//! reactor for the duration of the ioctl. That is accepted for these rare operations (io_uring
//! on this kernel has no portable asynchronous discard for block devices).

// ioctl(2) is an FFI call taking a raw pointer argument; it cannot be made without `unsafe`.
#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::AsRawFd;

/// `_IO(0x12, 0)`: the block ioctl base, derived from libc's `BLKSSZGET` (= `_IO(0x12, 104)`)
/// so the encoding is right on every architecture libc knows.
const BLK_IO_BASE: libc::Ioctl = libc::BLKSSZGET - 104;
/// `BLKDISCARD` = `_IO(0x12, 119)`: discard a byte range (`[offset, len]` as two u64).
const BLKDISCARD: libc::Ioctl = BLK_IO_BASE + 119;
/// `BLKZEROOUT` = `_IO(0x12, 127)`: zero a byte range (`[offset, len]` as two u64).
const BLKZEROOUT: libc::Ioctl = BLK_IO_BASE + 127;

fn last_errno() -> i32 {
    -std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// The logical block size of the block device `file`, or a negative errno.
pub(crate) fn logical_block_size(file: &File) -> Result<u32, i32> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one `int` through its argument, which points to the live local
    // `size`; the fd is owned by `file`, open for the duration of the call.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::BLKSSZGET,
            &mut size as *mut libc::c_int,
        )
    };
    if rc < 0 {
        return Err(last_errno());
    }
    u32::try_from(size).map_err(|_| -libc::EINVAL)
}

/// Reserves the disk space of `len` bytes at `offset` of the regular file `file`
/// (`fallocate` mode 0: allocated, reading zeros, size unchanged unless it grows), or a
/// negative errno (-ENOSPC when the filesystem is full, -EOPNOTSUPP when it cannot reserve).
pub(crate) fn reserve_file_range(file: &File, offset: u64, len: u64) -> Result<(), i32> {
    let offset = libc::off_t::try_from(offset).map_err(|_| -libc::EINVAL)?;
    let len = libc::off_t::try_from(len).map_err(|_| -libc::EINVAL)?;
    // SAFETY: fallocate takes the fd (owned by `file`, open for the call) and two integers;
    // no memory is passed.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, offset, len) };
    if rc < 0 {
        Err(last_errno())
    } else {
        Ok(())
    }
}

fn range_ioctl(file: &File, request: libc::Ioctl, offset: u64, len: u64) -> Result<(), i32> {
    let range: [u64; 2] = [offset, len];
    // SAFETY: BLKDISCARD/BLKZEROOUT read two u64 (offset, length) through their argument,
    // which points to the live local `range`; the fd is owned by `file`.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request, range.as_ptr()) };
    if rc < 0 {
        Err(last_errno())
    } else {
        Ok(())
    }
}

/// Discards `len` bytes at `offset` of the block device `file` (blocking).
pub(crate) fn discard(file: &File, offset: u64, len: u64) -> Result<(), i32> {
    range_ioctl(file, BLKDISCARD, offset, len)
}

/// Writes zeros over `len` bytes at `offset` of the block device `file` (blocking).
pub(crate) fn zeroout(file: &File, offset: u64, len: u64) -> Result<(), i32> {
    range_ioctl(file, BLKZEROOUT, offset, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_linux() {
        if cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) {
            assert_eq!(BLKDISCARD, 0x1277);
            assert_eq!(BLKZEROOUT, 0x127f);
        }
    }

    #[test]
    fn ioctls_on_a_regular_file_fail_with_an_errno() {
        let file = tempfile::tempfile().expect("tempfile");
        assert!(logical_block_size(&file).is_err());
        assert!(discard(&file, 0, 4096).is_err());
    }
}
