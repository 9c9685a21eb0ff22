"""One embedding job on the whole cluster against the same job on one worker, same run.

The embedded cluster (three workers, one thread each, sharing this machine's cores):
8,000 texts embedded with minilm by its VRAM6 worker alone (``ai.embed``), then spread over
every worker that can run it (``ai.embed(..., spread=True)``: VRAM6 plus its fallbacks
VRAM12 and CPU, each pulling chunks as it finishes). The model is warm on every worker
first (untimed), and the two results must agree within float tolerance. Ends with
``RESULT embed_spread ratio=<x> target=1.3`` where ratio = spread texts/s / one-worker
texts/s (higher is better).

    python bench/spread.py [--texts 8000] [--batch-size 64] [--repeats 2]
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGET = 1.3


def best(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--texts", type=int, default=8000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()

    import numpy as np

    from cluster import connect
    from embeddings import texts  # bench/embeddings.py: the same kind of texts

    data = texts(a.texts)
    with connect(dashboard_port=0) as ai:
        # warm: the model loaded on every worker that will take part
        ai.embed(data[:3 * 256], batch_size=a.batch_size, chunk_size=64, spread=True).result()
        one_s, one = best(lambda: ai.embed_now(data, batch_size=a.batch_size), a.repeats)
        spread_s, out = best(lambda: ai.embed(data, batch_size=a.batch_size, spread=True, details=True).result(),
                             a.repeats)
    np.testing.assert_allclose(out["embeddings"], one, rtol=1e-4, atol=1e-5)
    print(f"one worker (VRAM6):  {a.texts / one_s:8.1f} texts/s ({one_s:.2f} s)")
    print(f"spread:              {a.texts / spread_s:8.1f} texts/s ({spread_s:.2f} s); texts per worker: "
          + ", ".join(f"{k} {v}" for k, v in out["workers"].items()))
    print("(simulated tiers: every worker runs on this machine's CPU cores)")
    print(f"RESULT embed_spread ratio={one_s / spread_s:.3f} target={TARGET}")


if __name__ == "__main__":
    main()
