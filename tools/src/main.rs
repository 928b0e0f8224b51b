//! The `spool` command line: offline tools and benchmarks over Spool's engine.

mod blob_cmd;
mod cli;
mod error;
mod perf;
mod perf_plot;
mod rpc_cmd;
mod serve_cmd;

use std::io::{IsTerminal, Write};

use clap::Parser;

use crate::cli::{Cli, Command};
use crate::error::ToolError;

fn main() {
    let cli = Cli::parse();
    // The blobstore commands and perf report what matters in their own one-line errors,
    // warnings and report labels; the library's log lines (a module path, an errno) come only
    // when asked for with SPOOL_LOG=warn (or debug). The daemon logs as a daemon does.
    let default_level = match cli.command {
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
        eprintln!("warning: SIGINT, SIGTERM and SIGHUP will not stop cleanly: {err}");
    }
    let code = match run(&cli) {
        Ok(()) => 0,
        Err(err) => {
            if let ToolError::Interrupted {
                report: Some(report),
                ..
            } = &err
            {
                // Printed where it failed, quietly on a closed pipe, as a report is.
                let _ = blob_cmd::emit(&perf::table(report));
            }
            // Not eprintln!: after a hang-up stderr may be gone, and the exit status must
            // still be the signal's, not a panic's.
            let _ = writeln!(std::io::stderr(), "error: {err}");
            err.exit_code()
        }
    };
    std::process::exit(code);
}

fn run(cli: &Cli) -> Result<(), ToolError> {
    // The picture's path is checked before the run, not found unusable after it.
    if let Command::Perf(args) = &cli.command {
        if let (Some(path), cli::Layer::Bdev | cli::Layer::Blob) = (&args.plot, args.layer) {
            perf_plot::check_path(path)?;
        }
    }
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
                blob_cmd::emit(&json_line(&report)?)
            } else {
                blob_cmd::emit(&perf::metadata_table(&report))
            }
        }
        Command::Perf(args) if args.layer == cli::Layer::Snap => {
            let report = perf::run_snapshot_load(args)?;
            if args.json {
                blob_cmd::emit(&json_line(&report)?)
            } else {
                blob_cmd::emit(&perf::snapshot_table(&report))
            }
        }
        Command::Perf(args) => match perf::run(args) {
            Ok(report) => show_perf_report(args, &report, None),
            // A stopped run shows what it measured as a finished one does (the table or the
            // JSON, and the picture), then says it was stopped (exit 130 or 143).
            Err(ToolError::Interrupted {
                signal,
                done,
                report: Some(report),
            }) => {
                show_perf_report(args, &report, None)?;
                Err(ToolError::Interrupted {
                    signal,
                    done,
                    report: None,
                })
            }
            // So does a run an I/O failure ended (its JSON says the error too), then the
            // error line (exit 1).
            Err(err @ ToolError::Io { .. }) => {
                if let ToolError::Io { report, .. } = &err {
                    show_perf_report(args, report, Some(&err.to_string()))?;
                }
                Err(err)
            }
            Err(err) => Err(err),
        },
        Command::Serve(args) => serve_cmd::serve(args),
        Command::Rpc(args) => rpc_cmd::rpc(args),
        blob_command => blob_cmd::run(blob_command),
    }
}

/// `value` as pretty JSON and a newline.
fn json_line(value: &impl serde::Serialize) -> Result<String, ToolError> {
    let json =
        serde_json::to_string_pretty(value).map_err(|err| ToolError::Run(err.to_string()))?;
    Ok(format!("{json}\n"))
}

/// Draws `--plot` and prints a bdev or blob layer report (the table, or with `--json` one
/// JSON object, with an `"error"` member when `error` ended the run) on stdout; a closed
/// pipe ends the output quietly.
fn show_perf_report(
    args: &cli::PerfArgs,
    report: &spool_engine::perf::PerfReport,
    error: Option<&str>,
) -> Result<(), ToolError> {
    if let Some(path) = &args.plot {
        perf_plot::write_svg(report, path)?;
    }
    if args.json {
        let mut value =
            serde_json::to_value(report).map_err(|err| ToolError::Run(err.to_string()))?;
        if let (Some(error), Some(object)) = (error, value.as_object_mut()) {
            object.insert("error".into(), error.into());
        }
        blob_cmd::emit(&json_line(&value)?)
    } else {
        blob_cmd::emit(&perf::table(report))
    }
}
