//! Goal: the daemon serves volumes over NBD as the protocol and the issue say (data, FUA,
//! FLUSH, TRIM, WRITE_ZEROES with its flags, block status, read-only snapshots, pipelined
//! requests, unaligned requests from clients that did not agree to block sizes), survives
//! every kind of bad input with the reply the protocol names or a closed connection for that
//! client only, keeps its bounds (connections, handshake time), and stops cleanly with the
//! store left clean and every acknowledged write readable after a restart.
//!
//! Method: a daemon in this process on a store image made offline, driven by a small client
//! written from the protocol document (tests/support/nbd_client.rs). For each bad input a
//! *bystander* client connects first and writes a pattern; after the bad input it must read
//! its pattern back and write again, on the same connection.

mod support;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use spool_blob::{BlobOptions, InitOptions, LoadOptions};
use spool_engine::nbd::wire::{
    command_flags as cf, state_flags, CommandCode, OptionCode, ReplyType,
};
use spool_engine::net::ListenAddr;
use spool_engine::serve::{Daemon, ServeOptions, NAME_XATTR};
use spool_engine::{run_offline, EngineError, StoreOpen};
use spool_reactor::IdleMode;
use support::nbd_client::{dial, greet, option_reply, pattern, send_option, Ask, Client};

const MIB: u64 = 1 << 20;
const EPERM: u32 = 1;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const EOVERFLOW: u32 = 75;
const ENOTSUP: u32 = 95;
const ESHUTDOWN: u32 = 108;

fn name(text: &str) -> (String, Vec<u8>) {
    let mut value = text.as_bytes().to_vec();
    value.resize(64, 0);
    (NAME_XATTR.to_string(), value)
}

/// A 64 MiB store with `vol0` (thin, 16 MiB), `thick` (4 MiB) and `snap` (a snapshot of a
/// volume whose first cluster holds pattern 0x5a).
fn make_store(dir: &Path) -> PathBuf {
    let path = dir.join("store.img");
    spool_engine::prepare_file(&path, 64 * MIB, |_| {}).unwrap();
    run_offline(
        &path,
        StoreOpen::Init(InitOptions::default()),
        |store, _| async move {
            store
                .create_blob(&BlobOptions {
                    num_clusters: 16,
                    thin: true,
                    xattrs: vec![name("vol0")],
                    ..Default::default()
                })
                .await?;
            store
                .create_blob(&BlobOptions {
                    num_clusters: 4,
                    xattrs: vec![name("thick")],
                    ..Default::default()
                })
                .await?;
            let base = store
                .create_and_open(&BlobOptions {
                    num_clusters: 4,
                    thin: true,
                    xattrs: vec![name("base")],
                    ..Default::default()
                })
                .await?;
            let channel = store.channel()?;
            let mut buf = spool_bdev::DmaBuf::alloc(MIB as usize).unwrap();
            buf.copy_from_slice(&pattern(0x5a, MIB as usize));
            let (written, _) = channel.write(&base.io(), 0, buf).await;
            written?;
            let id = base.id();
            base.close().await?;
            store.create_snapshot(id, &[name("snap")]).await?;
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
        idle: IdleMode::Adaptive,
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

/// Whether the store at `path` is clean, and its blob count, read offline.
fn clean_and_blobs(path: &Path) -> (bool, usize) {
    run_offline(path, StoreOpen::Load(LoadOptions::default()), |store, info| async move {
        Ok::<_, EngineError>((info.clean_at_open, store.blob_ids().len()))
    })
    .unwrap()
}

/// A client that writes its pattern first and checks, at the end, that whatever happened
/// to others in between did not touch its data or its connection.
struct Bystander {
    client: Client,
    offset: u64,
}

impl Bystander {
    fn new(addr: &ListenAddr) -> Bystander {
        let mut client = Client::connect(addr, "vol0", Ask::default());
        let offset = 8 * MIB;
        assert_eq!(client.write(offset, &pattern(0xb1, 64 << 10), 0), 0);
        Bystander { client, offset }
    }

    fn check(mut self) {
        let back = self
            .client
            .read(self.offset, 64 << 10)
            .expect("bystander read");
        assert!(
            back == pattern(0xb1, 64 << 10),
            "the bystander's data changed"
        );
        assert_eq!(
            self.client
                .write(self.offset + MIB, &pattern(0xb2, 4096), cf::FUA),
            0
        );
        assert_eq!(
            self.client.read(self.offset + MIB, 4096).unwrap(),
            pattern(0xb2, 4096)
        );
        self.client.disconnect();
    }
}

#[test]
fn data_round_trips_and_survives_a_clean_restart() {
    let dir = tempfile::tempdir().unwrap();
    let image = make_store(dir.path());
    let daemon = Daemon::start(&options(&image)).unwrap();
    let names: Vec<_> = daemon.exports().iter().map(|e| e.name.clone()).collect();
    assert_eq!(names.len(), 4, "{names:?}");
    for wanted in ["vol0", "thick", "base", "snap"] {
        assert!(names.iter().any(|n| n == wanted), "{names:?}");
    }
    let mut client = Client::connect(&addr(&daemon), "vol0", Ask::default());
    assert_eq!(client.size, 16 * MIB);
    assert_eq!(client.min_block, 4096);
    // Across a cluster boundary, a whole cluster, FUA, and a flush.
    let data = pattern(1, 3 * MIB as usize);
    assert_eq!(client.write(MIB / 2, &data, 0), 0);
    assert_eq!(client.write(5 * MIB, &pattern(2, 4096), cf::FUA), 0);
    assert_eq!(client.flush(), 0);
    assert_eq!(client.read(MIB / 2, 3 * MIB as u32).unwrap(), data);
    assert_eq!(client.read(5 * MIB, 4096).unwrap(), pattern(2, 4096));
    assert_eq!(
        client.read(12 * MIB, 8192).unwrap(),
        vec![0u8; 8192],
        "never written"
    );
    client.disconnect();
    let stopped = daemon.stop().unwrap();
    assert_eq!(stopped.abandoned, 0);
    assert_eq!(clean_and_blobs(&image), (true, 4), "stopped cleanly");
    let daemon = Daemon::start(&options(&image)).unwrap();
    let mut client = Client::connect(&addr(&daemon), "vol0", Ask::default());
    assert_eq!(client.read(MIB / 2, 3 * MIB as u32).unwrap(), data);
    assert_eq!(client.read(5 * MIB, 4096).unwrap(), pattern(2, 4096));
    client.disconnect();
    daemon.stop().unwrap();
}

#[test]
fn a_unix_socket_serves_too_and_is_removed_at_stop() {
    let dir = tempfile::tempdir().unwrap();
    let image = make_store(dir.path());
    let socket = dir.path().join("nbd.sock");
    let mut opts = options(&image);
    opts.listen = vec![ListenAddr::Unix(socket.clone())];
    let daemon = Daemon::start(&opts).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let mut client = Client::connect(&ListenAddr::Unix(socket.clone()), "thick", Ask::default());
    assert_eq!(client.write(0, &pattern(3, 8192), 0), 0);
    assert_eq!(client.read(0, 8192).unwrap(), pattern(3, 8192));
    client.disconnect();
    daemon.stop().unwrap();
    assert!(!socket.exists(), "the socket file is removed");
}

#[test]
fn pipelined_requests_all_complete_with_their_own_replies() {
    let dir = tempfile::tempdir().unwrap();
    let image = make_store(dir.path());
    let daemon = Daemon::start(&options(&image)).unwrap();
    let mut client = Client::connect(&addr(&daemon), "vol0", Ask::default());
    let mut writes = std::collections::HashMap::new();
    for i in 0..96u64 {
        let handle = client.send(
            CommandCode::Write,
            0,
            i * 16384,
            16384,
            &pattern(i as u8, 16384),
        );
        writes.insert(handle, i);
    }
    for _ in 0..96 {
        let reply = client.reply();
        assert_eq!(reply.error, 0);
        assert!(
            writes.remove(&reply.handle).is_some(),
            "one reply per write"
        );
    }
    let mut reads = std::collections::HashMap::new();
    for i in 0..96u64 {
        reads.insert(client.send(CommandCode::Read, 0, i * 16384, 16384, &[]), i);
    }
    for _ in 0..96 {
        let reply = client.reply();
        let i = reads.remove(&reply.handle).expect("a read's handle");
        assert!(reply.data == pattern(i as u8, 16384), "read {i}");
    }
    client.disconnect();
    daemon.stop().unwrap();
}

#[test]
fn block_status_trim_and_write_zeroes_follow_the_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let image = make_store(dir.path());
    let daemon = Daemon::start(&options(&image)).unwrap();
    let mut client = Client::connect(&addr(&daemon), "vol0", Ask::default());
    assert_eq!(client.write(2 * MIB + 4096, &pattern(4, 4096), 0), 0);
    let status = client.call(CommandCode::BlockStatus, 0, 0, (4 * MIB) as u32, &[]);
    assert_eq!(status.error, 0);
    let hole = state_flags::HOLE | state_flags::ZERO;
    let got: Vec<(u32, u32)> = status.extents.iter().map(|e| (e.length, e.flags)).collect();
    assert_eq!(
        got,
        vec![(2 * MIB as u32, hole), (MIB as u32, 0), (MIB as u32, hole)]
    );
    // REQ_ONE: one extent only.
    let one = client.call(
        CommandCode::BlockStatus,
        cf::REQ_ONE,
        0,
        (4 * MIB) as u32,
        &[],
    );
    assert_eq!(one.extents.len(), 1);
    // The snapshot's clone (`base`) shows its parent's cluster as data.
    let mut base = Client::connect(&addr(&daemon), "base", Ask::default());
    let status = base.call(CommandCode::BlockStatus, 0, 0, (2 * MIB) as u32, &[]);
    let got: Vec<(u32, u32)> = status.extents.iter().map(|e| (e.length, e.flags)).collect();
    assert_eq!(got, vec![(MIB as u32, 0), (MIB as u32, hole)]);
    // FAST_ZERO: fine where nothing is stored, ENOTSUP where data would be written.
    let zero = |c: &mut Client, flags, off, len| {
        c.call(CommandCode::WriteZeroes, flags, off, len, &[]).error
    };
    assert_eq!(zero(&mut client, cf::FAST_ZERO, 0, MIB as u32), 0);
    assert_eq!(zero(&mut client, cf::FAST_ZERO, 2 * MIB, 8192), ENOTSUP);
    assert_eq!(
        client.read(2 * MIB + 4096, 4096).unwrap(),
        pattern(4, 4096),
        "untouched"
    );
    // Without it: zeroed; over the parent's data in a clone: zeroed too.
    assert_eq!(zero(&mut client, 0, 2 * MIB, 8192), 0);
    assert_eq!(client.read(2 * MIB, 8192).unwrap(), vec![0u8; 8192]);
    assert_eq!(zero(&mut base, 0, 4096, 4096), 0);
    let back = base.read(0, 12288).unwrap();
    assert_eq!(&back[4096..8192], &[0u8; 4096][..]);
    assert_eq!(&back[..4096], &pattern(0x5a, MIB as usize)[..4096]);
    // NO_HOLE allocates a cluster that had none.
    assert_eq!(zero(&mut client, cf::NO_HOLE, 6 * MIB, 4096), 0);
    let status = client.call(
        CommandCode::BlockStatus,
        cf::REQ_ONE,
        6 * MIB,
        MIB as u32,
        &[],
    );
    assert_eq!(
        (status.extents[0].flags, status.extents[0].length),
        (0, MIB as u32)
    );
    assert_eq!(client.read(6 * MIB, 4096).unwrap(), vec![0u8; 4096]);
    // TRIM is accepted (advisory) and leaves the export readable.
    assert_eq!(
        client
            .call(CommandCode::Trim, 0, 2 * MIB, MIB as u32, &[])
            .error,
        0
    );
    assert!(client.read(2 * MIB, 4096).is_ok());
    assert_eq!(client.call(CommandCode::Cache, 0, 0, 4096, &[]).error, 0);
    client.disconnect();
    base.disconnect();
    daemon.stop().unwrap();
}

#[test]
fn a_snapshot_is_exported_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let image = make_store(dir.path());
    let daemon = Daemon::start(&options(&image)).unwrap();
    let bystander = Bystander::new(&addr(&daemon));
    let mut snap = Client::connect(&addr(&daemon), "snap", Ask::default());
    assert_ne!(snap.flags & 2, 0, "NBD_FLAG_READ_ONLY");
    assert_eq!(snap.read(0, 4096).unwrap(), pattern(0x5a, 4096));
    assert_eq!(snap.write(0, &pattern(9, 4096), 0), EPERM);
    assert_eq!(
        snap.call(CommandCode::WriteZeroes, 0, 0, 4096, &[]).error,
        EPERM
    );
    assert_eq!(snap.call(CommandCode::Trim, 0, 0, 4096, &[]).error, EPERM);
    assert_eq!(
        snap.read(0, 4096).unwrap(),
        pattern(0x5a, 4096),
        "unchanged"
    );
    snap.disconnect();
    bystander.check();
    daemon.stop().unwrap();
}

#[test]
fn bad_requests_get_the_errors_the_protocol_names_and_others_do_not_notice() {
    let dir = tempfile::tempdir().unwrap();
    let image = make_store(dir.path());
    let daemon = Daemon::start(&options(&image)).unwrap();
    let bystander = Bystander::new(&addr(&daemon));
    let mut client = Client::connect(&addr(&daemon), "vol0", Ask::default());
    let size = client.size;
    // Past the end: EINVAL for a read, ENOSPC for a write (its payload is skipped).
    assert_eq!(client.read(size - 4096, 8192), Err(EINVAL));
    assert_eq!(client.write(size, &pattern(5, 4096), 0), ENOSPC);
    // Longer than the maximum payload (32 MiB): EOVERFLOW for a structured read.
    assert_eq!(client.read(0, 33 << 20), Err(EOVERFLOW));
    // Unaligned after agreeing to block sizes.
    assert_eq!(client.read(100, 4096), Err(EINVAL));
    assert_eq!(client.write(4096, &pattern(6, 100), 0), EINVAL);
    // Unknown command and unknown flag.
    assert_eq!(
        client.call(CommandCode::Unknown(42), 0, 0, 0, &[]).error,
        EINVAL
    );
    assert_eq!(
        client.call(CommandCode::Read, 1 << 9, 0, 4096, &[]).error,
        EINVAL
    );
    // A flush with a range.
    assert_eq!(
        client.call(CommandCode::Flush, 0, 4096, 4096, &[]).error,
        EINVAL
    );
    // After all that, the connection still serves.
    assert_eq!(client.write(0, &pattern(7, 4096), 0), 0);
    assert_eq!(client.read(0, 4096).unwrap(), pattern(7, 4096));
    // A bad magic ends this connection only.
    client
        .conn
        .write_all(&[0x12, 0x34, 0x56, 0x78].repeat(7))
        .unwrap();
    assert!(
        client.closed_by_server(),
        "a bad magic closes the connection"
    );
    bystander.check();
    daemon.stop().unwrap();
    assert_eq!(clean_and_blobs(&image), (true, 4));
}

#[test]
fn bad_handshakes_close_or_refuse_that_client_only() {
    let dir = tempfile::tempdir().unwrap();
    let image = make_store(dir.path());
    let mut opts = options(&image);
    opts.handshake_timeout = Duration::from_millis(400);
    let daemon = Daemon::start(&opts).unwrap();
    let at = addr(&daemon);
    let bystander = Bystander::new(&at);
    // Unknown export: GO gets ERR_UNKNOWN and the client may go on; EXPORT_NAME closes.
    let refused = Client::try_connect(&at, "nope", Ask::default()).err();
    assert!(refused.is_some_and(|why| why.contains("ErrUnknown")));
    let refused = Client::try_connect(
        &at,
        "nope",
        Ask {
            export_name: true,
            ..Ask::default()
        },
    );
    assert!(refused.is_err(), "EXPORT_NAME of an unknown export closes");
    // An unknown option: ERR_UNSUP, and the handshake goes on.
    let mut conn = dial(&at);
    greet(&mut conn);
    send_option(&mut conn, OptionCode::Unknown(77), b"xyz");
    assert_eq!(option_reply(&mut conn).0, ReplyType::ErrUnsup);
    send_option(&mut conn, OptionCode::List, &[]);
    let (first, _) = option_reply(&mut conn);
    assert_eq!(first, ReplyType::Server);
    drop(conn);
    // A bad option magic: closed.
    let mut conn = dial(&at);
    greet(&mut conn);
    conn.write_all(&[0xee; 16]).unwrap();
    let mut rest = Vec::new();
    let _ = conn.read_to_end(&mut rest);
    assert!(rest.is_empty(), "closed without a reply");
    // Oldstyle-ish client flags (no FIXED_NEWSTYLE): closed.
    let mut conn = dial(&at);
    let mut greeting = [0u8; 18];
    conn.read_exact(&mut greeting).unwrap();
    conn.write_all(&0u32.to_be_bytes()).unwrap();
    let mut rest = Vec::new();
    let _ = conn.read_to_end(&mut rest);
    assert!(rest.is_empty());
    // Truncated: half the client flags, then gone.
    let mut conn = dial(&at);
    conn.read_exact(&mut greeting).unwrap();
    conn.write_all(&[0, 0]).unwrap();
    drop(conn);
    // Silent: timed out.
    let started = Instant::now();
    let mut conn = dial(&at);
    conn.read_exact(&mut greeting).unwrap();
    let mut rest = Vec::new();
    let _ = conn.read_to_end(&mut rest);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(5),
        "a silent client is closed after the handshake timeout (waited {waited:?})"
    );
    bystander.check();
    daemon.stop().unwrap();
}

#[test]
fn a_client_that_leaves_with_requests_in_flight_harms_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let image = make_store(dir.path());
    let daemon = Daemon::start(&options(&image)).unwrap();
    let bystander = Bystander::new(&addr(&daemon));
    for round in 0..4u8 {
        let mut client = Client::connect(&addr(&daemon), "vol0", Ask::default());
        for i in 0..32u64 {
            client.send(
                CommandCode::Write,
                0,
                (i % 8) * MIB,
                65536,
                &pattern(round, 65536),
            );
            client.send(CommandCode::Read, 0, i * 65536, 65536, &[]);
        }
        // Half a request, then gone.
        client.conn.write_all(&[0x25, 0x60, 0x95]).unwrap();
        drop(client);
    }
    // A write whose payload never comes in full.
    let mut client = Client::connect(&addr(&daemon), "vol0", Ask::default());
    let mut header = Vec::new();
    spool_engine::nbd::wire::RequestHeader {
        flags: 0,
        command: CommandCode::Write.code(),
        handle: 9,
        offset: 0,
        length: 65536,
    }
    .encode(&mut header);
    header.extend_from_slice(&[1u8; 1000]);
    client.conn.write_all(&header).unwrap();
    drop(client);
    let deadline = Instant::now() + Duration::from_secs(10);
    while daemon.open_connections() > 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(daemon.open_connections(), 1, "only the bystander is left");
    bystander.check();
    let stopped = daemon.stop().unwrap();
    assert_eq!(stopped.abandoned, 0);
    assert_eq!(clean_and_blobs(&image), (true, 4));
}

#[test]
fn connections_past_the_maximum_are_closed_at_accept() {
    let dir = tempfile::tempdir().unwrap();
    let image = make_store(dir.path());
    let mut opts = options(&image);
    opts.max_connections = 2;
    let daemon = Daemon::start(&opts).unwrap();
    let at = addr(&daemon);
    let first = Bystander::new(&at);
    let second = Client::connect(&at, "thick", Ask::default());
    let mut third = dial(&at);
    let mut buf = [0u8; 18];
    assert!(
        third.read(&mut buf).map_or(true, |n| n == 0),
        "the third connection gets no greeting"
    );
    second.disconnect();
    let deadline = Instant::now() + Duration::from_secs(5);
    while daemon.open_connections() > 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let fourth = Client::connect(&at, "thick", Ask::default());
    fourth.disconnect();
    first.check();
    let stopped = daemon.stop().unwrap();
    assert!(stopped.refused >= 1);
}

#[test]
fn clients_without_block_size_agreement_may_send_unaligned_requests() {
    let dir = tempfile::tempdir().unwrap();
    let image = make_store(dir.path());
    let daemon = Daemon::start(&options(&image)).unwrap();
    for ask in [
        Ask {
            block_size: false,
            ..Ask::default()
        },
        Ask {
            structured: false,
            base_allocation: false,
            block_size: false,
            export_name: true,
        },
    ] {
        let mut client = Client::connect(&addr(&daemon), "vol0", ask);
        assert_eq!(client.write(0, &pattern(8, 3 * 4096), 0), 0);
        assert_eq!(client.write(100, &pattern(9, 5000), 0), 0);
        let back = client.read(0, 3 * 4096).unwrap();
        let mut expected = pattern(8, 3 * 4096);
        expected[100..5100].copy_from_slice(&pattern(9, 5000));
        assert!(back == expected, "read-modify-write kept the bytes around");
        assert_eq!(client.read(99, 5002).unwrap(), expected[99..5101].to_vec());
        assert_eq!(
            client.call(CommandCode::WriteZeroes, 0, 50, 100, &[]).error,
            0
        );
        expected[50..150].fill(0);
        assert!(client.read(0, 3 * 4096).unwrap() == expected);
        client.disconnect();
    }
    daemon.stop().unwrap();
}

#[test]
fn a_stop_answers_what_is_in_flight_then_refuses_new_requests() {
    let dir = tempfile::tempdir().unwrap();
    let image = make_store(dir.path());
    let mut opts = options(&image);
    opts.shutdown_grace = Duration::from_millis(1500);
    let daemon = Daemon::start(&opts).unwrap();
    let at = addr(&daemon);
    let mut client = Client::connect(&at, "vol0", Ask::default());
    let mut sent = Vec::new();
    for i in 0..64u64 {
        sent.push(client.send(
            CommandCode::Write,
            cf::FUA,
            i * 65536,
            65536,
            &pattern(i as u8, 65536),
        ));
    }
    let stopper = std::thread::spawn(move || daemon.stop());
    // Every write sent before the stop is answered: done, or ESHUTDOWN if it was decoded
    // after the stop began.
    let mut done = Vec::new();
    for _ in 0..sent.len() {
        let reply = client.reply();
        assert!(reply.error == 0 || reply.error == ESHUTDOWN, "{reply:?}");
        if reply.error == 0 {
            done.push(reply.handle);
        }
    }
    // During the grace period, new requests are refused with ESHUTDOWN.
    let late = client.send(CommandCode::Read, 0, 0, 4096, &[]);
    if let Ok(reply) = client.try_reply() {
        assert_eq!((reply.handle, reply.error), (late, ESHUTDOWN));
    }
    let stopped = stopper.join().unwrap().unwrap();
    assert_eq!(stopped.abandoned, 0);
    assert_eq!(clean_and_blobs(&image), (true, 4));
    // Every acknowledged write is there after the restart.
    let daemon = Daemon::start(&options(&image)).unwrap();
    let mut client = Client::connect(&addr(&daemon), "vol0", Ask::default());
    for handle in done {
        let i = sent.iter().position(|&h| h == handle).unwrap() as u64;
        assert!(
            client.read(i * 65536, 65536).unwrap() == pattern(i as u8, 65536),
            "acknowledged write {i}"
        );
    }
    client.disconnect();
    daemon.stop().unwrap();
}

#[test]
fn exports_can_be_chosen_and_unknown_ones_are_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let image = make_store(dir.path());
    let mut opts = options(&image);
    opts.exports = vec!["thick".into(), "snap".into()];
    let daemon = Daemon::start(&opts).unwrap();
    let names: Vec<_> = daemon.exports().iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["thick", "snap"]);
    assert!(Client::try_connect(&addr(&daemon), "vol0", Ask::default()).is_err());
    daemon.stop().unwrap();
    opts.exports = vec!["missing".into()];
    let err = Daemon::start(&opts)
        .err()
        .expect("an unknown export is refused");
    assert_eq!(err.errno(), -libc::ENOENT);
    assert!(err.to_string().contains("missing"), "{err}");
    assert_eq!(
        clean_and_blobs(&image),
        (true, 4),
        "a failed start leaves the store clean"
    );
}

#[test]
fn a_missing_image_is_an_error_and_is_not_created() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.img");
    let mut opts = options(&missing);
    opts.image = Some(missing.display().to_string());
    let err = Daemon::start(&opts).err().expect("missing image");
    assert_eq!(err.errno(), -libc::ENOENT);
    assert!(!missing.exists());
    opts.image = Some("null".into());
    assert_eq!(Daemon::start(&opts).err().unwrap().errno(), -libc::EINVAL);
}

#[test]
fn a_malloc_store_serves_a_fresh_thin_vol0() {
    let mut opts = options(Path::new("unused"));
    opts.image = Some("malloc:64M".into());
    let daemon = Daemon::start(&opts).unwrap();
    assert!(daemon.start_info().created);
    let export = &daemon.exports()[0];
    assert_eq!((export.name.as_str(), export.thin), ("vol0", true));
    let mut client = Client::connect(&addr(&daemon), "vol0", Ask::default());
    assert_eq!(client.write(MIB, &pattern(10, 8192), 0), 0);
    assert_eq!(client.read(MIB, 8192).unwrap(), pattern(10, 8192));
    client.disconnect();
    daemon.stop().unwrap();
}

#[test]
fn connections_spread_over_two_reactors_share_the_volumes() {
    let dir = tempfile::tempdir().unwrap();
    let image = make_store(dir.path());
    let mut opts = options(&image);
    opts.cores = vec![0, 1];
    let daemon = Daemon::start(&opts).unwrap();
    let at = addr(&daemon);
    // Four connections go round the two reactors; each writes thin clusters of its own
    // (first writes: cluster inserts sent to the metadata reactor) and reads the others'.
    let mut clients: Vec<Client> = (0..4)
        .map(|_| Client::connect(&at, "vol0", Ask::default()))
        .collect();
    for (i, client) in clients.iter_mut().enumerate() {
        let offset = i as u64 * 2 * MIB + 4096;
        assert_eq!(client.write(offset, &pattern(20 + i as u8, 65536), 0), 0);
    }
    assert_eq!(clients[3].flush(), 0);
    for client in &mut clients {
        for i in 0..4u64 {
            let back = client.read(i * 2 * MIB + 4096, 65536).unwrap();
            assert!(
                back == pattern(20 + i as u8, 65536),
                "written by client {i}"
            );
        }
    }
    for client in clients {
        client.disconnect();
    }
    daemon.stop().unwrap();
    assert_eq!(clean_and_blobs(&image), (true, 4));
}

/// The SPDK-written image `name` from the shared fixtures, unpacked into `dir`, and its
/// manifest.
fn spdk_fixture(name: &str, dir: &Path) -> (PathBuf, serde_json::Value) {
    // The copies in the repository (fixtures/spdk), as the other crates' tests use them.
    let fixtures = std::env::var_os("SPOOL_FIXTURES_DIR")
        .filter(|dir| !dir.is_empty())
        .map_or_else(
            || Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/spdk"),
            PathBuf::from,
        );
    let gz = std::fs::File::open(fixtures.join(format!("{name}.img.gz"))).expect("fixture");
    let mut image = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut image)
        .unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures.join(format!("{name}.json"))).unwrap())
            .unwrap();
    let path = dir.join(format!("{name}.img"));
    std::fs::write(&path, &image).unwrap();
    (path, manifest)
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn an_lvol_store_spdk_wrote_is_served_volume_by_volume() {
    let dir = tempfile::tempdir().unwrap();
    let (image, manifest) = spdk_fixture("p2-lvs-thin-snap", dir.path());
    let daemon = Daemon::start(&options(&image)).unwrap();
    let mut names: Vec<_> = daemon.exports().iter().map(|e| e.name.clone()).collect();
    names.sort();
    assert_eq!(
        names,
        ["clone0", "lv0", "snap0"],
        "the lvs super blob is not a volume"
    );
    for blob in manifest["blobs"].as_array().unwrap() {
        let id = blob["id"].as_u64().unwrap();
        let Some(export) = daemon.exports().iter().find(|e| e.blob_id == id) else {
            continue;
        };
        let mut client = Client::connect(&addr(&daemon), &export.name, Ask::default());
        assert_eq!(client.size, blob["size_bytes"].as_u64().unwrap());
        assert_eq!(
            client.flags & 2 != 0,
            blob["read_only"].as_bool().unwrap(),
            "{}: read-only as SPDK wrote it",
            export.name
        );
        let mut content = Vec::new();
        for chunk in (0..client.size).step_by(4 << 20) {
            let len = (client.size - chunk).min(4 << 20) as u32;
            content.extend(client.read(chunk, len).unwrap());
        }
        assert_eq!(
            sha256_hex(&content),
            blob["sha256"].as_str().unwrap(),
            "{}: every byte as SPDK's blobcli read it",
            export.name
        );
        client.disconnect();
    }
    daemon.stop().unwrap();
}
