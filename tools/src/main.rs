//! The `spool` command line: offline tools and benchmarks over Spool's engine.

mod cli;
mod error;
mod perf;

use clap::Parser;

use crate::cli::{Cli, Command};
use crate::error::ToolError;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SPOOL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let code = match run(&cli) {
        Ok(()) => 0,
        Err(err) => {
            if let ToolError::Io { report, .. } = &err {
                eprint!("{}", report.to_table());
            }
            eprintln!("spool: error: {err}");
            err.exit_code()
        }
    };
    std::process::exit(code);
}

fn run(cli: &Cli) -> Result<(), ToolError> {
    match &cli.command {
        Command::Perf(args) => {
            let report = perf::run(args)?;
            if args.json {
                let json = serde_json::to_string_pretty(&report)
                    .map_err(|err| ToolError::Run(err.to_string()))?;
                println!("{json}");
            } else {
                print!("{}", report.to_table());
            }
            Ok(())
        }
    }
}
