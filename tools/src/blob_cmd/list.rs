//! `spool ls`: one row (or JSON object) per blob.

use std::collections::BTreeMap;

use serde::Serialize;
use spool_blob::lvol::xattr::{parse_uuid, UUID_XATTR};
use spool_blob::{Blob, Blobstore, ExtentForm, LvolStore};

use crate::blob_cmd::args::LsArgs;
use crate::blob_cmd::on_store_read_only;
use crate::blob_cmd::resolve::{lvol_store, NAME_XATTR};
use crate::blob_cmd::store_cmds::to_json;
use crate::blob_cmd::text::{emit, escape, hex, human_bytes, id_hex, name_of, table};
use crate::error::ToolError;

/// One blob as `ls --json` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct BlobRow {
    /// The id.
    pub id: u64,
    /// The id as SPDK prints it.
    pub id_hex: String,
    /// The `name` xattr, trailing NULs stripped, lossy UTF-8.
    pub name: Option<String>,
    /// The `uuid` xattr, when it holds a uuid as SPDK's lvol layer stores one (36
    /// characters and a NUL): the lvol's (or, on the super blob, the lvol store's) uuid.
    /// Left out of the JSON when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// In an lvol store, an lvol's alias `lvs_name/lvol_name` (SPDK's bdev alias). Left out
    /// of the JSON when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    /// Size in clusters.
    pub num_clusters: u64,
    /// Clusters with a device cluster of their own.
    pub num_allocated_clusters: u64,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Thin provisioned.
    pub thin: bool,
    /// Read-only (data or metadata).
    pub read_only: bool,
    /// A snapshot with clones.
    pub snapshot: bool,
    /// A clone of a snapshot.
    pub clone: bool,
    /// The parent snapshot of a clone.
    pub parent: Option<u64>,
    /// The clones of a snapshot.
    pub clones: Vec<u64>,
    /// "table" (extent table and pages) or "rle" (run-length extents).
    pub extent_form: &'static str,
    /// Public xattrs: name -> value as lowercase hex.
    pub xattrs: BTreeMap<String, String>,
    /// Internal xattrs: name -> value as lowercase hex.
    pub internal_xattrs: BTreeMap<String, String>,
}

/// A blob whose metadata cannot be read.
#[derive(Debug, Clone, Serialize)]
pub struct UnreadableRow {
    /// The id.
    pub id: u64,
    /// The id as SPDK prints it.
    pub id_hex: String,
    /// Always null: the name cannot be read.
    pub name: Option<String>,
    /// Why the blob cannot be opened.
    pub error: String,
}

/// One entry of `ls`.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Row {
    /// A blob that opened.
    Blob(BlobRow),
    /// A blob that did not.
    Unreadable(UnreadableRow),
}

fn xattr_map(pairs: Vec<(Vec<u8>, Vec<u8>)>) -> BTreeMap<String, String> {
    pairs
        .into_iter()
        .map(|(name, value)| (String::from_utf8_lossy(&name).into_owned(), hex(&value)))
        .collect()
}

fn blob_row(store: &Blobstore, blob: &Blob, lvs: Option<&LvolStore>) -> BlobRow {
    let id = blob.id();
    let alias = lvs.and_then(|lvs| lvs.lvol(id).ok()).map(|lvol| lvol.alias);
    BlobRow {
        id,
        id_hex: id_hex(id),
        name: blob.xattr(NAME_XATTR).map(|value| name_of(&value)),
        uuid: blob
            .xattr(UUID_XATTR)
            .and_then(|value| parse_uuid(&value))
            .map(|uuid| uuid.hyphenated().to_string()),
        alias,
        num_clusters: blob.num_clusters(),
        num_allocated_clusters: blob.num_allocated_clusters(),
        size_bytes: blob.size_bytes(),
        thin: blob.is_thin(),
        read_only: blob.is_read_only(),
        snapshot: store.is_snapshot(id),
        clone: blob.is_clone(),
        parent: blob.parent_id().or_else(|| store.parent_of(id)),
        clones: store.clones_of(id),
        extent_form: match blob.extent_form() {
            ExtentForm::Table => "table",
            ExtentForm::Rle => "rle",
        },
        xattrs: xattr_map(blob.xattrs()),
        internal_xattrs: xattr_map(blob.internal_xattrs()),
    }
}

/// Every blob of the store, in id order; a blob that cannot be opened gets an error row.
pub async fn rows(store: &Blobstore) -> Result<Vec<Row>, ToolError> {
    // An lvol store that does not open as one (SPDK would refuse it) is listed as blobs.
    let lvs = lvol_store(store).await.ok().flatten();
    let mut rows = Vec::new();
    for id in store.blob_ids() {
        match store.open_blob(id).await {
            Ok(blob) => {
                rows.push(Row::Blob(blob_row(store, &blob, lvs.as_ref())));
                blob.close().await?;
            }
            Err(err) => rows.push(Row::Unreadable(UnreadableRow {
                id,
                id_hex: id_hex(id),
                name: None,
                error: err.to_string(),
            })),
        }
    }
    Ok(rows)
}

fn flags(row: &BlobRow) -> String {
    let mut flags = Vec::new();
    if row.thin {
        flags.push("thin");
    }
    if row.read_only {
        flags.push("ro");
    }
    if row.snapshot {
        flags.push("snapshot");
    }
    if row.clone {
        flags.push("clone");
    }
    if row.extent_form == "rle" {
        flags.push("rle");
    }
    if flags.is_empty() {
        "-".into()
    } else {
        flags.join(",")
    }
}

fn ls_table(rows: &[Row]) -> String {
    // Stores with uuids (lvol stores) get a UUID column, after the parent.
    let uuids = rows
        .iter()
        .any(|row| matches!(row, Row::Blob(blob) if blob.uuid.is_some()));
    let mut header = [
        "ID",
        "NAME",
        "SIZE",
        "CLUSTERS",
        "ALLOCATED",
        "FLAGS",
        "PARENT",
    ]
    .map(String::from)
    .to_vec();
    if uuids {
        header.push("UUID".into());
    }
    let mut cells = vec![header];
    for row in rows {
        cells.push(match row {
            Row::Blob(blob) => {
                let mut line = vec![
                    blob.id_hex.clone(),
                    blob.name
                        .as_deref()
                        .map_or_else(|| "-".into(), |name| escape(name.as_bytes())),
                    human_bytes(blob.size_bytes),
                    blob.num_clusters.to_string(),
                    blob.num_allocated_clusters.to_string(),
                    flags(blob),
                    blob.parent.map_or_else(|| "-".into(), id_hex),
                ];
                if uuids {
                    line.push(blob.uuid.clone().unwrap_or_else(|| "-".into()));
                }
                line
            }
            // The reason goes last, so it widens no column.
            Row::Unreadable(bad) => {
                let mut cells = vec![bad.id_hex.clone()];
                cells.extend(std::iter::repeat_n("?".to_string(), 5));
                cells.push(format!("unreadable: {}", bad.error));
                cells
            }
        });
    }
    table(&cells)
}

/// `spool ls IMAGE [--json]`.
pub fn ls(args: &LsArgs) -> Result<(), ToolError> {
    let rows = on_store_read_only(&args.image, |store, _| async move { rows(&store).await })?;
    for row in &rows {
        if let Row::Unreadable(bad) = row {
            eprintln!("warning: {}", bad.error);
        }
    }
    if args.json {
        emit(&format!("{}\n", to_json(&rows)?))
    } else {
        emit(&ls_table(&rows))
    }
}
