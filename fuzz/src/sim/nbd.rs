//! The NBD front end in the simulation: a client that speaks the protocol's bytes to the
//! daemon's connection logic with no socket in between (`spool_engine::serve::inproc`), on
//! one of the simulated reactors. Its bytes (the fixed newstyle handshake, the requests
//! pipelined, `NBD_CMD_DISC`) are cut into pieces; each piece's requests run to their end
//! before the next piece is given, so the model knows what each FLUSH covers.
//!
//! Checks: the handshake's replies (the export's size and flags, the block sizes, the
//! `base:allocation` context), one reply per request with its handle, only the errors a
//! fault allows (and `EINVAL` for a BLOCK_STATUS without structured replies), READ data
//! against the model, BLOCK_STATUS holes against the model. The model learns: an
//! acknowledged WRITE is live; a FLUSH makes everything acknowledged before it durable; a
//! FUA write is durable when acknowledged; WRITE_ZEROES reads zeros; TRIM is advisory (the
//! units read their old values or zeros, as the protocol allows).

use std::collections::{BTreeMap, BTreeSet};

use spool_blob::Blobstore;
use spool_engine::nbd::wire::{
    client_flags, command_flags, handshake_flags, reply_flags, state_flags, transmission_flags,
    Chunk, ChunkHeader, CommandCode, Errno, Info, InfoRequest, InfoType, MetaContextEntry,
    MetaContextRequest, OptionCode, OptionHeader, OptionReplyHeader, ReplyType, RequestHeader,
    ServerGreeting, SimpleReplyHeader, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
};
use spool_engine::serve::inproc::{Export, Server};

use super::data::{decode, encode};
use super::life::{close, open_one, Ctx, UPC};
use super::model::{Model, ANY, UNIT};
use super::plan::NbdCmd;

/// The export's name.
const EXPORT: &str = "sim";
/// Handles start here (so a reply naming a wrong one is caught).
const HANDLE_BASE: u64 = 0x5e11_0000_0000_0000;
/// `base:allocation`.
const BASE_ALLOCATION: &str = "base:allocation";

/// A request as sent: its command, io_units, and what a WRITE put there.
struct Sent {
    cmd: NbdCmd,
    unit: u64,
    units: u64,
    /// A WRITE's value.
    value: u64,
    /// The piece of the client's bytes its last byte is in.
    piece: usize,
    /// The piece its header ends in (a refused WRITE is answered once its header is in).
    header_piece: usize,
}

/// A reply as received.
#[derive(Debug, Default)]
struct Got {
    /// Error code (0: success).
    error: u32,
    /// A READ's data.
    data: Option<Vec<u8>>,
    /// BLOCK_STATUS extents (length, flags).
    extents: Vec<(u32, u32)>,
    /// The output piece it came in.
    piece: usize,
    /// Complete (a simple reply, or a structured one's DONE chunk).
    done: bool,
}

/// Runs one NBD client operation; its outcome for the log, or what went wrong.
#[allow(clippy::too_many_arguments)]
pub(super) async fn run(
    ctx: &Ctx,
    store: &Blobstore,
    model: &mut Model,
    pick: u32,
    reactor: u8,
    structured: bool,
    requests: &[NbdCmd],
    split: u64,
) -> Result<String, String> {
    let Some(id) = model.pick(pick, |blob| !blob.tainted && blob.clusters > 0) else {
        return Ok("no blob".into());
    };
    // A snapshot is exported read-only: its writes must be refused.
    let read_only = model.blobs[&id].snapshot;
    let Some(blob) = open_one(ctx, store, id).await? else {
        return Ok("open failed".into());
    };
    let size_units = model.blobs[&id].clusters * UPC;
    let clusters = blob.num_clusters();
    if clusters * UPC != size_units {
        close(ctx, blob).await?;
        return Err(format!(
            "blob {id:#x} has {clusters} clusters, the model says {}",
            size_units / UPC
        ));
    }
    // The client's bytes.
    let mut bytes = handshake(structured);
    let mut sent = Vec::new();
    let mut ends = Vec::new();
    let mut header_ends = Vec::new();
    for (index, cmd) in requests.iter().enumerate() {
        let (unit, units) = match *cmd {
            NbdCmd::Write { unit, units, .. }
            | NbdCmd::Read { unit, units }
            | NbdCmd::Trim { unit, units }
            | NbdCmd::WriteZeroes { unit, units }
            | NbdCmd::BlockStatus { unit, units } => {
                let unit = u64::from(unit) % size_units;
                (unit, u64::from(units).clamp(1, size_units - unit))
            }
            NbdCmd::Flush => (0, 0),
        };
        let (command, flags) = match *cmd {
            NbdCmd::Write { fua, .. } => {
                (CommandCode::Write, if fua { command_flags::FUA } else { 0 })
            }
            NbdCmd::Read { .. } => (CommandCode::Read, 0),
            NbdCmd::Flush => (CommandCode::Flush, 0),
            NbdCmd::Trim { .. } => (CommandCode::Trim, 0),
            NbdCmd::WriteZeroes { .. } => (CommandCode::WriteZeroes, 0),
            NbdCmd::BlockStatus { .. } => (CommandCode::BlockStatus, 0),
        };
        RequestHeader {
            flags,
            command: command.code(),
            handle: HANDLE_BASE + index as u64,
            offset: unit * UNIT,
            length: (units * UNIT) as u32,
        }
        .encode(&mut bytes);
        header_ends.push(bytes.len());
        let value = if let NbdCmd::Write { .. } = cmd {
            let value = model.value();
            bytes.extend_from_slice(&encode(value, unit, units));
            value
        } else {
            0
        };
        ends.push(bytes.len());
        sent.push(Sent {
            cmd: *cmd,
            unit,
            units,
            value,
            piece: 0,
            header_piece: 0,
        });
    }
    RequestHeader {
        flags: 0,
        command: CommandCode::Disc.code(),
        handle: HANDLE_BASE + requests.len() as u64,
        offset: 0,
        length: 0,
    }
    .encode(&mut bytes);
    // Cut into pieces.
    let mut rng = fastrand::Rng::with_seed(split);
    let pieces_more = if split == 0 { 0 } else { rng.usize(0..4) };
    let mut cuts: Vec<usize> = (0..pieces_more)
        .map(|_| rng.usize(1..bytes.len()))
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    cuts.push(bytes.len());
    let mut pieces = Vec::new();
    let mut from = 0;
    for &to in &cuts {
        pieces.push(bytes[from..to].to_vec());
        from = to;
    }
    let piece_of = |end: usize| cuts.iter().position(|&cut| end <= cut).unwrap_or(0);
    for ((request, &end), &header_end) in sent.iter_mut().zip(&ends).zip(&header_ends) {
        request.piece = piece_of(end);
        request.header_piece = piece_of(header_end);
    }
    // The server, on its reactor.
    let export = Export::new(store, &blob, EXPORT);
    let skip_flushes = ctx.bugs.nbd_skips_flushes;
    let reactor = ctx.reactors[reactor as usize % ctx.reactors.len()];
    let served = spool_reactor::spawn_on(reactor, move || async move {
        let server = Server::new(export);
        let (mut conn, greeting) = server.connect()?;
        conn.testing_skip_flushes(skip_flushes);
        let mut outs = vec![greeting];
        for piece in &pieces {
            outs.push(conn.input(piece).await?);
        }
        Ok::<_, String>((outs, conn.is_closed()))
    })
    .map_err(|err| format!("spawn: {err}"))?
    .await
    .map_err(|err| format!("NBD server task: {err}"));
    close(ctx, blob).await?;
    let (outs, closed) = served?.map_err(|why| format!("NBD connection: {why}"))?;
    if !closed {
        return Err("NBD connection still open after NBD_CMD_DISC".into());
    }
    let got = parse(&outs, structured, read_only, size_units * UNIT, &sent)?;
    check_and_learn(
        ctx,
        model,
        id,
        &sent,
        &got,
        structured,
        read_only,
        cuts.len(),
    )
}

/// The client's handshake: flags, then (if `structured`) structured replies and
/// `base:allocation`, then `NBD_OPT_GO` asking for the block sizes.
fn handshake(structured: bool) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&client_flags::KNOWN.to_be_bytes());
    let option = |code: OptionCode, data: &[u8], out: &mut Vec<u8>| {
        OptionHeader {
            option: code.code(),
            length: data.len() as u32,
        }
        .encode(out);
        out.extend_from_slice(data);
    };
    if structured {
        option(OptionCode::StructuredReply, &[], &mut out);
        let mut data = Vec::new();
        MetaContextRequest {
            export: EXPORT.into(),
            queries: vec![BASE_ALLOCATION.into()],
        }
        .encode(&mut data);
        option(OptionCode::SetMetaContext, &data, &mut out);
    }
    let mut data = Vec::new();
    InfoRequest {
        name: EXPORT.into(),
        requests: vec![InfoType::BlockSize.code()],
    }
    .encode(&mut data);
    option(OptionCode::Go, &data, &mut out);
    out
}

/// The server's bytes, with the piece each came in.
struct Stream<'a> {
    outs: &'a [Vec<u8>],
    piece: usize,
    at: usize,
}

impl<'a> Stream<'a> {
    fn skip_empty(&mut self) {
        while self.piece < self.outs.len() && self.at >= self.outs[self.piece].len() {
            self.piece += 1;
            self.at = 0;
        }
    }

    fn at_end(&mut self) -> bool {
        self.skip_empty();
        self.piece >= self.outs.len()
    }

    /// `n` bytes (a reply never spans two pieces: each piece's replies are whole).
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        self.skip_empty();
        let out = self
            .outs
            .get(self.piece)
            .ok_or_else(|| format!("the server's bytes end inside {what}"))?;
        let bytes = out
            .get(self.at..self.at + n)
            .ok_or_else(|| format!("{what} does not fit the server's output piece"))?;
        self.at += n;
        Ok(bytes)
    }

    fn peek_u32(&mut self) -> Option<u32> {
        self.skip_empty();
        let bytes = self.outs.get(self.piece)?.get(self.at..self.at + 4)?;
        Some(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }
}

/// Parses the server's bytes: the greeting and option replies (checked), then one reply
/// per request, by handle.
fn parse(
    outs: &[Vec<u8>],
    structured: bool,
    read_only: bool,
    size: u64,
    sent: &[Sent],
) -> Result<BTreeMap<u64, Got>, String> {
    let mut s = Stream {
        outs,
        piece: 0,
        at: 0,
    };
    let greeting = ServerGreeting::decode(s.take(ServerGreeting::LEN, "the greeting")?)
        .map_err(|err| format!("greeting: {err}"))?;
    if greeting.flags & handshake_flags::FIXED_NEWSTYLE == 0 {
        return Err(format!(
            "greeting flags {:#x}: not fixed newstyle",
            greeting.flags
        ));
    }
    let mut options = Vec::new();
    if structured {
        options.extend([OptionCode::StructuredReply, OptionCode::SetMetaContext]);
    }
    options.push(OptionCode::Go);
    for option in options {
        let mut contexts = Vec::new();
        let mut export = None;
        let mut block_size = None;
        loop {
            let header =
                OptionReplyHeader::decode(s.take(OptionReplyHeader::LEN, "an option reply")?)
                    .map_err(|err| format!("option reply: {err}"))?;
            let data = s.take(header.length as usize, "an option reply's data")?;
            if header.option != option.code() {
                return Err(format!("reply to option {} for {option:?}", header.option));
            }
            match ReplyType::from_code(header.reply_type) {
                ReplyType::Ack => break,
                ReplyType::MetaContext => contexts.push(
                    MetaContextEntry::decode(data).map_err(|err| format!("meta context: {err}"))?,
                ),
                ReplyType::Info => {
                    match Info::decode(data).map_err(|err| format!("info: {err}"))? {
                        Info::Export { size, flags } => export = Some((size, flags)),
                        Info::BlockSize { minimum, .. } => block_size = Some(minimum),
                        _ => {}
                    }
                }
                other => return Err(format!("{option:?} answered {other:?}")),
            }
        }
        match option {
            OptionCode::SetMetaContext
                if contexts.len() != 1 || contexts[0].name != BASE_ALLOCATION =>
            {
                return Err(format!(
                    "meta contexts {contexts:?}, asked for {BASE_ALLOCATION}"
                ));
            }
            OptionCode::Go => {
                use transmission_flags as tf;
                let Some((export_size, flags)) = export else {
                    return Err("NBD_OPT_GO without NBD_INFO_EXPORT".into());
                };
                let mut wanted = tf::HAS_FLAGS | tf::SEND_FLUSH | tf::SEND_FUA;
                if read_only {
                    wanted |= tf::READ_ONLY;
                } else {
                    wanted |= tf::SEND_TRIM | tf::SEND_WRITE_ZEROES;
                }
                let read_only_flag = flags & tf::READ_ONLY != 0;
                if export_size != size || flags & wanted != wanted || read_only_flag != read_only {
                    return Err(format!(
                        "export {export_size} bytes, flags {flags:#x}; expected {size} bytes, flags {wanted:#x}, read-only {read_only}"
                    ));
                }
                if block_size != Some(UNIT as u32) {
                    return Err(format!(
                        "block size minimum {block_size:?}, expected {UNIT}"
                    ));
                }
            }
            _ => {}
        }
    }
    let mut got: BTreeMap<u64, Got> = BTreeMap::new();
    while !s.at_end() {
        let piece = s.piece;
        let magic = s.peek_u32().ok_or("a reply's magic is cut")?;
        let (handle, done) = if magic == SIMPLE_REPLY_MAGIC {
            let header =
                SimpleReplyHeader::decode(s.take(SimpleReplyHeader::LEN, "a simple reply")?)
                    .map_err(|err| format!("simple reply: {err}"))?;
            let request = request_of(sent, header.handle)?;
            let entry = got.entry(header.handle).or_default();
            if entry.done {
                return Err(format!("two replies to handle {:#x}", header.handle));
            }
            entry.error = header.error;
            if header.error == 0 {
                if let NbdCmd::Read { .. } = request.cmd {
                    entry.data = Some(
                        s.take((request.units * UNIT) as usize, "a READ's data")?
                            .to_vec(),
                    );
                }
            }
            (header.handle, true)
        } else if magic == STRUCTURED_REPLY_MAGIC {
            let header = ChunkHeader::decode(s.take(ChunkHeader::LEN, "a reply chunk")?)
                .map_err(|err| format!("reply chunk: {err}"))?;
            let payload = s.take(header.length as usize, "a chunk's payload")?;
            let chunk = Chunk::decode(header.chunk_type, payload)
                .map_err(|err| format!("reply chunk: {err}"))?;
            let request = request_of(sent, header.handle)?;
            let entry = got.entry(header.handle).or_default();
            if entry.done {
                return Err(format!(
                    "a chunk after the last one for handle {:#x}",
                    header.handle
                ));
            }
            let len = (request.units * UNIT) as usize;
            let start = request.unit * UNIT;
            match chunk {
                Chunk::None => {}
                Chunk::OffsetData { offset, data } => {
                    let buf = entry.data.get_or_insert_with(|| vec![0; len]);
                    let at = offset
                        .checked_sub(start)
                        .filter(|at| *at as usize + data.len() <= len)
                        .ok_or_else(|| format!("data chunk at {offset} outside the READ"))?;
                    buf[at as usize..at as usize + data.len()].copy_from_slice(&data);
                }
                Chunk::OffsetHole { offset, size } => {
                    let buf = entry.data.get_or_insert_with(|| vec![0; len]);
                    let at = offset
                        .checked_sub(start)
                        .filter(|at| *at + u64::from(size) <= len as u64)
                        .ok_or_else(|| format!("hole chunk at {offset} outside the READ"))?;
                    buf[at as usize..at as usize + size as usize].fill(0);
                }
                Chunk::BlockStatus { extents, .. } => {
                    entry
                        .extents
                        .extend(extents.iter().map(|e| (e.length, e.flags)));
                }
                Chunk::Error { error, .. } => entry.error = error,
                Chunk::Other(kind, _) => return Err(format!("unknown chunk type {kind}")),
            }
            (header.handle, header.flags & reply_flags::DONE != 0)
        } else {
            return Err(format!("reply magic {magic:#x}"));
        };
        let entry = got.entry(handle).or_default();
        entry.piece = piece;
        entry.done = done;
    }
    for (index, request) in sent.iter().enumerate() {
        let handle = HANDLE_BASE + index as u64;
        match got.get(&handle) {
            Some(reply) if reply.done => {
                // Each piece's requests are answered before the next piece is given (a refused
                // request as soon as its header is in).
                let first = if reply.error == 0 {
                    request.piece
                } else {
                    request.header_piece
                };
                if reply.piece < first + 1 || reply.piece > request.piece + 1 {
                    return Err(format!(
                        "handle {handle:#x} sent in piece {} answered after piece {}",
                        request.piece + 1,
                        reply.piece
                    ));
                }
            }
            _ => {
                return Err(format!(
                    "no reply to {:?} (handle {handle:#x})",
                    request.cmd
                ))
            }
        }
    }
    Ok(got)
}

fn request_of(sent: &[Sent], handle: u64) -> Result<&Sent, String> {
    handle
        .checked_sub(HANDLE_BASE)
        .and_then(|index| sent.get(index as usize))
        .ok_or_else(|| format!("a reply names handle {handle:#x}, never sent"))
}

/// Checks each piece's replies against the model and teaches it what they did.
#[allow(clippy::too_many_arguments)]
fn check_and_learn(
    ctx: &Ctx,
    model: &mut Model,
    id: u64,
    sent: &[Sent],
    got: &BTreeMap<u64, Got>,
    structured: bool,
    read_only: bool,
    pieces: usize,
) -> Result<String, String> {
    let mut outcome = Vec::new();
    for piece in 0..pieces {
        let before = model.blobs[&id].units.clone();
        let mut flushed = false;
        let mut batch = Vec::new();
        let mut touched: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
        let mut fua = Vec::new();
        let mut checks = Vec::new();
        for (index, request) in sent.iter().enumerate() {
            if request.piece != piece {
                continue;
            }
            let reply = &got[&(HANDLE_BASE + index as u64)];
            let ok = reply.error == 0;
            let (unit, units) = (request.unit, request.units);
            let name = match request.cmd {
                NbdCmd::Write { .. } => "W",
                NbdCmd::Read { .. } => "R",
                NbdCmd::Flush => "F",
                NbdCmd::Trim { .. } => "T",
                NbdCmd::WriteZeroes { .. } => "Z",
                NbdCmd::BlockStatus { .. } => "S",
            };
            let no_context = !structured && matches!(request.cmd, NbdCmd::BlockStatus { .. });
            let refused = read_only
                && matches!(
                    request.cmd,
                    NbdCmd::Write { .. } | NbdCmd::Trim { .. } | NbdCmd::WriteZeroes { .. }
                );
            if refused {
                if reply.error != Errno::Perm.code() {
                    return Err(format!(
                        "{:?} on a read-only export answered error {} (EPERM expected)",
                        request.cmd, reply.error
                    ));
                }
                outcome.push("-EPERM".into());
                continue;
            }
            if no_context {
                if reply.error != Errno::Inval.code() {
                    return Err(format!(
                        "BLOCK_STATUS without structured replies answered error {} (EINVAL expected)",
                        reply.error
                    ));
                }
            } else if !ok && !ctx.expected(-(reply.error as i32)) {
                return Err(format!(
                    "NBD {:?} {unit}+{units}: error {} ({})",
                    request.cmd,
                    reply.error,
                    Errno::from_code(reply.error).map_or("?", |e| e.name())
                ));
            }
            outcome.push(format!(
                "{name}{}{}",
                if units > 0 {
                    format!("{unit}+{units}")
                } else {
                    String::new()
                },
                if ok {
                    String::new()
                } else {
                    format!(" e{}", reply.error)
                }
            ));
            let mut touch = |value: u64| {
                for u in unit..unit + units {
                    touched.entry(u).or_default().insert(value);
                }
            };
            match request.cmd {
                NbdCmd::Flush => flushed |= ok,
                NbdCmd::Write { fua: with_fua, .. } => {
                    batch.push((unit, units, request.value, ok));
                    touch(request.value);
                    if with_fua && ok {
                        fua.push((unit, units));
                    }
                }
                NbdCmd::WriteZeroes { .. } => {
                    batch.push((unit, units, 0, ok));
                    touch(0);
                }
                // Advisory: the old values or zeros.
                NbdCmd::Trim { .. } => {
                    batch.push((unit, units, 0, false));
                    touch(0);
                }
                NbdCmd::Read { .. } | NbdCmd::BlockStatus { .. } if ok && !no_context => {
                    checks.push((request, reply));
                }
                _ => {}
            }
        }
        for (request, reply) in checks {
            let allowed = |u: u64| -> BTreeSet<u64> {
                let mut set = before[u as usize].live.clone();
                set.extend(touched.get(&u).into_iter().flatten().copied());
                set
            };
            match request.cmd {
                NbdCmd::Read { .. } => {
                    let data = reply
                        .data
                        .as_deref()
                        .ok_or("a READ answered without data")?;
                    for (i, bytes) in data.chunks(UNIT as usize).enumerate() {
                        let u = request.unit + i as u64;
                        let allowed = allowed(u);
                        if allowed.contains(&ANY) {
                            continue;
                        }
                        let value = decode(bytes, u)
                            .map_err(|what| format!("NBD READ of blob {id:#x}: {what}"))?;
                        if !allowed.contains(&value) {
                            return Err(format!(
                                "NBD READ of blob {id:#x} unit {u} reads value {value}, the model allows {allowed:?}"
                            ));
                        }
                    }
                }
                NbdCmd::BlockStatus { .. } => {
                    let total: u64 = reply.extents.iter().map(|&(len, _)| u64::from(len)).sum();
                    if total != request.units * UNIT {
                        return Err(format!(
                            "BLOCK_STATUS of {} bytes answered extents of {total}",
                            request.units * UNIT
                        ));
                    }
                    let mut at = request.unit * UNIT;
                    for &(len, flags) in &reply.extents {
                        let zero = flags & state_flags::ZERO != 0;
                        for u in at / UNIT..(at + u64::from(len)).div_ceil(UNIT) {
                            let allowed = allowed(u);
                            if zero && !allowed.contains(&0) && !allowed.contains(&ANY) {
                                return Err(format!(
                                    "BLOCK_STATUS says blob {id:#x} unit {u} reads zeros, the model allows {allowed:?}"
                                ));
                            }
                        }
                        at += u64::from(len);
                    }
                }
                _ => {}
            }
        }
        // A FLUSH covers what was acknowledged before its piece was given.
        if flushed {
            model.flush();
        }
        model.writes(id, &batch);
        // A FUA write is durable once acknowledged (where no other request of its piece
        // touched the same units).
        if let Some(blob) = model.blobs.get_mut(&id) {
            for (unit, units) in fua {
                for u in unit..unit + units {
                    if touched.get(&u).is_some_and(|values| values.len() == 1) {
                        if let Some(state) = blob.units.get_mut(u as usize) {
                            state.crash.clone_from(&state.live);
                        }
                    }
                }
            }
        }
        outcome.push("|".into());
    }
    Ok(format!("{id:#x} {}", outcome.join(" ")))
}
