//! The NBD protocol targets: bytes from a hostile client into the handshake state machine
//! and the request decoder of `spool_engine::nbd`, with seeds made by scripted clients.
//!
//! Input layouts (every byte string is valid; missing knobs read as zero):
//!
//! | target | knobs | payload |
//! |---|---|---|
//! | `nbd_handshake` | options u8 (bit 0 no structured replies, bit 1 no NO_ZEROES, bit 2 no LIST, bit 3 require block sizes, bit 4 default export), split u8 (chunk size `1 + n % 31`) | the client's bytes from its flags on |
//! | `nbd_request` | negotiated u8 (bit 0 structured, bit 1 `base:allocation`, bit 2 block sizes agreed, bit 3 read-only, bit 4 via GO, bit 5 no optional features), minimum block u8 (`1 << n % 13`), maximum payload u8, size u16 (in minimum blocks), split u8 | the request stream |
//!
//! Both targets check, beyond "no panic": the answer does not depend on how the input is
//! split (whole, and in chunks of the split knob's size); buffering stays within the
//! documented limits; everything the server sends decodes with the wire decoders; and what
//! is accepted obeys what was negotiated.

use std::collections::BTreeSet;
use std::sync::Arc;

use spool_engine::nbd::limits;
use spool_engine::nbd::wire::{
    client_flags, command_flags as cf, transmission_flags as tf, Chunk, ChunkHeader, Errno, Extent,
    InfoRequest, InfoType, MetaContextRequest, OptionCode, OptionHeader, OptionReplyHeader,
    ReplyType, RequestHeader, SimpleReplyHeader,
};
use spool_engine::nbd::{
    BlockSizes, Command, Event, ExportInfo, Features, Handshake, HandshakeError, HandshakeOptions,
    Negotiated, Outcome, ReplyEncoder, Request, RequestDecoder,
};

use crate::input::Input;
use crate::targets::class;

/// Bytes of knobs in front of an `nbd_handshake` input.
pub const NBD_HANDSHAKE_KNOBS: usize = 2;
/// Bytes of knobs in front of an `nbd_request` input.
pub const NBD_REQUEST_KNOBS: usize = 6;

fn exports() -> Arc<[ExportInfo]> {
    let export = |name: &str, size, read_only, minimum, base| ExportInfo {
        name: String::from(name),
        description: format!("volume {name}"),
        size_bytes: size,
        read_only,
        block_sizes: BlockSizes {
            minimum,
            preferred: 4096,
            maximum: limits::MAX_PAYLOAD,
        },
        base_allocation: base,
        features: Features::ALL,
    };
    vec![
        export("vol0", 1 << 30, false, 512, true),
        export("snap0", 1 << 20, true, 4096, true),
        export("plain", 12345, false, 1, false),
    ]
    .into()
}

#[derive(Debug, PartialEq)]
struct HandshakeRun {
    sent: Vec<u8>,
    consumed: usize,
    outcome: Option<Outcome>,
}

fn drive_handshake(options: &HandshakeOptions, script: &[u8], chunk: usize) -> HandshakeRun {
    let (mut hs, greeting) = match Handshake::new(exports(), options.clone()) {
        Ok(pair) => pair,
        Err(err) => panic!("valid configuration refused: {err}"),
    };
    assert_eq!(greeting.len(), 18, "greeting length");
    let mut run = HandshakeRun {
        sent: Vec::new(),
        consumed: 0,
        outcome: None,
    };
    for piece in script.chunks(chunk.max(1)) {
        let step = match hs.input(piece) {
            Ok(step) => step,
            Err(err) => panic!("input refused before an outcome: {err}"),
        };
        assert!(step.consumed <= piece.len(), "consumed more than given");
        assert!(
            hs.buffered_bytes() <= limits::MAX_HANDSHAKE_BUFFER,
            "{} bytes buffered",
            hs.buffered_bytes()
        );
        run.sent.extend_from_slice(&step.send);
        run.consumed += step.consumed;
        if step.outcome.is_some() {
            assert_eq!(hs.input(b"x"), Err(HandshakeError::Finished));
            run.outcome = step.outcome;
            break;
        }
        assert_eq!(step.consumed, piece.len(), "input left before an outcome");
    }
    run
}

/// Splits the server's bytes into option replies; returns the bytes after the last one.
fn option_replies(mut bytes: &[u8]) -> (Vec<OptionReplyHeader>, &[u8]) {
    let mut headers = Vec::new();
    while let Ok(header) = OptionReplyHeader::decode(bytes) {
        let end = OptionReplyHeader::LEN + header.length as usize;
        assert!(end <= bytes.len(), "option reply longer than what was sent");
        headers.push(header);
        bytes = &bytes[end..];
    }
    (headers, bytes)
}

/// The handshake on a client's bytes, whole and in chunks.
pub fn target_nbd_handshake(data: &[u8]) {
    let _ = nbd_handshake(data);
}

/// [`target_nbd_handshake`], returning the outcome class.
pub fn nbd_handshake(data: &[u8]) -> String {
    let mut input = Input::new(data);
    let knobs = input.u8();
    let chunk = 1 + usize::from(input.u8() % 31);
    let script = input.rest();
    let options = HandshakeOptions {
        structured_replies: knobs & 1 == 0,
        no_zeroes: knobs & 2 == 0,
        allow_list: knobs & 4 == 0,
        require_block_size: knobs & 8 != 0,
        default_export: (knobs & 16 != 0).then(|| String::from("vol0")),
    };
    let whole = drive_handshake(&options, script, script.len());
    let pieces = drive_handshake(&options, script, chunk);
    assert_eq!(
        whole, pieces,
        "the answer depends on how the input is split"
    );
    // Output stays proportional to input: every option is at least 16 bytes and answered
    // with a bounded number of bounded replies.
    assert!(
        whole.sent.len() <= (script.len() / 16 + 1) * 16 * 1024,
        "{} bytes sent for {} received",
        whole.sent.len(),
        script.len()
    );
    let (replies, tail) = option_replies(&whole.sent);
    // The kinds of replies sent, for feedback: an input that draws a new mix is kept.
    let kinds: BTreeSet<String> = replies
        .iter()
        .map(|r| {
            format!(
                "{:?}/{:?}",
                OptionCode::from_code(r.option),
                ReplyType::from_code(r.reply_type)
            )
        })
        .collect();
    let kinds = kinds.into_iter().collect::<Vec<_>>().join(",");
    let exports = exports();
    let outcome = match &whole.outcome {
        None => {
            assert!(tail.is_empty(), "bytes that are no option reply");
            "pending".into()
        }
        Some(Outcome::Aborted) => {
            assert!(tail.is_empty());
            "aborted".into()
        }
        Some(Outcome::Closed(reason)) => {
            assert!(tail.is_empty());
            class("closed", reason)
        }
        Some(Outcome::Done { export, negotiated }) => {
            let e = exports.get(*export).expect("an exported index");
            check_negotiated(negotiated, e, &options);
            if negotiated.via_go {
                assert!(tail.is_empty(), "bytes after the GO replies");
            } else {
                let expect = if negotiated.no_zeroes { 10 } else { 134 };
                assert_eq!(tail.len(), expect, "EXPORT_NAME reply length");
            }
            format!(
                "done via_go={} structured={} meta={} agreed={} export={}",
                negotiated.via_go,
                negotiated.structured_replies,
                negotiated.base_allocation.is_some(),
                negotiated.block_size_constraints_agreed,
                export
            )
        }
    };
    class(&outcome, kinds)
}

fn check_negotiated(n: &Negotiated, e: &ExportInfo, options: &HandshakeOptions) {
    assert_eq!(n.export_name, e.name);
    assert_eq!(n.size_bytes, e.size_bytes);
    assert_eq!(n.block_sizes, e.block_sizes);
    assert_eq!(
        n.transmission_flags,
        e.transmission_flags(n.structured_replies)
    );
    assert!(n.has_flag(tf::HAS_FLAGS));
    assert_eq!(n.read_only(), e.read_only);
    assert!(!n.structured_replies || options.structured_replies);
    assert!(n.base_allocation.is_none() || (n.structured_replies && e.base_allocation));
    assert!(!n.block_size_constraints_agreed || n.via_go);
    assert!(!options.require_block_size || n.block_size_constraints_agreed);
    assert!(!n.no_zeroes || options.no_zeroes);
}

/// Events with payload pieces merged, for comparing splits.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Request(Request),
    Payload(u64, u64),
    Rejected(u64, Errno, String, u32),
    Disconnect,
    Fatal(String),
}

fn drive_requests(negotiated: &Negotiated, stream: &[u8], chunk: usize) -> Vec<Seen> {
    let mut dec = RequestDecoder::new(negotiated.clone());
    let mut seen = Vec::new();
    for piece in stream.chunks(chunk.max(1)) {
        let mut at = 0;
        while at < piece.len() {
            let decoded = match dec.decode(&piece[at..]) {
                Ok(d) => d,
                Err(err) => {
                    seen.push(Seen::Fatal(class("fatal", err)));
                    return seen;
                }
            };
            assert!(decoded.consumed <= piece.len() - at);
            assert!(dec.buffered_bytes() <= limits::REQUEST_HEADER_BUFFER);
            at += decoded.consumed;
            match decoded.event {
                None => assert_eq!(at, piece.len(), "no event but input left"),
                Some(Event::Request(r)) => seen.push(Seen::Request(r)),
                Some(Event::Payload {
                    handle,
                    at: offset,
                    len,
                    ..
                }) => {
                    assert!(len <= decoded.consumed);
                    match seen.last_mut() {
                        Some(Seen::Payload(h, total)) if *h == handle => {
                            assert_eq!(u64::from(offset), *total, "payload out of order");
                            *total += len as u64;
                        }
                        _ => {
                            assert_eq!(offset, 0, "payload does not start at 0");
                            seen.push(Seen::Payload(handle, len as u64));
                        }
                    }
                }
                Some(Event::Rejected(r)) => {
                    seen.push(Seen::Rejected(
                        r.handle,
                        r.error,
                        format!("{:?}", r.reason),
                        r.skipped_payload,
                    ));
                }
                Some(Event::Disconnect) => seen.push(Seen::Disconnect),
            }
        }
    }
    seen
}

/// The request decoder on a stream, whole and in chunks, with replies round-tripped.
pub fn target_nbd_request(data: &[u8]) {
    let _ = nbd_request(data);
}

/// [`target_nbd_request`], returning the outcome class.
pub fn nbd_request(data: &[u8]) -> String {
    let mut input = Input::new(data);
    let bits = input.u8();
    let minimum = 1u32 << (input.u8() % 13);
    let preferred = minimum.max(512);
    let maximum = match input.u8() % 4 {
        0 => preferred,
        1 => 65536.max(preferred),
        2 => 1 << 20,
        _ => limits::MAX_PAYLOAD,
    };
    let size = u64::from(input.u16()) * u64::from(minimum);
    let chunk = 1 + usize::from(input.u8() % 31);
    let stream = input.rest();
    let structured = bits & 1 != 0;
    let export = ExportInfo {
        name: "vol0".into(),
        description: String::new(),
        size_bytes: size,
        read_only: bits & 8 != 0,
        block_sizes: BlockSizes {
            minimum,
            preferred,
            maximum,
        },
        base_allocation: true,
        features: if bits & 32 != 0 {
            Features {
                flush: false,
                fua: false,
                trim: false,
                write_zeroes: false,
                fast_zero: false,
                cache: false,
                multi_conn: false,
                df: false,
            }
        } else {
            Features::ALL
        },
    };
    let via_go = bits & 16 != 0;
    let negotiated = Negotiated {
        export_name: export.name.clone(),
        size_bytes: size,
        transmission_flags: export.transmission_flags(structured),
        structured_replies: structured,
        base_allocation: (structured && bits & 2 != 0).then_some(1),
        block_size_constraints_agreed: via_go && bits & 4 != 0,
        block_sizes: export.block_sizes,
        no_zeroes: true,
        via_go,
    };
    let whole = drive_requests(&negotiated, stream, stream.len());
    let pieces = drive_requests(&negotiated, stream, chunk);
    assert_eq!(whole, pieces, "events depend on how the input is split");
    let encoder = ReplyEncoder::new(&negotiated);
    let mut labels: Vec<String> = Vec::new();
    for seen in &whole {
        let label = match seen {
            Seen::Request(r) => {
                check_request(r, &negotiated);
                check_reply(&encoder, r, &negotiated);
                format!("{:?}", r.command)
            }
            Seen::Payload(..) => "payload".into(),
            Seen::Rejected(handle, errno, reason, _) => {
                check_rejection(*errno, reason, &negotiated);
                let mut out = Vec::new();
                encoder.error(&mut out, *handle, *errno, reason);
                check_error_reply(&out, *handle, *errno, structured);
                let kind: String = reason
                    .chars()
                    .take_while(char::is_ascii_alphanumeric)
                    .collect();
                format!("{errno} {kind}")
            }
            Seen::Disconnect => "disconnect".into(),
            Seen::Fatal(what) => what.clone(),
        };
        // The first three kinds of event, in order: enough feedback to tell streams apart
        // without a class for every combination.
        if !labels.contains(&label) && labels.len() < 3 {
            labels.push(label);
        }
    }
    labels.join(", ")
}

fn check_request(r: &Request, n: &Negotiated) {
    let end = r.offset.checked_add(u64::from(r.length));
    if r.command != Command::Flush {
        assert!(
            end.is_some_and(|end| end <= n.size_bytes),
            "{r:?} past the end"
        );
    } else {
        assert_eq!((r.offset, r.length), (0, 0));
    }
    if n.block_size_constraints_agreed {
        assert!(r.is_aligned(n.block_sizes.minimum), "{r:?} unaligned");
    }
    if matches!(r.command, Command::Read | Command::Write) {
        let maximum = if n.via_go {
            n.block_sizes.maximum
        } else {
            limits::MAX_PAYLOAD
        };
        assert!(r.length <= maximum, "{r:?} longer than {maximum}");
    }
    if n.read_only() {
        assert!(!matches!(
            r.command,
            Command::Write | Command::Trim | Command::WriteZeroes
        ));
    }
    if r.command == Command::BlockStatus {
        assert!(n.base_allocation.is_some() && r.length > 0);
    }
    let fua = r.flags & cf::FUA != 0;
    assert!(!fua || n.has_flag(tf::SEND_FUA));
    assert!(r.flags & cf::DF == 0 || (r.command == Command::Read && n.has_flag(tf::SEND_DF)));
    assert!(r.flags & cf::REQ_ONE == 0 || r.command == Command::BlockStatus);
    assert!(r.flags & (cf::NO_HOLE | cf::FAST_ZERO) == 0 || r.command == Command::WriteZeroes);
    assert!(r.flags & !(cf::FUA | cf::NO_HOLE | cf::DF | cf::REQ_ONE | cf::FAST_ZERO) == 0);
}

fn check_rejection(errno: Errno, reason: &str, n: &Negotiated) {
    match errno {
        Errno::Inval => {}
        Errno::NoSpc => assert!(reason.starts_with("PastEnd"), "ENOSPC for {reason}"),
        Errno::Perm => assert!(n.read_only(), "EPERM on a writable export"),
        Errno::Overflow => assert!(n.structured_replies && reason.starts_with("TooLong")),
        other => panic!("{other} for {reason}"),
    }
}

fn chunks(mut bytes: &[u8]) -> Vec<(ChunkHeader, Chunk)> {
    let mut all = Vec::new();
    while !bytes.is_empty() {
        let header = ChunkHeader::decode(bytes).expect("a chunk header");
        let end = ChunkHeader::LEN + header.length as usize;
        let payload = bytes.get(ChunkHeader::LEN..end).expect("the chunk payload");
        let chunk = Chunk::decode(header.chunk_type, payload).expect("a valid chunk");
        all.push((header, chunk));
        bytes = &bytes[end..];
    }
    all
}

fn check_error_reply(out: &[u8], handle: u64, errno: Errno, structured: bool) {
    if structured {
        let all = chunks(out);
        assert_eq!(all.len(), 1);
        let (header, chunk) = &all[0];
        assert_eq!((header.handle, header.flags), (handle, 1));
        assert!(
            matches!(chunk, Chunk::Error { error, offset: None, .. } if *error == errno.code())
        );
    } else {
        assert_eq!(
            SimpleReplyHeader::decode(out),
            Ok(SimpleReplyHeader {
                error: errno.code(),
                handle
            })
        );
        assert_eq!(out.len(), SimpleReplyHeader::LEN);
    }
}

fn check_reply(encoder: &ReplyEncoder, r: &Request, n: &Negotiated) {
    let mut out = Vec::new();
    match r.command {
        Command::Read => {
            let follows = encoder.read_header(&mut out, r.handle, r.offset, r.length);
            if n.structured_replies {
                // The header announces the data that follows it.
                let header = ChunkHeader::decode(&out).expect("a chunk header");
                assert_eq!(header.handle, r.handle);
                if follows > 0 {
                    assert_eq!(header.length, follows + 8);
                    assert_eq!(out.len(), ChunkHeader::LEN + 8);
                } else {
                    assert_eq!(header.length, 0);
                }
            } else {
                assert_eq!(follows, r.length);
                assert_eq!(out.len(), SimpleReplyHeader::LEN);
            }
        }
        Command::BlockStatus => {
            // Extents from the request's own fields: some empty, some longer than asked.
            let extents: Vec<Extent> = (0..(r.handle % 5))
                .map(|i| Extent {
                    length: (r.offset as u32).wrapping_mul(i as u32 + 1)
                        % r.length.max(1).saturating_mul(2),
                    flags: (r.handle >> i) as u32 & 3,
                })
                .collect();
            match encoder.block_status(&mut out, r, &extents) {
                Ok(covered) => {
                    assert!(covered > 0 && covered <= u64::from(r.length));
                    let all = chunks(&out);
                    assert_eq!(all.len(), 1);
                    let Chunk::BlockStatus { extents: sent, .. } = &all[0].1 else {
                        panic!("not a block status chunk")
                    };
                    let sum: u64 = sent.iter().map(|e| u64::from(e.length)).sum();
                    assert_eq!(sum, covered);
                    assert!(r.flags & cf::REQ_ONE == 0 || sent.len() == 1);
                    assert!(sent.windows(2).all(|w| w[0].flags != w[1].flags));
                }
                Err(_) => assert!(out.is_empty()),
            }
        }
        _ => {
            encoder.ok(&mut out, r.handle);
            assert_eq!(
                SimpleReplyHeader::decode(&out),
                Ok(SimpleReplyHeader {
                    error: 0,
                    handle: r.handle
                })
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// seeds
// ---------------------------------------------------------------------------------------------

fn option(out: &mut Vec<u8>, code: OptionCode, data: &[u8]) {
    OptionHeader {
        option: code.code(),
        length: u32::try_from(data.len()).unwrap_or(u32::MAX),
    }
    .encode(out);
    out.extend_from_slice(data);
}

fn info(out: &mut Vec<u8>, code: OptionCode, name: &str, requests: &[InfoType]) {
    let mut data = Vec::new();
    InfoRequest {
        name: name.into(),
        requests: requests.iter().map(|r| r.code()).collect(),
    }
    .encode(&mut data);
    option(out, code, &data);
}

fn meta(out: &mut Vec<u8>, code: OptionCode, name: &str, queries: &[&str]) {
    let mut data = Vec::new();
    MetaContextRequest {
        export: name.into(),
        queries: queries.iter().map(|q| String::from(*q)).collect(),
    }
    .encode(&mut data);
    option(out, code, &data);
}

/// Seeds for `nbd_handshake`: scripted clients (each a real negotiation).
pub fn handshake_seeds() -> Vec<Vec<u8>> {
    let fixed = client_flags::FIXED_NEWSTYLE;
    let all = fixed | client_flags::NO_ZEROES;
    let mut scripts: Vec<Vec<u8>> = Vec::new();
    let mut script = |flags: u32, build: &dyn Fn(&mut Vec<u8>)| {
        let mut out = flags.to_be_bytes().to_vec();
        build(&mut out);
        scripts.push(out);
    };
    script(fixed, &|o| option(o, OptionCode::ExportName, b"vol0"));
    script(all, &|o| option(o, OptionCode::ExportName, b"snap0"));
    script(all, &|o| {
        option(o, OptionCode::List, &[]);
        option(o, OptionCode::Abort, &[]);
    });
    script(all, &|o| {
        info(
            o,
            OptionCode::Info,
            "vol0",
            &[InfoType::Name, InfoType::Description],
        );
        info(o, OptionCode::Go, "vol0", &[InfoType::BlockSize]);
    });
    script(all, &|o| {
        option(o, OptionCode::StructuredReply, &[]);
        meta(o, OptionCode::ListMetaContext, "vol0", &[]);
        meta(o, OptionCode::SetMetaContext, "vol0", &["base:allocation"]);
        info(o, OptionCode::Go, "vol0", &[InfoType::BlockSize]);
    });
    script(fixed, &|o| {
        option(o, OptionCode::Unknown(42), b"xyz");
        option(o, OptionCode::StartTls, &[]);
        info(o, OptionCode::Go, "nope", &[]);
        info(o, OptionCode::Go, "", &[]);
        info(o, OptionCode::Go, "plain", &[InfoType::BlockSize]);
    });
    script(0, &|o| option(o, OptionCode::ExportName, b"vol0"));
    let mut seeds = Vec::new();
    for (i, script) in scripts.into_iter().enumerate() {
        for knobs in [[0u8, 0], [0x10, 6], [0x09, 1]] {
            let mut seed = knobs.to_vec();
            seed[1] = seed[1].wrapping_add(i as u8);
            seed.extend_from_slice(&script);
            seeds.push(seed);
        }
    }
    seeds
}

/// Seeds for `nbd_request`: request streams, valid and invalid, under a few negotiations.
pub fn request_seeds() -> Vec<Vec<u8>> {
    let req = |out: &mut Vec<u8>, command: u16, flags: u16, offset: u64, length: u32| {
        RequestHeader {
            flags,
            command,
            handle: out.len() as u64,
            offset,
            length,
        }
        .encode(out);
        if command == 1 {
            out.resize(out.len() + length as usize, 0xab);
        }
    };
    let mut valid = Vec::new();
    req(&mut valid, 0, 0, 0, 4096);
    req(&mut valid, 1, cf::FUA, 4096, 4096);
    req(&mut valid, 3, 0, 0, 0);
    req(&mut valid, 4, 0, 0, 8192);
    req(&mut valid, 6, cf::NO_HOLE, 8192, 4096);
    req(&mut valid, 7, cf::REQ_ONE, 0, 65536);
    req(&mut valid, 5, 0, 0, 4096);
    req(&mut valid, 0, cf::DF, 0, 512);
    req(&mut valid, 2, 0, 0, 0);
    let mut invalid = Vec::new();
    req(&mut invalid, 9, 0, 0, 4096);
    req(&mut invalid, 1, 0, 1 << 40, 512);
    req(&mut invalid, 0, 0, 0, 1 << 26);
    req(&mut invalid, 0, 0, 1, 4095);
    req(&mut invalid, 0, 1 << 9, 0, 4096);
    req(&mut invalid, 3, 0, 4096, 0);
    req(&mut invalid, 7, 0, 0, 0);
    req(&mut invalid, 1, 0, 0, 1 << 12);
    let mut bad_magic = Vec::new();
    req(&mut bad_magic, 0, 0, 0, 4096);
    bad_magic[0] = 0x12;
    let mut seeds = Vec::new();
    // bits, minimum selector (4096 = 1 << 12), maximum selector, size (u16 LE), split.
    for (bits, min_sel, max_sel) in [
        (0x17u8, 12u8, 2u8),
        (0x00, 9, 3),
        (0x1f, 9, 1),
        (0x29, 0, 0),
    ] {
        for (i, stream) in [&valid, &invalid, &bad_magic].into_iter().enumerate() {
            let mut seed = vec![bits, min_sel, max_sel, 0x00, 0x01, 5 + i as u8];
            seed.extend_from_slice(stream);
            seeds.push(seed);
        }
    }
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_run_cleanly() {
        for seed in handshake_seeds() {
            let _ = nbd_handshake(&seed);
        }
        let classes: BTreeSet<String> =
            handshake_seeds().iter().map(|s| nbd_handshake(s)).collect();
        assert!(classes
            .iter()
            .any(|c| c.starts_with("done via_go=true structured=true meta=true")));
        assert!(classes.iter().any(|c| c.starts_with("aborted")));
        for seed in request_seeds() {
            let _ = nbd_request(&seed);
        }
        let _ = nbd_handshake(&[]);
        let _ = nbd_request(&[]);
        let _ = nbd_request(&[0xff; 64]);
    }
}
