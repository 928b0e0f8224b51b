//! Goal: blob callback requests (`BlobChannel::read_with` / `write_with`) keep what was
//! written exactly, on the fast path (one allocated cluster) and on every other path (thin
//! allocation, requests across clusters), are called back once and never inside the call,
//! carry SPDK's error codes, and count as in flight for a snapshot's freeze.
//!
//! Method: a malloc bdev on one real reactor; a byte model of each blob; reads back with
//! futures after an unload and load.

mod common;

use std::rc::Rc;

use common::{create_thick, create_thin, malloc, pattern, read, runtime, Collector};
use spool_bdev::DmaBuf;
use spool_blob::{Blobstore, InitOptions};

const UNIT: u64 = 4096;
const CLUSTER: u64 = 1 << 20;

fn put(model: &mut [u8], unit: u64, data: &[u8]) {
    let at = (unit * UNIT) as usize;
    model[at..at + data.len()].copy_from_slice(data);
}

#[test]
fn callback_writes_on_every_path_read_back_after_unload_and_load() {
    let rt = runtime();
    let reactor = rt.reactors()[0];
    let (_bdev, desc) = malloc(64 << 20);
    let load_desc = desc.clone();
    let (thick, thin, thick_model, thin_model) = rt
        .block_on(reactor, move || async move {
            let store = Blobstore::init(desc, &InitOptions::default())
                .await
                .unwrap();
            let thick = create_thick(&store, 4).await;
            let thin = create_thin(&store, 4).await;
            let a = store.open_blob(thick).await.unwrap();
            let b = store.open_blob(thin).await.unwrap();
            let (a_io, b_io) = (a.io(), b.io());
            let channel = store.channel().unwrap();
            let collector = Rc::new(Collector::default());
            let mut thick_model = vec![0u8; (4 * CLUSTER) as usize];
            let mut thin_model = vec![0u8; (4 * CLUSTER) as usize];
            // Thick: inside one cluster (the fast path), and across a cluster boundary.
            let writes = [(1u64, 8192usize), (250, 32768), (600, 4096), (1022, 8192)];
            for (tag, &(unit, len)) in writes.iter().enumerate() {
                let data = pattern(tag as u64 + 1, len);
                collector.write(&channel, &a_io, unit, &data, tag as u64);
                put(&mut thick_model, unit, &data);
            }
            // Thin: the first write to a cluster allocates it (the task path), the next one
            // in it goes to the device directly; one write spans two unallocated clusters.
            let thin_writes = [
                (260u64, 4096usize, 10u64),
                (300, 8192, 11),
                (600, 1 << 20, 12),
            ];
            let first = &thin_writes[0];
            let data = pattern(first.2, first.1);
            collector.write(&channel, &b_io, first.0, &data, first.2);
            put(&mut thin_model, first.0, &data);
            let mut done = collector.wait(writes.len() + 1).await;
            for &(unit, len, tag) in &thin_writes[1..] {
                let data = pattern(tag, len);
                collector.write(&channel, &b_io, unit, &data, tag);
                put(&mut thin_model, unit, &data);
            }
            done.extend(collector.wait(2).await);
            let mut tags: Vec<u64> = done.iter().map(|(tag, ..)| *tag).collect();
            tags.sort_unstable();
            assert_eq!(
                tags,
                vec![0, 1, 2, 3, 10, 11, 12],
                "each request called back once"
            );
            for (tag, errno, _) in &done {
                assert_eq!(*errno, 0, "request {tag}");
            }
            // Read back through callbacks: the fast path and the task path both.
            collector.read(&channel, &a_io, 0, (4 * CLUSTER) as usize, 20);
            collector.read(&channel, &b_io, 0, (4 * CLUSTER) as usize, 21);
            collector.read(&channel, &a_io, 250, 8192, 22);
            for (tag, errno, bytes) in collector.wait(3).await {
                assert_eq!(errno, 0, "read {tag}");
                match tag {
                    20 => assert!(bytes == thick_model, "thick blob read back"),
                    21 => assert!(bytes == thin_model, "thin blob read back"),
                    22 => assert!(bytes[..] == thick_model[250 * 4096..252 * 4096]),
                    _ => panic!("unknown tag {tag}"),
                }
            }
            assert_eq!(
                b.num_allocated_clusters(),
                3,
                "the thin writes allocated three clusters"
            );
            drop((a_io, b_io));
            a.close().await.unwrap();
            b.close().await.unwrap();
            drop(channel);
            store.unload().await.unwrap();
            (thick, thin, thick_model, thin_model)
        })
        .unwrap();
    rt.block_on(reactor, move || async move {
        let (store, _) = Blobstore::load(load_desc, &Default::default())
            .await
            .unwrap();
        let channel = store.channel().unwrap();
        for (id, model) in [(thick, thick_model), (thin, thin_model)] {
            let blob = store.open_blob(id).await.unwrap();
            let back = read(&channel, &blob.io(), 0, model.len()).await;
            assert!(back == model, "blob {id:#x} after load");
            blob.close().await.unwrap();
        }
        drop(channel);
        store.unload().await.unwrap();
    })
    .unwrap();
    rt.stop();
}

#[test]
fn callback_errors_carry_spdks_codes_and_come_after_the_call() {
    let rt = runtime();
    let reactor = rt.reactors()[0];
    let (_bdev, desc) = malloc(64 << 20);
    rt.block_on(reactor, move || async move {
        let store = Blobstore::init(desc, &InitOptions::default())
            .await
            .unwrap();
        let id = create_thick(&store, 2).await;
        let blob = store.open_blob(id).await.unwrap();
        let io = blob.io();
        let channel = store.channel().unwrap();
        let collector = Rc::new(Collector::default());
        // Past the end, a length not a multiple of the io_unit, then a write to a
        // read-only blob: each refused, none inside the call.
        collector.read(&channel, &io, 2 * 256 - 1, 8192, 1);
        channel.read_with(
            &io,
            0,
            DmaBuf::alloc(1000).unwrap(),
            Rc::clone(&collector) as _,
            2,
        );
        assert!(
            collector.done.borrow().is_empty(),
            "called back inside read_with"
        );
        let mut done = collector.wait(2).await;
        done.sort_by_key(|(tag, ..)| *tag);
        assert_eq!(done[0].1, -libc::EINVAL, "past the end");
        assert_eq!(done[1].1, -libc::EINVAL, "a partial io_unit");
        assert_eq!(done[1].2.len(), 1000, "the caller's buffer comes back");
        blob.set_read_only().unwrap();
        blob.sync_md().await.unwrap();
        collector.write(&channel, &io, 0, &pattern(3, 4096), 3);
        let done = collector.wait(1).await;
        assert_eq!(done[0].1, -libc::EPERM, "a write to a read-only blob");
        // Nothing reached the device.
        assert!(read(&channel, &io, 0, 4096).await.iter().all(|&b| b == 0));
        drop(io);
        blob.close().await.unwrap();
        drop(channel);
        store.unload().await.unwrap();
    })
    .unwrap();
    rt.stop();
}

/// The snapshot's freeze waits for callback writes on the device: a copy-on-write after the
/// snapshot copies each cluster whole, with the earlier write in it. (Were the callback
/// writes not counted in flight, the freeze would go on while the malloc device still moves
/// them in parts, and the copies would miss their tails.)
#[test]
fn a_snapshot_waits_for_callback_writes_in_flight() {
    let rt = runtime();
    let reactor = rt.reactors()[0];
    let (_bdev, desc) = malloc(64 << 20);
    rt.block_on(reactor, move || async move {
        let store = Blobstore::init(desc, &InitOptions::default())
            .await
            .unwrap();
        let clusters = 16u64;
        let id = create_thick(&store, clusters).await;
        let blob = store.open_blob(id).await.unwrap();
        let io = blob.io();
        let channel = store.channel().unwrap();
        let collector = Rc::new(Collector::default());
        let mut model = vec![0u8; (clusters * CLUSTER) as usize];
        for cluster in 0..clusters {
            let data = pattern(100 + cluster, CLUSTER as usize);
            collector.write(&channel, &io, cluster * 256, &data, cluster);
            put(&mut model, cluster * 256, &data);
        }
        let snapshot = store.create_snapshot(id, &[]).await.unwrap();
        assert_eq!(
            collector.done.borrow().len(),
            clusters as usize,
            "the snapshot returned before the writes it froze were done"
        );
        // Copy-on-write of every cluster: 4 KiB in its middle.
        for cluster in 0..clusters {
            let unit = cluster * 256 + 128;
            let data = pattern(200 + cluster, 4096);
            collector.write(&channel, &io, unit, &data, 100 + cluster);
            put(&mut model, unit, &data);
        }
        let done = collector.wait(2 * clusters as usize).await;
        assert!(done.iter().all(|(_, errno, _)| *errno == 0));
        let back = read(&channel, &io, 0, model.len()).await;
        for cluster in 0..clusters as usize {
            let range = cluster * CLUSTER as usize..(cluster + 1) * CLUSTER as usize;
            assert!(
                back[range.clone()] == model[range],
                "cluster {cluster}: the copy-on-write missed the write before the snapshot"
            );
        }
        let snap = store.open_blob(snapshot).await.unwrap();
        let before = read(&channel, &snap.io(), 0, 4096).await;
        assert!(
            before[..] == pattern(100, 4096)[..],
            "the snapshot holds the writes"
        );
        snap.close().await.unwrap();
        drop(io);
        blob.close().await.unwrap();
        drop(channel);
        store.unload().await.unwrap();
    })
    .unwrap();
    rt.stop();
}

/// A channel dropped with callback requests in flight stays open until they are done: every
/// callback is called once, with success, and the data is on the device.
#[test]
fn dropping_the_channel_with_callbacks_in_flight_still_completes_them() {
    let rt = runtime();
    let reactor = rt.reactors()[0];
    let (_bdev, desc) = malloc(64 << 20);
    rt.block_on(reactor, move || async move {
        let store = Blobstore::init(desc, &InitOptions::default())
            .await
            .unwrap();
        let id = create_thick(&store, 4).await;
        let blob = store.open_blob(id).await.unwrap();
        let io = blob.io();
        let collector = Rc::new(Collector::default());
        {
            let channel = store.channel().unwrap();
            for cluster in 0..4u64 {
                collector.write(
                    &channel,
                    &io,
                    cluster * 256,
                    &pattern(300 + cluster, CLUSTER as usize),
                    cluster,
                );
            }
        }
        let done = collector.wait(4).await;
        assert_eq!(done.len(), 4);
        assert!(done.iter().all(|(_, errno, _)| *errno == 0));
        let channel = store.channel().unwrap();
        for cluster in 0..4u64 {
            let back = read(&channel, &io, cluster * 256, CLUSTER as usize).await;
            assert!(
                back == pattern(300 + cluster, CLUSTER as usize),
                "cluster {cluster}"
            );
        }
        drop(io);
        blob.close().await.unwrap();
        drop(channel);
        store.unload().await.unwrap();
    })
    .unwrap();
    rt.stop();
}
