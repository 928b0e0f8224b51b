//! Helpers for the tests that drive `spool serve` with real NBD clients: start the built
//! daemon on an image in a temporary directory (loopback, a port the kernel picks, reactors
//! that sleep when idle and are not pinned, so tests can share the machine), stop it with
//! SIGTERM (checking exit 0 and a clean store) or SIGKILL it, run the clients with a time
//! limit, and speak NBD directly where no client can say what a test needs (the kill test's
//! bookkeeping, a write to a read-only export).

#![allow(dead_code)] // each test binary uses a subset

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use spool_engine::nbd::wire::{
    client_flags, CommandCode, Info, InfoRequest, OptionCode, OptionHeader, OptionReplyHeader,
    ReplyType, RequestHeader, ServerGreeting, SimpleReplyHeader,
};

/// How long the daemon may take to say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the daemon may take to stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The Debian package that ships each client `.ci/run` installs.
fn package_of(program: &str) -> &'static str {
    match program {
        "qemu-io" | "qemu-img" => "qemu-utils",
        "nbdcopy" | "nbdinfo" => "libnbd-bin",
        "fio" => "fio",
        _ => "?",
    }
}

/// How `.ci/run` installs `program`.
fn install_hint(program: &str) -> String {
    match program {
        "spdk-rpc" => "these tests drive SPDK's own JSON-RPC client (its scripts/rpc.py); \
             `.ci/run` installs it from PyPI (pip install spdk)"
            .to_string(),
        _ => format!(
            "these tests drive real NBD clients; `.ci/run` installs them (apt-get install -y \
             fio qemu-utils libnbd-bin nbdkit; {program} is in {})",
            package_of(program)
        ),
    }
}

/// Fails (never skips) when `program` is not installed.
pub fn require(program: &str) {
    let found = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            let candidate = dir.join(program);
            std::fs::metadata(&candidate).is_ok_and(|meta| meta.is_file())
        })
    });
    assert!(
        found,
        "{program} is not installed: {}",
        install_hint(program)
    );
}

/// What a client run printed.
#[derive(Debug)]
pub struct ClientRun {
    /// The command line, for messages.
    pub command: String,
    /// Its exit status.
    pub status: ExitStatus,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl ClientRun {
    /// Panics unless it exited 0.
    pub fn ok(self) -> ClientRun {
        assert!(
            self.status.success(),
            "{} failed ({}):\n{}\n{}",
            self.command,
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }
}

/// Runs `program ARGS` in `dir`, killing it (and failing) after `limit`.
pub fn run_client(dir: &Path, program: &str, args: &[&str], limit: Duration) -> ClientRun {
    spawn_client(dir, program, args).wait(limit)
}

/// A client running in the background.
pub struct RunningClient {
    command: String,
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
}

/// Starts `program ARGS` in `dir`.
pub fn spawn_client(dir: &Path, program: &str, args: &[&str]) -> RunningClient {
    require(program);
    let command = format!("{program} {}", shell_words(args));
    let mut child = Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("{command}: cannot start: {err}"));
    let stdout = drain(child.stdout.take().expect("piped"));
    let stderr = drain(child.stderr.take().expect("piped"));
    RunningClient {
        command,
        child,
        stdout,
        stderr,
    }
}

impl RunningClient {
    /// Its process id (to signal it).
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits for it to end, at most `limit` (then kills it and fails).
    pub fn wait(mut self, limit: Duration) -> ClientRun {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait for a client") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "{} did not finish within {limit:?}:\n{}\n{}",
                    self.command,
                    self.stdout.recv().unwrap_or_default(),
                    self.stderr.recv().unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        ClientRun {
            command: self.command,
            status,
            stdout: self.stdout.recv().unwrap_or_default(),
            stderr: self.stderr.recv().unwrap_or_default(),
        }
    }
}

fn drain(mut from: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = from.read_to_end(&mut bytes);
        let _ = tx.send(String::from_utf8_lossy(&bytes).into_owned());
    });
    rx
}

fn shell_words(args: &[&str]) -> String {
    args.iter()
        .map(|arg| {
            if arg.contains(' ') || arg.is_empty() {
                format!("'{arg}'")
            } else {
                arg.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `spool ARGS` in `dir`; panics unless it exits 0; returns stdout.
pub fn spool(dir: &Path, args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_spool"))
        .args(args)
        .current_dir(dir)
        .env_remove("SPOOL_LOG")
        .output()
        .expect("spool runs");
    assert!(
        output.status.success(),
        "spool {args:?} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `spool ARGS --json`, parsed.
pub fn spool_json(dir: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.push("--json");
    let text = spool(dir, &all);
    serde_json::from_str(&text).unwrap_or_else(|err| panic!("spool {all:?}: not JSON ({err})"))
}

/// A running `spool serve`.
pub struct Daemon {
    child: Option<Child>,
    /// The directory it runs in (the image is there).
    pub dir: PathBuf,
    /// The image, relative to `dir`.
    pub image: String,
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
    /// What it printed up to and including its ready line.
    pub banner: Vec<String>,
    /// Where its stderr (the log) goes.
    pub log: PathBuf,
}

impl Daemon {
    /// `spool serve IMAGE --listen 127.0.0.1:0 --idle adaptive --no-pin --handshake-timeout 60
    /// --rpc DIR/rpc.sock EXTRA...` in `dir`
    /// (no IMAGE when `image` is empty: the embedded default, `spool.img`); returns once it
    /// printed its ready line.
    pub fn start(dir: &Path, image: &str, extra: &[&str]) -> Daemon {
        let log = dir.join("serve.log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open the daemon's log");
        let mut args = vec!["serve"];
        if !image.is_empty() {
            args.push(image);
        }
        args.extend(["--listen", "127.0.0.1:0", "--idle", "adaptive", "--no-pin"]);
        // Generous: a machine stalled by other work must not cut a client's handshake.
        args.extend(["--handshake-timeout", "60"]);
        // Its own JSON-RPC socket (the default /var/tmp/spool.sock is one per machine).
        let rpc = dir.join("rpc.sock");
        let rpc = rpc.to_str().expect("a UTF-8 temp path").to_string();
        if !extra.contains(&"--rpc") && !extra.contains(&"--no-rpc") {
            args.extend(["--rpc", rpc.as_str()]);
        }
        args.extend_from_slice(extra);
        let image = if image.is_empty() { "spool.img" } else { image };
        let mut child = Command::new(env!("CARGO_BIN_EXE_spool"))
            .args(&args)
            .current_dir(dir)
            .env(
                "SPOOL_LOG",
                std::env::var("SPOOL_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .spawn()
            .expect("spool serve starts");
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut daemon = Daemon {
            child: Some(child),
            dir: dir.to_path_buf(),
            image: image.to_string(),
            port: 0,
            banner: Vec::new(),
            log,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix("spool serve: listening on 127.0.0.1:") {
                        let port = rest.split_whitespace().next().unwrap_or_default();
                        daemon.port = port.parse().expect("a port in the listening line");
                    }
                    let ready = line.starts_with("spool serve: ready");
                    daemon.banner.push(line);
                    if ready {
                        break;
                    }
                }
                Err(_) => {
                    let status = daemon.child.as_mut().and_then(|c| c.try_wait().ok());
                    panic!(
                        "spool serve {image} did not get ready (status {status:?}); it printed \
                         {:?}; log:\n{}",
                        daemon.banner,
                        daemon.log_text()
                    );
                }
            }
        }
        assert_ne!(daemon.port, 0, "no listening line: {:?}", daemon.banner);
        // The rest of stdout (the stop line) is drained so the daemon never blocks on it.
        std::thread::spawn(move || while rx.recv().is_ok() {});
        daemon
    }

    /// The daemon's process id.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// `nbd://127.0.0.1:PORT/EXPORT`.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.port)
    }

    /// Whether the start said the store was recovered.
    pub fn recovered(&self) -> bool {
        self.banner
            .iter()
            .any(|line| line.starts_with("spool serve: store") && line.contains("recovered"))
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `--rpc`'s socket (unless the test gave its own).
    pub fn rpc_socket(&self) -> PathBuf {
        self.dir.join("rpc.sock")
    }

    /// SIGTERM; checks it exits 0 and that the store is then marked clean.
    pub fn stop(self) {
        signal(self.pid(), "TERM");
        self.wait_stopped();
    }

    /// Waits for a stop asked some other way (`spdk_kill_instance`); checks it exits 0 and
    /// that the store is then marked clean.
    pub fn wait_stopped(mut self) {
        let mut child = self.child.take().expect("running");
        let status = wait_for(&mut child, STOP_TIMEOUT);
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(0),
            "spool serve did not exit 0 ({status:?}); log:\n{}",
            self.log_text()
        );
        let info = spool_json(&self.dir, &["info", &self.image]);
        assert_eq!(
            info["clean"], true,
            "the store is not clean after a stop: {info}"
        );
    }

    /// SIGKILL, and waits for it to be gone.
    pub fn kill9(mut self) {
        if let Some(mut child) = self.child.take() {
            if std::thread::panicking() {
                if let Some(secs) = std::env::var("SPOOL_HANG_HOLD")
                    .ok()
                    .and_then(|s| s.parse().ok())
                {
                    eprintln!("HANG_HOLD pid {} dir {}", child.id(), self.dir.display());
                    std::thread::sleep(std::time::Duration::from_secs(secs));
                }
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A failing test leaves no daemon behind, and shows the end of its log.
        if let Some(mut child) = self.child.take() {
            if std::thread::panicking() {
                if let Some(secs) = std::env::var("SPOOL_HANG_HOLD")
                    .ok()
                    .and_then(|s| s.parse().ok())
                {
                    eprintln!("HANG_HOLD pid {} dir {}", child.id(), self.dir.display());
                    std::thread::sleep(std::time::Duration::from_secs(secs));
                }
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            let log = self.log_text();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "spool serve {} (port {}), the last lines of its log:\n{}",
                self.image,
                self.port,
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        }
    }
}

/// Sends `signal` (a name: TERM, INT) to process `pid`, with the shell's own `kill` (no
/// procps needed on a fresh machine).
pub fn signal(pid: i32, signal: &str) {
    let sent = Command::new("sh")
        .arg("-c")
        .arg(format!("kill -{signal} {pid}"))
        .status()
        .expect("sh runs");
    assert!(sent.success(), "kill -{signal} {pid} failed");
}

fn wait_for(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Checks that every data cluster of the (unloaded) store is owned exactly once: the device
/// clusters the extent pages and run-length extents name are distinct, each is marked in
/// the used-cluster mask, the mask marks nothing else besides the metadata clusters, and
/// `spool info`'s free count agrees.
pub fn check_clusters_owned_once(dir: &Path, image: &str) {
    let dump = spool_json(dir, &["dump", image]);
    assert_eq!(
        dump["problems"].as_array().map(Vec::len),
        Some(0),
        "spool dump found problems: {}",
        dump["problems"]
    );
    let super_block = &dump["super_block"];
    let total = super_block["total_clusters"]
        .as_u64()
        .expect("total_clusters");
    let md_clusters = super_block["md_clusters"].as_u64().expect("md_clusters");
    let mut owner: Vec<Option<u64>> = vec![None; total as usize];
    let mut claim = |cluster: u64, blob: u64| {
        assert!(
            cluster >= md_clusters && cluster < total,
            "blob {blob:#x} names device cluster {cluster}, outside the data clusters"
        );
        if let Some(other) = owner[cluster as usize] {
            panic!("device cluster {cluster} is owned by blob {other:#x} and by blob {blob:#x}");
        }
        owner[cluster as usize] = Some(blob);
    };
    for page in dump["pages"].as_array().expect("pages") {
        if page["in_md_mask"] != true {
            continue;
        }
        let blob = page["id"].as_u64().expect("page id");
        for descriptor in page["descriptors"].as_array().expect("descriptors") {
            match descriptor["type"].as_str() {
                Some("extent_page") => {
                    for cluster in descriptor["clusters"].as_array().expect("clusters") {
                        let cluster = cluster.as_u64().expect("a cluster number");
                        if cluster != 0 {
                            claim(cluster, blob);
                        }
                    }
                }
                Some("extent_rle") => {
                    for run in descriptor["runs"].as_array().expect("runs") {
                        let first = run[0].as_u64().expect("run start");
                        let count = run[1].as_u64().expect("run length");
                        if first != 0 {
                            for cluster in first..first + count {
                                claim(cluster, blob);
                            }
                        }
                    }
                }
                _ => {}
            }
        }
    }
    let owned: Vec<u64> = (0..total)
        .filter(|&c| owner[c as usize].is_some())
        .collect();
    let mask = dump["masks"]
        .as_array()
        .expect("masks")
        .iter()
        .find(|mask| mask["mask"] == "used_clusters")
        .expect("a used_clusters mask");
    let mut marked = Vec::new();
    for range in mask["set_ranges"].as_array().expect("set_ranges") {
        let (first, last) = (range[0].as_u64().unwrap(), range[1].as_u64().unwrap());
        marked.extend(first..=last);
    }
    let expected: Vec<u64> = (0..md_clusters).chain(owned.iter().copied()).collect();
    assert_eq!(
        marked, expected,
        "the used-cluster mask does not mark exactly the metadata clusters and the owned ones"
    );
    let info = spool_json(dir, &["info", image]);
    let data = info["total_data_clusters"]
        .as_u64()
        .expect("total_data_clusters");
    let free = info["free_clusters"].as_u64().expect("free_clusters");
    assert_eq!(
        free + owned.len() as u64,
        data,
        "free ({free}) + owned ({}) clusters != data clusters ({data})",
        owned.len()
    );
    let ls = spool_json(dir, &["ls", image]);
    let allocated: u64 = ls
        .as_array()
        .expect("ls")
        .iter()
        .map(|blob| blob["num_allocated_clusters"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(
        allocated,
        owned.len() as u64,
        "spool ls's allocated clusters do not add up to the owned ones"
    );
}

/// A minimal synchronous NBD client over TCP: fixed newstyle, `NBD_OPT_GO` without block
/// sizes or structured replies, so every reply is simple (a 16-byte header, then a READ's
/// data).
pub struct NbdClient {
    stream: TcpStream,
    /// The export's size.
    pub size: u64,
    /// Its transmission flags.
    pub flags: u16,
    /// Lengths of the READs in flight by handle (their replies carry data).
    reads: std::collections::HashMap<u64, usize>,
}

/// One reply.
#[derive(Debug)]
pub struct Reply {
    /// The request's handle.
    pub handle: u64,
    /// `NBD_E*` (0: success).
    pub error: u32,
    /// A successful READ's data.
    pub data: Vec<u8>,
}

fn protocol(what: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string())
}

impl NbdClient {
    /// Connects to `export` on 127.0.0.1:`port`.
    pub fn connect(port: u16, export: &str) -> std::io::Result<NbdClient> {
        let mut stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut greeting = [0u8; ServerGreeting::LEN];
        stream.read_exact(&mut greeting)?;
        ServerGreeting::decode(&greeting).map_err(protocol)?;
        let mut out = client_flags::KNOWN.to_be_bytes().to_vec();
        let mut data = Vec::new();
        InfoRequest {
            name: export.to_string(),
            requests: Vec::new(),
        }
        .encode(&mut data);
        OptionHeader {
            option: OptionCode::Go.code(),
            length: data.len() as u32,
        }
        .encode(&mut out);
        out.extend_from_slice(&data);
        stream.write_all(&out)?;
        let mut export_info = None;
        loop {
            let mut head = [0u8; OptionReplyHeader::LEN];
            stream.read_exact(&mut head)?;
            let head = OptionReplyHeader::decode(&head).map_err(protocol)?;
            let mut data = vec![0u8; head.length as usize];
            stream.read_exact(&mut data)?;
            match ReplyType::from_code(head.reply_type) {
                ReplyType::Info => {
                    if let Info::Export { size, flags } = Info::decode(&data).map_err(protocol)? {
                        export_info = Some((size, flags));
                    }
                }
                ReplyType::Ack => break,
                other => {
                    return Err(protocol(format!(
                        "GO {export:?}: {other:?} {}",
                        String::from_utf8_lossy(&data)
                    )))
                }
            }
        }
        let (size, flags) = export_info.ok_or_else(|| protocol("GO: no NBD_INFO_EXPORT"))?;
        Ok(NbdClient {
            stream,
            size,
            flags,
            reads: std::collections::HashMap::new(),
        })
    }

    fn send(
        &mut self,
        command: CommandCode,
        flags: u16,
        handle: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> std::io::Result<()> {
        let mut out = Vec::with_capacity(RequestHeader::LEN + payload.len());
        RequestHeader {
            flags,
            command: command.code(),
            handle,
            offset,
            length,
        }
        .encode(&mut out);
        out.extend_from_slice(payload);
        self.stream.write_all(&out)
    }

    /// Sends a WRITE (`flags`: 0 or FUA).
    pub fn send_write(
        &mut self,
        handle: u64,
        offset: u64,
        data: &[u8],
        flags: u16,
    ) -> std::io::Result<()> {
        self.send(
            CommandCode::Write,
            flags,
            handle,
            offset,
            data.len() as u32,
            data,
        )
    }

    /// Sends a READ.
    pub fn send_read(&mut self, handle: u64, offset: u64, length: u32) -> std::io::Result<()> {
        self.reads.insert(handle, length as usize);
        self.send(CommandCode::Read, 0, handle, offset, length, &[])
    }

    /// Sends a FLUSH.
    pub fn send_flush(&mut self, handle: u64) -> std::io::Result<()> {
        self.send(CommandCode::Flush, 0, handle, 0, 0, &[])
    }

    /// Reads the next reply.
    pub fn reply(&mut self) -> std::io::Result<Reply> {
        let mut head = [0u8; SimpleReplyHeader::LEN];
        self.stream.read_exact(&mut head)?;
        let head = SimpleReplyHeader::decode(&head).map_err(protocol)?;
        let length = self.reads.remove(&head.handle);
        let mut data = Vec::new();
        if let (Some(length), 0) = (length, head.error) {
            data.resize(length, 0);
            self.stream.read_exact(&mut data)?;
        }
        Ok(Reply {
            handle: head.handle,
            error: head.error,
            data,
        })
    }

    /// WRITE and wait for its reply; returns the error value (0: success).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> std::io::Result<u32> {
        self.send_write(1, offset, data, 0)?;
        Ok(self.reply()?.error)
    }

    /// READ and wait for its data.
    pub fn read(&mut self, offset: u64, length: u32) -> std::io::Result<Vec<u8>> {
        self.send_read(2, offset, length)?;
        let reply = self.reply()?;
        if reply.error != 0 {
            return Err(protocol(format!("READ failed: error {}", reply.error)));
        }
        Ok(reply.data)
    }

    /// Sends `NBD_CMD_DISC` and closes.
    pub fn disconnect(mut self) {
        let _ = self.send(CommandCode::Disc, 0, 0, 0, 0, &[]);
    }
}
