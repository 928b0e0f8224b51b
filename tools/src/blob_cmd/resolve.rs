//! BLOB arguments and blob handles. A BLOB is a blob id (decimal, or 0x-hex as SPDK prints
//! it) or the value of a blob's `name` xattr, compared with its trailing NULs stripped (SPDK's
//! lvol layer stores names NUL-padded to 64 bytes; blobcli stores C strings with their NUL).

use spool_blob::format::super_block::bstype_name;
use spool_blob::lvol::xattr::LVS_BSTYPE;
use spool_blob::{Blob, Blobstore, LvolStore};

use crate::blob_cmd::text::{escape, id_hex, strip_nuls};
use crate::error::ToolError;

/// The xattr that holds a blob's name.
pub const NAME_XATTR: &str = "name";

/// `text` as a number: 0x-hex or decimal.
pub fn parse_id(text: &str) -> Option<u64> {
    let text = text.trim();
    if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        return u64::from_str_radix(hex, 16).ok();
    }
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Whether the stored name `value` is `name` (trailing NULs ignored).
pub fn name_matches(value: &[u8], name: &str) -> bool {
    strip_nuls(value).0 == name.as_bytes()
}

/// The blobs whose `name` xattr is `name` (blobs that cannot be opened are skipped).
pub async fn blobs_named(store: &Blobstore, name: &str) -> Vec<u64> {
    let mut found = Vec::new();
    for id in store.blob_ids() {
        let Ok(blob) = store.open_blob(id).await else {
            continue;
        };
        if blob
            .xattr(NAME_XATTR)
            .is_some_and(|value| name_matches(&value, name))
        {
            found.push(id);
        }
        if let Err(err) = blob.close().await {
            tracing::warn!(blob = id_hex(id), %err, "close after a name lookup failed");
        }
    }
    found
}

/// The blobs of `store` that do not open (the load reported them unreadable): a name looked
/// up and not found may be one of theirs.
async fn unopenable_blobs(store: &Blobstore) -> Vec<u64> {
    let mut found = Vec::new();
    for id in store.blob_ids() {
        match store.open_blob(id).await {
            Ok(blob) => {
                if let Err(err) = blob.close().await {
                    tracing::warn!(blob = id_hex(id), %err, "close after a name lookup failed");
                }
            }
            Err(_) => found.push(id),
        }
    }
    found
}

/// Whether `store` is an lvol store (bstype `LVOLSTORE`).
pub fn is_lvol_store(store: &Blobstore) -> bool {
    bstype_name(&store.bstype()) == LVS_BSTYPE
}

/// The lvol store view of `store` when it is an lvol store (`None` otherwise); opening it
/// reads every blob's name and uuid, and fails as SPDK's loader would.
pub async fn lvol_store(store: &Blobstore) -> Result<Option<LvolStore>, ToolError> {
    if !is_lvol_store(store) {
        return Ok(None);
    }
    Ok(Some(LvolStore::open(store.clone()).await?))
}

/// The blob a BLOB argument names: an existing blob's id; in an lvol store, the lvol with
/// that uuid or alias (`lvs/lvol`); else the one blob with that name.
pub async fn resolve_blob(store: &Blobstore, text: &str) -> Result<u64, ToolError> {
    let number = parse_id(text);
    if let Some(id) = number {
        if store.blob_ids().contains(&id) {
            return Ok(id);
        }
    }
    if let Ok(Some(lvs)) = lvol_store(store).await {
        if let Ok(lvol) = lvs.lookup(text) {
            return Ok(lvol.id);
        }
    }
    let named = blobs_named(store, text).await;
    if named.is_empty() {
        let unreadable = unopenable_blobs(store).await;
        if !unreadable.is_empty() {
            let ids: Vec<String> = unreadable.iter().map(|&id| id_hex(id)).collect();
            return Err(ToolError::Failed(format!(
                "no blob that can be read is named '{}', but the store has {} ({}) whose name cannot be read: `spool ls` says why; give the blob's id, or repair the store with `spool check --repair`",
                escape(text.as_bytes()),
                if ids.len() == 1 { "an unreadable blob" } else { "unreadable blobs" },
                ids.join(", ")
            )));
        }
    }
    match named.as_slice() {
        [id] => Ok(*id),
        [] => Err(ToolError::NoSuchBlob(match number {
            Some(id) if text.trim().to_ascii_lowercase().starts_with("0x") => format!(
                "blob {} does not exist (no blob has that id or name)",
                id_hex(id)
            ),
            Some(id) => format!(
                "blob {} ({}) does not exist (no blob has that id or name)",
                escape(text.as_bytes()),
                id_hex(id)
            ),
            None => format!("no blob is named '{}'", escape(text.as_bytes())),
        })),
        several => Err(ToolError::Failed(format!(
            "the name '{}' matches {} blobs ({}): give an id",
            escape(text.as_bytes()),
            several.len(),
            several
                .iter()
                .map(|&id| id_hex(id))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Opens blob `id`, runs `work` with it, and closes it whatever `work` returned (so the
/// store can be unloaded). `work`'s error comes first.
pub async fn with_blob<T>(
    store: &Blobstore,
    id: u64,
    work: impl AsyncFnOnce(&Blob) -> Result<T, ToolError>,
) -> Result<T, ToolError> {
    let blob = store.open_blob(id).await?;
    let result = work(&blob).await;
    let closed = blob.close().await;
    match (result, closed) {
        (Ok(value), Ok(())) => Ok(value),
        (Ok(_), Err(err)) => Err(err.into()),
        (Err(err), Ok(())) => Err(err),
        (Err(err), Err(close)) => {
            tracing::warn!(blob = id_hex(id), %close, "close after a failed command failed");
            Err(err)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_as_spdk_prints_them() {
        assert_eq!(parse_id("0x100000000"), Some(0x1_0000_0000));
        assert_eq!(parse_id("0X100000004"), Some(0x1_0000_0004));
        assert_eq!(parse_id("4294967296"), Some(0x1_0000_0000));
        assert_eq!(parse_id("lv0"), None);
        assert_eq!(parse_id("0x"), None);
        assert_eq!(parse_id("0xzz"), None);
        assert_eq!(parse_id(""), None);
        assert_eq!(parse_id("-1"), None);
        assert_eq!(parse_id("99999999999999999999999"), None);
    }

    #[test]
    fn names_match_without_trailing_nuls() {
        assert!(name_matches(b"hello\0", "hello"));
        let mut padded = b"lv0".to_vec();
        padded.resize(64, 0);
        assert!(name_matches(&padded, "lv0"));
        assert!(name_matches(b"lv0", "lv0"));
        assert!(!name_matches(b"lv0\0x", "lv0"));
        assert!(!name_matches(b"lv01", "lv0"));
    }
}
