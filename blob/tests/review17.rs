//! Review of issue 17 (the load path): each test here failed on the code under review
//! (branch r17 at 2b21dbb) and says what is wrong and what should happen.
//!
//! Method: a store Spool makes and cleanly unloads on a malloc bdev, then one change to the
//! image (mask bits, super block fields), then a clean load and what a user does next.

mod common;

use std::sync::Arc;

use common::runtime;

use spool_bdev::{Bdev, BdevDesc, MallocBdev};
use spool_blob::format::super_block::SuperBlock;
use spool_blob::format::{page_to_blobid, seal_page};
use spool_blob::{BlobOptions, Blobstore, ExtentForm, InitOptions, LoadOptions};
use spool_reactor::Runtime;

const DEVICE: u64 = 16 << 20;

fn desc_of(image: &[u8]) -> BdevDesc {
    common::from_image(image).1
}

/// Runs `body` on a fresh store (1 MiB clusters, 16 MiB) and returns the image after a clean
/// unload.
fn make_image<F, Fut>(rt: &Runtime, body: F) -> Vec<u8>
where
    F: FnOnce(Blobstore) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    let bdev = Arc::new(MallocBdev::new("img", 4096, DEVICE / 4096).unwrap());
    let desc = BdevDesc::open(Arc::clone(&bdev) as Arc<dyn Bdev>).expect("open bdev");
    rt.block_on(rt.reactors()[0], move || async move {
        let store = Blobstore::init(desc, &InitOptions::default())
            .await
            .unwrap();
        body(store.clone()).await;
        store.unload().await.unwrap();
    })
    .unwrap();
    bdev.snapshot()
}

fn super_of(image: &[u8]) -> SuperBlock {
    SuperBlock::decode(&image[..4096]).unwrap()
}

/// Clears bit `bit` of the mask region starting at device page `start`.
fn clear_mask_bit(image: &mut [u8], start: u32, bit: u32) {
    let at = start as usize * 4096 + 5 + bit as usize / 8;
    image[at] &= !(1u8 << (bit % 8));
}

fn mask_bit(image: &[u8], start: u32, bit: u32) -> bool {
    let at = start as usize * 4096 + 5 + bit as usize / 8;
    image[at] & (1u8 << (bit % 8)) != 0
}

fn md_page(image: &[u8], block: &SuperBlock, page: u32) -> Vec<u8> {
    let at = (block.md_start + page) as usize * 4096;
    image[at..at + 4096].to_vec()
}

/// A clean store whose used-md-page mask misses the root page of blob A (md page 0) while its
/// blob-id mask lists A: the masks disagree. The clean load reports A unreadable, yet keeps
/// page 0 free, so the next `create_blob` takes page 0, gets A's id and writes its root over
/// A's: A (which `open_blob` still opened before) is gone, silently, and the store now lists
/// a blob under an id that was handed out twice.
///
/// SPDK asserts that a blob's pages are marked in use (`blob_parse`); Spool's rule is an
/// error, never silent loss. Expected: the load refuses the store (-EILSEQ naming the mask
/// disagreement), or repairs the mask (marks page 0 in use) so that no page of a listed blob
/// is ever handed out again. Fault: `read_graph`/`Blobstore::load` in
/// `blob/src/store/load.rs` keep `used_md_pages` as read while trusting `used_blobids`.
#[test]
fn a_clean_load_never_hands_out_the_root_page_of_a_blob_it_lists() {
    let rt = runtime();
    let mut image = make_image(&rt, |store| async move {
        for name in ["a", "b"] {
            store
                .create_blob(&BlobOptions {
                    xattrs: vec![("name".into(), name.as_bytes().to_vec())],
                    ..BlobOptions::default()
                })
                .await
                .unwrap();
        }
    });
    let block = super_of(&image);
    let a = page_to_blobid(0);
    assert!(mask_bit(&image, block.used_blobid_mask_start, 0));
    clear_mask_bit(&mut image, block.used_page_mask_start, 0);
    let outcome = rt
        .block_on(rt.reactors()[0], move || async move {
            let (store, report) =
                match Blobstore::load(desc_of(&image), &LoadOptions::default()).await {
                    Ok(loaded) => loaded,
                    // Refusing the store is a fine answer.
                    Err(err) => return Ok(format!("load refused: {err}")),
                };
            assert!(store.blob_ids().contains(&a), "the store lists A");
            let before = store.blob_ids();
            let new = store
                .create_blob(&BlobOptions {
                    xattrs: vec![("name".into(), b"new".to_vec())],
                    ..BlobOptions::default()
                })
                .await
                .unwrap();
            let after = store.blob_ids();
            if before.contains(&new) {
                return Err(format!(
                    "create_blob returned {new:#x}, the id of a blob the store already listed \
                     (load report: {report:?}); blob ids before {before:x?}, after {after:x?}"
                ));
            }
            Ok("fine".into())
        })
        .unwrap();
    if let Err(msg) = outcome {
        panic!("{msg}");
    }
}

/// The clean load walks a multi-page chain only through pages the used-md-page mask marks,
/// and reports the blob unreadable when one is not marked (`docs/format.md`: "a blob whose
/// chain cannot be parsed is listed in the load report and fails to open with the reason").
/// But `open_blob` ignores the mask: the blob the load reported unreadable opens fine, with
/// a continuation page the store considers free. (SPDK asserts every chain page is marked in
/// use when it parses a blob.) Expected: the open fails (-EINVAL/-EILSEQ) naming the page
/// not in use, as the load said, or the load marks the page. Fault: `load_blob` in
/// `blob/src/blob_lifecycle.rs` never consults `used_md_pages`.
#[test]
fn a_blob_the_clean_load_reports_unreadable_does_not_open() {
    let rt = runtime();
    let mut image = make_image(&rt, |store| async move {
        store
            .create_blob(&BlobOptions {
                xattrs: (0..30)
                    .map(|i| (format!("x{i:02}"), vec![i as u8; 300]))
                    .collect(),
                ..BlobOptions::default()
            })
            .await
            .unwrap();
    });
    let block = super_of(&image);
    let root = md_page(&image, &block, 0);
    let next = u32::from_le_bytes(root[4088..4092].try_into().unwrap());
    assert_ne!(next, u32::MAX, "the blob has a continuation page");
    assert!(mask_bit(&image, block.used_page_mask_start, next));
    clear_mask_bit(&mut image, block.used_page_mask_start, next);
    let id = page_to_blobid(0);
    let outcome = rt
        .block_on(rt.reactors()[0], move || async move {
            let (store, report) = Blobstore::load(desc_of(&image), &LoadOptions::default())
                .await
                .unwrap();
            let listed = report.unreadable.iter().any(|(blob, _)| *blob == id);
            let opened = store.open_blob(id).await;
            let result = match (listed, opened) {
                (true, Ok(blob)) => {
                    blob.close().await.unwrap();
                    Err(format!(
                        "the load reported {id:#x} unreadable ({:?}), but open_blob opened it \
                         with its continuation page {next} marked free",
                        report.unreadable
                    ))
                }
                _ => Ok(()),
            };
            store.unload().await.unwrap();
            result
        })
        .unwrap();
    if let Err(msg) = outcome {
        panic!("{msg}");
    }
}

/// A thin extent-table blob whose extent page is not marked in the used-md-page mask (a
/// mask that disagrees with the pages; the clean load never reads extent pages, so it cannot
/// see it). `open_blob` reads the extent page without checking the mask and opens the blob;
/// the next `create_blob` takes the page as its root and writes over the extent page; the
/// thin blob's data is gone (its next open fails, or reads zeros) with no error at any step
/// before. Expected: the open refuses the blob (-EINVAL/-EILSEQ: an extent page not in
/// use), or the page is claimed, so that the written data stays readable. Fault: `load_blob`
/// in `blob/src/blob_lifecycle.rs` (extent pages applied without the mask check).
#[test]
fn an_extent_page_missing_from_the_mask_is_never_handed_out_under_an_open_blob() {
    let rt = runtime();
    let mut image = make_image(&rt, |store| async move {
        let id = store
            .create_blob(&BlobOptions {
                num_clusters: 4,
                thin: true,
                form: ExtentForm::Table,
                ..BlobOptions::default()
            })
            .await
            .unwrap();
        let blob = store.open_blob(id).await.unwrap();
        let channel = store.channel().unwrap();
        common::write(&channel, &blob.io(), 0, &[0xAB; 4096]).await;
        drop(channel);
        blob.close().await.unwrap();
    });
    let block = super_of(&image);
    let id = page_to_blobid(0);
    // The extent page: the md page in use that is not the root.
    let extent = (1..block.md_len)
        .find(|&page| mask_bit(&image, block.used_page_mask_start, page))
        .expect("an extent page");
    clear_mask_bit(&mut image, block.used_page_mask_start, extent);
    let outcome = rt
        .block_on(rt.reactors()[0], move || async move {
            let (store, _) = Blobstore::load(desc_of(&image), &LoadOptions::default())
                .await
                .unwrap();
            let blob = match store.open_blob(id).await {
                Ok(blob) => blob,
                // Refusing the blob is a fine answer.
                Err(_) => return Ok(()),
            };
            blob.close().await.unwrap();
            let new = store.create_blob(&BlobOptions::default()).await.unwrap();
            let result = match store.open_blob(id).await {
                Err(err) => Err(format!(
                    "the thin blob opened, then create_blob made {new:#x} (md page {}) and the \
                     thin blob no longer opens: {err}",
                    new & 0xFFFF_FFFF
                )),
                Ok(blob) => {
                    let channel = store.channel().unwrap();
                    let data = common::read(&channel, &blob.io(), 0, 4096).await;
                    drop(channel);
                    blob.close().await.unwrap();
                    if data == vec![0xAB; 4096] {
                        Ok(())
                    } else {
                        Err(format!(
                            "after create_blob made {new:#x}, the thin blob reads {:#x} where it \
                             had 0xAB",
                            data[0]
                        ))
                    }
                }
            };
            result
        })
        .unwrap();
    if let Err(msg) = outcome {
        panic!("{msg}");
    }
}

#[allow(dead_code)]
fn reseal(page: &mut [u8]) {
    seal_page(page);
}
