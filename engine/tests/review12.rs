//! Review of issue 12 (`spool serve`): each test here shows one way a client, a management
//! call or a stop breaks a promise of the issue, of docs/nbd.md or of the NBD protocol
//! document. Every test is expected to FAIL on the code it was written against; the
//! explanation of each is in its doc comment.
//!
//! Method: a daemon in this process on a store image made offline, driven by the protocol
//! client of tests/support/nbd_client.rs (and the JSON-RPC client for export changes).
//! Tests take one lock so that the memory measurement of one does not see another's.

mod support;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use spool_blob::{BlobOptions, InitOptions, LoadOptions};
use spool_engine::nbd::wire::{
    command_flags, CommandCode, InfoRequest, InfoType, OptionCode, ReplyType, RequestHeader,
    STRUCTURED_REPLY_MAGIC,
};
use spool_engine::net::ListenAddr;
use spool_engine::serve::{Daemon, ServeOptions, NAME_XATTR};
use spool_engine::{run_offline, EngineError, StoreOpen};
use spool_reactor::IdleMode;
use support::nbd_client::{dial, greet, option_reply, pattern, send_option, Ask, Client};

const MIB: u64 = 1 << 20;

/// One test at a time (the memory test measures the whole process).
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn name(text: &str) -> (String, Vec<u8>) {
    let mut value = text.as_bytes().to_vec();
    value.resize(64, 0);
    (NAME_XATTR.to_string(), value)
}

/// A 64 MiB store (1 MiB clusters, 4 KiB io_unit) with thin `vol0` (16 MiB), `vol1` and
/// `vol2` (8 MiB each).
fn make_store(dir: &Path) -> PathBuf {
    let path = dir.join("store.img");
    spool_engine::prepare_file(&path, 64 * MIB, |_| {}).unwrap();
    run_offline(
        &path,
        StoreOpen::Init(InitOptions::default()),
        |store, _| async move {
            for (volume, clusters) in [("vol0", 16), ("vol1", 8), ("vol2", 8)] {
                store
                    .create_blob(&BlobOptions {
                        num_clusters: clusters,
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
    path
}

fn options(image: &Path) -> ServeOptions {
    ServeOptions {
        image: Some(image.display().to_string()),
        listen: vec![ListenAddr::Tcp("127.0.0.1:0".parse().unwrap())],
        idle: IdleMode::Sleep,
        pin: false,
        handshake_timeout: Duration::from_secs(5),
        shutdown_grace: Duration::from_millis(200),
        drain_timeout: Duration::from_secs(10),
        ..ServeOptions::default()
    }
}

fn addr(daemon: &Daemon) -> ListenAddr {
    daemon.listening()[0].clone()
}

/// Whether the store at `path` is clean, read offline.
fn clean(path: &Path) -> bool {
    run_offline(
        path,
        StoreOpen::Load(LoadOptions::default()),
        |_, info| async move { Ok::<_, EngineError>(info.clean_at_open) },
    )
    .unwrap()
}

/// This process's resident memory, bytes.
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

fn rpc(socket: &Path, method: &str, params: Value) -> Result<Value, (i32, String)> {
    let params = (!params.is_null()).then_some(params);
    spool_engine::rpc::client::call(socket, method, params, Duration::from_secs(20))
        .expect("the daemon answers")
        .map_err(|err| (err.code, err.message))
}

/// The bound docs/nbd.md promises per connection: "128 requests in flight and 64 MiB of
/// request buffers ... at either, the reader stops reading the socket until requests
/// finish"; connection.rs: "a client that sends faster than it reads replies is slowed, not
/// buffered for"; the issue: "Memory per connection is bounded".
///
/// It does not hold for replies: a request counts out of `inflight` as soon as its reply is
/// *queued* (`Conn::complete`), and only READ data stays counted in `held_bytes` until it is
/// sent. Every other reply (rejections with their message, WRITE, FLUSH, TRIM, and
/// BLOCK_STATUS, up to 65536 extents = 512 KiB for a 28-byte request) goes into the
/// unbounded `Conn::out` queue while the writer waits for a client that does not read. Here,
/// on a Unix socket (whose kernel buffers hold only ~200 KiB each way), a client sends 300k
/// requests the daemon refuses (READ past the end, 8 MiB in all) and reads no reply: a
/// bounded daemon stops reading after 128 unsent replies and the client's send blocks
/// (timeout); this daemon reads all 8 MiB and keeps ~300k error replies (~25 MiB, and up to
/// 512 KiB each for block status) in memory for that one connection. Fix: keep a request
/// counted in flight, and its reply's bytes in `held_bytes`, until the writer has sent the
/// reply, so the reader stops at the cap.
#[test]
fn replies_a_client_never_reads_are_not_buffered_without_bound() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let image = make_store(dir.path());
    let mut opts = options(&image);
    let socket = dir.path().join("nbd.sock");
    opts.listen = vec![ListenAddr::Unix(socket.clone())];
    let daemon = Daemon::start(&opts).unwrap();
    let mut client = Client::connect(&ListenAddr::Unix(socket), "vol0", Ask::default());
    let size = client.size;
    const REQUESTS: u64 = 300_000;
    let mut batch = Vec::with_capacity(REQUESTS as usize * RequestHeader::LEN);
    for handle in 0..REQUESTS {
        RequestHeader {
            flags: 0,
            command: CommandCode::Read.code(),
            handle: 1000 + handle,
            offset: size,
            length: 4096,
        }
        .encode(&mut batch);
    }
    if let support::nbd_client::Conn::Unix(stream) = &client.conn {
        stream
            .set_write_timeout(Some(Duration::from_secs(10)))
            .unwrap();
    }
    let before = rss_bytes();
    let started = Instant::now();
    let mut sent = 0;
    for piece in batch.chunks(64 << 10) {
        if client.conn.write_all(piece).is_err() {
            break;
        }
        sent += piece.len();
    }
    let took = started.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let grown = rss_bytes().saturating_sub(before);
    drop(client);
    let stopped = daemon.stop().unwrap();
    assert_eq!(stopped.abandoned, 0);
    let requests = sent / RequestHeader::LEN;
    assert!(
        requests < 30_000,
        "the daemon read {requests} requests ({} KiB, in {took:?}) from a client that read \
         no reply, on a socket whose kernel buffers hold ~200 KiB: their replies are queued \
         in the daemon (the process grew by {} MiB) instead of the reader stopping at 128 \
         unanswered requests",
        sent >> 10,
        grown / MIB
    );
}

/// docs/nbd.md: clients that did not agree to block sizes may send unaligned requests, and
/// "the connection must serve them cleanly (read-modify-write) or fail them with EINVAL
/// without corrupting data (MUST)".
///
/// Two concurrent writes to *different* 512-byte sectors of one 4 KiB io_unit (what a
/// client with 512-byte sectors, such as the kernel's nbd driver or any client that skips
/// NBD_INFO_BLOCK_SIZE, sends all the time) are each served as read-modify-write of the
/// whole io_unit (`VolumeIo::read_modify_write`) with no lock: both read the old unit, both
/// write it back with only their own sector changed, and the second write puts the first
/// one's sector back to the old data. Both writes were acknowledged; one is lost. The code
/// comment and the docs call this "may lose one", but the writes do not overlap, so the
/// protocol gives the server no licence to lose either (and an aligned write racing an RMW
/// of its unit is lost the same way, against "aligned writes never do"). Fix: serialise
/// read-modify-writes per io_unit (a per-volume range lock taken by RMW and by aligned
/// writes to the same units), or refuse unaligned requests with EINVAL.
#[test]
fn concurrent_unaligned_writes_to_one_io_unit_both_land() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let image = make_store(dir.path());
    let daemon = Daemon::start(&options(&image)).unwrap();
    let mut client = Client::connect(
        &addr(&daemon),
        "vol0",
        Ask {
            block_size: false,
            ..Ask::default()
        },
    );
    const UNITS: u64 = 64;
    // Allocate and fill the units first (aligned), so only the RMW is in play.
    let base = pattern(0x11, (UNITS * 4096) as usize);
    assert_eq!(client.write(0, &base, 0), 0);
    // Per unit: sector 0 and sector 4 written at the same time (pipelined).
    for unit in 0..UNITS {
        let at = unit * 4096;
        client.send(
            CommandCode::Write,
            0,
            at,
            512,
            &[0xa0 | (unit as u8 & 0xf); 512],
        );
        client.send(
            CommandCode::Write,
            0,
            at + 2048,
            512,
            &[0xb0 | (unit as u8 & 0xf); 512],
        );
    }
    for _ in 0..2 * UNITS {
        assert_eq!(client.reply().error, 0, "both writes are acknowledged");
    }
    let back = client.read(0, (UNITS * 4096) as u32).unwrap();
    let mut lost = Vec::new();
    for unit in 0..UNITS {
        let at = (unit * 4096) as usize;
        if back[at..at + 512] != [0xa0 | (unit as u8 & 0xf); 512] {
            lost.push((unit, "sector 0"));
        }
        if back[at + 2048..at + 2560] != [0xb0 | (unit as u8 & 0xf); 512] {
            lost.push((unit, "sector 4"));
        }
    }
    client.disconnect();
    daemon.stop().unwrap();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged, non-overlapping unaligned writes were lost: {:?}",
        lost.len(),
        2 * UNITS,
        &lost[..lost.len().min(8)]
    );
}

/// The protocol (doc/proto.md, structured replies): "if structured replies are negotiated,
/// the server ... MUST NOT use a simple reply for NBD_CMD_READ".
///
/// A zero-length READ (valid: docs/nbd.md says zero-length READ/WRITE/TRIM "are valid")
/// passes the decoder; `VolumeIo::read` returns `Done::Ok` for `len == 0` and `execute`
/// answers it with `ReplyEncoder::ok`, a simple reply, even though the connection
/// negotiated structured replies. libnbd treats that as a protocol error. Fix: answer a
/// zero-length READ with `read_header` (which already emits a NONE chunk for length 0) or
/// `done_chunk`.
#[test]
fn a_zero_length_read_gets_a_structured_reply_when_negotiated() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let image = make_store(dir.path());
    let daemon = Daemon::start(&options(&image)).unwrap();
    let mut client = Client::connect(&addr(&daemon), "vol0", Ask::default());
    assert!(client.structured);
    client.send(CommandCode::Read, 0, 4096, 0, &[]);
    let mut magic = [0u8; 4];
    client.conn.read_exact(&mut magic).unwrap();
    let magic = u32::from_be_bytes(magic);
    drop(client);
    daemon.stop().unwrap();
    assert_eq!(
        magic, STRUCTURED_REPLY_MAGIC,
        "a READ answered with a simple reply ({magic:#x}) after structured replies were agreed"
    );
}

/// docs/nbd.md: "Zero-length READ/WRITE/TRIM are valid (the document says not to
/// disconnect)"; the decoder accepts a zero-length WRITE as a valid request.
///
/// But the reader dispatches it with no payload buffer (`payload_len() == 0`), and
/// `execute::run` answers `Command::Write` without a payload with EINVAL ("write without a
/// payload"), logging a warning. A valid no-op write fails. Fix: treat a zero-length WRITE
/// as a successful no-op (as the READ path does), honouring FUA with a flush.
#[test]
fn a_zero_length_write_succeeds() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let image = make_store(dir.path());
    let daemon = Daemon::start(&options(&image)).unwrap();
    let mut client = Client::connect(&addr(&daemon), "vol0", Ask::default());
    let error = client.write(4096, &[], 0);
    client.disconnect();
    daemon.stop().unwrap();
    assert_eq!(error, 0, "a zero-length write is valid and should succeed");
}

/// `nbd_stop_export` promises -EBUSY "while clients are connected" and then closes the
/// export's blob (`volumes::close_held`).
///
/// The check reads `Volume::connections`, which a connection increments only once its
/// handshake is done; a handshake works on the export set it took when the client
/// connected (`handshake()` clones `state.exports()` once). So a client that connected
/// before the stop and sends NBD_OPT_GO after it is let in to the export that was just
/// removed, and serves I/O on a blob that has been closed (its thin writes then fail:
/// every I/O it sends fails with EIO, "blob ... is not open"), while `nbd_get_exports` no
/// longer lists the export it uses. Fix: look the export up in the *current*
/// set when GO/EXPORT_NAME completes (refusing with ERR_UNKNOWN if it is gone), and count
/// the client in atomically with that look-up (e.g. on the metadata reactor, or with a
/// per-volume "removed" flag checked after the increment).
#[test]
fn an_export_stopped_during_a_handshake_does_not_let_that_client_in() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let image = make_store(dir.path());
    let socket = dir.path().join("rpc.sock");
    let mut opts = options(&image);
    opts.rpc = Some(socket.clone());
    let daemon = Daemon::start(&opts).unwrap();
    // The client connects and is in its handshake...
    let mut conn = dial(&addr(&daemon));
    greet(&mut conn);
    // ...when the export is stopped: no client counts as connected, so it succeeds.
    assert_eq!(
        rpc(&socket, "nbd_stop_export", json!({"export_name": "vol1"})),
        Ok(json!(true))
    );
    let listed = rpc(&socket, "nbd_get_exports", Value::Null).unwrap();
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["export_name"] != "vol1"),
        "{listed}"
    );
    // Now the client asks for it.
    let mut data = Vec::new();
    InfoRequest {
        name: "vol1".into(),
        requests: vec![InfoType::BlockSize.code()],
    }
    .encode(&mut data);
    send_option(&mut conn, OptionCode::Go, &data);
    let answer = loop {
        let (reply, _) = option_reply(&mut conn);
        if reply != ReplyType::Info {
            break reply;
        }
    };
    let mut outcome = format!("GO answered {answer:?}");
    if answer == ReplyType::Ack {
        // It is in: what does a write to a thin cluster do on the closed blob?
        let mut out = Vec::new();
        RequestHeader {
            flags: 0,
            command: CommandCode::Write.code(),
            handle: 7,
            offset: MIB,
            length: 4096,
        }
        .encode(&mut out);
        out.extend_from_slice(&pattern(3, 4096));
        conn.write_all(&out).unwrap();
        // No structured replies were asked for: a 16-byte simple reply.
        let mut head = [0u8; 16];
        if conn.read_exact(&mut head).is_ok() {
            let error = u32::from_be_bytes(head[4..8].try_into().unwrap());
            outcome.push_str(&format!(
                ", then served I/O on the closed blob: a thin write got error {error}"
            ));
        }
    }
    drop(conn);
    daemon.stop().unwrap();
    assert_eq!(
        answer,
        ReplyType::ErrUnknown,
        "a client entered an export nbd_stop_export had removed and closed ({outcome})"
    );
}

/// docs/nbd.md, stopping: "each connection finishes and answers what it has started,
/// answers new requests with ESHUTDOWN, and closes once idle (after a 1 s grace ...)"; the
/// connection module: a write whose payload has not arrived has not started ("Dropped
/// before it is started ... it counts itself out").
///
/// But a WRITE is counted in `inflight` by `admit()` as soon as its header is decoded, and
/// the stop's closer waits for `conn.idle()` (inflight == 0) before its grace period. A
/// client that sends a WRITE header and part of the payload, then nothing, is never idle:
/// the connection never closes, and `Daemon::stop` (SIGTERM) waits the whole drain timeout
/// (30 s by default) and then reports the connection abandoned and unloads under it. Any
/// client can delay every shutdown this way. Fix: let the closer treat a connection whose
/// only in-flight work is a payload being received as idle (count Receiving writes apart
/// from started requests), so the grace period applies and dropping the reader abandons
/// the half-received write as designed.
#[test]
fn a_stop_is_not_held_up_by_a_client_stalled_mid_payload() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let image = make_store(dir.path());
    let mut opts = options(&image);
    opts.drain_timeout = Duration::from_secs(6);
    let daemon = Daemon::start(&opts).unwrap();
    let mut client = Client::connect(&addr(&daemon), "vol0", Ask::default());
    let mut out = Vec::new();
    RequestHeader {
        flags: 0,
        command: CommandCode::Write.code(),
        handle: 9,
        offset: 0,
        length: 65536,
    }
    .encode(&mut out);
    out.extend_from_slice(&[1u8; 1000]);
    client.conn.write_all(&out).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let stopped = daemon.stop().unwrap();
    let took = started.elapsed();
    drop(client);
    let clean = clean(&image);
    assert!(
        stopped.abandoned == 0 && took < Duration::from_secs(3) && clean,
        "stop took {took:?} (grace 200 ms, drain timeout 6 s) because one client stalled \
         mid-payload: {} connection(s) abandoned, store clean: {clean}",
        stopped.abandoned
    );
}

/// docs/nbd.md: after a stop each connection "closes once idle (after a 1 s grace)"; the
/// protocol: "On a server shutdown, the server SHOULD wait for inflight requests to be
/// serviced prior to initiating a hard disconnect".
///
/// Requests of a client that does not read its replies are serviced (their replies are
/// queued), but the connection then waits for its writer, which waits for socket room
/// forever: nothing bounds `write_all_vectored` after a stop, so the connection never
/// closes and `Daemon::stop` waits the full drain timeout (30 s by default) and reports it
/// abandoned. Fix: once stopping and past the grace period, give the writer a deadline (or
/// shut the socket down), so a client that does not read is hard-disconnected.
#[test]
fn a_stop_is_not_held_up_by_a_client_that_never_reads_replies() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let image = make_store(dir.path());
    let mut opts = options(&image);
    opts.drain_timeout = Duration::from_secs(6);
    let daemon = Daemon::start(&opts).unwrap();
    let mut client = Client::connect(&addr(&daemon), "vol0", Ask::default());
    // 256 reads of 1 MiB (more than the socket buffers hold), none of them read back.
    for i in 0..256u64 {
        client.send(CommandCode::Read, 0, (i % 16) * MIB, MIB as u32, &[]);
    }
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let stopped = daemon.stop().unwrap();
    let took = started.elapsed();
    drop(client);
    let clean = clean(&image);
    assert!(
        stopped.abandoned == 0 && took < Duration::from_secs(3) && clean,
        "stop took {took:?} (grace 200 ms, drain timeout 6 s) because one client does not \
         read its replies: {} connection(s) abandoned, store clean: {clean}",
        stopped.abandoned
    );
}

/// `Listener::bind` for a Unix socket: "A Unix socket path that exists as a socket is
/// replaced (a stale one from a killed daemon)". It never checks whether the socket is
/// *live*: a second `spool serve` given the same `--socket` (or the same JSON-RPC socket,
/// which every `spool serve` binds by default at /var/tmp/spool.sock) unlinks the running
/// daemon's socket and binds its own. The first daemon keeps serving nobody on it, its
/// clients and `spool rpc` calls reach the second daemon's store instead, and whichever
/// stops first removes the path the other one is using (`Listener::drop`). SPDK refuses
/// this (it takes a lock file next to its RPC socket). Fix: before unlinking, try to
/// connect; if something accepts, fail with EADDRINUSE (or hold a `flock` on `PATH.lock`
/// for the socket's lifetime, as SPDK does), and only unlink at drop a socket that is still
/// the one this listener made (same inode).
#[test]
fn a_second_daemon_does_not_take_over_a_live_unix_socket() {
    let _serial = serial();
    let first_dir = tempfile::tempdir().unwrap();
    let second_dir = tempfile::tempdir().unwrap();
    let sockets = tempfile::tempdir().unwrap();
    let nbd = sockets.path().join("nbd.sock");
    let rpc_socket = sockets.path().join("rpc.sock");
    let mut first_options = options(&make_store(first_dir.path()));
    first_options.listen = vec![ListenAddr::Unix(nbd.clone())];
    first_options.rpc = Some(rpc_socket.clone());
    let first = Daemon::start(&first_options).unwrap();
    // The first daemon's volume holds a pattern.
    let mut client = Client::connect(&ListenAddr::Unix(nbd.clone()), "vol0", Ask::default());
    assert_eq!(client.write(0, &pattern(0x42, 4096), command_flags::FUA), 0);
    client.disconnect();
    // A second daemon, another store, the same socket paths.
    let mut second_options = options(&make_store(second_dir.path()));
    second_options.listen = first_options.listen.clone();
    second_options.rpc = Some(rpc_socket.clone());
    let second = Daemon::start(&second_options);
    let second_started = second.is_ok();
    // Whom does a client of the path reach now?
    let mut client = Client::connect(&ListenAddr::Unix(nbd.clone()), "vol0", Ask::default());
    let reached_first = client.read(0, 4096).unwrap() == pattern(0x42, 4096);
    client.disconnect();
    if let Ok(second) = second {
        second.stop().unwrap();
    }
    let socket_left = nbd.exists();
    let rpc_left = rpc_socket.exists();
    first.stop().unwrap();
    assert!(
        !second_started && reached_first && socket_left && rpc_left,
        "a second daemon on the same Unix socket paths started: {second_started}; clients of \
         the path then reach the first daemon: {reached_first}; after the second stopped, \
         the first daemon's NBD socket exists: {socket_left}, its RPC socket: {rpc_left}"
    );
}

/// `nbd_start_export` and `nbd_stop_export` each read the export set (`rpc::nbd::current`),
/// await (opening the blob, resolving the name: `describe_all` opens every blob), then
/// publish a set built from what they read. Each RPC client is its own task on the metadata
/// reactor, so two calls from two clients interleave at those awaits and the second
/// publish overwrites the first: here two concurrent `nbd_start_export` both answer
/// success but only one export appears. The lost one's blob stays open in the held list
/// (`volumes::HELD`), so every later `nbd_start_export` of it fails with -EEXIST "exported
/// already" and `nbd_stop_export` with -ENOENT: the volume cannot be exported again until
/// a restart. (With a stop racing a start the same way, a stopped export whose blob was
/// closed can come back into the set, and its clients get EIO.) Fix: serialise export
/// changes (one async mutex around read-modify-publish on the metadata reactor), or
/// re-read the current set after the awaits and before publishing.
#[test]
fn concurrent_export_changes_are_not_lost() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let image = make_store(dir.path());
    let socket = dir.path().join("rpc.sock");
    let mut opts = options(&image);
    opts.exports = vec!["vol0".into()];
    opts.rpc = Some(socket.clone());
    let daemon = Daemon::start(&opts).unwrap();
    let exported = || -> Vec<String> {
        rpc(&socket, "nbd_get_exports", Value::Null)
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["export_name"].as_str().unwrap().to_string())
            .collect()
    };
    let mut failure = None;
    for round in 0..20 {
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
        let calls: Vec<_> = ["vol1", "vol2"]
            .into_iter()
            .map(|volume| {
                let (socket, barrier) = (socket.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    rpc(&socket, "nbd_start_export", json!({ "bdev_name": volume }))
                })
            })
            .collect();
        let answers: Vec<_> = calls.into_iter().map(|c| c.join().unwrap()).collect();
        assert!(answers.iter().all(Result::is_ok), "{answers:?}");
        let names = exported();
        let missing: Vec<&str> = ["vol1", "vol2"]
            .into_iter()
            .filter(|wanted| !names.iter().any(|name| name == wanted))
            .collect();
        if let Some(lost) = missing.first() {
            let again = rpc(&socket, "nbd_start_export", json!({ "bdev_name": lost }));
            failure = Some(format!(
                "round {round}: both nbd_start_export calls answered {answers:?}, but the \
                 exports are {names:?}; starting {lost} again answers {again:?}"
            ));
            break;
        }
        for volume in ["vol1", "vol2"] {
            rpc(&socket, "nbd_stop_export", json!({ "export_name": volume })).unwrap();
        }
    }
    daemon.stop().unwrap();
    assert!(failure.is_none(), "{}", failure.unwrap_or_default());
}
