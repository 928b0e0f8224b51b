//! Review of issue 19 (the command line a storage engineer trusts): what a fresh reviewer
//! confirmed by running the built binary as a user would, each case a failing test until it
//! is fixed. Method as in `guard_rails.rs`: run `spool`, assert the exit code, the stderr line
//! and that a refused command left the image byte for byte as it was.
//!
//! Where the fix's wording is not settled, the test asserts the start of the line (what the
//! message must name) rather than inventing its every word.

mod support;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::{clean, json, kill, ok_in, refused_with, spool_unchecked as run, SmallFs};

fn refused(dir: &Path, image: &str, args: &[&str], code: i32, line: &str) {
    refused_with(dir, image, args, code, line, true);
}

/// No internals in an error line: no bdev names, no errno numbers, no Rust io error tails.
fn assert_in_words(line: &str) {
    for internal in ["bdev '", "errno", "os error", "(errno"] {
        assert!(
            !line.contains(internal),
            "internal detail {internal:?} in {line:?}"
        );
    }
}

fn num_blobs(dir: &Path, image: &str) -> u64 {
    json(&ok_in(dir, &["info", image, "--json"]))["num_blobs"]
        .as_u64()
        .unwrap()
}

// ---------------------------------------------------------------------------------------
// Ctrl-C during export must not delete what FILE was when it is not a file of its own.
// ---------------------------------------------------------------------------------------

/// An interrupted export "removes its partial output file": but it removes whatever FILE is,
/// so `spool export IMAGE vol /dev/sdX` (a volume copied to a disk) or `... /dev/null`
/// interrupted as root deletes the device node, and a FIFO a reader waits on is deleted too.
/// Confirmed by hand with a character device made by mknod (c 1 3) and with a FIFO; here a
/// FIFO (no root needed) with a slow reader so the export is surely still running.
#[test]
fn interrupted_export_into_a_fifo_leaves_the_fifo_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok_in(d, &["init", "s.img", "--size", "1G"]);
    ok_in(
        d,
        &[
            "create", "s.img", "--size", "512M", "--thin", "--name", "vol",
        ],
    );
    let fifo = d.join("out.fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let reader_path = fifo.clone();
    let reader = std::thread::spawn(move || {
        let mut file = std::fs::File::open(&reader_path).unwrap();
        let mut buf = vec![0u8; 64 << 10];
        let mut total = 0u64;
        loop {
            match file.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n as u64,
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        total
    });
    let child = Command::new(env!("CARGO_BIN_EXE_spool"))
        .args(["export", "s.img", "vol", "out.fifo"])
        .current_dir(d)
        .env_remove("SPOOL_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    kill(child.id(), libc::SIGINT);
    let output = child.wait_with_output().unwrap();
    let copied = reader.join().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(copied < 512 << 20, "the export was still running");
    assert!(
        stderr.starts_with("error: interrupted by SIGINT after "),
        "{stderr}"
    );
    assert!(
        std::fs::symlink_metadata(&fifo).is_ok(),
        "the interrupted export deleted the FIFO it was writing into (it would delete /dev/sdX or /dev/null the same way)"
    );
    assert!(clean(d, "s.img"));
}

// ---------------------------------------------------------------------------------------
// Names: one set of rules everywhere.
// ---------------------------------------------------------------------------------------

/// `create --xattr name=A --xattr name=B` checks only the first name: B may duplicate another
/// blob's name, or be 100 bytes long, and is what gets stored.
#[test]
fn a_repeated_xattr_name_on_create_cannot_bypass_the_name_rules() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok_in(d, &["init", "s.img", "--size", "64M"]);
    ok_in(d, &["create", "s.img", "--size", "1M", "--name", "b"]);
    let before = std::fs::read(d.join("s.img")).unwrap();
    let out = run(
        d,
        &[
            "create", "s.img", "--size", "1M", "--xattr", "name=zz", "--xattr", "name=b",
        ],
    );
    assert_eq!(
        out.code,
        Some(2),
        "a second blob named 'b' was made (or not refused as a bad argument): {}",
        out.text()
    );
    assert!(out.stderr.starts_with("error: "), "{}", out.stderr);
    assert_eq!(before, std::fs::read(d.join("s.img")).unwrap());
    assert_eq!(num_blobs(d, "s.img"), 1);

    let long = format!("name={}", "q".repeat(100));
    let out = run(
        d,
        &[
            "create", "s.img", "--size", "1M", "--xattr", "name=ok", "--xattr", &long,
        ],
    );
    assert_eq!(
        out.code,
        Some(2),
        "a 100-byte name was stored (or not refused as a bad argument): {}",
        out.text()
    );
    assert_eq!(num_blobs(d, "s.img"), 1);
}

/// In an lvol store a BLOB is looked up by lvol uuid and alias `lvs/lvol` before names, so a
/// blob renamed to another lvol's alias (or uuid) cannot be reached by its name, and a command
/// given that name acts on the other lvol: `delete lvs.img lvs0/a` deleted lvol `a`, not the
/// lvol named `lvs0/a`. Such a name is like an id-like name and must be refused the same way.
#[test]
fn an_lvol_cannot_be_named_like_another_lvols_alias_or_uuid() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok_in(d, &["init", "l.img", "--size", "64M", "--lvs", "lvs0"]);
    ok_in(d, &["create", "l.img", "--size", "4M", "--name", "a"]);
    ok_in(d, &["create", "l.img", "--size", "4M", "--name", "b"]);
    refused_with(
        d,
        "l.img",
        &["rename", "l.img", "b", "lvs0/a"],
        1,
        "error: the blob name 'lvs0/a' ",
        false,
    );
    let lvols = json(&ok_in(d, &["ls", "l.img", "--json"]));
    let uuid_of_a = lvols
        .as_array()
        .unwrap()
        .iter()
        .find(|blob| blob["name"] == "a")
        .map(|blob| blob["uuid"].as_str().unwrap().to_string())
        .unwrap();
    refused_with(
        d,
        "l.img",
        &["rename", "l.img", "b", &uuid_of_a],
        1,
        &format!("error: the blob name '{uuid_of_a}' "),
        false,
    );
    refused_with(
        d,
        "l.img",
        &["create", "l.img", "--size", "4M", "--name", "lvs0/a"],
        1,
        "error: the blob name 'lvs0/a' ",
        false,
    );
}

// ---------------------------------------------------------------------------------------
// Sizes: overflow is a refusal in words, never a panic.
// ---------------------------------------------------------------------------------------

/// `create --size 18446744073709551615` (or `resize` to `0xffffffffffffffff`) parses, then
/// panics on a reactor ("attempt to multiply with overflow" in `clusters_for`): "work on
/// reactor 0 panicked". `16P` gets words ("... clusters is more than the 67108864 this build
/// supports per blob"); the largest sizes must too.
#[test]
fn the_largest_sizes_are_refused_in_words_not_by_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok_in(d, &["init", "s.img", "--size", "64M"]);
    ok_in(d, &["create", "s.img", "--size", "4M", "--name", "v"]);
    let before = std::fs::read(d.join("s.img")).unwrap();
    for size in ["18446744073709551615", "0xffffffffffffffff", "16383P"] {
        for args in [
            &["create", "s.img", "--size", size, "--thin"][..],
            &["resize", "s.img", "v", size][..],
        ] {
            let out = run(d, args);
            assert!(
                !out.stderr.contains("panicked"),
                "spool {args:?} panicked: {}",
                out.stderr
            );
            assert_eq!(out.code, Some(1), "spool {args:?}: {}", out.stderr);
            // A "note: ... rounded up" line may come first; the error is the last line.
            let last = out.stderr.lines().last().unwrap_or_default();
            assert!(
                last.starts_with("error: s.img: "),
                "spool {args:?}: {}",
                out.stderr
            );
            assert!(out.stdout.is_empty(), "spool {args:?}: {}", out.text());
            assert_eq!(before, std::fs::read(d.join("s.img")).unwrap(), "{args:?}");
        }
    }
}

/// `perf --block-size 0` panics in the engine ("attempt to divide by zero"), exit 101.
#[test]
fn perf_block_size_zero_is_a_usage_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(
        dir.path(),
        &[
            "perf",
            "--target",
            "null",
            "--block-size",
            "0",
            "--time",
            "0.2",
            "-q",
        ],
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stderr.starts_with("error: "), "{}", out.stderr);
}

/// `perf --bs -1` and `--cluster-size -1` are sizes, but get clap's "unexpected argument
/// '-1' found" (and a usage block) where `perf --size -1` says "size cannot be negative".
#[test]
fn perf_negative_bs_and_cluster_size_say_a_size_cannot_be_negative() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = run(d, &["perf", "--target", "null", "--size", "-1", "-q"]);
    assert_eq!(out.code, Some(2));
    assert_eq!(
        out.stderr.trim_end(),
        "error: size cannot be negative ('-1')"
    );
    for args in [
        &["perf", "--target", "null", "--bs", "-1", "-q"][..],
        &[
            "perf",
            "--target",
            "malloc:64M",
            "--layer",
            "blob",
            "--cluster-size",
            "-1",
            "-q",
        ][..],
    ] {
        let out = run(d, args);
        assert_eq!(out.code, Some(2), "{args:?}: {}", out.stderr);
        assert_eq!(
            out.stderr.lines().next().unwrap_or_default(),
            "error: size cannot be negative ('-1')",
            "{args:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Errors in words.
// ---------------------------------------------------------------------------------------

/// `dump` (and `check`) of a file that is not a store still say "super block version
/// 3547997121 is not supported", the very line the issue quotes; the other commands say
/// "not a blobstore: no SPDKBLOB signature". And `dump adir` says "read at byte 0: Is a
/// directory (os error 21)" where the others say "is a directory, not an image".
#[test]
fn dump_and_check_say_not_a_store_and_directory_in_words() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let junk: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(d.join("junk"), &junk).unwrap();
    std::fs::create_dir(d.join("adir")).unwrap();
    refused(
        d,
        "junk",
        &["info", "junk"],
        1,
        "error: junk: not a blobstore: no SPDKBLOB signature (spool init formats one)",
    );
    for command in ["dump", "check"] {
        refused(
            d,
            "junk",
            &[command, "junk"],
            1,
            "error: junk: not a blobstore: no SPDKBLOB signature (spool init formats one)",
        );
        refused(
            d,
            "adir",
            &[command, "adir"],
            1,
            "error: adir: is a directory, not an image: give the store's file or block device",
        );
    }
}

/// An empty or short file as IMAGE, or a character device, leaks the bdev layer:
/// "bdev 'empty': size 0 bytes is smaller than one block of 4096 bytes (errno -22)" and
/// "bdev '/dev/null': not a regular file or block device (errno -22)".
#[test]
fn an_empty_file_or_a_character_device_as_image_is_said_in_words() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("empty"), b"").unwrap();
    std::fs::write(d.join("short"), vec![7u8; 3000]).unwrap();
    for image in ["empty", "short", "/dev/null"] {
        for command in ["info", "ls"] {
            let out = run(d, &[command, image]);
            assert_eq!(out.code, Some(1), "{command} {image}: {}", out.stderr);
            let line = out.stderr.trim_end();
            assert!(
                line.starts_with(&format!("error: {image}: ")),
                "{command} {image}: {line}"
            );
            assert_in_words(line);
        }
    }
}

// ---------------------------------------------------------------------------------------
// A full host filesystem: ENOSPC in words everywhere, not only on create and import.
// ---------------------------------------------------------------------------------------

/// On a full host, a metadata write (`create --thin`: its md page lands in a hole of the
/// image) fails with "error: s.img: Write failed on the device: No space left on device (os
/// error 28) (errno -28)", and `decouple` (which writes the clusters it copies) likewise:
/// the very line the issue quotes. Expected: "the host filesystem is full ..." as
/// `create` and `import` say, and nothing changed.
#[test]
fn a_full_host_is_said_in_words_by_metadata_writes_and_decouple() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let Some(_small) = SmallFs::mount(&d.join("small"), 40) else {
        eprintln!("cannot mount a tmpfs here: skipped");
        return;
    };
    let s = d.join("small");
    ok_in(&s, &["init", "s.img", "--size", "200M"]);
    ok_in(&s, &["create", "s.img", "--size", "20M", "--name", "a"]);
    ok_in(&s, &["snapshot", "s.img", "a", "--name", "snap"]);
    // Fill the host filesystem.
    let filler = vec![0x5au8; 1 << 20];
    let mut fill = std::fs::File::create(s.join("filler")).unwrap();
    while std::io::Write::write_all(&mut fill, &filler).is_ok() {}
    drop(fill);

    let out = run(
        &s,
        &["create", "s.img", "--size", "1M", "--thin", "--name", "x"],
    );
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    let line = out.stderr.trim_end();
    assert!(
        line.starts_with("error: s.img: the host filesystem is full"),
        "{line}"
    );
    assert_in_words(line);
    assert!(clean(&s, "s.img"));
    assert_eq!(num_blobs(&s, "s.img"), 2, "no blob came to be");

    let out = run(&s, &["decouple", "s.img", "a"]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    let line = out.stderr.trim_end();
    assert!(
        line.starts_with("error: s.img: the host filesystem is full"),
        "{line}"
    );
    assert_in_words(line);
    assert!(clean(&s, "s.img"));
}

// ---------------------------------------------------------------------------------------
// Guard rails: /dev.
// ---------------------------------------------------------------------------------------

/// The /dev refusal is lexical: `perf --target /tmp/x/../../dev/NAME` (or a relative
/// `../dev/NAME`) is a missing path under /dev, but `std::path::absolute` keeps the `..`, so
/// the check passes and perf creates a file in /dev and measures it.
#[test]
fn a_missing_dev_path_spelt_with_dotdot_is_refused_too() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let name = format!("spool-review19-typo{}n1", std::process::id());
    let depth = d.components().count() - 1;
    let target = format!("{}/{}dev/{name}", d.display(), "../".repeat(depth));
    let in_dev = Path::new("/dev").join(&name);
    assert!(!in_dev.exists());
    let out = run(
        d,
        &[
            "perf", "--target", &target, "--size", "1M", "--time", "0.2", "-q",
        ],
    );
    let made = in_dev.exists();
    let _ = std::fs::remove_file(&in_dev);
    assert!(!made, "perf created {} in /dev", in_dev.display());
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(
        out.stderr.trim_end().ends_with(
            ": no such device (a missing path under /dev is not created: check the device name, e.g. with lsblk)"
        ),
        "{}",
        out.stderr
    );
}

// ---------------------------------------------------------------------------------------
// Ctrl-C during inflate of a blob with no parent.
// ---------------------------------------------------------------------------------------

/// Interrupting `inflate` of a thin blob that has no parent says "the blob still reads
/// through its parent": it has none (it reads zeros where it has no cluster).
#[test]
fn interrupted_inflate_of_a_parentless_blob_does_not_speak_of_a_parent() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let Some(_fs) = SmallFs::mount(&d.join("ram"), 1400) else {
        eprintln!("cannot mount a tmpfs here: skipped");
        return;
    };
    let r = d.join("ram");
    ok_in(&r, &["init", "s.img", "--size", "1100M"]);
    ok_in(
        &r,
        &["create", "s.img", "--size", "1G", "--thin", "--name", "t"],
    );
    let child = Command::new(env!("CARGO_BIN_EXE_spool"))
        .args(["inflate", "s.img", "t"])
        .current_dir(&r)
        .env_remove("SPOOL_LOG")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(150));
    kill(child.id(), libc::SIGINT);
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.starts_with("error: interrupted by SIGINT after "),
        "{stderr}"
    );
    assert!(!stderr.contains("parent"), "{stderr}");
    assert!(clean(&r, "s.img"));
}

// ---------------------------------------------------------------------------------------
// Guard rails in an lvol store: one command must not make the store one SPDK cannot open.
// ---------------------------------------------------------------------------------------

/// In an lvol store every lvol must carry a name (SPDK's loader refuses a blob without one,
/// and `create` there insists on `--name`), and the super blob holds the store's own name and
/// uuid. Yet each of these exits 0 and leaves a store SPDK will not open as the lvol store it
/// was (`info`: "warning: not an lvol store SPDK would open: ..."; later `create` fails with
/// "corrupt metadata: a blob of an lvol store has no `name` xattr"):
/// - `xattr lvs.img lv0 rm name`;
/// - `super lvs.img lv0` (lv0 becomes the store's super blob: `info` then calls the store
///   `lv0`, with lv0's uuid);
/// - `super lvs.img --clear`.
///
/// Expected: refused (or behind --force), in words, the image unchanged.
#[test]
fn an_lvol_store_is_not_broken_by_one_xattr_or_super_command() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok_in(d, &["init", "l.img", "--size", "64M", "--lvs", "lvs0"]);
    ok_in(d, &["create", "l.img", "--size", "4M", "--name", "lv0"]);
    for args in [
        &["xattr", "l.img", "lv0", "rm", "name"][..],
        &["super", "l.img", "lv0"][..],
        &["super", "l.img", "--clear"][..],
    ] {
        refused_with(d, "l.img", args, 1, "error: ", false);
    }
    let info = json(&ok_in(d, &["info", "l.img", "--json"]));
    assert_eq!(info["lvs_name"], "lvs0");
}

/// Not only Ctrl-C: any failed export removes FILE whatever it is. A FIFO whose reader stops
/// after 1 MiB gives "error: out.fifo: write: Broken pipe (os error 32)" and the FIFO is gone;
/// by hand, `export IMAGE BLOB NODE` where NODE is a block device smaller than the blob ends
/// with "NODE: write: No space left on device (os error 28)" and the device node deleted.
#[test]
fn a_failed_export_into_a_fifo_leaves_the_fifo_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok_in(d, &["init", "s.img", "--size", "64M"]);
    ok_in(d, &["create", "s.img", "--size", "32M", "--name", "vol"]);
    let fifo = d.join("out.fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let reader_path = fifo.clone();
    let reader = std::thread::spawn(move || {
        let mut file = std::fs::File::open(&reader_path).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let _ = file.read_exact(&mut buf);
        // The reader goes away: the export's next write fails with EPIPE.
    });
    let out = run(d, &["export", "s.img", "vol", "out.fifo"]);
    reader.join().unwrap();
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(
        out.stderr.starts_with("error: out.fifo: "),
        "{}",
        out.stderr
    );
    assert!(
        std::fs::symlink_metadata(&fifo).is_ok(),
        "the failed export deleted the FIFO it was writing into: {}",
        out.stderr
    );
}

// ---------------------------------------------------------------------------------------
// Ctrl-C stops every long command: perf --layer md and --layer snap ignore it.
// ---------------------------------------------------------------------------------------

/// `perf --layer md --blobs 20000` (about 8 s here) and `perf --layer snap --snapshots 150`
/// (about 12 s) take SIGINT 1 s in and run to their end, exit 0, full table: the signal is
/// recorded and never looked at. `--layer bdev` and `--layer blob` stop (exit 130, partial
/// table, "interrupted by SIGINT after 0.6 of 5 s").
#[test]
fn perf_md_and_snap_layers_stop_on_sigint() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &[
            "perf",
            "--target",
            "malloc:256M",
            "--layer",
            "md",
            "--blobs",
            "20000",
            "-q",
        ][..],
        &[
            "perf",
            "--target",
            "malloc:1G",
            "--layer",
            "snap",
            "--snapshots",
            "150",
            "--snap-gap",
            "50",
            "-q",
        ][..],
    ] {
        let child = Command::new(env!("CARGO_BIN_EXE_spool"))
            .args(args)
            .current_dir(dir.path())
            .env_remove("SPOOL_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(1000));
        let started = std::time::Instant::now();
        kill(child.id(), libc::SIGINT);
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(130),
            "{args:?} ran {:?} past the SIGINT: {stderr}",
            started.elapsed()
        );
        assert!(
            stderr.contains("error: interrupted by SIGINT after "),
            "{args:?}: {stderr}"
        );
    }
}

/// `init b.img --size 1000` names the temporary file and the bdev layer: "error: bdev
/// './.b.img.spool-new.26580.0': size 1000 bytes is smaller than one block of 4096 bytes
/// (errno -22)". Expected: the image the user named, in words, and nothing left behind.
#[test]
fn init_of_a_too_small_size_names_the_image_in_words() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = run(d, &["init", "b.img", "--size", "1000"]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    let line = out.stderr.trim_end();
    assert!(line.starts_with("error: b.img: "), "{line}");
    assert!(!line.contains("spool-new"), "{line}");
    assert_in_words(line);
    let left: Vec<_> = std::fs::read_dir(d).unwrap().collect();
    assert!(left.is_empty(), "init left {left:?}");
}

/// `check --repair --output NEW` copies the whole image first (5.4 s for a 2 GiB image with
/// 1.5 GiB written, here): SIGINT 0.3 s in is swallowed (the handler records it, nothing
/// looks at it) and the copy and repair run to the end, exit 0. Before the handlers, Ctrl-C
/// at least killed it; now it takes two.
#[test]
fn check_repair_output_stops_on_sigint() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let Some(_fs) = SmallFs::mount(&d.join("ram"), 2200) else {
        eprintln!("cannot mount a tmpfs here: skipped");
        return;
    };
    let r = d.join("ram");
    ok_in(&r, &["init", "c.img", "--size", "1G"]);
    ok_in(&r, &["create", "c.img", "--size", "900M", "--name", "v"]);
    let before = std::fs::read(r.join("c.img")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_spool"))
        .args(["check", "c.img", "--repair", "--output", "new.img"])
        .current_dir(&r)
        .env_remove("SPOOL_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let signalled = std::time::Instant::now();
    kill(child.id(), libc::SIGINT);
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(130),
        "ran {:?} past the SIGINT: {stderr}",
        signalled.elapsed()
    );
    assert!(stderr.contains("interrupted by SIGINT"), "{stderr}");
    assert!(before == std::fs::read(r.join("c.img")).unwrap());
}

/// `perf --target FILE --size 2G` writes FILE in full before measuring; SIGINT during that
/// stops it and removes the file ("error: p.img: creation interrupted by SIGINT after
/// 775946240 of 2147483648 bytes; nothing was created") but exits 1, where every interrupted
/// command exits 130 (143 for SIGTERM).
#[test]
fn perf_file_creation_interrupted_exits_130() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let Some(_fs) = SmallFs::mount(&d.join("ram"), 2200) else {
        eprintln!("cannot mount a tmpfs here: skipped");
        return;
    };
    let r = d.join("ram");
    let child = Command::new(env!("CARGO_BIN_EXE_spool"))
        .args([
            "perf", "--target", "p.img", "--size", "2G", "--time", "1", "-q",
        ])
        .current_dir(&r)
        .env_remove("SPOOL_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(150));
    kill(child.id(), libc::SIGINT);
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("interrupted by SIGINT after "), "{stderr}");
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(!r.join("p.img").exists());
}

// ---------------------------------------------------------------------------------------
// Exit codes: a bad argument is a usage error (2) whether clap or the command finds it.
// ---------------------------------------------------------------------------------------

/// The same mistake gets two exit codes: an empty xattr key is 2 for `create --xattr =v`
/// (clap) and 1 for `xattr IMAGE BLOB set "" v`; a bad `--block-size` is 2 but a 17-byte
/// `--bstype` or a `--hex` value that is not hex is 1. None of these needs the store: they
/// are a command line that does not parse (docs/cli.md: exit 2), and the image is untouched.
#[test]
fn argument_errors_found_before_the_store_is_opened_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok_in(d, &["init", "x.img", "--size", "64M"]);
    ok_in(d, &["create", "x.img", "--size", "1M", "--name", "a"]);
    let out = run(d, &["create", "x.img", "--size", "1M", "--xattr", "=v"]);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    refused(
        d,
        "x.img",
        &["xattr", "x.img", "a", "set", "", "v"],
        2,
        "error: the xattr name is empty",
    );
    refused(
        d,
        "x.img",
        &["xattr", "x.img", "a", "set", "k", "zz", "--hex"],
        2,
        "error: --hex value 'zz' is not whole hex bytes",
    );
    let out = run(
        d,
        &[
            "init",
            "y.img",
            "--size",
            "64M",
            "--bstype",
            "12345678901234567",
        ],
    );
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(!d.join("y.img").exists());
}

/// Clears `chattr +i` on drop, so the temporary directory can be removed.
struct Immutable(PathBuf);

impl Immutable {
    fn set(path: &Path) -> Option<Immutable> {
        let done = Command::new("chattr").arg("+i").arg(path).output().ok()?;
        done.status.success().then(|| Immutable(path.to_path_buf()))
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

/// Every writer says an image it cannot write in words ("cannot be opened for writing:
/// operation not permitted (is it immutable? see lsattr); ..."), but `check --repair` says
/// "error: s.img: Operation not permitted (os error 1)" (and "Read-only file system (os error
/// 30)" on a read-only mount), even when there is nothing to repair.
#[test]
fn check_repair_on_an_immutable_image_says_so_in_words() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok_in(d, &["init", "s.img", "--size", "64M"]);
    let Some(_immutable) = Immutable::set(&d.join("s.img")) else {
        eprintln!("chattr +i is not possible here: skipped");
        return;
    };
    refused(
        d,
        "s.img",
        &["create", "s.img", "--size", "1M"],
        1,
        "error: s.img: cannot be opened for writing: operation not permitted (is it immutable? see lsattr); this command writes the image (ls, info, export and dump only read it)",
    );
    let out = run(d, &["check", "s.img", "--repair"]);
    let line = out.stderr.lines().last().unwrap_or_default();
    assert!(line.starts_with("error: s.img: "), "{}", out.stderr);
    assert_in_words(line);
}

/// `init` on a full host: "error: s.img: Write failed on the device: No space left on device
/// (os error 28) (errno -28)" (the line the issue quotes), and with `--preallocate`
/// "error: p.img: reserve space (fallocate): No space left on device (os error 28)".
/// Expected: "the host filesystem is full ..." as `create` says it, and no file left.
#[test]
fn init_on_a_full_host_says_so_in_words() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let Some(_small) = SmallFs::mount(&d.join("small"), 8) else {
        eprintln!("cannot mount a tmpfs here: skipped");
        return;
    };
    let s = d.join("small");
    let filler = vec![0u8; 1 << 20];
    let mut fill = std::fs::File::create(s.join("filler")).unwrap();
    while std::io::Write::write_all(&mut fill, &filler).is_ok() {}
    drop(fill);
    for args in [
        &["init", "s.img", "--size", "64M"][..],
        &["init", "s.img", "--size", "4M", "--preallocate"][..],
    ] {
        let out = run(&s, args);
        assert_eq!(out.code, Some(1), "{args:?}: {}", out.stderr);
        let line = out.stderr.trim_end();
        assert!(
            line.starts_with("error: s.img: the host filesystem is full"),
            "{args:?}: {line}"
        );
        assert_in_words(line);
        assert!(!s.join("s.img").exists());
    }
}

/// `export` into a filesystem too small for the copy: "error: .../out.raw: write: No space
/// left on device (os error 28)": the host full, not in words, and not how far it got.
#[test]
fn export_onto_a_full_host_says_so_in_words() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok_in(d, &["init", "e.img", "--size", "64M"]);
    ok_in(d, &["create", "e.img", "--size", "16M", "--name", "v"]);
    let Some(_small) = SmallFs::mount(&d.join("small"), 8) else {
        eprintln!("cannot mount a tmpfs here: skipped");
        return;
    };
    let out = run(d, &["export", "e.img", "v", "small/out.raw"]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    let line = out.stderr.trim_end();
    assert!(
        line.starts_with("error: small/out.raw: the host filesystem is full after "),
        "{line}"
    );
    assert_in_words(line);
    assert!(!d.join("small/out.raw").exists());
}
