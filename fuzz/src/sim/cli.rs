//! `spool-fuzz sim`: run one seed, a range, or seeds until a deadline (soak); shrink and
//! print the first failure with the command that replays it.

use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::shrink::shrink;
use super::{run_seed, Bugs, Plan, PlanSize};

/// Usage of the `sim` subcommand.
pub const USAGE: &str = "\
usage: spool-fuzz sim --seed N [--trace]
       spool-fuzz sim --seeds A..B
       spool-fuzz sim --soak HOURS [--seed START]
  options: --ops N (plan length, default 40) --faults PER_MILLE (default 40)
           --shrink-runs N (default 400; 0: no shrinking)
           --plant flush-lies|skip-ordering-flushes|nbd-skips-flushes|skip-root-superset-growth (a planted bug the run must catch)
           --strict-thick-zeros (a thick blob's new clusters must read zeros)
           --quiet";

struct Args {
    seeds: std::ops::Range<u64>,
    soak: Option<Duration>,
    size: PlanSize,
    shrink_runs: usize,
    bugs: Bugs,
    trace: bool,
    quiet: bool,
}

fn parse(args: &[String]) -> Result<Args, String> {
    let mut out = Args {
        seeds: 0..1,
        soak: None,
        size: PlanSize::default(),
        shrink_runs: 400,
        bugs: Bugs::default(),
        trace: false,
        quiet: false,
    };
    let mut seed_given = false;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        let number = |text: String| -> Result<u64, String> {
            text.parse::<u64>()
                .map_err(|_| format!("{flag}: not a number: {text}"))
        };
        match flag.as_str() {
            "--seed" => {
                let seed = number(value()?)?;
                out.seeds = seed..seed.saturating_add(1);
                seed_given = true;
            }
            "--seeds" => {
                let text = value()?;
                let (a, b) = text
                    .split_once("..")
                    .ok_or_else(|| format!("--seeds wants A..B, got {text}"))?;
                out.seeds = number(a.into())?..number(b.into())?;
                seed_given = true;
            }
            "--soak" => {
                let hours: f64 = value()?
                    .parse()
                    .map_err(|_| "--soak wants hours (e.g. 0.5)".to_string())?;
                if !(hours.is_finite() && hours > 0.0) {
                    return Err("--soak wants a positive number of hours".into());
                }
                out.soak = Some(Duration::from_secs_f64(hours * 3600.0));
            }
            "--ops" => out.size.ops = number(value()?)? as usize,
            "--faults" => out.size.fault_per_mille = number(value()?)? as u32,
            "--shrink-runs" => out.shrink_runs = number(value()?)? as usize,
            "--plant" => {
                let bug = value()?;
                match bug.as_str() {
                    "flush-lies" => out.bugs.flush_lies = true,
                    "skip-ordering-flushes" => out.bugs.skip_ordering_flushes = true,
                    "nbd-skips-flushes" => out.bugs.nbd_skips_flushes = true,
                    "skip-root-superset-growth" => out.bugs.skip_root_superset_growth = true,
                    _ => return Err(format!("--plant: unknown bug {bug}")),
                }
            }
            "--strict-thick-zeros" => {
                out.bugs.strict_thick_zeros = true;
            }
            "--trace" => out.trace = true,
            "--quiet" => out.quiet = true,
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    if out.soak.is_some() && !seed_given {
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64 % 1_000_000_007);
        out.seeds = start..u64::MAX;
    } else if out.soak.is_some() {
        out.seeds = out.seeds.start..u64::MAX;
    } else if !seed_given {
        return Err("give --seed, --seeds or --soak".into());
    }
    Ok(out)
}

/// The command that replays `seed` with these options.
fn replay_command(seed: u64, args: &Args) -> String {
    let mut command = format!("cargo run -p spool-fuzz -- sim --seed {seed}");
    let default = PlanSize::default();
    if args.size.ops != default.ops {
        command += &format!(" --ops {}", args.size.ops);
    }
    if args.size.fault_per_mille != default.fault_per_mille {
        command += &format!(" --faults {}", args.size.fault_per_mille);
    }
    if args.bugs.flush_lies {
        command += " --plant flush-lies";
    }
    if args.bugs.skip_ordering_flushes {
        command += " --plant skip-ordering-flushes";
    }
    if args.bugs.nbd_skips_flushes {
        command += " --plant nbd-skips-flushes";
    }
    if args.bugs.skip_root_superset_growth {
        command += " --plant skip-root-superset-growth";
    }
    if args.bugs.strict_thick_zeros {
        command += " --strict-thick-zeros";
    }
    command
}

/// Runs the subcommand on its arguments (after `sim`).
pub fn main(args: &[String]) -> ExitCode {
    let args = match parse(args) {
        Ok(args) => args,
        Err(err) => {
            eprintln!("spool-fuzz sim: {err}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let started = Instant::now();
    let (mut passed, mut faults, mut cuts, mut reloads) = (0u64, 0u64, 0usize, 0usize);
    let mut enospc = 0usize;
    let mut last_report = Instant::now();
    for seed in args.seeds.clone() {
        if args.soak.is_some_and(|soak| started.elapsed() >= soak) {
            break;
        }
        match run_seed(seed, args.size, args.bugs) {
            Ok(report) => {
                passed += 1;
                faults += report.injected;
                cuts += report.cuts;
                reloads += report.reloads;
                enospc += report.enospc;
                if args.trace {
                    for line in &report.trace {
                        println!("{line}");
                    }
                }
            }
            Err(failure) => {
                println!(
                    "seed {seed} FAILED in life {}: {}",
                    failure.life, failure.what
                );
                println!("replay: {}", replay_command(seed, &args));
                if args.shrink_runs > 0 {
                    let plan = Plan::generate(seed, args.size);
                    let shrunk = shrink(&plan, failure, args.bugs, args.shrink_runs);
                    println!(
                        "shrunk from {} to {} steps in {} runs; it fails with: {}",
                        plan.ops.len(),
                        shrunk.plan.ops.len(),
                        shrunk.runs,
                        shrunk.failure.what
                    );
                    println!("shrunk plan:");
                    for op in &shrunk.plan.ops {
                        println!("  {op:?}");
                    }
                    println!("trace of the shrunk plan:");
                    for line in &shrunk.failure.trace {
                        println!("  {line}");
                    }
                }
                return ExitCode::from(1);
            }
        }
        if !args.quiet && last_report.elapsed() >= Duration::from_secs(10) {
            last_report = Instant::now();
            println!(
                "{passed} seeds passed (up to {seed}), {:.1} seeds/s",
                passed as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{passed} seeds passed in {seconds:.1} s ({:.1} seeds/s): {faults} injected faults, {enospc} operations failed on a full device, {cuts} power cuts, {reloads} clean reloads",
        passed as f64 / seconds.max(1e-9)
    );
    ExitCode::SUCCESS
}
