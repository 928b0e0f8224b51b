//! One NBD request against its volume, as a task of the connection's reactor: the blob I/O
//! through the reactor's blob channel, then the reply's bytes. Nothing here knows the
//! socket: the daemon's connection sends the reply, the simulation's byte pipe (`inproc`)
//! hands it to its client.
//!
//! - READ: one blob read into a DMA buffer that the writer sends as is (no copy).
//! - WRITE: one blob write from the buffer the payload was received into; acknowledged when
//!   the blob layer has it (for a thin volume's first write to a cluster, once the cluster's
//!   insert is persisted). FUA adds a device flush before the reply.
//! - FLUSH: a device flush. Every write acknowledged before it has completed on the device,
//!   whatever connection or reactor it came through, and the store is one device, so the
//!   flush makes them all durable (what `NBD_FLAG_CAN_MULTI_CONN` promises).
//! - TRIM: the blob's unmap of the whole io_units inside the range (advisory, as the protocol
//!   allows: the volume keeps its clusters, the file gets holes punched).
//! - WRITE_ZEROES: ranges with no data anywhere (a thin volume's unallocated clusters whose
//!   parents have none either) already read as zeros and are left alone unless `NO_HOLE`
//!   asks for allocation; other ranges are zeroed through the blob layer. With `FAST_ZERO`,
//!   anything that would need device writes fails at once with `ENOTSUP`.
//! - BLOCK_STATUS (`base:allocation`): clusters with no data in the volume or its parents are
//!   `HOLE | ZERO`, the others data.
//! - CACHE: nothing to prefetch into (the device is read with O_DIRECT): acknowledged.
//!
//! Requests not aligned to the io_unit (from clients that did not agree to the block sizes;
//! the others are refused such requests by the decoder) are served by reading the whole
//! io_units around them: a write then is a read-modify-write of its first and last io_units,
//! so two such writes to the same io_unit at the same time may lose one (aligned writes
//! never do).

use std::rc::Rc;
use std::sync::Arc;

use spool_bdev::dma::DmaBuf;
use spool_blob::{BlobChannel, BlobError, BlobIo};

use super::iostat::IoKind;
use super::local::ReactorServe;
use super::volumes::Volume;
use crate::nbd::request::{Command, Request};
use crate::nbd::wire::{command_flags as cf, state_flags, Errno, Extent};
use crate::nbd::ReplyEncoder;

/// Block status extents reported per request at most (the encoder merges equal ones).
const STATUS_EXTENTS_MAX: usize = 1 << 16;

/// What one connection's requests run against, whatever carries its bytes (the daemon's
/// socket, or the simulation's byte pipe).
pub(crate) struct Session {
    /// The reactor's daemon state (channel, buffers, counters, stop notice).
    pub(crate) state: Rc<ReactorServe>,
    /// The volume served.
    pub(crate) volume: Arc<Volume>,
    /// Encodes the replies (as negotiated).
    pub(crate) encoder: ReplyEncoder,
    /// The peer, for the log.
    pub(crate) peer: String,
    /// A planted bug for the simulation's self-test: FLUSH and FUA are acknowledged without
    /// a device flush. Always off in the daemon.
    pub(crate) testing_skip_flushes: bool,
}

/// A request's reply: bytes to send, `head` then `data`.
pub(crate) struct Executed {
    /// The reply header (or the whole reply, for all but a READ's data).
    pub(crate) head: Vec<u8>,
    /// A READ's data, sent after `head` (its buffer goes back to the reactor's cache once
    /// sent).
    pub(crate) data: Option<DmaBuf>,
    /// The reply is an error.
    pub(crate) failed: bool,
}

/// What a request produced.
enum Done {
    /// Success with no data.
    Ok,
    /// A READ's data.
    Data(DmaBuf),
    /// A READ of zero bytes (answered with a READ reply, structured when agreed).
    EmptyRead,
    /// Block status extents.
    Status(Vec<Extent>),
    /// Failure: the error to reply and a message for the log and a structured reply.
    Failed(Errno, String),
}

fn failed(err: &BlobError) -> Done {
    Done::Failed(Errno::from_os(err.errno()), err.to_string())
}

/// Runs `request` (`payload`: a WRITE's data) on `session` and returns its reply.
pub(crate) async fn execute(
    session: &Session,
    request: Request,
    payload: Option<DmaBuf>,
) -> Executed {
    let started_ns = spool_reactor::now_ns();
    let done = if session.state.is_stopping() && request.command != Command::Flush {
        if let Some(buf) = payload {
            session.state.buffers.give(buf);
        }
        Done::Failed(Errno::Shutdown, "the server is shutting down".into())
    } else {
        run(session, &request, payload).await
    };
    let kind = match request.command {
        Command::Read => Some(IoKind::Read),
        Command::Write | Command::WriteZeroes => Some(IoKind::Write),
        Command::Trim => Some(IoKind::Unmap),
        _ => None,
    };
    if let (Some(kind), false) = (kind, matches!(done, Done::Failed(..))) {
        session.state.iostats.count(
            session.volume.io.id(),
            kind,
            u64::from(request.length),
            spool_reactor::now_ns().saturating_sub(started_ns),
        );
    }
    let encoder = &session.encoder;
    let mut head = Vec::with_capacity(32);
    let handle = request.handle;
    let (data, failed) = match done {
        Done::Ok => {
            encoder.ok(&mut head, handle);
            (None, false)
        }
        Done::Data(buf) => {
            encoder.read_header(&mut head, handle, request.offset, request.length);
            (Some(buf), false)
        }
        Done::EmptyRead => {
            encoder.read_header(&mut head, handle, request.offset, 0);
            (None, false)
        }
        Done::Status(extents) => match encoder.block_status(&mut head, &request, &extents) {
            Ok(_) => (None, false),
            Err(err) => {
                head.clear();
                encoder.error(&mut head, handle, Errno::Inval, &err.to_string());
                (None, true)
            }
        },
        Done::Failed(error, message) => {
            tracing::warn!(
                peer = %session.peer,
                handle,
                command = ?request.command,
                offset = request.offset,
                length = request.length,
                error = error.name(),
                "request failed: {message}"
            );
            encoder.error(&mut head, handle, error, &message);
            (None, true)
        }
    };
    Executed { head, data, failed }
}

/// A device flush through `channel` (skipped when the planted bug says so).
async fn flush(session: &Session, channel: &BlobChannel) -> Done {
    if session.testing_skip_flushes {
        return Done::Ok;
    }
    match channel.flush().await {
        Ok(()) => Done::Ok,
        Err(err) => failed(&err),
    }
}

async fn run(session: &Session, request: &Request, payload: Option<DmaBuf>) -> Done {
    let blob = Arc::clone(&session.volume.io);
    let channel = match session.state.channel() {
        Ok(channel) => channel,
        Err(err) => return failed(&err),
    };
    let io = VolumeIo {
        channel: &channel,
        blob: &blob,
        session,
    };
    match request.command {
        Command::Read => io.read(request.offset, request.length as usize).await,
        Command::Write => match payload {
            Some(buf) => io.write(request.offset, buf, request.fua()).await,
            // A zero-length write is valid and does nothing (but honours FUA).
            None if request.fua() => flush(session, &channel).await,
            None => Done::Ok,
        },
        Command::Flush => flush(session, &channel).await,
        Command::Trim => io.trim(request).await,
        Command::WriteZeroes => io.write_zeroes(request).await,
        Command::Cache => Done::Ok,
        Command::BlockStatus => Done::Status(block_status(&blob, request)),
    }
}

/// One request's view of its volume.
struct VolumeIo<'a> {
    channel: &'a BlobChannel,
    blob: &'a BlobIo,
    session: &'a Session,
}

impl VolumeIo<'_> {
    fn unit(&self) -> u64 {
        self.blob.io_unit_size()
    }

    /// The io_unit-aligned range around `offset..offset + len`.
    fn cover(&self, offset: u64, len: u64) -> (u64, u64) {
        let unit = self.unit();
        let start = offset / unit * unit;
        let end = (offset + len).div_ceil(unit) * unit;
        (start, end - start)
    }

    async fn read_aligned(&self, offset: u64, len: usize) -> Result<DmaBuf, Done> {
        let buf = self
            .session
            .state
            .buffers
            .take(len)
            .map_err(|err| Done::Failed(Errno::NoMem, err.to_string()))?;
        let (result, buf) = self
            .channel
            .read(self.blob, offset / self.unit(), buf)
            .await;
        match result {
            Ok(()) => Ok(buf),
            Err(err) => {
                self.session.state.buffers.give(buf);
                Err(failed(&err))
            }
        }
    }

    async fn read(&self, offset: u64, len: usize) -> Done {
        if len == 0 {
            return Done::EmptyRead;
        }
        let (start, cover) = self.cover(offset, len as u64);
        if start == offset && cover == len as u64 {
            return match self.read_aligned(offset, len).await {
                Ok(buf) => Done::Data(buf),
                Err(done) => done,
            };
        }
        let whole = match self.read_aligned(start, cover as usize).await {
            Ok(buf) => buf,
            Err(done) => return done,
        };
        let mut exact = match self.session.state.buffers.take(len) {
            Ok(buf) => buf,
            Err(err) => return Done::Failed(Errno::NoMem, err.to_string()),
        };
        let skip = (offset - start) as usize;
        exact.copy_from_slice(&whole[skip..skip + len]);
        self.session.state.buffers.give(whole);
        Done::Data(exact)
    }

    async fn write(&self, offset: u64, buf: DmaBuf, fua: bool) -> Done {
        let len = buf.len() as u64;
        let (start, cover) = self.cover(offset, len);
        let result = if start == offset && cover == len {
            let _admitted = self.session.volume.gate.write(&self.session.state).await;
            let (result, buf) = self
                .channel
                .write(self.blob, offset / self.unit(), buf)
                .await;
            self.session.state.buffers.give(buf);
            result
        } else {
            let result = self
                .read_modify_write(offset, len, |dest| dest.copy_from_slice(&buf))
                .await;
            self.session.state.buffers.give(buf);
            result
        };
        if let Err(err) = result {
            return failed(&err);
        }
        if fua {
            return flush(self.session, self.channel).await;
        }
        Done::Ok
    }

    /// Writes bytes `offset..offset + len` (not io_unit aligned) with what `fill` puts there:
    /// reads the io_units around them, fills, writes them back.
    async fn read_modify_write(
        &self,
        offset: u64,
        len: u64,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<(), BlobError> {
        let (start, cover) = self.cover(offset, len);
        let _alone = self.session.volume.gate.read_modify_write().await;
        let mut whole = match self.read_aligned(start, cover as usize).await {
            Ok(buf) => buf,
            Err(Done::Failed(_, message)) => return Err(BlobError::InvalidArgument(message)),
            Err(_) => return Err(BlobError::InvalidArgument("read failed".into())),
        };
        let skip = (offset - start) as usize;
        fill(&mut whole[skip..skip + len as usize]);
        let (result, whole) = self
            .channel
            .write(self.blob, start / self.unit(), whole)
            .await;
        self.session.state.buffers.give(whole);
        result
    }

    async fn trim(&self, request: &Request) -> Done {
        // Only whole io_units can be unmapped; the edges are left as they are (advisory).
        let unit = self.unit();
        let start = request.offset.div_ceil(unit) * unit;
        let end = (request.offset + u64::from(request.length)) / unit * unit;
        if end <= start {
            return Done::Ok;
        }
        match self
            .channel
            .unmap(self.blob, start / unit, (end - start) / unit)
            .await
        {
            Ok(()) => Done::Ok,
            Err(err) => failed(&err),
        }
    }

    async fn write_zeroes(&self, request: &Request) -> Done {
        let fast = request.has_flag(cf::FAST_ZERO);
        let no_hole = request.has_flag(cf::NO_HOLE);
        let cluster = self.blob.cluster_size();
        let end = request.offset + u64::from(request.length);
        // The ranges that need device writes, merged.
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut at = request.offset;
        while at < end {
            let index = at / cluster;
            let next = ((index + 1) * cluster).min(end);
            if no_hole || self.blob.cluster_has_data(index) {
                match ranges.last_mut() {
                    Some((_, last_end)) if *last_end == at => *last_end = next,
                    _ => ranges.push((at, next)),
                }
            }
            at = next;
        }
        if ranges.is_empty() {
            return Done::Ok;
        }
        if fast {
            return Done::Failed(
                Errno::NotSup,
                "zeroing this range needs device writes (NBD_CMD_FLAG_FAST_ZERO)".into(),
            );
        }
        let unit = self.unit();
        for (start, stop) in ranges {
            let inner_start = start.div_ceil(unit) * unit;
            let inner_end = stop / unit * unit;
            let result = if inner_end <= inner_start {
                self.read_modify_write(start, stop - start, |dest| dest.fill(0))
                    .await
            } else {
                let mut result = Ok(());
                if start < inner_start {
                    result = self
                        .read_modify_write(start, inner_start - start, |dest| dest.fill(0))
                        .await;
                }
                if result.is_ok() {
                    let _admitted = self.session.volume.gate.write(&self.session.state).await;
                    result = self
                        .channel
                        .write_zeroes(
                            self.blob,
                            inner_start / unit,
                            (inner_end - inner_start) / unit,
                        )
                        .await;
                }
                if result.is_ok() && inner_end < stop {
                    result = self
                        .read_modify_write(inner_end, stop - inner_end, |dest| dest.fill(0))
                        .await;
                }
                result
            };
            if let Err(err) = result {
                return failed(&err);
            }
        }
        if request.fua() {
            return flush(self.session, self.channel).await;
        }
        Done::Ok
    }
}

/// `base:allocation` extents of the request's range: per cluster, data or `HOLE | ZERO`.
fn block_status(blob: &BlobIo, request: &Request) -> Vec<Extent> {
    let cluster = blob.cluster_size();
    let end = request.offset + u64::from(request.length);
    let mut extents: Vec<Extent> = Vec::new();
    let mut at = request.offset;
    while at < end && extents.len() < STATUS_EXTENTS_MAX {
        let index = at / cluster;
        let next = ((index + 1) * cluster).min(end);
        let flags = if blob.cluster_has_data(index) {
            0
        } else {
            state_flags::HOLE | state_flags::ZERO
        };
        let length = u32::try_from(next - at).unwrap_or(u32::MAX);
        match extents.last_mut() {
            Some(last)
                if last.flags == flags && u64::from(last.length) + u64::from(length) <= 1 << 31 =>
            {
                last.length += length;
            }
            _ => extents.push(Extent { length, flags }),
        }
        at = next;
    }
    extents
}
