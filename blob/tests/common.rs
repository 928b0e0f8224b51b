//! Helpers shared by the blobstore's behaviour tests (included with `mod common;`).

#![allow(dead_code)]

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};

use spool_bdev::{Bdev, BdevDesc, DmaBuf, MallocBdev};
use spool_blob::{BlobChannel, BlobIo, BlobIoCallback, BlobIoDone, BlobOptions, Blobstore};
use spool_reactor::{IdleMode, RemoteHandle, Runtime, RuntimeOptions, Sim};

/// A one-reactor runtime that sleeps when idle.
pub fn runtime() -> Runtime {
    Runtime::start(&RuntimeOptions {
        cores: vec![0],
        idle: IdleMode::Sleep,
        pin: false,
    })
    .unwrap()
}

/// Runs `make()` on the runtime's first reactor and returns its output.
pub fn run<F, Fut, T>(rt: &Runtime, make: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
    T: Send + 'static,
{
    rt.block_on(rt.reactors()[0], make).unwrap()
}

/// A zeroed malloc device of `bytes` with 4 KiB blocks, and a descriptor on it.
pub fn malloc(bytes: u64) -> (Arc<MallocBdev>, BdevDesc) {
    malloc_blocks(bytes, 4096)
}

/// A zeroed malloc device of `bytes` with `block`-byte blocks.
pub fn malloc_blocks(bytes: u64, block: u32) -> (Arc<MallocBdev>, BdevDesc) {
    let bdev = Arc::new(MallocBdev::new("malloc0", block, bytes / u64::from(block)).unwrap());
    let desc = BdevDesc::open(Arc::clone(&bdev) as Arc<dyn Bdev>).expect("open bdev");
    (bdev, desc)
}

/// A malloc device holding a copy of `image`.
pub fn from_image(image: &[u8]) -> (Arc<MallocBdev>, BdevDesc) {
    let bdev = Arc::new(MallocBdev::from_image("copy", 4096, image).unwrap());
    let desc = BdevDesc::open(Arc::clone(&bdev) as Arc<dyn Bdev>).expect("open bdev");
    (bdev, desc)
}

/// Deterministic bytes that differ by seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// A DMA buffer holding `data`.
pub fn buf_of(data: &[u8]) -> DmaBuf {
    let mut buf = DmaBuf::alloc(data.len()).unwrap();
    buf.copy_from_slice(data);
    buf
}

/// Writes `data` at io_unit `offset`, panicking on error.
pub async fn write(channel: &BlobChannel, blob: &BlobIo, offset: u64, data: &[u8]) {
    let (result, _) = channel.write(blob, offset, buf_of(data)).await;
    result.unwrap_or_else(|err| panic!("write {} bytes at unit {offset}: {err}", data.len()));
}

/// Reads `len` bytes at io_unit `offset`, panicking on error.
pub async fn read(channel: &BlobChannel, blob: &BlobIo, offset: u64, len: usize) -> Vec<u8> {
    let (result, buf) = channel
        .read(blob, offset, DmaBuf::alloc(len).unwrap())
        .await;
    result.unwrap_or_else(|err| panic!("read {len} bytes at unit {offset}: {err}"));
    buf.to_vec()
}

/// Creates a thick blob of `num_clusters` clusters and returns its id.
pub async fn create_thick(store: &Blobstore, num_clusters: u64) -> u64 {
    store
        .create_blob(&BlobOptions {
            num_clusters,
            ..BlobOptions::default()
        })
        .await
        .unwrap()
}

/// Creates a thin blob of `num_clusters` clusters and returns its id.
pub async fn create_thin(store: &Blobstore, num_clusters: u64) -> u64 {
    store
        .create_blob(&BlobOptions {
            num_clusters,
            thin: true,
            ..BlobOptions::default()
        })
        .await
        .unwrap()
}

/// Steps the simulation until `handle`'s task finishes or `steps` steps have run (or nothing
/// is left to run); its result, or `None` if it has not finished.
pub fn run_bounded<T>(sim: &mut Sim, handle: &RemoteHandle<T>, steps: u64) -> Option<T> {
    for _ in 0..steps {
        if let Some(result) = handle.try_take() {
            return Some(result.expect("the scenario task failed"));
        }
        if !sim.step() {
            break;
        }
    }
    handle
        .try_take()
        .map(|result| result.expect("the scenario task failed"))
}

/// Polls `future` once with a waker that does nothing; true if it completed.
pub fn poll_once<F: std::future::Future + ?Sized>(future: std::pin::Pin<&mut F>) -> bool {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    future.poll(&mut cx).is_ready()
}

/// Collects blob callback completions: (tag, errno, the buffer's bytes); its `write` and
/// `read` submit callback requests and check none was called back inside the call.
#[derive(Default)]
pub struct Collector {
    /// Completions not yet taken by [`Collector::wait`].
    pub done: RefCell<Vec<(u64, i32, Vec<u8>)>>,
    waiter: RefCell<Option<Waker>>,
}

impl BlobIoCallback for Collector {
    fn io_done(self: Rc<Self>, done: BlobIoDone) {
        self.record(&done);
    }
}

impl Collector {
    /// Records `done` and wakes the task waiting in [`Collector::wait`].
    pub fn record(&self, done: &BlobIoDone) {
        self.done
            .borrow_mut()
            .push((done.tag, done.errno(), done.buf.to_vec()));
        if let Some(waiter) = self.waiter.borrow_mut().take() {
            waiter.wake();
        }
    }

    /// Waits until `count` completions arrived; returns them, emptied.
    pub async fn wait(&self, count: usize) -> Vec<(u64, i32, Vec<u8>)> {
        poll_fn(|cx| {
            if self.done.borrow().len() >= count {
                Poll::Ready(())
            } else {
                *self.waiter.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
        self.done.take()
    }

    /// Writes `data` at io_unit `unit` as callback request `tag`.
    pub fn write(
        self: &Rc<Self>,
        channel: &BlobChannel,
        blob: &std::sync::Arc<BlobIo>,
        unit: u64,
        data: &[u8],
        tag: u64,
    ) {
        channel.write_with(blob, unit, buf_of(data), Rc::clone(self) as _, tag);
        assert!(
            self.done.borrow().iter().all(|(done, ..)| *done != tag),
            "request {tag} was called back inside write_with"
        );
    }

    /// Reads `len` bytes at io_unit `unit` as callback request `tag`.
    pub fn read(
        self: &Rc<Self>,
        channel: &BlobChannel,
        blob: &std::sync::Arc<BlobIo>,
        unit: u64,
        len: usize,
        tag: u64,
    ) {
        channel.read_with(
            blob,
            unit,
            DmaBuf::alloc(len).unwrap(),
            Rc::clone(self) as _,
            tag,
        );
        assert!(
            self.done.borrow().iter().all(|(done, ..)| *done != tag),
            "request {tag} was called back inside read_with"
        );
    }
}
