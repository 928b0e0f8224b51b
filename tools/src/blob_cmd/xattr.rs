//! `spool xattr IMAGE BLOB ls | get KEY | set KEY VALUE | rm KEY`: a blob's public xattrs.

use std::collections::BTreeMap;

use spool_blob::lvol::xattr::UUID_XATTR;
use spool_blob::{Blob, BlobError, Blobstore};
use spool_engine::OpenInfo;

use crate::blob_cmd::args::{XattrArgs, XattrOp};
use crate::blob_cmd::names::{check_name_value, check_unique};
use crate::blob_cmd::resolve::{is_lvol_store, resolve_blob, with_blob, NAME_XATTR};
use crate::blob_cmd::store_cmds::to_json;
use crate::blob_cmd::text::{emit_bytes, escape, hex, name_of, show_value, strip_nuls, unhex};
use crate::blob_cmd::{on_store, on_store_read_only};
use crate::error::ToolError;

/// What an operation prints on stdout (nothing for set and rm).
async fn apply(blob: &Blob, op: XattrOp) -> Result<Vec<u8>, ToolError> {
    match op {
        XattrOp::Ls { json } => {
            let pairs = blob.xattrs();
            if json {
                let map: BTreeMap<String, String> = pairs
                    .iter()
                    .map(|(name, value)| (String::from_utf8_lossy(name).into_owned(), hex(value)))
                    .collect();
                Ok(format!("{}\n", to_json(&map)?).into_bytes())
            } else {
                let mut out = String::new();
                for (name, value) in &pairs {
                    out.push_str(&format!("{} = {}\n", escape(name), show_value(value)));
                }
                Ok(out.into_bytes())
            }
        }
        XattrOp::Get {
            key,
            raw,
            hex: as_hex,
        } => {
            let value = blob.xattr(&key).ok_or_else(|| BlobError::NoSuchXattr {
                id: blob.id(),
                name: key.clone(),
            })?;
            Ok(if raw {
                value
            } else if as_hex {
                format!("{}\n", hex(&value)).into_bytes()
            } else {
                format!("{}\n", escape(strip_nuls(&value).0)).into_bytes()
            })
        }
        XattrOp::Set { key, value, hex } => {
            let bytes = if hex {
                unhex(&value).ok_or_else(|| {
                    ToolError::Failed(format!("--hex value '{value}' is not whole hex bytes"))
                })?
            } else {
                value.into_bytes()
            };
            blob.set_xattr(&key, &bytes)?;
            blob.sync_md().await?;
            Ok(Vec::new())
        }
        XattrOp::Rm { key } => {
            blob.remove_xattr(&key)?;
            blob.sync_md().await?;
            Ok(Vec::new())
        }
    }
}

/// In an lvol store every lvol carries its `name` and `uuid` (SPDK's loader refuses a blob
/// without a name, and finds lvols by uuid): removing either, or setting `uuid`, would leave
/// a store SPDK does not open as it was. A name changes with `spool rename` (or `xattr set
/// name`, checked as every name is).
async fn refuse_breaking_an_lvol(
    image: &str,
    store: &Blobstore,
    op: &XattrOp,
) -> Result<(), ToolError> {
    let (key, removes) = match op {
        XattrOp::Rm { key } => (key.as_str(), true),
        XattrOp::Set { key, .. } => (key.as_str(), false),
        XattrOp::Ls { .. } | XattrOp::Get { .. } => return Ok(()),
    };
    if !is_lvol_store(store) || !(key == UUID_XATTR || (removes && key == NAME_XATTR)) {
        return Ok(());
    }
    Err(ToolError::Failed(format!(
        "{image}: lvol store: every lvol keeps its '{key}' xattr (SPDK finds and loads lvols by their name and uuid; without it the store would not open as it was){}",
        if key == NAME_XATTR {
            "; to change the name use spool rename"
        } else {
            ""
        }
    )))
}

/// `spool xattr IMAGE BLOB OP`.
pub fn xattr(args: &XattrArgs) -> Result<(), ToolError> {
    let key = match &args.op {
        XattrOp::Ls { .. } => None,
        XattrOp::Get { key, .. } | XattrOp::Set { key, .. } | XattrOp::Rm { key } => Some(key),
    };
    if key.is_some_and(String::is_empty) {
        return Err(ToolError::Usage("the xattr name is empty".into()));
    }
    if let XattrOp::Set {
        value, hex: true, ..
    } = &args.op
    {
        if unhex(value).is_none() {
            return Err(ToolError::Usage(format!(
                "--hex value '{value}' is not whole hex bytes"
            )));
        }
    }
    // A name set here follows the rules `create --name` and `rename` follow.
    let new_name = match &args.op {
        XattrOp::Set {
            key, value, hex, ..
        } if key == NAME_XATTR => {
            let bytes = if *hex {
                unhex(value).unwrap_or_default()
            } else {
                value.as_bytes().to_vec()
            };
            check_name_value(&bytes)?;
            Some(name_of(&bytes))
        }
        _ => None,
    };
    let (text, op, image) = (args.blob.clone(), args.op.clone(), args.image.clone());
    let reads_only = matches!(op, XattrOp::Ls { .. } | XattrOp::Get { .. });
    let job = move |store: Blobstore, _: OpenInfo| async move {
        let id = resolve_blob(&store, &text).await?;
        if !reads_only {
            refuse_breaking_an_lvol(&image, &store, &op).await?;
        }
        if let Some(name) = &new_name {
            check_unique(&store, name, Some(id)).await?;
        }
        with_blob(&store, id, async |blob| apply(blob, op).await).await
    };
    let out = if reads_only {
        on_store_read_only(&args.image, job)?
    } else {
        on_store(&args.image, job)?
    };
    emit_bytes(&out)
}
