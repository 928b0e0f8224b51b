//! Freezing a blob's I/O on every channel (snapshot, resize, merge), as SPDK's
//! `blob_freeze_io`: new I/O waits on its own channel, in order, until the blob is unfrozen.
//!
//! Unlike the seed, a freeze also waits for the blob's in-flight I/O to finish (thin
//! allocations included), so the cluster map the caller changes is not changed under it by
//! an insert already on its way: a snapshot captures every write acknowledged before it,
//! and every write acknowledged after it lands in the blob, not the snapshot. A snapshot's
//! freeze ([`freeze_for_snapshot`]) leaves out the writes parked in a thin allocation: their
//! inserts wait for its hand-over instead (see `io::thin::Parked`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{BlobError, Result};
use crate::io::BlobIo;
use crate::store::Blobstore;

/// How often a freeze looks again at the in-flight count.
const DRAIN_POLL: Duration = Duration::from_micros(20);

/// Freezes `io`: after this returns, no I/O of the blob is in flight and new I/O waits
/// (counting a dropped I/O's request the device may still carry, see `crate::io::HeldCount`).
/// On error the blob is not left frozen (this freeze is undone and waiting I/O released).
pub(crate) async fn freeze(store: &Blobstore, io: &Arc<BlobIo>) -> Result<()> {
    freeze_draining(store, io, false).await
}

/// A snapshot's freeze: as [`freeze`], but it does not wait for writes parked in a thin
/// allocation (`io::thin::Parked`: their fill touches nothing the snapshot moves, their
/// insert waits for the hand-over and goes into the blob's new map, and they wait for the
/// unfreeze before any other device write). The caller has marked the blob as handing over
/// (`BlobIo::set_handing_over`, `BlobState::handover`) first.
pub(crate) async fn freeze_for_snapshot(store: &Blobstore, io: &Arc<BlobIo>) -> Result<()> {
    freeze_draining(store, io, true).await
}

async fn freeze_draining(store: &Blobstore, io: &Arc<BlobIo>, parked_aside: bool) -> Result<()> {
    let first = io.freeze_enter() == 0;
    if first {
        io.frozen_since_ns
            .store(spool_reactor::now_ns(), Ordering::Release);
    }
    match enter_and_drain(store, io, first, parked_aside).await {
        Ok(()) => Ok(()),
        Err(err) => {
            if let Err(undo) = unfreeze(store, io).await {
                tracing::warn!(blob = format!("{:#x}", io.id()), %undo, "releasing I/O after a failed freeze");
            }
            Err(err)
        }
    }
}

async fn enter_and_drain(
    store: &Blobstore,
    io: &Arc<BlobIo>,
    first: bool,
    parked_aside: bool,
) -> Result<()> {
    let mut steps = crate::steps::Steps::start("freeze");
    if first {
        // A barrier: every reactor holding a channel has seen the flag, so whatever it
        // submits from now on waits, and what it submitted before is counted in flight.
        let walk = store
            .shared()
            .io_device
            .for_each_channel(|_, _| Ok(()))?
            .await?;
        walk.map_err(|errno| BlobError::Remote {
            errno,
            what: format!("freezing I/O of blob {:#x}", io.id()),
        })?;
    }
    steps.mark("gate");
    // Every channel's count of this blob's I/O and its held requests, until all are zero
    // (they only fall now).
    loop {
        let total = Arc::new(AtomicU64::new(0));
        let (sum, slot) = (Arc::clone(&total), io.slot());
        let walk = store
            .shared()
            .io_device
            .for_each_channel(move |_, channel| {
                let count = if parked_aside {
                    channel.inflight_unparked(slot)
                } else {
                    channel.inflight(slot)
                };
                sum.fetch_add(count, Ordering::AcqRel);
                Ok(())
            })?
            .await?;
        if let Err(errno) = walk {
            return Err(BlobError::Remote {
                errno,
                what: format!("draining I/O of blob {:#x}", io.id()),
            });
        }
        // Then the blob's held requests (dropped I/O still on the device, whatever became
        // of its channel): read after the walk, so a request that moved from a channel's
        // count to the held count during the walk is seen in one or the other.
        if total.load(Ordering::Acquire) == 0 && io.held() == 0 {
            steps.mark("drain");
            return Ok(());
        }
        spool_reactor::sleep(DRAIN_POLL).await;
    }
}

/// Undoes one [`freeze`]; the last one wakes the waiting I/O on every channel, in order.
pub(crate) async fn unfreeze(store: &Blobstore, io: &Arc<BlobIo>) -> Result<()> {
    if io.freeze_leave() == 0 {
        let id = io.id();
        let walk = store
            .shared()
            .io_device
            .for_each_channel(move |_, channel| {
                channel.release_frozen(id);
                Ok(())
            })?
            .await?;
        walk.map_err(|errno| BlobError::Remote {
            errno,
            what: format!("releasing I/O of blob {id:#x}"),
        })?;
        let since = io.frozen_since_ns.load(Ordering::Acquire);
        store
            .shared()
            .freeze_windows
            .record(spool_reactor::now_ns().saturating_sub(since));
    }
    Ok(())
}

/// The store's record of freeze windows (gate to release), updated by the metadata thread
/// and read from anywhere.
#[derive(Debug, Default)]
pub(crate) struct FreezeWindows {
    count: AtomicU64,
    total_ns: AtomicU64,
    longest_ns: AtomicU64,
    last_ns: AtomicU64,
}

impl FreezeWindows {
    fn record(&self, window_ns: u64) {
        self.count.fetch_add(1, Ordering::AcqRel);
        self.total_ns.fetch_add(window_ns, Ordering::AcqRel);
        self.longest_ns.fetch_max(window_ns, Ordering::AcqRel);
        self.last_ns.store(window_ns, Ordering::Release);
    }

    pub(crate) fn stats(&self) -> FreezeStats {
        FreezeStats {
            count: self.count.load(Ordering::Acquire),
            total_ns: self.total_ns.load(Ordering::Acquire),
            longest_ns: self.longest_ns.load(Ordering::Acquire),
            last_ns: self.last_ns.load(Ordering::Acquire),
        }
    }
}

/// How long blob I/O stayed frozen, over every freeze window since the store was loaded
/// (see [`Blobstore::freeze_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FreezeStats {
    /// Windows ended (an outermost freeze released).
    pub count: u64,
    /// Their sum, ns.
    pub total_ns: u64,
    /// The longest, ns.
    pub longest_ns: u64,
    /// The latest, ns.
    pub last_ns: u64,
}
