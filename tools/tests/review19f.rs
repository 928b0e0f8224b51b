//! Sixth review of issue 19 (the command line a storage engineer trusts): what the earlier
//! reviews (`review19.rs`, `review19_extra.rs`, `review19b.rs` .. `review19e.rs`,
//! `guard_rails.rs`, `signals.rs`) did not try. Method as there: run the built binary as a
//! user would, assert the exit code, the stderr line, and that nothing stored changed.
//! Signals are sent on observed progress (bytes the process has read, per `/proc/PID/io`),
//! never after a fixed delay.

mod support;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use support::{kill, ok_in, scratch, spool};

/// Bytes `pid` has read so far (`rchar` of `/proc/PID/io`; 0 once it is gone).
fn bytes_read(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|io| {
            io.lines()
                .find_map(|line| line.strip_prefix("rchar: ")?.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Starts `spool ARGS` in `dir`, waits until it has read `bytes` (panics if it ends first),
/// sends `signal`, and returns its exit status, stdout, stderr and how long it took to end
/// after the signal.
fn signal_after_reading(
    dir: &Path,
    args: &[&str],
    bytes: u64,
    signal: i32,
) -> (Option<i32>, String, String, Duration) {
    let mut child: Child = spool()
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spool starts");
    let deadline = Instant::now() + Duration::from_secs(120);
    while bytes_read(child.id()) < bytes {
        if let Some(status) = child.try_wait().expect("wait") {
            panic!("spool {args:?} ended ({status}) before it read {bytes} bytes");
        }
        assert!(
            Instant::now() < deadline,
            "spool {args:?} never read {bytes} bytes"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    kill(child.id(), signal);
    let sent = Instant::now();
    let output = child.wait_with_output().expect("spool ends");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
        sent.elapsed(),
    )
}

// ---------------------------------------------------------------------------------------
// 1. `spool dump` of a large store cannot be interrupted.
// ---------------------------------------------------------------------------------------

/// `spool dump` reads the whole md region (4 GiB for a 1 TiB store of 1 MiB clusters): many
/// seconds, minutes on a real device. The signal handlers installed for every command turn
/// Ctrl-C into a flag, and dump never looked at it: Ctrl-C was ignored, dump ran to its end
/// and exited 0 as if nobody had asked it to stop. Expected, as every other long command:
/// stop at the next batch of pages, say how far it got, exit 130 (143 for SIGTERM), print no
/// partial dump, leave the image as it was.
#[test]
fn ctrl_c_stops_a_dump_of_a_large_store() {
    let dir = scratch();
    let d = dir.path();
    ok_in(d, &["init", "big.img", "--size", "1T"]);
    let before = std::fs::metadata(d.join("big.img")).unwrap();
    for (signal, code, name) in [
        (libc::SIGINT, 130, "SIGINT"),
        (libc::SIGTERM, 143, "SIGTERM"),
    ] {
        let (status, stdout, stderr, _) =
            signal_after_reading(d, &["dump", "big.img"], 16 << 20, signal);
        assert_eq!(status, Some(code), "dump after {name}: {stderr}");
        let first = stderr.lines().next().unwrap_or_default();
        assert!(
            first.starts_with(&format!("error: interrupted by {name} after "))
                && first.contains(" of 1048576 md pages of big.img read"),
            "{stderr}"
        );
        assert!(stdout.is_empty(), "no partial dump: {stdout}");
    }
    let after = std::fs::metadata(d.join("big.img")).unwrap();
    assert_eq!(before.len(), after.len());
    assert!(support::clean(d, "big.img"));
}

// ---------------------------------------------------------------------------------------
// 2. `spool check` of a store on a block device cannot be interrupted.
// ---------------------------------------------------------------------------------------

/// A loop device over a file, detached on drop; `None` where losetup is not allowed.
struct Loop(String);

impl Loop {
    fn attach(file: &Path) -> Option<Loop> {
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .ok()?;
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (out.status.success() && !dev.is_empty()).then_some(Loop(dev))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .status();
    }
}

/// `spool check` on a block device has no holes to skip: it reads the whole md region, 4 GiB
/// for a 1 TiB device of 1 MiB clusters (23 s here, minutes on a real disk). Ctrl-C was
/// ignored: the check (and `check --repair`'s first check) ran to its end and exited 0.
/// Expected: stop between two batches, say how far it got, exit 130 / 143, print no report,
/// write nothing.
#[test]
fn ctrl_c_stops_a_check_of_a_large_block_device() {
    let dir = scratch();
    let d = dir.path();
    let file = std::fs::File::create(d.join("dev.img")).unwrap();
    file.set_len(1 << 40).unwrap();
    drop(file);
    let Some(dev) = Loop::attach(&d.join("dev.img")) else {
        eprintln!("no loop device here (needs root): skipped");
        return;
    };
    ok_in(d, &["init", &dev.0]);
    let head = |d: &Path| {
        let mut bytes = vec![0u8; 1 << 20];
        use std::os::unix::fs::FileExt;
        std::fs::File::open(d.join("dev.img"))
            .unwrap()
            .read_exact_at(&mut bytes, 0)
            .unwrap();
        bytes
    };
    let before = head(d);
    for (args, signal, code, name) in [
        (vec!["check", dev.0.as_str()], libc::SIGINT, 130, "SIGINT"),
        (
            vec!["check", dev.0.as_str(), "--json"],
            libc::SIGTERM,
            143,
            "SIGTERM",
        ),
        (
            vec!["check", dev.0.as_str(), "--repair"],
            libc::SIGINT,
            130,
            "SIGINT",
        ),
    ] {
        let (status, stdout, stderr, _) = signal_after_reading(d, &args, 64 << 20, signal);
        assert_eq!(status, Some(code), "{args:?} after {name}: {stderr}");
        let last = stderr.lines().last().unwrap_or_default();
        assert!(
            last.starts_with(&format!("error: interrupted by {name} after "))
                && last.contains(&format!(" of 1048576 md pages of {} scanned", dev.0)),
            "{args:?}: {stderr}"
        );
        assert!(stdout.is_empty(), "{args:?}: no report: {stdout}");
    }
    assert!(before == head(d), "the check wrote to the device");
}

// ---------------------------------------------------------------------------------------
// 3. `export --force` wrote over a mounted filesystem.
// ---------------------------------------------------------------------------------------

/// A filesystem mounted for as long as it lives (unmounted on drop).
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// `--force` is for a device whose old contents are not wanted any more, never for one in
/// use: `init --force` and `perf --force` open a block device with `O_EXCL`, so the kernel
/// refuses a mounted one ("in use (mounted, or claimed by another process)"), and docs/cli.md
/// says writers of block devices do. `export --force` did not: it wrote the blob over a
/// MOUNTED ext4 filesystem under the kernel's feet and exited 0. Expected: refused with the
/// same words as `init`, exit 1, the device untouched.
#[test]
fn export_force_refuses_a_mounted_filesystem() {
    let dir = scratch();
    let d = dir.path();
    ok_in(d, &["init", "s.img", "--size", "16M"]);
    ok_in(d, &["create", "s.img", "--size", "4M", "--name", "v"]);
    std::fs::write(d.join("in.bin"), vec![0xa5u8; 4 << 20]).unwrap();
    ok_in(d, &["import", "s.img", "v", "in.bin"]);
    let fs = d.join("fs.img");
    std::fs::File::create(&fs)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let made = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
        .arg(&fs)
        .output();
    if !made.is_ok_and(|out| out.status.success()) {
        eprintln!("no mkfs.ext4 here: skipped");
        return;
    }
    let Some(dev) = Loop::attach(&fs) else {
        eprintln!("no loop device here (needs root): skipped");
        return;
    };
    let at = d.join("mnt");
    std::fs::create_dir(&at).unwrap();
    let mounted = std::process::Command::new("mount")
        .arg(&dev.0)
        .arg(&at)
        .status();
    if !mounted.is_ok_and(|status| status.success()) {
        eprintln!("mounting is not allowed here: skipped");
        return;
    }
    let mount = Mounted(at);
    let before = std::fs::read(&fs).unwrap();
    let out = support::spool_unchecked(d, &["export", "s.img", "v", &dev.0, "--force"]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert_eq!(
        out.stderr.trim_end(),
        format!(
            "error: {}: in use (mounted, or claimed by another process): export writes only to a device nobody uses",
            dev.0
        )
    );
    let after = std::fs::read(&fs).unwrap();
    assert!(before == after, "export wrote over the mounted filesystem");
    drop(mount);
    drop(dev);
}

// ---------------------------------------------------------------------------------------
// 4. `import IMAGE BLOB IMAGE` copies the store into itself.
// ---------------------------------------------------------------------------------------

/// `export IMAGE BLOB IMAGE` is refused ("is the image itself"), but the same typo the other
/// way round was not: `import s.img big s.img` read the store's own bytes while writing them
/// into a thin blob, filled the store, and failed only when no cluster was left ("no free
/// cluster left after 49283072 of 67108864 bytes of s.img were written"), leaving the blob
/// half-filled with a copy of the store's metadata. Expected: refused before anything is
/// written, exit 1, the image byte for byte as it was.
#[test]
fn import_refuses_the_image_itself() {
    let dir = scratch();
    let d = dir.path();
    ok_in(d, &["init", "s.img", "--size", "64M"]);
    ok_in(
        d,
        &[
            "create", "s.img", "--size", "64M", "--thin", "--name", "big",
        ],
    );
    let line = support::refused_with(
        d,
        "s.img",
        &["import", "s.img", "big", "s.img"],
        1,
        "error: s.img: is the image itself; import from another file",
        true,
    );
    assert!(!line.is_empty());
    std::os::unix::fs::symlink("s.img", d.join("link.img")).unwrap();
    support::refused_with(
        d,
        "s.img",
        &["import", "s.img", "big", "link.img"],
        1,
        "error: link.img: is the image itself; import from another file",
        true,
    );
}

// ---------------------------------------------------------------------------------------
// 5. A file size limit (`ulimit -f`) killed the process by SIGXFSZ.
// ---------------------------------------------------------------------------------------

/// Runs `spool ARGS` in `dir` under a file size limit of 2048 blocks (1 or 2 MiB, as the
/// shell counts them).
fn under_file_size_limit(dir: &Path, args: &[&str]) -> support::Run {
    std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -f 2048 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_spool"))
        .args(args)
        .current_dir(dir)
        .env_remove("SPOOL_LOG")
        .output()
        .expect("sh runs")
        .into()
}

/// Hidden temporary files (`.NAME.spool-new.*`) left in `dir`.
fn temporaries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains(".spool-new."))
        .collect()
}

/// A file size limit (`ulimit -f`, set by a batch system or a careful admin) is the brief's
/// way to simulate a full host. A write past it raises SIGXFSZ, whose default action kills
/// the process: `init --size 32M`, `perf --target p.img --size 32M` and `export` died with
/// status 153 and not a word, leaving `.u.img.spool-new.*` behind (and an import left the
/// store dirty). Expected: the write fails with EFBIG, said in words naming the limit,
/// exit 1, no temporary file left, the store clean.
#[test]
fn a_file_size_limit_is_said_in_words_not_a_kill() {
    let dir = scratch();
    let d = dir.path();
    ok_in(d, &["init", "s.img", "--size", "64M"]);
    ok_in(d, &["create", "s.img", "--size", "8M", "--name", "v"]);
    ok_in(
        d,
        &["create", "s.img", "--size", "16M", "--thin", "--name", "t"],
    );
    let data = support::pattern(7, 8 << 20);
    std::fs::write(d.join("in.bin"), &data).unwrap();
    ok_in(d, &["import", "s.img", "v", "in.bin"]);
    for (args, line) in [
        (
            &["init", "u.img", "--size", "32M"][..],
            "error: u.img: a size of 33554432 bytes is larger than a file on this filesystem can be (or than the file size limit, ulimit -f): give a smaller --size",
        ),
        (
            &["perf", "--target", "p.img", "--size", "32M", "--time", "1", "-q"][..],
            "error: p.img: a size of 33554432 bytes is larger than a file on this filesystem can be (or than the file size limit, ulimit -f): give a smaller --size",
        ),
        (
            &["export", "s.img", "v", "out.bin"][..],
            "error: out.bin: write: the write reaches past the largest file size the host filesystem (or the file size limit, ulimit -f) allows",
        ),
        (
            &["import", "s.img", "t", "in.bin"][..],
            "error: s.img: a write to the image failed: the write reaches past the largest file size the host filesystem (or the file size limit, ulimit -f) allows: raise the limit (ulimit -f unlimited), then run the command again",
        ),
    ] {
        let before = std::fs::read(d.join("s.img")).unwrap();
        let out = under_file_size_limit(d, args);
        assert_eq!(out.code, Some(1), "spool {args:?}: {}", out.stderr);
        assert_eq!(out.stderr.trim_end(), line, "spool {args:?}");
        assert!(temporaries(d).is_empty(), "{args:?}: {:?}", temporaries(d));
        for gone in ["u.img", "p.img", "out.bin"] {
            assert!(!d.join(gone).exists(), "{args:?} left {gone}");
        }
        assert!(support::clean(d, "s.img"), "{args:?} left the store dirty");
        if args[0] == "export" {
            assert!(before == std::fs::read(d.join("s.img")).unwrap());
        }
    }
}

// ---------------------------------------------------------------------------------------
// 6. `export` replaced another store, even one a running daemon serves.
// ---------------------------------------------------------------------------------------

/// `spool export a.img vol b.img`, a typo for `b.raw`, where b.img is another store: the
/// export renamed its copy over b.img, exit 0, and every blob of b.img was gone, though
/// `perf` and `init` refuse to write over a blobstore without `--force` (and export refuses
/// one on a block device). Worse, with b.img served by a running `spool serve` (which holds
/// its image lock), the export replaced the file under the daemon, exit 0: the daemon went
/// on writing to the unlinked inode, so every write its clients made after it was lost.
/// Expected: a store FILE needs `--force`; a FILE another process holds the lock of is
/// refused even so; exit 1, FILE byte for byte as it was.
#[test]
fn export_does_not_replace_a_store_nor_a_served_image() {
    let dir = scratch();
    let d = dir.path();
    ok_in(d, &["init", "a.img", "--size", "16M"]);
    ok_in(d, &["create", "a.img", "--size", "1M", "--name", "vol"]);
    ok_in(d, &["init", "b.img", "--size", "16M"]);
    ok_in(d, &["create", "b.img", "--size", "1M", "--name", "keep"]);
    support::refused_with(
        d,
        "b.img",
        &["export", "a.img", "vol", "b.img"],
        1,
        "error: b.img: holds a blobstore; export would replace it and every blob in it would be lost: check the file name, or add --force to lose it",
        true,
    );
    assert!(temporaries(d).is_empty(), "{:?}", temporaries(d));
    let mut daemon = spool()
        .args(["serve", "b.img", "--no-rpc", "--socket"])
        .arg(d.join("n.sock"))
        .current_dir(d)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spool serve starts");
    let mut stdout = std::io::BufReader::new(daemon.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("ready") {
        line.clear();
        let read = std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
        assert!(read > 0, "spool serve ended before it was ready");
    }
    let refused = support::spool_unchecked(d, &["export", "a.img", "vol", "b.img", "--force"]);
    kill(daemon.id(), libc::SIGTERM);
    daemon.wait().unwrap();
    assert_eq!(refused.code, Some(1), "{}", refused.stderr);
    assert_eq!(
        refused.stderr.trim_end(),
        "error: b.img: in use by another process (it holds the image lock): export would replace the file under it; export to another file, or stop that process first"
    );
    assert!(temporaries(d).is_empty(), "{:?}", temporaries(d));
    let names: Vec<String> = support::json(&ok_in(d, &["ls", "b.img", "--json"]))
        .as_array()
        .unwrap()
        .iter()
        .map(|blob| blob["name"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(names, ["keep"], "b.img lost its blobs");
    // With --force and nobody using it, the store file is replaced, as asked.
    ok_in(d, &["export", "a.img", "vol", "b.img", "--force"]);
    assert_eq!(std::fs::metadata(d.join("b.img")).unwrap().len(), 1 << 20);
}

// ---------------------------------------------------------------------------------------
// 7. `resize` advised an option it does not have.
// ---------------------------------------------------------------------------------------

/// Growing a thick blob that does not fit said "...; free some, or make the blob thin
/// (--thin) to allocate on write" (and, on a full host, "free space on the host, or make the
/// blob thin (--thin) ..."): advice for `create`. `resize` has no `--thin` (`spool resize
/// s.img a 32M --thin` is "unexpected argument"), and nothing turns a thick blob thin, so
/// the user is sent to an option that does not exist. Expected: advice resize can take.
#[test]
fn resize_out_of_space_gives_advice_resize_can_take() {
    let dir = scratch();
    let d = dir.path();
    ok_in(d, &["init", "s.img", "--size", "16M"]);
    ok_in(d, &["create", "s.img", "--size", "4M", "--name", "a"]);
    let tried = support::spool_unchecked(d, &["resize", "s.img", "a", "32M", "--thin"]);
    assert_eq!(
        tried.code,
        Some(2),
        "resize takes no --thin: {}",
        tried.stderr
    );
    support::refused_with(
        d,
        "s.img",
        &["resize", "s.img", "a", "32M"],
        1,
        "error: s.img: no space to grow blob 0x100000000 to 32 MiB: it needs 28 clusters of 1 MiB (28 MiB) and 11 are free (11 MiB); free some, or give a smaller size (a thick blob takes every cluster of its new size when it grows)",
        true,
    );
    // On a full host (a small tmpfs), the reservation fails: the same advice.
    let Some(small) = support::SmallFs::mount(&d.join("small"), 24) else {
        eprintln!("mounting a tmpfs is not allowed here: skipped the full host part");
        return;
    };
    let s = d.join("small");
    ok_in(&s, &["init", "s.img", "--size", "64M"]);
    ok_in(&s, &["create", "s.img", "--size", "8M", "--name", "a"]);
    std::fs::write(s.join("fill"), vec![1u8; 14 << 20]).unwrap();
    support::refused_with(
        &s,
        "s.img",
        &["resize", "s.img", "a", "32M"],
        1,
        "error: s.img: the host filesystem is full: reserving 24 MiB to grow blob 0x100000000 to 32 MiB failed (No space left on device); free space on the host, or give a smaller size (a thick blob takes every cluster of its new size when it grows)",
        true,
    );
    assert!(support::clean(&s, "s.img"));
    drop(small);
}

// ---------------------------------------------------------------------------------------
// 8. `nohup` did not keep a long command alive after the terminal hung up.
// ---------------------------------------------------------------------------------------

/// `nohup spool export big.img vol vol.raw &` (or `nohup spool serve &`), then log out: nohup
/// starts the command with SIGHUP ignored so that it outlives the session. spool installed
/// its own SIGHUP handler over that and stopped at the hang-up: `error: interrupted by SIGHUP
/// after 438304768 of 1073741824 bytes ... exported`, exit 129, no vol.raw (and a daemon
/// under nohup stopped serving). Expected: a SIGHUP ignored from the start stays ignored (the
/// command runs to its end, exit 0); SIGINT is still caught when ignored, as docs/cli.md
/// promises. SIGHUP is sent (the process stopped around it) once the temporary file is seen
/// growing.
#[test]
fn nohup_keeps_an_export_going_after_a_hangup() {
    let dir = scratch();
    let d = dir.path();
    ok_in(d, &["init", "s.img", "--size", "16M"]);
    ok_in(
        d,
        &["create", "s.img", "--size", "512M", "--thin", "--name", "v"],
    );
    // As nohup does: SIGHUP ignored, then exec.
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg("trap '' HUP && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_spool"))
        .args(["export", "s.img", "v", "out.bin"])
        .current_dir(d)
        .env_remove("SPOOL_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spool starts");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let growing = temporaries(d)
            .iter()
            .any(|name| std::fs::metadata(d.join(name)).is_ok_and(|meta| meta.len() >= 1 << 20));
        if growing {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("export ended ({status}) before its temporary file was seen");
        }
        assert!(Instant::now() < deadline, "the export never got under way");
        std::thread::sleep(Duration::from_millis(1));
    }
    kill(child.id(), libc::SIGSTOP);
    kill(child.id(), libc::SIGHUP);
    kill(child.id(), libc::SIGCONT);
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert_eq!(
        std::fs::metadata(d.join("out.bin")).unwrap().len(),
        512 << 20
    );
    assert!(temporaries(d).is_empty(), "{:?}", temporaries(d));
}

// ---------------------------------------------------------------------------------------
// 9. `export` onto a block device smaller than the blob.
// ---------------------------------------------------------------------------------------

/// `spool export s.img vol /dev/sdX --force` onto a device smaller than the blob (a wrong
/// device, or the blob grew): the export wrote the device's every byte, then failed with
/// "the host filesystem is full after 4194304 of 16777216 bytes ... free space on the host,
/// or export elsewhere": there is no host filesystem under a block device, and the device's
/// old contents were overwritten for a copy that could never fit. Expected: refused before
/// the first byte, saying the sizes and what to do; the device untouched.
#[test]
fn export_to_a_block_device_smaller_than_the_blob_is_refused_up_front() {
    let dir = scratch();
    let d = dir.path();
    ok_in(d, &["init", "s.img", "--size", "32M"]);
    ok_in(d, &["create", "s.img", "--size", "16M", "--name", "v"]);
    std::fs::write(d.join("in.bin"), support::pattern(3, 16 << 20)).unwrap();
    ok_in(d, &["import", "s.img", "v", "in.bin"]);
    let old = support::pattern(9, 4 << 20);
    std::fs::write(d.join("dev.bin"), &old).unwrap();
    let Some(dev) = Loop::attach(&d.join("dev.bin")) else {
        eprintln!("no loop device here (needs root): skipped");
        return;
    };
    let out = support::spool_unchecked(d, &["export", "s.img", "v", &dev.0]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert_eq!(
        out.stderr.trim_end(),
        format!(
            "error: {}: the device holds 4194304 bytes, fewer than the 16777216 bytes of blob 0x100000000 to export: give a larger device, or --length 4194304 or less",
            dev.0
        )
    );
    assert!(
        std::fs::read(d.join("dev.bin")).unwrap() == old,
        "the device was written"
    );
    // What fits is written, as asked.
    ok_in(d, &["export", "s.img", "v", &dev.0, "--length", "4M"]);
    drop(dev);
    assert!(std::fs::read(d.join("dev.bin")).unwrap() == support::pattern(3, 4 << 20));
}

// ---------------------------------------------------------------------------------------
// 10. Path errors that said something else than what was wrong.
// ---------------------------------------------------------------------------------------

/// Two path errors said the wrong thing: `perf --target loop1`, where loop1 and loop2 are
/// symbolic links to each other, said "a symbolic link to loop2, which does not exist"
/// (loop2 exists; the links loop), while every other command says "too many levels of
/// symbolic links"; and `spool ls s.img/x` (a file where a directory should be) asked "a
/// trailing slash? give the image's path without it" of a path with no trailing slash.
/// Expected: what is wrong, as it is.
#[test]
fn path_errors_say_what_is_wrong_with_the_path() {
    let dir = scratch();
    let d = dir.path();
    ok_in(d, &["init", "s.img", "--size", "16M"]);
    std::os::unix::fs::symlink("loop2", d.join("loop1")).unwrap();
    std::os::unix::fs::symlink("loop1", d.join("loop2")).unwrap();
    for (args, line) in [
        (
            &["perf", "--target", "loop1", "--time", "1", "-q"][..],
            "error: loop1: too many levels of symbolic links",
        ),
        (
            &["ls", "loop1"][..],
            "error: loop1: too many levels of symbolic links",
        ),
        (
            &["ls", "s.img/x"][..],
            "error: s.img/x: a part of the path is not a directory",
        ),
        (
            &["ls", "s.img/"][..],
            "error: s.img/: a part of the path is not a directory (a trailing slash? give the image's path without it)",
        ),
    ] {
        support::refused_with(d, "s.img", args, 1, line, true);
    }
}

// ---------------------------------------------------------------------------------------
// 11. A RAM target larger than the host's memory, and one too small for a store.
// ---------------------------------------------------------------------------------------

/// Resident memory of `pid` in bytes (`VmRSS` of `/proc/PID/status`; 0 once it is gone).
fn resident_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                line.strip_prefix("VmRSS:")?
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
        })
        .map_or(0, |kib| kib * 1024)
}

/// The host's memory in GiB (`MemTotal` of `/proc/meminfo`), rounded up.
fn host_memory_gib() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib: u64 = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kib.div_ceil(1 << 20)
}

/// docs/operations.md: "A `malloc:SIZE` the host's memory cannot hold is said in words
/// (`error: malloc:64G: not enough memory ...`, exit 1; `serve malloc:64G` says the same)".
/// That held only under `ulimit -v` (as review19e's test runs it): the RAM device is
/// allocated in small chunks the kernel always grants, so on a 23 GiB host `serve
/// malloc:64G` and `perf --target malloc:64G` went on filling memory with zeros (RSS up
/// ~200 MB/s, on its way to the OOM killer, which may pick another process), and the first
/// SIGTERM did not stop it. Expected: refused at once in the documented words. The test runs
/// each command with twice the host's memory and kills it (SIGKILL) as soon as it holds more
/// than 1 GiB, so the failure it shows cannot take the machine down.
#[test]
fn a_ram_target_larger_than_the_host_is_refused_before_filling_memory() {
    let dir = scratch();
    let d = dir.path();
    let size = format!("malloc:{}G", host_memory_gib() * 2);
    let socket = d.join("n.sock");
    let socket = socket.to_str().unwrap();
    for args in [
        vec!["perf", "--target", size.as_str(), "--time", "1", "-q"],
        vec!["serve", size.as_str(), "--no-rpc", "--socket", socket],
    ] {
        let mut child = spool()
            .args(&args)
            .current_dir(d)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spool starts");
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if resident_bytes(child.id()) > 1 << 30 {
                let _ = child.kill();
                let _ = child.wait();
                panic!("spool {args:?} is filling the host's memory instead of refusing");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert_eq!(status.code(), Some(1), "spool {args:?}: {stderr}");
        let bytes = (host_memory_gib() * 2) << 30;
        assert_eq!(
            stderr.lines().last().unwrap_or_default(),
            format!("error: {size}: not enough memory for {bytes} bytes of RAM device: give a smaller malloc:SIZE (or a file or block device as the target)"),
            "spool {args:?}"
        );
    }
}

/// `spool serve malloc:1M` said `error: no free metadata page: every metadata page is in
/// use` and `serve malloc:100K` `error: device of 102400 bytes is smaller than one cluster of
/// 1048576`: neither names the target nor says what to do. Expected: the target, what is
/// wrong, what to do.
#[test]
fn serve_on_a_ram_store_too_small_says_so() {
    let dir = scratch();
    let d = dir.path();
    let socket = d.join("n.sock");
    for (size, why) in [
        (
            "malloc:1M",
            "no free metadata page: every metadata page is in use",
        ),
        (
            "malloc:100K",
            "device of 102400 bytes is smaller than one cluster of 1048576",
        ),
    ] {
        let out: support::Run = spool()
            .args(["serve", size, "--no-rpc", "--socket"])
            .arg(&socket)
            .current_dir(d)
            .output()
            .unwrap()
            .into();
        assert_eq!(out.code, Some(1), "{}", out.stderr);
        assert_eq!(
            out.stderr.lines().last().unwrap_or_default(),
            format!("error: {size}: too small for a store with a volume ({why}): give a larger size, e.g. malloc:64M")
        );
    }
}

/// `spool perf --target null --size 1K` said `error: invalid bdev argument: block count is
/// 0`: an internal word ("bdev"), no option named, nothing to do; a file target with the
/// same `--size` says "--size 1000 is smaller than one block ...". Expected: the same words
/// for the null device, exit 2 (a bad argument).
#[test]
fn perf_null_with_a_size_under_one_block_names_the_option() {
    let dir = scratch();
    let out = support::spool_unchecked(
        dir.path(),
        &[
            "perf", "--target", "null", "--size", "1K", "--time", "1", "-q",
        ],
    );
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert_eq!(
        out.stderr.trim_end(),
        "error: null: --size 1024 is smaller than one block of 4096 bytes: a null device needs at least one block"
    );
}

// ---------------------------------------------------------------------------------------
// 12. A BLOB that is not there does not name the image.
// ---------------------------------------------------------------------------------------

/// The rule for an error line: "the path, what is wrong, what to do". A BLOB that no
/// blob matches says only `error: no blob is named 'nosuch'` (or `error: blob 0x100000009
/// does not exist (no blob has that id or name)`): no image (with several stores in a
/// script, which one?) and nothing to do. Expected: the image first, and where to look
/// (`spool ls IMAGE`).
#[test]
fn a_missing_blob_names_the_image_and_what_to_do() {
    let dir = scratch();
    let d = dir.path();
    ok_in(d, &["init", "s.img", "--size", "16M"]);
    for (args, what) in [
        (
            &["export", "s.img", "nosuch", "out.bin"][..],
            "no blob is named 'nosuch'",
        ),
        (
            &["delete", "s.img", "0x100000009"][..],
            "blob 0x100000009 does not exist (no blob has that id or name)",
        ),
        (
            &["rename", "s.img", "nosuch", "x"][..],
            "no blob is named 'nosuch'",
        ),
    ] {
        support::refused_with(
            d,
            "s.img",
            args,
            1,
            &format!("error: s.img: {what}: `spool ls s.img` lists its blobs"),
            true,
        );
    }
}

// ---------------------------------------------------------------------------------------
// 13. `perf --layer md` on a target too small for its I/O phases.
// ---------------------------------------------------------------------------------------

/// docs/cli.md: the store settings of `--layer blob`, `md` and `snap` the target cannot take
/// are refused "on any target, before anything is written, naming the option". `perf
/// --layer md --target malloc:64M` (a natural first try) ran every metadata phase (with the
/// default 10000 blobs, many seconds), then failed with `error: only 24 free clusters: use a
/// larger target`: no table for the phases it had measured, no target named, no size to
/// aim for; on a new file target, the file was created (and filled) first. Expected:
/// refused before anything runs or is created, exit 2, saying how many clusters it needs.
#[test]
fn perf_md_on_a_target_too_small_for_its_io_phases_is_refused_up_front() {
    let dir = scratch();
    let d = dir.path();
    for (target, left) in [("malloc:64M", 63), ("pm.img", 63)] {
        let out = support::spool_unchecked(
            d,
            &[
                "perf", "--layer", "md", "--blobs", "50", "--target", target, "--size", "64M", "-q",
            ],
        );
        assert_eq!(out.code, Some(2), "{target}: {}", out.stderr);
        assert_eq!(
            out.stderr.trim_end(),
            format!("error: --layer md needs at least 96 clusters for data (its I/O phases), the 67108864-byte target leaves {left} of 1048576 bytes: give a larger target (or a smaller --cluster-size)")
        );
        assert!(out.stdout.is_empty());
    }
    assert!(!d.join("pm.img").exists(), "the target file was made");
    assert!(temporaries(d).is_empty(), "{:?}", temporaries(d));
}

// ---------------------------------------------------------------------------------------
// 14. `init` geometry errors in the layout's words, with nothing to do.
// ---------------------------------------------------------------------------------------

/// `init` said its geometry errors in the layout's own words, with no option named and
/// nothing to do: `--size 10000` gave `error: w1.img: device of 8192 bytes is smaller than
/// one cluster of 1048576` (8192: the user said 10000), `--cluster-size 3K` `cluster size
/// 3072 is not a non-zero multiple of 4096`, and `--cluster-size 4K --md-pages 100000`
/// `metadata needs 100013 clusters, the device has 1024`. Expected, as `perf` says them and
/// as `init` says "leaves no cluster for data": the sizes given, and the option to change.
#[test]
fn init_geometry_errors_name_the_option_to_change() {
    let dir = scratch();
    let d = dir.path();
    for (args, line) in [
        (
            &["init", "w.img", "--size", "512K"][..],
            "error: w.img: 512 KiB is smaller than one cluster of 1 MiB: give a larger --size or a smaller --cluster-size",
        ),
        (
            &["init", "w.img", "--size", "4M", "--cluster-size", "3K"][..],
            "error: w.img: cluster size 3072 is not a multiple of 4096 bytes: give a --cluster-size that is (e.g. 64K or 1M)",
        ),
        (
            &[
                "init", "w.img", "--size", "4M", "--cluster-size", "4K", "--md-pages", "100000",
            ][..],
            "error: w.img: the metadata needs 100013 clusters of 4 KiB, the 4 MiB image has 1024: give fewer --md-pages (or a larger --size)",
        ),
    ] {
        support::refused_with(d, "w.img", args, 1, line, true);
        assert!(!d.join("w.img").exists(), "{args:?} left w.img");
        assert!(temporaries(d).is_empty(), "{:?}", temporaries(d));
    }
}

// ---------------------------------------------------------------------------------------
// 15. Deleting a snapshot with several clones: which ones, and what to do.
// ---------------------------------------------------------------------------------------

/// `spool delete s.img snap` of a snapshot with two clones said `error: s.img: blob
/// 0x100000002 is a snapshot with 2 clones`: what is wrong, but not which blobs nor what to
/// do (SPDK merges a snapshot with one clone into it, so deleting or inflating all but one
/// clone makes the delete work). Expected: the clones' ids and what to do; the image
/// untouched.
#[test]
fn deleting_a_snapshot_with_clones_names_them_and_what_to_do() {
    let dir = scratch();
    let d = dir.path();
    ok_in(d, &["init", "s.img", "--size", "16M"]);
    ok_in(d, &["create", "s.img", "--size", "1M", "--name", "v"]);
    ok_in(d, &["snapshot", "s.img", "v", "--name", "snap"]);
    ok_in(d, &["clone", "s.img", "snap", "--name", "c"]);
    support::refused_with(
        d,
        "s.img",
        &["delete", "s.img", "snap"],
        1,
        "error: s.img: blob 0x100000002 is a snapshot with 2 clones (0x100000000, 0x100000003): delete all but one, or inflate or decouple them, first",
        true,
    );
    // The advice works: with one clone left, the snapshot is merged into it.
    ok_in(d, &["delete", "s.img", "c"]);
    ok_in(d, &["delete", "s.img", "snap"]);
}

// ---------------------------------------------------------------------------------------
// 16. `init` of a large block device cannot be interrupted.
// ---------------------------------------------------------------------------------------

/// Bytes the file at `path` takes on its filesystem.
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0, |meta| meta.blocks() * 512)
}

/// `spool init /dev/sdX` of a 1 TiB device clears its 4 GiB metadata area with write-zeroes
/// (a block device is not trusted to read zeros after a discard): 1.5 s on a loop device over
/// RAM, tens of seconds on a disk that writes the zeros. Ctrl-C during it was ignored: init
/// ran to its end and exited 0, the brief's "init of a large store" among the long commands
/// a user must be able to stop. Expected: stop between two pieces of the clear, exit 130,
/// `error: interrupted by SIGINT after N of M bytes ...` saying the device holds no store.
/// Not fixed here: the clear is one write-zeroes request in the blob crate
/// (`clear_md_area`), which would need cutting into pieces with a stop check between them.
#[test]
fn ctrl_c_stops_init_of_a_large_block_device() {
    let dir = scratch();
    let d = dir.path();
    let file = std::fs::File::create(d.join("dev.img")).unwrap();
    file.set_len(1 << 40).unwrap();
    drop(file);
    let Some(dev) = Loop::attach(&d.join("dev.img")) else {
        eprintln!("no loop device here (needs root): skipped");
        return;
    };
    let backing = d.join("dev.img");
    let mut child = spool()
        .args(["init", &dev.0])
        .current_dir(d)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spool starts");
    let deadline = Instant::now() + Duration::from_secs(60);
    while allocated(&backing) < 256 << 20 {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("init ended ({status}) before the clear was seen");
        }
        assert!(Instant::now() < deadline, "init never got under way");
        std::thread::sleep(Duration::from_millis(1));
    }
    kill(child.id(), libc::SIGINT);
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.starts_with("error: interrupted by SIGINT after "),
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------------------
// 17. `spool rpc -s PATH` where PATH is no socket.
// ---------------------------------------------------------------------------------------

/// `spool rpc -s s.img bdev_get_bdevs` (a mistyped socket: the image, or the directory the
/// socket is in) said `connect: connection refused: nothing listens there (is spool serve
/// running?)`: the kernel's ECONNREFUSED for a path that is no socket, said as if a daemon
/// were down. Expected: what the path is, and which path to give.
#[test]
fn rpc_to_a_path_that_is_no_socket_says_so() {
    let dir = scratch();
    let d = dir.path();
    std::fs::write(d.join("file"), b"x").unwrap();
    std::fs::create_dir(d.join("adir")).unwrap();
    for (path, what) in [("file", "not a socket"), ("adir", "a directory")] {
        let out = support::spool_unchecked(d, &["rpc", "-s", path, "bdev_get_bdevs"]);
        assert_eq!(out.code, Some(1), "{}", out.stderr);
        assert_eq!(
            out.stderr.trim_end(),
            format!("error: {path}: connect: {what}: give the daemon's JSON-RPC socket (spool serve --rpc PATH; default /var/tmp/spool.sock)")
        );
    }
}
