//! A small blocking NBD client for tests, written from the protocol document with Spool's
//! wire codec: fixed newstyle, optional structured replies and `base:allocation`, `NBD_OPT_GO`
//! (with or without `NBD_INFO_BLOCK_SIZE`) or `NBD_OPT_EXPORT_NAME`, and requests that can be
//! sent ahead of their replies (pipelined) or as raw bytes (to misbehave on purpose).

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use spool_engine::nbd::wire::{
    client_flags, ChunkHeader, CommandCode, Extent, InfoRequest, InfoType, MetaContextRequest,
    OptionCode, OptionHeader, OptionReplyHeader, ReplyType, RequestHeader, ServerGreeting,
    SimpleReplyHeader, CLISERV_MAGIC, IHAVEOPT, NBD_MAGIC, STRUCTURED_REPLY_MAGIC,
};
use spool_engine::net::ListenAddr;

/// What the client asks for in the handshake.
#[derive(Debug, Clone, Copy)]
pub struct Ask {
    /// `NBD_OPT_STRUCTURED_REPLY`.
    pub structured: bool,
    /// `NBD_OPT_SET_META_CONTEXT` for `base:allocation` (needs `structured`).
    pub base_allocation: bool,
    /// `NBD_INFO_BLOCK_SIZE` in `NBD_OPT_GO` (agree to the block size constraints).
    pub block_size: bool,
    /// Use `NBD_OPT_EXPORT_NAME` instead of `NBD_OPT_GO`.
    pub export_name: bool,
}

impl Default for Ask {
    fn default() -> Ask {
        Ask {
            structured: true,
            base_allocation: true,
            block_size: true,
            export_name: false,
        }
    }
}

/// A stream to the daemon, TCP or Unix.
pub enum Conn {
    /// TCP.
    Tcp(TcpStream),
    /// Unix socket.
    Unix(std::os::unix::net::UnixStream),
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Opens a socket to `addr` with a read timeout (so a hung daemon fails the test).
pub fn dial(addr: &ListenAddr) -> Conn {
    match addr {
        ListenAddr::Tcp(addr) => {
            let s = TcpStream::connect(addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            s.set_nodelay(true).unwrap();
            Conn::Tcp(s)
        }
        ListenAddr::Unix(path) => {
            let s = std::os::unix::net::UnixStream::connect(path).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            Conn::Unix(s)
        }
    }
}

/// One reply, whole.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The handle it answers.
    pub handle: u64,
    /// 0, or the NBD error.
    pub error: u32,
    /// A READ's data (holes filled with zeros).
    pub data: Vec<u8>,
    /// Block status extents.
    pub extents: Vec<Extent>,
    /// An error chunk's message.
    pub message: String,
}

/// A client in the transmission phase.
pub struct Client {
    /// The socket.
    pub conn: Conn,
    /// Whether replies are structured.
    pub structured: bool,
    /// The export's size.
    pub size: u64,
    /// The transmission flags.
    pub flags: u16,
    /// Advertised minimum block size (if asked for).
    pub min_block: u32,
    next_handle: u64,
    pending: HashMap<u64, (u16, u32, u64)>,
}

/// Reads the server's option reply: (type, data).
pub fn option_reply(conn: &mut Conn) -> (ReplyType, Vec<u8>) {
    let mut head = [0u8; OptionReplyHeader::LEN];
    conn.read_exact(&mut head).expect("option reply header");
    let header = OptionReplyHeader::decode(&head).expect("option reply");
    let mut data = vec![0u8; header.length as usize];
    conn.read_exact(&mut data).expect("option reply data");
    (ReplyType::from_code(header.reply_type), data)
}

/// Sends option `option` with `data`.
pub fn send_option(conn: &mut Conn, option: OptionCode, data: &[u8]) {
    let mut out = Vec::new();
    OptionHeader {
        option: option.code(),
        length: data.len() as u32,
    }
    .encode(&mut out);
    out.extend_from_slice(data);
    conn.write_all(&out).expect("send option");
}

/// Reads the greeting and sends the client flags (fixed newstyle, no zeroes).
pub fn greet(conn: &mut Conn) -> u16 {
    let mut greeting = [0u8; ServerGreeting::LEN];
    conn.read_exact(&mut greeting).expect("greeting");
    assert_eq!(&greeting[..8], &NBD_MAGIC.to_be_bytes());
    assert_eq!(&greeting[8..16], &IHAVEOPT.to_be_bytes());
    let server = ServerGreeting::decode(&greeting).expect("greeting decodes");
    conn.write_all(&(client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES).to_be_bytes())
        .unwrap();
    server.flags
}

impl Client {
    /// Connects to `export` at `addr` asking for `ask`; panics with the server's answer if
    /// the export is refused.
    pub fn connect(addr: &ListenAddr, export: &str, ask: Ask) -> Client {
        Client::try_connect(addr, export, ask).unwrap_or_else(|err| panic!("connect: {err}"))
    }

    /// Like [`Client::connect`], returning the refusal instead.
    pub fn try_connect(addr: &ListenAddr, export: &str, ask: Ask) -> Result<Client, String> {
        let mut conn = dial(addr);
        greet(&mut conn);
        let mut structured = false;
        if ask.structured {
            send_option(&mut conn, OptionCode::StructuredReply, &[]);
            let (reply, _) = option_reply(&mut conn);
            structured = reply == ReplyType::Ack;
        }
        if ask.structured && ask.base_allocation {
            let mut data = Vec::new();
            MetaContextRequest {
                export: export.into(),
                queries: vec!["base:allocation".into()],
            }
            .encode(&mut data);
            send_option(&mut conn, OptionCode::SetMetaContext, &data);
            loop {
                let (reply, _) = option_reply(&mut conn);
                if reply != ReplyType::MetaContext {
                    break;
                }
            }
        }
        if ask.export_name {
            send_option(&mut conn, OptionCode::ExportName, export.as_bytes());
            let mut tail = [0u8; 10];
            conn.read_exact(&mut tail)
                .map_err(|err| format!("export name refused: {err}"))?;
            let size = u64::from_be_bytes(tail[..8].try_into().unwrap());
            let flags = u16::from_be_bytes(tail[8..].try_into().unwrap());
            return Ok(Client::new(conn, structured, size, flags, 1));
        }
        let mut data = Vec::new();
        InfoRequest {
            name: export.into(),
            requests: if ask.block_size {
                vec![InfoType::BlockSize.code()]
            } else {
                vec![]
            },
        }
        .encode(&mut data);
        send_option(&mut conn, OptionCode::Go, &data);
        let (mut size, mut flags, mut min_block) = (0, 0, 1);
        loop {
            let (reply, data) = option_reply(&mut conn);
            match reply {
                ReplyType::Ack => break,
                ReplyType::Info => {
                    let kind = u16::from_be_bytes([data[0], data[1]]);
                    if kind == InfoType::Export.code() {
                        size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                        flags = u16::from_be_bytes([data[10], data[11]]);
                    } else if kind == InfoType::BlockSize.code() {
                        min_block = u32::from_be_bytes(data[2..6].try_into().unwrap());
                    }
                }
                other => {
                    return Err(format!(
                        "GO refused: {other:?} {}",
                        String::from_utf8_lossy(&data)
                    ))
                }
            }
        }
        Ok(Client::new(conn, structured, size, flags, min_block))
    }

    fn new(conn: Conn, structured: bool, size: u64, flags: u16, min_block: u32) -> Client {
        Client {
            conn,
            structured,
            size,
            flags,
            min_block,
            next_handle: 1,
            pending: HashMap::new(),
        }
    }

    /// Sends a request without waiting; returns its handle.
    pub fn send(
        &mut self,
        command: CommandCode,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> u64 {
        let handle = self.next_handle;
        self.next_handle += 1;
        let mut out = Vec::with_capacity(RequestHeader::LEN + payload.len());
        RequestHeader {
            flags,
            command: command.code(),
            handle,
            offset,
            length,
        }
        .encode(&mut out);
        out.extend_from_slice(payload);
        self.conn.write_all(&out).expect("send request");
        self.pending
            .insert(handle, (command.code(), length, offset));
        handle
    }

    /// Reads the next reply (all its chunks).
    pub fn reply(&mut self) -> Reply {
        self.try_reply().expect("a reply")
    }

    /// Reads the next reply; `Err` when the connection ends.
    pub fn try_reply(&mut self) -> std::io::Result<Reply> {
        let mut magic = [0u8; 4];
        self.conn.read_exact(&mut magic)?;
        if u32::from_be_bytes(magic) == STRUCTURED_REPLY_MAGIC {
            let mut reply = Reply::default();
            loop {
                let mut head = [0u8; ChunkHeader::LEN];
                head[..4].copy_from_slice(&magic);
                self.conn.read_exact(&mut head[4..])?;
                let chunk = ChunkHeader::decode(&head).expect("chunk header");
                let mut payload = vec![0u8; chunk.length as usize];
                self.conn.read_exact(&mut payload)?;
                reply.handle = chunk.handle;
                let (_, length, start) =
                    self.pending.get(&chunk.handle).copied().unwrap_or_default();
                if reply.data.is_empty() && length > 0 && chunk.chunk_type == 1 {
                    reply.data = vec![0u8; length as usize];
                }
                match chunk.chunk_type {
                    1 => {
                        let offset = u64::from_be_bytes(payload[..8].try_into().unwrap());
                        let at = (offset - start) as usize;
                        if reply.data.len() < at + payload.len() - 8 {
                            reply.data.resize(at + payload.len() - 8, 0);
                        }
                        reply.data[at..at + payload.len() - 8].copy_from_slice(&payload[8..]);
                    }
                    2 => {
                        if reply.data.is_empty() {
                            reply.data = vec![0u8; length as usize];
                        }
                    }
                    5 => {
                        for pair in payload[4..].chunks(8) {
                            reply.extents.push(Extent {
                                length: u32::from_be_bytes(pair[..4].try_into().unwrap()),
                                flags: u32::from_be_bytes(pair[4..].try_into().unwrap()),
                            });
                        }
                    }
                    0 => {}
                    t if t & 0x8000 != 0 => {
                        reply.error = u32::from_be_bytes(payload[..4].try_into().unwrap());
                        let len = u16::from_be_bytes([payload[4], payload[5]]) as usize;
                        reply.message = String::from_utf8_lossy(&payload[6..6 + len]).into();
                    }
                    t => panic!("unexpected chunk type {t}"),
                }
                if chunk.flags & 1 != 0 {
                    self.pending.remove(&reply.handle);
                    return Ok(reply);
                }
                self.conn.read_exact(&mut magic)?;
            }
        }
        let mut head = [0u8; SimpleReplyHeader::LEN];
        head[..4].copy_from_slice(&magic);
        self.conn.read_exact(&mut head[4..])?;
        let header = SimpleReplyHeader::decode(&head).expect("simple reply");
        let (command, length, _) = self.pending.remove(&header.handle).unwrap_or_default();
        let mut reply = Reply {
            handle: header.handle,
            error: header.error,
            ..Reply::default()
        };
        if header.error == 0 && command == CommandCode::Read.code() {
            reply.data = vec![0u8; length as usize];
            self.conn.read_exact(&mut reply.data)?;
        }
        Ok(reply)
    }

    /// Sends one request and waits for its reply.
    pub fn call(
        &mut self,
        command: CommandCode,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Reply {
        let handle = self.send(command, flags, offset, length, payload);
        let reply = self.reply();
        assert_eq!(reply.handle, handle, "the reply answers the request");
        reply
    }

    /// READ: the data, or the error.
    pub fn read(&mut self, offset: u64, length: u32) -> Result<Vec<u8>, u32> {
        let reply = self.call(CommandCode::Read, 0, offset, length, &[]);
        if reply.error != 0 {
            return Err(reply.error);
        }
        Ok(reply.data)
    }

    /// WRITE with `flags`: 0 or the error.
    pub fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> u32 {
        self.call(CommandCode::Write, flags, offset, data.len() as u32, data)
            .error
    }

    /// FLUSH: 0 or the error.
    pub fn flush(&mut self) -> u32 {
        self.call(CommandCode::Flush, 0, 0, 0, &[]).error
    }

    /// NBD_CMD_DISC, then waits for the server to close.
    pub fn disconnect(mut self) {
        self.send(CommandCode::Disc, 0, 0, 0, &[]);
        let mut rest = Vec::new();
        let _ = self.conn.read_to_end(&mut rest);
        assert!(rest.is_empty(), "nothing after NBD_CMD_DISC");
    }

    /// Whether the server closed the connection (reads EOF or an error within the timeout).
    pub fn closed_by_server(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(self.conn.read(&mut byte), Ok(0) | Err(_))
    }
}

/// Bytes of a pattern for `seed`.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

/// A magic this file uses to make a bad request header.
pub const NOT_A_REQUEST_MAGIC: u32 = 0x1234_5678;

/// The client-server magic (oldstyle), for tests that pretend to be an old server.
pub const OLDSTYLE: u64 = CLISERV_MAGIC;
