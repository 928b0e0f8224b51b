//! The command-line grammar of `spool`.

use clap::{Parser, Subcommand, ValueEnum};

/// Spool: a polled, userspace storage engine (SPDK-style, in Rust).
#[derive(Debug, Parser)]
#[command(name = "spool", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Measure a block device through Spool's reactors (SPDK bdevperf's job).
    Perf(PerfArgs),
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

impl RwMode {
    /// The fio name of the pattern.
    pub fn name(self) -> &'static str {
        match self {
            RwMode::Randread => "randread",
            RwMode::Randwrite => "randwrite",
            RwMode::Read => "read",
            RwMode::Write => "write",
            RwMode::Randrw => "randrw",
        }
    }
}

/// Arguments of `spool perf`.
#[derive(Debug, Clone, clap::Args)]
pub struct PerfArgs {
    /// `null`, `malloc:SIZE` (RAM), or a PATH (file or block device; a missing file is
    /// created with --size and fully written first).
    #[arg(long, default_value = "spool-perf.img")]
    pub target: String,
    /// I/O pattern.
    #[arg(long, value_enum, default_value_t = RwMode::Randread)]
    pub rw: RwMode,
    /// Percentage of reads for --rw randrw.
    #[arg(long, default_value_t = 70, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub rwmix: u8,
    /// Bytes per I/O (a multiple of the device block size).
    #[arg(long, default_value = "4096")]
    pub bs: String,
    /// I/Os in flight per core.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub qd: u32,
    /// Seconds to run.
    #[arg(long, default_value_t = 10.0)]
    pub time: f64,
    /// Cores to run reactors on: a list like 0,1 or a range like 0-1.
    #[arg(long, default_value = "0")]
    pub cores: String,
    /// Size of a null device, or of a file to create (e.g. 1G).
    #[arg(long, default_value = "1G")]
    pub size: String,
    /// Block size of null/malloc devices and of files.
    #[arg(long, default_value_t = 4096)]
    pub block_size: u32,
    /// Use SQPOLL on io_uring (a kernel thread polls submissions; costs a core).
    #[arg(long)]
    pub sqpoll: bool,
    /// Seed for random offsets (the same seed gives the same offset sequence).
    #[arg(long, default_value_t = 0x5EED)]
    pub seed: u64,
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// No progress line.
    #[arg(long, short)]
    pub quiet: bool,
}
