//! Second review of issue 19 (the command line a storage engineer trusts): cases a fresh
//! reviewer hit running the built binary as a user would, each a failing test until fixed.
//! Method as in `review19.rs`: run `spool`, assert the exit code, the stderr line and that a
//! refused command left the image byte for byte as it was.

mod support;

use std::path::Path;

use support::{json, ok_in, refused_with, spool_unchecked as run};

/// Runs `args` expecting exit 1, one `error: ...` line on stderr, nothing on stdout and
/// `image` unchanged byte for byte; returns the line.
fn refused_line(dir: &Path, image: &str, args: &[&str]) -> String {
    refused_with(dir, image, args, 1, "error: ", false)
}

fn free_clusters(dir: &Path, image: &str) -> u64 {
    json(&ok_in(dir, &["info", image, "--json"]))["free_clusters"]
        .as_u64()
        .unwrap()
}

/// A thin blob's import that runs the *store* out of free clusters (the host has gigabytes
/// free) is reported as "the host filesystem is full ... free space on the host": the user
/// is sent to free host space, which cannot help. docs/cli.md keeps "the host filesystem is
/// full" for ENOSPC from the host; a store without free clusters must say so (the store is
/// full, N of M bytes written, free blobs in it or grow it).
#[test]
fn a_thin_import_that_fills_the_store_does_not_blame_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok_in(d, &["init", "s.img", "--size", "16M"]);
    ok_in(d, &["create", "s.img", "--size", "4M", "--name", "a"]);
    ok_in(
        d,
        &["create", "s.img", "--size", "100M", "--thin", "--name", "t"],
    );
    let free = free_clusters(d, "s.img");
    assert!(free < 20, "{free} free clusters");
    std::fs::write(d.join("big.bin"), vec![0x5a_u8; 20_000_000]).unwrap();
    let out = run(d, &["import", "s.img", "t", "big.bin"]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    let line = out.stderr.lines().next().unwrap_or_default().to_string();
    assert!(line.starts_with("error: s.img: "), "{line}");
    assert!(
        !line.contains("host filesystem is full") && !line.contains("free space on the host"),
        "the store ran out of clusters, not the host (it has room): {line}"
    );
    assert!(
        line.contains("after 11534336 of 20000000 bytes"),
        "says how far it got: {line}"
    );
}

/// `inflate` and `decouple` that need more clusters than the store has free end on a
/// fragment, "error: n.img: no space: blob 0x100000003: 10 clusters to allocate, 5 free":
/// no sizes in words and nothing on what to do, where `create` and `resize` (the guard-rail
/// table) say "it needs 10 clusters of 1 MiB (10 MiB) and 5 are free (5 MiB); free some ...".
/// The issue asks every error for "the path, what is wrong, what to do".
#[test]
fn inflate_and_decouple_without_room_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok_in(d, &["init", "n.img", "--size", "16M"]);
    ok_in(d, &["create", "n.img", "--size", "10M", "--name", "base"]);
    ok_in(d, &["snapshot", "n.img", "base", "--name", "snap"]);
    ok_in(d, &["clone", "n.img", "snap", "--name", "cl"]);
    assert_eq!(free_clusters(d, "n.img"), 5);
    for command in ["inflate", "decouple"] {
        let line = refused_line(d, "n.img", &[command, "n.img", "cl"]);
        assert!(line.starts_with("error: n.img: "), "{command}: {line}");
        assert!(
            line.contains("10 clusters of 1 MiB (10 MiB)") && line.contains("free some"),
            "{command}: sizes in words and what to do: {line}"
        );
    }
}

/// `init IMAGE --size` where IMAGE is a dangling symlink (its target was deleted) says
/// "error: dangling.img: create: exists already", while `ls dangling.img` says "no such file
/// or directory": the two disagree, "create:" is an internal step, and nothing says what to
/// do. Expected: what the path is (a symbolic link to a missing nowhere.img) and what to do
/// (remove the link or create its target), or init follows the link.
#[test]
fn init_on_a_dangling_symlink_says_what_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::os::unix::fs::symlink("nowhere.img", d.join("dangling.img")).unwrap();
    let out = run(d, &["init", "dangling.img", "--size", "16M"]);
    let line = out.stderr.lines().next().unwrap_or_default().to_string();
    if out.code == Some(0) {
        // Following the link is fine too: then the store is where it points.
        assert!(d.join("nowhere.img").is_file());
        return;
    }
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(line.starts_with("error: dangling.img: "), "{line}");
    assert!(
        !line.contains("exists already") && !line.contains("create:"),
        "a dangling link does not exist already: {line}"
    );
    assert!(line.contains("link"), "names the symbolic link: {line}");
}

/// An IMAGE spelt with a trailing slash (`s.img/`, as shell completion of a directory-like
/// name leaves it) gives "error: s.img/: Not a directory": the OS's capitalised strerror text
/// (every other open error is in the tool's own words, "no such file or directory",
/// "is a directory, not an image: give the store's file or block device") and nothing on
/// what to do.
#[test]
fn an_image_with_a_trailing_slash_is_said_in_words() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok_in(d, &["init", "s.img", "--size", "16M"]);
    for command in ["ls", "info", "dump", "check"] {
        let line = refused_line(d, "s.img", &[command, "s.img/"]);
        assert!(line.starts_with("error: s.img/: "), "{command}: {line}");
        assert!(
            !line.contains("Not a directory"),
            "{command}: strerror text, no what to do: {line}"
        );
    }
}
