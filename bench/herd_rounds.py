#!/usr/bin/env python3
"""The streaming path as a user sees it: rounds of a herd of clients on a cold big blob, each
round a fresh regmirror with an empty cache in front of the bench's docker-registry upstream,
every body hashed by its client and the upstream's GETs of the blob counted; then the first hit
after a restart (time to response headers, and to the last byte) against the second hit.

    python3 bench/herd_rounds.py --binary target/release/regmirror --rounds 20 --herd 16

It reuses the bench's image set (target/bench, built by bench/run.sh or on first use) and its
upstream; it prints its figures and exits non-zero if any body was wrong or any round fetched
the blob more than once.
"""

import argparse
import http.client
import os
import shutil
import signal
import sys
import time

import clients
from services import full_sizes, upstream_lab, Procs, Regmirror, http_status, start_on_free_port


def log(msg):
    print(f"[herd_rounds] {msg}", file=sys.stderr, flush=True)


def blob_gets(upstream, path):
    return sum(1 for m, p, s, _ in upstream.served() if m == "GET" and p == path and s == 200)


def timed_get(port, path):
    """(seconds to the response headers, seconds to the last byte, status, bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    try:
        start = time.monotonic()
        conn.request("GET", path)
        resp = conn.getresponse()
        headers = time.monotonic() - start
        n = 0
        while True:
            chunk = resp.read(1 << 20)
            if not chunk:
                break
            n += len(chunk)
        return headers, time.monotonic() - start, resp.status, n
    finally:
        conn.close()


def main():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--binary", default=os.path.join(repo, "target", "release", "regmirror"))
    ap.add_argument("--work", default=os.path.join(repo, "target", "bench"))
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--herd", type=int, default=16)
    ap.add_argument("--big-mib", type=int, default=1024)
    args = ap.parse_args()
    # The mirror runs in a directory of its own: a relative path would not name it there.
    args.binary = os.path.abspath(args.binary)

    sizes = full_sizes(args.big_mib)
    os.makedirs(args.work, exist_ok=True)
    run_dir = os.path.join(args.work, f"herd-rounds-{os.getpid()}")
    os.makedirs(run_dir)
    procs = Procs()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    failures = []
    try:
        _, fx, upstream = upstream_lab(procs, args.work, run_dir, sizes, log)
        big = fx["big"]
        path = f"/v2/library/big/blobs/{big['digest']}"
        walls = []
        for r in range(args.rounds):
            mirror = Regmirror(procs, os.path.join(run_dir, f"round-{r}"), upstream, args.binary)
            before = blob_gets(upstream, path)
            wall, ok, errors = clients.herd(mirror.port, path, big["digest"], big["size"],
                                            args.herd)
            time.sleep(0.5)  # the upstream's access log line is written after its body
            gets = blob_gets(upstream, path) - before
            walls.append(wall)
            log(f"round {r + 1}: {ok}/{args.herd} bodies verified, {gets} upstream GET(s), "
                f"{wall:.2f} s")
            if ok != args.herd or gets != 1:
                failures.append(f"round {r + 1}: {ok}/{args.herd} verified, {gets} GETs, "
                                f"{errors}")
            last = mirror
            if r < args.rounds - 1:
                procs.stop(mirror.proc)
                shutil.rmtree(os.path.join(run_dir, f"round-{r}"), ignore_errors=True)

        # The last round's mirror holds the blob: restart it on the same data dir.
        procs.stop(last.proc)
        data = os.path.join(last.directory, "data")
        restarted = os.path.join(run_dir, "restarted")
        os.makedirs(restarted, exist_ok=True)
        env = dict(os.environ, RUST_LOG="info")
        port, _ = start_on_free_port(
            procs, "the restarted regmirror",
            lambda p: procs.start("regmirror", [args.binary, "serve", "--listen",
                                                f"127.0.0.1:{p}", "--data-dir", data,
                                                "--upstream", upstream.url], restarted, env=env),
            lambda p: http_status(f"http://127.0.0.1:{p}/v2/") == 200)
        before = blob_gets(upstream, path)
        first = timed_get(port, path)
        second = timed_get(port, path)
        gets = blob_gets(upstream, path) - before
        log(f"after a restart: first hit headers {first[0] * 1000:.1f} ms, body {first[1]:.2f} s "
            f"({first[2]}, {first[3]} bytes); second hit headers {second[0] * 1000:.1f} ms, body "
            f"{second[1]:.2f} s; {gets} upstream GETs")
        if first[2] != 200 or first[3] != big["size"] or gets != 0:
            failures.append(f"restart: {first}, {gets} upstream GETs")
        walls.sort()
        print(f"{args.rounds} rounds of {args.herd} clients on a cold "
              f"{args.big_mib} MiB blob: {args.rounds - len([f for f in failures if f.startswith('round')])}"
              f" rounds with every body verified and one upstream GET; herd wall "
              f"min {walls[0]:.2f} s, median {walls[len(walls) // 2]:.2f} s, max {walls[-1]:.2f} s")
        print(f"first hit after a restart: headers in {first[0] * 1000:.1f} ms, last byte in "
              f"{first[1]:.2f} s; second hit: headers in {second[0] * 1000:.1f} ms, last byte in "
              f"{second[1]:.2f} s")
    finally:
        procs.stop_all()
        shutil.rmtree(run_dir, ignore_errors=True)
    for f in failures:
        print(f"FAILED {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
