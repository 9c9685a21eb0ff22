"""Shared fixtures. Everything here is real: Dask schedulers and workers, models from
installed packages. The one thing replaced is the GPU inventory (``cluster.devices``),
through ``AICLUSTER_FAKE_GPUS`` or a hand-made ``Inventory``; this machine has no GPU.
"""
from __future__ import annotations

import copy
import os
import socket
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# benchmark records of the tests' workers go to a scratch folder, not ~/.cache
import tempfile  # noqa: E402

os.environ["AICLUSTER_BENCH_DIR"] = tempfile.mkdtemp(prefix="aicluster-bench-")
# shard servers on fixed ports keep their weight cache here, not in ~/.cache
os.environ["AICLUSTER_SHARD_CACHE"] = tempfile.mkdtemp(prefix="aicluster-shards-")
# `aicluster scheduler` keeps its job board under $XDG_DATA_HOME/aicluster (not ~/.local/share)
os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="aicluster-data-")

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(Path(__file__).parent))  # tests/tinymodels.py for worker processes


def base_config() -> dict:
    """The project's config.yaml as a dict (a fresh copy each time)."""
    return copy.deepcopy(yaml.safe_load((ROOT / "config.yaml").read_text()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ai():
    """The embedded cluster of config.yaml (pc1 VRAM12, pc2 VRAM6, cpu CPU; one process each)."""
    from cluster import connect

    ai = connect(dashboard_port=0, timeout=120)
    yield ai
    ai.close()


@pytest.fixture
def env_with_tests():
    """Environment for subprocesses: offline, tests/ importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), str(ROOT), env.get("PYTHONPATH", "")])
    return env


def three_tier_config(memory_limit: str = "2GB") -> dict:
    """config.yaml with in-process workers pc1 (VRAM12), pc2 (VRAM6) and cpu (CPU)."""
    data = base_config()
    data["local"]["workers"] = [{"name": n, "tier": t, "nthreads": 1, "memory_limit": memory_limit}
                                for n, t in (("pc1", "VRAM12"), ("pc2", "VRAM6"), ("cpu", "CPU"))]
    return data


@pytest.fixture(scope="module")
def tiers():
    """A fast in-process cluster of three simulated tiers (one per module)."""
    from cluster import connect

    with connect(three_tier_config(), processes=False, dashboard_port=0) as ai:
        yield ai
