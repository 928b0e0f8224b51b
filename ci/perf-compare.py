#!/usr/bin/env python3
"""Side-by-side runs of `spool perf` and fio on the same target, alternating, with medians.

This machine is shared and noisy (runs of one fio job differ by up to 40 %), so every case is
run as PAIRS rounds, spool then each fio variant, alternating, and the report gives the median
of each side and the ratio of the medians (one row per fio variant, against the same spool
runs). Prints a Markdown table (and writes raw runs as JSON with --raw). Needs: a release
build of spool (cargo build --release -p spool-tools) and fio.

Cases (issue 18): null randread at qd 1 and 32 on the bdev and the blob layer, against fio's
null engine; malloc (RAM) randread/randwrite at qd 1 and 32, against fio's mmap engine on a
file in /dev/shm (a memcpy per I/O, as malloc does; a synchronous engine, so its qd is 1
whatever --iodepth says); uring on a file, against fio's io_uring in two modes: default (fio
sleeps in io_uring_enter for completions) and polled (--fixedbufs --registerfiles
--iodepth_batch_complete_min=0, so fio reaps without waiting and spins as Spool does, plus
--hipri where the device has poll queues; a virtio disk has none, so it is probed first).

Latency: Spool's is bdevperf's (submission to the completion reaching the job); fio's p99 is
its clat p99 (from the hand-off to the engine to completion, leaving out submission).

Usage:
  ci/perf-compare.py [--pairs 3] [--time 10] [--file /path/spool-perf.img] [--size 1G]
                     [--cases null,blob,malloc,uring] [--only SUBSTRING] [--raw out.json]
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


def spool(target, rw, qd, cores, time_s, bs=4096, layer="bdev"):
    cmd = [SPOOL, "perf", "--target", target, "--layer", layer, "--rw", rw, "--bs", str(bs),
           "--qd", str(qd), "--cores", ",".join(map(str, cores)), "--time", str(time_s),
           "--json", "--quiet"]
    report = run_json(cmd)
    total = report["total"]
    return {"iops": total["iops"], "p99_us": total["lat_us"]["p99"], "mean_us": total["lat_us"]["mean"]}


HIPRI = None


def hipri_works(filename):
    """Whether fio's --hipri (polled completions, IORING_SETUP_IOPOLL) works on FILENAME."""
    global HIPRI
    if HIPRI is None:
        cmd = ["fio", "--name=probe", "--ioengine=io_uring", f"--filename={filename}", "--direct=1",
               "--rw=randread", "--bs=4k", "--iodepth=1", "--runtime=1", "--time_based",
               "--hipri", "--output-format=json"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        try:
            job = json.loads(out.stdout[out.stdout.find("{"):])["jobs"][0]
            HIPRI = job["error"] == 0 and job["read"]["iops"] > 0
        except (ValueError, KeyError, IndexError):
            HIPRI = False
    return HIPRI


def fio(engine, rw, qd, cores, time_s, filename=None, polled=False, bs=4096, size=None):
    cmd = ["fio", "--name=cmp", f"--ioengine={engine}", f"--rw={rw}", f"--bs={bs}",
           f"--iodepth={qd}", "--time_based", f"--runtime={time_s}", f"--numjobs={len(cores)}",
           f"--cpus_allowed={','.join(map(str, cores))}", "--cpus_allowed_policy=split",
           "--group_reporting", "--output-format=json", "--randrepeat=0", "--norandommap"]
    if engine == "null":
        cmd += ["--size=1g"]
    elif engine == "mmap":
        cmd += [f"--filename={filename}", f"--size={size}"]
    else:
        cmd += [f"--filename={filename}", "--direct=1"]
    if polled:
        cmd += ["--fixedbufs", "--registerfiles", "--iodepth_batch_complete_min=0"]
        if hipri_works(filename):
            cmd += ["--hipri"]
    job = run_json(cmd)["jobs"][0]
    side = job["read"] if rw in ("randread", "read") else job["write"]
    pct = side["clat_ns"].get("percentile", {})
    p99 = pct.get("99.000000", 0) / 1000.0
    return {"iops": side["iops"], "p99_us": p99, "mean_us": side["lat_ns"]["mean"] / 1000.0}


SHM_FILE = "/dev/shm/spool-perf-compare.img"


def cases(selected, path, size):
    """(name, run_spool, [(fio variant, run_fio), ...]) for every selected case."""
    out = []
    for layer in ("bdev", "blob"):
        if (layer == "bdev" and "null" in selected) or (layer == "blob" and "blob" in selected):
            for qd in (1, 32):
                out.append((f"null randread qd{qd} 1 core, {layer} layer",
                            lambda t, qd=qd, layer=layer: spool("null", "randread", qd, [0], t, layer=layer),
                            [("fio null", lambda t, qd=qd: fio("null", "randread", qd, [0], t))]))
    if "malloc" in selected:
        for rw in ("randread", "randwrite"):
            for qd in (1, 32):
                out.append((f"malloc {rw} qd{qd} 1 core", lambda t, rw=rw, qd=qd: spool(f"malloc:{size}", rw, qd, [0], t),
                            [("fio mmap /dev/shm", lambda t, rw=rw, qd=qd: fio("mmap", rw, qd, [0], t, filename=SHM_FILE, size=size))]))
    if "uring" in selected:
        for cores in ([0], [0, 1]):
            for rw in ("randread", "randwrite"):
                for qd in (1, 32):
                    name = f"uring {rw} qd{qd} {len(cores)} core{'s' if len(cores) > 1 else ''}"
                    out.append((name, lambda t, rw=rw, qd=qd, c=cores: spool(path, rw, qd, c, t),
                                [("fio io_uring", lambda t, rw=rw, qd=qd, c=cores: fio("io_uring", rw, qd, c, t, filename=path)),
                                 ("fio io_uring polled", lambda t, rw=rw, qd=qd, c=cores: fio("io_uring", rw, qd, c, t, filename=path, polled=True))]))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--time", type=float, default=10)
    parser.add_argument("--file", default=os.path.join(ROOT, "spool-perf.img"))
    parser.add_argument("--size", default="1G")
    parser.add_argument("--cases", default="null,blob,malloc,uring")
    parser.add_argument("--only", help="run only the cases whose name contains this")
    parser.add_argument("--raw")
    args = parser.parse_args()
    selected = set(args.cases.split(","))
    if "malloc" in selected and not os.path.exists(SHM_FILE):
        # fio's counterpart of the malloc bdev: a RAM file it maps and copies to and from.
        subprocess.run(["fio", "--name=fill", "--ioengine=psync", f"--filename={SHM_FILE}",
                        f"--size={args.size}", "--rw=write", "--bs=1m"], check=True, capture_output=True)
    if "uring" in selected and not os.path.exists(args.file):
        # spool creates and fully writes the file; fio then uses the same one.
        subprocess.run([SPOOL, "perf", "--target", args.file, "--size", args.size, "--time", "1", "--quiet"],
                       check=True, capture_output=True)
    raw = {}
    print("| case | against | spool IOPS (median) | fio IOPS (median) | IOPS ratio | spool p99 us | fio p99 us | spool mean us | runs (spool / fio IOPS) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, run_spool, competitors in cases(selected, args.file, args.size):
        if args.only and args.only not in name:
            continue
        spool_runs = []
        fio_runs = {label: [] for label, _ in competitors}
        for _ in range(args.pairs):
            spool_runs.append(run_spool(args.time))
            for label, run_fio in competitors:
                fio_runs[label].append(run_fio(args.time))
        raw[name] = {"spool": spool_runs, "fio": fio_runs}
        s_iops = statistics.median(r["iops"] for r in spool_runs)
        s_p99 = statistics.median(r["p99_us"] for r in spool_runs)
        s_mean = statistics.median(r["mean_us"] for r in spool_runs)
        s_list = " ".join(f"{r['iops']/1e3:.1f}k" for r in spool_runs)
        for label, runs in fio_runs.items():
            f_iops = statistics.median(r["iops"] for r in runs)
            f_p99 = statistics.median(r["p99_us"] for r in runs)
            f_list = " ".join(f"{r['iops']/1e3:.1f}k" for r in runs)
            print(f"| {name} | {label} | {s_iops:,.0f} | {f_iops:,.0f} | {s_iops / f_iops:.2f} | "
                  f"{s_p99:.2f} | {f_p99:.2f} | {s_mean:.3f} | {s_list} / {f_list} |", flush=True)
    if args.raw:
        with open(args.raw, "w") as fh:
            json.dump(raw, fh, indent=1)


if __name__ == "__main__":
    sys.exit(main())
