"""The push rows: regmirror hosting `bench/*` (`REGMIRROR_HOSTED_REPOS`) against
distribution's registry as a plain private registry (docker-registry, writable filesystem
storage, no auth, no proxy), each measured the same way, in turn, a new server on an empty
data dir for each measure:

- the big blob pushed by a Python client, monolithic (POST, one PUT ?digest= with the whole
  file) and chunked (POST, PATCHes with Content-Range, PUT ?digest=): wall time, throughput,
  the status codes, the server's peak RSS; then the blob read back and hashed;
- the image set pushed with `skopeo copy` into `bench/NAME:1` from files on disk (hard links
  to the upstream's storage): wall time and peak RSS; then each pushed tag's manifest checked,
  and the set pulled back with skopeo (each stored manifest and blob hashed).

bench.py calls `measure`; see bench/README.md.
"""

import hashlib
import json
import os
import shutil
import sys
import time

import clients
from fixture import blob_file
from images import OCI_INDEX, random_chunks
from services import DistributionRegistry, Regmirror

HOSTED = "bench/*"
DIST, REG, RATIO = DistributionRegistry.name, "regmirror (hosted)", "regmirror ÷ distribution"
SERVERS = {"distribution": DIST, "regmirror": REG}


def columns(servers):
    """The table's columns for the servers measured (bench.py's --mirrors): the ratio only
    with both."""
    return [SERVERS[s] for s in servers] + ([RATIO] if len(set(servers)) == 2 else [])

ABOUT = ("regmirror with `REGMIRROR_HOSTED_REPOS='[\"" + HOSTED + "\"]'` (otherwise as in the "
         "main table) against distribution's registry as a plain private registry "
         "(`docker-registry` 2.x, writable filesystem storage, no auth, no proxy), measured in "
         "turn, a new server on an empty data dir for each of the three measures. The blob "
         "pushes are a Python client sending the file with sendfile(2) from the page cache; "
         "the image set is pushed by skopeo from files on disk. The ratio column is "
         "regmirror's figure ÷ distribution's (below 1× is faster or smaller for wall times "
         "and memory, slower for throughput).")

ROWS = [
    ("mono_wall", "blob push, monolithic (POST, one PUT ?digest= of {push}): wall time"),
    ("mono_speed", "monolithic blob push: throughput (GB/s)"),
    ("mono_status", "monolithic blob push: status codes; the blob read back and hashed"),
    ("mono_rss", "monolithic blob push: peak RSS of the server (VmHWM)"),
    ("chunked_wall", "blob push, chunked (POST, {chunks} PATCHes of ≤ {chunk} with Content-Range,"
                     " PUT ?digest=): wall time"),
    ("chunked_speed", "chunked blob push: throughput (GB/s)"),
    ("chunked_status", "chunked blob push: status codes; the blob read back and hashed"),
    ("chunked_rss", "chunked blob push: peak RSS of the server (VmHWM)"),
    ("image_wall", "push of the image set (skopeo copy into bench/NAME:1): wall time"),
    ("image_rss", "image set push: peak RSS of the server (VmHWM)"),
    ("image_pull", "pull of the pushed set back (skopeo, every digest checked): wall time"),
]

# Rows whose two figures are divided in the ratio column (the number leads the cell).
RATIO_ROWS = ["mono_wall", "mono_speed", "mono_rss", "chunked_wall", "chunked_speed",
              "chunked_rss", "image_wall", "image_rss", "image_pull"]


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] push: {msg}", file=sys.stderr, flush=True)


def mib(n):
    return f"{n / (1 << 20):.0f} MiB"


def gbps(rate):
    """Bytes/s as GB/s: 2.31, or 0.0042 (two significant digits) for the tiny smoke sizes."""
    rate /= 1e9
    return f"{rate:.2f}" if rate >= 0.1 else f"{rate:.2g}"


def short(image):
    return image["name"].split("/", 1)[1]


def link(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def blob_source(fx, directory, size_mib):
    """(path, digest, size) of the blob to push: the big layer's own file in the upstream's
    storage, or `size_mib` MiB of seeded noise written under `directory`."""
    if size_mib is None:
        return fx["big_file"], fx["big"]["digest"], fx["big"]["size"]
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"noise-{size_mib}MiB")
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in random_chunks(size_mib << 20, 0x9B5B):
            h.update(chunk)
            f.write(chunk)
    return path, "sha256:" + h.hexdigest(), size_mib << 20


def image_sources(fx, directory):
    """Each image of the set as skopeo reads it from disk, every file a hard link to the
    upstream storage's blob: `dir:` for the Docker-media-type image (skopeo's `oci:` does not
    read those), one OCI layout tagged by short name for the others. {name: transport ref}."""
    storage = fx["storage"]
    layout = os.path.join(directory, "layout")
    os.makedirs(os.path.join(layout, "blobs", "sha256"), exist_ok=True)
    tags, refs = [], {}

    def manifest(digest):
        with open(blob_file(storage, digest), "rb") as f:
            return json.load(f)

    def blobs_of(digest):
        """The manifest `digest` and everything it refers to, children of an index too."""
        m = manifest(digest)
        out = [digest]
        if m.get("mediaType") == OCI_INDEX or "manifests" in m:
            for child in m["manifests"]:
                out += blobs_of(child["digest"])
        else:
            out += [m["config"]["digest"]] + [l["digest"] for l in m["layers"]]
        return out

    for image in fx["images"]:
        top = image["digest"]
        if image["media_type"].startswith("application/vnd.docker."):
            out = os.path.join(directory, "dir-" + short(image))
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "version"), "w") as f:
                f.write("Directory Transport Version: 1.1\n")
            link(blob_file(storage, top), os.path.join(out, "manifest.json"))
            for digest in blobs_of(top)[1:]:
                link(blob_file(storage, digest), os.path.join(out, digest.split(":", 1)[1]))
            refs[image["name"]] = f"dir:{out}"
            continue
        for digest in blobs_of(top):
            dst = os.path.join(layout, "blobs", "sha256", digest.split(":", 1)[1])
            if not os.path.exists(dst):
                link(blob_file(storage, digest), dst)
        tags.append({"mediaType": image["media_type"], "digest": top,
                     "size": os.path.getsize(blob_file(storage, top)),
                     "annotations": {"org.opencontainers.image.ref.name": short(image)}})
        refs[image["name"]] = f"oci:{layout}:{short(image)}"
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": tags}, f)
    return refs


def file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def measure(ctx, results, prewarm, human_bytes, ratio_text):
    """Every push row into `results` (a bench.Results on ROWS and COLUMNS) for the servers
    `ctx["push_servers"]` names (distribution, regmirror), then the ratios. `prewarm`,
    `human_bytes` and `ratio_text` are bench.py's."""
    fx, procs, upstream = ctx["fixture"], ctx["procs"], ctx["upstream"]
    base = os.path.join(ctx["run_dir"], "push")
    chunk = ctx["push_chunk"]
    try:
        path, digest, size = blob_source(fx, os.path.join(base, "blob"), ctx["push_mib"])
        results.params.update(push=human_bytes(size), chunk=human_bytes(chunk),
                              chunks=-(-size // chunk))
        refs = image_sources(fx, os.path.join(base, "sources"))
    except Exception as e:
        results.params.update(push="?", chunk=human_bytes(chunk), chunks="?")
        for kind in ctx["push_servers"]:
            results.fail([k for k, _ in ROWS], SERVERS[kind], "the push sources", e)
        return
    values = {}

    def start(kind, name):
        directory = os.path.join(base, kind, name)
        if kind == "distribution":
            return DistributionRegistry(procs, directory)
        return Regmirror(procs, directory, upstream, ctx["binary"],
                         env={"REGMIRROR_HOSTED_REPOS": json.dumps([HOSTED])})

    def stop(server):
        procs.stop(server.proc)
        for data in ("data", "storage"):  # logs stay
            shutil.rmtree(os.path.join(server.directory, data), ignore_errors=True)

    for kind in ctx["push_servers"]:
        column = SERVERS[kind]
        for mode, step in (("mono", None), ("chunked", chunk)):
            rows = [f"{mode}_{r}" for r in ("wall", "speed", "status", "rss")]
            prewarm(os.path.dirname(path) if ctx["push_mib"] else fx["storage"])
            server = None
            try:
                server = start(kind, mode)
                rss = clients.PeakRss(server.pid)
                try:
                    wall, statuses = clients.push_blob(server.port, "bench/blob", path, digest,
                                                       size, step)
                finally:
                    peak, hwm = rss.stop()
                values[(f"{mode}_wall", column)] = wall
                values[(f"{mode}_speed", column)] = size / wall
                values[(f"{mode}_rss", column)] = max(peak, hwm)
                results.set(f"{mode}_wall", column, f"{wall:.2f} s")
                results.set(f"{mode}_speed", column, gbps(size / wall))
                results.set(f"{mode}_rss", column, mib(max(peak, hwm)))
                summary = clients.status_summary(statuses)
                log(f"{column}: {mode} push of {human_bytes(size)} {wall:.2f}s "
                    f"({gbps(size / wall)} GB/s), {summary}, peak RSS {mib(max(peak, hwm))}")
                _, ok, errors = clients.herd(server.port, f"/v2/bench/blob/blobs/{digest}",
                                             digest, size, 1)
                if ok != 1:
                    results.set(f"{mode}_status", column, f"{summary}; read back **wrong**")
                    raise RuntimeError("the blob read back is wrong: " + "; ".join(errors))
                results.set(f"{mode}_status", column, f"{summary}; read back ok")
            except Exception as e:
                results.fail(rows, column, f"{mode} blob push", e)
            finally:
                if server:
                    stop(server)

        prewarm(fx["storage"])
        server = None
        try:
            server = start(kind, "images")
            registry = f"127.0.0.1:{server.port}"
            skopeo = clients.Skopeo(os.path.join(base, kind, "skopeo"))
            rss = clients.PeakRss(server.pid)
            try:
                begun = time.monotonic()
                for image in fx["images"]:
                    skopeo.run(["copy", "--dest-tls-verify=false"]
                               + (["--all"] if image["all"] else [])
                               + [refs[image["name"]], f"docker://{registry}/bench/"
                                                       f"{short(image)}:{image['tag']}"])
                wall = time.monotonic() - begun
            finally:
                peak, hwm = rss.stop()
            values[("image_wall", column)] = wall
            values[("image_rss", column)] = max(peak, hwm)
            results.set("image_wall", column, f"{wall:.2f} s")
            results.set("image_rss", column, mib(max(peak, hwm)))
            log(f"{column}: skopeo push of the set {wall:.2f}s, peak RSS {mib(max(peak, hwm))}")
        except Exception as e:
            results.fail(["image_wall", "image_rss", "image_pull"], column, "image push", e)
            if server:
                stop(server)
            continue
        try:
            pushed = [dict(image, name=f"bench/{short(image)}") for image in fx["images"]]
            for image in pushed:  # the tag holds the manifest pushed, byte for byte
                status, _, body = clients.get(server.port,
                                              f"/v2/{image['name']}/manifests/{image['tag']}")
                got = "sha256:" + hashlib.sha256(body).hexdigest()
                if status != 200 or got != image["digest"]:
                    raise RuntimeError(f"{image['name']}:{image['tag']} answered {status}, "
                                       f"{got}; pushed {image['digest']}")
            out_root = os.path.join(base, kind, "pulled")
            os.makedirs(out_root, exist_ok=True)
            walls = 0.0
            for image in pushed:
                out = os.path.join(out_root, short(image))
                begun = time.monotonic()
                skopeo.pull(registry, image, out)  # checks the stored manifest's digest
                walls += time.monotonic() - begun
                for blob in image["blobs"]:
                    got = file_digest(os.path.join(out, blob.split(":", 1)[1]))
                    if got != blob:
                        raise RuntimeError(f"pull of {image['name']}: blob {blob} holds {got}")
            shutil.rmtree(out_root, ignore_errors=True)
            values[("image_pull", column)] = walls
            results.set("image_pull", column, f"{walls:.2f} s")
            log(f"{column}: tags checked, pull of the set back {walls:.2f}s, digests ok")
        except Exception as e:
            results.fail(["image_pull"], column, "pull of the pushed set", e)
        finally:
            stop(server)

    for row in RATIO_ROWS:
        mine, theirs = values.get((row, REG)), values.get((row, DIST))
        if mine and theirs:
            results.set(row, RATIO, ratio_text(mine / theirs))
