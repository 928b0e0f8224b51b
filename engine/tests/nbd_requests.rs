//! Goal: every bad request gets the error the NBD protocol document names for it (or, for a
//! bad magic, a fatal error that closes the connection), valid requests pass through with
//! their WRITE payloads handed to the caller, and replies are encoded as negotiated.
//!
//! Method: negotiate with a real [`Handshake`] (GO with or without block sizes, EXPORT_NAME,
//! structured replies and `base:allocation` or not), then feed request streams to a
//! [`RequestDecoder`] whole and byte at a time (which must agree), and decode the replies
//! the [`ReplyEncoder`] writes with the wire decoders.

use std::sync::Arc;

use spool_engine::nbd::handshake::BASE_ALLOCATION;
use spool_engine::nbd::limits;
use spool_engine::nbd::wire::{
    client_flags, command_flags as cf, state_flags, Chunk, ChunkHeader, CommandCode, Extent,
    InfoRequest, InfoType, MetaContextRequest, OptionCode, OptionHeader, RequestHeader,
    SimpleReplyHeader,
};
use spool_engine::nbd::{
    BlockSizes, Command, Errno, Event, ExportInfo, Features, Handshake, HandshakeOptions,
    Negotiated, Outcome, RejectReason, ReplyEncoder, Request, RequestDecoder, RequestError,
};

const SIZE: u64 = 1 << 20;
const MAX: u32 = 1 << 20;

#[derive(Clone, Copy)]
struct Setup {
    read_only: bool,
    structured: bool,
    meta: bool,
    /// GO with NBD_INFO_BLOCK_SIZE (else GO without it, or EXPORT_NAME if `!go`).
    block_size: bool,
    go: bool,
}

const GO_ALL: Setup = Setup {
    read_only: false,
    structured: true,
    meta: true,
    block_size: true,
    go: true,
};

fn negotiate(setup: Setup) -> Negotiated {
    let exports: Arc<[ExportInfo]> = vec![ExportInfo {
        name: "vol0".into(),
        description: String::new(),
        size_bytes: SIZE,
        read_only: setup.read_only,
        block_sizes: BlockSizes {
            minimum: 4096,
            preferred: 4096,
            maximum: MAX,
        },
        base_allocation: true,
        features: Features::ALL,
    }]
    .into();
    let (mut hs, _) = Handshake::new(exports, HandshakeOptions::default()).unwrap();
    let mut bytes = client_flags::FIXED_NEWSTYLE.to_be_bytes().to_vec();
    let mut opt = |code: OptionCode, data: &[u8]| {
        OptionHeader {
            option: code.code(),
            length: data.len() as u32,
        }
        .encode(&mut bytes);
        bytes.extend_from_slice(data);
    };
    if setup.structured {
        opt(OptionCode::StructuredReply, &[]);
    }
    if setup.meta {
        let mut data = Vec::new();
        MetaContextRequest {
            export: "vol0".into(),
            queries: vec![BASE_ALLOCATION.into()],
        }
        .encode(&mut data);
        opt(OptionCode::SetMetaContext, &data);
    }
    if setup.go {
        let mut data = Vec::new();
        let requests = if setup.block_size {
            vec![InfoType::BlockSize.code()]
        } else {
            vec![]
        };
        InfoRequest {
            name: "vol0".into(),
            requests,
        }
        .encode(&mut data);
        opt(OptionCode::Go, &data);
    } else {
        opt(OptionCode::ExportName, b"vol0");
    }
    let step = hs.input(&bytes).unwrap();
    match step.outcome {
        Some(Outcome::Done { negotiated, .. }) => negotiated,
        other => panic!("{other:?}"),
    }
}

fn req(command: u16, flags: u16, handle: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut out = Vec::new();
    RequestHeader {
        flags,
        command,
        handle,
        offset,
        length,
    }
    .encode(&mut out);
    out
}

fn write(handle: u64, offset: u64, length: u32, fill: u8) -> Vec<u8> {
    let mut out = req(CommandCode::Write.code(), 0, handle, offset, length);
    out.resize(out.len() + length as usize, fill);
    out
}

/// Events of a stream, payload pieces merged into one `(handle, bytes)` per WRITE.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Request(Request),
    Payload(u64, Vec<u8>),
    Rejected(u64, Errno, RejectReason, u32),
    Disconnect,
}

fn decode_all(
    negotiated: &Negotiated,
    stream: &[u8],
    chunk: usize,
) -> (Vec<Seen>, Option<RequestError>) {
    let mut dec = RequestDecoder::new(negotiated.clone());
    let mut seen = Vec::new();
    for piece in stream.chunks(chunk.max(1)) {
        let mut at = 0;
        while at < piece.len() {
            let d = match dec.decode(&piece[at..]) {
                Ok(d) => d,
                Err(err) => return (seen, Some(err)),
            };
            assert!(dec.buffered_bytes() <= limits::REQUEST_HEADER_BUFFER);
            let bytes = &piece[at..at + d.consumed];
            at += d.consumed;
            match d.event {
                None => assert_eq!(at, piece.len(), "no event, input left"),
                Some(Event::Request(r)) => seen.push(Seen::Request(r)),
                Some(Event::Payload {
                    handle,
                    len,
                    at: off,
                    ..
                }) => {
                    let data = &bytes[bytes.len() - len..];
                    match seen.last_mut() {
                        Some(Seen::Payload(h, buf)) if *h == handle => {
                            assert_eq!(off as usize, buf.len());
                            buf.extend_from_slice(data);
                        }
                        _ => {
                            assert_eq!(off, 0);
                            seen.push(Seen::Payload(handle, data.to_vec()));
                        }
                    }
                }
                Some(Event::Rejected(r)) => seen.push(Seen::Rejected(
                    r.handle,
                    r.error,
                    r.reason,
                    r.skipped_payload,
                )),
                Some(Event::Disconnect) => seen.push(Seen::Disconnect),
            }
        }
    }
    (seen, None)
}

/// Decodes `stream` whole and byte by byte; both must agree.
fn decode(negotiated: &Negotiated, stream: &[u8]) -> (Vec<Seen>, Option<RequestError>) {
    let whole = decode_all(negotiated, stream, stream.len());
    let bytewise = decode_all(negotiated, stream, 1);
    assert_eq!(whole, bytewise, "events depend on how input is split");
    let odd = decode_all(negotiated, stream, 7);
    assert_eq!(whole, odd);
    whole
}

/// The error a single request gets (`None` when accepted).
fn error_of(negotiated: &Negotiated, stream: &[u8]) -> Option<Errno> {
    let (seen, fatal) = decode(negotiated, stream);
    assert!(fatal.is_none(), "{fatal:?}");
    match seen.first() {
        Some(Seen::Rejected(_, errno, _, _)) => Some(*errno),
        Some(Seen::Request(_)) => None,
        other => panic!("{other:?}"),
    }
}

const READ: u16 = 0;
const WRITE: u16 = 1;
const DISC: u16 = 2;
const FLUSH: u16 = 3;
const TRIM: u16 = 4;
const CACHE: u16 = 5;
const WRITE_ZEROES: u16 = 6;
const BLOCK_STATUS: u16 = 7;

#[test]
fn valid_requests_pipeline_with_their_payloads() {
    let n = negotiate(GO_ALL);
    let mut stream = Vec::new();
    stream.extend(req(READ, 0, 1, 0, 4096));
    stream.extend(write(2, 4096, 8192, 0xab));
    stream.extend(req(FLUSH, 0, 3, 0, 0));
    stream.extend(req(TRIM, cf::FUA, 4, 0, 4096));
    stream.extend(req(WRITE_ZEROES, cf::NO_HOLE | cf::FAST_ZERO, 5, 0, 4096));
    stream.extend(req(BLOCK_STATUS, cf::REQ_ONE, 6, 0, SIZE as u32));
    stream.extend(req(CACHE, 0, 7, 0, 4096));
    stream.extend(req(READ, cf::DF, 8, SIZE - 4096, 4096));
    stream.extend(write(9, 0, 0, 0));
    stream.extend(req(DISC, 0, 10, 0, 0));
    let (seen, fatal) = decode(&n, &stream);
    assert_eq!(fatal, None);
    let commands: Vec<String> = seen
        .iter()
        .map(|s| match s {
            Seen::Request(r) => format!("{:?}#{}", r.command, r.handle),
            Seen::Payload(h, data) => format!("payload#{h}:{}", data.len()),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        commands,
        [
            "Read#1",
            "Write#2",
            "payload#2:8192",
            "Flush#3",
            "Trim#4",
            "WriteZeroes#5",
            "BlockStatus#6",
            "Cache#7",
            "Read#8",
            "Write#9",
            "Disconnect"
        ]
    );
    assert!(matches!(&seen[2], Seen::Payload(2, data) if data.iter().all(|&b| b == 0xab)));
}

#[test]
fn bad_magic_is_fatal() {
    let n = negotiate(GO_ALL);
    let mut stream = req(READ, 0, 1, 0, 4096);
    stream.extend(req(READ, 0, 2, 0, 4096));
    stream[28..32].copy_from_slice(&0x2560_9514u32.to_be_bytes());
    let (seen, fatal) = decode(&n, &stream);
    assert_eq!(seen.len(), 1);
    assert_eq!(fatal, Some(RequestError::BadMagic(0x2560_9514)));
    // The extended-header magic was not negotiated either.
    let mut stream = req(READ, 0, 1, 0, 4096);
    stream[..4].copy_from_slice(&0x21e4_1c71u32.to_be_bytes());
    assert_eq!(
        decode(&n, &stream).1,
        Some(RequestError::BadMagic(0x21e4_1c71))
    );
}

#[test]
fn unknown_command_is_einval_and_the_stream_goes_on() {
    let n = negotiate(GO_ALL);
    for command in [8u16, 9, 0xffff] {
        let mut stream = req(command, 0, 1, 0, 4096);
        stream.extend(req(READ, 0, 2, 0, 4096));
        let (seen, fatal) = decode(&n, &stream);
        assert_eq!(fatal, None);
        assert_eq!(
            seen[0],
            Seen::Rejected(1, Errno::Inval, RejectReason::UnknownCommand(command), 0)
        );
        assert!(matches!(seen[1], Seen::Request(Request { handle: 2, .. })));
    }
}

#[test]
fn past_the_end_is_enospc_for_writes_and_einval_otherwise() {
    let n = negotiate(GO_ALL);
    let end = SIZE;
    assert_eq!(error_of(&n, &write(1, end, 4096, 1)), Some(Errno::NoSpc));
    assert_eq!(
        error_of(&n, &write(1, end - 4096, 8192, 1)),
        Some(Errno::NoSpc)
    );
    assert_eq!(
        error_of(&n, &req(WRITE_ZEROES, 0, 1, end, 4096)),
        Some(Errno::NoSpc)
    );
    for command in [READ, TRIM, CACHE, BLOCK_STATUS] {
        assert_eq!(
            error_of(&n, &req(command, 0, 1, end - 4096, 8192)),
            Some(Errno::Inval),
            "command {command}"
        );
    }
    // Offset + length overflowing u64.
    assert_eq!(
        error_of(&n, &req(READ, 0, 1, u64::MAX - 4095, 8192)),
        Some(Errno::Inval)
    );
    assert_eq!(
        error_of(&n, &write(1, u64::MAX - 4095, 8192, 1)),
        Some(Errno::NoSpc)
    );
    // Exactly to the end is fine; a zero-length request at the end too.
    assert_eq!(error_of(&n, &req(READ, 0, 1, end - 4096, 4096)), None);
    assert_eq!(error_of(&n, &req(READ, 0, 1, end, 0)), None);
}

#[test]
fn rejected_write_payload_is_skipped() {
    let n = negotiate(GO_ALL);
    let mut stream = write(1, SIZE, 8192, 0xee);
    stream.extend(write(2, 0, 4096, 0x11));
    let (seen, fatal) = decode(&n, &stream);
    assert_eq!(fatal, None);
    assert!(matches!(
        seen[0],
        Seen::Rejected(1, Errno::NoSpc, RejectReason::PastEnd { .. }, 8192)
    ));
    assert!(matches!(seen[1], Seen::Request(Request { handle: 2, .. })));
    assert!(matches!(&seen[2], Seen::Payload(2, d) if d.len() == 4096 && d[0] == 0x11));
    assert_eq!(seen.len(), 3);
}

#[test]
fn longer_than_the_maximum() {
    // READ: EOVERFLOW with structured replies (refused up front), EINVAL with simple ones;
    // WRITE: EINVAL (its payload skipped). Commands without payload may be longer.
    let structured = negotiate(GO_ALL);
    let simple = negotiate(Setup {
        structured: false,
        meta: false,
        ..GO_ALL
    });
    assert_eq!(
        error_of(&structured, &req(READ, 0, 1, 0, MAX + 4096)),
        Some(Errno::Overflow)
    );
    assert_eq!(
        error_of(&simple, &req(READ, 0, 1, 0, MAX + 4096)),
        Some(Errno::Inval)
    );
    for n in [&structured, &simple] {
        assert_eq!(error_of(n, &write(1, 0, MAX + 4096, 0)), Some(Errno::Inval));
        assert_eq!(error_of(n, &req(READ, 0, 1, 0, MAX)), None);
        assert_eq!(error_of(n, &req(TRIM, 0, 1, 0, SIZE as u32)), None);
        assert_eq!(error_of(n, &req(WRITE_ZEROES, 0, 1, 0, SIZE as u32)), None);
    }
    // With EXPORT_NAME nothing was advertised: the default 32 MiB applies.
    let old = negotiate(Setup {
        go: false,
        block_size: false,
        ..GO_ALL
    });
    let (seen, _) = decode(&old, &req(READ, 0, 1, 0, MAX + 4096));
    assert!(matches!(
        seen[0],
        Seen::Rejected(1, Errno::Inval, RejectReason::PastEnd { .. }, 0)
    ));
    let (seen, _) = decode(&old, &req(READ, 0, 1, 0, limits::MAX_PAYLOAD + 1));
    assert!(matches!(
        seen[0],
        Seen::Rejected(1, Errno::Overflow, RejectReason::TooLong { maximum, .. }, 0)
            if maximum == limits::MAX_PAYLOAD
    ));
}

#[test]
fn unaligned_requests_when_constraints_were_agreed() {
    let agreed = negotiate(GO_ALL);
    for (command, offset, length) in [
        (READ, 512, 4096),
        (READ, 0, 4097),
        (WRITE, 0, 512),
        (TRIM, 100, 4096),
        (WRITE_ZEROES, 4096, 1),
        (BLOCK_STATUS, 1, 4096),
        (CACHE, 0, 100),
    ] {
        let stream = if command == WRITE {
            write(1, offset, length, 0)
        } else {
            req(command, 0, 1, offset, length)
        };
        let (seen, _) = decode(&agreed, &stream);
        assert!(
            matches!(
                seen[0],
                Seen::Rejected(1, Errno::Inval, RejectReason::Unaligned { .. }, _)
            ),
            "{command} {offset}+{length}: {seen:?}"
        );
    }
    // Not agreed (GO without NBD_INFO_BLOCK_SIZE, or EXPORT_NAME): passed through, marked.
    for setup in [
        Setup {
            block_size: false,
            ..GO_ALL
        },
        Setup {
            go: false,
            block_size: false,
            ..GO_ALL
        },
    ] {
        let n = negotiate(setup);
        assert!(!n.block_size_constraints_agreed);
        let (seen, _) = decode(&n, &req(READ, 0, 1, 512, 100));
        let Seen::Request(r) = &seen[0] else {
            panic!("{seen:?}")
        };
        assert!(!r.is_aligned(n.block_sizes.minimum));
    }
}

#[test]
fn writes_to_a_read_only_export_are_eperm() {
    let n = negotiate(Setup {
        read_only: true,
        ..GO_ALL
    });
    assert!(n.read_only());
    assert_eq!(error_of(&n, &write(1, 0, 4096, 0)), Some(Errno::Perm));
    assert_eq!(error_of(&n, &req(TRIM, 0, 1, 0, 4096)), Some(Errno::Perm));
    assert_eq!(
        error_of(&n, &req(WRITE_ZEROES, 0, 1, 0, 4096)),
        Some(Errno::Perm)
    );
    assert_eq!(error_of(&n, &req(READ, 0, 1, 0, 4096)), None);
    assert_eq!(error_of(&n, &req(FLUSH, 0, 1, 0, 0)), None);
    assert_eq!(error_of(&n, &req(BLOCK_STATUS, 0, 1, 0, 4096)), None);
    // Even past the end, a write to a read-only export is EPERM, and its payload skipped.
    let (seen, _) = decode(&n, &write(1, SIZE, 4096, 0));
    assert!(matches!(
        seen[..],
        [Seen::Rejected(
            1,
            Errno::Perm,
            RejectReason::ReadOnly(Command::Write),
            4096
        )]
    ));
}

#[test]
fn flags_must_be_known_negotiated_and_apply() {
    let n = negotiate(GO_ALL);
    let simple = negotiate(Setup {
        structured: false,
        meta: false,
        ..GO_ALL
    });
    for (negotiated, command, flags, ok) in [
        (&n, READ, cf::FUA, true),
        (&n, FLUSH, cf::FUA, true),
        (&n, READ, cf::DF, true),
        (&simple, READ, cf::DF, false),
        (&n, WRITE_ZEROES, cf::NO_HOLE | cf::FAST_ZERO, true),
        (&n, TRIM, cf::NO_HOLE, false),
        (&n, WRITE_ZEROES, cf::DF, false),
        (&n, READ, cf::REQ_ONE, false),
        (&n, BLOCK_STATUS, cf::REQ_ONE, true),
        (&n, READ, cf::FAST_ZERO, false),
        (&n, READ, cf::PAYLOAD_LEN, false),
        (&n, READ, 1 << 9, false),
        (&n, CACHE, 1 << 15, false),
    ] {
        let length = if command == FLUSH { 0 } else { 4096 };
        let got = error_of(negotiated, &req(command, flags, 1, 0, length));
        assert_eq!(
            got,
            if ok { None } else { Some(Errno::Inval) },
            "command {command} flags {flags:#x}"
        );
    }
}

#[test]
fn block_status_needs_a_context_and_a_length() {
    let none = negotiate(Setup {
        meta: false,
        ..GO_ALL
    });
    let (seen, _) = decode(&none, &req(BLOCK_STATUS, 0, 1, 0, 4096));
    assert!(matches!(
        seen[0],
        Seen::Rejected(1, Errno::Inval, RejectReason::NoMetaContext, 0)
    ));
    let n = negotiate(GO_ALL);
    assert_eq!(
        error_of(&n, &req(BLOCK_STATUS, 0, 1, 0, 0)),
        Some(Errno::Inval)
    );
}

#[test]
fn flush_range_must_be_zero() {
    let n = negotiate(GO_ALL);
    assert_eq!(error_of(&n, &req(FLUSH, 0, 1, 0, 4096)), Some(Errno::Inval));
    assert_eq!(error_of(&n, &req(FLUSH, 0, 1, 4096, 0)), Some(Errno::Inval));
}

#[test]
fn nothing_may_follow_disconnect() {
    let n = negotiate(GO_ALL);
    let mut stream = req(DISC, 0, 1, 0, 0);
    stream.extend(req(READ, 0, 2, 0, 4096));
    let (seen, fatal) = decode(&n, &stream);
    assert_eq!(seen, vec![Seen::Disconnect]);
    assert_eq!(fatal, Some(RequestError::AfterDisconnect));
}

#[test]
fn write_payload_goes_straight_to_the_callers_buffer() {
    let n = negotiate(GO_ALL);
    let mut dec = RequestDecoder::new(n);
    let stream = write(5, 0, 8192, 0x5a);
    // The connection reads exactly one header, learns the payload's size, and receives
    // the payload into its own buffer without the decoder seeing it.
    let d = dec.decode(&stream[..RequestHeader::LEN]).unwrap();
    assert!(matches!(d.event, Some(Event::Request(r)) if r.payload_len() == 8192));
    let pending = dec.payload_pending().unwrap();
    assert_eq!(
        (pending.handle, pending.remaining, pending.skip),
        (5, 8192, false)
    );
    let mut dma = vec![0u8; pending.remaining as usize];
    dma[..5000].copy_from_slice(&stream[28..5028]);
    assert_eq!(dec.payload_received(5000), Ok(false));
    dma[5000..].copy_from_slice(&stream[5028..]);
    assert_eq!(dec.payload_received(3192), Ok(true));
    assert!(dma.iter().all(|&b| b == 0x5a));
    assert_eq!(
        dec.payload_received(1),
        Err(RequestError::PayloadOverrun {
            reported: 1,
            pending: 0
        })
    );
}

#[test]
fn replies_follow_the_negotiation() {
    let structured = ReplyEncoder::new(&negotiate(GO_ALL));
    let simple = ReplyEncoder::new(&negotiate(Setup {
        structured: false,
        meta: false,
        ..GO_ALL
    }));
    // Errors: a simple reply without structured replies, an ERROR chunk with the message
    // otherwise (never a simple reply to a READ).
    let mut out = Vec::new();
    simple.error(&mut out, 9, Errno::NoSpc, "past the end");
    assert_eq!(
        SimpleReplyHeader::decode(&out).unwrap(),
        SimpleReplyHeader {
            error: 28,
            handle: 9
        }
    );
    assert_eq!(out.len(), SimpleReplyHeader::LEN);
    out.clear();
    structured.error(&mut out, 9, Errno::Overflow, "too long");
    let h = ChunkHeader::decode(&out).unwrap();
    assert_eq!((h.handle, h.flags), (9, 1));
    assert_eq!(
        Chunk::decode(h.chunk_type, &out[ChunkHeader::LEN..]).unwrap(),
        Chunk::Error {
            error: 75,
            message: "too long".into(),
            offset: None
        }
    );
    // A sparse READ in chunks: data, hole, error at an offset, done.
    out.clear();
    structured
        .data_chunk_header(&mut out, 3, 0, 4096, false)
        .unwrap();
    out.extend_from_slice(&[7; 4096]);
    structured
        .hole_chunk(&mut out, 3, 4096, 8192, false)
        .unwrap();
    structured
        .error_offset(&mut out, 3, Errno::Io, "bad sector", 12288, false)
        .unwrap();
    structured.done_chunk(&mut out, 3);
    let mut chunks = Vec::new();
    let mut rest = &out[..];
    while !rest.is_empty() {
        let h = ChunkHeader::decode(rest).unwrap();
        let end = ChunkHeader::LEN + h.length as usize;
        chunks.push((
            h.flags,
            Chunk::decode(h.chunk_type, &rest[ChunkHeader::LEN..end]).unwrap(),
        ));
        rest = &rest[end..];
    }
    assert_eq!(chunks.len(), 4);
    assert!(matches!(&chunks[0], (0, Chunk::OffsetData { offset: 0, data }) if data.len() == 4096));
    assert_eq!(
        chunks[1],
        (
            0,
            Chunk::OffsetHole {
                offset: 4096,
                size: 8192
            }
        )
    );
    assert_eq!(chunks[3], (1, Chunk::None));
    assert!(simple.hole_chunk(&mut out, 3, 0, 1, true).is_err());
    // Block status with REQ_ONE: one extent, no longer than asked.
    let request = Request {
        handle: 4,
        command: Command::BlockStatus,
        flags: cf::REQ_ONE,
        offset: 0,
        length: 4096,
    };
    out.clear();
    let covered = structured
        .block_status(
            &mut out,
            &request,
            &[Extent {
                length: 65536,
                flags: state_flags::HOLE | state_flags::ZERO,
            }],
        )
        .unwrap();
    assert_eq!(covered, 4096);
    let h = ChunkHeader::decode(&out).unwrap();
    assert_eq!(
        Chunk::decode(h.chunk_type, &out[ChunkHeader::LEN..]).unwrap(),
        Chunk::BlockStatus {
            context: 1,
            extents: vec![Extent {
                length: 4096,
                flags: 3
            }]
        }
    );
}
