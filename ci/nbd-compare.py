#!/usr/bin/env python3
"""Side-by-side NBD servers under fio's nbd engine: `spool serve`, `qemu-nbd` and nbdkit's
file plugin, serving the same workload, alternating, with medians.

Cases: 4 KiB randread and randwrite, at iodepth 1 and 16, over one and two connections
(fio jobs), over TCP loopback and a Unix socket; once with the data in a fully written file
on disk, once from memory (Spool's malloc store against qemu-nbd and nbdkit on a file in
/dev/shm). Every server gets the same core (`--server-core`, via taskset; Spool's reactor is
pinned there) and fio runs on the other (`--fio-core`). Each case runs PAIRS rounds; in each
round the servers take turns (the order rotates), and the table gives each server's median
IOPS and p99 completion latency and Spool's ratio to each other server.

At full speed a closed loop's tail says as much about the client as the server: a server
twice as fast makes fio's own core the bottleneck (the `fio cpu` column), and fio's queueing
then sets the p99. `--matched FRACTION` adds a second pass per case in which every server
gets the same offered load, FRACTION of the slowest server's median IOPS (fio's `rate_iops`,
split over its jobs), and a second table of p99 at that equal load: the comparison of tails
that does not reward the slower server with an idle client.

Needs: a release build of spool (cargo build --release -p spool-tools; SPOOL_BIN=PATH picks
another binary), fio, qemu-nbd (qemu-utils) and nbdkit. Prints a Markdown table; --raw writes every run as JSON.

Usage:
  ci/nbd-compare.py [--pairs 3] [--time 5] [--dir /var/tmp] [--size 1G]
                    [--storage disk,memory] [--transports tcp,unix] [--only SUBSTRING]
                    [--raw out.json] [--spool-idle busy,adaptive,interrupt] [--matched 0.9]
                    [--others qemu-nbd,nbdkit]
"""

import argparse
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPOOL = os.environ.get("SPOOL_BIN") or os.path.join(ROOT, "target", "release", "spool")
PORT = 10900


def wait_port(port, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def wait_path(path, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path):
            return
        time.sleep(0.05)
    raise RuntimeError(f"no socket at {path}")


class Server:
    """One server process serving export `vol0`."""

    def __init__(self, name, cmd, transport, sock):
        self.name, self.cmd, self.transport, self.sock = name, cmd, transport, sock
        self.proc = None

    def uri(self):
        if self.transport == "tcp":
            return f"nbd://127.0.0.1:{PORT}/vol0"
        return f"nbd+unix:///vol0?socket={self.sock}"

    def __enter__(self):
        if self.transport == "unix" and os.path.exists(self.sock):
            os.unlink(self.sock)
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        if self.transport == "tcp":
            wait_port(PORT)
        else:
            wait_path(self.sock)
        return self

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        time.sleep(0.2)


def spool_cmd(store, transport, sock, core, idle):
    listen = ["--listen", f"127.0.0.1:{PORT}"] if transport == "tcp" else ["--socket", sock]
    return [SPOOL, "serve", store, "--cores", str(core), "--no-rpc", "--idle", idle] + listen


def qemu_cmd(path, transport, sock, core):
    listen = ["-b", "127.0.0.1", "-p", str(PORT)] if transport == "tcp" else ["-k", sock]
    return ["taskset", "-c", str(core), "qemu-nbd", "-f", "raw", "--cache=none",
            "--aio=io_uring", "-x", "vol0", "-t", "-e", "16", "--discard=unmap"] + listen + [path]


def nbdkit_cmd(path, transport, sock, core):
    listen = ["-i", "127.0.0.1", "-p", str(PORT)] if transport == "tcp" else ["-U", sock]
    return ["taskset", "-c", str(core), "nbdkit", "-f", "-e", "vol0"] + listen + [
        "file", f"file={path}", "cache=none"]


def fio(uri, rw, qd, jobs, time_s, core, size, rate_iops=None):
    cmd = ["taskset", "-c", str(core), "fio", "--name=cmp", "--ioengine=nbd", f"--uri={uri}",
           f"--rw={rw}", "--bs=4k", f"--iodepth={qd}", f"--numjobs={jobs}", "--time_based",
           f"--runtime={time_s}", f"--size={size}", "--group_reporting", "--randrepeat=0",
           "--norandommap", "--output-format=json"]
    if rate_iops:
        # Per job: the case's offered load split over its jobs.
        cmd.append(f"--rate_iops={max(1, int(rate_iops / jobs))}")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["read"] if rw == "randread" else job["write"]
    p99 = side["clat_ns"].get("percentile", {}).get("99.000000", 0) / 1000.0
    # fio's own CPU use (percent of one core, over its jobs): near 100 x jobs means the
    # client, not the server, set the pace and the tail.
    cpu = (job.get("usr_cpu", 0) + job.get("sys_cpu", 0)) * jobs
    # fio's context switches per second (its jobs together): few means fio's threads never
    # block on the socket (every poll finds a reply), so they share fio's core in whole
    # scheduler slices, and a job waits a slice to see replies that came long before.
    ctx = job.get("ctx", 0) / max(time_s, 1)
    return {"iops": side["iops"], "p99_us": p99, "fio_cpu": cpu, "fio_ctx_per_s": ctx}


def fill(uri, core, size):
    subprocess.run(["taskset", "-c", str(core), "fio", "--name=fill", "--ioengine=nbd",
                    f"--uri={uri}", "--rw=write", "--bs=1M", "--iodepth=8", f"--size={size}"],
                   check=True, capture_output=True)


def prepare(storage, workdir, size_bytes):
    """The store for Spool and the raw file for the others."""
    if storage == "memory":
        raw = "/dev/shm/spool-nbd-compare.raw"
        subprocess.run(["dd", "if=/dev/zero", f"of={raw}", "bs=4M",
                        f"count={size_bytes // (4 << 20)}"], check=True, capture_output=True)
        return f"malloc:{size_bytes}", raw
    store = os.path.join(workdir, "spool-nbd-compare.img")
    raw = os.path.join(workdir, "spool-nbd-compare.raw")
    for path in (store, raw):
        if os.path.exists(path):
            os.unlink(path)
    subprocess.run([SPOOL, "init", store, "--size", str(size_bytes)], check=True,
                   capture_output=True)
    info = json.loads(subprocess.run([SPOOL, "info", store, "--json"], check=True,
                                     capture_output=True, text=True).stdout)
    volume = info["total_data_clusters"] * info["cluster_size"]
    subprocess.run([SPOOL, "create", store, "--size", str(volume), "--name", "vol0"],
                   check=True, capture_output=True)
    subprocess.run(["dd", "if=/dev/zero", f"of={raw}", "bs=4M",
                    f"count={size_bytes // (4 << 20)}", "oflag=direct"], check=True,
                   capture_output=True)
    return store, raw


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--time", type=int, default=5)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--size", default="1G")
    ap.add_argument("--storage", default="disk,memory")
    ap.add_argument("--transports", default="tcp,unix")
    ap.add_argument("--only", default="",
                    help="run only the cases containing one of these comma-separated substrings")
    ap.add_argument("--server-core", type=int, default=0)
    ap.add_argument("--fio-core", type=int, default=1)
    ap.add_argument("--raw")
    ap.add_argument("--matched", type=float, default=0.0,
                    help="also run each case at this fraction of its slowest server's median "
                         "IOPS, the same offered load for every server, and print the p99s")
    ap.add_argument("--spool-idle", default="busy",
                    help="comma-separated idle modes of spool serve to run, each as a server "
                         "(busy, sleep, adaptive, interrupt)")
    ap.add_argument("--others", default="qemu-nbd,nbdkit",
                    help="the other servers to run (comma-separated: qemu-nbd, nbdkit)")
    args = ap.parse_args()
    size_bytes = int(args.size[:-1]) << {"G": 30, "M": 20}[args.size[-1]]
    io_size = f"{size_bytes // 2 >> 20}M"
    sock = os.path.join(args.dir, "spool-nbd-compare.sock")
    raw_runs = []
    rows = []
    matched_rows = []
    spool_idles = args.spool_idle.split(",")
    for storage in args.storage.split(","):
        store, raw = prepare(storage, args.dir, size_bytes)
        if storage == "disk":
            # `spool init` leaves the data area a hole (as SPDK's init unmaps it): write the
            # volume's tested range once through Spool, so its reads reach the media as the
            # raw file's (written by dd) do.
            with Server("spool", spool_cmd(store, "tcp", sock, args.server_core, "busy"),
                        "tcp", sock) as server:
                fill(server.uri(), args.fio_core, io_size)
        servers = {}
        for idle in spool_idles:
            name = "spool" if len(spool_idles) == 1 else f"spool-{idle}"
            servers[name] = (lambda i: lambda t: spool_cmd(store, t, sock, args.server_core,
                                                           i))(idle)
        others = args.others.split(",")
        if "qemu-nbd" in others:
            servers["qemu-nbd"] = lambda t: qemu_cmd(raw, t, sock, args.server_core)
        if "nbdkit" in others:
            servers["nbdkit"] = lambda t: nbdkit_cmd(raw, t, sock, args.server_core)
        for transport, rw, qd, jobs in itertools.product(
                args.transports.split(","), ["randread", "randwrite"], [1, 16], [1, 2]):
            case = f"{storage} {transport} {rw} qd{qd} x{jobs}"
            if args.only and not any(part in case for part in args.only.split(",")):
                continue
            def run_case(rate):
                results = {name: [] for name in servers}
                order = list(servers)
                for round_ in range(args.pairs):
                    shift = round_ % len(order)
                    for name in order[shift:] + order[:shift]:
                        with Server(name, servers[name](transport), transport, sock) as server:
                            if name.startswith("spool") and storage == "memory":
                                # A malloc store starts empty each run: written first, so
                                # reads copy data instead of answering holes.
                                fill(server.uri(), args.fio_core, io_size)
                            run = fio(server.uri(), rw, qd, jobs, args.time, args.fio_core,
                                      io_size, rate)
                        results[name].append(run)
                        raw_runs.append({"case": case, "server": name, "rate_iops": rate,
                                         **run})
                        label = f"{case} @{rate:.0f}" if rate else case
                        print(f"{label:48} {name:16} {run['iops']:>10.0f} IOPS  p99 "
                              f"{run['p99_us']:8.1f} us  fio cpu {run['fio_cpu']:5.0f} %  "
                              f"fio ctx/s {run['fio_ctx_per_s']:7.0f}  load "
                              f"{os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
                return {n: (statistics.median(r["iops"] for r in rs),
                            statistics.median(r["p99_us"] for r in rs))
                        for n, rs in results.items()}

            med = run_case(None)
            rows.append((case, med))
            if args.matched > 0:
                rate = args.matched * min(iops for iops, _ in med.values())
                matched_rows.append((case, rate, run_case(rate)))
    names = list(rows[0][1]) if rows else []
    spools = [n for n in names if n.startswith("spool")]
    others = [n for n in names if not n.startswith("spool")]
    header = (["case"] + [f"{n} IOPS" for n in names]
              + [f"{s}/{o}" for s in spools for o in others] + [f"{n} p99 us" for n in names])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for case, med in rows:
        cells = ([case] + [f"{med[n][0]:.0f}" for n in names]
                 + [f"{med[s][0] / max(med[o][0], 1):.2f}" for s in spools for o in others]
                 + [f"{med[n][1]:.0f}" for n in names])
        print("| " + " | ".join(cells) + " |")
    if matched_rows:
        print()
        print(f"p99 at the same offered load ({args.matched:.2f} of each case's slowest "
              "server's median IOPS):")
        print()
        header = (["case", "offered IOPS"] + [f"{n} IOPS" for n in names]
                  + [f"{n} p99 us" for n in names])
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for case, rate, med in matched_rows:
            cells = ([case, f"{rate:.0f}"] + [f"{med[n][0]:.0f}" for n in names]
                     + [f"{med[n][1]:.0f}" for n in names])
            print("| " + " | ".join(cells) + " |")
    if args.raw:
        with open(args.raw, "w") as f:
            json.dump(raw_runs, f, indent=1)


if __name__ == "__main__":
    main()
