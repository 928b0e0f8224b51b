//! The lvol store itself: making one (a blobstore of bstype `LVOLSTORE` and a super blob
//! holding the store's `uuid` and `name`), opening one (reading the super blob, then every
//! blob's `name` and `uuid`, as SPDK's `spdk_lvs_load` does), renaming, unloading and
//! destroying it.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use spool_bdev::BdevDesc;
use uuid::Uuid;

use super::xattr::{
    check_name, parse_name, parse_uuid, terminated_name_value, uuid_value, LVS_BSTYPE, NAME_XATTR,
    UUID_XATTR,
};
use super::{LvolEntry, LvolStore, LvsInner, LvsState};
use crate::blob::BlobOptions;
use crate::error::{BlobError, Result};
use crate::format::super_block::{bstype_from_name, bstype_name, Bstype};
use crate::store::{Blobstore, InitOptions, LoadOptions, LoadReport};

/// The bstype of an lvol store as the super block holds it.
fn lvs_bstype() -> Bstype {
    let mut bstype = [0; 16];
    bstype[..LVS_BSTYPE.len()].copy_from_slice(LVS_BSTYPE.as_bytes());
    debug_assert_eq!(bstype_from_name(LVS_BSTYPE), Some(bstype));
    bstype
}

/// Options of [`LvolStore::init`]: the blobstore's (its bstype is set to `LVOLSTORE`) and
/// the store's name.
#[derive(Debug, Clone)]
pub struct LvsInitOptions {
    /// The store's name: 1 to 63 bytes, no NUL.
    pub name: String,
    /// The blobstore's options. Its bstype must be all zero or `LVOLSTORE`; SPDK's lvol
    /// stores default to 4 MiB clusters ([`super::LVS_CLUSTER_SIZE_DEFAULT`]).
    pub init: InitOptions,
}

impl LvolStore {
    /// Formats `desc` as an lvol store named `options.name`, as SPDK's `spdk_lvs_init` does:
    /// a blobstore of bstype `LVOLSTORE`, then its super blob with `uuid` (a new random one)
    /// and `name`. The calling reactor becomes the metadata reactor. -EINVAL for a bad name
    /// or bstype (nothing is written then); if the super blob cannot be made, the new store
    /// is destroyed again (as SPDK does) and the error returned.
    pub async fn init(desc: BdevDesc, options: &LvsInitOptions) -> Result<LvolStore> {
        check_name(&options.name, "lvol store")?;
        check_bstype(&options.init.bstype)?;
        let init = InitOptions {
            bstype: lvs_bstype(),
            ..options.init.clone()
        };
        let store = Blobstore::init(desc, &init).await?;
        match LvolStore::format(store.clone(), &options.name).await {
            Ok(lvs) => Ok(lvs),
            Err(err) => {
                if let Err(destroy) = store.destroy().await {
                    tracing::warn!(%destroy, "destroying a half-made lvol store failed");
                }
                Err(err)
            }
        }
    }

    /// Makes the empty blobstore `store` an lvol store named `name`: sets its bstype to
    /// `LVOLSTORE` (if it was untyped), creates the super blob with `uuid` and `name` (in that
    /// order, as SPDK) and sets it as the super blob (which writes the bstype). -EINVAL for a
    /// bad name, another bstype, or a store that holds blobs; -EEXIST when a super blob is set.
    ///
    /// Dropping the returned future does not cancel the operation: it runs to completion as its
    /// own task on the metadata reactor (the caller's future only waits for its result).
    pub async fn format(store: Blobstore, name: &str) -> Result<LvolStore> {
        store.check_md_thread()?;
        let name = name.to_string();
        crate::detach::detached_op(
            store.begin_md_op()?,
            async move { LvolStore::format_now(store, &name).await },
            crate::detach::forget,
        )
        .await
    }

    /// The body of `format`, which runs it as its own task.
    async fn format_now(store: Blobstore, name: &str) -> Result<LvolStore> {
        check_name(name, "lvol store")?;
        check_bstype(&store.bstype())?;
        if let Ok(id) = store.get_super() {
            return Err(BlobError::Exists(format!(
                "the blobstore already has a super blob ({id:#x}): it is not a new store"
            )));
        }
        let blobs = store.blob_ids().len();
        if blobs != 0 {
            return Err(BlobError::InvalidArgument(format!(
                "the blobstore holds {blobs} blob(s): an lvol store is made on an empty one"
            )));
        }
        let uuid = Uuid::new_v4();
        let super_blob = store
            .create_blob(&BlobOptions {
                xattrs: vec![
                    (UUID_XATTR.into(), uuid_value(&uuid)),
                    (NAME_XATTR.into(), terminated_name_value(name)),
                ],
                ..BlobOptions::default()
            })
            .await?;
        store.set_bstype(lvs_bstype());
        if let Err(err) = store.set_super(super_blob).await {
            if let Err(delete) = store.delete_blob(super_blob).await {
                tracing::warn!(%delete, "removing the super blob of a failed lvol store");
            }
            return Err(err);
        }
        Ok(LvolStore::new(
            store,
            super_blob,
            name.to_string(),
            uuid,
            BTreeMap::new(),
            Vec::new(),
        ))
    }

    /// Loads the lvol store on `desc` (a blobstore load that requires bstype `LVOLSTORE`,
    /// -ENXIO otherwise), then opens it as [`LvolStore::open`] does; if that fails, the
    /// blobstore is unloaded again (as SPDK does) and the error returned.
    pub async fn load(desc: BdevDesc) -> Result<(LvolStore, LoadReport)> {
        let options = LoadOptions {
            bstype: lvs_bstype(),
            ..LoadOptions::default()
        };
        let (store, report) = Blobstore::load(desc, &options).await?;
        match LvolStore::open(store.clone()).await {
            Ok(lvs) => Ok((lvs, report)),
            Err(err) => {
                if let Err(unload) = store.unload().await {
                    tracing::warn!(%unload, "unloading a store that is not an lvol store failed");
                }
                Err(err)
            }
        }
    }

    /// Opens the loaded blobstore `store` as an lvol store, as SPDK's `spdk_lvs_load` reads
    /// one: bstype `LVOLSTORE` (-ENXIO otherwise); a super blob that opens (-ENODEV
    /// otherwise) with a valid `uuid` and a `name` of at most 64 bytes (-EINVAL otherwise);
    /// then every other blob: its `name` (required, at most 64 bytes: -EINVAL for the whole
    /// store otherwise, as SPDK) and `uuid` (nil when missing or bad, as SPDK). A blob that
    /// cannot be opened is skipped, as SPDK's iteration does (see
    /// [`LvolStore::unreadable_blobs`]). Every blob opened here is closed again.
    ///
    /// Dropping the returned future does not cancel the operation: it runs to completion as its
    /// own task on the metadata reactor (the caller's future only waits for its result).
    pub async fn open(store: Blobstore) -> Result<LvolStore> {
        store.check_md_thread()?;
        crate::detach::detached_op(
            store.begin_md_op()?,
            async move { LvolStore::open_now(store).await },
            crate::detach::forget,
        )
        .await
    }

    /// The body of `open`, which runs it as its own task.
    async fn open_now(store: Blobstore) -> Result<LvolStore> {
        let bstype = store.bstype();
        if bstype != lvs_bstype() {
            return Err(BlobError::BstypeMismatch {
                wanted: LVS_BSTYPE.into(),
                found: bstype_name(&bstype),
            });
        }
        let super_blob = store
            .get_super()
            .map_err(|_| BlobError::NotLvolStore("no super blob is set".into()))?;
        let (name, uuid) = read_super_blob(&store, super_blob).await?;
        let (lvols, unreadable) = read_lvols(&store, super_blob).await?;
        Ok(LvolStore::new(
            store, super_blob, name, uuid, lvols, unreadable,
        ))
    }

    fn new(
        store: Blobstore,
        super_blob: u64,
        name: String,
        uuid: Uuid,
        lvols: BTreeMap<u64, LvolEntry>,
        unreadable: Vec<(u64, String)>,
    ) -> LvolStore {
        LvolStore {
            inner: Rc::new(LvsInner {
                store,
                super_blob,
                state: RefCell::new(LvsState {
                    name,
                    uuid,
                    lvols,
                    pending_names: BTreeSet::new(),
                    unreadable,
                }),
            }),
        }
    }

    /// Renames the store: its super blob's `name` becomes `new_name` and a NUL (as SPDK's
    /// `spdk_lvs_rename` writes it). The same name succeeds at once; -EINVAL for a bad name.
    /// (Uniqueness among stores is for whoever holds several; SPDK's -EEXIST comes from its
    /// global list.)
    ///
    /// Dropping the returned future does not cancel the operation: it runs to completion as its
    /// own task on the metadata reactor (the caller's future only waits for its result).
    pub async fn rename(&self, new_name: &str) -> Result<()> {
        self.inner.store.check_md_thread()?;
        let (lvs, new_name) = (self.clone(), new_name.to_string());
        crate::detach::detached_op(
            self.inner.store.begin_md_op()?,
            async move { lvs.rename_now(&new_name).await },
            crate::detach::forget,
        )
        .await
    }

    /// The body of `rename`, which runs it as its own task.
    async fn rename_now(&self, new_name: &str) -> Result<()> {
        check_name(new_name, "lvol store")?;
        if self.name() == new_name {
            return Ok(());
        }
        let blob = self.inner.store.open_blob(self.inner.super_blob).await?;
        let written = match blob.set_xattr(NAME_XATTR, &terminated_name_value(new_name)) {
            Ok(()) => blob.sync_md().await,
            Err(err) => Err(err),
        };
        let closed = blob.close().await;
        written?;
        closed?;
        self.inner.state.borrow_mut().name = new_name.to_string();
        Ok(())
    }

    /// Unloads the blobstore cleanly ([`Blobstore::unload`]: -EBUSY while a blob is open).
    pub async fn unload(self) -> Result<()> {
        self.inner.store.clone().unload().await
    }

    /// Destroys the store as SPDK's `spdk_lvs_destroy` does: deletes the super blob, then
    /// wipes the super block ([`Blobstore::destroy`]). The lvols' blobs are not deleted one by
    /// one (the device no longer loads as a store); -EBUSY while any blob is open.
    ///
    /// Dropping the returned future does not cancel the operation: both steps run to
    /// completion as one task on the metadata reactor, holding the store's teardown lock (an
    /// unload or destroy called meanwhile waits for it), so no caller going away leaves a
    /// store without its super blob.
    pub async fn destroy(self) -> Result<()> {
        self.inner.store.check_md_thread()?;
        crate::detach::detached(
            async move { self.destroy_now().await },
            crate::detach::forget,
        )
        .await
    }

    /// The body of `destroy`, which runs it as its own task.
    async fn destroy_now(&self) -> Result<()> {
        let store = &self.inner.store;
        let _teardown = store.teardown().await;
        if !store.inner.state.borrow().unloaded {
            store.check_md_thread()?;
            if store.open_blob_count() > 0 {
                return Err(BlobError::Busy(format!(
                    "cannot destroy lvol store '{}': {} blob(s) still open",
                    self.name(),
                    store.open_blob_count()
                )));
            }
            store.delete_blob(self.inner.super_blob).await?;
        }
        // As `Blobstore::destroy` after whatever teardown ran before this one.
        store.destroy_queued().await
    }
}

/// Refuses a bstype that is neither untyped nor `LVOLSTORE` (-EINVAL).
fn check_bstype(bstype: &Bstype) -> Result<()> {
    if *bstype == [0; 16] || *bstype == lvs_bstype() {
        return Ok(());
    }
    Err(BlobError::InvalidArgument(format!(
        "the blobstore's type is {:?}: an lvol store's is {LVS_BSTYPE:?}",
        bstype_name(bstype)
    )))
}

/// The store's name and uuid from the super blob `id` (see [`LvolStore::open`]).
async fn read_super_blob(store: &Blobstore, id: u64) -> Result<(String, Uuid)> {
    let blob = store.open_blob(id).await.map_err(|err| {
        BlobError::NotLvolStore(format!("the super blob {id:#x} cannot be opened: {err}"))
    })?;
    let uuid_raw = blob.xattr(UUID_XATTR);
    let name_raw = blob.xattr(NAME_XATTR);
    blob.close().await?;
    let uuid = uuid_raw.as_deref().and_then(parse_uuid).ok_or_else(|| {
        BlobError::corrupt(
            id,
            format!(
                "the lvol store's super blob has {}",
                describe_bad_uuid(uuid_raw.as_deref())
            ),
        )
    })?;
    let name = name_raw.as_deref().and_then(parse_name).ok_or_else(|| {
        BlobError::corrupt(
            id,
            format!(
                "the lvol store's super blob has {}",
                describe_bad_name(name_raw.as_deref())
            ),
        )
    })?;
    Ok((name, uuid))
}

/// Every lvol's name and uuid (all blobs but the super blob `super_blob`), and the blobs
/// that cannot be opened (skipped, as SPDK's iteration skips them), in id order.
///
/// Each blob is loaded once: the snapshot graph is walked depth first from the blobs with
/// no parent, a blob opened while its parent's handle is still held (so its open reads only
/// its own metadata), the handles along the current path held and no others. Opening each
/// blob from scratch in id order reloaded its whole ancestry every time: a volume with
/// 1,000 snapshots cost half a million blob loads. Blobs the walk cannot reach (a parent
/// that does not open, a loop) are opened on their own afterwards.
async fn read_lvols(
    store: &Blobstore,
    super_blob: u64,
) -> Result<(BTreeMap<u64, LvolEntry>, Vec<(u64, String)>)> {
    let ids = store.blob_ids();
    let roots = ids
        .iter()
        .copied()
        .filter(|&id| store.parent_of(id).is_none());
    let mut scan = LvolScan {
        store,
        seen: std::collections::HashSet::from([super_blob]),
        path: Vec::new(),
        lvols: BTreeMap::new(),
        unreadable: Vec::new(),
    };
    let mut starts = roots.chain(ids.iter().copied());
    let scanned = loop {
        let Some(start) = starts.next() else {
            break Ok(());
        };
        if let Err(err) = scan.walk_from(start).await {
            break Err(err);
        }
    };
    // On an error the handles still held are given back before it is returned.
    let mut closed = Ok(());
    while let Some((blob, _)) = scan.path.pop() {
        let result = blob.close().await;
        if closed.is_ok() {
            closed = result;
        }
    }
    scanned?;
    closed?;
    scan.unreadable.sort_by_key(|(id, _)| *id);
    Ok((scan.lvols, scan.unreadable))
}

/// The depth-first walk of [`read_lvols`].
struct LvolScan<'a> {
    store: &'a Blobstore,
    /// Blobs opened (or tried) already, the super blob included.
    seen: std::collections::HashSet<u64>,
    /// The open handles from the walk's start down to the blob being read, each with the
    /// clones it has left to visit.
    path: Vec<(crate::blob::Blob, std::collections::VecDeque<u64>)>,
    lvols: BTreeMap<u64, LvolEntry>,
    unreadable: Vec<(u64, String)>,
}

impl LvolScan<'_> {
    /// Reads `start` (unless seen) and, depth first, every clone below it not seen yet.
    async fn walk_from(&mut self, start: u64) -> Result<()> {
        self.enter(start).await?;
        while let Some((_, clones)) = self.path.last_mut() {
            match clones.pop_front() {
                Some(clone) => self.enter(clone).await?,
                None => {
                    if let Some((blob, _)) = self.path.pop() {
                        blob.close().await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Opens and reads blob `id` unless seen; an opened blob joins the path.
    async fn enter(&mut self, id: u64) -> Result<()> {
        if !self.seen.insert(id) {
            return Ok(());
        }
        let blob = match self.store.open_blob(id).await {
            Ok(blob) => blob,
            Err(err) => {
                tracing::warn!(blob = format!("{id:#x}"), %err, "skipping a blob that cannot be opened");
                self.unreadable.push((id, err.to_string()));
                return Ok(());
            }
        };
        let entry = read_lvol(&blob);
        let clones = self.store.clones_of(id).into();
        self.path.push((blob, clones));
        if let Some(entry) = entry? {
            self.lvols.insert(id, entry);
        }
        Ok(())
    }
}

/// The name and uuid of the open blob `blob`; `None` for a blob that is not an lvol of this
/// view (a half-made snapshot the load will remove). A missing or bad name fails the store.
fn read_lvol(blob: &crate::blob::Blob) -> Result<Option<LvolEntry>> {
    let id = blob.id();
    let half_made = blob
        .internal_xattr(crate::meta::XATTR_SNAPSHOT_PENDING)
        .is_some();
    if half_made {
        return Ok(None);
    }
    let name_raw = blob.xattr(NAME_XATTR);
    let uuid_raw = blob.xattr(UUID_XATTR);
    let name = name_raw.as_deref().and_then(parse_name).ok_or_else(|| {
        BlobError::corrupt(
            id,
            format!(
                "a blob of an lvol store has {}",
                describe_bad_name(name_raw.as_deref())
            ),
        )
    })?;
    let uuid = uuid_raw
        .as_deref()
        .and_then(parse_uuid)
        .unwrap_or_else(Uuid::nil);
    if uuid.is_nil() {
        tracing::info!(
            blob = format!("{id:#x}"),
            "lvol has no valid uuid: SPDK names it by store uuid and blob id"
        );
    }
    Ok(Some(LvolEntry { name, uuid }))
}

fn describe_bad_name(value: Option<&[u8]>) -> String {
    match value {
        None => "no `name` xattr".into(),
        Some(value) => format!(
            "a `name` xattr of {} bytes (at most {})",
            value.len(),
            super::xattr::NAME_BYTES_MAX
        ),
    }
}

fn describe_bad_uuid(value: Option<&[u8]>) -> String {
    match value {
        None => "no `uuid` xattr".into(),
        Some(value) => format!(
            "a bad `uuid` xattr ({} bytes: {:?}; 36 characters and a NUL expected)",
            value.len(),
            String::from_utf8_lossy(value)
        ),
    }
}
