"""Models travel: how fast a worker gets a model file from another PC of the cluster.

The lab of hosts (tests/lab.py: Linux network namespaces on one bridge, each PC's link
limited with ``tc tbf``; needs root): the model (the shipped Gemma GGUF, laid out as
Ollama's store) is only on the scheduler's PC; three worker PCs.

* ``model_fetch``: bytes/s of one worker's fetch against the link's rate. The fetch time is
  the first ``ai.load_model`` (fetch and load) less a second one from the cache (load only),
  best of ``--repeats`` (the cache emptied in between).
  ``RESULT model_fetch ratio=<x> target=0.80``.
* ``fetch_fanout``: the time for three workers to get it at once against one worker's
  time (lower is better: a source PC's uplink shared by three gives about 3; peers passing
  chunks to each other would give less). ``RESULT fetch_fanout ratio=<x> target=1.5``.

    sudo .venv/bin/python bench/transfer.py [--rate 100mbit] [--repeats 2] [--tls]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CLIENT = r"""
import json, sys, threading, time
from cluster import connect

addr, names = sys.argv[1], sys.argv[2].split(",")
ai = connect(address=addr, timeout=60)
out = {}

def load(name):
    t = time.perf_counter()
    try:
        ai.load_model(name, progress=False)
    except Exception as e:  # (the bench stops with it, not with a missing time)
        print(f"FAILED {name}: {type(e).__name__}: {e}", flush=True)
        return
    out[name] = time.perf_counter() - t

threads = [threading.Thread(target=load, args=(n,)) for n in names]
t0 = time.perf_counter()
for t in threads: t.start()
for t in threads: t.join()
out["all"] = time.perf_counter() - t0
for n in names: ai.unload(n)
print("TIMES " + json.dumps(out), flush=True)
ai.close()
"""

RATES = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}


def bits_per_s(rate: str) -> float:
    for unit, k in RATES.items():
        if rate.endswith(unit):
            return float(rate[: -len(unit)]) * k
    raise SystemExit(f"--rate {rate!r}: write e.g. 100mbit or 1gbit")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", default="100mbit", help="each PC's link (tc tbf rate)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tls", action="store_true", help="the cluster over TLS (aicluster certs)")
    a = ap.parse_args()

    from lab import Lab, can_build
    from test_sources import GEMMA, ollama_store
    from workloads.backends.sources import resolve_source

    why = can_build()
    if why:
        print(f"skipped: {why}")
        return 0
    pcs = ["sched", "w1", "w2", "w3"]
    tiers = {"w1": "VRAM12", "w2": "VRAM6", "w3": "CPU"}
    folder = Path(tempfile.mkdtemp(prefix="aicluster-transfer-"))
    gguf = resolve_source(GEMMA)
    size = gguf.stat().st_size
    store = ollama_store(folder / "ollama", gguf)
    try:
        with Lab(pcs, rate=a.rate) as lab:
            def edit(pc, data):
                for w, tier in tiers.items():
                    data["models"][f"gemma-{w}"] = {**data["models"]["gemma-270m"], "source": "ollama:gemma3:270m",
                                                    "tier": tier}
                data["routing"]["fallback"] = {t: [] for t in data["tiers"]}

            def env(pc):  # each PC its own Ollama folder, cache and hashes; only the scheduler's has it
                home = folder / pc
                return {"OLLAMA_MODELS": str(store if pc == "sched" else home / "ollama"),
                        "AICLUSTER_MODEL_CACHE": str(home / "cache"), "AICLUSTER_DIGESTS": str(home / "digests")}

            lab.configure(folder, tls=a.tls, edit=edit, env=env)
            addr, env = lab.addr, lab.env
            lab.scheduler()
            workers = {w: lab.worker(w, tier) for w, tier in tiers.items()}

            def fetched() -> list[str]:
                """The workers' own summaries of their fetches since the last look (where each
                chunk came from)."""
                import queue

                out = []
                for w, p in workers.items():
                    while True:
                        try:
                            line = p.lines.get_nowait()
                        except queue.Empty:
                            break
                        if line and "fetched " in line:
                            out.append(f"  {w}: " + line.strip().split("fetched ", 1)[1])
                return out
            script = folder / "client.py"
            script.write_text(CLIENT)

            def times(names: list[str]) -> dict:
                r = lab.run("sched", ["python", str(script), addr, ",".join(names)], env["sched"], timeout=1800)
                line = next((x for x in r.stdout.splitlines() if x.startswith("TIMES ")), None)
                if line is None or "FAILED " in r.stdout:
                    raise SystemExit(r.stdout[-3000:] + r.stderr[-3000:])
                return json.loads(line[6:])

            def sent(pc: str) -> int:
                """Bytes ``pc`` has sent on its link (its interface's counter)."""
                r = subprocess.run(["ip", "-n", lab.ns(pc), "-j", "-s", "link", "show", "dev", lab._veth(pc)[1]],
                                   capture_output=True, text=True, check=True)
                return int(json.loads(r.stdout)[0]["stats64"]["tx"]["bytes"])

            def clear() -> None:
                for w in tiers:
                    shutil.rmtree(folder / w / "cache", ignore_errors=True)

            # the scheduler PC hashes its file once (its first answer): not part of a fetch
            times(["gemma-w1"])
            clear()
            one, many, source_share = [], [], []
            for _ in range(a.repeats):
                clear()
                fetch_and_load = times(["gemma-w1"])["gemma-w1"]
                load = times(["gemma-w1"])["gemma-w1"]  # from the cache now
                one.append(max(fetch_and_load - load, 1e-3))
                clear()
                fetched()  # (the single fetches' lines: not these)
                before = sent("sched")
                both = times(["gemma-w1", "gemma-w2", "gemma-w3"])
                many.append(max(both["all"] - load, 1e-3))
                source_share.append((sent("sched") - before) / (3 * size))
                print("three at once:\n" + "\n".join(fetched()), flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    fetch_s, fan_s = min(one), min(many)
    link = bits_per_s(a.rate) / 8
    print(f"model: {size / 2**20:.0f} MiB; link {a.rate} ({link / 2**20:.1f} MiB/s) per PC, "
          f"{'TLS' if a.tls else 'plain TCP'}")
    print(f"one worker: {fetch_s:.1f} s ({size / fetch_s / 2**20:.1f} MiB/s); three at once: {fan_s:.1f} s "
          f"(runs: {', '.join(f'{x:.1f}' for x in one)} / {', '.join(f'{x:.1f}' for x in many)})")
    print(f"three at once: the source PC sent {min(source_share):.2f} of the three files' bytes (1.00: no chunk "
          f"passed between the fetchers; 0.33: each chunk left it once)")
    print("sides: the fetch, one thread per worker process, against the link's rate; three workers against one, "
          f"the same source PC; {os.cpu_count()} cores")
    print(f"RESULT model_fetch ratio={size / fetch_s / link:.3f} target=0.80")
    print(f"RESULT fetch_fanout ratio={fan_s / fetch_s:.3f} target=1.5")
    return 0


if __name__ == "__main__":
    sys.exit(main())
