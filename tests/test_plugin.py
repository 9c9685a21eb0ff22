"""ModelHost on real (in-process) Dask workers, with a tiny numpy backend so budgets are small."""
from __future__ import annotations

import pytest
from distributed import get_worker

from cluster import ModelDoesNotFit, connect
from cluster.plugin import PLUGIN_NAME
from conftest import base_config


def tiny(mb: float, footprint: str | None = None, delay: float = 0.0) -> dict:
    return {"backend": "tinymodels:load", "source": "memory", "tier": "CPU",
            "footprint": footprint or f"{mb}MB", "options": {"mb": mb, "delay": delay}}


@pytest.fixture(scope="module")
def ai():
    data = base_config()
    # in-process workers see the whole test process's memory, so the limit is generous and
    # the model budget a small fraction of it
    data["local"]["workers"] = [{"name": "box", "tier": "CPU", "nthreads": 4, "memory_limit": "8GB"}]
    data["worker"]["model_budget"] = 0.0125  # 100 MB for models
    data["models"] = {
        "a": tiny(40), "b": tiny(40), "c": tiny(40),
        "slow": tiny(10, delay=1.0),
        "huge": tiny(200),
        "sneaky": tiny(150, footprint="10MB"),  # the estimate is wrong; the measurement is not
    }
    ai = connect(data, processes=False, dashboard_port=0)
    yield ai
    ai.close()


def use(name):
    host = get_worker().plugins[PLUGIN_NAME]
    with host.acquire(name) as m:
        assert m.buffer is not None
    return host.resident()


def host_state(dask_worker=None):
    import tinymodels

    h = dask_worker.plugins[PLUGIN_NAME]
    return {"resident": h.resident(), "loads": dict(h.load_counts), "evictions": list(h.evictions),
            "backend_loads": dict(tinymodels.LOADS), "budget": h.budget, "used": h.used}


def state(ai):
    (s,) = ai.client.run(host_state).values()
    return s


def reset(ai):
    for name in ("a", "b", "c", "slow", "huge", "sneaky"):
        ai.unload(name)


def test_budget_is_the_configured_fraction_of_memory(ai):
    assert state(ai)["budget"] == 100_000_000


def test_concurrent_first_requests_load_once(ai):
    reset(ai)
    futs = [ai.submit(use, "slow", tier="CPU") for _ in range(4)]
    assert all("slow" in r for r in ai.client.gather(futs))
    s = state(ai)
    assert s["loads"]["slow"] == 1 and s["backend_loads"]["slow"] == 1
    # and later requests reuse it
    ai.submit(use, "slow", tier="CPU").result()
    assert state(ai)["backend_loads"]["slow"] == 1


def test_least_recently_used_model_is_evicted_by_bytes(ai):
    reset(ai)
    assert ai.submit(use, "a", tier="CPU").result() == ["a"]
    assert ai.submit(use, "b", tier="CPU").result() == ["a", "b"]
    assert ai.submit(use, "a", tier="CPU").result() == ["b", "a"]  # a is now the most recent
    assert ai.submit(use, "c", tier="CPU").result() == ["a", "c"]  # 120 MB > 100 MB: b goes
    s = state(ai)
    assert s["evictions"][-1] == "b"
    assert s["used"] <= s["budget"]


def test_a_model_bigger_than_the_budget_does_not_fit(ai):
    reset(ai)
    ai.submit(use, "a", tier="CPU").result()
    with pytest.raises(ModelDoesNotFit, match=r"model 'huge' does not fit on worker box \(CPU\): it needs 190.73 MiB \(estimated\) but the worker's model budget is 95.37 MiB"):
        ai.submit(use, "huge", tier="CPU").result()
    assert "a" in state(ai)["resident"]  # nothing was evicted for a model that can never fit


def test_a_wrong_footprint_estimate_is_caught_by_the_measurement(ai):
    reset(ai)
    with pytest.raises(ModelDoesNotFit) as e:
        ai.submit(use, "sneaky", tier="CPU").result()
    assert "weights size" in str(e.value) or "RSS delta" in str(e.value)
    s = state(ai)
    assert "sneaky" not in s["resident"] and s["used"] <= s["budget"]


def test_unload_frees_and_reports(ai):
    reset(ai)
    ai.submit(use, "a", tier="CPU").result()
    assert list(ai.unload("a").values()) == [True]
    assert list(ai.unload("a").values()) == [False]
    assert state(ai)["resident"] == []


def test_metrics_reach_the_scheduler(ai):
    import time

    reset(ai)
    ai.submit(use, "b", tier="CPU").result()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        (w,) = ai.client.scheduler_info()["workers"].values()
        m = w["metrics"].get("aicluster", {})
        if "b" in m.get("models", {}):
            break
        time.sleep(0.2)
    assert m["tier"] == "CPU" and m["budget"] == 100_000_000
    assert m["models"]["b"]["bytes"] >= 40_000_000
    assert m["models"]["b"]["backend"] == "tinymodels:load"
    assert m["used"] == m["models"]["b"]["bytes"]


def test_models_marked_preload_load_in_the_background_at_worker_start():
    import time

    data = base_config()
    data["local"]["workers"] = [{"name": "pre", "tier": "CPU", "nthreads": 1, "memory_limit": "8GB"}]
    data["models"] = {"warm": {**tiny(5), "preload": True}, "cold": tiny(5)}
    with connect(data, processes=False, dashboard_port=0) as ai:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "warm" not in state(ai)["resident"]:
            time.sleep(0.1)
        s = state(ai)
        assert s["resident"] == ["warm"]  # without any task asking for it; "cold" waits for one
        assert s["loads"] == {"warm": 1}
