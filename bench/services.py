"""The processes the benchmark runs on 127.0.0.1: the token issuer, the upstream
(docker-registry with token auth and an access log), the two mirrors (docker-registry in proxy
mode, regmirror) and nginx. Each binds a free port, is waited for until it answers, and is
stopped by its own pid; `Procs.stop_all` stops whatever is still running. It measures nothing.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
USER, PASSWORD = "bench", "bench-password"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url, timeout=2):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


class Proc:
    """A child process with its output in files, stopped by pid."""

    def __init__(self, name, argv, directory, env=None, stdout_name="stdout.log"):
        self.name = name
        os.makedirs(directory, exist_ok=True)
        self.stdout_path = os.path.join(directory, stdout_name)
        self.stderr_path = os.path.join(directory, "stderr.log")
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.popen = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                          env=env, cwd=directory)
        self.pid = self.popen.pid

    def alive(self):
        return self.popen.poll() is None

    def stop(self, sig=signal.SIGTERM, grace=10):
        if self.alive():
            try:
                os.kill(self.pid, sig)
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait()
            except ProcessLookupError:
                pass

    def tail(self, lines=30):
        out = []
        for path in (self.stdout_path, self.stderr_path):
            try:
                with open(path, errors="replace") as f:
                    out.append(f"--- {path} ---\n" + "".join(f.readlines()[-lines:]))
            except OSError:
                pass
        return "\n".join(out)


class Procs:
    """Everything started, so it can all be stopped at the end whatever happened."""

    def __init__(self):
        self.running = []

    def start(self, *args, **kwargs):
        proc = Proc(*args, **kwargs)
        self.running.append(proc)
        return proc

    def stop(self, proc):
        proc.stop()
        if proc in self.running:
            self.running.remove(proc)

    def stop_all(self):
        for proc in reversed(self.running):
            proc.stop()
        self.running.clear()


def wait_until(what, proc, check, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{what} exited with {proc.popen.returncode}\n{proc.tail()}")
        if check():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not come up in {timeout}s\n{proc.tail()}")


def start_on_free_port(procs, what, spawn, ready, attempts=3):
    """Starts `spawn(port)` until it stays up on a free port (another process may take the
    port between our probe and its bind) and `ready(port)` holds."""
    last = None
    for _ in range(attempts):
        port = free_port()
        proc = spawn(port)
        try:
            wait_until(what, proc, lambda: ready(port))
            return port, proc
        except RuntimeError as e:
            last = e
            procs.stop(proc)
    raise last


class Issuer:
    def __init__(self, procs, directory, key, cert):
        port_file = os.path.join(directory, "issuer.port")
        if os.path.exists(port_file):
            os.remove(port_file)
        self.proc = procs.start("issuer", [sys.executable, os.path.join(HERE, "issuer.py"),
                                           "--key", key, "--cert", cert, "--port-file", port_file,
                                           "--user", USER, "--password", PASSWORD],
                                os.path.join(directory, "issuer"))
        wait_until("token issuer", self.proc, lambda: os.path.exists(port_file))
        with open(port_file) as f:
            self.port = int(f.read())
        self.realm = f"http://127.0.0.1:{self.port}/token"

    def tokens(self):
        """Tokens issued so far."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/_stats", timeout=5) as r:
            return json.load(r)["tokens"]

    def token(self, scope):
        """A token for the harness's own requests (counted like any other)."""
        import base64
        from urllib.parse import urlencode
        from issuer import SERVICE
        req = urllib.request.Request(
            self.realm + "?" + urlencode({"service": SERVICE, "scope": scope}),
            headers={"Authorization": "Basic " +
                     base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r)["token"]


class Upstream:
    """docker-registry with token auth; its stdout is the access log (combined format)."""

    def __init__(self, procs, directory, storage, issuer, cert, writable=False):
        from issuer import ISSUER, SERVICE
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self.access_log = os.path.join(directory, "access.log")

        def spawn(port):
            config = os.path.join(directory, "registry.yml")
            with open(config, "w") as f:
                f.write(f"""version: 0.1
log:
  level: warn
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: false
  maintenance:
    uploadpurging:
      enabled: false
    readonly:
      enabled: {'false' if writable else 'true'}
http:
  addr: 127.0.0.1:{port}
  secret: regmirror-bench-upstream
auth:
  token:
    realm: {issuer.realm}
    service: {SERVICE}
    issuer: {ISSUER}
    rootcertbundle: {cert}
""")
            return procs.start("upstream", ["docker-registry", "serve", config], directory,
                               stdout_name="access.log")

        # The token service runs on its own port: the mirror sends its credentials there only
        # when named in upstream.credential_hosts.
        self.realm_host = f"127.0.0.1:{issuer.port}"
        self.port, self.proc = start_on_free_port(
            procs, "upstream docker-registry", spawn,
            lambda p: http_status(f"http://127.0.0.1:{p}/v2/") == 401)
        self.url = f"http://127.0.0.1:{self.port}"

    def served(self):
        """(method, path, status, bytes) of every request answered so far."""
        out = []
        try:
            with open(self.access_log, errors="replace") as f:
                lines = f.readlines()
        except OSError:
            return out
        for line in lines:
            try:
                _, rest = line.split('"', 1)
                request, after = rest.split('"', 1)
                method, target = request.split(" ")[:2]
                status, size = after.split()[:2]
                out.append((method, target.split("?")[0], int(status),
                            0 if size == "-" else int(size)))
            except ValueError:
                continue
        return out


def start_distribution(procs, directory, name, extra, delete=False):
    """docker-registry on a free port with filesystem storage under `directory`, logging as it
    does by default (info, access log on); `extra` is more of its YAML configuration, `delete`
    turns storage deletes on. Returns (port, process)."""
    deletes = "  delete:\n    enabled: true\n" if delete else ""
    os.makedirs(os.path.join(directory, "storage"), exist_ok=True)

    def spawn(port):
        config = os.path.join(directory, "registry.yml")
        with open(config, "w") as f:
            f.write(f"""version: 0.1
log:
  level: info
  formatter: text
storage:
  filesystem:
    rootdirectory: {os.path.join(directory, 'storage')}
{deletes}http:
  addr: 127.0.0.1:{port}
  secret: regmirror-bench-{name.replace(' ', '-')}
{extra}""")
        return procs.start(name, ["docker-registry", "serve", config], directory)

    return start_on_free_port(procs, name, spawn,
                              lambda p: http_status(f"http://127.0.0.1:{p}/v2/") == 200)


class DistributionProxy:
    """docker-registry in pull-through proxy mode: distribution's own mirror, with the same
    upstream credentials as regmirror. Logs as it does by default (info, access log on)."""

    name = "distribution proxy"

    def __init__(self, procs, directory, upstream):
        self.directory = directory
        self.port, self.proc = start_distribution(procs, directory, self.name, f"""proxy:
  remoteurl: {upstream.url}
  username: {USER}
  password: {PASSWORD}
""", delete=True)
        self.pid = self.proc.pid


class Regmirror:
    """regmirror with an empty data dir, its default settings, and the upstream credentials;
    `env` adds settings (the push rows: `REGMIRROR_HOSTED_REPOS`)."""

    name = "regmirror"

    def __init__(self, procs, directory, upstream, binary, env=None):
        self.directory = directory
        data = os.path.join(directory, "data")
        os.makedirs(data, exist_ok=True)
        env = dict(os.environ, REGMIRROR_UPSTREAM_USERNAME=USER,
                   REGMIRROR_UPSTREAM_PASSWORD=PASSWORD,
                   REGMIRROR_UPSTREAM_CREDENTIAL_HOSTS=f'["{upstream.realm_host}"]',
                   **(env or {}))
        env.setdefault("RUST_LOG", "info")

        def spawn(port):
            return procs.start("regmirror", [binary, "serve", "--listen", f"127.0.0.1:{port}",
                                             "--data-dir", data, "--upstream", upstream.url],
                               directory, env=env)

        self.port, self.proc = start_on_free_port(
            procs, "regmirror", spawn,
            lambda p: http_status(f"http://127.0.0.1:{p}/v2/") == 200)
        self.pid = self.proc.pid


class DistributionRegistry:
    """docker-registry as a plain private registry, the push rows' reference: writable
    filesystem storage in its own empty dir, no auth, no proxy; logs as it does by default
    (info, access log on)."""

    name = "distribution registry"

    def __init__(self, procs, directory):
        self.directory = directory
        self.port, self.proc = start_distribution(procs, directory, self.name, "")
        self.pid = self.proc.pid


class Nginx:
    """nginx with sendfile serving the big blob file at /blob and the manifest bytes at
    /manifest (with the manifest's media type): the ceiling for both mirrors."""

    name = "nginx sendfile"

    def __init__(self, procs, directory, blob_file, manifest_file, manifest_type):
        os.makedirs(os.path.join(directory, "logs"), exist_ok=True)
        user = "user root;\n" if os.geteuid() == 0 else ""

        def spawn(port):
            conf = os.path.join(directory, "nginx.conf")
            with open(conf, "w") as f:
                f.write(f"""{user}daemon off;
worker_processes auto;
pid {directory}/nginx.pid;
error_log {directory}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 1000000;
  client_body_temp_path {directory}/body;
  proxy_temp_path {directory}/proxy;
  fastcgi_temp_path {directory}/fastcgi;
  uwsgi_temp_path {directory}/uwsgi;
  scgi_temp_path {directory}/scgi;
  types {{ }}
  server {{
    listen 127.0.0.1:{port};
    location = /blob {{ alias {blob_file}; default_type application/octet-stream; }}
    location = /manifest {{ alias {manifest_file}; default_type {manifest_type}; }}
  }}
}}
""")
            return procs.start("nginx", ["nginx", "-p", directory + "/", "-e",
                                         f"{directory}/logs/error.log", "-c", conf], directory)

        self.port, self.proc = start_on_free_port(
            procs, "nginx", spawn,
            lambda p: http_status(f"http://127.0.0.1:{p}/manifest") == 200)
        self.pid = self.proc.pid


def full_sizes(big_mib=1024):
    """The full benchmark's image set: a big layer of `big_mib` MiB, 30 layers of 256 KiB."""
    return {"big_bytes": big_mib << 20, "many_layers": 30, "many_layer_bytes": 256 << 10}


def upstream_lab(procs, work, run_dir, sizes, log):
    """A token issuer, the image set (built into `work` once) and a docker-registry upstream
    serving it with token auth, as the checks beside the benchmark use them: (issuer, fixture,
    upstream)."""
    import fixture
    from issuer import generate_keys
    key, cert = generate_keys(run_dir)
    issuer = Issuer(procs, run_dir, key, cert)
    fx = fixture.load_or_build(work, sizes, procs, issuer, cert, log)
    upstream = Upstream(procs, os.path.join(run_dir, "upstream"), fx["storage"], issuer, cert)
    return issuer, fx, upstream


def random_hex(nbytes):
    import secrets
    return secrets.token_hex(nbytes)


class Garage:
    """One Garage node (`server --single-node --default-bucket`): the S3-compatible bucket the
    cluster's replicas share, on loopback. Up once its S3 API answers (an unsigned GET gets an
    S3 XML error) and `garage bucket list` shows the bucket."""

    BUCKET = "regmirror-bench"
    REGION = "garage"

    def __init__(self, procs, directory):
        import shutil as _shutil
        self.binary = _shutil.which("garage")
        if not self.binary:
            raise RuntimeError("no garage on PATH (cargo install garage --locked)")
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self.access_key = "GK" + random_hex(12)
        self.secret_key = random_hex(32)
        rpc_secret = random_hex(32)
        self.config = os.path.join(directory, "garage.toml")

        def spawn(port):
            with open(self.config, "w") as f:
                f.write(f"""metadata_dir = "{directory}/meta"
data_dir = "{directory}/data"
db_engine = "sqlite"
replication_factor = 1
compression_level = "none"
rpc_bind_addr = "127.0.0.1:{free_port()}"
rpc_secret = "{rpc_secret}"

[s3_api]
api_bind_addr = "127.0.0.1:{port}"
s3_region = "{self.REGION}"
root_domain = ".s3.garage.localhost"
""")
            env = dict(os.environ, GARAGE_DEFAULT_ACCESS_KEY=self.access_key,
                       GARAGE_DEFAULT_SECRET_KEY=self.secret_key,
                       GARAGE_DEFAULT_BUCKET=self.BUCKET, RUST_LOG="garage=warn,netapp=warn")
            return procs.start("garage", [self.binary, "-c", self.config, "server",
                                          "--single-node", "--default-bucket"],
                               directory, env=env)

        self.port, self.proc = start_on_free_port(procs, "garage", spawn, self._s3_answers)
        wait_until("garage's bucket", self.proc, self._bucket_listed)
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def _s3_answers(self, port):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                body = r.read()
        except urllib.error.HTTPError as e:
            body = e.read()
        except OSError:
            return False
        return b"<Error>" in body

    def _bucket_listed(self):
        try:
            r = subprocess.run([self.binary, "-c", self.config, "bucket", "list"],
                               capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            return False
        return r.returncode == 0 and self.BUCKET in r.stdout

    def env(self):
        """Every replica's `REGMIRROR_STORAGE_*` for this bucket."""
        return {"REGMIRROR_STORAGE_BACKEND": "s3",
                "REGMIRROR_STORAGE_S3_ENDPOINT": f"http://127.0.0.1:{self.port}",
                "REGMIRROR_STORAGE_S3_BUCKET": self.BUCKET,
                "REGMIRROR_STORAGE_S3_REGION": self.REGION,
                "REGMIRROR_STORAGE_S3_PATH_STYLE": "true",
                "REGMIRROR_STORAGE_S3_ACCESS_KEY_ID": self.access_key,
                "REGMIRROR_STORAGE_S3_SECRET_ACCESS_KEY": self.secret_key}


def redis_ping(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class Redis:
    """Debian's redis-server on a free loopback port, nothing persisted: the replicas'
    shared metadata and download leases."""

    def __init__(self, procs, directory):
        os.makedirs(directory, exist_ok=True)

        def spawn(port):
            return procs.start("redis-server", ["redis-server", "--port", str(port), "--bind",
                                                "127.0.0.1", "--save", "", "--appendonly", "no",
                                                "--dir", directory], directory)

        self.port, self.proc = start_on_free_port(procs, "redis-server", spawn, redis_ping)
        self.url = self.db(0)

    def db(self, n):
        """`redis://127.0.0.1:PORT/N`: database N of this server."""
        return f"redis://127.0.0.1:{self.port}/{n}"


class Replica:
    """A cluster replica: regmirror on an empty data dir (its local tier) with the bucket,
    Redis and the peer secret, advertising its own loopback URL; otherwise as `Regmirror`."""

    name = "regmirror cluster"

    def __init__(self, procs, directory, upstream, binary, garage, redis, secret, env=None):
        self.directory = directory
        data = os.path.join(directory, "data")
        os.makedirs(data, exist_ok=True)
        base = dict(os.environ, REGMIRROR_UPSTREAM_USERNAME=USER,
                    REGMIRROR_UPSTREAM_PASSWORD=PASSWORD,
                    REGMIRROR_UPSTREAM_CREDENTIAL_HOSTS=f'["{upstream.realm_host}"]',
                    REGMIRROR_CLUSTER_REDIS=redis.url, REGMIRROR_CLUSTER_SECRET=secret,
                    **garage.env())
        base.update(env or {})
        base.setdefault("RUST_LOG", "info")

        def spawn(port):
            env = dict(base, REGMIRROR_CLUSTER_ADVERTISE=f"http://127.0.0.1:{port}")
            return procs.start("regmirror replica", [binary, "serve", "--listen",
                                                     f"127.0.0.1:{port}", "--data-dir", data,
                                                     "--upstream", upstream.url],
                               directory, env=env)

        self.port, self.proc = start_on_free_port(
            procs, "regmirror replica", spawn,
            lambda p: http_status(f"http://127.0.0.1:{p}/v2/") == 200)
        self.pid = self.proc.pid

    def metric(self, name, labels=None):
        """The sum of the samples of `name` (a counter with its `_total`) whose labels include
        every `labels` pair, from /metrics now; 0 when there is none."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            text = r.read().decode()
        want = [f'{k}="{v}"' for k, v in (labels or {}).items()]
        total = 0.0
        for line in text.splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            rest = line[len(name):]
            if rest.startswith("{"):
                labelset, _, value = rest[1:].partition("}")
            elif rest.startswith(" "):
                labelset, value = "", rest
            else:
                continue
            have = [l.strip() for l in labelset.split(",")]
            if all(w in have for w in want):
                total += float(value.split()[0])
        return total
