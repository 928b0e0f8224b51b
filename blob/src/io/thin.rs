//! Thin allocation: the first write to an unallocated cluster (see the parent module's doc).

use std::rc::Rc;
use std::sync::atomic::Ordering;

use spool_bdev::DmaBuf;

use super::{BlobChannel, BlobIo};
use crate::error::{BlobError, Result};
use crate::store::Blobstore;
use crate::sync::LocalEvent;

impl BlobChannel {
    /// Gives blob cluster `index` a cluster of its own (the parent's data, or zeros) if it has
    /// none: the "touch" inflate and decouple use.
    pub(crate) async fn touch_cluster(&self, blob: &BlobIo, index: u64) -> Result<()> {
        let offset = index * self.store.geometry.cluster_size;
        self.write_unallocated(blob, index, offset, None).await
    }

    /// Writes `data` at blob byte `offset` inside cluster `index`, allocating the cluster
    /// first if it still has none (see the module doc).
    pub(super) async fn write_unallocated(
        &self,
        blob: &BlobIo,
        index: u64,
        offset: u64,
        data: Option<&[u8]>,
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
                    let device = u64::from(cluster) * cluster_size + offset % cluster_size;
                    let mut tmp = DmaBuf::alloc(data.len())?;
                    tmp.copy_from_slice(data);
                    self.bdev().write(tmp, device).await.0?;
                }
                return Ok(());
            }
            let key = (blob.id, index);
            let waiting = self.channel.allocating.borrow().get(&key).cloned();
            if let Some(event) = waiting {
                event.wait().await;
                continue;
            }
            let event = LocalEvent::new();
            self.channel
                .allocating
                .borrow_mut()
                .insert(key, Rc::clone(&event));
            let result = self.allocate(blob, index, offset, data).await;
            self.channel.allocating.borrow_mut().remove(&key);
            event.set(());
            match result {
                Ok(true) => return Ok(()),
                Ok(false) => continue, // another reactor won: redo against its cluster
                Err(err) => return Err(err),
            }
        }
    }

    /// Claims a cluster, fills it (parent data or zeros, then `data`), and has the
    /// metadata reactor insert and persist it. `Ok(false)` when another reactor's insert won.
    async fn allocate(
        &self,
        blob: &BlobIo,
        index: u64,
        offset: u64,
        data: Option<&[u8]>,
    ) -> Result<bool> {
        let geometry = &self.store.geometry;
        let cluster_size = geometry.cluster_size;
        let (cluster, zeroed) = self.store.claim_cluster_zeroed().ok_or_else(|| {
            BlobError::NoSpace(format!(
                "blob {:#x}: no free cluster for a thin write",
                blob.id
            ))
        })?;
        let device_start = u64::from(cluster) * cluster_size;
        let filled: Result<()> = async {
            if zeroed && !chain_owns(blob, index as usize) {
                // The cluster reads zeros already (unmapped on a device that promises it):
                // only the new data is written.
                if let Some(data) = data {
                    if !data.is_empty() {
                        let mut piece = DmaBuf::alloc(data.len())?;
                        piece.copy_from_slice(data);
                        let at = offset - index * cluster_size;
                        self.bdev().write(piece, device_start + at).await.0?;
                    }
                }
                return Ok(());
            }
            let mut content = DmaBuf::alloc(cluster_size as usize)?;
            let cluster_start = index * cluster_size;
            self.read_backing(blob, cluster_start, &mut content).await?;
            if let Some(data) = data {
                let at = (offset - cluster_start) as usize;
                content[at..at + data.len()].copy_from_slice(data);
            }
            self.bdev()
                .write(content, u64::from(cluster) * cluster_size)
                .await
                .0?;
            Ok(())
        }
        .await;
        if let Err(err) = filled {
            self.store.release_cluster(cluster);
            return Err(err);
        }
        let (store_id, blob_id) = (self.store.store_id, blob.id);
        let inserted = if spool_reactor::reactor_id().ok() == Some(self.store.md_reactor) {
            // Already on the metadata reactor: no message needed.
            match Blobstore::lookup(store_id) {
                Some(store) => {
                    crate::persist::insert_cluster(&store, blob_id, index, cluster).await
                }
                None => Err(-libc::ENODEV),
            }
        } else {
            spool_reactor::spawn_on(self.store.md_reactor, move || async move {
                match Blobstore::lookup(store_id) {
                    Some(store) => {
                        crate::persist::insert_cluster(&store, blob_id, index, cluster).await
                    }
                    None => Err(-libc::ENODEV),
                }
            })?
            .await?
        };
        match inserted {
            Ok(()) => Ok(true),
            Err(errno) => {
                self.store.release_cluster(cluster);
                if errno == -libc::EEXIST {
                    Ok(false)
                } else {
                    Err(BlobError::Remote {
                        errno,
                        what: format!(
                            "blob {blob_id:#x}: inserting cluster {index} into the metadata"
                        ),
                    })
                }
            }
        }
    }
}

/// Whether any snapshot up `blob`'s chain has a cluster at blob cluster `index` (if none
/// does, the blob shows zeros there and a new cluster needs no copy).
fn chain_owns(blob: &BlobIo, index: usize) -> bool {
    let mut next = blob.parent.load_full();
    while let Some(parent) = next {
        if parent.published(index) != 0 {
            return true;
        }
        next = parent.parent.load_full();
    }
    false
}
