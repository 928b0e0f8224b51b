//! The commands on one blob's life: `create`, `resize`, `delete`, `set-read-only`.

use spool_blob::format::BLOBID_INVALID;
use spool_blob::{BlobError, BlobOptions, Blobstore, ExtentForm, LvolStore};

use crate::blob_cmd::args::{BlobArgs, CreateArgs, ResizeArgs};
use crate::blob_cmd::names::{
    check_blob_name, check_name_value, check_not_an_lvol_id, check_unique, lvol_name,
};
use crate::blob_cmd::resolve::{lvol_store, parse_id, resolve_blob, with_blob, NAME_XATTR};
use crate::blob_cmd::text::{emit, human_bytes, id_hex, name_of};
use crate::blob_cmd::{clusters_for, on_store};
use crate::error::ToolError;

/// What to do, besides freeing space, when a new thick blob does not fit.
const MAKE_IT_THIN: &str = "make the blob thin (--thin) to allocate on write";

/// What to do, besides freeing space, when growing a thick blob does not fit (resize has no
/// --thin: a thick blob stays thick).
const GROW_LESS: &str =
    "give a smaller size (a thick blob takes every cluster of its new size when it grows)";

/// Fails, in words, when a thick blob of `clusters` cannot get them from the store's
/// free clusters (`growing` of them for a resize): the image, the sizes, and what to do
/// (`advice`, after freeing some).
fn check_room(
    image: &str,
    store: &Blobstore,
    what: &str,
    clusters: u64,
    advice: &str,
) -> Result<(), ToolError> {
    let free = store.free_cluster_count();
    if clusters <= free {
        return Ok(());
    }
    let cluster = store.cluster_size();
    Err(ToolError::Failed(format!(
        "{image}: no space {what}: it needs {clusters} clusters of {} ({}) and {free} are free ({}); free some, or {advice}",
        human_bytes(cluster),
        human_bytes(clusters.saturating_mul(cluster)),
        human_bytes(free.saturating_mul(cluster)),
    )))
}

/// A thick blob's clusters the host filesystem could not reserve, in words (any other error
/// as it is): the image, how much, and what to do (`advice`, after freeing space).
fn host_full(image: &str, what: &str, err: BlobError, advice: &str) -> ToolError {
    match err {
        BlobError::HostNoSpace { bytes, .. } => ToolError::Failed(format!(
            "{image}: the host filesystem is full: reserving {} {what} failed (No space left on device); free space on the host, or {advice}",
            human_bytes(bytes)
        )),
        other => other.into(),
    }
}

/// `spool create IMAGE --size BYTES [--thin] [--name NAME] [--xattr KEY=VALUE]... [--rle]`:
/// prints the new blob's id (hex, as SPDK prints it) alone on stdout. In an lvol store the blob is an lvol
/// (see [`create_lvol`]).
pub fn create(args: &CreateArgs) -> Result<(), ToolError> {
    let mut xattrs: Vec<(String, Vec<u8>)> = args
        .xattrs
        .iter()
        .map(|(key, value)| (key.clone(), value.as_bytes().to_vec()))
        .collect();
    let lvol_args = args.clone();
    if let Some(name) = &args.name {
        if xattrs.iter().any(|(key, _)| key == NAME_XATTR) {
            return Err(ToolError::Usage(
                "give the name with --name or with --xattr name=..., not both".into(),
            ));
        }
        xattrs.push((NAME_XATTR.to_string(), lvol_name(name)?));
    }
    // A blob has one name, checked by the rules every name follows, however it is given.
    let names = xattrs.iter().filter(|(key, _)| key == NAME_XATTR).count();
    if names > 1 {
        return Err(ToolError::Usage(
            "--xattr name=... is given more than once: a blob has one name".into(),
        ));
    }
    for (_, value) in xattrs.iter().filter(|(key, _)| key == NAME_XATTR) {
        check_name_value(value)?;
    }
    let name = xattrs
        .iter()
        .find(|(key, _)| key == NAME_XATTR)
        .map(|(_, value)| name_of(value));
    let (size, image) = (args.size, args.image.clone());
    let options = BlobOptions {
        num_clusters: 0,
        thin: args.thin,
        xattrs,
        internal_xattrs: Vec::new(),
        form: if args.rle {
            ExtentForm::Rle
        } else {
            ExtentForm::Table
        },
    };
    let id = on_store(&args.image, move |store, _| async move {
        if let Some(lvs) = lvol_store(&store).await? {
            return create_lvol(&image, &lvs, &lvol_args).await;
        }
        if let Some(name) = &name {
            check_unique(&store, name, None).await?;
        }
        let options = BlobOptions {
            num_clusters: clusters_for(&image, size, store.cluster_size())?,
            ..options
        };
        let what = format!("for a {} blob", human_bytes(size));
        if !options.thin {
            check_room(&image, &store, &what, options.num_clusters, MAKE_IT_THIN)?;
        }
        store
            .create_blob(&options)
            .await
            .map_err(|err| host_full(&image, &what, err, MAKE_IT_THIN))
    })?;
    emit(&format!("{}\n", id_hex(id)))
}

/// `create` in an lvol store: an lvol named `--name` (required: SPDK's loader refuses a blob
/// without a name), with a new uuid, as SPDK's bdev_lvol_create; `--xattr`s are added after.
/// `--rle` is refused (SPDK's lvol layer makes extent tables).
async fn create_lvol(image: &str, lvs: &LvolStore, args: &CreateArgs) -> Result<u64, ToolError> {
    let Some(name) = &args.name else {
        return Err(ToolError::Failed(format!(
            "lvol store '{}': an lvol needs a name (--name)",
            lvs.name()
        )));
    };
    if args.rle {
        return Err(ToolError::Failed(
            "lvol store: lvols use an extent table, as SPDK makes them (--rle is for other stores)"
                .into(),
        ));
    }
    if args.xattrs.iter().any(|(key, _)| key == NAME_XATTR) {
        return Err(ToolError::Failed(format!(
            "lvol store '{}': give the lvol's name with --name, not --xattr name=...",
            lvs.name()
        )));
    }
    check_blob_name(name.as_bytes())?;
    let store = lvs.blobstore();
    check_not_an_lvol_id(store, name).await?;
    let clusters = clusters_for(image, args.size, store.cluster_size())?;
    if !args.thin {
        let what = format!("for a {} lvol", human_bytes(args.size));
        check_room(image, store, &what, clusters, MAKE_IT_THIN)?;
    }
    // clusters_for checked that the rounded size fits.
    let bytes = clusters.saturating_mul(store.cluster_size());
    let lvol = lvs
        .create_lvol(name, bytes, args.thin)
        .await
        .map_err(|err| {
            host_full(
                image,
                &format!("for a {} lvol", human_bytes(bytes)),
                err,
                MAKE_IT_THIN,
            )
        })?;
    if !args.xattrs.is_empty() {
        with_blob(store, lvol.id, async |blob| {
            for (key, value) in &args.xattrs {
                blob.set_xattr(key, value.as_bytes())?;
            }
            Ok(blob.sync_md().await?)
        })
        .await?;
    }
    Ok(lvol.id)
}

/// `spool resize IMAGE BLOB BYTES [--shrink]`: a smaller size drops the data past it, so
/// it is refused without `--shrink`; a thick blob that grows must find its clusters free.
pub fn resize(args: &ResizeArgs) -> Result<(), ToolError> {
    let (text, size, shrink) = (args.blob.clone(), args.size, args.shrink);
    let image = args.image.clone();
    on_store(&args.image, move |store, _| async move {
        let id = resolve_blob(&store, &text).await?;
        let clusters = clusters_for(&image, size, store.cluster_size())?;
        let cluster = store.cluster_size();
        with_blob(&store, id, async |blob| {
            let now = blob.num_clusters();
            if clusters < now && !shrink {
                return Err(ToolError::Failed(format!(
                    "{image}: blob {} is {}; resizing it to {} would drop the data past that: add --shrink if that is what you want",
                    id_hex(id),
                    human_bytes(now * cluster),
                    human_bytes(clusters.saturating_mul(cluster))
                )));
            }
            if clusters > now && !blob.is_thin() {
                let what = format!("to grow blob {} to {}", id_hex(id), human_bytes(size));
                check_room(&image, &store, &what, clusters - now, GROW_LESS)?;
            }
            let what = format!("to grow blob {} to {}", id_hex(id), human_bytes(size));
            blob.resize(clusters)
                .await
                .map_err(|err| host_full(&image, &what, err, GROW_LESS))?;
            blob.sync_md().await?;
            Ok(())
        })
        .await
    })
}

/// `spool delete IMAGE BLOB`. Deleting the super blob also unsets the super blob.
/// A blob whose metadata does not parse (one `check --repair` kept) is deleted offline
/// instead: its root page zeroed and the store repaired, freeing what only it held
/// (`spool_blob::check::forget`).
pub fn delete(args: &BlobArgs) -> Result<(), ToolError> {
    let (text, image) = (args.blob.clone(), args.image.clone());
    let damaged = on_store(&args.image, move |store, _| async move {
        // A blob whose metadata does not parse (or whose clone cannot open through it) is
        // decided offline, from its id.
        let id = match resolve_blob(&store, &text).await {
            Ok(id) => id,
            Err(err) => match parse_id(&text) {
                Some(id) => {
                    let missing = matches!(err, ToolError::NoSuchBlob(_));
                    return Ok(Some((id, err.to_string(), missing)));
                }
                None => return Err(err),
            },
        };
        let was_super = store.get_super().ok() == Some(id);
        if was_super && crate::blob_cmd::resolve::is_lvol_store(&store) {
            return Err(ToolError::Failed(format!(
                "{image}: blob {} is the lvol store's super blob (the store's name and uuid): deleting it would unmake the lvol store; delete its lvols instead, or clear it on purpose with `spool super {image} --clear --force` first",
                id_hex(id)
            )));
        }
        match store.delete_blob(id).await {
            Err(err @ BlobError::CorruptBlob { .. }) => {
                return Ok(Some((id, err.to_string(), false)))
            }
            deleted => deleted?,
        }
        if was_super {
            store.set_super(BLOBID_INVALID).await?;
            eprintln!(
                "note: blob {} was the super blob; no super blob is set now",
                id_hex(id)
            );
        }
        Ok(None)
    })?;
    match damaged {
        Some((id, why, missing)) => delete_damaged(&args.image, id, why, missing),
        None => Ok(()),
    }
}

/// Deletes damaged blob `id` of `image` offline, under the image's exclusive lock; `why` is
/// the loaded store's refusal, said as it is when the md region holds no damaged blob `id`
/// (naming the image and where to look when it found no blob at all: `missing`).
fn delete_damaged(image: &str, id: u64, why: String, missing: bool) -> Result<(), ToolError> {
    use spool_blob::check::CheckError;
    let failed = |err: &dyn std::fmt::Display| ToolError::Failed(format!("{image}: {err}"));
    let _lock = spool_engine::ImageLock::exclusive(std::path::Path::new(image))
        .map_err(|err| failed(&err))?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .map_err(|err| failed(&spool_engine::words::io_words(&err)))?;
    let report = match spool_blob::check::forget::forget_damaged_blob(&file, id) {
        Ok(report) => report,
        Err(CheckError::NotDamaged(_) | CheckError::NoSuchBlob(_)) => {
            return Err(if missing {
                crate::blob_cmd::name_image(image, ToolError::NoSuchBlob(why))
            } else {
                ToolError::Failed(why)
            });
        }
        Err(err) => return Err(failed(&err)),
    };
    for line in &report.changes {
        eprintln!("delete: {line}");
    }
    for line in &report.not_repaired {
        eprintln!("delete: not repaired: {line}");
    }
    Ok(())
}

/// `spool set-read-only IMAGE BLOB`: data and metadata read-only from now on.
pub fn set_read_only(args: &BlobArgs) -> Result<(), ToolError> {
    let text = args.blob.clone();
    on_store(&args.image, move |store, _| async move {
        let id = resolve_blob(&store, &text).await?;
        with_blob(&store, id, async |blob| {
            blob.set_read_only()?;
            blob.sync_md().await?;
            Ok(())
        })
        .await
    })
}
