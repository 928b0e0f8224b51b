//! Exporting volumes over NBD while serving. SPDK's `nbd_start_disk` binds a kernel
//! `/dev/nbdX` instead, so these are Spool's own, named after SPDK's conventions:
//! `nbd_start_export`, `nbd_stop_export`, `nbd_get_exports`.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};

use super::jsonrpc::RpcError;
use super::methods::{decode, failed, MethodFuture, RpcContext};
use crate::serve::local::ReactorServe;
use crate::serve::volumes::{self, ExportSet};
use crate::EngineError;

/// Publishes `set` to every reactor (new connections see it; old ones keep their volume).
pub(crate) async fn publish(set: Arc<ExportSet>) -> Result<(), EngineError> {
    let handle = spool_reactor::broadcast(move |_| {
        if let Some(state) = ReactorServe::current() {
            state.set_exports(Arc::clone(&set));
        }
    })?;
    Ok(handle.await?)
}

/// The export set now (as the metadata reactor has it).
pub(crate) fn current() -> Result<Arc<ExportSet>, EngineError> {
    ReactorServe::current()
        .map(|state| state.exports())
        .ok_or_else(|| EngineError::InvalidArgument("the daemon is not serving".into()))
}

/// The blob a volume argument names: a `name` xattr (any blob but an lvol store's super
/// blob), or an id as SPDK prints it.
pub(crate) async fn resolve_volume(text: &str) -> Result<u64, EngineError> {
    let store = volumes::held_store()?;
    volumes::find_blob(&store, text).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Start {
    /// The volume (name or id).
    bdev_name: String,
    /// The export's name (default: the volume's name as given).
    export_name: Option<String>,
}

/// `nbd_start_export {bdev_name, export_name?}`: exports a volume; returns the export name.
pub(crate) fn nbd_start_export(_: &RpcContext, params: Option<Value>) -> MethodFuture<'_> {
    Box::pin(async move {
        let Start {
            bdev_name,
            export_name,
        } = decode(params)?;
        let run = async {
            let id = resolve_volume(&bdev_name).await?;
            let name = export_name.unwrap_or_else(|| bdev_name.clone());
            let set = volumes::add_export(&*current()?, id, name.clone()).await?;
            publish(Arc::new(set)).await?;
            tracing::info!(export = %name, blob = format!("{id:#x}"), "export started");
            Ok::<_, EngineError>(name)
        };
        run.await.map(Value::String).map_err(|err| failed(&err))
    })
}

/// Looks (10 ms apart) for the clients of an export being stopped to be gone: 0.5 s.
const STOP_RETRIES: u32 = 50;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Stop {
    export_name: String,
}

/// `nbd_stop_export {export_name}`: stops exporting (-EBUSY while clients are connected).
pub(crate) fn nbd_stop_export(_: &RpcContext, params: Option<Value>) -> MethodFuture<'_> {
    Box::pin(async move {
        let Stop { export_name } = decode(params)?;
        let run = async {
            // A client that has just left may not have been noticed yet: give closing
            // connections a moment before answering -EBUSY.
            let mut tries = 0;
            let (set, id) = loop {
                match volumes::remove_export(&*current()?, &export_name) {
                    Err(EngineError::Busy(_)) if tries < STOP_RETRIES => {
                        tries += 1;
                        spool_reactor::sleep(std::time::Duration::from_millis(10)).await;
                    }
                    other => break other?,
                }
            };
            publish(Arc::new(set)).await?;
            volumes::close_held(id).await?;
            tracing::info!(export = %export_name, "export stopped");
            Ok::<_, EngineError>(())
        };
        run.await.map(|()| json!(true)).map_err(|err| failed(&err))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Get {
    export_name: Option<String>,
}

/// `nbd_get_exports {export_name?}`: the exports (-ENOENT for an unknown name).
pub(crate) fn nbd_get_exports(_: &RpcContext, params: Option<Value>) -> MethodFuture<'_> {
    Box::pin(async move {
        let Get { export_name } = decode(params)?;
        let set = current().map_err(|err| failed(&err))?;
        let list: Vec<Value> = volumes::summaries(&set)
            .into_iter()
            .filter(|e| export_name.as_ref().is_none_or(|name| &e.name == name))
            .map(|e| {
                json!({
                    "export_name": e.name,
                    "blob_id": e.blob_id,
                    "size": e.size_bytes,
                    "read_only": e.read_only,
                    "thin_provision": e.thin,
                    "connections": e.connections,
                })
            })
            .collect();
        if let (Some(name), true) = (&export_name, list.is_empty()) {
            return Err(RpcError::new(
                -libc::ENOENT,
                format!("no export is named {name:?}"),
            ));
        }
        Ok(Value::Array(list))
    })
}
