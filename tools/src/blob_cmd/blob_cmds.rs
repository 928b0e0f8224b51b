//! The commands on one blob's life: `create`, `resize`, `delete`, `set-read-only`.

use spool_blob::format::BLOBID_INVALID;
use spool_blob::{BlobOptions, ExtentForm, LvolStore};

use crate::blob_cmd::args::{BlobArgs, CreateArgs, ResizeArgs};
use crate::blob_cmd::resolve::{blobs_named, lvol_store, resolve_blob, with_blob, NAME_XATTR};
use crate::blob_cmd::text::{emit, escape, id_hex, name_of};
use crate::blob_cmd::{clusters_for, on_store};
use crate::error::ToolError;

/// Bytes of the name buffer SPDK's lvol layer stores (`SPDK_LVOL_NAME_MAX`).
pub const LVOL_NAME_BYTES: usize = 64;

/// `name` as SPDK's lvol layer stores it: NUL-padded to 64 bytes (at most 63 of name).
pub fn lvol_name(name: &str) -> Result<Vec<u8>, ToolError> {
    let bytes = name.as_bytes();
    if bytes.is_empty() {
        return Err(ToolError::Failed("the blob name is empty".into()));
    }
    if bytes.len() >= LVOL_NAME_BYTES {
        return Err(ToolError::Failed(format!(
            "the blob name '{}' is {} bytes; at most {} fit SPDK's {LVOL_NAME_BYTES}-byte name",
            escape(bytes),
            bytes.len(),
            LVOL_NAME_BYTES - 1
        )));
    }
    if bytes.contains(&0) {
        return Err(ToolError::Failed(
            "the blob name contains a NUL byte".into(),
        ));
    }
    let mut stored = bytes.to_vec();
    stored.resize(LVOL_NAME_BYTES, 0);
    Ok(stored)
}

/// `spool create IMAGE --size BYTES [--thin] [--name NAME] [--xattr KEY=VALUE]... [--rle]`:
/// prints the new blob's id (decimal) alone on stdout. In an lvol store the blob is an lvol
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
            return Err(ToolError::Failed(
                "give the name with --name or with --xattr name=..., not both".into(),
            ));
        }
        xattrs.push((NAME_XATTR.to_string(), lvol_name(name)?));
    }
    let name = xattrs
        .iter()
        .find(|(key, _)| key == NAME_XATTR)
        .map(|(_, value)| name_of(value));
    let size = args.size;
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
            return create_lvol(&lvs, &lvol_args).await;
        }
        if let Some(name) = &name {
            let taken = blobs_named(&store, name).await;
            if let Some(&other) = taken.first() {
                return Err(ToolError::Failed(format!(
                    "a blob named '{}' already exists ({})",
                    escape(name.as_bytes()),
                    id_hex(other)
                )));
            }
        }
        let options = BlobOptions {
            num_clusters: clusters_for(size, store.cluster_size()),
            ..options
        };
        Ok(store.create_blob(&options).await?)
    })?;
    emit(&format!("{id}\n"))
}

/// `create` in an lvol store: an lvol named `--name` (required: SPDK's loader refuses a blob
/// without a name), with a new uuid, as SPDK's bdev_lvol_create; `--xattr`s are added after.
/// `--rle` is refused (SPDK's lvol layer makes extent tables).
async fn create_lvol(lvs: &LvolStore, args: &CreateArgs) -> Result<u64, ToolError> {
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
    let store = lvs.blobstore();
    let bytes = clusters_for(args.size, store.cluster_size()) * store.cluster_size();
    let lvol = lvs.create_lvol(name, bytes, args.thin).await?;
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

/// `spool resize IMAGE BLOB BYTES`.
pub fn resize(args: &ResizeArgs) -> Result<(), ToolError> {
    let (text, size) = (args.blob.clone(), args.size);
    on_store(&args.image, move |store, _| async move {
        let id = resolve_blob(&store, &text).await?;
        let clusters = clusters_for(size, store.cluster_size());
        with_blob(&store, id, async |blob| {
            blob.resize(clusters).await?;
            blob.sync_md().await?;
            Ok(())
        })
        .await
    })
}

/// `spool delete IMAGE BLOB`. Deleting the super blob also unsets the super blob.
pub fn delete(args: &BlobArgs) -> Result<(), ToolError> {
    let text = args.blob.clone();
    on_store(&args.image, move |store, _| async move {
        let id = resolve_blob(&store, &text).await?;
        let was_super = store.get_super().ok() == Some(id);
        store.delete_blob(id).await?;
        if was_super {
            store.set_super(BLOBID_INVALID).await?;
            eprintln!(
                "note: blob {} was the super blob; no super blob is set now",
                id_hex(id)
            );
        }
        Ok(())
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvol_names_are_nul_padded_to_64_bytes() {
        let stored = lvol_name("lv0").unwrap();
        assert_eq!(stored.len(), 64);
        assert_eq!(&stored[..3], b"lv0");
        assert!(stored[3..].iter().all(|&b| b == 0));
        assert!(lvol_name(&"x".repeat(63)).is_ok());
        let err = lvol_name(&"x".repeat(64)).unwrap_err();
        assert!(err.to_string().contains("64 bytes"), "{err}");
        assert!(lvol_name("").is_err());
    }
}
