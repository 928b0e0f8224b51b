//! Shrinking a failing plan: drop chunks of operations (halves, then quarters, down to
//! single ones), then reduce what is left (fewer writes in a batch or in flight, fewer
//! units, fewer clusters, fewer yields, earlier faults), keeping each change only if the
//! plan still fails the same way ([`super::Failure::class`]). Deterministic: the same
//! failing seed always shrinks to the same plan.

use super::plan::{Op, Plan, WriteSpec};
use super::{run_plan, Bugs, Failure};

/// The shrunk plan, its failure, and how many runs the shrinking took.
pub struct Shrunk {
    /// The smallest failing plan found.
    pub plan: Plan,
    /// Its failure.
    pub failure: Failure,
    /// Plans run while shrinking.
    pub runs: usize,
}

/// Shrinks `plan`, which fails with `failure`, in at most `budget` runs.
pub fn shrink(plan: &Plan, failure: Failure, bugs: Bugs, budget: usize) -> Shrunk {
    let class = failure.class();
    let mut best = Shrunk {
        plan: plan.clone(),
        failure,
        runs: 0,
    };
    let try_plan = |best: &mut Shrunk, candidate: Plan| -> bool {
        if best.runs >= budget {
            return false;
        }
        best.runs += 1;
        match run_plan(&candidate, bugs) {
            Err(failure) if failure.class() == class => {
                best.plan = candidate;
                best.failure = failure;
                true
            }
            _ => false,
        }
    };
    // Drop chunks.
    let mut chunk = best.plan.ops.len().div_ceil(2).max(1);
    loop {
        let mut start = 0;
        while start < best.plan.ops.len() {
            let mut candidate = best.plan.clone();
            let end = (start + chunk).min(candidate.ops.len());
            candidate.ops.drain(start..end);
            if !try_plan(&mut best, candidate) {
                start += chunk;
            }
        }
        if chunk == 1 || best.runs >= budget {
            break;
        }
        chunk = chunk.div_ceil(2);
    }
    // Reduce each remaining op.
    let mut index = 0;
    while index < best.plan.ops.len() && best.runs < budget {
        let mut reduced = false;
        for smaller in reductions(&best.plan.ops[index]) {
            let mut candidate = best.plan.clone();
            candidate.ops[index] = smaller;
            if try_plan(&mut best, candidate) {
                reduced = true;
                break;
            }
        }
        if !reduced {
            index += 1;
        }
    }
    best
}

fn smaller_spec(spec: &WriteSpec) -> Vec<WriteSpec> {
    let mut out = Vec::new();
    if spec.units > 1 {
        out.push(WriteSpec { units: 1, ..*spec });
    }
    if spec.unit > 0 {
        out.push(WriteSpec { unit: 0, ..*spec });
    }
    if spec.reactor > 0 {
        out.push(WriteSpec {
            reactor: 0,
            ..*spec
        });
    }
    if spec.pick > 0 {
        out.push(WriteSpec { pick: 0, ..*spec });
    }
    out
}

fn without_each(specs: &[WriteSpec]) -> Vec<Vec<WriteSpec>> {
    let mut out: Vec<Vec<WriteSpec>> = (0..specs.len())
        .map(|skip| {
            specs
                .iter()
                .enumerate()
                .filter(|&(i, _)| i != skip)
                .map(|(_, s)| *s)
                .collect()
        })
        .collect();
    for (i, spec) in specs.iter().enumerate() {
        for smaller in smaller_spec(spec) {
            let mut copy = specs.to_vec();
            copy[i] = smaller;
            out.push(copy);
        }
    }
    out
}

/// Simpler versions of `op`, most aggressive first.
fn reductions(op: &Op) -> Vec<Op> {
    match op {
        Op::Write(spec) => smaller_spec(spec).into_iter().map(Op::Write).collect(),
        Op::Batch(specs) => {
            let mut out: Vec<Op> = specs.iter().map(|s| Op::Write(*s)).collect();
            out.extend(without_each(specs).into_iter().map(Op::Batch));
            out
        }
        Op::Create { thin, clusters } => {
            let mut out = Vec::new();
            if *clusters > 1 {
                out.push(Op::Create {
                    thin: *thin,
                    clusters: 1,
                });
            }
            if *thin {
                out.push(Op::Create {
                    thin: false,
                    clusters: *clusters,
                });
            }
            out
        }
        Op::Snapshot { pick, racing } if !racing.is_empty() => {
            let mut out = vec![Op::Snapshot {
                pick: *pick,
                racing: Vec::new(),
            }];
            out.extend(without_each(racing).into_iter().map(|racing| Op::Snapshot {
                pick: *pick,
                racing,
            }));
            out
        }
        Op::Resize { pick, clusters } if *clusters > 0 => vec![Op::Resize {
            pick: *pick,
            clusters: clusters - 1,
        }],
        Op::Fault { io, errno, nth } if *nth > 1 => vec![Op::Fault {
            io: *io,
            errno: *errno,
            nth: 1,
        }],
        Op::Cut {
            inflight,
            yields,
            fate,
        } => {
            let mut out = Vec::new();
            if !inflight.is_empty() {
                out.push(Op::Cut {
                    inflight: Vec::new(),
                    yields: *yields,
                    fate: *fate,
                });
                for fewer in without_each(inflight) {
                    out.push(Op::Cut {
                        inflight: fewer,
                        yields: *yields,
                        fate: *fate,
                    });
                }
            }
            if *yields > 0 {
                out.push(Op::Cut {
                    inflight: inflight.clone(),
                    yields: 0,
                    fate: *fate,
                });
            }
            out
        }
        Op::Nbd {
            pick,
            reactor,
            structured,
            requests,
            split,
        } if requests.len() > 1 || *split != 0 => {
            let nbd = |requests: Vec<_>, split| Op::Nbd {
                pick: *pick,
                reactor: *reactor,
                structured: *structured,
                requests,
                split,
            };
            let mut out = Vec::new();
            if *split != 0 {
                out.push(nbd(requests.clone(), 0));
            }
            for skip in 0..requests.len().min(8) {
                let mut fewer = requests.clone();
                fewer.remove(skip);
                if !fewer.is_empty() {
                    out.push(nbd(fewer, *split));
                }
            }
            out
        }
        _ => Vec::new(),
    }
}
