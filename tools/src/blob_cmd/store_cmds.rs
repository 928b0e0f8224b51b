//! The store-wide commands: `init`, `info` and `super`.

use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use serde::Serialize;
use spool_blob::format::layout::Layout;
use spool_blob::format::super_block::{bstype_from_name, bstype_name, Bstype};
use spool_blob::format::{BLOBID_INVALID, PAGE_SIZE_U64};
use spool_blob::lvol::xattr::{check_name, LVS_BSTYPE};
use spool_blob::{Blobstore, InitOptions, LvolStore};
use spool_engine::{ImageLock, OpenInfo, StagedImage, StoreOpen};

use crate::blob_cmd::args::{InfoArgs, InitArgs, SuperArgs};
use crate::blob_cmd::resolve::{is_lvol_store, resolve_blob};
use crate::blob_cmd::text::{emit, human_bytes, id_hex, table};
use crate::blob_cmd::{on_store, on_store_read_only, with_locked_store, with_store};
use crate::error::ToolError;

/// What `spool info` reports (`--json` prints it as is).
#[derive(Debug, Clone, Serialize)]
pub struct StoreInfo {
    /// The image path as given.
    pub image: String,
    /// Bytes of the device.
    pub device_bytes: u64,
    /// Super block version.
    pub version: u32,
    /// Bytes per cluster.
    pub cluster_size: u64,
    /// Bytes per io_unit (the unit of blob I/O).
    pub io_unit_size: u64,
    /// Bytes per metadata page.
    pub page_size: u64,
    /// First metadata page (pages from the device start).
    pub md_start: u64,
    /// Metadata pages.
    pub md_len: u32,
    /// Whether the super block said clean when this command opened the image.
    pub clean: bool,
    /// Whether the load replayed the metadata (the store was not clean).
    pub recovered: bool,
    /// The store's type tag as text (NULs stripped; empty when untyped).
    pub bstype: String,
    /// The super blob's id, if one is set.
    pub super_blob: Option<u64>,
    /// Clusters of the store.
    pub total_clusters: u64,
    /// Clusters holding the super block, masks and metadata.
    pub md_clusters: u64,
    /// Clusters for blob data (total minus metadata).
    pub total_data_clusters: u64,
    /// Free data clusters.
    pub free_clusters: u64,
    /// Blobs in the store.
    pub num_blobs: usize,
    /// Blobs whose metadata could not be read at load: id and reason.
    pub unreadable_blobs: Vec<(u64, String)>,
    /// In an lvol store: its name (from its super blob). Left out of the JSON otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lvs_name: Option<String>,
    /// In an lvol store: its uuid. Left out of the JSON otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lvs_uuid: Option<String>,
    /// In an lvol store: its lvols. Left out of the JSON otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_lvols: Option<usize>,
}

fn store_info(image: String, store: &Blobstore, info: &OpenInfo) -> StoreInfo {
    let geometry = store.geometry();
    let block = &info.super_block;
    let report = info.load_report.clone().unwrap_or_default();
    StoreInfo {
        image,
        device_bytes: info.device_bytes,
        version: block.version,
        cluster_size: geometry.cluster_size,
        io_unit_size: geometry.io_unit_size,
        page_size: PAGE_SIZE_U64,
        md_start: geometry.md_start,
        md_len: geometry.md_len,
        clean: info.clean_at_open,
        recovered: report.recovered,
        bstype: bstype_name(&store.bstype()),
        super_blob: store.get_super().ok(),
        total_clusters: geometry.total_clusters,
        md_clusters: geometry.md_clusters,
        total_data_clusters: store.total_data_cluster_count(),
        free_clusters: store.free_cluster_count(),
        num_blobs: store.blob_ids().len(),
        unreadable_blobs: report.unreadable,
        lvs_name: None,
        lvs_uuid: None,
        num_lvols: None,
    }
}

fn yes_no(flag: bool) -> &'static str {
    if flag {
        "yes"
    } else {
        "no"
    }
}

fn info_table(info: &StoreInfo) -> String {
    let bstype = if info.bstype.is_empty() {
        "(none)".to_string()
    } else {
        info.bstype.clone()
    };
    let mut rows = vec![
        (
            "cluster_size",
            format!("{} ({})", info.cluster_size, human_bytes(info.cluster_size)),
        ),
        ("io_unit_size", info.io_unit_size.to_string()),
        ("md_start", info.md_start.to_string()),
        ("md_len", info.md_len.to_string()),
        ("clean", yes_no(info.clean).to_string()),
        ("recovered", yes_no(info.recovered).to_string()),
        ("bstype", bstype),
        (
            "super_blob",
            info.super_blob.map_or_else(|| "none".into(), id_hex),
        ),
        ("total_data_clusters", info.total_data_clusters.to_string()),
        ("free_clusters", info.free_clusters.to_string()),
        ("num_blobs", info.num_blobs.to_string()),
    ];
    for (id, reason) in &info.unreadable_blobs {
        rows.push(("unreadable", format!("{}: {reason}", id_hex(*id))));
    }
    if let Some(name) = &info.lvs_name {
        rows.push(("lvs_name", name.clone()));
    }
    if let Some(uuid) = &info.lvs_uuid {
        rows.push(("lvs_uuid", uuid.clone()));
    }
    if let Some(count) = info.num_lvols {
        rows.push(("num_lvols", count.to_string()));
    }
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|(key, value)| vec![key.to_string(), value])
        .collect();
    table(&rows)
}

/// `spool info IMAGE [--json]`.
pub fn info(args: &InfoArgs) -> Result<(), ToolError> {
    let image = args.image.clone();
    let info = on_store_read_only(&args.image, move |store, open| async move {
        let mut info = store_info(image, &store, &open);
        if is_lvol_store(&store) {
            // A store SPDK could not open as an lvol store is still described as a blobstore.
            match LvolStore::open(store.clone()).await {
                Ok(lvs) => {
                    info.lvs_name = Some(lvs.name());
                    info.lvs_uuid = Some(lvs.uuid().hyphenated().to_string());
                    info.num_lvols = Some(lvs.lvol_count());
                }
                Err(err) => eprintln!("warning: not an lvol store SPDK would open: {err}"),
            }
        }
        Ok(info)
    })?;
    if args.json {
        emit(&format!("{}\n", to_json(&info)?))
    } else {
        emit(&info_table(&info))
    }
}

/// Pretty JSON of `value`.
pub fn to_json(value: &impl Serialize) -> Result<String, ToolError> {
    serde_json::to_string_pretty(value).map_err(|err| ToolError::Failed(format!("JSON: {err}")))
}

/// Makes sure IMAGE exists as `init` needs: created with --size when missing (returns it
/// staged then: under a temporary name, locked before the first byte was written, to be
/// formatted there and published only after), or checked against --size when it exists.
fn prepare_image(args: &InitArgs) -> Result<Option<StagedImage>, ToolError> {
    let path = Path::new(&args.image);
    let meta = match std::fs::metadata(path) {
        Ok(meta) => Some(meta),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            // A dangling symbolic link: metadata follows it and finds nothing, but the name
            // is taken, so creating IMAGE would fail with "exists already".
            if let Ok(target) = std::fs::read_link(path) {
                return Err(ToolError::Failed(format!(
                    "{}: a symbolic link to {}, which does not exist: give the link's target as IMAGE to create the store there, or remove the link",
                    args.image,
                    target.display()
                )));
            }
            None
        }
        Err(err) => {
            return Err(ToolError::Failed(format!(
                "{}: {}",
                args.image,
                spool_engine::words::io_words(&err)
            )))
        }
    };
    if meta.as_ref().is_some_and(|meta| meta.is_dir()) {
        return Err(ToolError::Failed(format!(
            "{}: is a directory, not an image: give the store's file or block device",
            args.image
        )));
    }
    let device_bytes = match &meta {
        Some(meta) if meta.file_type().is_file() => Some(meta.len()),
        Some(_) => None,
        None => args.size,
    };
    if let Some(device_bytes) = device_bytes {
        refuse_no_data_cluster(args, device_bytes)?;
    }
    match (meta, args.size) {
        (None, None) => Err(ToolError::Failed(format!(
            "{}: no such file or directory (give --size to create it)",
            args.image
        ))),
        (None, Some(size)) if args.preallocate => {
            Ok(Some(ImageLock::stage_preallocated(path, size)?))
        }
        (None, Some(size)) => Ok(Some(ImageLock::stage_sparse(path, size)?)),
        (Some(meta), Some(_)) if meta.file_type().is_block_device() => {
            Err(ToolError::Failed(format!(
                "{}: a block device is used whole; --size is for creating a file",
                args.image
            )))
        }
        (Some(meta), Some(size)) if meta.len() != size => Err(ToolError::Failed(format!(
            "{}: exists with {} bytes, not the {size} of --size (omit --size to use it as it is)",
            args.image,
            meta.len()
        ))),
        (Some(meta), _) if args.preallocate => {
            if !meta.file_type().is_file() {
                return Err(ToolError::Failed(format!(
                    "{}: --preallocate reserves space in a file; this is not a regular file",
                    args.image
                )));
            }
            reserve_whole_file(path, meta.len())?;
            Ok(None)
        }
        (Some(_), _) => Ok(None),
    }
}

/// Refuses a store of `device_bytes` whose metadata would take every cluster: such a store
/// can never hold a blob with data, and the mistake (`--size 1M` for 1G) is best said now.
/// A geometry the layout refuses is said too, before anything is made, naming the option
/// to change.
fn refuse_no_data_cluster(args: &InitArgs, device_bytes: u64) -> Result<(), ToolError> {
    use spool_blob::format::layout::LayoutError;
    let cluster_size = args.cluster_size.unwrap_or(1 << 20);
    let image = &args.image;
    let layout = match Layout::compute(device_bytes, cluster_size, args.md_pages) {
        Ok(layout) => layout,
        Err(LayoutError::ClusterSize(_)) => {
            return Err(ToolError::Failed(format!(
                "{image}: cluster size {cluster_size} is not a multiple of 4096 bytes: give a --cluster-size that is (e.g. 64K or 1M)"
            )))
        }
        Err(LayoutError::TooSmall { .. }) => {
            return Err(ToolError::Failed(format!(
                "{image}: {} is smaller than one cluster of {}: give a larger --size or a smaller --cluster-size",
                human_bytes(device_bytes),
                human_bytes(cluster_size)
            )))
        }
        Err(LayoutError::MetadataTooLarge {
            md_clusters,
            total_clusters,
        }) => {
            let what = if args.md_pages.is_some() {
                "give fewer --md-pages (or a larger --size)"
            } else {
                "give a larger --cluster-size (or a larger --size)"
            };
            return Err(ToolError::Failed(format!(
                "{image}: the metadata needs {md_clusters} clusters of {}, the {} image has {total_clusters}: {what}",
                human_bytes(cluster_size),
                human_bytes(device_bytes)
            )));
        }
        // Said by init itself, in the layout's words.
        Err(LayoutError::TooLarge(_)) => return Ok(()),
    };
    if layout.md_clusters < layout.total_clusters {
        return Ok(());
    }
    Err(ToolError::Failed(format!(
        "{}: {} in clusters of {} leaves no cluster for data (the metadata takes all {}): give a larger --size or a smaller --cluster-size",
        args.image,
        human_bytes(device_bytes),
        human_bytes(cluster_size),
        layout.total_clusters
    )))
}

/// Reserves every byte of the existing file at `path` on disk (fallocate, keeping its
/// contents and size).
fn reserve_whole_file(path: &Path, len: u64) -> Result<(), ToolError> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|err| ToolError::Failed(format!("{}: {err}", path.display())))?;
    spool_engine::lock::reserve_space(&file, path, len, true).map_err(ToolError::from)
}

/// The bstype `init` formats with: `--bstype`'s, or `LVOLSTORE` with `--lvs` (which refuses
/// any other `--bstype`).
fn init_bstype(args: &InitArgs) -> Result<Bstype, ToolError> {
    let given = match &args.bstype {
        None => None,
        Some(name) => Some(bstype_from_name(name).ok_or_else(|| {
            ToolError::Usage(format!(
                "bstype '{name}' is {} bytes; at most 16",
                name.len()
            ))
        })?),
    };
    let lvs = bstype_from_name(LVS_BSTYPE).unwrap_or_default();
    match (given, &args.lvs) {
        (Some(bstype), Some(_)) if bstype != lvs => Err(ToolError::Failed(format!(
            "--lvs makes a store of bstype {LVS_BSTYPE}, not '{}'",
            bstype_name(&bstype)
        ))),
        (_, Some(_)) => Ok(lvs),
        (Some(bstype), None) => Ok(bstype),
        (None, None) => Ok([0; 16]),
    }
}

/// `spool init IMAGE [--size BYTES] [--cluster-size BYTES] [--md-pages N] [--bstype NAME]
/// [--lvs NAME] [--block-size 512|4096] [--force]`: an image that holds a store already
/// needs `--force`.
pub fn init(args: &InitArgs) -> Result<(), ToolError> {
    let options = InitOptions {
        cluster_size: args.cluster_size.unwrap_or(1 << 20),
        md_pages: args.md_pages,
        bstype: init_bstype(args)?,
        // A preallocated file keeps its data area allocated; otherwise the data area is
        // unmapped as SPDK's init does (a hole in a new sparse file already).
        unmap_data: !args.preallocate,
        // A large block device's md area takes long to clear: Ctrl-C stops it.
        stop: Some(|| spool_engine::signals::stop_requested().is_some()),
    };
    if let Some(name) = &args.lvs {
        check_name(name, "lvol store").map_err(|err| ToolError::Failed(err.to_string()))?;
    }
    let path = Path::new(&args.image);
    spool_engine::guard::refuse_new_file_in_dev(path)
        .map_err(|err| ToolError::Failed(err.to_string()))?;
    if !args.force && path.exists() && spool_engine::guard::holds_blobstore(path) {
        return Err(ToolError::Failed(format!(
            "{}: holds a blobstore already; init would lose every blob in it: add --force to format it anyway",
            args.image
        )));
    }
    if !args.force && path.exists() {
        if let Some(found) = spool_engine::guard::foreign_contents(path) {
            return Err(ToolError::Failed(format!(
                "{}: holds {found}, not a blobstore; init would overwrite it: add --force to format it anyway",
                args.image
            )));
        }
    }
    let created = prepare_image(args)?;
    let lvs_name = args.lvs.clone();
    let summarise = |store: Blobstore, info: OpenInfo| async move {
        let lvs = match lvs_name {
            Some(name) => Some(LvolStore::format(store.clone(), &name).await?),
            None => None,
        };
        let geometry = store.geometry();
        let mut summary = format!(
            "{} bytes, {} clusters of {} ({} for data), md_start {}, md_len {}",
            info.device_bytes,
            geometry.total_clusters,
            human_bytes(geometry.cluster_size),
            store.total_data_cluster_count(),
            geometry.md_start,
            geometry.md_len
        );
        if geometry.io_unit_size != PAGE_SIZE_U64 {
            summary.push_str(&format!(", io_unit {}", geometry.io_unit_size));
        }
        if let Some(lvs) = lvs {
            summary.push_str(&format!("\nlvol store {} uuid {}", lvs.name(), lvs.uuid()));
        }
        Ok(summary)
    };
    let open = match args.block_size {
        Some(block_size) => StoreOpen::InitWithBlockSize(options, block_size),
        None => StoreOpen::Init(options),
    };
    let result = match &created {
        // A new file is formatted under its temporary name; IMAGE appears (below) only once
        // it holds a store, so a killed init leaves at most the temporary file.
        Some(staged) => with_locked_store(
            &args.image,
            staged.temp_path(),
            staged.lock(),
            open,
            summarise,
        ),
        None => with_store(&args.image, open, summarise),
    };
    // On failure, dropping the staged file removes it (while still locked): nothing is left.
    let summary = result.map_err(|err| init_interrupted(err, created.is_some()))?;
    if let Some(staged) = created {
        staged.publish()?;
    }
    emit(&format!("initialized {}: {summary}\n", args.image))
}

/// An init a stop signal ended while it cleared the metadata area ([`name_image`] says it
/// for a device): on a new file, which is removed, nothing was created.
fn init_interrupted(err: ToolError, new_file: bool) -> ToolError {
    match err {
        ToolError::Interrupted {
            signal,
            done,
            report,
        } if new_file && done.contains("metadata area cleared") => ToolError::Interrupted {
            signal,
            done: done
                .split(" (")
                .next()
                .map_or(done.clone(), |head| format!("{head}; nothing was created")),
            report,
        },
        other => other,
    }
}

/// `spool super IMAGE [BLOB | --clear]`.
pub fn super_blob(args: &SuperArgs) -> Result<(), ToolError> {
    let blob = args.blob.clone();
    let (clear, force, image) = (args.clear, args.force, args.image.clone());
    let reads_only = blob.is_none() && !clear;
    let job = move |store: Blobstore, _: OpenInfo| async move {
        if !reads_only && !force && is_lvol_store(&store) {
            // Setting it to the blob it is already changes nothing SPDK reads.
            let same = match &blob {
                Some(text) => store.get_super().ok() == Some(resolve_blob(&store, text).await?),
                None => false,
            };
            if !same {
                return Err(ToolError::Failed(format!(
                    "{image}: lvol store: its super blob holds the store's name and uuid (SPDK finds the lvol store by it); setting or clearing it leaves a store SPDK does not open as the lvol store it is: add --force to do it anyway"
                )));
            }
        }
        if clear {
            store.set_super(BLOBID_INVALID).await?;
            return Ok(None);
        }
        match blob {
            Some(text) => {
                let id = resolve_blob(&store, &text).await?;
                store.set_super(id).await?;
                Ok(None)
            }
            None => Ok(Some(
                store
                    .get_super()
                    .map_or_else(|_| "none".to_string(), id_hex),
            )),
        }
    };
    let printed = if reads_only {
        on_store_read_only(&args.image, job)?
    } else {
        on_store(&args.image, job)?
    };
    match printed {
        Some(line) => emit(&format!("{line}\n")),
        None => Ok(()),
    }
}
