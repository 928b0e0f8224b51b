//! Fourth review of issue 19 (the command line a storage engineer trusts): the third
//! reviewer's minor list, each a failing test until fixed. Method as in `review19.rs`: run
//! the built binary as a user would, assert the exit code, the stderr line, and that what a
//! refused or failed command must not touch is byte for byte as it was.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;

use support::{
    clean, interrupted_once, json, ok_in, refused_with, scratch, spool, spool_unchecked as run,
    SmallFs,
};

/// Names in `dir` containing `part`.
fn leftovers(dir: &Path, part: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains(part))
        .collect()
}

/// No internals in an error line: no errno numbers, no Rust io error tails, no bdev names.
fn assert_in_words(stderr: &str) {
    for internal in ["os error", "errno", "bdev '", "panicked"] {
        assert!(
            !stderr.contains(internal),
            "internal detail {internal:?} in {stderr:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 1. serve: one path for the NBD socket and the JSON-RPC socket.
// ---------------------------------------------------------------------------------------

/// `serve IMAGE --socket X --rpc X` bound the NBD socket, then found it "live" when binding
/// the JSON-RPC socket and said "another process listens on it" (there was none: it was its
/// own). Expected: a bad argument (exit 2) said plainly, before anything is bound, also when
/// the two paths are spelled differently (`s.sock`, `./s.sock`), and for a `--socket` given
/// twice.
#[test]
fn serve_refuses_one_path_for_the_nbd_and_rpc_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok_in(d, &["init", "s.img", "--size", "16M"]);
    let cases: [(&[&str], &str); 3] = [
        (
            &["serve", "s.img", "--socket", "s.sock", "--rpc", "s.sock"],
            "error: --socket s.sock and --rpc s.sock: the NBD socket and the JSON-RPC socket cannot share a path; give --rpc another path (or --no-rpc)",
        ),
        (
            &["serve", "s.img", "--socket", "s.sock", "--rpc", "./s.sock"],
            "error: --socket s.sock and --rpc ./s.sock: the NBD socket and the JSON-RPC socket cannot share a path; give --rpc another path (or --no-rpc)",
        ),
        (
            &[
                "serve", "s.img", "--socket", "a.sock", "--socket", "./a.sock", "--rpc",
                "r.sock",
            ],
            "error: --socket a.sock and --socket ./a.sock: two NBD sockets cannot share a path; give each its own",
        ),
    ];
    for (args, line) in cases {
        let out = spool()
            .args(args)
            .current_dir(d)
            .stdin(Stdio::null())
            .output()
            .expect("spool runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().next(), Some(line), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}: nothing served");
        assert!(
            leftovers(d, ".sock").is_empty(),
            "{args:?}: a socket was bound"
        );
    }
    assert!(clean(d, "s.img"));
}

// ---------------------------------------------------------------------------------------
// 2. perf --layer md --blobs 0.
// ---------------------------------------------------------------------------------------

/// `perf --layer md --blobs 0` ran, exit 0, and printed a table of 0 ops/s rates (nothing
/// was timed); `--blobs -1` got clap's hint about `-- -1`. Expected: a bad argument (exit
/// 2) in words: "--blobs must be at least 1", "--blobs cannot be negative".
#[test]
fn perf_md_with_no_blobs_says_at_least_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (blobs, words) in [
        ("0", "--blobs must be at least 1"),
        ("-1", "--blobs cannot be negative"),
    ] {
        let out = run(
            d,
            &[
                "perf",
                "--layer",
                "md",
                "--target",
                "malloc:64M",
                "--blobs",
                blobs,
            ],
        );
        assert_eq!(out.code, Some(2), "--blobs {blobs}: {}", out.stderr);
        let first = out.stderr.lines().next().unwrap_or_default();
        assert!(
            first.starts_with("error: ") && first.contains(words),
            "--blobs {blobs}: {:?}",
            out.stderr
        );
        assert!(!out.stderr.contains("-- -1"), "{}", out.stderr);
        assert!(out.stdout.is_empty(), "--blobs {blobs}: {}", out.text());
    }
}

// ---------------------------------------------------------------------------------------
// 3. A truncated store: what to do.
// ---------------------------------------------------------------------------------------

/// A store whose file lost its tail said "error: t.img: super block field size: 67108864
/// bytes is larger than the device's 10485760 bytes": what is wrong in the super block's
/// terms, nothing on what to do. Expected, in the one-line style of the other errors: the
/// path, what is wrong in words, what to do, the same from every command (and nothing
/// written: the file stays as it is).
#[test]
fn a_truncated_store_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok_in(d, &["init", "t.img", "--size", "64M"]);
    ok_in(d, &["create", "t.img", "--size", "4M", "--name", "vol"]);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("t.img"))
        .unwrap();
    file.set_len(10 << 20).unwrap();
    drop(file);
    let line = "error: t.img: the store is truncated: its super block says 67108864 bytes (64 MiB), larger than the device (10485760 bytes, 10 MiB); the file lost its tail or the device is smaller than the store: restore the missing tail (or give the whole device), then run spool check t.img";
    for args in [
        &["info", "t.img"][..],
        &["ls", "t.img"],
        &["create", "t.img", "--size", "1M"],
        &["export", "t.img", "vol", "out.raw"],
    ] {
        refused_with(d, "t.img", args, 1, line, true);
    }
    assert!(!d.join("out.raw").exists(), "export made its FILE");
    // The daemon says it as the commands do.
    let out = spool()
        .args(["serve", "t.img", "--listen", "127.0.0.1:0", "--no-rpc"])
        .current_dir(d)
        .stdin(Stdio::null())
        .output()
        .expect("spool runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.lines().any(|l| l == line), "serve: {stderr}");
}

// ---------------------------------------------------------------------------------------
// 4. perf creating its target on a full host.
// ---------------------------------------------------------------------------------------

/// `perf --target small/p.img --size 64M` on a filesystem with 8 MiB free said "the host
/// filesystem is full: write failed (No space left on device); ..." where import says "the
/// host filesystem is full after N of M bytes ...". Expected: the same "after N of M bytes",
/// and nothing left behind (no target, no temporary file).
#[test]
fn perf_creating_its_target_on_a_full_host_says_after_how_many_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let Some(_small) = SmallFs::mount(&d.join("small"), 8) else {
        eprintln!("cannot mount a tmpfs here: skipped");
        return;
    };
    let out = run(
        d,
        &[
            "perf",
            "--target",
            "small/p.img",
            "--size",
            "64M",
            "--time",
            "1",
            "-q",
        ],
    );
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    let line = out.stderr.trim_end();
    let start = "error: small/p.img: the host filesystem is full after ";
    let tail = " of 67108864 bytes written while creating it (No space left on device); nothing was created: free space on the host, or give a smaller --size";
    assert!(
        line.starts_with(start) && line.ends_with(tail),
        "{:?}",
        out.stderr
    );
    let written: u64 = line[start.len()..line.len() - tail.len()]
        .parse()
        .unwrap_or_else(|_| panic!("a byte count: {line}"));
    assert!(
        written > 0 && written <= 8 << 20,
        "{written} bytes fit 8 MiB"
    );
    assert!(
        leftovers(&d.join("small"), "").is_empty(),
        "left behind: {:?}",
        leftovers(&d.join("small"), "")
    );
}

// ---------------------------------------------------------------------------------------
// 5. export over an existing FILE.
// ---------------------------------------------------------------------------------------

/// An interrupted `export IMAGE vol FILE`, FILE an existing regular file (yesterday's
/// backup), truncated FILE before copying and then deleted it: the old backup was lost and
/// no new one made. Expected: FILE as it was (the copy is made beside it and renamed over it
/// only when complete), no temporary file left, exit 130, the store clean.
#[test]
fn an_interrupted_export_leaves_an_existing_file_as_it_was() {
    let dir = scratch();
    let d = dir.path();
    ok_in(d, &["init", "s.img", "--size", "1G"]);
    ok_in(
        d,
        &[
            "create", "s.img", "--size", "768M", "--thin", "--name", "vol",
        ],
    );
    let old = support::pattern(7, 3 << 20);
    std::fs::write(d.join("backup.raw"), &old).unwrap();
    // Under way once the copy (beside FILE, or FILE itself) passes 1 MiB past its start.
    let out = interrupted_once(d, &["export", "s.img", "vol", "backup.raw"], || {
        std::fs::read_dir(d).unwrap().flatten().any(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let len = entry.metadata().map_or(0, |m| m.len());
            (name.contains("backup.raw.spool-new") && len >= 1 << 20)
                || (name == "backup.raw" && len != old.len() as u64)
        })
    });
    assert_eq!(out.code, Some(130), "{}", out.stderr);
    assert!(
        out.stderr
            .starts_with("error: interrupted by SIGINT after "),
        "{}",
        out.stderr
    );
    let now = std::fs::read(d.join("backup.raw"));
    assert!(
        now.as_ref().is_ok_and(|now| *now == old),
        "backup.raw was {}",
        match now {
            Ok(now) => format!("changed to {} bytes", now.len()),
            Err(err) => format!("deleted ({err})"),
        }
    );
    assert_eq!(leftovers(d, "spool-new"), Vec::<String>::new());
    assert!(clean(d, "s.img"));
}

/// A full host during `export IMAGE vol FILE` over an existing FILE truncated it and then
/// removed it. Expected: the error says how far it got, FILE keeps its old bytes, and the
/// temporary copy is gone (its space given back).
#[test]
fn a_full_host_during_export_leaves_an_existing_file_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok_in(d, &["init", "s.img", "--size", "64M"]);
    ok_in(d, &["create", "s.img", "--size", "32M", "--name", "vol"]);
    let Some(_small) = SmallFs::mount(&d.join("small"), 4) else {
        eprintln!("cannot mount a tmpfs here: skipped");
        return;
    };
    let old = support::pattern(3, 1 << 20);
    std::fs::write(d.join("small/out.raw"), &old).unwrap();
    let out = run(d, &["export", "s.img", "vol", "small/out.raw"]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(
        out.stderr
            .starts_with("error: small/out.raw: the host filesystem is full after ")
            && out.stderr.lines().count() == 1,
        "{}",
        out.stderr
    );
    assert_in_words(&out.stderr);
    let now = std::fs::read(d.join("small/out.raw"));
    assert!(
        now.as_ref().is_ok_and(|now| *now == old),
        "small/out.raw was {}",
        match now {
            Ok(now) => format!("changed to {} bytes", now.len()),
            Err(err) => format!("deleted ({err})"),
        }
    );
    assert_eq!(
        leftovers(&d.join("small"), "spool-new"),
        Vec::<String>::new()
    );
    assert!(clean(d, "s.img"));
}

/// A finished export over an existing FILE replaces its content and keeps what an in-place
/// write kept: the file's mode, and through a symlink the link (the link's target gets the
/// copy). No temporary file is left.
#[test]
fn a_finished_export_replaces_the_file_and_keeps_its_mode_and_link() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok_in(d, &["init", "s.img", "--size", "16M"]);
    ok_in(d, &["create", "s.img", "--size", "2M", "--name", "vol"]);
    let data = support::pattern(11, 2 << 20);
    std::fs::write(d.join("in.bin"), &data).unwrap();
    ok_in(d, &["import", "s.img", "vol", "in.bin"]);

    std::fs::create_dir(d.join("backups")).unwrap();
    std::fs::write(d.join("backups/day.raw"), b"old").unwrap();
    std::fs::set_permissions(
        d.join("backups/day.raw"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    std::os::unix::fs::symlink("backups/day.raw", d.join("latest.raw")).unwrap();
    ok_in(d, &["export", "s.img", "vol", "latest.raw"]);
    assert!(std::fs::read(d.join("backups/day.raw")).unwrap() == data);
    assert_eq!(
        std::fs::read_link(d.join("latest.raw")).unwrap(),
        Path::new("backups/day.raw")
    );
    let mode = std::fs::metadata(d.join("backups/day.raw"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o640);
    assert_eq!(
        leftovers(&d.join("backups"), "spool-new"),
        Vec::<String>::new()
    );
    assert_eq!(leftovers(d, "spool-new"), Vec::<String>::new());
    // A new FILE is made as before; stdout is written in place.
    ok_in(d, &["export", "s.img", "vol", "new.raw"]);
    assert!(std::fs::read(d.join("new.raw")).unwrap() == data);
    assert!(ok_in(d, &["export", "s.img", "vol", "-"]).stdout == data);
}

// ---------------------------------------------------------------------------------------
// 6. perf --json when an I/O fails.
// ---------------------------------------------------------------------------------------

/// `perf --json --plot run.svg` whose writes fail mid-run (a sparse target on a full host)
/// printed its text table on stderr, nothing on stdout, and drew no picture: a script that
/// parses perf's JSON got nothing exactly when the run went wrong. Expected, as for an
/// interrupted run: one JSON object on stdout (the figures, and the error), the SVG drawn,
/// then the error line in words, exit 1. Without --json the table goes to stdout too.
#[test]
fn perf_json_with_a_failed_io_prints_json_and_draws_the_plot() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let Some(_small) = SmallFs::mount(&d.join("small"), 8) else {
        eprintln!("cannot mount a tmpfs here: skipped");
        return;
    };
    let target = d.join("small/sp.img");
    std::fs::File::create(&target)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let out = run(
        d,
        &[
            "perf",
            "--target",
            "small/sp.img",
            "--rw",
            "write",
            "--time",
            "2",
            "-q",
            "--json",
            "--plot",
            "run.svg",
        ],
    );
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert_eq!(
        out.stderr.lines().count(),
        1,
        "only the error line on stderr: {}",
        out.stderr
    );
    assert!(
        out.stderr.starts_with("error: I/O failed: write at byte "),
        "{}",
        out.stderr
    );
    assert_in_words(&out.stderr);
    let report = json(&out);
    assert!(
        report["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("I/O failed: ")),
        "{report}"
    );
    assert!(report["total"]["errors"].as_u64().unwrap() > 0, "{report}");
    assert!(d.join("run.svg").exists(), "no picture drawn");

    std::fs::remove_file(&target).unwrap();
    std::fs::File::create(&target)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let out = run(
        d,
        &[
            "perf",
            "--target",
            "small/sp.img",
            "--rw",
            "write",
            "--time",
            "2",
            "-q",
        ],
    );
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(
        out.text().contains("total"),
        "the table on stdout: {}",
        out.text()
    );
    assert!(
        out.stderr.starts_with("error: I/O failed: ") && out.stderr.lines().count() == 1,
        "{}",
        out.stderr
    );
}
