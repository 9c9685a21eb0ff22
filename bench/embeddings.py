"""Embedding throughput: the cluster against in-process sentence-transformers, same run.

Same model (minilm), same batch size, same texts. The cluster number includes routing,
pickling texts and vectors, and the concatenation in input order; the model is warm on
both sides (one untimed call first). Ends with ``RESULT embeddings ratio=<x> target=0.90``
where ratio = cluster texts/s / in-process texts/s (higher is better).

    python bench/embeddings.py [--texts 4000] [--batch-size 64] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGET = 0.90


def texts(n: int) -> list[str]:
    words = "graphics card memory tier worker scheduler model layer token embedding cluster home lab".split()
    return [" ".join(words[(i * 7 + j) % len(words)] for j in range(8 + i % 24)) + f" #{i}" for i in range(n)]


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--texts", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    from cluster import connect
    from cluster.config import load_config
    from workloads.backends.sources import resolve_source

    cfg = load_config()
    data = texts(a.texts)
    # the in-process baseline gets the same thread count as one worker
    torch.set_num_threads(cfg.worker.torch_threads)
    model = SentenceTransformer(str(resolve_source(cfg.models["minilm"].source)), device="cpu")
    model.encode(data[:64], batch_size=a.batch_size)
    local = best(lambda: model.encode(data, batch_size=a.batch_size, convert_to_numpy=True), a.repeats)
    del model

    with connect(cfg, dashboard_port=0) as ai:
        ai.embed_now(data[:64], batch_size=a.batch_size)  # load the model on the VRAM6 worker
        remote = best(lambda: ai.embed_now(data, batch_size=a.batch_size), a.repeats)

    print(f"in-process: {a.texts / local:8.1f} texts/s ({local:.2f} s)")
    print(f"cluster:    {a.texts / remote:8.1f} texts/s ({remote:.2f} s, one VRAM6 worker, simulated on CPU)")
    ratio = local / remote
    print(f"sides: in-process, this one process with {cfg.worker.torch_threads} torch thread(s); cluster, one worker "
          f"process with {cfg.worker.torch_threads} torch thread(s) (and the scheduler and the others idle); "
          f"{os.cpu_count()} cores")
    print(f"RESULT embeddings ratio={ratio:.3f} target={TARGET}")


if __name__ == "__main__":
    main()
