#!/usr/bin/env bash
# The reliability suite (issue 12, tests/reliability.rs) at full size, in release: every
# fault provoked on 127.0.0.1, regmirror asserted on, distribution's proxy measured beside it
# where the suite runs it too. The figure lines the tests print are collected into a JSON
# lines file and formatted by bench/reliability.py into one markdown table per fault, the
# tables of docs/RELIABILITY.md. As root it first installs Debian's docker-registry.
#
#   bench/reliability.sh                            # everything at full size (a 30-min soak)
#   bench/reliability.sh --filter crash_loop        # tests whose name contains it (repeatable;
#                                                   # modules: flood slow_readers framing
#                                                   # full_disk resume stalls crash_loop soak)
#   bench/reliability.sh --soak-secs 300            # a shorter soak (each target)
#   bench/reliability.sh --short                    # the CI sizes (REGMIRROR_RELIABILITY unset)
#   bench/reliability.sh --seed 42                  # replay a crash loop or soak
#   bench/reliability.sh --out docs/RELIABILITY-run.md --json target/reliability.jsonl
#
# Run it on a quiet machine: the soak's latencies and the flood's figures are CPU bound.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }

filters=()
full=1
out=""
json="${CARGO_TARGET_DIR:-target}/reliability.jsonl"
while [ $# -gt 0 ]; do
  case "$1" in
    --filter) filters+=("$2"); shift 2 ;;
    --soak-secs) export REGMIRROR_RELIABILITY_SOAK_SECS="$2"; shift 2 ;;
    --seed) export REGMIRROR_RELIABILITY_SEED="$2"; shift 2 ;;
    --short) full=0; shift ;;
    --out) out="$2"; shift 2 ;;
    --json) json="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "bench/reliability.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done

if ! command -v docker-registry >/dev/null; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "bench/reliability.sh: installing docker-registry" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-registry >/dev/null
  else
    echo "bench/reliability.sh: no docker-registry (run as root to install it): no distribution rows" >&2
  fi
fi
command -v python3 >/dev/null || { echo "bench/reliability.sh: python3 is needed" >&2; exit 1; }

mkdir -p "$(dirname "$json")"
: >"$json"
if [ "$full" -eq 1 ]; then
  export REGMIRROR_RELIABILITY=full
else
  unset REGMIRROR_RELIABILITY
fi
started="$(date -u +%Y-%m-%dT%H:%MZ)"
status=0
REGMIRROR_RELIABILITY_OUT="$(realpath "$json")" \
  cargo test --release --locked --test reliability -- --nocapture --test-threads=1 \
  ${filters[@]+"${filters[@]}"} || status=$?

args=("$json" --started "$started")
[ "$full" -eq 1 ] || args+=(--short)
if [ -n "$out" ]; then
  python3 bench/reliability.py "${args[@]}" >"$out"
  echo "bench/reliability.sh: tables in $out, figure lines in $json" >&2
else
  python3 bench/reliability.py "${args[@]}"
fi
if [ "$status" -ne 0 ]; then
  echo "bench/reliability.sh: some tests failed (cargo test exit $status); their figures may be missing" >&2
fi
exit "$status"
