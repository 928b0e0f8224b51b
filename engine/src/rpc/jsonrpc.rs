//! JSON-RPC 2.0 as SPDK's server speaks it, with no I/O: requests are JSON objects sent back
//! to back on a stream (no delimiter; whitespace between them is allowed), each answered by
//! one response object, in order. [`RpcDecoder`] takes the stream's bytes and yields
//! [`Incoming`] messages; [`response`] and [`error_response`] encode the answers.
//!
//! SPDK's rules, followed here: a request that is not valid JSON gets a `-32700` parse error
//! (id null) and the connection closes (a stream has no point to resynchronise at); an array
//! (a batch) or an object that is not a request gets `-32600` (SPDK does not do batches); a
//! request without an id is a notification (run, not answered). Bytes buffered for one
//! request are capped ([`MAX_REQUEST_BYTES`]); past that the connection closes with a parse
//! error too. What is decoded does not depend on how the stream is cut into reads: a
//! top-level number or literal (`17`, `true`: not requests, answered `-32600`) ends at the
//! byte after it, since `17` may go on as `170`.

use serde_json::{json, Map, Value};

/// Bytes one request may take at most (SPDK's server grows its buffer to a similar bound).
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

/// JSON-RPC's error codes, as SPDK names them.
pub mod codes {
    /// Not valid JSON.
    pub const PARSE_ERROR: i32 = -32700;
    /// Valid JSON, not a valid request (including a batch).
    pub const INVALID_REQUEST: i32 = -32600;
    /// No such method.
    pub const METHOD_NOT_FOUND: i32 = -32601;
    /// Missing, unknown or wrongly-typed parameters.
    pub const INVALID_PARAMS: i32 = -32602;
    /// An internal error.
    pub const INTERNAL_ERROR: i32 = -32603;
}

/// A valid request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The id to answer with (`None`: a notification, not answered).
    pub id: Option<Value>,
    /// The method.
    pub method: String,
    /// The parameters (`None` when absent).
    pub params: Option<Value>,
}

/// What the decoder found next.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// A request to run.
    Request(Request),
    /// Valid JSON that is not a request: answer `error` (with `id` if one could be read).
    Invalid {
        /// The id, when the object had a usable one (else null).
        id: Value,
        /// The error to answer.
        error: RpcError,
    },
    /// Not JSON (or a request over the size cap): answer the error, then close.
    Fatal(RpcError),
}

/// A JSON-RPC error object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    /// The code (JSON-RPC's, or a negative errno as SPDK answers operation failures).
    pub code: i32,
    /// The message.
    pub message: String,
}

impl RpcError {
    /// An error with `code` and `message`.
    pub fn new(code: i32, message: impl Into<String>) -> RpcError {
        RpcError {
            code,
            message: message.into(),
        }
    }

    /// `-32602` with SPDK's wording and what is wrong.
    pub fn invalid_params(what: impl std::fmt::Display) -> RpcError {
        RpcError::new(codes::INVALID_PARAMS, format!("Invalid parameters: {what}"))
    }
}

/// Nesting serde_json accepts: its recursion limit refuses the 128th open `[` or `{`.
const MAX_DEPTH: usize = 127;

/// A number of at most this many bytes, without an exponent, is always in `f64`'s range.
const SAFE_NUMBER_BYTES: usize = 300;

/// The decoder of one connection's byte stream.
///
/// Each byte is looked at once: a small incremental scanner follows the JSON grammar across
/// [`input`](RpcDecoder::input) calls and finds where the value at the front of the buffer
/// ends (or the first byte that makes it invalid); serde_json then parses that value once.
/// Re-parsing the whole buffer on every input instead costs time quadratic in the request's
/// size when it arrives in small pieces. What is decoded does not depend on how the stream
/// is split: a top-level number or literal (`17`, `true`) is complete only once the byte
/// after it is seen, and a request is held to [`MAX_REQUEST_BYTES`] however it arrives.
#[derive(Debug, Default)]
pub struct RpcDecoder {
    buf: Vec<u8>,
    /// Bytes of `buf` already decoded (dropped at the next input).
    head: usize,
    scan: Scanner,
    broken: bool,
}

impl RpcDecoder {
    /// A decoder with nothing buffered.
    pub fn new() -> RpcDecoder {
        RpcDecoder::default()
    }

    /// Bytes buffered (an incomplete request).
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.head
    }

    /// Whether a fatal error was returned (no more input is decoded).
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Appends `bytes` from the stream.
    pub fn input(&mut self, bytes: &[u8]) {
        if self.broken {
            return;
        }
        if self.head > 0 {
            self.buf.drain(..self.head);
            self.head = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message, if one is buffered.
    pub fn next_message(&mut self) -> Option<Incoming> {
        if self.broken {
            return None;
        }
        if self.scan.at == 0 {
            // Between messages: whitespace is skipped, anything else starts the next one.
            let rest = &self.buf[self.head..];
            self.head += rest
                .iter()
                .position(|&b| !is_whitespace(b))
                .unwrap_or(rest.len());
        }
        let rest = &self.buf[self.head..];
        let window = &rest[..rest.len().min(MAX_REQUEST_BYTES)];
        match self.scan.scan(window) {
            Some(Found::Value(end)) => {
                let parsed = serde_json::from_slice::<Value>(&window[..end]);
                self.head += end;
                self.scan = Scanner::default();
                match parsed {
                    Ok(value) => Some(classify(value)),
                    Err(err) => Some(self.fatal(format!("Parse error: {err}"))),
                }
            }
            Some(Found::Error(at)) => {
                // serde_json's own message, from the bytes up to the one found wrong.
                let message = match serde_json::Deserializer::from_slice(&window[..at])
                    .into_iter::<Value>()
                    .next()
                {
                    Some(Err(err)) if !err.is_eof() => format!("Parse error: {err}"),
                    _ => format!("Parse error: invalid JSON at byte {at}"),
                };
                Some(self.fatal(message))
            }
            None if rest.len() > MAX_REQUEST_BYTES => Some(self.fatal(format!(
                "Parse error: request larger than {MAX_REQUEST_BYTES} bytes"
            ))),
            None => None,
        }
    }

    fn fatal(&mut self, message: String) -> Incoming {
        self.broken = true;
        self.buf = Vec::new();
        self.head = 0;
        self.scan = Scanner::default();
        Incoming::Fatal(RpcError::new(codes::PARSE_ERROR, message))
    }
}

/// JSON's whitespace (RFC 8259: not form feed or vertical tab).
fn is_whitespace(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\n' | b'\r')
}

/// What the scanner found in the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    /// A complete value in the window's first `.0` bytes.
    Value(usize),
    /// serde_json finds an error in the window's first `.0` bytes, whatever follows them.
    Error(usize),
}

/// Where the scan of the value at the front of the buffer stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum State {
    /// A value (the message itself, or after `:`, or after `,` in an array).
    #[default]
    Value,
    /// After `[`: a value or `]`.
    FirstElement,
    /// After `{`: a key or `}`.
    FirstKey,
    /// After `,` in an object: a key.
    Key,
    /// After a key: `:`.
    Colon,
    /// After a value in a container: `,` or the container's end.
    Next,
    /// The message is a number or a literal that just ended: the next byte must delimit it.
    End,
    /// In a string (`key`: an object's key) since `Scanner::token`.
    Str { key: bool, escape: Escape },
    /// In a number since `Scanner::token`.
    Number(Number),
    /// In a literal: `word`, of which `matched` bytes are read.
    Literal { word: &'static [u8], matched: u8 },
}

/// Where a string stands in an escape sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escape {
    None,
    /// After `\`.
    Backslash,
    /// In `\uXXXX`: `digits` bytes read (hex or not: serde_json reads 4 before checking),
    /// `low` when it must be a low surrogate.
    Hex {
        digits: u8,
        value: u16,
        valid: bool,
        low: bool,
    },
    /// After a high surrogate: `\` must follow.
    HighSurrogate,
    /// After a high surrogate and `\`: `u` must follow.
    HighSurrogateBackslash,
}

/// Where a number stands (RFC 8259's grammar).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Number {
    Minus,
    Zero,
    Integer,
    FractionStart,
    Fraction,
    ExponentStart,
    ExponentSign,
    Exponent,
}

/// The incremental check of the value at the front of the buffer: it resumes where the last
/// call stopped, so each byte is looked at once.
#[derive(Debug, Default)]
struct Scanner {
    /// Bytes of the value checked so far.
    at: usize,
    /// Open containers, innermost last (`[` or `{`).
    open: Vec<u8>,
    state: State,
    /// Where the string or number being read starts.
    token: usize,
}

impl Scanner {
    /// Goes on through `window` (the buffer from the message's first byte): the value's end,
    /// the first byte that cannot belong to it, or `None` when all of it is a valid start.
    fn scan(&mut self, window: &[u8]) -> Option<Found> {
        while let Some(&byte) = window.get(self.at) {
            let i = self.at;
            let wrong = Some(Found::Error(i + 1));
            match self.state {
                State::Str { key, escape } => {
                    if let Some(found) = self.string(window, key, escape) {
                        return Some(found);
                    }
                    continue;
                }
                State::Number(number) => {
                    let next = match (number, byte) {
                        (Number::Minus, b'0') => Some(Number::Zero),
                        (Number::Minus, b'1'..=b'9') | (Number::Integer, b'0'..=b'9') => {
                            Some(Number::Integer)
                        }
                        (Number::Zero | Number::Integer, b'.') => Some(Number::FractionStart),
                        (Number::FractionStart | Number::Fraction, b'0'..=b'9') => {
                            Some(Number::Fraction)
                        }
                        (Number::Zero | Number::Integer | Number::Fraction, b'e' | b'E') => {
                            Some(Number::ExponentStart)
                        }
                        (Number::ExponentStart, b'+' | b'-') => Some(Number::ExponentSign),
                        (
                            Number::ExponentStart | Number::ExponentSign | Number::Exponent,
                            b'0'..=b'9',
                        ) => Some(Number::Exponent),
                        // A digit after a leading zero, or no digit where one must be.
                        (Number::Zero, b'0'..=b'9')
                        | (
                            Number::Minus
                            | Number::FractionStart
                            | Number::ExponentStart
                            | Number::ExponentSign,
                            _,
                        ) => return wrong,
                        // The number ended before this byte.
                        _ => None,
                    };
                    if let Some(next) = next {
                        self.state = State::Number(next);
                    } else {
                        let token = &window[self.token..i];
                        let in_range = token.len() <= SAFE_NUMBER_BYTES
                            && !token.iter().any(|&b| b == b'e' || b == b'E');
                        if !in_range && serde_json::from_slice::<Value>(token).is_err() {
                            // Out of f64's range: serde_json's error, at the number's end.
                            return Some(Found::Error(i));
                        }
                        // This byte is read again, after the value.
                        self.after_value(false);
                        continue;
                    }
                }
                State::Literal { word, matched } => {
                    if byte != word[usize::from(matched)] {
                        return wrong;
                    }
                    self.at += 1;
                    if usize::from(matched) + 1 == word.len() {
                        self.after_value(false);
                    } else {
                        self.state = State::Literal {
                            word,
                            matched: matched + 1,
                        };
                    }
                    continue;
                }
                State::End => {
                    // serde_json's rule for what may follow a number or literal in a stream.
                    return if is_whitespace(byte) || b"\"[]{},:".contains(&byte) {
                        Some(Found::Value(i))
                    } else {
                        wrong
                    };
                }
                _ if is_whitespace(byte) => {}
                State::Value | State::FirstElement => {
                    if byte == b']' && self.state == State::FirstElement {
                        if let Some(found) = self.close() {
                            return Some(found);
                        }
                        continue;
                    }
                    match byte {
                        b'[' | b'{' => {
                            if self.open.len() >= MAX_DEPTH {
                                return wrong;
                            }
                            self.open.push(byte);
                            self.state = if byte == b'[' {
                                State::FirstElement
                            } else {
                                State::FirstKey
                            };
                        }
                        b'"' => {
                            self.token = i + 1;
                            self.state = State::Str {
                                key: false,
                                escape: Escape::None,
                            };
                        }
                        b'-' | b'0'..=b'9' => {
                            self.token = i;
                            self.state = State::Number(match byte {
                                b'-' => Number::Minus,
                                b'0' => Number::Zero,
                                _ => Number::Integer,
                            });
                        }
                        b't' | b'f' | b'n' => {
                            let word: &'static [u8] = match byte {
                                b't' => b"true",
                                b'f' => b"false",
                                _ => b"null",
                            };
                            self.state = State::Literal { word, matched: 1 };
                        }
                        _ => return wrong,
                    }
                }
                State::FirstKey | State::Key => match byte {
                    b'}' if self.state == State::FirstKey => {
                        if let Some(found) = self.close() {
                            return Some(found);
                        }
                        continue;
                    }
                    b'"' => {
                        self.token = i + 1;
                        self.state = State::Str {
                            key: true,
                            escape: Escape::None,
                        };
                    }
                    _ => return wrong,
                },
                State::Colon => match byte {
                    b':' => self.state = State::Value,
                    _ => return wrong,
                },
                State::Next => {
                    let inner = self.open.last().copied();
                    match (inner, byte) {
                        (Some(b'['), b',') => self.state = State::Value,
                        (Some(b'{'), b',') => self.state = State::Key,
                        (Some(b'['), b']') | (Some(b'{'), b'}') => {
                            if let Some(found) = self.close() {
                                return Some(found);
                            }
                            continue;
                        }
                        _ => return wrong,
                    }
                }
            }
            self.at += 1;
        }
        None
    }

    /// Reads string bytes from `self.at` (the string's state is `key`, `escape`); returns
    /// what was found, or `None` to go on (at the string's end, or the window's).
    fn string(&mut self, window: &[u8], key: bool, mut escape: Escape) -> Option<Found> {
        while let Some(&byte) = window.get(self.at) {
            let i = self.at;
            self.at += 1;
            escape = match escape {
                Escape::None => match byte {
                    b'"' => {
                        // serde_json checks the string's UTF-8 at its end (escapes are ASCII).
                        if std::str::from_utf8(&window[self.token..i]).is_err() {
                            return Some(Found::Error(i + 1));
                        }
                        if key {
                            self.state = State::Colon;
                            return None;
                        }
                        return self.after_value(true);
                    }
                    b'\\' => Escape::Backslash,
                    0..=0x1f => return Some(Found::Error(i + 1)),
                    _ => Escape::None,
                },
                Escape::Backslash => match byte {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Escape::None,
                    b'u' => Escape::Hex {
                        digits: 0,
                        value: 0,
                        valid: true,
                        low: false,
                    },
                    _ => return Some(Found::Error(i + 1)),
                },
                Escape::Hex {
                    digits,
                    value,
                    valid,
                    low,
                } => {
                    let digit = (byte as char).to_digit(16);
                    let value = (value << 4) | digit.unwrap_or(0) as u16;
                    let valid = valid && digit.is_some();
                    if digits < 3 {
                        Escape::Hex {
                            digits: digits + 1,
                            value,
                            valid,
                            low,
                        }
                    } else if !valid {
                        return Some(Found::Error(i + 1));
                    } else if low {
                        if !(0xDC00..=0xDFFF).contains(&value) {
                            return Some(Found::Error(i + 1));
                        }
                        Escape::None
                    } else {
                        match value {
                            0xDC00..=0xDFFF => return Some(Found::Error(i + 1)),
                            0xD800..=0xDBFF => Escape::HighSurrogate,
                            _ => Escape::None,
                        }
                    }
                }
                Escape::HighSurrogate => match byte {
                    b'\\' => Escape::HighSurrogateBackslash,
                    _ => return Some(Found::Error(i + 1)),
                },
                Escape::HighSurrogateBackslash => match byte {
                    b'u' => Escape::Hex {
                        digits: 0,
                        value: 0,
                        valid: true,
                        low: true,
                    },
                    _ => return Some(Found::Error(i + 1)),
                },
            };
            self.state = State::Str { key, escape };
        }
        None
    }

    /// Closes the innermost container at `self.at`.
    fn close(&mut self) -> Option<Found> {
        self.open.pop();
        self.at += 1;
        self.after_value(true)
    }

    /// A value ended at `self.at`: what comes next. A top-level string or container
    /// (`delimited`) is the message; a top-level number or literal waits for the byte after
    /// it (`17` may go on as `170`, `true` as `truex`).
    fn after_value(&mut self, delimited: bool) -> Option<Found> {
        if !self.open.is_empty() {
            self.state = State::Next;
            None
        } else if delimited {
            Some(Found::Value(self.at))
        } else {
            self.state = State::End;
            None
        }
    }
}

fn classify(value: Value) -> Incoming {
    let invalid = |id: Value, why: &str| Incoming::Invalid {
        id,
        error: RpcError::new(codes::INVALID_REQUEST, format!("Invalid request: {why}")),
    };
    let Value::Object(mut object) = value else {
        let why = if value.is_array() {
            "batches are not supported"
        } else {
            "not an object"
        };
        return invalid(Value::Null, why);
    };
    let id = match object.remove("id") {
        None => None,
        Some(id @ (Value::Number(_) | Value::String(_) | Value::Null)) => Some(id),
        Some(_) => return invalid(Value::Null, "id must be a number, a string or null"),
    };
    let reply_id = id.clone().unwrap_or(Value::Null);
    if object.get("jsonrpc") != Some(&Value::String("2.0".into())) {
        return invalid(reply_id, "jsonrpc must be \"2.0\"");
    }
    let method = match object.remove("method") {
        Some(Value::String(method)) => method,
        _ => return invalid(reply_id, "method must be a string"),
    };
    let params = object.remove("params");
    if params
        .as_ref()
        .is_some_and(|p| !p.is_object() && !p.is_array())
    {
        return invalid(reply_id, "params must be an object or an array");
    }
    Incoming::Request(Request { id, method, params })
}

/// The response to request `id` with `result`, as bytes.
pub fn response(id: &Value, result: Value) -> Vec<u8> {
    let mut out = serde_json::to_vec(&json!({"jsonrpc": "2.0", "id": id, "result": result}))
        .unwrap_or_default();
    out.push(b'\n');
    out
}

/// The error response to request `id`, as bytes.
pub fn error_response(id: &Value, error: &RpcError) -> Vec<u8> {
    let mut object = Map::new();
    object.insert("jsonrpc".into(), "2.0".into());
    object.insert("id".into(), id.clone());
    object.insert(
        "error".into(),
        json!({"code": error.code, "message": error.message}),
    );
    let mut out = serde_json::to_vec(&Value::Object(object)).unwrap_or_default();
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(decoder: &mut RpcDecoder) -> Vec<Incoming> {
        std::iter::from_fn(|| decoder.next_message()).collect()
    }

    #[test]
    fn back_to_back_requests_split_anywhere_decode_the_same() {
        let stream = br#"{"jsonrpc":"2.0","method":"a","id":1}
 {"jsonrpc": "2.0", "method": "b", "params": {"x": [1, "}"]}, "id": "two"}{"jsonrpc":"2.0","method":"c"}"#;
        let mut whole = RpcDecoder::new();
        whole.input(stream);
        let expected = all(&mut whole);
        assert_eq!(expected.len(), 3);
        assert_eq!(
            expected[2],
            Incoming::Request(Request {
                id: None,
                method: "c".into(),
                params: None
            })
        );
        for split in 0..stream.len() {
            let mut decoder = RpcDecoder::new();
            decoder.input(&stream[..split]);
            let mut got = all(&mut decoder);
            decoder.input(&stream[split..]);
            got.extend(all(&mut decoder));
            assert_eq!(got, expected, "split at {split}");
        }
    }

    #[test]
    fn bad_input_gets_spdks_errors() {
        let code = |bytes: &[u8]| {
            let mut decoder = RpcDecoder::new();
            decoder.input(bytes);
            match decoder.next_message() {
                Some(Incoming::Invalid { error, .. } | Incoming::Fatal(error)) => error.code,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(code(b"{nope"), codes::PARSE_ERROR);
        assert_eq!(
            code(b"[{\"jsonrpc\":\"2.0\",\"method\":\"a\",\"id\":1}]"),
            codes::INVALID_REQUEST
        );
        assert_eq!(code(b"42 "), codes::INVALID_REQUEST);
        assert_eq!(code(b"{\"method\":\"a\",\"id\":1}"), codes::INVALID_REQUEST);
        assert_eq!(
            code(b"{\"jsonrpc\":\"2.0\",\"method\":7,\"id\":1}"),
            codes::INVALID_REQUEST
        );
        assert_eq!(
            code(b"{\"jsonrpc\":\"2.0\",\"method\":\"a\",\"params\":3,\"id\":1}"),
            codes::INVALID_REQUEST
        );
        let mut decoder = RpcDecoder::new();
        decoder.input(b"{\"jsonrpc\":\"2.0\",\"method\":\"");
        decoder.input(&vec![b'a'; MAX_REQUEST_BYTES]);
        assert!(matches!(decoder.next_message(), Some(Incoming::Fatal(_))));
        assert!(decoder.is_broken());
        assert_eq!(decoder.next_message(), None);
    }

    #[test]
    fn responses_are_json_rpc_objects() {
        let ok: Value = serde_json::from_slice(&response(&json!(3), json!(true))).unwrap();
        assert_eq!(ok, json!({"jsonrpc": "2.0", "id": 3, "result": true}));
        let err: Value = serde_json::from_slice(&error_response(
            &Value::Null,
            &RpcError::new(-17, "File exists"),
        ))
        .unwrap();
        assert_eq!(
            err,
            json!({"jsonrpc": "2.0", "id": null, "error": {"code": -17, "message": "File exists"}})
        );
    }

    /// The messages of `stream` fed whole, after checking that every cut into two pieces,
    /// and one byte at a time, gives the same.
    fn decode_any_split(stream: &[u8]) -> Vec<Incoming> {
        let mut whole = RpcDecoder::new();
        whole.input(stream);
        let expected = all(&mut whole);
        for split in 0..stream.len() {
            let mut decoder = RpcDecoder::new();
            decoder.input(&stream[..split]);
            let mut got = all(&mut decoder);
            decoder.input(&stream[split..]);
            got.extend(all(&mut decoder));
            assert_eq!(got, expected, "{stream:?} cut at {split}");
        }
        let mut decoder = RpcDecoder::new();
        let mut got = Vec::new();
        for byte in stream {
            decoder.input(std::slice::from_ref(byte));
            got.extend(all(&mut decoder));
        }
        assert_eq!(got, expected, "{stream:?} a byte at a time");
        expected
    }

    fn serde_error(bytes: &[u8]) -> String {
        match serde_json::Deserializer::from_slice(bytes)
            .into_iter::<Value>()
            .next()
        {
            Some(Err(err)) => format!("Parse error: {err}"),
            other => panic!("{bytes:?} is {other:?} for serde_json"),
        }
    }

    #[test]
    fn top_level_numbers_and_literals_end_at_the_byte_after_them() {
        // These were decoded as soon as the buffer ended after them, so how the stream was
        // cut changed the answer: "12" cut after "1" gave two -32600s, "truex" cut after
        // "true" a -32600 then a parse error, "1e400" cut after "1e40" a -32600 for 1e40.
        let invalid = |stream: &[u8]| {
            decode_any_split(stream)
                .iter()
                .map(|m| match m {
                    Incoming::Invalid { error, .. } => error.code,
                    Incoming::Fatal(error) => error.code,
                    Incoming::Request(r) => panic!("{r:?}"),
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(invalid(b"12"), Vec::<i32>::new());
        assert_eq!(invalid(b"12 "), vec![codes::INVALID_REQUEST]);
        assert_eq!(invalid(b"-0.5e3{"), vec![codes::INVALID_REQUEST]);
        assert_eq!(invalid(b"true"), Vec::<i32>::new());
        assert_eq!(invalid(b"true\nnull[]"), vec![codes::INVALID_REQUEST; 3]);
        assert_eq!(invalid(b"truex"), vec![codes::PARSE_ERROR]);
        assert_eq!(invalid(b"12x"), vec![codes::PARSE_ERROR]);
        assert_eq!(invalid(b"1e40"), Vec::<i32>::new());
        assert_eq!(invalid(b"1e400 "), vec![codes::PARSE_ERROR]);
        // 400 digits are out of f64's range alone, not with the exponent that follows.
        let mut long = vec![b'1'; 400];
        assert_eq!(invalid(&long), Vec::<i32>::new());
        long.extend_from_slice(b"e-300 ");
        assert_eq!(invalid(&long), vec![codes::INVALID_REQUEST]);
        let mut in_request = br#"{"jsonrpc":"2.0","method":"a","params":["#.to_vec();
        in_request.extend_from_slice(&long);
        in_request.extend_from_slice(b"]}");
        assert!(matches!(
            &decode_any_split(&in_request)[..],
            [Incoming::Request(Request { params: Some(Value::Array(p)), .. })] if p[0].as_f64() == Some(1.111111111111111e99)
        ));
    }

    #[test]
    fn parse_errors_are_serde_jsons() {
        for bad in [
            &b"{nope"[..],
            b"]",
            b"[1,]",
            b"{\"a\":1,}",
            b"{\"a\" 1",
            b"{1:2}",
            b"[1:2]",
            b"[1 2]",
            b"{\"a\":}",
            b"{\"a\":1 \"b\"",
            b"-x",
            b"[-x",
            b"[1.x",
            b"[1ex",
            b"[1e+x",
            b"[01",
            b"[-01",
            b"[00",
            b"[.5",
            b"[+1",
            b"tx",
            b"[nulL",
            b"12x",
            b"truex",
            b"[1e400]",
            b"{\"a\":1e999999999999999999999}",
            b"\"\\uDC00\"",
            b"\"\\uD800\\u0041\"",
            b"\"\\uD800x\"",
            b"\"\\uD800\\n\"",
            b"\"\\uZZZZ\"",
            b"\"\\x\"",
            b"\"a\x01\"",
            b"\"\t\"",
            b"\"\xff\"",
            b"{\"k\xc3\":1}",
            b"\"ab\xc3\xa9\\n\xff\"",
            b"\x0c{}",
            b"\xff",
            b"\n\n  {\"a\":\n[1,\n2,]}",
        ] {
            assert_eq!(
                decode_any_split(bad),
                // Positions count from the message's first byte (whitespace before it is dropped).
                vec![Incoming::Fatal(RpcError::new(
                    codes::PARSE_ERROR,
                    serde_error(&bad[bad.iter().take_while(|&&b| is_whitespace(b)).count()..])
                ))],
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // Valid strings with every escape, surrogate pairs and non-ASCII text.
        let stream = "{\"jsonrpc\":\"2.0\",\"method\":\"\\\"\\\\\\/\\b\\f\\n\\r\\t\\u00e9\\uD83D\\uDE00é😀\",\"id\":[]}";
        assert!(matches!(
            &decode_any_split(stream.as_bytes())[..],
            [Incoming::Invalid {
                id: Value::Null,
                ..
            }]
        ));
        let stream = "{\"jsonrpc\":\"2.0\",\"method\":\"\\\"\\\\\\/\\b\\f\\n\\r\\t\\u00e9\\uD83D\\uDE00é😀\"}";
        assert_eq!(
            decode_any_split(stream.as_bytes()),
            vec![Incoming::Request(Request {
                id: None,
                method: "\"\\/\u{8}\u{c}\n\r\té😀é😀".into(),
                params: None
            })]
        );
    }

    #[test]
    fn a_request_over_the_cap_is_refused_even_in_one_piece() {
        // Only an incomplete request was held to the cap: a longer one that arrived in one
        // read was decoded.
        let request = |len: usize| {
            let mut bytes = br#"{"jsonrpc":"2.0","method":""#.to_vec();
            bytes.resize(len - 2, b'a');
            bytes.extend_from_slice(b"\"}");
            bytes
        };
        for (len, accepted) in [(MAX_REQUEST_BYTES, true), (MAX_REQUEST_BYTES + 1, false)] {
            for pieces in [len, 4096, 1000] {
                let mut decoder = RpcDecoder::new();
                let mut got = Vec::new();
                for piece in request(len).chunks(pieces) {
                    decoder.input(piece);
                    got.extend(all(&mut decoder));
                    assert!(decoder.buffered() <= MAX_REQUEST_BYTES);
                }
                match &got[..] {
                    [Incoming::Request(r)] => assert!(accepted && r.method.len() == len - 29),
                    [Incoming::Fatal(e)] => assert!(!accepted && e.message.contains("larger")),
                    other => panic!("{len} in pieces of {pieces}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn deep_nesting_is_a_parse_error_not_a_stack_overflow() {
        for open in [&b"["[..], b"{\"a\":"] {
            let deep = open.repeat(100_000);
            let mut decoder = RpcDecoder::new();
            decoder.input(&deep);
            let expected = serde_error(&deep);
            assert!(expected.contains("recursion limit"), "{expected}");
            assert_eq!(
                all(&mut decoder),
                vec![Incoming::Fatal(RpcError::new(
                    codes::PARSE_ERROR,
                    &expected
                ))]
            );
            let mut decoder = RpcDecoder::new();
            let mut got = Vec::new();
            for byte in &deep {
                decoder.input(std::slice::from_ref(byte));
                got.extend(all(&mut decoder));
            }
            assert_eq!(
                got,
                vec![Incoming::Fatal(RpcError::new(
                    codes::PARSE_ERROR,
                    &expected
                ))]
            );
        }
        // As deep as serde_json goes is fine.
        let mut deep = br#"{"jsonrpc":"2.0","method":"a","params":"#.to_vec();
        deep.extend_from_slice(&b"[".repeat(MAX_DEPTH - 1));
        deep.extend_from_slice(&b"]".repeat(MAX_DEPTH - 1));
        deep.push(b'}');
        assert!(matches!(
            &decode_any_split(&deep)[..],
            [Incoming::Request(_)]
        ));
        deep.insert(40, b'[');
        deep.insert(deep.len() - 1, b']');
        assert!(matches!(
            &decode_any_split(&deep)[..],
            [Incoming::Fatal(e)] if e.message.contains("recursion limit")
        ));
    }

    #[test]
    fn a_request_sent_in_small_pieces_is_parsed_once() {
        // The buffer was re-parsed from its start on every read: 64 KiB of parameters sent a
        // byte at a time took 78 s (release build), a MiB hours, on the reactor thread.
        let mut request = br#"{"jsonrpc":"2.0","method":"a","params":["#.to_vec();
        while request.len() < MAX_REQUEST_BYTES - 8 {
            request.extend_from_slice(b"1,");
        }
        request.extend_from_slice(b"2]}");
        let started = std::time::Instant::now();
        let mut decoder = RpcDecoder::new();
        let mut got = Vec::new();
        for byte in &request {
            decoder.input(std::slice::from_ref(byte));
            got.extend(all(&mut decoder));
        }
        assert!(matches!(
            &got[..],
            [Incoming::Request(Request { params: Some(Value::Array(p)), .. })] if p.len() == (MAX_REQUEST_BYTES - 8 - 39) / 2 + 1
        ));
        // Many small messages in one read are not moved up one by one either.
        let mut decoder = RpcDecoder::new();
        decoder.input(&b"{\"jsonrpc\":\"2.0\",\"method\":\"a\"}".repeat(30_000));
        assert_eq!(all(&mut decoder).len(), 30_000);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "{:?}",
            started.elapsed()
        );
    }
}
