"""Routing by tier on real Dask clusters (in-process workers for speed; subprocess workers
in test_cli.py). Tiers are forced from config, so they are simulated on this machine."""
from __future__ import annotations

import subprocess
import time

import pytest
from distributed import get_worker

from cluster import NoWorkerForTier, connect
from conftest import BIN, base_config


def whoami(x=None):
    return get_worker().name


def slow_whoami(seconds):
    time.sleep(seconds)
    return get_worker().name


def config_with(workers: list[tuple[str, str]], fallback: dict | None = None) -> dict:
    data = base_config()
    data["local"]["workers"] = [{"name": n, "tier": t, "nthreads": 1, "memory_limit": "2GB"} for n, t in workers]
    if fallback is not None:
        data["routing"]["fallback"] = fallback
    return data


@pytest.fixture(scope="module")
def three():
    ai = connect(config_with([("pc1", "VRAM12"), ("pc2", "VRAM6"), ("cpu", "CPU")]), processes=False, dashboard_port=0)
    yield ai
    ai.close()


def test_each_tier_runs_on_its_worker(three):
    assert three.submit(whoami, tier="VRAM12").result() == "pc1"
    assert three.submit(whoami, tier="VRAM6").result() == "pc2"
    assert three.submit(whoami, tier="CPU").result() == "cpu"
    names = three.client.gather(three.map(whoami, range(6), tier="VRAM6"))
    assert names == ["pc2"] * 6


def test_untiered_submit_runs_anywhere_and_unknown_tier_is_refused(three):
    assert three.submit(whoami).result() in {"pc1", "pc2", "cpu"}
    with pytest.raises(ValueError, match="'VRAM8' is not a tier; known: VRAM12, VRAM6, CPU"):
        three.submit(whoami, tier="VRAM8")


def test_status_lists_workers_with_tier_and_simulated(three):
    st = three.status()
    rows = {r["name"]: r for r in st}
    assert {n: r["tier"] for n, r in rows.items()} == {"pc1": "VRAM12", "pc2": "VRAM6", "cpu": "CPU"}
    assert rows["pc1"]["simulated"] is True and rows["pc2"]["simulated"] is True
    assert rows["cpu"]["simulated"] is False
    assert all(r["memory_limit"] == 2 * 10**9 for r in rows.values())
    table = str(st)
    pc1_line = next(l for l in table.splitlines() if l.startswith("pc1 "))
    assert pc1_line.split()[1:3] == ["VRAM12", "simulated"]
    cpu_line = next(l for l in table.splitlines() if l.startswith("cpu "))
    assert cpu_line.split()[1:3] == ["CPU", "real"]
    assert {w["name"] for w in st.to_dict()["workers"]} == {"pc1", "pc2", "cpu"}
    assert "simulated" in st._repr_html_()
    assert st.tiers == {"VRAM12": ["pc1"], "VRAM6": ["pc2"], "CPU": ["cpu"]}


def test_fallback_when_the_tier_has_no_worker():
    ai = connect(config_with([("pc2", "VRAM6"), ("cpu", "CPU")]), processes=False, dashboard_port=0)
    with ai:
        route = ai.route("VRAM12")
        assert route.tier == "VRAM6" and route.fell_back
        assert ai.submit(whoami, tier="VRAM12").result() == "pc2"
        assert ai.submit(whoami, tier="CPU").result() == "cpu"


def test_no_worker_for_tier_fails_at_once_then_a_late_worker_is_used(env_with_tests):
    ai = connect(config_with([("cpu", "CPU")], fallback={"VRAM12": [], "VRAM6": [], "CPU": []}),
                 processes=False, dashboard_port=0)
    with ai:
        t0 = time.monotonic()
        with pytest.raises(NoWorkerForTier) as e:
            ai.submit(whoami, tier="VRAM12")
        assert time.monotonic() - t0 < 30  # "at once": no waiting in Dask's no-worker state
        msg = str(e.value)
        assert "tier VRAM12" in msg and "live tiers: CPU" in msg and "aicluster worker" in msg
        assert not [k for k, s in ai.client.processing().items() if s]

        # a real `dask worker` process with an injected 12 GB GPU joins later
        env = dict(env_with_tests, AICLUSTER_FAKE_GPUS="RTX 3060:12GB")
        proc = subprocess.Popen(
            [str(BIN / "dask"), "worker", ai.scheduler_address, "--preload", "cluster.worker",
             "--nthreads", "1", "--no-dashboard", "--name", "latecomer"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            ai.client.wait_for_workers(2, timeout=90)
            assert ai.submit(whoami, tier="VRAM12").result(timeout=60) == "latecomer"
            row = next(r for r in ai.status() if r["name"] == "latecomer")
            assert row["tier"] == "VRAM12" and row["simulated"] is True
            assert "RTX 3060" in row["device_name"]
        finally:
            proc.terminate()
            proc.wait(30)


def _close_worker(ai, name):
    ai.cluster.sync(ai.cluster.workers[name].close)


def test_worker_leaving_mid_job_reroutes_along_the_fallback():
    ai = connect(config_with([("pc1", "VRAM12"), ("pc2", "VRAM6")]), processes=False, dashboard_port=0)
    with ai:
        fut = ai.submit(slow_whoami, 1.5, tier="VRAM12")
        deadline = time.monotonic() + 30
        while not any(ai.client.processing().values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        _close_worker(ai, "pc1")
        # Dask alone would leave the task in no-worker forever; the TierGuard moves it on
        assert fut.result(timeout=60) == "pc2"
        guard = ai.client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.plugins["aicluster-tier-guard"].rerouted)
        assert guard >= 1


def test_worker_leaving_mid_job_without_fallback_fails_with_a_clear_error():
    data = config_with([("pc1", "VRAM12"), ("cpu", "CPU")], fallback={"VRAM12": []})
    data["routing"]["restart_grace"] = 1  # no nanny will bring pc1 back: fail after a second
    ai = connect(data, processes=False, dashboard_port=0)
    with ai:
        fut = ai.submit(slow_whoami, 1.5, tier="VRAM12")
        deadline = time.monotonic() + 30
        while not any(ai.client.processing().values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        _close_worker(ai, "pc1")
        with pytest.raises(NoWorkerForTier, match="tier VRAM12 .*live tiers: CPU"):
            fut.result(timeout=60)


def _set_pause_fraction(fraction, dask_worker=None):
    dask_worker.memory_manager.memory_pause_fraction = fraction


def _wait_status(ai, addr, status, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ai.client.scheduler_info(n_workers=-1)["workers"][addr]["status"] == status:
            return
        time.sleep(0.05)
    raise AssertionError(f"{addr} never became {status}")


def test_a_paused_worker_keeps_its_work_and_runs_it_when_it_resumes():
    ai = connect(config_with([("pc1", "VRAM12"), ("cpu", "CPU")], fallback={"VRAM12": []}),
                 processes=False, dashboard_port=0)
    with ai:
        (pc1,) = ai.live_tiers()["VRAM12"]
        # real memory pressure, made cheap: a pause threshold any process is above
        ai.client.run(_set_pause_fraction, 1e-6, workers=[pc1])
        _wait_status(ai, pc1, "paused")
        fut = ai.submit(whoami, tier="VRAM12")  # not refused: the worker is still there
        time.sleep(1.0)
        assert fut.status == "pending"  # waiting for pc1, not failed by the TierGuard
        assert ai.job(fut)["state"] == "pending"
        ai.client.run(_set_pause_fraction, 0.8, workers=[pc1])
        assert fut.result(timeout=60) == "pc1"
