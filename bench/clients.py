"""What the clients do, and what is measured from their side: skopeo pulls of the image set,
the herd (concurrent GETs of one blob, each body hashed), curl's single-blob throughput, wrk's
requests per second, and the peak memory of a process sampled from /proc. It starts no
server.
"""

import hashlib
import http.client
import json
import os
import re
import subprocess
import threading
import time
import urllib.parse

DOCKER_ACCEPT = ", ".join([
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
])


class Skopeo:
    """skopeo with its own policy, empty auth file and temp dir."""

    def __init__(self, directory):
        self.dir = directory
        os.makedirs(os.path.join(directory, "tmp"), exist_ok=True)
        self.policy = os.path.join(directory, "policy.json")
        with open(self.policy, "w") as f:
            f.write('{"default":[{"type":"insecureAcceptAnything"}]}')
        self.auth = os.path.join(directory, "auth.json")
        with open(self.auth, "w") as f:
            f.write("{}")
        self.env = dict(os.environ, TMPDIR=os.path.join(directory, "tmp"),
                        REGISTRY_AUTH_FILE=self.auth)

    def run(self, args, timeout=900):
        argv = ["skopeo", "--policy", self.policy] + args
        r = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}):\n{r.stderr[-3000:]}")

    def push(self, source, dest, push_all, creds):
        self.run(["copy", "--dest-tls-verify=false", "--dest-creds", creds]
                 + (["--all"] if push_all else []) + [source, f"docker://{dest}"])

    def pull(self, registry, image, out):
        """Pulls `image` from `registry` (host:port, plain HTTP, no credentials) as an amd64
        Linux machine would, into `dir:OUT`, and checks what it stored."""
        self.run(["copy", "--src-tls-verify=false", "--override-os", "linux",
                  "--override-arch", "amd64",
                  f"docker://{registry}/{image['name']}:{image['tag']}", f"dir:{out}"])
        with open(os.path.join(out, "manifest.json"), "rb") as f:
            got = "sha256:" + hashlib.sha256(f.read()).hexdigest()
        if got != image["pull_digest"]:
            raise RuntimeError(f"pull of {image['name']} stored manifest {got}, "
                               f"expected {image['pull_digest']}")
        for blob in image["blobs"]:
            if not os.path.exists(os.path.join(out, blob.split(":", 1)[1])):
                raise RuntimeError(f"pull of {image['name']} lacks blob {blob}")


def pull_set(skopeo, registry, images, out_root):
    """Pulls every image in turn; returns the wall time in seconds."""
    os.makedirs(out_root, exist_ok=True)
    start = time.monotonic()
    for image in images:
        skopeo.pull(registry, image, os.path.join(out_root, image["name"].replace("/", "_")))
    elapsed = time.monotonic() - start
    subprocess.run(["rm", "-rf", out_root], check=False)
    return elapsed


class PeakRss:
    """Samples VmRSS of `pid` every 10 ms in a thread; `stop()` returns the peak seen and
    the kernel's own high-water mark (VmHWM), both in bytes."""

    def __init__(self, pid):
        self.path = f"/proc/{pid}/status"
        self.peak = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _read(self, field):
        try:
            with open(self.path) as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _run(self):
        while not self.done.is_set():
            self.peak = max(self.peak, self._read("VmRSS"))
            self.done.wait(0.01)

    def stop(self):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, self._read("VmRSS"))
        return self.peak, self._read("VmHWM")


def herd(port, path, digest, size, clients, timeout=900, walls=None):
    """`clients` connections GET `path` at once (released together by a barrier), each
    hashing its body as it arrives; `port` may be a list of ports, client i then asks
    `port[i % len(port)]` (round-robin). Returns (wall seconds until the last body ended,
    number of bodies with status 200, the right size and the right digest, error strings);
    `walls`, a list, gets each client's own wall time (None for one that never ended)."""
    ports = list(port) if isinstance(port, (list, tuple)) else [port]
    barrier = threading.Barrier(clients + 1)
    results = [None] * clients

    def one(i):
        conn = http.client.HTTPConnection("127.0.0.1", ports[i % len(ports)], timeout=timeout)
        try:
            conn.connect()
            barrier.wait()
            conn.request("GET", path)
            resp = conn.getresponse()
            h, n = hashlib.sha256(), 0
            buf = bytearray(1 << 20)
            view = memoryview(buf)
            while True:
                got = resp.readinto(buf)
                if not got:
                    break
                h.update(view[:got])
                n += got
            end = time.monotonic()
            ok = resp.status == 200 and n == size and "sha256:" + h.hexdigest() == digest
            err = None if ok else f"client {i}: status {resp.status}, {n} bytes, digest ok: " \
                                  f"{'sha256:' + h.hexdigest() == digest}"
            results[i] = (end, ok, err)
        except Exception as e:  # a broken body is a result, not a crash of the harness
            results[i] = (time.monotonic(), False, f"client {i}: {type(e).__name__}: {e}")
            if not barrier.broken:
                barrier.abort()
        finally:
            conn.close()

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass
    start = time.monotonic()
    for t in threads:
        t.join()
    ends = [r[0] for r in results if r]
    wall = max(ends) - start if ends else 0.0
    if walls is not None:
        walls.extend(r[0] - start if r else None for r in results)
    ok = sum(1 for r in results if r and r[1])
    errors = [r[2] for r in results if r and r[2]]
    return wall, ok, errors


def push_blob(port, repo, path, digest, size, chunk=None, timeout=900):
    """Pushes the file `path` (`size` bytes, `digest`) into `repo` on one connection:
    monolithic (`chunk` None: POST, then one PUT ?digest= carrying the whole file) or chunked
    (POST, PATCHes of `chunk` bytes with Content-Range, then an empty PUT ?digest=), each
    upload URL the Location of the answer before. The bodies are sent with sendfile(2) from
    the page cache, so the client costs next to nothing. Returns (wall seconds from the POST
    until the PUT's answer, [(method, status)]); raises on an unexpected status."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    statuses = []

    def send(f, method, url, want, offset=0, count=0, content_range=False):
        conn.putrequest(method, url, skip_accept_encoding=True)
        conn.putheader("Content-Type", "application/octet-stream")
        conn.putheader("Content-Length", str(count))
        if content_range:
            conn.putheader("Content-Range", f"{offset}-{offset + count - 1}")
        conn.endheaders()
        if count:
            sent = conn.sock.sendfile(f, offset, count)
            if sent != count:
                raise RuntimeError(f"{method}: sent {sent} of {count} bytes")
        resp = conn.getresponse()
        body = resp.read()
        statuses.append((method, resp.status))
        if resp.status != want:
            raise RuntimeError(f"{method} {url} answered {resp.status} (expected {want}): "
                               f"{body[:300]!r}")
        location = resp.getheader("Location")
        if want == 202 and not location:
            raise RuntimeError(f"{method} {url} answered {resp.status} without a Location")
        if not location:
            return None
        # distribution answers an absolute URL (with its _state), regmirror a path.
        u = urllib.parse.urlsplit(location)
        return u.path + ("?" + u.query if u.query else "")

    try:
        with open(path, "rb") as f:
            start = time.monotonic()
            url = send(f, "POST", f"/v2/{repo}/blobs/uploads/", 202)
            offset = 0
            if chunk:
                while offset < size:
                    n = min(chunk, size - offset)
                    url = send(f, "PATCH", url, 202, offset, n, content_range=True)
                    offset += n
            put = url + ("&" if "?" in url else "?") + urllib.parse.urlencode({"digest": digest})
            send(f, "PUT", put, 201, offset, size - offset)
            wall = time.monotonic() - start
    finally:
        conn.close()
    return wall, statuses


def status_summary(statuses):
    """[(method, status)] as `POST 202, PATCH 202 ×16, PUT 201`."""
    out = []
    for method, status in statuses:
        if out and out[-1][:2] == [method, status]:
            out[-1][2] += 1
        else:
            out.append([method, status, 1])
    return ", ".join(f"{m} {s}" + (f" ×{n}" if n > 1 else "") for m, s, n in out)


def curl_throughput(url, size, repeat):
    """Best of `repeat` downloads of `url` to /dev/null, in bytes per second (curl's
    average speed), after checking the status and size."""
    best = 0.0
    for _ in range(repeat):
        out = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w",
                              "%{http_code} %{size_download} %{speed_download}", url],
                             capture_output=True, text=True, timeout=600)
        code, got, speed = out.stdout.split()
        if code != "200" or int(got) != size:
            raise RuntimeError(f"GET {url}: status {code}, {got} of {size} bytes {out.stderr}")
        best = max(best, float(speed))
    return best


def wrk(url, seconds, connections=64, threads=2):
    """wrk with a docker client's Accept header: (requests/s, non-2xx count, socket error
    summary or None)."""
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s",
                          "-H", f"Accept: {DOCKER_ACCEPT}", url],
                         capture_output=True, text=True, timeout=seconds + 60)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed: {out.stderr or out.stdout}")
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out.stdout)
    if not rate:
        raise RuntimeError(f"no Requests/sec in wrk output:\n{out.stdout}")
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out.stdout)
    errors = re.search(r"Socket errors:(.*)", out.stdout)
    return float(rate.group(1)), int(non2xx.group(1)) if non2xx else 0, \
        errors.group(1).strip() if errors else None


def get(port, path, accept=DOCKER_ACCEPT):
    """(status, headers, body) of one GET."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path, headers={"Accept": accept})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def upstream_get(upstream_url, issuer, path, scope):
    """A GET at the upstream with a token of our own (the fixture check)."""
    import urllib.request
    req = urllib.request.Request(upstream_url + path, headers={
        "Accept": DOCKER_ACCEPT, "Authorization": "Bearer " + issuer.token(scope)})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.status, dict(r.headers), r.read()


def dumps(obj):
    return json.dumps(obj, indent=1, sort_keys=True)
