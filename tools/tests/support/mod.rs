//! Helpers for the `spool` command-line tests: run the built binary, check its exit status and
//! one-line errors, and unpack the SPDK fixture images (`shared/fixtures/spdk/`).

#![allow(dead_code)] // each test binary uses a subset

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// What one run printed.
#[derive(Debug)]
pub struct Run {
    /// Exit status (`None`: killed by a signal).
    pub code: Option<i32>,
    /// Standard output, as bytes.
    pub stdout: Vec<u8>,
    /// Standard error, lossy text.
    pub stderr: String,
}

impl Run {
    /// Standard output as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

impl From<Output> for Run {
    fn from(output: Output) -> Self {
        Run {
            code: output.status.code(),
            stdout: output.stdout,
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

/// Runs `spool ARGS` in `dir`.
pub fn spool_in(dir: &Path, args: &[&str]) -> Run {
    let output = Command::new(env!("CARGO_BIN_EXE_spool"))
        .args(args)
        .current_dir(dir)
        .env_remove("SPOOL_LOG")
        .output()
        .expect("spool runs");
    let run = Run::from(output);
    assert!(
        !run.stderr.contains("panicked"),
        "spool {args:?} panicked: {}",
        run.stderr
    );
    assert_ne!(
        run.code,
        Some(101),
        "spool {args:?} panicked: {}",
        run.stderr
    );
    run
}

/// The `spool` binary as a command, with no library log asked for and backtraces off.
pub fn spool() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_spool"));
    command.env_remove("SPOOL_LOG").env("RUST_BACKTRACE", "0");
    command
}

/// Sends `signal` to `pid` with the shell's `kill`.
pub fn kill(pid: u32, signal: i32) {
    let sent = Command::new("sh")
        .arg("-c")
        .arg(format!("kill -{signal} {pid}"))
        .status()
        .expect("sh runs");
    assert!(sent.success(), "kill -{signal} {pid}");
}

/// Starts `spool ARGS` in `dir`, sends `signal` after `after`, and returns what it printed.
pub fn interrupted(dir: &Path, args: &[&str], signal: i32, after: Duration) -> Run {
    let child = spool()
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spool starts");
    std::thread::sleep(after);
    kill(child.id(), signal);
    child.wait_with_output().expect("spool ends").into()
}

/// Starts `spool ARGS` in `dir` and sends SIGINT as soon as `under_way` holds (polled every
/// millisecond); panics if the command ended before that was seen.
pub fn interrupted_once(dir: &Path, args: &[&str], under_way: impl Fn() -> bool) -> Run {
    let mut child = spool()
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spool starts");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !under_way() {
        if let Some(status) = child.try_wait().expect("wait") {
            panic!("spool {args:?} ended ({status}) before the signal could be sent");
        }
        assert!(
            Instant::now() < deadline,
            "spool {args:?} never got under way"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    kill(child.id(), libc::SIGINT);
    child.wait_with_output().expect("spool ends").into()
}

/// A scratch directory in RAM (`/dev/shm`) when there is one, else in the system's
/// temporary directory: large files there spare the shared disk, and copies are fast.
pub fn scratch() -> tempfile::TempDir {
    if Path::new("/dev/shm").is_dir() {
        if let Ok(dir) = tempfile::tempdir_in("/dev/shm") {
            return dir;
        }
    }
    tempfile::tempdir().expect("a temporary directory")
}

/// Whether `spool info IMAGE` says the store was unloaded cleanly.
pub fn clean(dir: &Path, image: &str) -> bool {
    json(&ok_in(dir, &["info", image, "--json"]))["clean"] == true
}

/// A tmpfs of `mib` MiB mounted at a directory for as long as it lives (unmounted on drop);
/// `None` where mounting is not allowed (not root, no CAP_SYS_ADMIN).
pub struct SmallFs(PathBuf);

impl SmallFs {
    /// Mounts it at `at` (made if missing).
    pub fn mount(at: &Path, mib: u64) -> Option<SmallFs> {
        std::fs::create_dir_all(at).ok()?;
        let done = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(at)
            .output()
            .ok()?;
        done.status.success().then(|| SmallFs(at.to_path_buf()))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Runs `spool ARGS` in `dir` with no panic check (the case may be a panic) and backtraces
/// off, for tests that assert on what a failure prints.
pub fn spool_unchecked(dir: &Path, args: &[&str]) -> Run {
    spool()
        .args(args)
        .current_dir(dir)
        .output()
        .expect("spool runs")
        .into()
}

/// Runs `args` expecting exit `code`, no panic, a first stderr line starting with `start`
/// (equal to it when `exact`), one line only for a failure (code 1), nothing on stdout, and
/// `image` unchanged byte for byte; returns the line.
pub fn refused_with(
    dir: &Path,
    image: &str,
    args: &[&str],
    code: i32,
    start: &str,
    exact: bool,
) -> String {
    let before = std::fs::read(dir.join(image)).ok();
    let out = spool_unchecked(dir, args);
    assert!(
        !out.stderr.contains("panicked"),
        "spool {args:?} panicked: {}",
        out.stderr
    );
    assert_eq!(out.code, Some(code), "spool {args:?}: {}", out.stderr);
    let lines: Vec<&str> = out.stderr.lines().collect();
    let first = lines.first().copied().unwrap_or_default();
    if exact {
        assert_eq!(first, start, "spool {args:?}: {}", out.stderr);
    } else {
        assert!(first.starts_with(start), "spool {args:?}: {}", out.stderr);
    }
    if code == 1 {
        assert_eq!(lines.len(), 1, "spool {args:?}: one line: {}", out.stderr);
    }
    assert!(
        out.stdout.is_empty(),
        "spool {args:?}: stdout {}",
        out.text()
    );
    let after = std::fs::read(dir.join(image)).ok();
    assert!(before == after, "spool {args:?} changed {image}");
    first.to_string()
}

/// Runs `spool ARGS` in `dir` and returns its stdout; panics unless it exits 0.
pub fn ok_in(dir: &Path, args: &[&str]) -> Run {
    let run = spool_in(dir, args);
    assert_eq!(
        run.code,
        Some(0),
        "spool {args:?} failed: {}{}",
        run.text(),
        run.stderr
    );
    run
}

/// Runs `spool ARGS` in `dir`, expecting exit 1 with a single `error: ...` line on stderr
/// and nothing on stdout; returns that line.
pub fn fails_in(dir: &Path, args: &[&str]) -> String {
    let run = spool_in(dir, args);
    assert_eq!(
        run.code,
        Some(1),
        "spool {args:?}: expected exit 1, stdout {:?}, stderr {:?}",
        run.text(),
        run.stderr
    );
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "spool {args:?}: one stderr line expected: {:?}",
        run.stderr
    );
    assert!(
        lines[0].starts_with("error: "),
        "spool {args:?}: {:?}",
        run.stderr
    );
    assert!(
        run.stdout.is_empty(),
        "spool {args:?}: stdout {:?}",
        run.text()
    );
    lines[0].to_string()
}

/// Parses a run's stdout as JSON.
pub fn json(run: &Run) -> serde_json::Value {
    serde_json::from_slice(&run.stdout)
        .unwrap_or_else(|err| panic!("stdout is not JSON ({err}): {}", run.text()))
}

/// `P(s)` of the fixtures: byte `o` is `(o*31 + s) % 251`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|o| ((o * 31 + seed) % 251) as u8)
        .collect()
}

/// Lowercase hex sha256.
pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Where the SPDK fixtures are: `$SPOOL_FIXTURES_DIR`, else the repository's copy
/// (`fixtures/spdk`), else `shared/fixtures/spdk` beside the workspace.
pub fn fixtures_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SPOOL_FIXTURES_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let in_repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/spdk");
    if in_repo.is_dir() {
        return in_repo;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/spdk")
}

/// Fixture `name`'s manifest.
pub fn manifest(name: &str) -> serde_json::Value {
    let path = fixtures_dir().join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()));
    serde_json::from_str(&text).expect("manifest is JSON")
}

/// Gunzips fixture `name` into `dir/NAME.img` (a copy: the commands write the image when
/// they unload), checking its size and sha256 against the manifest.
pub fn fixture_image(name: &str, dir: &Path) -> PathBuf {
    let gz = fixtures_dir().join(format!("{name}.img.gz"));
    let file = std::fs::File::open(&gz)
        .unwrap_or_else(|err| panic!("cannot open {}: {err}", gz.display()));
    let mut image = Vec::new();
    flate2::read::GzDecoder::new(file)
        .read_to_end(&mut image)
        .expect("gunzip the fixture");
    let manifest = manifest(name);
    assert_eq!(
        image.len() as u64,
        manifest["image_bytes"].as_u64().unwrap()
    );
    assert_eq!(
        sha256_hex(&image),
        manifest["image_sha256"].as_str().unwrap()
    );
    let path = dir.join(format!("{name}.img"));
    std::fs::write(&path, &image).expect("write the image copy");
    path
}

/// A blob id from a manifest's hex string ("0x100000000").
pub fn hex_id(text: &str) -> u64 {
    u64::from_str_radix(text.trim_start_matches("0x"), 16).expect("hex id")
}
