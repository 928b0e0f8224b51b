//! The lvols of a store: lookups (by uuid, alias or name), listing, and the operations SPDK's
//! lvol layer has (create, snapshot, clone, rename, resize, set read-only, inflate, decouple,
//! delete), each mapped onto the blobstore's own and keeping the store's table in step.

use uuid::Uuid;

use super::xattr::{
    check_name, lvol_name_value, terminated_name_value, uuid_value, NAME_XATTR, UUID_XATTR,
};
use super::{Lvol, LvolEntry, LvolInfo, LvolStore, NameReservation};
use crate::blob::{Blob, BlobOptions};
use crate::error::{BlobError, Result};
use crate::meta::ExtentForm;

impl LvolStore {
    /// Every lvol, by blob id (no I/O).
    pub fn lvols(&self) -> Vec<Lvol> {
        let entries: Vec<(u64, LvolEntry)> = self
            .inner
            .state
            .borrow()
            .lvols
            .iter()
            .map(|(&id, entry)| (id, entry.clone()))
            .collect();
        entries
            .iter()
            .map(|(id, entry)| self.lvol_of(*id, entry))
            .collect()
    }

    /// The lvol whose blob is `id`; -ENOENT when it is not an lvol of this store.
    pub fn lvol(&self, id: u64) -> Result<Lvol> {
        let entry = self.inner.state.borrow().lvols.get(&id).cloned();
        match entry {
            Some(entry) => Ok(self.lvol_of(id, &entry)),
            None => Err(BlobError::NotFound(format!(
                "blob {id:#x} is not an lvol of lvol store '{}'",
                self.name()
            ))),
        }
    }

    /// The lvol `text` names, tried in this order: its uuid (or SPDK's `storeuuid_blobid` id
    /// of an lvol without one), its alias `store_name/lvol_name`, its name in this store.
    /// -ENOENT when none matches; -EINVAL when a name matches several lvols (a store SPDK's
    /// tools would not make; give the uuid).
    pub fn lookup(&self, text: &str) -> Result<Lvol> {
        let lvols = self.lvols();
        if let Some(lvol) = lvols.iter().find(|lvol| lvol.unique_id == text) {
            return Ok(lvol.clone());
        }
        if let Ok(uuid) = Uuid::try_parse(text) {
            if let Some(lvol) = lvols
                .iter()
                .find(|lvol| !uuid.is_nil() && lvol.uuid == uuid)
            {
                return Ok(lvol.clone());
            }
        }
        let prefix = format!("{}/", self.name());
        let name = text.strip_prefix(&prefix).unwrap_or(text);
        let mut named = lvols.into_iter().filter(|lvol| lvol.name == name);
        match (named.next(), named.next()) {
            (Some(lvol), None) => Ok(lvol),
            (Some(first), Some(second)) => Err(BlobError::InvalidArgument(format!(
                "'{name}' names several lvols of lvol store '{}' ({:#x}, {:#x}, ...): give a uuid",
                self.name(),
                first.id,
                second.id
            ))),
            (None, _) => Err(BlobError::NotFound(format!(
                "no lvol '{text}' in lvol store '{}'",
                self.name()
            ))),
        }
    }

    /// Why `name` cannot be an lvol's name in this store, if it cannot: [`LvolStore::lookup`]
    /// tries uuids and aliases before names, so a name that reads as a uuid (or SPDK's
    /// `storeuuid_blobid` id) or starts with this store's alias prefix `store/` could not be
    /// reached by name, and would reach another lvol instead; nor can a name that reads as a
    /// blob id (`0x100000001`, `12`), which the command line takes as an id first (a rule
    /// SPDK does not have: such names are refused with -EINVAL). `None` when it is fine.
    pub fn name_reads_as_other(&self, name: &str) -> Option<String> {
        let lvols = self.lvols();
        if let Some(lvol) = lvols.iter().find(|lvol| lvol.unique_id == name) {
            return Some(format!("is the id of lvol {:#x}", lvol.id));
        }
        if let Ok(uuid) = Uuid::try_parse(name) {
            return Some(
                match lvols
                    .iter()
                    .find(|lvol| !uuid.is_nil() && lvol.uuid == uuid)
                {
                    Some(lvol) => format!("is the uuid of lvol '{}' ({:#x})", lvol.name, lvol.id),
                    None => "reads as a uuid".to_string(),
                },
            );
        }
        if reads_as_blob_id(name) {
            return Some(
                "reads as a blob id (the command line takes ids before names, so the lvol could not be told from that blob)".to_string(),
            );
        }
        let prefix = format!("{}/", self.name());
        if let Some(rest) = name.strip_prefix(&prefix) {
            return Some(match lvols.iter().find(|lvol| lvol.name == rest) {
                Some(lvol) => format!("is the alias of lvol '{}' ({:#x})", lvol.name, lvol.id),
                None => format!("starts with the store's alias prefix '{prefix}'"),
            });
        }
        None
    }

    /// Lvol `id` with what its blob says now (opens and closes it); -ENOENT when it is not
    /// an lvol of this store.
    pub async fn info(&self, id: u64) -> Result<LvolInfo> {
        let lvol = self.lvol(id)?;
        let store = self.blobstore();
        let blob = store.open_blob(id).await?;
        let info = self.info_of(lvol, &blob);
        blob.close().await?;
        Ok(info)
    }

    /// Every lvol with what its blob says now, by blob id. A blob that fails to open fails
    /// the call.
    pub async fn list(&self) -> Result<Vec<LvolInfo>> {
        let mut infos = Vec::new();
        for lvol in self.lvols() {
            infos.push(self.info(lvol.id).await?);
        }
        Ok(infos)
    }

    fn info_of(&self, lvol: Lvol, blob: &Blob) -> LvolInfo {
        let store = self.blobstore();
        let id = lvol.id;
        let name_of = |id: u64| {
            let name = self
                .inner
                .state
                .borrow()
                .lvols
                .get(&id)
                .map(|e| e.name.clone());
            (id, name.unwrap_or_default())
        };
        LvolInfo {
            num_clusters: blob.num_clusters(),
            size_bytes: blob.size_bytes(),
            num_allocated_clusters: blob.num_allocated_clusters(),
            thin: blob.is_thin(),
            read_only: blob.is_data_read_only(),
            snapshot: store.is_snapshot(id),
            clone: blob.is_clone(),
            parent: blob.parent_id().map(name_of),
            clones: store.clones_of(id).into_iter().map(name_of).collect(),
            lvol,
        }
    }

    /// Reserves `name` for an operation in flight: -EINVAL for a bad name, -EEXIST when an
    /// lvol has it or another operation is taking it.
    fn reserve_name(&self, name: &str) -> Result<NameReservation<'_>> {
        check_name(name, "lvol")?;
        if let Some(reason) = self.name_reads_as_other(name) {
            return Err(BlobError::InvalidArgument(format!(
                "lvol name '{name}' {reason}"
            )));
        }
        let mut state = self.inner.state.borrow_mut();
        let taken = state.lvols.values().any(|entry| entry.name == name)
            || state.pending_names.contains(name);
        if taken {
            return Err(BlobError::Exists(format!(
                "lvol '{name}' already exists in lvol store '{}'",
                state.name
            )));
        }
        state.pending_names.insert(name.to_string());
        Ok(NameReservation {
            store: self,
            name: name.to_string(),
        })
    }

    /// Adds the new lvol `id` to the table and returns it.
    fn record(&self, id: u64, name: &str, uuid: Uuid) -> Lvol {
        let entry = LvolEntry {
            name: name.to_string(),
            uuid,
        };
        self.inner
            .state
            .borrow_mut()
            .lvols
            .insert(id, entry.clone());
        self.lvol_of(id, &entry)
    }

    /// Creates lvol `name` of `size_bytes` (rounded up to whole clusters, as SPDK), thin or
    /// thick, as SPDK's `spdk_lvol_create`: a blob with `name` (64 bytes, NUL-padded) and a
    /// new random `uuid`, in an extent table. -EINVAL for a bad name, -EEXIST for a taken
    /// one, -ENOSPC when a thick lvol does not fit.
    ///
    /// Dropping the returned future does not cancel the operation: it runs to completion as its
    /// own task on the metadata reactor (the caller's future only waits for its result).
    pub async fn create_lvol(&self, name: &str, size_bytes: u64, thin: bool) -> Result<Lvol> {
        self.blobstore().check_md_thread()?;
        let (lvs, name) = (self.clone(), name.to_string());
        crate::detach::detached_op(
            self.blobstore().begin_md_op()?,
            async move { lvs.create_lvol_now(&name, size_bytes, thin).await },
            crate::detach::forget,
        )
        .await
    }

    /// The body of `create_lvol`, which runs it as its own task.
    async fn create_lvol_now(&self, name: &str, size_bytes: u64, thin: bool) -> Result<Lvol> {
        let _reserved = self.reserve_name(name)?;
        let uuid = Uuid::new_v4();
        let options = BlobOptions {
            num_clusters: size_bytes.div_ceil(self.blobstore().cluster_size()),
            thin,
            xattrs: new_lvol_xattrs(name, &uuid),
            internal_xattrs: Vec::new(),
            form: ExtentForm::Table,
        };
        let id = self.blobstore().create_blob(&options).await?;
        Ok(self.record(id, name, uuid))
    }

    /// Snapshots lvol `origin` as a new lvol `name` (thin, read-only, with its own uuid), as
    /// SPDK's `spdk_lvol_create_snapshot`: the origin keeps its id, name and data and becomes
    /// a clone of it. -EEXIST / -EINVAL for the name, -ENOENT for an unknown origin, and what
    /// [`crate::Blobstore::create_snapshot`] refuses.
    ///
    /// Dropping the returned future does not cancel the operation: it runs to completion as its
    /// own task on the metadata reactor (the caller's future only waits for its result).
    pub async fn create_snapshot(&self, origin: u64, name: &str) -> Result<Lvol> {
        self.blobstore().check_md_thread()?;
        let (lvs, name) = (self.clone(), name.to_string());
        crate::detach::detached_op(
            self.blobstore().begin_md_op()?,
            async move { lvs.derive_now(origin, &name, true).await },
            crate::detach::forget,
        )
        .await
    }

    /// Clones the snapshot lvol `snapshot` as a new thin lvol `name`, as SPDK's
    /// `spdk_lvol_create_clone`. -EEXIST / -EINVAL for the name, -ENOENT for an unknown
    /// snapshot, -EINVAL when it is not read-only.
    ///
    /// Dropping the returned future does not cancel the operation: it runs to completion as its
    /// own task on the metadata reactor (the caller's future only waits for its result).
    pub async fn create_clone(&self, snapshot: u64, name: &str) -> Result<Lvol> {
        self.blobstore().check_md_thread()?;
        let (lvs, name) = (self.clone(), name.to_string());
        crate::detach::detached_op(
            self.blobstore().begin_md_op()?,
            async move { lvs.derive_now(snapshot, &name, false).await },
            crate::detach::forget,
        )
        .await
    }

    /// The body of `create_snapshot` (`snapshot`) and `create_clone`.
    async fn derive_now(&self, source: u64, name: &str, snapshot: bool) -> Result<Lvol> {
        self.lvol(source)?;
        let _reserved = self.reserve_name(name)?;
        let uuid = Uuid::new_v4();
        let xattrs = new_lvol_xattrs(name, &uuid);
        let store = self.blobstore();
        let id = if snapshot {
            store.create_snapshot(source, &xattrs).await?
        } else {
            store.create_clone(source, &xattrs).await?
        };
        Ok(self.record(id, name, uuid))
    }

    /// Renames lvol `id` to `new_name`, as SPDK's `spdk_lvol_rename`: its `name` becomes the
    /// new name and one NUL (not padded). The same name succeeds at once; -EEXIST when
    /// another lvol has it, -EINVAL for a bad name (SPDK does not check the length here and
    /// then cannot load a name over 64 bytes; Spool refuses it).
    ///
    /// Dropping the returned future does not cancel the operation: it runs to completion as its
    /// own task on the metadata reactor (the caller's future only waits for its result).
    pub async fn rename_lvol(&self, id: u64, new_name: &str) -> Result<()> {
        self.blobstore().check_md_thread()?;
        let (lvs, new_name) = (self.clone(), new_name.to_string());
        crate::detach::detached_op(
            self.blobstore().begin_md_op()?,
            async move { lvs.rename_lvol_now(id, &new_name).await },
            crate::detach::forget,
        )
        .await
    }

    /// The body of `rename_lvol`, which runs it as its own task.
    async fn rename_lvol_now(&self, id: u64, new_name: &str) -> Result<()> {
        let lvol = self.lvol(id)?;
        if lvol.name == new_name {
            return Ok(());
        }
        let _reserved = self.reserve_name(new_name)?;
        self.with_blob(id, async |blob| {
            blob.set_xattr(NAME_XATTR, &terminated_name_value(new_name))?;
            blob.sync_md().await
        })
        .await?;
        if let Some(entry) = self.inner.state.borrow_mut().lvols.get_mut(&id) {
            entry.name = new_name.to_string();
        }
        Ok(())
    }

    /// Resizes lvol `id` to `size_bytes` (rounded up to whole clusters, as SPDK's
    /// `spdk_lvol_resize`) and writes its metadata. -ENOSPC when a thick lvol does not fit,
    /// -EPERM when it is read-only, -EBUSY while another operation runs on it.
    ///
    /// Dropping the returned future does not cancel the operation: it runs to completion as its
    /// own task on the metadata reactor (the caller's future only waits for its result).
    pub async fn resize(&self, id: u64, size_bytes: u64) -> Result<()> {
        self.blobstore().check_md_thread()?;
        self.lvol(id)?;
        let clusters = size_bytes.div_ceil(self.blobstore().cluster_size());
        let lvs = self.clone();
        crate::detach::detached_op(
            self.blobstore().begin_md_op()?,
            async move {
                lvs.with_blob(id, async |blob| {
                    blob.resize(clusters).await?;
                    blob.sync_md().await
                })
                .await
            },
            crate::detach::forget,
        )
        .await
    }

    /// Makes lvol `id` read-only for good and writes its metadata (SPDK's
    /// `spdk_lvol_set_read_only`).
    ///
    /// Dropping the returned future does not cancel the operation: it runs to completion as its
    /// own task on the metadata reactor (the caller's future only waits for its result).
    pub async fn set_read_only(&self, id: u64) -> Result<()> {
        self.blobstore().check_md_thread()?;
        self.lvol(id)?;
        let lvs = self.clone();
        crate::detach::detached_op(
            self.blobstore().begin_md_op()?,
            async move {
                lvs.with_blob(id, async |blob| {
                    blob.set_read_only()?;
                    blob.sync_md().await
                })
                .await
            },
            crate::detach::forget,
        )
        .await
    }

    /// Inflates lvol `id` ([`crate::Blobstore::inflate_blob`]): it owns every cluster after,
    /// and has no parent.
    pub async fn inflate(&self, id: u64) -> Result<()> {
        self.lvol(id)?;
        self.blobstore().inflate_blob(id).await
    }

    /// Decouples lvol `id` from its parent ([`crate::Blobstore::decouple_parent`]): -EINVAL
    /// when it has none.
    pub async fn decouple_parent(&self, id: u64) -> Result<()> {
        self.lvol(id)?;
        self.blobstore().decouple_parent(id).await
    }

    /// Deletes lvol `id`, as SPDK's `spdk_lvol_destroy`: -EBUSY when it is a snapshot with
    /// more than one clone, or while it is open; a snapshot with one clone is merged into
    /// that clone first (the clone keeps its name and uuid). -ENOENT when it is not an lvol.
    ///
    /// Dropping the returned future does not cancel the operation: it runs to completion as its
    /// own task on the metadata reactor (the caller's future only waits for its result).
    pub async fn delete_lvol(&self, id: u64) -> Result<()> {
        self.blobstore().check_md_thread()?;
        let lvs = self.clone();
        crate::detach::detached_op(
            self.blobstore().begin_md_op()?,
            async move { lvs.delete_lvol_now(id).await },
            crate::detach::forget,
        )
        .await
    }

    /// The body of `delete_lvol`, which runs it as its own task.
    async fn delete_lvol_now(&self, id: u64) -> Result<()> {
        let lvol = self.lvol(id)?;
        let store = self.blobstore();
        let clones = store.clones_of(id);
        if clones.len() > 1 {
            return Err(BlobError::Busy(format!(
                "lvol '{}' is a snapshot with {} clones: delete them first",
                lvol.alias,
                clones.len()
            )));
        }
        store.delete_blob(id).await?;
        self.inner.state.borrow_mut().lvols.remove(&id);
        Ok(())
    }

    /// Opens blob `id`, runs `work` with it, and closes it whatever `work` returned; `work`'s
    /// error comes first.
    async fn with_blob<T>(&self, id: u64, work: impl AsyncFnOnce(&Blob) -> Result<T>) -> Result<T> {
        let blob = self.blobstore().open_blob(id).await?;
        let result = work(&blob).await;
        let closed = blob.close().await;
        match (result, closed) {
            (Ok(value), Ok(())) => Ok(value),
            (Err(err), _) | (Ok(_), Err(err)) => Err(err),
        }
    }
}

/// The xattrs SPDK gives a new lvol (and a snapshot or clone), in its order: `name` (64
/// bytes, NUL-padded) then `uuid`.
fn new_lvol_xattrs(name: &str, uuid: &Uuid) -> Vec<(String, Vec<u8>)> {
    vec![
        (NAME_XATTR.into(), lvol_name_value(name)),
        (UUID_XATTR.into(), uuid_value(uuid)),
    ]
}

/// Whether `name` reads as a blob id as the command line takes one: `0x` and hex digits, or
/// decimal digits, that fit 64 bits.
fn reads_as_blob_id(name: &str) -> bool {
    let text = name.trim();
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => {
            !hex.is_empty()
                && hex.bytes().all(|b| b.is_ascii_hexdigit())
                && u64::from_str_radix(hex, 16).is_ok()
        }
        None => {
            !text.is_empty()
                && text.bytes().all(|b| b.is_ascii_digit())
                && text.parse::<u64>().is_ok()
        }
    }
}
