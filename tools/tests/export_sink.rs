//! `spool export` removes its partial output when it fails, but only a regular file it
//! filled: never a device node, a FIFO or a socket FILE named (issue 19 review: a failed or
//! interrupted `spool export IMAGE vol /dev/sdX` deleted the device node). A FIFO stands in
//! for the device node here (no root needed): its reader goes away after 1 MiB, so the
//! export's next write fails with EPIPE.

mod support;

use std::io::Read;
use std::process::Command;

use support::ok_in;

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
    });
    let out = Command::new(env!("CARGO_BIN_EXE_spool"))
        .args(["export", "s.img", "vol", "out.fifo"])
        .current_dir(d)
        .env_remove("SPOOL_LOG")
        .output()
        .unwrap();
    reader.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("error: out.fifo: "), "{stderr}");
    let kind = std::fs::symlink_metadata(&fifo)
        .unwrap_or_else(|err| panic!("the failed export deleted the FIFO ({err}): {stderr}"))
        .file_type();
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&kind), "{stderr}");
}

/// A regular file left by a failed export is removed (a partial copy is worse than none):
/// an export into a file on a full tmpfs, where mounting is allowed.
#[test]
fn a_failed_export_into_a_regular_file_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok_in(d, &["init", "s.img", "--size", "64M"]);
    ok_in(d, &["create", "s.img", "--size", "32M", "--name", "vol"]);
    let small = d.join("small");
    std::fs::create_dir_all(&small).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&small)
        .status()
        .is_ok_and(|status| status.success());
    if !mounted {
        eprintln!("skipped: cannot mount a tmpfs here");
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_spool"))
        .args(["export", "s.img", "vol", "small/out.raw"])
        .current_dir(d)
        .env_remove("SPOOL_LOG")
        .output()
        .unwrap();
    let left = small.join("out.raw").exists();
    let _ = Command::new("umount").arg(&small).status();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!left, "a partial regular file was left: {stderr}");
}
