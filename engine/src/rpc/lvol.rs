//! SPDK's `bdev_lvol_*` methods over the daemon's store, translated onto the lvol layer
//! (`spool_blob::lvol`): the daemon serves one device, so there is at most one lvol store;
//! `bdev_name` in `bdev_lvol_create_lvstore` is that device (its bdev name, its path or its
//! file name). Volumes are named as SPDK names lvol bdevs: by uuid, by alias `lvs/lvol`, or by
//! the lvol's name in the store. Changes to a volume that is exported (resize, read-only)
//! are published to the reactors, so new clients see them; an exported volume cannot be
//! deleted (-EBUSY), nor can the store while anything is exported.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};
use spool_blob::{InitOptions, Lvol, LvolStore, LvsInitOptions};

use super::jsonrpc::RpcError;
use super::methods::{decode, failed, MethodFuture, RpcContext};
use super::nbd::{current, publish};
use crate::serve::local::ReactorServe;
use crate::serve::volumes;
use crate::EngineError;

const MIB: u64 = 1 << 20;

fn blob_err(err: spool_blob::BlobError) -> RpcError {
    failed(&EngineError::from(err))
}

/// The lvol store, checked against an optional uuid or name (-ENODEV when it does not
/// match, as SPDK answers an unknown store).
fn store_for(uuid: Option<&str>, name: Option<&str>) -> Result<LvolStore, RpcError> {
    let lvs = volumes::held_lvs().map_err(|err| failed(&err))?;
    if uuid.is_some_and(|u| u != lvs.uuid().to_string()) || name.is_some_and(|n| n != lvs.name()) {
        return Err(RpcError::new(
            -libc::ENODEV,
            format!("no lvol store {}", uuid.or(name).unwrap_or_default()),
        ));
    }
    Ok(lvs)
}

/// The lvol `name` names; an unknown one is -ENODEV, as SPDK answers (its lvols are bdevs).
fn lookup(lvs: &LvolStore, name: &str) -> Result<Lvol, RpcError> {
    lvs.lookup(name).map_err(|err| {
        if err.errno() == -libc::ENOENT {
            RpcError::new(-libc::ENODEV, format!("No such device: {err}"))
        } else {
            blob_err(err)
        }
    })
}

/// Refreshes exported volumes after a change and publishes them if anything changed.
async fn republish() -> Result<(), RpcError> {
    let set = current().map_err(|err| failed(&err))?;
    if volumes::refresh(&set) {
        let fresh = volumes::ExportSet::of(set.volumes.clone());
        publish(Arc::new(fresh)).await.map_err(|err| failed(&err))?;
    }
    Ok(())
}

/// -EBUSY when blob `id` is exported.
fn refuse_if_exported(id: u64, what: &str) -> Result<(), RpcError> {
    if volumes::held_blob_ids().contains(&id) {
        return Err(RpcError::new(
            -libc::EBUSY,
            format!("{what} is exported over NBD (nbd_stop_export it first)"),
        ));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[expect(dead_code, reason = "SPDK's parameters, accepted; see the comments")]
struct CreateLvstore {
    bdev_name: String,
    lvs_name: String,
    cluster_sz: Option<u64>,
    /// The data area is unmapped at init (SPDK's default); other methods are accepted.
    clear_method: Option<String>,
    num_md_pages_per_cluster_ratio: Option<u64>,
    md_page_size: Option<u64>,
}

/// Whether `name` names the daemon's device.
fn is_our_device(name: &str, desc: &spool_bdev::BdevDesc) -> bool {
    let ours = desc.name();
    let file = std::path::Path::new(ours)
        .file_name()
        .and_then(|f| f.to_str())
        .unwrap_or(ours);
    name == ours || name == file
}

/// `bdev_lvol_create_lvstore`: the device's store becomes an lvol store (an empty store is
/// formatted in place; after `bdev_lvol_delete_lvstore` a new one is made). Returns its uuid.
pub(crate) fn create_lvstore(_: &RpcContext, params: Option<Value>) -> MethodFuture<'_> {
    Box::pin(async move {
        let p: CreateLvstore = decode(params)?;
        let desc = volumes::held_desc().map_err(|err| failed(&err))?;
        if !is_our_device(&p.bdev_name, &desc) {
            return Err(RpcError::new(
                -libc::ENODEV,
                format!(
                    "No such device: bdev {:?} (this daemon serves {:?})",
                    p.bdev_name,
                    desc.name()
                ),
            ));
        }
        if volumes::held_lvs().is_ok() {
            return Err(RpcError::new(
                -libc::EEXIST,
                "an lvol store already exists on this device",
            ));
        }
        let lvs = match volumes::held_store() {
            Ok(store) => {
                if p.cluster_sz
                    .is_some_and(|size| size != store.cluster_size())
                {
                    return Err(RpcError::new(
                        -libc::EINVAL,
                        format!(
                            "the device's store has {}-byte clusters; delete it to make one with {:?}",
                            store.cluster_size(),
                            p.cluster_sz
                        ),
                    ));
                }
                LvolStore::format(store, &p.lvs_name)
                    .await
                    .map_err(blob_err)?
            }
            Err(_) => {
                let options = LvsInitOptions {
                    name: p.lvs_name.clone(),
                    init: InitOptions {
                        cluster_size: p
                            .cluster_sz
                            .unwrap_or(spool_blob::lvol::LVS_CLUSTER_SIZE_DEFAULT),
                        ..InitOptions::default()
                    },
                };
                LvolStore::init(desc, &options).await.map_err(blob_err)?
            }
        };
        let uuid = lvs.uuid().to_string();
        volumes::set_held_store(Some(lvs.blobstore().clone()), Some(lvs));
        tracing::info!(lvs = %p.lvs_name, %uuid, "lvol store created");
        Ok(json!(uuid))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WhichStore {
    uuid: Option<String>,
    lvs_name: Option<String>,
}

/// `bdev_lvol_get_lvstores`.
pub(crate) fn get_lvstores(_: &RpcContext, params: Option<Value>) -> MethodFuture<'_> {
    Box::pin(async move {
        let p: WhichStore = decode(params)?;
        let lvs = match volumes::held_lvs() {
            Ok(lvs) => lvs,
            Err(_) if p.uuid.is_none() && p.lvs_name.is_none() => return Ok(json!([])),
            Err(err) => return Err(failed(&err)),
        };
        let lvs = store_for(p.uuid.as_deref(), p.lvs_name.as_deref()).map(|_| lvs)?;
        let store = lvs.blobstore();
        let base = volumes::held_desc()
            .map(|d| d.name().to_string())
            .unwrap_or_default();
        Ok(json!([{
            "uuid": lvs.uuid().to_string(),
            "name": lvs.name(),
            "base_bdev": base,
            "total_data_clusters": store.total_data_cluster_count(),
            "free_clusters": store.free_cluster_count(),
            "block_size": store.io_unit_size(),
            "cluster_size": store.cluster_size(),
        }]))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rename {
    old_name: String,
    new_name: String,
}

/// `bdev_lvol_rename_lvstore`.
pub(crate) fn rename_lvstore(_: &RpcContext, params: Option<Value>) -> MethodFuture<'_> {
    Box::pin(async move {
        let p: Rename = decode(params)?;
        let lvs = store_for(None, Some(&p.old_name))?;
        lvs.rename(&p.new_name).await.map_err(blob_err)?;
        Ok(json!(true))
    })
}

/// `bdev_lvol_delete_lvstore`: destroys the store (as SPDK: the device no longer loads as
/// one); -EBUSY while anything is exported.
pub(crate) fn delete_lvstore(_: &RpcContext, params: Option<Value>) -> MethodFuture<'_> {
    Box::pin(async move {
        let p: WhichStore = decode(params)?;
        let lvs = store_for(p.uuid.as_deref(), p.lvs_name.as_deref())?;
        if !volumes::held_blob_ids().is_empty() {
            return Err(RpcError::new(
                -libc::EBUSY,
                "volumes of this lvol store are exported over NBD (nbd_stop_export them first)",
            ));
        }
        volumes::set_held_store(None, None);
        let result = lvs.clone().destroy().await;
        if let Err(err) = result {
            volumes::set_held_store(Some(lvs.blobstore().clone()), Some(lvs));
            return Err(blob_err(err));
        }
        // The reactors' channels belonged to the destroyed store.
        let reset = spool_reactor::broadcast(|_| {
            if let Some(state) = ReactorServe::current() {
                state.reset_channel();
            }
        })
        .map_err(|err| failed(&EngineError::from(err)))?;
        let _ = reset.await;
        Ok(json!(true))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[expect(
    dead_code,
    reason = "clear_method is accepted as SPDK's: new thin clusters are written whole"
)]
struct Create {
    lvol_name: String,
    size_in_mib: u64,
    #[serde(default)]
    thin_provision: bool,
    clear_method: Option<String>,
    uuid: Option<String>,
    lvs_name: Option<String>,
}

/// `bdev_lvol_create`: returns the new lvol's bdev name (its uuid).
pub(crate) fn create(_: &RpcContext, params: Option<Value>) -> MethodFuture<'_> {
    Box::pin(async move {
        let p: Create = decode(params)?;
        if p.uuid.is_none() && p.lvs_name.is_none() {
            return Err(RpcError::invalid_params(
                "one of uuid or lvs_name is required",
            ));
        }
        let lvs = store_for(p.uuid.as_deref(), p.lvs_name.as_deref())?;
        let bytes = p
            .size_in_mib
            .checked_mul(MIB)
            .ok_or_else(|| RpcError::new(-libc::EINVAL, "size_in_mib too large"))?;
        let lvol = lvs
            .create_lvol(&p.lvol_name, bytes, p.thin_provision)
            .await
            .map_err(blob_err)?;
        Ok(json!(lvol.unique_id))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetLvols {
    lvs_uuid: Option<String>,
    lvs_name: Option<String>,
}

/// `bdev_lvol_get_lvols`.
pub(crate) fn get_lvols(_: &RpcContext, params: Option<Value>) -> MethodFuture<'_> {
    Box::pin(async move {
        let p: GetLvols = decode(params)?;
        let lvs = match volumes::held_lvs() {
            Ok(lvs) => lvs,
            Err(_) if p.lvs_uuid.is_none() && p.lvs_name.is_none() => return Ok(json!([])),
            Err(err) => return Err(failed(&err)),
        };
        let lvs = store_for(p.lvs_uuid.as_deref(), p.lvs_name.as_deref()).map(|_| lvs)?;
        let list = lvs.list().await.map_err(blob_err)?;
        Ok(Value::Array(
            list.iter()
                .map(|info| {
                    json!({
                        "alias": info.lvol.alias,
                        "uuid": info.lvol.unique_id,
                        "name": info.lvol.name,
                        "is_thin_provisioned": info.thin,
                        "is_snapshot": info.snapshot,
                        "is_clone": info.clone,
                        "is_esnap_clone": false,
                        "is_degraded": false,
                        "num_allocated_clusters": info.num_allocated_clusters,
                        "lvs": {"name": lvs.name(), "uuid": lvs.uuid().to_string()},
                    })
                })
                .collect(),
        ))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Snapshot {
    lvol_name: String,
    snapshot_name: String,
}

/// `bdev_lvol_snapshot`: a point-in-time snapshot, taken while clients write (their I/O is
/// held for the moment the map changes hands); returns the snapshot's bdev name.
pub(crate) fn snapshot(_: &RpcContext, params: Option<Value>) -> MethodFuture<'_> {
    Box::pin(async move {
        let p: Snapshot = decode(params)?;
        let lvs = store_for(None, None)?;
        let origin = lookup(&lvs, &p.lvol_name)?;
        let snap = lvs
            .create_snapshot(origin.id, &p.snapshot_name)
            .await
            .map_err(blob_err)?;
        republish().await?;
        Ok(json!(snap.unique_id))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Clone {
    snapshot_name: String,
    clone_name: String,
}

/// `bdev_lvol_clone`: returns the clone's bdev name.
pub(crate) fn clone(_: &RpcContext, params: Option<Value>) -> MethodFuture<'_> {
    Box::pin(async move {
        let p: Clone = decode(params)?;
        let lvs = store_for(None, None)?;
        let snapshot = lookup(&lvs, &p.snapshot_name)?;
        let clone = lvs
            .create_clone(snapshot.id, &p.clone_name)
            .await
            .map_err(blob_err)?;
        Ok(json!(clone.unique_id))
    })
}

/// `bdev_lvol_rename` (an export keeps its name).
pub(crate) fn rename(_: &RpcContext, params: Option<Value>) -> MethodFuture<'_> {
    Box::pin(async move {
        let p: Rename = decode(params)?;
        let lvs = store_for(None, None)?;
        let lvol = lookup(&lvs, &p.old_name)?;
        lvs.rename_lvol(lvol.id, &p.new_name)
            .await
            .map_err(blob_err)?;
        Ok(json!(true))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Resize {
    name: String,
    size_in_mib: u64,
}

/// `bdev_lvol_resize` (new clients of an export see the new size).
pub(crate) fn resize(_: &RpcContext, params: Option<Value>) -> MethodFuture<'_> {
    Box::pin(async move {
        let p: Resize = decode(params)?;
        let lvs = store_for(None, None)?;
        let lvol = lookup(&lvs, &p.name)?;
        let bytes = p
            .size_in_mib
            .checked_mul(MIB)
            .ok_or_else(|| RpcError::new(-libc::EINVAL, "size_in_mib too large"))?;
        lvs.resize(lvol.id, bytes).await.map_err(blob_err)?;
        republish().await?;
        Ok(json!(true))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Named {
    name: String,
}

/// `bdev_lvol_set_read_only`.
pub(crate) fn set_read_only(_: &RpcContext, params: Option<Value>) -> MethodFuture<'_> {
    Box::pin(async move {
        let p: Named = decode(params)?;
        let lvs = store_for(None, None)?;
        let lvol = lookup(&lvs, &p.name)?;
        lvs.set_read_only(lvol.id).await.map_err(blob_err)?;
        republish().await?;
        Ok(json!(true))
    })
}

/// `bdev_lvol_inflate`.
pub(crate) fn inflate(_: &RpcContext, params: Option<Value>) -> MethodFuture<'_> {
    Box::pin(async move {
        let p: Named = decode(params)?;
        let lvs = store_for(None, None)?;
        let lvol = lookup(&lvs, &p.name)?;
        lvs.inflate(lvol.id).await.map_err(blob_err)?;
        Ok(json!(true))
    })
}

/// `bdev_lvol_decouple_parent`.
pub(crate) fn decouple_parent(_: &RpcContext, params: Option<Value>) -> MethodFuture<'_> {
    Box::pin(async move {
        let p: Named = decode(params)?;
        let lvs = store_for(None, None)?;
        let lvol = lookup(&lvs, &p.name)?;
        lvs.decouple_parent(lvol.id).await.map_err(blob_err)?;
        Ok(json!(true))
    })
}

/// `bdev_lvol_delete`: -EBUSY while it is exported or (a snapshot) has several clones.
pub(crate) fn delete(_: &RpcContext, params: Option<Value>) -> MethodFuture<'_> {
    Box::pin(async move {
        let p: Named = decode(params)?;
        let lvs = store_for(None, None)?;
        let lvol = lookup(&lvs, &p.name)?;
        refuse_if_exported(lvol.id, &format!("lvol {:?}", lvol.alias))?;
        lvs.delete_lvol(lvol.id).await.map_err(blob_err)?;
        Ok(json!(true))
    })
}
