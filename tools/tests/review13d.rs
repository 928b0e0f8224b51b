//! Review of issue 13 (fourth pass, `review13d`), end to end with the real binary: `spool
//! check` and `--repair` paths the earlier reviews did not take. Each test says what it
//! expects and why. Run with `cargo test -p spool-tools --test review13d`.

use std::path::Path;
use std::process::Command;

/// `spool ARGS` in `dir`: (exit code, stdout, stderr).
fn spool_code(dir: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_spool"))
        .args(args)
        .current_dir(dir)
        .env_remove("SPOOL_LOG")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Expects: a `spool check --repair --output NEW` that refuses to repair (exit 1: "the
/// check could not run", here a store whose file was truncated below the size its super
/// block records, so its geometry cannot locate the metadata) leaves no NEW behind.
/// docs/operations.md: "otherwise the repair refuses, exit 1, writing nothing", and NEW is
/// "the repaired copy". Today NEW is published (a plain copy of the broken image) before the
/// repair is tried and stays after the refusal: it looks like a repaired image, and the
/// operator's next `--repair --output NEW` (after fixing the cause) fails "exists already".
/// The interrupted copy already gets this right (NEW "was not created").
#[test]
fn a_refused_repair_leaves_no_output_copy() {
    let dir = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap();
    let (code, _, err) = spool_code(dir.path(), &["init", "s.img", "--size", "8M"]);
    assert_eq!(code, Some(0), "init: {err}");
    let image = dir.path().join("s.img");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(2 << 20)
        .unwrap();
    let (code, out, err) = spool_code(
        dir.path(),
        &["check", "s.img", "--repair", "--output", "new.img"],
    );
    assert_eq!(code, Some(1), "the repair is refused:\n{out}\n{err}");
    assert!(
        err.contains("cannot repair"),
        "refused for its geometry: {err}"
    );
    assert!(
        !dir.path().join("new.img").exists(),
        "a refused repair (exit 1) left new.img behind, an unrepaired copy under the name of the repaired one:\n{err}"
    );
}
