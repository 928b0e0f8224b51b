//! Review of issue 13 (fourth pass, `review13d`): bounded dirty recovery, `spool check` and
//! `--repair` on paths the earlier reviews did not take. Each test says what it expects and
//! why. Run with `cargo test -p spool-blob --test review13d`.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use std::cell::RefCell;

use common::{run, runtime};
use spool_bdev::{Bdev, BdevDesc, MallocBdev};
use spool_blob::check::check_image;
use spool_blob::check::repair::repair_image;
use spool_blob::format::seal_page;
use spool_blob::{BlobOptions, Blobstore, InitOptions, LoadOptions};

const PAGE: usize = 4096;

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// The byte range of blob `id`'s root page in `image`.
fn root_page(image: &[u8], id: u64) -> std::ops::Range<usize> {
    let at = (u32_at(image, 48) as usize + (id as u32) as usize) * PAGE;
    at..at + PAGE
}

const CLUSTER: u64 = 64 << 10;

/// Loads `image` (bounded or full scan), forgets the store (no unload): whether the load
/// was bounded, and the blob ids.
fn load_ids(image: &[u8], full_scan: bool) -> (bool, BTreeSet<u64>) {
    let bdev = Arc::new(MallocBdev::from_image("r13d", 4096, image).unwrap());
    let desc = BdevDesc::open(bdev as Arc<dyn Bdev>).unwrap();
    let rt = runtime();
    let out = run(&rt, move || async move {
        let (store, report) = Blobstore::load(
            desc,
            &LoadOptions {
                full_scan,
                ..LoadOptions::default()
            },
        )
        .await
        .unwrap();
        let ids = store.blob_ids().into_iter().collect();
        std::mem::forget(store);
        (report.bounded, ids)
    });
    rt.stop();
    out
}

/// A store of `md_pages` md pages with `blobs` empty blobs created and flushed, never
/// unloaded (as after a kill -9): the image and the ids.
fn dirty_with_blobs(md_pages: u32, blobs: u32, clean_first: bool) -> (Vec<u8>, BTreeSet<u64>) {
    let rt = runtime();
    let bdev = Arc::new(MallocBdev::new("r13d", 4096, (16 << 20) / 4096).unwrap());
    let desc = BdevDesc::open(Arc::clone(&bdev) as Arc<dyn Bdev>).unwrap();
    let ids = run(&rt, move || async move {
        let store = Blobstore::init(
            desc,
            &InitOptions {
                cluster_size: CLUSTER,
                md_pages: Some(md_pages),
                ..InitOptions::default()
            },
        )
        .await
        .unwrap();
        let mut ids = BTreeSet::new();
        for _ in 0..blobs {
            ids.insert(store.create_blob(&BlobOptions::default()).await.unwrap());
        }
        store.channel().unwrap().flush().await.unwrap();
        if clean_first {
            store.unload().await.unwrap();
        } else {
            std::mem::forget(store);
        }
        ids
    });
    rt.stop();
    (bdev.snapshot(), ids)
}

/// Expects (a regression guard: passes): with an md region whose length is not a multiple of
/// the record's 64-page chunk (100 pages: chunk 1 is 36 pages long), blobs rooted in the
/// short last chunk survive a kill -9 and the bounded dirty load finds exactly what the full
/// scan finds.
#[test]
fn a_short_last_chunk_is_covered_by_the_bounded_load() {
    let (image, ids) = dirty_with_blobs(100, 95, false);
    let (bounded, found) = load_ids(&image, false);
    let (_, full) = load_ids(&image, true);
    assert!(bounded, "the load of a dirty Spool store is bounded");
    assert_eq!(found, full, "bounded load = full scan");
    assert_eq!(found, ids, "every created blob is found");
}

/// A clean store with a plain thick blob and a thin blob carrying the internal xattr
/// `EXTSNAP` (an external snapshot's id, as SPDK's `spdk_bs_create_eclone` stores it), then
/// the thin blob's root page patched to carry SPDK v24.01's `EXTERNAL_SNAPSHOT` invalid flag
/// (bit 3) and resealed: the metadata of an esnap clone exactly as SPDK v24.01 writes it.
/// Returns the image and the esnap clone's id.
fn store_with_an_esnap_clone() -> (Vec<u8>, u64) {
    let rt = runtime();
    let bdev = Arc::new(MallocBdev::new("r13d", 4096, (16 << 20) / 4096).unwrap());
    let desc = BdevDesc::open(Arc::clone(&bdev) as Arc<dyn Bdev>).unwrap();
    let id = run(&rt, move || async move {
        let store = Blobstore::init(
            desc,
            &InitOptions {
                cluster_size: CLUSTER,
                ..InitOptions::default()
            },
        )
        .await
        .unwrap();
        store
            .create_blob(&BlobOptions {
                num_clusters: 2,
                ..BlobOptions::default()
            })
            .await
            .unwrap();
        let id = store
            .create_blob(&BlobOptions {
                num_clusters: 4,
                thin: true,
                internal_xattrs: vec![(
                    "EXTSNAP".into(),
                    b"0d2b1a8e-4b9e-4f37-9d6c-3b1f6f0e2a11\0".to_vec(),
                )],
                ..BlobOptions::default()
            })
            .await
            .unwrap();
        store.unload().await.unwrap();
        id
    });
    rt.stop();
    let mut image = bdev.snapshot();
    let range = root_page(&image, id);
    let page = &mut image[range];
    // FLAGS is the root page's first descriptor: type 3 at 16, length 24 at 17, then
    // invalid_flags u64 at 21, data_ro at 29, md_ro at 37.
    assert_eq!((page[16], u32_at(page, 17)), (3, 24), "FLAGS first");
    let invalid = u64_at(page, 21);
    assert_eq!(invalid & 0b11, 0b11, "thin, internal xattrs");
    page[21..29].copy_from_slice(&(invalid | 1 << 3).to_le_bytes());
    seal_page(page);
    (image, id)
}

/// Expects: `spool check --repair` leaves alone a blob whose metadata is valid for SPDK
/// v24.01 and only uses a feature Spool does not implement. An esnap clone (SPDK 23.05+,
/// `EXTERNAL_SNAPSHOT` invalid flag, an lvol cloned from an external bdev) is one: SPDK
/// v24.01 knows invalid flags 0xF (docs/format.md, "Flags") and opens it read-write;
/// Spool refuses to open it (docs/blob.md), which is fine, but the checker reports it as a
/// damaged blob (`blob_metadata`, exit 2) and the repair then writes `READ_ONLY` into its
/// `data_ro` flags. The issue allows marking read-only only "blobs whose metadata does not
/// parse"; this metadata parses in every SPDK that wrote it, and the repair turns a healthy
/// writable volume of an SPDK store into a read-only one: a change made on a guess (that
/// the unknown flag means damage), which SPDK then honours.
///
/// Fails today: the esnap clone's root page has `data_ro = 1` after the repair.
#[test]
fn repair_does_not_mark_an_spdk_esnap_clone_read_only() {
    let (image, id) = store_with_an_esnap_clone();
    let range = root_page(&image, id);
    let before = image[range.clone()].to_vec();
    let cell = RefCell::new(image);
    let checked = check_image(&cell, &mut |_| {}).expect("the check runs");
    let problems: Vec<String> = checked
        .report
        .problems
        .iter()
        .map(|p| p.to_string())
        .collect();
    let report = repair_image(&cell, &checked).expect("the repair runs");
    let after = cell.borrow()[range].to_vec();
    assert_eq!(
        u64_at(&after, 29),
        u64_at(&before, 29),
        "the esnap clone's data_ro flags changed: the repair made a valid SPDK volume read-only\n\
         check problems: {problems:#?}\nrepair changes: {:#?}",
        report.changes
    );
    assert_eq!(after, before, "the esnap clone's root page is untouched");
}
