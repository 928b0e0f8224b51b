//! Goal: a dirty store Spool leaves behind (with its bounded-recovery marker in the super
//! block and its root superset record over the blob-id mask region) passes the load rules of
//! SPDK v24.01, and finds the blobs Spool's bounded load finds; a dirty store SPDK wrote (no
//! marker) takes Spool's full scan. SPDK is not installed here, so the rules are written out
//! from its loader (`bs_super_validate`, then `bs_recover`'s replay: `bs_load_cur_md_page_valid`,
//! `bs_load_replay_md_parse_page`, `bs_load_cur_extent_page_valid`, the chain walk and the
//! cluster count; the notes' spdk-ondisk.md), with offsets by hand, not with the crate's
//! decoders.

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

/// SPDK v24.01's load of a dirty `image` (wildcard bstype): the blob ids its recovery finds,
/// or the errno its load fails with. Panics if the super block says clean (the rules of the
/// other path are not written out here).
fn spdk_dirty_load(image: &[u8]) -> Result<BTreeSet<u64>, i32> {
    let sb = &image[..PAGE];
    // bs_super_validate.
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

#[test]
fn a_dirty_spool_store_with_the_marker_passes_spdks_load_rules() {
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
    let image = bdev.snapshot();
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
