//! Thin allocation: the first write to an unallocated cluster (see the parent module's doc).
//!
//! Cancellation (docs/architecture.md): the allocation (claim a cluster, fill it, have the
//! metadata reactor insert and persist it) runs as its own task on the channel's reactor, and
//! the write only waits for it. A write dropped at any await point therefore leaves no entry
//! in the channel's allocation map (the task's [`AllocatingEntry`] removes it and wakes the
//! writes waiting on it when the allocation ends), no claimed cluster (the [`ClusterClaim`]
//! is released on every path that does not insert it, only once no fill write of it is in
//! flight), and no half-done insert or persist (those run to completion on the metadata
//! reactor, which owns the cluster once it is in the map and releases it if the insert is
//! undone). The allocation also stays counted in the blob's in-flight I/O ([`Counted`]) until
//! it ends, so a resize's or merge's freeze never changes the map under an insert on its way.
//! A snapshot's freeze does not wait for it (nor for the writes waiting on it: see
//! [`Parked`]): its insert waits for the snapshot's hand-over instead, and is refused (the
//! write redone) if the new snapshot has the cluster. Fills go to the channel's fill channel,
//! so that ordinary writes (and a snapshot's drain of them) do not queue behind whole-cluster
//! copies.

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use spool_bdev::DmaBuf;
use spool_reactor::Channel;

use super::{AllocKey, BlobChannel, BlobIo, ChannelContext};
use crate::error::{BlobError, Result};
use crate::store::claim::ClusterClaim;
use crate::sync::LocalEvent;

impl BlobChannel {
    /// Gives blob cluster `index` a cluster of its own (the parent's data, or zeros) if it has
    /// none: the "touch" inflate and decouple use.
    pub(crate) async fn touch_cluster(&self, blob: &BlobIo, index: u64) -> Result<()> {
        let offset = index * self.store.geometry.cluster_size;
        // Not an admitted I/O (inflate and decouple run it): never parked.
        self.write_unallocated(blob, index, offset, None, None)
            .await
    }

    /// Writes `data` at blob byte `offset` inside cluster `index`, allocating the cluster
    /// first if it still has none (see the module doc). An admitted write passes `parked`:
    /// it is parked (see [`Parked`]) while it waits for an allocation, and may come back
    /// still parked (the caller unparks it before any other device write).
    pub(super) async fn write_unallocated(
        &self,
        blob: &BlobIo,
        index: u64,
        offset: u64,
        data: Option<&[u8]>,
        mut parked: Option<&mut Option<Parked>>,
    ) -> Result<()> {
        let cluster_size = self.store.geometry.cluster_size;
        loop {
            let cluster = blob
                .map
                .load()
                .clusters
                .get(index as usize)
                .map(|c| c.load(Ordering::Acquire))
                .ok_or_else(|| {
                    BlobError::InvalidArgument(format!(
                        "blob {:#x} was shrunk under this write",
                        blob.id
                    ))
                })?;
            if cluster != 0 {
                if let Some(data) = data {
                    if let Some(guard) = parked.as_deref_mut().and_then(Option::take) {
                        // A snapshot may hand the map over while parked: read it again.
                        guard.unpark(blob).await;
                        continue;
                    }
                    let device = u64::from(cluster) * cluster_size + offset % cluster_size;
                    let mut tmp = DmaBuf::alloc(data.len())?;
                    tmp.copy_from_slice(data);
                    // Counted until the device is done, even if this future is dropped.
                    self.device_write(blob, tmp, device).await.0?;
                }
                return Ok(());
            }
            if let Some(slot) = parked.as_deref_mut() {
                if slot.is_none() {
                    *slot = Some(Parked::new(&self.channel, blob.slot));
                }
            }
            let key = (blob.id, index);
            let waiting = self.channel.allocating.borrow().get(&key).cloned();
            if let Some(event) = waiting {
                event.wait().await;
                continue;
            }
            let allocation = Allocation {
                channel: self.for_fill(),
                blob_id: blob.id,
                parent: blob.parent.load_full(),
                chain_owns: chain_owns(blob, index as usize),
                index,
                offset,
                data: data.map(<[u8]>::to_vec),
            };
            // Both taken before the first await and owned by the task from then on.
            let entry = AllocatingEntry::insert(&self.channel, key);
            let counted = Counted::new(&self.channel, blob.slot);
            let result = crate::detach::detached(
                async move {
                    let _entry = entry;
                    let _counted = counted;
                    allocation.run().await
                },
                crate::detach::forget,
            )
            .await;
            match result {
                Ok(true) => return Ok(()),
                Ok(false) => continue, // another reactor won: redo against its cluster
                Err(err) => return Err(err),
            }
        }
    }
}

/// A thin allocation in the channel's map: removed, and the writes waiting on it woken, when
/// dropped (the allocation ended, however).
struct AllocatingEntry {
    channel: Channel<ChannelContext>,
    key: AllocKey,
    event: Rc<LocalEvent<()>>,
}

impl AllocatingEntry {
    fn insert(channel: &Channel<ChannelContext>, key: AllocKey) -> AllocatingEntry {
        let event = LocalEvent::new();
        channel
            .allocating
            .borrow_mut()
            .insert(key, Rc::clone(&event));
        AllocatingEntry {
            channel: channel.clone(),
            key,
            event,
        }
    }
}

impl Drop for AllocatingEntry {
    fn drop(&mut self) {
        let mut map = self.channel.allocating.borrow_mut();
        if map
            .get(&self.key)
            .is_some_and(|event| Rc::ptr_eq(event, &self.event))
        {
            map.remove(&self.key);
        }
        drop(map);
        self.event.set(());
    }
}

/// A write parked in a thin allocation (claim, fill, insert, or waiting for another
/// write's): counted in its channel's `parked` as well as in flight, so a snapshot's freeze
/// does not wait for it. What it does while parked cannot disturb a snapshot: the fill goes
/// to a cluster nobody owns yet and reads the parent chain, which a snapshot does not change,
/// and the insert waits for the snapshot's hand-over and is refused (the write redone) if
/// the new snapshot has the cluster (`persist::insert_cluster`). Before any other device
/// write the write unparks ([`Parked::unpark`]).
pub(crate) struct Parked {
    channel: Channel<ChannelContext>,
    slot: usize,
}

impl Parked {
    fn new(channel: &Channel<ChannelContext>, slot: usize) -> Parked {
        channel.park(slot);
        Parked {
            channel: channel.clone(),
            slot,
        }
    }

    /// Waits while a snapshot's freeze is on (it does not wait for this write, and may hand
    /// the blob's map over meanwhile), then counts as an ordinary I/O in flight: a freeze
    /// that starts later waits for it. The caller reads the map again afterwards.
    pub(crate) async fn unpark(self, blob: &BlobIo) {
        std::future::poll_fn(|cx| {
            if blob.is_frozen() && blob.handing_over() {
                self.channel
                    .frozen_waiters
                    .borrow_mut()
                    .entry(blob.id)
                    .or_default()
                    .push_back(cx.waker().clone());
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(())
            }
        })
        .await;
        drop(self);
    }
}

impl Drop for Parked {
    fn drop(&mut self) {
        self.channel.unpark(self.slot);
    }
}

/// Work counted in a blob's in-flight I/O on a channel, owned (`'static`): the allocation
/// task's share of the count, which outlives a dropped write. Parked as well (see
/// [`Parked`]): a snapshot's freeze does not wait for an allocation.
struct Counted {
    channel: Channel<ChannelContext>,
    slot: usize,
}

impl Counted {
    fn new(channel: &Channel<ChannelContext>, slot: usize) -> Counted {
        channel.admit(slot);
        channel.park(slot);
        Counted {
            channel: channel.clone(),
            slot,
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.channel.unpark(self.slot);
        self.channel.finish(self.slot);
    }
}

/// One thin allocation, everything it needs owned (it runs as its own task).
struct Allocation {
    channel: BlobChannel,
    blob_id: u64,
    parent: Option<Arc<BlobIo>>,
    /// Whether a snapshot up the chain has data at this cluster (else it reads zeros).
    chain_owns: bool,
    index: u64,
    offset: u64,
    data: Option<Vec<u8>>,
}

impl Allocation {
    /// Claims a cluster, fills it (parent data or zeros, then the data), and has the
    /// metadata reactor insert and persist it. `Ok(false)` when another reactor's insert won.
    async fn run(self) -> Result<bool> {
        let channel = &self.channel;
        let cluster_size = channel.store.geometry.cluster_size;
        let claim = ClusterClaim::claim(&channel.store).ok_or_else(|| {
            BlobError::NoSpace(format!(
                "blob {:#x}: no free cluster for a thin write",
                self.blob_id
            ))
        })?;
        // An error below drops the claim (released): every fill write has completed by then.
        let device_start = u64::from(claim.cluster()) * cluster_size;
        let cluster_start = self.index * cluster_size;
        if claim.zeroed() && !self.chain_owns {
            // The cluster reads zeros already (unmapped on a device that promises it): only
            // the new data is written.
            if let Some(data) = self.data.as_deref().filter(|data| !data.is_empty()) {
                let mut piece = DmaBuf::alloc(data.len())?;
                piece.copy_from_slice(data);
                let at = self.offset - cluster_start;
                channel.bdev().write(piece, device_start + at).await.0?;
            }
        } else {
            let mut content = DmaBuf::alloc(cluster_size as usize)?;
            channel
                .read_parent(self.parent.clone(), cluster_start, &mut content)
                .await?;
            if let Some(data) = &self.data {
                let at = (self.offset - cluster_start) as usize;
                content[at..at + data.len()].copy_from_slice(data);
            }
            channel.bdev().write(content, device_start).await.0?;
        }
        // The claim travels with the insert: from here the metadata reactor releases it if
        // it is not inserted (or the insert is undone), even if this task goes away.
        let (store_id, blob_id, index) = (channel.store.store_id, self.blob_id, self.index);
        // The parent the fill read through: the insert is refused if a snapshot taken since
        // has the cluster (the fill would miss its data).
        let read_through = self.parent.as_ref().map(|parent| parent.id);
        let md_reactor = channel.store.md_reactor;
        let inserted = if spool_reactor::reactor_id().ok() == Some(md_reactor) {
            crate::persist::insert_claimed(store_id, blob_id, index, read_through, claim).await
        } else {
            spool_reactor::spawn_on(md_reactor, move || {
                crate::persist::insert_claimed(store_id, blob_id, index, read_through, claim)
            })?
            .await?
        };
        match inserted {
            Ok(()) => Ok(true),
            Err(errno) if errno == -libc::EEXIST => Ok(false),
            Err(errno) => {
                tracing::debug!(
                    blob = format!("{blob_id:#x}"),
                    index,
                    errno,
                    "thin insert failed"
                );
                Err(BlobError::Remote {
                    errno,
                    what: format!("blob {blob_id:#x}: inserting cluster {index} into the metadata"),
                })
            }
        }
    }
}

/// Whether any snapshot up `blob`'s chain has a cluster at blob cluster `index` (if none
/// does, the blob shows zeros there and a new cluster needs no copy).
pub(super) fn chain_owns(blob: &BlobIo, index: usize) -> bool {
    let mut next = blob.parent.load_full();
    while let Some(parent) = next {
        if parent.published(index) != 0 {
            return true;
        }
        next = parent.parent.load_full();
    }
    false
}
