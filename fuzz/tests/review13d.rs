//! Review of issue 13 (fourth pass, `review13d`): the whole-engine simulation on seeds and
//! fault rates the CI ranges do not use. Each test fails today and passes once the bug it
//! names is fixed. Run with `cargo test -p spool-fuzz --test review13d`.

use spool_fuzz::sim::plan::{FaultErrno, FaultIo, WriteSpec};
use spool_fuzz::sim::{run_plan, run_seed, Bugs, Op, Plan, PlanSize};

/// Found by `spool-fuzz sim --soak 0.2 --faults 150 --ops 80` (seed 108994040; replay:
/// `cargo run -p spool-fuzz -- sim --seed 108994040 --ops 80 --faults 150`), shrunk to the
/// plan below. A snapshot of a thin blob fails on an injected write -EIO after its
/// half-made root (`SNAPTMP`) reached the disk; a power cut; the next (dirty) load removes
/// the half-made snapshot as "never taken"; a clean unload. The clean image's
/// used-md-page mask then marks an md page no blob uses (`spool check`: `mask_bit_extra:
/// md page 24 used_page_mask[24]: expected clear (nothing uses it), found set`): the
/// load's rollback of the half-made snapshot leaks one of its md pages for good (every
/// later clean load trusts the mask; only `spool check --repair` gets it back).
///
/// Expected: a crash in the middle of a snapshot, then load and clean unload, leaves a
/// store `spool check` calls consistent (the issue: "checked against a model after every
/// restart: no cluster owned twice or leaked, every store loads"; a leaked md page is the
/// metadata side of the same leak).
#[test]
fn sim_seed_108994040_half_made_snapshot_rollback_leaks_an_md_page() {
    let plan = Plan {
        seed: 108_994_040,
        ops: vec![
            Op::Create {
                thin: false,
                clusters: 0,
            },
            Op::Create {
                thin: false,
                clusters: 1,
            },
            Op::Cut {
                inflight: Vec::new(),
                yields: 0,
                fate: 360_736_987_662_073_777,
            },
            Op::Create {
                thin: true,
                clusters: 1,
            },
            Op::Fault {
                io: FaultIo::Flush,
                errno: FaultErrno::Eio,
                nth: 6,
            },
            Op::Delete { pick: 0 },
            Op::Write(WriteSpec {
                pick: 0,
                unit: 0,
                units: 1,
                reactor: 0,
            }),
            Op::Fault {
                io: FaultIo::Write,
                errno: FaultErrno::Eio,
                nth: 10,
            },
            Op::Snapshot {
                pick: 7,
                racing: Vec::new(),
            },
            Op::Cut {
                inflight: Vec::new(),
                yields: 0,
                fate: 15_743_820_818_120_563_370,
            },
            Op::Reload,
        ],
    };
    if let Err(failure) = run_plan(&plan, Bugs::default()) {
        panic!("{}", failure.report());
    }
    // The whole seed, as the soak ran it.
    let size = PlanSize {
        ops: 80,
        fault_per_mille: 150,
        ..PlanSize::default()
    };
    if let Err(failure) = run_seed(108_994_040, size, Bugs::default()) {
        panic!("seed 108994040 (--ops 80 --faults 150): {}", failure.what);
    }
}

/// Found by `spool-fuzz sim --soak 0.2 --faults 300` (seed 412622595; replay: `cargo run -p
/// spool-fuzz -- sim --seed 412622595 --faults 300`), shrunk to the plan below: a thick
/// blob grown to one cluster (table form: one extent page), a snapshot of it failing on an
/// injected write -EIO (a half-made snapshot, `SNAPTMP`, stays on disk sharing the
/// original's extent page), then the delete of the original succeeds, and a power cut with
/// nothing pending. The delete zeroed the original's extent page (md page 12), which the
/// half-made snapshot's extent table still names: `spool check` reports `extent_page: blob
/// 0x100000001 md page 12 extent page 0: ... CRC mismatch`. A dirty load by SPDK v24.01
/// fails the whole store on such a page (`bs_load_replay_extent_page_cpl`: an invalid
/// extent page is -EILSEQ; see `spdk_dirty_load` in blob/tests/spdk_dirty_rules.rs), so this
/// crash leaves a store SPDK cannot load (confirmed on the cut image: md page 1 is a valid
/// root with `SNAPTMP` and an extent table naming md page 12, which is all zeros).
///
/// Expected: a failed snapshot followed by an acknowledged delete and a power cut leaves a
/// store whose only problem is one a load repairs (the half-made snapshot), with no md page
/// one root references zeroed under it: every store Spool leaves must load in SPDK
/// (issue 13, "Constraint: SPDK must still load every store Spool leaves behind").
#[test]
fn sim_seed_412622595_delete_after_a_failed_snapshot_zeroes_an_extent_page_it_names() {
    let plan = Plan {
        seed: 412_622_595,
        ops: vec![
            Op::Fault {
                io: FaultIo::Flush,
                errno: FaultErrno::Enospc,
                nth: 5,
            },
            Op::Create {
                thin: false,
                clusters: 0,
            },
            Op::Resize {
                pick: 1,
                clusters: 1,
            },
            Op::Fault {
                io: FaultIo::Write,
                errno: FaultErrno::Eio,
                nth: 7,
            },
            Op::Snapshot {
                pick: 0,
                racing: Vec::new(),
            },
            Op::Delete { pick: 0 },
            Op::Cut {
                inflight: Vec::new(),
                yields: 0,
                fate: 8_193_019_546_148_474_039,
            },
        ],
    };
    if let Err(failure) = run_plan(&plan, Bugs::default()) {
        panic!("{}", failure.report());
    }
    let size = PlanSize {
        fault_per_mille: 300,
        ..PlanSize::default()
    };
    if let Err(failure) = run_seed(412_622_595, size, Bugs::default()) {
        panic!("seed 412622595 (--faults 300): {}", failure.what);
    }
}

/// Found by `spool-fuzz sim --soak 0.2 --faults 200 --ops 60` (seed 595970084; replay:
/// `cargo run -p spool-fuzz -- sim --seed 595970084 --ops 60 --faults 200`), shrunk to the
/// plan below. The same family as seed 412622595 without any delete: a thin blob written
/// once (one cluster, one extent page), a snapshot of it failing on an injected write -EIO,
/// a flush that succeeds, a power cut with nothing pending. The half-made snapshot's root
/// (`SNAPTMP`) is on disk and its extent table names md page 12, which no longer holds an
/// extent page (shrunk: `CRC mismatch`; the full seed: page 12 reused as another blob's
/// chain page, `sequence or next set` and `extent_page_shared`). After the failed snapshot
/// the page was given up (or rewritten) in memory while a durable root still names it.
///
/// Expected: a failed snapshot leaves, after a flush and a cut, nothing worse than a
/// half-made snapshot a load rolls back: no durable root naming an md page that is not its
/// extent page (SPDK's dirty load fails the whole store with -EILSEQ on such a page).
/// Seed 771648179 (`--ops 60`, default fault rate) fails the same way, checked below once
/// the shrunk plan passes.
#[test]
fn sim_seed_595970084_failed_snapshot_leaves_a_root_naming_a_lost_extent_page() {
    let plan = Plan {
        seed: 595_970_084,
        ops: vec![
            Op::Reload,
            Op::Fault {
                io: FaultIo::Flush,
                errno: FaultErrno::Eio,
                nth: 8,
            },
            Op::Flush { reactor: 0 },
            Op::Create {
                thin: true,
                clusters: 1,
            },
            Op::Write(WriteSpec {
                pick: 0,
                unit: 0,
                units: 1,
                reactor: 0,
            }),
            Op::Fault {
                io: FaultIo::Write,
                errno: FaultErrno::Eio,
                nth: 6,
            },
            Op::Snapshot {
                pick: 7,
                racing: Vec::new(),
            },
            Op::Flush { reactor: 0 },
            Op::Cut {
                inflight: Vec::new(),
                yields: 0,
                fate: 6_885_834_513_266_968_916,
            },
        ],
    };
    if let Err(failure) = run_plan(&plan, Bugs::default()) {
        panic!("{}", failure.report());
    }
    // The same family at the default fault rate (found by `--soak 0.2 --ops 60`: a failed
    // snapshot, then a create, then a cut; `extent_page: blob 0x100000000 md page 68 ...
    // CRC mismatch`).
    let size = PlanSize {
        ops: 60,
        ..PlanSize::default()
    };
    if let Err(failure) = run_seed(771_648_179, size, Bugs::default()) {
        panic!("seed 771648179 (--ops 60): {}", failure.what);
    }
}

/// Found by `spool-fuzz sim --soak 0.2 --faults 100` (seed 850029280; replay: `cargo run -p
/// spool-fuzz -- sim --seed 850029280 --faults 100`); the shortest plan of the family
/// above, in one life: a thick blob (table form) created and written, never flushed; a
/// snapshot of it failing (an injected flush -EIO, then a write -EIO); a power cut with
/// 12 writes pending, 7 of them reaching the media. The half-made snapshot's root
/// (`SNAPTMP`, blob 0x10000000d) reached the media, and the extent page its extent table
/// names (md page 1, which the original's writes used and no flush made durable: likely
/// the original's extent page) did not: `spool
/// check` reports `extent_page: blob 0x10000000d md page 1 extent page 0: ... CRC
/// mismatch`. A root naming a page must only be written after a flush made that page
/// durable (docs/format.md; the fix for seed 4797); here a failed flush did not stop the
/// dependent root write (a suspicion from the trace: the snapshot returned -EIO and its
/// root is on the media). A load cannot roll such a snapshot back (its metadata does not
/// parse; on the seed 412622595 image `spool check --repair` left the store dirty and
/// exited 2, and a second run does the same), and SPDK's dirty load fails the whole store
/// (-EILSEQ).
///
/// Expected: after a failed snapshot and a cut, no durable root names an md page that did
/// not reach the media.
#[test]
fn sim_seed_850029280_failed_snapshot_root_lands_without_its_extent_page() {
    let plan = Plan {
        seed: 850_029_280,
        ops: vec![
            Op::Create {
                thin: false,
                clusters: 1,
            },
            Op::Write(WriteSpec {
                pick: 0,
                unit: 0,
                units: 1,
                reactor: 0,
            }),
            Op::Fault {
                io: FaultIo::Write,
                errno: FaultErrno::Eio,
                nth: 11,
            },
            Op::Fault {
                io: FaultIo::Flush,
                errno: FaultErrno::Eio,
                nth: 2,
            },
            Op::Snapshot {
                pick: 1,
                racing: Vec::new(),
            },
            Op::Cut {
                inflight: Vec::new(),
                yields: 0,
                fate: 360_859_600_839_632_753,
            },
        ],
    };
    if let Err(failure) = run_plan(&plan, Bugs::default()) {
        panic!("{}", failure.report());
    }
}

/// Found by `spool-fuzz sim --soak 0.17 --ops 150 --faults 20` (seed 663864009; replay:
/// `cargo run -p spool-fuzz -- sim --seed 663864009 --ops 150 --faults 20`; it shrinks to
/// 47 steps in two lives). After a clean reload (`reload: unloaded`) the clean image's
/// masks mark md page 0 and a data cluster that nothing uses (`mask_bit_extra: md page 0
/// used_page_mask[0] ... used_cluster_mask[39]`; 9 in the shrunk plan): leaked for good,
/// since a clean load trusts the masks. In the shrunk trace md page 0 is the root of blob
/// 0x100000000 (a clone, then snapshotted, then deleted `ok`). The shrinker keeps one
/// injected fault, a flush -EIO armed 20 steps before the end, although no operation of the
/// trace reports an error: so (a suspicion, not traced further) a failed flush is swallowed
/// on some metadata path (a delete's or a close's), and what it was ordering is neither
/// retried nor released. No half-made snapshot is left, unlike the other seeds here.
///
/// Expected: every reload leaves masks equal to what the metadata uses (the simulation's
/// own rule: "no cluster owned twice or leaked"), and an injected error either fails the
/// operation it hit or leaves nothing behind.
#[test]
fn sim_seed_663864009_delete_leaks_a_root_page_and_a_cluster() {
    let size = PlanSize {
        ops: 150,
        fault_per_mille: 20,
        ..PlanSize::default()
    };
    if let Err(failure) = run_seed(663_864_009, size, Bugs::default()) {
        panic!(
            "seed 663864009 (--ops 150 --faults 20): {}",
            failure.report()
        );
    }
}

/// Found by `spool-fuzz sim --soak 0.2 --faults 0 --ops 80` (seed 266322743; replay:
/// `cargo run -p spool-fuzz -- sim --seed 266322743 --ops 80 --faults 0`), shrunk by the
/// simulation to 23 steps and by hand (dropping every step the failure does not need) to
/// the 18 below: **no injected fault, no NBD**. A 0-cluster blob 0x100000000 is
/// snapshotted (0x10000000c) and that snapshot cloned twice; thick and thin creates, a
/// resize, three more snapshots; then the delete of 0x100000000 (`ok`), the first write to
/// the thin one-cluster blob 0x100000043 (root md page 67, chain 13..23), its
/// acknowledgement, a flush that succeeds, and a power cut with nothing pending. After the
/// restart the blob has no cluster (`map [0]`) and unit 0 reads zeros where the model
/// requires the write (`blob 0x100000043 unit 0 reads value 0 after the restart, the model
/// allows {1}`): an acknowledged and flushed write lost, the one thing the simulation
/// exists to rule out (issue 13: "no acknowledged-and-flushed write lost").
/// On the cut image of the 23-step plan (life 0 rerun with `run_life`, then `spool
/// dump`/`spool check`): the blob's chain ends with an extent table naming no extent page,
/// so the thin write's cluster insert never reached the metadata on the media though the
/// write and the flush completed; `spool check` calls the image consistent (the loss is
/// invisible to it); md page 0 (the root of 0x100000000, deleted just before the write) is
/// zeros. Dropping the delete makes the plan pass. Not traced further: a suspicion is the
/// insert's new extent page taking the md page the delete had just released (page 0) and
/// the delete's zeroing, or the ordering around it, dropping the insert's persist.
///
/// Expected: the write reads back after the cut.
#[test]
fn sim_seed_266322743_flushed_first_write_to_a_thin_blob_lost_without_any_fault() {
    let plan = Plan {
        seed: 266_322_743,
        ops: vec![
            Op::Create {
                thin: false,
                clusters: 0,
            },
            Op::Snapshot {
                pick: 0,
                racing: Vec::new(),
            },
            Op::Clone { pick: 5 },
            Op::Create {
                thin: false,
                clusters: 1,
            },
            Op::Clone { pick: 4 },
            Op::Create {
                thin: false,
                clusters: 1,
            },
            Op::Create {
                thin: false,
                clusters: 1,
            },
            Op::Create {
                thin: false,
                clusters: 1,
            },
            Op::Create {
                thin: true,
                clusters: 1,
            },
            Op::Resize {
                pick: 4,
                clusters: 2,
            },
            Op::Create {
                thin: false,
                clusters: 1,
            },
            Op::Create {
                thin: false,
                clusters: 1,
            },
            Op::Snapshot {
                pick: 5,
                racing: Vec::new(),
            },
            Op::Snapshot {
                pick: 6,
                racing: Vec::new(),
            },
            Op::Snapshot {
                pick: 7,
                racing: Vec::new(),
            },
            Op::Delete { pick: 0 },
            Op::Write(WriteSpec {
                pick: 7,
                unit: 0,
                units: 1,
                reactor: 0,
            }),
            Op::Flush { reactor: 0 },
            Op::Cut {
                inflight: Vec::new(),
                yields: 0,
                fate: 5_052_711_358_757_894_597,
            },
        ],
    };
    if let Err(failure) = run_plan(&plan, Bugs::default()) {
        panic!("{}", failure.report());
    }
    let size = PlanSize {
        ops: 80,
        fault_per_mille: 0,
        ..PlanSize::default()
    };
    if let Err(failure) = run_seed(266_322_743, size, Bugs::default()) {
        panic!("seed 266322743 (--ops 80 --faults 0): {}", failure.what);
    }
}

/// Found by `spool-fuzz sim --soak 0.17 --ops 100 --faults 10` (seed 821966165; replay:
/// `cargo run -p spool-fuzz -- sim --seed 821966165 --ops 100 --faults 10`), shrunk to the
/// plan below, in which **no fault is injected**: in the last life (after a clean reload)
/// a snapshot of thin blob 0x100000001 (a clone, 5 clusters) races two writes to it, and
/// one of them fails with -EIO (`write 0x100000001 54+1 racing a snapshot: errno -5`).
/// Nothing failed on the device, so the error is the engine's own: a guest write issued
/// while an operator takes a snapshot gets an I/O error (a VM sees a failed write and may
/// remount its filesystem read-only). The simulation accepts an error only after an
/// injected fault, -ENOSPC or -ENOMEM (docs/testing.md). A suspect, not traced: the thin
/// insert's wait in `blob/src/persist.rs` returns -EIO as soon as the blob's map no longer
/// holds its cluster ("a failed persist undid it"), which a snapshot's map handover (the
/// blob's clusters move to the snapshot) also causes, with no persist failing.
///
/// Expected: writes racing a snapshot succeed (or wait) when the device does not fail.
#[test]
fn sim_seed_821966165_write_racing_a_snapshot_fails_with_eio_without_a_fault() {
    let plan = Plan {
        seed: 821_966_165,
        ops: vec![
            Op::Create {
                thin: true,
                clusters: 4,
            },
            Op::Create {
                thin: true,
                clusters: 1,
            },
            Op::Write(WriteSpec {
                pick: 0,
                unit: 93,
                units: 1,
                reactor: 0,
            }),
            Op::Create {
                thin: true,
                clusters: 5,
            },
            Op::Create {
                thin: false,
                clusters: 1,
            },
            Op::Write(WriteSpec {
                pick: 0,
                unit: 0,
                units: 1,
                reactor: 0,
            }),
            Op::Cut {
                inflight: Vec::new(),
                yields: 0,
                fate: 17_893_225_733_564_322_752,
            },
            Op::Create {
                thin: true,
                clusters: 1,
            },
            Op::Create {
                thin: false,
                clusters: 1,
            },
            Op::Create {
                thin: false,
                clusters: 1,
            },
            Op::Write(WriteSpec {
                pick: 0,
                unit: 0,
                units: 1,
                reactor: 0,
            }),
            Op::Resize {
                pick: 7,
                clusters: 5,
            },
            Op::Create {
                thin: true,
                clusters: 1,
            },
            Op::Snapshot {
                pick: 1,
                racing: vec![
                    WriteSpec {
                        pick: 0,
                        unit: 0,
                        units: 1,
                        reactor: 0,
                    },
                    WriteSpec {
                        pick: 0,
                        unit: 0,
                        units: 1,
                        reactor: 0,
                    },
                ],
            },
            Op::Create {
                thin: false,
                clusters: 0,
            },
            Op::Reload,
            Op::Write(WriteSpec {
                pick: 6,
                unit: 0,
                units: 1,
                reactor: 0,
            }),
            Op::Snapshot {
                pick: 1,
                racing: vec![
                    WriteSpec {
                        pick: 0,
                        unit: 107,
                        units: 1,
                        reactor: 0,
                    },
                    WriteSpec {
                        pick: 0,
                        unit: 54,
                        units: 1,
                        reactor: 0,
                    },
                ],
            },
        ],
    };
    if let Err(failure) = run_plan(&plan, Bugs::default()) {
        panic!("{}", failure.report());
    }
}

/// Found by `spool-fuzz sim --soak 0.17 --faults 0` (seed 93323786; replay: `cargo run -p
/// spool-fuzz -- sim --seed 93323786 --faults 0`), shrunk to 15 steps with **no fault**:
/// creates (thick and thin, a thin one resized to 3 clusters, never written), a snapshot,
/// a clean reload, then an NBD client that pipelines a WRITE of unit 2 (no FUA) and a
/// WRITE of units 26..29 (FUA) to that thin blob, two first writes to two different
/// clusters served concurrently: the first is answered with error 5 (EIO)
/// (`NBD Write { unit: 50, units: 1, fua: false } 2+1: error 5 (EIO)`). A guest's first
/// writes to a fresh thin volume fail with an I/O error while the device is healthy.
/// The md region is (nearly) full here: the same plan without the reload answers both
/// writes with error 12 (ENOMEM, out of md pages), which the simulation accepts. So the
/// likely bug is the errno: an insert waiting on a group-commit persist that failed
/// (-ENOMEM) returns -EIO ("a failed persist undid it", `blob/src/persist.rs`) instead of
/// the persist's error. The difference matters: a hypervisor pauses the guest on ENOSPC
/// (qemu `werror=enospc`) so the pool can grow, while EIO goes to the guest as a disk error.
/// Seed 821966165 may be the same path, reached by a snapshot instead of a second insert.
///
/// Expected: both writes succeed.
#[test]
fn sim_seed_93323786_concurrent_nbd_first_writes_to_a_thin_blob_fail_with_eio() {
    let size = PlanSize {
        fault_per_mille: 0,
        ..PlanSize::default()
    };
    if let Err(failure) = run_seed(93_323_786, size, Bugs::default()) {
        panic!("seed 93323786 (--faults 0): {}", failure.report());
    }
}

/// Found by `spool-fuzz sim --soak 0.17 --faults 0 --ops 120` (seed 86541517; replay:
/// `cargo run -p spool-fuzz -- sim --seed 86541517 --ops 120 --faults 0`), shrunk to 22
/// steps with **no injected fault**. A thick blob of 3 clusters (0x100000018, clusters
/// 11, 12, 13) is shrunk to 0 and then grown to 1: both resizes apply in memory and the
/// close that persists each fails ("resized, close failed"; no fault is injected, so with
/// an error the simulation accepts: the md region is nearly full, -ENOMEM), so the disk
/// keeps the 3-cluster map. A write to unit 0 is in flight at the power cut. After the
/// restart the blob has its old 3 clusters and unit 32 (the first unit of its third
/// cluster) holds the bytes of that write to unit 0 (`unit 32 holds bytes that are not a
/// write of this unit (value 2, unit 0)`): most likely the grow took a cluster the
/// unpersisted shrink had released (the durable map still names it) and the write landed
/// there. Released clusters must stay unusable until the metadata that drops them
/// is on disk (SPDK frees them only once the shrink's metadata is written); otherwise one
/// blob's write lands in a cluster another map still owns after a crash (here the same
/// blob's; with another blob growing instead, another volume's data).
///
/// Expected: after the restart every unit holds a value the model allows (no write
/// misplaced).
#[test]
fn sim_seed_86541517_grow_reuses_a_cluster_an_unpersisted_shrink_released() {
    let size = PlanSize {
        ops: 120,
        fault_per_mille: 0,
        ..PlanSize::default()
    };
    if let Err(failure) = run_seed(86_541_517, size, Bugs::default()) {
        panic!("seed 86541517 (--ops 120 --faults 0): {}", failure.report());
    }
}

/// Found by `spool-fuzz sim --soak 0.15 --faults 5 --ops 200` (seed 536205890; replay:
/// `cargo run -p spool-fuzz -- sim --seed 536205890 --ops 200 --faults 5`), shrunk to 59
/// steps in three lives. Life 1 starts from a dirty load (the only injected fault, a flush
/// -EIO, was in life 0) with snapshot 0x100000012 (read-only, map [15]) and its only clone
/// 0x10000007c (map [0]: it reads cluster 0 through the snapshot; the restart check read
/// the snapshot's value there, so it is durable). Its one operation: delete the snapshot
/// (`ok`: a snapshot with one clone is merged into it), then a power cut whose one pending
/// write reaches the media. After the restart the clone has no parent and still map [0]:
/// unit 0 reads zeros where the model requires the snapshot's data (`blob 0x10000007c unit
/// 0 reads value 0 after the restart, the model allows {4}`). The merge re-pointed the
/// clone (parent gone) without giving it the snapshot's cluster: deleting a snapshot
/// destroyed data its clone showed, with every write on the media.
///
/// Expected: after a merge-delete of a snapshot, its clone reads what it read before.
#[test]
fn sim_seed_536205890_merge_delete_of_a_snapshot_loses_its_clones_data() {
    let size = PlanSize {
        ops: 200,
        fault_per_mille: 5,
        ..PlanSize::default()
    };
    if let Err(failure) = run_seed(536_205_890, size, Bugs::default()) {
        panic!("seed 536205890 (--ops 200 --faults 5): {}", failure.what);
    }
}

/// Found by `spool-fuzz sim --soak 0.05 --faults 150 --ops 80` (seed 692100974; replay:
/// `cargo run -p spool-fuzz -- sim --seed 692100974 --ops 80 --faults 150`) while fixing
/// seed 821966165: a thin blob's first writes to three clusters, one failing on an injected
/// write -EIO; a failed persist undid an insert, a later persist committed the others, and a
/// first fix (judging an insert by "a persist with a later sequence committed" alone) then
/// acknowledged the undone write, whose cluster was released: unit 0 read zeros. Shrunk to
/// 7 steps in one life.
///
/// Expected: a write whose insert a failed persist undid is never acknowledged.
#[test]
fn sim_seed_692100974_an_undone_thin_insert_is_not_acknowledged() {
    let size = PlanSize {
        ops: 80,
        fault_per_mille: 150,
        ..PlanSize::default()
    };
    if let Err(failure) = run_seed(692_100_974, size, Bugs::default()) {
        panic!("seed 692100974 (--ops 80 --faults 150): {}", failure.what);
    }
}
