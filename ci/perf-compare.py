#!/usr/bin/env python3
"""Side-by-side runs of `spool perf` and fio on the same target, alternating, with medians.

This machine is shared and noisy (runs of one fio job differ by up to 40 %), so every case is
run as PAIRS pairs, spool then fio, alternating, and the report gives the median of each side
and the ratio of the medians. Prints a Markdown table (and writes raw runs as JSON with
--raw). Needs: a release build of spool (cargo build --release -p spool-tools) and fio.

Usage:
  ci/perf-compare.py [--pairs 3] [--time 10] [--file /path/spool-perf.img] [--size 1G]
                     [--cases null,malloc,uring] [--only SUBSTRING] [--raw out.json]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPOOL = os.path.join(ROOT, "target", "release", "spool")


def run_json(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def spool(target, rw, qd, cores, time_s, bs=4096):
    cmd = [SPOOL, "perf", "--target", target, "--rw", rw, "--bs", str(bs), "--qd", str(qd),
           "--cores", ",".join(map(str, cores)), "--time", str(time_s), "--json", "--quiet"]
    report = run_json(cmd)
    total = report["total"]
    return {"iops": total["iops"], "p99_us": total["lat_us"]["p99"], "mean_us": total["lat_us"]["mean"]}


def fio(engine, rw, qd, cores, time_s, filename=None, fixed=False, bs=4096):
    cmd = ["fio", "--name=cmp", f"--ioengine={engine}", f"--rw={rw}", f"--bs={bs}",
           f"--iodepth={qd}", "--time_based", f"--runtime={time_s}", f"--numjobs={len(cores)}",
           f"--cpus_allowed={','.join(map(str, cores))}", "--cpus_allowed_policy=split",
           "--group_reporting", "--output-format=json", "--randrepeat=0", "--norandommap"]
    if engine == "null":
        cmd += ["--size=1g"]
    else:
        cmd += [f"--filename={filename}", "--direct=1"]
    if fixed:
        cmd += ["--fixedbufs", "--registerfiles"]
    job = run_json(cmd)["jobs"][0]
    side = job["read"] if rw in ("randread", "read") else job["write"]
    pct = side["clat_ns"].get("percentile", {})
    p99 = pct.get("99.000000", 0) / 1000.0
    return {"iops": side["iops"], "p99_us": p99, "mean_us": side["lat_ns"]["mean"] / 1000.0}


def cases(selected, path):
    out = []
    if "null" in selected:
        out.append(("null randread qd32 1 core", lambda t: spool("null", "randread", 32, [0], t),
                    lambda t: fio("null", "randread", 32, [0], t)))
    if "malloc" in selected:
        for rw in ("randread", "randwrite"):
            for qd in (1, 32):
                out.append((f"malloc {rw} qd{qd} 1 core", lambda t, rw=rw, qd=qd: spool("malloc:1G", rw, qd, [0], t), None))
    if "uring" in selected:
        for cores in ([0], [0, 1]):
            for rw in ("randread", "randwrite"):
                for qd in (1, 32):
                    name = f"uring {rw} qd{qd} {len(cores)} core{'s' if len(cores) > 1 else ''}"
                    out.append((name, lambda t, rw=rw, qd=qd, c=cores: spool(path, rw, qd, c, t),
                                lambda t, rw=rw, qd=qd, c=cores: fio("io_uring", rw, qd, c, t, filename=path)))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--time", type=float, default=10)
    parser.add_argument("--file", default=os.path.join(ROOT, "spool-perf.img"))
    parser.add_argument("--size", default="1G")
    parser.add_argument("--cases", default="null,malloc,uring")
    parser.add_argument("--only", help="run only the cases whose name contains this")
    parser.add_argument("--raw")
    args = parser.parse_args()
    selected = set(args.cases.split(","))
    if "uring" in selected and not os.path.exists(args.file):
        # spool creates and fully writes the file; fio then uses the same one.
        subprocess.run([SPOOL, "perf", "--target", args.file, "--size", args.size, "--time", "1", "--quiet"],
                       check=True, capture_output=True)
    raw = {}
    print("| case | spool IOPS (median) | fio IOPS (median) | IOPS ratio | spool p99 us | fio p99 us | runs (spool / fio IOPS) |")
    print("|---|---|---|---|---|---|---|")
    for name, run_spool, run_fio in cases(selected, args.file):
        if args.only and args.only not in name:
            continue
        spool_runs, fio_runs = [], []
        for _ in range(args.pairs):
            spool_runs.append(run_spool(args.time))
            if run_fio:
                fio_runs.append(run_fio(args.time))
        raw[name] = {"spool": spool_runs, "fio": fio_runs}
        s_iops = statistics.median(r["iops"] for r in spool_runs)
        s_p99 = statistics.median(r["p99_us"] for r in spool_runs)
        if fio_runs:
            f_iops = statistics.median(r["iops"] for r in fio_runs)
            f_p99 = statistics.median(r["p99_us"] for r in fio_runs)
            ratio = f"{s_iops / f_iops:.2f}"
            f_cols = f"{f_iops:,.0f} | {ratio} | {s_p99:.1f} | {f_p99:.1f}"
        else:
            f_cols = f"- | - | {s_p99:.1f} | -"
        runs = " ".join(f"{r['iops']/1e3:.1f}k" for r in spool_runs)
        if fio_runs:
            runs += " / " + " ".join(f"{r['iops']/1e3:.1f}k" for r in fio_runs)
        print(f"| {name} | {s_iops:,.0f} | {f_cols} | {runs} |", flush=True)
    if args.raw:
        with open(args.raw, "w") as fh:
            json.dump(raw, fh, indent=1)


if __name__ == "__main__":
    sys.exit(main())
