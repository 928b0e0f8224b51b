//! The `spool` command line: offline tools and benchmarks over Spool's engine.

mod blob_cmd;
mod cli;
mod error;
mod perf;
mod perf_plot;
mod rpc_cmd;
mod serve_cmd;

use std::io::IsTerminal;

use clap::Parser;

use crate::cli::{Cli, Command};
use crate::error::ToolError;

fn main() {
    let cli = Cli::parse();
    // The blobstore commands report what matters in their own one-line errors and warnings;
    // the library's log lines (SPOOL_LOG=warn) would repeat them.
    let default_level = match cli.command {
        Command::Perf(_) => "warn",
        Command::Serve(_) => "info",
        _ => "error",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SPOOL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    if let Err(err) = spool_engine::signals::install() {
        eprintln!("warning: SIGINT and SIGTERM will not stop cleanly: {err}");
    }
    let code = match run(&cli) {
        Ok(()) => 0,
        Err(err) => {
            match &err {
                ToolError::Io { report, .. } => eprint!("{}", perf::table(report)),
                ToolError::Interrupted {
                    report: Some(report),
                    ..
                } => print!("{}", perf::table(report)),
                _ => {}
            }
            eprintln!("error: {err}");
            err.exit_code()
        }
    };
    std::process::exit(code);
}

fn run(cli: &Cli) -> Result<(), ToolError> {
    match &cli.command {
        Command::Perf(args)
            if args.plot.is_some() && matches!(args.layer, cli::Layer::Md | cli::Layer::Snap) =>
        {
            Err(ToolError::Usage(
                "--plot draws an I/O job: use it with --layer bdev or blob".into(),
            ))
        }
        Command::Perf(args) if args.layer == cli::Layer::Md => {
            let report = perf::run_metadata(args)?;
            if args.json {
                let json = serde_json::to_string_pretty(&report)
                    .map_err(|err| ToolError::Run(err.to_string()))?;
                println!("{json}");
            } else {
                print!("{}", perf::metadata_table(&report));
            }
            Ok(())
        }
        Command::Perf(args) if args.layer == cli::Layer::Snap => {
            let report = perf::run_snapshot_load(args)?;
            if args.json {
                let json = serde_json::to_string_pretty(&report)
                    .map_err(|err| ToolError::Run(err.to_string()))?;
                println!("{json}");
            } else {
                print!("{}", perf::snapshot_table(&report));
            }
            Ok(())
        }
        Command::Perf(args) => {
            let report = perf::run(args)?;
            if let Some(path) = &args.plot {
                perf_plot::write_svg(&report, path)?;
            }
            if args.json {
                let json = serde_json::to_string_pretty(&report)
                    .map_err(|err| ToolError::Run(err.to_string()))?;
                println!("{json}");
            } else {
                print!("{}", perf::table(&report));
            }
            Ok(())
        }
        Command::Serve(args) => serve_cmd::serve(args),
        Command::Rpc(args) => rpc_cmd::rpc(args),
        blob_command => blob_cmd::run(blob_command),
    }
}
