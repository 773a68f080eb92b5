#!/usr/bin/env python3
"""The token issuer: a stand-in for Docker Hub's `auth.docker.io/token` that signs RS256 JWTs
(with an `x5c` certificate) for docker-registry's `auth: token:`, and counts the tokens it
issued. Standard library only: RSA PKCS#1 v1.5 signing is `pow()` over the key numbers that
`openssl rsa -text` prints.

Run as its own process so the benchmark's clients never slow it down:

    issuer.py --key K --cert C --port-file F --user U --password P

It binds a free port of 127.0.0.1, writes the port to F, and answers
`GET /token?service=..&scope=..` (HTTP Basic U:P required, like a Hub login) and
`GET /_stats` (the counters, as JSON; not counted itself).
"""

import argparse
import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

SERVICE = "registry.bench.test"
ISSUER = "regmirror-bench-issuer"
LIFETIME = 300  # seconds, as Docker Hub's tokens

# DER prefix of a DigestInfo holding a SHA-256 hash (RFC 8017, section 9.2, note 1).
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


def generate_keys(directory):
    """A 2048-bit RSA key and its self-signed certificate, made with the openssl CLI."""
    key = os.path.join(directory, "issuer.key")
    cert = os.path.join(directory, "issuer.crt")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3",
         "-subj", "/CN=" + ISSUER, "-keyout", key, "-out", cert],
        check=True, capture_output=True)
    return key, cert


class RsaKey:
    """The private numbers of an RSA key, read from `openssl rsa -text -noout`."""

    FIELDS = {"modulus": "n", "privateExponent": "d", "prime1": "p", "prime2": "q",
              "exponent1": "dp", "exponent2": "dq", "coefficient": "qinv"}

    def __init__(self, pem_path):
        text = subprocess.run(["openssl", "rsa", "-in", pem_path, "-text", "-noout"],
                              check=True, capture_output=True, text=True).stdout
        numbers, current, digits = {}, None, []
        for line in text.splitlines() + ["end:"]:
            stripped = line.strip()
            if not line.startswith(" ") and stripped.endswith(":"):
                if current:
                    numbers[current] = int("".join(digits).replace(":", ""), 16)
                current, digits = self.FIELDS.get(stripped[:-1]), []
            elif current and line.startswith(" "):
                digits.append(stripped)
        missing = [v for v in self.FIELDS.values() if v not in numbers]
        if missing:
            raise ValueError(f"openssl rsa -text gave no {missing}")
        self.__dict__.update(numbers)
        self.size = (self.n.bit_length() + 7) // 8

    def sign_sha256(self, message):
        """RSASSA-PKCS1-v1_5 with SHA-256 (JWT's RS256), using the CRT."""
        t = SHA256_DIGEST_INFO + hashlib.sha256(message).digest()
        em = b"\x00\x01" + b"\xff" * (self.size - len(t) - 3) + b"\x00" + t
        m = int.from_bytes(em, "big")
        s1, s2 = pow(m, self.dp, self.p), pow(m, self.dq, self.q)
        s = s2 + self.q * ((self.qinv * (s1 - s2)) % self.p)
        return s.to_bytes(self.size, "big")


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Signer:
    def __init__(self, key_path, cert_path, user, password):
        self.key = RsaKey(key_path)
        with open(cert_path) as f:
            self.x5c = "".join(l.strip() for l in f if not l.startswith("-----"))
        self.basic = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.lock = threading.Lock()
        self.stats = {"tokens": 0, "refused": 0, "requests": 0}

    def token(self, scopes, user):
        access = []
        for scope in (s for param in scopes for s in param.split(" ") if s):
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind and name:
                access.append({"type": kind, "name": name,
                               "actions": [a for a in actions.split(",") if a]})
        now = int(time.time())
        header = {"alg": "RS256", "typ": "JWT", "x5c": [self.x5c]}
        claims = {"iss": ISSUER, "sub": user, "aud": SERVICE, "exp": now + LIFETIME,
                  "nbf": now - 30, "iat": now, "jti": os.urandom(16).hex(), "access": access}
        signing_input = (b64url(json.dumps(header, separators=(",", ":")).encode()) + "." +
                         b64url(json.dumps(claims, separators=(",", ":")).encode()))
        return signing_input + "." + b64url(self.key.sign_sha256(signing_input.encode()))


def handler_for(signer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def reply(self, status, body, extra=()):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in extra:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            url = urlsplit(self.path)
            if url.path == "/_stats":
                with signer.lock:
                    return self.reply(200, dict(signer.stats))
            if url.path != "/token":
                return self.reply(404, {"details": "not found"})
            with signer.lock:
                signer.stats["requests"] += 1
            if self.headers.get("Authorization") != signer.basic:
                with signer.lock:
                    signer.stats["refused"] += 1
                return self.reply(401, {"details": "incorrect username or password"},
                                  [("WWW-Authenticate", 'Basic realm="bench issuer"')])
            scopes = parse_qs(url.query).get("scope", [])
            token = signer.token(scopes, "bench")
            with signer.lock:
                signer.stats["tokens"] += 1
            self.reply(200, {"token": token, "access_token": token, "expires_in": LIFETIME,
                             "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    return Handler


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--key", required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--port-file", required=True)
    ap.add_argument("--user", required=True)
    ap.add_argument("--password", required=True)
    args = ap.parse_args()
    signer = Signer(args.key, args.cert, args.user, args.password)
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(signer))
    server.daemon_threads = True
    tmp = args.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(server.server_address[1]))
    os.replace(tmp, args.port_file)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
