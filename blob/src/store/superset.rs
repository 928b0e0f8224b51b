//! Keeping the root superset (format in [`crate::format::root_superset`]): set up when the
//! store goes dirty (the first metadata change after a clean load, init, a recovery), grown
//! ahead of any blob create whose root page it does not cover (durable before the root is
//! written), and dropped by a clean unload (the masks overwrite the record, the clean super
//! block has no marker). docs/format.md, "Bounded recovery", has the rules and hazards.

use std::hash::{BuildHasher, Hasher};

use super::md_io::write_bytes;
use super::Blobstore;
use crate::error::Result;
use crate::format::mask::mask_region_pages;
use crate::format::root_superset::{chunk_shift, RootSuperset};
use crate::format::super_block::SuperBlock;
use crate::format::{PAGE_SIZE, PAGE_SIZE_U64};

/// A fresh random nonce (the std hasher's per-process random keys, and the clock).
fn fresh_nonce() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos());
    hasher.write_u128(now);
    hasher.finish()
}

/// Pages of the blob-id mask region a record may use (those every mask write covers).
pub(crate) fn record_region_pages(block: &SuperBlock) -> u32 {
    mask_region_pages(block.used_blobid_mask_len, u64::from(block.md_len))
}

/// A new record for `block`'s store covering the chunks of `roots` and of `next_root`
/// (where the next create's root goes); `None` when the store has no room for one (no
/// blob-id mask region: a pre-v3 store). Creates take the first free md page, so the record
/// grows about once per chunk (64 pages) of new metadata.
pub(crate) fn plan_record(
    block: &SuperBlock,
    roots: impl Iterator<Item = u64>,
    next_root: Option<u64>,
) -> Option<RootSuperset> {
    let shift = chunk_shift(block.md_len, record_region_pages(block))?;
    let mut record = RootSuperset::new(fresh_nonce(), block.md_len, shift);
    for page in roots {
        record.add_chunk(page >> shift);
    }
    if let Some(page) = next_root {
        record.add_chunk(page >> shift);
    }
    Some(record)
}

impl Blobstore {
    /// Writes `record` over the blob-id mask region: only the pages that differ from `old`
    /// (all of them without `old`). No flush.
    pub(crate) async fn write_record(
        &self,
        old: Option<&RootSuperset>,
        record: &RootSuperset,
    ) -> Result<()> {
        let start = u64::from(self.inner.state.borrow().super_block.used_blobid_mask_start);
        let new = record.encode();
        let old = old.map(RootSuperset::encode);
        for (index, page) in new.chunks(PAGE_SIZE).enumerate() {
            let same = old
                .as_ref()
                .and_then(|old| old.get(index * PAGE_SIZE..(index + 1) * PAGE_SIZE))
                .is_some_and(|old| old == page);
            if !same {
                let offset = (start + index as u64) * PAGE_SIZE_U64;
                write_bytes(&self.inner.md_channel, offset, page).await?;
                self.inner.durability.wrote();
            }
        }
        Ok(())
    }

    /// A record for the blobs in memory now; `None` when the store has no room for one.
    pub(crate) fn plan_current_record(&self) -> Option<RootSuperset> {
        let state = self.inner.state.borrow();
        let next_root = state.used_md_pages.first_clear(0);
        plan_record(&state.super_block, state.used_blobids.iter_set(), next_root)
    }

    /// Sets the record up on a store whose super block says dirty on disk and whose
    /// blob-id mask region holds no record of this session (init, after a recovery): the
    /// record and then the super block with the marker, one flush. A cut in between leaves
    /// a nonce mismatch (the full scan). Without room for a record only the super block is
    /// written, and only when `write_super` asks for it (init).
    pub(crate) async fn start_root_superset(&self, write_super: bool) -> Result<()> {
        let _guard = self.inner.super_lock.lock().await;
        let record = self.plan_current_record();
        {
            let mut state = self.inner.state.borrow_mut();
            state.root_superset = None;
            state.super_block.root_superset_nonce = record.as_ref().map(|record| record.nonce);
        }
        let Some(record) = record else {
            // No room: no marker (and none on disk can match a record).
            return if write_super {
                self.write_super(0).await
            } else {
                Ok(())
            };
        };
        self.write_record(None, &record).await?;
        self.write_super(0).await?;
        let mut state = self.inner.state.borrow_mut();
        state.root_superset = Some(record);
        state.root_superset_lost = false;
        Ok(())
    }

    /// The dirty mark with the record (called by `mark_dirty` under the super lock, the
    /// store clean on disk): the super block with clean = 0 and the marker first, flushed,
    /// and only then the record over the blob-id mask, flushed. The other order could let a
    /// cut keep the record under a super block that still says clean, whose loaders (SPDK's
    /// too) read that region as the blob-id mask.
    pub(crate) async fn mark_dirty_with_record(&self) -> Result<()> {
        let record = self.plan_current_record();
        {
            let mut state = self.inner.state.borrow_mut();
            state.root_superset = None;
            state.super_block.root_superset_nonce = record.as_ref().map(|record| record.nonce);
        }
        self.write_super(0).await?;
        if let Some(record) = record {
            self.write_record(None, &record).await?;
            self.flush_md().await?;
            let mut state = self.inner.state.borrow_mut();
            state.root_superset = Some(record);
            state.root_superset_lost = false;
        }
        Ok(())
    }

    /// Makes sure md page `root`, about to become a blob's root page, is covered by a
    /// durable record before the root is written: marks the store dirty first (which sets
    /// the record up), then grows the record if `root` is outside it (written and flushed
    /// under the super lock; a create that finds its chunk covered meanwhile skips it). A
    /// store without a record (no room for one, or unloading) needs nothing: its next dirty
    /// load scans the whole md region.
    pub(crate) async fn cover_root(&self, root: u32) -> Result<()> {
        self.mark_dirty().await?;
        if self.inner.state.borrow().root_superset_lost {
            // After a failed unload: a new record (new nonce) before any root is written.
            self.start_root_superset(false).await?;
        }
        if self.root_covered(root) {
            return Ok(());
        }
        let _guard = self.inner.super_lock.lock().await;
        if self.root_covered(root) || self.inner.durability.skip_superset.get() {
            return Ok(());
        }
        let (old, grown) = {
            let state = self.inner.state.borrow();
            let Some(old) = state.root_superset.clone() else {
                return Ok(());
            };
            let mut grown = old.clone();
            grown.add_chunk(grown.chunk_of(root));
            (old, grown)
        };
        self.write_record(Some(&old), &grown).await?;
        self.flush_md().await?;
        self.inner.state.borrow_mut().root_superset = Some(grown);
        Ok(())
    }

    /// Whether `root` is covered by the durable record, or no record is kept.
    fn root_covered(&self, root: u32) -> bool {
        self.inner
            .state
            .borrow()
            .root_superset
            .as_ref()
            .is_none_or(|record| record.covers(root))
    }

    /// Drops the record before a clean unload writes the masks over it: from here on no
    /// create relies on it, and the clean super block carries no marker. If the unload then
    /// fails, the record is marked lost and the next create sets a new one up.
    pub(crate) fn drop_root_superset(&self) {
        let mut state = self.inner.state.borrow_mut();
        state.root_superset_lost = state.root_superset.is_some();
        state.root_superset = None;
        state.super_block.root_superset_nonce = None;
    }

    /// Md pages the durable record covers (`None` without a record).
    pub fn root_superset_pages(&self) -> Option<u64> {
        self.inner
            .state
            .borrow()
            .root_superset
            .as_ref()
            .map(RootSuperset::page_count)
    }

    /// Test support: never grow the record ahead of a create (the planted bug the bounded
    /// recovery's crash tests must catch).
    #[doc(hidden)]
    pub fn testing_skip_root_superset_growth(&self, skip: bool) {
        self.inner.durability.skip_superset.set(skip);
    }
}
