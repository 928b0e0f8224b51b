//! Offline runs of the blobstore: what each `spool` blobstore command does around its own
//! work. Open the image (a file or block device, through the io_uring bdev), start a runtime
//! of one reactor, load (or init) the store on that reactor, run the command's job there,
//! unload the store cleanly (so it is left clean), and stop the runtime.
//!
//! The job runs on the store's metadata reactor, so it may call every [`Blobstore`] and
//! [`spool_blob::Blob`] method, and do blob I/O through `store.channel()`.
//!
//! For the whole run the image is locked ([`ImageLock`]): a second `spool` command (or a
//! future daemon) on the same image fails at once with -EBUSY instead of writing metadata
//! under the first one.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use spool_bdev::BdevDesc;
use spool_blob::format::super_block::SuperBlock;
use spool_blob::{Blobstore, InitOptions, LoadOptions, LoadReport};
use spool_reactor::{IdleMode, Runtime, RuntimeOptions};

use crate::lock::ImageLock;
use crate::target::{open_image, TargetOptions};
use crate::EngineError;

/// How the runner gets the store on the image.
#[derive(Debug, Clone)]
pub enum StoreOpen {
    /// Load the store that is there (a dirty one is recovered first).
    Load(LoadOptions),
    /// Format the image as a new, empty store.
    Init(InitOptions),
    /// Format the image as a new, empty store whose io_unit is `block_size` (512 or 4096):
    /// a file is opened with blocks of that size (a block device must have that logical block
    /// size, -EINVAL otherwise), and SPDK, too, takes the device's block size as the io_unit.
    InitWithBlockSize(InitOptions, u32),
}

impl StoreOpen {
    /// Loads the store read-only: the image is opened `O_RDONLY` under a shared lock and
    /// nothing is written to it (see [`LoadOptions::read_only`]). For commands that only
    /// read (`spool ls`, `info`, `export`): they work on an image they may not write.
    pub fn read_only() -> StoreOpen {
        StoreOpen::Load(LoadOptions {
            read_only: true,
            ..LoadOptions::default()
        })
    }

    /// Whether this opening writes nothing.
    fn is_read_only(&self) -> bool {
        matches!(self, StoreOpen::Load(options) if options.read_only)
    }
}

/// The block size to open a regular file with for `open`: the one asked for at init; for a
/// load, the io_unit its super block records (so a store made with 512-byte blocks loads),
/// else 4096. Block devices always use their own logical block size.
fn file_block_size(image: &Path, open: &StoreOpen) -> u32 {
    const DEFAULT: u32 = 4096;
    match open {
        StoreOpen::Init(_) => DEFAULT,
        StoreOpen::InitWithBlockSize(_, block_size) => *block_size,
        StoreOpen::Load(_) => store_io_unit(image).unwrap_or(DEFAULT),
    }
}

/// The io_unit the store on `image` records in its super block (`None` when the first page
/// cannot be read or is not a valid super block).
pub fn store_io_unit(image: &Path) -> Option<u32> {
    use std::io::Read;
    let mut page = vec![0u8; 4096];
    std::fs::File::open(image)
        .ok()?
        .read_exact(&mut page)
        .ok()?;
    let block = SuperBlock::decode(&page).ok()?;
    Some(block.effective_io_unit())
}

/// What the runner knew when it handed the store to the job.
#[derive(Debug, Clone)]
pub struct OpenInfo {
    /// The super block as it was on disk when the image was opened (after init: as written).
    pub super_block: SuperBlock,
    /// Whether that super block said "clean" (always false after init: the store is open).
    pub clean_at_open: bool,
    /// What the load found and did (`None` after init).
    pub load_report: Option<LoadReport>,
    /// Bytes of the device.
    pub device_bytes: u64,
    /// What the image is: "uring file" or "uring block device".
    pub kind: String,
}

/// The core the offline reactor runs on: the first core this process may run on, else 0.
fn offline_core() -> usize {
    core_affinity::get_core_ids()
        .and_then(|ids| ids.first().map(|id| id.id))
        .unwrap_or(0)
}

/// Fails unless `image` exists and is not a directory (the runner never creates an image;
/// see [`crate::prepare_file`] for that).
pub fn check_image_exists(image: &Path) -> Result<(), EngineError> {
    let meta = std::fs::metadata(image).map_err(|err| {
        let reason = match err.raw_os_error() {
            Some(libc::ENOENT) => "no such file or directory".to_string(),
            // `s.img/`: a trailing slash asks for a directory.
            Some(libc::ENOTDIR) if image.as_os_str().as_encoded_bytes().ends_with(b"/") => "a part of the path is not a directory (a trailing slash? give the image's path without it)".to_string(),
            // `s.img/x`: a file where a directory should be.
            Some(libc::ENOTDIR) => "a part of the path is not a directory".to_string(),
            _ => crate::words::io_words(&err),
        };
        EngineError::File {
            path: image.display().to_string(),
            reason,
            errno: -err.raw_os_error().unwrap_or(libc::EIO),
        }
    })?;
    if meta.is_dir() {
        return Err(EngineError::File {
            path: image.display().to_string(),
            reason: "is a directory, not an image: give the store's file or block device".into(),
            errno: -libc::EISDIR,
        });
    }
    crate::guard::refuse_special_file(image)
}

/// Opens `image`, gets its store as `open` says on a fresh one-reactor runtime, runs `job`
/// with the store on that reactor, then unloads the store and stops the runtime.
///
/// The store is unloaded whether the job succeeded or not (a job must close every blob it
/// opened, or the unload is refused with -EBUSY and the store is left dirty). The job's error
/// comes first; an unload error is returned when the job succeeded.
pub fn run_offline<T, E, F, Fut>(image: &Path, open: StoreOpen, job: F) -> Result<T, E>
where
    F: FnOnce(Blobstore, OpenInfo) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, E>> + 'static,
    T: Send + 'static,
    E: From<EngineError> + Send + 'static,
{
    check_image_exists(image)?;
    // Held until the store is unloaded and the device closed (dropped last). A read-only
    // load shares the image with other readers (and is refused while a writer holds it).
    let lock = if open.is_read_only() {
        ImageLock::shared(image)?
    } else {
        ImageLock::exclusive(image)?
    };
    run_offline_locked(image, &lock, open, job)
}

/// [`run_offline`] on an image the caller has locked already (e.g. one it has just created
/// with [`ImageLock::create`], so it can still remove it under the lock if the run fails).
pub fn run_offline_locked<T, E, F, Fut>(
    image: &Path,
    lock: &ImageLock,
    open: StoreOpen,
    job: F,
) -> Result<T, E>
where
    F: FnOnce(Blobstore, OpenInfo) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, E>> + 'static,
    T: Send + 'static,
    E: From<EngineError> + Send + 'static,
{
    if lock.path() != image {
        return Err(E::from(EngineError::InvalidArgument(format!(
            "{}: the lock held is on {}",
            image.display(),
            lock.path().display()
        ))));
    }
    let target = TargetOptions {
        block_size: file_block_size(image, &open),
        read_only: open.is_read_only(),
        ..TargetOptions::default()
    };
    let (bdev, kind) = open_image(image, &target).map_err(|err| {
        if target.read_only {
            err
        } else {
            unwritable(image, err)
        }
    })?;
    let desc = BdevDesc::open(Arc::clone(&bdev)).map_err(EngineError::from)?;
    let runtime = Runtime::start(&RuntimeOptions {
        cores: vec![offline_core()],
        idle: IdleMode::Sleep,
        pin: false,
    })
    .map_err(EngineError::from)?;
    let reactor = runtime.reactors()[0];
    let outcome = runtime.block_on(reactor, move || async move {
        let device_bytes = desc.size_bytes();
        let (store, info) = match open_store(desc, open).await {
            Ok(opened) => opened,
            Err(err) => return Err(E::from(err)),
        };
        let info = OpenInfo {
            device_bytes,
            kind,
            ..info
        };
        let result = job(store.clone(), info).await;
        let unloaded = store.unload().await;
        match (result, unloaded) {
            (Ok(value), Ok(())) => Ok(value),
            (Ok(_), Err(err)) => Err(E::from(EngineError::Blob(err))),
            (Err(err), Ok(())) => Err(err),
            (Err(err), Err(unload)) => {
                tracing::warn!(%unload, "unload after a failed command also failed");
                Err(err)
            }
        }
    });
    let report = runtime.stop();
    if report.leaked_channels != 0 || !report.panicked.is_empty() {
        tracing::warn!(?report, "offline runtime stopped with leaks or panics");
    }
    drop(bdev);
    outcome.map_err(|err| E::from(EngineError::Reactor(err)))?
}

/// An image a writer could not open for writing (mode, immutable flag, read-only mount),
/// said in words: what failed, and that the commands which only read still work.
pub(crate) fn unwritable(image: &Path, err: EngineError) -> EngineError {
    let errno = err.errno();
    let reason = match -errno {
        libc::EACCES => "permission denied",
        libc::EPERM => "operation not permitted (is it immutable? see lsattr)",
        libc::EROFS => "on a read-only filesystem",
        _ => return err,
    };
    EngineError::File {
        path: image.display().to_string(),
        reason: format!(
            "cannot be opened for writing: {reason}; this command writes the image (ls, info, export and dump only read it)"
        ),
        errno,
    }
}

async fn open_store(desc: BdevDesc, open: StoreOpen) -> Result<(Blobstore, OpenInfo), EngineError> {
    let info = |super_block: SuperBlock, load_report| OpenInfo {
        clean_at_open: super_block.clean == 1,
        super_block,
        load_report,
        device_bytes: 0,
        kind: String::new(),
    };
    match open {
        StoreOpen::Load(options) => {
            let (store, report) = Blobstore::load(desc, &options).await?;
            // The in-memory super block keeps the clean flag as read at load.
            let super_block = store.super_block();
            Ok((store, info(super_block, Some(report))))
        }
        StoreOpen::InitWithBlockSize(options, block_size) => {
            if desc.block_size() != block_size {
                return Err(EngineError::InvalidArgument(format!(
                    "the device's blocks are {} bytes, not the {block_size} asked for",
                    desc.block_size()
                )));
            }
            Box::pin(open_store(desc, StoreOpen::Init(options))).await
        }
        StoreOpen::Init(options) => {
            let store = Blobstore::init(desc, &options).await?;
            let mut super_block = store.super_block();
            super_block.clean = 0;
            Ok((store, info(super_block, None)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(dir: &tempfile::TempDir, bytes: u64) -> std::path::PathBuf {
        let path = dir.path().join("store.img");
        crate::prepare_file(&path, bytes, |_| {}).unwrap();
        path
    }

    #[test]
    fn init_then_load_sees_the_store_clean_and_the_blob() {
        let dir = tempfile::tempdir().unwrap();
        let path = image(&dir, 64 << 20);
        let id = run_offline(
            &path,
            StoreOpen::Init(InitOptions::default()),
            |store, info| async move {
                assert!(!info.clean_at_open);
                assert!(info.load_report.is_none());
                assert_eq!(info.device_bytes, 64 << 20);
                let id = store
                    .create_blob(&spool_blob::BlobOptions {
                        num_clusters: 2,
                        ..Default::default()
                    })
                    .await?;
                Ok::<_, EngineError>(id)
            },
        )
        .unwrap();
        let (clean, blobs, free) = run_offline(
            &path,
            StoreOpen::Load(LoadOptions::default()),
            |store, info| async move {
                Ok::<_, EngineError>((
                    info.clean_at_open,
                    store.blob_ids(),
                    store.free_cluster_count(),
                ))
            },
        )
        .unwrap();
        assert!(clean, "the first run unloaded cleanly");
        assert_eq!(blobs, vec![id]);
        assert_eq!(free, 61);
    }

    #[test]
    fn a_store_made_with_512_byte_blocks_loads_with_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = image(&dir, 16 << 20);
        let open = StoreOpen::InitWithBlockSize(InitOptions::default(), 512);
        let unit = run_offline(&path, open, |store, _| async move {
            Ok::<_, EngineError>(store.io_unit_size())
        })
        .unwrap();
        assert_eq!(unit, 512);
        assert_eq!(store_io_unit(&path), Some(512));
        let unit = run_offline(
            &path,
            StoreOpen::Load(LoadOptions::default()),
            |store, _| async move { Ok::<_, EngineError>(store.io_unit_size()) },
        )
        .unwrap();
        assert_eq!(
            unit, 512,
            "the load opens the file with the store's io_unit"
        );
    }

    #[test]
    fn a_failed_job_still_unloads_and_its_error_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = image(&dir, 16 << 20);
        run_offline(
            &path,
            StoreOpen::Init(InitOptions::default()),
            |_, _| async { Ok::<_, EngineError>(()) },
        )
        .unwrap();
        let err = run_offline(
            &path,
            StoreOpen::Load(LoadOptions::default()),
            |store, _| async move {
                store.create_blob(&Default::default()).await?;
                Err::<(), _>(EngineError::InvalidArgument("job failed".into()))
            },
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "job failed");
        let clean = run_offline(
            &path,
            StoreOpen::Load(LoadOptions::default()),
            |store, info| async move {
                assert_eq!(store.blob_ids().len(), 1);
                Ok::<_, EngineError>(info.clean_at_open)
            },
        )
        .unwrap();
        assert!(clean);
    }

    #[test]
    fn missing_and_unformatted_images_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.img");
        let err = run_offline(
            &missing,
            StoreOpen::Load(LoadOptions::default()),
            |_, _| async { Ok::<_, EngineError>(()) },
        )
        .unwrap_err();
        assert_eq!(err.errno(), -libc::ENOENT);
        assert!(err.to_string().contains("nope.img"), "{err}");
        assert!(!missing.exists(), "a load never creates the image");
        let zeros = image(&dir, 8 << 20);
        let err = run_offline(
            &zeros,
            StoreOpen::Load(LoadOptions::default()),
            |_, _| async { Ok::<_, EngineError>(()) },
        )
        .unwrap_err();
        assert_eq!(err.errno(), -libc::EILSEQ, "{err}");
    }

    #[test]
    fn a_job_that_leaves_a_blob_open_gets_the_unload_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = image(&dir, 16 << 20);
        let err = run_offline(
            &path,
            StoreOpen::Init(InitOptions::default()),
            |store, _| async move {
                let id = store.create_blob(&Default::default()).await?;
                let blob = store.open_blob(id).await?;
                std::mem::forget(blob);
                Ok::<_, EngineError>(())
            },
        )
        .unwrap_err();
        assert_eq!(err.errno(), -libc::EBUSY, "{err}");
    }
}
