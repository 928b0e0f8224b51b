//! The NBD wire format: magics, codes, flags, and every header and payload Spool sends or
//! receives, each with its byte layout and an encoder and decoder.
//!
//! Invariants: every integer is big-endian (network order), as the protocol document
//! (NetworkBlockDevice/nbd `doc/proto.md`) defines; encoders append to a `Vec<u8>` and never
//! fail; decoders never panic or index out of bounds, and return [`WireError`] for short or
//! malformed input. Unknown codes decode to an `Unknown(..)`/`Other(..)` variant, never to an
//! error, so callers can answer them as the protocol says.

use thiserror::Error;

/// `NBDMAGIC`: the first 8 bytes a server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, sent by the server after [`NBD_MAGIC`] and in front of
/// every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Oldstyle negotiation's second magic (`cliserv_magic`); Spool never sends it.
pub const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic in front of every fixed-newstyle option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// `NBD_REQUEST_MAGIC`: in front of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// `NBD_SIMPLE_REPLY_MAGIC`: in front of every simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// `NBD_STRUCTURED_REPLY_MAGIC`: in front of every structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// `NBD_EXTENDED_REQUEST_MAGIC` (the experimental extended headers, not supported).
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;

/// The 124 zero bytes that end an `NBD_OPT_EXPORT_NAME` reply unless NO_ZEROES was agreed.
pub const EXPORT_NAME_ZEROES: usize = 124;

/// Handshake flags (16 bits, sent by the server after the two magics).
pub mod handshake_flags {
    /// `NBD_FLAG_FIXED_NEWSTYLE`: the server speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// `NBD_FLAG_NO_ZEROES`: the server can leave out the 124 zero bytes.
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags (32 bits, the client's first message).
pub mod client_flags {
    /// `NBD_FLAG_C_FIXED_NEWSTYLE`: the client speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    /// `NBD_FLAG_C_NO_ZEROES`: the client wants no 124 zero bytes.
    pub const NO_ZEROES: u32 = 1 << 1;
    /// Every flag a client may set.
    pub const KNOWN: u32 = FIXED_NEWSTYLE | NO_ZEROES;
}

/// Transmission flags (16 bits, per export).
pub mod transmission_flags {
    /// `NBD_FLAG_HAS_FLAGS`: always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// `NBD_FLAG_READ_ONLY`: writes are refused.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_FLAG_SEND_FLUSH`: `NBD_CMD_FLUSH` is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_FLAG_SEND_FUA`: `NBD_CMD_FLAG_FUA` is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// `NBD_FLAG_ROTATIONAL`: the export behaves like a spinning disk.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// `NBD_FLAG_SEND_TRIM`: `NBD_CMD_TRIM` is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_FLAG_SEND_WRITE_ZEROES`: `NBD_CMD_WRITE_ZEROES` and `NO_HOLE` are supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_FLAG_SEND_DF`: `NBD_CMD_FLAG_DF` is supported (only with structured replies).
    pub const SEND_DF: u16 = 1 << 7;
    /// `NBD_FLAG_CAN_MULTI_CONN`: flush and FUA are visible across connections.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `NBD_FLAG_SEND_RESIZE` (experimental, not supported).
    pub const SEND_RESIZE: u16 = 1 << 9;
    /// `NBD_FLAG_SEND_CACHE`: `NBD_CMD_CACHE` is supported.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// `NBD_FLAG_SEND_FAST_ZERO`: `NBD_CMD_FLAG_FAST_ZERO` is supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Command flags (16 bits, per request).
pub mod command_flags {
    /// `NBD_CMD_FLAG_FUA`: persist before replying.
    pub const FUA: u16 = 1 << 0;
    /// `NBD_CMD_FLAG_NO_HOLE`: WRITE_ZEROES must allocate.
    pub const NO_HOLE: u16 = 1 << 1;
    /// `NBD_CMD_FLAG_DF`: READ replies in one content chunk.
    pub const DF: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_REQ_ONE`: BLOCK_STATUS replies with one extent.
    pub const REQ_ONE: u16 = 1 << 3;
    /// `NBD_CMD_FLAG_FAST_ZERO`: WRITE_ZEROES fails fast with ENOTSUP if it would be slow.
    pub const FAST_ZERO: u16 = 1 << 4;
    /// `NBD_CMD_FLAG_PAYLOAD_LEN` (extended headers, not supported).
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Structured reply chunk flags.
pub mod reply_flags {
    /// `NBD_REPLY_FLAG_DONE`: the last chunk of a reply.
    pub const DONE: u16 = 1 << 0;
}

/// `base:allocation` status flags of a block status extent.
pub mod state_flags {
    /// `NBD_STATE_HOLE`: not allocated.
    pub const HOLE: u32 = 1 << 0;
    /// `NBD_STATE_ZERO`: reads as zeros.
    pub const ZERO: u32 = 1 << 1;
}

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    /// Fewer bytes than the structure needs.
    #[error("{what}: {need} bytes needed, {have} given")]
    Short {
        /// The structure.
        what: &'static str,
        /// Bytes it needs.
        need: usize,
        /// Bytes given.
        have: usize,
    },
    /// A magic number is wrong.
    #[error("{what}: magic {found:#x}, expected {expected:#x}")]
    BadMagic {
        /// The structure.
        what: &'static str,
        /// The magic it must start with.
        expected: u64,
        /// The magic found.
        found: u64,
    },
    /// The bytes are well-sized but break a rule of the structure.
    #[error("{what}: {why}")]
    Malformed {
        /// The structure.
        what: &'static str,
        /// The rule broken.
        why: &'static str,
    },
}

/// A bounds-checked big-endian cursor: reads past the end return [`WireError::Short`].
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// A cursor at the start of `bytes`, decoding structure `what` (named in errors).
    pub fn new(bytes: &'a [u8], what: &'static str) -> Reader<'a> {
        Reader { bytes, at: 0, what }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.bytes.len().saturating_sub(self.at)
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len());
        match end.and_then(|end| self.bytes.get(self.at..end).map(|s| (end, s))) {
            Some((end, slice)) => {
                self.at = end;
                Ok(slice)
            }
            None => Err(WireError::Short {
                what: self.what,
                need: self.at.saturating_add(n),
                have: self.bytes.len(),
            }),
        }
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// The next u16.
    pub fn u16(&mut self) -> Result<u16, WireError> {
        self.array().map(u16::from_be_bytes)
    }

    /// The next u32.
    pub fn u32(&mut self) -> Result<u32, WireError> {
        self.array().map(u32::from_be_bytes)
    }

    /// The next u64.
    pub fn u64(&mut self) -> Result<u64, WireError> {
        self.array().map(u64::from_be_bytes)
    }

    /// The rest of the bytes.
    pub fn rest(&mut self) -> &'a [u8] {
        let rest = self.bytes.get(self.at..).unwrap_or(&[]);
        self.at = self.bytes.len();
        rest
    }

    /// Fails with [`WireError::Malformed`] unless every byte was read.
    pub fn finish(&self) -> Result<(), WireError> {
        if self.remaining() == 0 {
            Ok(())
        } else {
            Err(WireError::Malformed {
                what: self.what,
                why: "trailing bytes",
            })
        }
    }

    fn malformed(&self, why: &'static str) -> WireError {
        WireError::Malformed {
            what: self.what,
            why,
        }
    }
}

/// Checks a protocol string: UTF-8, no NUL, at most [`crate::nbd::limits::MAX_STRING_LEN`]
/// bytes.
pub fn check_string(bytes: &[u8]) -> Result<&str, &'static str> {
    if bytes.len() > crate::nbd::limits::MAX_STRING_LEN {
        return Err("string longer than 4096 bytes");
    }
    if bytes.contains(&0) {
        return Err("string holds a NUL byte");
    }
    std::str::from_utf8(bytes).map_err(|_| "string is not UTF-8")
}

fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

macro_rules! code_enum {
    (
        $(#[$meta:meta])* $name:ident : $repr:ty, $other:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $value:literal, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )*
            /// A code this implementation does not know.
            $other($repr),
        }

        impl $name {
            /// The code's value on the wire.
            pub fn code(self) -> $repr {
                match self {
                    $( $name::$variant => $value, )*
                    $name::$other(code) => code,
                }
            }

            /// The code for a value on the wire (unknown values are kept).
            pub fn from_code(code: $repr) -> $name {
                match code {
                    $( $value => $name::$variant, )*
                    other => $name::$other(other),
                }
            }
        }
    };
}

code_enum! {
    /// Option types (`NBD_OPT_*`).
    OptionCode: u32, Unknown {
        /// `NBD_OPT_EXPORT_NAME`: choose an export and enter transmission (no error reply).
        ExportName = 1,
        /// `NBD_OPT_ABORT`: end the session.
        Abort = 2,
        /// `NBD_OPT_LIST`: list the exports.
        List = 3,
        /// `NBD_OPT_PEEK_EXPORT`: withdrawn.
        PeekExport = 4,
        /// `NBD_OPT_STARTTLS`: upgrade to TLS (not supported).
        StartTls = 5,
        /// `NBD_OPT_INFO`: describe an export.
        Info = 6,
        /// `NBD_OPT_GO`: describe an export and enter transmission.
        Go = 7,
        /// `NBD_OPT_STRUCTURED_REPLY`: use structured replies.
        StructuredReply = 8,
        /// `NBD_OPT_LIST_META_CONTEXT`: list metadata contexts.
        ListMetaContext = 9,
        /// `NBD_OPT_SET_META_CONTEXT`: select metadata contexts.
        SetMetaContext = 10,
        /// `NBD_OPT_EXTENDED_HEADERS` (experimental, not supported).
        ExtendedHeaders = 11,
    }
}

code_enum! {
    /// Option reply types (`NBD_REP_*`); errors have bit 31 set.
    ReplyType: u32, Other {
        /// `NBD_REP_ACK`: the option succeeded (or a list ended).
        Ack = 1,
        /// `NBD_REP_SERVER`: one export of a list.
        Server = 2,
        /// `NBD_REP_INFO`: one item of information about an export.
        Info = 3,
        /// `NBD_REP_META_CONTEXT`: one metadata context.
        MetaContext = 4,
        /// `NBD_REP_ERR_UNSUP`: unknown option.
        ErrUnsup = 0x8000_0001,
        /// `NBD_REP_ERR_POLICY`: forbidden by policy.
        ErrPolicy = 0x8000_0002,
        /// `NBD_REP_ERR_INVALID`: malformed or invalid now.
        ErrInvalid = 0x8000_0003,
        /// `NBD_REP_ERR_PLATFORM`: not on this platform.
        ErrPlatform = 0x8000_0004,
        /// `NBD_REP_ERR_TLS_REQD`: TLS first.
        ErrTlsReqd = 0x8000_0005,
        /// `NBD_REP_ERR_UNKNOWN`: no such export.
        ErrUnknown = 0x8000_0006,
        /// `NBD_REP_ERR_SHUTDOWN`: the server is shutting down.
        ErrShutdown = 0x8000_0007,
        /// `NBD_REP_ERR_BLOCK_SIZE_REQD`: request `NBD_INFO_BLOCK_SIZE` first.
        ErrBlockSizeReqd = 0x8000_0008,
        /// `NBD_REP_ERR_TOO_BIG`: request or reply too large.
        ErrTooBig = 0x8000_0009,
        /// `NBD_REP_ERR_EXT_HEADER_REQD` (extended headers).
        ErrExtHeaderReqd = 0x8000_000a,
    }
}

impl ReplyType {
    /// Whether this is an error reply (bit 31).
    pub fn is_error(self) -> bool {
        self.code() & 0x8000_0000 != 0
    }
}

code_enum! {
    /// Information types (`NBD_INFO_*`) of `NBD_OPT_INFO`/`NBD_OPT_GO`.
    InfoType: u16, Other {
        /// `NBD_INFO_EXPORT`: size and transmission flags.
        Export = 0,
        /// `NBD_INFO_NAME`: the canonical name.
        Name = 1,
        /// `NBD_INFO_DESCRIPTION`: a human description.
        Description = 2,
        /// `NBD_INFO_BLOCK_SIZE`: size constraints.
        BlockSize = 3,
    }
}

code_enum! {
    /// Transmission commands (`NBD_CMD_*`).
    CommandCode: u16, Unknown {
        /// `NBD_CMD_READ`.
        Read = 0,
        /// `NBD_CMD_WRITE` (payload follows the header).
        Write = 1,
        /// `NBD_CMD_DISC`: soft disconnect, no reply.
        Disc = 2,
        /// `NBD_CMD_FLUSH`.
        Flush = 3,
        /// `NBD_CMD_TRIM`.
        Trim = 4,
        /// `NBD_CMD_CACHE`.
        Cache = 5,
        /// `NBD_CMD_WRITE_ZEROES`.
        WriteZeroes = 6,
        /// `NBD_CMD_BLOCK_STATUS`.
        BlockStatus = 7,
        /// `NBD_CMD_RESIZE` (experimental, not supported).
        Resize = 8,
    }
}

code_enum! {
    /// Structured reply chunk types (`NBD_REPLY_TYPE_*`); error chunks have bit 15 set.
    ChunkType: u16, Other {
        /// `NBD_REPLY_TYPE_NONE`: an empty final chunk.
        None = 0,
        /// `NBD_REPLY_TYPE_OFFSET_DATA`: offset then data.
        OffsetData = 1,
        /// `NBD_REPLY_TYPE_OFFSET_HOLE`: a range reading as zeros.
        OffsetHole = 2,
        /// `NBD_REPLY_TYPE_BLOCK_STATUS`: a context id and extents.
        BlockStatus = 5,
        /// `NBD_REPLY_TYPE_ERROR`: an error for the whole request.
        Error = 0x8001,
        /// `NBD_REPLY_TYPE_ERROR_OFFSET`: an error at an offset.
        ErrorOffset = 0x8002,
    }
}

/// The error values of the transmission phase (`NBD_E*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Errno {
    /// `NBD_EPERM` (1): a write to a read-only export.
    Perm,
    /// `NBD_EIO` (5): the I/O failed.
    Io,
    /// `NBD_ENOMEM` (12): out of memory (avoided).
    NoMem,
    /// `NBD_EINVAL` (22): a bad request.
    Inval,
    /// `NBD_ENOSPC` (28): a write past the end, or no space.
    NoSpc,
    /// `NBD_EOVERFLOW` (75): a request too long.
    Overflow,
    /// `NBD_ENOTSUP` (95): a fast zero that would not be fast.
    NotSup,
    /// `NBD_ESHUTDOWN` (108): the server is shutting down.
    Shutdown,
}

impl Errno {
    /// The value on the wire.
    pub fn code(self) -> u32 {
        match self {
            Errno::Perm => 1,
            Errno::Io => 5,
            Errno::NoMem => 12,
            Errno::Inval => 22,
            Errno::NoSpc => 28,
            Errno::Overflow => 75,
            Errno::NotSup => 95,
            Errno::Shutdown => 108,
        }
    }

    /// The error for a value on the wire (unknown values read as `EINVAL`, as the protocol
    /// tells clients to treat them); `None` for 0.
    pub fn from_code(code: u32) -> Option<Errno> {
        Some(match code {
            0 => return None,
            1 => Errno::Perm,
            5 => Errno::Io,
            12 => Errno::NoMem,
            28 => Errno::NoSpc,
            75 => Errno::Overflow,
            95 => Errno::NotSup,
            108 => Errno::Shutdown,
            _ => Errno::Inval,
        })
    }

    /// The NBD error for an OS errno (either sign, as Spool's lower layers return `-errno`):
    /// `EDQUOT` and `EFBIG` become `ENOSPC` and `EROFS`/`EACCES` become `EPERM` as the
    /// protocol asks; anything unknown becomes `EIO`.
    pub fn from_os(errno: i32) -> Errno {
        match errno.saturating_abs() {
            libc::EPERM | libc::EACCES | libc::EROFS => Errno::Perm,
            libc::ENOMEM => Errno::NoMem,
            libc::EINVAL => Errno::Inval,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => Errno::NoSpc,
            libc::EOVERFLOW => Errno::Overflow,
            libc::ENOTSUP => Errno::NotSup,
            libc::ESHUTDOWN => Errno::Shutdown,
            _ => Errno::Io,
        }
    }

    /// The name the protocol document uses (`"EINVAL"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Errno::Perm => "EPERM",
            Errno::Io => "EIO",
            Errno::NoMem => "ENOMEM",
            Errno::Inval => "EINVAL",
            Errno::NoSpc => "ENOSPC",
            Errno::Overflow => "EOVERFLOW",
            Errno::NotSup => "ENOTSUP",
            Errno::Shutdown => "ESHUTDOWN",
        }
    }
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The server's greeting in newstyle negotiation (18 bytes).
///
/// ```text
/// 0      8         16      18
/// | NBDMAGIC | IHAVEOPT | flags |
///   u64        u64        u16 handshake flags
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerGreeting {
    /// Handshake flags ([`handshake_flags`]).
    pub flags: u16,
}

impl ServerGreeting {
    /// Bytes on the wire.
    pub const LEN: usize = 18;

    /// Appends the greeting to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&NBD_MAGIC.to_be_bytes());
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
    }

    /// Decodes the first [`Self::LEN`] bytes of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<ServerGreeting, WireError> {
        let mut r = Reader::new(bytes, "server greeting");
        let magic = r.u64()?;
        if magic != NBD_MAGIC {
            return Err(WireError::BadMagic {
                what: "server greeting",
                expected: NBD_MAGIC,
                found: magic,
            });
        }
        let opt = r.u64()?;
        if opt != IHAVEOPT {
            return Err(WireError::BadMagic {
                what: "server greeting",
                expected: IHAVEOPT,
                found: opt,
            });
        }
        Ok(ServerGreeting { flags: r.u16()? })
    }
}

/// An option request's header (16 bytes); `length` bytes of data follow.
///
/// ```text
/// 0          8        12       16
/// | IHAVEOPT | option | length |
///   u64        u32      u32
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option ([`OptionCode`]).
    pub option: u32,
    /// Bytes of option data that follow.
    pub length: u32,
}

impl OptionHeader {
    /// Bytes on the wire.
    pub const LEN: usize = 16;

    /// Appends the header to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&self.option.to_be_bytes());
        out.extend_from_slice(&self.length.to_be_bytes());
    }

    /// Decodes the first [`Self::LEN`] bytes of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<OptionHeader, WireError> {
        let mut r = Reader::new(bytes, "option header");
        let magic = r.u64()?;
        if magic != IHAVEOPT {
            return Err(WireError::BadMagic {
                what: "option header",
                expected: IHAVEOPT,
                found: magic,
            });
        }
        Ok(OptionHeader {
            option: r.u32()?,
            length: r.u32()?,
        })
    }
}

/// A fixed-newstyle option reply's header (20 bytes); `length` bytes of data follow.
///
/// ```text
/// 0             8        12           16       20
/// | reply magic | option | reply type | length |
///   u64           u32      u32          u32
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option answered.
    pub option: u32,
    /// The reply type ([`ReplyType`]).
    pub reply_type: u32,
    /// Bytes of reply data that follow.
    pub length: u32,
}

impl OptionReplyHeader {
    /// Bytes on the wire.
    pub const LEN: usize = 20;

    /// Appends the header to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&self.option.to_be_bytes());
        out.extend_from_slice(&self.reply_type.to_be_bytes());
        out.extend_from_slice(&self.length.to_be_bytes());
    }

    /// Decodes the first [`Self::LEN`] bytes of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<OptionReplyHeader, WireError> {
        let mut r = Reader::new(bytes, "option reply header");
        let magic = r.u64()?;
        if magic != OPTION_REPLY_MAGIC {
            return Err(WireError::BadMagic {
                what: "option reply header",
                expected: OPTION_REPLY_MAGIC,
                found: magic,
            });
        }
        Ok(OptionReplyHeader {
            option: r.u32()?,
            reply_type: r.u32()?,
            length: r.u32()?,
        })
    }
}

/// Appends a whole option reply (header and `data`) to `out`.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply: ReplyType, data: &[u8]) {
    OptionReplyHeader {
        option,
        reply_type: reply.code(),
        length: len_u32(data.len()),
    }
    .encode(out);
    out.extend_from_slice(data);
}

/// The reply to `NBD_OPT_EXPORT_NAME` (10 bytes, then 124 zeros unless NO_ZEROES).
///
/// ```text
/// 0      8       10            134
/// | size | flags | zeroes ...  |
///   u64    u16     124 x 0 (left out when NBD_FLAG_C_NO_ZEROES was agreed)
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportNameReply {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
}

impl ExportNameReply {
    /// Bytes on the wire without the zeroes.
    pub const LEN: usize = 10;

    /// Appends the reply to `out`, with the zeroes unless `no_zeroes`.
    pub fn encode(&self, out: &mut Vec<u8>, no_zeroes: bool) {
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        if !no_zeroes {
            out.extend_from_slice(&[0u8; EXPORT_NAME_ZEROES]);
        }
    }

    /// Decodes the first [`Self::LEN`] bytes of `bytes` (the zeroes are not checked).
    pub fn decode(bytes: &[u8]) -> Result<ExportNameReply, WireError> {
        let mut r = Reader::new(bytes, "export name reply");
        Ok(ExportNameReply {
            size: r.u64()?,
            flags: r.u16()?,
        })
    }
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`.
///
/// ```text
/// 0          4             4+n      6+n                 6+n+2k
/// | name len | name ...    | count  | info types ...    |
///   u32        n bytes       u16      k x u16
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name (empty: the default export).
    pub name: String,
    /// Information requested ([`InfoType`] codes).
    pub requests: Vec<u16>,
}

impl InfoRequest {
    /// Appends the option data to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&len_u32(self.name.len()).to_be_bytes());
        out.extend_from_slice(self.name.as_bytes());
        let count = u16::try_from(self.requests.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&count.to_be_bytes());
        for request in self.requests.iter().take(usize::from(count)) {
            out.extend_from_slice(&request.to_be_bytes());
        }
    }

    /// Decodes exactly `data` (an option's whole data).
    pub fn decode(data: &[u8]) -> Result<InfoRequest, WireError> {
        let mut r = Reader::new(data, "info request");
        let name_len = r.u32()? as usize;
        if name_len > data.len().saturating_sub(6) {
            return Err(r.malformed("name length beyond the option"));
        }
        let name = check_string(r.take(name_len)?).map_err(|why| WireError::Malformed {
            what: "info request",
            why,
        })?;
        let count = usize::from(r.u16()?);
        if r.remaining() != count * 2 {
            return Err(r.malformed("info request count does not match the option length"));
        }
        let mut requests = Vec::with_capacity(count);
        for _ in 0..count {
            requests.push(r.u16()?);
        }
        r.finish()?;
        Ok(InfoRequest {
            name: name.to_owned(),
            requests,
        })
    }
}

/// One `NBD_REP_INFO` payload.
///
/// ```text
/// EXPORT:      | type=0 u16 | size u64 | transmission flags u16 |          (12 bytes)
/// NAME:        | type=1 u16 | name ...                          |          (2 + n)
/// DESCRIPTION: | type=2 u16 | description ...                   |          (2 + n)
/// BLOCK_SIZE:  | type=3 u16 | minimum u32 | preferred u32 | maximum u32 | (14 bytes)
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    /// `NBD_INFO_EXPORT`.
    Export {
        /// Export size in bytes.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// `NBD_INFO_NAME`.
    Name(String),
    /// `NBD_INFO_DESCRIPTION`.
    Description(String),
    /// `NBD_INFO_BLOCK_SIZE`.
    BlockSize {
        /// Minimum block size.
        minimum: u32,
        /// Preferred block size.
        preferred: u32,
        /// Maximum payload size.
        maximum: u32,
    },
    /// An information type this implementation does not know, with its payload.
    Other(u16, Vec<u8>),
}

impl Info {
    /// Appends the info payload (type and data, no reply header) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Info::Export { size, flags } => {
                out.extend_from_slice(&InfoType::Export.code().to_be_bytes());
                out.extend_from_slice(&size.to_be_bytes());
                out.extend_from_slice(&flags.to_be_bytes());
            }
            Info::Name(text) | Info::Description(text) => {
                let kind = if matches!(self, Info::Name(_)) {
                    InfoType::Name
                } else {
                    InfoType::Description
                };
                out.extend_from_slice(&kind.code().to_be_bytes());
                out.extend_from_slice(text.as_bytes());
            }
            Info::BlockSize {
                minimum,
                preferred,
                maximum,
            } => {
                out.extend_from_slice(&InfoType::BlockSize.code().to_be_bytes());
                out.extend_from_slice(&minimum.to_be_bytes());
                out.extend_from_slice(&preferred.to_be_bytes());
                out.extend_from_slice(&maximum.to_be_bytes());
            }
            Info::Other(kind, data) => {
                out.extend_from_slice(&kind.to_be_bytes());
                out.extend_from_slice(data);
            }
        }
    }

    /// Appends a whole `NBD_REP_INFO` reply for `option` to `out`.
    pub fn encode_reply(&self, out: &mut Vec<u8>, option: u32) {
        let mut data = Vec::with_capacity(16);
        self.encode(&mut data);
        encode_option_reply(out, option, ReplyType::Info, &data);
    }

    /// Decodes exactly `data` (an `NBD_REP_INFO` reply's data).
    pub fn decode(data: &[u8]) -> Result<Info, WireError> {
        let mut r = Reader::new(data, "info reply");
        let kind = InfoType::from_code(r.u16()?);
        let info = match kind {
            InfoType::Export => Info::Export {
                size: r.u64()?,
                flags: r.u16()?,
            },
            InfoType::Name | InfoType::Description => {
                let text = check_string(r.rest())
                    .map_err(|why| WireError::Malformed {
                        what: "info reply",
                        why,
                    })?
                    .to_owned();
                if kind == InfoType::Name {
                    Info::Name(text)
                } else {
                    Info::Description(text)
                }
            }
            InfoType::BlockSize => Info::BlockSize {
                minimum: r.u32()?,
                preferred: r.u32()?,
                maximum: r.u32()?,
            },
            InfoType::Other(code) => Info::Other(code, r.rest().to_vec()),
        };
        r.finish()?;
        Ok(info)
    }
}

/// The data of `NBD_REP_SERVER` (one export of `NBD_OPT_LIST`).
///
/// ```text
/// 0          4          4+n
/// | name len | name ... | details ... (to the end: a human-readable description) |
///   u32
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerEntry {
    /// Export name.
    pub name: String,
    /// Details for a human (Spool sends the export's description).
    pub details: String,
}

impl ServerEntry {
    /// Appends the reply data to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&len_u32(self.name.len()).to_be_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out.extend_from_slice(self.details.as_bytes());
    }

    /// Decodes exactly `data`.
    pub fn decode(data: &[u8]) -> Result<ServerEntry, WireError> {
        let mut r = Reader::new(data, "server entry");
        let len = r.u32()? as usize;
        let text = |bytes: &[u8]| {
            check_string(bytes)
                .map(str::to_owned)
                .map_err(|why| WireError::Malformed {
                    what: "server entry",
                    why,
                })
        };
        let name = text(r.take(len)?)?;
        let details = text(r.rest())?;
        Ok(ServerEntry { name, details })
    }
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
///
/// ```text
/// | export name len u32 | export name | query count u32 | { query len u32 | query }* |
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// The export the contexts are for.
    pub export: String,
    /// The queries (`namespace:leaf`).
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    /// Appends the option data to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&len_u32(self.export.len()).to_be_bytes());
        out.extend_from_slice(self.export.as_bytes());
        out.extend_from_slice(&len_u32(self.queries.len()).to_be_bytes());
        for query in &self.queries {
            out.extend_from_slice(&len_u32(query.len()).to_be_bytes());
            out.extend_from_slice(query.as_bytes());
        }
    }

    /// Decodes exactly `data` (an option's whole data); a length that reaches past the data
    /// or trailing bytes are [`WireError::Malformed`].
    pub fn decode(data: &[u8]) -> Result<MetaContextRequest, WireError> {
        let mut r = Reader::new(data, "meta context request");
        let string = |r: &mut Reader<'_>| -> Result<String, WireError> {
            let len = r.u32()? as usize;
            if len > r.remaining() {
                return Err(r.malformed("string length beyond the option"));
            }
            check_string(r.take(len)?)
                .map(str::to_owned)
                .map_err(|why| WireError::Malformed {
                    what: "meta context request",
                    why,
                })
        };
        let export = string(&mut r)?;
        let count = r.u32()? as usize;
        // Each query takes at least 4 bytes: a count beyond that cannot be honest.
        if count > r.remaining() / 4 {
            return Err(r.malformed("query count beyond the option"));
        }
        let mut queries = Vec::with_capacity(count);
        for _ in 0..count {
            queries.push(string(&mut r)?);
        }
        r.finish()?;
        Ok(MetaContextRequest { export, queries })
    }
}

/// The data of `NBD_REP_META_CONTEXT`.
///
/// ```text
/// | context id u32 | name ... |
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextEntry {
    /// Context id (0 in replies to `NBD_OPT_LIST_META_CONTEXT`).
    pub id: u32,
    /// Context name.
    pub name: String,
}

impl MetaContextEntry {
    /// Appends the reply data to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.id.to_be_bytes());
        out.extend_from_slice(self.name.as_bytes());
    }

    /// Decodes exactly `data`.
    pub fn decode(data: &[u8]) -> Result<MetaContextEntry, WireError> {
        let mut r = Reader::new(data, "meta context entry");
        let id = r.u32()?;
        let name = check_string(r.rest()).map_err(|why| WireError::Malformed {
            what: "meta context entry",
            why,
        })?;
        Ok(MetaContextEntry {
            id,
            name: name.to_owned(),
        })
    }
}

/// A transmission request's header (28 bytes); a WRITE's `length` payload bytes follow.
///
/// ```text
/// 0       4       6      8        16       24       28
/// | magic | flags | type | handle | offset | length |
///   u32     u16     u16    u64      u64      u32
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags ([`command_flags`]).
    pub flags: u16,
    /// Command ([`CommandCode`]).
    pub command: u16,
    /// The client's opaque handle (called cookie in newer versions of the document).
    pub handle: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub length: u32,
}

impl RequestHeader {
    /// Bytes on the wire.
    pub const LEN: usize = 28;

    /// Appends the header to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.command.to_be_bytes());
        out.extend_from_slice(&self.handle.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        out.extend_from_slice(&self.length.to_be_bytes());
    }

    /// Decodes the first [`Self::LEN`] bytes of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<RequestHeader, WireError> {
        let mut r = Reader::new(bytes, "request header");
        let magic = r.u32()?;
        if magic != REQUEST_MAGIC {
            return Err(WireError::BadMagic {
                what: "request header",
                expected: u64::from(REQUEST_MAGIC),
                found: u64::from(magic),
            });
        }
        Ok(RequestHeader {
            flags: r.u16()?,
            command: r.u16()?,
            handle: r.u64()?,
            offset: r.u64()?,
            length: r.u32()?,
        })
    }
}

/// A simple reply (16 bytes); a successful READ's data follows.
///
/// ```text
/// 0       4       8        16
/// | magic | error | handle |
///   u32     u32     u64
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReplyHeader {
    /// Error value (0: success; [`Errno::code`]).
    pub error: u32,
    /// The request's handle.
    pub handle: u64,
}

impl SimpleReplyHeader {
    /// Bytes on the wire.
    pub const LEN: usize = 16;

    /// Appends the header to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&self.error.to_be_bytes());
        out.extend_from_slice(&self.handle.to_be_bytes());
    }

    /// Decodes the first [`Self::LEN`] bytes of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<SimpleReplyHeader, WireError> {
        let mut r = Reader::new(bytes, "simple reply");
        let magic = r.u32()?;
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(WireError::BadMagic {
                what: "simple reply",
                expected: u64::from(SIMPLE_REPLY_MAGIC),
                found: u64::from(magic),
            });
        }
        Ok(SimpleReplyHeader {
            error: r.u32()?,
            handle: r.u64()?,
        })
    }
}

/// A structured reply chunk's header (20 bytes); `length` payload bytes follow.
///
/// ```text
/// 0       4       6      8        16       20
/// | magic | flags | type | handle | length |
///   u32     u16     u16    u64      u32
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Reply flags ([`reply_flags`]).
    pub flags: u16,
    /// Chunk type ([`ChunkType`]).
    pub chunk_type: u16,
    /// The request's handle.
    pub handle: u64,
    /// Payload bytes that follow.
    pub length: u32,
}

impl ChunkHeader {
    /// Bytes on the wire.
    pub const LEN: usize = 20;

    /// Appends the header to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.chunk_type.to_be_bytes());
        out.extend_from_slice(&self.handle.to_be_bytes());
        out.extend_from_slice(&self.length.to_be_bytes());
    }

    /// Decodes the first [`Self::LEN`] bytes of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<ChunkHeader, WireError> {
        let mut r = Reader::new(bytes, "structured reply chunk");
        let magic = r.u32()?;
        if magic != STRUCTURED_REPLY_MAGIC {
            return Err(WireError::BadMagic {
                what: "structured reply chunk",
                expected: u64::from(STRUCTURED_REPLY_MAGIC),
                found: u64::from(magic),
            });
        }
        Ok(ChunkHeader {
            flags: r.u16()?,
            chunk_type: r.u16()?,
            handle: r.u64()?,
            length: r.u32()?,
        })
    }
}

/// One block status descriptor.
///
/// ```text
/// | length u32 (non-zero) | status flags u32 |
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Bytes the status applies to (non-zero).
    pub length: u32,
    /// Status flags ([`state_flags`] for `base:allocation`).
    pub flags: u32,
}

/// The payload of a structured reply chunk, decoded.
///
/// ```text
/// NONE:          (empty)
/// OFFSET_DATA:   | offset u64 | data ... (length - 8 >= 1 bytes) |
/// OFFSET_HOLE:   | offset u64 | hole size u32 (non-zero) |
/// BLOCK_STATUS:  | context id u32 | { extent length u32 | status u32 }+ |
/// ERROR:         | error u32 (non-zero) | message len u16 | message |
/// ERROR_OFFSET:  | error u32 (non-zero) | message len u16 | message | offset u64 |
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// `NBD_REPLY_TYPE_NONE`.
    None,
    /// `NBD_REPLY_TYPE_OFFSET_DATA` (the data is kept).
    OffsetData {
        /// Offset of the data in the export.
        offset: u64,
        /// The data.
        data: Vec<u8>,
    },
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`.
    OffsetHole {
        /// Offset of the hole.
        offset: u64,
        /// Bytes of zeros.
        size: u32,
    },
    /// `NBD_REPLY_TYPE_BLOCK_STATUS`.
    BlockStatus {
        /// Metadata context id.
        context: u32,
        /// Consecutive extents from the request's offset.
        extents: Vec<Extent>,
    },
    /// `NBD_REPLY_TYPE_ERROR` or `NBD_REPLY_TYPE_ERROR_OFFSET` (with `offset`).
    Error {
        /// Error value (non-zero).
        error: u32,
        /// Message for a human.
        message: String,
        /// The offset of an `ERROR_OFFSET` chunk.
        offset: Option<u64>,
    },
    /// Another type, with its payload.
    Other(u16, Vec<u8>),
}

impl Chunk {
    /// The chunk's type.
    pub fn chunk_type(&self) -> ChunkType {
        match self {
            Chunk::None => ChunkType::None,
            Chunk::OffsetData { .. } => ChunkType::OffsetData,
            Chunk::OffsetHole { .. } => ChunkType::OffsetHole,
            Chunk::BlockStatus { .. } => ChunkType::BlockStatus,
            Chunk::Error { offset: None, .. } => ChunkType::Error,
            Chunk::Error {
                offset: Some(_), ..
            } => ChunkType::ErrorOffset,
            Chunk::Other(code, _) => ChunkType::Other(*code),
        }
    }

    /// Appends the chunk's payload (no header) to `out`.
    pub fn encode_payload(&self, out: &mut Vec<u8>) {
        match self {
            Chunk::None => {}
            Chunk::OffsetData { offset, data } => {
                out.extend_from_slice(&offset.to_be_bytes());
                out.extend_from_slice(data);
            }
            Chunk::OffsetHole { offset, size } => {
                out.extend_from_slice(&offset.to_be_bytes());
                out.extend_from_slice(&size.to_be_bytes());
            }
            Chunk::BlockStatus { context, extents } => {
                out.extend_from_slice(&context.to_be_bytes());
                for extent in extents {
                    out.extend_from_slice(&extent.length.to_be_bytes());
                    out.extend_from_slice(&extent.flags.to_be_bytes());
                }
            }
            Chunk::Error {
                error,
                message,
                offset,
            } => {
                let message = truncate_message(message);
                out.extend_from_slice(&error.to_be_bytes());
                let len = u16::try_from(message.len()).unwrap_or(u16::MAX);
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(message.as_bytes());
                if let Some(offset) = offset {
                    out.extend_from_slice(&offset.to_be_bytes());
                }
            }
            Chunk::Other(_, data) => out.extend_from_slice(data),
        }
    }

    /// Appends the whole chunk (header and payload) for `handle` to `out`.
    pub fn encode(&self, out: &mut Vec<u8>, handle: u64, done: bool) {
        let mut payload = Vec::new();
        self.encode_payload(&mut payload);
        ChunkHeader {
            flags: if done { reply_flags::DONE } else { 0 },
            chunk_type: self.chunk_type().code(),
            handle,
            length: len_u32(payload.len()),
        }
        .encode(out);
        out.extend_from_slice(&payload);
    }

    /// Decodes a chunk of type `chunk_type` from exactly `payload`, checking the length
    /// rules of its type.
    pub fn decode(chunk_type: u16, payload: &[u8]) -> Result<Chunk, WireError> {
        let mut r = Reader::new(payload, "structured reply payload");
        let chunk = match ChunkType::from_code(chunk_type) {
            ChunkType::None => Chunk::None,
            ChunkType::OffsetData => {
                if payload.len() < 9 {
                    return Err(r.malformed("OFFSET_DATA shorter than 9 bytes"));
                }
                Chunk::OffsetData {
                    offset: r.u64()?,
                    data: r.rest().to_vec(),
                }
            }
            ChunkType::OffsetHole => {
                let chunk = Chunk::OffsetHole {
                    offset: r.u64()?,
                    size: r.u32()?,
                };
                if matches!(chunk, Chunk::OffsetHole { size: 0, .. }) {
                    return Err(r.malformed("empty hole"));
                }
                chunk
            }
            ChunkType::BlockStatus => {
                if payload.len() < 12 || !(payload.len() - 4).is_multiple_of(8) {
                    return Err(r.malformed("BLOCK_STATUS length is not 4 + 8n, n > 0"));
                }
                let context = r.u32()?;
                let mut extents = Vec::with_capacity(r.remaining() / 8);
                while r.remaining() > 0 {
                    let extent = Extent {
                        length: r.u32()?,
                        flags: r.u32()?,
                    };
                    if extent.length == 0 {
                        return Err(r.malformed("empty extent"));
                    }
                    extents.push(extent);
                }
                Chunk::BlockStatus { context, extents }
            }
            kind @ (ChunkType::Error | ChunkType::ErrorOffset) => {
                let error = r.u32()?;
                if error == 0 {
                    return Err(r.malformed("error chunk with error 0"));
                }
                let len = usize::from(r.u16()?);
                let message = check_string(r.take(len)?)
                    .map_err(|why| WireError::Malformed {
                        what: "structured reply payload",
                        why,
                    })?
                    .to_owned();
                let offset = if kind == ChunkType::ErrorOffset {
                    Some(r.u64()?)
                } else {
                    None
                };
                Chunk::Error {
                    error,
                    message,
                    offset,
                }
            }
            ChunkType::Other(code) => Chunk::Other(code, r.rest().to_vec()),
        };
        r.finish()?;
        Ok(chunk)
    }
}

/// `message` cut to at most [`crate::nbd::limits::MAX_STRING_LEN`] bytes on a character
/// boundary (the protocol's string limit).
pub fn truncate_message(message: &str) -> &str {
    let mut end = message.len().min(crate::nbd::limits::MAX_STRING_LEN);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message.get(..end).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut out = Vec::new();
        f(&mut out);
        out
    }

    #[test]
    fn greeting_layout_and_round_trip() {
        let greeting = ServerGreeting {
            flags: handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES,
        };
        let out = bytes(|o| greeting.encode(o));
        assert_eq!(out.len(), ServerGreeting::LEN);
        assert_eq!(&out[..8], b"NBDMAGIC");
        assert_eq!(&out[8..16], b"IHAVEOPT");
        assert_eq!(&out[16..], &[0, 3]);
        assert_eq!(ServerGreeting::decode(&out), Ok(greeting));
        assert!(matches!(
            ServerGreeting::decode(&out[..17]),
            Err(WireError::Short { need: 18, .. })
        ));
    }

    #[test]
    fn option_header_layout_and_round_trip() {
        let header = OptionHeader {
            option: 7,
            length: 0x0102_0304,
        };
        let out = bytes(|o| header.encode(o));
        assert_eq!(&out[..8], b"IHAVEOPT");
        assert_eq!(&out[8..], &[0, 0, 0, 7, 1, 2, 3, 4]);
        assert_eq!(OptionHeader::decode(&out), Ok(header));
        let mut bad = out.clone();
        bad[0] ^= 1;
        assert!(matches!(
            OptionHeader::decode(&bad),
            Err(WireError::BadMagic { .. })
        ));
    }

    #[test]
    fn option_reply_layout_and_round_trip() {
        let header = OptionReplyHeader {
            option: 3,
            reply_type: ReplyType::ErrUnsup.code(),
            length: 5,
        };
        let out = bytes(|o| header.encode(o));
        assert_eq!(
            out,
            [0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 3, 0x80, 0, 0, 1, 0, 0, 0, 5]
        );
        assert_eq!(OptionReplyHeader::decode(&out), Ok(header));
        assert!(ReplyType::from_code(header.reply_type).is_error());
        assert!(!ReplyType::Ack.is_error());
    }

    #[test]
    fn export_name_reply_with_and_without_zeroes() {
        let reply = ExportNameReply {
            size: 1 << 30,
            flags: 0x0d03,
        };
        let full = bytes(|o| reply.encode(o, false));
        assert_eq!(full.len(), 134);
        assert!(full[10..].iter().all(|&b| b == 0));
        let short = bytes(|o| reply.encode(o, true));
        assert_eq!(short, [0, 0, 0, 0, 0x40, 0, 0, 0, 0x0d, 0x03]);
        assert_eq!(ExportNameReply::decode(&short), Ok(reply));
    }

    #[test]
    fn info_request_round_trip_and_bad_lengths() {
        let request = InfoRequest {
            name: "vol0".into(),
            requests: vec![3, 1, 2],
        };
        let out = bytes(|o| request.encode(o));
        assert_eq!(
            out,
            [0, 0, 0, 4, b'v', b'o', b'l', b'0', 0, 3, 0, 3, 0, 1, 0, 2]
        );
        assert_eq!(InfoRequest::decode(&out), Ok(request));
        // A count that disagrees with the length, a name length past the option.
        assert!(InfoRequest::decode(&out[..out.len() - 1]).is_err());
        let mut long_name = out.clone();
        long_name[3] = 200;
        assert!(InfoRequest::decode(&long_name).is_err());
        assert!(InfoRequest::decode(&[0, 0, 0, 0, 0]).is_err());
        assert_eq!(
            InfoRequest::decode(&[0, 0, 0, 0, 0, 0]),
            Ok(InfoRequest {
                name: String::new(),
                requests: vec![]
            })
        );
    }

    #[test]
    fn info_replies_round_trip() {
        for info in [
            Info::Export {
                size: 12345,
                flags: 0x1ff,
            },
            Info::Name("vol0".into()),
            Info::Description("a thin volume".into()),
            Info::BlockSize {
                minimum: 512,
                preferred: 4096,
                maximum: 1 << 25,
            },
            Info::Other(99, vec![1, 2, 3]),
        ] {
            let data = bytes(|o| info.encode(o));
            assert_eq!(Info::decode(&data), Ok(info.clone()));
            let reply = bytes(|o| info.encode_reply(o, 7));
            let header = OptionReplyHeader::decode(&reply).unwrap();
            assert_eq!(header.reply_type, ReplyType::Info.code());
            assert_eq!(header.length as usize, data.len());
        }
        let export = bytes(|o| {
            Info::Export { size: 1, flags: 1 }.encode(o);
        });
        assert_eq!(export.len(), 12);
        assert!(Info::decode(&export[..11]).is_err());
    }

    #[test]
    fn server_entry_and_meta_context_round_trip() {
        let entry = ServerEntry {
            name: "vol0".into(),
            details: "1 GiB thin".into(),
        };
        let data = bytes(|o| entry.encode(o));
        assert_eq!(ServerEntry::decode(&data), Ok(entry));
        let request = MetaContextRequest {
            export: "vol0".into(),
            queries: vec!["base:allocation".into(), "qemu:dirty-bitmap:x".into()],
        };
        let data = bytes(|o| request.encode(o));
        assert_eq!(MetaContextRequest::decode(&data), Ok(request));
        assert!(MetaContextRequest::decode(&data[..data.len() - 1]).is_err());
        let mut huge_count = bytes(|o| {
            MetaContextRequest {
                export: String::new(),
                queries: vec![],
            }
            .encode(o);
        });
        huge_count[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(MetaContextRequest::decode(&huge_count).is_err());
        let context = MetaContextEntry {
            id: 1,
            name: "base:allocation".into(),
        };
        let data = bytes(|o| context.encode(o));
        assert_eq!(MetaContextEntry::decode(&data), Ok(context));
    }

    #[test]
    fn request_header_layout_and_round_trip() {
        let header = RequestHeader {
            flags: command_flags::FUA,
            command: CommandCode::Write.code(),
            handle: 0x0102_0304_0506_0708,
            offset: 4096,
            length: 512,
        };
        let out = bytes(|o| header.encode(o));
        assert_eq!(out.len(), RequestHeader::LEN);
        assert_eq!(&out[..8], &[0x25, 0x60, 0x95, 0x13, 0, 1, 0, 1]);
        assert_eq!(&out[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&out[24..], &[0, 0, 2, 0]);
        assert_eq!(RequestHeader::decode(&out), Ok(header));
    }

    #[test]
    fn simple_reply_layout_and_round_trip() {
        let reply = SimpleReplyHeader {
            error: Errno::NoSpc.code(),
            handle: 9,
        };
        let out = bytes(|o| reply.encode(o));
        assert_eq!(
            out,
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 28, 0, 0, 0, 0, 0, 0, 0, 9]
        );
        assert_eq!(SimpleReplyHeader::decode(&out), Ok(reply));
    }

    #[test]
    fn chunks_round_trip() {
        let chunks = [
            Chunk::None,
            Chunk::OffsetData {
                offset: 512,
                data: vec![0xab; 3],
            },
            Chunk::OffsetHole {
                offset: 1024,
                size: 4096,
            },
            Chunk::BlockStatus {
                context: 1,
                extents: vec![
                    Extent {
                        length: 65536,
                        flags: 0,
                    },
                    Extent {
                        length: 4096,
                        flags: state_flags::HOLE | state_flags::ZERO,
                    },
                ],
            },
            Chunk::Error {
                error: Errno::Inval.code(),
                message: "bad".into(),
                offset: None,
            },
            Chunk::Error {
                error: Errno::Io.code(),
                message: String::new(),
                offset: Some(8192),
            },
        ];
        for (i, chunk) in chunks.iter().enumerate() {
            let out = bytes(|o| chunk.encode(o, 77, i % 2 == 0));
            let header = ChunkHeader::decode(&out).unwrap();
            assert_eq!(header.handle, 77);
            assert_eq!(header.flags, if i % 2 == 0 { reply_flags::DONE } else { 0 });
            assert_eq!(header.length as usize, out.len() - ChunkHeader::LEN);
            assert_eq!(
                Chunk::decode(header.chunk_type, &out[ChunkHeader::LEN..]),
                Ok(chunk.clone())
            );
        }
        // Length rules of each type.
        assert!(Chunk::decode(ChunkType::OffsetData.code(), &[0; 8]).is_err());
        assert!(Chunk::decode(ChunkType::OffsetHole.code(), &[0; 12]).is_err());
        assert!(Chunk::decode(ChunkType::BlockStatus.code(), &[0; 4]).is_err());
        assert!(Chunk::decode(ChunkType::BlockStatus.code(), &[0; 13]).is_err());
        assert!(Chunk::decode(ChunkType::Error.code(), &[0, 0, 0, 0, 0, 0]).is_err());
        assert!(Chunk::decode(ChunkType::None.code(), &[0]).is_err());
    }

    #[test]
    fn structured_header_layout() {
        let out = bytes(|o| Chunk::None.encode(o, 1, true));
        assert_eq!(
            out,
            [0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]
        );
    }

    #[test]
    fn codes_round_trip() {
        for code in 0..16u32 {
            assert_eq!(OptionCode::from_code(code).code(), code);
            assert_eq!(
                ReplyType::from_code(code | 0x8000_0000).code(),
                code | 0x8000_0000
            );
        }
        for code in 0..16u16 {
            assert_eq!(CommandCode::from_code(code).code(), code);
            assert_eq!(InfoType::from_code(code).code(), code);
            assert_eq!(ChunkType::from_code(code).code(), code);
        }
        assert_eq!(OptionCode::from_code(10), OptionCode::SetMetaContext);
        assert_eq!(OptionCode::from_code(9), OptionCode::ListMetaContext);
        for errno in [
            Errno::Perm,
            Errno::Io,
            Errno::NoMem,
            Errno::Inval,
            Errno::NoSpc,
            Errno::Overflow,
            Errno::NotSup,
            Errno::Shutdown,
        ] {
            assert_eq!(Errno::from_code(errno.code()), Some(errno));
        }
        assert_eq!(Errno::from_code(0), None);
        assert_eq!(Errno::from_code(4242), Some(Errno::Inval));
        assert_eq!(Errno::from_os(-libc::EDQUOT), Errno::NoSpc);
        assert_eq!(Errno::from_os(libc::EFBIG), Errno::NoSpc);
        assert_eq!(Errno::from_os(-libc::EBUSY), Errno::Io);
        assert_eq!(Errno::from_os(i32::MIN), Errno::Io);
    }

    #[test]
    fn strings_are_checked() {
        assert_eq!(check_string(b"vol0"), Ok("vol0"));
        assert!(check_string(b"a\0b").is_err());
        assert!(check_string(&[0xff]).is_err());
        assert!(check_string(&[b'a'; 4097]).is_err());
        assert_eq!(truncate_message(&"é".repeat(3000)).len(), 4096);
    }
}
