//! Goal: the reactor-driven sockets move bytes both ways, over TCP and Unix sockets, with a
//! client and a server on different reactors (and on the same one), large transfers that
//! need many partial reads and writes, several connections at once, and the peer's close
//! seen as end of file. Method: an echo server and clients checking every byte.

use std::sync::mpsc;

use spool_engine::net::{ListenAddr, Listener, Stream};
use spool_reactor::{spawn_local, IdleMode, Runtime, RuntimeOptions};

fn runtime(reactors: usize) -> Runtime {
    Runtime::start(&RuntimeOptions {
        cores: (0..reactors).collect(),
        idle: IdleMode::Adaptive,
        pin: false,
    })
    .unwrap()
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// Starts an echo server on the first reactor listening at `addr`; returns the bound address.
fn echo_server(rt: &Runtime, addr: ListenAddr) -> ListenAddr {
    let (tx, rx) = mpsc::channel();
    let reactor = rt.reactors()[0];
    rt.send_msg(reactor, move || {
        // Dropping a JoinHandle detaches its task.
        let _server = spawn_local(async move {
            let mut listener = Listener::bind(&addr).unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            loop {
                let Ok((mut stream, _peer)) = listener.accept().await else {
                    return;
                };
                let _connection = spawn_local(async move {
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if stream.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
    })
    .unwrap();
    rx.recv().unwrap()
}

fn round_trip(rt: &Runtime, client_reactor: usize, addr: ListenAddr, clients: u8, len: usize) {
    let reactor = rt.reactors()[client_reactor];
    let ok = rt
        .block_on(reactor, move || async move {
            let mut tasks = Vec::new();
            for seed in 0..clients {
                let addr = addr.clone();
                tasks.push(spawn_local(async move {
                    let mut stream = Stream::connect(&addr).await.unwrap();
                    let data = pattern(seed, len);
                    let mut back = vec![0u8; len];
                    // Write and read in turns, in pieces: the echo cannot buffer it all.
                    let mut sent = 0;
                    let mut got = 0;
                    while got < len {
                        if sent < len {
                            let piece = (len - sent).min(256 << 10);
                            stream.write_all(&data[sent..sent + piece]).await.unwrap();
                            sent += piece;
                        }
                        while got < sent {
                            got += stream.read(&mut back[got..sent]).await.unwrap();
                        }
                    }
                    back == data
                }));
            }
            let mut all = true;
            for task in tasks {
                all &= task.await.unwrap();
            }
            all
        })
        .unwrap();
    assert!(ok, "bytes came back changed");
}

#[test]
fn tcp_echo_across_reactors_and_on_one() {
    let rt = runtime(2);
    let addr = echo_server(&rt, ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()));
    round_trip(&rt, 1, addr.clone(), 4, 8 << 20);
    round_trip(&rt, 0, addr, 2, 1 << 20);
    rt.stop();
}

#[test]
fn unix_echo_and_socket_mode() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.sock");
    let rt = runtime(2);
    let addr = echo_server(&rt, ListenAddr::Unix(path.clone()));
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the socket is the owner's only");
    round_trip(&rt, 1, addr, 3, 4 << 20);
    rt.stop();
}

#[test]
fn a_closed_peer_reads_as_end_of_file_and_a_short_read_exact_fails() {
    let rt = runtime(1);
    let reactor = rt.reactors()[0];
    rt.block_on(reactor, || async {
        let tcp = ListenAddr::Tcp("127.0.0.1:0".parse().unwrap());
        let mut listener = Listener::bind(&tcp).unwrap();
        let addr = listener.local_addr().unwrap();
        let client = spawn_local(async move {
            let mut stream = Stream::connect(&addr).await.unwrap();
            stream.write_all(b"abc").await.unwrap();
        });
        let (mut server, peer) = listener.accept().await.unwrap();
        assert!(peer.starts_with("127.0.0.1:"), "{peer}");
        client.await.unwrap(); // the client's stream is dropped: closed
        let mut buf = [0u8; 8];
        let err = server.read_exact(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
        assert!(err.to_string().contains("after 3 of 8"), "{err}");
        assert_eq!(server.read(&mut buf).await.unwrap(), 0);
    })
    .unwrap();
    rt.stop();
}

#[test]
fn a_path_that_is_not_a_socket_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("not-a-socket");
    std::fs::write(&path, b"data").unwrap();
    let rt = runtime(1);
    let reactor = rt.reactors()[0];
    let kind = rt
        .block_on(reactor, move || async move {
            Listener::bind(&ListenAddr::Unix(path))
                .err()
                .map(|err| err.kind())
        })
        .unwrap();
    assert_eq!(kind, Some(std::io::ErrorKind::AlreadyExists));
    rt.stop();
}
