//! Goal: the NBD handshake answers every client the way the protocol document
//! (NetworkBlockDevice/nbd `doc/proto.md`) says, including its SHOULDs, whatever the client
//! sends and however its bytes are split.
//!
//! Method: scripted clients. Each test builds the client's bytes with the wire encoders,
//! feeds them to a [`Handshake`] (all at once and one byte at a time, which must give the
//! same bytes back and the same outcome), then parses the server's bytes as a client would
//! and checks them, byte for byte where the protocol fixes the bytes.

use std::sync::Arc;

use spool_engine::nbd::handshake::{BASE_ALLOCATION, BASE_ALLOCATION_ID};
use spool_engine::nbd::limits;
use spool_engine::nbd::wire::{
    client_flags, transmission_flags as tf, Info, InfoRequest, InfoType, MetaContextEntry,
    MetaContextRequest, OptionCode, OptionHeader, OptionReplyHeader, ReplyType, RequestHeader,
    ServerEntry, CLISERV_MAGIC, IHAVEOPT, NBD_MAGIC,
};
use spool_engine::nbd::{
    BlockSizes, CloseReason, Command, Event, ExportInfo, Features, Handshake, HandshakeError,
    HandshakeOptions, Negotiated, Outcome, Request, RequestDecoder,
};

const GIB: u64 = 1 << 30;

fn export(name: &str, read_only: bool, base_allocation: bool) -> ExportInfo {
    ExportInfo {
        name: name.into(),
        description: format!("volume {name}"),
        size_bytes: GIB,
        read_only,
        block_sizes: BlockSizes {
            minimum: 512,
            preferred: 65536,
            maximum: limits::MAX_PAYLOAD,
        },
        base_allocation,
        features: Features::ALL,
    }
}

fn exports() -> Arc<[ExportInfo]> {
    vec![
        export("vol0", false, true),
        export("snap0", true, true),
        export("plain", false, false),
    ]
    .into()
}

/// A client's bytes, built up option by option.
#[derive(Default, Clone)]
struct Script(Vec<u8>);

impl Script {
    fn flags(flags: u32) -> Script {
        Script(flags.to_be_bytes().to_vec())
    }

    fn opt(mut self, option: OptionCode, data: &[u8]) -> Script {
        OptionHeader {
            option: option.code(),
            length: data.len() as u32,
        }
        .encode(&mut self.0);
        self.0.extend_from_slice(data);
        self
    }

    fn info(self, option: OptionCode, name: &str, requests: &[InfoType]) -> Script {
        let mut data = Vec::new();
        InfoRequest {
            name: name.into(),
            requests: requests.iter().map(|r| r.code()).collect(),
        }
        .encode(&mut data);
        self.opt(option, &data)
    }

    fn meta(self, option: OptionCode, name: &str, queries: &[&str]) -> Script {
        let mut data = Vec::new();
        MetaContextRequest {
            export: name.into(),
            queries: queries.iter().map(|q| q.to_string()).collect(),
        }
        .encode(&mut data);
        self.opt(option, &data)
    }

    fn raw(mut self, bytes: &[u8]) -> Script {
        self.0.extend_from_slice(bytes);
        self
    }
}

/// What the server did with a whole script.
#[derive(Debug, Clone, PartialEq)]
struct Run {
    greeting: Vec<u8>,
    sent: Vec<u8>,
    consumed: usize,
    outcome: Option<Outcome>,
    max_buffered: usize,
}

fn run_with(options: HandshakeOptions, script: &Script, byte_at_a_time: bool) -> Run {
    let (mut hs, greeting) = Handshake::new(exports(), options).expect("a valid configuration");
    let mut run = Run {
        greeting,
        sent: Vec::new(),
        consumed: 0,
        outcome: None,
        max_buffered: 0,
    };
    let chunk = if byte_at_a_time {
        1
    } else {
        script.0.len().max(1)
    };
    for piece in script.0.chunks(chunk) {
        let step = hs.input(piece).expect("input before the end");
        assert!(step.consumed <= piece.len());
        run.max_buffered = run.max_buffered.max(hs.buffered_bytes());
        run.sent.extend_from_slice(&step.send);
        run.consumed += step.consumed;
        if step.outcome.is_some() {
            assert!(hs.is_finished());
            run.outcome = step.outcome;
            assert_eq!(hs.input(b"x"), Err(HandshakeError::Finished));
            break;
        }
        assert_eq!(step.consumed, piece.len(), "input left before an outcome");
    }
    assert!(run.max_buffered <= limits::MAX_HANDSHAKE_BUFFER);
    run
}

/// Runs `script` whole and byte by byte; both must agree (except in how much was buffered).
fn run_opts(options: HandshakeOptions, script: &Script) -> Run {
    let whole = run_with(options.clone(), script, false);
    let bytewise = run_with(options, script, true);
    assert_eq!(
        whole.sent, bytewise.sent,
        "output depends on how input is split"
    );
    assert_eq!(whole.outcome, bytewise.outcome);
    assert_eq!(whole.consumed, bytewise.consumed);
    whole
}

fn run(script: &Script) -> Run {
    run_opts(HandshakeOptions::default(), script)
}

/// One option reply, parsed as a client does.
#[derive(Debug, Clone, PartialEq)]
struct Reply {
    option: u32,
    kind: ReplyType,
    data: Vec<u8>,
}

fn replies(mut bytes: &[u8]) -> Vec<Reply> {
    let mut all = Vec::new();
    while !bytes.is_empty() {
        let header = OptionReplyHeader::decode(bytes).expect("an option reply");
        let end = OptionReplyHeader::LEN + header.length as usize;
        all.push(Reply {
            option: header.option,
            kind: ReplyType::from_code(header.reply_type),
            data: bytes[OptionReplyHeader::LEN..end].to_vec(),
        });
        bytes = &bytes[end..];
    }
    all
}

fn kinds(replies: &[Reply]) -> Vec<ReplyType> {
    replies.iter().map(|r| r.kind).collect()
}

fn done(run: &Run) -> (usize, Negotiated) {
    match &run.outcome {
        Some(Outcome::Done { export, negotiated }) => (*export, negotiated.clone()),
        other => panic!("expected Done, got {other:?}"),
    }
}

const FIXED: u32 = client_flags::FIXED_NEWSTYLE;
const FIXED_NO_ZEROES: u32 = client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES;

#[test]
fn greeting_is_fixed_newstyle_and_never_oldstyle() {
    let r = run(&Script::default());
    let mut expected = NBD_MAGIC.to_be_bytes().to_vec();
    expected.extend_from_slice(&IHAVEOPT.to_be_bytes());
    expected.extend_from_slice(&[0, 3]);
    assert_eq!(r.greeting, expected);
    assert!(!r
        .greeting
        .windows(8)
        .any(|w| w == CLISERV_MAGIC.to_be_bytes()));
    let options = HandshakeOptions {
        no_zeroes: false,
        ..HandshakeOptions::default()
    };
    assert_eq!(run_opts(options, &Script::default()).greeting[16..], [0, 1]);
}

#[test]
fn oldstyle_and_plain_newstyle_clients_are_refused() {
    // A client without NBD_FLAG_C_FIXED_NEWSTYLE (oldstyle-era or plain newstyle) is closed
    // before any option, with nothing sent.
    let r = run(&Script::flags(0).opt(OptionCode::ExportName, b"vol0"));
    assert_eq!(
        r.outcome,
        Some(Outcome::Closed(CloseReason::NotFixedNewstyle(0)))
    );
    assert!(r.sent.is_empty());
    assert_eq!(r.consumed, 4);
    // Unknown flags, and NO_ZEROES when the server did not offer it, close too.
    let r = run(&Script::flags(FIXED | 4));
    assert_eq!(
        r.outcome,
        Some(Outcome::Closed(CloseReason::UnknownClientFlags(5)))
    );
    let options = HandshakeOptions {
        no_zeroes: false,
        ..HandshakeOptions::default()
    };
    let r = run_opts(options, &Script::flags(FIXED_NO_ZEROES));
    assert_eq!(
        r.outcome,
        Some(Outcome::Closed(CloseReason::UnknownClientFlags(3)))
    );
}

#[test]
fn export_name_with_zeroes() {
    let r = run(&Script::flags(FIXED).opt(OptionCode::ExportName, b"vol0"));
    let mut expected = GIB.to_be_bytes().to_vec();
    expected.extend_from_slice(&0x0d6du16.to_be_bytes());
    expected.extend_from_slice(&[0; 124]);
    assert_eq!(r.sent, expected);
    let (index, n) = done(&r);
    assert_eq!(index, 0);
    assert_eq!(n.export_name, "vol0");
    assert!(!n.no_zeroes && !n.via_go && !n.structured_replies);
    assert!(!n.block_size_constraints_agreed);
    assert_eq!(n.base_allocation, None);
}

#[test]
fn export_name_without_zeroes() {
    let r = run(&Script::flags(FIXED_NO_ZEROES).opt(OptionCode::ExportName, b"snap0"));
    let mut expected = GIB.to_be_bytes().to_vec();
    expected.extend_from_slice(&0x050fu16.to_be_bytes());
    assert_eq!(r.sent, expected, "10 bytes, read-only, no trim or zeroes");
    let (index, n) = done(&r);
    assert_eq!(index, 1);
    assert!(n.no_zeroes && n.read_only());
}

#[test]
fn export_name_for_unknown_export_closes() {
    for name in [&b"nope"[..], b"", b"vol\0", &[0xff, 0xfe]] {
        let r = run(&Script::flags(FIXED).opt(OptionCode::ExportName, name));
        assert!(
            matches!(
                r.outcome,
                Some(Outcome::Closed(CloseReason::UnknownExport(_)))
            ),
            "{:?}",
            r.outcome
        );
        assert!(
            r.sent.is_empty(),
            "EXPORT_NAME cannot be answered with an error"
        );
    }
}

#[test]
fn default_export_for_the_empty_name() {
    let options = HandshakeOptions {
        default_export: Some("vol0".into()),
        ..HandshakeOptions::default()
    };
    let r = run_opts(
        options.clone(),
        &Script::flags(FIXED).opt(OptionCode::ExportName, b""),
    );
    assert_eq!(done(&r).1.export_name, "vol0");
    let r = run_opts(
        options,
        &Script::flags(FIXED).info(OptionCode::Go, "", &[InfoType::Name]),
    );
    assert_eq!(done(&r).1.export_name, "vol0");
    let all = replies(&r.sent);
    assert!(all.contains(&Reply {
        option: 7,
        kind: ReplyType::Info,
        data: {
            let mut d = Vec::new();
            Info::Name("vol0".into()).encode(&mut d);
            d
        },
    }));
}

#[test]
fn info_then_go_give_the_same_information() {
    let asked = [InfoType::BlockSize, InfoType::Name, InfoType::Description];
    let r = run(&Script::flags(FIXED_NO_ZEROES)
        .info(OptionCode::Info, "vol0", &asked)
        .info(OptionCode::Go, "vol0", &asked));
    let all = replies(&r.sent);
    assert_eq!(all.len(), 10);
    let (info, go) = all.split_at(5);
    for (i, g) in info.iter().zip(go) {
        assert_eq!((i.option, g.option), (6, 7));
        assert_eq!((&i.kind, &i.data), (&g.kind, &g.data), "INFO and GO differ");
    }
    let infos: Vec<Info> = info[..4]
        .iter()
        .map(|r| {
            assert_eq!(r.kind, ReplyType::Info);
            Info::decode(&r.data).unwrap()
        })
        .collect();
    assert_eq!(
        infos,
        vec![
            Info::Export {
                size: GIB,
                flags: 0x0d6d
            },
            Info::Name("vol0".into()),
            Info::Description("volume vol0".into()),
            Info::BlockSize {
                minimum: 512,
                preferred: 65536,
                maximum: 32 << 20
            },
        ]
    );
    assert_eq!(info[4].kind, ReplyType::Ack);
    assert!(info[4].data.is_empty());
    let (_, n) = done(&r);
    assert!(n.via_go && n.block_size_constraints_agreed);
    assert_eq!(n.block_sizes.minimum, 512);
}

#[test]
fn go_without_block_size_request_agrees_no_constraints() {
    let r = run(&Script::flags(FIXED).info(OptionCode::Go, "vol0", &[]));
    let all = replies(&r.sent);
    // INFO_EXPORT, BLOCK_SIZE (always advertised), ACK; no zeroes after GO.
    assert_eq!(
        kinds(&all),
        vec![ReplyType::Info, ReplyType::Info, ReplyType::Ack]
    );
    let (_, n) = done(&r);
    assert!(!n.block_size_constraints_agreed);
    // NBD_OPT_INFO with NBD_INFO_BLOCK_SIZE does not commit the client either.
    let r = run(&Script::flags(FIXED)
        .info(OptionCode::Info, "vol0", &[InfoType::BlockSize])
        .info(OptionCode::Go, "vol0", &[]));
    assert!(!done(&r).1.block_size_constraints_agreed);
}

#[test]
fn required_block_sizes_refuse_clients_that_do_not_ask() {
    let options = HandshakeOptions {
        require_block_size: true,
        ..HandshakeOptions::default()
    };
    let r = run_opts(
        options.clone(),
        &Script::flags(FIXED).info(OptionCode::Go, "vol0", &[]).info(
            OptionCode::Go,
            "vol0",
            &[InfoType::BlockSize],
        ),
    );
    let all = replies(&r.sent);
    assert_eq!(
        kinds(&all[..2]),
        vec![ReplyType::Info, ReplyType::ErrBlockSizeReqd]
    );
    assert!(matches!(
        Info::decode(&all[0].data),
        Ok(Info::BlockSize { .. })
    ));
    assert!(done(&r).1.block_size_constraints_agreed);
    let r = run_opts(
        options,
        &Script::flags(FIXED).opt(OptionCode::ExportName, b"vol0"),
    );
    assert_eq!(
        r.outcome,
        Some(Outcome::Closed(CloseReason::BlockSizeRequired))
    );
}

#[test]
fn go_for_unknown_export_errors_and_continues() {
    let r = run(&Script::flags(FIXED)
        .info(OptionCode::Go, "nope", &[])
        .info(OptionCode::Info, "", &[])
        .info(OptionCode::Go, "snap0", &[]));
    let all = replies(&r.sent);
    assert_eq!(all[0].kind, ReplyType::ErrUnknown);
    assert_eq!(all[1].kind, ReplyType::ErrUnknown, "no default export");
    assert!(std::str::from_utf8(&all[0].data).unwrap().contains("nope"));
    let (index, n) = done(&r);
    assert_eq!(index, 1);
    assert!(n.read_only());
}

#[test]
fn list_names_every_export() {
    let r = run(&Script::flags(FIXED)
        .opt(OptionCode::List, &[])
        .opt(OptionCode::List, b"x")
        .opt(OptionCode::Abort, &[]));
    let all = replies(&r.sent);
    assert_eq!(
        kinds(&all),
        vec![
            ReplyType::Server,
            ReplyType::Server,
            ReplyType::Server,
            ReplyType::Ack,
            ReplyType::ErrInvalid,
            ReplyType::Ack
        ]
    );
    let names: Vec<String> = all[..3]
        .iter()
        .map(|r| ServerEntry::decode(&r.data).unwrap().name)
        .collect();
    assert_eq!(names, ["vol0", "snap0", "plain"]);
    assert_eq!(
        ServerEntry::decode(&all[0].data).unwrap().details,
        "volume vol0"
    );
    let options = HandshakeOptions {
        allow_list: false,
        ..HandshakeOptions::default()
    };
    let r = run_opts(options, &Script::flags(FIXED).opt(OptionCode::List, &[]));
    assert_eq!(kinds(&replies(&r.sent)), vec![ReplyType::ErrPolicy]);
}

#[test]
fn unknown_options_get_unsup_and_the_session_continues() {
    let r = run(&Script::flags(FIXED)
        .opt(OptionCode::Unknown(42), b"some data")
        .opt(OptionCode::StartTls, &[])
        .opt(OptionCode::PeekExport, &[])
        .opt(OptionCode::ExtendedHeaders, &[])
        .opt(OptionCode::Unknown(0xffff_ffff), &[])
        .info(OptionCode::Go, "vol0", &[]));
    let all = replies(&r.sent);
    assert!(all[..5].iter().all(|r| r.kind == ReplyType::ErrUnsup));
    assert_eq!(
        all[..5].iter().map(|r| r.option).collect::<Vec<_>>(),
        [42, 5, 4, 11, 0xffff_ffff]
    );
    assert_eq!(done(&r).0, 0);
}

#[test]
fn abort_is_acknowledged() {
    let r = run(&Script::flags(FIXED).opt(OptionCode::Abort, b"ignored data"));
    assert_eq!(r.outcome, Some(Outcome::Aborted));
    let mut ack = Vec::new();
    OptionReplyHeader {
        option: 2,
        reply_type: ReplyType::Ack.code(),
        length: 0,
    }
    .encode(&mut ack);
    assert_eq!(r.sent, ack);
}

#[test]
fn malformed_options_get_invalid() {
    // GO whose name length runs past the option; GO whose request count disagrees with its
    // length; a name with a NUL; STRUCTURED_REPLY with data; a meta-context query past the
    // option; a query without a namespace.
    let mut long_name = Vec::new();
    long_name.extend_from_slice(&100u32.to_be_bytes());
    long_name.extend_from_slice(b"vol0\0\0");
    let mut bad_count = Vec::new();
    InfoRequest {
        name: "vol0".into(),
        requests: vec![3],
    }
    .encode(&mut bad_count);
    bad_count.push(0);
    let mut nul_name = Vec::new();
    InfoRequest {
        name: "vo\0l".into(),
        requests: vec![],
    }
    .encode(&mut nul_name);
    let mut bad_query = Vec::new();
    MetaContextRequest {
        export: "vol0".into(),
        queries: vec!["base:allocation".into()],
    }
    .encode(&mut bad_query);
    bad_query.truncate(bad_query.len() - 1);
    let r = run(&Script::flags(FIXED)
        .opt(OptionCode::Go, &long_name)
        .opt(OptionCode::Go, &bad_count)
        .opt(OptionCode::Info, &nul_name)
        .opt(OptionCode::Go, &[0, 0])
        .opt(OptionCode::StructuredReply, b"x")
        .opt(OptionCode::StructuredReply, &[])
        .opt(OptionCode::SetMetaContext, &bad_query)
        .meta(OptionCode::ListMetaContext, "vol0", &["allocation"])
        .info(OptionCode::Go, "vol0", &[]));
    let all = replies(&r.sent);
    assert_eq!(
        kinds(&all[..8]),
        vec![
            ReplyType::ErrInvalid,
            ReplyType::ErrInvalid,
            ReplyType::ErrInvalid,
            ReplyType::ErrInvalid,
            ReplyType::ErrInvalid,
            ReplyType::Ack,
            ReplyType::ErrInvalid,
            ReplyType::ErrInvalid,
        ]
    );
    let (_, n) = done(&r);
    assert!(n.structured_replies);
    assert_eq!(n.base_allocation, None);
}

#[test]
fn overlong_options_are_skipped_or_closed() {
    // Longer than the buffer limit: skipped unbuffered, answered TOO_BIG, session goes on.
    let big = vec![0u8; limits::MAX_OPTION_LEN as usize + 1];
    let r = run(&Script::flags(FIXED)
        .opt(OptionCode::Go, &big)
        .info(OptionCode::Go, "vol0", &[]));
    assert!(r.max_buffered <= limits::MAX_HANDSHAKE_BUFFER);
    assert_eq!(replies(&r.sent)[0].kind, ReplyType::ErrTooBig);
    assert_eq!(done(&r).0, 0);
    // EXPORT_NAME that long cannot be answered: closed without reading the data.
    let r = run(&Script::flags(FIXED).opt(OptionCode::ExportName, &big));
    assert_eq!(
        r.outcome,
        Some(Outcome::Closed(CloseReason::ExportNameTooLong(
            limits::MAX_OPTION_LEN + 1
        )))
    );
    assert_eq!(r.consumed, 4 + 16);
    // Longer than anyone would skip: closed as a denial of service.
    let mut header = Vec::new();
    OptionHeader {
        option: 6,
        length: u32::MAX,
    }
    .encode(&mut header);
    let r = run(&Script::flags(FIXED).raw(&header));
    assert!(matches!(
        r.outcome,
        Some(Outcome::Closed(CloseReason::OptionTooLong { .. }))
    ));
}

#[test]
fn bad_option_magic_closes() {
    let mut bytes = Vec::new();
    OptionHeader {
        option: 7,
        length: 0,
    }
    .encode(&mut bytes);
    bytes[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    let r = run(&Script::flags(FIXED).raw(&bytes));
    assert_eq!(
        r.outcome,
        Some(Outcome::Closed(CloseReason::BadOptionMagic(NBD_MAGIC)))
    );
}

#[test]
fn truncated_handshake_waits_with_bounded_buffers() {
    let full = Script::flags(FIXED).info(OptionCode::Go, "vol0", &[InfoType::BlockSize]);
    for cut in 0..full.0.len() {
        let r = run(&Script(full.0[..cut].to_vec()));
        assert_eq!(r.outcome, None, "cut at {cut}");
        assert!(r.sent.is_empty());
        assert!(r.max_buffered <= 4 + 16 + 32);
    }
}

#[test]
fn too_many_options_close() {
    let mut script = Script::flags(FIXED);
    for _ in 0..=limits::MAX_OPTIONS {
        script = script.opt(OptionCode::Unknown(99), &[]);
    }
    let r = run(&script);
    assert_eq!(
        r.outcome,
        Some(Outcome::Closed(CloseReason::TooManyOptions))
    );
    assert_eq!(replies(&r.sent).len(), limits::MAX_OPTIONS as usize);
}

#[test]
fn structured_replies_and_base_allocation() {
    let r = run(&Script::flags(FIXED_NO_ZEROES)
        // Meta contexts need structured replies first.
        .meta(OptionCode::SetMetaContext, "vol0", &[BASE_ALLOCATION])
        .opt(OptionCode::StructuredReply, &[])
        .opt(OptionCode::StructuredReply, &[])
        .meta(OptionCode::ListMetaContext, "vol0", &[])
        .meta(OptionCode::ListMetaContext, "vol0", &["base:"])
        .meta(
            OptionCode::ListMetaContext,
            "vol0",
            &["qemu:dirty-bitmap:b"],
        )
        .meta(OptionCode::ListMetaContext, "plain", &[])
        .meta(OptionCode::SetMetaContext, "nope", &[BASE_ALLOCATION])
        .meta(
            OptionCode::SetMetaContext,
            "vol0",
            &[
                "base:",
                "base:other",
                "x-foo:bar",
                BASE_ALLOCATION,
                BASE_ALLOCATION,
            ],
        )
        .info(OptionCode::Go, "vol0", &[InfoType::BlockSize]));
    let all = replies(&r.sent);
    let list_entry = {
        let mut d = Vec::new();
        MetaContextEntry {
            id: 0,
            name: BASE_ALLOCATION.into(),
        }
        .encode(&mut d);
        d
    };
    assert_eq!(
        kinds(&all[..13]),
        vec![
            ReplyType::ErrInvalid,  // SET before STRUCTURED_REPLY
            ReplyType::Ack,         // STRUCTURED_REPLY
            ReplyType::ErrInvalid,  // again
            ReplyType::MetaContext, // LIST, no query: everything
            ReplyType::Ack,
            ReplyType::MetaContext, // LIST base:
            ReplyType::Ack,
            ReplyType::Ack,        // LIST of another namespace: nothing
            ReplyType::Ack,        // LIST on an export without allocation data
            ReplyType::ErrUnknown, // SET on an unknown export
            ReplyType::MetaContext,
            ReplyType::Ack,
            ReplyType::Info, // GO
        ]
    );
    assert_eq!(all[3].data, list_entry);
    assert_eq!(all[5].data, list_entry);
    assert_eq!(
        MetaContextEntry::decode(&all[10].data).unwrap(),
        MetaContextEntry {
            id: BASE_ALLOCATION_ID,
            name: BASE_ALLOCATION.into()
        }
    );
    let (_, n) = done(&r);
    assert!(n.structured_replies);
    assert_eq!(n.base_allocation, Some(BASE_ALLOCATION_ID));
    assert!(n.has_flag(tf::SEND_DF));
    assert_eq!(
        Info::decode(&all[12].data).unwrap(),
        Info::Export {
            size: GIB,
            flags: 0x0ded
        }
    );
}

#[test]
fn meta_context_for_another_export_is_dropped() {
    let r = run(&Script::flags(FIXED)
        .opt(OptionCode::StructuredReply, &[])
        .meta(OptionCode::SetMetaContext, "snap0", &[BASE_ALLOCATION])
        .info(OptionCode::Go, "vol0", &[]));
    assert_eq!(done(&r).1.base_allocation, None);
    // A failed SET clears an earlier selection.
    let r = run(&Script::flags(FIXED)
        .opt(OptionCode::StructuredReply, &[])
        .meta(OptionCode::SetMetaContext, "vol0", &[BASE_ALLOCATION])
        .meta(OptionCode::SetMetaContext, "nope", &[BASE_ALLOCATION])
        .opt(OptionCode::ExportName, b"vol0"));
    assert_eq!(done(&r).1.base_allocation, None);
    // An export without allocation data selects nothing.
    let r = run(&Script::flags(FIXED)
        .opt(OptionCode::StructuredReply, &[])
        .meta(OptionCode::SetMetaContext, "plain", &[BASE_ALLOCATION])
        .info(OptionCode::Go, "plain", &[]));
    assert_eq!(kinds(&replies(&r.sent)[1..2]), vec![ReplyType::Ack]);
    assert_eq!(done(&r).1.base_allocation, None);
}

#[test]
fn structured_replies_can_be_turned_off() {
    let options = HandshakeOptions {
        structured_replies: false,
        ..HandshakeOptions::default()
    };
    let r = run_opts(
        options,
        &Script::flags(FIXED)
            .opt(OptionCode::StructuredReply, &[])
            .info(OptionCode::Go, "vol0", &[]),
    );
    assert_eq!(replies(&r.sent)[0].kind, ReplyType::ErrUnsup);
    let (_, n) = done(&r);
    assert!(!n.structured_replies && !n.has_flag(tf::SEND_DF));
}

#[test]
fn bytes_after_go_belong_to_transmission() {
    let mut request = Vec::new();
    RequestHeader {
        flags: 0,
        command: 0,
        handle: 1,
        offset: 0,
        length: 512,
    }
    .encode(&mut request);
    let script = Script::flags(FIXED)
        .info(OptionCode::Go, "vol0", &[])
        .raw(&request);
    let r = run(&script);
    assert_eq!(r.consumed, script.0.len() - request.len());
    // The rest goes to the request decoder of the negotiated connection.
    let mut decoder = RequestDecoder::new(done(&r).1);
    let decoded = decoder.decode(&script.0[r.consumed..]).unwrap();
    assert_eq!(decoded.consumed, request.len());
    assert!(matches!(
        decoded.event,
        Some(Event::Request(Request {
            handle: 1,
            command: Command::Read,
            ..
        }))
    ));
    let script = Script::flags(FIXED)
        .opt(OptionCode::ExportName, b"vol0")
        .raw(&request);
    assert_eq!(run(&script).consumed, script.0.len() - request.len());
}

#[test]
fn a_long_session_byte_at_a_time() {
    // Everything at once, through run(), which also feeds it byte by byte.
    let r = run(&Script::flags(FIXED_NO_ZEROES)
        .opt(OptionCode::List, &[])
        .opt(OptionCode::Unknown(77), &[1, 2, 3])
        .opt(OptionCode::StructuredReply, &[])
        .meta(OptionCode::ListMetaContext, "", &[])
        .meta(OptionCode::SetMetaContext, "snap0", &[BASE_ALLOCATION])
        .info(
            OptionCode::Info,
            "snap0",
            &[InfoType::Name, InfoType::Other(99)],
        )
        .info(OptionCode::Go, "snap0", &[InfoType::BlockSize]));
    let (index, n) = done(&r);
    assert_eq!(index, 1);
    assert!(n.read_only() && n.structured_replies && n.block_size_constraints_agreed);
    assert_eq!(n.base_allocation, Some(BASE_ALLOCATION_ID));
}
