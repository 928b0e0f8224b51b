//! Fifth review of issue 13 (`review13e`): simulation seeds found on fresh ranges. Run with
//! `cargo test -p spool-fuzz --test review13e`.

use spool_fuzz::sim::plan::{FaultErrno, FaultIo};
use spool_fuzz::sim::{run_plan, run_seed, Bugs, Op, Plan, PlanSize};

/// Found by `spool-fuzz sim --seeds 7200000..7201000 --ops 200 --faults 20` (seed 7200285;
/// replay: `cargo run -p spool-fuzz -- sim --seed 7200285 --ops 200 --faults 20`), shrunk to
/// the plan below (13 steps): a thick blob A, a snapshot S1 of it, A shrunk to 0 clusters,
/// a second snapshot S2 (A -> S2 -> S1), then the delete of S1 (merge into its one clone
/// S2) fails with -EIO (an injected flush error) after the merge committed: S2 no longer
/// reads through S1, and S1 stays, marked `SNAPRM` = S2, doomed (any load finishes the
/// delete). A clone C of S1 is then made (allowed), the store unloaded cleanly; the next
/// load cannot finish the merge ("the snapshot has a clone other than the one it names");
/// C is deleted; a cut; the next load finishes the merge and S1, which the user cloned
/// after its delete failed, is gone: `blob 0x10000001a lost: its create was covered by a
/// flush and no delete was`.
///
/// Expected: a snapshot whose merge committed but whose delete did not finish is not
/// offered for cloning (-EBUSY: finish the delete first), so nothing the user makes after
/// the failed delete reads through a blob a load will remove.
#[test]
fn sim_seed_7200285_clone_of_a_snapshot_whose_merge_committed() {
    let plan = Plan {
        seed: 7_200_285,
        ops: vec![
            Op::Create {
                thin: false,
                clusters: 1,
            },
            Op::Create {
                thin: false,
                clusters: 1,
            },
            Op::Snapshot {
                pick: 2,
                racing: Vec::new(),
            },
            Op::Resize {
                pick: 2,
                clusters: 0,
            },
            Op::Fault {
                io: FaultIo::Flush,
                errno: FaultErrno::Eio,
                nth: 7,
            },
            Op::Snapshot {
                pick: 4,
                racing: Vec::new(),
            },
            Op::Delete { pick: 6 },
            Op::Clone { pick: 4 },
            Op::Delete { pick: 2 },
            Op::Reload,
            Op::Create {
                thin: false,
                clusters: 1,
            },
            Op::Delete { pick: 7 },
            Op::Cut {
                inflight: Vec::new(),
                yields: 0,
                fate: 5_153_420_204_153_842_428,
            },
        ],
    };
    if let Err(failure) = run_plan(&plan, Bugs::default()) {
        panic!("{}", failure.report());
    }
    let size = PlanSize {
        ops: 200,
        fault_per_mille: 20,
        ..PlanSize::default()
    };
    if let Err(failure) = run_seed(7_200_285, size, Bugs::default()) {
        panic!("seed 7200285 (--ops 200 --faults 20): {}", failure.what);
    }
}
