//! `spool import` and `spool export`: the arguments, the progress bar and the error lines.
//! The copy itself is the engine's ([`spool_engine::transfer`]).

use std::path::Path;

use indicatif::ProgressBar;
use spool_engine::transfer::{self, ExportSink, ImportSource, Progress};
use spool_engine::EngineError;

use crate::blob_cmd::args::{ExportArgs, ImportArgs};
use crate::blob_cmd::progress::bytes_bar;
use crate::blob_cmd::resolve::{resolve_blob, with_blob};
use crate::blob_cmd::{on_store, on_store_read_only};
use crate::error::ToolError;

/// A transfer's error as the command reports it: a refused range or a file error is the
/// whole message; a store, device or reactor error is named after the image by
/// [`on_store`]; a stop is [`ToolError::Interrupted`].
fn transfer_error(err: EngineError) -> ToolError {
    match err {
        EngineError::InvalidArgument(_) | EngineError::File { .. } => {
            ToolError::Failed(err.to_string())
        }
        other => ToolError::from(other),
    }
}

/// A progress callback that draws a bar labelled `what` (made at the first call, once the
/// total is known) into `bar`.
fn draw<'a>(bar: &'a mut Option<ProgressBar>, what: &'a str) -> impl FnMut(Progress) + 'a {
    move |progress| {
        bar.get_or_insert_with(|| bytes_bar(progress.total, what))
            .set_position(progress.done);
    }
}

/// `spool import IMAGE BLOB FILE [--offset BYTES] [--force]`: a FILE in a disk image format
/// (qcow2, VMDK, VHD, ...) is refused without `--force`: its bytes are not the disk's.
pub fn import(args: &ImportArgs) -> Result<(), ToolError> {
    // Opened first: it refuses what is not a regular file or block device (a FIFO, whose
    // open would block) before anything reads it.
    let source = ImportSource::open(Path::new(&args.file)).map_err(transfer_error)?;
    // The store's own bytes, read while the import writes them, are no disk's contents: a
    // typo for another file (export refuses the same).
    if same_file(&args.file, &args.image) {
        return Err(ToolError::Failed(format!(
            "{}: is the image itself; import from another file",
            args.file
        )));
    }
    if !args.force {
        if let Some(format) = spool_engine::guard::disk_image_format(Path::new(&args.file)) {
            return Err(ToolError::Failed(format!(
                "{}: is a {format} image, not raw data: convert it to raw with qemu-img first (qemu-img convert -O raw {} out.raw), or add --force to copy its bytes as they are",
                args.file, args.file
            )));
        }
    }
    let offset = args.offset;
    let text = args.blob.clone();
    on_store(&args.image, move |store, _| async move {
        let id = resolve_blob(&store, &text).await?;
        with_blob(&store, id, async |blob| {
            let mut bar = None;
            let result =
                transfer::import(&store, blob, &source, offset, &mut draw(&mut bar, "import"))
                    .await;
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            result.map_err(transfer_error)
        })
        .await
    })
}

/// Whether paths `a` and `b` are one file or one device, whatever their names: the same
/// inode (a hard link, a symlink, a bind mount) or the same block device (another node of
/// it, made with mknod).
fn same_file(a: &str, b: &str) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => {
            (a.dev() == b.dev() && a.ino() == b.ino())
                || (a.file_type().is_block_device()
                    && b.file_type().is_block_device()
                    && a.rdev() == b.rdev())
        }
        _ => false,
    }
}

/// Refuses an export onto a block device that holds a blobstore or what `init` refuses to
/// format by name (a filesystem, a partition table, LUKS, swap, LVM, md RAID, a disk image):
/// one mistyped device name must not destroy a volume. Unrecognised data (what an earlier
/// export leaves) is written over, as `perf` writes over its own data in a file.
fn refuse_overwriting_a_device(file: &str) -> Result<(), ToolError> {
    use std::os::unix::fs::FileTypeExt;
    let path = Path::new(file);
    if !std::fs::metadata(path).is_ok_and(|meta| meta.file_type().is_block_device()) {
        return Ok(());
    }
    let found = if spool_engine::guard::holds_blobstore(path) {
        Some("a blobstore".to_string())
    } else {
        spool_engine::guard::foreign_contents(path)
            .filter(|found| found != spool_engine::guard::UNRECOGNISED_DATA)
    };
    match found {
        Some(found) => Err(ToolError::Failed(format!(
            "{file}: holds {found}; export would overwrite it: check the device name (e.g. with lsblk), or add --force to lose it"
        ))),
        None => Ok(()),
    }
}

/// Refuses an export over a regular FILE that another process holds the image lock of (a
/// running `spool serve`: the rename would take the store from under it, and every write it
/// takes after would be lost), even with `--force`; and, without `--force`, one that holds a
/// blobstore (a store's every blob would be lost), as `perf` refuses it. Returns FILE's lock,
/// held while the export runs.
fn refuse_replacing_a_store(
    file: &str,
    force: bool,
) -> Result<Option<spool_engine::ImageLock>, ToolError> {
    let path = Path::new(file);
    if !std::fs::metadata(path).is_ok_and(|meta| meta.is_file()) {
        return Ok(None);
    }
    let lock = match spool_engine::ImageLock::exclusive(path) {
        Ok(lock) => Some(lock),
        Err(err) if err.errno() == -libc::EBUSY => {
            return Err(ToolError::Failed(format!(
                "{file}: in use by another process (it holds the image lock): export would replace the file under it; export to another file, or stop that process first"
            )));
        }
        // Unreadable: the export itself says what is wrong with FILE.
        Err(_) => None,
    };
    if !force && spool_engine::guard::holds_blobstore(path) {
        return Err(ToolError::Failed(format!(
            "{file}: holds a blobstore; export would replace it and every blob in it would be lost: check the file name, or add --force to lose it"
        )));
    }
    Ok(lock)
}

/// `spool export IMAGE BLOB FILE [--offset BYTES] [--length BYTES]` (FILE `-` is stdout).
pub fn export(args: &ExportArgs) -> Result<(), ToolError> {
    if args.file != "-" {
        spool_engine::guard::refuse_new_file_in_dev(Path::new(&args.file))
            .map_err(transfer_error)?;
    }
    if same_file(&args.file, &args.image) {
        return Err(ToolError::Failed(format!(
            "{}: is the image itself; export to another file",
            args.file
        )));
    }
    if !args.force {
        refuse_overwriting_a_device(&args.file)?;
    }
    // Held to the end: no daemon starts on FILE while the export replaces it.
    let _file_lock = refuse_replacing_a_store(&args.file, args.force)?;
    let (file, offset, length) = (args.file.clone(), args.offset, args.length);
    let text = args.blob.clone();
    on_store_read_only(&args.image, move |store, _| async move {
        let id = resolve_blob(&store, &text).await?;
        with_blob(&store, id, async |blob| {
            let sink = if file == "-" {
                ExportSink::Stdout
            } else {
                ExportSink::File(file.clone().into())
            };
            let mut bar = None;
            let result = transfer::export(
                &store,
                blob,
                offset,
                length,
                sink,
                &mut draw(&mut bar, "export"),
            )
            .await;
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            result.map_err(transfer_error)
        })
        .await
    })
}
