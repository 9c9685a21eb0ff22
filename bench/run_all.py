"""`make bench`: every performance script in turn, then one table of their RESULT lines.

Each script runs as its own process (its output streams through as it comes); every line
``RESULT <name> <key>=<value> target=<target>`` it prints is collected. The end is a table
(name, value, target, met or not: a ``ratio`` meets its target when it is at least the
target, or at most for the scripts whose ratio is a cost, named in ``LOWER_IS_BETTER``; a
``lost`` count when it is at most the target) and the same rows as JSON in
``bench/out/results-<time>.json`` and ``bench/out/latest.json``, so two runs can be compared
(``python bench/run_all.py --compare bench/out/results-A.json``).

    python bench/run_all.py [--only generate,serve] [--compare OLD.json]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["embeddings", "generate", "concurrency", "prefix", "spread", "serve", "sharded", "overhead", "peers", "transfer"]
#: RESULT names whose ratio is a cost (time over a baseline): lower is better
LOWER_IS_BETTER = {"generate_warm", "routed_submit", "serve_latency", "fetch_fanout"}
RESULT = re.compile(r"^RESULT (\S+) (\w+)=(\S+) target=(\S+)")


def met(name: str, key: str, value: float, target: float) -> bool:
    if key == "ratio" and name not in LOWER_IS_BETTER:
        return value >= target
    return value <= target


def run(script: str) -> tuple[list[dict], int, float]:
    """Run ``bench/<script>.py``; its RESULT rows, exit status and seconds."""
    t0 = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}  # (its lines as they come)
    p = subprocess.Popen([sys.executable, str(HERE / f"{script}.py")], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=env)
    rows = []
    for line in p.stdout:
        sys.stdout.write(line)
        m = RESULT.match(line.strip())
        if m:
            name, key, value, target = m.groups()
            rows.append({"name": name, "key": key, "value": float(value), "target": float(target),
                         "met": met(name, key, float(value), float(target)), "script": script})
    code = p.wait()
    return rows, code, time.perf_counter() - t0


def table(rows: list[dict], old: dict | None = None) -> str:
    head = ["result", "value", "target", "met"] + (["before"] if old else [])
    body = []
    for r in rows:
        cmp = "<=" if (r["key"] != "ratio" or r["name"] in LOWER_IS_BETTER) else ">="
        cells = [f"{r['name']} ({r['key']})", f"{r['value']:.3f}", f"{cmp} {r['target']:g}",
                 "yes" if r["met"] else "NO"]
        if old:
            prev = old.get(r["name"])
            cells.append("-" if prev is None else f"{prev['value']:.3f}")
        body.append(cells)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated script names (default: all)")
    ap.add_argument("--compare", default=None, help="an earlier results JSON to show beside")
    a = ap.parse_args()
    scripts = [s for s in SCRIPTS if not a.only or s in a.only.split(",")]
    rows, failed = [], []
    for s in scripts:
        print(f"\n=== bench/{s}.py ===", flush=True)
        got, code, secs = run(s)
        rows += got
        if code != 0 or not got:
            failed.append(f"{s} (exit {code}, {len(got)} RESULT lines, {secs:.0f} s)")
    old = None
    if a.compare:
        old = {r["name"]: r for r in json.loads(Path(a.compare).read_text())["results"]}
    print("\n=== make bench: every RESULT ===")
    print(table(rows, old))
    for f in failed:
        print(f"FAILED: {f}")
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    doc = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpu_count": os.cpu_count(), "results": rows,
           "failed": failed}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for path in (out / f"results-{stamp}.json", out / "latest.json"):
        path.write_text(json.dumps(doc, indent=1))
    print(f"written: {out / f'results-{stamp}.json'} (and latest.json)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
