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
        let mut lvols = BTreeMap::new();
        let mut unreadable = Vec::new();
        for id in store.blob_ids() {
            if id == super_blob {
                continue;
            }
            match read_lvol(&store, id).await {
                Ok(Some(entry)) => {
                    lvols.insert(id, entry);
                }
                Ok(None) => {}
                Err(LvolReadError::Open(err)) => {
                    tracing::warn!(blob = format!("{id:#x}"), %err, "skipping a blob that cannot be opened");
                    unreadable.push((id, err.to_string()));
                }
                Err(LvolReadError::Store(err)) => return Err(err),
            }
        }
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
    pub async fn destroy(self) -> Result<()> {
        let store = self.inner.store.clone();
        store.check_md_thread()?;
        if store.open_blob_count() > 0 {
            return Err(BlobError::Busy(format!(
                "cannot destroy lvol store '{}': {} blob(s) still open",
                self.name(),
                store.open_blob_count()
            )));
        }
        store.delete_blob(self.inner.super_blob).await?;
        store.destroy().await
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

/// Why reading an lvol failed: a blob that cannot be opened is skipped; anything else fails
/// the store.
enum LvolReadError {
    Open(BlobError),
    Store(BlobError),
}

/// The name and uuid of blob `id`; `None` for a blob that is not an lvol of this view (a
/// half-made snapshot the load will remove).
async fn read_lvol(store: &Blobstore, id: u64) -> Result<Option<LvolEntry>, LvolReadError> {
    let blob = store.open_blob(id).await.map_err(LvolReadError::Open)?;
    let half_made = blob
        .internal_xattr(crate::meta::XATTR_SNAPSHOT_PENDING)
        .is_some();
    let name_raw = blob.xattr(NAME_XATTR);
    let uuid_raw = blob.xattr(UUID_XATTR);
    blob.close().await.map_err(LvolReadError::Store)?;
    if half_made {
        return Ok(None);
    }
    let name = name_raw.as_deref().and_then(parse_name).ok_or_else(|| {
        LvolReadError::Store(BlobError::corrupt(
            id,
            format!(
                "a blob of an lvol store has {}",
                describe_bad_name(name_raw.as_deref())
            ),
        ))
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
