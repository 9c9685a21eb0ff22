"""A worker process that dies mid-job: the nanny restarts it, it rejoins with its tier, and
Dask runs the job again there, so the caller gets a complete result (real processes)."""
from __future__ import annotations

import time

import pytest

from cluster import connect
from conftest import base_config

pytestmark = pytest.mark.slow


def _die(dask_worker=None):
    import os

    os._exit(1)  # what an out-of-memory kill or a crash in a native library looks like


def test_a_worker_killed_mid_generation_restarts_and_the_job_completes():
    data = base_config()
    data["local"]["workers"] = [{"name": "pc1", "tier": "VRAM12", "nthreads": 1, "memory_limit": "3GB"},
                                {"name": "cpu", "tier": "CPU", "nthreads": 1, "memory_limit": "1GB"}]
    data["routing"]["fallback"]["VRAM12"] = []  # it must come back on pc1, not elsewhere
    with connect(data, dashboard_port=0, timeout=120) as ai:
        prompt = "Count: 1, 2, 3,"
        want = ai.generate_now(prompt, max_tokens=200)  # also loads the model on pc1
        f = ai.generate(prompt, max_tokens=200)
        deadline = time.monotonic() + 60
        while ai.job(f)["state"] != "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # some tokens in
        (pc1,) = ai.live_tiers()["VRAM12"]
        with pytest.raises(Exception):  # the worker dies before it can answer
            ai.client.run(_die, workers=[pc1])
        got = f.result(timeout=180)
        assert got["text"] == want["text"] and got["completion_tokens"] == want["completion_tokens"]
        assert got["worker"] == "pc1" and got["loaded_now"] is True  # a fresh process loaded the model again
        assert ai.live_tiers()["VRAM12"] != [pc1]  # a new worker process (new address)
        assert ai.job(f)["state"] == "done"
