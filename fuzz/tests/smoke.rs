//! Goal: every fuzz target runs in CI, so a parser change that panics, hangs or breaks an
//! invariant on corrupt bytes fails `cargo test`. Method: each target runs its seeds (cut
//! from the SPDK fixtures and Spool-made stores, or scripted NBD and JSON-RPC clients) and then mutants
//! for a bounded time with a fixed seed; every input in `fuzz/regressions/` (inputs that once failed, as hex, named
//! `TARGET-*.hex`) is replayed.
//!
//! Each target runs with the fixed seed (the same cases every run), then for half that time
//! with a fresh seed from the clock, printed, so every CI run also tries new inputs.
//! `SPOOL_FUZZ_SECONDS` sets the time per target (default 4; twice that for `store_load`),
//! `SPOOL_FUZZ_SEED` the second seed (to replay a run that failed).
//! A failure prints the minimised input (hex) and its backtrace, and writes it under
//! `target/tmp/spool-fuzz-smoke/`.

use std::path::Path;
use std::time::Duration;

use spool_fuzz::runner::{self, Options};
use spool_fuzz::{corpus, hex, target, TARGETS};

fn seconds() -> f64 {
    std::env::var("SPOOL_FUZZ_SECONDS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v >= 0.0)
        .unwrap_or(4.0)
}

/// The fixed seed every run re-checks.
const FIXED_SEED: u64 = 0x5EED;

/// The seeds of this run: the fixed one, then a fresh one (from the clock, or
/// `SPOOL_FUZZ_SEED` to replay a run), so each CI run also tries inputs no run tried before.
fn seeds() -> [(u64, f64); 2] {
    let fresh = std::env::var("SPOOL_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    [(FIXED_SEED, 1.0), (fresh, 0.5)]
}

fn fuzz(name: &str) {
    for (seed, share) in seeds() {
        eprintln!("{name}: seed {seed} (replay with SPOOL_FUZZ_SEED={seed})");
        fuzz_with(name, seed, share);
    }
}

fn fuzz_with(name: &str, seed: u64, share: f64) {
    let target = target(name).expect("a registered target");
    let seeds = corpus::seeds(target.shape);
    assert!(!seeds.is_empty(), "{name}: no seeds");
    // A store case loads and reads a whole device (tens of ms in debug builds): twice the
    // time, so the run gets past the seeds.
    let factor = if name == "store_load" { 2.0 } else { 1.0 };
    let options = Options {
        duration: Duration::from_secs_f64(seconds() * factor * share),
        seed,
        max_cases: None,
        out_dir: Some(Path::new(env!("CARGO_TARGET_TMPDIR")).join("spool-fuzz-smoke")),
        hang_timeout: Duration::from_secs(120),
        progress: false,
        minimize_for: Duration::from_secs(10),
        // The same inputs in the same order whatever the machine's speed.
        slow_case: None,
        keep_going: false,
    };
    let report = runner::fuzz(target, seeds, &options);
    if let Some(failure) = report.failures.first() {
        panic!("{name}, seed {seed} (SPOOL_FUZZ_SEED={seed} replays the run): {failure}");
    }
    assert!(report.cases > 0, "{name}: no case ran");
    eprintln!(
        "{name}: {} cases in {:.1?}, {} outcome classes",
        report.cases,
        report.elapsed,
        report.classes.len()
    );
}

#[test]
fn super_block() {
    fuzz("super_block");
}

#[test]
fn mask() {
    fuzz("mask");
}

#[test]
fn descriptors() {
    fuzz("descriptors");
}

#[test]
fn md_chain() {
    fuzz("md_chain");
}

#[test]
fn extent_page() {
    fuzz("extent_page");
}

#[test]
fn store_load() {
    fuzz("store_load");
}

#[test]
fn store_check() {
    fuzz("store_check");
}

#[test]
fn nbd_handshake() {
    fuzz("nbd_handshake");
}

#[test]
fn nbd_request() {
    fuzz("nbd_request");
}

#[test]
fn rpc_request() {
    fuzz("rpc_request");
}

#[test]
fn every_target_has_a_smoke_test() {
    let tested = [
        "super_block",
        "mask",
        "descriptors",
        "md_chain",
        "extent_page",
        "store_load",
        "store_check",
        "nbd_handshake",
        "nbd_request",
        "rpc_request",
    ];
    for target in TARGETS {
        assert!(
            tested.contains(&target.name),
            "{} is not smoke-tested",
            target.name
        );
    }
}

#[test]
fn regressions_stay_fixed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions");
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .expect("fuzz/regressions exists")
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "hex"))
        .collect();
    entries.sort();
    for path in entries {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let name = file.split('-').next().unwrap();
        let target = target(name).unwrap_or_else(|| panic!("{file}: no target {name:?}"));
        let input = hex::decode(&std::fs::read_to_string(&path).unwrap()).unwrap();
        if let Err(report) = runner::run_case(target, &input) {
            panic!("regression {file} fails again:\n{report}");
        }
    }
}

#[test]
fn an_empty_mask_region_does_not_hide_an_overlap() {
    // Found as "a store that loaded and unloaded reloads with other blobs": a pre-v3 store
    // (blob-id mask of 0 pages, left at page 3) whose used-cluster mask covers pages 2..6,
    // over md pages 0 and 1. The super block's overlap check compared neighbours by start,
    // and the empty region between the mask and the md region hid the overlap, so the
    // recovery's mask write zeroed two blobs' root pages. The load must refuse the store.
    let input = hex::decode(include_str!(
        "../regressions/store_load-mask-overlap-hidden-by-empty-region.hex"
    ))
    .unwrap();
    let outcome = runner::run_case(target("store_load").unwrap(), &input)
        .unwrap_or_else(|report| panic!("the case fails again:\n{report}"));
    assert_eq!(
        outcome,
        "load: super block field md: pages #..# overlap used_cluster_mask (pages #..#)"
    );
}
