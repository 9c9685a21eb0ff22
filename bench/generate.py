"""Generation latency: the cluster (model resident) against in-process llama.cpp, same run.

Same model file, prompt, token count and thread count. Prints the cold cluster call (first
load included) over the warm one, and ends with
``RESULT generate_warm ratio=<x> target=1.10`` where ratio = warm cluster latency /
in-process latency (lower is better).

    python bench/generate.py [--tokens 64] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGET = 1.10
PROMPT = "Question: Why do people build small GPU clusters at home?\nAnswer:"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()

    from cluster import connect
    from cluster.config import load_config
    from workloads.backends import llamacpp

    cfg = load_config()
    spec = cfg.models["gemma-270m"]

    def run_local(m):
        t = time.perf_counter()
        r = m.generate(PROMPT, max_tokens=a.tokens)
        return time.perf_counter() - t, r

    local_model = llamacpp.load(spec, device="cpu", threads=cfg.worker.torch_threads, name="gemma-270m")
    run_local(local_model)  # warm caches
    local_runs = [run_local(local_model) for _ in range(a.repeats)]
    local_model.close()
    local = statistics.median(t for t, _ in local_runs)
    n_local = local_runs[0][1]["completion_tokens"]

    with connect(cfg, dashboard_port=0) as ai:
        t = time.perf_counter()
        first = ai.generate_now(PROMPT, max_tokens=a.tokens)
        cold = time.perf_counter() - t
        warm_runs = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            r = ai.generate_now(PROMPT, max_tokens=a.tokens)
            warm_runs.append(time.perf_counter() - t)
        warm = statistics.median(warm_runs)

    assert r["completion_tokens"] == n_local, "cluster and in-process generated different token counts"
    assert first["loaded_now"] and not r["loaded_now"]
    print(f"in-process llama.cpp: {local:.3f} s for {n_local} tokens")
    print(f"cluster cold:         {cold:.3f} s (model loaded by this call)")
    print(f"cluster warm:         {warm:.3f} s (worker {r['worker']}, tier {r['tier']}{' simulated' if r['simulated'] else ''})")
    print(f"cold/warm: {cold / warm:.2f}")
    threads = int(spec.options.get("n_threads", cfg.worker.torch_threads))
    print(f"sides: in-process, one llama.cpp engine in a child process of this one, {threads} thread(s); cluster, the "
          f"same engine in a child of one worker process, {threads} thread(s); {os.cpu_count()} cores")
    print(f"RESULT generate_warm ratio={warm / local:.3f} target={TARGET}")


if __name__ == "__main__":
    main()
