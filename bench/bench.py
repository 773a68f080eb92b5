#!/usr/bin/env python3
"""regmirror's benchmark against distribution's proxy mode, with nginx sendfile as the ceiling.
Everything runs on 127.0.0.1; `bench/run.sh` installs the tools, builds regmirror and calls
this. See bench/README.md for what each row measures.
"""

import argparse
import datetime
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback

import clients
import cluster
import fixture as fixtures
import push
from issuer import generate_keys
from services import DistributionProxy, Issuer, Nginx, Procs, Regmirror, Upstream

MIRRORS = {"distribution": DistributionProxy, "regmirror": Regmirror}
TOOLS = ["docker-registry", "skopeo", "nginx", "wrk", "openssl", "curl"]
CLUSTER_TOOLS = ["garage", "redis-server"]


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def human_bytes(n):
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


class Counters:
    """What the upstream and the issuer saw since it was made."""

    def __init__(self, upstream, issuer):
        self.upstream, self.issuer = upstream, issuer
        self.lines = len(upstream.served())
        self.tokens = issuer.tokens()

    def since(self, settle=0.5):
        time.sleep(settle)  # the access log line is written when the response ends
        served = self.upstream.served()[self.lines:]
        # A HEAD's logged size is the body it did not send.
        return {"requests": len(served), "bytes": sum(s[3] for s in served if s[0] != "HEAD"),
                "tokens": self.issuer.tokens() - self.tokens, "served": served}


def ratio_text(ratio):
    """0.93×; small ratios keep two significant digits (0.00084×), not 0.00×."""
    return f"{ratio:.2f}×" if ratio >= 0.01 else f"{ratio:.2g}×"


def prewarm(storage):
    """Reads the upstream's files once, so no mirror pays for a cold page cache."""
    for root, _, files in os.walk(storage):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                while f.read(1 << 20):
                    pass


class Row:
    def __init__(self, label):
        self.label = label
        self.cells = {}


class Results:
    """The table, filled measure by measure; a measure that fails says so in its cell."""

    ROWS = [
        ("cold_wall", "cold pull of the image set (skopeo): wall time"),
        ("cold_bytes", "cold pull: bytes served by the upstream"),
        ("cold_requests", "cold pull: requests at the upstream"),
        ("cold_tokens", "cold pull: token fetches at the issuer"),
        ("warm_wall", "warm pull of the same set: wall time"),
        ("warm_requests", "warm pull: requests at the upstream"),
        ("single_wall", "one client alone × the same cold {big} blob: wall time"),
        ("herd_wall", "herd, {herd} clients × one cold {big} blob: wall time"),
        ("herd_ratio", "herd wall time ÷ one client's"),
        ("herd_warm_wall", "the same herd again, the blob cached: wall time"),
        ("herd_warm_ratio", "herd cold ÷ herd cached (the cost of the miss)"),
        ("herd_bytes", "herd: bytes served by the upstream"),
        ("herd_ok", "herd: bodies complete with the right digest"),
        ("herd_rss", "herd: peak RSS of the mirror (VmHWM)"),
        ("throughput", "warm single-blob throughput, curl, median of {repeat} (GB/s)"),
        ("throughput_ratio", "warm blob throughput ÷ nginx's, rounds taken in turn (median)"),
        ("manifest_rps", "warm manifest by tag, wrk -c64 -t2, median of {rounds} × {wrk}s "
                         "(requests/s)"),
        ("manifest_ratio", "manifest requests/s ÷ nginx's, rounds taken in turn (median)"),
        ("manifest_upstream", "manifest by tag run: requests at the upstream"),
    ]

    def __init__(self, columns, params, rows=None):
        self.rows = rows or self.ROWS
        self.columns = columns
        self.params = params
        self.cells = {}
        self.errors = []

    def set(self, row, column, text):
        self.cells[(row, column)] = text

    def fail(self, rows, column, what, exc):
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        self.errors.append(f"{column}, {what}: {detail}")
        for row in rows:
            self.cells.setdefault((row, column), "**failed**")
        log(f"FAILED {column}, {what}: {detail}")

    def markdown(self):
        head = "| measure | " + " | ".join(self.columns) + " |"
        sep = "|---|" + "---:|" * len(self.columns)
        lines = [head, sep]
        for key, label in self.rows:
            cells = [self.cells.get((key, c), "—") for c in self.columns]
            lines.append(f"| {label.format(**self.params)} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def measure_mirror(kind, ctx, results):
    """Every row for one mirror: a fresh mirror for the pulls, throughput and manifest rows,
    then another fresh one (empty cache, new process) for the herd."""
    cls, column = MIRRORS[kind], MIRRORS[kind].name
    fx, upstream, issuer, procs = ctx["fixture"], ctx["upstream"], ctx["issuer"], ctx["procs"]
    base = os.path.join(ctx["run_dir"], kind)
    skopeo = clients.Skopeo(os.path.join(base, "skopeo"))
    big = fx["big"]
    big_path = f"/v2/library/big/blobs/{big['digest']}"

    prewarm(fx["storage"])
    log(f"{column}: starting (empty cache)")
    mirror = cls(procs, os.path.join(base, "pulls"), upstream, *ctx["mirror_args"][kind])
    registry = f"127.0.0.1:{mirror.port}"
    try:
        try:
            counters = Counters(upstream, issuer)
            wall = clients.pull_set(skopeo, registry, fx["images"], os.path.join(base, "cold"))
            seen = counters.since()
            results.set("cold_wall", column, f"{wall:.2f} s")
            results.set("cold_bytes", column, human_bytes(seen["bytes"]))
            results.set("cold_requests", column, str(seen["requests"]))
            results.set("cold_tokens", column, str(seen["tokens"]))
            log(f"{column}: cold pull {wall:.2f}s, upstream {seen['requests']} requests, "
                f"{human_bytes(seen['bytes'])}, {seen['tokens']} tokens")

            counters = Counters(upstream, issuer)
            wall = clients.pull_set(skopeo, registry, fx["images"], os.path.join(base, "warm"))
            seen = counters.since()
            results.set("warm_wall", column, f"{wall:.2f} s")
            results.set("warm_requests", column, str(seen["requests"]) +
                        (f" ({seen['tokens']} tokens)" if seen["tokens"] else ""))
            log(f"{column}: warm pull {wall:.2f}s, upstream {seen['requests']} requests")
        except Exception as e:
            results.fail(["cold_wall", "cold_bytes", "cold_requests", "cold_tokens",
                          "warm_wall", "warm_requests"], column, "pulls", e)

        # Throughput and manifest rates are taken in rounds, nginx then the mirror, so each
        # ratio compares two figures measured seconds apart: this machine's figures drift by
        # tens of percent over minutes.
        nginx = ctx.get("nginx")
        try:
            mine, theirs = [], []
            for _ in range(ctx["repeat"]):
                if nginx:
                    theirs.append(clients.curl_throughput(
                        f"http://127.0.0.1:{nginx.port}/blob", big["size"], 1))
                mine.append(clients.curl_throughput(f"http://{registry}{big_path}",
                                                    big["size"], 1))
            results.set("throughput", column, f"{statistics.median(mine) / 1e9:.2f}")
            if theirs:
                ctx["nginx_speeds"].extend(theirs)
                ratio = statistics.median(m / t for m, t in zip(mine, theirs))
                results.set("throughput_ratio", column, ratio_text(ratio))
            log(f"{column}: warm blob {[round(m / 1e9, 2) for m in mine]} GB/s, nginx "
                f"{[round(t / 1e9, 2) for t in theirs]}")
        except Exception as e:
            results.fail(["throughput", "throughput_ratio"], column, "throughput", e)

        try:
            status, _, body = clients.get(mirror.port, fx["manifest_path"])
            with open(fx["manifest_file"], "rb") as f:
                if status != 200 or body != f.read():
                    raise RuntimeError(f"manifest GET answered {status} with other bytes")
            counters = Counters(upstream, issuer)
            mine, theirs, notes = [], [], []
            for _ in range(ctx["wrk_rounds"]):
                if nginx:
                    rate, _, _ = clients.wrk(f"http://127.0.0.1:{nginx.port}/manifest",
                                             ctx["wrk_seconds"])
                    theirs.append(rate)
                rate, non2xx, errors = clients.wrk(f"http://{registry}{fx['manifest_path']}",
                                                   ctx["wrk_seconds"])
                mine.append(rate)
                notes += [f"{non2xx} non-2xx" if non2xx else "",
                          f"socket errors: {errors}" if errors else ""]
            seen = counters.since()
            note = "".join(f" ({n})" for n in dict.fromkeys(notes) if n)
            results.set("manifest_rps", column, f"{statistics.median(mine):,.0f}{note}")
            if theirs:
                ctx["nginx_rates"].extend(theirs)
                ratio = statistics.median(m / t for m, t in zip(mine, theirs))
                results.set("manifest_ratio", column, ratio_text(ratio))
            results.set("manifest_upstream", column, str(seen["requests"]))
            log(f"{column}: manifests {[round(m) for m in mine]}/s{note}, nginx "
                f"{[round(t) for t in theirs]}/s, upstream {seen['requests']} requests")
        except Exception as e:
            results.fail(["manifest_rps", "manifest_ratio", "manifest_upstream"], column,
                         "manifest wrk", e)
    finally:
        procs.stop(mirror.proc)
        shutil.rmtree(os.path.join(base, "pulls"), ignore_errors=True)

    prewarm(fx["storage"])
    log(f"{column}: starting again (empty cache) for one client alone")
    single = None
    mirror = cls(procs, os.path.join(base, "single"), upstream, *ctx["mirror_args"][kind])
    try:
        single, ok, errors = clients.herd(mirror.port, big_path, big["digest"], big["size"], 1)
        if ok != 1:
            raise RuntimeError("single body wrong: " + "; ".join(errors[:4]))
        results.set("single_wall", column, f"{single:.2f} s")
        log(f"{column}: one client {single:.2f}s")
    except Exception as e:
        single = None
        results.fail(["single_wall"], column, "one client", e)
    finally:
        procs.stop(mirror.proc)
        shutil.rmtree(os.path.join(base, "single"), ignore_errors=True)

    prewarm(fx["storage"])
    log(f"{column}: starting again (empty cache) for the herd of {ctx['herd']}")
    mirror = cls(procs, os.path.join(base, "herd"), upstream, *ctx["mirror_args"][kind])
    try:
        counters = Counters(upstream, issuer)
        rss = clients.PeakRss(mirror.pid)
        wall, ok, errors = clients.herd(mirror.port, big_path, big["digest"], big["size"],
                                        ctx["herd"])
        peak, hwm = rss.stop()
        seen = counters.since()
        gets = [s for s in seen["served"]
                if s[0] == "GET" and "/blobs/" in s[1] and 200 <= s[2] < 300]
        results.set("herd_wall", column, f"{wall:.2f} s")
        if single:
            results.set("herd_ratio", column, f"{wall / single:.1f}×")
        results.set("herd_bytes", column, f"{human_bytes(seen['bytes'])} "
                                          f"({len(gets)} blob GET{'s' if len(gets) != 1 else ''})")
        results.set("herd_ok", column, f"{ok}/{ctx['herd']}")
        results.set("herd_rss", column, f"{max(peak, hwm) / (1 << 20):.0f} MiB")
        log(f"{column}: herd {wall:.2f}s, {ok}/{ctx['herd']} ok, {len(gets)} upstream GETs, "
            f"peak RSS {max(peak, hwm) / (1 << 20):.0f} MiB")
        if ok != ctx["herd"]:
            raise RuntimeError("herd bodies wrong: " + "; ".join(errors[:4]))
        # The same herd from the cache: what delivering (and hashing) these bodies costs on
        # this machine whatever the mirror does; on a small machine it dwarfs one client.
        warm, ok, errors = clients.herd(mirror.port, big_path, big["digest"], big["size"],
                                        ctx["herd"])
        if ok != ctx["herd"]:
            raise RuntimeError("cached herd bodies wrong: " + "; ".join(errors[:4]))
        results.set("herd_warm_wall", column, f"{warm:.2f} s")
        results.set("herd_warm_ratio", column, f"{wall / warm:.2f}×")
        log(f"{column}: herd again from the cache {warm:.2f}s")
    except Exception as e:
        results.fail(["herd_wall", "herd_ratio", "herd_bytes", "herd_ok", "herd_rss",
                      "herd_warm_wall", "herd_warm_ratio"], column, "herd", e)
    finally:
        procs.stop(mirror.proc)
        shutil.rmtree(os.path.join(base, "herd"), ignore_errors=True)


def start_nginx(ctx, results):
    """nginx with sendfile, started before the mirrors so their rounds can alternate with it."""
    fx = ctx["fixture"]
    try:
        ctx["nginx"] = Nginx(ctx["procs"], os.path.join(ctx["run_dir"], "nginx"), fx["big_file"],
                             fx["manifest_file"], fx["manifest_type"])
    except Exception as e:
        results.fail(["throughput", "manifest_rps", "herd_warm_wall"], Nginx.name, "start", e)


def measure_nginx(ctx, results):
    """nginx's own column: the medians of its rounds beside the mirrors, and its herd."""
    fx, column, nginx = ctx["fixture"], Nginx.name, ctx.get("nginx")
    if not nginx:
        return
    try:
        if ctx["nginx_speeds"]:
            speed = statistics.median(ctx["nginx_speeds"])
            results.set("throughput", column, f"{speed / 1e9:.2f}")
        if ctx["nginx_rates"]:
            results.set("manifest_rps", column, f"{statistics.median(ctx['nginx_rates']):,.0f}")
        try:
            wall, ok, errors = clients.herd(nginx.port, "/blob", fx["big"]["digest"],
                                            fx["big"]["size"], ctx["herd"])
            if ok != ctx["herd"]:
                raise RuntimeError("herd bodies wrong: " + "; ".join(errors[:4]))
            results.set("herd_warm_wall", column, f"{wall:.2f} s")
            log(f"{column}: herd {wall:.2f}s")
        except Exception as e:
            results.fail(["herd_warm_wall"], column, "herd", e)
    finally:
        ctx["procs"].stop(nginx.proc)


def command_output(argv):
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        return (r.stdout + r.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


def machine(binary, repo):
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = command_output(["sh", "-c", "free -h | awk '/^Mem:/ {print $2}'"])
    rev = command_output(["git", "-C", repo, "describe", "--always", "--dirty"])
    return [
        ("CPU", f"{cpu}, {os.cpu_count()} CPUs (`nproc`: {command_output(['nproc'])})"),
        ("memory", memory),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("load average at start", " ".join(f"{x:.2f}" for x in os.getloadavg())),
        ("regmirror", f"{command_output([binary, '--version'])} (git {rev}, `{binary}`)"),
        ("docker-registry", command_output(["docker-registry", "--version"])),
        ("nginx", command_output(["nginx", "-v"])),
        ("skopeo", command_output(["skopeo", "--version"])),
        ("wrk", " ".join(command_output(["wrk", "--version"]).split()[:2])),
        ("curl", " ".join(command_output(["curl", "--version"]).split()[:2])),
    ]


def main():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes (16 MiB big layer, 4 herd clients, 2 s wrk): proves the "
                         "benchmark works; its figures mean little")
    ap.add_argument("--binary", default=os.path.join(repo, "target", "release", "regmirror"))
    ap.add_argument("--out", help="Markdown file for the results (default "
                                  "bench/results-<date>.md; WORK/results-smoke.md with --smoke)")
    ap.add_argument("--work", default=os.path.join(repo, "target", "bench"),
                    help="work dir: the image set is kept here between runs")
    ap.add_argument("--mirrors", default="distribution,regmirror",
                    help="comma-separated: distribution, regmirror")
    ap.add_argument("--no-nginx", action="store_true")
    ap.add_argument("--no-cluster", action="store_true",
                    help="skip the cluster rows (3 replicas on Garage and redis-server)")
    ap.add_argument("--no-pull", action="store_true",
                    help="skip the pull rows (the mirrors' and nginx's); with --no-cluster only "
                         "the push rows run")
    ap.add_argument("--no-push", action="store_true",
                    help="skip the push rows (regmirror hosting bench/* against a writable "
                         "docker-registry)")
    ap.add_argument("--push-mib", type=int,
                    help="push rows: push this many MiB of noise instead of the big layer "
                         "(1 in smoke)")
    ap.add_argument("--push-chunk-kib", type=int,
                    help="push rows: the chunked push's PATCH size, KiB (65536; 256 in smoke)")
    ap.add_argument("--big-mib", type=int, help="size of the big layer's noise, MiB")
    ap.add_argument("--herd", type=int, help="herd clients")
    ap.add_argument("--wrk-seconds", type=int)
    ap.add_argument("--repeat", type=int, help="throughput rounds, median kept (5; 1 in smoke)")
    ap.add_argument("--wrk-rounds", type=int, help="manifest rounds of wrk (3; 1 in smoke)")
    ap.add_argument("--keep", action="store_true", help="keep the run dir (logs) afterwards")
    args = ap.parse_args()

    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing:
        sys.exit(f"bench: missing {' '.join(missing)} (bench/run.sh installs them as root)")
    missing = [] if args.no_cluster else [t for t in CLUSTER_TOOLS if not shutil.which(t)]
    if missing:
        sys.exit(f"bench: missing {' '.join(missing)} for the cluster rows (redis-server: "
                 f"apt-get install redis-server; garage: cargo install garage --locked, "
                 f"~/.cargo/bin on PATH; or --no-cluster)")
    if not os.access(args.binary, os.X_OK):
        sys.exit(f"bench: no regmirror binary at {args.binary} (bench/run.sh builds it)")
    mirrors = [m.strip() for m in args.mirrors.split(",") if m.strip()]
    unknown = [m for m in mirrors if m not in MIRRORS]
    if unknown:
        sys.exit(f"bench: unknown mirror {unknown}; choose from {list(MIRRORS)}")

    big_mib = args.big_mib or (16 if args.smoke else 1024)
    sizes = {"big_bytes": big_mib << 20, "many_layers": 30,
             "many_layer_bytes": (16 << 10) if args.smoke else (256 << 10)}
    herd = args.herd or (4 if args.smoke else 16)
    wrk_seconds = args.wrk_seconds or (2 if args.smoke else 5)
    wrk_rounds = args.wrk_rounds or (1 if args.smoke else 3)
    repeat = args.repeat or (1 if args.smoke else 5)
    push_mib = args.push_mib or (1 if args.smoke else None)
    push_chunk = (args.push_chunk_kib or (256 if args.smoke else 64 << 10)) << 10
    stamp = datetime.datetime.now(datetime.timezone.utc)
    out = args.out or (os.path.join(args.work, "results-smoke.md") if args.smoke else
                       os.path.join(repo, "bench", f"results-{stamp:%Y-%m-%d}.md"))

    os.makedirs(args.work, exist_ok=True)
    run_dir = os.path.join(args.work, f"run-{stamp:%Y%m%d-%H%M%S}-{os.getpid()}")
    os.makedirs(run_dir)
    procs = Procs()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    columns = [MIRRORS[m].name for m in mirrors] + ([] if args.no_nginx else [Nginx.name])
    params = {"herd": herd, "big": human_bytes(sizes["big_bytes"]), "repeat": repeat,
              "wrk": wrk_seconds, "rounds": wrk_rounds}
    results = Results(columns, params)
    cluster_results = None if args.no_cluster else Results(cluster.COLUMNS, params, cluster.ROWS)
    push_results = None if args.no_push else Results(push.columns(mirrors), params,
                                                      push.ROWS)
    about = machine(args.binary, repo)
    started = time.monotonic()
    try:
        key, cert = generate_keys(run_dir)
        issuer = Issuer(procs, run_dir, key, cert)
        fx = fixtures.load_or_build(args.work, sizes, procs, issuer, cert, log)
        upstream = Upstream(procs, os.path.join(run_dir, "upstream"), fx["storage"], issuer,
                            cert)
        ctx = {"fixture": fx, "upstream": upstream, "issuer": issuer, "procs": procs,
               "run_dir": run_dir, "herd": herd, "repeat": repeat,
               "wrk_seconds": wrk_seconds, "wrk_rounds": wrk_rounds,
               "nginx_speeds": [], "nginx_rates": [], "binary": args.binary,
               "push_mib": push_mib, "push_chunk": push_chunk, "push_servers": mirrors,
               "mirror_args": {"distribution": (), "regmirror": (args.binary,)}}
        if not args.no_nginx and not args.no_pull:
            start_nginx(ctx, results)
        for kind in [] if args.no_pull else mirrors:
            measure_mirror(kind, ctx, results)
        if push_results:
            push.measure(ctx, push_results, prewarm, human_bytes, ratio_text)
        if cluster_results:
            cluster.measure(ctx, cluster_results, lambda: Counters(upstream, issuer), prewarm,
                            human_bytes, ratio_text)
        measure_nginx(ctx, results)
        if cluster_results:
            cluster.copy_from_main(cluster_results, results, Regmirror.name, Nginx.name)
    except KeyboardInterrupt:
        results.errors.append("interrupted")
        log("interrupted")
    except Exception as e:
        results.errors.append(f"setup: {e}")
        log(f"FAILED setup:\n{traceback.format_exc()}")
    finally:
        procs.stop_all()
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    elapsed = time.monotonic() - started

    mode = "smoke (tiny sizes; the figures prove the benchmark runs, nothing more)" \
        if args.smoke else "full"
    text = [f"# regmirror benchmark: {mode}", "",
            f"Run {stamp:%Y-%m-%d %H:%M} UTC with `bench/run.sh{' --smoke' if args.smoke else ''}`"
            f", {elapsed:.0f} s. Everything on 127.0.0.1 of one machine:", ""]
    text += [f"- {k}: {v}" for k, v in about]
    text += ["", f"Image set: `library/small` (Docker media types), `library/app`, "
                 f"`library/multi` (OCI index, amd64 pulled), `library/many` "
                 f"({sizes['many_layers']} layers of {human_bytes(sizes['many_layer_bytes'])}),"
                 f" `library/big` (one {human_bytes(sizes['big_bytes'])} layer).", ""]
    if not args.no_pull:
        text += [results.markdown(), ""]
    errors = list(results.errors)
    if cluster_results:
        garage = " ".join(command_output(["garage", "--version"]).split()[:2])
        redis = " ".join(command_output(["redis-server", "--version"]).split()[:3])
        text += ["Cluster: " + cluster.ABOUT.format(garage=garage, redis=redis),
                 "", cluster_results.markdown(), ""]
        errors += [f"cluster: {e}" for e in cluster_results.errors]
    if push_results:
        text += ["Push: " + push.ABOUT, "", push_results.markdown(), ""]
        errors += [f"push: {e}" for e in push_results.errors]
    if errors:
        text += ["Failures:", ""] + [f"- {e}" for e in errors] + [""]
    report = "\n".join(text)
    print(report)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(report)
    log(f"wrote {out} ({elapsed:.0f} s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
