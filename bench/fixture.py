"""The upstream's storage holding the image set, built once per set of sizes and kept under
the work dir (keyed by a hash of the code that makes it): the images are generated, pushed
with skopeo into a writable docker-registry, and read back through the token-auth API to
check that the upstream's digests are those generated. The benchmark's upstream then serves
that storage read-only.
"""

import hashlib
import json
import os
import shutil
import time

import images as image_set
from clients import Skopeo, upstream_get
from services import PASSWORD, USER, Upstream

HERE = os.path.dirname(os.path.abspath(__file__))


def key_of(sizes):
    """`<sizes>-<code>`: a set of each size is kept; one made by older code is not."""
    by_sizes = hashlib.sha256(json.dumps(sizes, sort_keys=True).encode()).hexdigest()[:8]
    code = hashlib.sha256()
    for name in ("images.py", "fixture.py"):
        with open(os.path.join(HERE, name), "rb") as f:
            code.update(f.read())
    return f"{by_sizes}-{code.hexdigest()[:12]}"


def blob_file(storage, digest):
    """Where docker-registry's filesystem driver keeps a blob's bytes."""
    hexd = digest.split(":", 1)[1]
    return os.path.join(storage, "docker", "registry", "v2", "blobs", "sha256", hexd[:2], hexd,
                        "data")


def load(directory):
    try:
        with open(os.path.join(directory, "fixture.json")) as f:
            fixture = json.load(f)
    except (OSError, ValueError):
        return None
    fixture["storage"] = os.path.join(directory, "storage")
    fixture["big_file"] = blob_file(fixture["storage"], fixture["big"]["digest"])
    fixture["manifest_file"] = os.path.join(directory, "small.manifest")
    if not os.path.exists(fixture["big_file"]):
        return None
    return fixture


def load_or_build(work, sizes, procs, issuer, cert, log):
    key = key_of(sizes)
    done = os.path.join(work, f"fixture-{key}")
    fixture = load(done)
    if fixture:
        log(f"image set: reusing {done}")
        return fixture
    for name in os.listdir(work):  # older versions of this set, builds abandoned long ago
        path = os.path.join(work, name)
        if (name.startswith(f"fixture-{key.split('-')[0]}-") or
                (name.startswith("fixture-build-") and
                 time.time() - os.path.getmtime(path) > 3600)):
            shutil.rmtree(path, ignore_errors=True)
    started = time.monotonic()
    build = os.path.join(work, f"fixture-build-{os.getpid()}")
    os.makedirs(build)
    log(f"image set: generating ({sizes['big_bytes'] >> 20} MiB big layer)")
    images, big = image_set.build(build, sizes)
    upstream = Upstream(procs, os.path.join(build, "upstream"), os.path.join(build, "storage"),
                        issuer, cert, writable=True)
    skopeo = Skopeo(os.path.join(build, "skopeo"))
    try:
        for image in images:
            log(f"image set: pushing {image['name']}:{image['tag']}")
            skopeo.push(image["source"], f"127.0.0.1:{upstream.port}/{image['name']}:"
                        f"{image['tag']}", image["all"], f"{USER}:{PASSWORD}")
            status, headers, body = upstream_get(
                upstream.url, issuer, f"/v2/{image['name']}/manifests/{image['tag']}",
                f"repository:{image['name']}:pull")
            got = "sha256:" + hashlib.sha256(body).hexdigest()
            if got != image["digest"] or headers.get("Docker-Content-Digest") != got:
                raise RuntimeError(f"upstream digest of {image['name']} is {got}, generated "
                                   f"{image['digest']} (skopeo rewrote it?)")
            if image["name"] == "library/small":
                manifest = {"bytes": body, "media_type": headers.get("Content-Type")}
    finally:
        procs.stop(upstream.proc)
    with open(os.path.join(build, "small.manifest"), "wb") as f:
        f.write(manifest["bytes"])
    for image in images:
        del image["source"]
    with open(os.path.join(build, "fixture.json"), "w") as f:
        json.dump({"images": images, "big": big, "manifest_type": manifest["media_type"],
                   "manifest_path": "/v2/library/small/manifests/1", "sizes": sizes}, f, indent=1)
    for scratch in ("layout", "dir-small", "skopeo", "upstream"):
        shutil.rmtree(os.path.join(build, scratch), ignore_errors=True)
    os.rename(build, done)
    log(f"image set: built in {time.monotonic() - started:.1f}s into {done}")
    return load(done)
