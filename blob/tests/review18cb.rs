//! Goal: adversarial review (review18cb) of blob callback requests (`read_with` /
//! `write_with`): callbacks that resubmit from inside, panic, or race a close, an unload, a
//! resize or a snapshot; more requests than the bdev queue holds.
//!
//! Method: a malloc bdev on a real reactor; byte patterns read back; errnos and callback
//! counts asserted.

mod common;

use std::cell::RefCell;
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;

use common::{buf_of, create_thick, create_thin, malloc, pattern, read, runtime, Collector};
use spool_bdev::DmaBuf;
use spool_blob::{BlobChannel, BlobIo, BlobIoCallback, BlobIoDone, Blobstore, InitOptions};

const CLUSTER: u64 = 1 << 20;

/// A store on a fresh 64 MiB malloc device with one thick blob of `clusters`, opened.
async fn setup(desc: spool_bdev::BdevDesc, clusters: u64) -> (Blobstore, u64) {
    let store = Blobstore::init(desc, &InitOptions::default())
        .await
        .unwrap();
    let id = create_thick(&store, clusters).await;
    (store, id)
}

/// A callback that writes the next 4 KiB unit from inside itself, `left` more times, and
/// records every completion.
struct Chain {
    channel: BlobChannel,
    io: Arc<BlobIo>,
    left: RefCell<u64>,
    stride: u64,
    collector: Rc<Collector>,
}

impl BlobIoCallback for Chain {
    fn io_done(self: Rc<Self>, done: BlobIoDone) {
        let tag = done.tag;
        self.collector.record(&done);
        let left = *self.left.borrow();
        if left > 0 {
            *self.left.borrow_mut() = left - 1;
            let next = tag + 1;
            let unit = next * self.stride;
            self.channel.write_with(
                &self.io,
                unit,
                buf_of(&pattern(next, 4096)),
                Rc::clone(&self) as _,
                next,
            );
            assert!(
                self.collector
                    .done
                    .borrow()
                    .iter()
                    .all(|(t, ..)| *t != next),
                "request {next} was called back inside write_with (from a callback)"
            );
        }
    }
}

/// Requests submitted from inside callbacks (the same pending key reused at once), on the
/// fast path (stride 1: inside one cluster) and on the task path (stride 255: every other
/// request to the next, unallocated cluster of a thin blob: thin allocation): every one called
/// once, in order, and the data read back.
#[test]
fn resubmitting_from_inside_the_callback_reuses_keys_safely() {
    let rt = runtime();
    let reactor = rt.reactors()[0];
    let (_bdev, desc) = malloc(64 << 20);
    rt.block_on(reactor, move || async move {
        let (store, id) = setup(desc, 4).await;
        let thin = create_thin(&store, 8).await;
        let blob = store.open_blob(id).await.unwrap();
        let thin_blob = store.open_blob(thin).await.unwrap();
        let channel = store.channel().unwrap();
        for (io, stride, count) in [(blob.io(), 1u64, 200u64), (thin_blob.io(), 256, 7)] {
            let collector = Rc::new(Collector::default());
            let chain = Rc::new(Chain {
                channel: channel.clone(),
                io: Arc::clone(&io),
                left: RefCell::new(count - 1),
                stride,
                collector: Rc::clone(&collector),
            });
            channel.write_with(&io, 0, buf_of(&pattern(0, 4096)), chain as _, 0);
            let done = collector.wait(count as usize).await;
            assert_eq!(done.len(), count as usize);
            for (i, (tag, errno, _)) in done.iter().enumerate() {
                assert_eq!(*tag, i as u64, "in order");
                assert_eq!(*errno, 0, "request {tag}");
            }
            for i in 0..count {
                let back = read(&channel, &io, i * stride, 4096).await;
                assert!(
                    back == pattern(i, 4096),
                    "unit {} (stride {stride})",
                    i * stride
                );
            }
        }
        // The in-flight counts are back to zero: a snapshot's freeze does not wait forever.
        let snap = store.create_snapshot(id, &[]).await.unwrap();
        assert!(snap != 0);
        blob.close().await.unwrap();
        thin_blob.close().await.unwrap();
        drop(channel);
        store.unload().await.unwrap();
    })
    .unwrap();
    rt.stop();
}

/// A callback that panics on its first call, then records.
#[derive(Default)]
struct Panicky {
    calls: RefCell<u64>,
    collector: Rc<Collector>,
}

impl BlobIoCallback for Panicky {
    fn io_done(self: Rc<Self>, done: BlobIoDone) {
        *self.calls.borrow_mut() += 1;
        if *self.calls.borrow() == 1 {
            panic!("review18cb: a panicking blob callback (expected in this test)");
        }
        Rc::clone(&self.collector).io_done(done);
    }
}

/// A callback that panics, on the fast path and on the task path: contained; the channel's
/// counts are right after it (a snapshot completes, an unload too), and the next requests
/// work and read back.
#[test]
fn a_panicking_callback_leaves_the_channel_usable() {
    let rt = runtime();
    let reactor = rt.reactors()[0];
    let (_bdev, desc) = malloc(64 << 20);
    rt.block_on(reactor, move || async move {
        let (store, id) = setup(desc, 4).await;
        let blob = store.open_blob(id).await.unwrap();
        let io = blob.io();
        let channel = store.channel().unwrap();
        // Fast path (inside cluster 0), then task path (across clusters 0 and 1).
        for (unit, len) in [(8u64, 4096usize), (250, 32768)] {
            let panicky = Rc::new(Panicky::default());
            channel.write_with(
                &io,
                unit,
                buf_of(&pattern(unit, len)),
                Rc::clone(&panicky) as _,
                1,
            );
            channel.write_with(
                &io,
                unit + 512,
                buf_of(&pattern(unit + 1, len)),
                Rc::clone(&panicky) as _,
                2,
            );
            let done = panicky.collector.wait(1).await;
            assert_eq!(*panicky.calls.borrow(), 2, "each request called once");
            assert_eq!(done.len(), 1);
            assert_eq!(done[0].1, 0);
            assert!(read(&channel, &io, unit, len).await == pattern(unit, len));
            assert!(read(&channel, &io, unit + 512, len).await == pattern(unit + 1, len));
        }
        let collector = Rc::new(Collector::default());
        collector.write(&channel, &io, 700, &pattern(9, 4096), 9);
        assert_eq!(collector.wait(1).await[0].1, 0);
        let snap = store.create_snapshot(id, &[]).await.unwrap();
        assert!(snap != 0);
        drop(io);
        blob.close().await.unwrap();
        drop(channel);
        store.unload().await.unwrap();
    })
    .unwrap();
    rt.stop();
}

/// More callback requests at once than the bdev channel's queue holds (CHANNEL_IO_MAX =
/// 4096): every one called back exactly once, success or the future path's -ENOMEM for a
/// full queue; the successful ones read back; the pending table and the in-flight counts
/// are clean after (a snapshot completes, the next requests work).
#[test]
fn more_requests_than_the_bdev_queue_holds_are_each_answered_once() {
    let rt = runtime();
    let reactor = rt.reactors()[0];
    let (_bdev, desc) = malloc(64 << 20);
    rt.block_on(reactor, move || async move {
        let (store, id) = setup(desc, 24).await;
        let blob = store.open_blob(id).await.unwrap();
        let io = blob.io();
        let channel = store.channel().unwrap();
        let collector = Rc::new(Collector::default());
        let count = 6000u64;
        for i in 0..count {
            collector.write(&channel, &io, i, &pattern(1000 + i, 4096), i);
        }
        let done = collector.wait(count as usize).await;
        assert_eq!(done.len(), count as usize);
        let mut seen = vec![0u32; count as usize];
        let mut ok = vec![false; count as usize];
        for (tag, errno, bytes) in &done {
            seen[*tag as usize] += 1;
            assert!(
                bytes[..] == pattern(1000 + tag, 4096)[..],
                "request {tag}: not the caller's buffer back"
            );
            assert!(
                *errno == 0 || *errno == -libc::ENOMEM,
                "request {tag}: errno {errno}"
            );
            ok[*tag as usize] = *errno == 0;
        }
        assert!(
            seen.iter().all(|&n| n == 1),
            "each request called back once"
        );
        let refused = ok.iter().filter(|&&o| !o).count();
        eprintln!("review18cb: {refused} of {count} refused with -ENOMEM");
        let back = read(&channel, &io, 0, (count * 4096) as usize).await;
        for i in 0..count as usize {
            let got = &back[i * 4096..(i + 1) * 4096];
            if ok[i] {
                assert!(got == &pattern(1000 + i as u64, 4096)[..], "unit {i}");
            } else {
                assert!(
                    got.iter().all(|&b| b == 0),
                    "refused unit {i} reached the device"
                );
            }
        }
        // Nothing left counted: a snapshot's freeze ends, and new requests work.
        let snap = store.create_snapshot(id, &[]).await.unwrap();
        assert!(snap != 0);
        collector.write(&channel, &io, 0, &pattern(5, 4096), 1);
        assert_eq!(collector.wait(1).await[0].1, 0);
        assert!(read(&channel, &io, 0, 4096).await == pattern(5, 4096));
        drop(io);
        blob.close().await.unwrap();
        drop(channel);
        store.unload().await.unwrap();
    })
    .unwrap();
    rt.stop();
}

/// The blob's last close returns only when no device may still write for it (the close
/// comment: "nothing of the blob lands after its last close returned (a delete next frees
/// its clusters)"). Callback writes submitted just before the close: by the time the close
/// returned, every one must have been called back.
#[test]
#[ignore = "review18cb: the blob's last close returns with callback writes still in flight (it waits only for held requests; callback requests are counted only in the channel); documented as the caller's, a fix would count them as held"]
fn close_waits_for_callback_writes_in_flight() {
    let rt = runtime();
    let reactor = rt.reactors()[0];
    let (_bdev, desc) = malloc(64 << 20);
    rt.block_on(reactor, move || async move {
        let (store, id) = setup(desc, 16).await;
        let blob = store.open_blob(id).await.unwrap();
        let io = blob.io();
        let channel = store.channel().unwrap();
        let collector = Rc::new(Collector::default());
        for cluster in 0..16u64 {
            collector.write(
                &channel,
                &io,
                cluster * 256,
                &pattern(cluster, CLUSTER as usize),
                cluster,
            );
        }
        drop(io);
        blob.close().await.unwrap();
        let at_close = collector.done.borrow().len();
        let done = collector.wait(16).await;
        assert!(done.iter().all(|(_, errno, _)| *errno == 0));
        drop(channel);
        store.unload().await.unwrap();
        assert_eq!(
            at_close, 16,
            "the blob's close returned with callback writes still in flight"
        );
    })
    .unwrap();
    rt.stop();
}

/// Unload after the blob's close and the channel's drop, callback writes still in flight:
/// "nothing of the store writes to the device after it returned Ok".
#[test]
#[ignore = "review18cb: unload returns Ok while callback writes of a closed blob are still in flight on a dropped channel; they land after it (documented now as the caller's to finish first; a fix would count them as held)"]
fn unload_waits_for_callback_writes_in_flight() {
    let rt = runtime();
    let reactor = rt.reactors()[0];
    let (_bdev, desc) = malloc(64 << 20);
    rt.block_on(reactor, move || async move {
        let (store, id) = setup(desc, 16).await;
        let blob = store.open_blob(id).await.unwrap();
        let io = blob.io();
        let collector = Rc::new(Collector::default());
        {
            let channel = store.channel().unwrap();
            for cluster in 0..16u64 {
                collector.write(
                    &channel,
                    &io,
                    cluster * 256,
                    &pattern(cluster, CLUSTER as usize),
                    cluster,
                );
            }
        }
        drop(io);
        let closed = blob.close().await;
        let unloaded = store.unload().await;
        let at_unload = collector.done.borrow().len();
        let done = collector.wait(16).await;
        assert!(done.iter().all(|(_, errno, _)| *errno == 0));
        // Either refused (-EBUSY) or waited: never Ok with writes still to land.
        if closed.is_ok() && unloaded.is_ok() {
            assert_eq!(
                at_unload, 16,
                "unload returned Ok with callback writes still in flight"
            );
        }
    })
    .unwrap();
    rt.stop();
}

/// The same as `close_waits_for_callback_writes_in_flight` with futures, for comparison:
/// futures made (so submitted) before the close, polled only after it.
#[test]
#[ignore = "review18cb: comparison: close does not wait for live (undropped) future writes either"]
fn close_with_future_writes_in_flight_for_comparison() {
    let rt = runtime();
    let reactor = rt.reactors()[0];
    let (_bdev, desc) = malloc(64 << 20);
    rt.block_on(reactor, move || async move {
        let (store, id) = setup(desc, 16).await;
        let blob = store.open_blob(id).await.unwrap();
        let io = blob.io();
        let channel = store.channel().unwrap();
        let mut futures = Vec::new();
        for cluster in 0..16u64 {
            let mut f = Box::pin(channel.write(
                &io,
                cluster * 256,
                buf_of(&pattern(cluster, CLUSTER as usize)),
            ));
            let _ = common::poll_once(f.as_mut());
            futures.push(f);
        }
        let closing = blob.close();
        let closed = closing.await;
        let ready = futures
            .iter_mut()
            .map(|f| common::poll_once(f.as_mut()))
            .filter(|&r| r)
            .count();
        for f in futures {
            assert!(f.await.0.is_ok());
        }
        assert!(closed.is_ok());
        assert_eq!(
            ready, 16,
            "the blob's close returned with future writes still in flight"
        );
        drop(io);
        drop(channel);
        store.unload().await.unwrap();
    })
    .unwrap();
    rt.stop();
}

/// A resize (shrink) while callback writes are in flight on the clusters it removes: the
/// resize's freeze waits for them (each called back with success before the resize
/// returned), and a write past the new end is then -EINVAL; on a thin blob too.
#[test]
fn shrinking_waits_for_callback_writes_then_refuses_past_the_end() {
    let rt = runtime();
    let reactor = rt.reactors()[0];
    let (_bdev, desc) = malloc(64 << 20);
    rt.block_on(reactor, move || async move {
        let (store, id) = setup(desc, 8).await;
        let thin = create_thin(&store, 8).await;
        for id in [id, thin] {
            let blob = store.open_blob(id).await.unwrap();
            let io = blob.io();
            let channel = store.channel().unwrap();
            let collector = Rc::new(Collector::default());
            for cluster in 0..8u64 {
                collector.write(
                    &channel,
                    &io,
                    cluster * 256,
                    &pattern(cluster, CLUSTER as usize),
                    cluster,
                );
            }
            blob.resize(2).await.unwrap();
            let at_resize = collector.done.borrow().len();
            let done = collector.wait(8).await;
            assert_eq!(done.len(), 8);
            assert!(
                done.iter().all(|(_, errno, _)| *errno == 0),
                "{done:?}",
                done = done.iter().map(|d| (d.0, d.1)).collect::<Vec<_>>()
            );
            assert_eq!(
                at_resize, 8,
                "resize returned before the callback writes it froze were done"
            );
            collector.write(&channel, &io, 2 * 256, &pattern(9, 4096), 9);
            assert_eq!(collector.wait(1).await[0].1, -libc::EINVAL);
            for cluster in 0..2u64 {
                assert!(
                    read(&channel, &io, cluster * 256, CLUSTER as usize).await
                        == pattern(cluster, CLUSTER as usize)
                );
            }
            blob.sync_md().await.unwrap();
            drop(io);
            blob.close().await.unwrap();
        }
        store.unload().await.unwrap();
    })
    .unwrap();
    rt.stop();
}

/// Futures and callbacks interleaved on one channel, writes then reads of the same units:
/// all answered, all data right.
#[test]
fn futures_and_callbacks_interleave_on_one_channel() {
    let rt = runtime();
    let reactor = rt.reactors()[0];
    let (_bdev, desc) = malloc(64 << 20);
    rt.block_on(reactor, move || async move {
        let (store, id) = setup(desc, 4).await;
        let blob = store.open_blob(id).await.unwrap();
        let io = blob.io();
        let channel = store.channel().unwrap();
        let collector = Rc::new(Collector::default());
        let mut futures = Vec::new();
        for i in 0..64u64 {
            if i % 2 == 0 {
                collector.write(&channel, &io, i * 3, &pattern(i, 8192), i);
            } else {
                futures.push(channel.write(&io, i * 3, buf_of(&pattern(i, 8192))));
            }
        }
        for f in futures {
            assert!(f.await.0.is_ok());
        }
        let done = collector.wait(32).await;
        assert!(done.iter().all(|(_, errno, _)| *errno == 0));
        // Each request wrote units 3i and 3i+1: read 3i back through callbacks.
        for i in 0..64u64 {
            collector.read(&channel, &io, i * 3, 4096, 100 + i);
        }
        let mut done = collector.wait(64).await;
        done.sort_by_key(|d| d.0);
        for (i, (_, errno, bytes)) in done.iter().enumerate() {
            assert_eq!(*errno, 0);
            assert!(
                bytes[..] == pattern(i as u64, 8192)[..4096],
                "unit {}",
                i * 3
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

/// What the close not waiting costs: callback writes to blob A in flight, A closed and
/// deleted, blob B created on the freed clusters and written with futures: B's data must
/// read back as B wrote it, not be overwritten by A's late writes.
#[test]
fn late_callback_writes_of_a_deleted_blob_do_not_land_on_the_next_one() {
    const CL: u64 = 100;
    let rt = runtime();
    let reactor = rt.reactors()[0];
    let (_bdev, desc) = malloc(128 << 20);
    rt.block_on(reactor, move || async move {
        let (store, a) = setup(desc, CL).await;
        eprintln!("review18cb: {CL} clusters");
        let blob = store.open_blob(a).await.unwrap();
        let io = blob.io();
        let channel = store.channel().unwrap();
        let collector = Rc::new(Collector::default());
        for cluster in 0..CL {
            collector.write(
                &channel,
                &io,
                cluster * 256,
                &pattern(cluster, CLUSTER as usize),
                cluster,
            );
        }
        drop(io);
        blob.close().await.unwrap();
        store.delete_blob(a).await.unwrap();
        let b = create_thick(&store, CL).await;
        let blob = store.open_blob(b).await.unwrap();
        let io = blob.io();
        for cluster in 0..CL {
            common::write(
                &channel,
                &io,
                cluster * 256 + 255,
                &pattern(500 + cluster, 4096),
            )
            .await;
        }
        let late = CL as usize - collector.done.borrow().len();
        eprintln!("review18cb: {late} of A's callbacks pending when B was written");
        let done = collector.wait(CL as usize).await;
        assert!(done.iter().all(|(_, errno, _)| *errno == 0));
        let mut lost = Vec::new();
        for cluster in 0..CL {
            if read(&channel, &io, cluster * 256 + 255, 4096).await != pattern(500 + cluster, 4096)
            {
                lost.push(cluster);
            }
        }
        drop(io);
        blob.close().await.unwrap();
        drop(channel);
        store.unload().await.unwrap();
        assert!(
            lost.is_empty(),
            "blob B's writes overwritten by deleted blob A's late callback writes in clusters \
             {lost:?} ({late} of A's callbacks still pending when B was written)"
        );
    })
    .unwrap();
    rt.stop();
}

/// Two reactors, a channel on each: reactor 1 writes a thin blob with callback requests
/// (first writes allocate through the metadata reactor) while reactor 0 writes other units
/// with callbacks and takes snapshots of the blob. Every request called back once with
/// success, and every unit reads back as last written.
#[test]
fn callbacks_on_two_reactors_race_snapshots_of_a_thin_blob() {
    let rt = spool_reactor::Runtime::start(&spool_reactor::RuntimeOptions {
        cores: vec![0, 1],
        idle: spool_reactor::IdleMode::Sleep,
        pin: false,
    })
    .unwrap();
    let reactors = rt.reactors();
    let other = reactors[1];
    let (_bdev, desc) = malloc(256 << 20);
    rt.block_on(reactors[0], move || async move {
        let store = Blobstore::init(desc, &InitOptions::default())
            .await
            .unwrap();
        let id = create_thin(&store, 16).await;
        let blob = store.open_blob(id).await.unwrap();
        let io = blob.io();
        let io1 = Arc::clone(&io);
        // Reactor 1: units 0, 64, 128, ... (4 per cluster), 3 rounds.
        let remote = spool_reactor::spawn_on(other, move || async move {
            let channel = io1.channel().unwrap();
            let collector = Rc::new(Collector::default());
            let mut errors = Vec::new();
            for round in 0..3u64 {
                for i in 0..64u64 {
                    collector.write(&channel, &io1, i * 64, &pattern(round * 1000 + i, 4096), i);
                }
                for (tag, errno, _) in collector.wait(64).await {
                    if errno != 0 {
                        errors.push((round, tag, errno));
                    }
                }
            }
            let mut wrong = Vec::new();
            for i in 0..64u64 {
                if read(&channel, &io1, i * 64, 4096).await != pattern(2000 + i, 4096) {
                    wrong.push(i);
                }
            }
            (errors, wrong)
        })
        .unwrap();
        // Reactor 0: units 32, 96, ... with callbacks, and snapshots meanwhile.
        let channel = store.channel().unwrap();
        let collector = Rc::new(Collector::default());
        let mut snapshots = Vec::new();
        for round in 0..3u64 {
            for i in 0..64u64 {
                collector.write(
                    &channel,
                    &io,
                    i * 64 + 32,
                    &pattern(round * 1000 + 500 + i, 4096),
                    i,
                );
            }
            snapshots.push(store.create_snapshot(id, &[]).await.unwrap());
            let done = collector.wait(64).await;
            assert!(
                done.iter().all(|(_, errno, _)| *errno == 0),
                "reactor 0 round {round}"
            );
        }
        let (errors, wrong) = remote.await.unwrap();
        assert!(errors.is_empty(), "reactor 1's callback errors: {errors:?}");
        assert!(
            wrong.is_empty(),
            "reactor 1's units read back wrong: {wrong:?}"
        );
        for i in 0..64u64 {
            assert!(
                read(&channel, &io, i * 64 + 32, 4096).await == pattern(2500 + i, 4096),
                "unit {}",
                i * 64 + 32
            );
        }
        drop(io);
        blob.close().await.unwrap();
        drop(channel);
        // The remote channel is gone with its task: unload.
        store.unload().await.unwrap();
        snapshots.len()
    })
    .unwrap();
    rt.stop();
}

/// Edge errors off the fast path: a closed blob (-EBADF, its `BlobIo` still held), an
/// offset whose byte address overflows (-EINVAL), each called back once, after the call.
#[test]
fn closed_blob_and_overflowing_offsets_get_the_future_paths_errnos() {
    let rt = runtime();
    let reactor = rt.reactors()[0];
    let (_bdev, desc) = malloc(64 << 20);
    rt.block_on(reactor, move || async move {
        let (store, id) = setup(desc, 2).await;
        let blob = store.open_blob(id).await.unwrap();
        let io = blob.io();
        let channel = store.channel().unwrap();
        let collector = Rc::new(Collector::default());
        collector.read(&channel, &io, u64::MAX >> 4, 4096, 1);
        collector.write(&channel, &io, u64::MAX, &pattern(1, 4096), 2);
        let mut done = collector.wait(2).await;
        done.sort_by_key(|d| d.0);
        assert_eq!(done[0].1, -libc::EINVAL, "read at an overflowing offset");
        assert_eq!(done[1].1, -libc::EINVAL, "write at an overflowing offset");
        // The future path's answer for the same requests.
        let (result, _) = channel
            .read(&io, u64::MAX >> 4, DmaBuf::alloc(4096).unwrap())
            .await;
        assert_eq!(result.unwrap_err().errno(), -libc::EINVAL);
        blob.close().await.unwrap();
        collector.write(&channel, &io, 0, &pattern(3, 4096), 3);
        collector.read(&channel, &io, 0, 4096, 4);
        let mut done = collector.wait(2).await;
        done.sort_by_key(|d| d.0);
        assert_eq!(done[0].1, -libc::EBADF, "a write to a closed blob");
        assert_eq!(done[1].1, -libc::EBADF, "a read of a closed blob");
        let (result, _) = channel.write(&io, 0, buf_of(&pattern(3, 4096))).await;
        assert_eq!(result.unwrap_err().errno(), -libc::EBADF);
        drop(io);
        drop(channel);
        store.unload().await.unwrap();
    })
    .unwrap();
    rt.stop();
}

/// A 512-byte-block device (io_unit 512) and a 64 KiB cluster: callback writes of one and
/// several units at odd offsets, inside clusters (fast path) and across them; read back
/// through callbacks and futures.
#[test]
fn callbacks_with_a_512_byte_io_unit_and_small_clusters() {
    let rt = runtime();
    let reactor = rt.reactors()[0];
    let (_bdev, desc) = common::malloc_blocks(32 << 20, 512);
    rt.block_on(reactor, move || async move {
        let options = InitOptions {
            cluster_size: 64 << 10,
            ..InitOptions::default()
        };
        let store = Blobstore::init(desc, &options).await.unwrap();
        let thin = create_thin(&store, 8).await;
        let blob = store.open_blob(thin).await.unwrap();
        let io = blob.io();
        let channel = store.channel().unwrap();
        let collector = Rc::new(Collector::default());
        let mut model = vec![0u8; 8 << 16];
        let writes = [
            (1u64, 512usize),
            (127, 1024),
            (300, 512 * 7),
            (511, 512),
            (129, 512 * 3),
        ];
        for round in 0..2u64 {
            for (i, &(unit, len)) in writes.iter().enumerate() {
                let data = pattern(round * 10 + i as u64, len);
                channel.write_with(
                    &io,
                    unit,
                    buf_of(&data),
                    Rc::clone(&collector) as _,
                    i as u64,
                );
                let at = unit as usize * 512;
                model[at..at + len].copy_from_slice(&data);
            }
            let done = collector.wait(writes.len()).await;
            assert!(done.iter().all(|d| d.1 == 0), "round {round}");
        }
        for (i, &(unit, len)) in writes.iter().enumerate() {
            collector.read(&channel, &io, unit, len, i as u64);
        }
        let done = collector.wait(writes.len()).await;
        for (tag, errno, bytes) in done {
            let (unit, len) = writes[tag as usize];
            assert_eq!(errno, 0);
            let at = unit as usize * 512;
            assert!(
                bytes[..] == model[at..at + len],
                "callback read at unit {unit}"
            );
        }
        assert!(read(&channel, &io, 0, model.len()).await == model);
        drop(io);
        blob.close().await.unwrap();
        drop(channel);
        store.unload().await.unwrap();
    })
    .unwrap();
    rt.stop();
}

/// A callback write off the fast path (across a cluster boundary, so run in a task),
/// submitted before a snapshot is asked for on the same reactor: the module doc promises it
/// is counted in flight "while the request is in flight", so the snapshot's freeze waits for
/// it and the snapshot holds its data (the task runs before the freeze's gate is set).
#[test]
fn a_snapshot_waits_for_a_split_callback_write_submitted_before_it() {
    let rt = runtime();
    let reactor = rt.reactors()[0];
    let (_bdev, desc) = malloc(64 << 20);
    rt.block_on(reactor, move || async move {
        let (store, id) = setup(desc, 4).await;
        let blob = store.open_blob(id).await.unwrap();
        let io = blob.io();
        let channel = store.channel().unwrap();
        let collector = Rc::new(Collector::default());
        // Units 254..258: across clusters 0 and 1.
        collector.write(&channel, &io, 254, &pattern(7, 4 * 4096), 1);
        let snapshot = store.create_snapshot(id, &[]).await.unwrap();
        let at_snapshot = collector.done.borrow().len();
        let done = collector.wait(1).await;
        assert_eq!(done[0].1, 0);
        let snap = store.open_blob(snapshot).await.unwrap();
        let in_snapshot = read(&channel, &snap.io(), 254, 4 * 4096).await == pattern(7, 4 * 4096);
        snap.close().await.unwrap();
        drop(io);
        blob.close().await.unwrap();
        drop(channel);
        store.unload().await.unwrap();
        assert!(
            at_snapshot == 1 && in_snapshot,
            "a split callback write submitted before the snapshot: called back before it \
             returned: {}, in the snapshot: {in_snapshot}",
            at_snapshot == 1
        );
    })
    .unwrap();
    rt.stop();
}

/// A `BlobIo` of store Y given to a channel of store X (two stores on one reactor): the
/// request must be refused (-EINVAL), not written to X's device at Y's cluster addresses
/// (which may be X's metadata or another blob's data). Callbacks and futures alike.
#[test]
fn a_blob_of_another_store_is_refused_not_written_to_this_ones_device() {
    let rt = runtime();
    let reactor = rt.reactors()[0];
    let (bdev_x, desc_x) = malloc(64 << 20);
    let (_bdev_y, desc_y) = common::malloc(64 << 20);
    rt.block_on(reactor, move || async move {
        let (store_x, _) = setup(desc_x, 1).await;
        let (store_y, id_y) = setup(desc_y, 4).await;
        let blob_y = store_y.open_blob(id_y).await.unwrap();
        let io_y = blob_y.io();
        let channel_x = store_x.channel().unwrap();
        let before = bdev_x.snapshot();
        let collector = Rc::new(Collector::default());
        collector.write(&channel_x, &io_y, 0, &pattern(1, 4096), 1);
        collector.write(&channel_x, &io_y, 250, &pattern(2, 8 * 4096), 2);
        let mut done = collector.wait(2).await;
        done.sort_by_key(|d| d.0);
        let (result, _) = channel_x.write(&io_y, 3, buf_of(&pattern(3, 4096))).await;
        let after = bdev_x.snapshot();
        let changed = before != after;
        drop(io_y);
        blob_y.close().await.unwrap();
        drop(channel_x);
        store_y.unload().await.unwrap();
        store_x.unload().await.unwrap();
        assert!(!changed, "store X's device was written through Y's blob");
        assert_eq!(done[0].1, -libc::EINVAL, "callback write, fast path");
        assert_eq!(done[1].1, -libc::EINVAL, "callback write, split");
        assert_eq!(result.unwrap_err().errno(), -libc::EINVAL, "future write");
    })
    .unwrap();
    rt.stop();
}

/// Deleting a blob's snapshot merges it into the blob (its only clone) while callback
/// writes to the blob are in flight, on both paths (allocated clusters: fast path;
/// unallocated ones: thin allocation in a task): every write called back with success, and
/// the blob reads as the snapshot's data with the writes over it.
#[test]
fn merging_a_snapshot_into_the_blob_while_callback_writes_are_in_flight() {
    let rt = runtime();
    let reactor = rt.reactors()[0];
    let (_bdev, desc) = malloc(64 << 20);
    rt.block_on(reactor, move || async move {
        let (store, id) = setup(desc, 8).await;
        let blob = store.open_blob(id).await.unwrap();
        let io = blob.io();
        let channel = store.channel().unwrap();
        let mut model = vec![0u8; (8 * CLUSTER) as usize];
        for cluster in 0..8u64 {
            let data = pattern(cluster, CLUSTER as usize);
            common::write(&channel, &io, cluster * 256, &data).await;
            let at = (cluster * CLUSTER) as usize;
            model[at..at + CLUSTER as usize].copy_from_slice(&data);
        }
        let snapshot = store.create_snapshot(id, &[]).await.unwrap();
        // Clusters 0..4 allocated in the blob again (copy-on-write), 4..8 left to the snapshot.
        for cluster in 0..4u64 {
            let data = pattern(50 + cluster, 4096);
            common::write(&channel, &io, cluster * 256 + 1, &data).await;
            let at = (cluster * CLUSTER + 4096) as usize;
            model[at..at + 4096].copy_from_slice(&data);
        }
        let collector = Rc::new(Collector::default());
        for cluster in 0..8u64 {
            let data = pattern(100 + cluster, 8192);
            collector.write(&channel, &io, cluster * 256 + 10, &data, cluster);
            let at = (cluster * CLUSTER + 10 * 4096) as usize;
            model[at..at + 8192].copy_from_slice(&data);
        }
        store.delete_blob(snapshot).await.unwrap();
        let done = collector.wait(8).await;
        let errnos: Vec<_> = done.iter().map(|d| (d.0, d.1)).collect();
        assert!(errnos.iter().all(|d| d.1 == 0), "{errnos:?}");
        let back = read(&channel, &io, 0, model.len()).await;
        for cluster in 0..8usize {
            let range = cluster * CLUSTER as usize..(cluster + 1) * CLUSTER as usize;
            assert!(back[range.clone()] == model[range], "cluster {cluster}");
        }
        drop(io);
        blob.close().await.unwrap();
        drop(channel);
        store.unload().await.unwrap();
    })
    .unwrap();
    rt.stop();
}

/// Drops its channel and closes its blob on its first call.
struct Closer {
    channel: RefCell<Option<BlobChannel>>,
    blob: RefCell<Option<spool_blob::Blob>>,
    closed: Rc<RefCell<Option<i32>>>,
    collector: Rc<Collector>,
}

impl BlobIoCallback for Closer {
    fn io_done(self: Rc<Self>, done: BlobIoDone) {
        drop(self.channel.borrow_mut().take());
        if let Some(blob) = self.blob.borrow_mut().take() {
            let closed = Rc::clone(&self.closed);
            drop(spool_reactor::spawn_local(async move {
                let errno = blob.close().await.err().map_or(0, |err| err.errno());
                *closed.borrow_mut() = Some(errno);
            }));
        }
        Rc::clone(&self.collector).io_done(done);
    }
}

/// A callback that, on its first call, drops its channel and closes the blob (a task, as a
/// callback cannot await) while the other requests are in flight: every request is called
/// back once; those already on the device succeed and read back, and a request made after the
/// close completed gets -EBADF.
#[test]
fn a_callback_that_drops_its_channel_and_closes_the_blob() {
    let rt = runtime();
    let reactor = rt.reactors()[0];
    let (_bdev, desc) = malloc(64 << 20);
    rt.block_on(reactor, move || async move {
        let (store, id) = setup(desc, 4).await;
        let blob = store.open_blob(id).await.unwrap();
        let io = blob.io();
        let collector = Rc::new(Collector::default());
        let closed = Rc::new(RefCell::new(None));
        let closer = Rc::new(Closer {
            channel: RefCell::new(Some(store.channel().unwrap())),
            blob: RefCell::new(Some(blob)),
            closed: Rc::clone(&closed),
            collector: Rc::clone(&collector),
        });
        {
            let channel = closer.channel.borrow().clone().unwrap();
            for i in 0..32u64 {
                channel.write_with(
                    &io,
                    i * 8,
                    buf_of(&pattern(i, 4096)),
                    Rc::clone(&closer) as _,
                    i,
                );
            }
        }
        let done = collector.wait(32).await;
        let mut seen = [0u32; 32];
        for (tag, errno, _) in &done {
            seen[*tag as usize] += 1;
            assert_eq!(
                *errno, 0,
                "request {tag} was on the device before the close"
            );
        }
        assert!(seen.iter().all(|&n| n == 1));
        poll_fn(|cx| {
            if closed.borrow().is_some() {
                Poll::Ready(())
            } else {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        })
        .await;
        assert_eq!(*closed.borrow(), Some(0), "the close from the callback");
        let channel = store.channel().unwrap();
        collector.write(&channel, &io, 0, &pattern(99, 4096), 99);
        assert_eq!(collector.wait(1).await[0].1, -libc::EBADF);
        let blob = store.open_blob(id).await.unwrap();
        let reopened = blob.io();
        for i in 0..32u64 {
            assert!(
                read(&channel, &reopened, i * 8, 4096).await == pattern(i, 4096),
                "unit {}",
                i * 8
            );
        }
        drop((io, reopened));
        blob.close().await.unwrap();
        drop(channel);
        store.unload().await.unwrap();
    })
    .unwrap();
    rt.stop();
}

/// Reactor 1 keeps callback writes in flight over all 8 clusters of a blob (a thin one:
/// first writes allocate through the metadata reactor) while reactor 0 shrinks it to 4: a
/// write inside the kept clusters always succeeds and reads back; one past the new end
/// succeeds (before the shrink) or gets -EINVAL (after), nothing else; every request is
/// called back once.
#[test]
fn callbacks_on_another_reactor_race_a_shrink() {
    let rt = spool_reactor::Runtime::start(&spool_reactor::RuntimeOptions {
        cores: vec![0, 1],
        idle: spool_reactor::IdleMode::Sleep,
        pin: false,
    })
    .unwrap();
    let reactors = rt.reactors();
    let other = reactors[1];
    let (_bdev, desc) = malloc(64 << 20);
    rt.block_on(reactors[0], move || async move {
        let store = Blobstore::init(desc, &InitOptions::default())
            .await
            .unwrap();
        let id = create_thin(&store, 8).await;
        let blob = store.open_blob(id).await.unwrap();
        let io = blob.io();
        let io1 = Arc::clone(&io);
        let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let started1 = Arc::clone(&started);
        let remote = spool_reactor::spawn_on(other, move || async move {
            let channel = io1.channel().unwrap();
            let collector = Rc::new(Collector::default());
            let mut bad = Vec::new();
            for round in 0..6u64 {
                for i in 0..32u64 {
                    let unit = i * 64 + round;
                    collector.write(&channel, &io1, unit, &pattern(round * 100 + i, 4096), i);
                }
                started1.store(true, std::sync::atomic::Ordering::Release);
                let done = collector.wait(32).await;
                let mut seen = [0u32; 32];
                for (tag, errno, _) in done {
                    seen[tag as usize] += 1;
                    let kept = tag * 64 < 4 * 256;
                    if !(errno == 0 || (!kept && errno == -libc::EINVAL)) {
                        bad.push((round, tag, errno));
                    }
                }
                if seen.iter().any(|&n| n != 1) {
                    bad.push((round, 999, 0));
                }
            }
            let mut wrong = Vec::new();
            for round in 0..6u64 {
                for i in 0..16u64 {
                    if read(&channel, &io1, i * 64 + round, 4096).await
                        != pattern(round * 100 + i, 4096)
                    {
                        wrong.push((round, i));
                    }
                }
            }
            (bad, wrong)
        })
        .unwrap();
        poll_fn(|cx| {
            if started.load(std::sync::atomic::Ordering::Acquire) {
                Poll::Ready(())
            } else {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        })
        .await;
        blob.resize(4).await.unwrap();
        blob.sync_md().await.unwrap();
        let (bad, wrong) = remote.await.unwrap();
        assert!(
            bad.is_empty(),
            "unexpected answers (round, tag, errno): {bad:?}"
        );
        assert!(wrong.is_empty(), "kept units read back wrong: {wrong:?}");
        drop(io);
        blob.close().await.unwrap();
        store.unload().await.unwrap();
    })
    .unwrap();
    rt.stop();
}
