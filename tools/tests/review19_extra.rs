//! Issue 19, three guard rails found before the fresh review (`review19.rs`): `import` reads a
//! block device; `init` refuses to format a file or device that holds something other than a
//! store (naming what) unless `--force`; the /dev rule leaves filesystems mounted below /dev
//! (the tmpfs at /dev/shm) alone. Method as in `guard_rails.rs`: the binary run as a user
//! runs it, the exit code, the stderr line, and that a refused command changed nothing.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::{fails_in, json, ok_in, spool_in};

/// A loop device over a file, detached on drop; `None` where losetup is not allowed.
struct Loop(PathBuf);

impl Loop {
    fn attach(file: &Path) -> Option<Loop> {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (!dev.is_empty()).then(|| Loop(PathBuf::from(dev)))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

#[test]
fn import_reads_a_block_device_whole() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data: Vec<u8> = (0..(4u32 << 20)).map(|i| (i % 251) as u8).collect();
    std::fs::write(d.join("src.raw"), &data).unwrap();
    let Some(dev) = Loop::attach(&d.join("src.raw")) else {
        eprintln!("no loop device here (needs root): skipped");
        return;
    };
    let dev = dev.0.display().to_string();
    ok_in(d, &["init", "s.img", "--size", "64M"]);
    ok_in(d, &["create", "s.img", "--size", "4M", "--name", "v"]);
    ok_in(d, &["import", "s.img", "v", &dev]);
    ok_in(d, &["export", "s.img", "v", "out.raw"]);
    assert_eq!(std::fs::read(d.join("out.raw")).unwrap(), data);
    // A device larger than the blob is refused in words, as a file is.
    ok_in(d, &["create", "s.img", "--size", "1M", "--name", "small"]);
    let line = fails_in(d, &["import", "s.img", "small", &dev]);
    assert!(line.contains("reaches past the end of blob"), "{line}");
}

#[test]
fn import_of_a_directory_or_a_character_device_is_refused_in_words() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok_in(d, &["init", "s.img", "--size", "64M"]);
    ok_in(d, &["create", "s.img", "--size", "1M", "--name", "v"]);
    std::fs::create_dir(d.join("adir")).unwrap();
    let before = std::fs::read(d.join("s.img")).unwrap();
    assert_eq!(
        fails_in(d, &["import", "s.img", "v", "adir"]),
        "error: adir: is a directory, not a regular file or block device (import reads one)"
    );
    assert_eq!(
        fails_in(d, &["import", "s.img", "v", "/dev/null"]),
        "error: /dev/null: not a regular file or block device (import reads one of known length)"
    );
    assert_eq!(before, std::fs::read(d.join("s.img")).unwrap());
}

#[test]
fn init_refuses_a_file_that_holds_something_else_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Data of no known kind.
    std::fs::write(d.join("data.img"), vec![0x41u8; 8 << 20]).unwrap();
    let before = std::fs::read(d.join("data.img")).unwrap();
    assert_eq!(
        fails_in(d, &["init", "data.img"]),
        "error: data.img: holds data (non-zero bytes in its first MiB), not a blobstore; init would overwrite it: add --force to format it anyway"
    );
    assert_eq!(before, std::fs::read(d.join("data.img")).unwrap());
    // A filesystem, named as such.
    let mut ext4 = vec![0u8; 8 << 20];
    ext4[1080] = 0x53;
    ext4[1081] = 0xEF;
    std::fs::write(d.join("fs.img"), &ext4).unwrap();
    assert_eq!(
        fails_in(d, &["init", "fs.img"]),
        "error: fs.img: holds an ext2/3/4 filesystem, not a blobstore; init would overwrite it: add --force to format it anyway"
    );
    assert_eq!(ext4, std::fs::read(d.join("fs.img")).unwrap());
    // --force formats it.
    ok_in(d, &["init", "data.img", "--force"]);
    assert_eq!(
        json(&ok_in(d, &["info", "data.img", "--json"]))["num_blobs"],
        0
    );
    // All zeros (a fresh file or disk) needs no --force, nor does a missing file.
    std::fs::write(d.join("zeros.img"), vec![0u8; 8 << 20]).unwrap();
    ok_in(d, &["init", "zeros.img"]);
    ok_in(d, &["init", "new.img", "--size", "8M"]);
}

#[test]
fn init_refuses_a_block_device_that_holds_something_else_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("backing"), vec![0x5au8; 16 << 20]).unwrap();
    let Some(dev) = Loop::attach(&d.join("backing")) else {
        eprintln!("no loop device here (needs root): skipped");
        return;
    };
    let dev = dev.0.display().to_string();
    let line = fails_in(d, &["init", &dev]);
    assert_eq!(
        line,
        format!("error: {dev}: holds data (non-zero bytes in its first MiB), not a blobstore; init would overwrite it: add --force to format it anyway")
    );
    assert!(std::fs::read(d.join("backing"))
        .unwrap()
        .iter()
        .all(|&b| b == 0x5a));
    ok_in(d, &["init", &dev, "--force"]);
}

/// /dev/shm is a tmpfs mounted below /dev: a place for files, so perf may create its
/// target there; a missing name on /dev's own filesystem is still refused.
#[test]
fn perf_may_create_its_file_under_dev_shm() {
    let shm = Path::new("/dev/shm");
    let dev_of = |path: &Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).ok().map(|meta| meta.dev())
    };
    if dev_of(shm).is_none() || dev_of(shm) == dev_of(Path::new("/dev")) {
        eprintln!("no separate /dev/shm here: skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let target = shm.join(format!("spool-review19-extra-{}.img", std::process::id()));
    let target_text = target.display().to_string();
    let run = spool_in(
        dir.path(),
        &[
            "perf",
            "--target",
            &target_text,
            "--size",
            "4M",
            "--time",
            "0.2",
            "-q",
        ],
    );
    let made = target.exists();
    let _ = std::fs::remove_file(&target);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(made, "perf did not create {target_text}");
    assert!(run.text().contains("tmpfs (RAM)"), "{}", run.text());
    let typo = format!("/dev/spool-review19-extra-typo{}n1", std::process::id());
    let line = fails_in(
        dir.path(),
        &[
            "perf", "--target", &typo, "--size", "4M", "--time", "0.2", "-q",
        ],
    );
    let made = Path::new(&typo).exists();
    let _ = std::fs::remove_file(&typo);
    assert!(!made, "perf created {typo}");
    assert!(line.ends_with("no such device (a missing path under /dev is not created: check the device name, e.g. with lsblk)"), "{line}");
}
