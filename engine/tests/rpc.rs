//! Goal: the daemon's JSON-RPC socket answers SPDK's framework methods and Spool's export
//! methods with SPDK's shapes and codes, refuses every kind of bad input with the JSON-RPC
//! error SPDK gives (and goes on serving), and a slow or silent client blocks nobody.
//!
//! Method: a daemon in this process with an RPC socket in a temp dir; calls through the
//! engine's blocking client, bad input as raw bytes on the socket, exports checked with the
//! NBD test client.

mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use spool_blob::{BlobOptions, InitOptions};
use spool_engine::net::ListenAddr;
use spool_engine::rpc::client::call;
use spool_engine::serve::{Daemon, ServeOptions, NAME_XATTR};
use spool_engine::{run_offline, EngineError, StoreOpen};
use spool_reactor::IdleMode;
use support::nbd_client::{pattern, Ask, Client};

const MIB: u64 = 1 << 20;

fn name(text: &str) -> (String, Vec<u8>) {
    let mut value = text.as_bytes().to_vec();
    value.resize(64, 0);
    (NAME_XATTR.to_string(), value)
}

/// A store with `vol0` and `vol1` (thin, 8 MiB each); the daemon exports only `vol0`.
fn start(dir: &Path) -> (Daemon, PathBuf) {
    let image = dir.join("store.img");
    spool_engine::prepare_file(&image, 32 * MIB, |_| {}).unwrap();
    run_offline(
        &image,
        StoreOpen::Init(InitOptions::default()),
        |store, _| async move {
            for volume in ["vol0", "vol1"] {
                store
                    .create_blob(&BlobOptions {
                        num_clusters: 8,
                        thin: true,
                        xattrs: vec![name(volume)],
                        ..Default::default()
                    })
                    .await?;
            }
            Ok::<_, EngineError>(())
        },
    )
    .unwrap();
    let socket = dir.join("rpc.sock");
    let daemon = Daemon::start(&ServeOptions {
        image: Some(image.display().to_string()),
        listen: vec![ListenAddr::Tcp("127.0.0.1:0".parse().unwrap())],
        exports: vec!["vol0".into()],
        idle: IdleMode::Adaptive,
        pin: false,
        shutdown_grace: Duration::from_millis(100),
        rpc: Some(socket.clone()),
        ..ServeOptions::default()
    })
    .unwrap();
    (daemon, socket)
}

fn rpc(socket: &Path, method: &str, params: Value) -> Result<Value, (i32, String)> {
    let params = (!params.is_null()).then_some(params);
    call(socket, method, params, Duration::from_secs(20))
        .expect("the daemon answers")
        .map_err(|err| (err.code, err.message))
}

/// Sends `bytes` raw and reads one JSON response (or the close).
fn raw(socket: &Path, bytes: &[u8]) -> (Option<Value>, UnixStream) {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream.write_all(bytes).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(Ok(value)) = serde_json::Deserializer::from_slice(&got)
            .into_iter::<Value>()
            .next()
        {
            return (Some(value), stream);
        }
        match read_some(&mut stream, &mut buf) {
            Ok(0) | Err(_) => return (None, stream),
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// One `read`, retried when interrupted: a thread that ran an io_uring (the store set-up
/// here) can see EINTR from a socket read with a timeout when the kernel queues it ring work.
fn read_some(stream: &mut UnixStream, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match stream.read(buf) {
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

fn code(response: &Option<Value>) -> i64 {
    response.as_ref().expect("a response")["error"]["code"]
        .as_i64()
        .expect("an error code")
}

#[test]
fn framework_methods_answer_in_spdks_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, socket) = start(dir.path());
    let version = rpc(&socket, "spdk_get_version", Value::Null).unwrap();
    assert!(version["version"].as_str().unwrap().starts_with("Spool v"));
    assert!(version["fields"]["major"].is_u64());
    let methods = rpc(&socket, "rpc_get_methods", json!({"current": true})).unwrap();
    let methods: Vec<&str> = methods
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    for expected in [
        "spdk_get_version",
        "bdev_get_bdevs",
        "nbd_start_export",
        "spdk_kill_instance",
    ] {
        assert!(methods.contains(&expected), "{expected} listed");
    }
    // Every listed method exists (none answers "Method not found").
    for method in &methods {
        if *method == "spdk_kill_instance" {
            continue;
        }
        if let Err((code, message)) = rpc(&socket, method, Value::Null) {
            assert_ne!(code, -32601, "{method}: {message}");
        }
    }
    let reactors = rpc(&socket, "framework_get_reactors", Value::Null).unwrap();
    assert_eq!(reactors["reactors"].as_array().unwrap().len(), 1);
    assert_eq!(reactors["pid"], std::process::id());
    let bdevs = rpc(&socket, "bdev_get_bdevs", Value::Null).unwrap();
    let names: Vec<&str> = bdevs
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["vol0", "vol1"]);
    assert_eq!(bdevs[0]["block_size"], 4096);
    assert_eq!(bdevs[0]["num_blocks"], 8 * MIB / 4096);
    assert_eq!(bdevs[0]["driver_specific"]["lvol"]["thin_provision"], true);
    assert_eq!(
        rpc(&socket, "bdev_get_bdevs", json!({"name": "nope"}))
            .unwrap_err()
            .0,
        -libc::ENODEV
    );
    daemon.stop().unwrap();
}

#[test]
fn exports_start_and_stop_while_serving_and_iostat_counts_them() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, socket) = start(dir.path());
    let at = daemon.listening()[0].clone();
    let exports = rpc(&socket, "nbd_get_exports", Value::Null).unwrap();
    assert_eq!(exports.as_array().unwrap().len(), 1);
    assert!(Client::try_connect(&at, "vol1", Ask::default()).is_err());
    let started = rpc(&socket, "nbd_start_export", json!({"bdev_name": "vol1"})).unwrap();
    assert_eq!(started, "vol1");
    // Already exported, unknown volume, missing or wrongly-typed parameters.
    assert_eq!(
        rpc(&socket, "nbd_start_export", json!({"bdev_name": "vol1"}))
            .unwrap_err()
            .0,
        -libc::EEXIST
    );
    assert_eq!(
        rpc(&socket, "nbd_start_export", json!({"bdev_name": "nope"}))
            .unwrap_err()
            .0,
        -libc::ENOENT
    );
    assert_eq!(
        rpc(&socket, "nbd_start_export", json!({})).unwrap_err().0,
        -32602
    );
    assert_eq!(
        rpc(&socket, "nbd_start_export", json!({"bdev_name": 7}))
            .unwrap_err()
            .0,
        -32602
    );
    assert_eq!(
        rpc(
            &socket,
            "nbd_start_export",
            json!({"bdev_name": "vol1", "x": 1})
        )
        .unwrap_err()
        .0,
        -32602
    );
    let mut client = Client::connect(&at, "vol1", Ask::default());
    assert_eq!(client.write(MIB, &pattern(3, 65536), 0), 0);
    assert_eq!(client.read(MIB, 65536).unwrap(), pattern(3, 65536));
    let listed = rpc(&socket, "nbd_get_exports", json!({"export_name": "vol1"})).unwrap();
    assert_eq!(listed[0]["connections"], 1);
    // A connected export cannot be stopped.
    assert_eq!(
        rpc(&socket, "nbd_stop_export", json!({"export_name": "vol1"}))
            .unwrap_err()
            .0,
        -libc::EBUSY
    );
    let stats = rpc(&socket, "bdev_get_iostat", json!({"name": "vol1"})).unwrap();
    let vol1 = &stats["bdevs"][0];
    assert_eq!(vol1["num_write_ops"], 1);
    assert_eq!(vol1["bytes_written"], 65536);
    assert_eq!(vol1["num_read_ops"], 1);
    assert_eq!(vol1["bytes_read"], 65536);
    assert!(vol1["read_latency_ticks"].as_u64().unwrap() > 0);
    // SPDK's newer client (`spdk-rpc bdev_get_iostat --names vol1,vol0`) sends `names`: the
    // volumes in that order; both `name` and `names` is -EINVAL, an unknown one -ENODEV.
    let listed = rpc(
        &socket,
        "bdev_get_iostat",
        json!({"names": ["vol1", "vol0"]}),
    )
    .unwrap();
    let listed = listed["bdevs"].as_array().unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0]["name"], vol1["name"]);
    assert_eq!(listed[0]["bytes_written"], 65536);
    assert_eq!(listed[1]["name"], "vol0");
    assert_eq!(listed[1]["num_write_ops"], 0);
    assert_eq!(
        rpc(&socket, "bdev_get_iostat", json!({"names": []})).unwrap()["bdevs"],
        json!([])
    );
    assert_eq!(
        rpc(
            &socket,
            "bdev_get_iostat",
            json!({"name": "vol1", "names": ["vol1"]})
        )
        .unwrap_err()
        .0,
        -libc::EINVAL
    );
    assert_eq!(
        rpc(
            &socket,
            "bdev_get_iostat",
            json!({"names": ["vol1", "nope"]})
        )
        .unwrap_err()
        .0,
        -libc::ENODEV
    );
    client.disconnect();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while rpc(&socket, "nbd_stop_export", json!({"export_name": "vol1"})).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the export stops once its client left"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(Client::try_connect(&at, "vol1", Ask::default()).is_err());
    assert_eq!(
        rpc(&socket, "nbd_stop_export", json!({"export_name": "vol1"}))
            .unwrap_err()
            .0,
        -libc::ENOENT
    );
    assert_eq!(
        rpc(&socket, "nbd_get_exports", json!({"export_name": "vol1"}))
            .unwrap_err()
            .0,
        -libc::ENOENT
    );
    // Exported again, the data is there.
    rpc(
        &socket,
        "nbd_start_export",
        json!({"bdev_name": "vol1", "export_name": "again"}),
    )
    .unwrap();
    let mut client = Client::connect(&at, "again", Ask::default());
    assert_eq!(client.read(MIB, 65536).unwrap(), pattern(3, 65536));
    client.disconnect();
    daemon.stop().unwrap();
}

#[test]
fn bad_input_gets_spdks_json_rpc_errors_and_the_server_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, socket) = start(dir.path());
    // A silent client and one stuck in the middle of a request block nobody.
    let _silent = UnixStream::connect(&socket).unwrap();
    let mut half = UnixStream::connect(&socket).unwrap();
    half.write_all(b"{\"jsonrpc\":\"2.0\",\"method\":\"spdk_get")
        .unwrap();
    // Not JSON: -32700, then the connection closes.
    let (response, mut stream) = raw(&socket, b"{this is not json}");
    assert_eq!(code(&response), -32700);
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    assert!(rest.is_empty(), "closed after a parse error");
    // A batch, a non-object, a missing method, a bad jsonrpc version: -32600. (A top-level
    // number ends at the byte after it: `17` alone could still become `170`.)
    for bad in [
        &br#"[{"jsonrpc":"2.0","method":"spdk_get_version","id":1}]"#[..],
        b"17\n",
        br#"{"jsonrpc":"2.0","id":1}"#,
        br#"{"jsonrpc":"1.0","method":"spdk_get_version","id":1}"#,
    ] {
        let (response, _) = raw(&socket, bad);
        assert_eq!(code(&response), -32600, "{}", String::from_utf8_lossy(bad));
    }
    // Unknown method: -32601, with the request's id.
    let (response, _) = raw(&socket, br#"{"jsonrpc":"2.0","method":"no_such","id":"x"}"#);
    assert_eq!(code(&response), -32601);
    assert_eq!(response.unwrap()["id"], "x");
    // Wrong parameters: -32602.
    let (response, _) = raw(
        &socket,
        br#"{"jsonrpc":"2.0","method":"spdk_kill_instance","params":{"sig_name":5},"id":2}"#,
    );
    assert_eq!(code(&response), -32602);
    // Several requests in one write are answered in order; a notification is not answered.
    let mut stream = UnixStream::connect(&socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream
        .write_all(br#"{"jsonrpc":"2.0","method":"spdk_get_version"} {"jsonrpc":"2.0","method":"spdk_get_version","id":1}{"jsonrpc":"2.0","method":"rpc_get_methods","id":2}"#)
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    let mut answers: Vec<Value> = Vec::new();
    while answers.len() < 2 {
        let n = read_some(&mut stream, &mut buf).unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
        answers = serde_json::Deserializer::from_slice(&got)
            .into_iter::<Value>()
            .filter_map(Result::ok)
            .collect();
    }
    assert_eq!(answers[0]["id"], 1);
    assert_eq!(answers[1]["id"], 2);
    // An over-long request: a parse error and a close, nothing else harmed.
    let mut huge = b"{\"jsonrpc\":\"2.0\",\"method\":\"".to_vec();
    huge.extend(std::iter::repeat_n(b'a', (1 << 20) + 10));
    let (response, _) = raw(&socket, &huge);
    assert_eq!(code(&response), -32700);
    // Still serving.
    assert!(rpc(&socket, "spdk_get_version", Value::Null).is_ok());
    drop(half);
    daemon.stop().unwrap();
}

#[test]
fn spdk_kill_instance_stops_the_daemon_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, socket) = start(dir.path());
    assert_eq!(
        rpc(
            &socket,
            "spdk_kill_instance",
            json!({"sig_name": "SIGUSR1"})
        )
        .unwrap_err()
        .0,
        -32602
    );
    // The stop request is process-wide (as a signal is): checked, not acted on, here; the
    // daemon's CLI loop stops on it (tools/tests cover the exit).
    assert_eq!(
        rpc(
            &socket,
            "spdk_kill_instance",
            json!({"sig_name": "SIGTERM"})
        )
        .unwrap(),
        true
    );
    assert!(spool_engine::signals::stop_requested().is_some());
    daemon.stop().unwrap();
}
