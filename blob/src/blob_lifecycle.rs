//! The blob lifecycle on the store: create, open (one in-memory blob per id, concurrent
//! opens sharing the load), delete, and the checks an open makes (clusters in use, snapshot
//! chains that do not loop).

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

use crate::blob::{Blob, BlobOptions, BlobState, MAX_CHAIN_DEPTH};
use crate::error::{BlobError, Result};
use crate::format::md_page::MdPageHeader;
use crate::format::{blobid_to_page, page_to_blobid, INVALID_MD_PAGE};
use crate::io::BlobIo;
use crate::meta::{apply_extent_page, parse_chain, BlobMeta, ClusterCheck, XATTR_SNAPSHOT};
use crate::store::Blobstore;
use crate::sync::LocalEvent;

/// While a blob's load opens its parent: the edge `child -> parent` in the store's
/// `awaiting_parent` map, removed when the open ends or its future is dropped.
struct AwaitingParent<'a> {
    store: &'a Blobstore,
    child: u64,
}

impl<'a> AwaitingParent<'a> {
    fn new(store: &'a Blobstore, child: u64, parent: u64) -> AwaitingParent<'a> {
        store
            .inner
            .state
            .borrow_mut()
            .awaiting_parent
            .insert(child, parent);
        AwaitingParent { store, child }
    }
}

impl Drop for AwaitingParent<'_> {
    fn drop(&mut self) {
        self.store
            .inner
            .state
            .borrow_mut()
            .awaiting_parent
            .remove(&self.child);
    }
}

struct OpenCheck<'a> {
    store: &'a Blobstore,
}

impl ClusterCheck for OpenCheck<'_> {
    fn cluster_ok(&self, cluster: u32) -> bool {
        let shared = self.store.shared();
        u64::from(cluster) >= shared.geometry.md_clusters
            && shared.used_clusters.get(u64::from(cluster))
    }
    fn md_page_ok(&self, page: u32) -> bool {
        page < self.store.geometry().md_len
    }
}

impl Blobstore {
    /// Creates a blob and returns its id (`(1 << 32) | root md page`). The blob is written
    /// to disk and not left open. Errors: -ENOMEM (no md page), -ENOSPC (thick and not
    /// enough clusters), -EINVAL (an xattr too large); nothing is left claimed on failure.
    ///
    /// Dropping the returned future does not cancel the operation: it runs to completion as its
    /// own task on the metadata reactor (the caller's future only waits for its result).
    pub async fn create_blob(&self, options: &BlobOptions) -> Result<u64> {
        self.check_md_thread()?;
        let (store, options) = (self.clone(), options.clone());
        crate::detach::detached_op(
            self.begin_md_op()?,
            async move { store.create_blob_now(&options).await },
            crate::detach::forget,
        )
        .await
    }

    /// The body of `create_blob`, which runs it as its own task.
    async fn create_blob_now(&self, options: &BlobOptions) -> Result<u64> {
        let state = self.create_state(options).await?;
        state.io.mark_closed();
        Ok(state.id)
    }

    /// Creates a blob as [`Blobstore::create_blob`] does and returns it open (one handle),
    /// without reading back what was just written.
    ///
    /// Dropping the returned future does not cancel the operation: it runs to completion as its
    /// own task on the metadata reactor (the caller's future only waits for its result).
    pub async fn create_and_open(&self, options: &BlobOptions) -> Result<Blob> {
        self.check_md_thread()?;
        let (store, options) = (self.clone(), options.clone());
        crate::detach::detached_op(
            self.begin_md_op()?,
            async move { store.create_and_open_now(&options).await },
            crate::detach::close_unclaimed,
        )
        .await
    }

    /// The body of `create_and_open`, which runs it as its own task.
    async fn create_and_open_now(&self, options: &BlobOptions) -> Result<Blob> {
        let state = self.create_state(options).await?;
        self.inner
            .state
            .borrow_mut()
            .open_blobs
            .insert(state.id, Rc::clone(&state));
        Ok(Blob {
            state,
            store: self.clone(),
        })
    }

    async fn create_state(&self, options: &BlobOptions) -> Result<Rc<BlobState>> {
        self.check_md_thread()?;
        let page = {
            let mut state = self.inner.state.borrow_mut();
            let page = state
                .used_md_pages
                .first_clear(0)
                .ok_or_else(|| BlobError::NoMdPages("every metadata page is in use".into()))?;
            state.used_md_pages.set(page);
            state.used_blobids.set(page);
            // The page was free, so whatever the load said of an id over it (a blob-id bit
            // over another blob's page, freed since) is not about this blob.
            state.unreadable.remove(&page_to_blobid(page as u32));
            page as u32
        };
        let id = page_to_blobid(page);
        // A dirty load reads only the root superset's pages for roots: it must cover this
        // one, durably, before the root is written (docs/format.md, "Bounded recovery").
        let result = match self.cover_root(page).await {
            Ok(()) => self.create_at(id, options).await,
            Err(err) => Err(err),
        };
        if result.is_err() {
            let mut state = self.inner.state.borrow_mut();
            state.used_md_pages.clear(u64::from(page));
            state.used_blobids.clear(u64::from(page));
        }
        result
    }

    async fn create_at(&self, id: u64, options: &BlobOptions) -> Result<Rc<BlobState>> {
        let mut meta = BlobMeta::new(id, options.thin, options.form);
        for (name, value) in &options.xattrs {
            meta.set_xattr(false, name.as_bytes(), value)?;
        }
        for (name, value) in &options.internal_xattrs {
            meta.set_xattr(true, name.as_bytes(), value)?;
        }
        let io = BlobIo::new(self.shared(), &meta);
        let state = BlobState::new(meta, Vec::new(), io);
        state.mark_changed();
        crate::resize::resize(self, &state, options.num_clusters)?;
        match crate::persist::persist_outcome(self, &state, crate::persist::Deps::Own).await {
            Err(err) => {
                crate::resize::release_all(self, &state);
                Err(err)
            }
            Ok(late) => {
                if let Some(err) = late {
                    tracing::warn!(blob = format!("{id:#x}"), %err, "created, but a step after the commit failed");
                }
                Ok(state)
            }
        }
    }

    /// Opens blob `id`: the same in-memory blob (refcount + 1) if it is open or being
    /// opened, else loads it from disk (and opens its parent snapshot, if any).
    /// -ENOENT for an id that is not a blob, -EINVAL for corrupt metadata.
    ///
    /// Dropping the returned future does not cancel the operation: it runs to completion as its
    /// own task on the metadata reactor (the caller's future only waits for its result).
    pub fn open_blob(&self, id: u64) -> Pin<Box<dyn Future<Output = Result<Blob>> + '_>> {
        self.open_for(id, None)
    }

    /// Opens blob `id`, for the load of blob `child` (which names it as its parent) if given.
    fn open_for(
        &self,
        id: u64,
        child: Option<u64>,
    ) -> Pin<Box<dyn Future<Output = Result<Blob>> + '_>> {
        Box::pin(async move {
            self.check_md_thread()?;
            let store = self.clone();
            crate::detach::detached_op(
                self.begin_md_op()?,
                async move { store.open_blob_now(id, child).await },
                crate::detach::close_unclaimed,
            )
            .await
        })
    }

    /// The body of `open_blob`, which runs it as its own task.
    fn open_blob_now(
        &self,
        id: u64,
        child: Option<u64>,
    ) -> Pin<Box<dyn Future<Output = Result<Blob>> + '_>> {
        Box::pin(async move {
            self.check_md_thread()?;
            let page = blobid_to_page(id).ok_or(BlobError::NoSuchBlob(id))?;
            let waiting = {
                let state = self.inner.state.borrow();
                if !state.used_blobids.get(u64::from(page)) {
                    return Err(BlobError::NoSuchBlob(id));
                }
                if let Some(reason) = state.unreadable.get(&id) {
                    return Err(BlobError::corrupt(
                        id,
                        format!("{reason} (reported unreadable by the load)"),
                    ));
                }
                if let Some(open) = state.open_blobs.get(&id) {
                    open.open_ref.set(open.open_ref.get() + 1);
                    return Ok(Blob {
                        state: Rc::clone(open),
                        store: self.clone(),
                    });
                }
                state.loading.get(&id).cloned()
            };
            if let Some(event) = waiting {
                if let Some(child) = child {
                    if self.load_waits_on(id, child) {
                        return Err(BlobError::corrupt(
                            child,
                            format!("its snapshot chain loops back through blob {id:#x}"),
                        ));
                    }
                }
                return match event.wait().await {
                    Ok(state) => {
                        state.open_ref.set(state.open_ref.get() + 1);
                        Ok(Blob {
                            state,
                            store: self.clone(),
                        })
                    }
                    Err(_) => Box::pin(self.open_blob(id)).await,
                };
            }
            let event = LocalEvent::new();
            self.inner
                .state
                .borrow_mut()
                .loading
                .insert(id, Rc::clone(&event));
            let loaded = self.load_blob(id, page, child).await;
            self.inner.state.borrow_mut().loading.remove(&id);
            match loaded {
                Ok(state) => {
                    self.inner
                        .state
                        .borrow_mut()
                        .open_blobs
                        .insert(id, Rc::clone(&state));
                    event.set(Ok(Rc::clone(&state)));
                    Ok(Blob {
                        state,
                        store: self.clone(),
                    })
                }
                Err(err) => {
                    event.set(Err(err.errno()));
                    Err(err)
                }
            }
        })
    }

    /// Reads blob `id` (root md page `root`) and opens its parent; `child` is the blob whose
    /// load opens it, if any.
    async fn load_blob(&self, id: u64, root: u32, child: Option<u64>) -> Result<Rc<BlobState>> {
        let channel = &self.inner.md_channel;
        let geometry = self.geometry().clone();
        let mut chain_pages = vec![root];
        let mut bytes = vec![crate::store::read_md_page(channel, &geometry, root).await?];
        loop {
            let header = MdPageHeader::decode(bytes.last().map_or(&[][..], Vec::as_slice));
            if bytes.len() == 1 && header.id != id {
                return Err(BlobError::NoSuchBlob(id));
            }
            if !header.crc_ok {
                return Err(BlobError::corrupt(
                    id,
                    format!(
                        "md page {} : CRC mismatch",
                        chain_pages[chain_pages.len() - 1]
                    ),
                ));
            }
            if header.next == INVALID_MD_PAGE {
                break;
            }
            if header.next >= geometry.md_len {
                return Err(BlobError::corrupt(
                    id,
                    format!("next page {} is outside the md region", header.next),
                ));
            }
            if chain_pages.contains(&header.next) {
                return Err(BlobError::corrupt(
                    id,
                    format!("the chain loops back to md page {}", header.next),
                ));
            }
            chain_pages.push(header.next);
            bytes.push(crate::store::read_md_page(channel, &geometry, header.next).await?);
        }
        let check = OpenCheck { store: self };
        let refs: Vec<&[u8]> = bytes.iter().map(Vec::as_slice).collect();
        let mut parsed = parse_chain(id, &refs, &check)?;
        for &(index, page) in &parsed.pending_extent_pages {
            let ep = crate::store::read_md_page(channel, &geometry, page).await?;
            apply_extent_page(&mut parsed.meta, index, &ep, &check)?;
        }
        let meta = parsed.meta;
        let parent_id = meta.parent_id()?;
        if parent_id.is_some() && !meta.is_thin() {
            return Err(BlobError::corrupt(
                id,
                "a clone that is not thin provisioned",
            ));
        }
        // Opened for a child whose edge to it the graph has, the chain from here was
        // checked with the child's (the walk from the first blob opened covers its whole
        // ancestry): checking again at every level made a deep open quadratic.
        let checked = child.is_some_and(|child| self.parent_of(child) == Some(id))
            && self.parent_of(id) == parent_id;
        if parent_id.is_some() && !checked {
            self.check_ancestry(id, parent_id)?;
        }
        let parent = match parent_id {
            Some(parent_id) if parent_id == id => {
                return Err(BlobError::corrupt(id, "the blob is its own parent"));
            }
            Some(parent_id) => {
                let _edge = AwaitingParent::new(self, id, parent_id);
                Some(self.open_for(parent_id, Some(id)).await.map_err(|err| {
                    BlobError::corrupt(id, format!("{XATTR_SNAPSHOT} names parent {parent_id:#x}, which cannot be opened: {err}"))
                })?)
            }
            None => None,
        };
        let io = BlobIo::new(self.shared(), &meta);
        let state = BlobState::new(meta, chain_pages, io);
        // Its last metadata write is unknown here (it may have been closed with one not yet
        // flushed): taken as the last write made so far, so `Deps::After` stays safe. So is
        // its last in-place extent page write (a thin insert's, made before a close): the
        // next root must not reach the disk before it (seed 4797: an inflate's thick root
        // did, and a cut kept the root without the extent page, a thick blob with a hole).
        let last = self.inner.durability.last_write();
        state.last_write.set(last);
        state.in_place_write.set(last);
        state.replace_parent(parent);
        Ok(state)
    }

    /// Whether the load of `start` waits, through the parents loads are opening, on the
    /// load of `target` (a chain longer than [`MAX_CHAIN_DEPTH`] counts as a loop).
    fn load_waits_on(&self, start: u64, target: u64) -> bool {
        let state = self.inner.state.borrow();
        let mut at = start;
        for _ in 0..=MAX_CHAIN_DEPTH {
            if at == target {
                return true;
            }
            match state.awaiting_parent.get(&at) {
                Some(&next) => at = next,
                None => return false,
            }
        }
        true
    }

    /// Refuses a snapshot chain from `id` (whose parent is `parent`) that loops or is
    /// deeper than [`MAX_CHAIN_DEPTH`]: opening it would wait on itself forever. Linear in
    /// the depth (the open of each ancestor checks its own chain again: a `Vec` searched at
    /// each step made opening the end of a 1,000-deep chain cost 10^8 comparisons).
    fn check_ancestry(&self, id: u64, parent: Option<u64>) -> Result<()> {
        let state = self.inner.state.borrow();
        let mut seen = std::collections::HashSet::from([id]);
        let mut next = parent;
        while let Some(ancestor) = next {
            if seen.contains(&ancestor) {
                return Err(BlobError::corrupt(
                    id,
                    format!("its snapshot chain loops back to blob {ancestor:#x}"),
                ));
            }
            // `seen` holds the blob and the ancestors before this one.
            if seen.len() > MAX_CHAIN_DEPTH {
                return Err(BlobError::corrupt(
                    id,
                    format!("its snapshot chain is deeper than {MAX_CHAIN_DEPTH} snapshots"),
                ));
            }
            seen.insert(ancestor);
            next = state.parents.get(&ancestor).copied();
        }
        Ok(())
    }

    /// Deletes blob `id`: -EBUSY while it is open elsewhere or is a snapshot with several
    /// clones; a snapshot with one clone is merged into it (the clone may be open and doing
    /// I/O: it is frozen for the merge).
    /// Its metadata pages are zeroed (root first) and its clusters released.
    ///
    /// Dropping the returned future does not cancel the operation: it runs to completion as its
    /// own task on the metadata reactor (the caller's future only waits for its result).
    pub async fn delete_blob(&self, id: u64) -> Result<()> {
        self.check_md_thread()?;
        let store = self.clone();
        crate::detach::detached_op(
            self.begin_md_op()?,
            async move { store.delete_blob_now(id).await },
            crate::detach::forget,
        )
        .await
    }

    /// The body of `delete_blob`, which runs it as its own task.
    async fn delete_blob_now(&self, id: u64) -> Result<()> {
        self.check_md_thread()?;
        self.drain_releases().await?;
        // A half-made snapshot of this blob whose removal failed may still be on disk
        // naming its clusters: it goes first, or a crash after this delete would leave it
        // naming clusters given back (seed 412622595).
        self.retry_abandoned_snapshots().await;
        if self.abandoned_snapshot_of(id) {
            return Err(BlobError::Busy(format!(
                "blob {id:#x}: a failed snapshot of it is not removed yet"
            )));
        }
        let clones = self.clones_of(id);
        if clones.len() == 1 {
            // SPDK 19.07 and later: a snapshot with one clone is merged into it.
            return self.merge_into_clone(id, clones[0]).await;
        }
        if !clones.is_empty() {
            let ids: Vec<String> = clones.iter().map(|clone| format!("{clone:#x}")).collect();
            return Err(BlobError::Busy(format!(
                "blob {id:#x} is a snapshot with {} clones ({}): delete all but one, or inflate or decouple them, first",
                clones.len(),
                ids.join(", ")
            )));
        }
        let blob = self.open_blob(id).await?;
        if blob.state.open_ref.get() > 1 {
            let refs = blob.state.open_ref.get() - 1;
            blob.close().await?;
            return Err(BlobError::Busy(format!(
                "blob {id:#x} is open ({refs} handle(s))"
            )));
        }
        self.delete_open(blob).await
    }

    /// Deletes the blob `blob` is the only handle of (the caller checked).
    pub(crate) async fn delete_open(&self, blob: Blob) -> Result<()> {
        // After every earlier metadata write: a root that stopped naming this blob (an
        // inflate, a decouple, a second snapshot) must be durable before it goes.
        self.delete_open_with(blob, crate::persist::Deps::All).await
    }

    /// [`Blobstore::delete_open`], with what the root's zeroing depends on. When the delete
    /// does not commit, the handle is given back and the blob stays (in memory as it is, for
    /// a retry or for unload to write; on disk and in the clone graph as it was); when it
    /// commits, it is gone whatever fails after (that error is returned).
    pub(crate) async fn delete_open_with(
        &self,
        blob: Blob,
        deps: crate::persist::Deps,
    ) -> Result<()> {
        let id = blob.id();
        // Its parent's root made durable first (see `settle_parent`); every caller passes
        // `Deps::All`, which orders the zeroing after it.
        let parent = blob.state.parent.borrow().clone();
        if let Some(parent) = &parent {
            if let Err(err) = crate::snapshot::settle_parent(self, parent).await {
                blob.state
                    .open_ref
                    .set(blob.state.open_ref.get().saturating_sub(1));
                return Err(err);
            }
        }
        drop(parent);
        // A dropped request of this blob's I/O may still be on the device under an earlier
        // handle (dropped after that handle's last close): its clusters must not be freed
        // under it. Only dropped requests count, so this costs nothing without them.
        let shared = self.shared();
        if !crate::io::wait_until_zero(|| shared.held_io()).await {
            blob.state
                .open_ref
                .set(blob.state.open_ref.get().saturating_sub(1));
            return Err(BlobError::Busy(format!(
                "blob {id:#x}: {} request(s) of dropped blob I/O still on the device",
                shared.held_io()
            )));
        }
        // A snapshot whose merge into its clone committed before an earlier delete attempt
        // failed: the clone owns some of the clusters its root still names.
        let outcome = match self.forget_merged_clusters(&blob).await {
            Ok(()) => crate::persist::delete(self, &blob.state, deps).await,
            Err(err) => Err(err),
        };
        let outcome = match outcome {
            Err(err) => {
                // Not deleted: the blob stays in memory as it is (what a merge already took
                // from it included) for the retry, or for unload to write.
                blob.state
                    .open_ref
                    .set(blob.state.open_ref.get().saturating_sub(1));
                return Err(err);
            }
            Ok(late) => late,
        };
        self.unlink_clone(id);
        self.inner.state.borrow_mut().open_blobs.remove(&id);
        // A half-made snapshot gone: the extent pages it shared with its original that the
        // original dropped meanwhile are freed (its root's zeroing is durable once
        // `outcome` is `None`; otherwise the next successful flush frees them).
        for page in self.unpin_extent_pages(id) {
            self.inner
                .durability
                .queue(crate::store::durability::Release::MdPage(page));
        }
        blob.state.io.mark_closed();
        let parent = blob.state.replace_parent(None);
        let closed = match parent {
            Some(parent) => parent.close().await,
            None => Ok(()),
        };
        match outcome {
            Some(err) => Err(err),
            None => closed,
        }
    }
}
