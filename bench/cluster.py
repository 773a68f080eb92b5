"""The cluster rows: three `regmirror serve` replicas sharing one cache, the bytes in a
one-node Garage bucket, metadata and download leases in a redis-server, each replica's data dir
its local tier. Measured beside the single-node regmirror and nginx sendfile of the same run:

- one client alone on the cold big blob through one replica (its own key prefix in the
  bucket and its own Redis database, so the herd after it still finds both empty), its body
  hashed: wall time;
- the herd: N clients released together on the cold big blob, client i straight to replica
  i % 3 (no load balancer in between), every body hashed; wall time, the upstream's blob GETs
  and bytes (its access log), what each replica filled from where (its /metrics) and each
  replica's peak RSS;
- warm from the bucket: a 4th replica on an empty disk, its first GET of the big blob (curl),
  and warm from its local tier, its second GET, in rounds taken in turn with nginx sendfile of
  the same file, a new 4th replica each round; then one more new replica whose first and
  second bodies are hashed.

bench.py calls `measure`; see bench/README.md.
"""

import os
import shutil
import statistics
import sys
import time

import clients
from services import Garage, Redis, Replica, random_hex

REPLICAS = 3
COLUMNS = [f"regmirror, {REPLICAS} replicas", "regmirror, one node", "nginx sendfile"]
CLUSTER, ONE, NGINX = COLUMNS

ABOUT = (f"{REPLICAS} `regmirror serve` replicas sharing one cache: the bytes in a one-node Garage "
         "bucket on loopback ({garage}), metadata and download leases in a redis-server "
         "({redis}), each replica's data dir its local tier; the bucket, Redis and the "
         "replicas' disks empty before the herd. The one-node column is the main table's "
         "regmirror of this run (its herd, its warm blob); nginx's warm figures are its own "
         "rounds taken in turn with the cluster's.")

ROWS = [
    ("single_wall", "one client alone × the same cold {big} blob, through one replica: wall "
                    "time"),
    ("herd_wall", "herd, {herd} clients × one cold {big} blob, client i straight to replica "
                  "i mod " + str(REPLICAS) + ": wall time"),
    ("herd_ratio", "herd wall time ÷ the one-node herd's"),
    ("herd_bytes", "herd: bytes served by the upstream"),
    ("herd_ok", "herd: bodies complete with the right digest"),
    ("herd_fills", "herd: fills by origin, all replicas' /metrics (upstream / peer / bucket)"),
    ("herd_rss", "herd: peak RSS of each replica (VmHWM)"),
    ("bucket", "warm blob from the bucket: a new replica's first GET, curl, median of "
               "{repeat} (GB/s)"),
    ("bucket_ratio", "warm blob from the bucket ÷ nginx's, rounds taken in turn (median)"),
    ("local", "warm blob from the local tier: the same replica's second GET, once its disk "
              "holds the blob (GB/s)"),
    ("local_ratio", "warm blob from the local tier ÷ nginx's, rounds taken in turn (median)"),
    ("warm_hits", "warm rows: tier hits of the new replicas (bucket / local), requests at "
                  "the upstream"),
    ("warm_ok", "warm rows: a new replica's first and second bodies hashed, right digest"),
]


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] cluster: {msg}", file=sys.stderr, flush=True)


def wait_committed(replica, digest, timeout=60):
    """Seconds until the replica's local tier holds `digest` (its disk store's file, renamed
    into place once the download is verified and written): the first GET's last byte comes
    before that, and a GET in between is answered on the download's path, not as a hit of the
    local tier (tier_hits{tier="local"} does not count it)."""
    alg, hexd = digest.split(":", 1)
    path = os.path.join(replica.directory, "data", "blobs", alg, hexd[:2], hexd)
    start = time.monotonic()
    while not os.path.exists(path):
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"the replica's local tier lacks {digest} {timeout}s after its "
                               f"first GET ({path})")
        time.sleep(0.01)
    return time.monotonic() - start


def mib(n):
    return f"{n / (1 << 20):.0f} MiB"


def measure(ctx, results, counters, prewarm, human_bytes, ratio_text):
    """Every cluster row into `results` (a bench.Results on ROWS and COLUMNS); the one-node
    and nginx cells are copied from the main table by `copy_from_main` once it is complete.
    `counters()` starts counting what the upstream serves (bench.Counters); `prewarm`,
    `human_bytes` and `ratio_text` are bench.py's."""
    fx, upstream, procs = ctx["fixture"], ctx["upstream"], ctx["procs"]
    big = fx["big"]
    big_path = f"/v2/library/big/blobs/{big['digest']}"
    base = os.path.join(ctx["run_dir"], "cluster")
    herd_n = ctx["herd"]
    secret = random_hex(16)
    started = []

    def replica(name, env=None):
        r = Replica(procs, os.path.join(base, name), upstream, ctx["binary"], garage, redis,
                    secret, env)
        started.append(r)
        return r

    def stop(r):
        procs.stop(r.proc)
        shutil.rmtree(os.path.join(r.directory, "data"), ignore_errors=True)  # logs stay

    garage = redis = None
    try:
        log("starting Garage (one node) and redis-server")
        garage = Garage(procs, os.path.join(base, "garage"))
        redis = Redis(procs, os.path.join(base, "redis"))
    except Exception as e:
        results.fail([k for k, _ in ROWS], CLUSTER, "start Garage and Redis", e)
        for part in (garage, redis):
            if part:
                procs.stop(part.proc)
        return

    try:
        prewarm(fx["storage"])
        # Apart from the herd's: another prefix in the bucket, another Redis database.
        alone = replica("alone", {"REGMIRROR_STORAGE_S3_PREFIX": "alone/",
                                  "REGMIRROR_CLUSTER_REDIS": redis.db(1)})
        try:
            wall, ok, errors = clients.herd(alone.port, big_path, big["digest"], big["size"], 1)
            if ok != 1:
                raise RuntimeError("single body wrong: " + "; ".join(errors))
            results.set("single_wall", CLUSTER, f"{wall:.2f} s")
            log(f"one client alone {wall:.2f}s")
        except Exception as e:
            results.fail(["single_wall"], CLUSTER, "one client", e)
        finally:
            stop(alone)

        prewarm(fx["storage"])
        replicas = [replica(f"replica-{i + 1}") for i in range(REPLICAS)]
        log(f"{REPLICAS} replicas on ports {[r.port for r in replicas]}, bucket and Redis "
            f"empty; herd of {herd_n}")
        try:
            seen_from = counters()
            rss = [clients.PeakRss(r.pid) for r in replicas]
            walls = []
            wall, ok, errors = clients.herd([r.port for r in replicas], big_path, big["digest"],
                                            big["size"], herd_n, walls=walls)
            peaks = [max(x.stop()) for x in rss]
            seen = seen_from.since()
            gets = [s for s in seen["served"]
                    if s[0] == "GET" and "/blobs/" in s[1] and 200 <= s[2] < 300]
            holders = [i + 1 for i, r in enumerate(replicas)
                       if r.metric("regmirror_upstream_fills_total")]
            fills = [sum(r.metric("regmirror_upstream_fills_total") for r in replicas)] + [
                sum(r.metric("regmirror_tier_hits_total", {"tier": t}) for r in replicas)
                for t in ("peer", "bucket")]
            results.set("herd_wall", CLUSTER, f"{wall:.2f} s")
            results.set("herd_bytes", CLUSTER, f"{human_bytes(seen['bytes'])} "
                        f"({len(gets)} blob GET{'s' if len(gets) != 1 else ''})")
            results.set("herd_ok", CLUSTER, f"{ok}/{herd_n}")
            results.set("herd_fills", CLUSTER, " / ".join(f"{f:.0f}" for f in fills))
            results.set("herd_rss", CLUSTER, ", ".join(mib(p) for p in peaks))
            log(f"herd {wall:.2f}s, {ok}/{herd_n} ok, {len(gets)} upstream blob GETs "
                f"({human_bytes(seen['bytes'])}), fills upstream/peer/bucket "
                f"{[round(f) for f in fills]} (from the upstream: replica {holders}), peak RSS "
                f"{[mib(p) for p in peaks]}; slowest "
                f"client of each replica " + ", ".join(
                    f"{max((w for w in walls[i::REPLICAS] if w is not None), default=0):.2f}s"
                    for i in range(REPLICAS)))
            if ok != herd_n:
                raise RuntimeError("herd bodies wrong: " + "; ".join(errors[:4]))
        except Exception as e:
            results.fail(["herd_wall", "herd_ratio", "herd_bytes", "herd_ok", "herd_fills",
                          "herd_rss"], CLUSTER, "herd", e)
        finally:
            for r in replicas:
                stop(r)

        # The bucket holds the blob now (if the herd worked). A new replica on an empty disk
        # per round: its first GET comes from the bucket, its second from its own disk.
        nginx = ctx.get("nginx")
        try:
            seen_from = counters()
            from_bucket, from_local, theirs, waits = [], [], [], []
            hits = [0.0, 0.0]
            for i in range(ctx["repeat"]):
                r = replica(f"warm-{i + 1}")
                try:
                    if nginx:
                        theirs.append(clients.curl_throughput(
                            f"http://127.0.0.1:{nginx.port}/blob", big["size"], 1))
                    url = f"http://127.0.0.1:{r.port}{big_path}"
                    from_bucket.append(clients.curl_throughput(url, big["size"], 1))
                    waits.append(wait_committed(r, big["digest"]))
                    from_local.append(clients.curl_throughput(url, big["size"], 1))
                    hits[0] += r.metric("regmirror_tier_hits_total", {"tier": "bucket"})
                    hits[1] += r.metric("regmirror_tier_hits_total", {"tier": "local"})
                finally:
                    stop(r)
            seen = seen_from.since()
            results.set("bucket", CLUSTER, f"{statistics.median(from_bucket) / 1e9:.2f}")
            results.set("local", CLUSTER, f"{statistics.median(from_local) / 1e9:.2f}")
            if theirs:
                results.set("bucket", NGINX, f"{statistics.median(theirs) / 1e9:.2f}")
                results.set("local", NGINX, f"{statistics.median(theirs) / 1e9:.2f}")
                results.set("bucket_ratio", CLUSTER, ratio_text(statistics.median(
                    m / t for m, t in zip(from_bucket, theirs))))
                results.set("local_ratio", CLUSTER, ratio_text(statistics.median(
                    m / t for m, t in zip(from_local, theirs))))
            results.set("warm_hits", CLUSTER, f"{hits[0]:.0f} / {hits[1]:.0f}, "
                                              f"{seen['requests']} upstream requests")
            log(f"warm from the bucket {[round(m / 1e9, 2) for m in from_bucket]} GB/s, from "
                f"the local tier {[round(m / 1e9, 2) for m in from_local]}, nginx "
                f"{[round(t / 1e9, 2) for t in theirs]}; local commit after the first body "
                f"{[round(w, 2) for w in waits]} s; tier hits bucket/local {hits}, "
                f"{seen['requests']} upstream requests")
        except Exception as e:
            results.fail(["bucket", "bucket_ratio", "local", "local_ratio", "warm_hits"],
                         CLUSTER, "warm blob", e)

        try:
            r = replica("warm-checked")
            try:
                got = []
                for tier in ("bucket", "local"):
                    _, ok, errors = clients.herd(r.port, big_path, big["digest"], big["size"], 1)
                    got.append(ok)
                    if tier == "bucket" and ok == 1:
                        wait_committed(r, big["digest"])
                    if ok != 1:
                        raise RuntimeError(f"body from the {tier} wrong: " + "; ".join(errors))
                results.set("warm_ok", CLUSTER, f"{sum(got)}/2")
                log("a new replica's first and second bodies hashed: right digest")
            finally:
                stop(r)
        except Exception as e:
            results.fail(["warm_ok"], CLUSTER, "warm bodies checked", e)
    finally:
        for r in started:
            if r.proc.alive():
                stop(r)
        procs.stop(redis.proc)
        procs.stop(garage.proc)
        shutil.rmtree(os.path.join(base, "garage", "data"), ignore_errors=True)


def copy_from_main(results, main, main_regmirror, main_nginx):
    """The one-node and nginx cells, from the main table of the same run, and the ratio of
    the two herds."""
    def cell(key, column):
        text = main.cells.get((key, column))
        return None if text in (None, "**failed**") else text

    for ours, theirs in (("single_wall", "single_wall"), ("herd_wall", "herd_wall"), ("herd_bytes", "herd_bytes"),
                         ("herd_ok", "herd_ok"), ("herd_rss", "herd_rss"),
                         ("local", "throughput"), ("local_ratio", "throughput_ratio")):
        if cell(theirs, main_regmirror):
            results.set(ours, ONE, cell(theirs, main_regmirror))
    one, ours = cell("herd_wall", main_regmirror), results.cells.get(("herd_wall", CLUSTER))
    if one and ours and ours != "**failed**":
        results.set("herd_ratio", CLUSTER, f"{float(ours.split()[0]) / float(one.split()[0]):.2f}×")
    nginx_herd = cell("herd_warm_wall", main_nginx)
    if nginx_herd:
        results.set("herd_wall", NGINX, f"{nginx_herd} (from the page cache)")
