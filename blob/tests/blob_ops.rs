//! Goal: blob operations follow SPDK's semantics and error codes (the seed's acceptance
//! scenarios), and what they store survives unload and load. Method: one reactor over a
//! malloc bdev; each scenario checks data, counts and errnos.

mod common;

use common::{create_thin, malloc, malloc_blocks, pattern, read, run, runtime, write};
use spool_blob::{BlobOptions, Blobstore, ExtentForm, InitOptions, LoadOptions};

fn thick(num_clusters: u64) -> BlobOptions {
    BlobOptions {
        num_clusters,
        ..BlobOptions::default()
    }
}

#[test]
fn geometry_round_trips_on_512_and_4096_byte_blocks() {
    let rt = runtime();
    for block in [512u32, 4096] {
        let (_bdev, desc) = malloc_blocks(32 << 20, block);
        let again = desc.clone();
        run(&rt, move || async move {
            let store = Blobstore::init(desc, &InitOptions::default())
                .await
                .unwrap();
            let before = (
                store.cluster_size(),
                store.page_size(),
                store.io_unit_size(),
                store.total_data_cluster_count(),
                store.free_cluster_count(),
            );
            assert_eq!(before.2, u64::from(block));
            assert_eq!(before.3, before.4, "all data clusters are free after init");
            store.unload().await.unwrap();
            let (store, _) = Blobstore::load(again, &LoadOptions::default())
                .await
                .unwrap();
            let after = (
                store.cluster_size(),
                store.page_size(),
                store.io_unit_size(),
                store.total_data_cluster_count(),
                store.free_cluster_count(),
            );
            assert_eq!(before, after);
            store.unload().await.unwrap();
        });
    }
    rt.stop();
}

#[test]
fn init_refuses_bad_options_with_the_documented_errno() {
    let rt = runtime();
    run(&rt, || async {
        let cases = [
            (
                InitOptions {
                    cluster_size: 2048,
                    ..InitOptions::default()
                },
                -libc::EINVAL,
            ),
            (
                InitOptions {
                    cluster_size: 0,
                    ..InitOptions::default()
                },
                -libc::EINVAL,
            ),
            (
                InitOptions {
                    cluster_size: 64 << 20,
                    ..InitOptions::default()
                },
                -libc::ENOSPC,
            ),
            (
                InitOptions {
                    md_pages: Some(1 << 20),
                    ..InitOptions::default()
                },
                -libc::ENOMEM,
            ),
            (
                InitOptions {
                    md_pages: Some(0),
                    ..InitOptions::default()
                },
                -libc::EINVAL,
            ),
        ];
        for (options, errno) in cases {
            let (_bdev, desc) = malloc(32 << 20);
            let err = Blobstore::init(desc, &options).await.err().unwrap();
            assert_eq!(err.errno(), errno, "{options:?}: {err}");
        }
    });
    rt.stop();
}

#[test]
fn clusters_are_conserved_across_create_resize_delete_and_reload() {
    let rt = runtime();
    let (_bdev, desc) = malloc(64 << 20);
    let again = desc.clone();
    let id = run(&rt, move || async move {
        let store = Blobstore::init(desc, &InitOptions::default())
            .await
            .unwrap();
        let total = store.free_cluster_count();
        let a = store.create_blob(&thick(10)).await.unwrap();
        assert_eq!(store.free_cluster_count(), total - 10);
        // Too large: -ENOSPC, and no md page or id leaks.
        let pages = store.used_md_pages();
        let err = store.create_blob(&thick(total)).await.unwrap_err();
        assert_eq!(err.errno(), -libc::ENOSPC);
        assert_eq!(store.used_md_pages(), pages);
        assert_eq!(store.blob_ids(), vec![a]);
        assert_eq!(store.free_cluster_count(), total - 10);
        // Resize: grow, shrink, grow before sync reuses; shrink releases only at sync.
        let blob = store.open_blob(a).await.unwrap();
        blob.resize(12).await.unwrap();
        assert_eq!(store.free_cluster_count(), total - 12);
        blob.resize(4).await.unwrap();
        assert_eq!(
            store.free_cluster_count(),
            total - 12,
            "released only once on disk"
        );
        blob.resize(6).await.unwrap();
        assert_eq!(
            store.free_cluster_count(),
            total - 12,
            "spare clusters reused"
        );
        blob.sync_md().await.unwrap();
        assert_eq!(store.free_cluster_count(), total - 6);
        assert_eq!(
            blob.resize(total + 1).await.unwrap_err().errno(),
            -libc::ENOSPC
        );
        assert_eq!(blob.num_clusters(), 6);
        assert_eq!(store.free_cluster_count(), total - 6);
        blob.close().await.unwrap();
        store.unload().await.unwrap();
        a
    });
    run(&rt, move || async move {
        let (store, _) = Blobstore::load(again, &LoadOptions::default())
            .await
            .unwrap();
        let total = store.total_data_cluster_count();
        assert_eq!(store.free_cluster_count(), total - 6);
        let blob = store.open_blob(id).await.unwrap();
        assert_eq!(blob.num_clusters(), 6);
        blob.close().await.unwrap();
        store.delete_blob(id).await.unwrap();
        assert_eq!(store.free_cluster_count(), total);
        assert!(store.used_md_pages().is_empty());
        assert_eq!(
            store.open_blob(id).await.unwrap_err().errno(),
            -libc::ENOENT
        );
        store.unload().await.unwrap();
    });
    rt.stop();
}

#[test]
fn open_close_and_delete_follow_spdk_refcounting() {
    let rt = runtime();
    let (_bdev, desc) = malloc(32 << 20);
    run(&rt, move || async move {
        let store = Blobstore::init(desc, &InitOptions::default())
            .await
            .unwrap();
        let id = store.create_blob(&thick(1)).await.unwrap();
        let first = store.open_blob(id).await.unwrap();
        let second = store.open_blob(id).await.unwrap();
        assert_eq!(
            store.open_blob_count(),
            1,
            "one in-memory blob however many opens"
        );
        // Concurrent opens of a blob still loading share it.
        let other = store.create_blob(&thick(1)).await.unwrap();
        let (x, y) = futures_join(store.open_blob(other), store.open_blob(other)).await;
        let (x, y) = (x.unwrap(), y.unwrap());
        assert_eq!(store.open_blob_count(), 2);
        x.close().await.unwrap();
        y.close().await.unwrap();
        assert_eq!(
            store.delete_blob(id).await.unwrap_err().errno(),
            -libc::EBUSY
        );
        let busy = store.clone().unload().await.unwrap_err();
        assert_eq!(busy.errno(), -libc::EBUSY);
        first.close().await.unwrap();
        assert_eq!(store.open_blob_count(), 1);
        second.close().await.unwrap();
        assert_eq!(store.open_blob_count(), 0);
        store.delete_blob(id).await.unwrap();
        assert_eq!(store.blob_ids(), vec![other]);
        store.unload().await.unwrap();
    });
    rt.stop();
}

/// Polls two futures to completion on this task.
async fn futures_join<A: std::future::Future, B: std::future::Future>(
    a: A,
    b: B,
) -> (A::Output, B::Output) {
    let mut a = Box::pin(a);
    let mut b = Box::pin(b);
    let mut out_a = None;
    let mut out_b = None;
    std::future::poll_fn(|cx| {
        if out_a.is_none() {
            if let std::task::Poll::Ready(v) = a.as_mut().poll(cx) {
                out_a = Some(v);
            }
        }
        if out_b.is_none() {
            if let std::task::Poll::Ready(v) = b.as_mut().poll(cx) {
                out_b = Some(v);
            }
        }
        if out_a.is_some() && out_b.is_some() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    (out_a.unwrap(), out_b.unwrap())
}

#[test]
fn xattrs_span_pages_round_trip_and_obey_read_only() {
    let rt = runtime();
    let (_bdev, desc) = malloc(32 << 20);
    let again = desc.clone();
    let id = run(&rt, move || async move {
        let store = Blobstore::init(desc, &InitOptions::default())
            .await
            .unwrap();
        let xattrs: Vec<(String, Vec<u8>)> = (0..100)
            .map(|i| (format!("key{i:03}"), pattern(i, 100 + i as usize)))
            .collect();
        let id = store
            .create_blob(&BlobOptions {
                xattrs,
                ..BlobOptions::default()
            })
            .await
            .unwrap();
        assert!(
            store.used_md_pages().len() >= 3,
            "100 xattrs span several md pages"
        );
        let blob = store.open_blob(id).await.unwrap();
        blob.remove_xattr("key050").unwrap();
        assert_eq!(
            blob.remove_xattr("key050").unwrap_err().errno(),
            -libc::ENOENT
        );
        blob.set_xattr("empty", b"").unwrap();
        blob.set_xattr("nul", b"a\0b").unwrap();
        let err = blob.set_xattr("huge", &vec![0; 4064]).unwrap_err();
        assert_eq!(err.errno(), -libc::EINVAL);
        blob.close().await.unwrap();
        store.unload().await.unwrap();
        id
    });
    run(&rt, move || async move {
        let (store, _) = Blobstore::load(again, &LoadOptions::default())
            .await
            .unwrap();
        let blob = store.open_blob(id).await.unwrap();
        let names = blob.xattr_names();
        assert_eq!(names.len(), 101);
        assert!(!names.contains(&"key050".to_string()));
        for i in (0..100).filter(|&i| i != 50) {
            assert_eq!(
                blob.xattr(&format!("key{i:03}")).unwrap(),
                pattern(i, 100 + i as usize)
            );
        }
        assert_eq!(blob.xattr("empty").unwrap(), b"");
        assert_eq!(blob.xattr("nul").unwrap(), b"a\0b");
        // set_read_only takes effect at sync.
        blob.set_read_only().unwrap();
        assert!(!blob.is_read_only());
        blob.set_xattr("still", b"ok").unwrap();
        blob.sync_md().await.unwrap();
        assert!(blob.is_read_only());
        assert_eq!(blob.set_xattr("k", b"v").unwrap_err().errno(), -libc::EPERM);
        assert_eq!(
            blob.remove_xattr("still").unwrap_err().errno(),
            -libc::EPERM
        );
        assert_eq!(blob.resize(3).await.unwrap_err().errno(), -libc::EPERM);
        blob.close().await.unwrap();
        let blob = store.open_blob(id).await.unwrap();
        assert!(blob.is_read_only(), "read-only persists");
        assert_eq!(blob.xattr("still").unwrap(), b"ok");
        blob.close().await.unwrap();
        store.unload().await.unwrap();
    });
    rt.stop();
}

#[test]
fn io_at_every_cluster_boundary_with_vectors_and_errors() {
    let rt = runtime();
    let (_bdev, desc) = malloc(32 << 20);
    run(&rt, move || async move {
        let store = Blobstore::init(
            desc,
            &InitOptions {
                cluster_size: 64 << 10,
                ..InitOptions::default()
            },
        )
        .await
        .unwrap();
        // A thin blob (so clusters are scattered) and a thick one (contiguous).
        for thin in [true, false] {
            let id = store
                .create_blob(&BlobOptions {
                    num_clusters: 8,
                    thin,
                    form: if thin {
                        ExtentForm::Table
                    } else {
                        ExtentForm::Rle
                    },
                    ..BlobOptions::default()
                })
                .await
                .unwrap();
            let blob = store.open_blob(id).await.unwrap();
            let io = blob.io();
            let channel = store.channel().unwrap();
            let units = io.num_io_units();
            assert_eq!(units, 8 * 16);
            let mut model = vec![0u8; 8 * (64 << 10)];
            // Within a cluster, spanning 2 and 3 clusters, ending exactly at the end.
            for (seed, (offset, len)) in [
                (15u64, 1usize),
                (15, 2),
                (31, 18),
                (0, 16),
                (127, 1),
                (100, 28),
            ]
            .into_iter()
            .enumerate()
            {
                let data = pattern(seed as u64 + 10, len * 4096);
                write(&channel, &io, offset, &data).await;
                model[offset as usize * 4096..offset as usize * 4096 + data.len()]
                    .copy_from_slice(&data);
            }
            // writev with odd splits across a boundary.
            let data = pattern(99, 5 * 4096);
            let bufs = vec![
                common::buf_of(&data[..4096 * 2]),
                common::buf_of(&data[4096 * 2..4096 * 5]),
            ];
            let (result, _) = channel.writev(&io, 14, bufs).await;
            result.unwrap();
            model[14 * 4096..19 * 4096].copy_from_slice(&data);
            assert!(read(&channel, &io, 0, model.len()).await == model);
            let bufs = vec![
                spool_bdev::DmaBuf::alloc(4096 * 3).unwrap(),
                spool_bdev::DmaBuf::alloc(4096 * 4).unwrap(),
            ];
            let (result, bufs) = channel.readv(&io, 13, bufs).await;
            result.unwrap();
            let flat: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            assert!(flat[..] == model[13 * 4096..20 * 4096]);
            // Past the end: -EINVAL; zero-length vectors at the end are fine.
            let (result, _) = channel
                .read(&io, units, spool_bdev::DmaBuf::alloc(4096).unwrap())
                .await;
            assert_eq!(result.unwrap_err().errno(), -libc::EINVAL);
            let (result, _) = channel
                .write(&io, units - 1, spool_bdev::DmaBuf::alloc(8192).unwrap())
                .await;
            assert_eq!(result.unwrap_err().errno(), -libc::EINVAL);
            let (result, _) = channel.readv(&io, units, Vec::new()).await;
            result.unwrap();
            // write_zeroes and unmap of ranges.
            channel.write_zeroes(&io, 16, 16).await.unwrap();
            model[16 * 4096..32 * 4096].fill(0);
            assert!(read(&channel, &io, 0, model.len()).await == model);
            drop(channel);
            blob.close().await.unwrap();
        }
        store.unload().await.unwrap();
    });
    rt.stop();
}

#[test]
fn thin_blob_unmap_does_not_allocate_but_write_zeroes_does() {
    let rt = runtime();
    let (_bdev, desc) = malloc(32 << 20);
    run(&rt, move || async move {
        let store = Blobstore::init(desc, &InitOptions::default())
            .await
            .unwrap();
        let free = store.free_cluster_count();
        let id = create_thin(&store, 4).await;
        assert_eq!(
            store.free_cluster_count(),
            free,
            "a thin blob claims nothing at create"
        );
        let blob = store.open_blob(id).await.unwrap();
        let channel = store.channel().unwrap();
        channel.unmap(&blob.io(), 0, 256).await.unwrap();
        assert_eq!(blob.num_allocated_clusters(), 0);
        channel.write_zeroes(&blob.io(), 256, 1).await.unwrap();
        assert_eq!(blob.num_allocated_clusters(), 1);
        assert_eq!(store.free_cluster_count(), free - 1);
        // Grows without allocating.
        blob.resize(100).await.unwrap();
        assert_eq!(store.free_cluster_count(), free - 1);
        drop(channel);
        blob.close().await.unwrap();
        store.unload().await.unwrap();
    });
    rt.stop();
}

#[test]
fn a_full_store_fails_thin_writes_with_enospc_and_recovers_when_space_is_freed() {
    let rt = runtime();
    let (_bdev, desc) = malloc(16 << 20);
    run(&rt, move || async move {
        let store = Blobstore::init(desc, &InitOptions::default())
            .await
            .unwrap();
        let free = store.free_cluster_count();
        let thin = create_thin(&store, 4).await;
        let filler = store.create_blob(&thick(free)).await.unwrap();
        assert_eq!(store.free_cluster_count(), 0);
        let blob = store.open_blob(thin).await.unwrap();
        let channel = store.channel().unwrap();
        let (result, _) = channel
            .write(&blob.io(), 0, common::buf_of(&pattern(1, 4096)))
            .await;
        assert_eq!(result.unwrap_err().errno(), -libc::ENOSPC);
        assert_eq!(blob.num_allocated_clusters(), 0);
        store.delete_blob(filler).await.unwrap();
        write(&channel, &blob.io(), 0, &pattern(1, 4096)).await;
        assert_eq!(read(&channel, &blob.io(), 0, 4096).await, pattern(1, 4096));
        drop(channel);
        blob.close().await.unwrap();
        store.unload().await.unwrap();
    });
    rt.stop();
}

#[test]
fn super_blob_persists_immediately_and_destroy_wipes_the_store() {
    let rt = runtime();
    let (bdev, desc) = malloc(32 << 20);
    let id = run(&rt, move || async move {
        let store = Blobstore::init(desc, &InitOptions::default())
            .await
            .unwrap();
        assert_eq!(store.get_super().unwrap_err().errno(), -libc::ENOENT);
        let id = store.create_blob(&thick(1)).await.unwrap();
        store.set_super(id).await.unwrap();
        std::mem::forget(store); // crash: no unload
        id
    });
    let (_copy, desc) = common::from_image(&bdev.snapshot());
    let again = desc.clone();
    run(&rt, move || async move {
        let (store, report) = Blobstore::load(desc, &LoadOptions::default())
            .await
            .unwrap();
        assert!(report.recovered);
        assert_eq!(store.get_super().unwrap(), id);
        store.destroy().await.unwrap();
        let err = Blobstore::load(again, &LoadOptions::default())
            .await
            .err()
            .unwrap();
        assert_eq!(err.errno(), -libc::EILSEQ);
    });
    rt.stop();
}

thread_local! {
    static STASH: std::cell::RefCell<Option<Blobstore>> = const { std::cell::RefCell::new(None) };
}

#[test]
fn io_runs_on_any_reactor_and_metadata_calls_elsewhere_are_refused() {
    // Two reactors stepped by one thread: a Blobstore (not Send) can reach reactor 1 only
    // through a thread-local, which is exactly the misuse the check exists for.
    let mut sim = spool_reactor::Sim::new(spool_reactor::SimOptions {
        seed: 7,
        reactors: 2,
    });
    let reactors = sim.reactors();
    let (_bdev, desc) = malloc(32 << 20);
    let other = reactors[1];
    sim.block_on(reactors[0], move || async move {
        let store = Blobstore::init(desc, &InitOptions::default())
            .await
            .unwrap();
        let id = store.create_blob(&thick(2)).await.unwrap();
        let blob = store.open_blob(id).await.unwrap();
        let io = blob.io();
        let data = pattern(5, 8192);
        let expected = data.clone();
        let io2 = io.clone();
        let back = spool_reactor::spawn_on(other, move || async move {
            let channel = io2.channel().unwrap();
            write(&channel, &io2, 3, &data).await;
            read(&channel, &io2, 3, 8192).await
        })
        .unwrap()
        .await
        .unwrap();
        assert_eq!(back, expected);
        STASH.with(|stash| *stash.borrow_mut() = Some(store.clone()));
        let errno = spool_reactor::spawn_on(other, move || async move {
            let store = STASH.with(|stash| stash.borrow_mut().take()).unwrap();
            let err = store.create_blob(&thick(1)).await.unwrap_err();
            assert!(err.to_string().contains("metadata"), "{err}");
            err.errno()
        })
        .unwrap()
        .await
        .unwrap();
        assert_eq!(errno, -libc::EPERM);
        blob.close().await.unwrap();
        store.unload().await.unwrap();
    })
    .unwrap();
    sim.stop();
}

#[test]
fn a_thin_write_never_shows_a_deleted_blobs_data() {
    // A cluster freed by a delete is reused by a thin blob: the rest of it reads zeros, both
    // in the same session (the freed cluster was unmapped) and after a reload (nothing is
    // known about free clusters then, so the new cluster is zero-filled).
    let rt = runtime();
    let (bdev, desc) = malloc(16 << 20);
    run(&rt, move || async move {
        let store = Blobstore::init(desc, &InitOptions::default())
            .await
            .unwrap();
        let channel = store.channel().unwrap();
        for round in 0..2 {
            let free = store.free_cluster_count();
            let old = store.create_blob(&thick(free)).await.unwrap();
            let blob = store.open_blob(old).await.unwrap();
            for cluster in 0..free {
                write(&channel, &blob.io(), cluster * 256, &vec![0xEE; 1 << 20]).await;
            }
            blob.close().await.unwrap();
            store.delete_blob(old).await.unwrap();
            let thin = create_thin(&store, 2).await;
            let blob = store.open_blob(thin).await.unwrap();
            write(&channel, &blob.io(), 256 + 7, &pattern(round, 4096)).await;
            let back = read(&channel, &blob.io(), 256, 1 << 20).await;
            assert!(
                back[..7 * 4096].iter().all(|&b| b == 0),
                "round {round}: stale data before"
            );
            assert!(
                back[8 * 4096..].iter().all(|&b| b == 0),
                "round {round}: stale data after"
            );
            blob.close().await.unwrap();
            store.delete_blob(thin).await.unwrap();
        }
        drop(channel);
        store.unload().await.unwrap();
    });
    // After a load nothing is known about free clusters: put stale bytes in all of them
    // (as a crash or another tool could leave) and check the new cluster is zero-filled.
    let mut image = bdev.snapshot();
    let md_end = 1 << 20; // one metadata cluster on this 16 MiB store
    image[md_end..].fill(0xEE);
    let (_copy, desc) = common::from_image(&image);
    run(&rt, move || async move {
        let (store, _) = Blobstore::load(desc, &LoadOptions::default())
            .await
            .unwrap();
        let channel = store.channel().unwrap();
        let thin = create_thin(&store, 2).await;
        let blob = store.open_blob(thin).await.unwrap();
        write(&channel, &blob.io(), 3, &pattern(9, 4096)).await;
        let back = read(&channel, &blob.io(), 0, 1 << 20).await;
        assert!(
            back[..3 * 4096].iter().all(|&b| b == 0),
            "stale bytes before the write"
        );
        assert!(
            back[4 * 4096..].iter().all(|&b| b == 0),
            "stale bytes after the write"
        );
        drop(channel);
        blob.close().await.unwrap();
        store.unload().await.unwrap();
    });
    rt.stop();
}
