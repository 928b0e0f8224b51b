//! Goal: a dirty store Spool leaves behind (with its bounded-recovery marker in the super
//! block and its root superset record over the blob-id mask region) passes the load rules of
//! SPDK v24.01, and finds the blobs Spool's bounded load finds; a dirty store SPDK wrote (no
//! marker) takes Spool's full scan. SPDK is not installed here, so the rules are written out
//! from its loader (`bs_super_validate`, then `bs_recover`'s replay: `bs_load_cur_md_page_valid`,
//! `bs_load_replay_md_parse_page`, `bs_load_cur_extent_page_valid`, the chain walk and the
//! cluster count; the notes' spdk-ondisk.md), with offsets by hand, not with the crate's
//! decoders. A store `spool check --repair` fixed (dirty, or clean with damaged masks) passes
//! the clean-load rules too (`bs_load`'s mask reads, then each blob's open as the lvol store's
//! load does), and SPDK's replay of it when forced dirty.

mod common;
mod support;

use std::collections::BTreeSet;
use std::sync::Arc;

use common::{create_thin, malloc, pattern, run, runtime, write};
use spool_bdev::{Bdev, BdevDesc, MallocBdev};
use spool_blob::{BlobOptions, Blobstore, ExtentForm, InitOptions, LoadOptions, LoadReport};
use support::fixtures;

const PAGE: usize = 4096;
const DESCRIPTORS: usize = 4072;

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn crc_ok(page: &[u8]) -> bool {
    crc32c::crc32c(&page[..4092]) == u32_at(page, 4092)
}

/// What SPDK's replay keeps while it walks the md region.
struct Replay {
    used_clusters: Vec<bool>,
    free: u64,
    extent_pages: Vec<u32>,
}

impl Replay {
    /// `bs_load_replay_md_parse_page`: Err(errno) where SPDK fails the load.
    fn parse_page(&mut self, page: &[u8]) -> Result<(), i32> {
        let descriptors = &page[16..16 + DESCRIPTORS];
        let mut at = 0usize;
        while at < DESCRIPTORS {
            let kind = descriptors[at];
            let len = u32_at(descriptors, at + 1) as usize;
            let body = |from: usize, n: usize| descriptors.get(at + 5 + from..at + 5 + from + n);
            match kind {
                0 if len == 0 => break,
                0 | 2..=4 => {}
                1 => {
                    let mut count = 0u64;
                    for run in 0..len / 8 {
                        let entry = body(run * 8, 8).ok_or(-libc::EINVAL)?;
                        let (idx, n) = (u32_at(entry, 0), u32_at(entry, 4));
                        for j in 0..n {
                            if idx != 0 {
                                self.claim(u64::from(idx) + u64::from(j))?;
                            }
                            count += 1;
                        }
                    }
                    if count == 0 {
                        return Err(-libc::EINVAL);
                    }
                }
                6 => {
                    if len <= 4 || !(len - 4).is_multiple_of(4) {
                        return Err(-libc::EINVAL);
                    }
                    for i in 0..(len - 4) / 4 {
                        let idx = u32_at(body(4 + i * 4, 4).ok_or(-libc::EINVAL)?, 0);
                        if idx != 0 {
                            self.claim(u64::from(idx))?;
                        }
                    }
                }
                5 => {
                    // size_t arithmetic, as SPDK's: a length below 8 wraps.
                    if len == 0 || !len.wrapping_sub(8).is_multiple_of(8) {
                        return Err(-libc::EINVAL);
                    }
                    for i in 0..len.wrapping_sub(8) / 8 {
                        let entry = body(8 + i * 8, 8).ok_or(-libc::EINVAL)?;
                        let (page_idx, pages) = (u32_at(entry, 0), u32_at(entry, 4));
                        if page_idx != 0 {
                            if pages != 1 {
                                return Err(-libc::EINVAL);
                            }
                            self.extent_pages.push(page_idx);
                        }
                    }
                }
                _ => return Err(-libc::EINVAL),
            }
            at += 5 + len;
            if at + 5 > DESCRIPTORS {
                break;
            }
        }
        Ok(())
    }

    fn claim(&mut self, cluster: u64) -> Result<(), i32> {
        if let Some(bit) = self.used_clusters.get_mut(cluster as usize) {
            *bit = true;
        }
        if self.free == 0 {
            return Err(-libc::ENOSPC);
        }
        self.free -= 1;
        Ok(())
    }
}

/// `bs_load_cur_extent_page_valid`.
fn extent_page_valid(page: &[u8]) -> bool {
    let descriptors = &page[16..16 + DESCRIPTORS];
    let len = 5 + u32_at(descriptors, 1) as usize;
    crc_ok(page)
        && u32_at(page, 8) == 0
        && descriptors[0] == 6
        && len <= DESCRIPTORS
        && (len + 5 > DESCRIPTORS || u32_at(descriptors, len + 1) == 0)
}

/// `bs_super_validate` (wildcard bstype): the store's size in bytes, or the errno.
fn spdk_super_validate(image: &[u8]) -> Result<u64, i32> {
    let sb = &image[..PAGE];
    if !(1..=3).contains(&u32_at(sb, 8)) || &sb[..8] != b"SPDKBLOB" || !crc_ok(sb) {
        return Err(-libc::EILSEQ);
    }
    let size = match u64_at(sb, 80) {
        0 => image.len() as u64,
        size => size,
    };
    if size > image.len() as u64 {
        return Err(-libc::EILSEQ);
    }
    Ok(size)
}

/// One mask region as SPDK's clean load reads it (`bs_load_used_pages_cpl` and its two
/// siblings): its type byte and its length in bits must be the ones SPDK writes (`bits`).
fn spdk_mask(
    image: &[u8],
    start_at: usize,
    len_at: usize,
    kind: u8,
    bits: u64,
) -> Result<Vec<bool>, i32> {
    let start = u32_at(image, start_at) as usize * PAGE;
    let pages = u32_at(image, len_at) as usize;
    let region = image
        .get(start..start + pages * PAGE)
        .ok_or(-libc::EILSEQ)?;
    if region[0] != kind || u64::from(u32_at(region, 1)) != bits {
        return Err(-libc::EILSEQ);
    }
    Ok((0..bits as usize)
        .map(|i| {
            region
                .get(5 + i / 8)
                .is_some_and(|b| b & (1 << (i % 8)) != 0)
        })
        .collect())
}

/// SPDK v24.01's load of a clean `image`, then an open of every blob the blob-id mask names
/// (as the lvol store's load does): the ids opened, or the first errno. A blob's pages must
/// carry its id, CRC and sequence (`blob_load_cpl`), every cluster it names must be set in
/// the used-cluster mask (`blob_parse_extent_rle`/`_table`: -EINVAL), and, for the store to
/// stay sound once SPDK allocates, every page of its chain and its extent pages must be set
/// in the used-page mask.
fn spdk_clean_load(image: &[u8]) -> Result<BTreeSet<u64>, i32> {
    let size = spdk_super_validate(image)?;
    assert_eq!(
        u32_at(image, 16),
        1,
        "the image is clean: SPDK reads its masks"
    );
    assert_ne!(u32_at(image, 76), 0, "a blob-id mask: SPDK reads the masks");
    let cluster_size = u64::from(u32_at(image, 28));
    let (md_start, md_len) = (u32_at(image, 48) as usize, u32_at(image, 52));
    let total_clusters = size / cluster_size;
    let used_pages = spdk_mask(image, 32, 36, 0, u64::from(md_len))?;
    let used_clusters = spdk_mask(image, 40, 44, 1, total_clusters)?;
    let used_ids = spdk_mask(image, 72, 76, 2, u64::from(md_len))?;
    let md_page =
        |n: u32| &image[(md_start + n as usize) * PAGE..(md_start + n as usize + 1) * PAGE];
    let mut opened = BTreeSet::new();
    for root in (0..md_len).filter(|&n| used_ids[n as usize]) {
        let id = (1u64 << 32) | u64::from(root);
        let mut replay = Replay {
            used_clusters: vec![false; total_clusters as usize],
            free: total_clusters,
            extent_pages: Vec::new(),
        };
        let (mut current, mut sequence) = (root, 0u32);
        loop {
            let page = md_page(current);
            if !crc_ok(page) || u64_at(page, 0) != id || u32_at(page, 8) != sequence {
                return Err(-libc::EINVAL);
            }
            if !used_pages[current as usize] {
                return Err(-libc::EUCLEAN);
            }
            replay.parse_page(page)?;
            match u32_at(page, 4088) {
                u32::MAX => break,
                next if next < md_len => (current, sequence) = (next, sequence + 1),
                _ => return Err(-libc::EINVAL),
            }
        }
        for extent in std::mem::take(&mut replay.extent_pages) {
            let page = md_page(extent);
            if extent >= md_len || !extent_page_valid(page) || !used_pages[extent as usize] {
                return Err(-libc::EINVAL);
            }
            replay.parse_page(page)?;
        }
        let named = replay.used_clusters.iter().enumerate().filter(|(_, &b)| b);
        for (cluster, _) in named {
            if !used_clusters[cluster] {
                return Err(-libc::EINVAL);
            }
        }
        opened.insert(id);
    }
    Ok(opened)
}

/// SPDK v24.01's load of a dirty `image` (wildcard bstype): the blob ids its recovery finds,
/// or the errno its load fails with. Panics if the super block says clean (the rules of the
/// other path are not written out here).
fn spdk_dirty_load(image: &[u8]) -> Result<BTreeSet<u64>, i32> {
    let sb = &image[..PAGE];
    let size = spdk_super_validate(image)?;
    assert_eq!(u32_at(sb, 16), 0, "the image is dirty: SPDK recovers it");
    // bs_parse_super, bs_recover.
    let cluster_size = u64::from(u32_at(sb, 28));
    let (md_start, md_len) = (u32_at(sb, 48) as usize, u32_at(sb, 52));
    let total_clusters = size / cluster_size;
    let mut replay = Replay {
        used_clusters: vec![false; total_clusters as usize],
        free: total_clusters,
        extent_pages: Vec::new(),
    };
    let md_page =
        |n: u32| &image[(md_start + n as usize) * PAGE..(md_start + n as usize + 1) * PAGE];
    let mut used_md = vec![false; md_len as usize];
    let mut blobs = BTreeSet::new();
    // bs_load_replay_md: one page at a time, following chains.
    let mut page_index = 0u32;
    while page_index < md_len {
        let mut current = page_index;
        let mut in_chain = false;
        loop {
            let page = md_page(current);
            let sequence = u32_at(page, 8);
            let valid = crc_ok(page)
                && (sequence != 0 || u64_at(page, 0) == (1 << 32) | u64::from(current));
            if !(valid && (sequence == 0 || in_chain)) {
                break;
            }
            used_md[current as usize] = true;
            if sequence == 0 {
                blobs.insert((1u64 << 32) | u64::from(current));
            }
            replay.parse_page(page).map_err(|_| -libc::EILSEQ)?;
            let next = u32_at(page, 4088);
            if next != u32::MAX {
                assert!(next < md_len, "SPDK asserts next < md_len");
                in_chain = true;
                current = next;
                continue;
            }
            for extent in std::mem::take(&mut replay.extent_pages) {
                assert!(extent < md_len, "SPDK asserts an extent page < md_len");
                let page = md_page(extent);
                if !extent_page_valid(page) {
                    return Err(-libc::EILSEQ);
                }
                used_md[extent as usize] = true;
                replay.parse_page(page).map_err(|_| -libc::EILSEQ)?;
            }
            break;
        }
        replay.extent_pages.clear();
        page_index += 1;
        while page_index < md_len && used_md[page_index as usize] {
            page_index += 1;
        }
    }
    Ok(blobs)
}

/// Loads `image` with Spool; returns the report and the blob ids.
fn spool_load(image: &[u8], options: LoadOptions) -> (LoadReport, BTreeSet<u64>) {
    let bdev = Arc::new(MallocBdev::from_image("check", 4096, image).unwrap());
    let desc = BdevDesc::open(bdev as Arc<dyn Bdev>).expect("open bdev");
    let rt = runtime();
    let out = run(&rt, move || async move {
        let (store, report) = Blobstore::load(desc, &options).await.unwrap();
        let ids = store.blob_ids().into_iter().collect();
        store.unload().await.unwrap();
        (report, ids)
    });
    rt.stop();
    out
}

/// A dirty store (no unload) with RLE and extent-table blobs, thick and thin, chains of
/// several pages, an extent page, a snapshot and a clone: 43 blobs.
fn dirty_spool_store() -> Vec<u8> {
    let rt = runtime();
    let (bdev, desc) = malloc(64 << 20);
    run(&rt, move || async move {
        let store = Blobstore::init(
            desc,
            &InitOptions {
                cluster_size: 256 << 10,
                md_pages: Some(4096),
                ..InitOptions::default()
            },
        )
        .await
        .unwrap();
        // RLE and extent-table blobs, thick and thin, chains of several pages, an extent
        // page, a snapshot and a clone; then a crash (no unload).
        for n in 0..40u64 {
            let xattrs = (0..(n % 7) * 5)
                .map(|i| (format!("x{i}"), vec![n as u8; 500]))
                .collect();
            store
                .create_blob(&BlobOptions {
                    num_clusters: n % 3,
                    thin: n % 2 == 0,
                    form: if n % 4 == 1 {
                        ExtentForm::Rle
                    } else {
                        ExtentForm::Table
                    },
                    xattrs,
                    ..BlobOptions::default()
                })
                .await
                .unwrap();
        }
        let thin = create_thin(&store, 600).await;
        let blob = store.open_blob(thin).await.unwrap();
        let channel = store.channel().unwrap();
        write(&channel, &blob.io(), 513 * 64, &pattern(1, 4096)).await;
        blob.close().await.unwrap();
        let snapshot = store.create_snapshot(thin, &[]).await.unwrap();
        store.create_clone(snapshot, &[]).await.unwrap();
        channel.flush().await.unwrap();
        drop(channel);
        std::mem::forget(store);
    });
    rt.stop();
    bdev.snapshot()
}

#[test]
fn a_dirty_spool_store_with_the_marker_passes_spdks_load_rules() {
    let image = dirty_spool_store();
    // Spool's marker and record are there.
    assert_eq!(&image[92..100], b"SPOOLRS1", "the marker");
    let ids_region = u32_at(&image, 72) as usize * PAGE;
    assert_eq!(
        &image[ids_region..ids_region + 8],
        b"SPOOLRSS",
        "the record"
    );
    let spdk = spdk_dirty_load(&image).expect("SPDK's load rules refuse the dirty store");
    let (report, spool) = spool_load(&image, LoadOptions::default());
    assert!(report.recovered && report.bounded, "{report:?}");
    assert!(report.md_pages_scanned < 4096, "{report:?}");
    assert_eq!(
        spool, spdk,
        "Spool's bounded load and SPDK's replay find the same blobs"
    );
    assert_eq!(spool.len(), 40 + 3);
}

#[test]
fn a_dirty_store_spdk_wrote_takes_the_full_scan() {
    let image = fixtures::load_image("p3-dirty");
    assert_eq!(u32_at(&image, 16), 0, "the fixture is dirty");
    assert_ne!(&image[92..100], b"SPOOLRS1", "SPDK wrote no marker");
    let spdk = spdk_dirty_load(&image).expect("SPDK's own dirty store");
    let (report, spool) = spool_load(&image, LoadOptions::default());
    assert!(report.recovered && !report.bounded, "{report:?}");
    assert_eq!(report.md_pages_scanned, u64::from(u32_at(&image, 52)));
    assert_eq!(spool, spdk);
}

#[test]
fn a_record_spdks_recovery_overwrote_is_not_trusted() {
    // SPDK's recovery of a dirty Spool store writes its blob-id mask over the record (and
    // keeps the marker in the super block): the next dirty load must scan everything.
    let rt = runtime();
    let (bdev, desc) = malloc(16 << 20);
    run(&rt, move || async move {
        let store = Blobstore::init(desc, &InitOptions::default())
            .await
            .unwrap();
        store.create_blob(&BlobOptions::default()).await.unwrap();
        store.channel().unwrap().flush().await.unwrap();
        std::mem::forget(store);
    });
    rt.stop();
    let mut image = bdev.snapshot();
    let (report, _) = spool_load(&image, LoadOptions::default());
    assert!(report.bounded, "{report:?}");
    let region = u32_at(&image, 72) as usize * PAGE;
    image[region..region + PAGE].fill(0);
    image[region] = 2; // type: used blob ids
    let md_len = u32_at(&image, 52);
    image[region + 1..region + 5].copy_from_slice(&md_len.to_le_bytes());
    image[region + 5] = 1;
    assert_eq!(&image[92..100], b"SPOOLRS1", "the marker is still there");
    let (report, ids) = spool_load(&image, LoadOptions::default());
    assert!(report.recovered && !report.bounded, "{report:?}");
    assert_eq!(ids.len(), 1);
}

/// `spool check --repair` leaves a store SPDK loads: a dirty store (masks to rebuild), with a
/// valid root page no mask names on top, repaired in memory
/// by the checker, passes SPDK's clean-load rules and opens every blob Spool's load finds;
/// forced dirty again, SPDK's replay finds the same blobs.
#[test]
fn a_store_check_repaired_passes_spdks_clean_and_dirty_load_rules() {
    use spool_blob::check::{check_image, repair::repair_image};
    let mut image = dirty_spool_store();
    let (_, before) = spool_load(&image, LoadOptions::default());
    // An orphaned root page (valid, in no mask) deep in the md region.
    let (md_start, md_len) = (u32_at(&image, 48) as usize, u32_at(&image, 52));
    let orphan = md_len - 3;
    let at = (md_start + orphan as usize) * PAGE;
    image[at..at + PAGE].fill(0);
    image[at..at + 8].copy_from_slice(&((1u64 << 32) | u64::from(orphan)).to_le_bytes());
    image[at + 4088..at + 4092].copy_from_slice(&u32::MAX.to_le_bytes());
    let crc = crc32c::crc32c(&image[at..at + 4092]);
    image[at + 4092..at + PAGE].copy_from_slice(&crc.to_le_bytes());
    let cell = std::cell::RefCell::new(image);
    let checked = check_image(&cell, &mut |_| {}).expect("the check runs");
    // Dirty: the masks are rebuilt from the metadata, and a valid root in the md region is a
    // blob to SPDK's replay too (so it is listed, not removed).
    assert_eq!(checked.report.clean, 0);
    assert!(checked
        .report
        .blobs
        .iter()
        .any(|b| b.id == (1u64 << 32) | u64::from(orphan)));
    repair_image(&cell, &checked).expect("the repair runs");
    let again = check_image(&cell, &mut |_| {}).expect("the check runs");
    assert!(
        again.report.problems.is_empty(),
        "{:?}",
        again.report.problems
    );
    let repaired = cell.into_inner();
    let spdk = spdk_clean_load(&repaired).expect("SPDK's clean load refuses the repaired store");
    let (_, spool) = spool_load(&repaired, LoadOptions::default());
    assert_eq!(spdk, spool, "SPDK opens every blob Spool loads");
    assert!(
        before.is_subset(&spool),
        "no blob was lost: {before:?} vs {spool:?}"
    );
    // Forced dirty: SPDK's replay of the same pages agrees.
    let mut dirty = repaired.clone();
    dirty[16..20].copy_from_slice(&0u32.to_le_bytes());
    let crc = crc32c::crc32c(&dirty[..4092]);
    dirty[4092..4096].copy_from_slice(&crc.to_le_bytes());
    let replayed = spdk_dirty_load(&dirty).expect("SPDK's replay refuses the repaired store");
    assert_eq!(replayed, spool, "SPDK's recovery finds the same blobs");
}

/// Loads `image` with Spool and unloads it cleanly: the clean image.
fn unloaded(image: &[u8]) -> Vec<u8> {
    let bdev = Arc::new(MallocBdev::from_image("clean", 4096, image).unwrap());
    let desc = BdevDesc::open(Arc::clone(&bdev) as Arc<dyn Bdev>).expect("open bdev");
    let rt = runtime();
    run(&rt, move || async move {
        let (store, _) = Blobstore::load(desc, &LoadOptions::default())
            .await
            .unwrap();
        store.unload().await.unwrap();
    });
    rt.stop();
    bdev.snapshot()
}

/// A clean store whose masks lost a cluster bit and gained a stray md-page bit: the check
/// names both, and the repaired store passes SPDK's clean-load rules (it failed them before).
#[test]
fn a_clean_store_with_damaged_masks_repaired_passes_spdks_clean_load_rules() {
    use spool_blob::check::{check_image, repair::repair_image};
    let mut image = unloaded(&dirty_spool_store());
    assert_eq!(u32_at(&image, 16), 1, "clean");
    let before = spdk_clean_load(&image).expect("SPDK loads the clean store");
    // The last used cluster's bit cleared; a stray md-page bit set far from any blob.
    let clusters = u32_at(&image, 40) as usize * PAGE;
    let total = u32_at(&image, 1 + clusters) as usize;
    let last = (0..total)
        .rev()
        .find(|&c| image[clusters + 5 + c / 8] & (1 << (c % 8)) != 0)
        .unwrap();
    image[clusters + 5 + last / 8] &= !(1 << (last % 8));
    let pages = u32_at(&image, 32) as usize * PAGE;
    let stray = u32_at(&image, 52) as usize - 2;
    image[pages + 5 + stray / 8] |= 1 << (stray % 8);
    assert_eq!(
        spdk_clean_load(&image),
        Err(-libc::EINVAL),
        "SPDK refuses the damage"
    );
    let cell = std::cell::RefCell::new(image);
    let checked = check_image(&cell, &mut |_| {}).expect("the check runs");
    assert!(
        checked.report.problems.len() >= 2,
        "{:?}",
        checked.report.problems
    );
    repair_image(&cell, &checked).expect("the repair runs");
    let repaired = cell.into_inner();
    assert_eq!(
        spdk_clean_load(&repaired),
        Ok(before),
        "SPDK opens every blob again"
    );
    assert_eq!(
        repaired[pages + 5 + stray / 8] & (1 << (stray % 8)),
        0,
        "the stray md-page bit is cleared"
    );
}

/// The clean-load rules refuse what they must: a blob naming a cluster its mask lost.
#[test]
fn spdks_clean_load_rules_refuse_a_cluster_the_mask_lost() {
    use spool_blob::check::{check_image, repair::repair_image};
    let cell = std::cell::RefCell::new(dirty_spool_store());
    let checked = check_image(&cell, &mut |_| {}).expect("the check runs");
    repair_image(&cell, &checked).expect("the repair runs");
    let mut image = cell.into_inner();
    assert!(spdk_clean_load(&image).is_ok());
    // Clear every bit of the used-cluster mask past the metadata's clusters.
    let start = u32_at(&image, 40) as usize * PAGE;
    let md_clusters_bytes = 2; // the first 16 clusters hold the metadata here
    for byte in &mut image[start + 5 + md_clusters_bytes..start + PAGE] {
        *byte = 0;
    }
    assert_eq!(spdk_clean_load(&image), Err(-libc::EINVAL));
}
