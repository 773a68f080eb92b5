#!/usr/bin/env bash
# regmirror's benchmark against distribution's proxy mode, nginx sendfile as the ceiling, all
# on 127.0.0.1. As root it first installs what it uses (Debian's docker-registry, skopeo,
# nginx, wrk, openssl, curl, redis-server), then builds regmirror and runs bench/bench.py.
# The cluster rows also need Garage (`cargo install garage --locked`, not installed here;
# ~/.cargo/bin is searched); --no-cluster skips them.
#
#   bench/run.sh                 # full: 1 GiB layer, 16 herd clients, 10 s wrk; release build
#   bench/run.sh --smoke         # tiny sizes, a couple of minutes; the debug build unless --release
#   bench/run.sh --out docs/BENCHMARKS-run.md --keep   # see bench/bench.py --help for the rest
#
# Run the full benchmark on a quiet machine: every figure is loopback and CPU bound.
set -euo pipefail
cd "$(dirname "$0")/.."

case " $* " in
  *" -h "*|*" --help "*) exec python3 bench/bench.py --help ;;
esac

smoke=0
release=0
no_cluster=0
args=()
for arg in "$@"; do
  case "$arg" in
    --smoke) smoke=1; args+=("$arg") ;;
    --release) release=1 ;;
    --no-cluster) no_cluster=1; args+=("$arg") ;;
    *) args+=("$arg") ;;
  esac
done
[ "$smoke" -eq 0 ] && release=1

packages=()
command -v docker-registry >/dev/null || packages+=(docker-registry)
command -v skopeo >/dev/null || packages+=(skopeo)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || packages+=(nginx)
command -v wrk >/dev/null || packages+=(wrk)
command -v openssl >/dev/null || packages+=(openssl)
command -v curl >/dev/null || packages+=(curl)
command -v python3 >/dev/null || packages+=(python3)
if [ "$no_cluster" -eq 0 ]; then
  command -v redis-server >/dev/null || packages+=(redis-server)
fi
if [ ${#packages[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "bench/run.sh: missing ${packages[*]}; run as root to install them with apt-get" >&2
    exit 1
  fi
  echo "bench/run.sh: installing ${packages[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi
export PATH="$PATH:/usr/sbin:/sbin:${CARGO_HOME:-$HOME/.cargo}/bin"
if [ "$no_cluster" -eq 0 ] && ! command -v garage >/dev/null; then
  echo "bench/run.sh: no garage for the cluster rows: cargo install garage --locked" \
    "(about 15 minutes on 2 cores), or pass --no-cluster" >&2
  exit 1
fi

target="${CARGO_TARGET_DIR:-target}"
if [ "$release" -eq 1 ]; then
  cargo build --release --locked --bin regmirror >&2
  binary="$target/release/regmirror"
else
  cargo build --locked --bin regmirror >&2
  binary="$target/debug/regmirror"
fi

exec python3 bench/bench.py --binary "$(realpath "$binary")" "${args[@]}"
