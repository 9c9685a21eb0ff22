"""Batched decoding: 8 prompts of 64 tokens sent at once against one after another, same run.

A one-worker embedded cluster (VRAM12, simulated on this machine's CPU, the configured
llama.cpp threads and ``parallel`` slots of Gemma 3 270M). First the 8 prompts one after
another (each waits for the previous answer), then the same 8 at once: they join one
running batch on the worker. Ends with ``RESULT concurrent_generate ratio=<x> target=1.5``
where ratio = concurrent tokens/s / sequential tokens/s (higher is better).

    python bench/concurrency.py [--prompts 8] [--tokens 64] [--repeats 2]
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGET = 1.5


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()

    from cluster import connect
    from cluster.config import load_config

    cfg = load_config().model_dump(exclude={"path"})
    cfg["local"]["workers"] = [{"name": "pc1", "tier": "VRAM12", "nthreads": 1, "memory_limit": "4GB"}]
    prompts = [f"Story {i}: once upon a time, computer number {i} in a home lab" for i in range(a.prompts)]
    opts = dict(max_tokens=a.tokens)
    seq_rate, con_rate = [], []
    with connect(cfg, dashboard_port=0) as ai:
        ai.generate_now("warm up", max_tokens=4)
        for _ in range(a.repeats):
            t = time.perf_counter()
            seq = [ai.generate_now(q, **opts) for q in prompts]
            seq_rate.append(sum(r["completion_tokens"] for r in seq) / (time.perf_counter() - t))
            t = time.perf_counter()
            con = ai.generate_now(prompts, **opts)
            con_rate.append(sum(r["completion_tokens"] for r in con) / (time.perf_counter() - t))
        parallel = ai.config.models["gemma-270m"].options.get("parallel", 8)
        threads = ai.config.models["gemma-270m"].options.get("n_threads")
    s, c = max(seq_rate), max(con_rate)
    print(f"one after another: {s:7.1f} tokens/s ({a.prompts} prompts x {a.tokens} tokens)")
    print(f"all at once:       {c:7.1f} tokens/s (one worker, {parallel} slots, {threads} llama.cpp thread(s), "
          "simulated VRAM12 on the CPU)")
    print(f"RESULT concurrent_generate ratio={c / s:.3f} target={TARGET}")


if __name__ == "__main__":
    main()
