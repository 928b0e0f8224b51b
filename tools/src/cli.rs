//! The command-line grammar of `spool`.

use clap::{Parser, Subcommand, ValueEnum};

use crate::blob_cmd::args::{
    BlobArgs, CheckArgs, CreateArgs, DumpArgs, ExportArgs, ImportArgs, InfoArgs, InitArgs, LsArgs,
    RenameArgs, ResizeArgs, SnapshotArgs, SuperArgs, XattrArgs,
};

/// Spool: a polled, userspace storage engine (SPDK-style, in Rust).
#[derive(Debug, Parser)]
#[command(name = "spool", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands. The blobstore commands work offline: each opens IMAGE, loads its
/// store, does its job and unloads the store cleanly.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a store's volumes over NBD until SIGINT/SIGTERM (the daemon).
    Serve(ServeArgs),
    /// Call a running daemon's JSON-RPC method and print the result as JSON.
    Rpc(RpcArgs),
    /// Measure a block device through Spool's reactors (SPDK bdevperf's job).
    Perf(PerfArgs),
    /// Format IMAGE as an empty blobstore (creating the file with --size; a store already
    /// there needs --force).
    Init(InitArgs),
    /// Show the store: geometry, clean flag, type, super blob, free clusters.
    Info(InfoArgs),
    /// List the blobs, one row each.
    Ls(LsArgs),
    /// Create a blob and print its id (hex, as SPDK prints it) alone on stdout.
    Create(CreateArgs),
    /// Change a blob's size (a smaller one needs --shrink).
    Resize(ResizeArgs),
    /// Give a blob a new name (checked as create checks --name).
    Rename(RenameArgs),
    /// Delete a blob.
    Delete(BlobArgs),
    /// Make a blob read-only (data and metadata), for good.
    SetReadOnly(BlobArgs),
    /// Snapshot a blob (the blob becomes a thin clone of it); prints the snapshot's id (hex).
    Snapshot(SnapshotArgs),
    /// Clone a snapshot (a thin blob reading through it); prints the clone's id (hex).
    Clone(SnapshotArgs),
    /// Allocate every cluster a blob does not own; it then has no parent and is thick.
    Inflate(BlobArgs),
    /// Copy the clusters the blob's parent owns; its grandparent becomes its parent.
    Decouple(BlobArgs),
    /// List, get, set or remove a blob's xattrs.
    Xattr(XattrArgs),
    /// Print the super blob, or set it to BLOB.
    Super(SuperArgs),
    /// Copy a file into a blob.
    Import(ImportArgs),
    /// Copy a blob (or part of it) into a file.
    Export(ExportArgs),
    /// Decode every metadata page, checking CRCs (SPDK's blobcli -D); reads the raw image;
    /// exit 2 when it finds problems.
    Dump(DumpArgs),
    /// Check a store for damage (exit 0 consistent, 2 problems found, 1 could not check);
    /// with --repair, fix what can be fixed without guessing.
    Check(CheckArgs),
}

/// Which layer `spool perf` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Layer {
    /// The bdev: I/O straight to the device.
    Bdev,
    /// The blobstore: a store is initialised on the target and the job runs on one thick
    /// blob over all of it (the target's contents are replaced).
    Blob,
    /// Metadata rates: create, open+close, delete of --blobs blobs, and clean and dirty
    /// load times (the target's contents are replaced).
    Md,
    /// Snapshot call latency and write pause under --qd random writes of --bs on every
    /// core, at --cluster-size (the target's contents are replaced).
    Snap,
}

/// The I/O pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RwMode {
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random mix of reads and writes (see --rwmix).
    Randrw,
}

/// Parses a whole number that cannot be negative for clap: a leading `-` is said in words
/// ("cannot be negative") rather than clap's "unexpected argument" with its `-- -1` tip.
fn unsigned_arg<T: std::str::FromStr>(text: &str) -> Result<T, String> {
    if text.trim_start().starts_with('-') {
        return Err(format!("cannot be negative ('{text}')"));
    }
    text.trim()
        .parse::<T>()
        .map_err(|_| format!("'{text}' is not a whole number in range"))
}

/// Parses a number of seconds for clap: negative values are said in words.
pub(crate) fn seconds_arg(text: &str) -> Result<f64, String> {
    if text.trim_start().starts_with('-') {
        return Err(format!("cannot be negative ('{text}')"));
    }
    text.trim()
        .parse::<f64>()
        .map_err(|_| format!("'{text}' is not a number of seconds"))
}

/// Parses `--qd` for clap: 1 to 4096 I/Os in flight per core.
fn qd_arg(text: &str) -> Result<u32, String> {
    match unsigned_arg::<u32>(text)? {
        qd @ 1..=4096 => Ok(qd),
        qd => Err(format!("{qd} is not in 1..=4096")),
    }
}

/// Parses `--blobs` for clap: a whole number from 1, said in words otherwise (a run over no
/// blobs would time nothing and print rates of 0).
fn blobs_arg(text: &str) -> Result<u64, String> {
    if text.trim_start().starts_with('-') {
        return Err(format!("--blobs cannot be negative ('{text}')"));
    }
    match text.trim().parse::<u64>() {
        Ok(0) => {
            Err("--blobs must be at least 1 (the blobs each phase of --layer md times)".into())
        }
        Ok(blobs) => Ok(blobs),
        Err(_) => Err(format!("'{text}' is not a whole number of blobs")),
    }
}

/// Arguments of `spool perf`.
#[derive(Debug, Clone, clap::Args)]
pub struct PerfArgs {
    /// `null`, `malloc:SIZE` (RAM), or a PATH (file or block device; a missing file is
    /// created with --size and fully written first, except under /dev).
    #[arg(long, default_value = "spool-perf.img")]
    pub target: String,
    /// What to measure: the bdev, the blob layer over it, or metadata rates.
    #[arg(long, value_enum, default_value_t = Layer::Bdev)]
    pub layer: Layer,
    /// Cluster size of the store --layer blob and --layer md create.
    #[arg(long, default_value = "1M", allow_hyphen_values = true)]
    pub cluster_size: String,
    /// Blobs per phase of --layer md (at least 1).
    #[arg(long, default_value_t = 10_000, value_parser = blobs_arg, allow_hyphen_values = true)]
    pub blobs: u64,
    /// Snapshots --layer snap counts (it takes one more first, of the thick volume).
    #[arg(long, default_value_t = 20, value_parser = unsigned_arg::<u64>, allow_hyphen_values = true)]
    pub snapshots: u64,
    /// Milliseconds from one snapshot call's return to the next (--layer snap).
    #[arg(long, default_value_t = 20, value_parser = unsigned_arg::<u64>, allow_hyphen_values = true)]
    pub snap_gap: u64,
    /// I/O pattern.
    #[arg(long, value_enum, default_value_t = RwMode::Randread)]
    pub rw: RwMode,
    /// Percentage of reads for --rw randrw.
    #[arg(long, default_value_t = 70, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub rwmix: u8,
    /// Bytes per I/O (a multiple of the device block size).
    #[arg(long, default_value = "4096", allow_hyphen_values = true)]
    pub bs: String,
    /// I/Os in flight per core.
    #[arg(long, default_value_t = 32, value_parser = qd_arg, allow_hyphen_values = true)]
    pub qd: u32,
    /// Seconds to run.
    #[arg(long, default_value_t = 10.0, value_parser = seconds_arg, allow_hyphen_values = true)]
    pub time: f64,
    /// Cores to run reactors on: a list like 0,1 or a range like 0-1.
    #[arg(long, default_value = "0")]
    pub cores: String,
    /// Size of a null device, or of a file to create (e.g. 1G; default 1G). An existing
    /// PATH is used as it is: a --size that differs from it is refused.
    #[arg(long, allow_hyphen_values = true)]
    pub size: Option<String>,
    /// Block size of null/malloc devices and of files.
    #[arg(long, default_value_t = 4096)]
    pub block_size: u32,
    /// Use SQPOLL on io_uring (a kernel thread polls submissions; costs a core).
    #[arg(long)]
    pub sqpoll: bool,
    /// io_uring: hand SQEs to the kernel as soon as this many are queued (0: once per
    /// reactor loop pass).
    #[arg(long, default_value_t = spool_bdev::DEFAULT_SUBMIT_BATCH, value_parser = unsigned_arg::<u32>, allow_hyphen_values = true)]
    pub submit_batch: u32,
    /// Seed for random offsets (the same seed gives the same offset sequence).
    #[arg(long, default_value_t = 0x5EED)]
    pub seed: u64,
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also draw the run as an SVG picture in FILE: the latency histogram and IOPS over time,
    /// one line per core (--layer bdev and blob).
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<std::path::PathBuf>,
    /// No progress line.
    #[arg(long, short)]
    pub quiet: bool,
    /// Write to a PATH that holds a blobstore (its data is lost); refused without this.
    #[arg(long)]
    pub force: bool,
}

/// How reactors wait when idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IdleArg {
    /// Spin (a core each, fully used even when idle), as SPDK does: for a core no other
    /// busy thread shares.
    Busy,
    /// Sleep up to 1 ms when nothing is pending (for shared machines; adds latency).
    Sleep,
    /// Spin while busy, then after 50 µs idle block in the kernel until a request, an I/O
    /// completion or a timer wakes the reactor (SPDK's interrupt mode, entered when idle).
    /// The default.
    Adaptive,
    /// Block in the kernel as soon as there is nothing to do (no spin): the reactor uses
    /// only the CPU its work takes and is run promptly on a core it shares.
    Interrupt,
}

/// Arguments of `spool serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// The store: a file or block device holding one (loaded, and recovered if it was not
    /// unloaded cleanly), or malloc:SIZE (a new store in RAM with one thin volume vol0).
    /// Without it: spool.img in the working directory, created on first use (1 GiB,
    /// sparse, one thin volume vol0).
    pub image: Option<String>,
    /// Listen on this TCP address (repeatable). Default 127.0.0.1:10809 when neither
    /// --listen nor --socket is given.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Vec<String>,
    /// Listen on this Unix socket (mode 0600; repeatable).
    #[arg(long, value_name = "PATH")]
    pub socket: Vec<String>,
    /// Cores to run reactors on (e.g. 0 or 0,1); connections are spread over them.
    #[arg(long, default_value = "0")]
    pub cores: String,
    /// Export only this volume, by name or blob id (repeatable); default: every volume.
    #[arg(long, value_name = "NAME")]
    pub export: Vec<String>,
    /// Connections open at once at most; more are closed at accept.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub max_connections: u32,
    /// What reactors do when idle.
    #[arg(long, value_enum, default_value_t = IdleArg::Adaptive)]
    pub idle: IdleArg,
    /// Do not pin reactors to their cores.
    #[arg(long)]
    pub no_pin: bool,
    /// Seconds a client may take to finish the NBD handshake.
    #[arg(long, default_value_t = 10.0, value_parser = seconds_arg, allow_hyphen_values = true)]
    pub handshake_timeout: f64,
    /// Take JSON-RPC calls (SPDK's methods) on this Unix socket (mode 0600).
    #[arg(long, value_name = "PATH", default_value = spool_engine::serve::DEFAULT_RPC_SOCKET)]
    pub rpc: String,
    /// No JSON-RPC socket.
    #[arg(long, conflicts_with = "rpc")]
    pub no_rpc: bool,
}

/// Arguments of `spool rpc`.
#[derive(Debug, Clone, clap::Args)]
pub struct RpcArgs {
    /// The daemon's JSON-RPC socket.
    #[arg(short, long, default_value = spool_engine::serve::DEFAULT_RPC_SOCKET)]
    pub socket: String,
    /// Seconds to wait for the answer.
    #[arg(short, long, default_value_t = 60.0, value_parser = seconds_arg, allow_hyphen_values = true)]
    pub timeout: f64,
    /// The method (SPDK's names: bdev_lvol_create, bdev_get_bdevs, ...; rpc_get_methods
    /// lists them).
    pub method: String,
    /// The parameters: one JSON object (e.g. '{"name": "lv0"}'), or --key value pairs
    /// (dashes in keys become underscores; values that parse as JSON are taken as JSON).
    #[arg(allow_hyphen_values = true, trailing_var_arg = true)]
    pub params: Vec<String>,
}
