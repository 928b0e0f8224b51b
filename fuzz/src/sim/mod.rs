//! The whole-engine deterministic simulation (`spool-fuzz sim`): seeded workloads of blob
//! operations and injected faults, run by the engine's real reactors, metadata reactor and
//! blob channels on simulated time over a simulated device, checked against a model after
//! every restart. A seed is a plan ([`plan`]); a failing plan shrinks ([`shrink`]) to a short
//! one; `docs/testing.md` describes it all.
//!
//! - [`plan`]: operations and faults, drawn from the seed.
//! - [`model`]: what each io_unit may read now and after a power cut.
//! - [`data`]: the bytes each write puts down (naming the write and the unit).
//! - [`life`]: one life of the engine, from init or load to unload or power cut.
//! - [`nbd`]: a simulated NBD client, served by the daemon's front end with no socket.
//! - [`cli`]: the `sim` subcommand (one seed, a range, a soak).
//! - [`shrink`]: dropping and reducing a failing plan's steps.

pub mod cli;
pub mod data;
pub mod life;
pub mod model;
pub mod nbd;
pub mod plan;
pub mod shrink;

use std::cell::RefCell;

use spool_blob::check::check_image;

pub use life::Bugs;
use life::{run_life, End};
use model::Model;
pub use plan::{Op, Plan, PlanSize};

/// What a passing run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// One line per operation, restart and check (the trace; equal for equal plans).
    pub trace: Vec<String>,
    /// Requests failed by injected faults.
    pub injected: u64,
    /// Power cuts.
    pub cuts: usize,
    /// Clean reloads.
    pub reloads: usize,
    /// Operations run (restarts included).
    pub ops: usize,
    /// Operations that failed with -ENOSPC (a full device, or an injected ENOSPC).
    pub enospc: usize,
}

/// A failing run: where, what, and the trace up to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The life (0 = the first) it failed in.
    pub life: usize,
    /// What went wrong.
    pub what: String,
    /// The trace up to the failure.
    pub trace: Vec<String>,
}

impl Failure {
    /// What went wrong and the trace up to it, one step per indented line (what a test
    /// prints when a plan fails).
    pub fn report(&self) -> String {
        format!("{}\n  {}", self.what, self.trace.join("\n  "))
    }

    /// The failure's class, for shrinking: the message with numbers removed (so a shrunk
    /// plan must fail the same way, not just fail).
    pub fn class(&self) -> String {
        let what = match self.what.find(": ") {
            // "op 12 Write(..): blob ... lost" → the part after the op.
            Some(at) if self.what.starts_with("op ") => &self.what[at + 2..],
            _ => &self.what,
        };
        what.chars()
            .filter(|c| !c.is_ascii_digit())
            .take(40)
            .collect()
    }
}

/// Runs `plan` with `bugs` planted.
pub fn run_plan(plan: &Plan, bugs: Bugs) -> Result<Report, Failure> {
    let mut trace = Vec::new();
    let mut model = Model::new(life::UPC);
    let mut image: Option<Vec<u8>> = None;
    let mut injected = 0;
    let (mut cuts, mut reloads) = (0, 0);
    let mut lives: Vec<(Vec<Op>, End)> = Vec::new();
    let mut ops = Vec::new();
    for op in &plan.ops {
        match op {
            Op::Reload => lives.push((std::mem::take(&mut ops), End::Reload)),
            Op::Cut {
                inflight,
                yields,
                fate,
            } => lives.push((
                std::mem::take(&mut ops),
                End::Cut {
                    inflight: inflight.clone(),
                    yields: *yields,
                    fate: *fate,
                },
            )),
            op => ops.push(op.clone()),
        }
    }
    lives.push((ops, End::Verify));
    for (index, (ops, end)) in lives.into_iter().enumerate() {
        let kind = match &end {
            End::Reload => "reload",
            End::Cut { .. } => "cut",
            End::Verify => "verify",
        };
        trace.push(format!("life {index}: {} ops, then {kind}", ops.len()));
        let seed = plan
            .seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(index as u64);
        let out = run_life(seed, image.take(), ops, end.clone(), model, bugs).map_err(
            |(log, what)| {
                trace.extend(log);
                Failure {
                    life: index,
                    what,
                    trace: trace.clone(),
                }
            },
        )?;
        trace.extend(out.log);
        trace.push(format!("life {index}: sim trace {:016x}", out.trace_hash));
        injected += out.injected;
        match end {
            End::Reload => reloads += 1,
            End::Cut { .. } => cuts += 1,
            End::Verify => {}
        }
        if !matches!(end, End::Verify) {
            offline_check(&out.image).map_err(|what| Failure {
                life: index,
                what,
                trace: trace.clone(),
            })?;
        }
        model = out.model;
        image = Some(out.image);
    }
    let enospc = trace
        .iter()
        .map(|line| line.matches("errno -28").count())
        .sum();
    Ok(Report {
        enospc,
        trace,
        injected,
        cuts,
        reloads,
        ops: plan.ops.len(),
    })
}

/// Runs `spool check`'s checker on an image a restart starts from: a crash may leave only
/// what a load repairs (a half-made snapshot, whose original may already read through it,
/// or a half-done merge); any other problem fails the run.
pub fn offline_check(image: &[u8]) -> Result<(), String> {
    let file = RefCell::new(image.to_vec());
    let checked =
        check_image(&file, &mut |_| {}).map_err(|err| format!("the checker cannot run: {err}"))?;
    let unexpected: Vec<String> = checked
        .report
        .beyond_crash_repair()
        .map(|p| p.to_string())
        .collect();
    if unexpected.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "spool check finds problems in the image: {}",
            unexpected.join("; ")
        ))
    }
}

/// Runs the plan of `seed`.
pub fn run_seed(seed: u64, size: PlanSize, bugs: Bugs) -> Result<Report, Failure> {
    run_plan(&Plan::generate(seed, size), bugs)
}
