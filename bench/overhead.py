"""The facade's cost per call: routed submits against plain Dask submits, same run.

2,000 ``ai.submit(fn, tier="CPU")`` (routing by tier with fallback, the job-board
annotation) against 2,000 ``client.submit(fn, resources={"CPU": 1})`` on the same cluster,
each batch gathered before the next, alternating, median of the repeats. Routing reads the
worker list the scheduler's events keep (no round trip per call). Ends with
``RESULT routed_submit ratio=<x> target=1.10`` where ratio = routed time / plain time
(lower is better).

    python bench/overhead.py [--tasks 2000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGET = 1.10


def inc(x: int) -> int:
    return x + 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()

    from cluster import connect

    with connect(dashboard_port=0) as ai:
        slots = next(w["resources"]["CPU"] for w in ai.status() if "CPU" in w["resources"])

        def plain() -> float:
            t = time.perf_counter()
            fs = [ai.client.submit(inc, i, resources={"CPU": 1}, pure=False) for i in range(a.tasks)]
            ai.client.gather(fs)
            return time.perf_counter() - t

        def routed() -> float:
            t = time.perf_counter()
            fs = [ai.submit(inc, i, tier="CPU") for i in range(a.tasks)]
            ai.client.gather(fs)
            return time.perf_counter() - t

        plain(), routed()  # warm: imports, connections
        p_times, r_times = [], []
        for _ in range(a.repeats):
            p_times.append(plain())
            r_times.append(routed())
    pt, rt = statistics.median(p_times), statistics.median(r_times)
    print(f"{a.tasks} tasks on the CPU tier ({slots} slot(s)), median of {a.repeats}:")
    print(f"  client.submit(resources=...)  {pt:6.2f} s  {a.tasks / pt:7.0f} tasks/s")
    print(f"  ai.submit(tier='CPU')         {rt:6.2f} s  {a.tasks / rt:7.0f} tasks/s")
    print(f"sides: the same cluster, client and tasks; {slots} CPU-tier slot(s); {os.cpu_count()} cores")
    print(f"\nRESULT routed_submit ratio={rt / pt:.3f} target={TARGET:.2f}")


if __name__ == "__main__":
    main()
