//! Goal: the command line a storage engineer trusts (issue 19): sizes read as dd reads them,
//! errors in words that name the path, the fix and nothing internal, a typo that cannot
//! destroy data (shrink, re-init, perf over a store, a qcow2 imported as raw), one set of name
//! rules, one id format, and a dump that says `\xNN` and exits 2 on problems. Method: run the
//! built binary as a user runs it; assert the exit code, the exact stderr line, and that the
//! image's bytes did not change when a command was refused.

mod support;

use std::path::Path;

use support::{json, ok_in, spool_in, SmallFs};

const MIB: u64 = 1 << 20;

/// A fresh store of `mib` MiB (1 MiB clusters) at `dir/store.img`.
fn store(dir: &Path, mib: u64) -> &'static str {
    ok_in(dir, &["init", "store.img", "--size", &format!("{mib}M")]);
    "store.img"
}

fn image_bytes(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap()
}

/// Runs `args`, expecting exit `code` and exactly `line` on stderr (one line, or the first
/// line of clap's usage errors), nothing on stdout, and `image` unchanged byte for byte.
fn refused(dir: &Path, image: &str, args: &[&str], code: i32, line: &str) {
    let before = std::fs::read(dir.join(image)).ok();
    let run = spool_in(dir, args);
    assert_eq!(run.code, Some(code), "spool {args:?}: {}", run.stderr);
    assert_eq!(
        run.stderr.lines().next().unwrap_or_default(),
        line,
        "spool {args:?}"
    );
    if code == 1 {
        assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    }
    assert!(run.stdout.is_empty(), "spool {args:?}: {}", run.text());
    let after = std::fs::read(dir.join(image)).ok();
    assert!(before == after, "spool {args:?} changed {image}");
}

fn ls(dir: &Path) -> Vec<serde_json::Value> {
    json(&ok_in(dir, &["ls", "store.img", "--json"]))
        .as_array()
        .unwrap()
        .clone()
}

/// The one id `create`, `snapshot` or `clone` printed: hex, alone on its line.
fn printed_id(dir: &Path, args: &[&str]) -> String {
    let text = ok_in(dir, args).text();
    let id = text.trim_end().to_string();
    assert!(
        id.starts_with("0x") && text == format!("{id}\n"),
        "{args:?} printed {text:?}"
    );
    id
}

#[test]
fn sizes_read_kb_mb_gb_as_decimal_and_k_m_g_as_binary() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    store(d, 256);
    let id = printed_id(d, &["create", "store.img", "--size", "100MB", "--thin"]);
    let binary = printed_id(d, &["create", "store.img", "--size", "100MiB", "--thin"]);
    let plain = printed_id(d, &["create", "store.img", "--size", "100M", "--thin"]);
    let blobs = ls(d);
    let clusters = |id: &str| {
        blobs
            .iter()
            .find(|blob| blob["id_hex"] == id)
            .map(|blob| blob["num_clusters"].as_u64().unwrap())
            .unwrap()
    };
    assert_eq!(
        clusters(&id),
        100_000_000u64.div_ceil(MIB),
        "100MB is 10^8 bytes"
    );
    assert_eq!(clusters(&binary), 100);
    assert_eq!(clusters(&plain), 100);
    refused(
        d,
        "store.img",
        &["create", "store.img", "--size", "-1"],
        2,
        "error: invalid value '-1' for '--size <BYTES>': size cannot be negative ('-1')",
    );
    refused(
        d,
        "store.img",
        &["resize", "store.img", &id, "-1M"],
        2,
        "error: invalid value '-1M' for '<BYTES>': size cannot be negative ('-1M')",
    );
}

#[test]
fn errors_name_the_path_say_what_is_wrong_and_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    store(d, 64);
    std::fs::create_dir(d.join("adir")).unwrap();
    refused(
        d,
        "adir",
        &["info", "adir"],
        1,
        "error: adir: is a directory, not an image: give the store's file or block device",
    );
    std::fs::write(d.join("junk"), support::pattern(3, 1 << 20)).unwrap();
    refused(
        d,
        "junk",
        &["info", "junk"],
        1,
        "error: junk: not a blobstore: no SPDKBLOB signature (spool init formats one)",
    );
    refused(
        d,
        "store.img",
        &["create", "store.img", "--size", "1T"],
        1,
        "error: store.img: no space for a 1 TiB blob: it needs 1048576 clusters of 1 MiB (1 TiB) and 63 are free (63 MiB); free some, or make the blob thin (--thin) to allocate on write",
    );
    let id = printed_id(d, &["create", "store.img", "--size", "60M"]);
    refused(
        d,
        "store.img",
        &["resize", "store.img", &id, "70M"],
        1,
        "error: store.img: no space to grow blob 0x100000000 to 70 MiB: it needs 10 clusters of 1 MiB (10 MiB) and 3 are free (3 MiB); free some, or give a smaller size (a thick blob takes every cluster of its new size when it grows)",
    );
    refused(
        d,
        "store.img",
        &["export", "store.img", &id, "adir"],
        1,
        "error: adir: is a directory: give the path of a file to write (or - for standard output)",
    );
    // `--output` names a new file: an existing one (even the image itself) is refused before
    // anything is copied or said.
    for existing in ["store.img", "junk"] {
        refused(
            d,
            "store.img",
            &["check", "store.img", "--repair", "--output", existing],
            1,
            &format!("error: {existing}: exists already: --output names a new file for the repaired copy (to repair store.img in place, leave --output out)"),
        );
    }
}

#[test]
fn one_typo_cannot_destroy_data() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    store(d, 128);
    ok_in(
        d,
        &["create", "store.img", "--size", "100M", "--name", "vol"],
    );
    // A shrink needs --shrink.
    refused(
        d,
        "store.img",
        &["resize", "store.img", "vol", "1M"],
        1,
        "error: store.img: blob 0x100000000 is 100 MiB; resizing it to 1 MiB would drop the data past that: add --shrink if that is what you want",
    );
    ok_in(d, &["resize", "store.img", "vol", "1M", "--shrink"]);
    assert_eq!(ls(d)[0]["num_clusters"], 1);
    // init over a store needs --force.
    refused(
        d,
        "store.img",
        &["init", "store.img"],
        1,
        "error: store.img: holds a blobstore already; init would lose every blob in it: add --force to format it anyway",
    );
    ok_in(d, &["init", "store.img", "--force"]);
    assert!(ls(d).is_empty());
    // perf writing to a file that holds a store needs --force; reading it does not.
    refused(
        d,
        "store.img",
        &["perf", "--target", "store.img", "--rw", "randwrite", "--time", "0.1", "-q"],
        1,
        "error: store.img: holds a blobstore (SPDKBLOB super block) that this job would overwrite: point --target elsewhere, or add --force to lose it",
    );
    refused(
        d,
        "store.img",
        &["perf", "--target", "store.img", "--layer", "blob", "--time", "0.1", "-q"],
        1,
        "error: store.img: holds a blobstore (SPDKBLOB super block) that this job would overwrite: point --target elsewhere, or add --force to lose it",
    );
    ok_in(
        d,
        &[
            "perf",
            "--target",
            "store.img",
            "--rw",
            "randread",
            "--time",
            "0.1",
            "-q",
            "--json",
        ],
    );
    // A disk image format is not imported as raw bytes unless forced.
    ok_in(d, &["create", "store.img", "--size", "4M", "--name", "vol"]);
    let mut qcow2 = b"QFI\xfb\0\0\0\x03".to_vec();
    qcow2.resize(1 << 20, 0);
    let mut vhd = vec![0u8; 1 << 20];
    let footer = vhd.len() - 512;
    vhd[footer..footer + 8].copy_from_slice(b"conectix");
    let mut vmdk = b"KDMV\x01\0\0\0".to_vec();
    vmdk.resize(1 << 20, 0);
    for (file, bytes, format) in [
        ("disk.qcow2", &qcow2, "qcow2"),
        ("disk.vhd", &vhd, "VHD"),
        ("disk.vmdk", &vmdk, "VMDK"),
    ] {
        std::fs::write(d.join(file), bytes).unwrap();
        refused(
            d,
            "store.img",
            &["import", "store.img", "vol", file],
            1,
            &format!("error: {file}: is a {format} image, not raw data: convert it to raw with qemu-img first (qemu-img convert -O raw {file} out.raw), or add --force to copy its bytes as they are"),
        );
    }
    ok_in(d, &["import", "store.img", "vol", "disk.qcow2", "--force"]);
    assert_eq!(ls(d)[0]["num_allocated_clusters"], 4);
}

#[test]
fn names_follow_one_set_of_rules_and_rename_applies_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    store(d, 64);
    ok_in(d, &["create", "store.img", "--size", "1M", "--name", "a"]);
    ok_in(d, &["create", "store.img", "--size", "1M", "--name", "b"]);
    let long = "n".repeat(100);
    // A name that breaks the rules is a bad argument (exit 2); a name taken fails (exit 1).
    let cases: [(&[&str], i32, String); 8] = [
        (
            &["create", "store.img", "--size", "1M", "--xattr", "name=x", "--xattr", "name=y"],
            2,
            "error: --xattr name=... is given more than once: a blob has one name".into(),
        ),
        (
            &["create", "store.img", "--size", "1M", "--name", "x", "--xattr", "name=y"],
            2,
            "error: give the name with --name or with --xattr name=..., not both".into(),
        ),
        (
            &["rename", "store.img", "a", ""],
            2,
            "error: the blob name is empty".into(),
        ),
        (
            &["xattr", "store.img", "a", "set", "name", &long],
            2,
            format!("error: the blob name '{long}' is 100 bytes; at most 63 fit SPDK's 64-byte name"),
        ),
        (
            &["xattr", "store.img", "a", "set", "name", "b"],
            1,
            "error: a blob named 'b' already exists (0x100000002); names are unique in a store"
                .into(),
        ),
        (
            &["xattr", "store.img", "a", "set", "name", "0x100000002"],
            2,
            "error: the blob name '0x100000002' reads as a blob id; a name must not (it could not be told from one)".into(),
        ),
        (
            &["rename", "store.img", "a", "b"],
            1,
            "error: a blob named 'b' already exists (0x100000002); names are unique in a store"
                .into(),
        ),
        (
            &["create", "store.img", "--size", "1M", "--xattr", "name=4294967296"],
            2,
            "error: the blob name '4294967296' reads as a blob id; a name must not (it could not be told from one)".into(),
        ),
    ];
    for (args, code, line) in cases {
        refused(d, "store.img", args, code, &line);
    }
    ok_in(d, &["rename", "store.img", "a", "alpha"]);
    ok_in(d, &["rename", "store.img", "alpha", "alpha"]);
    ok_in(d, &["xattr", "store.img", "b", "set", "name", "beta"]);
    let names: Vec<_> = ls(d).iter().map(|blob| blob["name"].clone()).collect();
    assert_eq!(names, ["alpha", "beta"]);
    ok_in(d, &["resize", "store.img", "alpha", "2M"]);
}

#[test]
fn ids_print_in_hex_and_are_taken_in_hex_or_decimal() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    store(d, 64);
    let id = printed_id(d, &["create", "store.img", "--size", "1M", "--thin"]);
    assert_eq!(id, "0x100000000");
    let snap = printed_id(d, &["snapshot", "store.img", "4294967296"]);
    let clone = printed_id(d, &["clone", "store.img", &snap]);
    assert_eq!(
        [snap.as_str(), clone.as_str()],
        ["0x100000001", "0x100000002"]
    );
    ok_in(d, &["set-read-only", "store.img", "4294967298"]);
    ok_in(d, &["set-read-only", "store.img", "0x100000000"]);
}

#[test]
fn dump_escapes_as_xnn_decodes_snap_and_exits_2_on_problems() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    store(d, 64);
    ok_in(
        d,
        &[
            "create",
            "store.img",
            "--size",
            "1M",
            "--thin",
            "--name",
            "vol",
        ],
    );
    ok_in(
        d,
        &[
            "xattr",
            "store.img",
            "vol",
            "set",
            "bin",
            "0301ff1b",
            "--hex",
        ],
    );
    let snap = printed_id(d, &["snapshot", "store.img", "vol"]);
    let text = ok_in(d, &["dump", "store.img"]).text();
    assert!(
        text.contains("  xattr bin = \\x03\\x01\\xff\\x1b\n"),
        "{text}"
    );
    assert!(
        text.contains(&format!("  internal xattr SNAP = parent {snap}\n")),
        "{text}"
    );
    assert!(text.ends_with("problems: none\n"), "{text}");
    // Break md page 0's CRC: the dump goes on, lists it, and exits 2.
    let path = d.join("store.img");
    let mut bytes = image_bytes(d, "store.img");
    let page0 = 4 * 4096;
    bytes[page0 + 100] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let run = spool_in(d, &["dump", "store.img"]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.text().contains("problems: 1\n"), "{}", run.text());
    assert_eq!(
        run.stderr,
        "error: store.img: 1 problem(s) found (listed under problems)\n"
    );
    assert_eq!(image_bytes(d, "store.img"), bytes, "dump never writes");
}

#[test]
fn perf_refuses_a_missing_dev_path_and_labels_what_the_target_is() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let typo = "/dev/spool-issue19-no-such-device";
    let run = spool_in(
        d,
        &["perf", "--target", typo, "--size", "16M", "--time", "0.1"],
    );
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert_eq!(
        run.stderr,
        format!("error: {typo}: no such device (a missing path under /dev is not created: check the device name, e.g. with lsblk)\n")
    );
    assert!(!Path::new(typo).exists(), "nothing was created in /dev");

    let null = ok_in(d, &["perf", "--target", "null", "--time", "0.1", "-q"]).text();
    let lines: Vec<&str> = null.lines().collect();
    assert!(
        lines[0].starts_with("spool perf: null (no device, bdev layer"),
        "{null}"
    );
    assert!(lines[1].ends_with("max_us stack_ns/IO"), "{null}");
    let file = ok_in(
        d,
        &[
            "perf", "--target", "f.img", "--size", "8M", "--time", "0.1", "-q",
        ],
    )
    .text();
    let lines: Vec<&str> = file.lines().collect();
    assert!(
        lines[0].starts_with("spool perf: f.img (uring, file on "),
        "{file}"
    );
    assert!(lines[1].ends_with("max_us"), "no ns/IO on a device: {file}");
    let ram = ok_in(d, &["perf", "--target", "malloc:8M", "--time", "0.1", "-q"]).text();
    assert!(
        ram.starts_with("spool perf: malloc:8M (RAM, bdev layer"),
        "{ram}"
    );
}

/// `chattr +i` on a path for as long as it lives (`chattr -i` on drop, so the temporary
/// directory can be removed); `None` when the filesystem or the user cannot set it.
struct Immutable(std::path::PathBuf);

impl Immutable {
    fn set(path: &Path) -> Option<Immutable> {
        let done = std::process::Command::new("chattr")
            .arg("+i")
            .arg(path)
            .output()
            .ok()?;
        done.status.success().then(|| Immutable(path.to_path_buf()))
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
    }
}

/// The commands that only read work on an image nobody may write: immutable (refused even
/// to root: this is what proves they open it `O_RDONLY`), and mode 0444 for a user who is
/// not root (run through setpriv when the test runs as root). They write nothing: a dirty
/// store is recovered in memory only.
#[test]
fn read_only_commands_work_on_an_image_nobody_may_write() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    store(d, 64);
    ok_in(d, &["create", "store.img", "--size", "1M", "--name", "vol"]);
    std::fs::write(d.join("hello.txt"), b"hello\n").unwrap();
    ok_in(d, &["import", "store.img", "vol", "hello.txt"]);
    // Mark the store dirty (clean flag at byte 16 of the super block), so a load replays it.
    let path = d.join("store.img");
    let mut bytes = image_bytes(d, "store.img");
    bytes[16..20].copy_from_slice(&0u32.to_le_bytes());
    let crc = crc32c::crc32c(&bytes[..4092]);
    bytes[4092..4096].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();

    let readers: [&[&str]; 6] = [
        &["ls", "store.img"],
        &["info", "store.img", "--json"],
        &["export", "store.img", "vol", "-", "--length", "6"],
        &["xattr", "store.img", "vol", "get", "name"],
        &["super", "store.img"],
        &["dump", "store.img"],
    ];
    let check_readers = |who: &str| {
        for args in readers {
            let run = spool_in(d, args);
            assert_eq!(run.code, Some(0), "{who}: spool {args:?}: {}", run.stderr);
        }
        let info = json(&ok_in(d, &["info", "store.img", "--json"]));
        assert_eq!(info["clean"], false, "{who}: the image stays dirty");
        assert_eq!(info["recovered"], true, "{who}: recovered in memory");
        let out = ok_in(d, &["export", "store.img", "vol", "-", "--length", "6"]);
        assert_eq!(out.stdout, b"hello\n", "{who}");
        assert!(
            image_bytes(d, "store.img") == bytes,
            "{who}: nothing written"
        );
    };
    check_readers("anyone");

    match Immutable::set(&path) {
        Some(_immutable) => {
            check_readers("immutable");
            refused(
                d,
                "store.img",
                &["create", "store.img", "--size", "1M"],
                1,
                "error: store.img: cannot be opened for writing: operation not permitted (is it immutable? see lsattr); this command writes the image (ls, info, export and dump only read it)",
            );
        }
        None => eprintln!("chattr +i is not available here: the immutable case is skipped"),
    }

    // Mode 0444, for a user who is not root.
    let as_root = std::fs::metadata("/proc/self")
        .map(|meta| std::os::unix::fs::MetadataExt::uid(&meta) == 0)
        .unwrap_or(false);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).unwrap();
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_nobody = |args: &[&str]| {
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(env!("CARGO_BIN_EXE_spool"))
            .args(args)
            .current_dir(d)
            .output()
    };
    if as_root && as_nobody(&["--version"]).is_ok_and(|out| out.status.success()) {
        for args in readers {
            let out = as_nobody(args).unwrap();
            assert!(
                out.status.success(),
                "nobody: spool {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let out = as_nobody(&["create", "store.img", "--size", "1M"]).unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            "error: store.img: cannot be opened for writing: permission denied; this command writes the image (ls, info, export and dump only read it)\n"
        );
        assert!(image_bytes(d, "store.img") == bytes, "nothing written");
    } else if !as_root {
        check_readers("a user who is not root");
    }
}

/// Bytes of disk a file takes (its allocated 512-byte blocks).
fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// A thick blob on a file-backed store reserves its clusters on the host when it is created
/// or grown (fallocate); a thin one stays sparse. On a host filesystem too small for it, the
/// create fails up front, in words, and changes nothing; a thin blob that fills the host says
/// after how many bytes.
#[test]
fn thick_blobs_reserve_their_space_on_the_host_and_thin_ones_stay_sparse() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    store(d, 256);
    let path = d.join("store.img");
    let before = allocated_bytes(&path);
    ok_in(d, &["create", "store.img", "--size", "100M", "--thin"]);
    assert!(
        allocated_bytes(&path) < before + MIB,
        "a thin blob takes no disk"
    );
    ok_in(
        d,
        &["create", "store.img", "--size", "64M", "--name", "thick"],
    );
    assert!(
        allocated_bytes(&path) >= before + 64 * MIB,
        "a thick blob's clusters are reserved: {} bytes",
        allocated_bytes(&path)
    );
    ok_in(d, &["resize", "store.img", "thick", "96M"]);
    assert!(
        allocated_bytes(&path) >= before + 96 * MIB,
        "and so is its growth"
    );

    let Some(_small) = SmallFs::mount(&d.join("small"), 48) else {
        eprintln!("cannot mount a tmpfs here: the full-host case is skipped");
        return;
    };
    let small = d.join("small");
    ok_in(&small, &["init", "s.img", "--size", "200M"]);
    refused(
        &small,
        "s.img",
        &["create", "s.img", "--size", "100M"],
        1,
        "error: s.img: the host filesystem is full: reserving 100 MiB for a 100 MiB blob failed (No space left on device); free space on the host, or make the blob thin (--thin) to allocate on write",
    );
    let blobs = json(&ok_in(&small, &["ls", "s.img", "--json"]));
    assert_eq!(blobs.as_array().unwrap().len(), 0, "no blob came to be");
    ok_in(
        &small,
        &[
            "create", "s.img", "--size", "100M", "--thin", "--name", "thin",
        ],
    );
    std::fs::write(d.join("big.bin"), support::pattern(5, 64 << 20)).unwrap();
    let big = d.join("big.bin");
    let run = spool_in(&small, &["import", "s.img", "thin", big.to_str().unwrap()]);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    let line = run.stderr.trim_end();
    assert!(
        line.starts_with("error: s.img: the host filesystem is full after ")
            && line.ends_with(&format!(" of 67108864 bytes of {} were written to blob 0x100000000: No space left on device (free space on the host; a thick blob reserves its space when it is created)", big.display())),
        "{}",
        run.stderr
    );
}

/// The third review's minor lines: a zero size says so (and `-0` is zero, not negative), a
/// snapshot's rename says why it cannot, and a perf target that is a dangling symlink says
/// what it is instead of "exists already".
#[test]
fn zero_sizes_snapshot_renames_and_dangling_targets_are_said_in_words() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for zero in ["0", "-0"] {
        let run = spool_in(d, &["init", "z.img", "--size", zero]);
        assert_eq!(run.code, Some(2), "{}", run.stderr);
        assert!(
            run.stderr.contains(&format!(
                "size cannot be 0 ('{zero}'): give a size of at least one byte"
            )),
            "{}",
            run.stderr
        );
        assert!(!d.join("z.img").exists());
    }
    store(d, 64);
    ok_in(d, &["create", "store.img", "--size", "4M", "--name", "v"]);
    let snap = printed_id(d, &["snapshot", "store.img", "v", "--name", "snap"]);
    refused(
        d,
        "store.img",
        &["rename", "store.img", "snap", "snap2"],
        1,
        &format!("error: blob {snap} is read-only (a snapshot, or set read-only): its metadata does not change, so it keeps the name it has"),
    );
    std::os::unix::fs::symlink(d.join("missing.img"), d.join("dangling.img")).unwrap();
    let run = spool_in(
        d,
        &[
            "perf",
            "--target",
            "dangling.img",
            "--size",
            "16M",
            "--time",
            "1",
            "-q",
        ],
    );
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(
        run.stderr
            .starts_with("error: dangling.img: a symbolic link to ")
            && run.stderr.contains("which does not exist"),
        "{}",
        run.stderr
    );
}
