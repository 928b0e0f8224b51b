//! Device requests of dropped blob I/O (the cancellation rule in docs/architecture.md): a
//! blob I/O whose future is dropped while its bdev request is on the device leaves the
//! request there (its buffers parked in the slot) and hands it a [`HeldIo`], which counts it
//! until the device completes it.
//!
//! The count lives in the blob's [`BlobIo`](super::BlobIo) and in the store, not in the
//! channel the I/O came from: it outlives the I/O's future, its channel (a freeze walks only
//! live channels) and the blob handle, so a freeze, the blob's last close, `unload` and
//! `destroy` all see it. Only a dropped I/O pays for it (one `Arc` clone and one box at the
//! drop); the I/O path itself counts in its channel, as before.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often a waiter looks again at a held count.
const HELD_POLL: Duration = Duration::from_micros(50);

/// How many times a waiter looks before giving up (5 s at [`HELD_POLL`]).
const HELD_POLLS_MAX: u32 = 100_000;

/// One blob's count of held device requests, and its store's.
#[derive(Debug)]
pub(crate) struct HeldCount {
    blob: AtomicU64,
    store: Arc<AtomicU64>,
}

impl HeldCount {
    /// A blob's count (zero) that also counts into `store`'s total.
    pub(crate) fn new(store: &Arc<AtomicU64>) -> Arc<HeldCount> {
        Arc::new(HeldCount {
            blob: AtomicU64::new(0),
            store: Arc::clone(store),
        })
    }

    /// The blob's held requests now.
    pub(crate) fn get(&self) -> u64 {
        self.blob.load(Ordering::Acquire)
    }

    /// Counts one more held request (in the blob and the store) until the returned hold is
    /// dropped: the caller hands it to the bdev request before its own count goes, so a
    /// reader never sees the request counted nowhere.
    pub(crate) fn hold(self: &Arc<Self>) -> Box<HeldIo> {
        self.store.fetch_add(1, Ordering::AcqRel);
        self.blob.fetch_add(1, Ordering::AcqRel);
        Box::new(HeldIo(Arc::clone(self)))
    }
}

/// One held device request, counted until dropped (by the bdev, once the device completed
/// the request or it never reached the device).
pub(crate) struct HeldIo(Arc<HeldCount>);

impl Drop for HeldIo {
    fn drop(&mut self) {
        self.0.blob.fetch_sub(1, Ordering::AcqRel);
        self.0.store.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Waits (at most about 5 s) until `count()` is zero; false if it still is not.
pub(crate) async fn wait_until_zero(count: impl Fn() -> u64) -> bool {
    let mut polls = 0u32;
    while count() > 0 {
        if polls == HELD_POLLS_MAX {
            return false;
        }
        spool_reactor::sleep(HELD_POLL).await;
        polls += 1;
    }
    true
}
