//! Goal: the blobstore commands keep their contract: exact JSON fields, ids printed alone,
//! data that round-trips byte for byte, one-line errors with exit 1 for every broken input
//! (never a panic), and SPDK-written images read as SPDK's own tools read them. Method: run
//! the built binary on temporary images and on copies of the SPDK fixtures.

mod support;

use std::path::Path;

use support::{
    fails_in, fixture_image, hex_id, json, manifest, ok_in, pattern, sha256_hex, spool_in,
};

const MIB: u64 = 1 << 20;

/// A fresh 64 MiB store (1 MiB clusters) at `dir/store.img`.
fn store(dir: &Path) -> &'static str {
    ok_in(dir, &["init", "store.img", "--size", "64M"]);
    "store.img"
}

fn info_json(dir: &Path, image: &str) -> serde_json::Value {
    json(&ok_in(dir, &["info", image, "--json"]))
}

fn ls(dir: &Path, image: &str) -> Vec<serde_json::Value> {
    json(&ok_in(dir, &["ls", image, "--json"]))
        .as_array()
        .expect("ls --json is an array")
        .clone()
}

fn create(dir: &Path, args: &[&str]) -> u64 {
    let mut all = vec!["create", "store.img"];
    all.extend_from_slice(args);
    let run = ok_in(dir, &all);
    let text = run.text();
    assert!(
        text.ends_with('\n') && text.lines().count() == 1,
        "{text:?}"
    );
    let hex = text
        .trim_end()
        .strip_prefix("0x")
        .expect("the id alone, in hex");
    u64::from_str_radix(hex, 16).expect("the id alone, in hex")
}

#[test]
fn init_creates_the_file_and_info_reports_the_geometry() {
    let dir = tempfile::tempdir().unwrap();
    let run = ok_in(dir.path(), &["init", "store.img", "--size", "64M"]);
    assert_eq!(
        run.text(),
        "initialized store.img: 67108864 bytes, 64 clusters of 1 MiB (63 for data), md_start 4, md_len 64\n"
    );
    assert_eq!(
        std::fs::metadata(dir.path().join("store.img"))
            .unwrap()
            .len(),
        64 * MIB
    );
    let info = info_json(dir.path(), "store.img");
    assert_eq!(info["cluster_size"], 1 << 20);
    assert_eq!(info["io_unit_size"], 4096);
    assert_eq!(info["md_start"], 4);
    assert_eq!(info["md_len"], 64);
    assert_eq!(info["total_data_clusters"], 63);
    assert_eq!(info["free_clusters"], 63);
    assert_eq!(info["clean"], true, "init's run unloaded cleanly");
    assert_eq!(info["bstype"], "");
    assert_eq!(info["super_blob"], serde_json::Value::Null);
    assert_eq!(info["num_blobs"], 0);
    let text = ok_in(dir.path(), &["info", "store.img"]).text();
    assert!(text.contains("md_start             4\n"), "{text}");
    assert!(text.contains("free_clusters        63\n"), "{text}");

    // Options, on an existing file of the right size (used whole without --size).
    std::fs::write(dir.path().join("typed.img"), vec![0u8; 64 << 20]).unwrap();
    ok_in(
        dir.path(),
        &[
            "init",
            "typed.img",
            "--cluster-size",
            "4MiB",
            "--md-pages",
            "32",
            "--bstype",
            "LVOLSTORE",
        ],
    );
    let info = info_json(dir.path(), "typed.img");
    assert_eq!(info["cluster_size"], 4 << 20);
    assert_eq!(info["md_len"], 32);
    assert_eq!(info["bstype"], "LVOLSTORE");
    assert_eq!(info["total_data_clusters"], 15);
}

/// Bytes of disk a file takes (its allocated 512-byte blocks).
fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// `init --size` makes the file sparse and writes only the metadata: a 1 TiB store (a 4 GiB
/// metadata area) takes well under a few MiB of disk, and it works: a volume written through
/// the CLI reads back after a reload.
#[test]
fn init_makes_a_sparse_file_that_takes_only_its_metadata_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let run = ok_in(dir.path(), &["init", "big.img", "--size", "1T"]);
    assert!(
        run.text().contains("1099511627776 bytes, 1048576 clusters"),
        "{}",
        run.text()
    );
    let path = dir.path().join("big.img");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 40);
    let used = allocated_bytes(&path);
    assert!(
        used < 16 * MIB,
        "a 1 TiB init took {used} bytes of disk; its md area must stay a hole"
    );
    let info = info_json(dir.path(), "big.img");
    assert_eq!(info["clean"], true);
    assert_eq!(info["free_clusters"], info["total_data_clusters"]);
    let data = dir.path().join("data.bin");
    std::fs::write(&data, pattern(7, 3 * MIB as usize)).unwrap();
    let id = {
        let run = ok_in(dir.path(), &["create", "big.img", "--size", "8M", "--thin"]);
        u64::from_str_radix(run.text().trim_end().trim_start_matches("0x"), 16).unwrap()
    };
    let id = id.to_string();
    ok_in(dir.path(), &["import", "big.img", &id, "data.bin"]);
    ok_in(
        dir.path(),
        &["export", "big.img", &id, "back.bin", "--length", "3M"],
    );
    assert_eq!(
        std::fs::read(dir.path().join("back.bin")).unwrap(),
        pattern(7, 3 * MIB as usize)
    );
    assert!(allocated_bytes(&path) < 32 * MIB, "a 3 MiB write took more");
}

/// `init --size --preallocate` reserves the whole file on disk and keeps the data area
/// allocated (init does not punch it out again); it is refused for an existing file.
#[test]
fn init_preallocate_reserves_the_whole_file() {
    let dir = tempfile::tempdir().unwrap();
    ok_in(
        dir.path(),
        &["init", "full.img", "--size", "64M", "--preallocate"],
    );
    let used = allocated_bytes(&dir.path().join("full.img"));
    assert!(
        used >= 60 * MIB,
        "--preallocate left {used} bytes allocated of 64 MiB"
    );
    assert_eq!(info_json(dir.path(), "full.img")["clean"], true);
    // Re-formatting with --preallocate keeps the reservation; a missing file needs --size.
    ok_in(
        dir.path(),
        &["init", "full.img", "--preallocate", "--force"],
    );
    assert!(allocated_bytes(&dir.path().join("full.img")) >= used);
    let line = fails_in(dir.path(), &["init", "none.img", "--preallocate"]);
    assert!(line.contains("--size"), "{line}");
}

/// Formatting over an old store clears its metadata: nothing of it comes back, not even
/// through a dirty load's full scan of the md area.
#[test]
fn init_over_an_old_store_leaves_none_of_its_metadata() {
    let dir = tempfile::tempdir().unwrap();
    store(dir.path());
    for _ in 0..5 {
        create(dir.path(), &["--size", "1M"]);
    }
    assert_eq!(ls(dir.path(), "store.img").len(), 5);
    ok_in(dir.path(), &["init", "store.img", "--force"]);
    assert_eq!(ls(dir.path(), "store.img").len(), 0);
    // Mark the new store dirty (clean flag at byte offset 16 of the super block: see
    // docs/format.md) so the next load replays every md page.
    let path = dir.path().join("store.img");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[16..20].copy_from_slice(&0u32.to_le_bytes());
    let crc = crc32c::crc32c(&bytes[..4092]);
    bytes[4092..4096].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(info_json(dir.path(), "store.img")["clean"], false);
    assert_eq!(
        ls(dir.path(), "store.img").len(),
        0,
        "a dirty load found blobs of the store formatted over"
    );
}

#[test]
fn init_refuses_what_it_cannot_do_and_leaves_no_file_behind() {
    let dir = tempfile::tempdir().unwrap();
    let line = fails_in(dir.path(), &["init", "new.img"]);
    assert!(
        line.contains("new.img") && line.contains("--size"),
        "{line}"
    );
    let line = fails_in(
        dir.path(),
        &["init", "new.img", "--size", "64M", "--cluster-size", "1000"],
    );
    assert!(line.contains("cluster size 1000"), "{line}");
    assert!(
        !dir.path().join("new.img").exists(),
        "the created file is removed"
    );
    let line = fails_in(dir.path(), &["init", "new.img", "--size", "512K"]);
    assert!(line.contains("smaller than one cluster"), "{line}");
    store(dir.path());
    let line = fails_in(
        dir.path(),
        &["init", "store.img", "--size", "32M", "--force"],
    );
    assert!(line.contains("67108864"), "{line}");
    // A --bstype too long is a command line that does not parse: exit 2 (issue 19).
    let run = spool_in(
        dir.path(),
        &["init", "store.img", "--bstype", "ABCDEFGHIJKLMNOPQ"],
    );
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("at most 16"), "{}", run.stderr);
}

#[test]
fn info_reports_the_clean_flag_found_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let image = fixture_image("p3-dirty", dir.path());
    let image = image.to_str().unwrap();
    let first = info_json(dir.path(), image);
    assert_eq!(first["clean"], false, "p3 was left dirty by SPDK");
    assert_eq!(first["recovered"], true);
    assert_eq!(first["free_clusters"], 28, "SPDK's recovery counts 28");
    // info only reads: the recovery was in memory, and the image is still dirty.
    let second = info_json(dir.path(), image);
    assert_eq!(second["clean"], false, "info wrote nothing");
    assert_eq!(second["recovered"], true);
    // A command that writes recovers it for good (setting the super blob to the one it is:
    // p3 is an lvol store, whose super blob is not changed without --force).
    let super_blob = format!("{:#x}", first["super_blob"].as_u64().unwrap());
    ok_in(dir.path(), &["super", image, &super_blob]);
    let third = info_json(dir.path(), image);
    assert_eq!(third["clean"], true, "the writer unloaded cleanly");
    assert_eq!(third["recovered"], false);
    assert_eq!(third["free_clusters"], 28);
}

#[test]
fn create_prints_the_id_alone_and_ls_shows_every_field() {
    let dir = tempfile::tempdir().unwrap();
    store(dir.path());
    let a = create(
        dir.path(),
        &["--size", "4M", "--name", "alpha", "--xattr", "color=blue"],
    );
    assert_eq!(a, 0x1_0000_0000);
    let b = create(dir.path(), &["--size", "16MiB", "--thin", "--rle"]);
    let rows = ls(dir.path(), "store.img");
    assert_eq!(rows.len(), 2);
    let alpha = &rows[0];
    assert_eq!(alpha["id"], a);
    assert_eq!(alpha["name"], "alpha");
    assert_eq!(alpha["num_clusters"], 4);
    assert_eq!(alpha["num_allocated_clusters"], 4);
    assert_eq!(alpha["size_bytes"], 4 * MIB);
    for flag in ["thin", "read_only", "snapshot", "clone"] {
        assert_eq!(alpha[flag], false, "{flag}");
    }
    assert_eq!(alpha["parent"], serde_json::Value::Null);
    assert_eq!(alpha["clones"], serde_json::json!([]));
    let mut padded = "alpha".as_bytes().to_vec();
    padded.resize(64, 0);
    let padded_hex: String = padded.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        alpha["xattrs"]["name"], padded_hex,
        "lvol-style 64-byte name"
    );
    assert_eq!(alpha["xattrs"]["color"], "626c7565");
    assert_eq!(alpha["internal_xattrs"], serde_json::json!({}));
    let thin = &rows[1];
    assert_eq!(thin["id"], b);
    assert_eq!(thin["name"], serde_json::Value::Null);
    assert_eq!(thin["thin"], true);
    assert_eq!(thin["num_clusters"], 16);
    assert_eq!(thin["num_allocated_clusters"], 0);
    assert_eq!(thin["extent_form"], "rle");
    let text = ok_in(dir.path(), &["ls", "store.img"]).text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].starts_with("ID"), "{text}");
    assert!(lines[1].starts_with("0x100000000  alpha"), "{text}");
    assert!(lines[2].contains("thin,rle"), "{text}");
    assert_eq!(info_json(dir.path(), "store.img")["free_clusters"], 59);
}

#[test]
fn create_refuses_long_and_duplicate_names() {
    let dir = tempfile::tempdir().unwrap();
    store(dir.path());
    create(dir.path(), &["--size", "1M", "--name", "taken"]);
    let line = fails_in(
        dir.path(),
        &["create", "store.img", "--size", "1M", "--name", "taken"],
    );
    assert!(
        line.contains("'taken' already exists (0x100000000)"),
        "{line}"
    );
    // A name that breaks the rules is a bad argument: exit 2.
    let long = "n".repeat(64);
    let run = spool_in(
        dir.path(),
        &["create", "store.img", "--size", "1M", "--name", &long],
    );
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("at most 63"), "{}", run.stderr);
    create(dir.path(), &["--size", "1M", "--name", &"n".repeat(63)]);
    let line = fails_in(dir.path(), &["create", "store.img", "--size", "1G"]);
    assert!(line.contains("no space"), "{line}");
}

#[test]
fn sizes_round_up_to_whole_clusters_and_say_so() {
    let dir = tempfile::tempdir().unwrap();
    store(dir.path());
    let run = ok_in(dir.path(), &["create", "store.img", "--size", "5000"]);
    assert!(
        run.stderr.contains("rounded up to 1 cluster"),
        "{}",
        run.stderr
    );
    assert_eq!(run.text(), "0x100000000\n");
    assert_eq!(ls(dir.path(), "store.img")[0]["num_clusters"], 1);
    let run = ok_in(dir.path(), &["resize", "store.img", "0x100000000", "2560K"]);
    assert!(
        run.stderr.contains("2621440 bytes") && run.stderr.contains("rounded up to 3 cluster"),
        "{}",
        run.stderr
    );
    assert!(run.stdout.is_empty());
    assert_eq!(ls(dir.path(), "store.img")[0]["num_clusters"], 3);
    let run = ok_in(dir.path(), &["resize", "store.img", "4294967296", "8M"]);
    assert!(
        run.stderr.is_empty(),
        "an exact size is not rounded: {}",
        run.stderr
    );
    assert_eq!(ls(dir.path(), "store.img")[0]["num_clusters"], 8);
    ok_in(
        dir.path(),
        &["resize", "store.img", "0x100000000", "0", "--shrink"],
    );
    assert_eq!(ls(dir.path(), "store.img")[0]["num_clusters"], 0);
    assert_eq!(info_json(dir.path(), "store.img")["free_clusters"], 63);
}

#[test]
fn xattrs_are_set_read_listed_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    store(dir.path());
    create(dir.path(), &["--size", "1M", "--name", "x"]);
    let d = dir.path();
    ok_in(d, &["xattr", "store.img", "x", "set", "color", "blue"]);
    ok_in(
        d,
        &["xattr", "store.img", "x", "set", "bin", "00ff0a", "--hex"],
    );
    assert_eq!(
        ok_in(d, &["xattr", "store.img", "x", "get", "color"]).text(),
        "blue\n"
    );
    assert_eq!(
        ok_in(d, &["xattr", "store.img", "x", "get", "bin", "--raw"]).stdout,
        [0, 0xff, 10]
    );
    assert_eq!(
        ok_in(d, &["xattr", "store.img", "x", "get", "bin", "--hex"]).text(),
        "00ff0a\n"
    );
    assert_eq!(
        ok_in(d, &["xattr", "store.img", "x", "get", "bin"]).text(),
        "\\0\\xff\\n\n"
    );
    assert_eq!(
        ok_in(d, &["xattr", "store.img", "x", "get", "name"]).text(),
        "x\n"
    );
    assert_eq!(
        ok_in(d, &["xattr", "store.img", "x", "ls"]).text(),
        "name = x (+63 NUL)\ncolor = blue\nbin = \\0\\xff\\n\n"
    );
    let listed = json(&ok_in(d, &["xattr", "store.img", "x", "ls", "--json"]));
    assert_eq!(listed["color"], "626c7565");
    assert_eq!(listed["bin"], "00ff0a");
    ok_in(d, &["xattr", "store.img", "x", "set", "color", "red"]);
    assert_eq!(
        ok_in(d, &["xattr", "store.img", "x", "get", "color"]).text(),
        "red\n"
    );
    ok_in(d, &["xattr", "store.img", "x", "rm", "color"]);
    let line = fails_in(d, &["xattr", "store.img", "x", "get", "color"]);
    assert!(line.contains("has no xattr \"color\""), "{line}");
    let line = fails_in(d, &["xattr", "store.img", "x", "rm", "color"]);
    assert!(
        line.contains("0x100000000") && line.contains("color"),
        "{line}"
    );
    // A value that is not hex is a command line that does not parse: exit 2 (issue 19).
    let run = spool_in(d, &["xattr", "store.img", "x", "set", "k", "zz", "--hex"]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("hex"), "{}", run.stderr);
    assert_eq!(
        ls(d, "store.img")[0]["xattrs"],
        serde_json::json!({"name": format!("78{}", "00".repeat(63)), "bin": "00ff0a"})
    );
}

#[test]
fn the_super_blob_is_set_printed_and_cleared() {
    let dir = tempfile::tempdir().unwrap();
    store(dir.path());
    let d = dir.path();
    assert_eq!(ok_in(d, &["super", "store.img"]).text(), "none\n");
    create(d, &["--size", "1M"]);
    create(d, &["--size", "1M", "--name", "second"]);
    ok_in(d, &["super", "store.img", "second"]);
    assert_eq!(ok_in(d, &["super", "store.img"]).text(), "0x100000002\n");
    assert_eq!(info_json(d, "store.img")["super_blob"], 0x1_0000_0002u64);
    ok_in(d, &["super", "store.img", "0x100000000"]);
    assert_eq!(ok_in(d, &["super", "store.img"]).text(), "0x100000000\n");
    ok_in(d, &["super", "store.img", "--clear"]);
    assert_eq!(ok_in(d, &["super", "store.img"]).text(), "none\n");
    let line = fails_in(d, &["super", "store.img", "0x100000007"]);
    assert!(line.contains("blob 0x100000007 does not exist"), "{line}");
}

#[test]
fn import_then_export_round_trips_with_offsets_and_ragged_lengths() {
    let dir = tempfile::tempdir().unwrap();
    store(dir.path());
    let d = dir.path();
    for (name, thin) in [("thick", false), ("thin", true)] {
        let mut args = vec!["--size", "5M", "--name", name];
        if thin {
            args.push("--thin");
        }
        create(d, &args);
        // 3 MiB + 123 bytes: ends inside an io_unit; at 8 KiB: crosses clusters.
        let data = pattern(7, 3 * MIB as usize + 123);
        std::fs::write(d.join("in.bin"), &data).unwrap();
        ok_in(
            d,
            &["import", "store.img", name, "in.bin", "--offset", "8K"],
        );
        let len = data.len().to_string();
        ok_in(
            d,
            &[
                "export",
                "store.img",
                name,
                "out.bin",
                "--offset",
                "8192",
                "--length",
                &len,
            ],
        );
        assert!(
            std::fs::read(d.join("out.bin")).unwrap() == data,
            "{name}: round trip"
        );
        // The default length is the rest of the blob; what was not written reads as zeros
        // (the last io_unit's tail included: the import read-modify-wrote it).
        ok_in(d, &["export", "store.img", name, "all.bin"]);
        let all = std::fs::read(d.join("all.bin")).unwrap();
        assert_eq!(all.len() as u64, 5 * MIB, "{name}");
        if thin {
            assert!(all[..8192].iter().all(|&b| b == 0), "{name}: head");
            assert!(
                all[8192 + data.len()..].iter().all(|&b| b == 0),
                "{name}: tail"
            );
        }
        assert!(all[8192..8192 + data.len()] == data[..], "{name}: body");
        ok_in(
            d,
            &["export", "store.img", name, "rest.bin", "--offset", "1M"],
        );
        assert_eq!(
            std::fs::metadata(d.join("rest.bin")).unwrap().len(),
            4 * MIB
        );
    }
    // Read-modify-write keeps what the last io_unit held beyond the file.
    std::fs::write(d.join("patch.bin"), vec![0xEE; 100]).unwrap();
    ok_in(
        d,
        &[
            "import",
            "store.img",
            "thick",
            "patch.bin",
            "--offset",
            "8192",
        ],
    );
    ok_in(
        d,
        &[
            "export",
            "store.img",
            "thick",
            "head.bin",
            "--offset",
            "8192",
            "--length",
            "4096",
        ],
    );
    let head = std::fs::read(d.join("head.bin")).unwrap();
    let data = pattern(7, 4096);
    assert!(head[..100].iter().all(|&b| b == 0xEE));
    assert!(
        head[100..] == data[100..],
        "bytes 100.. of the io_unit survive"
    );
    // Export to stdout.
    let run = ok_in(
        d,
        &[
            "export",
            "store.img",
            "thick",
            "-",
            "--offset",
            "12K",
            "--length",
            "5",
        ],
    );
    assert_eq!(run.stdout, pattern(7, 4096 + 5)[4096..]);
}

#[test]
fn import_and_export_refuse_bad_ranges_naming_the_sizes() {
    let dir = tempfile::tempdir().unwrap();
    store(dir.path());
    let d = dir.path();
    create(d, &["--size", "2M", "--name", "b"]);
    std::fs::write(d.join("in.bin"), vec![1u8; 4096]).unwrap();
    let line = fails_in(
        d,
        &["import", "store.img", "b", "in.bin", "--offset", "100"],
    );
    assert!(
        line.contains("--offset 100") && line.contains("4096-byte io_unit"),
        "{line}"
    );
    let line = fails_in(d, &["import", "store.img", "b", "in.bin", "--offset", "2M"]);
    assert!(
        line.contains("4096 bytes") && line.contains("2097152") && line.contains("0x100000000"),
        "{line}"
    );
    let line = fails_in(d, &["import", "store.img", "b", "missing.bin"]);
    assert!(line.contains("missing.bin"), "{line}");
    let line = fails_in(d, &["export", "store.img", "b", "o.bin", "--length", "3M"]);
    assert!(
        line.contains("3145728 bytes") && line.contains("2097152 bytes"),
        "{line}"
    );
    assert!(!d.join("o.bin").exists(), "no file for a refused export");
    let line = fails_in(d, &["export", "store.img", "b", "o.bin", "--offset", "4M"]);
    assert!(line.contains("past the end"), "{line}");
    let line = fails_in(d, &["export", "store.img", "b", "store.img"]);
    assert!(line.contains("image itself"), "{line}");
}

#[test]
fn delete_frees_the_blob_and_its_clusters() {
    let dir = tempfile::tempdir().unwrap();
    store(dir.path());
    let d = dir.path();
    create(d, &["--size", "10M", "--name", "gone"]);
    create(d, &["--size", "1M", "--name", "kept"]);
    ok_in(d, &["super", "store.img", "gone"]);
    assert_eq!(info_json(d, "store.img")["free_clusters"], 52);
    let run = ok_in(d, &["delete", "store.img", "gone"]);
    assert!(run.stderr.contains("was the super blob"), "{}", run.stderr);
    let rows = ls(d, "store.img");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["name"], "kept");
    let info = info_json(d, "store.img");
    assert_eq!(info["free_clusters"], 62);
    assert_eq!(info["super_blob"], serde_json::Value::Null);
    let line = fails_in(d, &["delete", "store.img", "gone"]);
    assert!(line.contains("no blob is named 'gone'"), "{line}");
    let line = fails_in(d, &["delete", "store.img", "0x100000000"]);
    assert!(line.contains("blob 0x100000000 does not exist"), "{line}");
}

#[test]
fn a_read_only_blob_refuses_writes_and_metadata_changes() {
    let dir = tempfile::tempdir().unwrap();
    store(dir.path());
    let d = dir.path();
    create(d, &["--size", "1M", "--name", "ro"]);
    ok_in(d, &["set-read-only", "store.img", "ro"]);
    assert_eq!(ls(d, "store.img")[0]["read_only"], true);
    std::fs::write(d.join("in.bin"), vec![1u8; 4096]).unwrap();
    let line = fails_in(d, &["import", "store.img", "ro", "in.bin"]);
    assert!(line.contains("0x100000000 is read-only"), "{line}");
    let line = fails_in(d, &["xattr", "store.img", "ro", "set", "k", "v"]);
    assert!(line.contains("read-only"), "{line}");
    let line = fails_in(d, &["resize", "store.img", "ro", "2M"]);
    assert!(line.contains("read-only"), "{line}");
    ok_in(d, &["export", "store.img", "ro", "out.bin"]);
    assert_eq!(
        info_json(d, "store.img")["clean"],
        true,
        "failed commands still unload cleanly"
    );
}

#[test]
fn blobs_are_found_by_id_or_name() {
    let dir = tempfile::tempdir().unwrap();
    store(dir.path());
    let d = dir.path();
    create(d, &["--size", "1M", "--name", "lvol"]);
    create(d, &["--size", "2M"]);
    create(d, &["--size", "3M"]);
    // blobcli stores C strings with their NUL.
    ok_in(
        d,
        &[
            "xattr",
            "store.img",
            "0x100000002",
            "set",
            "name",
            "68656c6c6f00",
            "--hex",
        ],
    );
    let size = |blob: &str| -> u64 {
        ok_in(d, &["export", "store.img", blob, "out.bin"]);
        std::fs::metadata(d.join("out.bin")).unwrap().len()
    };
    assert_eq!(size("lvol"), MIB);
    assert_eq!(size("hello"), 2 * MIB);
    assert_eq!(size("4294967300"), 3 * MIB);
    assert_eq!(size("0x100000004"), 3 * MIB);
    // A name shared by two blobs (as an SPDK-written store may have; spool refuses to make
    // one) is refused, naming both. Made by renaming "hellx" in the md page to "hello".
    ok_in(
        d,
        &["xattr", "store.img", "0x100000004", "set", "name", "hellx"],
    );
    let path = d.join("store.img");
    let mut bytes = std::fs::read(&path).unwrap();
    let md = 4 * 4096..68 * 4096;
    let page = bytes[md.clone()]
        .chunks(4096)
        .position(|page| page.windows(5).any(|w| w == b"hellx"))
        .expect("the md page holding the name");
    let page = md.start + page * 4096;
    let at = page
        + bytes[page..page + 4096]
            .windows(5)
            .position(|w| w == b"hellx")
            .unwrap();
    bytes[at + 4] = b'o';
    let crc = crc32c::crc32c(&bytes[page..page + 4092]);
    bytes[page + 4092..page + 4096].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let line = fails_in(d, &["export", "store.img", "hello", "out.bin"]);
    assert!(
        line.contains("2 blobs (0x100000002, 0x100000004)"),
        "{line}"
    );
    let line = fails_in(d, &["export", "store.img", "nobody", "out.bin"]);
    assert!(line.contains("no blob is named 'nobody'"), "{line}");
    let line = fails_in(d, &["export", "store.img", "12", "out.bin"]);
    assert!(line.contains("blob 12 (0xc) does not exist"), "{line}");
}

#[test]
fn broken_images_are_one_line_errors_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let line = fails_in(d, &["info", "missing.img"]);
    assert_eq!(line, "error: missing.img: no such file or directory");
    assert!(
        !d.join("missing.img").exists(),
        "info never creates the image"
    );
    std::fs::write(d.join("zero.img"), vec![0u8; 8 << 20]).unwrap();
    for command in ["info", "ls"] {
        let line = fails_in(d, &[command, "zero.img"]);
        assert!(line.contains("zero.img: not a blobstore"), "{line}");
    }
    let line = fails_in(d, &["dump", "zero.img"]);
    assert!(line.contains("zero.img: not a blobstore"), "{line}");
    std::fs::write(d.join("tiny.img"), [0u8; 100]).unwrap();
    let line = fails_in(d, &["info", "tiny.img"]);
    assert!(line.contains("tiny.img"), "{line}");
    let line = fails_in(d, &["dump", "tiny.img"]);
    assert!(line.contains("too small"), "{line}");
    let line = fails_in(d, &["ls", "."]);
    assert!(line.contains("directory"), "{line}");

    let image = fixture_image("p1-blobcli-basic", d);
    let good = std::fs::read(&image).unwrap();
    // A super block with a flipped byte: its CRC no longer matches.
    let mut bad = good.clone();
    bad[100] ^= 1;
    std::fs::write(d.join("badcrc.img"), &bad).unwrap();
    let line = fails_in(d, &["info", "badcrc.img"]);
    assert!(
        line.contains("badcrc.img") && line.contains("CRC mismatch"),
        "{line}"
    );
    // A truncated image: the super block says the store is larger than the file.
    std::fs::write(d.join("short.img"), &good[..32 << 20]).unwrap();
    let line = fails_in(d, &["ls", "short.img"]);
    assert!(
        line.contains("short.img") && line.contains("larger than the device"),
        "{line}"
    );
    // A blob whose root md page is corrupt: listed as unreadable; opening it is an error.
    let mut bad = good.clone();
    bad[4 * 4096 + 100] ^= 0x40;
    std::fs::write(d.join("badpage.img"), &bad).unwrap();
    let run = ok_in(d, &["ls", "badpage.img", "--json"]);
    assert!(
        run.stderr.starts_with("warning: blob 0x100000000"),
        "{}",
        run.stderr
    );
    let rows = json(&run);
    assert!(rows[0]["error"].as_str().unwrap().contains("CRC"), "{rows}");
    assert_eq!(rows[1]["id"], 0x1_0000_0004u64);
    let line = fails_in(d, &["export", "badpage.img", "0x100000000", "out.bin"]);
    assert!(
        line.contains("0x100000000") && line.contains("corrupt"),
        "{line}"
    );
}

#[test]
fn usage_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["create", "x.img", "--size", "lots"][..],
        &["create", "x.img"],
        &["init", "x.img", "--size", "0"],
        &["export", "x.img", "b", "f", "--offset", "-1"],
        &["create", "x.img", "--size", "1M", "--xattr", "novalue"],
        &["xattr", "x.img", "b"],
        &["super", "x.img", "b", "--clear"],
        &["frobnicate"],
    ] {
        let run = spool_in(dir.path(), args);
        assert_eq!(run.code, Some(2), "{args:?}: {}", run.stderr);
        assert!(
            run.stderr.starts_with("error: "),
            "{args:?}: {}",
            run.stderr
        );
    }
}

#[test]
fn dump_decodes_every_md_page_of_an_spdk_image() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = fixture_image("p1-blobcli-basic", d);
    let image = image.to_str().unwrap();
    let truth = manifest("p1-blobcli-basic");
    let dump = json(&ok_in(d, &["dump", image, "--json"]));
    assert_eq!(dump["super_block"]["crc"], truth["super_block"]["crc"]);
    assert_eq!(dump["super_block"]["crc_ok"], true);
    assert_eq!(dump["super_block"]["super_blob"], 0x1_0000_0000u64);
    assert_eq!(dump["problems"], serde_json::json!([]));
    let pages = dump["pages"].as_array().unwrap();
    let expected = truth["md_pages_in_use"].as_array().unwrap();
    assert_eq!(pages.len(), expected.len());
    for (page, want) in pages.iter().zip(expected) {
        assert_eq!(page["index"], want["index"]);
        assert_eq!(page["id"], hex_id(want["blob_id_hex"].as_str().unwrap()));
        assert_eq!(page["crc"], want["crc"]);
        assert_eq!(page["crc_ok"], true);
        assert_eq!(page["in_md_mask"], true);
    }
    let root = &pages[0];
    assert_eq!(root["role"], "root");
    let descriptors = root["descriptors"].as_array().unwrap();
    assert!(descriptors.contains(&serde_json::json!({
        "type": "xattr", "internal": false, "name": "name", "value": "68656c6c6f00",
        "text": "hello (+1 NUL)"
    })));
    assert!(descriptors.contains(&serde_json::json!({
        "type": "extent_table", "num_clusters": 4, "entries": [[1, 1]]
    })));
    assert_eq!(pages[1]["role"], "extent page");
    assert_eq!(
        pages[1]["descriptors"][0],
        serde_json::json!({"type": "extent_page", "start_cluster": 0, "clusters": [1, 2, 3, 4]})
    );
    for (mask, name) in dump["masks"].as_array().unwrap().iter().zip([
        "used_md_pages",
        "used_clusters",
        "used_blobids",
    ]) {
        let set: Vec<u64> = mask["set_ranges"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r[0].as_u64().unwrap()..=r[1].as_u64().unwrap())
            .collect();
        let want: Vec<u64> = truth["masks_on_disk"][name]["set_bits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap())
            .collect();
        assert_eq!(set, want, "{name}");
    }
    let text = ok_in(d, &["dump", image]).text();
    for needle in [
        "super block: crc 0x42d6c20d ok",
        "  used_clusters  page 2 (+1)  64 bits, 8 set: 0-4,7-9",
        "md page 0: blob 0x100000000, root, sequence 0, next none, crc 0x2730a106 ok",
        "  xattr name = hello (+1 NUL)",
        "  extent page: 0-3 -> 1-4",
        "md page 5: blob 0x100000004, extent page",
        "problems: none",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
}

/// Runs a `dump` that finds problems: it prints the whole dump, then exits 2.
fn dump_with_problems(d: &Path, args: &[&str]) -> support::Run {
    let run = spool_in(d, args);
    assert_eq!(run.code, Some(2), "{args:?}: {}", run.stderr);
    assert!(run.stderr.contains("problem(s) found"), "{}", run.stderr);
    run
}

#[test]
fn dump_works_on_corrupt_images_and_flags_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = fixture_image("p1-blobcli-basic", d);
    let mut bytes = std::fs::read(&image).unwrap();
    bytes[100] ^= 1; // super block CRC
    bytes[(4 + 4) * 4096 + 50] ^= 1; // md page 4's CRC
    bytes[(4 + 5) * 4096 + 16] = 9; // md page 5: a descriptor of an unknown type...
    bytes[(4 + 5) * 4096 + 17..(4 + 5) * 4096 + 21].copy_from_slice(&5000u32.to_le_bytes()); // ...that overruns
    std::fs::write(&image, &bytes).unwrap();
    let image = image.to_str().unwrap();
    let dump = json(&dump_with_problems(d, &["dump", image, "--json"]));
    assert_eq!(dump["super_block"]["crc_ok"], false);
    assert_eq!(dump["super_block"]["md_len"], 64, "fields still decoded");
    let pages = dump["pages"].as_array().unwrap();
    assert_eq!(pages[2]["index"], 4);
    assert_eq!(pages[2]["crc_ok"], false);
    assert_eq!(pages[3]["descriptors"][0]["type"], "error");
    let problems = dump["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 4, "{problems:?}");
    let text = dump_with_problems(d, &["dump", image]).text();
    assert!(
        text.contains("super block: crc 0x42d6c20d MISMATCH"),
        "{text}"
    );
    assert!(text.contains("crc 0x752737b6 MISMATCH"), "{text}");
    assert!(text.contains("problems: 4"), "{text}");
    // The store does not load, and dump wrote nothing.
    fails_in(d, &["info", image]);
    assert!(std::fs::read(image).unwrap() == bytes);
    // A truncated image: the md region is there, the data is not.
    std::fs::write(d.join("short.img"), &bytes[..64 * 1024]).unwrap();
    let dump = json(&dump_with_problems(d, &["dump", "short.img", "--json"]));
    assert!(
        dump["problems"]
            .to_string()
            .contains("larger than the device"),
        "{dump}"
    );
    std::fs::write(d.join("shorter.img"), &bytes[..6 * 4096]).unwrap();
    let dump = json(&dump_with_problems(d, &["dump", "shorter.img", "--json"]));
    assert_eq!(
        dump["pages"].as_array().unwrap().len(),
        2,
        "md pages 0 and 1 are there"
    );
    assert!(
        dump["problems"]
            .to_string()
            .contains("past the end of the image"),
        "{dump}"
    );
}

/// Checks `ls --json` of a fixture against its manifest's blobs.
fn check_blobs(rows: &[serde_json::Value], truth: &serde_json::Value, fixture: &str) {
    let blobs = truth["blobs"].as_array().unwrap();
    assert_eq!(rows.len(), blobs.len(), "{fixture}");
    for (row, blob) in rows.iter().zip(blobs) {
        let what = format!("{fixture} {}", blob["id_hex"]);
        assert_eq!(row["id"], blob["id"], "{what}");
        assert_eq!(row["num_clusters"], blob["num_clusters"], "{what}");
        assert_eq!(
            row["num_allocated_clusters"], blob["num_allocated_clusters"],
            "{what}"
        );
        assert_eq!(row["size_bytes"], blob["size_bytes"], "{what}");
        assert_eq!(row["thin"], blob["thin_provisioned"], "{what}");
        assert_eq!(row["read_only"], blob["read_only"], "{what}");
        assert_eq!(row["xattrs"], blob["xattrs"], "{what}");
        assert_eq!(row["internal_xattrs"], blob["internal_xattrs"], "{what}");
        assert_eq!(row["parent"], blob["parent_snapshot_id"], "{what}");
        let clones: Vec<u64> = blob["clones"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| hex_id(c.as_str().unwrap()))
            .collect();
        assert_eq!(row["clones"], serde_json::json!(clones), "{what}");
        assert_eq!(
            row["clone"],
            !blob["parent_snapshot_id"].is_null(),
            "{what}"
        );
        assert_eq!(row["snapshot"], !clones.is_empty(), "{what}");
        let name = blob["xattrs"]["name"].as_str().map(|hex| {
            let bytes: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|at| u8::from_str_radix(&hex[at..at + 2], 16).unwrap())
                .collect();
            String::from_utf8_lossy(&bytes)
                .trim_end_matches('\0')
                .to_string()
        });
        assert_eq!(row["name"], serde_json::json!(name), "{what}");
    }
}

#[test]
fn spdk_fixtures_read_as_spdk_reads_them() {
    for fixture in [
        "p1-blobcli-basic",
        "p2-lvs-thin-snap",
        "p3-dirty",
        "p4-many-xattrs",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let image = fixture_image(fixture, d);
        let image = image.to_str().unwrap();
        let truth = manifest(fixture);
        let block = &truth["super_block"];
        let info = info_json(d, image);
        for key in [
            "cluster_size",
            "md_start",
            "md_len",
            "io_unit_size",
            "free_clusters",
        ] {
            assert_eq!(info[key], block[key], "{fixture} {key}");
        }
        assert_eq!(info["clean"], block["clean"] == 1, "{fixture}");
        assert_eq!(info["bstype"], block["bstype"], "{fixture}");
        assert_eq!(
            info["total_data_clusters"],
            block["total_clusters"].as_u64().unwrap() - block["md_clusters"].as_u64().unwrap(),
            "{fixture}"
        );
        // The manifest gives the id, or null for none (p4: 0xffffffffffffffff on disk).
        assert_eq!(info["super_blob"], block["super_blob"], "{fixture}");
        assert_eq!(
            info["num_blobs"],
            truth["blobs"].as_array().unwrap().len(),
            "{fixture}"
        );
        check_blobs(&ls(d, image), &truth, fixture);
        for blob in truth["blobs"].as_array().unwrap() {
            let id = blob["id_hex"].as_str().unwrap();
            ok_in(d, &["export", image, id, "blob.bin"]);
            let data = std::fs::read(d.join("blob.bin")).unwrap();
            assert_eq!(
                sha256_hex(&data),
                blob["sha256"].as_str().unwrap(),
                "{fixture} {id}: exported content"
            );
        }
    }
}

#[test]
fn fixture_names_resolve_and_p1_blob_a_holds_0xab() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = fixture_image("p1-blobcli-basic", d);
    let image = image.to_str().unwrap();
    // blobcli's name="hello\0" and the lvol layer's 64-byte names both resolve.
    ok_in(d, &["export", image, "hello", "a.bin"]);
    let a = std::fs::read(d.join("a.bin")).unwrap();
    assert_eq!(a.len() as u64, 4 * MIB);
    assert!(a.iter().all(|&b| b == 0xAB));
    assert_eq!(ok_in(d, &["super", image]).text(), "0x100000000\n");
    assert_eq!(
        ok_in(d, &["xattr", image, "hello", "get", "name", "--hex"]).text(),
        "68656c6c6f00\n"
    );
    let p2 = fixture_image("p2-lvs-thin-snap", d);
    let p2 = p2.to_str().unwrap();
    ok_in(d, &["export", p2, "snap0", "s.bin", "--length", "8K"]);
    assert_eq!(std::fs::read(d.join("s.bin")).unwrap(), pattern(11, 8192));
    let text = ok_in(d, &["ls", p2]).text();
    assert!(
        text.contains("0x100000003  snap0   16 MiB  16        4          thin,ro,snapshot  -"),
        "{text}"
    );
}

#[test]
fn a_locked_image_is_refused_with_a_named_error_and_left_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = store(dir.path());
    let id = create(dir.path(), &["--size", "1M"]).to_string();
    let path = dir.path().join(image);
    let before = std::fs::read(&path).expect("read image");
    // Another process holding the image (here: this test) makes every command fail at once.
    let lock = spool_engine::ImageLock::exclusive(&path).expect("lock the image");
    let commands: [&[&str]; 6] = [
        &["info", image],
        &["ls", image],
        &["create", image, "--size", "1M"],
        &["delete", image, &id],
        &["init", image, "--force"],
        &["dump", image],
    ];
    for args in commands {
        let line = fails_in(dir.path(), args);
        assert!(
            line.contains("store.img") && line.contains("in use by another process"),
            "spool {args:?}: {line}"
        );
    }
    assert!(
        std::fs::read(&path).expect("read image") == before,
        "nothing was written while the image was locked"
    );
    // A second lock in this process is refused too (flock is per open file), with -EBUSY.
    let second = spool_engine::ImageLock::exclusive(&path).expect_err("already locked");
    assert_eq!(second.errno(), -libc::EBUSY);
    drop(lock);
    let blobs = ls(dir.path(), image);
    assert_eq!(blobs.len(), 1, "the blob is still there: {blobs:?}");
    ok_in(dir.path(), &["delete", image, &id]);
    assert!(ls(dir.path(), image).is_empty());
}
