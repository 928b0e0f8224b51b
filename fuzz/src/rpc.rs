//! The JSON-RPC target: bytes from a hostile client into the framing decoder of
//! `spool_engine::rpc::jsonrpc` (requests as JSON values back to back on a stream), with
//! seeds made of scripted request streams.
//!
//! Input layout (every byte string is valid; missing knobs read as zero):
//!
//! | target | knobs | payload |
//! |---|---|---|
//! | `rpc_request` | split u8 (chunk size `1 + n * n / 16`: 1 to 4065 bytes), filler u8 (one of [`FILLERS`]), pad offset u16, pad length u32 (bit 31 set: the rest modulo `MAX_REQUEST_BYTES + 8192`, else `n % 4096`, so that most mutants stay small) | the stream, with the filler repeated to the pad length inserted at the pad offset (so that inputs of a few KiB reach the 1 MiB cap: huge strings, 100,000 open brackets) |
//!
//! Beyond "no panic": the same messages however the stream is split; nothing after a fatal
//! error; at most [`MAX_REQUEST_BYTES`] buffered between reads; requests well formed and
//! error codes JSON-RPC's; every message what serde_json's own stream parser makes of the
//! same bytes; the answers (to the first 256 messages of a stream and its last) JSON-RPC 2.0
//! objects that parse back.

use serde_json::{json, Value};
use spool_engine::rpc::jsonrpc::{
    codes, error_response, response, Incoming, Request, RpcDecoder, RpcError, MAX_REQUEST_BYTES,
};

use crate::input::Input;
use crate::targets::class;

/// Bytes of knobs in front of an `rpc_request` input.
pub const RPC_REQUEST_KNOBS: usize = 8;

/// What the pad is made of: the filler knob picks one (modulo the count).
pub const FILLERS: &[&[u8]] = &[
    b"a",
    b" ",
    b"[",
    b"{\"a\":",
    b"1,",
    b"\\n",
    b"\xc3\xa9",
    b"\\uD83D\\uDE00",
    b"\xff",
    b"9",
    b"{}",
    b"\"x\",",
    b"]",
    b"\n",
];

/// Messages of a stream whose answers are checked (and the last one).
const ANSWERS_CHECKED: usize = 256;

/// Longest pad: past the cap by a few KiB.
const PAD_RANGE: u32 = MAX_REQUEST_BYTES as u32 + 8192;
/// The pad length knob's bit for pads up to [`PAD_RANGE`] (else up to 4 KiB).
const BIG_PAD: u32 = 1 << 31;

/// The decoder's message for a request over the cap.
fn too_large() -> String {
    format!("Parse error: request larger than {MAX_REQUEST_BYTES} bytes")
}

/// The stream an input describes, and the chunk size to feed it in.
fn stream_of(data: &[u8]) -> (Vec<u8>, usize) {
    let mut input = Input::new(data);
    let split = usize::from(input.u8());
    let filler = FILLERS[usize::from(input.u8()) % FILLERS.len()];
    let pad_at = usize::from(input.u16());
    let pad_len = match input.u32() {
        n if n & BIG_PAD != 0 => ((n & !BIG_PAD) % PAD_RANGE) as usize,
        n => (n % 4096) as usize,
    };
    let payload = input.rest();
    let at = pad_at.min(payload.len());
    let mut stream = Vec::with_capacity(payload.len() + pad_len);
    stream.extend_from_slice(&payload[..at]);
    while stream.len() < at + pad_len {
        let room = at + pad_len - stream.len();
        stream.extend_from_slice(&filler[..filler.len().min(room)]);
    }
    stream.extend_from_slice(&payload[at..]);
    (stream, 1 + split * split / 16)
}

/// Feeds `stream` in chunks of `chunk` bytes, checking what must hold after every step;
/// returns the messages.
fn drive(stream: &[u8], chunk: usize) -> Vec<Incoming> {
    let mut decoder = RpcDecoder::new();
    let mut seen = Vec::new();
    let mut broken = false;
    for piece in stream.chunks(chunk.max(1)) {
        decoder.input(piece);
        if broken {
            assert_eq!(decoder.buffered(), 0, "input kept after a fatal error");
            assert_eq!(
                decoder.next_message(),
                None,
                "a message after a fatal error"
            );
            continue;
        }
        assert!(
            decoder.buffered() <= MAX_REQUEST_BYTES + piece.len(),
            "{} bytes buffered after a read of {}",
            decoder.buffered(),
            piece.len()
        );
        while let Some(message) = decoder.next_message() {
            if let Incoming::Fatal(_) = message {
                broken = true;
                assert!(decoder.is_broken());
                assert_eq!(decoder.buffered(), 0, "input kept after a fatal error");
                assert_eq!(
                    decoder.next_message(),
                    None,
                    "a message after a fatal error"
                );
                seen.push(message);
                break;
            }
            seen.push(message);
        }
        assert!(
            broken || decoder.buffered() <= MAX_REQUEST_BYTES,
            "{} bytes of an incomplete request buffered",
            decoder.buffered()
        );
        assert!(broken || !decoder.is_broken());
    }
    seen
}

/// What holds for any message by itself.
fn check_message(message: &Incoming) {
    match message {
        Incoming::Request(r) => {
            assert!(
                r.params
                    .as_ref()
                    .is_none_or(|p| p.is_object() || p.is_array()),
                "params {:?}",
                r.params
            );
            assert!(
                r.id.as_ref().is_none_or(is_id),
                "id {:?} in a request",
                r.id
            );
        }
        Incoming::Invalid { id, error } => {
            assert_eq!(error.code, codes::INVALID_REQUEST, "{error:?}");
            assert!(error.message.starts_with("Invalid request: "), "{error:?}");
            assert!(is_id(id), "id {id:?} in an error");
        }
        Incoming::Fatal(error) => {
            assert_eq!(error.code, codes::PARSE_ERROR, "{error:?}");
            assert!(error.message.starts_with("Parse error: "), "{error:?}");
        }
    }
}

/// The answers to a message (a result and an error for a request with an id, the error for
/// the others) parse back to what was encoded.
fn check_answers(message: &Incoming) {
    match message {
        Incoming::Request(Request {
            id: Some(id),
            method,
            params,
        }) => {
            let result = params.clone().unwrap_or(Value::String(method.clone()));
            let answer = reply(&response(id, result.clone()));
            let expected = json!({"jsonrpc": "2.0", "id": id, "result": result});
            assert!(same(&answer, &expected), "response {answer} for {expected}");
            check_error_response(id, &RpcError::new(codes::METHOD_NOT_FOUND, method.clone()));
        }
        Incoming::Request(_) => {}
        Incoming::Invalid { id, error } => check_error_response(id, error),
        Incoming::Fatal(error) => check_error_response(&Value::Null, error),
    }
}

fn is_id(id: &Value) -> bool {
    matches!(id, Value::Number(_) | Value::String(_) | Value::Null)
}

/// An answer's bytes parsed back: one JSON object, newline-terminated, `"jsonrpc": "2.0"`.
fn reply(bytes: &[u8]) -> Value {
    assert_eq!(bytes.last(), Some(&b'\n'), "an answer ends with a newline");
    let value: Value = match serde_json::from_slice(bytes) {
        Ok(value) => value,
        Err(err) => panic!("an answer that is not JSON ({err}): {bytes:?}"),
    };
    assert!(
        value.is_object(),
        "an answer that is not an object: {value}"
    );
    assert_eq!(value["jsonrpc"], "2.0", "{value}");
    value
}

fn check_error_response(id: &Value, error: &RpcError) {
    let answer = reply(&error_response(id, error));
    let expected = json!({"jsonrpc": "2.0", "id": id, "error": {"code": error.code, "message": error.message}});
    assert!(
        same(&answer, &expected),
        "error response {answer} for {expected}"
    );
}

/// `a == b`, but for floats one unit in the last place apart: serde_json parses floats to
/// the nearest or a neighbour (its `float_roundtrip` feature is off), so a float written
/// exactly may read back as the next one.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x != y => match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) if x.is_finite() && y.is_finite() => {
                x.to_bits().abs_diff(y.to_bits()) <= 1 && x.signum() == y.signum()
            }
            _ => false,
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y)
                    .all(|((kx, vx), (ky, vy))| kx == ky && same(vx, vy))
        }
        _ => a == b,
    }
}

/// Whether `value` is a request SPDK runs (an independent statement of the rules).
fn is_request(value: &Value) -> bool {
    let Some(object) = value.as_object() else {
        return false;
    };
    object.get("jsonrpc") == Some(&json!("2.0"))
        && object.get("method").is_some_and(Value::is_string)
        && object.get("id").is_none_or(is_id)
        && object
            .get("params")
            .is_none_or(|p| p.is_object() || p.is_array())
}

/// What serde_json's stream parser makes of one message.
#[derive(Debug)]
enum Serde {
    /// A value of `len` bytes (`delimited`: an object, array or string, which end by
    /// themselves).
    Value {
        value: Value,
        len: usize,
        delimited: bool,
    },
    /// An error at byte offset `at` (as serde_json counts it) of the message.
    Error {
        message: String,
        eof: bool,
        at: usize,
    },
}

/// serde_json's stream parser on the message at the start of `rest`; `None` when empty.
fn serde_first(rest: &[u8]) -> Option<Serde> {
    let mut values = serde_json::Deserializer::from_slice(rest).into_iter::<Value>();
    match values.next()? {
        Ok(value) => Some(Serde::Value {
            value,
            len: values.byte_offset(),
            delimited: matches!(rest[0], b'{' | b'[' | b'"'),
        }),
        Err(err) => {
            // serde_json's line and column back to an offset (columns count bytes).
            let line_start = if err.line() <= 1 {
                0
            } else {
                rest.iter()
                    .enumerate()
                    .filter(|&(_, &b)| b == b'\n')
                    .nth(err.line() - 2)
                    .map_or(rest.len(), |(i, _)| i + 1)
            };
            Some(Serde::Error {
                message: format!("Parse error: {err}"),
                eof: err.is_eof(),
                at: line_start + err.column(),
            })
        }
    }
}

/// `stream` parsed by serde_json alone, message by message as the decoder frames it
/// (whitespace between messages skipped, positions from each message's first byte); each
/// message with the bytes from its start to the stream's end. Stops at the first error.
fn serde_messages(stream: &[u8]) -> Vec<(Serde, &[u8])> {
    let mut messages = Vec::new();
    let mut at = 0;
    loop {
        at += stream[at..]
            .iter()
            .take_while(|&&b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
            .count();
        let rest = &stream[at..];
        match serde_first(rest) {
            None => return messages,
            Some(Serde::Value {
                value,
                len,
                delimited,
            }) => {
                messages.push((
                    Serde::Value {
                        value,
                        len,
                        delimited,
                    },
                    rest,
                ));
                at += len;
            }
            Some(error) => {
                messages.push((error, rest));
                return messages;
            }
        }
    }
}

/// Whether what serde_json makes of a message that runs to the end of `rest` could change
/// with more bytes (so the decoder must wait): an incomplete value; a number or literal at
/// the very end (`17` may go on as `170`, `true` as `truex`); a number out of range so far,
/// running to the end (more digits or an exponent may follow: the decoder checks the range
/// once the number ends).
fn undecided(serde: &Serde, rest: &[u8]) -> bool {
    match serde {
        Serde::Error { eof: true, .. } => true,
        Serde::Value {
            len,
            delimited: false,
            ..
        } => *len == rest.len(),
        Serde::Error { message, at, .. } => {
            message.contains("number out of range")
                && *at <= rest.len()
                && rest[at.saturating_sub(1)..].iter().all(u8::is_ascii_digit)
        }
        Serde::Value { .. } => false,
    }
}

/// The decoder's messages (the stream fed whole) against serde_json's.
fn check_against_serde(decoded: &[Incoming], stream: &[u8]) {
    let expected = serde_messages(stream);
    for (i, message) in decoded.iter().enumerate() {
        let Some((serde, rest)) = expected.get(i) else {
            panic!("message {i} ({message:?}): serde_json finds no more");
        };
        match (message, serde) {
            (Incoming::Fatal(error), _) if error.message == too_large() => {
                // Nothing within the cap ends the message for serde_json either.
                assert!(
                    rest.len() > MAX_REQUEST_BYTES,
                    "{} bytes too large",
                    rest.len()
                );
                let window = &rest[..MAX_REQUEST_BYTES];
                let within = serde_first(window);
                assert!(
                    within.as_ref().is_some_and(|w| undecided(w, window)),
                    "too large, where serde_json finds {within:?} in the first {MAX_REQUEST_BYTES} bytes (and {serde:?} in all)"
                );
            }
            (Incoming::Fatal(error), Serde::Error { message, .. }) => {
                assert_eq!(
                    &error.message, message,
                    "message {i}: not serde_json's error"
                );
            }
            (Incoming::Request(r), Serde::Value { value, .. }) => {
                assert!(is_request(value), "{value} decoded as a request");
                let Request { id, method, params } = r;
                assert_eq!(value.get("id"), id.as_ref(), "the request's id");
                assert_eq!(value.get("method"), Some(&json!(method)));
                assert_eq!(value.get("params"), params.as_ref(), "the request's params");
            }
            (Incoming::Invalid { id, .. }, Serde::Value { value, .. }) => {
                assert!(!is_request(value), "{value} refused");
                let reply_id = value
                    .get("id")
                    .filter(|id| is_id(id))
                    .cloned()
                    .unwrap_or(Value::Null);
                assert_eq!(id, &reply_id, "the id of the error answer to {value}");
            }
            _ => panic!("message {i}: decoded {message:?}, serde_json: {serde:?}"),
        }
        if let Serde::Value { len, .. } = serde {
            assert!(
                !matches!(message, Incoming::Request(_) | Incoming::Invalid { .. })
                    || *len <= MAX_REQUEST_BYTES,
                "message {i}: {len} bytes decoded, over the cap"
            );
        }
    }
    if decoded
        .last()
        .is_some_and(|m| matches!(m, Incoming::Fatal(_)))
    {
        return;
    }
    // What serde_json finds past the decoded messages: only what more bytes could change.
    match expected.get(decoded.len()..).unwrap_or_default() {
        [] => {}
        [(serde, rest)] if undecided(serde, rest) => {}
        more => panic!(
            "serde_json finds more after {} messages: {more:?}",
            decoded.len()
        ),
    }
}

/// The decoder on a stream, whole and in chunks; the answers encoded and parsed back.
pub fn target_rpc_request(data: &[u8]) {
    let _ = rpc_request(data);
}

/// [`target_rpc_request`], returning the outcome class.
pub fn rpc_request(data: &[u8]) -> String {
    let (stream, chunk) = stream_of(data);
    let whole = drive(&stream, stream.len());
    let pieces = drive(&stream, chunk);
    assert_eq!(whole, pieces, "messages depend on how the input is split");
    for (i, message) in whole.iter().enumerate() {
        check_message(message);
        // Answers cost more than decoding: those to the first messages and the last (a
        // stream of 500,000 `{}` is 500,000 identical answers).
        if i < ANSWERS_CHECKED || i + 1 == whole.len() {
            check_answers(message);
        }
    }
    check_against_serde(&whole, &stream);
    let kind = |value: Option<&Value>| match value {
        None => "none",
        Some(Value::Null) => "null",
        Some(Value::Bool(_)) => "bool",
        Some(Value::Number(_)) => "number",
        Some(Value::String(_)) => "string",
        Some(Value::Array(_)) => "array",
        Some(Value::Object(_)) => "object",
    };
    let mut labels: Vec<String> = Vec::new();
    for message in &whole {
        let label = match message {
            Incoming::Request(r) => format!(
                "request id={} params={}",
                kind(r.id.as_ref()),
                kind(r.params.as_ref())
            ),
            Incoming::Invalid { error, .. } => class("invalid", &error.message),
            Incoming::Fatal(error) => class("fatal", &error.message),
        };
        // The first three kinds of message, in order: enough feedback to tell streams apart
        // without a class for every combination.
        if !labels.contains(&label) && labels.len() < 3 {
            labels.push(label);
        }
    }
    if whole.is_empty() {
        labels.push("nothing".into());
    }
    labels.join(", ")
}

// ---------------------------------------------------------------------------------------------
// seeds
// ---------------------------------------------------------------------------------------------

/// One seed: knobs (split, filler index, pad offset, pad length), then the payload.
fn seed(split: u8, filler: u8, pad_at: u16, pad_len: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![split, filler];
    out.extend_from_slice(&pad_at.to_le_bytes());
    let pad_len = if pad_len < 4096 {
        pad_len
    } else {
        pad_len | BIG_PAD
    };
    out.extend_from_slice(&pad_len.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

fn filler(bytes: &[u8]) -> u8 {
    FILLERS.iter().position(|f| *f == bytes).unwrap_or(0) as u8
}

/// Seeds for `rpc_request`: scripted request streams, valid and not, and streams padded to
/// the cap and past it.
pub fn request_seeds() -> Vec<Vec<u8>> {
    let streams: &[&[u8]] = &[
        // Valid requests: with and without id (a notification), params object and array,
        // whitespace between, none at all.
        br#"{"jsonrpc":"2.0","method":"spdk_get_version","id":1}"#,
        br#"{"jsonrpc":"2.0","method":"bdev_get_bdevs","params":{"name":"Malloc0"},"id":"a"} {"jsonrpc":"2.0","method":"framework_wait_init"}"#,
        b"{\"jsonrpc\": \"2.0\", \"method\": \"bdev_get_iostat\", \"params\": [1, 2.5, -3e2, true, null], \"id\": null}\n\t\r {\"id\":7,\"method\":\"nbd_get_disks\",\"jsonrpc\":\"2.0\"}{\"jsonrpc\":\"2.0\",\"method\":\"x\",\"params\":{}}",
        br#"{"jsonrpc":"2.0","method":"\u00e9\ud83d\ude00\n\"","params":{"a":{"b":[[],{}]}},"id":18446744073709551615}"#,
        // A batch, which SPDK does not do.
        br#"[{"jsonrpc":"2.0","method":"spdk_get_version","id":1},{"jsonrpc":"2.0","method":"rpc_get_methods","id":2}]"#,
        // Non-objects, and objects that are no request.
        b"42 \"str\" true null [] -0.5e3 {}",
        br#"{"jsonrpc":"1.0","method":"a","id":1}{"method":"a"}{"jsonrpc":"2.0","method":7,"id":"x"}{"jsonrpc":"2.0","method":"a","params":3,"id":[1]}{"jsonrpc":"2.0","method":"a","id":{}}"#,
        // Truncated objects.
        br#"{"jsonrpc":"2.0","method":"bdev_get_bdevs","params":{"name":"Mal"#,
        br#"{"jsonrpc":"2.0","method":"a","id":1} {"jsonrpc":"2.0","params":[1,2,"#,
        br#"{"jsonrpc":"2.0","method":"a","id":1"#,
        // Not JSON.
        b"{this is not json}",
        br#"{"jsonrpc":"2.0","method":"a",}"#,
        b"\x0c{}",
        // Numbers: out of range, leading zeros, long mantissas with an exponent.
        b"[1e400] 1e999999999999999999999 ",
        b"{\"jsonrpc\":\"2.0\",\"method\":\"a\",\"params\":[01]}",
        b"[11111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111e-300]",
        // Invalid UTF-8, in a string and outside; bad escapes and surrogates.
        b"{\"jsonrpc\":\"2.0\",\"method\":\"\xff\xfe\",\"id\":1}",
        b"{\"jsonrpc\":\"2.0\",\"method\":\"a\xc3\",\"id\":1}",
        b"\xef\xbb\xbf{\"jsonrpc\":\"2.0\",\"method\":\"a\"}",
        br#"["\uDC00", "\uD800x", "\u12G4", "\q"]"#,
        b"[\"tab\there\"]",
    ];
    let mut seeds = Vec::new();
    for (i, stream) in streams.iter().enumerate() {
        for split in [5 + i as u8, 255 - i as u8] {
            seeds.push(seed(split, 0, 0, 0, stream));
        }
    }
    // Deep nesting: 100,000 open brackets (serde_json stops at 128), and nested objects.
    seeds.push(seed(40, filler(b"["), 0, 100_000, b""));
    seeds.push(seed(0, filler(b"["), 0, 100_000, b"]"));
    seeds.push(seed(90, filler(b"{\"a\":"), 0, 200_000, b"1}"));
    let head = br#"{"jsonrpc":"2.0","method":"a","params":"#;
    let mut payload = head.to_vec();
    payload.extend_from_slice(b"]}");
    seeds.push(seed(3, filler(b"["), head.len() as u16, 126, &payload));
    // Huge strings: requests of the cap's size, one byte short, one past; a method name,
    // a parameter, escapes and non-ASCII text; and a huge array of numbers.
    let head = br#"{"jsonrpc":"2.0","method":""#;
    let fixed = head.len() as u32 + 2;
    for (len, fill, split) in [
        (MAX_REQUEST_BYTES as u32, b"a".as_slice(), 255u8),
        (MAX_REQUEST_BYTES as u32 - 1, b"a", 200),
        (MAX_REQUEST_BYTES as u32 + 1, b"a", 255),
        (MAX_REQUEST_BYTES as u32, b"\\n", 255),
        (MAX_REQUEST_BYTES as u32 - 2, b"\xc3\xa9", 128),
        (MAX_REQUEST_BYTES as u32 + 4096, b"a", 255),
    ] {
        let mut payload = head.to_vec();
        payload.extend_from_slice(b"\"}");
        seeds.push(seed(
            split,
            filler(fill),
            head.len() as u16,
            len - fixed,
            &payload,
        ));
    }
    let head = br#"{"jsonrpc":"2.0","method":"a","id":1,"params":["#;
    let mut payload = head.to_vec();
    payload.extend_from_slice(b"1]}");
    seeds.push(seed(
        255,
        filler(b"1,"),
        head.len() as u16,
        128 << 10,
        &payload,
    ));
    let head = br#"{"jsonrpc":"2.0","method":"a","params":{"s":""#;
    let mut payload = head.to_vec();
    payload.extend_from_slice(b"\"}}");
    seeds.push(seed(
        255,
        filler(b"\\uD83D\\uDE00"),
        head.len() as u16,
        600_000,
        &payload,
    ));
    // Many small messages, and whitespace, in one read.
    seeds.push(seed(255, filler(b"{}"), 0, 20_000, b""));
    seeds.push(seed(
        255,
        filler(b" "),
        0,
        MAX_REQUEST_BYTES as u32 + 10,
        b"{}",
    ));
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_run_cleanly() {
        let classes: std::collections::BTreeSet<String> =
            request_seeds().iter().map(|s| rpc_request(s)).collect();
        for expected in [
            "request id=number params=none",
            "fatal: Parse error: recursion limit exceeded at line # column #",
            "fatal: Parse error: request larger than # bytes",
        ] {
            assert!(
                classes.iter().any(|c| c.contains(expected)),
                "no seed reaches {expected:?}: {classes:#?}"
            );
        }
        let _ = rpc_request(&[]);
        let _ = rpc_request(&[0xff; 64]);
    }

    #[test]
    fn the_pad_goes_where_the_knobs_say() {
        let (stream, chunk) = stream_of(&seed(8, filler(b"1,"), 1, 5, b"[2]"));
        assert_eq!(stream, b"[1,1,12]");
        assert_eq!(chunk, 5);
        let (stream, chunk) = stream_of(&seed(255, 0, 9, 0, b"{}"));
        assert_eq!(stream, b"{}");
        assert_eq!(chunk, 4065);
    }
}
