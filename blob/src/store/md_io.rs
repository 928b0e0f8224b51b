//! Metadata I/O on the metadata reactor's bdev channel, in whole pages.

use spool_bdev::{BdevChannel, DmaBuf};

use crate::error::Result;
use crate::format::PAGE_SIZE;

/// Largest single metadata read or write (1 MiB).
pub(crate) const MD_IO_MAX_BYTES: usize = 1 << 20;

/// Reads `len` bytes at device byte `offset` (multiples of 4096), in pieces of at most 1 MiB.
pub(crate) async fn read_bytes(channel: &BdevChannel, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(len);
    let mut done = 0usize;
    while done < len {
        let piece = (len - done).min(MD_IO_MAX_BYTES);
        let buf = DmaBuf::alloc(piece)?;
        let (result, buf) = channel.read(buf, offset + done as u64).await;
        result?;
        out.extend_from_slice(&buf[..]);
        done += piece;
    }
    Ok(out)
}

/// Reads several regions `(device byte offset, bytes)` (multiples of 4096), every request
/// submitted before the first is awaited: one round trip to the device, not one per region.
/// The first error fails the whole read, after the other requests have completed.
pub(crate) async fn read_regions(
    channel: &BdevChannel,
    regions: &[(u64, usize)],
) -> Result<Vec<Vec<u8>>> {
    let mut requests = Vec::new();
    let mut failed = None;
    for (region, &(offset, len)) in regions.iter().enumerate() {
        let mut done = 0usize;
        while done < len && failed.is_none() {
            let piece = (len - done).min(MD_IO_MAX_BYTES);
            match DmaBuf::alloc(piece) {
                Ok(buf) => requests.push((region, channel.read(buf, offset + done as u64))),
                Err(err) => failed = Some(err.into()),
            }
            done += piece;
        }
    }
    let mut out: Vec<Vec<u8>> = regions
        .iter()
        .map(|&(_, len)| Vec::with_capacity(len))
        .collect();
    for (region, request) in requests {
        let (result, buf) = request.await;
        match result {
            Ok(()) => out[region].extend_from_slice(&buf[..]),
            Err(err) => {
                failed.get_or_insert(err.into());
            }
        }
    }
    failed.map_or(Ok(out), Err)
}

/// Reads one page at device byte `offset`.
pub(crate) async fn read_page(channel: &BdevChannel, offset: u64) -> Result<Vec<u8>> {
    read_bytes(channel, offset, PAGE_SIZE).await
}

/// Writes `bytes` at device byte `offset`, in pieces of at most 1 MiB.
pub(crate) async fn write_bytes(channel: &BdevChannel, offset: u64, bytes: &[u8]) -> Result<()> {
    let mut done = 0usize;
    while done < bytes.len() {
        let piece = (bytes.len() - done).min(MD_IO_MAX_BYTES);
        let mut buf = DmaBuf::alloc(piece)?;
        buf.copy_from_slice(&bytes[done..done + piece]);
        let (result, _) = channel.write(buf, offset + done as u64).await;
        result?;
        done += piece;
    }
    Ok(())
}

/// Writes several pages concurrently: `(device byte offset, page bytes)`.
pub(crate) async fn write_pages(channel: &BdevChannel, pages: &[(u64, Vec<u8>)]) -> Result<()> {
    let mut pending = Vec::with_capacity(pages.len());
    for (offset, bytes) in pages {
        let mut buf = DmaBuf::alloc(bytes.len())?;
        buf.copy_from_slice(bytes);
        pending.push(channel.write(buf, *offset));
    }
    let mut first_error = None;
    for request in pending {
        let (result, _) = request.await;
        if let Err(err) = result {
            first_error.get_or_insert(err);
        }
    }
    match first_error {
        Some(err) => Err(err.into()),
        None => Ok(()),
    }
}

/// Writes zeros over `len` bytes at `offset`: write-zeroes when the device has it, else
/// written zeros.
pub(crate) async fn zero_bytes(channel: &BdevChannel, offset: u64, len: u64) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    match channel.write_zeroes(offset, len).await {
        Ok(()) => Ok(()),
        Err(err) if err.errno() == -libc::ENOTSUP => {
            let zeros = vec![0u8; len.min(MD_IO_MAX_BYTES as u64) as usize];
            let mut done = 0u64;
            while done < len {
                let piece = (len - done).min(zeros.len() as u64) as usize;
                write_bytes(channel, offset + done, &zeros[..piece]).await?;
                done += piece as u64;
            }
            Ok(())
        }
        Err(err) => Err(err.into()),
    }
}

/// Makes completed writes durable (a no-op success on devices without flush).
pub(crate) async fn flush(channel: &BdevChannel) -> Result<()> {
    match channel.flush().await {
        Ok(()) => Ok(()),
        Err(err) if err.errno() == -libc::ENOTSUP => Ok(()),
        Err(err) => Err(err.into()),
    }
}
