//! Review of issue 16, finding 5 (`ImageLock::create`): cases the staged create does not
//! cover. Each test fails on the code as reviewed.

use std::path::Path;

use spool_engine::ImageLock;

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

/// Finding: the temporary name is `.{name}.spool-new.{pid}.{n}`, about 20 bytes longer than
/// the final name, so a valid image name near NAME_MAX (255) can no longer be created: the
/// staged file fails with ENAMETOOLONG although the final path is fine.
#[test]
fn review16_create_refuses_a_valid_long_image_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let name = "i".repeat(240);
    let path = dir.path().join(&name);
    // The final name itself is valid: a plain create works.
    std::fs::write(&path, b"x").expect("a 240-byte name is a valid file name");
    std::fs::remove_file(&path).expect("remove");
    let created = ImageLock::create(&path, 4096, |_| {});
    assert!(
        created.is_ok(),
        "create failed on a valid 240-byte file name: {:?}",
        created.err().map(|err| err.to_string())
    );
}

/// Finding: with the stop-signal handlers installed (as `spool` does in main), a first
/// SIGINT during `create`'s fill does not stop it (the fill never looks at
/// `stop_requested`), and the second one ends the process at once: the staged temporary
/// file, as large as the fill got, stays behind under a hidden name nothing ever removes
/// (before the fix the half-made file was at least visible at its path).
#[test]
fn review16_a_double_sigint_during_create_leaves_a_hidden_temporary_file() {
    if let Some(dir) = std::env::var_os("REVIEW16_CHILD_DIR") {
        spool_engine::signals::install().expect("install");
        let path = Path::new(&dir).join("image");
        let mut raised = 0;
        let _ = ImageLock::create(&path, 64 << 20, |written| {
            if written >= 8 << 20 && raised < 2 {
                // The user presses Ctrl-C, waits, and presses it again.
                raised += 1;
                let _ = signal_hook::low_level::raise(signal_hook::consts::SIGINT);
            }
        });
        eprintln!("child: create returned after two SIGINTs");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("exe");
    let output = std::process::Command::new(exe)
        .args([
            "--exact",
            "review16_a_double_sigint_during_create_leaves_a_hidden_temporary_file",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("REVIEW16_CHILD_DIR", dir.path())
        .output()
        .expect("child");
    let left = leftovers(dir.path());
    assert!(
        left.is_empty(),
        "after a double SIGINT during create (child status {:?}) these files are left: {left:?}",
        output.status
    );
}
