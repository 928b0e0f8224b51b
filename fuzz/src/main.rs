//! `spool-fuzz`: the stable-toolchain fuzz driver.
//!
//! ```text
//! cargo run -p spool-fuzz --release -- --target md_chain --seconds 60 --seed 42
//! cargo run -p spool-fuzz --release -- --target all --seconds 30
//! cargo run -p spool-fuzz --release -- --target store_load --replay failure.hex
//! ```
//!
//! Exit status: 0 when no case failed, 1 when one did (its minimised input is printed and
//! written under `--out`), 2 for bad arguments, 3 when a case hung (written by the watchdog).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use spool_fuzz::runner::{self, Options};
use spool_fuzz::{corpus, hex, store, target, Target, TARGETS};

const USAGE: &str = "\
usage: spool-fuzz [--target NAME|all] [--seconds N] [--seed S] [--cases N] [--out DIR]
                  [--timeout SECS] [--minimize SECS] [--keep-going] [--slow-ms MS] [--quiet]
       spool-fuzz --target NAME --replay FILE [--dump-image IMG]   (FILE: hex or raw bytes)
       spool-fuzz --list
       spool-fuzz sim --seed N | --seeds A..B | --soak HOURS   (the deterministic simulation)

  --target     a target (see --list) or all (default: all)
  --seconds    time per target (default 60)
  --seed       RNG seed (default: from the clock; printed so a run can be repeated)
  --cases      stop a target after this many cases
  --out        where failing inputs go (default: target/spool-fuzz)
  --timeout    a store case running longer is a hang (default 30); other targets: 3x
  --minimize   seconds spent shrinking a failing input (default 20)
  --keep-going record the first failure of each distinct panic site and go on
  --slow-ms    cases slower than this are not bred from (default 100; 0: off, so the
               input sequence of a seed does not depend on timing, as in the smoke test)
  --replay     run one input and print its outcome or its panic with the backtrace
  --dump-image with --replay on store_load: write the patched device image there
  --quiet      no progress lines";

struct Args {
    targets: Vec<&'static Target>,
    seconds: f64,
    seed: u64,
    cases: Option<u64>,
    out: PathBuf,
    timeout: Duration,
    minimize: Duration,
    quiet: bool,
    keep_going: bool,
    slow: Option<Duration>,
    replay: Option<PathBuf>,
    dump_image: Option<PathBuf>,
    list: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        targets: TARGETS.iter().collect(),
        seconds: 60.0,
        seed: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64 % 1_000_000_007),
        cases: None,
        out: PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("target")
            .join("spool-fuzz"),
        timeout: Duration::from_secs(30),
        minimize: Duration::from_secs(20),
        quiet: false,
        keep_going: false,
        slow: Some(runner::SLOW_CASE),
        replay: None,
        dump_image: None,
        list: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        let number = |text: String, name: &str| -> Result<f64, String> {
            text.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| format!("{name}: {text:?} is not a number"))
        };
        match flag.as_str() {
            "--target" => {
                let name = value("--target")?;
                args.targets = if name == "all" {
                    TARGETS.iter().collect()
                } else {
                    vec![target(&name).ok_or_else(|| format!("no target {name:?} (see --list)"))?]
                };
            }
            "--seconds" => args.seconds = number(value("--seconds")?, "--seconds")?,
            "--seed" => {
                let text = value("--seed")?;
                args.seed = text
                    .parse()
                    .map_err(|_| format!("--seed: {text:?} is not a u64"))?;
            }
            "--cases" => {
                let text = value("--cases")?;
                args.cases = Some(
                    text.parse()
                        .map_err(|_| format!("--cases: {text:?} is not a number"))?,
                );
            }
            "--out" => args.out = PathBuf::from(value("--out")?),
            "--timeout" => {
                args.timeout = Duration::from_secs_f64(number(value("--timeout")?, "--timeout")?)
            }
            "--minimize" => {
                args.minimize = Duration::from_secs_f64(number(value("--minimize")?, "--minimize")?)
            }
            "--replay" => args.replay = Some(PathBuf::from(value("--replay")?)),
            "--quiet" => args.quiet = true,
            "--keep-going" => args.keep_going = true,
            "--slow-ms" => {
                let ms = number(value("--slow-ms")?, "--slow-ms")?;
                args.slow = (ms > 0.0).then(|| Duration::from_secs_f64(ms / 1000.0));
            }
            "--dump-image" => args.dump_image = Some(PathBuf::from(value("--dump-image")?)),
            "--list" => args.list = true,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(args)
}

fn read_input(path: &PathBuf) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(|err| format!("{}: {err}", path.display()))?;
    let is_hex = !bytes.is_empty()
        && bytes
            .iter()
            .all(|b| b.is_ascii_hexdigit() || b.is_ascii_whitespace() || *b == b'x');
    if is_hex {
        hex::decode(&String::from_utf8_lossy(&bytes))
    } else {
        Ok(bytes)
    }
}

fn main() -> ExitCode {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    if raw.first().map(String::as_str) == Some("sim") {
        return spool_fuzz::sim::cli::main(&raw[1..]);
    }
    let args = match parse_args() {
        Ok(args) => args,
        Err(err) => {
            if !err.is_empty() {
                eprintln!("spool-fuzz: {err}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    if args.list {
        for target in TARGETS {
            println!("{:12} {}", target.name, target.about);
        }
        return ExitCode::SUCCESS;
    }
    store::set_case_timeout(args.timeout);
    if let Some(path) = &args.replay {
        let [target] = args.targets[..] else {
            eprintln!("spool-fuzz: --replay needs one --target");
            return ExitCode::from(2);
        };
        let input = match read_input(path) {
            Ok(input) => input,
            Err(err) => {
                eprintln!("spool-fuzz: {err}");
                return ExitCode::from(2);
            }
        };
        if let Some(out) = &args.dump_image {
            let image = store::patch(&input).and_then(|patched| patched.image());
            match image.map(|image| std::fs::write(out, image).map_err(|e| e.to_string())) {
                Ok(Ok(())) => println!("wrote the patched image to {}", out.display()),
                Ok(Err(err)) | Err(err) => {
                    eprintln!("spool-fuzz: --dump-image: {err}");
                    return ExitCode::from(2);
                }
            }
        }
        return match runner::run_case(target, &input) {
            Ok(outcome) => {
                println!("{}: no failure ({outcome})", target.name);
                ExitCode::SUCCESS
            }
            Err(report) => {
                println!("{}: FAILURE\n{report}", target.name);
                ExitCode::from(1)
            }
        };
    }
    println!(
        "spool-fuzz: seed {} ({}s per target; repeat with --seed {})",
        args.seed, args.seconds, args.seed
    );
    let mut failed = false;
    for target in &args.targets {
        let seeds = corpus::seeds(target.shape);
        println!(
            "== {} ({} seeds): {}",
            target.name,
            seeds.len(),
            target.about
        );
        let watchdog = if target.shape == spool_fuzz::Shape::Store {
            args.timeout + Duration::from_secs(30)
        } else {
            (args.timeout * 3).max(Duration::from_secs(30))
        };
        let options = Options {
            duration: Duration::from_secs_f64(args.seconds),
            seed: args.seed,
            max_cases: args.cases,
            out_dir: Some(args.out.clone()),
            hang_timeout: watchdog,
            progress: !args.quiet,
            minimize_for: args.minimize,
            slow_case: args.slow,
            keep_going: args.keep_going,
        };
        let report = runner::fuzz(target, seeds, &options);
        println!(
            "   {} cases in {:.1?} ({:.0}/s), {} outcome classes, corpus {}",
            report.cases,
            report.elapsed,
            report.cases as f64 / report.elapsed.as_secs_f64().max(1e-9),
            report.classes.len(),
            report.corpus
        );
        let mut classes: Vec<(&String, &u64)> = report.classes.iter().collect();
        classes.sort_by(|a, b| b.1.cmp(a.1));
        for (class, count) in classes.iter().take(if args.quiet { 0 } else { 12 }) {
            let class: String = class.chars().take(140).collect();
            println!("   {count:9}  {class}");
        }
        if let Some((took, input)) = &report.slowest {
            println!(
                "   slowest case: {took:.2?} ({} cases over {:?}; {} bytes, hex {}{})",
                report.slow_cases,
                args.slow.unwrap_or(Duration::MAX),
                input.len(),
                hex::encode(&input[..input.len().min(48)]),
                if input.len() > 48 { "..." } else { "" }
            );
        }
        for failure in &report.failures {
            println!("{failure}");
            failed = true;
        }
        if report.failing_cases > report.failures.len() as u64 {
            println!(
                "   {} failing cases in all, at {} distinct sites",
                report.failing_cases,
                report.failures.len()
            );
        }
    }
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
