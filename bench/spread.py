"""One embedding job on the whole cluster against the same job on one worker, same run.

8,000 texts embedded with minilm, three ways, each on a fresh embedded cluster:

* spread: the default cluster's three workers (one torch thread each, three processes)
  with ``ai.embed(..., spread=True)``: VRAM6 plus its fallbacks VRAM12 and CPU, each pulling
  chunks as it finishes;
* one worker given the same total threads (``worker.torch_threads: 3``, one process): the
  fair baseline, so the ratio measures the work queue, not a second core;
* one worker with one thread (printed, labelled; the old baseline).

The model is warm first (untimed), and the results must agree within float tolerance.
Ends with ``RESULT embed_spread ratio=<x> target=1.3`` where ratio = spread texts/s /
one-worker-same-threads texts/s (higher is better). On a machine with fewer cores than
threads both sides share the same cores.

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
    from cluster.config import load_config

    base = load_config().model_dump(exclude={"path"})
    spread_threads = sum(w.get("nthreads", 1) for w in base["local"]["workers"]) * base["worker"]["torch_threads"]

    def one_worker(threads: int) -> tuple[float, object]:
        cfg = {**base, "worker": {**base["worker"], "torch_threads": threads},
               "local": {**base["local"], "workers": [{"name": "pc2", "tier": "VRAM6", "nthreads": 1,
                                                       "memory_limit": "4GB"}]}}
        with connect(cfg, dashboard_port=0) as ai:
            ai.embed_now(data[:256], batch_size=a.batch_size)
            return best(lambda: ai.embed_now(data, batch_size=a.batch_size), a.repeats)

    with connect(dashboard_port=0) as ai:
        # warm: the model loaded on every worker that will take part
        ai.embed(data[:3 * 256], batch_size=a.batch_size, chunk_size=64, spread=True).result()
        spread_s, out = best(lambda: ai.embed(data, batch_size=a.batch_size, spread=True, details=True).result(),
                             a.repeats)
        n_workers = len(out["workers"])
    same_s, same = one_worker(spread_threads)
    one_s, one = one_worker(1)
    np.testing.assert_allclose(out["embeddings"], same, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(one, same, rtol=1e-4, atol=1e-5)
    cores = os.cpu_count()
    print(f"spread:                        {a.texts / spread_s:8.1f} texts/s ({spread_s:.2f} s); {n_workers} workers, "
          f"{spread_threads} torch threads in {n_workers} processes, {cores} cores; texts per worker: "
          + ", ".join(f"{k} {v}" for k, v in out["workers"].items()))
    print(f"one worker, same threads:      {a.texts / same_s:8.1f} texts/s ({same_s:.2f} s); {spread_threads} torch "
          f"threads in 1 process, {cores} cores")
    print(f"one worker, one thread (old):  {a.texts / one_s:8.1f} texts/s ({one_s:.2f} s); 1 torch thread in 1 "
          f"process, {cores} cores; spread / this: {one_s / spread_s:.3f}")
    print("(simulated tiers: every worker runs on this machine's CPU cores)")
    print(f"RESULT embed_spread ratio={same_s / spread_s:.3f} target={TARGET}")


if __name__ == "__main__":
    main()
