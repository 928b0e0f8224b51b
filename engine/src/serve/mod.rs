//! The daemon: `spool serve`. Opens a store (loading and, if it was not unloaded cleanly,
//! recovering it; or creating the embedded default), starts reactors on the chosen cores,
//! exports the store's volumes over NBD on TCP and Unix sockets, and on a stop drains and
//! unloads the store cleanly.
//!
//! Where things run:
//! - the *metadata reactor* (the first core's) owns the store and the open blobs, as the blob
//!   layer requires; thin volumes' first writes send it their cluster inserts;
//! - the listeners accept on the first reactor and hand connections round the reactors;
//! - each connection lives on one reactor: its socket, its requests and their blob I/O
//!   through that reactor's blob channel (see `connection` and `execute`).
//!
//! Stopping ([`Daemon::stop`], or SIGINT/SIGTERM with [`run_until_signal`]): the listeners
//! close; every connection finishes and answers the requests it has started, answers new
//! ones with `ESHUTDOWN`, and closes once idle (after a short grace for the client's
//! `NBD_CMD_DISC`); then the per-reactor state goes, the blobs close and the store unloads
//! with its clean flag set. A kill -9 instead leaves the store dirty: the next start recovers
//! it.
//!
//! Table of contents:
//! - `shared`, `local`: daemon-wide counters; each reactor's exports, channel, buffers and
//!   stop notice.
//! - `volumes`: which blobs are exported under which names; the store held on the metadata
//!   reactor.
//! - `listen`: accept loops. `connection`: one client. `execute`: one request.
//! - `buffers`: the per-reactor DMA buffer cache. `race`: first of two futures.
//! - [`inproc`]: the NBD front end with no socket (bytes in, bytes out), for the simulation.

mod buffers;
mod connection;
mod execute;
pub mod inproc;
pub(crate) mod iostat;
mod listen;
pub(crate) mod local;
pub(crate) mod race;
pub(crate) mod shared;
pub(crate) mod volumes;
mod write_gate;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use spool_bdev::{Bdev, BdevDesc};
use spool_blob::{Blobstore, InitOptions, LoadOptions, LoadReport};
use spool_reactor::{IdleMode, ReactorId, Runtime, RuntimeOptions};

use crate::lock::ImageLock;
use crate::nbd::HandshakeOptions;
use crate::net::{ListenAddr, Listener};
use crate::target::{open_image, open_image_as, TargetOptions, TargetSpec};
use crate::EngineError;

pub use iostat::IoStat;
pub use volumes::{ExportSummary, NAME_XATTR};

use local::ReactorServe;
use shared::DaemonShared;

/// The embedded default's image, made in the working directory on first use.
pub const DEFAULT_IMAGE: &str = "spool.img";
/// The embedded default's size (a sparse file: it takes disk space only as it is written).
pub const DEFAULT_IMAGE_BYTES: u64 = 1 << 30;
/// The embedded default's lvol store.
pub const DEFAULT_LVS: &str = "lvs0";
/// The embedded default's one volume: thin, as large as the store's data clusters.
pub const DEFAULT_VOLUME: &str = "vol0";
/// Where `spool serve` takes JSON-RPC calls unless told otherwise (SPDK's default is
/// /var/tmp/spdk.sock).
pub const DEFAULT_RPC_SOCKET: &str = "/var/tmp/spool.sock";
/// The NBD port (IANA), on loopback unless told otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:10809";

/// How to run the daemon.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The store: a file or block device holding one, `malloc:SIZE` (a fresh store in RAM,
    /// with one thin volume `vol0`), or `None` for the embedded default ([`DEFAULT_IMAGE`]
    /// in the working directory, created on first use).
    pub image: Option<String>,
    /// Where to listen (TCP addresses and Unix socket paths).
    pub listen: Vec<ListenAddr>,
    /// Cores to run reactors on; the first one's reactor is the metadata reactor and runs
    /// the listeners. Connections are spread over all of them.
    pub cores: Vec<usize>,
    /// Export only these volumes (by export name or blob id); empty: every volume.
    pub exports: Vec<String>,
    /// Connections open at once at most; more are closed at accept.
    pub max_connections: usize,
    /// What reactors do when idle: spin (a core each), or sleep in the kernel after a short
    /// spin (`Adaptive`, the default) or at once (`Interrupt`).
    pub idle: IdleMode,
    /// Pin each reactor to its core.
    pub pin: bool,
    /// How long a client may take to finish its handshake.
    pub handshake_timeout: Duration,
    /// After a stop, how long an idle connection stays open for the client's
    /// `NBD_CMD_DISC` (and a handshake in progress for its next option).
    pub shutdown_grace: Duration,
    /// After a stop, how long to wait for every connection to close before unloading
    /// anyway.
    pub drain_timeout: Duration,
    /// The io_uring bdev's settings for a file or block device.
    pub target: TargetOptions,
    /// The JSON-RPC socket (a Unix socket, mode 0600), or none.
    pub rpc: Option<PathBuf>,
}

impl Default for ServeOptions {
    fn default() -> ServeOptions {
        ServeOptions {
            image: None,
            listen: Vec::new(),
            cores: vec![0],
            exports: Vec::new(),
            max_connections: 64,
            // A daemon shares its machine: spin only while there is work (see IdleMode).
            idle: IdleMode::Adaptive,
            pin: true,
            handshake_timeout: Duration::from_secs(crate::nbd::limits::HANDSHAKE_TIMEOUT_SECS),
            shutdown_grace: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(30),
            target: TargetOptions::default(),
            rpc: None,
        }
    }
}

/// What the start found.
#[derive(Debug, Clone)]
pub struct StartInfo {
    /// The store as named (a path, or `malloc:SIZE`).
    pub image: String,
    /// The store was created by this start (the embedded default's first use, or malloc).
    pub created: bool,
    /// What the load found and did (`None` when created).
    pub load_report: Option<LoadReport>,
}

/// What a stop did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopSummary {
    /// Connections accepted since start.
    pub connections: u64,
    /// Connections refused at accept (`--max-connections`).
    pub refused: u64,
    /// Connections still open when the drain timed out (0 on a clean stop).
    pub abandoned: usize,
}

/// A running daemon. Dropping it stops it (as [`Daemon::stop`], errors logged).
pub struct Daemon {
    runtime: Option<Runtime>,
    metadata_reactor: ReactorId,
    shared: Arc<DaemonShared>,
    listening: Vec<ListenAddr>,
    exports: Vec<ExportSummary>,
    start: StartInfo,
    drain_timeout: Duration,
    rpc: Option<PathBuf>,
    bdev: Option<Arc<dyn Bdev>>,
    lock: Option<ImageLock>,
}

/// How `start` holds the image while the daemon starts.
enum Lock {
    /// A new image under its temporary name, published once its store is made.
    Staged(crate::lock::StagedImage),
    /// An image at its final path, locked exclusively.
    Held(ImageLock),
    /// No file (a malloc store).
    None,
}

/// Where the store comes from.
enum Source {
    /// An existing image: load it.
    Load(PathBuf),
    /// The default image, new: made sparse, then initialised with `vol0`.
    CreateDefault(PathBuf),
    /// A fresh store in RAM with `vol0`.
    Malloc(u64),
}

fn source_of(image: Option<&str>) -> Result<Source, EngineError> {
    let Some(image) = image else {
        let path = PathBuf::from(DEFAULT_IMAGE);
        return Ok(if path.exists() {
            Source::Load(path)
        } else {
            Source::CreateDefault(path)
        });
    };
    match TargetSpec::parse(image)? {
        TargetSpec::Null => Err(EngineError::InvalidArgument(
            "null cannot hold a store: give a file, a block device or malloc:SIZE".into(),
        )),
        TargetSpec::Malloc(bytes) => Ok(Source::Malloc(bytes)),
        TargetSpec::Path(path) => {
            crate::offline::check_image_exists(&path).map_err(|err| match err {
                EngineError::File { path, reason, errno } => EngineError::File {
                    path,
                    reason: format!(
                        "{reason} (run `spool serve` with no IMAGE for the embedded default, or make a store with `spool init`)"
                    ),
                    errno,
                },
                other => other,
            })?;
            Ok(Source::Load(path))
        }
    }
}

/// The default listening address.
pub fn default_listen() -> ListenAddr {
    ListenAddr::Tcp(
        DEFAULT_LISTEN
            .parse()
            .unwrap_or_else(|_| std::net::SocketAddr::from(([127, 0, 0, 1], 10809))),
    )
}

impl Daemon {
    /// Opens the store, starts the reactors, exports the volumes and listens; returns once
    /// clients can connect.
    pub fn start(options: &ServeOptions) -> Result<Daemon, EngineError> {
        if options.cores.is_empty() {
            return Err(EngineError::InvalidArgument("no cores to run on".into()));
        }
        if options.max_connections == 0 {
            return Err(EngineError::InvalidArgument(
                "--max-connections must be at least 1".into(),
            ));
        }
        let listen = if options.listen.is_empty() {
            vec![default_listen()]
        } else {
            options.listen.clone()
        };
        let source = source_of(options.image.as_deref())?;
        let (bdev, lock, image, created_path) = match &source {
            Source::Load(path) => {
                let lock = ImageLock::exclusive(path)?;
                let mut target = options.target.clone();
                if let Some(io_unit) = crate::offline::store_io_unit(path) {
                    target.block_size = io_unit;
                }
                // The daemon writes the image: one it cannot write is said as every writer
                // says it, with what to do.
                let (bdev, _) = open_image(path, &target)
                    .map_err(|err| crate::offline::unwritable(path, err))?;
                (bdev, Lock::Held(lock), path.display().to_string(), None)
            }
            Source::CreateDefault(path) => {
                // Formatted under a temporary name and published only once the store and
                // `vol0` are on it: a start killed half-way never leaves a `spool.img` that
                // is not a store (the next start would refuse it).
                let staged = ImageLock::stage_sparse(path, DEFAULT_IMAGE_BYTES)?;
                let (bdev, _) = open_image_as(staged.temp_path(), path, &options.target)?;
                (
                    bdev,
                    Lock::Staged(staged),
                    path.display().to_string(),
                    Some(path.clone()),
                )
            }
            Source::Malloc(bytes) => {
                let block = u64::from(options.target.block_size);
                if bytes % block != 0 || *bytes == 0 {
                    return Err(EngineError::InvalidArgument(format!(
                        "malloc size {bytes} is not a positive multiple of the block size {block}"
                    )));
                }
                let bdev: Arc<dyn Bdev> = Arc::new(crate::target::malloc_bdev(
                    *bytes,
                    options.target.block_size,
                )?);
                (bdev, Lock::None, format!("malloc:{bytes}"), None)
            }
        };
        let mut lock = lock;
        let started = Self::start_on(options, &source, listen, Arc::clone(&bdev), image, || {
            // Only a staged image changes hands; a held lock stays where it is (taking it
            // out would drop it, and with it the flock other writers are refused by).
            if matches!(lock, Lock::Staged(_)) {
                if let Lock::Staged(staged) = std::mem::replace(&mut lock, Lock::None) {
                    lock = Lock::Held(staged.publish()?);
                }
            }
            Ok(())
        });
        match started {
            Ok(mut daemon) => {
                daemon.bdev = Some(bdev);
                daemon.lock = match lock {
                    Lock::Held(held) => Some(held),
                    Lock::Staged(_) | Lock::None => None,
                };
                Ok(daemon)
            }
            Err(err) => {
                drop(bdev);
                if let (Some(path), Lock::Held(_)) = (created_path, &lock) {
                    // Nothing half-made is left: removed while the lock is still held.
                    let _ = std::fs::remove_file(path);
                }
                // An image still staged removes its temporary file as it drops.
                drop(lock);
                Err(err)
            }
        }
    }

    fn start_on(
        options: &ServeOptions,
        source: &Source,
        listen: Vec<ListenAddr>,
        bdev: Arc<dyn Bdev>,
        image: String,
        publish: impl FnOnce() -> Result<(), EngineError>,
    ) -> Result<Daemon, EngineError> {
        let desc = BdevDesc::open(bdev)?;
        let runtime = Runtime::start(&RuntimeOptions {
            cores: options.cores.clone(),
            idle: options.idle,
            pin: options.pin,
        })?;
        let reactors = runtime.reactors();
        let metadata_reactor = reactors[0];
        let create = !matches!(source, Source::Load(_));
        let wanted = options.exports.clone();
        let opened = runtime.block_on(metadata_reactor, move || async move {
            let (store, report) = if create {
                // The embedded default is an lvol store (lvs0) with one thin lvol (vol0),
                // so SPDK's bdev_lvol_* calls work on it as made.
                let store = Blobstore::init(desc.clone(), &InitOptions::default()).await?;
                let lvs = spool_blob::LvolStore::format(store.clone(), DEFAULT_LVS).await?;
                let bytes = store.total_data_cluster_count() * store.cluster_size();
                lvs.create_lvol(DEFAULT_VOLUME, bytes, true).await?;
                (store, None)
            } else {
                let (store, report) =
                    Blobstore::load(desc.clone(), &LoadOptions::default()).await?;
                (store, Some(report))
            };
            let unload_on_error = store.clone();
            match volumes::open_exports(store, desc, &wanted).await {
                Ok(set) => Ok((Arc::new(set), report)),
                Err(err) => {
                    if let Err(unload) = unload_on_error.unload().await {
                        tracing::warn!(%unload, "unload after a failed start also failed");
                    }
                    Err(err)
                }
            }
        });
        let (exports, load_report) = match opened {
            Ok(Ok(opened)) => opened,
            Ok(Err(err)) => {
                runtime.stop();
                return Err(err);
            }
            Err(err) => {
                runtime.stop();
                return Err(err.into());
            }
        };
        if let Some(report) = &load_report {
            if report.recovered {
                tracing::warn!(?report, "the store was not unloaded cleanly: recovered");
            }
        }
        let shared = Arc::new(DaemonShared::new(
            reactors.clone(),
            options.max_connections,
            options.handshake_timeout,
            options.shutdown_grace,
            HandshakeOptions::default(),
        ));
        let summaries = volumes::summaries(&exports);
        let mut daemon = Daemon {
            runtime: Some(runtime),
            metadata_reactor,
            shared: Arc::clone(&shared),
            listening: Vec::new(),
            exports: summaries,
            start: StartInfo {
                image,
                created: create,
                load_report,
            },
            drain_timeout: options.drain_timeout,
            rpc: None,
            bdev: None,
            lock: None,
        };
        // The store is made (or loaded): a new image gets its final name now, before any
        // client can reach it.
        if let Err(err) = publish() {
            let _ = daemon.shut_down();
            return Err(err);
        }
        let runtime = daemon.runtime()?;
        let install = {
            let exports = Arc::clone(&exports);
            let shared = Arc::clone(&shared);
            runtime.broadcast(move |_| {
                ReactorServe::install(Arc::clone(&exports), Arc::clone(&shared));
            })?
        };
        install.wait()?;
        let rpc = options.rpc.clone();
        let cores = options.cores.clone();
        let bound = runtime.block_on(metadata_reactor, move || async move {
            let mut bound = Vec::new();
            let Some(state) = ReactorServe::current() else {
                return Err(EngineError::InvalidArgument("daemon state missing".into()));
            };
            let mut listeners = Vec::new();
            for addr in &listen {
                let listener = Listener::bind(addr).map_err(|err| EngineError::File {
                    path: addr.to_string(),
                    reason: format!("listen: {}", bind_words(addr, &err)),
                    errno: -err.raw_os_error().unwrap_or(libc::EADDRINUSE),
                })?;
                bound.push(listener.local_addr().unwrap_or_else(|_| addr.clone()));
                listeners.push(listener);
            }
            let rpc_listener = match &rpc {
                Some(path) => Some(Listener::bind(&ListenAddr::Unix(path.clone())).map_err(
                    |err| EngineError::File {
                        path: path.display().to_string(),
                        reason: format!(
                            "JSON-RPC socket: {}",
                            bind_words(&ListenAddr::Unix(path.clone()), &err)
                        ),
                        errno: -err.raw_os_error().unwrap_or(libc::EADDRINUSE),
                    },
                )?),
                None => None,
            };
            for listener in listeners {
                drop(spool_reactor::spawn_local(listen::accept_loop(
                    listener,
                    std::rc::Rc::clone(&state),
                )));
            }
            if let Some(listener) = rpc_listener {
                let context = std::rc::Rc::new(crate::rpc::methods::RpcContext::new(
                    std::sync::Arc::clone(&state.shared),
                    cores,
                ));
                drop(spool_reactor::spawn_local(crate::rpc::server::serve_rpc(
                    listener, context,
                )));
            }
            Ok(bound)
        });
        match bound {
            Ok(Ok(bound)) => daemon.listening = bound,
            Ok(Err(err)) => {
                let _ = daemon.shut_down();
                return Err(err);
            }
            Err(err) => {
                let _ = daemon.shut_down();
                return Err(err.into());
            }
        }
        for addr in &daemon.listening {
            tracing::info!(%addr, "listening");
        }
        daemon.rpc = options.rpc.clone();
        if let Some(path) = &daemon.rpc {
            tracing::info!(socket = %path.display(), "JSON-RPC");
        }
        for export in &daemon.exports {
            tracing::info!(
                name = %export.name,
                blob = format!("{:#x}", export.blob_id),
                size = export.size_bytes,
                read_only = export.read_only,
                thin = export.thin,
                "exporting"
            );
        }
        Ok(daemon)
    }

    fn runtime(&self) -> Result<&Runtime, EngineError> {
        self.runtime
            .as_ref()
            .ok_or_else(|| EngineError::InvalidArgument("the daemon has stopped".into()))
    }

    /// The addresses it listens on (a TCP port 0 resolved to the port the kernel chose).
    pub fn listening(&self) -> &[ListenAddr] {
        &self.listening
    }

    /// The JSON-RPC socket, if there is one.
    pub fn rpc_socket(&self) -> Option<&std::path::Path> {
        self.rpc.as_deref()
    }

    /// The exported volumes (as at start; management calls may change them since).
    pub fn exports(&self) -> &[ExportSummary] {
        &self.exports
    }

    /// What the start found (created or loaded, recovered).
    pub fn start_info(&self) -> &StartInfo {
        &self.start
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Stops as described in the module doc: drain, close, unload cleanly.
    pub fn stop(mut self) -> Result<StopSummary, EngineError> {
        self.shut_down()
    }

    fn shut_down(&mut self) -> Result<StopSummary, EngineError> {
        let Some(runtime) = self.runtime.take() else {
            return Ok(self.summary(0));
        };
        tracing::info!("stopping: draining connections");
        let fired = runtime
            .broadcast(|_| {
                if let Some(state) = ReactorServe::current() {
                    state.fire_stop();
                }
            })
            .map(|handle| handle.wait());
        if let Err(err) = fired {
            tracing::error!(%err, "could not tell the reactors to stop");
        }
        let deadline = Instant::now() + self.drain_timeout;
        while self.open_connections() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        let abandoned = self.open_connections();
        if abandoned > 0 {
            tracing::error!(
                abandoned,
                "connections still open after the drain timeout; unloading anyway"
            );
        }
        if let Ok(handle) = runtime.broadcast(|_| ReactorServe::remove()) {
            let _ = handle.wait();
        }
        let unloaded = runtime.block_on(self.metadata_reactor, || async {
            volumes::close_and_unload().await
        });
        let report = runtime.stop();
        if report.leaked_channels != 0 || !report.panicked.is_empty() {
            tracing::warn!(?report, "reactors stopped with leaks or panics");
        }
        self.bdev.take();
        self.lock.take();
        match unloaded {
            Ok(Ok(())) => {
                tracing::info!("store unloaded cleanly");
                Ok(self.summary(abandoned))
            }
            Ok(Err(err)) => Err(err),
            Err(err) => Err(err.into()),
        }
    }

    fn summary(&self, abandoned: usize) -> StopSummary {
        use std::sync::atomic::Ordering;
        StopSummary {
            connections: self.shared.accepted.load(Ordering::Relaxed),
            refused: self.shared.refused.load(Ordering::Relaxed),
            abandoned,
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.runtime.is_some() {
            if let Err(err) = self.shut_down() {
                tracing::error!(%err, "stopping the daemon failed");
            }
        }
    }
}

/// Why binding `addr` failed, in words; a Unix socket whose directory is missing says so.
fn bind_words(addr: &ListenAddr, err: &std::io::Error) -> String {
    match addr {
        ListenAddr::Unix(path) if err.raw_os_error() == Some(libc::ENOENT) => {
            match path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
                Some(dir) => format!(
                    "the directory {} does not exist (create it, or choose another path)",
                    dir.display()
                ),
                None => crate::words::io_words(err),
            }
        }
        _ => crate::words::io_words(err),
    }
}

/// Runs the daemon until SIGINT or SIGTERM (see [`crate::signals`]), then stops it cleanly;
/// `ready` is called once clients can connect.
pub fn run_until_signal(
    options: &ServeOptions,
    ready: impl FnOnce(&Daemon),
) -> Result<StopSummary, EngineError> {
    let daemon = Daemon::start(options)?;
    ready(&daemon);
    while crate::signals::stop_requested().is_none() {
        std::thread::sleep(Duration::from_millis(20));
    }
    daemon.stop()
}
