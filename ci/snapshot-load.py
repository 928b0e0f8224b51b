#!/usr/bin/env python3
"""Snapshot call latency and write pause under load (issue 14): `spool perf --layer snap` on
malloc and on a file, at 1 MiB and 64 KiB clusters, repeated, with medians.

Each run takes 1 + SNAPSHOTS snapshots of a thick volume while every chosen core keeps qd 32
random 4 KiB writes in flight on it (after the first snapshot each first write to a cluster
copies it); the figures of one run are over its counted snapshots (see
engine/src/perf/snapshot_load.rs). The table gives, per case, the median over the runs of each
run's p50 and max. Pass --spool to measure another build (e.g. an older commit's) and compare.
Needs a release build of spool (cargo build --release -p spool-tools).

Usage:
  ci/snapshot-load.py [--runs 3] [--snapshots 20] [--gap 20] [--cases malloc,file]
                      [--clusters 1M,64K] [--cores 0] [--file PATH] [--spool PATH]
"""

import argparse
import json
import os
import statistics
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FIGURES = [
    ("call_ms", "call"),
    ("frozen_ms", "writes frozen"),
    ("pause_ms", "pause"),
    ("baseline_gap_ms", "gap between calls"),
    ("write_max_ms", "longest write in call"),
    ("baseline_write_max_ms", "longest write between"),
]


def run(spool, target, cluster, args):
    cmd = [spool, "perf", "--layer", "snap", "--target", target, "--cluster-size", cluster,
           "--snapshots", str(args.snapshots), "--snap-gap", str(args.gap), "--cores", args.cores,
           "--size", args.size, "--json", "--quiet", "--force"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--snapshots", type=int, default=20)
    parser.add_argument("--gap", type=int, default=20)
    parser.add_argument("--cases", default="malloc,file")
    parser.add_argument("--clusters", default="1M,64K")
    parser.add_argument("--cores", default="0")
    parser.add_argument("--size", default="2G", help="size of the file to create")
    parser.add_argument("--file", default=os.path.join(ROOT, "spool-snap.img"))
    parser.add_argument("--spool", default=os.path.join(ROOT, "target", "release", "spool"))
    args = parser.parse_args()
    targets = {"malloc": "malloc:4G", "file": args.file}
    print("| target | cluster | " + " | ".join(
        f"{name} p50 / max ms" for _, name in FIGURES) + " | writes/s | runs (call p50) |")
    print("|---|---|" + "---:|" * (len(FIGURES) + 2))
    for case in args.cases.split(","):
        for cluster in args.clusters.split(","):
            reports = [run(args.spool, targets[case], cluster, args) for _ in range(args.runs)]
            cells = []
            for key, _ in FIGURES:
                p50 = statistics.median(r[key]["p50"] for r in reports)
                worst = statistics.median(r[key]["max"] for r in reports)
                cells.append(f"{p50:.2f} / {worst:.2f}")
            iops = statistics.median(r["write_iops"] for r in reports)
            runs = " ".join(f"{r['call_ms']['p50']:.2f}" for r in reports)
            print(f"| {case} | {cluster} | " + " | ".join(cells) + f" | {iops:,.0f} | {runs} |",
                  flush=True)


if __name__ == "__main__":
    main()
