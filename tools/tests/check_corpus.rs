//! Goal: `spool check` names every kind of on-disk damage (the problem's kind, blob and md
//! page), and `--repair` leaves a store that loads, with every blob whose metadata was
//! intact reading back its data exactly. Method: a real store made by Spool (an lvol store
//! with thick, thin, snapshot and clone blobs holding known patterns, one blob with a
//! two-page chain) and the SPDK fixtures; each case corrupts one field of a copy with raw
//! byte edits, runs `check --json` (exit 2, the problem listed), then `check --repair`, then
//! loads the store (`spool ls`) and exports the intact blobs.

mod support;

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use spool_blob::format::md_page::DESC_OFFSET;
use spool_blob::format::super_block::SuperBlock;
use spool_blob::format::{seal_page, PAGE_SIZE};
use spool_blob::meta::{parse_chain, serialize_chain, BlobMeta, ClusterCheck};
use support::{fixture_image, hex_id, json, manifest, ok_in, pattern, sha256_hex, spool_in, Run};

const MIB: usize = 1 << 20;

/// The Spool-made store every case starts from: blob names, ids and logical contents.
struct Base {
    dir: tempfile::TempDir,
    ids: BTreeMap<&'static str, u64>,
    contents: BTreeMap<&'static str, Vec<u8>>,
}

/// The id `create`, `snapshot` and `clone` print (hex, as SPDK prints ids).
fn id_of(run: &Run) -> u64 {
    let text = run.text();
    let hex = text.trim_end().trim_start_matches("0x");
    u64::from_str_radix(hex, 16).expect("an id in hex")
}

fn write_file(dir: &Path, name: &str, data: &[u8]) -> String {
    std::fs::write(dir.join(name), data).unwrap();
    name.to_string()
}

/// lvs0 with: `a` thick 4 MiB of P(1); `b` thin 8 MiB (P(2) over 3 MiB, then after the
/// snapshot `s`, P(3) over its second MiB); `s` the snapshot; `c` thick 2 MiB of P(4) with
/// two 3000-byte xattrs (a two-page chain).
fn base() -> Base {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok_in(d, &["init", "base.img", "--size", "64M", "--lvs", "lvs0"]);
    let mut ids = BTreeMap::new();
    let mut contents = BTreeMap::new();
    ids.insert(
        "a",
        id_of(&ok_in(
            d,
            &["create", "base.img", "--size", "4M", "--name", "a"],
        )),
    );
    let a = pattern(1, 4 * MIB);
    let file = write_file(d, "a.bin", &a);
    ok_in(d, &["import", "base.img", "a", &file]);
    contents.insert("a", a);
    ids.insert(
        "b",
        id_of(&ok_in(
            d,
            &[
                "create", "base.img", "--size", "8M", "--thin", "--name", "b",
            ],
        )),
    );
    let mut b = vec![0u8; 8 * MIB];
    b[..3 * MIB].copy_from_slice(&pattern(2, 3 * MIB));
    let file = write_file(d, "b0.bin", &b[..3 * MIB]);
    ok_in(d, &["import", "base.img", "b", &file]);
    contents.insert("s", b.clone());
    ids.insert(
        "s",
        id_of(&ok_in(d, &["snapshot", "base.img", "b", "--name", "s"])),
    );
    let second = pattern(3, MIB);
    b[MIB..2 * MIB].copy_from_slice(&second);
    let file = write_file(d, "b1.bin", &second);
    ok_in(
        d,
        &[
            "import",
            "base.img",
            "b",
            &file,
            "--offset",
            &MIB.to_string(),
        ],
    );
    contents.insert("b", b);
    let big = "x".repeat(3000);
    let (x1, x2) = (format!("big1={big}"), format!("big2={big}"));
    ids.insert(
        "c",
        id_of(&ok_in(
            d,
            &[
                "create", "base.img", "--size", "2M", "--name", "c", "--xattr", &x1, "--xattr", &x2,
            ],
        )),
    );
    let c = pattern(4, 2 * MIB);
    let file = write_file(d, "c.bin", &c);
    ok_in(d, &["import", "base.img", "c", &file]);
    contents.insert("c", c);
    Base { dir, ids, contents }
}

impl Base {
    fn path(&self, image: &str) -> PathBuf {
        self.dir.path().join(image)
    }

    /// A fresh copy of the base image.
    fn copy(&self, name: &str) -> String {
        let image = format!("{name}.img");
        std::fs::copy(self.path("base.img"), self.path(&image)).unwrap();
        image
    }

    fn id(&self, name: &str) -> u64 {
        self.ids[name]
    }
}

// ---- raw image edits -------------------------------------------------------------------

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

fn write_at(path: &Path, offset: u64, bytes: &[u8]) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .write_all_at(bytes, offset)
        .unwrap();
}

fn super_block(path: &Path) -> SuperBlock {
    SuperBlock::decode(&read_at(path, 0, PAGE_SIZE)).expect("a valid super block")
}

/// Edits the super block's raw bytes, resealing its CRC when `reseal`.
fn edit_super(path: &Path, reseal: bool, edit: impl FnOnce(&mut [u8])) {
    let mut page = read_at(path, 0, PAGE_SIZE);
    edit(&mut page);
    if reseal {
        seal_page(&mut page);
    }
    write_at(path, 0, &page);
}

fn md_offset(path: &Path, page: u32) -> u64 {
    (u64::from(super_block(path).md_start) + u64::from(page)) * PAGE_SIZE as u64
}

fn md_page(path: &Path, page: u32) -> Vec<u8> {
    read_at(path, md_offset(path, page), PAGE_SIZE)
}

/// Edits md page `page`, resealing its CRC when `reseal`.
fn edit_page(path: &Path, page: u32, reseal: bool, edit: impl FnOnce(&mut [u8])) {
    let mut bytes = md_page(path, page);
    edit(&mut bytes);
    if reseal {
        seal_page(&mut bytes);
    }
    write_at(path, md_offset(path, page), &bytes);
}

#[derive(Clone, Copy)]
enum Mask {
    Pages,
    Clusters,
    BlobIds,
}

/// Sets or clears bit `bit` of a mask.
fn set_mask_bit(path: &Path, mask: Mask, bit: u64, value: bool) {
    let block = super_block(path);
    let start = match mask {
        Mask::Pages => block.used_page_mask_start,
        Mask::Clusters => block.used_cluster_mask_start,
        Mask::BlobIds => block.used_blobid_mask_start,
    };
    let offset = u64::from(start) * PAGE_SIZE as u64 + 5 + bit / 8;
    let mut byte = read_at(path, offset, 1);
    if value {
        byte[0] |= 1 << (bit % 8);
    } else {
        byte[0] &= !(1 << (bit % 8));
    }
    write_at(path, offset, &byte);
}

fn mask_bit(path: &Path, mask: Mask, bit: u64) -> bool {
    let block = super_block(path);
    let start = match mask {
        Mask::Pages => block.used_page_mask_start,
        Mask::Clusters => block.used_cluster_mask_start,
        Mask::BlobIds => block.used_blobid_mask_start,
    };
    let offset = u64::from(start) * PAGE_SIZE as u64 + 5 + bit / 8;
    read_at(path, offset, 1)[0] & (1 << (bit % 8)) != 0
}

struct Anything;

impl ClusterCheck for Anything {
    fn cluster_ok(&self, _cluster: u32) -> bool {
        true
    }
    fn md_page_ok(&self, _page: u32) -> bool {
        true
    }
}

/// The md pages of blob `id`'s chain, root first.
fn chain_of(path: &Path, id: u64) -> Vec<u32> {
    let mut pages = vec![id as u32];
    loop {
        let bytes = md_page(path, *pages.last().unwrap());
        let next = u32::from_le_bytes(bytes[4088..4092].try_into().unwrap());
        if next == u32::MAX {
            return pages;
        }
        pages.push(next);
    }
}

/// Parses blob `id` (extent pages applied) with the blob layer's own parser.
fn meta_of(path: &Path, id: u64) -> BlobMeta {
    let pages: Vec<Vec<u8>> = chain_of(path, id)
        .into_iter()
        .map(|p| md_page(path, p))
        .collect();
    let refs: Vec<&[u8]> = pages.iter().map(|p| &p[..]).collect();
    let mut parsed = parse_chain(id, &refs, &Anything).unwrap();
    for (index, page) in parsed.pending_extent_pages.clone() {
        spool_blob::meta::apply_extent_page(
            &mut parsed.meta,
            index,
            &md_page(path, page),
            &Anything,
        )
        .unwrap();
    }
    parsed.meta
}

/// Rewrites blob `id`'s chain (same pages, same count) after `edit` changes its metadata.
fn rewrite_meta(path: &Path, id: u64, edit: impl FnOnce(&mut BlobMeta)) {
    let chain = chain_of(path, id);
    let pages: Vec<Vec<u8>> = chain.iter().map(|&p| md_page(path, p)).collect();
    let refs: Vec<&[u8]> = pages.iter().map(|p| &p[..]).collect();
    let mut meta = parse_chain(id, &refs, &Anything).unwrap().meta;
    edit(&mut meta);
    let areas = serialize_chain(&meta).unwrap();
    assert_eq!(
        areas.len(),
        chain.len(),
        "the edit keeps the chain's length"
    );
    for (index, (area, &page)) in areas.iter().zip(&chain).enumerate() {
        let next = chain.get(index + 1).copied().unwrap_or(u32::MAX);
        let bytes = spool_blob::format::md_page::encode_page(id, index as u32, next, area.bytes());
        write_at(path, md_offset(path, page), &bytes);
    }
}

fn internal(meta: &mut BlobMeta, name: &str, value: u64) {
    meta.set_xattr(true, name.as_bytes(), &value.to_le_bytes())
        .unwrap();
}

// ---- running check ---------------------------------------------------------------------

/// `spool check IMAGE --json`, expecting `code`; returns the report.
fn check_json(dir: &Path, image: &str, code: i32) -> serde_json::Value {
    let run = spool_in(dir, &["check", image, "--json"]);
    assert_eq!(run.code, Some(code), "{}{}", run.text(), run.stderr);
    json(&run)
}

/// The problems of `kind` in a JSON report.
fn problems<'r>(report: &'r serde_json::Value, kind: &str) -> Vec<&'r serde_json::Value> {
    report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["kind"] == kind)
        .collect()
}

/// Asserts `report` lists a problem of `kind` about `blob` (and md page `page`).
fn assert_names(
    report: &serde_json::Value,
    kind: &str,
    blob: Option<u64>,
    page: Option<u32>,
) -> serde_json::Value {
    let found = problems(report, kind);
    let hit = found
        .iter()
        .find(|p| blob.is_none_or(|b| p["blob"] == b) && page.is_none_or(|pg| p["page"] == pg));
    match hit {
        Some(p) => (*p).clone(),
        None => panic!(
            "no {kind} problem for blob {blob:x?} page {page:?}: {}",
            serde_json::to_string_pretty(&report["problems"]).unwrap()
        ),
    }
}

/// Repairs in place; returns the final check's exit code and stdout.
fn repair(dir: &Path, image: &str) -> Run {
    let run = spool_in(dir, &["check", image, "--repair"]);
    assert!(
        run.code == Some(0) || run.code == Some(2),
        "repair of {image}: {}{}",
        run.text(),
        run.stderr
    );
    run
}

/// The store loads (ls) and every blob in `intact` reads back its pattern.
fn assert_loads_and_reads(base: &Base, image: &str, intact: &[&str]) {
    let d = base.dir.path();
    let listed = json(&ok_in(d, &["ls", image, "--json"]));
    assert!(listed.as_array().unwrap().len() >= 2);
    for name in intact {
        let out = format!("{image}.{name}.out");
        ok_in(
            d,
            &["export", image, &format!("{:#x}", base.id(name)), &out],
        );
        let data = std::fs::read(d.join(&out)).unwrap();
        assert!(
            data == base.contents[name],
            "{image}: blob {name} does not read back its data"
        );
    }
    let block = super_block(&base.path(image));
    assert_eq!(block.clean, 1, "{image}: left clean");
}

// ---- the corpus ------------------------------------------------------------------------

#[test]
fn a_clean_store_checks_clean_and_repair_changes_nothing() {
    let base = base();
    let d = base.dir.path();
    let report = check_json(d, "base.img", 0);
    assert_eq!(report["consistent"], true);
    assert_eq!(report["blobs"].as_array().unwrap().len(), 5);
    let c = report["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["id"] == base.id("c"))
        .unwrap();
    assert_eq!(c["md_pages"], 3, "two chain pages and one extent page");
    let before = std::fs::read(base.path("base.img")).unwrap();
    let run = spool_in(d, &["check", "base.img", "--repair"]);
    assert_eq!(run.code, Some(0), "{}{}", run.text(), run.stderr);
    assert!(
        run.text().contains("repair: nothing to change"),
        "{}",
        run.text()
    );
    assert!(std::fs::read(base.path("base.img")).unwrap() == before);
}

#[test]
fn super_block_damage_is_named_and_repaired() {
    let base = base();
    let d = base.dir.path();
    let all = ["a", "b", "s", "c"];

    let image = base.copy("crc");
    edit_super(&base.path(&image), false, |p| p[200] = 0xAA);
    let report = check_json(d, &image, 2);
    assert_names(&report, "super_block_crc", None, None);
    assert_eq!(repair(d, &image).code, Some(0));
    assert_loads_and_reads(&base, &image, &all);
    assert_eq!(
        read_at(&base.path(&image), 200, 1),
        [0],
        "reserved bytes zeroed"
    );

    let image = base.copy("length");
    edit_super(&base.path(&image), true, |p| {
        p[12..16].copy_from_slice(&100u32.to_le_bytes())
    });
    let report = check_json(d, &image, 2);
    let problem = assert_names(&report, "super_block_field", None, None);
    assert_eq!(problem["field"], "super.length");
    assert_eq!(problem["found"], "100");
    assert_eq!(repair(d, &image).code, Some(0));
    assert_loads_and_reads(&base, &image, &all);
    assert_eq!(read_at(&base.path(&image), 12, 4), 4096u32.to_le_bytes());

    let image = base.copy("cleanflag");
    edit_super(&base.path(&image), true, |p| {
        p[16..20].copy_from_slice(&7u32.to_le_bytes())
    });
    let report = check_json(d, &image, 2);
    assert_eq!(
        assert_names(&report, "super_block_field", None, None)["field"],
        "super.clean"
    );
    assert_eq!(repair(d, &image).code, Some(0));
    assert_loads_and_reads(&base, &image, &all);

    let image = base.copy("superblob");
    edit_super(&base.path(&image), true, |p| {
        p[20..28].copy_from_slice(&0x1_0000_0030u64.to_le_bytes())
    });
    let report = check_json(d, &image, 2);
    assert_names(&report, "super_blob_missing", Some(0x1_0000_0030), None);
    let run = repair(d, &image);
    assert_eq!(run.code, Some(2), "a missing super blob needs a decision");
    assert!(
        run.text().contains("not repaired: super_blob_missing"),
        "{}",
        run.text()
    );

    // Geometry that cannot locate the metadata: named, and repair refuses (exit 1).
    let image = base.copy("mdlen");
    edit_super(&base.path(&image), true, |p| {
        p[52..56].copy_from_slice(&1_000_000u32.to_le_bytes())
    });
    let report = check_json(d, &image, 2);
    let problem = assert_names(&report, "super_block_field", None, None);
    assert_eq!(problem["field"], "super.md");
    let before = std::fs::read(base.path(&image)).unwrap();
    let run = spool_in(d, &["check", &image, "--repair"]);
    assert_eq!(run.code, Some(1), "{}{}", run.text(), run.stderr);
    assert!(run.stderr.contains("cannot repair"), "{}", run.stderr);
    assert!(
        std::fs::read(base.path(&image)).unwrap() == before,
        "nothing written"
    );
}

#[test]
fn mask_bits_set_and_cleared_are_named_and_rebuilt() {
    let base = base();
    let d = base.dir.path();
    let all = ["a", "b", "s", "c"];
    let a = base.id("a");
    let c = base.id("c");
    let a_cluster = meta_of(&base.path("base.img"), a).clusters[0];

    let image = base.copy("cluster_cleared");
    let path = base.path(&image);
    set_mask_bit(&path, Mask::Clusters, u64::from(a_cluster), false);
    let report = check_json(d, &image, 2);
    let problem = assert_names(&report, "mask_bit_missing", Some(a), None);
    assert_eq!(problem["field"], format!("used_cluster_mask[{a_cluster}]"));
    assert_eq!(repair(d, &image).code, Some(0));
    assert!(mask_bit(&path, Mask::Clusters, u64::from(a_cluster)));
    assert_loads_and_reads(&base, &image, &all);

    let image = base.copy("cluster_orphan");
    let path = base.path(&image);
    set_mask_bit(&path, Mask::Clusters, 60, true);
    let report = check_json(d, &image, 2);
    let problem = assert_names(&report, "mask_bit_extra", None, None);
    assert_eq!(problem["field"], "used_cluster_mask[60]");
    let run = repair(d, &image);
    assert_eq!(run.code, Some(0));
    assert!(
        run.text()
            .contains("used-cluster mask rewritten from the metadata: 0 bit(s) set, 1 cleared"),
        "{}",
        run.text()
    );
    assert!(
        !mask_bit(&path, Mask::Clusters, 60),
        "the orphaned cluster is free again"
    );
    assert_loads_and_reads(&base, &image, &all);

    let image = base.copy("page_cleared");
    let path = base.path(&image);
    set_mask_bit(&path, Mask::Pages, u64::from(a as u32), false);
    let report = check_json(d, &image, 2);
    assert_names(&report, "mask_bit_missing", Some(a), Some(a as u32));
    assert_eq!(repair(d, &image).code, Some(0));
    assert!(mask_bit(&path, Mask::Pages, u64::from(a as u32)));
    assert_loads_and_reads(&base, &image, &all);

    let image = base.copy("page_orphan");
    let path = base.path(&image);
    set_mask_bit(&path, Mask::Pages, 50, true);
    let report = check_json(d, &image, 2);
    assert_names(&report, "mask_bit_extra", None, Some(50));
    assert_eq!(repair(d, &image).code, Some(0));
    assert!(!mask_bit(&path, Mask::Pages, 50));
    assert_loads_and_reads(&base, &image, &all);

    // A blob the blob-id mask forgot is found from its root page and kept.
    let image = base.copy("blobid_cleared");
    let path = base.path(&image);
    set_mask_bit(&path, Mask::BlobIds, u64::from(c as u32), false);
    let report = check_json(d, &image, 2);
    assert_names(&report, "mask_bit_missing", Some(c), Some(c as u32));
    assert_eq!(repair(d, &image).code, Some(0));
    assert!(mask_bit(&path, Mask::BlobIds, u64::from(c as u32)));
    assert_loads_and_reads(&base, &image, &all);

    let image = base.copy("blobid_extra");
    let path = base.path(&image);
    set_mask_bit(&path, Mask::BlobIds, 50, true);
    let report = check_json(d, &image, 2);
    assert_names(&report, "mask_bit_extra", Some(0x1_0000_0032), Some(50));
    assert_eq!(repair(d, &image).code, Some(0));
    assert!(!mask_bit(&path, Mask::BlobIds, 50));
    assert_loads_and_reads(&base, &image, &all);

    // A mask header naming another mask.
    let image = base.copy("mask_type");
    let path = base.path(&image);
    let start = super_block(&path).used_cluster_mask_start;
    write_at(&path, u64::from(start) * PAGE_SIZE as u64, &[2]);
    let report = check_json(d, &image, 2);
    assert_eq!(
        assert_names(&report, "mask_header", None, None)["field"],
        "used_cluster_mask"
    );
    assert_eq!(repair(d, &image).code, Some(0));
    assert_eq!(read_at(&path, u64::from(start) * PAGE_SIZE as u64, 1), [1]);
    assert_loads_and_reads(&base, &image, &all);
}

/// Chain damage in blob `c` (its second page): named with page and blob; the repair keeps
/// `c` listed as damaged with its pages and clusters, and every other blob reads back.
#[test]
fn chain_damage_is_named_and_other_blobs_survive_repair() {
    let base = base();
    let d = base.dir.path();
    let a = base.id("a");
    let c = base.id("c");
    let chain = chain_of(&base.path("base.img"), c);
    assert_eq!(chain.len(), 2, "c's xattrs take two pages");
    let (root, second) = (chain[0], chain[1]);
    let c_clusters: Vec<u32> = meta_of(&base.path("base.img"), c).clusters;
    let others = ["a", "b", "s"];

    type Edit = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Edit, &str, u32)> = vec![
        (
            "crc",
            Box::new(move |p: &Path| edit_page(p, second, false, |b| b[1000] ^= 1)),
            "page_crc",
            second,
        ),
        (
            "sequence",
            Box::new(move |p: &Path| {
                edit_page(p, second, true, |b| {
                    b[8..12].copy_from_slice(&7u32.to_le_bytes())
                })
            }),
            "page_sequence",
            second,
        ),
        (
            "next",
            Box::new(move |p: &Path| {
                edit_page(p, root, true, |b| {
                    b[4088..4092].copy_from_slice(&1000u32.to_le_bytes())
                })
            }),
            "page_next",
            root,
        ),
        (
            "loop",
            Box::new(move |p: &Path| {
                edit_page(p, second, true, |b| {
                    b[4088..4092].copy_from_slice(&root.to_le_bytes())
                })
            }),
            "chain_loop",
            second,
        ),
        (
            "blobid",
            Box::new(move |p: &Path| {
                edit_page(p, second, true, |b| {
                    b[0..8].copy_from_slice(&a.to_le_bytes())
                })
            }),
            "page_blob_id",
            second,
        ),
        (
            "descriptor",
            Box::new(move |p: &Path| {
                // The FLAGS descriptor (first in the root) claims 23 bytes instead of 24.
                edit_page(p, root, true, |b| {
                    assert_eq!(b[DESC_OFFSET], 3);
                    b[DESC_OFFSET + 1..DESC_OFFSET + 5].copy_from_slice(&23u32.to_le_bytes())
                })
            }),
            "descriptor",
            root,
        ),
        (
            "overrun",
            Box::new(move |p: &Path| {
                edit_page(p, second, true, |b| {
                    b[DESC_OFFSET + 1..DESC_OFFSET + 5].copy_from_slice(&5000u32.to_le_bytes())
                })
            }),
            "descriptor",
            second,
        ),
        (
            "rootcrc",
            Box::new(move |p: &Path| edit_page(p, root, false, |b| b[2000] ^= 0x40)),
            "page_crc",
            root,
        ),
    ];
    for (name, edit, kind, page) in cases {
        let image = base.copy(name);
        let path = base.path(&image);
        edit(&path);
        let report = check_json(d, &image, 2);
        assert_names(&report, kind, Some(c), Some(page));
        let damaged = report["blobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["id"] == c)
            .unwrap_or_else(|| panic!("{name}: c listed"));
        assert!(damaged["damaged"].is_string(), "{name}: c is damaged");
        let run = repair(d, &image);
        assert_eq!(run.code, Some(2), "{name}: c stays listed as damaged");
        assert!(
            run.text().contains(&format!("blob {c:#x}")),
            "{name}: {}",
            run.text()
        );
        // Its clusters and pages are kept (never freed for another blob to take).
        for &cluster in &c_clusters {
            assert!(
                mask_bit(&path, Mask::Clusters, u64::from(cluster)),
                "{name}: cluster {cluster} kept"
            );
        }
        assert!(
            mask_bit(&path, Mask::Pages, u64::from(root)),
            "{name}: root page kept"
        );
        assert_loads_and_reads(&base, &image, &others);
        if name != "rootcrc" && name != "descriptor" {
            // The root's FLAGS were edited: read-only now.
            let flags = &md_page(&path, root)[DESC_OFFSET + 5..DESC_OFFSET + 29];
            assert_eq!(flags[8] & 1, 1, "{name}: c marked read-only");
        }
    }
}

#[test]
fn extent_and_cluster_damage_is_named() {
    let base = base();
    let d = base.dir.path();
    let a = base.id("a");
    let c = base.id("c");
    let a_meta = meta_of(&base.path("base.img"), a);
    let c_meta = meta_of(&base.path("base.img"), c);

    // An extent table pointing outside the md region.
    let image = base.copy("ep_range");
    let path = base.path(&image);
    rewrite_meta(&path, c, |m| m.extent_pages[0] = 5000);
    let report = check_json(d, &image, 2);
    let problem = assert_names(&report, "extent_page_out_of_range", Some(c), None);
    assert_eq!(problem["found"], "5000");
    repair(d, &image);
    assert_loads_and_reads(&base, &image, &["a", "b", "s"]);

    // An extent page pointed to twice: c takes a's extent page.
    let image = base.copy("ep_shared");
    let path = base.path(&image);
    let a_ep = a_meta.extent_pages[0];
    rewrite_meta(&path, c, |m| m.extent_pages[0] = a_ep);
    let report = check_json(d, &image, 2);
    assert_names(&report, "extent_page_shared", None, Some(a_ep));
    assert_names(&report, "cluster_shared", None, None);
    let run = repair(d, &image);
    assert_eq!(run.code, Some(2), "double ownership needs a decision");
    assert!(run.text().contains("marked read-only"), "{}", run.text());
    assert_loads_and_reads(&base, &image, &["a", "b", "s"]);
    let listed = json(&ok_in(d, &["ls", &image, "--json"]));
    let a_row = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == a)
        .unwrap();
    assert_eq!(
        a_row["read_only"], true,
        "a, sharing clusters, is read-only now"
    );

    // A cluster owned twice: c's first cluster is a's.
    let image = base.copy("cluster_twice");
    let path = base.path(&image);
    let c_ep = c_meta.extent_pages[0];
    edit_page(&path, c_ep, true, |b| {
        // EXTENT_PAGE descriptor: type, length, start cluster, then the entries.
        assert_eq!(b[DESC_OFFSET], 6);
        b[DESC_OFFSET + 9..DESC_OFFSET + 13].copy_from_slice(&a_meta.clusters[0].to_le_bytes());
    });
    let report = check_json(d, &image, 2);
    let problem = assert_names(&report, "cluster_shared", None, None);
    let ids = [
        problem["blob"].as_u64().unwrap(),
        a.max(c) ^ a.min(c) ^ problem["blob"].as_u64().unwrap(),
    ];
    assert!(ids.contains(&a) && ids.contains(&c), "{problem}");
    assert!(
        problem["found"]
            .as_str()
            .unwrap()
            .contains(&format!("{:#x}", a.min(c))),
        "{problem}"
    );
    // The cluster c no longer maps is orphaned.
    assert_names(&report, "mask_bit_extra", None, None);
    let run = repair(d, &image);
    assert_eq!(run.code, Some(2));
    assert_loads_and_reads(&base, &image, &["a", "b", "s"]);

    // A cluster past the store.
    let image = base.copy("past");
    let path = base.path(&image);
    edit_page(&path, c_ep, true, |b| {
        b[DESC_OFFSET + 9..DESC_OFFSET + 13].copy_from_slice(&1000u32.to_le_bytes());
    });
    let report = check_json(d, &image, 2);
    let problem = assert_names(&report, "cluster_out_of_range", Some(c), None);
    assert_eq!(problem["field"], "cluster[0]");
    assert_eq!(problem["found"], "1000");
    repair(d, &image);
    assert_loads_and_reads(&base, &image, &["a", "b", "s"]);
}

/// A cluster inside the metadata clusters (a store whose md region spans three clusters).
#[test]
fn a_cluster_in_the_metadata_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok_in(d, &["init", "md.img", "--size", "64M", "--md-pages", "600"]);
    let x = id_of(&ok_in(d, &["create", "md.img", "--size", "1M"]));
    let path = d.join("md.img");
    let ep = meta_of(&path, x).extent_pages[0];
    edit_page(&path, ep, true, |b| {
        b[DESC_OFFSET + 9..DESC_OFFSET + 13].copy_from_slice(&1u32.to_le_bytes());
    });
    let report = check_json(d, "md.img", 2);
    assert_eq!(report["md_clusters"], 3);
    let problem = assert_names(&report, "cluster_in_metadata", Some(x), None);
    assert_eq!(problem["found"], "1");
    let run = repair(d, "md.img");
    assert_eq!(run.code, Some(2), "{}", run.text());
    ok_in(d, &["ls", "md.img"]);
}

#[test]
fn graph_markers_and_lvol_names_are_named() {
    let base = base();
    let d = base.dir.path();
    let all = ["a", "b", "s", "c"];
    let (a, b, s, c) = (base.id("a"), base.id("b"), base.id("s"), base.id("c"));

    // A clone whose parent is gone.
    let image = base.copy("dangling");
    let path = base.path(&image);
    rewrite_meta(&path, b, |m| internal(m, "SNAP", 0x1_0000_0030));
    let report = check_json(d, &image, 2);
    let problem = assert_names(&report, "dangling_parent", Some(b), Some(b as u32));
    assert_eq!(problem["field"], "SNAP");
    let run = repair(d, &image);
    assert_eq!(run.code, Some(2));
    assert!(
        run.text().contains("not repaired: dangling_parent"),
        "{}",
        run.text()
    );
    assert_loads_and_reads(&base, &image, &["a", "s", "c"]);

    // A parent cycle: the snapshot names its own clone as parent.
    let image = base.copy("cycle");
    let path = base.path(&image);
    rewrite_meta(&path, s, |m| internal(m, "SNAP", b));
    let report = check_json(d, &image, 2);
    assert_eq!(
        problems(&report, "parent_cycle").len(),
        1,
        "one cycle, reported once"
    );
    assert_names(&report, "parent_not_read_only", Some(b), None);
    let run = repair(d, &image);
    assert_eq!(run.code, Some(2));
    assert!(
        run.text().contains("not repaired: parent_cycle"),
        "{}",
        run.text()
    );

    // A writable parent.
    let image = base.copy("writable_parent");
    let path = base.path(&image);
    rewrite_meta(&path, s, |m| m.flags.data_ro = 0);
    let report = check_json(d, &image, 2);
    assert_names(&report, "parent_not_read_only", Some(s), Some(s as u32));
    assert_eq!(repair(d, &image).code, Some(0));
    assert_eq!(meta_of(&path, s).flags.data_ro, 1);
    assert_loads_and_reads(&base, &image, &all);

    // A snapshot a crash left half made: the load finishes it.
    let image = base.copy("snaptmp");
    let path = base.path(&image);
    rewrite_meta(&path, s, |m| internal(m, "SNAPTMP", b));
    let report = check_json(d, &image, 2);
    assert_names(&report, "snapshot_pending", Some(s), Some(s as u32));
    let run = repair(d, &image);
    assert_eq!(run.code, Some(0), "{}", run.text());
    assert!(run.text().contains("finished"), "{}", run.text());
    assert!(meta_of(&path, s).xattr(true, b"SNAPTMP").is_none());
    assert_loads_and_reads(&base, &image, &all);

    // A merge a crash interrupted before it committed: the load undoes it.
    let image = base.copy("snaprm");
    let path = base.path(&image);
    rewrite_meta(&path, s, |m| internal(m, "SNAPRM", b));
    let report = check_json(d, &image, 2);
    assert_names(&report, "merge_pending", Some(s), Some(s as u32));
    let run = repair(d, &image);
    assert_eq!(run.code, Some(0), "{}", run.text());
    assert!(run.text().contains("undone"), "{}", run.text());
    assert!(meta_of(&path, s).xattr(true, b"SNAPRM").is_none());
    assert_loads_and_reads(&base, &image, &all);

    // Duplicate lvol name and uuid: reported, left for the user.
    let image = base.copy("dupname");
    let path = base.path(&image);
    let a_name = meta_of(&path, a).xattr(false, b"name").unwrap().to_vec();
    let a_uuid = meta_of(&path, a).xattr(false, b"uuid").unwrap().to_vec();
    rewrite_meta(&path, c, |m| {
        m.set_xattr(false, b"name", &a_name).unwrap();
        m.set_xattr(false, b"uuid", &a_uuid).unwrap();
    });
    let report = check_json(d, &image, 2);
    let problem = assert_names(&report, "lvol_name_duplicate", Some(c), Some(c as u32));
    assert!(
        problem["found"].as_str().unwrap().contains("\"a\""),
        "{problem}"
    );
    assert_names(&report, "lvol_uuid_duplicate", Some(c), Some(c as u32));
    let run = repair(d, &image);
    assert_eq!(run.code, Some(2));
    assert!(
        run.text().contains("not repaired: lvol_name_duplicate"),
        "{}",
        run.text()
    );
}

// ---- SPDK's stores ---------------------------------------------------------------------

/// Every blob of fixture `name` except `skip` reads back the manifest's sha256.
fn assert_fixture_reads(dir: &Path, name: &str, image: &Path, skip: &[u64]) {
    let manifest = manifest(name);
    let image = image.to_str().unwrap();
    ok_in(dir, &["ls", image]);
    for blob in manifest["blobs"].as_array().unwrap() {
        let id = hex_id(blob["id_hex"].as_str().unwrap());
        if skip.contains(&id) {
            continue;
        }
        let out = dir.join(format!("{name}-{id:x}.out"));
        ok_in(
            dir,
            &["export", image, &format!("{id:#x}"), out.to_str().unwrap()],
        );
        let data = std::fs::read(&out).unwrap();
        assert_eq!(
            sha256_hex(&data),
            blob["sha256"].as_str().unwrap(),
            "{name}: blob {id:#x}"
        );
    }
}

#[test]
fn spdk_fixtures_check_clean_and_their_damage_is_named_and_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for name in [
        "p1-blobcli-basic",
        "p2-lvs-thin-snap",
        "p3-dirty",
        "p4-many-xattrs",
    ] {
        let image = fixture_image(name, d);
        let report = check_json(d, image.to_str().unwrap(), 0);
        assert!(
            report["problems"].as_array().unwrap().is_empty(),
            "{name}: {report}"
        );
    }
    // p3 is dirty: the repair writes the masks SPDK's own recovery wrote, and clean = 1.
    let p3 = fixture_image("p3-dirty", d);
    let run = repair(d, p3.to_str().unwrap());
    assert_eq!(run.code, Some(0));
    let recovered = &manifest("p3-dirty")["recovery"]["masks_after_recovery"];
    for (mask, key) in [
        (Mask::Pages, "used_md_pages"),
        (Mask::Clusters, "used_clusters"),
        (Mask::BlobIds, "used_blobids"),
    ] {
        let want: Vec<u64> = recovered[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        let got: Vec<u64> = (0..32).filter(|&bit| mask_bit(&p3, mask, bit)).collect();
        assert_eq!(got, want, "{key}");
    }
    assert_eq!(super_block(&p3).clean, 1);
    assert_fixture_reads(d, "p3-dirty", &p3, &[]);

    // p2: a lost cluster bit of lv0, and a clone whose parent is gone.
    let p2 = fixture_image("p2-lvs-thin-snap", d);
    let manifest2 = manifest("p2-lvs-thin-snap");
    let blobs = manifest2["blobs"].as_array().unwrap();
    let with_clusters = blobs
        .iter()
        .find(|b| b["num_allocated_clusters"].as_u64().unwrap() > 0)
        .unwrap();
    let owner = hex_id(with_clusters["id_hex"].as_str().unwrap());
    let cluster = with_clusters["allocated_clusters"][0][1].as_u64().unwrap();
    set_mask_bit(&p2, Mask::Clusters, cluster, false);
    let report = check_json(d, p2.to_str().unwrap(), 2);
    assert_names(&report, "mask_bit_missing", Some(owner), None);
    assert_eq!(repair(d, p2.to_str().unwrap()).code, Some(0));
    assert!(mask_bit(&p2, Mask::Clusters, cluster));
    assert_fixture_reads(d, "p2-lvs-thin-snap", &p2, &[]);

    let p2 = fixture_image("p2-lvs-thin-snap", d);
    let clone = blobs
        .iter()
        .find(|b| b["parent_snapshot_id_hex"].is_string())
        .unwrap();
    let clone_id = hex_id(clone["id_hex"].as_str().unwrap());
    rewrite_meta(&p2, clone_id, |m| internal(m, "SNAP", 0x1_0000_0030));
    let report = check_json(d, p2.to_str().unwrap(), 2);
    assert_names(&report, "dangling_parent", Some(clone_id), None);
    assert_eq!(repair(d, p2.to_str().unwrap()).code, Some(2));
    assert_fixture_reads(d, "p2-lvs-thin-snap", &p2, &[clone_id]);

    // p4: the second page of the 3-page chain (md page 3) has a wrong sequence number.
    let p4 = fixture_image("p4-many-xattrs", d);
    edit_page(&p4, 3, true, |b| {
        b[8..12].copy_from_slice(&9u32.to_le_bytes())
    });
    let report = check_json(d, p4.to_str().unwrap(), 2);
    let problem = assert_names(&report, "page_sequence", Some(0x1_0000_0000), Some(3));
    assert_eq!(problem["expected"], "1");
    assert_eq!(problem["found"], "9");
    assert_eq!(repair(d, p4.to_str().unwrap()).code, Some(2));
    ok_in(d, &["ls", p4.to_str().unwrap()]);

    // p1: blob B's extent page fails its CRC; blob A still reads back.
    let p1 = fixture_image("p1-blobcli-basic", d);
    let manifest1 = manifest("p1-blobcli-basic");
    let blob_b = manifest1["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["id_hex"] == "0x100000004")
        .unwrap();
    let ep = blob_b["extent_pages"].as_array().unwrap()[0]["md_page"]
        .as_u64()
        .unwrap() as u32;
    edit_page(&p1, ep, false, |b| b[3000] ^= 1);
    let report = check_json(d, p1.to_str().unwrap(), 2);
    assert_names(&report, "extent_page", Some(0x1_0000_0004), Some(ep));
    assert_eq!(repair(d, p1.to_str().unwrap()).code, Some(2));
    assert_fixture_reads(d, "p1-blobcli-basic", &p1, &[0x1_0000_0004]);
}

/// A sparse image's holes are skipped (`SEEK_DATA`) rather than read, so a large store checks
/// in time bounded by its data; but a root page written far inside a hole, and one in the
/// region's last page, are still found.
#[test]
fn damage_inside_the_holes_of_a_sparse_store_is_still_found() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok_in(d, &["init", "s.img", "--size", "4G"]);
    ok_in(d, &["create", "s.img", "--size", "8M", "--name", "a"]);
    let path = d.join("s.img");
    let meta = std::fs::metadata(&path).unwrap();
    assert!(
        meta.blocks() * 512 < meta.len() / 64,
        "the image is sparse: {} of {} bytes allocated",
        meta.blocks() * 512,
        meta.len()
    );
    let clean = check_json(d, "s.img", 0);
    assert_eq!(clean["blobs"].as_array().unwrap().len(), 1, "{clean}");
    let md_len = super_block(&path).md_len;
    let planted = [md_len / 2 + 7, md_len - 1];
    for page in planted {
        edit_page(&path, page, true, |bytes| {
            bytes.fill(0);
            bytes[..8].copy_from_slice(&((1u64 << 32) | u64::from(page)).to_le_bytes());
            bytes[4088..4092].copy_from_slice(&u32::MAX.to_le_bytes());
        });
    }
    let report = check_json(d, "s.img", 2);
    for page in planted {
        assert!(
            report["problems"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["page"] == page),
            "the root planted at md page {page} (of {md_len}) is named: {}",
            serde_json::to_string_pretty(&report["problems"]).unwrap()
        );
    }
}
