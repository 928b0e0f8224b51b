//! `spool import` and `spool export`: a file into a blob and back, through the engine (the
//! blob channel over the image's io_uring bdev), in 1 MiB chunks with several in flight.
//!
//! Offsets are in bytes and must be multiples of the store's io_unit. An import whose file
//! does not end on an io_unit boundary reads the blob's last io_unit first and writes it
//! back with the file's tail over it (read-modify-write); an export of such a length reads
//! whole io_units and writes only the bytes asked for.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use indicatif::ProgressBar;
use spool_bdev::DmaBuf;
use spool_blob::{Blob, BlobChannel, BlobIo, Blobstore};
use spool_engine::signals::stop_requested;
use spool_reactor::{spawn_local, JoinHandle};

use crate::blob_cmd::args::{ExportArgs, ImportArgs};
use crate::blob_cmd::on_store;
use crate::blob_cmd::progress::bytes_bar;
use crate::blob_cmd::resolve::{resolve_blob, with_blob};
use crate::blob_cmd::text::id_hex;
use crate::error::ToolError;

/// Bytes per request.
const CHUNK_BYTES: u64 = 1 << 20;
/// Requests in flight.
const DEPTH: usize = 4;

/// Requests in flight, oldest first; the first error wins and later ones are drained.
struct Window<T: 'static> {
    in_flight: VecDeque<JoinHandle<Result<T, ToolError>>>,
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

    fn push(&mut self, task: impl std::future::Future<Output = Result<T, ToolError>> + 'static) {
        self.in_flight.push_back(spawn_local(task));
    }

    /// The oldest request's result, or `None` when none is in flight.
    async fn pop(&mut self) -> Option<Result<T, ToolError>> {
        let handle = self.in_flight.pop_front()?;
        Some(
            handle
                .await
                .map_err(ToolError::from)
                .and_then(|result| result),
        )
    }

    /// Waits for every request left (after a failure: nothing may outlive the blob's close).
    async fn drain(&mut self) {
        while self.pop().await.is_some() {}
    }
}

fn check_offset(offset: u64, unit: u64) -> Result<(), ToolError> {
    if offset.is_multiple_of(unit) {
        Ok(())
    } else {
        Err(ToolError::Failed(format!(
            "--offset {offset} is not a multiple of the store's {unit}-byte io_unit"
        )))
    }
}

fn dma(len: u64) -> Result<DmaBuf, ToolError> {
    let len = usize::try_from(len)
        .map_err(|_| ToolError::Failed(format!("a {len}-byte buffer does not fit memory")))?;
    Ok(DmaBuf::alloc(len)?)
}

/// What one import needs on the reactor.
struct ImportJob {
    file: File,
    name: String,
    len: u64,
    offset: u64,
}

/// Fills the buffer for file bytes `[pos, pos + take)` going to blob byte `at`: the blob's
/// last io_unit first when `take` ends inside one, then the file's bytes.
async fn fill_chunk(
    channel: &BlobChannel,
    io: &BlobIo,
    job: &ImportJob,
    pos: u64,
    take: u64,
    unit: u64,
) -> Result<DmaBuf, ToolError> {
    let at = job.offset + pos;
    let padded = take.next_multiple_of(unit);
    let mut buf = dma(padded)?;
    if padded != take {
        let (result, tail) = channel
            .read(io, (at + padded - unit) / unit, dma(unit)?)
            .await;
        result?;
        buf[(padded - unit) as usize..].copy_from_slice(&tail);
    }
    job.file
        .read_exact_at(&mut buf[..take as usize], pos)
        .map_err(|err| ToolError::Failed(format!("{}: read at byte {pos}: {err}", job.name)))?;
    Ok(buf)
}

async fn write_file(store: &Blobstore, blob: &Blob, job: &ImportJob) -> Result<(), ToolError> {
    let unit = store.io_unit_size();
    check_offset(job.offset, unit)?;
    let size = blob.size_bytes();
    if job.offset > size || job.len > size - job.offset {
        return Err(ToolError::Failed(format!(
            "{} ({} bytes) at offset {} reaches past the end of blob {} ({size} bytes)",
            job.name,
            job.len,
            job.offset,
            id_hex(blob.id())
        )));
    }
    let channel = store.channel()?;
    let io = blob.io();
    let bar = bytes_bar(job.len, "import");
    let mut window = Window::new();
    let mut pos = 0;
    let mut failure = None;
    let mut stopped = None;
    while pos < job.len && failure.is_none() {
        // A stop signal ends the copy at a chunk boundary; what is in flight finishes.
        if let Some(signal) = stop_requested() {
            stopped = Some(signal);
            break;
        }
        let take = CHUNK_BYTES.min(job.len - pos);
        match fill_chunk(&channel, &io, job, pos, take, unit).await {
            Ok(buf) => {
                let (channel, io, bar) = (channel.clone(), Arc::clone(&io), bar.clone());
                let at = (job.offset + pos) / unit;
                window.push(async move {
                    channel.write(&io, at, buf).await.0?;
                    bar.inc(take);
                    Ok(())
                });
            }
            Err(err) => failure = Some(err),
        }
        if window.is_full() {
            if let Some(Err(err)) = window.pop().await {
                failure = Some(err);
            }
        }
        pos += take;
    }
    while let Some(result) = window.pop().await {
        if let (Err(err), None) = (result, &failure) {
            failure = Some(err);
        }
    }
    bar.finish_and_clear();
    if let Some(err) = failure {
        return Err(err);
    }
    match stopped {
        Some(signal) => Err(ToolError::Interrupted {
            signal,
            done: format!(
                "{pos} of {} bytes of {} written to blob {}",
                job.len,
                job.name,
                id_hex(blob.id())
            ),
            report: None,
        }),
        None => Ok(()),
    }
}

/// `spool import IMAGE BLOB FILE [--offset BYTES]`.
pub fn import(args: &ImportArgs) -> Result<(), ToolError> {
    let name = args.file.clone();
    let file = File::open(&name).map_err(|err| ToolError::Failed(format!("{name}: {err}")))?;
    let meta = file
        .metadata()
        .map_err(|err| ToolError::Failed(format!("{name}: {err}")))?;
    if !meta.is_file() {
        return Err(ToolError::Failed(format!(
            "{name}: not a regular file (import reads a file of known length)"
        )));
    }
    let job = ImportJob {
        file,
        name,
        len: meta.len(),
        offset: args.offset,
    };
    let text = args.blob.clone();
    on_store(&args.image, move |store, _| async move {
        let id = resolve_blob(&store, &text).await?;
        with_blob(&store, id, async |blob| {
            write_file(&store, blob, &job).await
        })
        .await
    })
}

/// Where an export writes.
enum Sink {
    Stdout,
    File { file: File, name: String },
}

impl Sink {
    fn open(name: &str) -> Result<Sink, ToolError> {
        if name == "-" {
            return Ok(Sink::Stdout);
        }
        let file = File::create(name).map_err(|err| ToolError::Failed(format!("{name}: {err}")))?;
        Ok(Sink::File {
            file,
            name: name.to_string(),
        })
    }

    /// Writes `bytes`; false when stdout's reader went away (stop quietly).
    fn write(&mut self, bytes: &[u8]) -> Result<bool, ToolError> {
        match self {
            Sink::Stdout => match std::io::stdout().lock().write_all(bytes) {
                Ok(()) => Ok(true),
                Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
                Err(err) => Err(ToolError::Failed(format!("stdout: {err}"))),
            },
            Sink::File { file, name } => file
                .write_all(bytes)
                .map(|()| true)
                .map_err(|err| ToolError::Failed(format!("{name}: write: {err}"))),
        }
    }

    fn finish(self, ok: bool) -> Result<(), ToolError> {
        match self {
            Sink::Stdout => {
                let _ = std::io::stdout().lock().flush();
                Ok(())
            }
            Sink::File { file, name } => {
                drop(file);
                if !ok {
                    // A partial copy is worse than none.
                    let _ = std::fs::remove_file(&name);
                }
                Ok(())
            }
        }
    }
}

/// What one export needs on the reactor.
struct ExportJob {
    name: String,
    offset: u64,
    length: Option<u64>,
}

async fn read_range(
    channel: BlobChannel,
    io: Arc<BlobIo>,
    at: u64,
    padded: u64,
) -> Result<DmaBuf, ToolError> {
    let (result, buf) = channel.read(&io, at, dma(padded)?).await;
    result?;
    Ok(buf)
}

async fn copy_out(
    store: &Blobstore,
    blob: &Blob,
    job: &ExportJob,
    sink: &mut Sink,
    bar: &ProgressBar,
) -> Result<(), ToolError> {
    let unit = store.io_unit_size();
    let channel = store.channel()?;
    let io = blob.io();
    let length = job.length.unwrap_or(blob.size_bytes() - job.offset);
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
            let at = (job.offset + submitted) / unit;
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
                open = sink.write(&buf[..take as usize])?;
                bar.inc(take);
                copied += take;
            }
            Some(Err(err)) => failure = Some(err),
            None => {}
        }
    }
    window.drain().await;
    if let Some(err) = failure {
        return Err(err);
    }
    match stopped {
        Some(signal) if copied < length => Err(ToolError::Interrupted {
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

async fn read_to_sink(store: &Blobstore, blob: &Blob, job: &ExportJob) -> Result<(), ToolError> {
    let unit = store.io_unit_size();
    check_offset(job.offset, unit)?;
    let size = blob.size_bytes();
    if job.offset > size {
        return Err(ToolError::Failed(format!(
            "--offset {} is past the end of blob {} ({size} bytes)",
            job.offset,
            id_hex(blob.id())
        )));
    }
    if let Some(length) = job.length {
        if length > size - job.offset {
            return Err(ToolError::Failed(format!(
                "{length} bytes at offset {} reach past the end of blob {} ({size} bytes)",
                job.offset,
                id_hex(blob.id())
            )));
        }
    }
    let mut sink = Sink::open(&job.name)?;
    let bar = bytes_bar(job.length.unwrap_or(size - job.offset), "export");
    let result = copy_out(store, blob, job, &mut sink, &bar).await;
    bar.finish_and_clear();
    sink.finish(result.is_ok())?;
    result
}

fn same_file(a: &str, b: &str) -> bool {
    match (Path::new(a).canonicalize(), Path::new(b).canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// `spool export IMAGE BLOB FILE [--offset BYTES] [--length BYTES]`.
pub fn export(args: &ExportArgs) -> Result<(), ToolError> {
    if same_file(&args.file, &args.image) {
        return Err(ToolError::Failed(format!(
            "{}: is the image itself; export to another file",
            args.file
        )));
    }
    let job = ExportJob {
        name: args.file.clone(),
        offset: args.offset,
        length: args.length,
    };
    let text = args.blob.clone();
    on_store(&args.image, move |store, _| async move {
        let id = resolve_blob(&store, &text).await?;
        with_blob(&store, id, async |blob| {
            read_to_sink(&store, blob, &job).await
        })
        .await
    })
}
