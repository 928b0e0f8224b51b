//! Goal: the whole-engine simulation runs in CI: at least 1,000 seeds per run (each a plan of
//! blob operations, NBD clients served by the daemon's front end, injected faults, clean
//! reloads and power cuts, checked against the model after every restart), replays a seed
//! exactly, catches planted bugs within a few seeds, and shrinks a failure to a short plan.
//! Method: `spool_fuzz::sim` on fixed seed ranges plus a
//! fresh range from the clock (printed; `SPOOL_SIM_SEED` replays it), so each CI run also
//! tries seeds no run tried before. `SPOOL_SIM_SEEDS` sets the seeds per range (default 500,
//! two ranges). A failure prints its shrunk plan and the `spool-fuzz sim` command replaying it.

use spool_fuzz::sim::shrink::shrink;
use spool_fuzz::sim::{run_plan, run_seed, Bugs, Op, Plan, PlanSize};

fn seeds_per_range() -> u64 {
    std::env::var("SPOOL_SIM_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500)
}

/// Runs `seeds`; on the first failure, shrinks it and panics with the plan and the replay.
fn run_range(seeds: std::ops::Range<u64>) {
    let started = std::time::Instant::now();
    let (mut faults, mut cuts, mut reloads, mut enospc) = (0, 0, 0, 0);
    let count = seeds.end - seeds.start;
    for seed in seeds.clone() {
        match run_seed(seed, PlanSize::default(), Bugs::default()) {
            Ok(report) => {
                faults += report.injected;
                cuts += report.cuts;
                reloads += report.reloads;
                enospc += report.enospc;
            }
            Err(failure) => {
                let plan = Plan::generate(seed, PlanSize::default());
                let shrunk = shrink(&plan, failure.clone(), Bugs::default(), 200);
                let steps: Vec<String> = shrunk
                    .plan
                    .ops
                    .iter()
                    .map(|op| format!("  {op:?}"))
                    .collect();
                panic!(
                    "seed {seed} fails in life {}: {}\nreplay: cargo run -p spool-fuzz -- sim --seed {seed}\nshrunk to {} steps ({}):\n{}\ntrace:\n  {}",
                    failure.life,
                    failure.what,
                    shrunk.plan.ops.len(),
                    shrunk.failure.what,
                    steps.join("\n"),
                    shrunk.failure.trace.join("\n  ")
                );
            }
        }
    }
    eprintln!(
        "sim seeds {}..{}: {count} passed in {:.1} s: {faults} injected faults, {enospc} ENOSPC failures, {cuts} power cuts, {reloads} clean reloads",
        seeds.start,
        seeds.end,
        started.elapsed().as_secs_f64()
    );
    assert!(cuts >= count as usize, "every plan ends with a power cut");
    assert!(faults > 0 && reloads > 0 && enospc > 0, "the faults ran");
}

#[test]
fn fixed_seeds_pass() {
    run_range(0..seeds_per_range());
}

/// The second half of CI's 1,000 seeds: fixed too (`N..2N`), so CI is deterministic and a
/// bug a fresh seed would find one run in several does not fail an unrelated change. Fresh
/// seeds run with `SPOOL_SIM_FRESH=1` (from the clock; printed) or `SPOOL_SIM_SEED=S` (from S),
/// and without end with `spool-fuzz sim --soak HOURS` (docs/testing.md).
#[test]
fn more_seeds_pass() {
    let per_range = seeds_per_range();
    let start = match std::env::var("SPOOL_SIM_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(start) => start,
        None if std::env::var_os("SPOOL_SIM_FRESH").is_some() => {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64 % 1_000_000_007)
                + 1_000_000
        }
        None => per_range,
    };
    eprintln!("sim: seeds from {start} (SPOOL_SIM_SEED={start} replays this range)");
    run_range(start..start + per_range);
}

#[test]
fn a_seed_replays_exactly() {
    let first = run_seed(7, PlanSize::default(), Bugs::default()).expect("seed 7 passes");
    let again = run_seed(7, PlanSize::default(), Bugs::default()).expect("seed 7 passes");
    assert!(first.trace.len() > 10, "a real trace: {:?}", first.trace);
    assert!(first.trace.iter().any(|line| line.contains("sim trace")));
    assert_eq!(first, again, "one seed, one trace");
    let other = run_seed(8, PlanSize::default(), Bugs::default()).expect("seed 8 passes");
    assert_ne!(first.trace, other.trace, "another seed, another trace");
}

/// The first seed (of 40) a planted bug fails, and its failure.
fn first_failure(bugs: Bugs) -> (u64, spool_fuzz::sim::Failure) {
    for seed in 0..40 {
        if let Err(failure) = run_seed(seed, PlanSize::default(), bugs) {
            return (seed, failure);
        }
    }
    panic!("the planted bug {bugs:?} survived 40 seeds: the simulation does not catch it");
}

#[test]
fn a_device_that_lies_about_flushes_is_caught() {
    let (seed, failure) = first_failure(Bugs {
        flush_lies: true,
        ..Bugs::default()
    });
    eprintln!("flush-lies caught by seed {seed}: {}", failure.what);
    // The same seeds pass without the bug.
    for clean in 0..=seed {
        run_seed(clean, PlanSize::default(), Bugs::default()).expect("passes without the bug");
    }
}

#[test]
fn skipped_ordering_flushes_are_caught_and_shrink_to_a_short_plan() {
    let bugs = Bugs {
        skip_ordering_flushes: true,
        ..Bugs::default()
    };
    let (seed, failure) = first_failure(bugs);
    let plan = Plan::generate(seed, PlanSize::default());
    let shrunk = shrink(&plan, failure.clone(), bugs, 150);
    assert!(
        shrunk.plan.ops.len() <= 8 && shrunk.plan.ops.len() < plan.ops.len(),
        "seed {seed} shrank from {} to {} steps: {:?}",
        plan.ops.len(),
        shrunk.plan.ops.len(),
        shrunk.plan.ops
    );
    assert_eq!(shrunk.failure.class(), failure.class());
    // The shrunk plan fails on replay, and passes without the bug.
    assert!(run_plan(&shrunk.plan, bugs).is_err());
    run_plan(&shrunk.plan, Bugs::default()).expect("the shrunk plan passes without the bug");
}

/// The NBD front end's durability promise: a FLUSH reply, or a FUA write's, means the data
/// survives a power cut. Planted: the request execution acknowledges both without a device
/// flush (`Bugs::nbd_skips_flushes`); a seed must catch it, and shrink to a plan whose NBD
/// client is what fails it.
#[test]
fn nbd_flush_and_fua_acknowledged_without_a_flush_are_caught() {
    let bugs = Bugs {
        nbd_skips_flushes: true,
        ..Bugs::default()
    };
    let (seed, failure) = first_failure(bugs);
    eprintln!("nbd-skips-flushes caught by seed {seed}: {}", failure.what);
    let plan = Plan::generate(seed, PlanSize::default());
    let shrunk = shrink(&plan, failure, bugs, 150);
    assert!(
        shrunk
            .plan
            .ops
            .iter()
            .any(|op| matches!(op, Op::Nbd { .. })),
        "the shrunk plan has an NBD client: {:?}",
        shrunk.plan.ops
    );
    assert!(run_plan(&shrunk.plan, bugs).is_err());
    run_plan(&shrunk.plan, Bugs::default()).expect("the shrunk plan passes without the bug");
    for clean in 0..=seed {
        run_seed(clean, PlanSize::default(), Bugs::default()).expect("passes without the bug");
    }
}

/// The bounded dirty load reads only the md chunks the root-superset record covers; a
/// create whose root lands past them must grow the record first. The sim's store has two
/// chunks (`life::MD_PAGES`) and its blobs carry xattrs spanning several md pages, so plans
/// root blobs in the second chunk. Planted: the record never grows
/// (`Bugs::skip_root_superset_growth`); a power cut then hides those blobs from the load (a
/// durable blob lost, or a clone whose parent snapshot is "not a blob in this store"). A
/// seed must catch it and shrink to a short plan that passes without the bug.
#[test]
fn a_root_superset_record_that_does_not_grow_is_caught() {
    let bugs = Bugs {
        skip_root_superset_growth: true,
        ..Bugs::default()
    };
    let (seed, failure) = first_failure(bugs);
    eprintln!(
        "skip-root-superset-growth caught by seed {seed}: {}",
        failure.what
    );
    let plan = Plan::generate(seed, PlanSize::default());
    let shrunk = shrink(&plan, failure, bugs, 150);
    assert!(
        shrunk.plan.ops.len() < plan.ops.len(),
        "seed {seed} shrank: {:?}",
        shrunk.plan.ops
    );
    assert!(run_plan(&shrunk.plan, bugs).is_err());
    run_plan(&shrunk.plan, Bugs::default()).expect("the shrunk plan passes without the bug");
    for clean in 0..=seed {
        run_seed(clean, PlanSize::default(), Bugs::default()).expect("passes without the bug");
    }
}

/// Found by seed 2 (and 74): a thick blob's new cluster shows bytes another write left on a
/// free cluster. Seed 2: two racing first writes to one cluster of a clone; the loser's
/// claimed cluster, already filled with its data, is released without an unmap; a thick
/// resize then claims it and reads the loser's data at unit 16 (written for unit 0). Seed 74:
/// a write to a thick blob whose create a power cut lost leaves its data on a free cluster,
/// which a later thick resize exposes. The blob layer does not zero a thick blob's clusters
/// (as SPDK does not), so the default check accepts any bytes there; this test asks for
/// zeros (`--strict-thick-zeros`). Ignored until thick claims zero (or released dirty
/// clusters are unmapped).
#[test]
#[ignore = "thick blob clusters are not zeroed: stale data from a race loser or a lost create shows"]
fn sim_seed_2_thick_grow_exposes_stale_cluster_data() {
    let strict = Bugs {
        strict_thick_zeros: true,
        ..Bugs::default()
    };
    for seed in [2, 74] {
        if let Err(failure) = run_seed(seed, PlanSize::default(), strict) {
            panic!("seed {seed}: {}", failure.what);
        }
    }
}

/// Found by seed 1388: a delete of a snapshot with one clone (a merge) whose last flush
/// fails leaves the snapshot in memory with the clusters the clone took zeroed in its map;
/// the snapshot was thick, so the unload wrote a thick chain with holes, which does not parse
/// ("unallocated cluster in a thick blob"): `spool check` reported it and the snapshot no
/// longer opened. Fixed: such a snapshot is written thin. The shrunk plan, then the seed.
#[test]
fn sim_seed_1388_failed_merge_delete_leaves_a_parsable_snapshot() {
    use spool_fuzz::sim::plan::{FaultErrno, FaultIo};
    let shrunk = Plan {
        seed: 1388,
        ops: vec![
            Op::Create {
                thin: false,
                clusters: 1,
            },
            Op::Snapshot {
                pick: 0,
                racing: Vec::new(),
            },
            Op::Inflate { pick: 1 },
            Op::Create {
                thin: false,
                clusters: 1,
            },
            Op::Cut {
                inflight: Vec::new(),
                yields: 0,
                fate: 6_686_309_370_536_808_494,
            },
            Op::Fault {
                io: FaultIo::Flush,
                errno: FaultErrno::Eio,
                nth: 5,
            },
            Op::Snapshot {
                pick: 0,
                racing: Vec::new(),
            },
            Op::Delete { pick: 3 },
            Op::Reload,
        ],
    };
    let report =
        run_plan(&shrunk, Bugs::default()).unwrap_or_else(|failure| panic!("{}", failure.what));
    assert!(
        report
            .trace
            .iter()
            .any(|line| line.starts_with("Delete") && line.ends_with("errno -5")),
        "the merge's delete failed on the injected flush error: {:#?}",
        report.trace
    );
    run_seed(1388, PlanSize::default(), Bugs::default())
        .unwrap_or_else(|failure| panic!("{}", failure.what));
}

/// The process's resident set in KiB (Linux), if it can be read.
fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Seed 0 with the racing-snapshot step "hung": not the engine, the driver. Every power cut
/// leaked the crashed process's store (on purpose: nothing of it may run again), and with it
/// the simulated device's durable and live images (2 MiB each), about 16 MiB a seed: a range
/// of 500 seeds in one process grew to 8 GiB (two such ranges run at once in this test
/// binary) and the run crawled in swap or died. A cut now frees the device's images
/// (`CrashBdev::discard_media`). All of these seeds pass on their own; the range from seed 0
/// in one process must stay small.
#[test]
fn sim_seed_0_power_cuts_do_not_leak_the_device() {
    let Some(before) = rss_kib() else {
        eprintln!("no /proc/self/status: skipped");
        return;
    };
    let mut cuts = 0;
    for seed in 0..40 {
        let report = run_seed(seed, PlanSize::default(), Bugs::default())
            .unwrap_or_else(|failure| panic!("seed {seed}: {}", failure.what));
        cuts += report.cuts;
    }
    let grown = rss_kib().unwrap_or(0).saturating_sub(before);
    eprintln!("40 seeds, {cuts} power cuts: the resident set grew {grown} KiB");
    // Leaking 4 MiB a cut: over 500 MiB. Other tests of this binary run at the same time,
    // so the bound leaves them room.
    assert!(
        grown < 256 << 10,
        "the resident set grew {grown} KiB over 40 seeds ({cuts} power cuts): a cut leaks the device"
    );
}

/// Found by seed 4111 (a snapshot racing writes to its blob): a write planned its pieces
/// (cluster 1 on device cluster 9), parked in a thin allocation of cluster 0 (waiting for
/// another write's), and the snapshot's freeze went on without it and handed the blob's
/// clusters (9 included) over to the new snapshot. Woken after the unfreeze, the write found
/// cluster 0 allocated and unparked inside the allocation path, so `write_pieces` did not
/// plan the rest again: its cluster-1 piece went to device cluster 9, now the read-only
/// snapshot's, and the blob, which reads cluster 1 through the snapshot until it allocates
/// its own, lost it once the other write allocated cluster 1 from the snapshot's old data.
/// An acknowledged write read back zeros (unit 23). Fixed: a write that was parked plans
/// its remaining pieces again when the map was replaced (`io::write_pieces`, `write_zeroes`).
#[test]
fn sim_seed_4111_write_parked_across_a_snapshot_lost_its_next_cluster() {
    let w = |unit, units| spool_fuzz::sim::plan::WriteSpec {
        pick: 0,
        unit,
        units,
        reactor: 0,
    };
    let mut ops = vec![
        Op::Create {
            thin: false,
            clusters: 0,
        },
        Op::Create {
            thin: false,
            clusters: 1,
        },
        Op::Snapshot {
            pick: 3,
            racing: vec![w(0, 1), w(0, 1)],
        },
        Op::Create {
            thin: false,
            clusters: 3,
        },
        Op::Delete { pick: 0 },
        Op::Snapshot {
            pick: 4,
            racing: vec![w(0, 1)],
        },
        Op::Write(w(0, 1)),
        Op::Snapshot {
            pick: 7,
            racing: vec![w(0, 1)],
        },
        Op::Delete { pick: 7 },
        Op::Create {
            thin: false,
            clusters: 1,
        },
        Op::Snapshot {
            pick: 5,
            racing: vec![
                w(65, 1),
                spool_fuzz::sim::plan::WriteSpec {
                    reactor: 1,
                    ..w(0, 1)
                },
            ],
        },
        // The racing writes: units 0..23 and 0..24 of the 3-cluster blob (16 units a
        // cluster); the second's piece in cluster 1 was the one lost.
        Op::Snapshot {
            pick: 2,
            racing: vec![w(0, 23), w(0, 24)],
        },
    ];
    ops.extend((0..8).map(|pick| Op::Read { pick }));
    ops.push(Op::Flush { reactor: 0 });
    ops.push(Op::Reload);
    let plan = Plan { seed: 4111, ops };
    if let Err(failure) = run_plan(&plan, Bugs::default()) {
        panic!("{}", failure.report());
    }
    run_seed(4111, PlanSize::default(), Bugs::default())
        .unwrap_or_else(|failure| panic!("seed 4111: {}", failure.what));
}

/// Found by seed 4797 (seed 4475 fails the same way on main, without racing snapshots; so
/// does 30039): inflating a thin blob that has no parent (both clusters allocated by one
/// write just before) only turns it thick, and a power cut right after, with the two pending
/// writes reaching the media (shuffled), left an image whose blob is thick with an
/// unallocated cluster in its extent page: `spool check` reported "unallocated cluster in a
/// thick blob". The write's second insert rewrote the extent page in place, then closed the
/// blob; the inflate opened it again, and the new in-memory state had forgotten that
/// unflushed in-place write, so the thick root was written with no flush before it (the cut
/// kept the root, lost the page). Fixed: a blob opened from disk counts the last metadata
/// write made so far as its last in-place write.
#[test]
fn sim_seed_4797_inflate_then_cut_leaves_a_thick_blob_with_a_hole() {
    let plan = Plan {
        seed: 4797,
        ops: vec![
            Op::Create {
                thin: true,
                clusters: 2,
            },
            Op::Write(spool_fuzz::sim::plan::WriteSpec {
                pick: 0,
                unit: 47,
                units: 3,
                reactor: 0,
            }),
            Op::Inflate { pick: 4 },
            Op::Cut {
                inflight: Vec::new(),
                yields: 0,
                fate: 17_668_154_026_951_515_210,
            },
        ],
    };
    if let Err(failure) = run_plan(&plan, Bugs::default()) {
        panic!("{}", failure.report());
    }
    for seed in [4475, 4797, 30039] {
        run_seed(seed, PlanSize::default(), Bugs::default())
            .unwrap_or_else(|failure| panic!("seed {seed}: {}", failure.what));
    }
}

/// Found by seed 964254536: a clone (0x9) shrunk to 0 clusters, snapshotted (0xa: 0
/// clusters, its parent 0x6 holding data), then grown to 1 cluster reads zeros there (past
/// its parent's end, as in SPDK). Deleting 0xa merges it into its only clone, which then
/// reads through 0x6: the grown cluster showed 0x6's data (unit 0 read value 3, after the
/// restart, where the model allowed only zeros). The model is right: a snapshot's delete must
/// not change what its clone reads. SPDK re-points the clone the same way (and would show the
/// grandparent's data too); Spool now gives the clone zeroed clusters of its own first where
/// the grandparent's chain would show data (`snapshot::past_parent_end_shown_by`; a decouple
/// likewise). The shrunk plan, then the seed.
#[test]
fn sim_seed_964254536_deleting_a_zero_cluster_snapshot_keeps_what_its_clone_reads() {
    let w = |pick, unit, units| {
        Op::Write(spool_fuzz::sim::plan::WriteSpec {
            pick,
            unit,
            units,
            reactor: 0,
        })
    };
    let plan = Plan {
        seed: 964_254_536,
        ops: vec![
            Op::Create {
                thin: true,
                clusters: 2,
            },
            w(0, 59, 1),
            Op::Create {
                thin: false,
                clusters: 0,
            },
            Op::Delete { pick: 3 },
            Op::Create {
                thin: false,
                clusters: 2,
            },
            w(0, 0, 1),
            w(5, 0, 1),
            Op::Create {
                thin: false,
                clusters: 1,
            },
            Op::Snapshot {
                pick: 2,
                racing: Vec::new(),
            },
            w(5, 0, 1),
            Op::Clone { pick: 0 },
            Op::Clone { pick: 1 },
            Op::Resize {
                pick: 4,
                clusters: 0,
            },
            Op::Snapshot {
                pick: 4,
                racing: Vec::new(),
            },
            Op::Flush { reactor: 1 },
            w(7, 99, 16),
            Op::Create {
                thin: false,
                clusters: 1,
            },
            // Picks renumbered for the store's 12-page md chains per create (ids and so
            // the model's order changed): the clone grown, then the 0-cluster snapshot deleted.
            Op::Resize {
                pick: 4,
                clusters: 1,
            },
            Op::Delete { pick: 6 },
            Op::Cut {
                inflight: Vec::new(),
                yields: 0,
                fate: 15_811_867_058_900_768_384,
            },
        ],
    };
    let report =
        run_plan(&plan, Bugs::default()).unwrap_or_else(|failure| panic!("{}", failure.report()));
    // The second snapshot (of the clone shrunk to 0 clusters) is the one deleted, and the
    // clone the grown one.
    let made = |prefix: &str| {
        report
            .trace
            .iter()
            .find(|line| line.starts_with(prefix))
            .and_then(|line| line.split(" -> ").nth(2))
            .map(|id| id.split(' ').next().unwrap_or_default().to_string())
    };
    let snapshot = made("Snapshot { pick: 4,").expect("the snapshot of the clone was taken");
    let clone = report
        .trace
        .iter()
        .find(|line| line.starts_with("Snapshot { pick: 4,"))
        .and_then(|line| line.split(" -> ").nth(1))
        .expect("snapshot line")
        .to_string();
    assert!(
        report
            .trace
            .iter()
            .any(|line| line == &format!("Resize {{ pick: 4, clusters: 1 }} -> {clone} ok"))
            && report
                .trace
                .iter()
                .any(|line| line == &format!("Delete {{ pick: 6 }} -> {snapshot} ok")),
        "the clone {clone} was grown and the 0-cluster snapshot {snapshot} between it and its grandparent deleted: {:#?}",
        report.trace
    );
    run_seed(964_254_536, PlanSize::default(), Bugs::default())
        .unwrap_or_else(|failure| panic!("seed 964254536: {}", failure.what));
}

/// Found by seed 42524 (open; fails the same way without this branch's fixes). Not traced
/// yet; the likely reading: the delete of a snapshot (0x1) with one clone (0x0) merges it;
/// the clone's new root commits, then a flush fails (-EIO) and the delete fails, leaving 0x1 on disk with `SNAPRM` = 0x0 and its
/// old map (in memory its taken clusters are zeroed, but that root is never written). A
/// snapshot of the clone (0x4) then takes the clone's map, clusters 0x1 still names on disk:
/// after the cut `spool check` reports clusters shared by 0x4 and 0x1 (only the marked pair
/// 0x1/0x0 may share). The load's merge repair (`forget_merged_clusters`) compares 0x1's map
/// with the clone's own map only, now empty, so it would free clusters 0x4 maps.
#[test]

fn sim_seed_42524_failed_merge_then_snapshot_of_the_clone_shares_clusters() {
    use spool_fuzz::sim::plan::{FaultErrno, FaultIo};
    let w = |unit| spool_fuzz::sim::plan::WriteSpec {
        pick: 0,
        unit,
        units: 1,
        reactor: 0,
    };
    let plan = Plan {
        seed: 42524,
        ops: vec![
            Op::Create {
                thin: true,
                clusters: 5,
            },
            Op::Fault {
                io: FaultIo::Flush,
                errno: FaultErrno::Eio,
                nth: 10,
            },
            Op::Write(w(0)),
            Op::Batch(vec![w(114), w(137)]),
            Op::Snapshot {
                pick: 2,
                racing: Vec::new(),
            },
            Op::Delete { pick: 5 },
            Op::Snapshot {
                pick: 4,
                racing: Vec::new(),
            },
            Op::Cut {
                inflight: Vec::new(),
                yields: 0,
                fate: 18_270_685_293_136_912_525,
            },
        ],
    };
    if let Err(failure) = run_plan(&plan, Bugs::default()) {
        panic!("{}", failure.report());
    }
    run_seed(42524, PlanSize::default(), Bugs::default())
        .unwrap_or_else(|failure| panic!("seed 42524: {}", failure.what));
}
