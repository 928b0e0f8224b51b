//! The volumes the daemon exports: which blobs, under which names, with which NBD
//! parameters. The store and the open blobs stay on the metadata reactor (in a slot of that
//! thread, from start to shutdown); the other reactors get the `Send` half of each blob, its
//! [`BlobIo`], in an [`ExportSet`].
//!
//! Naming: a blob's export name is its `name` xattr (SPDK's lvol layer stores it NUL-padded
//! to 64 bytes; trailing NULs are dropped) when that is a valid NBD string and unique in the
//! store, else its id as SPDK prints it (`0x100000000`). Snapshots (read-only blobs) are
//! exported read-only. In an lvol store (bstype `LVOLSTORE`) the super blob holds the
//! store's name and uuid and is not exported.

use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use spool_blob::{Blob, BlobIo, Blobstore};

use crate::nbd::handshake::{BlockSizes, ExportInfo, Features};
use crate::nbd::limits;
use crate::nbd::wire::check_string;
use crate::EngineError;

/// The xattr that holds a volume's name (as SPDK's lvol layer names it).
pub const NAME_XATTR: &str = "name";
/// The bstype of a store SPDK's lvol layer made.
const LVOLSTORE: &str = "LVOLSTORE";

/// One exported volume.
pub(crate) struct Volume {
    /// What the handshake advertises.
    pub(crate) info: ExportInfo,
    /// The blob's I/O handle.
    pub(crate) io: Arc<BlobIo>,
    /// Thin provisioned.
    pub(crate) thin: bool,
    /// Connections serving it now.
    pub(crate) connections: AtomicUsize,
    /// Keeps read-modify-writes from undoing other writes.
    pub(crate) gate: super::write_gate::WriteGate,
    /// Set while `nbd_stop_export` removes it: no new client may attach.
    pub(crate) stopping: std::sync::atomic::AtomicBool,
    /// Its size now (a resize changes it; new clients see it, connected ones keep theirs).
    pub(crate) size_bytes: std::sync::atomic::AtomicU64,
    /// Read-only now (`bdev_lvol_set_read_only` sets it).
    pub(crate) read_only: std::sync::atomic::AtomicBool,
}

impl Volume {
    /// Counts a new client in; `false` (nothing counted) when the export is being stopped.
    pub(crate) fn attach(&self) -> bool {
        self.connections.fetch_add(1, Ordering::SeqCst);
        if self.stopping.load(Ordering::SeqCst) {
            self.connections.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Counts a client out.
    pub(crate) fn detach(&self) {
        self.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The exported volumes, in the order `NBD_OPT_LIST` shows them.
pub(crate) struct ExportSet {
    /// The handshake's view (same order as `volumes`).
    pub(crate) infos: Arc<[ExportInfo]>,
    /// The volumes (shared with the connections serving them).
    pub(crate) volumes: Vec<Arc<Volume>>,
}

/// An exported volume as the daemon reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSummary {
    /// The NBD export name.
    pub name: String,
    /// The blob's id.
    pub blob_id: u64,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Exported read-only (a snapshot or read-only blob).
    pub read_only: bool,
    /// Thin provisioned.
    pub thin: bool,
    /// Connections serving it now.
    pub connections: usize,
}

/// What the metadata reactor holds while the daemon serves.
struct HeldStore {
    /// The store (`None` after `bdev_lvol_delete_lvstore` destroyed it).
    store: Option<Blobstore>,
    /// Its lvol view, when it is an lvol store.
    lvs: Option<spool_blob::LvolStore>,
    /// The device, to make a new store on.
    desc: spool_bdev::BdevDesc,
    /// The exported blobs, open.
    blobs: Vec<Blob>,
}

thread_local! {
    static HELD: RefCell<Option<HeldStore>> = const { RefCell::new(None) };
}

/// The name stored in `value` (trailing NULs dropped) if it can be an export name.
fn stored_name(value: &[u8]) -> Option<String> {
    let end = value
        .iter()
        .rposition(|&b| b != 0)
        .map_or(0, |last| last + 1);
    let text = std::str::from_utf8(&value[..end]).ok()?;
    (!text.is_empty() && check_string(text.as_bytes()).is_ok()).then(|| text.to_string())
}

/// Parses a blob id as SPDK prints it (`0x...`) or in decimal.
fn parse_id(text: &str) -> Option<u64> {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// Opens the blobs to export (all of them, or those `wanted` names by export name or id),
/// keeps the store and the blobs on this (the metadata) reactor, and returns the export set.
pub(crate) async fn open_exports(
    store: Blobstore,
    desc: spool_bdev::BdevDesc,
    wanted: &[String],
) -> Result<ExportSet, EngineError> {
    let mut opened: Vec<(Blob, Option<String>)> = Vec::new();
    let mut failure = None;
    // An lvol store's super blob holds the store's own name and uuid: it is not a volume.
    let lvstore_super = (spool_blob::format::super_block::bstype_name(&store.bstype())
        == LVOLSTORE)
        .then(|| store.get_super().ok())
        .flatten();
    for id in store.blob_ids() {
        if Some(id) == lvstore_super {
            continue;
        }
        match store.open_blob(id).await {
            Ok(blob) => {
                let name = blob.xattr(NAME_XATTR).and_then(|value| stored_name(&value));
                opened.push((blob, name));
            }
            Err(err) => {
                tracing::warn!(blob = format!("{id:#x}"), %err, "not exported: the blob does not open");
            }
        }
    }
    // Names used twice fall back to ids (two exports cannot share a name).
    let mut names: Vec<String> = Vec::with_capacity(opened.len());
    for (index, (blob, name)) in opened.iter().enumerate() {
        let unique = name.as_ref().filter(|name| {
            opened.iter().enumerate().all(|(other, (_, other_name))| {
                other == index || other_name.as_ref() != Some(*name)
            })
        });
        if name.is_some() && unique.is_none() {
            tracing::warn!(blob = format!("{:#x}", blob.id()), name = ?name, "name shared by several blobs: exported by id");
        }
        names.push(
            unique
                .cloned()
                .unwrap_or_else(|| format!("{:#x}", blob.id())),
        );
    }
    let mut keep = vec![wanted.is_empty(); opened.len()];
    for want in wanted {
        let found = names.iter().position(|name| name == want).or_else(|| {
            let id = parse_id(want)?;
            opened.iter().position(|(blob, _)| blob.id() == id)
        });
        match found {
            Some(index) => keep[index] = true,
            None => {
                failure.get_or_insert(EngineError::NotFound(format!(
                    "--export {want:?}: no volume has that name or id (the store has: {})",
                    if names.is_empty() {
                        "none".to_string()
                    } else {
                        names.join(", ")
                    }
                )));
            }
        }
    }
    let mut blobs = Vec::new();
    let mut volumes = Vec::new();
    for ((blob, _), (name, keep)) in opened.into_iter().zip(names.into_iter().zip(keep)) {
        if !keep || failure.is_some() {
            if let Err(err) = blob.close().await {
                tracing::warn!(%err, "close of a blob not exported failed");
            }
            continue;
        }
        volumes.push(Arc::new(volume_of(&store, &blob, name)));
        blobs.push(blob);
    }
    if let Some(err) = failure {
        for blob in blobs {
            let _ = blob.close().await;
        }
        return Err(err);
    }
    let lvs = if lvstore_super.is_some() {
        match spool_blob::LvolStore::open(store.clone()).await {
            Ok(lvs) => Some(lvs),
            Err(err) => {
                tracing::warn!(%err, "the lvol store's names do not load: lvol calls are refused");
                None
            }
        }
    } else {
        None
    };
    HELD.with(|held| {
        *held.borrow_mut() = Some(HeldStore {
            store: Some(store),
            lvs,
            desc,
            blobs,
        });
    });
    Ok(ExportSet::of(volumes))
}

/// The export of `blob` under `name`.
pub(super) fn volume_of(store: &Blobstore, blob: &Blob, name: String) -> Volume {
    let read_only = blob.is_read_only() || blob.is_data_read_only();
    let kind = if store.is_snapshot(blob.id()) {
        "snapshot"
    } else if blob.is_clone() {
        "clone"
    } else if blob.is_thin() {
        "thin volume"
    } else {
        "volume"
    };
    let info = ExportInfo {
        name,
        description: format!(
            "spool {kind} {:#x}, {} clusters of {} bytes{}",
            blob.id(),
            blob.num_clusters(),
            store.cluster_size(),
            if read_only { ", read-only" } else { "" }
        ),
        size_bytes: blob.size_bytes(),
        read_only,
        block_sizes: block_sizes(store.io_unit_size()),
        base_allocation: true,
        features: Features::ALL,
    };
    Volume {
        info,
        io: blob.io(),
        thin: blob.is_thin(),
        connections: AtomicUsize::new(0),
        gate: super::write_gate::WriteGate::default(),
        stopping: std::sync::atomic::AtomicBool::new(false),
        size_bytes: std::sync::atomic::AtomicU64::new(blob.size_bytes()),
        read_only: std::sync::atomic::AtomicBool::new(read_only),
    }
}

/// The block sizes advertised for a store with this io_unit: the io_unit is the minimum,
/// 4 KiB (or the io_unit if larger) preferred, 32 MiB the maximum payload.
pub(crate) fn block_sizes(io_unit: u64) -> BlockSizes {
    let minimum = u32::try_from(io_unit).unwrap_or(4096).clamp(1, 64 << 10);
    BlockSizes {
        minimum,
        preferred: minimum.max(4096),
        maximum: limits::MAX_PAYLOAD,
    }
}

/// Summaries of `set`'s volumes.
pub(crate) fn summaries(set: &ExportSet) -> Vec<ExportSummary> {
    set.volumes
        .iter()
        .map(|volume| ExportSummary {
            name: volume.info.name.clone(),
            blob_id: volume.io.id(),
            size_bytes: volume.size_bytes.load(Ordering::Acquire),
            read_only: volume.read_only.load(Ordering::Acquire),
            thin: volume.thin,
            connections: volume.connections.load(Ordering::Relaxed),
        })
        .collect()
}

/// Closes the exported blobs and unloads the store held on this (the metadata) reactor,
/// leaving it clean on disk. Every connection must be gone first.
pub(crate) async fn close_and_unload() -> Result<(), EngineError> {
    let Some(held) = HELD.with(|held| held.borrow_mut().take()) else {
        return Ok(());
    };
    let mut first_error = None;
    for blob in held.blobs {
        let id = blob.id();
        if let Err(err) = blob.close().await {
            tracing::error!(blob = format!("{id:#x}"), %err, "closing an exported blob failed");
            first_error.get_or_insert(EngineError::from(err));
        }
    }
    drop(held.lvs);
    if let Some(store) = held.store {
        if let Err(err) = store.unload().await {
            tracing::error!(%err, "unloading the store failed: it is left dirty (the next start recovers it)");
            first_error.get_or_insert(EngineError::from(err));
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Runs `with` on the store held on this (the metadata) reactor; -ENODEV-style error when
/// there is none (the daemon is stopping).
pub(crate) fn held_store() -> Result<Blobstore, EngineError> {
    HELD.with(|held| held.borrow().as_ref().and_then(|held| held.store.clone()))
        .ok_or_else(|| {
            EngineError::NoDevice(
                "no store is open (stopping, or its lvol store was deleted)".into(),
            )
        })
}

/// The lvol store held on this (the metadata) reactor; -ENODEV when the store is not one.
pub(crate) fn held_lvs() -> Result<spool_blob::LvolStore, EngineError> {
    HELD.with(|held| held.borrow().as_ref().and_then(|held| held.lvs.clone()))
        .ok_or_else(|| EngineError::NoDevice("no lvol store exists on this daemon's device".into()))
}

/// The device the store is on.
pub(crate) fn held_desc() -> Result<spool_bdev::BdevDesc, EngineError> {
    HELD.with(|held| held.borrow().as_ref().map(|held| held.desc.clone()))
        .ok_or_else(|| EngineError::NoDevice("the daemon is stopping".into()))
}

/// Replaces the held store and its lvol view (after an lvol store was made or deleted).
pub(crate) fn set_held_store(store: Option<Blobstore>, lvs: Option<spool_blob::LvolStore>) {
    HELD.with(|held| {
        if let Some(held) = held.borrow_mut().as_mut() {
            held.store = store;
            held.lvs = lvs;
        }
    });
}

/// Ids of the blobs open for exports.
pub(crate) fn held_blob_ids() -> Vec<u64> {
    HELD.with(|held| {
        held.borrow()
            .as_ref()
            .map(|held| held.blobs.iter().map(Blob::id).collect())
            .unwrap_or_default()
    })
}

/// Whether blob `id` is open for an export.
pub(crate) fn is_held(id: u64) -> bool {
    HELD.with(|held| {
        held.borrow()
            .as_ref()
            .is_some_and(|held| held.blobs.iter().any(|blob| blob.id() == id))
    })
}

/// Exports blob `id` under `name` (on this, the metadata, reactor): opens it, keeps it open,
/// and returns the new set (the caller publishes it to every reactor). -EEXIST when the
/// name or the blob is exported already.
pub(crate) async fn add_export(
    current: &ExportSet,
    id: u64,
    name: String,
) -> Result<ExportSet, EngineError> {
    check_string(name.as_bytes())
        .map_err(|why| EngineError::InvalidArgument(format!("export name {name:?}: {why}")))?;
    if current.volumes.iter().any(|v| v.info.name == name) {
        return Err(EngineError::Exists(format!("an export is named {name:?}")));
    }
    if current.volumes.iter().any(|v| v.io.id() == id) || is_held(id) {
        return Err(EngineError::Exists(format!(
            "blob {id:#x} is exported already"
        )));
    }
    let store = held_store()?;
    let blob = store.open_blob(id).await?;
    let volume = Arc::new(volume_of(&store, &blob, name));
    HELD.with(|held| {
        if let Some(held) = held.borrow_mut().as_mut() {
            held.blobs.push(blob);
        }
    });
    let mut volumes = current.volumes.clone();
    volumes.push(volume);
    Ok(ExportSet::of(volumes))
}

/// Stops exporting `name`: the new set without it (the caller publishes it), and its blob,
/// to close once published. -ENOENT when no export has that name, -EBUSY while clients are
/// connected to it.
pub(crate) fn remove_export(
    current: &ExportSet,
    name: &str,
) -> Result<(ExportSet, u64), EngineError> {
    let volume = current
        .volumes
        .iter()
        .find(|v| v.info.name == name)
        .ok_or_else(|| EngineError::NotFound(format!("no export is named {name:?}")))?;
    // Dekker with `Volume::attach`: either the client sees `stopping` and backs out, or
    // this sees the client and refuses.
    volume.stopping.store(true, Ordering::SeqCst);
    let connections = volume.connections.load(Ordering::SeqCst);
    if connections > 0 {
        volume.stopping.store(false, Ordering::SeqCst);
        return Err(EngineError::Busy(format!(
            "export {name:?} has {connections} client(s) connected"
        )));
    }
    let id = volume.io.id();
    let volumes = current
        .volumes
        .iter()
        .filter(|v| v.info.name != name)
        .cloned()
        .collect();
    Ok((ExportSet::of(volumes), id))
}

/// Closes the held blob `id` (after its export was removed everywhere).
pub(crate) async fn close_held(id: u64) -> Result<(), EngineError> {
    let blob = HELD.with(|held| {
        let mut held = held.borrow_mut();
        let held = held.as_mut()?;
        let index = held.blobs.iter().position(|blob| blob.id() == id)?;
        Some(held.blobs.swap_remove(index))
    });
    match blob {
        Some(blob) => Ok(blob.close().await?),
        None => Ok(()),
    }
}

impl ExportSet {
    /// The set of `volumes` (advertised with their sizes and read-only state now).
    pub(crate) fn of(volumes: Vec<Arc<Volume>>) -> ExportSet {
        ExportSet {
            infos: volumes
                .iter()
                .map(|v| ExportInfo {
                    size_bytes: v.size_bytes.load(Ordering::Acquire),
                    read_only: v.read_only.load(Ordering::Acquire),
                    ..v.info.clone()
                })
                .collect(),
            volumes,
        }
    }
}

/// What the management calls say of one volume.
#[derive(Debug, Clone)]
pub(crate) struct VolumeDescription {
    /// Blob id.
    pub(crate) id: u64,
    /// The `name` xattr (NULs dropped), if valid text.
    pub(crate) name: Option<String>,
    /// The `uuid` xattr (NULs dropped), if valid text.
    pub(crate) uuid: Option<String>,
    /// Size in bytes.
    pub(crate) size_bytes: u64,
    /// Clusters it owns.
    pub(crate) allocated_clusters: u64,
    /// Thin provisioned.
    pub(crate) thin: bool,
    /// Read-only (snapshots).
    pub(crate) read_only: bool,
    /// A snapshot (others read through it).
    pub(crate) snapshot: bool,
    /// Its parent snapshot.
    pub(crate) parent: Option<u64>,
    /// Its clones.
    pub(crate) clones: Vec<u64>,
}

/// The lvol store's name and uuid (from its super blob), when the store is one.
pub(crate) async fn lvstore_identity(store: &Blobstore) -> Option<(String, String)> {
    if spool_blob::format::super_block::bstype_name(&store.bstype()) != LVOLSTORE {
        return None;
    }
    let blob = store.open_blob(store.get_super().ok()?).await.ok()?;
    let name = blob.xattr(NAME_XATTR).and_then(|v| stored_name(&v));
    let uuid = blob.xattr("uuid").and_then(|v| stored_name(&v));
    let _ = blob.close().await;
    Some((name?, uuid.unwrap_or_default()))
}

/// Every volume of the store (an lvol store's super blob excepted), described.
pub(crate) async fn describe_all(store: &Blobstore) -> Vec<VolumeDescription> {
    let lvstore_super = (spool_blob::format::super_block::bstype_name(&store.bstype())
        == LVOLSTORE)
        .then(|| store.get_super().ok())
        .flatten();
    let mut out = Vec::new();
    for id in store.blob_ids() {
        if Some(id) == lvstore_super {
            continue;
        }
        let Ok(blob) = store.open_blob(id).await else {
            continue;
        };
        out.push(VolumeDescription {
            id,
            name: blob.xattr(NAME_XATTR).and_then(|v| stored_name(&v)),
            uuid: blob.xattr("uuid").and_then(|v| stored_name(&v)),
            size_bytes: blob.size_bytes(),
            allocated_clusters: blob.num_allocated_clusters(),
            thin: blob.is_thin(),
            read_only: blob.is_read_only() || blob.is_data_read_only(),
            snapshot: store.is_snapshot(id),
            parent: store.parent_of(id),
            clones: store.clones_of(id),
        });
        let _ = blob.close().await;
    }
    out
}

/// The blob `text` names: a volume's name, its uuid, `lvs/name`, or an id as SPDK prints it
/// (`0x100000001`) or in decimal. -ENOENT when none does.
pub(crate) async fn find_blob(store: &Blobstore, text: &str) -> Result<u64, EngineError> {
    // An lvol store resolves names, aliases and uuids itself, from memory.
    if let Ok(lvol) = held_lvs().and_then(|lvs| lvs.lookup(text).map_err(EngineError::from)) {
        return Ok(lvol.id);
    }
    let all = describe_all(store).await;
    let lvs = lvstore_identity(store).await.map(|(name, _)| name);
    let bare = match (&lvs, text.split_once('/')) {
        (Some(lvs), Some((prefix, name))) if prefix == lvs => name,
        _ => text,
    };
    if let Some(found) = all
        .iter()
        .find(|d| d.name.as_deref() == Some(bare) || d.uuid.as_deref() == Some(text))
    {
        return Ok(found.id);
    }
    if let Some(id) = parse_id(text).filter(|id| all.iter().any(|d| d.id == *id)) {
        return Ok(id);
    }
    Err(EngineError::NotFound(format!(
        "no volume is named {text:?}"
    )))
}

/// Brings every exported volume's size and read-only state up to date with its blob (after
/// a resize or a set-read-only); returns whether any changed (the caller republishes).
pub(crate) fn refresh(current: &ExportSet) -> bool {
    HELD.with(|held| {
        let held = held.borrow();
        let Some(held) = held.as_ref() else {
            return false;
        };
        let mut changed = false;
        for volume in &current.volumes {
            let Some(blob) = held.blobs.iter().find(|b| b.id() == volume.io.id()) else {
                continue;
            };
            let size = blob.size_bytes();
            let read_only = blob.is_read_only() || blob.is_data_read_only();
            changed |= volume.size_bytes.swap(size, Ordering::AcqRel) != size;
            changed |= volume.read_only.swap(read_only, Ordering::AcqRel) != read_only;
        }
        changed
    })
}
