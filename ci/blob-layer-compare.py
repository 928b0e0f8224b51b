#!/usr/bin/env python3
"""The blob layer's cost: `spool perf --layer blob` against `--layer bdev` on the same target,
alternating, with medians.

Each case runs PAIRS pairs (bdev then blob, same target, same settings) and reports the median
IOPS of each side, their ratio, and the difference in ns per I/O (1e9/IOPS), which is what the
blob layer adds on one core. Also runs `spool perf --layer md` (metadata rates, load times).
Needs a release build of spool (cargo build --release -p spool-tools).

Usage:
  ci/blob-layer-compare.py [--pairs 5] [--time 5] [--cases null,malloc,uring] [--file PATH]
                           [--blobs 10000]
"""

import argparse
import json
import os
import statistics
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPOOL = os.path.join(ROOT, "target", "release", "spool")


def perf(target, layer, rw, time_s, qd=32):
    cmd = [SPOOL, "perf", "--target", target, "--layer", layer, "--rw", rw, "--qd", str(qd),
           "--cores", "0", "--time", str(time_s), "--json", "--quiet"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)["total"]["iops"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--time", type=float, default=5)
    parser.add_argument("--cases", default="null,malloc")
    parser.add_argument("--file", default=os.path.join(ROOT, "spool-perf.img"))
    parser.add_argument("--blobs", type=int, default=10000)
    args = parser.parse_args()
    targets = []
    for case in args.cases.split(","):
        targets.append({"null": "null", "malloc": "malloc:1G", "uring": args.file}[case])
    print("| target | rw | bdev IOPS | blob IOPS | blob/bdev | ns/IO bdev | ns/IO blob | added ns |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for target in targets:
        for rw in ("randread", "randwrite"):
            bdev, blob = [], []
            for _ in range(args.pairs):
                bdev.append(perf(target, "bdev", rw, args.time))
                blob.append(perf(target, "blob", rw, args.time))
            b, l = statistics.median(bdev), statistics.median(blob)
            print(f"| {target} | {rw} | {b:,.0f} | {l:,.0f} | {l / b:.3f} | {1e9 / b:.1f} | "
                  f"{1e9 / l:.1f} | {1e9 / l - 1e9 / b:+.1f} |", flush=True)
    cmd = [SPOOL, "perf", "--target", "malloc:1G", "--layer", "md", "--blobs", str(args.blobs),
           "--cores", "0", "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    print()
    print("metadata (malloc:1G):", json.dumps(json.loads(out.stdout)))


if __name__ == "__main__":
    main()
