//! The transmission phase with no I/O: [`RequestDecoder`] turns the client's bytes into
//! [`Event`]s, checking each request against what was [`Negotiated`]; [`ReplyEncoder`]
//! writes simple and structured replies.
//!
//! Invariants: the decoder never panics and buffers at most one request header
//! ([`limits::REQUEST_HEADER_BUFFER`] bytes). A WRITE's payload is never copied by the
//! decoder: after [`Event::Request`] for a WRITE, [`RequestDecoder::payload_pending`] says how
//! many bytes of which request come next, so the connection can receive them straight into
//! its own (DMA) buffer and report them with [`RequestDecoder::payload_received`]; bytes that
//! reach [`RequestDecoder::decode`] instead come back as [`Event::Payload`] ranges of the
//! caller's input. A request that breaks a rule is answered by the caller with the
//! [`Rejection`]'s error (a rejected WRITE's payload is skipped by the decoder); only a bad
//! magic, input after `NBD_CMD_DISC` or a caller's accounting error are fatal
//! ([`RequestError`]). The decoder keeps no per-request state, so requests pipeline and
//! replies go out in completion order.

use thiserror::Error;

use crate::nbd::handshake::Negotiated;
use crate::nbd::limits;
use crate::nbd::wire::{
    self, command_flags as cf, reply_flags, transmission_flags as tf, Chunk, ChunkHeader,
    ChunkType, CommandCode, Errno, Extent, RequestHeader, SimpleReplyHeader,
};

/// A command the decoder accepts (`NBD_CMD_DISC` is [`Event::Disconnect`] instead).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// `NBD_CMD_READ`.
    Read,
    /// `NBD_CMD_WRITE`: `length` payload bytes follow the header.
    Write,
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim,
    /// `NBD_CMD_CACHE`.
    Cache,
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS` (for `base:allocation`).
    BlockStatus,
}

impl Command {
    /// The command's wire code.
    pub fn code(self) -> CommandCode {
        match self {
            Command::Read => CommandCode::Read,
            Command::Write => CommandCode::Write,
            Command::Flush => CommandCode::Flush,
            Command::Trim => CommandCode::Trim,
            Command::Cache => CommandCode::Cache,
            Command::WriteZeroes => CommandCode::WriteZeroes,
            Command::BlockStatus => CommandCode::BlockStatus,
        }
    }
}

/// A valid request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// The client's handle, to put in the reply.
    pub handle: u64,
    /// What to do.
    pub command: Command,
    /// Command flags ([`wire::command_flags`]), each valid for this command.
    pub flags: u16,
    /// Byte offset (inside the export).
    pub offset: u64,
    /// Byte length (`offset + length` is inside the export).
    pub length: u32,
}

impl Request {
    /// Whether `NBD_CMD_FLAG_FUA` is set (persist before replying).
    pub fn fua(&self) -> bool {
        self.flags & cf::FUA != 0
    }

    /// Whether flag `flag` is set.
    pub fn has_flag(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    /// Payload bytes that follow the header (a WRITE's `length`, else 0).
    pub fn payload_len(&self) -> u32 {
        if self.command == Command::Write {
            self.length
        } else {
            0
        }
    }

    /// Whether offset and length are multiples of `minimum` (a power of two).
    pub fn is_aligned(&self, minimum: u32) -> bool {
        let mask = u64::from(minimum.max(1)) - 1;
        self.offset & mask == 0 && u64::from(self.length) & mask == 0
    }
}

/// Why a request is refused (the reply carries [`Rejection::error`]).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RejectReason {
    /// A command this server does not know.
    #[error("unknown command {0}")]
    UnknownCommand(u16),
    /// A command flag this server does not know, or one not negotiated.
    #[error("command flags {0:#x} hold an unknown or unnegotiated flag")]
    UnknownFlags(u16),
    /// A known flag on a command it does not apply to.
    #[error("flag {flag:#x} does not apply to {command:?}")]
    FlagNotForCommand {
        /// The flag.
        flag: u16,
        /// The command.
        command: Command,
    },
    /// A command the export did not offer in its transmission flags.
    #[error("{0:?} was not offered")]
    NotOffered(Command),
    /// `NBD_CMD_BLOCK_STATUS` without a selected metadata context.
    #[error("block status without a metadata context")]
    NoMetaContext,
    /// A write, trim or write-zeroes to a read-only export.
    #[error("{0:?} on a read-only export")]
    ReadOnly(Command),
    /// A READ or WRITE longer than the maximum payload.
    #[error("length {length} above the maximum payload {maximum}")]
    TooLong {
        /// The request's length.
        length: u32,
        /// The maximum payload.
        maximum: u32,
    },
    /// A range that ends past the export's end.
    #[error("range {offset}+{length} past the end of the {size}-byte export")]
    PastEnd {
        /// The request's offset.
        offset: u64,
        /// The request's length.
        length: u32,
        /// The export's size.
        size: u64,
    },
    /// A range not aligned to the minimum block size the client agreed to.
    #[error("range {offset}+{length} not aligned to {minimum} bytes")]
    Unaligned {
        /// The request's offset.
        offset: u64,
        /// The request's length.
        length: u32,
        /// The agreed minimum block size.
        minimum: u32,
    },
    /// A flush with a non-zero offset or length (both are reserved).
    #[error("flush with a non-zero range")]
    FlushRange,
    /// A block status request of zero length (no valid reply exists).
    #[error("block status of zero length")]
    EmptyBlockStatus,
}

/// A refused request: reply `error` to `handle`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The client's handle.
    pub handle: u64,
    /// The command as sent.
    pub command: u16,
    /// The error to reply (as the protocol names it).
    pub error: Errno,
    /// Why.
    pub reason: RejectReason,
    /// Payload bytes that follow and that the decoder skips (a rejected WRITE's).
    pub skipped_payload: u32,
}

/// What the decoder found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A valid request; for a WRITE with a non-zero length, its payload comes next.
    Request(Request),
    /// The last `len` bytes consumed by this call are bytes `at..at + len` of WRITE
    /// `handle`'s payload; `complete` when that was its last byte.
    Payload {
        /// The WRITE's handle.
        handle: u64,
        /// Offset of these bytes in the payload.
        at: u32,
        /// How many bytes.
        len: usize,
        /// Whether the payload is now complete.
        complete: bool,
    },
    /// A request to refuse with an error reply.
    Rejected(Rejection),
    /// `NBD_CMD_DISC`: finish the requests in flight, then close. No more input is valid.
    Disconnect,
}

/// What one call to [`RequestDecoder::decode`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// Input bytes consumed. When `event` is `None`, all of the input.
    pub consumed: usize,
    /// What the consumed bytes completed, if anything.
    pub event: Option<Event>,
}

/// A payload the decoder waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingPayload {
    /// The WRITE's handle.
    pub handle: u64,
    /// Bytes received so far.
    pub received: u32,
    /// Bytes still to come.
    pub remaining: u32,
    /// Whether the bytes are skipped (a rejected WRITE) rather than data to write.
    pub skip: bool,
}

/// A fatal transmission error: close the connection.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RequestError {
    /// A request header with the wrong magic (the stream cannot be resynchronised).
    #[error("request magic {0:#x} is not NBD_REQUEST_MAGIC")]
    BadMagic(u32),
    /// Bytes after `NBD_CMD_DISC`.
    #[error("input after NBD_CMD_DISC")]
    AfterDisconnect,
    /// [`RequestDecoder::payload_received`] reported more bytes than pending.
    #[error("{reported} payload bytes reported, {pending} pending")]
    PayloadOverrun {
        /// Bytes reported.
        reported: usize,
        /// Bytes pending.
        pending: u32,
    },
}

/// The transmission-phase decoder of one connection.
#[derive(Debug, Clone)]
pub struct RequestDecoder {
    negotiated: Negotiated,
    header: [u8; RequestHeader::LEN],
    have: usize,
    pending: Option<PendingPayload>,
    disconnected: bool,
}

impl RequestDecoder {
    /// A decoder for a connection that negotiated `negotiated`.
    pub fn new(negotiated: Negotiated) -> RequestDecoder {
        RequestDecoder {
            negotiated,
            header: [0; RequestHeader::LEN],
            have: 0,
            pending: None,
            disconnected: false,
        }
    }

    /// What was negotiated.
    pub fn negotiated(&self) -> &Negotiated {
        &self.negotiated
    }

    /// Bytes of a partial header buffered now (at most [`limits::REQUEST_HEADER_BUFFER`]).
    pub fn buffered_bytes(&self) -> usize {
        self.have
    }

    /// The payload expected next, if any: receive `remaining` bytes into the WRITE's buffer
    /// (or skip them), then call [`Self::payload_received`].
    pub fn payload_pending(&self) -> Option<PendingPayload> {
        self.pending
    }

    /// Whether `NBD_CMD_DISC` was decoded.
    pub fn is_disconnected(&self) -> bool {
        self.disconnected
    }

    /// Records `n` payload bytes the caller received (or skipped) itself; returns whether
    /// the payload is now complete.
    pub fn payload_received(&mut self, n: usize) -> Result<bool, RequestError> {
        let Some(mut pending) = self.pending else {
            return if n == 0 {
                Ok(true)
            } else {
                Err(RequestError::PayloadOverrun {
                    reported: n,
                    pending: 0,
                })
            };
        };
        let n32 = u32::try_from(n)
            .ok()
            .filter(|&n| n <= pending.remaining)
            .ok_or(RequestError::PayloadOverrun {
                reported: n,
                pending: pending.remaining,
            })?;
        pending.received += n32;
        pending.remaining -= n32;
        self.pending = (pending.remaining > 0).then_some(pending);
        Ok(pending.remaining == 0)
    }

    /// Consumes bytes from the front of `input` up to the next event; call again with the
    /// rest of the input until it is all consumed.
    pub fn decode(&mut self, input: &[u8]) -> Result<Decoded, RequestError> {
        if input.is_empty() {
            return Ok(Decoded {
                consumed: 0,
                event: None,
            });
        }
        if self.disconnected {
            return Err(RequestError::AfterDisconnect);
        }
        let mut consumed = 0;
        // A payload in progress first.
        if let Some(pending) = self.pending {
            let n = input.len().min(pending.remaining as usize);
            self.payload_received(n)?;
            consumed = n;
            if !pending.skip {
                return Ok(Decoded {
                    consumed,
                    event: Some(Event::Payload {
                        handle: pending.handle,
                        at: pending.received,
                        len: n,
                        complete: self.pending.is_none(),
                    }),
                });
            }
            if self.pending.is_some() {
                return Ok(Decoded {
                    consumed,
                    event: None,
                });
            }
        }
        let rest = input.get(consumed..).unwrap_or(&[]);
        let take = (RequestHeader::LEN - self.have).min(rest.len());
        if let (Some(dst), Some(src)) = (
            self.header.get_mut(self.have..self.have + take),
            rest.get(..take),
        ) {
            dst.copy_from_slice(src);
        }
        self.have += take;
        consumed += take;
        if self.have < RequestHeader::LEN {
            return Ok(Decoded {
                consumed,
                event: None,
            });
        }
        self.have = 0;
        let header = match RequestHeader::decode(&self.header) {
            Ok(header) => header,
            Err(_) => {
                let magic = wire::Reader::new(&self.header, "request")
                    .u32()
                    .unwrap_or(0);
                return Err(RequestError::BadMagic(magic));
            }
        };
        let event = match check_request(&header, &self.negotiated) {
            Ok(None) => {
                self.disconnected = true;
                Event::Disconnect
            }
            Ok(Some(request)) => {
                if request.payload_len() > 0 {
                    self.pending = Some(PendingPayload {
                        handle: request.handle,
                        received: 0,
                        remaining: request.payload_len(),
                        skip: false,
                    });
                }
                Event::Request(request)
            }
            Err(rejection) => {
                if rejection.skipped_payload > 0 {
                    self.pending = Some(PendingPayload {
                        handle: rejection.handle,
                        received: 0,
                        remaining: rejection.skipped_payload,
                        skip: true,
                    });
                }
                Event::Rejected(rejection)
            }
        };
        Ok(Decoded {
            consumed,
            event: Some(event),
        })
    }
}

/// Checks one request header against what was negotiated: `Ok(None)` for `NBD_CMD_DISC`,
/// `Ok(Some(request))` for a valid request, or the error the protocol names for it.
pub fn check_request(
    header: &RequestHeader,
    negotiated: &Negotiated,
) -> Result<Option<Request>, Rejection> {
    let code = CommandCode::from_code(header.command);
    let skipped_payload = if code == CommandCode::Write {
        header.length
    } else {
        0
    };
    let reject = |error: Errno, reason: RejectReason| Rejection {
        handle: header.handle,
        command: header.command,
        error,
        reason,
        skipped_payload,
    };
    let command = match code {
        CommandCode::Disc => return Ok(None),
        CommandCode::Read => Command::Read,
        CommandCode::Write => Command::Write,
        CommandCode::Flush => Command::Flush,
        CommandCode::Trim => Command::Trim,
        CommandCode::Cache => Command::Cache,
        CommandCode::WriteZeroes => Command::WriteZeroes,
        CommandCode::BlockStatus => Command::BlockStatus,
        CommandCode::Resize | CommandCode::Unknown(_) => {
            return Err(reject(
                Errno::Inval,
                RejectReason::UnknownCommand(header.command),
            ))
        }
    };
    let n = negotiated;
    let flags = header.flags;
    // Flags: unknown or not negotiated, then not for this command.
    let mut allowed = cf::NO_HOLE | cf::REQ_ONE;
    for (flag, tflag) in [
        (cf::FUA, tf::SEND_FUA),
        (cf::DF, tf::SEND_DF),
        (cf::FAST_ZERO, tf::SEND_FAST_ZERO),
    ] {
        if n.has_flag(tflag) {
            allowed |= flag;
        }
    }
    if flags & !allowed != 0 {
        return Err(reject(Errno::Inval, RejectReason::UnknownFlags(flags)));
    }
    for (flag, only) in [
        (cf::NO_HOLE, Command::WriteZeroes),
        (cf::FAST_ZERO, Command::WriteZeroes),
        (cf::DF, Command::Read),
        (cf::REQ_ONE, Command::BlockStatus),
    ] {
        if flags & flag != 0 && command != only {
            return Err(reject(
                Errno::Inval,
                RejectReason::FlagNotForCommand { flag, command },
            ));
        }
    }
    let writes = matches!(
        command,
        Command::Write | Command::Trim | Command::WriteZeroes
    );
    if writes && n.read_only() {
        return Err(reject(Errno::Perm, RejectReason::ReadOnly(command)));
    }
    let offered = match command {
        Command::Read | Command::Write | Command::BlockStatus => true,
        Command::Flush => n.has_flag(tf::SEND_FLUSH),
        Command::Trim => n.has_flag(tf::SEND_TRIM),
        Command::Cache => n.has_flag(tf::SEND_CACHE),
        Command::WriteZeroes => n.has_flag(tf::SEND_WRITE_ZEROES),
    };
    if !offered {
        return Err(reject(Errno::Inval, RejectReason::NotOffered(command)));
    }
    if command == Command::BlockStatus {
        if n.base_allocation.is_none() || !n.structured_replies {
            return Err(reject(Errno::Inval, RejectReason::NoMetaContext));
        }
        if header.length == 0 {
            return Err(reject(Errno::Inval, RejectReason::EmptyBlockStatus));
        }
    }
    if command == Command::Flush {
        if header.offset != 0 || header.length != 0 {
            return Err(reject(Errno::Inval, RejectReason::FlushRange));
        }
    } else {
        let maximum = if n.via_go {
            n.block_sizes.maximum
        } else {
            limits::MAX_PAYLOAD
        };
        if matches!(command, Command::Read | Command::Write) && header.length > maximum {
            // EOVERFLOW only where the protocol documents it: a structured READ may be
            // refused up front with it; otherwise an over-long payload is EINVAL.
            let error = if command == Command::Read && n.structured_replies {
                Errno::Overflow
            } else {
                Errno::Inval
            };
            return Err(reject(
                error,
                RejectReason::TooLong {
                    length: header.length,
                    maximum,
                },
            ));
        }
        let end = header.offset.checked_add(u64::from(header.length));
        if end.is_none_or(|end| end > n.size_bytes) {
            let error = if matches!(command, Command::Write | Command::WriteZeroes) {
                Errno::NoSpc
            } else {
                Errno::Inval
            };
            return Err(reject(
                error,
                RejectReason::PastEnd {
                    offset: header.offset,
                    length: header.length,
                    size: n.size_bytes,
                },
            ));
        }
    }
    let request = Request {
        handle: header.handle,
        command,
        flags,
        offset: header.offset,
        length: header.length,
    };
    let minimum = n.block_sizes.minimum;
    if n.block_size_constraints_agreed && command != Command::Flush && !request.is_aligned(minimum)
    {
        return Err(reject(
            Errno::Inval,
            RejectReason::Unaligned {
                offset: header.offset,
                length: header.length,
                minimum,
            },
        ));
    }
    Ok(Some(request))
}

/// A reply the negotiated options do not allow.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ReplyError {
    /// A structured chunk without structured replies.
    #[error("structured replies were not negotiated")]
    NotStructured,
    /// Block status without a selected context.
    #[error("no metadata context was selected")]
    NoMetaContext,
    /// Block status with no non-empty extent.
    #[error("block status needs at least one non-empty extent")]
    NoExtents,
    /// A content chunk of zero bytes, or too long for one chunk.
    #[error("content chunk of {0} bytes")]
    BadLength(u64),
}

/// Writes replies for one connection, as negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyEncoder {
    structured: bool,
    base_allocation: Option<u32>,
}

impl ReplyEncoder {
    /// An encoder for a connection that negotiated `negotiated`.
    pub fn new(negotiated: &Negotiated) -> ReplyEncoder {
        ReplyEncoder {
            structured: negotiated.structured_replies,
            base_allocation: negotiated
                .base_allocation
                .filter(|_| negotiated.structured_replies),
        }
    }

    /// Whether replies may be structured.
    pub fn structured(&self) -> bool {
        self.structured
    }

    /// Appends the success reply of a command with no reply data (WRITE, FLUSH, TRIM,
    /// WRITE_ZEROES, CACHE): a simple reply, which the protocol allows in both modes.
    pub fn ok(&self, out: &mut Vec<u8>, handle: u64) {
        SimpleReplyHeader { error: 0, handle }.encode(out);
    }

    /// Appends the header in front of a successful READ's `length` data bytes and returns
    /// how many data bytes must follow it: a simple reply header, or one `OFFSET_DATA`
    /// chunk marked done (a zero-length structured READ gets a `NONE` chunk and no data).
    /// The data is sent from the caller's buffer right after, with no copy.
    pub fn read_header(&self, out: &mut Vec<u8>, handle: u64, offset: u64, length: u32) -> u32 {
        if !self.structured {
            SimpleReplyHeader { error: 0, handle }.encode(out);
            return length;
        }
        if length == 0 || length > u32::MAX - 8 {
            self.done_chunk(out, handle);
            return 0;
        }
        ChunkHeader {
            flags: reply_flags::DONE,
            chunk_type: ChunkType::OffsetData.code(),
            handle,
            length: length + 8,
        }
        .encode(out);
        out.extend_from_slice(&offset.to_be_bytes());
        length
    }

    /// Appends an `OFFSET_DATA` chunk header for `length` data bytes at `offset` (the data
    /// follows from the caller's buffer), for a READ answered in several chunks.
    pub fn data_chunk_header(
        &self,
        out: &mut Vec<u8>,
        handle: u64,
        offset: u64,
        length: u32,
        done: bool,
    ) -> Result<(), ReplyError> {
        if !self.structured {
            return Err(ReplyError::NotStructured);
        }
        if length == 0 || length > u32::MAX - 8 {
            return Err(ReplyError::BadLength(u64::from(length)));
        }
        ChunkHeader {
            flags: if done { reply_flags::DONE } else { 0 },
            chunk_type: ChunkType::OffsetData.code(),
            handle,
            length: length + 8,
        }
        .encode(out);
        out.extend_from_slice(&offset.to_be_bytes());
        Ok(())
    }

    /// Appends an `OFFSET_HOLE` chunk: `length` bytes at `offset` read as zeros.
    pub fn hole_chunk(
        &self,
        out: &mut Vec<u8>,
        handle: u64,
        offset: u64,
        length: u32,
        done: bool,
    ) -> Result<(), ReplyError> {
        if !self.structured {
            return Err(ReplyError::NotStructured);
        }
        if length == 0 {
            return Err(ReplyError::BadLength(0));
        }
        Chunk::OffsetHole {
            offset,
            size: length,
        }
        .encode(out, handle, done);
        Ok(())
    }

    /// Appends the final `NONE` chunk of a structured reply (simple replies: nothing).
    pub fn done_chunk(&self, out: &mut Vec<u8>, handle: u64) {
        if self.structured {
            Chunk::None.encode(out, handle, true);
        }
    }

    /// Appends a whole error reply: an `ERROR` chunk carrying `message` when structured
    /// (the protocol's preference, and required for READ), else a simple reply.
    pub fn error(&self, out: &mut Vec<u8>, handle: u64, error: Errno, message: &str) {
        if self.structured {
            Chunk::Error {
                error: error.code(),
                message: wire::truncate_message(message).to_owned(),
                offset: None,
            }
            .encode(out, handle, true);
        } else {
            SimpleReplyHeader {
                error: error.code(),
                handle,
            }
            .encode(out);
        }
    }

    /// Appends an `ERROR_OFFSET` chunk (an error at `offset` inside the request).
    pub fn error_offset(
        &self,
        out: &mut Vec<u8>,
        handle: u64,
        error: Errno,
        message: &str,
        offset: u64,
        done: bool,
    ) -> Result<(), ReplyError> {
        if !self.structured {
            return Err(ReplyError::NotStructured);
        }
        Chunk::Error {
            error: error.code(),
            message: wire::truncate_message(message).to_owned(),
            offset: Some(offset),
        }
        .encode(out, handle, done);
        Ok(())
    }

    /// Appends the reply to a refused request.
    pub fn reject(&self, out: &mut Vec<u8>, rejection: &Rejection) {
        self.error(
            out,
            rejection.handle,
            rejection.error,
            &rejection.reason.to_string(),
        );
    }

    /// Appends the `BLOCK_STATUS` reply (one chunk, done) to `request`, from `extents`
    /// starting at its offset: empty extents are dropped, neighbours with equal status
    /// merged, the total cut to the request's length, one extent only with `REQ_ONE`, and
    /// at most [`limits::MAX_BLOCK_STATUS_EXTENTS`]. Returns the bytes described.
    pub fn block_status(
        &self,
        out: &mut Vec<u8>,
        request: &Request,
        extents: &[Extent],
    ) -> Result<u64, ReplyError> {
        if !self.structured {
            return Err(ReplyError::NotStructured);
        }
        let context = self.base_allocation.ok_or(ReplyError::NoMetaContext)?;
        let one = request.has_flag(cf::REQ_ONE);
        let wanted = u64::from(request.length);
        let mut merged: Vec<Extent> = Vec::new();
        let mut covered = 0u64;
        for extent in extents {
            if covered >= wanted {
                break;
            }
            let length = u64::from(extent.length).min(wanted - covered);
            if length == 0 {
                continue;
            }
            match merged.last_mut() {
                Some(last)
                    if last.flags == extent.flags && u64::from(last.length) + length <= 1 << 31 =>
                {
                    // Both fit in u32 (checked just above).
                    last.length += u32::try_from(length).unwrap_or(0);
                }
                _ => {
                    if one && !merged.is_empty() || merged.len() >= limits::MAX_BLOCK_STATUS_EXTENTS
                    {
                        break;
                    }
                    merged.push(Extent {
                        length: u32::try_from(length).unwrap_or(0),
                        flags: extent.flags,
                    });
                }
            }
            covered += length;
        }
        if merged.is_empty() {
            return Err(ReplyError::NoExtents);
        }
        Chunk::BlockStatus {
            context,
            extents: merged,
        }
        .encode(out, request.handle, true);
        Ok(covered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::handshake::BlockSizes;
    use crate::nbd::wire::state_flags;

    fn negotiated(structured: bool) -> Negotiated {
        Negotiated {
            export_name: "vol0".into(),
            size_bytes: 1 << 20,
            transmission_flags: 0x0ded,
            structured_replies: structured,
            base_allocation: structured.then_some(1),
            block_size_constraints_agreed: true,
            block_sizes: BlockSizes {
                minimum: 512,
                preferred: 4096,
                maximum: 1 << 16,
            },
            no_zeroes: true,
            via_go: true,
        }
    }

    fn header(command: CommandCode, flags: u16, offset: u64, length: u32) -> Vec<u8> {
        let mut out = Vec::new();
        RequestHeader {
            flags,
            command: command.code(),
            handle: 42,
            offset,
            length,
        }
        .encode(&mut out);
        out
    }

    #[test]
    fn write_payload_arrives_as_ranges_or_directly() {
        let mut dec = RequestDecoder::new(negotiated(true));
        let mut bytes = header(CommandCode::Write, cf::FUA, 512, 1024);
        bytes.extend(std::iter::repeat_n(7u8, 600));
        let d = dec.decode(&bytes).unwrap();
        assert_eq!(d.consumed, 28);
        assert!(matches!(d.event, Some(Event::Request(r)) if r.fua() && r.payload_len() == 1024));
        let d = dec.decode(&bytes[28..]).unwrap();
        assert_eq!(
            d.event,
            Some(Event::Payload {
                handle: 42,
                at: 0,
                len: 600,
                complete: false
            })
        );
        let pending = dec.payload_pending().unwrap();
        assert_eq!((pending.received, pending.remaining), (600, 424));
        // The rest received straight into the caller's buffer.
        assert_eq!(dec.payload_received(424), Ok(true));
        assert_eq!(dec.payload_pending(), None);
        assert!(dec.payload_received(1).is_err());
    }

    #[test]
    fn rejected_write_payload_is_skipped() {
        let mut dec = RequestDecoder::new(negotiated(true));
        let mut bytes = header(CommandCode::Write, 0, 1 << 20, 512);
        bytes.extend([0u8; 512]);
        bytes.extend(header(CommandCode::Flush, 0, 0, 0));
        let d = dec.decode(&bytes).unwrap();
        let Some(Event::Rejected(r)) = d.event else {
            panic!("{d:?}")
        };
        assert_eq!((r.error, r.skipped_payload), (Errno::NoSpc, 512));
        let d = dec.decode(&bytes[28..]).unwrap();
        assert!(matches!(d.event, Some(Event::Request(r)) if r.command == Command::Flush));
        assert_eq!(d.consumed, 512 + 28);
    }

    #[test]
    fn block_status_extents_follow_the_rules() {
        let enc = ReplyEncoder::new(&negotiated(true));
        let request = Request {
            handle: 1,
            command: Command::BlockStatus,
            flags: 0,
            offset: 0,
            length: 12288,
        };
        let extents = [
            Extent {
                length: 4096,
                flags: 0,
            },
            Extent {
                length: 0,
                flags: 3,
            },
            Extent {
                length: 4096,
                flags: 0,
            },
            Extent {
                length: 8192,
                flags: state_flags::HOLE | state_flags::ZERO,
            },
        ];
        let mut out = Vec::new();
        assert_eq!(enc.block_status(&mut out, &request, &extents), Ok(12288));
        let h = ChunkHeader::decode(&out).unwrap();
        let chunk = Chunk::decode(h.chunk_type, &out[20..]).unwrap();
        assert_eq!(
            chunk,
            Chunk::BlockStatus {
                context: 1,
                extents: vec![
                    Extent {
                        length: 8192,
                        flags: 0
                    },
                    Extent {
                        length: 4096,
                        flags: 3
                    }
                ]
            }
        );
        let one = Request {
            flags: cf::REQ_ONE,
            length: 4096,
            ..request
        };
        out.clear();
        assert_eq!(enc.block_status(&mut out, &one, &extents), Ok(4096));
        assert_eq!(out.len(), 20 + 4 + 8);
        assert_eq!(
            enc.block_status(&mut out, &request, &[]),
            Err(ReplyError::NoExtents)
        );
        let simple = ReplyEncoder::new(&negotiated(false));
        assert_eq!(
            simple.block_status(&mut out, &request, &extents),
            Err(ReplyError::NotStructured)
        );
    }

    #[test]
    fn read_replies_in_both_modes() {
        let mut out = Vec::new();
        let follows = ReplyEncoder::new(&negotiated(false)).read_header(&mut out, 5, 0, 4096);
        assert_eq!((follows, out.len()), (4096, 16));
        out.clear();
        let follows = ReplyEncoder::new(&negotiated(true)).read_header(&mut out, 5, 512, 4096);
        assert_eq!((follows, out.len()), (4096, 28));
        let h = ChunkHeader::decode(&out).unwrap();
        assert_eq!((h.flags, h.length), (reply_flags::DONE, 4104));
    }
}
