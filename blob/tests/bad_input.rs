//! Goal: a corrupt, truncated or foreign image gives a clear error with SPDK's errno, never
//! a panic, a hang or an out-of-bounds access, and leaves what is stored alone. Method: a
//! store made by Spool on a malloc bdev, one corruption at a time (re-sealing the CRC where
//! the point is to get past it), then load and open.

mod common;

use std::sync::Arc;

use common::{create_thin, runtime};

use spool_bdev::{Bdev, BdevDesc, MallocBdev};
use spool_blob::format::{page_crc, seal_page};
use spool_blob::{BlobError, BlobOptions, Blobstore, ExtentForm, InitOptions, LoadOptions};
use spool_reactor::Runtime;

const DEVICE: u64 = 16 << 20;

fn desc_of(image: &[u8]) -> BdevDesc {
    common::from_image(image).1
}

/// A clean store with a thick RLE blob (A, md page 0), a thin extent-table blob with one
/// written cluster (B, md page 1 + extent page), and a blob with many xattrs (C).
fn sample_image(rt: &Runtime) -> Vec<u8> {
    let bdev = Arc::new(MallocBdev::new("img", 4096, DEVICE / 4096).unwrap());
    let desc = BdevDesc::open(Arc::clone(&bdev) as Arc<dyn Bdev>).expect("open bdev");
    rt.block_on(rt.reactors()[0], move || async move {
        let store = Blobstore::init(desc, &InitOptions::default())
            .await
            .unwrap();
        store
            .create_blob(&BlobOptions {
                num_clusters: 2,
                form: ExtentForm::Rle,
                xattrs: vec![("name".into(), b"a".to_vec())],
                ..BlobOptions::default()
            })
            .await
            .unwrap();
        let b = create_thin(&store, 4).await;
        let blob = store.open_blob(b).await.unwrap();
        let channel = store.channel().unwrap();
        let mut buf = spool_bdev::DmaBuf::alloc(4096).unwrap();
        buf.fill(0x5A);
        channel.write(&blob.io(), 0, buf).await.0.unwrap();
        blob.close().await.unwrap();
        let xattrs = (0..30)
            .map(|i| (format!("x{i:02}"), vec![i as u8; 300]))
            .collect();
        store
            .create_blob(&BlobOptions {
                xattrs,
                ..BlobOptions::default()
            })
            .await
            .unwrap();
        drop(channel);
        store.unload().await.unwrap();
    })
    .unwrap();
    bdev.snapshot()
}

const MD_START: usize = 4;

fn md_page(image: &mut [u8], page: usize) -> &mut [u8] {
    let at = (MD_START + page) * 4096;
    &mut image[at..at + 4096]
}

fn load_err(rt: &Runtime, image: Vec<u8>) -> BlobError {
    rt.block_on(rt.reactors()[0], move || async move {
        match Blobstore::load(desc_of(&image), &LoadOptions::default()).await {
            Ok(_) => panic!("load succeeded"),
            Err(err) => err,
        }
    })
    .unwrap()
}

/// Loads (must succeed), opens blob `id`, returns the open error.
fn open_err(rt: &Runtime, image: Vec<u8>, id: u64) -> BlobError {
    rt.block_on(rt.reactors()[0], move || async move {
        let (store, _) = Blobstore::load(desc_of(&image), &LoadOptions::default())
            .await
            .unwrap();
        let err = match store.open_blob(id).await {
            Ok(blob) => {
                blob.close().await.unwrap();
                panic!("open of {id:#x} succeeded")
            }
            Err(err) => err,
        };
        // The other blobs are untouched.
        let others: Vec<u64> = store.blob_ids().into_iter().filter(|&o| o != id).collect();
        for other in others {
            store.open_blob(other).await.unwrap().close().await.unwrap();
        }
        store.unload().await.unwrap();
        err
    })
    .unwrap()
}

const A: u64 = 0x1_0000_0000;
const B: u64 = 0x1_0000_0001;

#[test]
fn super_block_corruptions_fail_with_eilseq_naming_the_field() {
    let rt = runtime();
    let good = sample_image(&rt);
    let mut bad = good.clone();
    bad[0] = b'X';
    let err = load_err(&rt, bad);
    assert_eq!(err.errno(), -libc::EILSEQ);
    assert!(err.to_string().contains("signature"), "{err}");
    let mut bad = good.clone();
    bad[200] ^= 0xFF;
    let err = load_err(&rt, bad);
    assert_eq!(err.errno(), -libc::EILSEQ);
    assert!(err.to_string().contains("CRC"), "{err}");
    for version in [0u32, 4] {
        let mut bad = good.clone();
        bad[8..12].copy_from_slice(&version.to_le_bytes());
        seal_page(&mut bad[..4096]);
        let err = load_err(&rt, bad);
        assert_eq!(err.errno(), -libc::EILSEQ);
        assert!(err.to_string().contains("version"), "{err}");
    }
    let mut bad = good.clone();
    bad[80..88].copy_from_slice(&(DEVICE * 2).to_le_bytes());
    seal_page(&mut bad[..4096]);
    let err = load_err(&rt, bad);
    assert_eq!(err.errno(), -libc::EILSEQ);
    assert!(err.to_string().contains("size"), "{err}");
    // A truncated device: the super block says 16 MiB, the device has 8.
    let err = load_err(&rt, good[..(DEVICE / 2) as usize].to_vec());
    assert_eq!(err.errno(), -libc::EILSEQ);
    // Cluster size 0 would divide by zero.
    let mut bad = good.clone();
    bad[28..32].copy_from_slice(&0u32.to_le_bytes());
    seal_page(&mut bad[..4096]);
    assert_eq!(load_err(&rt, bad).errno(), -libc::EILSEQ);
    // An all-zero device is not a store.
    assert_eq!(
        load_err(&rt, vec![0; DEVICE as usize]).errno(),
        -libc::EILSEQ
    );
    rt.stop();
}

#[test]
fn bstype_must_match_unless_the_caller_gives_none() {
    let rt = runtime();
    let mut image = sample_image(&rt);
    image[56..65].copy_from_slice(b"LVOLSTORE");
    seal_page(&mut image[..4096]);
    let wrong = image.clone();
    let err = rt
        .block_on(rt.reactors()[0], move || async move {
            let options = LoadOptions {
                bstype: spool_blob::format::super_block::bstype_from_name("BLOBFS").unwrap(),
                ..LoadOptions::default()
            };
            Blobstore::load(desc_of(&wrong), &options)
                .await
                .err()
                .unwrap()
        })
        .unwrap();
    assert_eq!(err.errno(), -libc::ENXIO);
    rt.block_on(rt.reactors()[0], move || async move {
        let (store, _) = Blobstore::load(desc_of(&image), &LoadOptions::default())
            .await
            .unwrap();
        store.unload().await.unwrap();
    })
    .unwrap();
    rt.stop();
}

#[test]
fn mask_corruption_fails_the_clean_load() {
    let rt = runtime();
    let good = sample_image(&rt);
    let mut bad = good.clone();
    bad[4096] = 7; // used-page mask type
    assert_eq!(load_err(&rt, bad).errno(), -libc::EILSEQ);
    let mut bad = good;
    bad[2 * 4096 + 1..2 * 4096 + 5].copy_from_slice(&99u32.to_le_bytes()); // cluster mask length
    assert_eq!(load_err(&rt, bad).errno(), -libc::EILSEQ);
    rt.stop();
}

#[test]
fn md_page_corruptions_fail_the_open_with_einval_and_leave_other_blobs_alone() {
    let rt = runtime();
    let good = sample_image(&rt);
    // CRC mismatch.
    let mut bad = good.clone();
    md_page(&mut bad, 0)[40] ^= 1;
    let err = open_err(&rt, bad, A);
    assert_eq!(err.errno(), -libc::EINVAL);
    assert!(err.to_string().contains("CRC"), "{err}");
    // A descriptor overrunning the page (the xattr after FLAGS claims 5000 bytes).
    let mut bad = good.clone();
    let page = md_page(&mut bad, 0);
    page[16 + 29 + 1..16 + 29 + 5].copy_from_slice(&5000u32.to_le_bytes());
    seal_page(page);
    let err = open_err(&rt, bad, A);
    assert_eq!(err.errno(), -libc::EINVAL);
    assert!(err.to_string().contains("overruns"), "{err}");
    // Inconsistent xattr lengths: name length 3 instead of 4.
    let mut bad = good.clone();
    let page = md_page(&mut bad, 0);
    page[16 + 29 + 5..16 + 29 + 7].copy_from_slice(&3u16.to_le_bytes());
    seal_page(page);
    assert_eq!(open_err(&rt, bad, A).errno(), -libc::EINVAL);
    // An extent pointing past the device.
    let mut bad = good.clone();
    let page = md_page(&mut bad, 0);
    let rle = find_descriptor(page, 1).unwrap();
    page[rle + 5..rle + 9].copy_from_slice(&100_000u32.to_le_bytes());
    seal_page(page);
    let err = open_err(&rt, bad, A);
    assert_eq!(err.errno(), -libc::EINVAL);
    assert!(err.to_string().contains("cluster"), "{err}");
    // An extent pointing at a free cluster.
    let mut bad = good.clone();
    let page = md_page(&mut bad, 0);
    page[rle + 5..rle + 9].copy_from_slice(&12u32.to_le_bytes());
    seal_page(page);
    assert_eq!(open_err(&rt, bad, A).errno(), -libc::EINVAL);
    // An unknown invalid_flags bit refuses the open.
    let mut bad = good.clone();
    let page = md_page(&mut bad, 0);
    page[16 + 5] |= 1 << 6;
    seal_page(page);
    let err = open_err(&rt, bad, A);
    assert_eq!(err.errno(), -libc::EINVAL);
    assert!(err.to_string().contains("invalid_flags"), "{err}");
    // The extent page of B with a bad CRC.
    let mut bad = good.clone();
    let ep = extent_page_of(&mut bad, 1);
    md_page(&mut bad, ep as usize)[30] ^= 1;
    assert_eq!(open_err(&rt, bad, B).errno(), -libc::EINVAL);
    // A never-created id, an id past md_len, an id without the high bit.
    let image = good;
    rt.block_on(rt.reactors()[0], move || async move {
        let (store, _) = Blobstore::load(desc_of(&image), &LoadOptions::default())
            .await
            .unwrap();
        for id in [0x1_0000_0009u64, 0x1_0000_FFFF, 0x0000_0000, 0x2_0000_0000] {
            assert_eq!(
                store.open_blob(id).await.unwrap_err().errno(),
                -libc::ENOENT,
                "{id:#x}"
            );
        }
        store.unload().await.unwrap();
    })
    .unwrap();
    rt.stop();
}

#[test]
fn an_unknown_data_ro_bit_opens_the_blob_read_only() {
    let rt = runtime();
    let mut image = sample_image(&rt);
    let page = md_page(&mut image, 0);
    page[16 + 13] |= 1 << 4;
    seal_page(page);
    rt.block_on(rt.reactors()[0], move || async move {
        let (store, _) = Blobstore::load(desc_of(&image), &LoadOptions::default())
            .await
            .unwrap();
        let blob = store.open_blob(A).await.unwrap();
        assert!(blob.is_read_only());
        assert_eq!(blob.set_xattr("k", b"v").unwrap_err().errno(), -libc::EPERM);
        let channel = store.channel().unwrap();
        let (result, _) = channel
            .write(&blob.io(), 0, spool_bdev::DmaBuf::alloc(4096).unwrap())
            .await;
        assert_eq!(result.unwrap_err().errno(), -libc::EPERM);
        let (result, _) = channel
            .read(&blob.io(), 0, spool_bdev::DmaBuf::alloc(4096).unwrap())
            .await;
        result.unwrap();
        blob.close().await.unwrap();
        drop(channel);
        store.unload().await.unwrap();
    })
    .unwrap();
    rt.stop();
}

#[test]
fn a_loop_in_the_next_chain_is_an_error_on_open_and_in_recovery() {
    let rt = runtime();
    let good = sample_image(&rt);
    // Blob C (md page 3, with the extent page of B at 2) spans several pages: point its
    // last page back at its root.
    let c_root = 3usize;
    let mut chain = vec![c_root];
    loop {
        let page = md_page(&mut good.clone(), *chain.last().unwrap()).to_vec();
        let next = u32::from_le_bytes(page[4088..4092].try_into().unwrap());
        if next == u32::MAX {
            break;
        }
        chain.push(next as usize);
    }
    assert!(chain.len() >= 3, "C spans pages: {chain:?}");
    let mut bad = good.clone();
    let last = md_page(&mut bad, *chain.last().unwrap());
    last[4088..4092].copy_from_slice(&(c_root as u32).to_le_bytes());
    seal_page(last);
    let err = open_err(&rt, bad.clone(), 0x1_0000_0003);
    assert_eq!(err.errno(), -libc::EINVAL);
    assert!(err.to_string().contains("loop"), "{err}");
    // Dirty: recovery replays, lists C as damaged for the loop, and loads every other blob.
    bad[16..20].copy_from_slice(&0u32.to_le_bytes());
    seal_page(&mut bad[..4096]);
    let reason = damaged_reason(&rt, bad.clone(), 0x1_0000_0003);
    assert!(reason.contains("loop"), "{reason}");
    // `next` past the md region.
    let last = md_page(&mut bad, *chain.last().unwrap());
    last[4088..4092].copy_from_slice(&1_000_000u32.to_le_bytes());
    seal_page(last);
    let reason = damaged_reason(&rt, bad, 0x1_0000_0003);
    assert!(reason.contains("outside the md region"), "{reason}");
    rt.stop();
}

/// Loads a dirty `image` (must succeed) in which blob `id` is damaged: it is listed in the
/// report, does not open (-EINVAL), and every other blob opens. Returns the listed reason.
fn damaged_reason(rt: &Runtime, image: Vec<u8>, id: u64) -> String {
    rt.block_on(rt.reactors()[0], move || async move {
        let (store, report) = Blobstore::load(desc_of(&image), &LoadOptions::default())
            .await
            .unwrap_or_else(|err| panic!("one damaged blob made the load fail: {err}"));
        assert!(report.recovered);
        let reason = report
            .unreadable
            .iter()
            .find(|(listed, _)| *listed == id)
            .map(|(_, reason)| reason.clone())
            .unwrap_or_else(|| panic!("{id:#x} not listed: {:?}", report.unreadable));
        assert_eq!(
            store.open_blob(id).await.unwrap_err().errno(),
            -libc::EINVAL
        );
        let others: Vec<u64> = store.blob_ids().into_iter().filter(|&o| o != id).collect();
        for other in others {
            store.open_blob(other).await.unwrap().close().await.unwrap();
        }
        store.unload().await.unwrap();
        reason
    })
    .unwrap()
}

/// Offset in `page` of the first descriptor of `kind`.
fn find_descriptor(page: &[u8], kind: u8) -> Option<usize> {
    let mut at = 16;
    while at + 5 <= 4088 {
        let len = u32::from_le_bytes(page[at + 1..at + 5].try_into().unwrap()) as usize;
        if page[at] == kind {
            return Some(at);
        }
        if page[at] == 0 && len == 0 {
            return None;
        }
        at += 5 + len;
    }
    None
}

/// The md page of the extent page of the extent-table blob rooted at md page `root`.
fn extent_page_of(image: &mut [u8], root: usize) -> u32 {
    let page = md_page(image, root);
    let table = find_descriptor(page, 5).unwrap();
    u32::from_le_bytes(page[table + 13..table + 17].try_into().unwrap())
}

#[test]
fn crc_of_the_sample_pages_is_valid() {
    let rt = runtime();
    let mut image = sample_image(&rt);
    for page in 0..4 {
        let bytes = md_page(&mut image, page);
        assert_eq!(
            page_crc(bytes),
            u32::from_le_bytes(bytes[4092..].try_into().unwrap())
        );
    }
    rt.stop();
}
