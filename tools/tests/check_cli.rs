//! Goal: `spool check`'s contract as a command: exit 0 consistent, 2 problems found, 1 the
//! check could not run (with one clear `error:` line); `--json` is one JSON object; the image
//! lock is honoured (check refuses an image a writer holds, repair one anybody holds);
//! `--repair --output NEW` leaves IMAGE byte for byte untouched and NEW sparse; and no input,
//! however damaged, makes the checker or the repair panic. Method: run the built binary on
//! temporary images; call the library's checker in-process for the random-damage sweep.

mod support;

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use spool_blob::check::check_image;
use spool_blob::check::repair::repair_image;
use support::{json, ok_in, pattern, spool_in};

/// A 64 MiB store with one thick blob of 4 MiB holding P(5).
fn store(dir: &Path) {
    ok_in(dir, &["init", "s.img", "--size", "64M"]);
    ok_in(dir, &["create", "s.img", "--size", "4M"]);
    std::fs::write(dir.join("p.bin"), pattern(5, 4 << 20)).unwrap();
    ok_in(dir, &["import", "s.img", "0x100000000", "p.bin"]);
}

fn last_line(text: &str) -> &str {
    text.lines().last().unwrap_or("")
}

#[test]
fn exit_codes_say_consistent_problems_or_could_not_check() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    store(d);
    let run = ok_in(d, &["check", "s.img"]);
    assert!(run.text().ends_with("consistent\n"), "{}", run.text());
    assert!(
        run.stderr.contains("check: phase 6"),
        "progress per phase: {}",
        run.stderr
    );

    // A used-cluster bit cleared: exit 2, the problem on stdout, one error line.
    let copy = d.join("bad.img");
    std::fs::copy(d.join("s.img"), &copy).unwrap();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(&copy)
        .unwrap();
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, 2 * 4096 + 5).unwrap();
    file.write_all_at(&[byte[0] & !0b10], 2 * 4096 + 5).unwrap();
    drop(file);
    let run = spool_in(d, &["check", "bad.img"]);
    assert_eq!(run.code, Some(2));
    assert!(
        run.text().contains(
            "problem: mask_bit_missing: blob 0x100000000 used_cluster_mask[1]: expected set (in use), found clear\n"
        ),
        "{}",
        run.text()
    );
    assert_eq!(last_line(&run.stderr), "error: 1 problem(s) found");

    // Not a blobstore, a missing file, a device smaller than a page: exit 1.
    std::fs::write(d.join("zero.img"), vec![0u8; 1 << 20]).unwrap();
    let run = spool_in(d, &["check", "zero.img"]);
    assert_eq!(run.code, Some(1));
    assert!(
        last_line(&run.stderr).starts_with("error: zero.img: not a blobstore"),
        "{}",
        run.stderr
    );
    assert!(run.stdout.is_empty());
    let run = spool_in(d, &["check", "missing.img"]);
    assert_eq!(run.code, Some(1));
    assert!(
        last_line(&run.stderr).contains("missing.img"),
        "{}",
        run.stderr
    );
    std::fs::write(d.join("tiny.img"), b"SPDKBLOB").unwrap();
    let run = spool_in(d, &["check", "tiny.img", "--json"]);
    assert_eq!(run.code, Some(1));
    assert!(
        last_line(&run.stderr).contains("smaller than one 4096-byte super block"),
        "{}",
        run.stderr
    );
    // --output without --repair is a usage error.
    assert_eq!(
        spool_in(d, &["check", "s.img", "--output", "n.img"]).code,
        Some(2)
    );
}

#[test]
fn json_is_one_object_with_the_problems() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    store(d);
    let report = json(&ok_in(d, &["check", "s.img", "--json"]));
    assert_eq!(report["consistent"], true);
    assert_eq!(report["clean"], 1);
    assert_eq!(report["total_clusters"], 64);
    assert_eq!(report["md_clusters"], 1);
    assert_eq!(report["used_clusters"], 5);
    assert_eq!(report["blobs"][0]["id_hex"], "0x100000000");
    assert_eq!(report["blobs"][0]["allocated"], 4);
    assert_eq!(report["problems"].as_array().unwrap().len(), 0);

    // Damage: the root page's CRC.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("s.img"))
        .unwrap();
    file.write_all_at(&[0x55], 4 * 4096 + 3000).unwrap();
    drop(file);
    let run = spool_in(d, &["check", "s.img", "--json"]);
    assert_eq!(run.code, Some(2));
    assert!(
        !run.stderr.contains("phase"),
        "no progress lines with --json"
    );
    let report = json(&run);
    assert_eq!(report["consistent"], false);
    let problem = &report["problems"][0];
    assert_eq!(problem["kind"], "page_crc");
    assert_eq!(problem["page"], 0);
    assert_eq!(problem["blob_hex"], "0x100000000");
    assert_eq!(problem["field"], "crc");

    // --repair --json: before, changes, after.
    let run = spool_in(d, &["check", "s.img", "--repair", "--json"]);
    assert_eq!(run.code, Some(2), "{}{}", run.text(), run.stderr);
    let report = json(&run);
    assert_eq!(report["before"]["consistent"], false);
    assert!(report["changes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c.as_str().unwrap().contains("root md page 0 fails its CRC")));
    assert_eq!(
        report["after"]["blobs"][0]["damaged"],
        "root md page 0: CRC mismatch"
    );
}

#[test]
fn the_image_lock_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    store(d);
    // Another process writing the image (an exclusive lock): check and repair refuse.
    let writer = File::open(d.join("s.img")).unwrap();
    writer.try_lock().unwrap();
    for args in [
        &["check", "s.img"][..],
        &["check", "s.img", "--repair"][..],
        &["check", "s.img", "--repair", "--output", "copy.img"][..],
    ] {
        let run = spool_in(d, args);
        assert_eq!(run.code, Some(1), "{args:?}");
        assert!(
            last_line(&run.stderr).contains("in use by another process"),
            "{}",
            run.stderr
        );
    }
    assert!(!d.join("copy.img").exists());
    writer.unlock().unwrap();
    // Another reader (a shared lock): check runs beside it, an in-place repair refuses.
    writer.try_lock_shared().unwrap();
    ok_in(d, &["check", "s.img"]);
    let run = spool_in(d, &["check", "s.img", "--repair"]);
    assert_eq!(run.code, Some(1));
    assert!(
        last_line(&run.stderr).contains("in use by another process"),
        "{}",
        run.stderr
    );
    // ... but repairing a copy only reads it.
    ok_in(d, &["check", "s.img", "--repair", "--output", "copy.img"]);
}

#[test]
fn output_repairs_a_sparse_copy_and_leaves_the_image_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    store(d);
    // Dirty it: clean = 0 with the CRC resealed.
    let path = d.join("s.img");
    let mut page = vec![0u8; 4096];
    File::open(&path)
        .unwrap()
        .read_exact_at(&mut page, 0)
        .unwrap();
    page[16..20].copy_from_slice(&0u32.to_le_bytes());
    spool_blob::format::seal_page(&mut page);
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&page, 0).unwrap();
    drop(file);
    let before = std::fs::read(&path).unwrap();
    let run = ok_in(d, &["check", "s.img", "--repair", "--output", "new.img"]);
    assert!(
        run.text().contains("repair: super block: clean = 1"),
        "{}",
        run.text()
    );
    assert!(std::fs::read(&path).unwrap() == before, "IMAGE untouched");
    let new = d.join("new.img");
    let meta = std::fs::metadata(&new).unwrap();
    assert_eq!(meta.len(), 64 << 20);
    assert!(
        meta.blocks() * 512 < 16 << 20,
        "the copy is sparse: {} blocks",
        meta.blocks()
    );
    let mut clean = [0u8; 4];
    File::open(&new)
        .unwrap()
        .read_exact_at(&mut clean, 16)
        .unwrap();
    assert_eq!(u32::from_le_bytes(clean), 1);
    ok_in(d, &["export", "new.img", "0x100000000", "out.bin"]);
    assert!(std::fs::read(d.join("out.bin")).unwrap() == pattern(5, 4 << 20));
    // An existing NEW is refused.
    let run = spool_in(d, &["check", "s.img", "--repair", "--output", "new.img"]);
    assert_eq!(run.code, Some(1));
}

/// Random damage anywhere in the metadata: the checker and the repair never panic, a
/// repaired store checks without the problems the repair fixes, and it loads.
#[test]
fn random_damage_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    store(d);
    ok_in(d, &["create", "s.img", "--size", "3M", "--thin"]);
    let original = std::fs::read(d.join("s.img")).unwrap();
    let metadata_bytes = (4 + 64) * 4096;
    let used: Vec<usize> = (0..metadata_bytes / 4096)
        .filter(|&page| {
            original[page * 4096..(page + 1) * 4096]
                .iter()
                .any(|&b| b != 0)
        })
        .collect();
    let mut rng = fastrand::Rng::with_seed(13);
    let (mut damaged, mut refused) = (0, 0);
    let path = d.join("r.img");
    std::fs::write(&path, &original).unwrap();
    for round in 0..1000 {
        let mut image = original[..metadata_bytes].to_vec();
        // Damage aimed at the pages in use (super block, masks, md pages holding data),
        // mostly in their headers and first descriptors.
        for _ in 0..rng.usize(1..4) {
            let page = used[rng.usize(..used.len())];
            let offset = match rng.u8(..4) {
                0 => rng.usize(0..16),
                1 => rng.usize(16..200),
                2 => rng.usize(4088..4096),
                _ => rng.usize(0..4096),
            };
            image[page * 4096 + offset] = rng.u8(..);
        }
        if rng.bool() {
            // Reseal every page so the damage reaches past the CRCs.
            for page in image[..metadata_bytes].chunks_mut(4096) {
                if page.iter().any(|&b| b != 0) {
                    spool_blob::format::seal_page(page);
                }
            }
        }
        // Only the metadata changes from round to round (a repair writes nothing else).
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        file.write_all_at(&image, 0).unwrap();
        assert_eq!(file.metadata().unwrap().len(), 64 << 20);
        let Ok(checked) = check_image(&file, &mut |_| {}) else {
            refused += 1;
            continue;
        };
        if !checked.report.problems.is_empty() {
            damaged += 1;
        }
        if round % 4 == 0 && repair_image(&file, &checked).is_ok() {
            let again = check_image(&file, &mut |_| {}).expect("a repaired store checks");
            assert!(
                again
                    .report
                    .problems
                    .iter()
                    .all(|p| !p.kind.name().starts_with("mask_bit")
                        || again.report.blobs.iter().any(|b| b.damaged.is_some())),
                "round {round}: masks left wrong: {:?}",
                again.report.problems
            );
        }
    }
    // Some damage is harmless (a free page's bytes, a descriptor's padding), but most of it
    // must be found.
    assert!(
        damaged >= 40,
        "only {damaged} of 1000 damaged images were found damaged"
    );
    assert!(refused >= 1, "some damage hits the signature or version");
}

/// An in-memory image that logs each write (offset, clean flag when it is page 0) and sync.
struct Logged {
    image: std::cell::RefCell<Vec<u8>>,
    log: std::cell::RefCell<Vec<String>>,
}

impl spool_blob::check::image::ImageIo for Logged {
    fn size(&self) -> std::io::Result<u64> {
        self.image.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.image.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let entry = if offset == 0 {
            format!("super clean={}", buf[16])
        } else {
            format!("write {offset}")
        };
        self.log.borrow_mut().push(entry);
        self.image.write_at(buf, offset)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.log.borrow_mut().push("sync".into());
        Ok(())
    }
}

/// A repair marks the store dirty (synced) before its first change and clean only after the
/// last one is synced.
#[test]
fn a_repair_is_dirty_until_every_change_is_synced() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    store(d);
    let mut image = std::fs::read(d.join("s.img")).unwrap();
    image[2 * 4096 + 5] &= !0b10; // a used cluster's bit
    image[4096 + 5] |= 0b1000_0000; // an orphaned md page's bit
    let logged = Logged {
        image: std::cell::RefCell::new(image),
        log: std::cell::RefCell::new(Vec::new()),
    };
    let checked = check_image(&logged, &mut |_| {}).unwrap();
    assert_eq!(
        checked.report.problems.len(),
        2,
        "{:?}",
        checked.report.problems
    );
    let repaired = repair_image(&logged, &checked).unwrap();
    assert_eq!(repaired.changes.len(), 2, "{:?}", repaired.changes);
    let log = logged.log.borrow().clone();
    assert_eq!(log[..2], ["super clean=0", "sync"], "{log:?}");
    assert_eq!(
        log[log.len() - 3..],
        ["sync", "super clean=1", "sync"],
        "{log:?}"
    );
    assert!(log.contains(&format!("write {}", 4096)), "{log:?}");
    assert!(log.contains(&format!("write {}", 2 * 4096)), "{log:?}");
    let again = check_image(&logged, &mut |_| {}).unwrap();
    assert!(again.report.is_clean(), "{:?}", again.report.problems);
}
