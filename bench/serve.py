"""The HTTP gateway's cost: a generation through the official `openai` client against the
same generation through the Python facade, same run, same cluster.

The embedded cluster (one VRAM12 worker) and `aicluster serve` in front of it (a
subprocess, as users run it). The same 64-token greedy completion is timed through
`ai.generate` and through `openai.OpenAI(...).completions.create`, alternating, and the
best of each is compared. Then requests/s with 1, 8 and 32 concurrent clients (16-token
completions; the worker decodes up to 8 at once). Then the tokens/s of one streamed
generation with 1 and with 8 more clients connected and subscribed to the stream topic
(the scheduler's stream hub sends each piece to its own client only, so the 8 idle ones
cost nothing per token). Ends with
``RESULT serve_latency ratio=<x> target=1.10`` where ratio = HTTP seconds / facade seconds
(lower is better).

    python bench/serve.py [--tokens 64] [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGET = 1.10
PROMPT = "The history of home computing, in short: in the beginning"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream_rate(ai, idle: int, repeats: int) -> float:
    """Tokens/s of one streamed generation while ``idle`` other clients are subscribed."""
    from distributed import Client

    from cluster.streams import STREAM_TOPIC

    others = [Client(ai.scheduler_address, security=ai.config.security_object()) for _ in range(idle)]
    got = [0]
    try:
        for c in others:
            c.subscribe_topic(STREAM_TOPIC, lambda ev: got.__setitem__(0, got[0] + 1))
        best = 0.0
        for _ in range(repeats):
            t = time.perf_counter()
            s = ai.generate(PROMPT, max_tokens=128, stream=True)
            n = sum(1 for _ in s)
            secs = time.perf_counter() - t
            best = max(best, s.result()["completion_tokens"] / secs)
            assert n > 0
        assert got[0] == 0, f"idle clients received {got[0]} pieces of another client's stream"
        return best
    finally:
        for c in others:
            c.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()

    import openai
    import yaml

    from cluster import connect
    from cluster.config import load_config

    data = load_config().model_dump(exclude={"path"})
    data["local"]["workers"] = [{"name": "pc1", "tier": "VRAM12", "nthreads": 1, "memory_limit": "4GB"}]
    cfg = Path(tempfile.mkdtemp(prefix="aicluster-bench-")) / "config.yaml"
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    port = free_port()
    with connect(str(cfg), dashboard_port=0) as ai:
        ai.generate_now(PROMPT, max_tokens=4)
        server = subprocess.Popen([str(Path(sys.executable).parent / "aicluster"), "serve", "--address",
                                   ai.scheduler_address, "--port", str(port), "--config", str(cfg)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 90
            while True:
                try:
                    urllib.request.urlopen(base + "/health", timeout=2)
                    break
                except OSError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise SystemExit("the server did not start")
                    time.sleep(0.3)
            client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)

            def via_http() -> int:
                r = client.completions.create(model="gemma-270m", prompt=PROMPT, max_tokens=a.tokens, temperature=0)
                return r.usage.completion_tokens

            def via_facade() -> int:
                return ai.generate_now(PROMPT, max_tokens=a.tokens, temperature=0)["completion_tokens"]

            via_http()
            http_s, py_s = [], []
            for _ in range(a.repeats):  # alternate, so that drift hits both alike
                t = time.perf_counter()
                n_py = via_facade()
                py_s.append(time.perf_counter() - t)
                t = time.perf_counter()
                n_http = via_http()
                http_s.append(time.perf_counter() - t)
            assert n_py == n_http, (n_py, n_http)

            rows = []
            for clients in (1, 8, 32):
                done = []
                per = max(1, 32 // clients)

                def worker():
                    for _ in range(per):
                        client.completions.create(model="gemma-270m", prompt=PROMPT, max_tokens=16, temperature=0)
                        done.append(1)

                t = time.perf_counter()
                threads = [threading.Thread(target=worker) for _ in range(clients)]
                for th in threads:
                    th.start()
                for th in threads:
                    th.join()
                rows.append((clients, len(done), time.perf_counter() - t))
            stream_rows = []
            for idle in (0, 8):
                stream_rows.append((idle, stream_rate(ai, idle, a.repeats)))
        finally:
            server.terminate()
            server.wait(30)
    print(f"facade (ai.generate): {min(py_s):.3f} s for {n_py} tokens")
    print(f"HTTP (openai client): {min(http_s):.3f} s for {n_http} tokens")
    print("\nclients  requests  seconds  requests/s   (16-token completions, one worker, simulated VRAM12)")
    for clients, n, secs in rows:
        print(f"{clients:7d}  {n:8d}  {secs:7.2f}  {n / secs:10.2f}")
    print("\nidle clients  stream tokens/s   (one 128-token stream through the facade; best of the repeats)")
    for idle, rate in stream_rows:
        print(f"{idle:12d}  {rate:15.1f}")
    print(f"stream with 8 idle subscribed clients / with none: {stream_rows[1][1] / stream_rows[0][1]:.3f}")
    print("one worker process (llama.cpp 1 thread), one client process, 2 cores shared")
    print(f"RESULT serve_latency ratio={min(http_s) / min(py_s):.3f} target={TARGET}")


if __name__ == "__main__":
    main()
