"""The cluster side by side with llama.cpp's own server: what a user would run instead.

``llama-server`` is built by ``make bench`` from the llama.cpp sources vendored in the same
llama-cpp-python sdist the binding is built from, with the same CPU flags (the Makefile's
``LLAMA_CPU_ARGS``), and cached; its path comes in ``$AICLUSTER_LLAMA_SERVER``. It serves
the same GGUF with the same llama.cpp threads and slots as one VRAM12 worker of the
cluster (``--parallel`` = the model's ``parallel``, ``-c`` = ``n_ctx`` x slots, ``-fa`` and
``-kvu`` as the model's ``flash_attn`` and ``kv_unified``), and
``aicluster serve`` stands in front of that worker. Both are driven by the official
``openai`` client: 64-token greedy completions with distinct prompts (no cached prefix on
either side), at 1, 8 and 32 concurrent clients, best of 3 rounds, alternating between
the two servers round by round. Reported per side: aggregate completion tokens/s and the
p50 / p95 time to first token (streamed requests). Ends with
``RESULT peer_serve_<n> ratio=<x> target=0.95`` for n = 1, 8, 32, where ratio = cluster
tokens/s / llama-server tokens/s (higher is better).

    AICLUSTER_LLAMA_SERVER=/path/to/llama-server python bench/peers.py [--rounds 3] [--tokens 64]
"""
from __future__ import annotations

import argparse
import itertools
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGET = 0.95
CLIENTS = (1, 8, 32)
_ids = itertools.count()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{what} did not start (exit {proc.poll()})")
        time.sleep(0.3)


def prompt() -> str:
    """A prompt no earlier request started with (so neither side reuses a cached prefix)."""
    n = next(_ids)
    return f"Request {n} ({n * 7919 % 10007}): write about a lighthouse numbered {n}."


def round_(client, model: str, clients: int, tokens: int, per_client: int) -> dict:
    """``clients`` threads, each ``per_client`` streamed completions one after another."""
    ttft, n_tokens, errors = [], [0], []
    lock = threading.Lock()

    def one_client() -> None:
        for _ in range(per_client):
            t0 = time.perf_counter()
            first = None
            try:
                stream = client.completions.create(model=model, prompt=prompt(), max_tokens=tokens, temperature=0,
                                                   stream=True, stream_options={"include_usage": True})
                used = 0
                for ch in stream:
                    if first is None and ch.choices and ch.choices[0].text:
                        first = time.perf_counter() - t0
                    if ch.usage:
                        used = ch.usage.completion_tokens
            except Exception as e:  # counted, and the round is reported as failed
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            with lock:
                n_tokens[0] += used
                if first is not None:
                    ttft.append(first)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one_client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    secs = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"{model}: {len(errors)} request(s) failed: {errors[0]}")
    ttft.sort()
    return {"tps": n_tokens[0] / secs, "p50": statistics.median(ttft),
            "p95": ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args()
    binary = os.environ.get("AICLUSTER_LLAMA_SERVER")
    if not binary or not Path(binary).is_file():
        raise SystemExit("set AICLUSTER_LLAMA_SERVER to a llama-server binary; `make bench` builds one with the "
                         "binding's flags (the Makefile's llama-server target)")

    import openai
    import yaml

    from cluster import connect
    from cluster.config import load_config
    from workloads.backends.sources import resolve_source

    data = load_config().model_dump(exclude={"path"})
    data["local"]["workers"] = [{"name": "pc1", "tier": "VRAM12", "nthreads": 1, "memory_limit": "4GB"}]
    opts = data["models"]["gemma-270m"]["options"]
    threads, slots, n_ctx = int(opts.get("n_threads", 1)), int(opts.get("parallel", 8)), int(opts.get("n_ctx", 2048))
    from workloads.backends.llamacpp import FLASH_ATTN_DEFAULT

    fa = bool(opts.get("flash_attn", FLASH_ATTN_DEFAULT))
    unified = bool(opts.get("kv_unified", False))
    gguf = str(resolve_source(data["models"]["gemma-270m"]["source"]))
    cfg = Path(tempfile.mkdtemp(prefix="aicluster-peers-")) / "config.yaml"
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    peer_port, serve_port = free_port(), free_port()
    peer = subprocess.Popen([binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(peer_port), "-t", str(threads),
                             "-tb", str(threads), "--parallel", str(slots), "-c", str(n_ctx * slots), "--no-webui",
                             "-ngl", "0", "-fa", "on" if fa else "off", "-kvu" if unified else "-no-kvu"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows: dict[tuple[str, int], dict] = {}
    try:
        wait_up(f"http://127.0.0.1:{peer_port}/health", peer, "llama-server")
        with connect(str(cfg), dashboard_port=0) as ai:
            ai.generate_now("warm up", max_tokens=4)
            server = subprocess.Popen([str(Path(sys.executable).parent / "aicluster"), "serve", "--address",
                                       ai.scheduler_address, "--port", str(serve_port), "--config", str(cfg)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_up(f"http://127.0.0.1:{serve_port}/health", server, "aicluster serve")
                sides = {
                    "cluster": (openai.OpenAI(base_url=f"http://127.0.0.1:{serve_port}/v1", api_key="none",
                                              max_retries=0, timeout=600), "gemma-270m"),
                    "llama-server": (openai.OpenAI(base_url=f"http://127.0.0.1:{peer_port}/v1", api_key="none",
                                                   max_retries=0, timeout=600), "gemma-270m"),
                }
                for side, (client, model) in sides.items():  # warm both (untimed)
                    round_(client, model, 2, 8, 1)
                for clients in CLIENTS:
                    per = {1: 8, 8: 2}.get(clients, 1)  # requests per client: 8, 16, 32 in all
                    for r in range(a.rounds):
                        order = list(sides) if r % 2 == 0 else list(reversed(sides))  # alternate
                        for side in order:
                            client, model = sides[side]
                            got = round_(client, model, clients, a.tokens, per)
                            best = rows.get((side, clients))
                            if best is None or got["tps"] > best["tps"]:
                                rows[(side, clients)] = got
            finally:
                server.terminate()
                server.wait(30)
    finally:
        peer.terminate()
        peer.wait(30)
    print(f"\nsame GGUF, {threads} llama.cpp thread(s), {slots} slots, n_ctx {n_ctx} per slot, flash attention "
          f"{'on' if fa else 'off'}, {'one unified KV cache' if unified else 'a KV stream per slot'}; "
          f"{a.tokens}-token greedy completions, distinct prompts, best of {a.rounds} alternating rounds")
    print("each side: one server process (llama-server, or one worker with aicluster serve and a scheduler in "
          f"front), {os.cpu_count()} cores shared with the client")
    print(f"{'clients':>7}  {'side':<13} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT p95':>9}")
    for clients in CLIENTS:
        for side in ("cluster", "llama-server"):
            r = rows[(side, clients)]
            print(f"{clients:7d}  {side:<13} {r['tps']:9.1f} {r['p50'] * 1000:7.0f}ms {r['p95'] * 1000:7.0f}ms")
    for clients in CLIENTS:
        ratio = rows[("cluster", clients)]["tps"] / rows[("llama-server", clients)]["tps"]
        print(f"RESULT peer_serve_{clients} ratio={ratio:.3f} target={TARGET}")


if __name__ == "__main__":
    main()
