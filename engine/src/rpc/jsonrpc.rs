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
//! error too.

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

/// The decoder of one connection's byte stream.
#[derive(Debug, Default)]
pub struct RpcDecoder {
    buf: Vec<u8>,
    broken: bool,
}

impl RpcDecoder {
    /// A decoder with nothing buffered.
    pub fn new() -> RpcDecoder {
        RpcDecoder::default()
    }

    /// Bytes buffered (an incomplete request).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Whether a fatal error was returned (no more input is decoded).
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Appends `bytes` from the stream.
    pub fn input(&mut self, bytes: &[u8]) {
        if !self.broken {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// The next complete message, if one is buffered.
    pub fn next_message(&mut self) -> Option<Incoming> {
        if self.broken {
            return None;
        }
        let start = self
            .buf
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .unwrap_or(self.buf.len());
        self.buf.drain(..start);
        if self.buf.is_empty() {
            return None;
        }
        let mut values = serde_json::Deserializer::from_slice(&self.buf).into_iter::<Value>();
        match values.next() {
            Some(Ok(value)) => {
                let consumed = values.byte_offset();
                self.buf.drain(..consumed);
                Some(classify(value))
            }
            Some(Err(err)) if err.is_eof() => {
                if self.buf.len() > MAX_REQUEST_BYTES {
                    self.broken = true;
                    self.buf = Vec::new();
                    return Some(Incoming::Fatal(RpcError::new(
                        codes::PARSE_ERROR,
                        format!("Parse error: request larger than {MAX_REQUEST_BYTES} bytes"),
                    )));
                }
                None
            }
            Some(Err(err)) => {
                self.broken = true;
                self.buf = Vec::new();
                Some(Incoming::Fatal(RpcError::new(
                    codes::PARSE_ERROR,
                    format!("Parse error: {err}"),
                )))
            }
            None => None,
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
        assert_eq!(code(b"42"), codes::INVALID_REQUEST);
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
}
