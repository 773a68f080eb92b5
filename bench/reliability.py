#!/usr/bin/env python3
"""Formats the figure lines of the reliability suite (one JSON object a line, as
tests/reliability/report.rs writes them) into markdown: one table per fault, a row per
target (regmirror first, distribution's proxy beside it where the suite measured it), a
column per figure. The header names the machine, the build and the time."""

import argparse
import json
import platform
import subprocess
import sys
from datetime import datetime, timezone

ORDER = ["regmirror", "distribution"]


def machine() -> str:
    model, cpus = "", ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                model = value.strip()
            elif key.strip() == "CPU(s)":
                cpus = value.strip()
    except OSError:
        pass
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            kib = int(f.readline().split()[1])
        mem = f", {kib / (1 << 20):.1f} GiB RAM"
    except (OSError, ValueError, IndexError):
        mem = ""
    return f"{cpus} CPUs ({model or platform.processor() or 'unknown'}){mem}, {platform.system()} {platform.release()}"


def build() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, check=True).stdout
        return f"commit {rev}{' (with local changes)' if dirty.strip() else ''}, release build"
    except (OSError, subprocess.CalledProcessError):
        return "release build"


def cell(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("jsonl", help="the figure lines (REGMIRROR_RELIABILITY_OUT)")
    p.add_argument("--started", help="when the run started (UTC)")
    p.add_argument("--short", action="store_true", help="the run used the CI sizes")
    args = p.parse_args()

    by_fault: dict[str, list[dict]] = {}
    with open(args.jsonl, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                figure = json.loads(line)
            except json.JSONDecodeError as e:
                print(f"{args.jsonl}:{n}: not JSON ({e}); skipped", file=sys.stderr)
                continue
            by_fault.setdefault(figure.get("fault", "?"), []).append(figure)

    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print("# Reliability run\n")
    print(f"- machine: {machine()}")
    print(f"- build: {build()}")
    print(f"- sizes: {'short (CI)' if args.short else 'full (REGMIRROR_RELIABILITY=full)'}")
    print(f"- started {args.started or '?'}, tables written {now}")
    if not by_fault:
        print("\nNo figures were collected.")
        return 0
    for fault, rows in by_fault.items():
        rows.sort(key=lambda r: (ORDER.index(r["target"]) if r.get("target") in ORDER else len(ORDER)))
        columns: list[str] = []
        for r in rows:
            for k in r:
                if k not in ("fault", "target") and k not in columns:
                    columns.append(k)
        print(f"\n## {fault}\n")
        print("| target | " + " | ".join(columns) + " |")
        print("|---|" + "---:|" * len(columns))
        for r in rows:
            print(f"| {r.get('target', '?')} | " + " | ".join(cell(r.get(c, "")) for c in columns) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
