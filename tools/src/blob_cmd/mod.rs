//! The blobstore commands (`spool init`, `info`, `ls`, `create`, ... `dump`). Each works
//! offline: it opens IMAGE, loads its store on a one-reactor runtime
//! ([`spool_engine::run_offline`]), does its job there, and unloads the store cleanly.
//!
//! - [`args`]: the grammar.
//! - `store_cmds`: init, info, super.
//! - `list`: ls.
//! - `blob_cmds`: create, resize, delete, set-read-only.
//! - `names`: the rules every blob name follows, and rename.
//! - `xattr`: xattr ls/get/set/rm.
//! - `transfer`: import and export (arguments, progress bar; the copy is
//!   [`spool_engine::transfer`]).
//! - `dump`: the raw metadata dump (no load: works on corrupt images).
//! - `check`: `spool check [--repair]`: arguments and printing (the checker is
//!   [`spool_blob::check`]).
//! - `resolve`: BLOB arguments (ids or names) and opening blobs safely.
//! - `progress`: the progress bar (stderr, terminals only).
//! - `text`: escaping, hex, sizes, stdout.

pub mod args;
mod blob_cmds;
mod check;
mod dump;
mod list;
mod names;
mod progress;
mod resolve;
mod snapshot_cmds;
mod store_cmds;
mod text;
mod transfer;
mod xattr;

pub use text::emit;

use std::future::Future;
use std::path::Path;

use spool_blob::format::super_block::SuperBlockError;
use spool_blob::{BlobError, Blobstore, LoadOptions};
use spool_engine::{run_offline, run_offline_locked, EngineError, ImageLock, OpenInfo, StoreOpen};

use crate::cli::Command;
use crate::error::ToolError;

/// Runs a blobstore command. Every failure is a [`ToolError::Failed`] (exit 1) naming the
/// object and the reason.
pub fn run(command: &Command) -> Result<(), ToolError> {
    let result = match command {
        Command::Perf(_) | Command::Serve(_) | Command::Rpc(_) => Err(ToolError::Failed(
            "perf and serve are not blobstore commands".into(),
        )),
        Command::Init(args) => store_cmds::init(args),
        Command::Info(args) => store_cmds::info(args),
        Command::Super(args) => store_cmds::super_blob(args),
        Command::Ls(args) => list::ls(args),
        Command::Create(args) => blob_cmds::create(args),
        Command::Resize(args) => blob_cmds::resize(args),
        Command::Rename(args) => names::rename(args),
        Command::Delete(args) => blob_cmds::delete(args),
        Command::SetReadOnly(args) => blob_cmds::set_read_only(args),
        Command::Snapshot(args) => snapshot_cmds::snapshot(args),
        Command::Clone(args) => snapshot_cmds::clone(args),
        Command::Inflate(args) => snapshot_cmds::inflate(args),
        Command::Decouple(args) => snapshot_cmds::decouple(args),
        Command::Xattr(args) => xattr::xattr(args),
        Command::Import(args) => transfer::import(args),
        Command::Export(args) => transfer::export(args),
        Command::Dump(args) => dump::dump(args),
        Command::Check(args) => check::check(args),
    };
    result.map_err(|err| match err {
        ToolError::Failed(_)
        | ToolError::Usage(_)
        | ToolError::Interrupted { .. }
        | ToolError::Inconsistent(_)
        | ToolError::Problems(_) => err,
        other => ToolError::Failed(other.to_string()),
    })
}

/// Runs `job` on IMAGE's loaded store (see [`spool_engine::run_offline`]). Store and engine
/// errors come back as [`ToolError::Failed`] naming the image.
fn on_store<T, F, Fut>(image: &str, job: F) -> Result<T, ToolError>
where
    F: FnOnce(Blobstore, OpenInfo) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, ToolError>> + 'static,
    T: Send + 'static,
{
    with_store(image, StoreOpen::Load(LoadOptions::default()), job)
}

/// Like [`on_store`], for commands that only read (`ls`, `info`, `export`, `xattr ls/get`,
/// `super` without BLOB): the image is opened read-only under a shared lock and nothing is
/// written to it (a dirty store is recovered in memory only), so they work on an image the
/// user may not write (mode 0444, immutable, a read-only mount).
fn on_store_read_only<T, F, Fut>(image: &str, job: F) -> Result<T, ToolError>
where
    F: FnOnce(Blobstore, OpenInfo) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, ToolError>> + 'static,
    T: Send + 'static,
{
    with_store(image, StoreOpen::read_only(), job)
}

/// Like [`on_store`], with the store opened as `open` says.
fn with_store<T, F, Fut>(image: &str, open: StoreOpen, job: F) -> Result<T, ToolError>
where
    F: FnOnce(Blobstore, OpenInfo) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, ToolError>> + 'static,
    T: Send + 'static,
{
    run_offline(Path::new(image), open, job).map_err(|err| name_image(image, err))
}

/// A BLOB no blob matches, said naming the image and where to look.
fn no_such_blob(image: &str, what: &str) -> ToolError {
    ToolError::Failed(format!(
        "{image}: {what}: `spool ls {image}` lists its blobs"
    ))
}

/// Like [`with_store`], on an image the caller holds the lock of (one it just created, at
/// `path`: its temporary name until published); errors name `image`.
fn with_locked_store<T, F, Fut>(
    image: &str,
    path: &Path,
    lock: &ImageLock,
    open: StoreOpen,
    job: F,
) -> Result<T, ToolError>
where
    F: FnOnce(Blobstore, OpenInfo) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, ToolError>> + 'static,
    T: Send + 'static,
{
    // The run names the temporary path it works on; the user named IMAGE.
    let temp = path.display().to_string();
    run_offline_locked(path, lock, open, job).map_err(|err| match name_image(image, err) {
        ToolError::Failed(message) => ToolError::Failed(message.replace(&temp, image)),
        other => other,
    })
}

/// The super block error inside `err`, if loading the store failed on one (through the
/// engine's step and blob errors).
fn super_block_error(err: &ToolError) -> Option<&SuperBlockError> {
    fn engine(err: &EngineError) -> Option<&SuperBlockError> {
        match err {
            EngineError::Blob(BlobError::SuperBlock(sb)) => Some(sb),
            EngineError::Step { source, .. } => engine(source),
            _ => None,
        }
    }
    match err {
        ToolError::Blob(BlobError::SuperBlock(sb)) => Some(sb),
        ToolError::Engine(err) => engine(err),
        _ => None,
    }
}

/// A store whose super block says it is larger than its device (a truncated file, or a
/// device smaller than the one the store was made on), said with what to do; `None` for any
/// other error.
fn truncated_store(image: &str, err: &ToolError) -> Option<ToolError> {
    let Some(SuperBlockError::Field {
        field: "size",
        reason,
    }) = super_block_error(err)
    else {
        return None;
    };
    // The reason is "{size} bytes is larger than the device's {device} bytes".
    let numbers: Vec<u64> = reason
        .split_whitespace()
        .filter_map(|word| word.parse().ok())
        .collect();
    let sizes = match numbers[..] {
        [size, device] => format!(
            "its super block says {size} bytes ({}), larger than the device ({device} bytes, {})",
            text::human_bytes(size),
            text::human_bytes(device)
        ),
        _ => format!("its super block says {reason}"),
    };
    Some(ToolError::Failed(format!(
        "{image}: the store is truncated: {sizes}; the file lost its tail or the device is smaller than the store: restore the missing tail (or give the whole device), then run spool check {image}"
    )))
}

/// Whether `err` says the image holds no blobstore at all (wrong signature or version).
fn not_a_blobstore(err: &ToolError) -> bool {
    let blob = match err {
        ToolError::Engine(EngineError::Blob(blob)) | ToolError::Blob(blob) => blob,
        _ => return false,
    };
    matches!(
        blob,
        BlobError::SuperBlock(SuperBlockError::Signature(_) | SuperBlockError::Version(_))
    )
}

/// Whether `err` is the host filesystem being full: a device write (or space reservation)
/// the host refused with ENOSPC or EDQUOT. Not the store's own "no space" (no free
/// cluster, a device smaller than a cluster), which says what it needs in its own words.
fn host_is_full(err: &ToolError) -> bool {
    device_errno_in(err, &[-libc::ENOSPC, -libc::EDQUOT])
}

/// Whether a device write (or space reservation) inside `err` failed with one of `errnos`.
fn device_errno_in(err: &ToolError, errnos: &[i32]) -> bool {
    fn device(err: &spool_bdev::BdevError, errnos: &[i32]) -> bool {
        use spool_bdev::BdevError;
        match err {
            BdevError::Io { errno, .. } | BdevError::Reserve { errno, .. } => {
                errnos.contains(errno)
            }
            _ => false,
        }
    }
    fn blob(err: &BlobError, errnos: &[i32]) -> bool {
        match err {
            BlobError::Bdev(err) => device(err, errnos),
            BlobError::Remote { errno, .. } => errnos.contains(errno),
            _ => false,
        }
    }
    fn engine(err: &EngineError, errnos: &[i32]) -> bool {
        match err {
            EngineError::Bdev(err) => device(err, errnos),
            EngineError::Blob(err) => blob(err, errnos),
            EngineError::Step { source, .. } => engine(source, errnos),
            _ => false,
        }
    }
    match err {
        ToolError::Engine(err) => engine(err, errnos),
        ToolError::Blob(err) => blob(err, errnos),
        _ => false,
    }
}

/// A store on a block device has no host filesystem under it: the device's own ENOSPC
/// (a thin-provisioned LUN, a dm-thin volume, a loop device over a file on a full
/// filesystem) is said as the device running out of space, with what to do, never as a full
/// host filesystem nor with advice about thick blobs (a block device has nothing to reserve).
fn block_device_full(image: &str, err: &ToolError) -> Option<ToolError> {
    use std::os::unix::fs::FileTypeExt;
    let on_device = std::fs::metadata(image).is_ok_and(|meta| meta.file_type().is_block_device());
    let message = spool_engine::words::scrub(&err.to_string());
    if !on_device || !(host_is_full(err) || message.contains("the host filesystem is full")) {
        return None;
    }
    let advice = "its backing storage is full (a thin pool, or the filesystem under a loop device's file): free space there, then run the command again";
    let when = message
        .split_once("the host filesystem is full after ")
        .and_then(|(_, rest)| rest.split_once(": No space left on device"))
        .map(|(when, _)| format!(" after {when}"))
        .unwrap_or_default();
    Some(ToolError::Failed(format!(
        "{image}: the device ran out of space{when}: {advice}"
    )))
}

/// Makes an engine, store or reactor error name the image (unless it already does), in
/// words: a full host filesystem said as such, no errno numbers or io error tails.
/// The bytes cleared of how many, when `err` is an init stopped while clearing the metadata
/// area (`BlobError::InitStopped`), however the layers above wrapped it.
fn init_stopped(err: &ToolError) -> Option<(u64, u64)> {
    // `#[error(transparent)]` wrappers hand on their inner error's source, not the inner
    // error: those are matched here, the others found down the source chain.
    match err {
        ToolError::Blob(spool_blob::BlobError::InitStopped { done, total })
        | ToolError::Engine(spool_engine::EngineError::Blob(
            spool_blob::BlobError::InitStopped { done, total },
        )) => return Some((*done, *total)),
        _ => {}
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(current) = cause {
        if let Some(spool_blob::BlobError::InitStopped { done, total }) = current.downcast_ref() {
            return Some((*done, *total));
        }
        cause = current.source();
    }
    None
}

pub(crate) fn name_image(image: &str, err: ToolError) -> ToolError {
    if let (Some((done, total)), Some(signal)) =
        (init_stopped(&err), spool_engine::signals::stop_requested())
    {
        return ToolError::Interrupted {
            signal,
            done: format!(
                "{done} of {total} bytes of the metadata area cleared ({image} holds no store now: init writes the super block last; run init again)"
            ),
            report: None,
        };
    }
    if let ToolError::NoSuchBlob(what) = &err {
        return no_such_blob(image, what);
    }
    if let Some(said) = block_device_full(image, &err) {
        return said;
    }
    if not_a_blobstore(&err) {
        return not_a_store(image, &err.to_string());
    }
    if let Some(truncated) = truncated_store(image, &err) {
        return truncated;
    }
    if host_is_full(&err) && !err.to_string().contains("host filesystem is full") {
        return ToolError::Failed(format!(
            "{image}: {}",
            spool_engine::words::host_full("a write to the image")
        ));
    }
    // A write past the file size limit (`ulimit -f`) or the filesystem's largest file.
    if device_errno_in(&err, &[-libc::EFBIG]) {
        return ToolError::Failed(format!(
            "{image}: a write to the image failed: {}: raise the limit (ulimit -f unlimited), then run the command again",
            spool_engine::words::io_words(&std::io::Error::from_raw_os_error(libc::EFBIG))
        ));
    }
    match err {
        ToolError::Engine(_) | ToolError::Blob(_) | ToolError::Reactor(_) => {
            let message = spool_engine::words::scrub(&err.to_string());
            if message.contains(image) {
                ToolError::Failed(message)
            } else {
                ToolError::Failed(format!("{image}: {message}"))
            }
        }
        other => other,
    }
}

/// IMAGE holds no blobstore (its super block did not decode: `why`), said the one way every
/// command says it: no signature at all, or a signature with a super block this build
/// cannot read.
fn not_a_store(image: &str, why: &str) -> ToolError {
    if !spool_engine::guard::holds_blobstore(Path::new(image)) {
        return ToolError::Failed(format!(
            "{image}: not a blobstore: no SPDKBLOB signature (spool init formats one)"
        ));
    }
    ToolError::Failed(format!("{image}: not a blobstore ({why})"))
}

/// Clusters for `bytes` (rounded up), telling on stderr when it rounded. A size whose
/// rounding passes the largest byte count is refused in words (naming `image`), never an
/// overflow.
fn clusters_for(image: &str, bytes: u64, cluster_size: u64) -> Result<u64, ToolError> {
    let clusters = bytes.div_ceil(cluster_size);
    let Some(rounded) = clusters.checked_mul(cluster_size) else {
        return Err(ToolError::Failed(format!(
            "{image}: {bytes} bytes rounded up to whole {} clusters is more bytes than a size can hold (at most {} bytes)",
            text::human_bytes(cluster_size),
            u64::MAX / cluster_size * cluster_size
        )));
    };
    if rounded != bytes {
        eprintln!(
            "note: {bytes} bytes is not a whole number of {} clusters: rounded up to {clusters} cluster(s) ({rounded} bytes)",
            text::human_bytes(cluster_size),
        );
    }
    Ok(clusters)
}
