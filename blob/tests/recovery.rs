//! Goal: a store loaded after a crash (no unload) has exactly the blobs, xattrs, data and
//! free clusters it would have had after a clean unload, and recovery has none of the
//! seed's three bugs. Method: build a store, keep the device image without unloading (the
//! super block stays dirty), load a copy, and compare with the clean path. Each seed bug has
//! a test that fails on the seed's behaviour.

mod common;

use common::{create_thick, from_image, malloc, pattern, read, run, runtime, write};
use spool_blob::format::seal_page;
use spool_blob::{BlobOptions, Blobstore, ExtentForm, InitOptions, LoadOptions};

/// Crashes after `build` (no unload) and returns the device image.
fn crash_image<F, Fut>(bytes: u64, options: InitOptions, build: F) -> Vec<u8>
where
    F: FnOnce(Blobstore) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    let rt = runtime();
    let (bdev, desc) = malloc(bytes);
    run(&rt, move || async move {
        let store = Blobstore::init(desc, &options).await.unwrap();
        build(store.clone()).await;
        std::mem::forget(store);
    });
    rt.stop();
    bdev.snapshot()
}

#[test]
fn multi_page_blobs_keep_their_continuation_pages_and_clusters() {
    // Seed bug (a): continuation pages were checked against their own index, so recovery
    // dropped them and their extents, and the clusters could be handed out again.
    let image = crash_image(64 << 20, InitOptions::default(), |store| async move {
        let xattrs = (0..40)
            .map(|i| (format!("xattr_{i:02}"), vec![b'a' + i as u8; 199]))
            .collect();
        let id = store
            .create_blob(&BlobOptions {
                num_clusters: 3,
                xattrs,
                form: ExtentForm::Rle,
                ..BlobOptions::default()
            })
            .await
            .unwrap();
        let blob = store.open_blob(id).await.unwrap();
        let channel = store.channel().unwrap();
        write(&channel, &blob.io(), 0, &pattern(1, 3 << 20)).await;
        drop(channel);
        blob.close().await.unwrap();
    });
    let rt = runtime();
    let (_bdev, desc) = from_image(&image);
    run(&rt, move || async move {
        let (store, report) = Blobstore::load(desc, &LoadOptions::default())
            .await
            .unwrap();
        assert!(report.recovered);
        assert!(
            store.used_md_pages().len() >= 3,
            "the chain's pages are in use: {:?}",
            store.used_md_pages()
        );
        assert_eq!(
            store.free_cluster_count(),
            store.total_data_cluster_count() - 3
        );
        let blob = store.open_blob(0x1_0000_0000).await.unwrap();
        assert_eq!(blob.xattr_names().len(), 40);
        assert_eq!(blob.num_clusters(), 3);
        let channel = store.channel().unwrap();
        assert!(read(&channel, &blob.io(), 0, 3 << 20).await == pattern(1, 3 << 20));
        // A new blob must not get the recovered blob's clusters.
        let other = create_thick(&store, 2).await;
        let other = store.open_blob(other).await.unwrap();
        let mine = blob.cluster_map();
        assert!(other.cluster_map().iter().all(|c| !mine.contains(c)));
        other.close().await.unwrap();
        drop(channel);
        blob.close().await.unwrap();
        store.unload().await.unwrap();
    });
    rt.stop();
}

#[test]
fn metadata_clusters_are_counted_from_md_start() {
    // Seed bug (b): recovery claimed ceil(md_len / ppc) metadata clusters instead of
    // ceil((md_start + md_len) / ppc), leaving the last metadata cluster free. With 16 KiB
    // clusters (4 pages) on 8 MiB: md_start = 4, md_len = 512, so 129 metadata clusters
    // (the seed would claim 128).
    let options = InitOptions {
        cluster_size: 16 << 10,
        ..InitOptions::default()
    };
    let image = crash_image(8 << 20, options, |_store| async move {});
    let rt = runtime();
    let (_bdev, desc) = from_image(&image);
    run(&rt, move || async move {
        let (store, report) = Blobstore::load(desc, &LoadOptions::default())
            .await
            .unwrap();
        assert!(report.recovered);
        let geometry = store.geometry().clone();
        assert_eq!(geometry.md_start, 4);
        assert_eq!(geometry.md_clusters, 129);
        assert_eq!(store.used_clusters(), (0..129).collect::<Vec<u64>>());
        // A new thick blob never lands on metadata.
        let id = create_thick(&store, 4).await;
        let blob = store.open_blob(id).await.unwrap();
        assert!(
            blob.cluster_map().iter().all(|&c| c >= 129),
            "{:?}",
            blob.cluster_map()
        );
        blob.close().await.unwrap();
        store.unload().await.unwrap();
    });
    rt.stop();
}

#[test]
fn a_cluster_referenced_twice_is_counted_once() {
    // Seed bug (c): a cluster referenced by two blobs (a crash in the middle of a snapshot)
    // was subtracted twice from the free count. Make blob B's extent name blob A's cluster.
    let image = crash_image(32 << 20, InitOptions::default(), |store| async move {
        for _ in 0..2 {
            store
                .create_blob(&BlobOptions {
                    num_clusters: 1,
                    form: ExtentForm::Rle,
                    ..BlobOptions::default()
                })
                .await
                .unwrap();
        }
    });
    let mut image = image;
    let md_start = 4usize;
    let page_of = |page: usize| (md_start + page) * 4096;
    // Blob A (md page 0) has one RLE run {cluster, 1}; find it and copy it into B's page.
    let a_cluster = {
        let page = &image[page_of(0)..page_of(0) + 4096];
        let at = 16 + 29; // FLAGS descriptor is 29 bytes; then the RLE
        assert_eq!(page[at], 1);
        u32::from_le_bytes(page[at + 5..at + 9].try_into().unwrap())
    };
    let b = page_of(1);
    image[b + 16 + 29 + 5..b + 16 + 29 + 9].copy_from_slice(&a_cluster.to_le_bytes());
    seal_page(&mut image[b..b + 4096]);
    let rt = runtime();
    let (_bdev, desc) = from_image(&image);
    run(&rt, move || async move {
        let (store, report) = Blobstore::load(desc, &LoadOptions::default())
            .await
            .unwrap();
        assert!(report.recovered);
        // One data cluster in use (shared), not two and not a negative count.
        assert_eq!(
            store.free_cluster_count(),
            store.total_data_cluster_count() - 1
        );
        assert_eq!(
            store.used_clusters().len() as u64,
            store.geometry().md_clusters + 1
        );
        store.unload().await.unwrap();
    });
    rt.stop();
}

#[test]
fn dirty_recovery_equals_the_clean_unload() {
    // Thin, thick, RLE, extent table, many xattrs, deleted blobs, resized blobs: the
    // recovered store matches the one a clean unload leaves.
    let build = |store: Blobstore| async move {
        let mut ids = Vec::new();
        for i in 0..12u64 {
            let id = store
                .create_blob(&BlobOptions {
                    num_clusters: i % 4,
                    thin: i % 3 == 0,
                    form: if i % 2 == 0 {
                        ExtentForm::Table
                    } else {
                        ExtentForm::Rle
                    },
                    xattrs: (0..(i * 3))
                        .map(|x| (format!("k{x}"), pattern(x, 150)))
                        .collect(),
                    ..BlobOptions::default()
                })
                .await
                .unwrap();
            ids.push(id);
        }
        let channel = store.channel().unwrap();
        for &id in &ids {
            let blob = store.open_blob(id).await.unwrap();
            if blob.num_clusters() > 0 {
                write(&channel, &blob.io(), 3, &pattern(id, 8192)).await;
            }
            blob.resize(blob.num_clusters() + 1).await.unwrap();
            blob.close().await.unwrap();
        }
        store.delete_blob(ids[5]).await.unwrap();
        store.delete_blob(ids[8]).await.unwrap();
    };
    let dirty = crash_image(64 << 20, InitOptions::default(), build);
    let rt = runtime();
    let (_bdev, desc) = from_image(&dirty);
    let (clean_bdev, clean_desc) = from_image(&dirty);
    let describe = |store: Blobstore| async move {
        let mut out = Vec::new();
        let channel = store.channel().unwrap();
        for id in store.blob_ids() {
            let blob = store.open_blob(id).await.unwrap();
            let data = if blob.num_clusters() > 1 {
                read(&channel, &blob.io(), 3, 8192).await
            } else {
                Vec::new()
            };
            out.push((
                id,
                blob.num_clusters(),
                blob.is_thin(),
                blob.xattrs(),
                blob.cluster_map(),
                data,
            ));
            blob.close().await.unwrap();
        }
        (
            out,
            store.free_cluster_count(),
            store.used_md_pages(),
            store.used_clusters(),
        )
    };
    let recovered = run(&rt, move || async move {
        let (store, report) = Blobstore::load(desc, &LoadOptions::default())
            .await
            .unwrap();
        assert!(report.recovered);
        assert_eq!(store.blob_ids().len(), 10);
        let described = describe(store.clone()).await;
        store.unload().await.unwrap();
        described
    });
    // The same image, recovered then unloaded then loaded clean.
    run(&rt, move || async move {
        let (store, _) = Blobstore::load(clean_desc, &LoadOptions::default())
            .await
            .unwrap();
        store.unload().await.unwrap();
    });
    let (_b, desc) = from_image(&clean_bdev.snapshot());
    let clean = run(&rt, move || async move {
        let (store, report) = Blobstore::load(desc, &LoadOptions::default())
            .await
            .unwrap();
        assert!(!report.recovered);
        let described = describe(store.clone()).await;
        store.unload().await.unwrap();
        described
    });
    assert_eq!(recovered, clean);
    for (id, clusters, _, _, _, data) in &recovered.0 {
        if *clusters > 1 {
            assert_eq!(data, &pattern(*id, 8192), "blob {id:#x} data");
        }
    }
    rt.stop();
}

#[test]
fn an_interrupted_persist_keeps_the_previous_version_and_reclaims_orphans() {
    // New continuation pages written, root never: the old version loads, the orphan pages
    // are free again.
    let image = crash_image(32 << 20, InitOptions::default(), |store| async move {
        store
            .create_blob(&BlobOptions {
                xattrs: vec![("v".into(), b"1".to_vec())],
                ..BlobOptions::default()
            })
            .await
            .unwrap();
    });
    let mut image = image;
    // Fake an orphan continuation page of blob 0 at md page 9 (valid CRC, sequence 1).
    let orphan = spool_blob::format::md_page::encode_page(0x1_0000_0000, 1, u32::MAX, &[]);
    image[(4 + 9) * 4096..(4 + 10) * 4096].copy_from_slice(&orphan);
    let rt = runtime();
    let (_bdev, desc) = from_image(&image);
    run(&rt, move || async move {
        let (store, report) = Blobstore::load(desc, &LoadOptions::default())
            .await
            .unwrap();
        assert!(report.recovered);
        assert_eq!(store.used_md_pages(), vec![0]);
        let blob = store.open_blob(0x1_0000_0000).await.unwrap();
        assert_eq!(blob.xattr("v").unwrap(), b"1");
        blob.close().await.unwrap();
        store.unload().await.unwrap();
    });
    rt.stop();
}

#[test]
fn the_first_metadata_change_after_a_clean_load_clears_the_clean_flag_first() {
    let rt = runtime();
    let (bdev, desc) = malloc(32 << 20);
    let again = desc.clone();
    run(&rt, move || async move {
        let store = Blobstore::init(desc, &InitOptions::default())
            .await
            .unwrap();
        store.unload().await.unwrap();
    });
    let clean_flag = |image: &[u8]| u32::from_le_bytes(image[16..20].try_into().unwrap());
    assert_eq!(clean_flag(&bdev.snapshot()), 1);
    let probe = std::sync::Arc::clone(&bdev);
    run(&rt, move || async move {
        let (store, _) = Blobstore::load(again, &LoadOptions::default())
            .await
            .unwrap();
        assert_eq!(
            clean_flag(&probe.snapshot()),
            1,
            "a load alone writes nothing"
        );
        store.create_blob(&BlobOptions::default()).await.unwrap();
        assert_eq!(clean_flag(&probe.snapshot()), 0);
        store.unload().await.unwrap();
        assert_eq!(clean_flag(&probe.snapshot()), 1);
    });
    rt.stop();
}

#[test]
fn one_damaged_blob_does_not_stop_the_dirty_load() {
    // Issue 20: a blob whose extent page is unreadable is listed as damaged (and does not
    // open); the store loads and every other blob reads back exactly.
    let ids = std::sync::Arc::new(std::sync::Mutex::new((0u64, 0u64, 0u64, 0u32)));
    let shared = std::sync::Arc::clone(&ids);
    let mut image = crash_image(
        16 << 20,
        InitOptions {
            cluster_size: 64 << 10,
            ..InitOptions::default()
        },
        move |store| async move {
            let channel = store.channel().unwrap();
            let mut made = Vec::new();
            let mut extent_page = 0;
            for n in 0..3u64 {
                let before = store.used_md_pages();
                let id = create_thick(&store, 2).await;
                let root = id & 0xffff_ffff;
                if n == 1 {
                    extent_page = store
                        .used_md_pages()
                        .into_iter()
                        .find(|p| !before.contains(p) && *p != root)
                        .expect("a thick blob in table form has an extent page")
                        as u32;
                }
                let blob = store.open_blob(id).await.unwrap();
                write(&channel, &blob.io(), 0, &pattern(10 + n, 128 << 10)).await;
                blob.close().await.unwrap();
                made.push(id);
            }
            *shared.lock().unwrap() = (made[0], made[1], made[2], extent_page);
        },
    );
    let (a, damaged, c, extent_page) = *ids.lock().unwrap();
    // Break the damaged blob's extent page (its CRC no longer matches).
    let block = spool_blob::format::super_block::SuperBlock::decode(&image[..4096]).unwrap();
    let offset = ((u64::from(block.md_start) + u64::from(extent_page)) * 4096) as usize;
    image[offset + 100] ^= 0xff;
    let rt = runtime();
    let (_bdev, desc) = from_image(&image);
    run(&rt, move || async move {
        let (store, report) = Blobstore::load(desc, &LoadOptions::default())
            .await
            .unwrap_or_else(|err| panic!("one damaged blob made the store unloadable: {err}"));
        assert!(report.recovered);
        let listed = report
            .unreadable
            .iter()
            .find(|(id, _)| *id == damaged)
            .unwrap_or_else(|| panic!("damaged blob not listed: {:?}", report.unreadable));
        assert!(listed.1.contains("extent page"), "reason: {}", listed.1);
        assert!(store.blob_ids().contains(&damaged), "its id stays taken");
        let err = store.open_blob(damaged).await.unwrap_err();
        assert_eq!(err.errno(), -libc::EINVAL, "{err}");
        let channel = store.channel().unwrap();
        for (id, seed) in [(a, 10), (c, 12)] {
            let blob = store.open_blob(id).await.unwrap();
            let back = read(&channel, &blob.io(), 0, 128 << 10).await;
            assert!(back == pattern(seed, 128 << 10), "blob {id:#x} lost data");
            blob.close().await.unwrap();
        }
        // A new blob never takes the damaged blob's id.
        let fresh = create_thick(&store, 1).await;
        assert!(fresh != damaged && fresh != a && fresh != c);
        drop(channel);
        store.unload().await.unwrap();
    });
    rt.stop();
}
