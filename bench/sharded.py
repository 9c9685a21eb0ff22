"""A model split over two workers' shard servers against one process, same run.

The baseline is in-process llama.cpp with the same model file, prompt, token count and one
thread, weight repacking on (as people run it). The split run is the embedded cluster with
two worker processes, each with a shard server (ggml RPC), the model's layers divided
between them and its head in a child process of the first. Prompt processing and
generation are timed apart (by the batch engine, on both sides). The split runs twice: with
the output layer on the last part (``shard.output: last``, as before) and on the head's own
server (the default), and the bytes per generated token through each server's sockets are
shown (the kernel's counters): those of the other PC's server would cross a LAN. Ends with
``RESULT sharded ratio=<x> target=0.90`` where ratio = split generation tokens/s over
in-process tokens/s (higher is better; ggml RPC adds a round trip per layer range per token;
the median of pairs: each split generation is followed by an in-process one of the same
prompt, so the machine's slow and fast minutes fall on both sides),
and a third split run with ``security.tls`` (the shard servers behind mutual-TLS tunnels):
``RESULT sharded_tls ratio=<x> target=0.95``, tokens/s with TLS over without.

``--lab`` (root: network namespaces, tests/lab.py) splits the model over two "PCs" of the
lab with ``tc tbf`` links at 1 Gbit/s and 100 Mbit/s against one process (``RESULT
sharded_lan_1g ratio=<x> target=0.85``, ``RESULT sharded_lan_100m ratio=<x> target=0.75``),
then holds one PC to a quarter of a CPU and compares the plan by measured speed with the
plan by memory (``RESULT sharded_speed_plan ratio=<x> target=1.30``, tokens/s).

    python bench/sharded.py [--tokens 64] [--repeats 3] [--lab]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGET = 0.90
#: the shard servers behind TLS tunnels against plain ggml RPC (ISSUE 22: within 5%)
TLS_TARGET = 0.95
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
    p.add_argument("--lab", action="store_true",
                   help="two PCs of the namespace lab (root) at 1 Gbit/s and 100 Mbit/s, and a plan by speed against "
                        "one by memory with a PC at a quarter of a CPU")
    a = p.parse_args()
    if a.lab:
        return lab_main(a)

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

    # the baseline stays loaded: each split generation is paired with one in-process run of the
    # same prompt right after it, so a slow minute of this shared machine moves both sides
    m = llamacpp.load(spec, device="cpu", threads=1, name="baseline")
    m.generate(prompts[0], max_tokens=8)  # warm caches
    local = []

    def split_run(output: str, tls: str | None = None) -> tuple[list, float, float, list]:
        """(rates per prompt, bytes per token on the other PC's server, on the head's own,
        the in-process rates paired with them); ``tls``: a folder of ``aicluster certs``, the
        cluster and its shard traffic on TLS"""
        d = copy.deepcopy(data)
        d["models"][model]["shard"] = {"workers": ["pc1", "pc2"], "output": output, "plan": "memory"}
        if tls:
            from conftest import free_port

            port = free_port()
            d["security"] = {"tls": True, "ca_file": f"{tls}/ca.pem", "cert_file": f"{tls}/{{hostname}}.pem",
                             "key_file": f"{tls}/{{hostname}}.key"}
            d["scheduler"].update(address=f"tls://127.0.0.1:{port}", port=port)
        with connect(load_config(d), dashboard_port=0) as ai:
            plan = ai.plan_shards(model)
            print(plan)
            ai.load_model(model, progress=False)
            ai.generate_now(prompts[0], model=model, max_tokens=8)  # warm
            remote = [p.endpoint for p in plan.parts if p.worker != plan.head]
            own = [p.endpoint for p in plan.parts if p.worker == plan.head]
            out, far, near, paired = [], [], [], []
            for q in prompts[1:]:
                before = io_bytes(remote), io_bytes(own)
                r = ai.generate_now(q, model=model, max_tokens=a.tokens)
                far.append((io_bytes(remote) - before[0]) / r["completion_tokens"])
                near.append((io_bytes(own) - before[1]) / r["completion_tokens"])
                out.append(rates(r))
                paired.append(rates(m.generate(q, max_tokens=a.tokens)))
            assert r["completion_tokens"] == a.tokens, "the split model stopped early"
        local.extend(paired)
        return out, statistics.median(far), statistics.median(near), paired

    def ratio(side: list, base: list) -> float:
        """The median of the paired generation ratios."""
        return statistics.median(y / by for (_, y), (_, by) in zip(side, base))

    old_split, old_far, old_near, _ = split_run("last")
    split, far, near, base = split_run("head")
    # the same split with security.tls: the shard servers behind mutual-TLS tunnels
    import socket
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    with tempfile.TemporaryDirectory(prefix="aicluster-bench-certs-") as certs:
        subprocess.run([str(Path(sys.executable).parent / "aicluster"), "certs", certs, "--hosts", socket.gethostname()],
                       check=True, capture_output=True, text=True)
        tls_split, _, _, tls_base = split_run("head", tls=certs)
    m.close()

    lp, lg = statistics.median(x for x, _ in local), statistics.median(y for _, y in local)
    sp, sg = statistics.median(x for x, _ in split), statistics.median(y for _, y in split)
    op, og = statistics.median(x for x, _ in old_split), statistics.median(y for _, y in old_split)
    print(f"\n{'':<44}{'prompt tok/s':>14}{'generate tok/s':>16}")
    print(f"{'in-process (repack on)':<44}{lp:>14.1f}{lg:>16.1f}")
    print(f"{'split, output layer on the last part':<44}{op:>14.1f}{og:>16.1f}")
    print(f"{'split, output layer on the head (default)':<44}{sp:>14.1f}{sg:>16.1f}")
    tp, tg = statistics.median(x for x, _ in tls_split), statistics.median(y for _, y in tls_split)
    print(f"{'split, the same, with security.tls (tunnels)':<44}{tp:>14.1f}{tg:>16.1f}")
    # each against the in-process runs paired with it; TLS against no TLS through those
    r_split, r_tls = ratio(split, base), ratio(tls_split, tls_base)
    print(f"{'ratio (default split / in-process, paired)':<44}{sp / lp:>14.2f}{r_split:>16.2f}")
    print(f"{'ratio (with TLS / without, paired)':<44}{tp / sp:>14.2f}{r_tls / r_split:>16.2f}")
    print("\nbytes per generated token (its prompt included) through the shard servers' sockets:")
    print(f"{'':<44}{'other PC':>14}{'head PC':>16}")
    print(f"{'output layer on the last part':<44}{old_far / 1024:>11.1f} KiB{old_near / 1024:>13.1f} KiB")
    print(f"{'output layer on the head (default)':<44}{far / 1024:>11.1f} KiB{near / 1024:>13.1f} KiB")
    print(f"(the other PC's bytes cross the LAN: {old_far * 8 / 1e6:.2f} ms -> {far * 8 / 1e6:.3f} ms per token "
          f"at 1 Gbit/s; the head PC's stay on its loopback)")
    print(f"sides: in-process, one llama.cpp context in this process; split, a head and two shard server processes, "
          f"1 llama.cpp thread each; {os.cpu_count()} cores")
    print(f"\nRESULT sharded ratio={r_split:.3f} target={TARGET:.2f}")
    print(f"RESULT sharded_tls ratio={r_tls / r_split:.3f} target={TLS_TARGET:.2f}")


LAB_CLIENT = r"""
import json, sys
from cluster import connect

addr, model, tokens, prompts = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
ai = connect(address=addr, timeout=60)
plan = ai.plan_shards(model)
print(plan, flush=True)
ai.load_model(model, progress=False)
ai.generate_now(prompts[0], model=model, max_tokens=8)  # warm
out = []
for q in prompts[1:]:
    r = ai.generate_now(q, model=model, max_tokens=tokens)
    out.append({k: r[k] for k in ("generate_seconds", "prefill_seconds", "prompt_tokens", "completion_tokens")})
ai.unload(model)
print("RATES " + json.dumps({"rates": out, "plan": plan.to_dict()}), flush=True)
ai.close()
"""

#: the lab's targets (ISSUE 22): a split over two PCs against one process
LAN_TARGETS = {"1gbit": 0.85, "100mbit": 0.75}
SPEED_TARGET = 1.3


def lab_main(a) -> None:
    """``--lab``: two PCs of the namespace lab (tests/lab.py) split the model, at 1 Gbit/s and
    100 Mbit/s, against one process; then one PC held to a quarter of a CPU, the plan by
    speed against the plan by memory."""
    import json
    import shutil
    import sys
    import tempfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "tests"))
    from conftest import base_config
    from lab import Lab, can_build

    from cluster.config import load_config
    from workloads.backends import llamacpp

    why = can_build()
    if why:
        print(f"skipped: {why}")
        return
    prompts = (PROMPTS * a.repeats)[:a.repeats + 1]
    model = "gemma-270m-split"
    cfg = load_config(base_config())
    spec = cfg.models[model].model_copy(update={"shard": False})
    m = llamacpp.load(spec, device="cpu", threads=1, name="baseline")
    try:
        m.generate(prompts[0], max_tokens=8)
        local = statistics.median(rates(m.generate(q, max_tokens=a.tokens))[1] for q in prompts[1:])
    finally:
        m.close()

    folder = Path(tempfile.mkdtemp(prefix="aicluster-sharded-lab-"))
    pcs = ["sched", "pc1", "pc2"]
    results = {}
    try:
        with Lab(pcs, rate="1gbit") as lab:
            def edit(pc, data):
                # budgets of 600 MB (pc1: the input and output layers and 14 of the 18) and 900 MB
                # (pc2: all of it), by each worker's --memory-limit
                data["worker"]["model_budget"] = 0.2
                split = data["models"][model]
                split["options"].update(prefix_cache=False, n_threads=1)
                data["models"]["split-lan"] = {**split, "shard": {"workers": ["pc1", "pc2"], "plan": "memory"}}
                data["models"]["split-by-memory"] = {**split, "shard": {"plan": "memory"}}
                data["models"]["split-by-speed"] = {**split, "shard": {"plan": "speed"}}

            lab.configure(folder, edit=edit, env=lambda pc: {"AICLUSTER_SPEED_CACHE": str(folder / pc / "speed.json")})
            addr, env = lab.addr, lab.env
            lab.scheduler()
            for pc in ("pc1", "pc2"):
                lab.worker(pc, "CPU", "--shard-server", "--memory-limit", {"pc1": "3GB", "pc2": "4.5GB"}[pc])
            script = folder / "client.py"
            script.write_text(LAB_CLIENT)

            def run(name: str) -> tuple[float, dict]:
                r = lab.run("sched", ["python", str(script), addr, name, str(a.tokens), json.dumps(prompts)],
                            env["sched"], timeout=900)
                line = next((x for x in r.stdout.splitlines() if x.startswith("RATES ")), None)
                if line is None:
                    raise SystemExit(f"{name}: " + r.stdout[-3000:] + r.stderr[-3000:])
                print(r.stdout.split("RATES ")[0].rstrip())
                got = json.loads(line[6:])
                return statistics.median(rates(x)[1] for x in got["rates"]), got["plan"]

            for rate in LAN_TARGETS:
                lab.set_rate(rate)
                results[rate], _ = run("split-lan")
                print(f"split over pc1 and pc2 at {rate}: {results[rate]:.1f} tokens/s\n")
            lab.limit_cpu("pc2", 0.25)
            results["memory"], mem_plan = run("split-by-memory")
            results["speed"], speed_plan = run("split-by-speed")
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    print(f"\n{'':<52}{'generate tok/s':>16}{'ratio':>8}")
    print(f"{'one process (repack on)':<52}{local:>16.1f}{'':>8}")
    for rate in LAN_TARGETS:
        print(f"{'split over 2 PCs, links at ' + rate:<52}{results[rate]:>16.1f}{results[rate] / local:>8.2f}")

    def who(plan: dict) -> str:
        n = plan["n_layer"]
        return ", ".join(f"{p['name']} {min(p['last'], n - 1) - p['first'] + 1}" for p in plan["parts"])

    print(f"{'pc2 at 1/4 CPU, plan by memory (' + who(mem_plan) + ')':<52}{results['memory']:>16.1f}")
    print(f"{'pc2 at 1/4 CPU, plan by speed (' + who(speed_plan) + ')':<52}{results['speed']:>16.1f}"
          f"{results['speed'] / results['memory']:>8.2f}")
    print(f"sides: one process here, 1 llama.cpp thread; the lab's PCs are network namespaces on this machine's "
          f"{os.cpu_count()} cores (a head and two shard servers, 1 thread each), links limited with tc tbf; pc2's "
          f"quarter CPU is a cgroup CPU quota on all its processes")
    for rate, target in LAN_TARGETS.items():
        tag = {"1gbit": "1g", "100mbit": "100m"}[rate]
        print(f"RESULT sharded_lan_{tag} ratio={results[rate] / local:.3f} target={target:.2f}")
    print(f"RESULT sharded_speed_plan ratio={results['speed'] / results['memory']:.3f} target={SPEED_TARGET:.2f}")


if __name__ == "__main__":
    main()
