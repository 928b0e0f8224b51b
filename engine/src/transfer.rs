//! Copies between files and blobs (`spool import` and `spool export`): through the blob
//! channel over the store's bdev, in 1 MiB chunks with several in flight.
//!
//! Both run on the store's metadata reactor (e.g. inside a [`crate::run_offline`] job) with an
//! open blob. Offsets are in bytes and must be multiples of the store's io_unit. An import
//! whose file does not end on an io_unit boundary reads the blob's last io_unit first and
//! writes it back with the file's tail over it (read-modify-write); an export of such a
//! length reads whole io_units and writes only the bytes asked for.
//!
//! A stop signal ([`crate::signals`]) ends a copy at a chunk boundary: what is in flight
//! finishes and the copy returns [`EngineError::Stopped`] saying how far it got. Progress is
//! reported to a callback (the command line draws a bar with it).

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use spool_bdev::DmaBuf;
use spool_blob::{Blob, BlobChannel, BlobIo, Blobstore};
use spool_reactor::{spawn_local, JoinHandle};

use crate::signals::stop_requested;
use crate::EngineError;

/// Bytes per request.
pub const CHUNK_BYTES: u64 = 1 << 20;
/// Requests in flight.
pub const DEPTH: usize = 4;

/// How far a copy is, as the progress callback of [`import`] and [`export`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes copied so far.
    pub done: u64,
    /// Bytes the copy moves in all.
    pub total: u64,
}

/// Requests in flight, oldest first; the first error wins and later ones are drained.
struct Window<T: 'static> {
    in_flight: VecDeque<JoinHandle<Result<T, EngineError>>>,
}

impl<T: 'static> Window<T> {
    fn new() -> Self {
        Window {
            in_flight: VecDeque::new(),
        }
    }

    fn is_full(&self) -> bool {
        self.in_flight.len() >= DEPTH
    }

    fn push(&mut self, task: impl std::future::Future<Output = Result<T, EngineError>> + 'static) {
        self.in_flight.push_back(spawn_local(task));
    }

    /// The oldest request's result, or `None` when none is in flight.
    async fn pop(&mut self) -> Option<Result<T, EngineError>> {
        let handle = self.in_flight.pop_front()?;
        Some(
            handle
                .await
                .map_err(EngineError::from)
                .and_then(|result| result),
        )
    }

    /// Waits for every request left (after a failure: nothing may outlive the blob's close).
    async fn drain(&mut self) {
        while self.pop().await.is_some() {}
    }
}

fn id_hex(id: u64) -> String {
    format!("{id:#x}")
}

fn check_offset(offset: u64, unit: u64) -> Result<(), EngineError> {
    if offset.is_multiple_of(unit) {
        Ok(())
    } else {
        Err(EngineError::InvalidArgument(format!(
            "--offset {offset} is not a multiple of the store's {unit}-byte io_unit"
        )))
    }
}

fn dma(len: u64) -> Result<DmaBuf, EngineError> {
    let len = usize::try_from(len).map_err(|_| {
        EngineError::InvalidArgument(format!("a {len}-byte buffer does not fit memory"))
    })?;
    Ok(DmaBuf::alloc(len)?)
}

fn file_error(name: &str, reason: String, err: &std::io::Error) -> EngineError {
    EngineError::File {
        path: name.to_string(),
        reason,
        errno: -err.raw_os_error().unwrap_or(libc::EIO),
    }
}

/// The refusal of an import source that is neither a regular file nor a block device.
fn not_importable(name: String, meta: &std::fs::Metadata) -> EngineError {
    EngineError::File {
        path: name,
        reason: if meta.is_dir() {
            "is a directory, not a regular file or block device (import reads one)".into()
        } else {
            "not a regular file or block device (import reads one of known length)".into()
        },
        errno: -libc::EINVAL,
    }
}

/// A regular file to import, open, with its length.
#[derive(Debug)]
pub struct ImportSource {
    file: File,
    name: String,
    len: u64,
}

impl ImportSource {
    /// Opens `path` for reading: a regular file, or a block device (read whole: its size is
    /// the device's). Errors are [`EngineError::File`] naming the path, in words.
    pub fn open(path: &Path) -> Result<ImportSource, EngineError> {
        use std::io::{Seek, SeekFrom};
        use std::os::unix::fs::FileTypeExt;
        let name = path.display().to_string();
        // Its type first, without opening it: opening a FIFO blocks until a writer comes.
        let meta = std::fs::metadata(path)
            .map_err(|err| file_error(&name, crate::words::failure("open", &err), &err))?;
        if !meta.is_file() && !meta.file_type().is_block_device() {
            return Err(not_importable(name, &meta));
        }
        let file = File::open(path)
            .map_err(|err| file_error(&name, crate::words::failure("open", &err), &err))?;
        let meta = file
            .metadata()
            .map_err(|err| file_error(&name, crate::words::failure("stat", &err), &err))?;
        let len = if meta.is_file() {
            meta.len()
        } else if meta.file_type().is_block_device() {
            // A block device's size is where a seek to its end lands.
            let mut handle = &file;
            handle.seek(SeekFrom::End(0)).map_err(|err| {
                file_error(&name, crate::words::failure("device size", &err), &err)
            })?
        } else {
            return Err(not_importable(name, &meta));
        };
        Ok(ImportSource { file, name, len })
    }

    /// The file's length in bytes (as it was when opened).
    pub fn bytes(&self) -> u64 {
        self.len
    }

    /// The file's name, as messages give it.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Fills the buffer for file bytes `[pos, pos + take)` going to blob byte `at`: the blob's
/// last io_unit first when `take` ends inside one, then the file's bytes.
async fn fill_chunk(
    channel: &BlobChannel,
    io: &BlobIo,
    source: &ImportSource,
    at: u64,
    pos: u64,
    take: u64,
    unit: u64,
) -> Result<DmaBuf, EngineError> {
    let padded = take.next_multiple_of(unit);
    let mut buf = dma(padded)?;
    if padded != take {
        let (result, tail) = channel
            .read(io, (at + padded - unit) / unit, dma(unit)?)
            .await;
        result?;
        buf[(padded - unit) as usize..].copy_from_slice(&tail);
    }
    source
        .file
        .read_exact_at(&mut buf[..take as usize], pos)
        .map_err(|err| {
            file_error(
                &source.name,
                crate::words::failure(&format!("read at byte {pos}"), &err),
                &err,
            )
        })?;
    Ok(buf)
}

/// Whether `err` is the store's own "no free cluster" (a thin blob's first write), which is
/// not the host filesystem's ENOSPC.
fn store_is_full(err: &EngineError) -> bool {
    match err {
        EngineError::Blob(spool_blob::BlobError::NoSpace(_)) => true,
        EngineError::Step { source, .. } => store_is_full(source),
        _ => false,
    }
}

/// Copies all of `source` into `blob` from blob byte `offset` (a multiple of the io_unit; the
/// file must fit in the blob from there). Runs on the store's metadata reactor; calls
/// `progress` as chunks are written.
///
/// Refused ranges are [`EngineError::InvalidArgument`], file reads [`EngineError::File`],
/// blob I/O [`EngineError::Blob`]; a stop signal gives [`EngineError::Stopped`] once what
/// was in flight is written.
pub async fn import(
    store: &Blobstore,
    blob: &Blob,
    source: &ImportSource,
    offset: u64,
    progress: &mut dyn FnMut(Progress),
) -> Result<(), EngineError> {
    let unit = store.io_unit_size();
    check_offset(offset, unit)?;
    let size = blob.size_bytes();
    let len = source.len;
    if offset > size || len > size - offset {
        return Err(EngineError::InvalidArgument(format!(
            "{} ({len} bytes) at offset {offset} reaches past the end of blob {} ({size} bytes)",
            source.name,
            id_hex(blob.id())
        )));
    }
    let channel = store.channel()?;
    let io = blob.io();
    let mut done = 0;
    progress(Progress { done, total: len });
    let mut window = Window::new();
    let mut pos = 0;
    let mut failure = None;
    let mut stopped = None;
    while pos < len && failure.is_none() {
        // A stop signal ends the copy at a chunk boundary; what is in flight finishes.
        if let Some(signal) = stop_requested() {
            stopped = Some(signal);
            break;
        }
        let take = CHUNK_BYTES.min(len - pos);
        match fill_chunk(&channel, &io, source, offset + pos, pos, take, unit).await {
            Ok(buf) => {
                let (channel, io) = (channel.clone(), Arc::clone(&io));
                let at = (offset + pos) / unit;
                window.push(async move {
                    channel.write(&io, at, buf).await.0?;
                    Ok(take)
                });
            }
            Err(err) => failure = Some(err),
        }
        if window.is_full() {
            match window.pop().await {
                Some(Ok(take)) => {
                    done += take;
                    progress(Progress { done, total: len });
                }
                Some(Err(err)) => failure = Some(err),
                None => {}
            }
        }
        pos += take;
    }
    while let Some(result) = window.pop().await {
        match (result, &failure) {
            (Ok(take), _) => {
                done += take;
                progress(Progress { done, total: len });
            }
            (Err(err), None) => failure = Some(err),
            (Err(_), Some(_)) => {}
        }
    }
    if let Some(err) = failure {
        if store_is_full(&err) {
            let free_hint = "delete blobs or snapshots the store no longer needs (`spool ls`, `spool delete`), or import into a store with more room";
            return Err(EngineError::Failed {
                reason: format!(
                    "the store has no free cluster left after {done} of {len} bytes of {} were written to blob {} (a thin blob takes a cluster on its first write there); {free_hint}",
                    source.name,
                    id_hex(blob.id())
                ),
                errno: -libc::ENOSPC,
            });
        }
        if err.errno() == -libc::ENOSPC {
            return Err(EngineError::Failed {
                reason: format!(
                    "the host filesystem is full after {done} of {len} bytes of {} were written to blob {}: No space left on device (free space on the host; a thick blob reserves its space when it is created)",
                    source.name,
                    id_hex(blob.id())
                ),
                errno: -libc::ENOSPC,
            });
        }
        return Err(err);
    }
    match stopped {
        Some(signal) => Err(EngineError::Stopped {
            signal,
            done: format!(
                "{pos} of {len} bytes of {} written to blob {}",
                source.name,
                id_hex(blob.id())
            ),
            report: None,
        }),
        None => Ok(()),
    }
}

/// Where an export writes.
pub enum ExportSink {
    /// A file. A regular file (or a missing one) is written under a temporary name in its
    /// directory (through a symlink: the link's target's directory; the link stays) and
    /// renamed over FILE, synced, only once the export is complete: a failed or stopped
    /// export leaves FILE as it was (or absent) and removes the temporary file. A device
    /// node, FIFO or socket is written in place.
    File(PathBuf),
    /// A stream (standard output): a reader that went away (`EPIPE`) before the end fails
    /// the export in words (-EPIPE, no panic, no partial success); it is flushed at the end.
    Stream {
        /// The stream.
        writer: Box<dyn Write + Send>,
        /// Its name in messages ("stdout").
        name: String,
    },
    /// Standard output, written through file descriptor 1 so that a stop signal ends a write
    /// a stalled reader blocks (a full pipe, a stalled network): the export stops as at a
    /// chunk boundary. A reader that went away is said as for [`ExportSink::Stream`].
    Stdout,
}

impl std::fmt::Debug for ExportSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExportSink::File(path) => f.debug_tuple("File").field(path).finish(),
            ExportSink::Stream { name, .. } => {
                f.debug_struct("Stream").field("name", name).finish()
            }
            ExportSink::Stdout => f.write_str("Stdout"),
        }
    }
}

/// A file an export fills out of sight: its temporary name, and the path it replaces once
/// the export is complete.
struct Staged {
    name: crate::staged::StagedName,
    final_path: PathBuf,
}

/// Standard output written by a thread of its own, so that the export waits for each
/// write with an eye on stop signals: a reader that stalls (a full pipe, a stalled network)
/// blocks the thread, never the stop. The thread is left blocked when the export stops; the
/// process ends soon after.
struct StdoutWriter {
    chunks: std::sync::mpsc::SyncSender<Vec<u8>>,
    written: std::sync::mpsc::Receiver<std::io::Result<()>>,
}

impl StdoutWriter {
    fn start() -> StdoutWriter {
        let (chunks, incoming) = std::sync::mpsc::sync_channel::<Vec<u8>>(1);
        let (done, written) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for chunk in incoming {
                let mut out = std::io::stdout().lock();
                let result = out.write_all(&chunk).and_then(|()| out.flush());
                if done.send(result).is_err() {
                    break;
                }
            }
        });
        StdoutWriter { chunks, written }
    }

    /// Writes `bytes`, waiting for the write in 100 ms steps; `Ok(Err(signal))` when a stop
    /// signal came before the reader took them.
    fn write(&self, bytes: &[u8]) -> std::io::Result<Result<(), crate::signals::StopSignal>> {
        let gone = || std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        self.chunks.send(bytes.to_vec()).map_err(|_| gone())?;
        loop {
            match self
                .written
                .recv_timeout(std::time::Duration::from_millis(100))
            {
                Ok(result) => return result.map(Ok),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(signal) = stop_requested() {
                        return Ok(Err(signal));
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Err(gone()),
            }
        }
    }
}

/// An open [`ExportSink`].
enum Sink {
    Stream {
        writer: Box<dyn Write + Send>,
        name: String,
    },
    /// Standard output, written by a thread of its own (see [`StdoutWriter`]).
    Stdout(StdoutWriter),
    File {
        file: File,
        path: PathBuf,
        /// Where the file is staged (`None`: written in place, a device node, FIFO or
        /// socket, or a regular file in a directory where no temporary file can be made).
        staged: Option<Staged>,
    },
}

/// Where `path` leads through any symbolic links: the path itself when it is none, else
/// the last link's target (which may not exist yet: a dangling link is followed to the file
/// it names, as `open(O_CREAT)` would create it). Loops and over-long chains give up and
/// return the path as it came (the open then says what is wrong).
fn link_target(path: &Path) -> PathBuf {
    if let Ok(real) = std::fs::canonicalize(path) {
        return real;
    }
    let mut at = path.to_path_buf();
    for _ in 0..40 {
        let Ok(next) = std::fs::read_link(&at) else {
            return at;
        };
        at = match at.parent() {
            Some(dir) if next.is_relative() => dir.join(next),
            _ => next,
        };
    }
    path.to_path_buf()
}

/// Gives the staged `file` the mode and (where allowed) the owner of the regular file it
/// will replace, as an in-place write would have kept them.
fn keep_mode_and_owner(file: &File, old: &std::fs::Metadata) {
    use std::os::unix::fs::MetadataExt;
    let _ = file.set_permissions(old.permissions());
    let _ = std::os::unix::fs::fchown(file, Some(old.uid()), Some(old.gid()));
}

impl Sink {
    fn open(sink: ExportSink) -> Result<Sink, EngineError> {
        match sink {
            ExportSink::Stream { writer, name } => Ok(Sink::Stream { writer, name }),
            ExportSink::Stdout => Ok(Sink::Stdout(StdoutWriter::start())),
            ExportSink::File(path) => {
                let shown = path.display().to_string();
                if std::fs::metadata(&path).is_ok_and(|meta| meta.is_dir()) {
                    return Err(EngineError::File {
                        path: shown,
                        reason: "is a directory: give the path of a file to write (or - for standard output)".into(),
                        errno: -libc::EISDIR,
                    });
                }
                let create_error = |err: std::io::Error| {
                    file_error(&shown, crate::words::failure("create", &err), &err)
                };
                let final_path = link_target(&path);
                let existing = std::fs::metadata(&final_path);
                let regular_or_new = match &existing {
                    Ok(meta) => meta.is_file(),
                    Err(err) => err.kind() == std::io::ErrorKind::NotFound,
                };
                if regular_or_new {
                    match crate::staged::create_staged(&final_path) {
                        Ok((file, name)) => {
                            if let Ok(old) = &existing {
                                keep_mode_and_owner(&file, old);
                            }
                            return Ok(Sink::File {
                                file,
                                path,
                                staged: Some(Staged { name, final_path }),
                            });
                        }
                        // A new file needs its directory writable either way.
                        Err(err) if existing.is_err() => return Err(create_error(err)),
                        // An existing file in a directory that takes no new file: in place.
                        Err(_) => {}
                    }
                }
                // A block device is claimed with O_EXCL, as every writer of one does: the
                // kernel refuses one that is mounted or held (a running spool serve, a
                // partition of it in use), which --force must not write over.
                let is_block = existing.as_ref().is_ok_and(|meta| {
                    std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type())
                });
                let file = if is_block {
                    use std::os::unix::fs::OpenOptionsExt;
                    std::fs::OpenOptions::new()
                        .write(true)
                        .custom_flags(libc::O_EXCL)
                        .open(&path)
                        .map_err(|err| {
                            if err.raw_os_error() == Some(libc::EBUSY) {
                                EngineError::File {
                                    path: shown.clone(),
                                    reason: "in use (mounted, or claimed by another process): export writes only to a device nobody uses".into(),
                                    errno: -libc::EBUSY,
                                }
                            } else {
                                create_error(err)
                            }
                        })?
                } else {
                    File::create(&path).map_err(create_error)?
                };
                Ok(Sink::File {
                    file,
                    path,
                    staged: None,
                })
            }
        }
    }

    /// The path and size of a block device sink (`None` for any other).
    fn block_device_bytes(&self) -> Option<(String, u64)> {
        use std::io::Seek;
        use std::os::unix::fs::FileTypeExt;
        let Sink::File { file, path, .. } = self else {
            return None;
        };
        if !file.metadata().ok()?.file_type().is_block_device() {
            return None;
        }
        // A block device's metadata says 0 bytes; its end is its size.
        let mut handle = file;
        let bytes = handle.seek(std::io::SeekFrom::End(0)).ok()?;
        handle.seek(std::io::SeekFrom::Start(0)).ok()?;
        Some((path.display().to_string(), bytes))
    }

    /// The sink's name in messages.
    fn name(&self) -> String {
        match self {
            Sink::Stream { name, .. } => name.clone(),
            Sink::Stdout(_) => "stdout".into(),
            Sink::File { path, .. } => path.display().to_string(),
        }
    }

    /// Writes `bytes`; false when the stream's reader went away (the export stops there).
    fn write(&mut self, bytes: &[u8]) -> Result<bool, EngineError> {
        match self {
            Sink::Stream { writer, name } => match writer.write_all(bytes) {
                Ok(()) => Ok(true),
                Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
                Err(err) => Err(file_error(name, crate::words::failure("write", &err), &err)),
            },
            Sink::Stdout(writer) => match writer.write(bytes) {
                Ok(Ok(())) => Ok(true),
                Ok(Err(signal)) => Err(EngineError::Stopped {
                    signal,
                    done: String::new(),
                    report: None,
                }),
                Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
                Err(err) => Err(file_error(
                    "stdout",
                    crate::words::failure("write", &err),
                    &err,
                )),
            },
            Sink::File { file, path, .. } => file.write_all(bytes).map(|()| true).map_err(|err| {
                let reason = if err.raw_os_error() == Some(libc::EIO) {
                    // EIO here is the output's, not the store's (e.g. a file in /proc).
                    "write: the output file refused the write (input/output error); give a regular file or a block device".to_string()
                } else {
                    crate::words::failure("write", &err)
                };
                file_error(&path.display().to_string(), reason, &err)
            }),
        }
    }

    /// Ends the export: after a complete copy (`ok`) a staged file is synced and renamed over
    /// FILE; otherwise it is removed and FILE is left as it was. A failure to sync or rename
    /// is the export's failure (the temporary file is removed then too).
    fn finish(self, ok: bool) -> Result<(), EngineError> {
        match self {
            Sink::Stream { mut writer, .. } => {
                let _ = writer.flush();
                Ok(())
            }
            Sink::Stdout(_) => Ok(()),
            Sink::File {
                file,
                path,
                staged: Some(Staged { name, final_path }),
            } => {
                if !ok {
                    // Dropping the name removes the temporary file.
                    return Ok(());
                }
                let shown = path.display().to_string();
                file.sync_all()
                    .map_err(|err| file_error(&shown, crate::words::failure("sync", &err), &err))?;
                drop(file);
                name.replace(&final_path).map_err(|err| {
                    file_error(
                        &shown,
                        crate::words::failure("rename the finished copy into place", &err),
                        &err,
                    )
                })
            }
            Sink::File {
                file, staged: None, ..
            } => {
                drop(file);
                Ok(())
            }
        }
    }
}

async fn read_range(
    channel: BlobChannel,
    io: Arc<BlobIo>,
    at: u64,
    padded: u64,
) -> Result<DmaBuf, EngineError> {
    let (result, buf) = channel.read(&io, at, dma(padded)?).await;
    result?;
    Ok(buf)
}

async fn copy_out(
    store: &Blobstore,
    blob: &Blob,
    offset: u64,
    length: u64,
    sink: &mut Sink,
    progress: &mut dyn FnMut(Progress),
) -> Result<(), EngineError> {
    let unit = store.io_unit_size();
    let channel = store.channel()?;
    let io = blob.io();
    let mut window = Window::new();
    let mut submitted = 0;
    let mut failure = None;
    let mut open = true;
    let mut copied = 0;
    let mut stopped = None;
    while (submitted < length || !window.in_flight.is_empty()) && failure.is_none() && open {
        if stopped.is_none() {
            // A stop signal ends the submissions; what is in flight is still written out.
            stopped = stop_requested();
        }
        if stopped.is_some() && window.in_flight.is_empty() {
            break;
        }
        while submitted < length && !window.is_full() && stopped.is_none() {
            let take = CHUNK_BYTES.min(length - submitted);
            let at = (offset + submitted) / unit;
            let read = read_range(
                channel.clone(),
                Arc::clone(&io),
                at,
                take.next_multiple_of(unit),
            );
            window.push(async move { Ok((read.await?, take)) });
            submitted += take;
        }
        match window.pop().await {
            Some(Ok((buf, take))) => {
                let written = sink.write(&buf[..take as usize]);
                if let Err(EngineError::Stopped { signal, .. }) = written {
                    // Stopped while the reader took nothing: what is in flight is dropped
                    // below, and the export ends as at a chunk boundary.
                    stopped = Some(signal);
                    break;
                }
                open = written.map_err(|err| {
                    if err.errno() == -libc::ENOSPC || err.errno() == -libc::EDQUOT {
                        EngineError::File {
                            path: sink.name(),
                            reason: format!(
                                "the host filesystem is full after {copied} of {length} bytes of blob {} were written (no space left on it); free space on the host, or export elsewhere",
                                id_hex(blob.id())
                            ),
                            errno: err.errno(),
                        }
                    } else {
                        err
                    }
                })?;
                copied += take;
                progress(Progress {
                    done: copied,
                    total: length,
                });
            }
            Some(Err(err)) => failure = Some(err),
            None => {}
        }
    }
    window.drain().await;
    if let Some(err) = failure {
        return Err(err);
    }
    if !open && copied < length {
        // A reader that went away is not a finished copy: say so, as cat and dd do with
        // their non-zero status.
        return Err(EngineError::File {
            path: sink.name(),
            reason: format!(
                "the reader went away (broken pipe) after {copied} of {length} bytes of blob {}; the copy is not complete",
                id_hex(blob.id())
            ),
            errno: -libc::EPIPE,
        });
    }
    match stopped {
        Some(signal) if copied < length => Err(EngineError::Stopped {
            signal,
            done: format!(
                "{copied} of {length} bytes of blob {} exported",
                id_hex(blob.id())
            ),
            report: None,
        }),
        _ => Ok(()),
    }
}

/// Copies `length` bytes of `blob` (all of it from `offset` when `None`) from blob byte
/// `offset` (a multiple of the io_unit) into `sink`. Runs on the store's metadata reactor;
/// calls `progress` as chunks are written out.
///
/// The sink is opened only once the range is checked; a regular file is written under a
/// temporary name and renamed over FILE only when the copy is complete, so a failed or
/// stopped export leaves FILE as it was (see [`ExportSink::File`]). Errors are as
/// [`import`]'s.
pub async fn export(
    store: &Blobstore,
    blob: &Blob,
    offset: u64,
    length: Option<u64>,
    sink: ExportSink,
    progress: &mut dyn FnMut(Progress),
) -> Result<(), EngineError> {
    let unit = store.io_unit_size();
    check_offset(offset, unit)?;
    let size = blob.size_bytes();
    if offset > size {
        return Err(EngineError::InvalidArgument(format!(
            "--offset {offset} is past the end of blob {} ({size} bytes)",
            id_hex(blob.id())
        )));
    }
    if let Some(length) = length {
        if length > size - offset {
            return Err(EngineError::InvalidArgument(format!(
                "{length} bytes at offset {offset} reach past the end of blob {} ({size} bytes)",
                id_hex(blob.id())
            )));
        }
    }
    let length = length.unwrap_or(size - offset);
    let mut sink = Sink::open(sink)?;
    // A block device cannot grow: one smaller than the copy is refused before its first
    // byte is written (not found full half-way, its head already overwritten).
    if let Some((path, device_bytes)) = sink.block_device_bytes() {
        if device_bytes < length {
            return Err(EngineError::InvalidArgument(format!(
                "{path}: the device holds {device_bytes} bytes, fewer than the {length} bytes of blob {} to export: give a larger device, or --length {device_bytes} or less",
                id_hex(blob.id())
            )));
        }
    }
    progress(Progress {
        done: 0,
        total: length,
    });
    let result = copy_out(store, blob, offset, length, &mut sink, progress).await;
    let finished = sink.finish(result.is_ok());
    result.and(finished)
}
