"""The benchmark's image set, written from scratch as an OCI image layout (and a skopeo `dir:`
for the Docker-media-type image): gzipped tar layers, configs, manifests and one index, all
from fixed seeds, so the same sizes always give the same digests. Standard library only; it
does not talk to any registry.
"""

import gzip
import hashlib
import json
import os
import random
import shutil
import tarfile

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"

MTIME = 1_700_000_000
CREATED = "2023-11-14T22:13:20Z"
CHUNK = 1 << 20


class HashingWriter:
    """Hashes and counts what it passes on to `inner` (None: just hash)."""

    def __init__(self, inner=None):
        self.inner, self.hash, self.size = inner, hashlib.sha256(), 0

    def write(self, data):
        self.hash.update(data)
        self.size += len(data)
        if self.inner is not None:
            self.inner.write(data)
        return len(data)

    def flush(self):
        if self.inner is not None:
            self.inner.flush()

    def digest(self):
        return "sha256:" + self.hash.hexdigest()


def random_chunks(length, seed):
    """`length` bytes from a seeded Mersenne Twister: incompressible and reproducible."""
    rng = random.Random(seed)
    left = length
    while left > 0:
        n = min(CHUNK, left)
        yield rng.randbytes(n)
        left -= n


class Layout:
    def __init__(self, directory):
        self.dir = directory
        self.blobs = os.path.join(directory, "blobs", "sha256")
        os.makedirs(self.blobs, exist_ok=True)
        self.tags = []

    def blob_path(self, digest):
        return os.path.join(self.blobs, digest.split(":", 1)[1])

    def add_blob(self, data):
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        with open(self.blob_path(digest), "wb") as f:
            f.write(data)
        return {"digest": digest, "size": len(data)}

    def add_layer(self, files):
        """A gzipped tar of `files`: (path, bytes) or (path, (length, seed)) for random data.
        Random layers are stored at gzip level 0: compressing noise only burns time."""
        noisy = any(isinstance(c, tuple) for _, c in files)
        tmp = os.path.join(self.dir, "layer.tmp")
        with open(tmp, "wb") as out:
            compressed = HashingWriter(out)
            gz = gzip.GzipFile(fileobj=compressed, mode="wb", mtime=0,
                               compresslevel=0 if noisy else 6)
            tar = HashingWriter(gz)
            made = set()
            for path, content in files:
                parts = path.split("/")[:-1]
                for i in range(1, len(parts) + 1):
                    d = "/".join(parts[:i]) + "/"
                    if d not in made:
                        made.add(d)
                        tar.write(self._header(d, tarfile.DIRTYPE, 0o755, 0))
                length = content[0] if isinstance(content, tuple) else len(content)
                tar.write(self._header(path, tarfile.REGTYPE, 0o644, length))
                if isinstance(content, tuple):
                    for chunk in random_chunks(*content):
                        tar.write(chunk)
                else:
                    tar.write(content)
                if length % 512:
                    tar.write(b"\0" * (512 - length % 512))
            tar.write(b"\0" * 1024)
            gz.close()
        digest = compressed.digest()
        os.replace(tmp, self.blob_path(digest))
        return {"digest": digest, "size": compressed.size, "diff_id": tar.digest()}

    @staticmethod
    def _header(name, kind, mode, size):
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.size, info.mtime = kind, mode, size, MTIME
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info.tobuf(format=tarfile.GNU_FORMAT)

    def add_image(self, flavor, arch, layers):
        manifest_type, config_type, layer_type = (
            (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER) if flavor == "docker"
            else (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER))
        config = self.add_blob(json.dumps({
            "architecture": arch, "os": "linux", "created": CREATED,
            "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [l["diff_id"] for l in layers]},
            "history": [{"created": CREATED, "created_by": f"regmirror bench layer {i}"}
                        for i in range(len(layers))],
        }, separators=(",", ":")).encode())
        manifest = self.add_blob(json.dumps({
            "schemaVersion": 2, "mediaType": manifest_type,
            "config": {"mediaType": config_type, "digest": config["digest"], "size": config["size"]},
            "layers": [{"mediaType": layer_type, "digest": l["digest"], "size": l["size"]}
                       for l in layers],
        }, indent=3).encode())
        return {"manifest": manifest, "media_type": manifest_type, "config": config,
                "layers": layers, "arch": arch}

    def add_index(self, images):
        return self.add_blob(json.dumps({
            "schemaVersion": 2, "mediaType": OCI_INDEX,
            "manifests": [{"mediaType": m["media_type"], "digest": m["manifest"]["digest"],
                           "size": m["manifest"]["size"],
                           "platform": {"architecture": m["arch"], "os": "linux"}}
                          for m in images],
        }, indent=3).encode())

    def tag(self, tag, media_type, blob):
        self.tags.append({"mediaType": media_type, "digest": blob["digest"], "size": blob["size"],
                          "annotations": {"org.opencontainers.image.ref.name": tag}})

    def export_dir(self, image, out):
        """`image` as skopeo's `dir:` transport lays it out, the way to push Docker media
        types (skopeo's `oci:` transport does not read them)."""
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "version"), "w") as f:
            f.write("Directory Transport Version: 1.1\n")
        shutil.copyfile(self.blob_path(image["manifest"]["digest"]),
                        os.path.join(out, "manifest.json"))
        for blob in [image["config"]] + image["layers"]:
            shutil.copyfile(self.blob_path(blob["digest"]),
                            os.path.join(out, blob["digest"].split(":", 1)[1]))

    def finish(self):
        with open(os.path.join(self.dir, "oci-layout"), "w") as f:
            f.write('{"imageLayoutVersion":"1.0.0"}')
        with open(os.path.join(self.dir, "index.json"), "w") as f:
            json.dump({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self.tags}, f)


def text_layer(layout, image, i):
    return layout.add_layer([
        (f"regmirror-bench/{image}/layer-{i}.txt", f"{image} layer {i}\n".encode()),
        (f"etc/regmirror-bench/{image}-{i}",
         f"made by the regmirror benchmark: {image} #{i}\n".encode()),
    ])


def noise_layer(layout, image, i, length, seed):
    return layout.add_layer([
        (f"regmirror-bench/{image}/README-{i}", f"{length} bytes of noise follow\n".encode()),
        (f"regmirror-bench/{image}/noise-{i}.bin", (length, seed)),
    ])


def platform_of(image):
    return {"arch": image["arch"], "digest": image["manifest"]["digest"],
            "blobs": [image["config"]["digest"]] + [l["digest"] for l in image["layers"]]}


def build(directory, sizes):
    """Writes the image set into `directory` and returns how to push it and what it holds:
    a list of {name, tag, source (skopeo transport reference), all (push every platform),
    digest (of the tag), media_type, pull_digest (what an amd64 client stores), blobs (an
    amd64 pull's config and layers)}.

    `sizes`: big_bytes (the one layer of library/big), many_layers and many_layer_bytes."""
    layout = Layout(os.path.join(directory, "layout"))
    images = []

    def add(name, source, top_digest, media_type, platforms, push_all=False):
        amd = next(p for p in platforms if p["arch"] == "amd64")
        images.append({"name": f"library/{name}", "tag": "1", "source": source, "all": push_all,
                       "digest": top_digest, "media_type": media_type,
                       "pull_digest": amd["digest"], "blobs": amd["blobs"]})

    oci = lambda tag: f"oci:{layout.dir}:{tag}"

    # A few small images: Docker media types, and OCI with a couple of MiB.
    m = layout.add_image("docker", "amd64", [text_layer(layout, "small", 0),
                                             text_layer(layout, "small", 1)])
    small_dir = os.path.join(directory, "dir-small")
    layout.export_dir(m, small_dir)
    add("small", f"dir:{small_dir}", m["manifest"]["digest"], m["media_type"], [platform_of(m)])

    m = layout.add_image("oci", "amd64", [noise_layer(layout, "app", 0, 2 << 20, 101),
                                          noise_layer(layout, "app", 1, 512 << 10, 102),
                                          text_layer(layout, "app", 2)])
    layout.tag("app", m["media_type"], m["manifest"])
    add("app", oci("app"), m["manifest"]["digest"], m["media_type"], [platform_of(m)])

    # One multi-arch index.
    amd = layout.add_image("oci", "amd64", [noise_layer(layout, "multi-amd64", 0, 1 << 20, 201),
                                            text_layer(layout, "multi-amd64", 1)])
    arm = layout.add_image("oci", "arm64", [noise_layer(layout, "multi-arm64", 0, 1 << 20, 202),
                                            text_layer(layout, "multi-arm64", 1)])
    index = layout.add_index([amd, arm])
    layout.tag("multi", OCI_INDEX, index)
    add("multi", oci("multi"), index["digest"], OCI_INDEX,
        [platform_of(amd), platform_of(arm)], push_all=True)

    # One with many layers.
    many = [noise_layer(layout, "many", i, sizes["many_layer_bytes"], 300 + i)
            for i in range(sizes["many_layers"])]
    m = layout.add_image("oci", "amd64", many)
    layout.tag("many", m["media_type"], m["manifest"])
    add("many", oci("many"), m["manifest"]["digest"], m["media_type"], [platform_of(m)])

    # One with a big layer: the herd and throughput blob.
    big = noise_layer(layout, "big", 0, sizes["big_bytes"], 0x5EEDB16)
    m = layout.add_image("oci", "amd64", [big])
    layout.tag("big", m["media_type"], m["manifest"])
    add("big", oci("big"), m["manifest"]["digest"], m["media_type"], [platform_of(m)])

    layout.finish()
    return images, {"digest": big["digest"], "size": big["size"]}
