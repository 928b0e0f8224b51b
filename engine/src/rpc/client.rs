//! A blocking JSON-RPC client for the command line (`spool rpc`) and tests: one request on
//! the daemon's Unix socket, one response.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::jsonrpc::{codes, RpcError};
use crate::EngineError;

/// What a call gave back: the result, or the server's error object.
pub type CallResult = Result<Value, RpcError>;

/// How long one wait for the answer lasts before a stop signal is looked at again.
const SIGNAL_CHECK: Duration = Duration::from_millis(100);

/// Sends `method` with `params` to the daemon at `socket` and waits (up to `timeout`) for
/// its answer. `Err` is a transport failure, said in words and naming the socket; the
/// server's error is inside the `Ok`. Stop signals are not looked at (a process may host
/// the daemon it calls, and stop it): see [`call_until_stopped`].
pub fn call(
    socket: &Path,
    method: &str,
    params: Option<Value>,
    timeout: Duration,
) -> Result<CallResult, EngineError> {
    call_inner(socket, method, params, timeout, false)
}

/// Like [`call`], for a command line: a stop signal (SIGINT, SIGTERM, see
/// [`crate::signals`]) while it waits ends the wait with [`EngineError::Stopped`].
pub fn call_until_stopped(
    socket: &Path,
    method: &str,
    params: Option<Value>,
    timeout: Duration,
) -> Result<CallResult, EngineError> {
    call_inner(socket, method, params, timeout, true)
}

fn call_inner(
    socket: &Path,
    method: &str,
    params: Option<Value>,
    timeout: Duration,
    stoppable: bool,
) -> Result<CallResult, EngineError> {
    let failed = |reason: String, errno: i32| EngineError::File {
        path: socket.display().to_string(),
        reason,
        errno,
    };
    let io = |what: &str, err: std::io::Error| {
        failed(
            format!("{what}: {}", crate::words::io_words(&err)),
            -err.raw_os_error().unwrap_or(libc::EIO),
        )
    };
    let mut stream = UnixStream::connect(socket).map_err(|err| {
        // Connecting to a path that is no socket (a file, a directory) is refused too: say
        // what the path is, not that nothing listens on it.
        if err.raw_os_error() == Some(libc::ECONNREFUSED) {
            use std::os::unix::fs::FileTypeExt;
            if let Ok(meta) = std::fs::metadata(socket) {
                if !meta.file_type().is_socket() {
                    let what = if meta.is_dir() { "a directory" } else { "not a socket" };
                    return failed(
                        format!("connect: {what}: give the daemon's JSON-RPC socket (spool serve --rpc PATH; default /var/tmp/spool.sock)"),
                        -libc::ENOTSOCK,
                    );
                }
            }
        }
        let hint = match err.raw_os_error() {
            Some(libc::ENOENT) => {
                " (no daemon's JSON-RPC socket is there: is spool serve running?)"
            }
            _ => "",
        };
        failed(
            format!("connect: {}{hint}", crate::words::io_words(&err)),
            -err.raw_os_error().unwrap_or(libc::EIO),
        )
    })?;
    let mut request = json!({"jsonrpc": "2.0", "method": method, "id": 1});
    if let Some(params) = params {
        request["params"] = params;
    }
    let bytes = serde_json::to_vec(&request)
        .map_err(|err| EngineError::InvalidArgument(format!("request: {err}")))?;
    stream.write_all(&bytes).map_err(|err| io("send", err))?;
    let deadline = Instant::now() + timeout;
    let mut received = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        if let Some(signal) = crate::signals::stop_requested().filter(|_| stoppable) {
            return Err(EngineError::Stopped {
                signal,
                done: format!(
                    "sending {method}; its answer did not come (the daemon may still carry the call out)"
                ),
                report: None,
            });
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(failed(
                format!(
                    "no answer to {method} within {} s (--timeout waits longer)",
                    timeout.as_secs_f64()
                ),
                -libc::ETIMEDOUT,
            ));
        }
        stream
            .set_read_timeout(Some(left.min(SIGNAL_CHECK)))
            .map_err(|err| io("set timeout", err))?;
        let n = match stream.read(&mut buf) {
            Ok(n) => n,
            Err(err)
                if matches!(
                    err.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(err) => return Err(io("receive", err)),
        };
        if n == 0 {
            return Err(failed(
                format!("receive: the daemon closed the connection before answering {method}"),
                -libc::ECONNRESET,
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
