//! The commands on snapshot chains: `snapshot`, `clone`, `inflate`, `decouple`.

use std::rc::Rc;

use spool_blob::{BlobError, Blobstore, LvolStore};
use spool_engine::signals;

use crate::blob_cmd::args::{BlobArgs, SnapshotArgs};
use crate::blob_cmd::names::{check_blob_name, check_not_an_lvol_id, check_unique, lvol_name};
use crate::blob_cmd::on_store;
use crate::blob_cmd::resolve::{lvol_store, resolve_blob, with_blob, NAME_XATTR};
use crate::blob_cmd::text::{emit, human_bytes, id_hex};
use crate::error::ToolError;

/// The xattrs a `--name NAME` gives the new blob (refused if the name is taken).
async fn name_xattrs(
    store: &Blobstore,
    name: Option<&str>,
) -> Result<Vec<(String, Vec<u8>)>, ToolError> {
    let Some(name) = name else {
        return Ok(Vec::new());
    };
    let stored = lvol_name(name)?;
    check_unique(store, name, None).await?;
    Ok(vec![(NAME_XATTR.to_string(), stored)])
}

/// In an lvol store: the new lvol's name (required there, as SPDK's snapshot and clone calls
/// require one); `None` in other stores.
async fn lvol_target(
    store: &Blobstore,
    name: Option<&str>,
    what: &str,
) -> Result<Option<(LvolStore, String)>, ToolError> {
    let Some(lvs) = lvol_store(store).await? else {
        return Ok(None);
    };
    match name {
        Some(name) => {
            check_blob_name(name.as_bytes())?;
            check_not_an_lvol_id(store, name).await?;
            Ok(Some((lvs, name.to_string())))
        }
        None => Err(ToolError::Failed(format!(
            "lvol store '{}': a {what} needs a name (--name)",
            lvs.name()
        ))),
    }
}

/// `spool snapshot IMAGE BLOB [--name NAME]`: prints the new snapshot's id (hex). In an lvol store
/// the snapshot is an lvol (its own uuid), as SPDK's bdev_lvol_snapshot makes it.
pub fn snapshot(args: &SnapshotArgs) -> Result<(), ToolError> {
    let (text, name) = (args.blob.clone(), args.name.clone());
    let id = on_store(&args.image, move |store, _| async move {
        let id = resolve_blob(&store, &text).await?;
        if let Some((lvs, name)) = lvol_target(&store, name.as_deref(), "snapshot").await? {
            return Ok(lvs.create_snapshot(id, &name).await?.id);
        }
        let xattrs = name_xattrs(&store, name.as_deref()).await?;
        Ok(store.create_snapshot(id, &xattrs).await?)
    })?;
    emit(&format!("{}\n", id_hex(id)))
}

/// `spool clone IMAGE SNAPSHOT [--name NAME]`: prints the new clone's id (hex). In an lvol store
/// the clone is an lvol, as SPDK's bdev_lvol_clone makes it.
pub fn clone(args: &SnapshotArgs) -> Result<(), ToolError> {
    let (text, name) = (args.blob.clone(), args.name.clone());
    let id = on_store(&args.image, move |store, _| async move {
        let id = resolve_blob(&store, &text).await?;
        if let Some((lvs, name)) = lvol_target(&store, name.as_deref(), "clone").await? {
            return Ok(lvs.create_clone(id, &name).await?.id);
        }
        let xattrs = name_xattrs(&store, name.as_deref()).await?;
        Ok(store.create_clone(id, &xattrs).await?)
    })?;
    emit(&format!("{}\n", id_hex(id)))
}

/// Whether a stop signal (Ctrl-C, SIGTERM) asked the command to stop.
fn stop_asked() -> Rc<dyn Fn() -> bool> {
    Rc::new(|| signals::stop_requested().is_some())
}

/// A copy a stop signal ended between two clusters, as the command reports it: what was done,
/// what the blob reads meanwhile (through its parent, or zeros where it has no parent), and
/// that running it again finishes the job (the store is unloaded cleanly after).
fn stopped(err: BlobError, has_parent: bool) -> ToolError {
    match (&err, signals::stop_requested()) {
        (
            BlobError::Stopped {
                id,
                what,
                done,
                total,
            },
            Some(signal),
        ) => ToolError::Interrupted {
            signal,
            done: format!(
                "{done} of {total} clusters of blob {} copied (the {what} is not finished: {}; run it again to finish)",
                id_hex(*id),
                if has_parent {
                    "the blob still reads through its parent"
                } else {
                    "the blob reads zeros where it has no cluster yet"
                }
            ),
            report: None,
        },
        _ => ToolError::from(err),
    }
}

/// An inflate or decouple without room for its clusters, in words: the image, the sizes and
/// what to do (as `create` and `resize` say it); any other error as `then` words it.
fn no_room(
    image: &str,
    cluster_size: u64,
    err: BlobError,
    then: impl FnOnce(BlobError) -> ToolError,
) -> ToolError {
    match err {
        BlobError::NoRoom {
            what, needed, free, ..
        } => ToolError::Failed(format!(
            "{image}: no space to {what}: it needs {needed} clusters of {} ({}) and {free} are free ({}); free some (delete blobs or snapshots no longer needed), then run it again",
            human_bytes(cluster_size),
            human_bytes(needed.saturating_mul(cluster_size)),
            human_bytes(free.saturating_mul(cluster_size)),
        )),
        other => then(other),
    }
}

/// `spool inflate IMAGE BLOB`: allocate every cluster the blob does not own; no parent after.
/// Ctrl-C stops it between two clusters (the store is unloaded cleanly; exit 130).
pub fn inflate(args: &BlobArgs) -> Result<(), ToolError> {
    let text = args.blob.clone();
    let image = args.image.clone();
    on_store(&args.image, move |store, _| async move {
        let id = resolve_blob(&store, &text).await?;
        let has_parent = with_blob(&store, id, async |blob| Ok(blob.parent_id().is_some())).await?;
        store
            .inflate_blob_until(id, stop_asked())
            .await
            .map_err(|err| {
                no_room(&image, store.cluster_size(), err, |err| {
                    stopped(err, has_parent)
                })
            })
    })
}

/// `spool decouple IMAGE BLOB`: copy what the parent owns; the grandparent becomes the parent.
/// Ctrl-C stops it between two clusters, as for inflate.
pub fn decouple(args: &BlobArgs) -> Result<(), ToolError> {
    let text = args.blob.clone();
    let image = args.image.clone();
    on_store(&args.image, move |store, _| async move {
        let id = resolve_blob(&store, &text).await?;
        let has_parent = with_blob(&store, id, async |blob| Ok(blob.parent_id().is_some())).await?;
        store
            .decouple_parent_until(id, stop_asked())
            .await
            .map_err(|err| {
                no_room(&image, store.cluster_size(), err, |err| {
                    stopped(err, has_parent)
                })
            })
    })
}
