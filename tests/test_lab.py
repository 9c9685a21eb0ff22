"""The cluster across separate hosts: a scheduler PC, two GPU-tier PCs, a CPU PC and a
client, each a Linux network namespace with its own address on one bridge, links rate
limited with tc (tests/lab.py). Everything speaks TLS, with certificates from `aicluster
certs`. Scheduler and workers are `aicluster scheduler` / `aicluster worker` processes
inside their namespaces; the client commands run in the client's. Only the lab's own
addresses are used. Skipped, with the reason, where namespaces cannot be made (not root).
"""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from conftest import base_config
from lab import Lab, can_build, wait_for

pytestmark = pytest.mark.skipif(can_build() is not None, reason=str(can_build()))

PCS = ["sched", "gpu1", "gpu2", "cpu", "client"]
PROMPTS = ["The three primary colors are", "Once upon a time", "def add(a, b):"]
N = 24
#: the lab's settings for cut links (the README's "PC on flaky Wi-Fi" has them): the scheduler
#: drops a silent worker after 10 s; a connection attempt gives up after 10 s, a silent one
#: after 15 s (Dask's least: 11 s, one more than its keepalive probes)
FAST = {"DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL": "10s", "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "10s",
        "DASK_DISTRIBUTED__COMM__TIMEOUTS__TCP": "15s"}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lab")

    def edit(pc, data):
        data["scheduler"]["jobs_db"] = str(folder / "jobs.sqlite3")
        data["worker"]["reconnect"] = {"initial_delay": 0.5, "max_delay": 2}

    with Lab(PCS) as lab:
        lab.configure(folder, tls=True, edit=edit, env=lambda pc: FAST)  # each PC its own config and certificate
        lab.sched = lab.scheduler()
        for pc, tier, extra in (("gpu1", "VRAM12", ["--shard-server"]), ("gpu2", "VRAM6", ["--shard-server"]),
                                ("cpu", "CPU", [])):
            lab.worker(pc, tier, *extra)
        yield lab


def client(lab, *args, timeout: float = 300):
    r = lab.run("client", ["aicluster", *args], lab.env["client"], timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.fixture(scope="module")
def references():
    """What one machine gives: the same engine in this process (greedy, lone requests), the
    split model's reference with weight repacking off, and the embeddings."""
    from cluster.config import load_config
    from workloads.backends import llamacpp, sentence_transformers

    cfg = load_config(base_config())
    out = {}
    for key, name, repack in (("text", "gemma-270m", True), ("split", "gemma-270m-split", False)):
        spec = cfg.models[name].model_copy(update={"shard": False})
        spec = spec.model_copy(update={"options": {**spec.options, "repack": repack}})
        m = llamacpp.load(spec, threads=1, name=name)
        out[key] = [m.generate(p, max_tokens=N)["text"] for p in PROMPTS]
        m.close()
    m = sentence_transformers.load(cfg.models["minilm"], threads=1, name="minilm")
    out["vectors"] = np.asarray(m.encode([f"passage {i} about GPUs" for i in range(40)], batch_size=64, normalize=False))
    m.close()
    return out


def test_status_across_the_lan(lab):
    r = client(lab, "status", lab.addr)
    for pc in ("gpu1", "gpu2", "cpu"):
        assert pc in r.stdout
    assert f"{lab.ip('gpu1')}:50052" in r.stdout  # its shard server, on its own LAN address


def test_generate_and_embed_across_the_lan_equal_one_machine(lab, references, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    out = tmp_path / "answers.jsonl"
    client(lab, "generate", "--prompts", str(prompts), "-o", str(out), "--address", lab.addr, "--max-tokens", str(N),
           "--in-flight", "1")
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert [rows[f"p{i}"]["text"] for i in range(len(PROMPTS))] == references["text"]
    assert {r["worker"] for r in rows.values()} == {"gpu1"}

    texts = tmp_path / "t.txt"
    texts.write_text("".join(f"passage {i} about GPUs\n" for i in range(40)))
    vec = tmp_path / "v.npy"
    client(lab, "embed", str(texts), "-o", str(vec), "--address", lab.addr, "--chunk-size", "16")
    np.testing.assert_allclose(np.load(vec), references["vectors"], rtol=1e-4, atol=1e-5)


def test_split_model_across_two_pcs(lab, references):
    r = client(lab, "shard", "gemma-270m-split", "--address", lab.addr, "--workers", "gpu1,gpu2", "--load",
               "--prompt", PROMPTS[0], "--max-tokens", str(N))
    assert f"{lab.ip('gpu2')}:50052" in r.stdout and "loaded gemma-270m-split: head gpu1" in r.stdout
    assert r.stdout.rstrip().endswith(references["split"][0].rstrip())


def test_cut_link_reroutes_then_the_worker_rejoins(lab, tmp_path):
    """gpu1's cable is pulled while it generates: the scheduler drops it after the lab's
    worker-ttl, its generations run on the VRAM6 fallback (gpu2), every answer is written
    once; plugged back in, gpu1 rejoins by itself."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Story {i}: the lighthouse keeper"}) + "\n"
                               for i in range(4)))
    out = tmp_path / "answers.jsonl"
    gen = lab.popen("client", ["aicluster", "generate", "--prompts", str(prompts), "-o", str(out), "--address",
                               lab.addr, "--max-tokens", "300"], lab.env["client"])
    deadline = time.monotonic() + 120
    while True:  # until gpu1 runs them
        r = lab.run("client", ["aicluster", "jobs", lab.addr, "--state", "running", "--json"], lab.env["client"])
        if any(j["worker"] == "gpu1" and j["kind"] == "generate" for j in json.loads(r.stdout or "[]")):
            break
        assert time.monotonic() < deadline and gen.poll() is None, r.stdout + r.stderr
        time.sleep(0.5)
    time.sleep(2)
    lab.cut("gpu1")
    try:
        log = wait_for(gen, "wrote 4 answers", timeout=240)
    finally:
        lab.restore("gpu1")
    assert gen.wait(30) == 0, log
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == ["q0", "q1", "q2", "q3"]  # each once
    assert "gpu2" in {r["worker"] for r in rows}  # (some or all ran on the fallback)
    deadline = time.monotonic() + 90
    while True:  # plugged back in: it rejoins
        st = lab.run("client", ["aicluster", "status", lab.addr], lab.env["client"], timeout=60).stdout
        if "gpu1" in st:
            break
        assert time.monotonic() < deadline, st
        time.sleep(2)


CLIENT_SCRIPT = """
import json, sys
import numpy as np
from cluster import connect

ai = connect(address=sys.argv[1])
seen = []
ai.on_resubmit(seen.extend)
gens = ai.generate([f"Story {i}: the lighthouse keeper" for i in range(3)], max_tokens=250)
emb = ai.embed([f"passage {i} about GPUs" for i in range(40)], chunk_size=16)
total = ai.submit(sum, [40, 2], tier="CPU", retries=1)
print("SUBMITTED", flush=True)
res = ai.client.gather(gens)
np.save(sys.argv[2], emb.result())
print("RESULT " + json.dumps({"answers": [[r["completion_tokens"], r["finish_reason"], r["worker"]] for r in res],
                              "total": total.result(), "keys": [f.key for f in gens] + [emb.key, total.key],
                              "redone": sorted({x.key for x in seen})}), flush=True)
ai.close()
"""


def test_scheduler_pc_restarted_loses_nothing(lab, references, tmp_path):
    """The scheduler PC's process is killed while a client on another PC holds generations,
    an embedding and a `submit` with retries, and started again: the workers rejoin, the
    client reconnects, the facade submits again what was lost, and every answer arrives
    whole (the embedding equal to one machine's); the job board on the scheduler PC kept
    its history in SQLite."""
    script = tmp_path / "hold.py"
    script.write_text(CLIENT_SCRIPT)
    vec = tmp_path / "v.npy"
    before = {j["key"] for j in json.loads(client(lab, "jobs", lab.addr, "--json").stdout)}
    holder = lab.popen("client", ["python", str(script), lab.addr, str(vec)], lab.env["client"])
    wait_for(holder, "SUBMITTED", timeout=120)
    deadline = time.monotonic() + 120
    while True:  # until the generations run
        r = lab.run("client", ["aicluster", "jobs", lab.addr, "--state", "running", "--json"], lab.env["client"])
        if sum(j["kind"] == "generate" for j in json.loads(r.stdout or "[]")) >= 3:
            break
        assert time.monotonic() < deadline and holder.poll() is None, r.stdout + r.stderr
        time.sleep(0.5)
    time.sleep(1.5)  # (the job board writes its rows every second)
    lab.sched.kill()
    lab.sched.wait()
    lab.sched = lab.scheduler()
    out = wait_for(holder, "RESULT ", timeout=300)
    assert holder.wait(60) == 0, out
    got = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
    assert all(n == 250 or why == "stop" for n, why, _ in got["answers"]), got
    assert got["total"] == 42
    assert set(got["keys"][:3]) <= set(got["redone"]), got  # the generations were in flight: redone
    np.testing.assert_allclose(np.load(vec), references["vectors"], rtol=1e-4, atol=1e-5)
    board = {j["key"]: j for j in json.loads(client(lab, "jobs", lab.addr, "--json").stdout)}
    assert before <= set(board)  # the history before the restart is still there
    for key in got["keys"][:3]:
        assert board[key]["state"] == "done" and board[key]["resubmitted"] == 1, board[key]
    deadline = time.monotonic() + 90
    while True:  # every worker PC is back
        st = lab.run("client", ["aicluster", "status", lab.addr], lab.env["client"], timeout=60).stdout
        if all(pc in st for pc in ("gpu1", "gpu2", "cpu")):
            break
        assert time.monotonic() < deadline, st
        time.sleep(2)
