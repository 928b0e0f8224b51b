//! Creating a store (init), closing it cleanly (unload), wiping it (destroy), and the
//! super-block writes in between (the dirty mark, set_super).

use std::collections::{BTreeMap, HashMap};

use spool_bdev::{BdevChannel, BdevDesc};

use super::md_io::{flush, write_bytes, zero_bytes};
use super::{Blobstore, Geometry, MdState};
use crate::bitmap::BitSet;
use crate::error::{BlobError, Result};
use crate::format::layout::Layout;
use crate::format::mask::{encode_mask, mask_region_pages, MaskKind};
use crate::format::super_block::{Bstype, SuperBlock, VERSION};
use crate::format::{BLOBID_INVALID, PAGE_SIZE_U64};

/// Options of [`Blobstore::init`].
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Bytes per cluster: a multiple of 4096 (default 1 MiB).
    pub cluster_size: u64,
    /// Metadata pages; `None` for one per cluster (the default).
    pub md_pages: Option<u32>,
    /// The store's type tag (default all zero: untyped).
    pub bstype: Bstype,
    /// Unmap the data area at init, as SPDK does (default true). Spool does not rely on it
    /// (new thin clusters are written whole); a benchmark turns it off so a fully written
    /// file stays allocated and reads reach the media, and `init --preallocate` so the
    /// reserved space stays reserved. When off, the md area is cleared with write-zeroes
    /// (allocation kept) instead of an unmap.
    pub unmap_data: bool,
    /// Asked between two pieces of the metadata area's clear (256 MiB each): once it says
    /// true, init stops there with [`BlobError::InitStopped`] before writing a super block
    /// (`spool init` passes "a stop signal came"; a 4 GiB md area on a slow disk takes tens of
    /// seconds). `None`: never stops.
    pub stop: Option<fn() -> bool>,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            cluster_size: 1 << 20,
            md_pages: None,
            bstype: [0; 16],
            unmap_data: true,
            stop: None,
        }
    }
}

impl Blobstore {
    /// Formats `desc` as an empty store and returns it open, with the calling reactor as
    /// its metadata reactor. Zeroes the metadata area, unmaps the data area (best effort), flushes,
    /// then writes an empty root superset record and the super block (clean = 0 until the
    /// first unload, with the marker), and flushes.
    pub async fn init(desc: BdevDesc, options: &InitOptions) -> Result<Blobstore> {
        let block_size = u64::from(desc.block_size());
        if block_size > PAGE_SIZE_U64 || !PAGE_SIZE_U64.is_multiple_of(block_size) {
            return Err(BlobError::InvalidArgument(format!(
                "device block size {block_size} does not divide the 4096-byte metadata page"
            )));
        }
        let device_bytes = desc.size_bytes();
        let layout = Layout::compute(device_bytes, options.cluster_size, options.md_pages)?;
        let cluster_size = u32::try_from(options.cluster_size).map_err(|_| {
            BlobError::InvalidArgument(format!(
                "cluster size {} does not fit 32 bits",
                options.cluster_size
            ))
        })?;
        let super_block = SuperBlock {
            version: VERSION,
            clean: 0,
            super_blob: BLOBID_INVALID,
            cluster_size,
            used_page_mask_start: layout.used_page_mask.0,
            used_page_mask_len: layout.used_page_mask.1,
            used_cluster_mask_start: layout.used_cluster_mask.0,
            used_cluster_mask_len: layout.used_cluster_mask.1,
            md_start: layout.md_start,
            md_len: layout.md_len,
            bstype: options.bstype,
            used_blobid_mask_start: layout.used_blobid_mask.0,
            used_blobid_mask_len: layout.used_blobid_mask.1,
            size: device_bytes,
            io_unit_size: block_size as u32,
            root_superset_nonce: None,
        };
        let geometry = Geometry {
            cluster_size: options.cluster_size,
            io_unit_size: block_size,
            block_size,
            md_start: u64::from(layout.md_start),
            md_len: layout.md_len,
            total_clusters: layout.total_clusters,
            md_clusters: layout.md_clusters,
            cluster_shift: super::shift_of(options.cluster_size),
            io_unit_shift: super::shift_of(block_size),
        };
        let mut used_clusters = BitSet::new(layout.total_clusters);
        for cluster in 0..layout.md_clusters {
            used_clusters.set(cluster);
        }
        let state = MdState {
            super_block: super_block.clone(),
            clean_on_disk: false,
            used_md_pages: BitSet::new(u64::from(layout.md_len)),
            used_blobids: BitSet::new(u64::from(layout.md_len)),
            root_superset: None,
            root_superset_lost: false,
            open_blobs: HashMap::new(),
            loading: HashMap::new(),
            awaiting_parent: HashMap::new(),
            clones: BTreeMap::new(),
            parents: HashMap::new(),
            unreadable: HashMap::new(),
            pinned_extent_pages: HashMap::new(),
            unloaded: false,
            read_only: false,
        };
        let inner = Blobstore::new_inner(desc, geometry, &used_clusters, state)?;
        let channel = &inner.md_channel;
        let md_bytes = (u64::from(layout.md_start) + u64::from(layout.md_len)) * PAGE_SIZE_U64;
        // A store that keeps its data area allocated (a preallocated file) keeps its md area
        // allocated too: cleared with write-zeroes, never punched out.
        let unmap_md = options.unmap_data && inner.shared.desc_reads_zeroes;
        clear_md_area(channel, md_bytes, unmap_md, options.stop).await?;
        let data_start = layout.md_clusters * options.cluster_size;
        let data_end = layout.total_clusters * options.cluster_size;
        if options.unmap_data && data_end > data_start {
            // Best effort: thin blobs zero-fill new clusters themselves, unless the device
            // promises zeros for what was unmapped.
            match channel.unmap(data_start, data_end - data_start).await {
                Ok(()) if inner.shared.desc_reads_zeroes => {
                    for cluster in layout.md_clusters..layout.total_clusters {
                        inner.shared.zeroed.set(cluster);
                    }
                }
                Ok(()) => {}
                Err(err) => tracing::debug!(%err, "unmap of the data area at init skipped"),
            }
        }
        // The clears must be durable before the super block that makes the area a store's
        // metadata: a cut that kept the new super block and lost the clear would let a dirty
        // load replay the pages of the store formatted over.
        flush(channel).await?;
        let store = Blobstore::register(inner);
        // The super block (clean = 0) with the marker and an empty root superset: a crash
        // before the first unload recovers by reading the superset's pages only.
        store.start_root_superset(true).await?;
        Ok(store)
    }

    /// Writes the super block from the in-memory state with `clean`.
    pub(crate) async fn write_super(&self, clean: u32) -> Result<()> {
        let page = {
            let state = self.inner.state.borrow();
            let mut block = state.super_block.clone();
            block.clean = clean;
            block.encode()
        };
        write_bytes(&self.inner.md_channel, 0, &page).await?;
        self.inner.durability.wrote();
        self.flush_md().await
    }

    /// Before the first metadata change after a clean load: clears the on-disk clean flag.
    pub(crate) async fn mark_dirty(&self) -> Result<()> {
        let _guard = self.inner.super_lock.lock().await;
        if self.inner.state.borrow().read_only {
            return Err(BlobError::StoreReadOnly("change its metadata"));
        }
        if !self.inner.state.borrow().clean_on_disk {
            return Ok(());
        }
        self.mark_dirty_with_record().await?;
        self.inner.state.borrow_mut().clean_on_disk = false;
        Ok(())
    }

    /// Sets the super blob (any id, or `BLOBID_INVALID` to clear it) and writes the super
    /// block now, keeping its clean flag.
    ///
    /// Dropping the returned future does not cancel the operation: it runs to completion as its
    /// own task on the metadata reactor (the caller's future only waits for its result).
    pub async fn set_super(&self, id: u64) -> Result<()> {
        self.check_md_thread()?;
        let store = self.clone();
        crate::detach::detached_op(
            self.begin_md_op()?,
            async move { store.set_super_now(id).await },
            crate::detach::forget,
        )
        .await
    }

    /// The body of `set_super`, which runs it as its own task.
    async fn set_super_now(&self, id: u64) -> Result<()> {
        self.check_md_thread()?;
        let _guard = self.inner.super_lock.lock().await;
        let clean = {
            let mut state = self.inner.state.borrow_mut();
            state.super_block.super_blob = id;
            u32::from(state.clean_on_disk)
        };
        self.write_super(clean).await
    }

    /// The super blob's id; [`BlobError::NoSuperBlob`] (-ENOENT) when none is set.
    pub fn get_super(&self) -> Result<u64> {
        let id = self.inner.state.borrow().super_block.super_blob;
        if id == BLOBID_INVALID {
            Err(BlobError::NoSuperBlob)
        } else {
            Ok(id)
        }
    }

    fn refuse_if_blobs_open(&self, what: &str) -> Result<()> {
        let open = self.open_blob_count();
        if open > 0 {
            return Err(BlobError::Busy(format!(
                "cannot {what} the blobstore: {open} blob(s) still open"
            )));
        }
        Ok(())
    }

    /// Writes the three masks (md pages, blob ids, clusters) to their regions.
    pub(crate) async fn write_masks(&self) -> Result<()> {
        let regions = {
            let state = self.inner.state.borrow();
            let block = &state.super_block;
            let clusters = self.inner.shared.used_clusters.snapshot();
            let md_len = block.md_len;
            let mut regions = vec![
                (
                    block.used_page_mask_start,
                    encode_mask(
                        MaskKind::UsedPages,
                        md_len,
                        &state.used_md_pages.to_bytes(),
                        mask_region_pages(block.used_page_mask_len, u64::from(md_len)),
                    ),
                ),
                (
                    block.used_cluster_mask_start,
                    encode_mask(
                        MaskKind::UsedClusters,
                        clusters.len() as u32,
                        &clusters.to_bytes(),
                        mask_region_pages(block.used_cluster_mask_len, clusters.len()),
                    ),
                ),
            ];
            if block.used_blobid_mask_len != 0 {
                regions.insert(
                    1,
                    (
                        block.used_blobid_mask_start,
                        encode_mask(
                            MaskKind::UsedBlobIds,
                            md_len,
                            &state.used_blobids.to_bytes(),
                            mask_region_pages(block.used_blobid_mask_len, u64::from(md_len)),
                        ),
                    ),
                );
            }
            regions
        };
        for (start, bytes) in regions {
            write_bytes(
                &self.inner.md_channel,
                u64::from(start) * PAGE_SIZE_U64,
                &bytes,
            )
            .await?;
        }
        Ok(())
    }

    /// Closes the store cleanly: writes the masks, then the super block with clean = 1.
    /// Refused with -EBUSY while any blob is open (the store stays usable). Waits first for
    /// the metadata operations running, for thin writes still filling a claimed cluster and
    /// for requests of dropped blob I/O still on the device (each bounded at about 5 s, then
    /// -EBUSY), and for another unload or destroy still running (after which the store is no
    /// longer loaded: -ENODEV).
    ///
    /// Dropping the returned future does not cancel the operation: it runs to completion as its
    /// own task on the metadata reactor (the caller's future only waits for its result).
    pub async fn unload(self) -> Result<()> {
        self.check_md_thread()?;
        crate::detach::detached(
            async move {
                let _teardown = self.teardown().await;
                self.unload_now().await
            },
            crate::detach::forget,
        )
        .await
    }

    /// The body of `unload`, which runs it as its own task (the teardown lock held).
    async fn unload_now(&self) -> Result<()> {
        self.check_md_thread()?;
        // Metadata operations whose callers went away run on as tasks: wait for them, and
        // take no new ones while writing (closes and internal steps still run), so the masks
        // and clean flag are never written over a half-done operation.
        let _closed = self.close_md_ops("unload").await?;
        // Orphans first: one may hold its parent open.
        self.settle_orphans().await?;
        self.refuse_if_blobs_open("unload")?;
        // A thin first write still filling a cluster it claimed: the masks must not record
        // the claim (its insert will fail: the blob is closed), so wait for it to end; and
        // nothing of a dropped I/O may land after the store said it is done.
        self.wait_for_device_work().await?;
        if self.inner.state.borrow().read_only {
            // Nothing was written; nothing is (the clean flag stays as it was found).
            self.finish();
            return Ok(());
        }
        let _guard = self.inner.super_lock.lock().await;
        // Releases still waiting for a flush (only after a failed one) are free once one
        // completes: the masks must show them free.
        self.drain_releases().await?;
        // The masks overwrite the root superset record, and the clean super block has no
        // marker: SPDK may load and change the store next, and never keeps a superset.
        self.drop_root_superset();
        self.write_masks().await?;
        self.flush_md().await?;
        // From the moment clean = 1 may be on disk, the next metadata change must clear it:
        // if this write or its flush fails, the store stays usable and `mark_dirty` rewrites
        // clean = 0 first.
        self.inner.state.borrow_mut().clean_on_disk = true;
        self.write_super(1).await?;
        self.finish();
        Ok(())
    }

    /// Wipes the super block so the device no longer loads as a store (data and metadata
    /// pages are left as they are). Refused with -EBUSY while any blob is open; waits as
    /// [`Blobstore::unload`] does, so nothing of the store writes to the device after it
    /// returned Ok. A destroy called while another teardown runs waits for it: after a
    /// destroy it returns Ok, after an unload (its caller gone) it still wipes the now clean
    /// super block, as asked.
    ///
    /// Dropping the returned future does not cancel the operation: it runs to completion as its
    /// own task on the metadata reactor (the caller's future only waits for its result).
    pub async fn destroy(self) -> Result<()> {
        self.check_md_thread()?;
        crate::detach::detached(
            async move {
                let _teardown = self.teardown().await;
                self.destroy_queued().await
            },
            crate::detach::forget,
        )
        .await
    }

    /// The body of `destroy`, run as its own task with the teardown lock held, after any
    /// teardown that was running when it was called.
    pub(crate) async fn destroy_queued(&self) -> Result<()> {
        if self.inner.md_ops.destroyed.get() {
            return Ok(()); // a destroy before this one did it
        }
        if self.inner.state.borrow().unloaded {
            // An unload before this one closed the store cleanly and waited for everything
            // it had running: only the super block is left to wipe.
            return self.wipe_super().await;
        }
        self.destroy_now().await
    }

    /// Destroys the loaded store (the teardown lock held).
    async fn destroy_now(&self) -> Result<()> {
        self.check_md_thread()?;
        let _closed = self.close_md_ops("destroy").await?;
        self.refuse_if_blobs_open("destroy")?;
        // A thin first write still filling a cluster it claimed, or a dropped I/O's request
        // still on the device, would write after destroy returned: wait, as unload does.
        self.wait_for_device_work().await?;
        self.wipe_super().await?;
        self.finish();
        Ok(())
    }

    /// Zeroes the super block, durably, and marks the store destroyed.
    async fn wipe_super(&self) -> Result<()> {
        zero_bytes(&self.inner.md_channel, 0, PAGE_SIZE_U64).await?;
        flush(&self.inner.md_channel).await?;
        self.inner.md_ops.destroyed.set(true);
        Ok(())
    }

    /// Waits (at most about 5 s each) until no thin first write holds a claimed cluster (its
    /// fill write may still be on the device) and no request of a dropped blob I/O is still
    /// on the device (`crate::io::HeldCount`); -EBUSY if one still does.
    async fn wait_for_device_work(&self) -> Result<()> {
        let shared = self.shared();
        if !crate::io::wait_until_zero(|| shared.claims_outstanding()).await {
            return Err(BlobError::Busy(
                "a thin write on another reactor still holds a claimed cluster".into(),
            ));
        }
        if !crate::io::wait_until_zero(|| shared.held_io()).await {
            return Err(BlobError::Busy(format!(
                "{} request(s) of dropped blob I/O still on the device",
                shared.held_io()
            )));
        }
        Ok(())
    }

    fn finish(&self) {
        self.inner.state.borrow_mut().unloaded = true;
        self.unregister();
        // Channels still held on other reactors keep working until dropped; no new ones.
        let _ = self.inner.shared.io_device.unregister();
    }
}

/// Clears the first `md_bytes` of the device (super block, masks, md pages) so no page of an
/// earlier store there can be replayed. SPDK's init write-zeroes this area; Spool gets the
/// same zeros with an unmap when the device promises that unmapped blocks read zeros (a
/// file: a punched hole, which takes no disk space, where a file's write-zeroes allocates
/// it), else with write-zeroes (which falls back to writing zeros where the device has no
/// such command). A 1 TiB store's 4 GiB md area then costs a new sparse file nothing.
/// How much of the metadata area init clears per request (a stop is looked at between two).
const MD_CLEAR_PIECE: u64 = 256 << 20;

async fn clear_md_area(
    channel: &BdevChannel,
    md_bytes: u64,
    unmap_reads_zeroes: bool,
    stop: Option<fn() -> bool>,
) -> Result<()> {
    let mut done = 0u64;
    while done < md_bytes {
        if stop.is_some_and(|stop| stop()) {
            return Err(BlobError::InitStopped {
                done,
                total: md_bytes,
            });
        }
        let piece = (md_bytes - done).min(MD_CLEAR_PIECE);
        let mut unmapped = false;
        if unmap_reads_zeroes {
            match channel.unmap(done, piece).await {
                Ok(()) => unmapped = true,
                Err(err) => tracing::debug!(%err, "unmap of the md area failed; writing zeroes"),
            }
        }
        if !unmapped {
            zero_bytes(channel, done, piece).await?;
        }
        done += piece;
    }
    Ok(())
}
