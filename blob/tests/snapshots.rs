//! Goal: snapshots and clones keep every byte where SPDK's semantics put it: a snapshot holds
//! its blob's content at the freeze point, later writes land in the blob, clones read their
//! snapshot until written, and all of it survives unload, load and a crash. Method: patterns
//! per cluster at every level of a chain, read back and compared with a model; error codes of
//! the refused cases; load-time repair of a snapshot a crash interrupted.

mod common;

use common::{create_thick, create_thin, from_image, malloc, pattern, read, run, runtime, write};
use spool_blob::{BlobOptions, Blobstore, InitOptions, LoadOptions};

const CLUSTER: usize = 1 << 20;
const UNITS: u64 = 256; // io_units per 1 MiB cluster

#[test]
fn snapshot_of_a_thick_blob_keeps_the_old_data_and_the_blob_writes_on() {
    let rt = runtime();
    let (_bdev, desc) = malloc(64 << 20);
    let again = desc.clone();
    let ids = run(&rt, move || async move {
        let store = Blobstore::init(desc, &InitOptions::default())
            .await
            .unwrap();
        let id = create_thick(&store, 4).await;
        let blob = store.open_blob(id).await.unwrap();
        let channel = store.channel().unwrap();
        write(&channel, &blob.io(), 0, &pattern(1, 4 * CLUSTER)).await;
        let free = store.free_cluster_count();
        let snap = store
            .create_snapshot(id, &[("name".into(), b"snap0".to_vec())])
            .await
            .unwrap();
        assert_eq!(
            store.free_cluster_count(),
            free,
            "a snapshot claims no clusters"
        );
        assert!(blob.is_thin() && blob.is_clone());
        assert_eq!(blob.parent_id(), Some(snap));
        assert_eq!(blob.num_allocated_clusters(), 0);
        assert_eq!(store.clones_of(snap), vec![id]);
        assert!(store.is_snapshot(snap));
        // The blob reads the snapshot's data; a write copies one cluster.
        assert!(read(&channel, &blob.io(), 0, 4 * CLUSTER).await == pattern(1, 4 * CLUSTER));
        write(&channel, &blob.io(), UNITS + 3, &pattern(2, 4096)).await;
        assert_eq!(blob.num_allocated_clusters(), 1);
        assert_eq!(store.free_cluster_count(), free - 1);
        let s = store.open_blob(snap).await.unwrap();
        assert!(s.is_read_only());
        assert_eq!(s.xattr("name").unwrap(), b"snap0");
        assert!(read(&channel, &s.io(), 0, 4 * CLUSTER).await == pattern(1, 4 * CLUSTER));
        let (result, _) = channel
            .write(&s.io(), 0, common::buf_of(&pattern(3, 4096)))
            .await;
        assert_eq!(result.unwrap_err().errno(), -libc::EPERM);
        // Refused: a snapshot of a read-only blob, a clone of a writable one, deleting a
        // snapshot with clones... (one clone merges; see the delete test).
        assert_eq!(
            store.create_snapshot(snap, &[]).await.unwrap_err().errno(),
            -libc::EINVAL
        );
        assert_eq!(
            store.create_clone(id, &[]).await.unwrap_err().errno(),
            -libc::EINVAL
        );
        s.close().await.unwrap();
        drop(channel);
        blob.close().await.unwrap();
        store.unload().await.unwrap();
        (id, snap)
    });
    run(&rt, move || async move {
        let (id, snap) = ids;
        let (store, _) = Blobstore::load(again, &LoadOptions::default())
            .await
            .unwrap();
        assert_eq!(store.parent_of(id), Some(snap));
        assert_eq!(store.clones_of(snap), vec![id]);
        let blob = store.open_blob(id).await.unwrap();
        let channel = store.channel().unwrap();
        let mut expected = pattern(1, 4 * CLUSTER);
        expected[CLUSTER + 3 * 4096..CLUSTER + 4 * 4096].copy_from_slice(&pattern(2, 4096));
        assert!(read(&channel, &blob.io(), 0, 4 * CLUSTER).await == expected);
        let s = store.open_blob(snap).await.unwrap();
        assert!(read(&channel, &s.io(), 0, 4 * CLUSTER).await == pattern(1, 4 * CLUSTER));
        s.close().await.unwrap();
        drop(channel);
        blob.close().await.unwrap();
        store.unload().await.unwrap();
    });
    rt.stop();
}

#[test]
fn a_chain_of_depth_three_reads_through_every_level_after_reload_and_recovery() {
    // S1 <- S2 <- C (snapshot of a clone of a snapshot), data written at every level.
    let rt = runtime();
    let (bdev, desc) = malloc(64 << 20);
    let again = desc.clone();
    let (ids, model) = run(&rt, move || async move {
        let store = Blobstore::init(desc, &InitOptions::default())
            .await
            .unwrap();
        let channel = store.channel().unwrap();
        let base = create_thin(&store, 4).await;
        let b = store.open_blob(base).await.unwrap();
        let mut model = vec![0u8; 4 * CLUSTER];
        for (cluster, seed) in [(0usize, 10u64), (1, 11)] {
            let data = pattern(seed, CLUSTER);
            write(&channel, &b.io(), cluster as u64 * UNITS, &data).await;
            model[cluster * CLUSTER..(cluster + 1) * CLUSTER].copy_from_slice(&data);
        }
        let s1 = store.create_snapshot(base, &[]).await.unwrap();
        let s1_model = model.clone();
        b.close().await.unwrap();
        let c = store.create_clone(s1, &[]).await.unwrap();
        let cb = store.open_blob(c).await.unwrap();
        // Overlapping (cluster 1) and new (cluster 2) writes in the clone.
        for (unit, seed) in [(UNITS + 10, 20u64), (2 * UNITS, 21)] {
            let data = pattern(seed, 8192);
            write(&channel, &cb.io(), unit, &data).await;
            let at = unit as usize * 4096;
            model[at..at + 8192].copy_from_slice(&data);
        }
        let s2 = store.create_snapshot(c, &[]).await.unwrap();
        let s2_model = model.clone();
        // And in C after its snapshot: cluster 0 (from S1) and 3 (never written).
        for (unit, seed) in [(5u64, 30u64), (3 * UNITS + 1, 31)] {
            let data = pattern(seed, 4096);
            write(&channel, &cb.io(), unit, &data).await;
            let at = unit as usize * 4096;
            model[at..at + 4096].copy_from_slice(&data);
        }
        assert_eq!(store.parent_of(c), Some(s2));
        assert_eq!(store.parent_of(s2), Some(s1));
        assert_eq!(store.clones_of(s1), vec![base, s2]);
        assert!(read(&channel, &cb.io(), 0, 4 * CLUSTER).await == model);
        cb.close().await.unwrap();
        drop(channel);
        std::mem::forget(store); // crash: no unload
        ((base, s1, c, s2), (s1_model, s2_model, model))
    });
    let check = move |desc, recovered: bool| {
        let (ids, models) = (ids, models_clone(&model));
        async move {
            let (base, s1, c, s2) = ids;
            let (s1_model, s2_model, c_model) = models;
            let (store, report) = Blobstore::load(desc, &LoadOptions::default())
                .await
                .unwrap();
            assert_eq!(report.recovered, recovered);
            let channel = store.channel().unwrap();
            for (id, expected) in [
                (s1, &s1_model),
                (base, &s1_model),
                (s2, &s2_model),
                (c, &c_model),
            ] {
                let blob = store.open_blob(id).await.unwrap();
                let back = read(&channel, &blob.io(), 0, 4 * CLUSTER).await;
                assert!(&back == expected, "blob {id:#x}");
                blob.close().await.unwrap();
            }
            assert_eq!(store.parent_of(c), Some(s2));
            assert_eq!(store.parent_of(s2), Some(s1));
            assert_eq!(store.parent_of(base), Some(s1));
            drop(channel);
            store.unload().await.unwrap();
        }
    };
    let (_copy, crashed) = from_image(&bdev.snapshot());
    let first = check.clone();
    run(&rt, move || first(crashed, true));
    let _ = again;
    rt.stop();
}

fn models_clone(model: &(Vec<u8>, Vec<u8>, Vec<u8>)) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    model.clone()
}

#[test]
fn an_interrupted_snapshot_is_repaired_at_load() {
    // Crash after the snapshot took the clusters but before the original was rewritten:
    // simulated by creating the SNAPTMP blob by hand with the original's clusters.
    let rt = runtime();
    let (bdev, desc) = malloc(32 << 20);
    let (orig, pending) = run(&rt, move || async move {
        let store = Blobstore::init(desc, &InitOptions::default())
            .await
            .unwrap();
        let orig = create_thick(&store, 2).await;
        let blob = store.open_blob(orig).await.unwrap();
        let channel = store.channel().unwrap();
        write(&channel, &blob.io(), 0, &pattern(4, 2 * CLUSTER)).await;
        drop(channel);
        blob.close().await.unwrap();
        // A pending snapshot that never took anything (step 1 done, crash).
        let pending = store
            .create_blob(&BlobOptions {
                thin: true,
                internal_xattrs: vec![("SNAPTMP".into(), orig.to_le_bytes().to_vec())],
                ..BlobOptions::default()
            })
            .await
            .unwrap();
        std::mem::forget(store);
        (orig, pending)
    });
    let (_copy, desc) = from_image(&bdev.snapshot());
    run(&rt, move || async move {
        let (store, report) = Blobstore::load(desc, &LoadOptions::default())
            .await
            .unwrap();
        assert_eq!(report.repaired.len(), 1, "{:?}", report.repaired);
        assert_eq!(
            store.blob_ids(),
            vec![orig],
            "the half-made snapshot is gone"
        );
        let blob = store.open_blob(orig).await.unwrap();
        let channel = store.channel().unwrap();
        assert!(read(&channel, &blob.io(), 0, 2 * CLUSTER).await == pattern(4, 2 * CLUSTER));
        assert_eq!(blob.num_allocated_clusters(), 2);
        drop(channel);
        blob.close().await.unwrap();
        assert_eq!(
            store.free_cluster_count(),
            store.total_data_cluster_count() - 2
        );
        let _ = pending;
        store.unload().await.unwrap();
    });
    rt.stop();
}

#[test]
fn inflate_and_decouple_keep_the_data_and_rewire_the_chain() {
    let rt = runtime();
    let (_bdev, desc) = malloc(64 << 20);
    let again = desc.clone();
    let ids = run(&rt, move || async move {
        let store = Blobstore::init(desc, &InitOptions::default())
            .await
            .unwrap();
        let channel = store.channel().unwrap();
        let base = create_thin(&store, 3).await;
        let b = store.open_blob(base).await.unwrap();
        write(&channel, &b.io(), 0, &pattern(1, CLUSTER)).await; // cluster 0 in S1
        let s1 = store.create_snapshot(base, &[]).await.unwrap();
        write(&channel, &b.io(), UNITS, &pattern(2, CLUSTER)).await; // cluster 1 in S2
        let s2 = store.create_snapshot(base, &[]).await.unwrap();
        write(&channel, &b.io(), 2 * UNITS, &pattern(3, 4096)).await; // cluster 2 in base
        let mut expected = vec![0u8; 3 * CLUSTER];
        expected[..CLUSTER].copy_from_slice(&pattern(1, CLUSTER));
        expected[CLUSTER..2 * CLUSTER].copy_from_slice(&pattern(2, CLUSTER));
        expected[2 * CLUSTER..2 * CLUSTER + 4096].copy_from_slice(&pattern(3, 4096));
        assert!(read(&channel, &b.io(), 0, 3 * CLUSTER).await == expected);
        // Errors first: decouple of a blob without a parent; inflate of a thick one is a no-op.
        assert_eq!(
            store.decouple_parent(s1).await.unwrap_err().errno(),
            -libc::EINVAL
        );
        // Decouple base from S2: copies cluster 1 only, parent becomes S1.
        assert_eq!(b.num_allocated_clusters(), 1);
        store.decouple_parent(base).await.unwrap();
        assert_eq!(b.num_allocated_clusters(), 2);
        assert_eq!(b.parent_id(), Some(s1));
        assert_eq!(store.parent_of(base), Some(s1));
        assert!(store.clones_of(s2).is_empty());
        assert!(b.is_thin());
        assert!(read(&channel, &b.io(), 0, 3 * CLUSTER).await == expected);
        // S2 has no clone left: deletable.
        store.delete_blob(s2).await.unwrap();
        // Inflate: everything allocated, no parent, thick.
        let free = store.free_cluster_count();
        store.inflate_blob(base).await.unwrap();
        assert_eq!(store.free_cluster_count(), free - 1);
        assert_eq!(b.num_allocated_clusters(), 3);
        assert!(!b.is_thin() && !b.is_clone());
        assert!(read(&channel, &b.io(), 0, 3 * CLUSTER).await == expected);
        assert!(!store.is_snapshot(s1));
        store.inflate_blob(base).await.unwrap(); // thick: no-op
        drop(channel);
        b.close().await.unwrap();
        store.unload().await.unwrap();
        (base, s1, expected)
    });
    run(&rt, move || async move {
        let (base, s1, expected) = ids;
        let (store, _) = Blobstore::load(again, &LoadOptions::default())
            .await
            .unwrap();
        assert_eq!(
            store.blob_ids(),
            vec![base, s1]
                .into_iter()
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>()
        );
        assert_eq!(store.parent_of(base), None);
        let b = store.open_blob(base).await.unwrap();
        assert!(!b.is_thin());
        let channel = store.channel().unwrap();
        assert!(read(&channel, &b.io(), 0, 3 * CLUSTER).await == expected);
        drop(channel);
        b.close().await.unwrap();
        store.delete_blob(s1).await.unwrap();
        store.unload().await.unwrap();
    });
    rt.stop();
}

#[test]
fn deleting_a_snapshot_with_one_clone_merges_it_into_the_clone() {
    let rt = runtime();
    let (bdev, desc) = malloc(64 << 20);
    let again = desc.clone();
    let (c, s1, expected) = run(&rt, move || async move {
        let store = Blobstore::init(desc, &InitOptions::default())
            .await
            .unwrap();
        let channel = store.channel().unwrap();
        let c = create_thin(&store, 3).await;
        let b = store.open_blob(c).await.unwrap();
        write(&channel, &b.io(), 0, &pattern(1, CLUSTER)).await;
        let s1 = store.create_snapshot(c, &[]).await.unwrap();
        write(&channel, &b.io(), UNITS, &pattern(2, CLUSTER)).await;
        let s2 = store.create_snapshot(c, &[]).await.unwrap();
        write(&channel, &b.io(), 5, &pattern(3, 4096)).await; // overrides S1's cluster 0 in C
        let mut expected = vec![0u8; 3 * CLUSTER];
        expected[..CLUSTER].copy_from_slice(&pattern(1, CLUSTER));
        expected[CLUSTER..2 * CLUSTER].copy_from_slice(&pattern(2, CLUSTER));
        expected[5 * 4096..6 * 4096].copy_from_slice(&pattern(3, 4096));
        let used_before = store.free_cluster_count();
        // S2 has one clone (C): deleting it merges its cluster 1 into C; C's parent is S1.
        b.close().await.unwrap();
        store.delete_blob(s2).await.unwrap();
        assert_eq!(
            store.free_cluster_count(),
            used_before,
            "the merged cluster moved, none freed"
        );
        assert_eq!(store.parent_of(c), Some(s1));
        assert_eq!(store.clones_of(s1), vec![c]);
        assert!(!store.blob_ids().contains(&s2));
        let b = store.open_blob(c).await.unwrap();
        assert_eq!(b.num_allocated_clusters(), 2);
        assert!(read(&channel, &b.io(), 0, 3 * CLUSTER).await == expected);
        b.close().await.unwrap();
        drop(channel);
        store.unload().await.unwrap();
        (c, s1, expected)
    });
    let _ = bdev;
    run(&rt, move || async move {
        let (store, _) = Blobstore::load(again, &LoadOptions::default())
            .await
            .unwrap();
        assert_eq!(store.parent_of(c), Some(s1));
        // S1, one clone: merged too; C then owns all its data and has no parent.
        let free = store.free_cluster_count();
        store.delete_blob(s1).await.unwrap();
        assert_eq!(
            store.free_cluster_count(),
            free + 1,
            "C had its own cluster 0: S1's is freed"
        );
        assert_eq!(store.blob_ids(), vec![c]);
        let b = store.open_blob(c).await.unwrap();
        assert!(!b.is_clone());
        let channel = store.channel().unwrap();
        assert!(read(&channel, &b.io(), 0, 3 * CLUSTER).await == expected);
        drop(channel);
        b.close().await.unwrap();
        store.unload().await.unwrap();
    });
    rt.stop();
}

/// Deleting a snapshot merges it into its one clone while that clone stays open and is
/// written (an exported lvol, as SPDK merges into an open lvol bdev): no -EBUSY, the writes
/// issued during the merge land, the open handle reads everything right after, and the
/// store reloads the same.
#[test]
fn a_snapshot_merges_into_its_clone_while_the_clone_is_open_and_written() {
    let rt = runtime();
    let (bdev, desc) = malloc(64 << 20);
    let again = desc.clone();
    let (c, expected) = run(&rt, move || async move {
        let store = Blobstore::init(desc, &InitOptions::default())
            .await
            .unwrap();
        let channel = store.channel().unwrap();
        let c = create_thin(&store, 3).await;
        let b = store.open_blob(c).await.unwrap();
        write(&channel, &b.io(), 0, &pattern(1, 2 * CLUSTER)).await;
        let s = store.create_snapshot(c, &[]).await.unwrap();
        // The clone's handle stays open; a writer rewrites a block of cluster 1 (which only
        // the snapshot owns until the first write) while the delete runs.
        let writing = {
            let (channel, io) = (store.channel().unwrap(), b.io());
            spool_reactor::spawn_local(async move {
                for round in 0..64u64 {
                    write(&channel, &io, UNITS + 7, &pattern(10 + round, 4096)).await;
                }
            })
        };
        store.delete_blob(s).await.unwrap();
        writing.await.unwrap();
        assert!(!store.blob_ids().contains(&s));
        assert_eq!(store.parent_of(c), None);
        assert!(!b.is_clone());
        let mut expected = pattern(1, 2 * CLUSTER);
        expected.resize(3 * CLUSTER, 0);
        let at = (UNITS as usize + 7) * 4096;
        expected[at..at + 4096].copy_from_slice(&pattern(10 + 63, 4096));
        assert!(read(&channel, &b.io(), 0, 3 * CLUSTER).await == expected);
        write(&channel, &b.io(), 2 * UNITS, &pattern(9, 4096)).await;
        expected[2 * CLUSTER..2 * CLUSTER + 4096].copy_from_slice(&pattern(9, 4096));
        assert!(read(&channel, &b.io(), 0, 3 * CLUSTER).await == expected);
        b.close().await.unwrap();
        drop(channel);
        store.unload().await.unwrap();
        (c, expected)
    });
    let _ = bdev;
    run(&rt, move || async move {
        let (store, _) = Blobstore::load(again, &LoadOptions::default())
            .await
            .unwrap();
        assert_eq!(store.blob_ids(), vec![c]);
        let b = store.open_blob(c).await.unwrap();
        let channel = store.channel().unwrap();
        assert!(read(&channel, &b.io(), 0, 3 * CLUSTER).await == expected);
        assert_eq!(b.num_allocated_clusters(), 3);
        drop(channel);
        b.close().await.unwrap();
        store.unload().await.unwrap();
    });
    rt.stop();
}

#[test]
fn an_interrupted_merge_is_undone_at_load_when_the_clone_was_not_rewritten() {
    let rt = runtime();
    let (bdev, desc) = malloc(32 << 20);
    let (c, s) = run(&rt, move || async move {
        let store = Blobstore::init(desc, &InitOptions::default())
            .await
            .unwrap();
        let channel = store.channel().unwrap();
        let c = create_thin(&store, 2).await;
        let b = store.open_blob(c).await.unwrap();
        write(&channel, &b.io(), 0, &pattern(8, 2 * CLUSTER)).await;
        drop(channel);
        b.close().await.unwrap();
        let s = store.create_snapshot(c, &[]).await.unwrap();
        // Crash right after the snapshot was marked for removal.
        let snap = store.open_blob(s).await.unwrap();
        snap.set_internal_xattr_unchecked("SNAPRM", &c.to_le_bytes())
            .await;
        snap.close().await.unwrap();
        std::mem::forget(store);
        (c, s)
    });
    let (_copy, desc) = from_image(&bdev.snapshot());
    run(&rt, move || async move {
        let (store, report) = Blobstore::load(desc, &LoadOptions::default())
            .await
            .unwrap();
        assert_eq!(report.repaired.len(), 1, "{:?}", report.repaired);
        assert_eq!(store.parent_of(c), Some(s));
        let snap = store.open_blob(s).await.unwrap();
        assert!(snap.internal_xattr("SNAPRM").is_none());
        snap.close().await.unwrap();
        let b = store.open_blob(c).await.unwrap();
        let channel = store.channel().unwrap();
        assert!(read(&channel, &b.io(), 0, 2 * CLUSTER).await == pattern(8, 2 * CLUSTER));
        drop(channel);
        b.close().await.unwrap();
        store.unload().await.unwrap();
    });
    rt.stop();
}

/// A chain S1 <- S2 <- C and S1 <- X with data at every level; returns the image and, per
/// blob, its expected content.
/// Each blob's id and its expected content.
type Models = Vec<(u64, Vec<u8>)>;

fn chain_image() -> (Vec<u8>, Models, [u64; 4]) {
    const C64: usize = 64 << 10;
    let rt = runtime();
    let (bdev, desc) = malloc(32 << 20);
    let (ids, models) = run(&rt, move || async move {
        let store = Blobstore::init(
            desc,
            &InitOptions {
                cluster_size: C64 as u64,
                ..InitOptions::default()
            },
        )
        .await
        .unwrap();
        let channel = store.channel().unwrap();
        let units = (C64 / 4096) as u64;
        let x = create_thin(&store, 4).await;
        let xb = store.open_blob(x).await.unwrap();
        let mut mx = vec![0u8; 4 * C64];
        let put = |model: &mut Vec<u8>, unit: u64, data: &[u8]| {
            model[unit as usize * 4096..unit as usize * 4096 + data.len()].copy_from_slice(data);
        };
        for (unit, seed, len) in [(0u64, 1u64, C64), (units, 2, C64)] {
            let data = pattern(seed, len);
            write(&channel, &xb.io(), unit, &data).await;
            put(&mut mx, unit, &data);
        }
        let s1 = store.create_snapshot(x, &[]).await.unwrap();
        let ms1 = mx.clone();
        for (unit, seed, len) in [(units + 3, 3u64, 8192usize), (2 * units, 4, C64)] {
            let data = pattern(seed, len);
            write(&channel, &xb.io(), unit, &data).await;
            put(&mut mx, unit, &data);
        }
        let c = store.create_clone(s1, &[]).await.unwrap();
        let cb = store.open_blob(c).await.unwrap();
        let mut mc = ms1.clone();
        for (unit, seed, len) in [(2u64, 5u64, 4096usize), (3 * units, 6, C64)] {
            let data = pattern(seed, len);
            write(&channel, &cb.io(), unit, &data).await;
            put(&mut mc, unit, &data);
        }
        let s2 = store.create_snapshot(c, &[]).await.unwrap();
        let ms2 = mc.clone();
        let data = pattern(7, 4096);
        write(&channel, &cb.io(), 2 * units + 1, &data).await;
        put(&mut mc, 2 * units + 1, &data);
        cb.close().await.unwrap();
        xb.close().await.unwrap();
        drop(channel);
        store.unload().await.unwrap();
        ([s1, s2, c, x], vec![(s1, ms1), (s2, ms2), (c, mc), (x, mx)])
    });
    rt.stop();
    (bdev.snapshot(), models, ids)
}

async fn verify_models(store: &Blobstore, models: &[(u64, Vec<u8>)], what: &str) {
    let channel = store.channel().unwrap();
    for (id, expected) in models {
        let blob = store
            .open_blob(*id)
            .await
            .unwrap_or_else(|err| panic!("{what}: open {id:#x}: {err}"));
        let back = read(&channel, &blob.io(), 0, expected.len()).await;
        assert!(&back == expected, "{what}: blob {id:#x} content");
        blob.close().await.unwrap();
    }
}

#[test]
fn inflate_and_decouple_at_every_level_of_a_chain_survive_reload_and_recovery() {
    let (image, models, [s1, s2, c, x]) = chain_image();
    type Step = fn(
        Blobstore,
        [u64; 4],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<u64>>>>;
    let variants: Vec<(&str, Step)> = vec![
        ("decouple C (depth 3)", |store, [_, _, c, _]| {
            Box::pin(async move {
                store.decouple_parent(c).await.unwrap();
                Some(c)
            })
        }),
        ("decouple C twice", |store, [_, _, c, _]| {
            Box::pin(async move {
                store.decouple_parent(c).await.unwrap();
                store.decouple_parent(c).await.unwrap();
                Some(c)
            })
        }),
        ("inflate C", |store, [_, _, c, _]| {
            Box::pin(async move {
                store.inflate_blob(c).await.unwrap();
                Some(c)
            })
        }),
        ("decouple X (depth 2)", |store, [_, _, _, x]| {
            Box::pin(async move {
                store.decouple_parent(x).await.unwrap();
                Some(x)
            })
        }),
        ("inflate X", |store, [_, _, _, x]| {
            Box::pin(async move {
                store.inflate_blob(x).await.unwrap();
                Some(x)
            })
        }),
        ("refused on snapshots", |store, [s1, s2, _, _]| {
            Box::pin(async move {
                assert_eq!(
                    store.decouple_parent(s1).await.unwrap_err().errno(),
                    -libc::EINVAL
                );
                assert_eq!(
                    store.inflate_blob(s2).await.unwrap_err().errno(),
                    -libc::EPERM
                );
                None
            })
        }),
    ];
    let rt = runtime();
    for (name, step) in variants {
        let (bdev, desc) = from_image(&image);
        let ids = [s1, s2, c, x];
        let models_run = models.clone();
        let what = name.to_string();
        run(&rt, move || async move {
            let (store, _) = Blobstore::load(desc, &LoadOptions::default())
                .await
                .unwrap();
            let changed = step(store.clone(), ids).await;
            verify_models(&store, &models_run, &what).await;
            if let Some(id) = changed {
                let blob = store.open_blob(id).await.unwrap();
                assert!(blob.num_allocated_clusters() > 0);
                blob.close().await.unwrap();
            }
            std::mem::forget(store); // crash
        });
        // After a crash: recovered, then unloaded clean and loaded again.
        let (after, desc) = from_image(&bdev.snapshot());
        let models_run = models.clone();
        let what = format!("{name} after recovery");
        run(&rt, move || async move {
            let (store, _) = Blobstore::load(desc, &LoadOptions::default())
                .await
                .unwrap();
            verify_models(&store, &models_run, &what).await;
            store.unload().await.unwrap();
        });
        let (_copy, desc) = from_image(&after.snapshot());
        let models_run = models.clone();
        let what = format!("{name} after a clean reload");
        run(&rt, move || async move {
            let (store, report) = Blobstore::load(desc, &LoadOptions::default())
                .await
                .unwrap();
            assert!(!report.recovered);
            verify_models(&store, &models_run, &what).await;
            store.unload().await.unwrap();
        });
    }
    rt.stop();
}

#[test]
fn a_resize_or_inflate_during_a_snapshot_gets_ebusy_and_works_after() {
    // SPDK's per-blob "operation in progress" guard: a resize or inflate that would
    // interleave with a running snapshot (or a merge, or another resize) is refused.
    let rt = runtime();
    let (_bdev, desc) = malloc(64 << 20);
    run(&rt, move || async move {
        let store = Blobstore::init(desc, &InitOptions::default())
            .await
            .unwrap();
        let id = create_thin(&store, 4).await;
        let blob = store.open_blob(id).await.unwrap();
        let channel = store.channel().unwrap();
        write(&channel, &blob.io(), 0, &pattern(4, CLUSTER)).await;
        let snapshotting = {
            let store = store.clone();
            spool_reactor::spawn_local(async move { store.create_snapshot(id, &[]).await })
        };
        // The snapshot runs as its own task: wait until it has made its new blob (its
        // operation guard on the original is held from before that to its end).
        let before = store.blob_ids().len();
        for _ in 0..10_000 {
            if store.blob_ids().len() > before {
                break;
            }
            spool_reactor::yield_now().await;
        }
        assert!(
            store.blob_ids().len() > before,
            "the snapshot never started"
        );
        let err = blob.resize(8).await.unwrap_err();
        assert_eq!(err.errno(), -libc::EBUSY, "{err}");
        assert!(err.to_string().contains("snapshot"), "{err}");
        let err = store.inflate_blob(id).await.unwrap_err();
        assert_eq!(err.errno(), -libc::EBUSY, "{err}");
        let snap = snapshotting.await.unwrap().unwrap();
        // Once the snapshot is done, both work; the data is where it was.
        blob.resize(8).await.unwrap();
        blob.sync_md().await.unwrap();
        assert_eq!(blob.num_clusters(), 8);
        assert!(read(&channel, &blob.io(), 0, CLUSTER).await == pattern(4, CLUSTER));
        blob.close().await.unwrap();
        store.inflate_blob(id).await.unwrap();
        let snap_blob = store.open_blob(snap).await.unwrap();
        assert!(read(&channel, &snap_blob.io(), 0, CLUSTER).await == pattern(4, CLUSTER));
        snap_blob.close().await.unwrap();
        drop(channel);
        store.unload().await.unwrap();
    });
    rt.stop();
}

/// Each snapshot freezes its blob's I/O once: the store counts the window (gate to release)
/// and it lies inside the call, so `freeze_stats` bounds the write pause a snapshot causes.
#[test]
fn a_snapshot_records_its_freeze_window_inside_the_call() {
    let rt = runtime();
    let (_bdev, desc) = malloc(64 << 20);
    run(&rt, move || async move {
        let store = Blobstore::init(desc, &InitOptions::default())
            .await
            .unwrap();
        assert_eq!(store.freeze_stats(), spool_blob::FreezeStats::default());
        let id = create_thick(&store, 4).await;
        let mut calls_ns = 0;
        for taken in 1..=3u64 {
            let started = std::time::Instant::now();
            store.create_snapshot(id, &[]).await.unwrap();
            let call_ns = started.elapsed().as_nanos() as u64;
            calls_ns += call_ns;
            let stats = store.freeze_stats();
            assert_eq!(stats.count, taken, "one window per snapshot");
            assert!(
                stats.last_ns > 0 && stats.last_ns <= call_ns,
                "window {} ns outside the {call_ns} ns call",
                stats.last_ns
            );
            assert!(stats.longest_ns >= stats.last_ns && stats.total_ns <= calls_ns);
        }
        store.unload().await.unwrap();
    });
}

/// A clone grown past the end of its snapshot reads zeros there (as in SPDK: past a parent's
/// end a clone reads zeros). Deleting that snapshot (a merge) or decoupling the clone from it
/// re-points the clone to the grandparent, which may have data there: the clone first gets
/// zeroed clusters of its own where the grandparent's chain would show data (found by the
/// simulation, seed 964254536: the clone read the grandparent's data after the delete).
/// SPDK re-points without them, so its clone's data changes; Spool's does not.
#[test]
fn a_clone_grown_past_its_snapshot_keeps_its_zeros_after_a_merge_or_decouple() {
    let rt = runtime();
    let (_bdev, desc) = malloc(64 << 20);
    let again = desc.clone();
    let ids = run(&rt, move || async move {
        let store = Blobstore::init(desc, &InitOptions::default())
            .await
            .unwrap();
        let channel = store.channel().unwrap();
        let mut chains = Vec::new();
        for _ in 0..2 {
            // G: 2 clusters, cluster 0 written, cluster 1 unallocated (thin).
            let c = create_thin(&store, 2).await;
            let b = store.open_blob(c).await.unwrap();
            write(&channel, &b.io(), 0, &pattern(1, CLUSTER)).await;
            let g = store.create_snapshot(c, &[]).await.unwrap();
            // S: a snapshot of C shrunk to nothing; C grows to 3 clusters past S's end.
            b.resize(0).await.unwrap();
            let s = store.create_snapshot(c, &[]).await.unwrap();
            b.resize(3).await.unwrap();
            assert_eq!(b.parent_id(), Some(s));
            assert!(read(&channel, &b.io(), 0, 3 * CLUSTER).await == vec![0u8; 3 * CLUSTER]);
            chains.push((b, g, s));
        }
        let (merged, decoupled) = (chains.remove(0), chains.remove(0));
        // The merge: S goes, C reads through G. Only cluster 0 shows G's data: one cluster
        // of zeros for C (cluster 1 is unallocated in G, cluster 2 past G's end).
        let free = store.free_cluster_count();
        store.delete_blob(merged.2).await.unwrap();
        assert_eq!(merged.0.parent_id(), Some(merged.1));
        assert!(
            read(&channel, &merged.0.io(), 0, 3 * CLUSTER).await == vec![0u8; 3 * CLUSTER],
            "after the merge the clone reads G's data where it read zeros"
        );
        assert_eq!(store.free_cluster_count(), free - 1);
        assert_eq!(merged.0.num_allocated_clusters(), 1);
        // The decouple: the same from C's side (S stays, without clones).
        store.decouple_parent(decoupled.0.id()).await.unwrap();
        assert_eq!(decoupled.0.parent_id(), Some(decoupled.1));
        assert_eq!(decoupled.0.num_allocated_clusters(), 1);
        assert!(
            read(&channel, &decoupled.0.io(), 0, 3 * CLUSTER).await == vec![0u8; 3 * CLUSTER],
            "after the decouple the clone reads G's data where it read zeros"
        );
        drop(channel);
        let ids = [merged.0.id(), decoupled.0.id()];
        merged.0.close().await.unwrap();
        decoupled.0.close().await.unwrap();
        store.unload().await.unwrap();
        ids
    });
    run(&rt, move || async move {
        let (store, _) = Blobstore::load(again, &LoadOptions::default())
            .await
            .unwrap();
        let channel = store.channel().unwrap();
        for id in ids {
            let b = store.open_blob(id).await.unwrap();
            assert!(b.parent_id().is_some());
            assert!(read(&channel, &b.io(), 0, 3 * CLUSTER).await == vec![0u8; 3 * CLUSTER]);
            b.close().await.unwrap();
        }
        drop(channel);
        store.unload().await.unwrap();
    });
    rt.stop();
}
