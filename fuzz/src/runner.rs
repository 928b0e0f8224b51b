//! The fuzz loop: pick an input from the corpus, mutate it, run the target under
//! `catch_unwind`, keep inputs that reach a new outcome class, stop at the first failure
//! (a panic or a hang), minimise it and write it out.
//!
//! Feedback is the outcome class each target returns (error kind with numbers stripped, or
//! the shape of what was accepted): no coverage instrumentation, so it runs on the stable
//! toolchain with no extra tools.

use std::backtrace::Backtrace;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once, PoisonError};
use std::time::{Duration, Instant};

use fastrand::Rng;

use crate::hex;
use crate::mutate::Mutator;
use crate::Target;

thread_local! {
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
    /// Set while this thread runs a case: its panics are recorded, not printed.
    static CAPTURING: Cell<bool> = const { Cell::new(false) };
}
static REACTOR_PANIC: Mutex<Option<String>> = Mutex::new(None);
static INSTALL: Once = Once::new();

/// The text of a panic payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_string()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "(a panic with a non-string payload)".into()
    }
}

/// Installs (once per process) a panic hook that records the thread, location, message and
/// backtrace of each panic in a case (on the thread running it, or on a reactor thread)
/// instead of printing it: the runner prints the reports of failures itself. Other panics go
/// to the previous hook as before. Set `SPOOL_FUZZ_PRINT_PANICS=1` to also print every
/// recorded panic as it happens.
pub fn install_panic_capture() {
    INSTALL.call_once(|| {
        let print = std::env::var_os("SPOOL_FUZZ_PRINT_PANICS").is_some_and(|v| v != "0");
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            let name = thread.name().unwrap_or("<unnamed>").to_string();
            let reactor = name.starts_with("spool-reactor");
            if !reactor && !CAPTURING.with(Cell::get) {
                previous(info);
                return;
            }
            let location = info.location().map_or_else(
                || "?".into(),
                |l| format!("{}:{}:{}", l.file(), l.line(), l.column()),
            );
            let report = format!(
                "thread '{name}' panicked at {location}:\n{}\nbacktrace:\n{}",
                panic_message(info.payload()),
                trim_backtrace(&Backtrace::force_capture().to_string())
            );
            if print {
                eprintln!("{report}");
            }
            if reactor {
                *REACTOR_PANIC.lock().unwrap_or_else(PoisonError::into_inner) = Some(report);
            } else {
                LAST_PANIC.with(|last| *last.borrow_mut() = Some(report));
            }
        }));
    });
}

/// A backtrace without the panic machinery's own frames (everything up to the panic
/// entry point) and without the frames below `main` or the thread start.
fn trim_backtrace(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let is_frame = |line: &str| {
        let line = line.trim_start();
        line.split(':')
            .next()
            .is_some_and(|n| n.parse::<u32>().is_ok())
    };
    let start = lines
        .iter()
        .rposition(|l| is_frame(l) && l.contains("rust_begin_unwind"))
        .map_or(0, |at| {
            // Skip that frame and its "at" line.
            at + 1 + usize::from(lines.get(at + 1).is_some_and(|l| !is_frame(l)))
        });
    let end = lines
        .iter()
        .position(|l| {
            is_frame(l)
                && (l.contains("std::rt::lang_start") || l.contains("__rust_begin_short_backtrace"))
        })
        .unwrap_or(lines.len());
    lines[start..end.max(start)].join("\n")
}

/// The report of the last panic on a reactor thread, if any since the last call.
pub fn take_reactor_panic() -> Option<String> {
    REACTOR_PANIC
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
}

/// Runs one input: `Ok(outcome class)`, or `Err(panic report with backtrace)`.
pub fn run_case(target: &Target, data: &[u8]) -> Result<String, String> {
    install_panic_capture();
    LAST_PANIC.with(|last| last.borrow_mut().take());
    CAPTURING.with(|capturing| capturing.set(true));
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| (target.run)(data)));
    CAPTURING.with(|capturing| capturing.set(false));
    result.map_err(|payload| {
        LAST_PANIC
            .with(|last| last.borrow_mut().take())
            .unwrap_or_else(|| panic_message(payload.as_ref()))
    })
}

/// Where and how a report's panic happened: its location (`file:line:column`) and its
/// message with numbers replaced by `#` (so "a store does not load again: mask header type"
/// and "...: CRC mismatch", or hangs in different operations, count as different failures).
/// For the store target, the reactor's panic nested in the report is the one that counts.
pub fn failure_site(report: &str) -> String {
    if let Some(at) = report.find("thread 'spool-reactor") {
        if at > 0 {
            return failure_site(&report[at..]);
        }
    }
    let mut lines = report.lines();
    let first = lines.next().unwrap_or("");
    let location = first.split(" panicked at ").nth(1).unwrap_or(first);
    let message = lines.next().unwrap_or("");
    let message: String = message.chars().take(160).collect();
    crate::targets::class(location.trim_end_matches(':'), message)
}

/// How a fuzz run is set up.
#[derive(Debug, Clone)]
pub struct Options {
    /// Wall-clock budget.
    pub duration: Duration,
    /// Seed of the mutation RNG (the run is reproducible for a given seed, corpus and
    /// timing-independent targets).
    pub seed: u64,
    /// Stop after this many cases (in addition to the time budget).
    pub max_cases: Option<u64>,
    /// Where to write failing inputs (`<target>-<seed>-<case>.{bin,hex,txt}`); none: not
    /// written.
    pub out_dir: Option<PathBuf>,
    /// A case running longer than this is a hang: the input is written and the process
    /// exits with status 3 (a hung case cannot be abandoned safely).
    pub hang_timeout: Duration,
    /// Progress lines on stderr every few seconds.
    pub progress: bool,
    /// Time spent minimising a failing input.
    pub minimize_for: Duration,
    /// Cases slower than this are run but not added to the corpus (so a run does not
    /// dwell on huge cluster maps); `None` keeps the run's input sequence independent of
    /// timing (the smoke test's choice).
    pub slow_case: Option<Duration>,
    /// Go on after a failure, recording the first failure of each panic site (for long runs
    /// that should find more than the first bug).
    pub keep_going: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            duration: Duration::from_secs(10),
            seed: 1,
            max_cases: None,
            out_dir: None,
            hang_timeout: Duration::from_secs(90),
            progress: false,
            minimize_for: Duration::from_secs(20),
            slow_case: Some(SLOW_CASE),
            keep_going: false,
        }
    }
}

/// A failing input.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The target's name.
    pub target: &'static str,
    /// The run's seed.
    pub seed: u64,
    /// The case number (0-based) that failed.
    pub case: u64,
    /// The input as generated.
    pub input: Vec<u8>,
    /// A smaller input failing at the same site.
    pub minimized: Vec<u8>,
    /// The panic report (message, location, backtrace) of the minimised input.
    pub report: String,
    /// Files written.
    pub files: Vec<PathBuf>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "FAILURE in target {} (seed {}, case {}): {}",
            self.target,
            self.seed,
            self.case,
            failure_site(&self.report)
        )?;
        writeln!(
            f,
            "minimised input ({} bytes, {} as generated):",
            self.minimized.len(),
            self.input.len()
        )?;
        writeln!(f, "{}", hex::describe(&self.minimized))?;
        for file in &self.files {
            writeln!(f, "written: {}", file.display())?;
        }
        writeln!(
            f,
            "replay: cargo run -p spool-fuzz --release -- --target {} --replay <file.hex>",
            self.target
        )?;
        write!(f, "{}", self.report)
    }
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Cases run.
    pub cases: u64,
    /// Inputs in the corpus at the end.
    pub corpus: usize,
    /// How often each outcome class was seen.
    pub classes: BTreeMap<String, u64>,
    /// The slowest case: its time and input.
    pub slowest: Option<(Duration, Vec<u8>)>,
    /// Cases slower than [`Options::slow_case`] (kept out of the corpus).
    pub slow_cases: u64,
    /// The failures: the first one, or with [`Options::keep_going`] the first of each
    /// distinct panic site.
    pub failures: Vec<Failure>,
    /// Failing cases in all (with `keep_going`, repeats of a known site included).
    pub failing_cases: u64,
    /// Wall time.
    pub elapsed: Duration,
}

struct Watch {
    started: Mutex<Option<(Instant, Vec<u8>)>>,
    done: AtomicBool,
}

fn start_watchdog(target: &'static str, seed: u64, options: &Options) -> Arc<Watch> {
    let watch = Arc::new(Watch {
        started: Mutex::new(None),
        done: AtomicBool::new(false),
    });
    let thread_watch = Arc::clone(&watch);
    let limit = options.hang_timeout;
    let out_dir = options.out_dir.clone();
    let spawned = std::thread::Builder::new()
        .name("spool-fuzz-watchdog".into())
        .spawn(move || {
            while !thread_watch.done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                let current = thread_watch
                    .started
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone();
                if let Some((since, input)) = current {
                    if since.elapsed() > limit {
                        eprintln!(
                            "HANG in target {target} (seed {seed}): a case ran over {limit:?}"
                        );
                        eprintln!("{}", hex::describe(&input));
                        if let Some(dir) = &out_dir {
                            let files = write_failure(dir, target, seed, "hang", &input, "hang\n");
                            for file in files {
                                eprintln!("written: {}", file.display());
                            }
                        }
                        std::process::exit(3);
                    }
                }
            }
        });
    if spawned.is_err() {
        eprintln!("warning: no watchdog thread: hangs will not be detected");
    }
    watch
}

/// Writes `input` as `.bin` and `.hex` and the report as `.txt`; returns the files written.
pub fn write_failure(
    dir: &Path,
    target: &str,
    seed: u64,
    case: &str,
    input: &[u8],
    report: &str,
) -> Vec<PathBuf> {
    let mut files = Vec::new();
    if std::fs::create_dir_all(dir).is_err() {
        return files;
    }
    let stem = format!("{target}-{seed}-{case}");
    for (ext, bytes) in [
        ("bin", input.to_vec()),
        ("hex", format!("{}\n", hex::encode(input)).into_bytes()),
        ("txt", report.as_bytes().to_vec()),
    ] {
        let path = dir.join(format!("{stem}.{ext}"));
        if std::fs::write(&path, bytes).is_ok() {
            files.push(path);
        }
    }
    files
}

/// Fuzzes `target` from `seeds` until the budget runs out or a case fails.
pub fn fuzz(target: &'static Target, seeds: Vec<Vec<u8>>, options: &Options) -> Report {
    install_panic_capture();
    let start = Instant::now();
    let mut rng = Rng::with_seed(options.seed);
    let mut report = Report::default();
    let watch = start_watchdog(target.name, options.seed, options);
    let mut seen: HashSet<String> = HashSet::new();
    let mut failure_sites: HashSet<String> = HashSet::new();
    let mut corpus: Vec<Vec<u8>> = Vec::new();
    let mut mutator = Mutator::new(target, &seeds);
    let mut last_progress = Instant::now();
    // Seeds first, as they are; then mutants.
    let mut pending_seeds = seeds.into_iter();
    loop {
        if start.elapsed() >= options.duration
            || options.max_cases.is_some_and(|max| report.cases >= max)
        {
            break;
        }
        let input = match pending_seeds.next() {
            Some(seed) => seed,
            None if corpus.is_empty() => mutator.fresh(&mut rng),
            None => {
                let parent = &corpus[pick_parent(&mut rng, corpus.len())];
                mutator.mutate(parent, &corpus, &mut rng)
            }
        };
        *watch.started.lock().unwrap_or_else(PoisonError::into_inner) =
            Some((Instant::now(), input.clone()));
        let began = Instant::now();
        let result = run_case(target, &input);
        let took = began.elapsed();
        *watch.started.lock().unwrap_or_else(PoisonError::into_inner) = None;
        let case = report.cases;
        report.cases += 1;
        if report
            .slowest
            .as_ref()
            .is_none_or(|(slowest, _)| took > *slowest)
        {
            report.slowest = Some((took, input.clone()));
        }
        match result {
            Ok(outcome) => {
                *report.classes.entry(outcome.clone()).or_default() += 1;
                if options.slow_case.is_some_and(|slow| took > slow) {
                    // Slow inputs (huge cluster maps) are run, not bred from.
                    report.slow_cases += 1;
                } else if seen.insert(outcome) {
                    mutator.learn(&input);
                    if corpus.len() < MAX_CORPUS {
                        corpus.push(input);
                    } else {
                        let slot = rng.usize(..corpus.len());
                        corpus[slot] = input;
                    }
                } else if corpus.len() < MAX_CORPUS && rng.u32(..64) == 0 {
                    corpus.push(input);
                }
            }
            Err(panic) => {
                report.failing_cases += 1;
                let site = failure_site(&panic);
                if !failure_sites.insert(site) {
                    continue;
                }
                let (minimized, final_report) =
                    minimize(target, &input, &panic, options.minimize_for);
                let mut failure = Failure {
                    target: target.name,
                    seed: options.seed,
                    case,
                    input,
                    minimized,
                    report: final_report,
                    files: Vec::new(),
                };
                if let Some(dir) = &options.out_dir {
                    let text = failure.to_string();
                    failure.files = write_failure(
                        dir,
                        target.name,
                        options.seed,
                        &case.to_string(),
                        &failure.minimized,
                        &text,
                    );
                }
                if options.progress {
                    eprintln!(
                        "{}: failure at {}",
                        target.name,
                        failure_site(&failure.report)
                    );
                }
                report.failures.push(failure);
                if !options.keep_going {
                    break;
                }
            }
        }
        if options.progress && last_progress.elapsed() >= Duration::from_secs(5) {
            last_progress = Instant::now();
            eprintln!(
                "{}: {} cases in {:.0?}, {} classes, corpus {}",
                target.name,
                report.cases,
                start.elapsed(),
                report.classes.len(),
                corpus.len()
            );
        }
    }
    watch.done.store(true, Ordering::Relaxed);
    report.corpus = corpus.len();
    report.elapsed = start.elapsed();
    report
}

/// Most inputs kept.
const MAX_CORPUS: usize = 4096;
/// The default [`Options::slow_case`].
pub const SLOW_CASE: Duration = Duration::from_millis(100);

/// Newer corpus entries (rarer outcomes) are picked a little more often.
fn pick_parent(rng: &mut Rng, len: usize) -> usize {
    if rng.bool() {
        rng.usize(..len)
    } else {
        let recent = len.min(64);
        len - 1 - rng.usize(..recent)
    }
}

/// Shrinks `input` while it still fails at the same site: cut the tail, drop chunks, zero
/// chunks. Returns the smallest input found and its report.
pub fn minimize(
    target: &Target,
    input: &[u8],
    report: &str,
    budget: Duration,
) -> (Vec<u8>, String) {
    let site = failure_site(report);
    let start = Instant::now();
    let mut best = input.to_vec();
    let mut best_report = report.to_string();
    let mut try_candidate = |candidate: Vec<u8>, best: &mut Vec<u8>| -> bool {
        if start.elapsed() > budget {
            return false;
        }
        match run_case(target, &candidate) {
            Err(again) if failure_site(&again) == site => {
                *best = candidate;
                best_report = again;
                true
            }
            _ => false,
        }
    };
    // Cut the tail, then remove chunks of halving sizes, then zero chunks.
    let mut chunk = best.len().next_power_of_two().max(1);
    while chunk >= 1 && start.elapsed() < budget {
        let mut at = 0;
        while at < best.len() && start.elapsed() < budget {
            let end = (at + chunk).min(best.len());
            let mut candidate = best[..at].to_vec();
            candidate.extend_from_slice(&best[end..]);
            if !try_candidate(candidate, &mut best) {
                at += chunk;
            }
        }
        chunk /= 2;
    }
    let mut chunk = 256usize;
    while chunk >= 1 && start.elapsed() < budget {
        let mut at = 0;
        while at < best.len() && start.elapsed() < budget {
            let end = (at + chunk).min(best.len());
            if best[at..end].iter().any(|&b| b != 0) {
                let mut candidate = best.clone();
                candidate[at..end].fill(0);
                try_candidate(candidate, &mut best);
            }
            at += chunk;
        }
        chunk /= 4;
    }
    (best, best_report)
}
