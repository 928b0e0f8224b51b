#!/usr/bin/env python3
"""JSON-RPC round trips per second against a running `spool serve --rpc SOCK`: one client
sends a request and waits for its answer, COUNT times, on one connection (requests back to
back, as SPDK's rpc.py does within a session), and again with a new connection per call (as
`spool rpc` does). Prints calls per second and the median and p99 round trip per method.

Usage:
  spool serve malloc:1G --socket /tmp/spool-nbd.sock --rpc /tmp/spool.sock &
  ci/rpc-rate.py /tmp/spool.sock [--count 20000] [--methods spdk_get_version,bdev_get_bdevs]
"""

import argparse
import json
import socket
import statistics
import time


def read_one(sock, buf, decoder):
    while True:
        text = buf.decode(errors="replace").lstrip()
        if text:
            try:
                value, end = decoder.raw_decode(text)
                rest = text[end:].encode()
                return value, rest
            except json.JSONDecodeError:
                pass
        chunk = sock.recv(1 << 16)
        if not chunk:
            raise RuntimeError("the server closed the connection")
        buf += chunk


def session(path, method, count, reconnect):
    decoder = json.JSONDecoder()
    times = []
    sock = None
    buf = b""
    started = time.perf_counter()
    for n in range(count):
        if sock is None or reconnect:
            if sock is not None:
                sock.close()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
            buf = b""
        request = json.dumps({"jsonrpc": "2.0", "method": method, "id": n}).encode()
        t0 = time.perf_counter()
        sock.sendall(request)
        answer, buf = read_one(sock, buf, decoder)
        times.append(time.perf_counter() - t0)
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
    elapsed = time.perf_counter() - started
    sock.close()
    times.sort()
    return count / elapsed, statistics.median(times) * 1e6, times[int(len(times) * 0.99) - 1] * 1e6


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("socket")
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--methods", default="spdk_get_version,bdev_get_bdevs")
    args = parser.parse_args()
    print("| method | connection | calls/s | median us | p99 us |")
    print("|---|---|---:|---:|---:|")
    for method in args.methods.split(","):
        for reconnect in (False, True):
            count = args.count if not reconnect else max(args.count // 4, 1)
            rate, median, p99 = session(args.socket, method, count, reconnect)
            kind = "new per call" if reconnect else "one, reused"
            print(f"| {method} | {kind} | {rate:,.0f} | {median:.1f} | {p99:.1f} |", flush=True)


if __name__ == "__main__":
    main()
