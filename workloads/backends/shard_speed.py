"""How fast each shard server runs a model's layers, and what its link adds per token: measured.

The split-model planner (``cluster/shard_plan.py``) divides layers by these figures. A worker
that has the model file (the one the planner reads the layout on) writes two slices of the
model (``gguf_file.write_slice``: its first ``k1`` and ``k2`` layers with the input and output
layers) and times greedy decoding of each in a child process
(``python -m workloads.backends.shard_speed``): once here with no server (the baseline), and
once through each shard server, the slice's layers on that server and its output layer here.
Per token, through server ``s``: ``t_s(k) = link_s + out + k * layer_s``; here:
``t(k) = out + k * layer``. Two lengths give ``layer_s`` (ms per layer on that server's
device, in that server's process, so a GPU, a thread count or a CPU quota counts) and
``link_s = t_s(k1) - k1 * layer_s - (t(k1) - k1 * layer)`` (the round trips and bytes of one
token to that PC). Results are cached per model file and server device
(``~/.cache/aicluster/speed.json``); a server whose device, tier or thread count changed is
measured again.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["measure", "slice_lengths", "cpu_model", "cpu_quota", "PROMPT", "TOKENS"]

#: tokens decoded per timing (after a short warm-up)
TOKENS = 24
PROMPT = "The cluster measures how fast each computer runs a few layers of the model, then"
#: a slice's layers stay under this many bytes (they are sent to each server once; the
#: servers' weight caches keep them)
SLICE_BYTES = 96 * 2**20


def slice_lengths(n_layer: int, layer_bytes: int) -> tuple[int, int]:
    """``(k1, k2)``: the two slice lengths (1 and as many more as fit ``SLICE_BYTES``, at most 8)."""
    k2 = max(2, min(n_layer, 8, SLICE_BYTES // max(layer_bytes, 1)))
    return 1, min(k2, n_layer) if n_layer >= 2 else 1


def _time_slice(path: str, k: int, endpoint: str | None, threads: int, tokens: int) -> float:
    """ms per generated token of the slice at ``path`` (``k`` layers): greedy, one sequence."""
    from .llamacpp import load_here

    cfg = {"name": f"speed-{k}", "path": path, "device": "cpu", "threads": threads,
           "options": {"n_ctx": 256, "parallel": 1, "repack": False, "prefix_cache": False}}
    if endpoint:  # the slice's layers on the server, its output layer here
        cfg.update(endpoints=[endpoint], tensor_split=[1.0], gpu_layers=k)
    m = load_here(cfg)
    try:
        vocab = m.model
        bias = {int(t): -1e9 for t in {vocab.token_eos(), *_eot(vocab)} if t is not None and t >= 0}
        m.generate(PROMPT, max_tokens=4, logit_bias=bias)  # warm up
        best = float("inf")
        for _ in range(2):
            r = m.generate(PROMPT, max_tokens=tokens, logit_bias=bias)
            steps = r["completion_tokens"] - 1
            if steps >= 4:
                best = min(best, 1000 * (r["generate_seconds"] - r["prefill_seconds"]) / steps)
        if best == float("inf"):
            raise RuntimeError(f"the slice of {k} layer(s) stopped after {r['completion_tokens']} tokens")
        return best
    finally:
        m.close()


def _eot(vocab) -> list[int]:
    try:
        return [int(vocab.token_eot())]
    except Exception:  # (an older binding without it)
        return []


def measure(source_path: str, layout: dict, servers: dict[str, str], threads: int = 1,
            cache: str | os.PathLike | None = None, keys: dict[str, str] | None = None,
            timeout: float = 300.0, skip: set = frozenset()) -> dict:
    """``{name: {"layer_ms", "link_ms", "base_ms", "measured"}}`` for each of ``servers``
    (name: endpoint), and ``"here"``: this PC's own figures. ``keys[name]`` says what the
    server is (device, tier, threads); a cached figure with the same key and model file is
    used as is. ``skip``: servers not to time now (a head uses them): cached figures only.
    ``layout``: ``n_layer`` and ``layer_bytes`` of the model."""
    st = os.stat(source_path)
    model_key = f"{Path(source_path).name}:{st.st_size}:{int(st.st_mtime)}"
    cache = Path(cache or os.environ.get("AICLUSTER_SPEED_CACHE") or Path.home() / ".cache" / "aicluster" / "speed.json")
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    keys = keys or {}
    out, todo = {}, {}
    for name, ep in servers.items():
        hit = known.get(model_key, {}).get(name)
        if hit and hit.get("key") == keys.get(name):
            out[name] = hit
        elif name in skip:
            raise RuntimeError(f"the shard server of {name} serves a head now and has not been timed for this "
                               f"model before")
        else:
            todo[name] = ep
    import socket

    here_key = f"{socket.gethostname()}|{threads}|{cpu_quota()}"
    here = known.get(model_key, {}).get("here")
    if not todo and here and here.get("key") == here_key:
        return {**out, "here": here}
    layers = layout["layer_bytes"]
    k1, k2 = slice_lengths(layout["n_layer"], max(layers) if layers else 1)
    folder = cache.parent / "slices"
    folder.mkdir(parents=True, exist_ok=True)
    from .gguf_file import write_slice

    slices = {}
    for k in sorted({k1, k2}):
        p = folder / f"{model_key.replace(':', '-')}-{k}.gguf"
        if not p.is_file():
            write_slice(source_path, p, k)
        slices[k] = str(p)
    runs = {"here": None, **todo}
    timed = {}
    for name, ep in runs.items():  # one at a time: a server serves one head, and timings share no core
        args = [sys.executable, "-m", "workloads.backends.shard_speed", "--threads", str(threads),
                "--tokens", str(TOKENS)] + [f"--slice={k}:{p}" for k, p in slices.items()]
        if ep:
            args += ["--endpoint", ep]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": ""}
        try:
            r = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"timing shard server {name} ({ep}) took over {timeout:.0f} s") from None
        line = next((x for x in reversed(r.stdout.splitlines()) if x.startswith("SPEED ")), None)
        if r.returncode or line is None:
            tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"timing shard server {name} ({ep or 'none'}) failed: {tail}")
        timed[name] = {int(k): v for k, v in json.loads(line[6:]).items()}

    def fit(t: dict) -> tuple[float, float]:
        layer = max((t[k2] - t[k1]) / (k2 - k1), 1e-3) if k2 > k1 else t[k1] / (k1 + 1)
        return layer, t[k1] - k1 * layer

    layer_here, base_here = fit(timed["here"])
    now = time.time()
    fresh = {}
    for name in todo:
        layer, base = fit(timed[name])
        fresh[name] = {"layer_ms": round(layer, 4), "link_ms": round(max(base - base_here, 0.0), 4),
                       "base_ms": round(base, 4), "measured": now, "key": keys.get(name), "slices": [k1, k2]}
    fresh["here"] = {"layer_ms": round(layer_here, 4), "link_ms": 0.0, "base_ms": round(base_here, 4),
                     "measured": now, "key": here_key, "slices": [k1, k2]}
    known.setdefault(model_key, {}).update(fresh)
    tmp = cache.with_suffix(".part")
    tmp.write_text(json.dumps(known, indent=1))
    os.replace(tmp, cache)
    return {**out, **fresh}


def cpu_quota() -> str:
    """This process's cgroup CPU limit: v2 ``cpu.max`` ("25000 100000"; "max 100000": none),
    or v1's CFS quota and period ("25000 100000"; "-1 100000": none)."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = [line.strip().split(":", 2) for line in f if line.count(":") >= 2]
    except OSError:
        return ""
    for _, controllers, rel in lines:
        try:
            if controllers == "":
                with open(f"/sys/fs/cgroup{rel}/cpu.max") as f:
                    return f.read().strip()
            if "cpu" in controllers.split(","):
                base = f"/sys/fs/cgroup/{controllers}{rel}"
                with open(f"{base}/cpu.cfs_quota_us") as q, open(f"{base}/cpu.cfs_period_us") as p:
                    return f"{q.read().strip()} {p.read().strip()}"
        except OSError:
            continue
    return ""


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="time slices of a model here or through one shard server")
    p.add_argument("--slice", action="append", required=True, help="K:PATH, a slice of K layers")
    p.add_argument("--endpoint", default=None, help="host:port of the shard server (none: here)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokens", type=int, default=TOKENS)
    a = p.parse_args(argv)
    out = {}
    for s in a.slice:
        k, path = s.split(":", 1)
        out[k] = _time_slice(path, int(k), a.endpoint, a.threads, a.tokens)
    print("SPEED " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
