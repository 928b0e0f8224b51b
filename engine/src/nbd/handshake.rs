//! The NBD handshake (fixed newstyle option haggling) as a state machine with no I/O.
//!
//! [`Handshake::new`] gives the greeting to send; [`Handshake::input`] takes whatever bytes
//! arrived (one at a time or many options at once), and returns the bytes to send and, at
//! most once, an [`Outcome`]: [`Outcome::Done`] (enter transmission with the
//! [`Negotiated`] parameters), [`Outcome::Aborted`] (the client sent `NBD_OPT_ABORT`; send
//! the ACK, then close) or [`Outcome::Closed`] (hard disconnect, for the reason given).
//!
//! Invariants: it never panics; it buffers at most [`limits::MAX_HANDSHAKE_BUFFER`] bytes
//! (longer options are skipped unbuffered and answered `NBD_REP_ERR_TOO_BIG`); the bytes
//! after the option that ended the handshake are not consumed ([`Step::consumed`]) and belong
//! to the transmission phase; and its answers depend only on the bytes, not on how they were
//! split. Oldstyle and plain (non-fixed) newstyle are refused; TLS is not offered.

use std::sync::Arc;

use thiserror::Error;

use crate::nbd::limits;
use crate::nbd::wire::{
    self, client_flags, encode_option_reply, handshake_flags, transmission_flags as tf,
    ExportNameReply, Info, InfoRequest, InfoType, MetaContextEntry, MetaContextRequest, OptionCode,
    OptionHeader, ReplyType, ServerEntry, ServerGreeting,
};

/// The only metadata context Spool serves.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// The context id Spool gives `base:allocation` in `NBD_OPT_SET_META_CONTEXT` replies.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// An export's size constraints, as `NBD_INFO_BLOCK_SIZE` advertises them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Smallest addressable length and alignment (a power of two, at most 64 KiB).
    pub minimum: u32,
    /// Length and alignment for efficient I/O (a power of two, at least `minimum` and 512).
    pub preferred: u32,
    /// Largest READ or WRITE payload (at least `preferred`).
    pub maximum: u32,
}

impl BlockSizes {
    /// The protocol's defaults when nothing is advertised: 1, 4096, 32 MiB.
    pub const DEFAULT: BlockSizes = BlockSizes {
        minimum: 1,
        preferred: 4096,
        maximum: limits::MAX_PAYLOAD,
    };

    /// Checks the protocol's rules for advertised sizes, and that `maximum` is at most
    /// [`limits::MAX_PAYLOAD`].
    pub fn check(&self) -> Result<(), ConfigError> {
        let bad = |why: &'static str| Err(ConfigError::BlockSizes { sizes: *self, why });
        if !self.minimum.is_power_of_two() || self.minimum > 65536 {
            return bad("minimum must be a power of two of at most 65536");
        }
        if !self.preferred.is_power_of_two() || self.preferred < self.minimum.max(512) {
            return bad("preferred must be a power of two, at least minimum and 512");
        }
        if self.maximum < self.preferred || self.maximum > limits::MAX_PAYLOAD {
            return bad("maximum must be at least preferred and at most 32 MiB");
        }
        Ok(())
    }
}

impl Default for BlockSizes {
    fn default() -> BlockSizes {
        BlockSizes::DEFAULT
    }
}

/// Which optional commands an export offers (each maps to a transmission flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "one switch per transmission flag, as the protocol has them"
)]
pub struct Features {
    /// `NBD_CMD_FLUSH` (`NBD_FLAG_SEND_FLUSH`).
    pub flush: bool,
    /// `NBD_CMD_FLAG_FUA` (`NBD_FLAG_SEND_FUA`).
    pub fua: bool,
    /// `NBD_CMD_TRIM` (`NBD_FLAG_SEND_TRIM`; never on a read-only export).
    pub trim: bool,
    /// `NBD_CMD_WRITE_ZEROES` (`NBD_FLAG_SEND_WRITE_ZEROES`; never on a read-only export).
    pub write_zeroes: bool,
    /// `NBD_CMD_FLAG_FAST_ZERO` (`NBD_FLAG_SEND_FAST_ZERO`; only with `write_zeroes`).
    pub fast_zero: bool,
    /// `NBD_CMD_CACHE` (`NBD_FLAG_SEND_CACHE`).
    pub cache: bool,
    /// `NBD_FLAG_CAN_MULTI_CONN`: flush and FUA cover every connection to the export.
    pub multi_conn: bool,
    /// `NBD_CMD_FLAG_DF` (`NBD_FLAG_SEND_DF`; only once structured replies are agreed).
    pub df: bool,
}

impl Features {
    /// Everything Spool's volumes support.
    pub const ALL: Features = Features {
        flush: true,
        fua: true,
        trim: true,
        write_zeroes: true,
        fast_zero: true,
        cache: true,
        multi_conn: true,
        df: true,
    };
}

impl Default for Features {
    fn default() -> Features {
        Features::ALL
    }
}

/// One export as the handshake sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// The name clients ask for (unique, a protocol string).
    pub name: String,
    /// A description for humans (`NBD_INFO_DESCRIPTION`, `NBD_OPT_LIST` details).
    pub description: String,
    /// Size in bytes (a multiple of `block_sizes.minimum`; with a maximum payload of at
    /// least 1 MiB once the export is that large, as the protocol asks).
    pub size_bytes: u64,
    /// Whether writes are refused (`NBD_FLAG_READ_ONLY`), as for snapshots.
    pub read_only: bool,
    /// Size constraints (`NBD_INFO_BLOCK_SIZE`).
    pub block_sizes: BlockSizes,
    /// Whether block status for `base:allocation` can be answered.
    pub base_allocation: bool,
    /// Optional commands offered.
    pub features: Features,
}

impl ExportInfo {
    /// The transmission flags of this export, given whether structured replies were agreed.
    pub fn transmission_flags(&self, structured_replies: bool) -> u16 {
        let f = &self.features;
        let writable = !self.read_only;
        let mut flags = tf::HAS_FLAGS;
        for (on, flag) in [
            (self.read_only, tf::READ_ONLY),
            (f.flush, tf::SEND_FLUSH),
            (f.fua, tf::SEND_FUA),
            (f.trim && writable, tf::SEND_TRIM),
            (f.write_zeroes && writable, tf::SEND_WRITE_ZEROES),
            (
                f.fast_zero && f.write_zeroes && writable,
                tf::SEND_FAST_ZERO,
            ),
            (f.df && structured_replies, tf::SEND_DF),
            (f.multi_conn, tf::CAN_MULTI_CONN),
            (f.cache, tf::SEND_CACHE),
        ] {
            if on {
                flags |= flag;
            }
        }
        flags
    }

    fn check(&self) -> Result<(), ConfigError> {
        let bad = |why: &'static str| {
            Err(ConfigError::Export {
                name: self.name.clone(),
                why,
            })
        };
        if let Err(why) = wire::check_string(self.name.as_bytes()) {
            return bad(why);
        }
        if let Err(why) = wire::check_string(self.description.as_bytes()) {
            return bad(why);
        }
        self.block_sizes.check()?;
        if !self
            .size_bytes
            .is_multiple_of(u64::from(self.block_sizes.minimum))
        {
            return bad("size is not a multiple of the minimum block size");
        }
        if self.size_bytes >= 1 << 20 && self.block_sizes.maximum < 1 << 20 {
            return bad("maximum payload under 1 MiB on an export of 1 MiB or more");
        }
        Ok(())
    }
}

/// Server-side choices for every handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent protocol switches"
)]
pub struct HandshakeOptions {
    /// Agree to `NBD_OPT_STRUCTURED_REPLY` (and so to metadata contexts).
    pub structured_replies: bool,
    /// Offer `NBD_FLAG_NO_ZEROES`.
    pub no_zeroes: bool,
    /// Answer `NBD_OPT_LIST` (otherwise `NBD_REP_ERR_POLICY`).
    pub allow_list: bool,
    /// Refuse clients that do not request `NBD_INFO_BLOCK_SIZE` in `NBD_OPT_GO`
    /// (`NBD_REP_ERR_BLOCK_SIZE_REQD`; `NBD_OPT_EXPORT_NAME` is then closed). Off by default,
    /// as the protocol recommends for interoperability.
    pub require_block_size: bool,
    /// The export the empty name selects (none: the empty name is unknown).
    pub default_export: Option<String>,
}

impl Default for HandshakeOptions {
    fn default() -> HandshakeOptions {
        HandshakeOptions {
            structured_replies: true,
            no_zeroes: true,
            allow_list: true,
            require_block_size: false,
            default_export: None,
        }
    }
}

/// A server configuration the handshake cannot serve.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    /// An export breaks a protocol rule.
    #[error("export {name:?}: {why}")]
    Export {
        /// The export's name.
        name: String,
        /// The rule it breaks.
        why: &'static str,
    },
    /// Block sizes break a protocol rule.
    #[error("block sizes {sizes:?}: {why}")]
    BlockSizes {
        /// The sizes.
        sizes: BlockSizes,
        /// The rule they break.
        why: &'static str,
    },
    /// Two exports share a name.
    #[error("two exports are named {0:?}")]
    DuplicateName(String),
    /// The default export is not in the list.
    #[error("default export {0:?} is not exported")]
    UnknownDefault(String),
}

/// A misuse of the state machine (not a client error: those end in [`Outcome::Closed`]).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HandshakeError {
    /// Input after the handshake already ended.
    #[error("the handshake has ended")]
    Finished,
}

/// Why the server hard-disconnects a client during the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CloseReason {
    /// The client did not set `NBD_FLAG_C_FIXED_NEWSTYLE` (oldstyle or plain newstyle).
    #[error("client does not speak fixed newstyle (client flags {0:#x})")]
    NotFixedNewstyle(u32),
    /// The client set a flag the protocol does not define, or one the server did not offer.
    #[error("client flags {0:#x} hold a flag the server did not offer")]
    UnknownClientFlags(u32),
    /// An option did not start with `IHAVEOPT`.
    #[error("option magic {0:#x} is not IHAVEOPT")]
    BadOptionMagic(u64),
    /// `NBD_OPT_EXPORT_NAME` named no export (it cannot be answered with an error).
    #[error("NBD_OPT_EXPORT_NAME for unknown export {0:?}")]
    UnknownExport(String),
    /// `NBD_OPT_EXPORT_NAME` longer than an export name can be.
    #[error("NBD_OPT_EXPORT_NAME of {0} bytes")]
    ExportNameTooLong(u32),
    /// `NBD_OPT_EXPORT_NAME` from a client that must request block sizes.
    #[error("NBD_OPT_EXPORT_NAME cannot agree block size constraints")]
    BlockSizeRequired,
    /// An option too long even to skip.
    #[error("option {option} of {length} bytes (denial of service)")]
    OptionTooLong {
        /// The option.
        option: u32,
        /// Its length.
        length: u32,
    },
    /// Too many options in one handshake.
    #[error("more than {} options (denial of service)", limits::MAX_OPTIONS)]
    TooManyOptions,
}

/// How a handshake ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Enter the transmission phase on export number `export` of the list.
    Done {
        /// Index of the export in the list given to [`Handshake::new`].
        export: usize,
        /// What was agreed.
        negotiated: Negotiated,
    },
    /// The client sent `NBD_OPT_ABORT`: send the ACK in [`Step::send`], then close.
    Aborted,
    /// Hard disconnect now, for this reason.
    Closed(CloseReason),
}

/// What the handshake agreed, all the transmission phase needs.
#[derive(Debug, Clone, PartialEq, Eq)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent negotiated switches"
)]
pub struct Negotiated {
    /// The export's canonical name.
    pub export_name: String,
    /// Its size in bytes.
    pub size_bytes: u64,
    /// The transmission flags sent.
    pub transmission_flags: u16,
    /// Structured replies were agreed (`NBD_OPT_STRUCTURED_REPLY` acknowledged).
    pub structured_replies: bool,
    /// The context id of `base:allocation`, if the client selected it for this export.
    pub base_allocation: Option<u32>,
    /// The client requested `NBD_INFO_BLOCK_SIZE` in `NBD_OPT_GO`: it promised to obey
    /// `block_sizes`, and unaligned requests get `EINVAL`.
    pub block_size_constraints_agreed: bool,
    /// The export's size constraints (advertised in `NBD_INFO_BLOCK_SIZE`).
    pub block_sizes: BlockSizes,
    /// `NBD_FLAG_C_NO_ZEROES` was agreed.
    pub no_zeroes: bool,
    /// Transmission began with `NBD_OPT_GO` (not `NBD_OPT_EXPORT_NAME`).
    pub via_go: bool,
}

impl Negotiated {
    /// Whether the export is read-only.
    pub fn read_only(&self) -> bool {
        self.transmission_flags & tf::READ_ONLY != 0
    }

    /// Whether transmission flag `flag` was sent.
    pub fn has_flag(&self, flag: u16) -> bool {
        self.transmission_flags & flag == flag
    }
}

/// What one call to [`Handshake::input`] produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Step {
    /// Input bytes consumed; fewer than given only after an outcome (the rest belong to the
    /// transmission phase).
    pub consumed: usize,
    /// Bytes to send to the client, in order.
    pub send: Vec<u8>,
    /// How the handshake ended, if it did.
    pub outcome: Option<Outcome>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    ClientFlags,
    OptionHeader,
    OptionData { option: u32, length: u32 },
    Skipping { option: u32, remaining: u32 },
    Finished,
}

/// The server side of one client's handshake.
#[derive(Debug)]
pub struct Handshake {
    exports: Arc<[ExportInfo]>,
    options: HandshakeOptions,
    state: State,
    buf: Vec<u8>,
    fixed_newstyle: bool,
    no_zeroes: bool,
    structured: bool,
    /// The export a successful `NBD_OPT_SET_META_CONTEXT` selected `base:allocation` for.
    meta_export: Option<usize>,
    options_seen: u32,
    shutting_down: bool,
}

impl Handshake {
    /// A handshake serving `exports`, and the greeting to send first.
    pub fn new(
        exports: Arc<[ExportInfo]>,
        options: HandshakeOptions,
    ) -> Result<(Handshake, Vec<u8>), ConfigError> {
        for (i, export) in exports.iter().enumerate() {
            export.check()?;
            if exports.iter().take(i).any(|e| e.name == export.name) {
                return Err(ConfigError::DuplicateName(export.name.clone()));
            }
        }
        if let Some(name) = &options.default_export {
            if !exports.iter().any(|e| &e.name == name) {
                return Err(ConfigError::UnknownDefault(name.clone()));
            }
        }
        let mut flags = handshake_flags::FIXED_NEWSTYLE;
        if options.no_zeroes {
            flags |= handshake_flags::NO_ZEROES;
        }
        let mut greeting = Vec::with_capacity(ServerGreeting::LEN);
        ServerGreeting { flags }.encode(&mut greeting);
        Ok((
            Handshake {
                exports,
                options,
                state: State::ClientFlags,
                buf: Vec::new(),
                fixed_newstyle: false,
                no_zeroes: false,
                structured: false,
                meta_export: None,
                options_seen: 0,
                shutting_down: false,
            },
            greeting,
        ))
    }

    /// Replaces the export list for the options still to come (a server whose exports
    /// change while clients negotiate: what a client lists or selects is what is exported
    /// when its option arrives). The list is checked as in [`Handshake::new`]; a failed
    /// check leaves the old list.
    pub fn set_exports(&mut self, exports: Arc<[ExportInfo]>) -> Result<(), ConfigError> {
        if Arc::ptr_eq(&exports, &self.exports) {
            return Ok(());
        }
        for (i, export) in exports.iter().enumerate() {
            export.check()?;
            if exports.iter().take(i).any(|e| e.name == export.name) {
                return Err(ConfigError::DuplicateName(export.name.clone()));
            }
        }
        // A meta context was selected for an export by position: follow it by name.
        self.meta_export = self
            .meta_export
            .and_then(|index| self.exports.get(index))
            .and_then(|old| exports.iter().position(|e| e.name == old.name));
        self.exports = exports;
        Ok(())
    }

    /// From now on, answer every option but `NBD_OPT_ABORT` with `NBD_REP_ERR_SHUTDOWN`
    /// (what the protocol asks of a server that is shutting down).
    pub fn begin_shutdown(&mut self) {
        self.shutting_down = true;
    }

    /// Bytes buffered now (at most [`limits::MAX_HANDSHAKE_BUFFER`]).
    pub fn buffered_bytes(&self) -> usize {
        self.buf.len()
    }

    /// Whether the handshake has ended (further input is an error).
    pub fn is_finished(&self) -> bool {
        self.state == State::Finished
    }

    /// Consumes `bytes` as far as the handshake goes; see [`Step`].
    pub fn input(&mut self, bytes: &[u8]) -> Result<Step, HandshakeError> {
        if self.state == State::Finished {
            return Err(HandshakeError::Finished);
        }
        let mut step = Step::default();
        while step.consumed < bytes.len() && step.outcome.is_none() {
            let rest = bytes.get(step.consumed..).unwrap_or(&[]);
            if let State::Skipping { option, remaining } = self.state {
                let skip = rest.len().min(remaining as usize);
                step.consumed += skip;
                let remaining = remaining - u32::try_from(skip).unwrap_or(remaining);
                self.state = State::Skipping { option, remaining };
                if remaining == 0 {
                    self.state = State::OptionHeader;
                    self.reply_text(
                        &mut step.send,
                        option,
                        ReplyType::ErrTooBig,
                        "option longer than 64 KiB",
                    );
                }
                continue;
            }
            let need = match self.state {
                State::ClientFlags => 4,
                State::OptionHeader => OptionHeader::LEN,
                State::OptionData { length, .. } => length as usize,
                State::Skipping { .. } | State::Finished => 0,
            };
            let take = need.saturating_sub(self.buf.len()).min(rest.len());
            self.buf.extend_from_slice(rest.get(..take).unwrap_or(&[]));
            step.consumed += take;
            if self.buf.len() >= need {
                step.outcome = self.advance(&mut step.send);
            }
        }
        // An option with no data completes without input.
        if step.outcome.is_none() {
            if let State::OptionData { length: 0, .. } = self.state {
                step.outcome = self.advance(&mut step.send);
            }
        }
        if step.outcome.is_some() {
            self.state = State::Finished;
            self.buf = Vec::new();
        }
        Ok(step)
    }

    /// Handles the complete unit in `self.buf`.
    fn advance(&mut self, out: &mut Vec<u8>) -> Option<Outcome> {
        let buf = std::mem::take(&mut self.buf);
        match self.state {
            State::ClientFlags => {
                let flags = wire::Reader::new(&buf, "client flags").u32().unwrap_or(0);
                self.client_flags(flags)
            }
            State::OptionHeader => {
                let mut r = wire::Reader::new(&buf, "option header");
                let magic = r.u64().unwrap_or(0);
                let option = r.u32().unwrap_or(0);
                let length = r.u32().unwrap_or(0);
                if magic != wire::IHAVEOPT {
                    return Some(Outcome::Closed(CloseReason::BadOptionMagic(magic)));
                }
                self.options_seen += 1;
                if self.options_seen > limits::MAX_OPTIONS {
                    return Some(Outcome::Closed(CloseReason::TooManyOptions));
                }
                if length > limits::MAX_OPTION_LEN {
                    if OptionCode::from_code(option) == OptionCode::ExportName {
                        return Some(Outcome::Closed(CloseReason::ExportNameTooLong(length)));
                    }
                    if length > limits::MAX_OPTION_DISCARD {
                        return Some(Outcome::Closed(CloseReason::OptionTooLong {
                            option,
                            length,
                        }));
                    }
                    self.state = State::Skipping {
                        option,
                        remaining: length,
                    };
                    return None;
                }
                self.state = State::OptionData { option, length };
                self.buf = Vec::with_capacity(length as usize);
                None
            }
            State::OptionData { option, .. } => {
                self.state = State::OptionHeader;
                self.option(option, &buf, out)
            }
            State::Skipping { .. } | State::Finished => None,
        }
    }

    fn client_flags(&mut self, flags: u32) -> Option<Outcome> {
        let mut offered = client_flags::FIXED_NEWSTYLE;
        if self.options.no_zeroes {
            offered |= client_flags::NO_ZEROES;
        }
        if flags & !offered != 0 {
            return Some(Outcome::Closed(CloseReason::UnknownClientFlags(flags)));
        }
        if flags & client_flags::FIXED_NEWSTYLE == 0 {
            return Some(Outcome::Closed(CloseReason::NotFixedNewstyle(flags)));
        }
        self.fixed_newstyle = true;
        self.no_zeroes = flags & client_flags::NO_ZEROES != 0;
        self.state = State::OptionHeader;
        None
    }

    fn reply_text(&self, out: &mut Vec<u8>, option: u32, reply: ReplyType, message: &str) {
        encode_option_reply(
            out,
            option,
            reply,
            wire::truncate_message(message).as_bytes(),
        );
    }

    fn find(&self, name: &str) -> Option<usize> {
        let name = if name.is_empty() {
            self.options.default_export.as_deref()?
        } else {
            name
        };
        self.exports.iter().position(|e| e.name == name)
    }

    /// Answers one complete option.
    fn option(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) -> Option<Outcome> {
        let code = OptionCode::from_code(option);
        if code == OptionCode::Abort {
            // Any data is ignored, as the protocol asks.
            encode_option_reply(out, option, ReplyType::Ack, &[]);
            return Some(Outcome::Aborted);
        }
        if self.shutting_down && code != OptionCode::ExportName {
            self.reply_text(out, option, ReplyType::ErrShutdown, "server shutting down");
            return None;
        }
        match code {
            OptionCode::ExportName => self.export_name(data, out),
            OptionCode::List => {
                self.list(option, data, out);
                None
            }
            OptionCode::Info | OptionCode::Go => self.info_or_go(option, code, data, out),
            OptionCode::StructuredReply => {
                let (reply, message) = if !data.is_empty() {
                    (ReplyType::ErrInvalid, "NBD_OPT_STRUCTURED_REPLY with data")
                } else if !self.options.structured_replies {
                    (ReplyType::ErrUnsup, "structured replies are turned off")
                } else if self.structured {
                    (ReplyType::ErrInvalid, "structured replies already agreed")
                } else {
                    self.structured = true;
                    (ReplyType::Ack, "")
                };
                self.reply_text(out, option, reply, message);
                None
            }
            OptionCode::ListMetaContext | OptionCode::SetMetaContext => {
                self.meta_context(option, code == OptionCode::SetMetaContext, data, out);
                None
            }
            OptionCode::StartTls => {
                self.reply_text(out, option, ReplyType::ErrUnsup, "TLS is not supported");
                None
            }
            OptionCode::Abort
            | OptionCode::PeekExport
            | OptionCode::ExtendedHeaders
            | OptionCode::Unknown(_) => {
                self.reply_text(
                    out,
                    option,
                    ReplyType::ErrUnsup,
                    &format!("option {option} is not supported"),
                );
                None
            }
        }
    }

    fn export_name(&mut self, data: &[u8], out: &mut Vec<u8>) -> Option<Outcome> {
        let name = String::from_utf8_lossy(data).into_owned();
        let found = wire::check_string(data)
            .ok()
            .and_then(|name| self.find(name));
        let Some(index) = found else {
            return Some(Outcome::Closed(CloseReason::UnknownExport(name)));
        };
        if self.shutting_down {
            return Some(Outcome::Closed(CloseReason::UnknownExport(name)));
        }
        if self.options.require_block_size {
            return Some(Outcome::Closed(CloseReason::BlockSizeRequired));
        }
        let negotiated = self.negotiated(index, false, false);
        ExportNameReply {
            size: negotiated.size_bytes,
            flags: negotiated.transmission_flags,
        }
        .encode(out, self.no_zeroes);
        Some(Outcome::Done {
            export: index,
            negotiated,
        })
    }

    fn negotiated(&self, index: usize, agreed: bool, via_go: bool) -> Negotiated {
        let export = self.exports.get(index);
        let (name, size, flags, sizes, base) = export.map_or_else(
            || (String::new(), 0, tf::HAS_FLAGS, BlockSizes::DEFAULT, false),
            |e| {
                (
                    e.name.clone(),
                    e.size_bytes,
                    e.transmission_flags(self.structured),
                    e.block_sizes,
                    e.base_allocation,
                )
            },
        );
        Negotiated {
            export_name: name,
            size_bytes: size,
            transmission_flags: flags,
            structured_replies: self.structured,
            base_allocation: (self.structured && base && self.meta_export == Some(index))
                .then_some(BASE_ALLOCATION_ID),
            block_size_constraints_agreed: agreed,
            block_sizes: sizes,
            no_zeroes: self.no_zeroes,
            via_go,
        }
    }

    fn list(&self, option: u32, data: &[u8], out: &mut Vec<u8>) {
        if !data.is_empty() {
            return self.reply_text(out, option, ReplyType::ErrInvalid, "NBD_OPT_LIST with data");
        }
        if !self.options.allow_list {
            return self.reply_text(out, option, ReplyType::ErrPolicy, "listing is turned off");
        }
        for export in self.exports.iter() {
            let mut entry = Vec::new();
            ServerEntry {
                name: export.name.clone(),
                details: export.description.clone(),
            }
            .encode(&mut entry);
            encode_option_reply(out, option, ReplyType::Server, &entry);
        }
        encode_option_reply(out, option, ReplyType::Ack, &[]);
    }

    fn info_or_go(
        &mut self,
        option: u32,
        code: OptionCode,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Option<Outcome> {
        let request = match InfoRequest::decode(data) {
            Ok(request) => request,
            Err(err) => {
                self.reply_text(out, option, ReplyType::ErrInvalid, &err.to_string());
                return None;
            }
        };
        let Some(index) = self.find(&request.name) else {
            self.reply_text(
                out,
                option,
                ReplyType::ErrUnknown,
                &format!("no export {:?}", request.name),
            );
            return None;
        };
        let export = self.exports.get(index).cloned()?;
        let asked = |kind: InfoType| request.requests.contains(&kind.code());
        let asked_block_size = asked(InfoType::BlockSize);
        let go = code == OptionCode::Go;
        // Block sizes are always sent: a server with non-default constraints SHOULD
        // advertise them, and SHOULD send them before NBD_REP_ERR_BLOCK_SIZE_REQD.
        let block_size = Info::BlockSize {
            minimum: export.block_sizes.minimum,
            preferred: export.block_sizes.preferred,
            maximum: export.block_sizes.maximum,
        };
        if go && self.options.require_block_size && !asked_block_size {
            block_size.encode_reply(out, option);
            self.reply_text(
                out,
                option,
                ReplyType::ErrBlockSizeReqd,
                "request NBD_INFO_BLOCK_SIZE to use this export",
            );
            return None;
        }
        let negotiated = self.negotiated(index, go && asked_block_size, go);
        Info::Export {
            size: negotiated.size_bytes,
            flags: negotiated.transmission_flags,
        }
        .encode_reply(out, option);
        if asked(InfoType::Name) {
            Info::Name(export.name.clone()).encode_reply(out, option);
        }
        if asked(InfoType::Description) && !export.description.is_empty() {
            Info::Description(export.description.clone()).encode_reply(out, option);
        }
        block_size.encode_reply(out, option);
        encode_option_reply(out, option, ReplyType::Ack, &[]);
        go.then_some(Outcome::Done {
            export: index,
            negotiated,
        })
    }

    fn meta_context(&mut self, option: u32, set: bool, data: &[u8], out: &mut Vec<u8>) {
        if set {
            // SET replaces the selection even when it fails.
            self.meta_export = None;
        }
        if !self.structured {
            return self.reply_text(
                out,
                option,
                ReplyType::ErrInvalid,
                "negotiate structured replies first",
            );
        }
        let request = match MetaContextRequest::decode(data) {
            Ok(request) => request,
            Err(err) => {
                return self.reply_text(out, option, ReplyType::ErrInvalid, &err.to_string())
            }
        };
        if let Some(query) = request.queries.iter().find(|q| !q.contains(':')) {
            return self.reply_text(
                out,
                option,
                ReplyType::ErrInvalid,
                &format!("query {query:?} has no namespace"),
            );
        }
        let Some(index) = self.find(&request.export) else {
            return self.reply_text(
                out,
                option,
                ReplyType::ErrUnknown,
                &format!("no export {:?}", request.export),
            );
        };
        let supported = self.exports.get(index).is_some_and(|e| e.base_allocation);
        let selected = supported
            && if set {
                // "base:" alone selects nothing in SET; unknown leaves are ignored.
                request.queries.iter().any(|q| q == BASE_ALLOCATION)
            } else {
                request.queries.is_empty()
                    || request
                        .queries
                        .iter()
                        .any(|q| q == BASE_ALLOCATION || q == "base:")
            };
        if selected {
            let mut entry = Vec::new();
            MetaContextEntry {
                id: if set { BASE_ALLOCATION_ID } else { 0 },
                name: BASE_ALLOCATION.into(),
            }
            .encode(&mut entry);
            encode_option_reply(out, option, ReplyType::MetaContext, &entry);
            if set {
                self.meta_export = Some(index);
            }
        }
        encode_option_reply(out, option, ReplyType::Ack, &[]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::wire::{OptionReplyHeader, IHAVEOPT};

    fn export(name: &str) -> ExportInfo {
        ExportInfo {
            name: name.into(),
            description: format!("{name} description"),
            size_bytes: 1 << 20,
            read_only: false,
            block_sizes: BlockSizes {
                minimum: 512,
                preferred: 4096,
                maximum: limits::MAX_PAYLOAD,
            },
            base_allocation: true,
            features: Features::ALL,
        }
    }

    fn start() -> Handshake {
        let (mut hs, greeting) = Handshake::new(
            vec![export("vol0"), export("snap")].into(),
            HandshakeOptions::default(),
        )
        .unwrap();
        assert_eq!(greeting.len(), 18);
        let step = hs.input(&3u32.to_be_bytes()).unwrap();
        assert_eq!(
            step,
            Step {
                consumed: 4,
                ..Step::default()
            }
        );
        hs
    }

    fn opt(option: u32, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        OptionHeader {
            option,
            length: data.len() as u32,
        }
        .encode(&mut out);
        out.extend_from_slice(data);
        out
    }

    fn replies(mut bytes: &[u8]) -> Vec<(u32, Vec<u8>)> {
        let mut all = Vec::new();
        while !bytes.is_empty() {
            let header = OptionReplyHeader::decode(bytes).unwrap();
            let end = 20 + header.length as usize;
            all.push((header.reply_type, bytes[20..end].to_vec()));
            bytes = &bytes[end..];
        }
        all
    }

    #[test]
    fn config_is_checked() {
        let mut bad = export("x");
        bad.size_bytes = 1000;
        assert!(Handshake::new(vec![bad].into(), HandshakeOptions::default()).is_err());
        assert!(matches!(
            Handshake::new(
                vec![export("a"), export("a")].into(),
                HandshakeOptions::default()
            ),
            Err(ConfigError::DuplicateName(_))
        ));
        let mut sizes = export("x");
        sizes.block_sizes.preferred = 256;
        assert!(Handshake::new(vec![sizes].into(), HandshakeOptions::default()).is_err());
        let options = HandshakeOptions {
            default_export: Some("nope".into()),
            ..HandshakeOptions::default()
        };
        assert!(Handshake::new(vec![export("a")].into(), options).is_err());
    }

    #[test]
    fn transmission_flags_follow_the_export() {
        let mut e = export("x");
        assert_eq!(e.transmission_flags(false), 0x0d6d);
        assert_eq!(e.transmission_flags(true), 0x0ded);
        e.read_only = true;
        assert_eq!(e.transmission_flags(true), 0x058f);
    }

    #[test]
    fn zero_length_option_completes_at_once() {
        let mut hs = start();
        let step = hs.input(&opt(8, &[])).unwrap();
        assert_eq!(replies(&step.send), vec![(ReplyType::Ack.code(), vec![])]);
        assert_eq!(step.consumed, 16);
    }

    #[test]
    fn skipped_option_is_answered_too_big() {
        let mut hs = start();
        let mut bytes = Vec::new();
        OptionHeader {
            option: 6,
            length: limits::MAX_OPTION_LEN + 1,
        }
        .encode(&mut bytes);
        bytes.resize(bytes.len() + limits::MAX_OPTION_LEN as usize + 1, 0);
        let step = hs.input(&bytes).unwrap();
        assert_eq!(step.consumed, bytes.len());
        assert_eq!(replies(&step.send)[0].0, ReplyType::ErrTooBig.code());
        assert!(hs.buffered_bytes() <= limits::MAX_HANDSHAKE_BUFFER);
    }

    #[test]
    fn bad_magic_closes() {
        let mut hs = start();
        let mut bytes = opt(1, b"vol0");
        bytes[0] = 0;
        let step = hs.input(&bytes).unwrap();
        assert!(matches!(
            step.outcome,
            Some(Outcome::Closed(CloseReason::BadOptionMagic(m))) if m != IHAVEOPT
        ));
        assert_eq!(hs.input(&[0]), Err(HandshakeError::Finished));
    }

    #[test]
    fn shutdown_errors_options_but_abort() {
        let mut hs = start();
        hs.begin_shutdown();
        let step = hs.input(&opt(3, &[])).unwrap();
        assert_eq!(replies(&step.send)[0].0, ReplyType::ErrShutdown.code());
        let step = hs.input(&opt(2, &[])).unwrap();
        assert_eq!(step.outcome, Some(Outcome::Aborted));
    }
}
