//! The whole-store target: patch a small store image, load it, open and read every blob.
//!
//! Input layout: `base u8` (which image, see [`bases`] and [`base_index`]), `flags u8`, then
//! patches until the end, each `page u16` (modulo the base's metadata pages: super block,
//! masks and md region), `offset u16` (modulo 4096), `len u8` and `len` bytes written there
//! (cut at the page's end). A patch of length 0 only marks its page as touched.
//!
//! Flags: bit 0 sets clean = 0 (forces recovery), bit 1 reseals the super block CRC (implied
//! by bits 0 and 3), bit 2 reseals every touched md page so the parsers get past the CRC,
//! bit 3 zeroes used_blobid_mask_len (a pre-v3 store: recovery on every load), bit 4 loads
//! asking for bstype "LVOLSTORE", bit 5 also writes one io_unit to every writable blob, bit 6
//! loads the store again after a successful unload (which must succeed with the same blobs),
//! bit 7 opens the blobs in reverse order.
//!
//! The case runs on a one-reactor [`Runtime`] shared by every case, with a timeout: a load,
//! open or read that never finishes is reported as a hang. A panic inside the reactor is
//! caught in the case's own task (or kills the reactor, which is then replaced) and reported
//! with the backtrace the panic hook captured there.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use spool_bdev::{Bdev, BdevDesc, DmaBuf, MallocBdev};
use spool_blob::format::md_page::MdPageHeader;
use spool_blob::format::super_block::{bstype_from_name, SuperBlock};
use spool_blob::format::{page_to_blobid, seal_page, PAGE_SIZE};
use spool_blob::{
    Blob, BlobChannel, BlobError, BlobOptions, Blobstore, ExtentForm, InitOptions, LoadOptions,
};
use spool_reactor::{IdleMode, ReactorError, Runtime, RuntimeOptions};

use crate::input::Input;
use crate::runner::{panic_message, take_reactor_panic};
use crate::targets::class;

/// Bytes of knobs in front of the patches.
pub const STORE_KNOBS: usize = 2;
/// Bytes of a patch header (page u16, offset u16, len u8).
pub const PATCH_HEADER: usize = 5;
/// Base selectors 0..SPOOL_BASES are images Spool makes; the next ones are the SPDK fixtures.
pub const SPOOL_BASES: usize = 4;
/// Bytes read from the start of each blob (then its last chunk): large thin blobs are not
/// read whole.
pub const READ_CAP_BYTES: u64 = 8 << 20;
/// Bytes per read request.
pub const READ_CHUNK_BYTES: u64 = 256 << 10;

/// A store image cases start from.
#[derive(Debug)]
pub struct Base {
    /// Where it came from.
    pub name: String,
    /// The whole device image (the fixtures' are borrowed from [`crate::corpus`]).
    pub image: Cow<'static, [u8]>,
    /// The device's block size.
    pub block_size: u32,
    /// Pages from the start of the device through the end of the md region.
    pub meta_pages: usize,
    /// First md page (device page number).
    pub md_start: usize,
    /// The metadata pages holding a non-zero byte, with the length up to their last one.
    pub used_pages: Vec<(usize, usize)>,
    /// Ids of the blobs whose root page is intact.
    pub blob_ids: Vec<u64>,
}

impl Base {
    fn new(
        name: impl Into<String>,
        image: Cow<'static, [u8]>,
        block_size: u32,
    ) -> Result<Base, String> {
        let name = name.into();
        let block = SuperBlock::decode(&image[..PAGE_SIZE.min(image.len())])
            .map_err(|err| format!("{name}: {err}"))?;
        let md_start = block.md_start as usize;
        let meta_pages = (md_start + block.md_len as usize).min(image.len() / PAGE_SIZE);
        let used_pages = (0..meta_pages)
            .filter_map(|page| {
                let bytes = &image[page * PAGE_SIZE..(page + 1) * PAGE_SIZE];
                bytes
                    .iter()
                    .rposition(|&b| b != 0)
                    .map(|last| (page, last + 1))
            })
            .collect();
        let blob_ids = (md_start..meta_pages)
            .filter_map(|page| {
                let header = MdPageHeader::decode(&image[page * PAGE_SIZE..(page + 1) * PAGE_SIZE]);
                let id = page_to_blobid((page - md_start) as u32);
                (header.crc_ok && header.sequence == 0 && header.id == id).then_some(id)
            })
            .collect();
        Ok(Base {
            name,
            image,
            block_size,
            meta_pages,
            md_start,
            used_pages,
            blob_ids,
        })
    }
}

static RUNTIME: Mutex<Option<Runtime>> = Mutex::new(None);
/// What the running store case is doing (named in a hang report).
static STAGE: Mutex<String> = Mutex::new(String::new());

fn stage(now: impl Into<String>) {
    *STAGE.lock().unwrap_or_else(PoisonError::into_inner) = now.into();
}
static BASES: OnceLock<Result<Vec<Base>, String>> = OnceLock::new();
static TIMEOUT_MS: AtomicU64 = AtomicU64::new(30_000);

/// Sets how long one store case may run before it is reported as a hang (default 30 s).
pub fn set_case_timeout(timeout: Duration) {
    TIMEOUT_MS.store(timeout.as_millis().max(1) as u64, Ordering::Relaxed);
}

/// The per-case timeout now in force.
pub fn case_timeout() -> Duration {
    Duration::from_millis(TIMEOUT_MS.load(Ordering::Relaxed))
}

/// The base images: the Spool-made ones (always), then the SPDK fixtures that were found
/// (see [`crate::corpus::fixture_images`]). Built once per process.
pub fn bases() -> Result<&'static [Base], String> {
    BASES
        .get_or_init(build_bases)
        .as_ref()
        .map(Vec::as_slice)
        .map_err(Clone::clone)
}

/// The base a selector byte names: `selector % 16`, falling back to the Spool-made bases when
/// no such fixture was found.
pub fn base_index(selector: u8, count: usize) -> usize {
    let index = usize::from(selector % 16);
    if index < count {
        index
    } else {
        index % SPOOL_BASES
    }
}

/// What went wrong with a case, beyond an ordinary `Err` from the store.
#[derive(Debug)]
pub enum Trouble {
    /// The case did not finish in time, and what it was doing.
    Hang(Duration, String),
    /// A panic on the reactor, with the report the hook captured.
    Panic(String),
    /// The runtime could not be started or reached.
    Runtime(String),
}

impl std::fmt::Display for Trouble {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Trouble::Hang(timeout, stage) => write!(
                f,
                "hang: the case did not finish within {timeout:?} (stuck in: {stage})"
            ),
            Trouble::Panic(report) => write!(f, "panic on the reactor: {report}"),
            Trouble::Runtime(err) => write!(f, "runtime: {err}"),
        }
    }
}

/// Polls the inner future inside `catch_unwind`, so a panic in the case's task is returned
/// instead of unwinding the reactor thread.
struct CatchUnwind<F> {
    inner: Pin<Box<F>>,
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, String>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.get_mut().inner.as_mut();
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Ready(value)) => Poll::Ready(Ok(value)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(payload) => Poll::Ready(Err(panic_message(payload.as_ref()))),
        }
    }
}

/// Runs a future on the shared reactor, with the case timeout.
pub fn run_on_reactor<F, Fut, T>(make: F) -> Result<T, Trouble>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
    T: Send + 'static,
{
    let timeout = case_timeout();
    let mut slot = RUNTIME.lock().unwrap_or_else(PoisonError::into_inner);
    if slot.is_none() {
        let runtime = Runtime::start(&RuntimeOptions {
            cores: vec![0],
            idle: IdleMode::Sleep,
            pin: false,
        })
        .map_err(|err| Trouble::Runtime(err.to_string()))?;
        *slot = Some(runtime);
    }
    let Some(runtime) = slot.as_ref() else {
        return Err(Trouble::Runtime("no runtime".into()));
    };
    let Some(&reactor) = runtime.reactors().first() else {
        return Err(Trouble::Runtime("a runtime without reactors".into()));
    };
    let _ = take_reactor_panic();
    stage("starting");
    let handle = match runtime.spawn_on(reactor, move || CatchUnwind {
        inner: Box::pin(make()),
    }) {
        Ok(handle) => handle,
        Err(err) => {
            drop(slot.take());
            return Err(Trouble::Runtime(err.to_string()));
        }
    };
    match handle.wait_timeout(timeout) {
        None => {
            // The reactor may be stuck for good: leak it rather than join it.
            std::mem::forget(slot.take());
            let stage = STAGE.lock().unwrap_or_else(PoisonError::into_inner).clone();
            Err(Trouble::Hang(timeout, stage))
        }
        Some(Ok(Ok(value))) => Ok(value),
        Some(Ok(Err(message))) => {
            // Caught in the case's task; start afresh anyway (state may be half-changed).
            drop(slot.take());
            Err(Trouble::Panic(take_reactor_panic().unwrap_or(message)))
        }
        Some(Err(ReactorError::Cancelled)) => {
            // A panic in another task killed the reactor thread.
            drop(slot.take());
            Err(Trouble::Panic(take_reactor_panic().unwrap_or_else(|| {
                "the reactor stopped (a task panicked outside the case's own task)".into()
            })))
        }
        Some(Err(err)) => {
            drop(slot.take());
            Err(Trouble::Runtime(err.to_string()))
        }
    }
}

fn build_bases() -> Result<Vec<Base>, String> {
    let mut bases = Vec::new();
    let (clean, dirty) = run_on_reactor(|| make_store(4 << 20, 4096, 64 << 10, None, true))
        .map_err(|err| format!("building a base image: {err}"))??;
    bases.push(Base::new("spool-4M-64K-clean", clean.into(), 4096)?);
    bases.push(Base::new("spool-4M-64K-dirty", dirty.into(), 4096)?);
    let (small, _) = run_on_reactor(|| make_store(8 << 20, 512, 16 << 10, Some(128), true))
        .map_err(|err| format!("building a base image: {err}"))??;
    bases.push(Base::new("spool-8M-16K-512B", small.into(), 512)?);
    let (empty, _) = run_on_reactor(|| make_store(1 << 20, 4096, 64 << 10, None, false))
        .map_err(|err| format!("building a base image: {err}"))??;
    bases.push(Base::new("spool-1M-empty", empty.into(), 4096)?);
    for (name, image) in crate::corpus::fixture_images() {
        bases.push(Base::new(
            name.clone(),
            Cow::Borrowed(image.as_slice()),
            4096,
        )?);
    }
    Ok(bases)
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64 * 31 + seed) % 251) as u8)
        .collect()
}

async fn write_at(store: &Blobstore, blob: &Blob, unit: u64, seed: u64) -> Result<(), BlobError> {
    let size = store.io_unit_size() as usize * 2;
    let mut buf = DmaBuf::alloc(size)?;
    buf.copy_from_slice(&pattern(seed, size));
    let channel = store.channel()?;
    let (result, _) = channel.write(&blob.io(), unit, buf).await;
    result
}

/// Makes a store on a malloc bdev and returns its image after a clean unload, and the image
/// as it was before the unload (dirty: clean = 0, masks not written). With `blobs`, it holds
/// thick and thin blobs in both extent forms, xattrs over several pages, a clone of a thin
/// "snapshot" (SNAP xattr), a blob larger than one extent page, an empty blob and a super
/// blob. The snapshot carries an internal xattr "SNAQ" naming its clone: one bit away from
/// a parent cycle.
async fn make_store(
    bytes: u64,
    block_size: u32,
    cluster_size: u64,
    md_pages: Option<u32>,
    blobs: bool,
) -> Result<(Vec<u8>, Vec<u8>), String> {
    let fail = |what: &str, err: &dyn std::fmt::Display| format!("{what}: {err}");
    let bdev = Arc::new(
        MallocBdev::new("fuzz-base", block_size, bytes / u64::from(block_size))
            .map_err(|err| fail("malloc bdev", &err))?,
    );
    let desc = BdevDesc::open(Arc::clone(&bdev) as Arc<dyn Bdev>)
        .map_err(|err| fail("bdev open", &err))?;
    let store = Blobstore::init(
        desc,
        &InitOptions {
            cluster_size,
            md_pages,
            ..InitOptions::default()
        },
    )
    .await
    .map_err(|err| fail("init", &err))?;
    if blobs {
        populate(&store)
            .await
            .map_err(|err| fail("populate", &err))?;
    }
    let dirty = bdev.snapshot();
    store.unload().await.map_err(|err| fail("unload", &err))?;
    Ok((bdev.snapshot(), dirty))
}

async fn populate(store: &Blobstore) -> Result<(), BlobError> {
    let units_per_cluster = store.cluster_size() / store.io_unit_size();
    let create = |clusters: u64, thin: bool, form: ExtentForm| BlobOptions {
        num_clusters: clusters,
        thin,
        form,
        ..BlobOptions::default()
    };
    // A thick run-length blob with data and an xattr.
    let rle = store
        .create_blob(&BlobOptions {
            xattrs: vec![("name".into(), b"rle\0".to_vec())],
            ..create(3, false, ExtentForm::Rle)
        })
        .await?;
    let blob = store.open_blob(rle).await?;
    write_at(store, &blob, units_per_cluster + 3, 1).await?;
    blob.close().await?;
    // A thick extent-table blob with a public and an internal xattr.
    store
        .create_blob(&BlobOptions {
            xattrs: vec![("color".into(), b"blue".to_vec())],
            internal_xattrs: vec![("tag".into(), 7u64.to_le_bytes().to_vec())],
            ..create(4, false, ExtentForm::Table)
        })
        .await?;
    // A thin "snapshot" with data, and its thin clone.
    let snap = store
        .create_blob(&create(8, true, ExtentForm::Table))
        .await?;
    let blob = store.open_blob(snap).await?;
    write_at(store, &blob, 0, 2).await?;
    write_at(store, &blob, 5 * units_per_cluster + 1, 3).await?;
    blob.close().await?;
    let clone = store
        .create_blob(&BlobOptions {
            internal_xattrs: vec![("SNAP".into(), snap.to_le_bytes().to_vec())],
            ..create(8, true, ExtentForm::Rle)
        })
        .await?;
    let blob = store.open_blob(clone).await?;
    write_at(store, &blob, units_per_cluster, 4).await?;
    blob.close().await?;
    let blob = store.open_blob(snap).await?;
    blob.set_internal_xattr("SNAQ", &clone.to_le_bytes())?;
    blob.set_read_only()?;
    blob.close().await?;
    // Xattrs over several md pages.
    store
        .create_blob(&BlobOptions {
            xattrs: (0..30)
                .map(|i| (format!("xattr_{i:02}"), vec![b'a' + i as u8 % 26; 150]))
                .collect(),
            ..create(1, false, ExtentForm::Rle)
        })
        .await?;
    // A thin blob over two extent pages, written in both.
    let big = store
        .create_blob(&create(600, true, ExtentForm::Table))
        .await?;
    let blob = store.open_blob(big).await?;
    write_at(store, &blob, 0, 5).await?;
    write_at(store, &blob, 550 * units_per_cluster, 6).await?;
    blob.close().await?;
    // An empty blob, and the super blob.
    store
        .create_blob(&create(0, false, ExtentForm::Table))
        .await?;
    store.set_super(rle).await?;
    Ok(())
}

/// Knobs of a store case.
#[derive(Debug, Clone, Copy, Default)]
struct Knobs {
    lvs: bool,
    write: bool,
    reload: bool,
    reverse: bool,
}

/// A case's image: which base, the flags, and the pages that differ from the base (page
/// number and its new 4096 bytes).
#[derive(Debug, Clone)]
pub struct Patched {
    /// Index in [`bases`].
    pub base: usize,
    /// The flag byte.
    pub flags: u8,
    /// The changed pages, by device page number.
    pub pages: BTreeMap<usize, Vec<u8>>,
}

impl Patched {
    /// The whole patched image (to write a reproducer out as a device image).
    pub fn image(&self) -> Result<Vec<u8>, String> {
        let mut image = bases()?[self.base].image.to_vec();
        for (&page, bytes) in &self.pages {
            image[page * PAGE_SIZE..(page + 1) * PAGE_SIZE].copy_from_slice(bytes);
        }
        Ok(image)
    }
}

/// Applies the input's patches and flags to its base, keeping only the changed pages.
pub fn patch(data: &[u8]) -> Result<Patched, String> {
    let bases = bases()?;
    let mut input = Input::new(data);
    let index = base_index(input.u8(), bases.len());
    let base = &bases[index];
    let flags = input.u8();
    let mut pages: BTreeMap<usize, Vec<u8>> = BTreeMap::new();
    fn page_of<'a>(
        pages: &'a mut BTreeMap<usize, Vec<u8>>,
        base: &Base,
        page: usize,
    ) -> &'a mut Vec<u8> {
        pages
            .entry(page)
            .or_insert_with(|| base.image[page * PAGE_SIZE..(page + 1) * PAGE_SIZE].to_vec())
    }
    while !input.is_empty() {
        let page = usize::from(input.u16()) % base.meta_pages.max(1);
        let offset = usize::from(input.u16()) % PAGE_SIZE;
        let len = usize::from(input.u8());
        let bytes = input.take(len);
        let bytes = &bytes[..bytes.len().min(PAGE_SIZE - offset)];
        page_of(&mut pages, base, page)[offset..offset + bytes.len()].copy_from_slice(bytes);
    }
    if flags & 4 != 0 {
        for (&page, bytes) in pages.iter_mut() {
            if page >= base.md_start {
                seal_page(bytes);
            }
        }
    }
    if flags & 1 != 0 {
        page_of(&mut pages, base, 0)[16..20].copy_from_slice(&0u32.to_le_bytes());
    }
    if flags & 8 != 0 {
        page_of(&mut pages, base, 0)[76..80].copy_from_slice(&0u32.to_le_bytes());
    }
    if flags & 0b1011 != 0 {
        seal_page(page_of(&mut pages, base, 0));
    }
    Ok(Patched {
        base: index,
        flags,
        pages,
    })
}

/// Loads the patched image, opens and reads every blob, unloads. Panics (with the reactor's
/// report) on a panic, a hang or a broken invariant; `Err`s from the store are fine.
pub fn target_store_load(data: &[u8]) {
    let _ = store_load(data);
}

/// [`target_store_load`], returning the outcome class.
pub fn store_load(data: &[u8]) -> String {
    let patched = match patch(data) {
        Ok(patched) => patched,
        Err(err) => panic!("no base images: {err}"),
    };
    let flags = patched.flags;
    let knobs = Knobs {
        lvs: flags & 0x10 != 0,
        write: flags & 0x20 != 0,
        reload: flags & 0x40 != 0,
        reverse: flags & 0x80 != 0,
    };
    match run_on_reactor(move || exercise(patched, knobs)) {
        Ok(outcome) => outcome,
        Err(trouble) => panic!("{trouble}"),
    }
}

/// A malloc bdev holding the patched image (the base copied once, changed pages written
/// through a channel).
async fn device(patched: &Patched) -> Result<BdevDesc, String> {
    let bases = bases()?;
    let base = &bases[patched.base];
    let bdev = MallocBdev::from_image("fuzz", base.block_size, &base.image)
        .map_err(|err| class("bdev", err))?;
    let desc = BdevDesc::open(Arc::new(bdev) as Arc<dyn Bdev>).map_err(|err| class("bdev", err))?;
    let channel = desc.channel().map_err(|err| class("bdev", err))?;
    for (&page, bytes) in &patched.pages {
        let mut buf = DmaBuf::alloc(PAGE_SIZE).map_err(|err| class("dma", err))?;
        buf.copy_from_slice(bytes);
        let (result, _) = channel.write(buf, (page * PAGE_SIZE) as u64).await;
        result.map_err(|err| class("bdev write", err))?;
    }
    Ok(desc)
}

async fn exercise(patched: Patched, knobs: Knobs) -> String {
    let desc = match device(&patched).await {
        Ok(desc) => desc,
        Err(err) => return err,
    };
    let options = LoadOptions {
        bstype: if knobs.lvs {
            bstype_from_name("LVOLSTORE").unwrap_or_default()
        } else {
            [0; 16]
        },
        ..LoadOptions::default()
    };
    stage("Blobstore::load");
    let (store, report) = match Blobstore::load(desc.clone(), &options).await {
        Ok(loaded) => loaded,
        Err(err) => return class("load", err),
    };
    let mut outcome = format!(
        "load ok: recovered={} blobs={} unreadable={}",
        report.recovered,
        report.blobs.min(3),
        report.unreadable.len().min(2)
    );
    // Each kind of open/read/write/close error once, in a stable order.
    let mut later = std::collections::BTreeSet::new();
    let mut ids = store.blob_ids();
    if knobs.reverse {
        ids.reverse();
    }
    if let Ok(id) = store.get_super() {
        ids.push(id);
    }
    // Ids that are no blob: past the md region, without the high bit.
    ids.push((1 << 32) | u64::from(store.geometry().md_len));
    ids.push(7);
    for id in ids {
        stage(format!("open_blob({id:#x})"));
        let blob = match store.open_blob(id).await {
            Ok(blob) => blob,
            Err(err) => {
                later.insert(class("open", err));
                continue;
            }
        };
        let _ = (
            blob.xattr_names(),
            blob.internal_xattrs(),
            blob.cluster_map(),
        );
        stage(format!("reading blob {id:#x}"));
        if let Err(err) = read_blob(&store, &blob).await {
            later.insert(class("read", err));
        }
        if knobs.write && !blob.is_data_read_only() && blob.io().num_io_units() > 0 {
            stage(format!("writing blob {id:#x}"));
            if let Err(err) = write_at(&store, &blob, 0, 9).await {
                later.insert(class("write", err));
            }
        }
        stage(format!("closing blob {id:#x}"));
        if let Err(err) = blob.close().await {
            later.insert(class("close", err));
        }
    }
    for class in &later {
        outcome.push_str("; ");
        outcome.push_str(class);
    }
    let blobs_before = store.blob_ids();
    stage("unload");
    if let Err(err) = store.unload().await {
        outcome.push_str(&class("; unload", err));
        return outcome;
    }
    if knobs.reload {
        stage("the second Blobstore::load");
        match Blobstore::load(desc, &options).await {
            Ok((again, _)) => {
                assert_eq!(
                    again.blob_ids(),
                    blobs_before,
                    "a store that loaded and unloaded reloads with other blobs"
                );
                if let Err(err) = again.unload().await {
                    outcome.push_str(&class("; second unload", err));
                }
            }
            Err(err) => {
                panic!("a store that loaded and unloaded cleanly does not load again: {err}")
            }
        }
    }
    outcome
}

/// Reads a blob in chunks up to [`READ_CAP_BYTES`], then its last chunk, then one io_unit
/// past its end (which must be refused).
async fn read_blob(store: &Blobstore, blob: &Blob) -> Result<(), BlobError> {
    let channel: BlobChannel = store.channel()?;
    let io = blob.io();
    let unit = store.io_unit_size().max(1);
    let total = io.num_io_units();
    let chunk = (READ_CHUNK_BYTES / unit).max(1);
    let cap = READ_CAP_BYTES / unit;
    let mut ranges = Vec::new();
    let mut at = 0;
    while at < total.min(cap) {
        let len = chunk.min(total - at);
        ranges.push((at, len));
        at += len;
    }
    if total > cap {
        let len = chunk.min(total);
        ranges.push((total - len, len));
    }
    for (offset, len) in ranges {
        let buf = DmaBuf::alloc((len * unit) as usize)?;
        let (result, _) = channel.read(&io, offset, buf).await;
        result?;
    }
    let (result, _) = channel
        .read(&io, total, DmaBuf::alloc(unit as usize)?)
        .await;
    assert!(
        result.is_err(),
        "a read past the end of blob {:#x} ({total} io_units) was accepted",
        blob.id()
    );
    Ok(())
}
