"""Starting the cluster the way users do: `dask scheduler` / `dask worker` with the preloads,
`aicluster scheduler|worker|up|status`, all as real subprocesses. GPUs are injected through
AICLUSTER_FAKE_GPUS (the inventory seam), so the tiers they give are simulated."""
from __future__ import annotations

import json
import signal
import subprocess

import pytest
import yaml
from distributed import Client

from conftest import BIN, base_config, free_port
from procs import proc, read_until

pytestmark = pytest.mark.slow


def workers_by_name(client):
    return {w["name"]: w for w in client.scheduler_info(n_workers=-1)["workers"].values()}


def test_dask_scheduler_and_dask_workers_with_preloads(env_with_tests):
    port = free_port()
    addr = f"tcp://127.0.0.1:{port}"
    common = ["--preload", "cluster.worker", "--nthreads", "1", "--no-dashboard", "--memory-limit", "2GB"]
    with proc(["dask", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-address", ":0",
               "--preload", "cluster.scheduler"], env_with_tests) as sched:
        read_until(sched, "Scheduler at")
        with proc(["dask", "worker", addr, *common], dict(env_with_tests, AICLUSTER_FAKE_GPUS="RTX 3060:12GB")), \
             proc(["dask", "worker", addr, *common], dict(env_with_tests, AICLUSTER_FAKE_GPUS="GTX 1660:6GB")), \
             proc(["dask", "worker", addr, *common, "--nthreads", "2"], env_with_tests), \
             Client(addr) as client:
            client.wait_for_workers(3, timeout=120)
            info = client.scheduler_info(n_workers=-1)["workers"].values()
            by_tier = {}
            for w in info:
                (tier,) = [r for r in w["resources"] if r in ("VRAM12", "VRAM6", "CPU")]
                by_tier[tier] = w
            assert by_tier["VRAM12"]["resources"] == {"VRAM12": 1}
            assert by_tier["VRAM6"]["resources"] == {"VRAM6": 1}
            assert by_tier["CPU"]["resources"] == {"CPU": 2}
            for tier, w in by_tier.items():
                assert f"-{tier}-" in w["name"]  # <host>-<tier>-<port>
                meta = w["metrics"]["aicluster-tier"]
                assert meta["tier"] == tier
            assert by_tier["VRAM12"]["metrics"]["aicluster-tier"]["simulated"] is True
            assert "RTX 3060" in by_tier["VRAM12"]["metrics"]["aicluster-tier"]["device_name"]
            assert by_tier["CPU"]["metrics"]["aicluster-tier"]["simulated"] is False
            # the worker preload registered the ModelHost on every worker
            has_host = client.run(lambda dask_worker: "aicluster-modelhost" in dask_worker.plugins)
            assert list(has_host.values()) == [True] * 3
            # and the scheduler preload installed the tier guard
            assert client.run_on_scheduler(lambda dask_scheduler: "aicluster-tier-guard" in dask_scheduler.plugins)

            out = subprocess.run([str(BIN / "aicluster"), "status", addr], env=env_with_tests,
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            tiers = {l.split()[1]: l.split()[2] for l in out.stdout.splitlines() if "-VRAM" in l or "-CPU-" in l}
            assert tiers == {"VRAM12": "simulated", "VRAM6": "simulated", "CPU": "real"}
            assert "RTX 3060" in out.stdout


def test_aicluster_worker_rejoins_after_the_scheduler_restarts(tmp_path, env_with_tests):
    data = base_config()
    data["worker"]["reconnect"] = {"initial_delay": 0.5, "max_delay": 2}
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(data))
    port = free_port()
    addr = f"tcp://127.0.0.1:{port}"
    sched_args = ["aicluster", "scheduler", "--port", str(port), "--dashboard-port", "0", "--config", str(cfg)]
    with proc(sched_args, env_with_tests) as sched:
        read_until(sched, "scheduler at")
        with proc(["aicluster", "worker", addr, "--tier", "VRAM6", "--name", "pc2", "--config", str(cfg)],
                  env_with_tests) as worker:
            with Client(addr) as c:
                c.wait_for_workers(1, timeout=90)
                assert workers_by_name(c)["pc2"]["resources"] == {"VRAM6": 1}
            sched.kill()  # the scheduler PC goes away
            sched.wait()
            log = read_until(worker, "unreachable (attempt 2", timeout=90)
            assert "retrying in" in log
            with proc(sched_args, env_with_tests) as sched2:
                read_until(sched2, "scheduler at")
                with Client(addr) as c:
                    c.wait_for_workers(1, timeout=90)
                    assert workers_by_name(c)["pc2"]["resources"] == {"VRAM6": 1}
            assert worker.poll() is None  # still running, waiting for the next scheduler


def test_aicluster_up_then_status_shows_three_tiers(env_with_tests):
    port = free_port()
    with proc(["aicluster", "up", "--scheduler-port", str(port), "--dashboard-port", "0"], env_with_tests) as up:
        out = read_until(up, "running; Ctrl-C to stop", timeout=120)
        assert "scheduler: tcp://" in out and f":{port}" in out
        assert "dashboard: http://" in out
        st = subprocess.run([str(BIN / "aicluster"), "status", f"tcp://127.0.0.1:{port}", "--json"],
                            env=env_with_tests, capture_output=True, text=True, timeout=60)
        assert st.returncode == 0, st.stderr
        rows = json.loads(st.stdout)["workers"]
        assert sorted((r["name"], r["tier"], r["simulated"]) for r in rows) == [
            ("cpu", "CPU", False), ("pc1", "VRAM12", True), ("pc2", "VRAM6", True)]
        table = subprocess.run([str(BIN / "aicluster"), "status", f"tcp://127.0.0.1:{port}"],
                               env=env_with_tests, capture_output=True, text=True, timeout=60).stdout
        tiers = {l.split()[0]: l.split()[1:3] for l in table.splitlines() if l.split()[:1] in (["pc1"], ["pc2"], ["cpu"])}
        assert tiers == {"pc1": ["VRAM12", "simulated"], "pc2": ["VRAM6", "simulated"], "cpu": ["CPU", "real"]}
        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0


@pytest.mark.parametrize("cmd", [[], ["scheduler"], ["worker"], ["up"], ["status"], ["demo"], ["embed"], ["generate"],
                                 ["pipeline"], ["jobs"], ["cancel"], ["bench"], ["submit"], ["certs"], ["serve"], ["shard"]])
def test_help_has_examples(cmd, env_with_tests):
    out = subprocess.run([str(BIN / "aicluster"), *cmd, "--help"], env=env_with_tests, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Example" in out.stdout


def test_status_of_an_unreachable_scheduler_is_a_clear_error(env_with_tests):
    port = free_port()
    out = subprocess.run([str(BIN / "aicluster"), "status", f"tcp://127.0.0.1:{port}"], env=env_with_tests,
                         capture_output=True, text=True, timeout=90)
    assert out.returncode != 0
    assert f"cannot reach the scheduler at tcp://127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_config_is_a_clear_cli_error(tmp_path, env_with_tests):
    data = base_config()
    data["worker"]["tierr"] = "VRAM6"
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(data))
    out = subprocess.run([str(BIN / "aicluster"), "status", "--config", str(cfg)], env=env_with_tests,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "worker.tierr: unknown key" in out.stderr and "Traceback" not in out.stderr
