//! Bdev methods over the store's volumes: `bdev_get_bdevs` (each volume as SPDK describes an
//! lvol bdev) and `bdev_get_iostat` (the per-reactor counters the request path keeps,
//! summed).

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::{json, Value};

use super::jsonrpc::RpcError;
use super::methods::{decode, failed, MethodFuture, RpcContext};
use crate::serve::iostat::IoStat;
use crate::serve::local::ReactorServe;
use crate::serve::volumes::{self, VolumeDescription};
use crate::EngineError;

/// `bdev_get_bdevs`' parameters.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[expect(
    dead_code,
    reason = "SPDK's parameters, accepted; Spool answers at once"
)]
struct Get {
    name: Option<String>,
    timeout: Option<u64>,
}

/// `bdev_get_iostat`'s parameters (SPDK's client sends `per_channel: false`). SPDK v24.01's
/// client names one bdev (`-b NAME`: `name`); the newer one (`--names A,B`) sends a list,
/// `names`, and SPDK refuses both at once.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[expect(
    dead_code,
    reason = "SPDK's parameters, accepted; counters are per volume"
)]
struct GetIostat {
    name: Option<String>,
    names: Option<Vec<String>>,
    per_channel: Option<bool>,
    reset_mode: Option<String>,
}

/// The name SPDK gives an lvol bdev (its uuid), else the volume's name, else its id.
fn bdev_name(volume: &VolumeDescription) -> String {
    volume
        .uuid
        .clone()
        .or_else(|| volume.name.clone())
        .unwrap_or_else(|| format!("{:#x}", volume.id))
}

fn matches(volume: &VolumeDescription, lvs: Option<&str>, wanted: &str) -> bool {
    let alias = match (lvs, &volume.name) {
        (Some(lvs), Some(name)) => Some(format!("{lvs}/{name}")),
        _ => None,
    };
    bdev_name(volume) == wanted
        || volume.name.as_deref() == Some(wanted)
        || alias.as_deref() == Some(wanted)
        || format!("{:#x}", volume.id) == wanted
}

/// What a name selects, with every volume (for naming parents and clones without opening
/// every blob again) and the lvol store's name and uuid.
struct Selection {
    chosen: Vec<VolumeDescription>,
    all: Vec<VolumeDescription>,
    lvs: Option<(String, String)>,
}

/// The volumes `name` selects (all when `None`); -ENODEV as SPDK when none matches a name.
async fn selected(name: Option<&str>) -> Result<Selection, RpcError> {
    let Ok(store) = volumes::held_store() else {
        // No store (its lvol store was deleted): no bdevs, as SPDK lists none.
        return match name {
            None => Ok(Selection {
                chosen: Vec::new(),
                all: Vec::new(),
                lvs: None,
            }),
            Some(name) => Err(RpcError::new(
                -libc::ENODEV,
                format!("No such device: bdev {name:?}"),
            )),
        };
    };
    let lvs = volumes::lvstore_identity(&store).await;
    let all = volumes::describe_all(&store).await;
    let Some(name) = name else {
        return Ok(Selection {
            chosen: all.clone(),
            all,
            lvs,
        });
    };
    let chosen: Vec<_> = all
        .iter()
        .filter(|v| matches(v, lvs.as_ref().map(|(n, _)| n.as_str()), name))
        .cloned()
        .collect();
    if chosen.is_empty() {
        return Err(RpcError::new(
            -libc::ENODEV,
            format!("No such device: bdev {name:?}"),
        ));
    }
    Ok(Selection { chosen, all, lvs })
}

/// `bdev_get_bdevs {name?}`.
pub(crate) fn bdev_get_bdevs(_: &RpcContext, params: Option<Value>) -> MethodFuture<'_> {
    Box::pin(async move {
        let Get { name, .. } = decode(params)?;
        let Selection { chosen, all, lvs } = selected(name.as_deref()).await?;
        let store = volumes::held_store().map_err(|err| failed(&err))?;
        let unit = store.io_unit_size();
        let name_of = |id: u64| {
            all.iter()
                .find(|v| v.id == id)
                .map_or_else(|| format!("{id:#x}"), bdev_name)
        };
        let list: Vec<Value> = chosen
            .iter()
            .map(|v| {
                let writable = !v.read_only;
                let aliases: Vec<String> = match (&lvs, &v.name) {
                    (Some((lvs, _)), Some(name)) => vec![format!("{lvs}/{name}")],
                    _ => Vec::new(),
                };
                let mut lvol = json!({
                    "lvol_store_uuid": lvs.as_ref().map(|(_, uuid)| uuid.clone()).unwrap_or_default(),
                    "base_bdev": "",
                    "thin_provision": v.thin,
                    "num_allocated_clusters": v.allocated_clusters,
                    "snapshot": v.snapshot,
                    "clone": v.parent.is_some(),
                    "esnap_clone": false,
                });
                if let Some(parent) = v.parent {
                    lvol["base_snapshot"] = json!(name_of(parent));
                }
                if v.snapshot {
                    lvol["clones"] = json!(v.clones.iter().map(|c| name_of(*c)).collect::<Vec<_>>());
                }
                json!({
                    "name": bdev_name(v),
                    "aliases": aliases,
                    "product_name": "Logical Volume",
                    "block_size": unit,
                    "num_blocks": v.size_bytes / unit.max(1),
                    "uuid": v.uuid.clone().unwrap_or_default(),
                    "assigned_rate_limits": {
                        "rw_ios_per_sec": 0, "rw_mbytes_per_sec": 0,
                        "r_mbytes_per_sec": 0, "w_mbytes_per_sec": 0
                    },
                    "claimed": false,
                    "zoned": false,
                    "supported_io_types": {
                        "read": true, "write": writable, "unmap": writable,
                        "write_zeroes": writable, "flush": true, "reset": false,
                        "compare": false, "compare_and_write": false, "abort": false,
                        "nvme_admin": false, "nvme_io": false
                    },
                    "driver_specific": {"lvol": lvol},
                })
            })
            .collect();
        Ok(Value::Array(list))
    })
}

/// Every reactor's counters, summed per blob.
async fn gather(context: &RpcContext) -> Result<HashMap<u64, IoStat>, EngineError> {
    let mut total: HashMap<u64, IoStat> = HashMap::new();
    for reactor in &context.shared.reactors {
        let handle = spool_reactor::spawn_on(*reactor, || async {
            ReactorServe::current()
                .map(|state| state.iostats.snapshot())
                .unwrap_or_default()
        })?;
        for (id, stat) in handle.await? {
            total.entry(id).or_default().add(&stat);
        }
    }
    Ok(total)
}

/// `bdev_get_iostat {name? | names?}`: SPDK's counters per volume (ticks are nanoseconds:
/// `tick_rate` is 1e9).
pub(crate) fn bdev_get_iostat(context: &RpcContext, params: Option<Value>) -> MethodFuture<'_> {
    Box::pin(async move {
        let GetIostat { name, names, .. } = decode(params)?;
        let chosen = match (name, names) {
            (Some(_), Some(_)) => {
                return Err(RpcError::new(
                    -libc::EINVAL,
                    "Invalid argument: give name or names, not both",
                ))
            }
            (None, None) => selected(None).await?.chosen,
            (Some(name), None) => selected(Some(&name)).await?.chosen,
            // Each name's volumes, in the order given (-ENODEV for a name that matches none).
            (None, Some(names)) => {
                let mut chosen = Vec::new();
                for name in &names {
                    chosen.extend(selected(Some(name)).await?.chosen);
                }
                chosen
            }
        };
        let stats = gather(context).await.map_err(|err| failed(&err))?;
        let bdevs: Vec<Value> = chosen
            .iter()
            .map(|v| {
                let s = stats.get(&v.id).copied().unwrap_or_default();
                json!({
                    "name": bdev_name(v),
                    "bytes_read": s.bytes_read,
                    "num_read_ops": s.num_read_ops,
                    "bytes_written": s.bytes_written,
                    "num_write_ops": s.num_write_ops,
                    "bytes_unmapped": s.bytes_unmapped,
                    "num_unmap_ops": s.num_unmap_ops,
                    "bytes_copied": 0,
                    "num_copy_ops": 0,
                    "read_latency_ticks": s.read_latency_ns,
                    "max_read_latency_ticks": s.max_read_latency_ns,
                    "min_read_latency_ticks": s.min_read_latency_ns,
                    "write_latency_ticks": s.write_latency_ns,
                    "max_write_latency_ticks": s.max_write_latency_ns,
                    "min_write_latency_ticks": s.min_write_latency_ns,
                    "unmap_latency_ticks": s.unmap_latency_ns,
                    "max_unmap_latency_ticks": s.max_unmap_latency_ns,
                    "min_unmap_latency_ticks": s.min_unmap_latency_ns,
                    "copy_latency_ticks": 0,
                    "max_copy_latency_ticks": 0,
                    "min_copy_latency_ticks": 0,
                    "io_error": {},
                })
            })
            .collect();
        Ok(json!({
            "tick_rate": 1_000_000_000u64,
            "ticks": spool_reactor::now_ns(),
            "bdevs": bdevs,
        }))
    })
}
