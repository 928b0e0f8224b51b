//! The command-line grammar of the blobstore commands (`spool init`, `ls`, `import`, ...).
//!
//! Sizes take suffixes (4096, 64K, 16MiB, 1G, 0x1000 binary; 100MB decimal, as dd reads
//! it): a size clap cannot parse, or a negative one, is a usage error (exit 2). Everything checked against the store (a blob id, an offset's alignment)
//! is checked once the store is loaded, and fails with exit 1.

use clap::{Args, Subcommand};

/// Parses a positive size ("64M") for clap.
fn size_arg(text: &str) -> Result<u64, String> {
    spool_engine::parse_size(text).map_err(|err| err.to_string())
}

/// Parses a size that may be 0 ("0", "4K") for clap.
fn bytes_arg(text: &str) -> Result<u64, String> {
    spool_engine::parse_bytes(text).map_err(|err| err.to_string())
}

/// Parses a metadata page count for clap: a whole number from 1 to 2^32 - 1, said in words
/// otherwise.
fn md_pages_arg(text: &str) -> Result<u32, String> {
    if text.trim_start().starts_with('-') {
        return Err(format!(
            "the metadata page count cannot be negative ('{text}')"
        ));
    }
    match text.trim().parse::<u64>() {
        Ok(0) => Err(
            "the metadata page count must be at least 1 (one page per blob, plus extent pages)"
                .into(),
        ),
        Ok(pages) => u32::try_from(pages).map_err(|_| {
            format!(
                "{pages} metadata pages is more than a store can have (at most {})",
                u32::MAX
            )
        }),
        Err(_) => Err(format!("'{text}' is not a whole number of metadata pages")),
    }
}

/// Parses a store block size (512 or 4096) for clap.
fn block_size_arg(text: &str) -> Result<u32, String> {
    match text {
        "512" => Ok(512),
        "4096" | "4K" | "4k" => Ok(4096),
        _ => Err(format!(
            "'{text}' is not a block size Spool stores use (512 or 4096)"
        )),
    }
}

/// Parses `KEY=VALUE` for clap.
fn key_value_arg(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("'{text}' is not KEY=VALUE (with a non-empty KEY)")),
    }
}

/// Arguments of `spool init`.
#[derive(Debug, Clone, Args)]
pub struct InitArgs {
    /// The image: a file or block device. A missing file is created with --size.
    pub image: String,
    /// Size of the file to create (e.g. 64M), sparse: it takes disk space only as it is
    /// written. An existing image is used whole.
    #[arg(long, value_name = "BYTES", value_parser = size_arg, allow_hyphen_values = true)]
    pub size: Option<u64>,
    /// Reserve the file's whole size on disk (fallocate: a new file, or what an existing one
    /// lacks) so later writes cannot run out of space, and keep it allocated (init unmaps
    /// nothing).
    #[arg(long)]
    pub preallocate: bool,
    /// Bytes per cluster: the allocation unit (a multiple of 4096; default 1M).
    #[arg(long, value_name = "BYTES", value_parser = size_arg, allow_hyphen_values = true)]
    pub cluster_size: Option<u64>,
    /// Metadata pages (one per blob plus extent pages; default: one per cluster).
    #[arg(long, value_name = "N", value_parser = md_pages_arg, allow_hyphen_values = true)]
    pub md_pages: Option<u32>,
    /// Format the image even though it holds a blobstore already (whose blobs are lost).
    #[arg(long)]
    pub force: bool,
    /// The store's type tag, up to 16 bytes (SPDK's lvol stores use LVOLSTORE).
    #[arg(long, value_name = "NAME")]
    pub bstype: Option<String>,
    /// Make an lvol store named NAME, as SPDK's bdev_lvol_create_lvstore does: bstype
    /// LVOLSTORE and a super blob holding the store's name and a new uuid.
    #[arg(long, value_name = "NAME")]
    pub lvs: Option<String>,
    /// Bytes per block of a file image, and so the store's io_unit: 512 (a 512-byte-sector
    /// store, as SPDK makes on such a device) or 4096 (the default). A block device uses its
    /// own logical block size, which must match when this is given.
    #[arg(long, value_name = "BYTES", value_parser = block_size_arg)]
    pub block_size: Option<u32>,
}

/// Arguments of `spool info`.
#[derive(Debug, Clone, Args)]
pub struct InfoArgs {
    /// The image: a file or block device holding a blobstore.
    pub image: String,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `spool ls`.
#[derive(Debug, Clone, Args)]
pub struct LsArgs {
    /// The image: a file or block device holding a blobstore.
    pub image: String,
    /// Print a JSON array (one object per blob) instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `spool create`.
#[derive(Debug, Clone, Args)]
pub struct CreateArgs {
    /// The image: a file or block device holding a blobstore.
    pub image: String,
    /// The blob's size (rounded up to whole clusters; 0 makes an empty blob).
    #[arg(long, value_name = "BYTES", value_parser = bytes_arg, allow_hyphen_values = true)]
    pub size: u64,
    /// Thin provisioned: clusters are allocated on first write.
    #[arg(long)]
    pub thin: bool,
    /// The blob's name: stored in xattr `name` as SPDK's lvol layer does (64 bytes,
    /// NUL-padded; at most 63 bytes of name).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// An xattr to set (the value's bytes as given, no NUL added); repeatable.
    #[arg(long = "xattr", value_name = "KEY=VALUE", value_parser = key_value_arg)]
    pub xattrs: Vec<(String, String)>,
    /// Record the clusters as run-length extents (SPDK before v20.01) instead of an extent
    /// table.
    #[arg(long)]
    pub rle: bool,
}

/// Arguments of `spool resize`.
#[derive(Debug, Clone, Args)]
pub struct ResizeArgs {
    /// The image: a file or block device holding a blobstore.
    pub image: String,
    /// The blob: an id (decimal or 0x-hex) or the value of its `name` xattr.
    pub blob: String,
    /// The new size (rounded up to whole clusters; 0 empties the blob).
    #[arg(value_name = "BYTES", value_parser = bytes_arg, allow_hyphen_values = true)]
    pub size: u64,
    /// Allow a smaller size: the data past it is dropped (refused without this).
    #[arg(long)]
    pub shrink: bool,
}

/// Arguments of `spool rename`.
#[derive(Debug, Clone, Args)]
pub struct RenameArgs {
    /// The image: a file or block device holding a blobstore.
    pub image: String,
    /// The blob: an id (decimal or 0x-hex) or its current name.
    pub blob: String,
    /// The new name: 1 to 63 bytes, unique in the store, not a blob id.
    pub name: String,
}

/// Arguments of the commands that take just a blob (`delete`, `set-read-only`).
#[derive(Debug, Clone, Args)]
pub struct BlobArgs {
    /// The image: a file or block device holding a blobstore.
    pub image: String,
    /// The blob: an id (decimal or 0x-hex) or the value of its `name` xattr.
    pub blob: String,
}

/// Arguments of `spool snapshot` and `spool clone`.
#[derive(Debug, Clone, Args)]
pub struct SnapshotArgs {
    /// The image: a file or block device holding a blobstore.
    pub image: String,
    /// The blob (for `clone`, the snapshot): an id (decimal or 0x-hex) or its `name`.
    pub blob: String,
    /// A name for the new blob (stored as SPDK's lvol layer stores it).
    #[arg(long)]
    pub name: Option<String>,
}

/// Arguments of `spool xattr`.
#[derive(Debug, Clone, Args)]
pub struct XattrArgs {
    /// The image: a file or block device holding a blobstore.
    pub image: String,
    /// The blob: an id (decimal or 0x-hex) or the value of its `name` xattr.
    pub blob: String,
    /// What to do with the blob's xattrs.
    #[command(subcommand)]
    pub op: XattrOp,
}

/// The `spool xattr` operations.
#[derive(Debug, Clone, Subcommand)]
pub enum XattrOp {
    /// List the xattrs: `KEY = VALUE` (trailing NULs shown as a count).
    Ls {
        /// Print one JSON object (name -> value as lowercase hex).
        #[arg(long)]
        json: bool,
    },
    /// Print one xattr's value (trailing NULs stripped, other bytes escaped).
    Get {
        /// The xattr's name.
        key: String,
        /// Write the exact bytes, with no newline.
        #[arg(long, conflicts_with = "hex")]
        raw: bool,
        /// Print the bytes as lowercase hex.
        #[arg(long)]
        hex: bool,
    },
    /// Set an xattr (replacing its value).
    Set {
        /// The xattr's name.
        key: String,
        /// The value: its bytes as given (no NUL added), or hex with --hex.
        value: String,
        /// VALUE is hex ("68656c6c6f00").
        #[arg(long)]
        hex: bool,
    },
    /// Remove an xattr.
    Rm {
        /// The xattr's name.
        key: String,
    },
}

/// Arguments of `spool super`.
#[derive(Debug, Clone, Args)]
pub struct SuperArgs {
    /// The image: a file or block device holding a blobstore.
    pub image: String,
    /// The blob to make the super blob; without it, the super blob is printed.
    pub blob: Option<String>,
    /// Clear the super blob instead.
    #[arg(long, conflicts_with = "blob")]
    pub clear: bool,
    /// In an lvol store, change the super blob even though it holds the store's name and
    /// uuid (the store is then no longer an lvol store SPDK opens); refused without this.
    #[arg(long)]
    pub force: bool,
}

/// Arguments of `spool import`.
#[derive(Debug, Clone, Args)]
pub struct ImportArgs {
    /// The image: a file or block device holding a blobstore.
    pub image: String,
    /// The blob: an id (decimal or 0x-hex) or the value of its `name` xattr.
    pub blob: String,
    /// The file to copy into the blob (all of it).
    pub file: String,
    /// Where in the blob to start (a multiple of the io_unit; default 0).
    #[arg(long, value_name = "BYTES", value_parser = bytes_arg, default_value = "0", allow_hyphen_values = true)]
    pub offset: u64,
    /// Copy FILE even though it starts like a qcow2, VMDK or VHD image (its bytes, not the
    /// disk it describes, would land in the blob).
    #[arg(long)]
    pub force: bool,
}

/// Arguments of `spool export`.
#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// The image: a file or block device holding a blobstore.
    pub image: String,
    /// The blob: an id (decimal or 0x-hex) or the value of its `name` xattr.
    pub blob: String,
    /// The file to write, or `-` for stdout: a regular file is written beside FILE and renamed
    /// over it once complete (a failed or stopped export leaves FILE as it was).
    pub file: String,
    /// Where in the blob to start (a multiple of the io_unit; default 0).
    #[arg(long, value_name = "BYTES", value_parser = bytes_arg, default_value = "0", allow_hyphen_values = true)]
    pub offset: u64,
    /// Bytes to copy (default: to the end of the blob).
    #[arg(long, value_name = "BYTES", value_parser = bytes_arg, allow_hyphen_values = true)]
    pub length: Option<u64>,
    /// Write to a block device FILE that holds a filesystem, a partition table, a blobstore
    /// or another volume `init` refuses, or a regular FILE that holds a blobstore (its data
    /// is lost); refused without this. A device in use (mounted, or claimed by another
    /// process) or a FILE another process holds the image lock of is refused even so.
    #[arg(long)]
    pub force: bool,
}

/// Arguments of `spool dump`.
#[derive(Debug, Clone, Args)]
pub struct DumpArgs {
    /// The image: a file or block device (read only, never loaded: works on corrupt ones).
    pub image: String,
    /// Print one JSON object instead of the text dump.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `spool check`.
#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    /// The image: a file or block device (read raw, never loaded: works on damaged stores).
    pub image: String,
    /// Fix what can be fixed without guessing, print every change, then check again.
    #[arg(long)]
    pub repair: bool,
    /// Print one JSON object (the report; with --repair: before, changes, after).
    #[arg(long)]
    pub json: bool,
    /// With --repair: copy IMAGE sparsely to NEW (which must not exist) and repair the copy,
    /// leaving IMAGE untouched.
    #[arg(long, value_name = "NEW", requires = "repair")]
    pub output: Option<String>,
}
