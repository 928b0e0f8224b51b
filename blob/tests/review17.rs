//! Review of issue 17 (the load path): each test here failed on the code under review
//! (branch r17 at 2b21dbb) and says what is wrong and what should happen.
//!
//! Method: a store Spool makes and cleanly unloads on a malloc bdev, then one change to the
//! image (mask bits, super block fields), then a clean load and what a user does next.

mod common;

use std::sync::Arc;

use common::runtime;

use spool_bdev::{Bdev, BdevDesc, MallocBdev};
use spool_blob::format::page_to_blobid;
use spool_blob::format::super_block::SuperBlock;
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

/// Writes `block` (resealed) as the image's super block.
fn put_super(image: &mut [u8], block: &SuperBlock) {
    image[..4096].copy_from_slice(&block.encode());
}

/// A super block whose used-md-page mask region sits in the data area (cluster 8 of 16, a
/// free cluster; the mask's bytes copied there so that it decodes). `check_geometry` only
/// checks that the four regions fit the store and do not overlap one another, not that the
/// masks lie in the metadata clusters (SPDK's layout always puts them between the super block
/// and the md region). The clean load accepts it; a thick blob then gets that cluster and
/// the user writes data there; the unload writes the mask over the blob's data. After a
/// reload the blob reads the mask's bytes: silent data loss.
///
/// Expected: the load refuses the super block (-EILSEQ naming `used_page_mask`: outside the
/// metadata clusters `0..md_clusters`). Fault: `SuperBlock::check_geometry` in
/// `blob/src/format/super_block.rs`.
#[test]
fn a_mask_region_in_the_data_area_is_refused() {
    let rt = runtime();
    let mut image = make_image(&rt, |_| async {});
    let mut block = super_of(&image);
    let pages_per_cluster = block.cluster_size / 4096;
    assert_eq!(
        block.md_start + block.md_len,
        20,
        "md clusters: cluster 0 only"
    );
    let target = 8 * pages_per_cluster;
    let from = block.used_page_mask_start as usize * 4096;
    let mask = image[from..from + 4096].to_vec();
    image[target as usize * 4096..target as usize * 4096 + 4096].copy_from_slice(&mask);
    block.used_page_mask_start = target;
    put_super(&mut image, &block);
    let outcome = rt
        .block_on(rt.reactors()[0], move || async move {
            let (bdev, desc) = common::from_image(&image);
            let store = match Blobstore::load(desc, &LoadOptions::default()).await {
                Ok((store, _)) => store,
                Err(err) => return Ok(format!("refused: {err}")),
            };
            let id = common::create_thick(&store, 15).await;
            let blob = store.open_blob(id).await.unwrap();
            let map = blob.cluster_map();
            let index = map
                .iter()
                .position(|&c| c == 8)
                .expect("cluster 8 is the blob's") as u64;
            let unit = index * (store.cluster_size() / store.io_unit_size());
            let data = common::pattern(17, 4096);
            let channel = store.channel().unwrap();
            common::write(&channel, &blob.io(), unit, &data).await;
            drop(channel);
            blob.close().await.unwrap();
            store.unload().await.unwrap();
            let image = bdev.snapshot();
            let (store, _) = Blobstore::load(desc_of(&image), &LoadOptions::default())
                .await
                .unwrap();
            let blob = store.open_blob(id).await.unwrap();
            let channel = store.channel().unwrap();
            let back = common::read(&channel, &blob.io(), unit, 4096).await;
            drop(channel);
            blob.close().await.unwrap();
            store.unload().await.unwrap();
            if back == data {
                Ok("data kept".into())
            } else {
                Err(format!(
                    "the load accepted a used-md-page mask at device page {target} (data cluster \
                     8); the unload wrote it over blob {id:#x}'s data: it reads back {:02x?}... \
                     instead of {:02x?}...",
                    &back[..8],
                    &data[..8]
                ))
            }
        })
        .unwrap();
    if let Err(msg) = outcome {
        panic!("{msg}");
    }
}

/// A blob of three chain pages whose last page has a bad CRC, loaded dirty. The replay's doc
/// comment (`replay` in `blob/src/store/load.rs`) says a damaged blob's "id, root and the
/// chain pages that could be read stay claimed, ... so nothing of it is handed out while
/// readable parts remain". The walk fails at the last page and `BlobLoad::advance` claims
/// chain pages only once the whole walk succeeded: the readable second page is left free
/// (the next `create_blob` writes its root there). Expected: the pages the walk read (the
/// root and the second page) are in the used-md-page mask after the load.
#[test]
fn a_damaged_chain_keeps_its_readable_pages_claimed_after_recovery() {
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
    let mut block = super_of(&image);
    let next_of = |image: &[u8], page: u32| {
        let bytes = md_page(image, &block, page);
        u32::from_le_bytes(bytes[4088..4092].try_into().unwrap())
    };
    let second = next_of(&image, 0);
    let third = next_of(&image, second);
    assert_ne!(third, u32::MAX, "three chain pages");
    let at = (block.md_start + third) as usize * 4096 + 100;
    image[at] ^= 0xFF;
    block.clean = 0;
    put_super(&mut image, &block);
    let (used, report) = rt
        .block_on(rt.reactors()[0], move || async move {
            let (store, report) = Blobstore::load(desc_of(&image), &LoadOptions::default())
                .await
                .unwrap();
            let used = store.used_md_pages();
            store.unload().await.unwrap();
            (used, report)
        })
        .unwrap();
    assert!(report.recovered);
    assert_eq!(report.unreadable.len(), 1, "{report:?}");
    assert!(
        used.contains(&u64::from(second)),
        "the readable chain page {second} of the damaged blob is not claimed after recovery \
         (used md pages {used:?}; {report:?})"
    );
}

/// The clean load's reason for a blob whose root page is fine but whose used-md-page bit is
/// clear is "md page 0 of the chain is unreadable or has a bad CRC": it names the wrong cause
/// (the page reads and checks fine; the mask disagrees with the blob-id mask). The issue asks
/// for "an error naming what is wrong". Expected: the reason says the page is not marked in
/// the used-md-page mask. Fault: `ChainWalk::advance` / `PageCache::fetch` in
/// `blob/src/store/{load,md_scan}.rs` (a page excluded by the mask becomes `Unusable`, the
/// same as a bad CRC).
#[test]
fn a_mask_disagreement_is_named_as_such() {
    let rt = runtime();
    let mut image = make_image(&rt, |store| async move {
        store.create_blob(&BlobOptions::default()).await.unwrap();
    });
    let block = super_of(&image);
    clear_mask_bit(&mut image, block.used_page_mask_start, 0);
    let report = rt
        .block_on(rt.reactors()[0], move || async move {
            match Blobstore::load(desc_of(&image), &LoadOptions::default()).await {
                Ok((store, report)) => {
                    store.unload().await.unwrap();
                    Ok(report)
                }
                Err(err) => Err(err.to_string()),
            }
        })
        .unwrap();
    let reason = match report {
        Ok(report) => report
            .unreadable
            .first()
            .map(|(_, reason)| reason.clone())
            .unwrap_or_default(),
        Err(err) => err,
    };
    assert!(
        reason.contains("mask") || reason.contains("not in use"),
        "the reason does not name the mask disagreement: {reason:?}"
    );
}

/// A clone whose `SNAP` names md page 5, where no blob is (a corrupt or hostile store; a
/// clean store never has one: a snapshot with clones cannot be deleted). The clean load
/// records the edge as it is: `clones_of(0x100000005)` lists the clone although no such blob
/// exists, and nothing in the load report says the clone is broken. Then `create_blob` fills
/// pages 1..5, the blob at page 5 gets that id and, from its first moment, "has" a clone:
/// the clone, which could not open before (its parent was missing), now opens and reads
/// through a blob it never had anything to do with (deleting the new blob would merge it
/// into the clone).
///
/// Expected: the load reports the clone unreadable (its parent is not a blob) and keeps no
/// graph edge to a free id, so a new blob never inherits a clone. Fault: `Found::apply` in
/// `blob/src/store/load.rs` (a `SNAP` target not in `used_blobids` is accepted).
#[test]
fn a_clone_whose_parent_is_not_a_blob_is_reported_and_never_adopted() {
    let rt = runtime();
    let missing = page_to_blobid(5);
    let image = make_image(&rt, move |store| async move {
        store
            .create_blob(&BlobOptions {
                num_clusters: 2,
                thin: true,
                internal_xattrs: vec![("SNAP".into(), missing.to_le_bytes().to_vec())],
                ..BlobOptions::default()
            })
            .await
            .unwrap();
    });
    let clone = page_to_blobid(0);
    let outcome = rt
        .block_on(rt.reactors()[0], move || async move {
            let (store, report) = Blobstore::load(desc_of(&image), &LoadOptions::default())
                .await
                .unwrap();
            assert!(
                store.open_blob(clone).await.is_err(),
                "its parent is missing"
            );
            let reported = report.unreadable.iter().any(|(id, _)| *id == clone);
            let mut made = Vec::new();
            for _ in 0..5 {
                made.push(store.create_blob(&BlobOptions::default()).await.unwrap());
            }
            assert!(made.contains(&missing));
            let adopted = store.clones_of(missing);
            let opens = match store.open_blob(clone).await {
                Ok(blob) => {
                    let parent = blob.parent_id();
                    blob.close().await.unwrap();
                    format!("opens now, reading through {parent:x?}")
                }
                Err(err) => format!("still fails to open: {err}"),
            };
            store.unload().await.unwrap();
            if !reported || !adopted.is_empty() {
                Err(format!(
                    "the load report does not name the clone ({:?}); after create_blob made \
                     {missing:#x}, clones_of({missing:#x}) = {adopted:x?}; the clone {opens}",
                    report.unreadable
                ))
            } else {
                Ok(())
            }
        })
        .unwrap();
    if let Err(msg) = outcome {
        panic!("{msg}");
    }
}

/// A thick run-length blob A whose one cluster is clear in the used-cluster mask (a mask
/// that disagrees with the pages). The clean load parses A's root page (it parses every
/// one-page root for the snapshot graph) but checks its clusters only against the store's
/// size, so the cluster stays free; a new thick blob N gets it; A then opens fine (its
/// cluster is now "in use", by N) and the two blobs share a cluster: N's writes show in A.
///
/// Expected: the load, which already visits A's clusters, refuses the store or marks the
/// cluster used (or A fails to open), so that no cluster is ever mapped by two blobs.
/// Fault: `read_graph` in `blob/src/store/load.rs` (`RangeCheck` for a clean load does not
/// consult the used-cluster mask it trusts).
#[test]
fn a_cluster_missing_from_the_mask_is_not_handed_to_a_second_blob() {
    let rt = runtime();
    let mut image = make_image(&rt, |store| async move {
        store
            .create_blob(&BlobOptions {
                num_clusters: 1,
                form: ExtentForm::Rle,
                ..BlobOptions::default()
            })
            .await
            .unwrap();
    });
    let block = super_of(&image);
    // Cluster 1: the first data cluster, A's.
    assert!(mask_bit(&image, block.used_cluster_mask_start, 1));
    clear_mask_bit(&mut image, block.used_cluster_mask_start, 1);
    let a = page_to_blobid(0);
    let outcome = rt
        .block_on(rt.reactors()[0], move || async move {
            let (store, _) = match Blobstore::load(desc_of(&image), &LoadOptions::default()).await {
                Ok(loaded) => loaded,
                Err(_) => return Ok(()),
            };
            let n = common::create_thick(&store, 1).await;
            let nb = store.open_blob(n).await.unwrap();
            let n_map = nb.cluster_map();
            let channel = store.channel().unwrap();
            common::write(&channel, &nb.io(), 0, &[0x4E; 4096]).await;
            nb.close().await.unwrap();
            let result = match store.open_blob(a).await {
                Err(_) => Ok(()),
                Ok(ab) => {
                    let a_map = ab.cluster_map();
                    let data = common::read(&channel, &ab.io(), 0, 4096).await;
                    ab.close().await.unwrap();
                    if a_map.iter().any(|c| n_map.contains(c)) {
                        Err(format!(
                            "A {a:#x} maps {a_map:?} and N {n:#x} maps {n_map:?}: one cluster, \
                             two blobs (A reads {:#x}, N's byte)",
                            data[0]
                        ))
                    } else {
                        Ok(())
                    }
                }
            };
            drop(channel);
            store.unload().await.unwrap();
            result
        })
        .unwrap();
    if let Err(msg) = outcome {
        panic!("{msg}");
    }
}

/// A device that claims `blocks` blocks but stores only the inner device's: requests past the
/// inner device complete at once, untouched (no memory per block).
struct Sparse {
    inner: Arc<MallocBdev>,
    blocks: u64,
}

struct SparseChannel {
    inner: Box<dyn spool_bdev::ChannelBackend>,
    inner_bytes: u64,
}

impl Bdev for Sparse {
    fn name(&self) -> &str {
        "sparse"
    }
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn block_count(&self) -> u64 {
        self.blocks
    }
    fn create_channel(
        &self,
        slots: std::rc::Rc<spool_bdev::IoSlots>,
    ) -> Result<Box<dyn spool_bdev::ChannelBackend>, spool_bdev::BdevError> {
        Ok(Box::new(SparseChannel {
            inner: self.inner.create_channel(slots)?,
            inner_bytes: self.inner.size_bytes(),
        }))
    }
}

impl spool_bdev::ChannelBackend for SparseChannel {
    fn submit(&mut self, io: spool_bdev::Submission<'_>) {
        if io.offset_bytes() + io.len_bytes() <= self.inner_bytes {
            self.inner.submit(io);
        } else {
            io.complete(0);
        }
    }
    fn poll(&mut self) -> spool_reactor::PollStatus {
        self.inner.poll()
    }
}

const CHILD: &str = "REVIEW17_CHILD";

/// The child half of [`a_mask_region_longer_than_its_bits_does_not_abort_the_load`]: a
/// 256 GiB store (1 GiB clusters, md region at 128 GiB) whose super block gives the
/// used-md-page mask (16 bits: one page needed) a region of 2^24 pages (64 GiB) between the
/// super block and the md region. Every field passes `check_geometry`.
fn hostile_mask_length_child(clean: bool) {
    let mut image = vec![0u8; 16 * 4096];
    let block = SuperBlock {
        clean: u32::from(clean),
        cluster_size: 1 << 30,
        used_page_mask_start: 1,
        used_page_mask_len: 1 << 24,
        used_cluster_mask_start: (1 << 24) + 1,
        used_cluster_mask_len: 1,
        used_blobid_mask_start: (1 << 24) + 2,
        used_blobid_mask_len: 1,
        md_start: 1 << 25,
        md_len: 16,
        ..SuperBlock::default()
    };
    image[..4096].copy_from_slice(&block.encode());
    image[4096] = 0; // type: used md pages
    image[4097..4101].copy_from_slice(&16u32.to_le_bytes());
    let inner = Arc::new(MallocBdev::from_image("inner", 4096, &image).unwrap());
    let sparse = Arc::new(Sparse {
        inner,
        blocks: (256u64 << 30) / 4096,
    });
    let desc = BdevDesc::open(sparse as Arc<dyn Bdev>).unwrap();
    let rt = runtime();
    let outcome = rt
        .block_on(rt.reactors()[0], move || async move {
            match Blobstore::load(desc, &LoadOptions::default()).await {
                Ok((store, _)) => {
                    drop(store);
                    "loaded".to_string()
                }
                Err(err) => format!("refused: {err}"),
            }
        })
        .unwrap();
    println!("LOAD RETURNED: {outcome}");
}

/// A super block may give a mask a region far longer than its bits need (`check_geometry`
/// only checks that it is long enough, fits the store and overlaps nothing). The clean
/// load's `read_masks` -> `read_regions` (`blob/src/store/md_io.rs`) reads every page of each
/// region, with every request submitted at once and a `Vec::with_capacity` of the whole
/// region: here 64 GiB for a 16-bit mask, so the process aborts ("memory allocation of
/// 68719476736 bytes failed") instead of the load returning. (On a device small enough not
/// to abort, the load reads and holds twice the claimed region: its cost follows a number in
/// the super block, up to the device's capacity, not what the masks hold.)
///
/// Expected: the load returns (an -EILSEQ for a mask region longer than the mask, or a
/// success reading only `mask_pages(bits)` pages of each region); never an abort. Run in a
/// child process with a 2 GiB address-space limit (64 GiB is more than this machine's
/// memory, so without the limit the allocation fails the same way), so the machine's memory is safe.
#[test]
fn a_mask_region_longer_than_its_bits_does_not_abort_the_load() {
    run_hostile_mask_length_child(
        "a_mask_region_longer_than_its_bits_does_not_abort_the_load",
        true,
    );
}

/// The same super block with `clean = 0`: the recovery reads only the md region, then
/// `write_masks` (`blob/src/store/lifecycle.rs`) encodes each mask as its whole region
/// (`encode_mask(.., pages = used_page_mask_len)`: a 64 GiB `vec![0; ..]`) and the process
/// aborts the same way. Expected: the load returns.
#[test]
fn a_mask_region_longer_than_its_bits_does_not_abort_the_recovery() {
    run_hostile_mask_length_child(
        "a_mask_region_longer_than_its_bits_does_not_abort_the_recovery",
        false,
    );
}

fn run_hostile_mask_length_child(name: &str, clean: bool) {
    if std::env::var_os(CHILD).is_some() {
        hostile_mask_length_child(clean);
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let output = std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 2097152; exec \"$0\" --exact \"$1\" --nocapture --test-threads=1")
        .arg(&exe)
        .arg(name)
        .env(CHILD, "1")
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let tail: String = stderr
        .lines()
        .rfind(|line| !line.trim().is_empty() && !line.starts_with("note:"))
        .unwrap_or("")
        .to_string();
    assert!(
        output.status.success() && stdout.contains("LOAD RETURNED"),
        "the load did not return: child {} ({tail})",
        output.status
    );
}

/// A blob with data and a `SNAPRM` mark naming md page 9, where no blob is (a bit flip, or a
/// hostile image: a merge writes the mark naming the snapshot's clone, which exists until
/// long after the snapshot is gone). The load's merge repair
/// (`repair_interrupted_merge` in `blob/src/snapshot.rs`, called by `Blobstore::load`) sees
/// that the "clone" does not read through the blob and deletes the blob with its data,
/// reporting the merge "finished". The pending-snapshot repair next to it refuses to act
/// on an original it cannot read; this one deletes on a mark naming nothing.
///
/// Expected: a mark whose clone is not a blob (or is not a clone of this blob's parent line)
/// leaves the blob alone and is reported "not repaired"; the blob still opens with its data.
#[test]
fn a_merge_mark_naming_no_blob_does_not_delete_the_blob_at_load() {
    let rt = runtime();
    let nobody = page_to_blobid(9);
    let data = common::pattern(5, 4096);
    let written = data.clone();
    let image = make_image(&rt, move |store| async move {
        let id = store
            .create_blob(&BlobOptions {
                num_clusters: 1,
                internal_xattrs: vec![("SNAPRM".into(), nobody.to_le_bytes().to_vec())],
                ..BlobOptions::default()
            })
            .await
            .unwrap();
        let blob = store.open_blob(id).await.unwrap();
        let channel = store.channel().unwrap();
        common::write(&channel, &blob.io(), 0, &written).await;
        drop(channel);
        blob.close().await.unwrap();
    });
    let id = page_to_blobid(0);
    let outcome = rt
        .block_on(rt.reactors()[0], move || async move {
            let (store, report) = Blobstore::load(desc_of(&image), &LoadOptions::default())
                .await
                .unwrap();
            let result = match store.open_blob(id).await {
                Ok(blob) => {
                    let channel = store.channel().unwrap();
                    let back = common::read(&channel, &blob.io(), 0, 4096).await;
                    drop(channel);
                    blob.close().await.unwrap();
                    if back == data {
                        Ok(())
                    } else {
                        Err(format!("the blob lost its data; load report {report:?}"))
                    }
                }
                Err(err) => Err(format!(
                    "the load deleted blob {id:#x} (repaired: {:?}); open: {err}",
                    report.repaired
                )),
            };
            store.unload().await.unwrap();
            result
        })
        .unwrap();
    if let Err(msg) = outcome {
        panic!("{msg}");
    }
}

/// Offset of the first descriptor of type `kind` in an md page (the 5-byte headers walked
/// from byte 16).
fn find_descriptor(page: &[u8], kind: u8) -> Option<usize> {
    let mut at = 16;
    while at + 5 <= 16 + 4072 {
        let (ty, len) = (
            page[at],
            u32::from_le_bytes(page[at + 1..at + 5].try_into().unwrap()) as usize,
        );
        if ty == kind {
            return Some(at);
        }
        if ty == 0 && len == 0 {
            return None;
        }
        at += 5 + len;
    }
    None
}

/// Six thin run-length blobs of 2^26 clusters each (one root page each: FLAGS and one RLE run
/// `(0, 2^26)`; SPDK before 20.01 writes thin blobs this way, and a thin blob may be far
/// larger than the device; 2^26 is `MAX_BLOB_CLUSTERS`). A clean load needs only the
/// blobs' xattrs for the snapshot graph, yet `read_graph` parses every root with
/// `parse_decoded_chain`, which expands each run into the cluster map one entry at a time:
/// 2^26 pushes (256 MiB written) per blob: about 0.25 s each on this machine (48 such roots
/// measured 12 s), so a 16 MiB image whose 4,096 md pages are such roots keeps the load busy
/// for about 17 minutes. The
/// load's cost follows a number in the metadata, not the pages read ("a clean load costs
/// what the blobs cost"; "every load ... must finish in bounded time on any input").
///
/// Expected: the graph pass does not build cluster maps (or builds unallocated runs without
/// a loop per cluster): these six roots load in milliseconds, as six plain roots do.
/// Fault: `read_graph` / `finish` (Mode::Graph) in `blob/src/store/load.rs` and the
/// `ExtentRle` arm of `parse_decoded_chain` in `blob/src/meta.rs`.
#[test]
fn a_clean_load_does_not_expand_thin_run_length_maps() {
    const BLOBS: u32 = 6;
    let rt = runtime();
    let bdev = Arc::new(MallocBdev::new("img", 4096, DEVICE / 4096).unwrap());
    let desc = BdevDesc::open(Arc::clone(&bdev) as Arc<dyn Bdev>).expect("open bdev");
    rt.block_on(rt.reactors()[0], move || async move {
        let store = Blobstore::init(
            desc,
            &InitOptions {
                md_pages: Some(64),
                ..InitOptions::default()
            },
        )
        .await
        .unwrap();
        store
            .create_blob(&BlobOptions {
                num_clusters: 1,
                thin: true,
                form: ExtentForm::Rle,
                ..BlobOptions::default()
            })
            .await
            .unwrap();
        store.unload().await.unwrap();
    })
    .unwrap();
    let mut image = bdev.snapshot();
    let block = super_of(&image);
    let mut root = md_page(&image, &block, 0);
    let rle = find_descriptor(&root, 1).expect("an RLE descriptor");
    assert_eq!(&root[rle + 1..rle + 5], &8u32.to_le_bytes());
    root[rle + 9..rle + 13].copy_from_slice(&(1u32 << 26).to_le_bytes());
    for page in 0..BLOBS {
        let mut bytes = root.clone();
        bytes[..8].copy_from_slice(&page_to_blobid(page).to_le_bytes());
        spool_blob::format::seal_page(&mut bytes);
        let at = (block.md_start + page) as usize * 4096;
        image[at..at + 4096].copy_from_slice(&bytes);
        for start in [block.used_page_mask_start, block.used_blobid_mask_start] {
            image[start as usize * 4096 + 5 + page as usize / 8] |= 1 << (page % 8);
        }
    }
    let elapsed = rt
        .block_on(rt.reactors()[0], move || async move {
            // The device (a 16 MiB copy of the image) is made before the clock starts.
            let desc = desc_of(&image);
            let started = std::time::Instant::now();
            let (store, report) = Blobstore::load(desc, &LoadOptions::default())
                .await
                .unwrap();
            let elapsed = started.elapsed();
            assert_eq!(report.blobs, BLOBS as usize);
            assert!(report.unreadable.is_empty(), "{report:?}");
            store.unload().await.unwrap();
            elapsed
        })
        .unwrap();
    assert!(
        elapsed < std::time::Duration::from_millis(250),
        "a clean load of {BLOBS} one-page roots took {elapsed:?}"
    );
}

/// A clean store whose blob-id mask marks md page 1 (also marked in the used-md-page mask),
/// where the page is zeroed: "a used-blob bit with no valid page". The clean load lists
/// 0x100000001 in `blob_ids()` (and reports it unreadable), `open_blob` says it does not
/// exist (-ENOENT), and `delete_blob` fails the same way: the store lists a blob that can
/// never be opened nor removed, and its md page is never reused. (SPDK's load iterates the
/// blob-id mask and takes the -ENOENT for the end of the blobs.)
///
/// Expected: one consistent answer: the load refuses the store (-EILSEQ naming the mask),
/// or the ghost is not listed (and its bits are cleared), or `delete_blob` removes it.
/// Fault: `read_graph`/`Found::apply` in `blob/src/store/load.rs` keep the bit as read;
/// `delete_blob` in `blob/src/blob_lifecycle.rs` needs an openable blob.
#[test]
fn a_blob_id_bit_over_a_zeroed_page_is_not_a_blob_that_cannot_be_removed() {
    let rt = runtime();
    let mut image = make_image(&rt, |store| async move {
        for _ in 0..2 {
            store.create_blob(&BlobOptions::default()).await.unwrap();
        }
    });
    let block = super_of(&image);
    let at = (block.md_start + 1) as usize * 4096;
    image[at..at + 4096].fill(0);
    let ghost = page_to_blobid(1);
    let outcome = rt
        .block_on(rt.reactors()[0], move || async move {
            let (store, report) =
                match Blobstore::load(desc_of(&image), &LoadOptions::default()).await {
                    Ok(loaded) => loaded,
                    Err(_) => return Ok(()),
                };
            if !store.blob_ids().contains(&ghost) {
                store.unload().await.unwrap();
                return Ok(());
            }
            let open = store.open_blob(ghost).await.map(|b| b.id());
            let delete = store.delete_blob(ghost).await;
            let listed = store.blob_ids().contains(&ghost);
            store.unload().await.unwrap();
            if listed {
                Err(format!(
                    "{ghost:#x} stays listed: open {:?}, delete {:?} (report {:?})",
                    open.map_err(|e| e.to_string()),
                    delete.map_err(|e| e.to_string()),
                    report.unreadable
                ))
            } else {
                Ok(())
            }
        })
        .unwrap();
    if let Err(msg) = outcome {
        panic!("{msg}");
    }
}

/// The dirty-load side of [`a_mask_region_in_the_data_area_is_refused`]: a thick blob owns
/// cluster 8; the super block (clean = 0) puts the used-md-page mask region at the start of
/// that cluster. The recovery accepts it and its `write_masks` writes the rebuilt mask
/// there, over the blob's data, during the load itself: the user did nothing but load.
/// Expected: the load refuses the super block (-EILSEQ). Fault: `SuperBlock::check_geometry`
/// in `blob/src/format/super_block.rs`.
#[test]
fn a_recovery_never_writes_a_mask_over_blob_data() {
    let rt = runtime();
    let data = common::pattern(23, 4096);
    let written = data.clone();
    let mut image = make_image(&rt, move |store| async move {
        let id = common::create_thick(&store, 15).await;
        let blob = store.open_blob(id).await.unwrap();
        let index = blob.cluster_map().iter().position(|&c| c == 8).unwrap() as u64;
        let unit = index * (store.cluster_size() / store.io_unit_size());
        let channel = store.channel().unwrap();
        common::write(&channel, &blob.io(), unit, &written).await;
        drop(channel);
        blob.close().await.unwrap();
    });
    let mut block = super_of(&image);
    block.used_page_mask_start = 8 * (block.cluster_size / 4096);
    block.clean = 0;
    put_super(&mut image, &block);
    let id = page_to_blobid(0);
    let outcome = rt
        .block_on(rt.reactors()[0], move || async move {
            let (store, _) = match Blobstore::load(desc_of(&image), &LoadOptions::default()).await {
                Ok(loaded) => loaded,
                Err(err) => return Ok(format!("refused: {err}")),
            };
            let blob = store.open_blob(id).await.unwrap();
            let index = blob.cluster_map().iter().position(|&c| c == 8).unwrap() as u64;
            let unit = index * (store.cluster_size() / store.io_unit_size());
            let channel = store.channel().unwrap();
            let back = common::read(&channel, &blob.io(), unit, 4096).await;
            drop(channel);
            blob.close().await.unwrap();
            store.unload().await.unwrap();
            if back == data {
                Ok("kept".into())
            } else {
                Err(format!(
                    "the recovery wrote its mask over blob {id:#x}'s data in cluster 8: it reads \
                     {:02x?}... instead of {:02x?}...",
                    &back[..8],
                    &data[..8]
                ))
            }
        })
        .unwrap();
    if let Err(msg) = outcome {
        panic!("{msg}");
    }
}
