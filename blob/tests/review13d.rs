//! Review of issue 13 (fourth pass, `review13d`): bounded dirty recovery, `spool check` and
//! `--repair` on paths the earlier reviews did not take. Each test says what it expects and
//! why. Run with `cargo test -p spool-blob --test review13d`.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use std::cell::RefCell;

use common::{pattern, read, run, runtime, write};
use spool_bdev::{Bdev, BdevDesc, MallocBdev};
use spool_blob::check::check_image;
use spool_blob::check::repair::repair_image;
use spool_blob::format::seal_page;
use spool_blob::{BlobOptions, Blobstore, ExtentForm, InitOptions, LoadOptions};

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

/// Bytes of the two protected blobs' data: `a` 2 clusters, `d` 1 cluster.
const A_BYTES: usize = 2 * CLUSTER as usize;
const D_BYTES: usize = CLUSTER as usize;

/// A store with every kind of blob and two "protected" ones whose data must survive any
/// repair of damage elsewhere: `a` (thick, RLE, one md page, 2 clusters of `pattern(1)`)
/// and `d` (thick, RLE, a two-page chain, 1 cluster of `pattern(4)`); besides them a thin
/// table-form blob written near and far (two extent pages), a snapshot of it and a written
/// clone. `clean`: unloaded; else flushed and dropped (a kill -9). Returns the image, `a`, `d`.
fn rich_store(clean: bool) -> (Vec<u8>, u64, u64) {
    let rt = runtime();
    let bdev = Arc::new(MallocBdev::new("r13d", 4096, (16 << 20) / 4096).unwrap());
    let desc = BdevDesc::open(Arc::clone(&bdev) as Arc<dyn Bdev>).unwrap();
    let ids = run(&rt, move || async move {
        let store = Blobstore::init(
            desc,
            &InitOptions {
                cluster_size: CLUSTER,
                md_pages: Some(256),
                ..InitOptions::default()
            },
        )
        .await
        .unwrap();
        let channel = store.channel().unwrap();
        let thin = store
            .create_blob(&BlobOptions {
                num_clusters: 600,
                thin: true,
                form: ExtentForm::Table,
                ..BlobOptions::default()
            })
            .await
            .unwrap();
        let a = store
            .create_blob(&BlobOptions {
                num_clusters: 2,
                form: ExtentForm::Rle,
                ..BlobOptions::default()
            })
            .await
            .unwrap();
        let big = vec![9u8; 3000];
        let d = store
            .create_blob(&BlobOptions {
                num_clusters: 1,
                form: ExtentForm::Rle,
                xattrs: vec![("x".into(), big.clone()), ("y".into(), big)],
                ..BlobOptions::default()
            })
            .await
            .unwrap();
        for (id, unit, len, seed) in [
            (a, 0u64, A_BYTES, 1u64),
            (d, 0, D_BYTES, 4),
            (thin, 0, 4096, 2),
            (thin, 513 * 16, 4096, 3),
        ] {
            let blob = store.open_blob(id).await.unwrap();
            write(&channel, &blob.io(), unit, &pattern(seed, len)).await;
            blob.close().await.unwrap();
        }
        let snap = store.create_snapshot(thin, &[]).await.unwrap();
        let clone = store.create_clone(snap, &[]).await.unwrap();
        let blob = store.open_blob(clone).await.unwrap();
        write(&channel, &blob.io(), 16, &pattern(5, 4096)).await;
        blob.close().await.unwrap();
        channel.flush().await.unwrap();
        drop(channel);
        if clean {
            store.unload().await.unwrap();
        } else {
            std::mem::forget(store);
        }
        (a, d)
    });
    rt.stop();
    (bdev.snapshot(), ids.0, ids.1)
}

/// After a repair: loads `image` (as `spool check --repair` does after `repair_image`), reads
/// `a` and `d` back, then gives every free cluster to a new thick blob and writes it full
/// of 0xEE, and reads `a` and `d` again. `Err` says what was lost.
fn protected_survive(image: &[u8], a: u64, d: u64) -> Result<(), String> {
    let bdev = Arc::new(MallocBdev::from_image("r13d", 4096, image).unwrap());
    let desc = BdevDesc::open(bdev as Arc<dyn Bdev>).unwrap();
    let rt = runtime();
    let out = run(&rt, move || async move {
        let (store, _) = Blobstore::load(desc, &LoadOptions::default())
            .await
            .map_err(|err| format!("the repaired store does not load: {err}"))?;
        let channel = store.channel().unwrap();
        let expect = [(a, A_BYTES, 1u64), (d, D_BYTES, 4)];
        let mut maps = Vec::new();
        for (id, len, seed) in expect {
            let blob = store
                .open_blob(id)
                .await
                .map_err(|err| format!("blob {id:#x} does not open: {err}"))?;
            if read(&channel, &blob.io(), 0, len).await != pattern(seed, len) {
                return Err(format!("blob {id:#x} reads other data after the repair"));
            }
            maps.push((id, blob.cluster_map()));
            blob.close().await.unwrap();
        }
        let free = store.free_cluster_count();
        if free > 0 {
            let filler = store
                .create_blob(&BlobOptions {
                    num_clusters: free,
                    form: ExtentForm::Rle,
                    ..BlobOptions::default()
                })
                .await
                .map_err(|err| format!("filling the free clusters: {err}"))?;
            let blob = store.open_blob(filler).await.unwrap();
            let taken = blob.cluster_map();
            for (id, map) in &maps {
                if let Some(c) = map.iter().find(|c| **c != 0 && taken.contains(c)) {
                    return Err(format!(
                        "cluster {c} of blob {id:#x} was free after the repair (handed to a new blob)"
                    ));
                }
            }
            let fill = vec![0xEEu8; (free * CLUSTER) as usize];
            write(&channel, &blob.io(), 0, &fill).await;
            blob.close().await.unwrap();
        }
        for (id, len, seed) in expect {
            let blob = store.open_blob(id).await.unwrap();
            if read(&channel, &blob.io(), 0, len).await != pattern(seed, len) {
                return Err(format!("blob {id:#x} lost its data to a new blob"));
            }
            blob.close().await.unwrap();
        }
        drop(channel);
        let _ = store.unload().await;
        Ok(())
    });
    rt.stop();
    out
}

/// Damages 1-3 random bytes of metadata pages (masks, the other blobs' chains and extent
/// pages; never a page of `a` or `d`, never the super block), resealed or not, repairs,
/// and checks `a` and `d`. Returns the failures.
fn repair_rounds(clean: bool, rounds: usize, seed: u64) -> Vec<String> {
    let (original, a, d) = rich_store(clean);
    let (md_start, md_len) = (
        u32_at(&original, 48) as usize,
        u32_at(&original, 52) as usize,
    );
    let meta_end = (md_start + md_len) * PAGE;
    let protected = |page: &[u8]| {
        let id = u64_at(page, 0);
        id == a || id == d
    };
    let pages: Vec<usize> = (1..meta_end / PAGE)
        .filter(|&p| {
            let page = &original[p * PAGE..(p + 1) * PAGE];
            page.iter().any(|&b| b != 0) && !(p >= md_start && protected(page))
        })
        .collect();
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut failures = Vec::new();
    for round in 0..rounds {
        let mut image = original.clone();
        let mut hit = Vec::new();
        for _ in 0..rng.usize(1..4) {
            let page = pages[rng.usize(..pages.len())];
            let offset = match rng.u8(..3) {
                0 => rng.usize(0..64),
                1 => rng.usize(4060..4092),
                _ => rng.usize(0..4092),
            };
            image[page * PAGE + offset] = rng.u8(..);
            hit.push((page, offset));
        }
        if rng.bool() {
            for &(page, _) in &hit {
                if page >= md_start {
                    seal_page(&mut image[page * PAGE..(page + 1) * PAGE]);
                }
            }
        }
        let cell = RefCell::new(image);
        let Ok(checked) = check_image(&cell, &mut |_| {}) else {
            continue;
        };
        let Ok(report) = repair_image(&cell, &checked) else {
            continue;
        };
        if report.left_dirty {
            continue; // no load is run on the user's behalf
        }
        if let Err(lost) = protected_survive(&cell.into_inner(), a, d) {
            failures.push(format!(
                "{} round {round} (damage at (page, byte) {hit:?}): {lost}\n  repair: {:?}",
                if clean { "clean" } else { "dirty" },
                report.changes
            ));
        }
    }
    failures
}

/// Expects: `spool check --repair` never loses the data of a blob whose metadata is intact
/// (the issue: "never lose data stored in a readable blob"; "every blob whose metadata was
/// intact reads back its data exactly"), whatever else it finds damaged: after random damage
/// to other blobs' pages or to the masks (clean and dirty stores), the repaired store loads,
/// `a` and `d` read back exactly, none of their clusters is free (a new blob given every
/// free cluster and written full does not change them).
#[test]
fn repair_never_loses_an_intact_blobs_data() {
    let rounds = std::env::var("REVIEW13D_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let mut failures = repair_rounds(true, rounds, 1301);
    failures.extend(repair_rounds(false, rounds, 1302));
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// A clean 16 MiB store (md region of 2048 pages) holding, written by hand, a thin volume
/// (md page 0) reading through `depth` thin read-only snapshots (md pages 1..=depth, each
/// with `SNAP` naming the next; the last has none): what `depth` daily snapshots of one
/// volume leave. Marked dirty (clean = 0, no marker), so the next load replays the md
/// region (SPDK's rules; no mask to forge). Returns the image and the volume's id.
fn volume_with_a_snapshot_chain(depth: u32) -> (Vec<u8>, u64) {
    let rt = runtime();
    let bdev = Arc::new(MallocBdev::new("r13d", 4096, (16 << 20) / 4096).unwrap());
    let desc = BdevDesc::open(Arc::clone(&bdev) as Arc<dyn Bdev>).unwrap();
    run(&rt, move || async move {
        let store = Blobstore::init(
            desc,
            &InitOptions {
                cluster_size: CLUSTER,
                md_pages: Some(2048),
                ..InitOptions::default()
            },
        )
        .await
        .unwrap();
        store.unload().await.unwrap();
    });
    rt.stop();
    let mut image = bdev.snapshot();
    let md_start = u32_at(&image, 48) as usize;
    for page in 0..=depth {
        let id = (1u64 << 32) | u64::from(page);
        let at = (md_start + page as usize) * PAGE;
        let p = &mut image[at..at + PAGE];
        p.fill(0);
        p[..8].copy_from_slice(&id.to_le_bytes());
        // FLAGS: thin (and internal xattrs when SNAP is there); snapshots read-only.
        let has_parent = page < depth;
        p[16] = 3;
        p[17..21].copy_from_slice(&24u32.to_le_bytes());
        let invalid: u64 = if has_parent { 0b11 } else { 0b01 };
        p[21..29].copy_from_slice(&invalid.to_le_bytes());
        let data_ro: u64 = u64::from(page > 0);
        p[29..37].copy_from_slice(&data_ro.to_le_bytes());
        if has_parent {
            // Internal xattr SNAP = the next page's id.
            p[45] = 4;
            p[46..50].copy_from_slice(&16u32.to_le_bytes());
            p[50..52].copy_from_slice(&4u16.to_le_bytes());
            p[52..54].copy_from_slice(&8u16.to_le_bytes());
            p[54..58].copy_from_slice(b"SNAP");
            p[58..66].copy_from_slice(&(id + 1).to_le_bytes());
        }
        p[4088..4092].copy_from_slice(&u32::MAX.to_le_bytes());
        seal_page(p);
    }
    image[16..20].copy_from_slice(&0u32.to_le_bytes());
    seal_page(&mut image[..PAGE]);
    (image, 1 << 32)
}

/// Loads `image`, runs `then` on the store, unloads; returns what `then` returned and the
/// image after the unload.
fn with_store<T: Send + 'static, F, Fut>(image: &[u8], then: F) -> (T, Vec<u8>)
where
    F: FnOnce(Blobstore) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T> + 'static,
{
    let bdev = Arc::new(MallocBdev::from_image("r13d", 4096, image).unwrap());
    let desc = BdevDesc::open(Arc::clone(&bdev) as Arc<dyn Bdev>).unwrap();
    let rt = runtime();
    let out = run(&rt, move || async move {
        let (store, _) = Blobstore::load(desc, &LoadOptions::default())
            .await
            .unwrap();
        let out = then(store.clone()).await;
        store.unload().await.unwrap();
        out
    });
    rt.stop();
    (out, bdev.snapshot())
}

async fn open_result(store: &Blobstore, id: u64) -> Result<(), String> {
    match store.open_blob(id).await {
        Ok(blob) => {
            blob.close().await.unwrap();
            Ok(())
        }
        Err(err) => Err(err.to_string()),
    }
}

/// Expects: a snapshot Spool agrees to make leaves a volume Spool can open after a restart,
/// and `spool check` calls a store consistent only if its blobs open. Spool's
/// `create_snapshot` of a volume that reads through 1,023 snapshots succeeds (the 1,024th:
/// a daily snapshot schedule, never merged, reaches it in under 3 years); after a reload
/// the volume no longer opens: "corrupt metadata: its snapshot chain is deeper than 1024"
/// (`check_ancestry` in blob_lifecycle.rs counts the blob itself against
/// `MAX_CHAIN_DEPTH`, the snapshot path does not; making 1,030 snapshots one by one through
/// the API stops at exactly 1,024 made, with the same result). The volume's data is then
/// out of reach through Spool (SPDK has no such limit), and `spool check` reports the store
/// consistent (exit 0: its graph walk has no depth limit).
#[test]
fn a_snapshot_spool_agreed_to_make_leaves_a_volume_that_does_not_open() {
    let (image, volume) = volume_with_a_snapshot_chain(1023);
    let (made, image) = with_store(&image, move |store| async move {
        open_result(&store, volume)
            .await
            .expect("1,023 snapshots deep: the volume opens");
        store
            .create_snapshot(volume, &[])
            .await
            .map_err(|err| err.to_string())
    });
    let snapshot = made.expect("Spool makes the 1,024th snapshot");
    let cell = RefCell::new(image.clone());
    let checked = check_image(&cell, &mut |_| {}).expect("the check runs");
    let (opened, _) = with_store(&image, move |store| async move {
        open_result(&store, volume).await
    });
    assert!(
        opened.is_ok(),
        "after the snapshot {snapshot:#x} Spool made, blob {volume:#x} does not open after a reload: {} (spool check: consistent = {})",
        opened.unwrap_err(),
        checked.report.is_clean()
    );
}

/// The limit's other side: a volume already reading through 1,024 snapshots (the most an
/// open follows) gets no 1,025th: the create is refused with -EINVAL, and the volume still
/// opens after a reload.
#[test]
fn a_snapshot_past_the_chain_limit_is_refused_and_the_volume_still_opens() {
    let (image, volume) = volume_with_a_snapshot_chain(1024);
    let (made, image) = with_store(&image, move |store| async move {
        open_result(&store, volume)
            .await
            .expect("1,024 snapshots deep: the volume opens");
        store
            .create_snapshot(volume, &[])
            .await
            .map_err(|err| err.errno())
    });
    assert_eq!(made, Err(-libc::EINVAL), "the 1,025th snapshot is refused");
    let (opened, _) = with_store(&image, move |store| async move {
        open_result(&store, volume).await
    });
    assert_eq!(
        opened,
        Ok(()),
        "the volume opens after the refused snapshot"
    );
}

/// An image in memory with one unreadable 4 KiB sector (a bad block: reads touching it
/// fail with EIO).
struct BadSector {
    image: RefCell<Vec<u8>>,
    bad: std::ops::Range<u64>,
}

impl spool_blob::check::image::ImageIo for BadSector {
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.image.borrow().len() as u64)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let end = offset + buf.len() as u64;
        if offset < self.bad.end && self.bad.start < end {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        self.image.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.image.write_at(buf, offset)
    }
    fn sync(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Expects: `spool check` on a store with one bad sector in a part of the md region no
/// blob uses still checks the store and reports (an e2fsck-like checker is run exactly
/// when a disk starts failing): every blob is intact, the store loads and every blob
/// opens (a clean load never reads unused md pages: shown below through an `ErrorBdev`
/// failing the same sector), yet the check stops at the first failed 4 MiB batch of its
/// md scan and returns an I/O error: `spool check` exits 1 ("the check could not run")
/// with no report at all. Expected: the unreadable page named as a problem (page, what
/// failed) and the rest of the store checked, exit 2.
#[test]
fn a_bad_sector_in_an_unused_md_page_does_not_stop_the_check() {
    use spool_bdev::{ErrorBdev, ErrorRule};
    let (image, a, d) = rich_store(true);
    let (md_start, md_len) = (u64::from(u32_at(&image, 48)), u64::from(u32_at(&image, 52)));
    // The region's last md page: no blob uses it (the store's blobs are in its first pages).
    let page = md_start + md_len - 1;
    assert!(image[(page as usize) * PAGE..(page as usize + 1) * PAGE]
        .iter()
        .all(|&b| b == 0));
    let bad = page * 4096..(page + 1) * 4096;
    // The store loads with that sector unreadable, and its blobs open.
    let malloc = Arc::new(MallocBdev::from_image("r13d", 4096, &image).unwrap());
    let errors = Arc::new(ErrorBdev::new("bad", malloc as Arc<dyn Bdev>));
    errors.add_rule(ErrorRule::new(-libc::EIO).range_bytes(bad.clone()));
    let desc = BdevDesc::open(Arc::clone(&errors) as Arc<dyn Bdev>).unwrap();
    let rt = runtime();
    let opened = run(&rt, move || async move {
        let (store, _) = Blobstore::load(desc, &LoadOptions::default())
            .await
            .expect("the store loads with the bad sector");
        let mut opened = Vec::new();
        for id in [a, d] {
            opened.push(open_result(&store, id).await);
        }
        std::mem::forget(store);
        opened
    });
    rt.stop();
    assert!(opened.iter().all(Result::is_ok), "{opened:?}");
    let io = BadSector {
        image: RefCell::new(image),
        bad,
    };
    match check_image(&io, &mut |_| {}) {
        Ok(checked) => assert!(
            checked
                .report
                .problems
                .iter()
                .any(|p| p.page == Some((page - md_start) as u32)),
            "the unreadable md page is named: {:#?}",
            checked.report.problems
        ),
        Err(err) => panic!(
            "one bad sector in an unused md page stops the whole check (spool check exits 1, no report), while the store loads and its blobs open: {err}"
        ),
    }
}

/// A bad sector in a page a blob uses (`d`'s second chain page): the check still runs to
/// its end, names the page (`page_unreadable`) and the blob as damaged, and the repair
/// refuses (the page may hold what a blob needs), writing nothing.
#[test]
fn a_bad_sector_in_a_used_md_page_damages_its_blob_and_refuses_the_repair() {
    let (image, _a, d) = rich_store(true);
    let md_start = u64::from(u32_at(&image, 48));
    let root = root_page(&image, d);
    // d's chain: its root page's `next` (the last 8 bytes hold next then the CRC).
    let next = u64::from(u32_at(&image, root.end - 8));
    assert!(
        next < u64::from(u32_at(&image, 52)),
        "d has a second chain page"
    );
    let bad = (md_start + next) * 4096..(md_start + next + 1) * 4096;
    let before = image.clone();
    let io = BadSector {
        image: RefCell::new(image),
        bad,
    };
    let checked = check_image(&io, &mut |_| {}).expect("the check runs to its end");
    let kinds: Vec<String> = checked
        .report
        .problems
        .iter()
        .map(|p| p.to_string())
        .collect();
    assert!(
        kinds
            .iter()
            .any(|p| p.starts_with("page_unreadable:") && p.contains(&format!("md page {next}"))),
        "{kinds:#?}"
    );
    assert!(
        checked
            .report
            .blobs
            .iter()
            .any(|b| b.id == d && b.damaged.is_some()),
        "d is listed damaged"
    );
    let refused = repair_image(&io, &checked).expect_err("the repair refuses");
    assert!(refused.to_string().contains("cannot be read"), "{refused}");
    assert!(
        io.image.borrow().as_slice() == before.as_slice(),
        "nothing written"
    );
}
