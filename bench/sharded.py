"""A model split over two workers' shard servers against one process, same run.

The baseline is in-process llama.cpp with the same model file, prompt, token count and one
thread, weight repacking on (as people run it). The split run is the embedded cluster with
two worker processes, each with a shard server (ggml RPC), the model's layers divided
between them and its head in a child process of the first. Prompt processing and
generation are timed apart (by the batch engine, on both sides), and the bytes the shard
servers read and wrote per generated token are shown. Ends with
``RESULT sharded ratio=<x> target=0.80`` where ratio = split generation tokens/s over
in-process tokens/s (higher is better; ggml RPC adds a round trip per layer range per token).

    python bench/sharded.py [--tokens 64] [--repeats 3]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGET = 0.80
PROMPTS = ["Question: Why do people build small GPU clusters at home?\nAnswer:",
           "Question: What limits the size of a language model on one graphics card?\nAnswer:",
           "Question: How does a home network slow down a model split across two PCs?\nAnswer:",
           "Question: Which is faster, one big GPU or two small ones?\nAnswer:"]


def rates(r: dict) -> tuple[float, float]:
    """(prompt tokens/s, generated tokens/s) from the engine's own timings."""
    decode = r["generate_seconds"] - r["prefill_seconds"]
    return r["prompt_tokens"] / r["prefill_seconds"], (r["completion_tokens"] - 1) / decode


def io_bytes(endpoints: list[str]) -> int:
    """Bytes sent plus received on the shard servers' TCP connections (the kernel's own
    counters, from ``ss -ti``; socket I/O is not in /proc/PID/io)."""
    import re
    import subprocess

    total = 0
    for ep in endpoints:
        port = ep.rpartition(":")[2]
        out = subprocess.run(["ss", "-tinH", "state", "established", f"( sport = :{port} )"],
                             capture_output=True, text=True).stdout
        total += sum(int(n) for n in re.findall(r"bytes_(?:sent|received):(\d+)", out))
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()

    import yaml

    from cluster import connect
    from cluster.config import find_config, load_config
    from workloads.backends import llamacpp

    data = yaml.safe_load(find_config().read_text())
    model = "gemma-270m-split"
    # every run processes its whole prompt: no prefix reuse between repeats
    data["models"][model]["options"].update(prefix_cache=False, n_threads=1)
    data["models"][model]["shard"] = {"workers": ["pc1", "pc2"]}
    data["local"]["workers"] = [{"name": n, "tier": t, "nthreads": 1, "memory_limit": "3GB", "shard_server": True}
                                for n, t in (("pc1", "VRAM12"), ("pc2", "VRAM6"))]
    cfg = load_config(copy.deepcopy(data))
    spec = cfg.models[model].model_copy(update={"shard": False})
    prompts = (PROMPTS * a.repeats)[:a.repeats + 1]

    m = llamacpp.load(spec, device="cpu", threads=1, name="baseline")
    try:
        m.generate(prompts[0], max_tokens=8)  # warm caches
        local = [rates(m.generate(q, max_tokens=a.tokens)) for q in prompts[1:]]
    finally:
        m.close()

    with connect(cfg, dashboard_port=0) as ai:
        plan = ai.plan_shards(model)
        print(plan)
        ai.load_model(model, progress=False)
        ai.generate_now(prompts[0], model=model, max_tokens=8)  # warm
        endpoints = plan.endpoints
        split, moved = [], []
        for q in prompts[1:]:
            before = io_bytes(endpoints)
            r = ai.generate_now(q, model=model, max_tokens=a.tokens)
            moved.append((io_bytes(endpoints) - before) / r["completion_tokens"])
            split.append(rates(r))
        assert r["completion_tokens"] == a.tokens, "the split model stopped early"

    lp, lg = statistics.median(x for x, _ in local), statistics.median(y for _, y in local)
    sp, sg = statistics.median(x for x, _ in split), statistics.median(y for _, y in split)
    per_token = statistics.median(moved)
    print(f"\n{'':<28}{'prompt tok/s':>14}{'generate tok/s':>16}")
    print(f"{'in-process (repack on)':<28}{lp:>14.1f}{lg:>16.1f}")
    print(f"{'split over 2 shard servers':<28}{sp:>14.1f}{sg:>16.1f}")
    print(f"{'ratio':<28}{sp / lp:>14.2f}{sg / lg:>16.2f}")
    print(f"bytes through the shard servers per generated token (its prompt included): {per_token / 1024:.1f} KiB "
          f"(over a 1 Gbit/s LAN: {per_token * 8 / 1e9 * 1000:.2f} ms per token)")
    print(f"sides: in-process, one llama.cpp context in this process; split, a head and two shard server processes, "
          f"1 llama.cpp thread each; {os.cpu_count()} cores")
    print(f"\nRESULT sharded ratio={sg / lg:.3f} target={TARGET:.2f}")


if __name__ == "__main__":
    main()
