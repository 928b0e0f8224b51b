//! A blocking JSON-RPC client for the command line (`spool rpc`) and tests: one request on
//! the daemon's Unix socket, one response.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use super::jsonrpc::{codes, RpcError};
use crate::EngineError;

/// What a call gave back: the result, or the server's error object.
pub type CallResult = Result<Value, RpcError>;

/// Sends `method` with `params` to the daemon at `socket` and waits (up to `timeout`) for
/// its answer. `Err` is a transport failure; the server's error is inside the `Ok`.
pub fn call(
    socket: &Path,
    method: &str,
    params: Option<Value>,
    timeout: Duration,
) -> Result<CallResult, EngineError> {
    let io = |what: &str, err: std::io::Error| EngineError::File {
        path: socket.display().to_string(),
        reason: format!("{what}: {err}"),
        errno: -err.raw_os_error().unwrap_or(libc::EIO),
    };
    let mut stream = UnixStream::connect(socket).map_err(|err| io("connect", err))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|err| io("set timeout", err))?;
    let mut request = json!({"jsonrpc": "2.0", "method": method, "id": 1});
    if let Some(params) = params {
        request["params"] = params;
    }
    let bytes = serde_json::to_vec(&request)
        .map_err(|err| EngineError::InvalidArgument(format!("request: {err}")))?;
    stream.write_all(&bytes).map_err(|err| io("send", err))?;
    let mut received = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = stream.read(&mut buf).map_err(|err| io("receive", err))?;
        if n == 0 {
            return Err(io(
                "receive",
                std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed before answering"),
            ));
        }
        received.extend_from_slice(&buf[..n]);
        match serde_json::Deserializer::from_slice(&received)
            .into_iter::<Value>()
            .next()
        {
            Some(Ok(response)) => return Ok(answer(&response)),
            Some(Err(err)) if err.is_eof() => continue,
            Some(Err(err)) => {
                return Ok(Err(RpcError::new(
                    codes::PARSE_ERROR,
                    format!("the server's answer is not JSON: {err}"),
                )))
            }
            None => continue,
        }
    }
}

/// The result or error a response object carries.
fn answer(response: &Value) -> CallResult {
    match response.get("error") {
        Some(error) => Err(RpcError::new(
            i32::try_from(error["code"].as_i64().unwrap_or(0)).unwrap_or(0),
            error["message"].as_str().unwrap_or("").to_string(),
        )),
        None => Ok(response.get("result").cloned().unwrap_or(Value::Null)),
    }
}
