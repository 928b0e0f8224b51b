//! Blob names: one set of rules for every command that gives a blob a name (`create --name`,
//! `create --xattr name=...`, `snapshot`/`clone --name`, `xattr set name`, `rename`): 1 to 63
//! bytes (SPDK's 64-byte name buffer less its NUL), UTF-8 with no NUL inside, not a blob id (a name like
//! `0x100000000` or `4294967296` could not be told from one), and unique in the store.

use spool_blob::Blobstore;

use crate::blob_cmd::args::RenameArgs;
use crate::blob_cmd::on_store;
use crate::blob_cmd::resolve::{
    blobs_named, lvol_store, parse_id, resolve_blob, with_blob, NAME_XATTR,
};
use crate::blob_cmd::text::{escape, id_hex, strip_nuls};
use crate::error::ToolError;

/// Bytes of the name buffer SPDK's lvol layer stores (`SPDK_LVOL_NAME_MAX`).
pub const LVOL_NAME_BYTES: usize = 64;

/// Checks `name` against the rules every name follows (not its uniqueness).
pub fn check_blob_name(name: &[u8]) -> Result<(), ToolError> {
    if name.is_empty() {
        return Err(ToolError::Usage("the blob name is empty".into()));
    }
    if name.len() >= LVOL_NAME_BYTES {
        return Err(ToolError::Usage(format!(
            "the blob name '{}' is {} bytes; at most {} fit SPDK's {LVOL_NAME_BYTES}-byte name",
            escape(name),
            name.len(),
            LVOL_NAME_BYTES - 1
        )));
    }
    if name.contains(&0) {
        return Err(ToolError::Usage("the blob name contains a NUL byte".into()));
    }
    if std::str::from_utf8(name).is_err() {
        return Err(ToolError::Usage(format!(
            "the blob name '{}' is not UTF-8: no command line could name the blob back",
            escape(name)
        )));
    }
    if std::str::from_utf8(name).ok().and_then(parse_id).is_some() {
        return Err(ToolError::Usage(format!(
            "the blob name '{}' reads as a blob id; a name must not (it could not be told from one)",
            escape(name)
        )));
    }
    Ok(())
}

/// The name an xattr `name` value holds (trailing NULs stripped), checked: at most 64 bytes
/// stored, and the name's rules.
pub fn check_name_value(value: &[u8]) -> Result<(), ToolError> {
    let (name, _) = strip_nuls(value);
    check_blob_name(name)?;
    if value.len() > LVOL_NAME_BYTES {
        return Err(ToolError::Usage(format!(
            "the name value is {} bytes; at most {LVOL_NAME_BYTES} with its NUL padding",
            value.len()
        )));
    }
    Ok(())
}

/// `name` as SPDK's lvol layer stores it: NUL-padded to 64 bytes (at most 63 of name).
pub fn lvol_name(name: &str) -> Result<Vec<u8>, ToolError> {
    check_blob_name(name.as_bytes())?;
    let mut stored = name.as_bytes().to_vec();
    stored.resize(LVOL_NAME_BYTES, 0);
    Ok(stored)
}

/// Fails, in an lvol store, when `name` reads as an lvol's uuid or alias (see
/// [`spool_blob::LvolStore::name_reads_as_other`]): it could not be reached by name, and a
/// command given it would act on that other lvol.
pub async fn check_not_an_lvol_id(store: &Blobstore, name: &str) -> Result<(), ToolError> {
    if let Ok(Some(lvs)) = lvol_store(store).await {
        if let Some(reason) = lvs.name_reads_as_other(name) {
            return Err(ToolError::Failed(format!(
                "the blob name '{}' {reason}: a name that reads as an lvol's uuid or alias could not be told from one",
                escape(name.as_bytes())
            )));
        }
    }
    Ok(())
}

/// Fails when a blob other than `except` is named `name`, or, in an lvol store, when `name`
/// reads as an lvol's uuid or alias (see [`spool_blob::LvolStore::name_reads_as_other`]).
pub async fn check_unique(
    store: &Blobstore,
    name: &str,
    except: Option<u64>,
) -> Result<(), ToolError> {
    check_not_an_lvol_id(store, name).await?;
    let taken = blobs_named(store, name).await;
    match taken.iter().find(|&&id| Some(id) != except) {
        Some(&other) => Err(ToolError::Failed(format!(
            "a blob named '{}' already exists ({}); names are unique in a store",
            escape(name.as_bytes()),
            id_hex(other)
        ))),
        None => Ok(()),
    }
}

/// `spool rename IMAGE BLOB NEWNAME`: the blob's `name` becomes NEWNAME (checked as every
/// name is). In an lvol store it is an lvol rename, as SPDK's `bdev_lvol_rename`.
pub fn rename(args: &RenameArgs) -> Result<(), ToolError> {
    check_blob_name(args.name.as_bytes())?;
    let (text, name) = (args.blob.clone(), args.name.clone());
    on_store(&args.image, move |store, _| async move {
        let id = resolve_blob(&store, &text).await?;
        check_unique(&store, &name, Some(id)).await?;
        // A read-only blob's metadata (a snapshot's, as in SPDK) does not change: it keeps
        // the name it has.
        if with_blob(&store, id, async |blob| Ok(blob.is_read_only())).await? {
            return Err(ToolError::Failed(format!(
                "blob {id:#x} is read-only (a snapshot, or set read-only): its metadata does not change, so it keeps the name it has"
            )));
        }
        if let Some(lvs) = lvol_store(&store).await? {
            return Ok(lvs.rename_lvol(id, &name).await?);
        }
        let stored = lvol_name(&name)?;
        with_blob(&store, id, async |blob| {
            blob.set_xattr(NAME_XATTR, &stored)?;
            Ok(blob.sync_md().await?)
        })
        .await
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_one_set_of_rules() {
        let stored = lvol_name("lv0").unwrap();
        assert_eq!(stored.len(), 64);
        assert_eq!(&stored[..3], b"lv0");
        assert!(stored[3..].iter().all(|&b| b == 0));
        assert!(lvol_name(&"x".repeat(63)).is_ok());
        let err = lvol_name(&"x".repeat(64)).unwrap_err();
        assert!(err.to_string().contains("64 bytes"), "{err}");
        assert!(lvol_name("").is_err());
        for id_like in ["0x100000000", "4294967296", "12"] {
            let err = check_blob_name(id_like.as_bytes()).unwrap_err();
            assert!(err.to_string().contains("reads as a blob id"), "{err}");
        }
        assert!(check_blob_name(b"0xvol").is_ok());
        assert!(check_name_value(b"lv0\0").is_ok());
        assert!(check_name_value(&[b'n'; 100]).is_err());
        assert!(check_name_value(b"a\0b").is_err());
    }
}
