//! Goal: the blobstore's lifecycle and blob operations keep exactly what was stored, with
//! SPDK's error codes. Method: a malloc bdev on one real reactor; patterns written, read
//! back after unload and load; every documented errno provoked.

mod common;

use std::sync::Arc;

use common::{buf_of, malloc_blocks as device, pattern, runtime};
use spool_bdev::{Bdev, BdevDesc, DmaBuf, MallocBdev};
use spool_blob::{BlobOptions, Blobstore, ExtentForm, InitOptions, LoadOptions};

#[test]
fn data_and_xattrs_survive_unload_and_load() {
    let rt = runtime();
    let reactor = rt.reactors()[0];
    let (_bdev, desc) = device(64 << 20, 4096);
    let load_desc = desc.clone();
    let id = rt
        .block_on(reactor, move || async move {
            let store = Blobstore::init(desc, &InitOptions::default())
                .await
                .unwrap();
            assert_eq!(store.total_data_cluster_count(), 63);
            assert_eq!(store.free_cluster_count(), 63);
            let id = store
                .create_blob(&BlobOptions {
                    num_clusters: 4,
                    xattrs: vec![("name".into(), b"hello\0".to_vec())],
                    ..BlobOptions::default()
                })
                .await
                .unwrap();
            assert_eq!(id, 0x1_0000_0000);
            assert_eq!(store.free_cluster_count(), 59);
            let blob = store.open_blob(id).await.unwrap();
            let channel = store.channel().unwrap();
            let data = pattern(7, 3 << 20);
            // 3 MiB starting half a cluster in: crosses clusters.
            let (result, _) = channel.write(&blob.io(), 128, buf_of(&data)).await;
            result.unwrap();
            let (result, back) = channel
                .read(&blob.io(), 128, DmaBuf::alloc(3 << 20).unwrap())
                .await;
            result.unwrap();
            assert!(back[..] == data[..]);
            blob.set_xattr("color", b"blue").unwrap();
            blob.close().await.unwrap();
            store.unload().await.unwrap();
            id
        })
        .unwrap();
    rt.block_on(reactor, move || async move {
        let (store, report) = Blobstore::load(load_desc, &LoadOptions::default())
            .await
            .unwrap();
        assert!(!report.recovered);
        assert_eq!(store.blob_ids(), vec![id]);
        assert_eq!(store.free_cluster_count(), 59);
        let blob = store.open_blob(id).await.unwrap();
        assert_eq!(blob.num_clusters(), 4);
        assert_eq!(blob.xattr("name").unwrap(), b"hello\0");
        assert_eq!(blob.xattr("color").unwrap(), b"blue");
        let channel = store.channel().unwrap();
        let (result, back) = channel
            .read(&blob.io(), 128, DmaBuf::alloc(3 << 20).unwrap())
            .await;
        result.unwrap();
        assert!(back[..] == pattern(7, 3 << 20)[..]);
        blob.close().await.unwrap();
        store.unload().await.unwrap();
    })
    .unwrap();
    rt.stop();
}

#[test]
fn thin_blobs_allocate_on_first_write_and_recover_after_a_crash() {
    let rt = runtime();
    let reactor = rt.reactors()[0];
    let (bdev, desc) = device(32 << 20, 4096);
    rt.block_on(reactor, move || async move {
        let store = Blobstore::init(desc, &InitOptions::default())
            .await
            .unwrap();
        let free = store.free_cluster_count();
        for form in [ExtentForm::Table, ExtentForm::Rle] {
            let id = store
                .create_blob(&BlobOptions {
                    num_clusters: 8,
                    thin: true,
                    form,
                    ..BlobOptions::default()
                })
                .await
                .unwrap();
            let blob = store.open_blob(id).await.unwrap();
            let channel = store.channel().unwrap();
            let (result, back) = channel
                .read(&blob.io(), 0, DmaBuf::alloc(8192).unwrap())
                .await;
            result.unwrap();
            assert!(back.iter().all(|&b| b == 0));
            let (result, _) = channel
                .write(&blob.io(), 256 * 2 + 5, buf_of(&pattern(3, 4096)))
                .await;
            result.unwrap();
            assert_eq!(blob.num_allocated_clusters(), 1);
            let (result, back) = channel
                .read(&blob.io(), 256 * 2, DmaBuf::alloc(1 << 20).unwrap())
                .await;
            result.unwrap();
            assert!(back[..5 * 4096].iter().all(|&b| b == 0));
            assert!(back[5 * 4096..6 * 4096] == pattern(3, 4096)[..]);
            assert!(back[6 * 4096..].iter().all(|&b| b == 0));
            blob.close().await.unwrap();
        }
        assert_eq!(store.free_cluster_count(), free - 2);
        // No unload: the super block stays dirty.
        std::mem::forget(store);
    })
    .unwrap();
    let image = bdev.snapshot();
    let (_bdev2, desc2) = device(32 << 20, 4096);
    let _ = _bdev2;
    let bdev3 = Arc::new(MallocBdev::from_image("copy", 4096, &image).unwrap());
    let desc3 = BdevDesc::open(Arc::clone(&bdev3) as Arc<dyn Bdev>).expect("open bdev");
    drop(desc2);
    rt.block_on(reactor, move || async move {
        let (store, report) = Blobstore::load(desc3, &LoadOptions::default())
            .await
            .unwrap();
        assert!(report.recovered);
        assert_eq!(store.blob_ids().len(), 2);
        for id in store.blob_ids() {
            let blob = store.open_blob(id).await.unwrap();
            assert_eq!(blob.num_allocated_clusters(), 1);
            let channel = store.channel().unwrap();
            let (result, back) = channel
                .read(&blob.io(), 256 * 2 + 5, DmaBuf::alloc(4096).unwrap())
                .await;
            result.unwrap();
            assert!(back[..] == pattern(3, 4096)[..]);
            blob.close().await.unwrap();
        }
        assert_eq!(
            store.free_cluster_count(),
            store.total_data_cluster_count() - 2
        );
        store.unload().await.unwrap();
    })
    .unwrap();
    rt.stop();
}
