#!/usr/bin/env python3
"""What a flood of wrong passwords costs an authenticated user: a warm pull of the bench's
30-layer image through regmirror with an htpasswd file made as the guides make it
(`htpasswd -Bbn`, bcrypt cost 5), timed alone and while 200 client threads send wrong
passwords for the same real user, against the bench's docker-registry upstream.

    python3 bench/auth_flood.py --binary target/release/regmirror

It prints the medians and the flood's answers (401, 429) and exits non-zero if a pull failed.
"""

import argparse
import base64
import http.client
import json
import multiprocessing
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

from services import full_sizes, upstream_lab, PASSWORD, USER, Procs, http_status, start_on_free_port

ACCEPT = ", ".join([
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
])


def log(msg):
    print(f"[auth_flood] {msg}", file=sys.stderr, flush=True)


def basic(user, password):
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def pull(port, auth, image="library/many", tag="1"):
    """A warm pull as a client makes it, on one keep-alive connection: seconds."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    start = time.monotonic()
    try:
        conn.request("GET", f"/v2/{image}/manifests/{tag}",
                     headers={"Authorization": auth, "Accept": ACCEPT})
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"manifest: {resp.status} {body[:200]!r}")
        m = json.loads(body)
        for d in [m["config"]] + m["layers"]:
            conn.request("GET", f"/v2/{image}/blobs/{d['digest']}",
                         headers={"Authorization": auth})
            resp = conn.getresponse()
            data = resp.read()
            if resp.status != 200 or len(data) != d["size"]:
                raise RuntimeError(f"blob {d['digest']}: {resp.status}, {len(data)} bytes")
        return time.monotonic() - start
    finally:
        conn.close()


def flood(port, stop, answers, lock, anonymous):
    """Wrong passwords for the real user, a new one each time (or, `anonymous`, requests
    without credentials, for what the request volume alone costs), until `stop`."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    while not stop.is_set():
        try:
            guess = f"guess-{random.getrandbits(64):x}"
            headers = {} if anonymous else {"Authorization": basic("moby", guess)}
            conn.request("GET", "/v2/", headers=headers)
            resp = conn.getresponse()
            resp.read()
            with lock:
                answers[resp.status] = answers.get(resp.status, 0) + 1
        except Exception:
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            with lock:
                answers["error"] = answers.get("error", 0) + 1


def flood_process(port, threads, anonymous, stop, results):
    """`threads` flooding threads until `stop`; their answers counted into `results`."""
    lock, answers, done = threading.Lock(), {}, threading.Event()
    workers = [threading.Thread(target=flood, args=(port, done, answers, lock, anonymous),
                                daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    stop.wait()
    done.set()
    for w in workers:
        w.join(timeout=60)
    results.put(answers)


def main():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--binary", default=os.path.join(repo, "target", "release", "regmirror"))
    ap.add_argument("--work", default=os.path.join(repo, "target", "bench"))
    ap.add_argument("--threads", type=int, default=200)
    ap.add_argument("--pulls", type=int, default=5)
    ap.add_argument("--anonymous", action="store_true",
                    help="flood without credentials instead (the cost of the volume alone)")
    ap.add_argument("--no-credential-hosts", action="store_true",
                    help="for a regmirror older than upstream.credential_hosts host:port")
    args = ap.parse_args()
    # The mirror runs in a directory of its own: a relative path would not name it there.
    args.binary = os.path.abspath(args.binary)

    sizes = full_sizes()
    run_dir = os.path.join(args.work, f"auth-flood-{os.getpid()}")
    os.makedirs(run_dir)
    procs = Procs()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    failed = False
    try:
        _, fx, upstream = upstream_lab(procs, args.work, run_dir, sizes, log)
        htpasswd = os.path.join(run_dir, "htpasswd")
        with open(htpasswd, "w") as f:
            f.write(subprocess.run(["htpasswd", "-Bbn", "moby", "gordon"], check=True,
                                   capture_output=True, text=True).stdout)
        mirror_dir = os.path.join(run_dir, "mirror")
        env = dict(os.environ, RUST_LOG="warn", REGMIRROR_AUTH_HTPASSWD=htpasswd,
                   REGMIRROR_UPSTREAM_USERNAME=USER, REGMIRROR_UPSTREAM_PASSWORD=PASSWORD)
        if not args.no_credential_hosts:
            env["REGMIRROR_UPSTREAM_CREDENTIAL_HOSTS"] = f'["{upstream.realm_host}"]'
        port, _ = start_on_free_port(
            procs, "regmirror",
            lambda p: procs.start("regmirror", [args.binary, "serve", "--listen",
                                                f"127.0.0.1:{p}", "--data-dir",
                                                os.path.join(mirror_dir, "data"), "--upstream",
                                                upstream.url], mirror_dir, env=env),
            lambda p: http_status(f"http://127.0.0.1:{p}/v2/") == 401)
        auth = basic("moby", "gordon")
        pull(port, auth)  # cold: fills the cache
        alone = [pull(port, auth) for _ in range(args.pulls)]
        # The flood in a process of its own, as an attacker is: its threads must not hold the
        # puller's interpreter lock.
        results = multiprocessing.Queue()
        stop = multiprocessing.Event()
        flooder = multiprocessing.Process(
            target=flood_process, args=(port, args.threads, args.anonymous, stop, results))
        flooder.start()
        time.sleep(2)  # the flood under way
        during = [pull(port, auth) for _ in range(args.pulls)]
        stop.set()
        answers = results.get(timeout=120)
        flooder.join(timeout=60)
        a, d = statistics.median(alone), statistics.median(during)
        print(f"warm pull of library/many (30 layers): alone median {a * 1000:.0f} ms "
              f"{[round(x * 1000) for x in alone]}; during {args.threads} threads of "
              f"{'requests without credentials' if args.anonymous else 'wrong passwords'} median {d * 1000:.0f} ms {[round(x * 1000) for x in during]}; "
              f"ratio {d / a:.2f}; flood answers {answers}")
    except Exception as e:
        failed = True
        print(f"FAILED: {e}")
    finally:
        procs.stop_all()
        shutil.rmtree(run_dir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
