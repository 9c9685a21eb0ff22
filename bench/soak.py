"""Soak: mixed traffic from three clients while a chaos loop kills a random worker.

The embedded cluster (three worker processes with nannies). Three clients, each its own
Dask client and facade, send generate / embed / pipeline / benchmark-job requests, one at
a time, for ``--minutes``; a fourth runs the batch commands (``aicluster generate`` and
``aicluster submit``, 4 requests per run, one output file per run) as a user's script
would. Every ``--kill-every`` seconds a random worker process is killed (SIGKILL; its nanny
starts it again). Every request has an id; at the end the script prints how many were
done, lost (failed, wrong, or never answered: must be 0), duplicated (an id with more than
one answer line in the batch commands' output files, where a retry that went wrong would
write twice: must be 0), and each worker's memory at the start and the end. Ends with
``RESULT soak lost=<n> target=0``.

    python bench/soak.py [--minutes 10] [--kill-every 60] [--seed 0]
"""
from __future__ import annotations

import argparse
import collections
import os
import random
import signal
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--kill-every", type=float, default=60)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    from dask.utils import format_bytes

    from cluster import connect

    rnd = random.Random(a.seed)
    with connect(dashboard_port=0) as ai:
        def memory() -> dict:
            names = {addr: w["name"] for addr, w in ai._workers().items()}
            return {names.get(addr, addr): v for addr, v in ai.client.run(rss, on_error="return").items()
                    if isinstance(v, int)}

        # models resident first, so "start" is a working cluster
        ai.generate_now("warm", max_tokens=2)
        ai.embed_now(["warm"])
        start_mem = memory()
        deadline = time.monotonic() + a.minutes * 60
        answers: collections.Counter = collections.Counter()
        lost: list[str] = []
        kinds: collections.Counter = collections.Counter()
        lock = threading.Lock()

        def client_loop(n: int) -> None:
            r = random.Random(a.seed * 100 + n)
            with connect(address=ai.scheduler_address) as me:
                i = 0
                while time.monotonic() < deadline:
                    i += 1
                    rid = f"c{n}-{i}"
                    kind = r.choice(["generate", "generate", "embed", "pipeline", "job"])
                    try:
                        if kind == "generate":
                            out = me.generate(f"Request {rid}: a short note on GPUs", max_tokens=16).result(timeout=300)
                            ok = out["completion_tokens"] > 0
                        elif kind == "embed":
                            out = me.embed([f"{rid} text {k}" for k in range(20)]).result(timeout=300)
                            ok = out.shape == (20, 384)
                        elif kind == "pipeline":
                            out = me.run_pipeline("rag", question=f"Which file format does llama.cpp use? ({rid})")
                            ok = bool(out["answer"]["text"] is not None)
                        else:
                            outs = me.run_jobs([{"job_type": "matrix_multiply", "size": 128, "iterations": 2,
                                                 "job_id": rid}], progress=False)["results"]
                            ok = outs[0]["status"] == "completed"
                            if not ok:
                                raise RuntimeError(outs[0].get("error"))
                        with lock:
                            kinds[kind] += 1
                            answers[rid] += 1
                            if not ok:
                                lost.append(f"{rid} ({kind}): wrong answer")
                    except Exception as e:  # any failure of a valid request is a loss
                        import traceback

                        where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
                        at = f" [at {os.path.basename(where.filename)}:{where.lineno} {where.name}]" if where else ""
                        with lock:
                            lost.append(f"{rid} ({kind}): {type(e).__name__}: {e}{at}")

        batch_lines: collections.Counter = collections.Counter()

        def batch_loop() -> None:
            """The batch commands, each run a separate process and client, as from a script."""
            import json
            import subprocess
            import sys
            import tempfile

            folder = tempfile.mkdtemp(prefix="aicluster-soak-")
            exe = os.path.join(os.path.dirname(sys.executable), "aicluster")
            run = 0
            while time.monotonic() < deadline - 30:
                run += 1
                ids = [f"b{run}-{k}" for k in range(4)]
                out = os.path.join(folder, f"out{run}.jsonl")
                if run % 2:
                    src = os.path.join(folder, f"prompts{run}.jsonl")
                    with open(src, "w") as fh:
                        fh.writelines(json.dumps({"id": i, "prompt": f"Request {i}: one word on GPUs"}) + "\n"
                                      for i in ids)
                    cmd, kind, field = [exe, "generate", "--prompts", src, "-o", out, "--max-tokens", "16"], "cli-generate", "id"
                else:
                    src = os.path.join(folder, f"jobs{run}.json")
                    with open(src, "w") as fh:
                        json.dump([{"job_type": "matrix_multiply", "size": 128, "iterations": 2, "job_id": i}
                                   for i in ids], fh)
                    cmd, kind, field = [exe, "submit", src, "-o", out], "cli-submit", "job_id"
                r = subprocess.run([*cmd, "--address", ai.scheduler_address], capture_output=True, text=True,
                                   timeout=600)
                lines = []
                if os.path.exists(out):
                    with open(out) as fh:
                        lines = [json.loads(line) for line in fh if line.strip()]
                with lock:
                    for rec in lines:
                        if rec.get(field) in ids:
                            batch_lines[rec[field]] += 1
                    for i in ids:
                        ok = any(rec.get(field) == i and rec.get("status", "completed") == "completed" for rec in lines)
                        if ok:
                            kinds[kind] += 1
                            answers[i] += 1
                        else:
                            lost.append(f"{i} ({kind}): no answer (exit {r.returncode}): {r.stderr.strip()[-300:]}")

        threads = [threading.Thread(target=client_loop, args=(n,)) for n in range(3)]
        threads.append(threading.Thread(target=batch_loop))
        for t in threads:
            t.start()
        kills = 0
        next_kill = time.monotonic() + a.kill_every
        while time.monotonic() < deadline:
            time.sleep(1)
            if time.monotonic() >= next_kill and time.monotonic() < deadline - 10:
                next_kill += a.kill_every
                try:
                    pids = ai.client.run(os.getpid, on_error="return")
                    addr = rnd.choice(sorted(pids))
                    os.kill(pids[addr], signal.SIGKILL)
                    kills += 1
                    print(f"{time.strftime('%H:%M:%S')} killed the worker at {addr}", flush=True)
                except Exception as e:
                    print(f"chaos: {type(e).__name__}: {e}", flush=True)
        for t in threads:
            t.join(600)
        time.sleep(5)  # the last restarted worker settles
        end_mem = memory()

    done = sum(answers.values())
    dup = sum(1 for n in batch_lines.values() if n > 1)
    print(f"\n{a.minutes:g} minutes, 3 clients and the batch commands, {kills} workers killed")
    print(f"requests done: {done} ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))})")
    print(f"lost: {len(lost)}")
    for line in lost[:20]:
        print("  " + line)
    print(f"duplicated: {dup}")
    print("worker memory (RSS) at start -> end:")
    for name in sorted(set(start_mem) | set(end_mem)):
        s, e = start_mem.get(name), end_mem.get(name)
        print(f"  {name:<8} {format_bytes(s) if s else '-':>10} -> {format_bytes(e) if e else '-':>10}")
    print(f"\nRESULT soak lost={len(lost)} target=0")


if __name__ == "__main__":
    main()
