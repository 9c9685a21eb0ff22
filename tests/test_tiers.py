"""Inventory -> tier -> Dask resources. The inventory is the one seam replaced here (no GPU)."""
from __future__ import annotations

import pytest

from cluster.config import load_config
from cluster.devices import GPU, GPUState, Inventory, detect
from cluster.tiers import assign_tier, tier_for_vram
from conftest import base_config

GiB = 2**30


def inventory(*gpus_gib: float, source: str = "detected") -> Inventory:
    """A hand-made inventory; ``source='detected'`` stands for a real GPU on a real PC."""
    gpus = tuple(GPU(index=i, name=f"GPU{i} {g:g}GB", total_bytes=int(g * GiB)) for i, g in enumerate(gpus_gib))
    state = GPUState.AVAILABLE if gpus else GPUState.CPU_BUILD
    return Inventory(gpus=gpus, gpu_state=state, gpu_detail="test", ram_bytes=16 * GiB, cpu_count=8,
                     hostname="testpc", source=source)


@pytest.fixture
def cfg():
    return load_config(base_config())


@pytest.mark.parametrize("gib, tier, resource", [
    (12, "VRAM12", {"VRAM12": 1}),     # RTX 3060 12 GB
    (11.7, "VRAM12", {"VRAM12": 1}),   # what a "12 GB" card may report
    (6, "VRAM6", {"VRAM6": 1}),        # GTX 1660 6 GB
    (4, "CPU", {"CPU": 2}),            # too small for any GPU tier
])
def test_real_gpu_gets_the_tier_its_vram_meets(cfg, gib, tier, resource):
    a = assign_tier(inventory(gib), cfg, nthreads=2)
    assert a.tier == tier
    assert a.resources == resource
    assert a.simulated is False
    assert a.label == tier
    if tier != "CPU":
        assert a.device == "cuda:0" and a.vram_total == int(gib * GiB)


def test_no_gpu_is_cpu_tier_with_one_slot_per_thread(cfg):
    a = assign_tier(inventory(), cfg, nthreads=3)
    assert (a.tier, a.resources, a.device, a.simulated) == ("CPU", {"CPU": 3}, "cpu", False)
    assert "no usable GPU" in a.reason


def test_largest_gpu_decides(cfg):
    a = assign_tier(inventory(6, 12), cfg)
    assert a.tier == "VRAM12" and a.device == "cuda:1"


def test_thresholds_come_from_config():
    data = base_config()
    data["tiers"]["VRAM12"]["min_vram"] = "16GB"
    data["tiers"]["VRAM6"]["min_vram"] = "8GB"
    cfg = load_config(data)
    assert tier_for_vram(12 * GiB, cfg) == "VRAM6"
    assert tier_for_vram(6 * GiB, cfg) == "CPU"
    assert assign_tier(inventory(16), cfg).tier == "VRAM12"


def test_forced_gpu_tier_without_gpu_is_simulated(cfg):
    a = assign_tier(inventory(), cfg, forced="VRAM12")
    assert a.tier == "VRAM12" and a.simulated is True
    assert a.label == "VRAM12 (simulated)"
    assert a.device == "cpu" and a.vram_total is None
    assert "simulated" in a.device_name


def test_forced_tier_on_a_gpu_that_is_too_small_is_simulated(cfg):
    a = assign_tier(inventory(6), cfg, forced="VRAM12")
    assert a.simulated is True and a.device == "cpu"


def test_injected_gpu_is_always_simulated(cfg):
    a = assign_tier(inventory(12, source="injected"), cfg)
    assert a.tier == "VRAM12" and a.simulated is True and a.device == "cpu"
    assert "(simulated)" in a.device_name


def test_forcing_an_unknown_tier_names_the_known_ones(cfg):
    with pytest.raises(ValueError, match="VRAM8.*VRAM12, VRAM6, CPU"):
        assign_tier(inventory(), cfg, forced="VRAM8")


def test_detect_here_says_why_there_is_no_gpu(monkeypatch):
    monkeypatch.delenv("AICLUSTER_FAKE_GPUS", raising=False)
    inv = detect()
    assert inv.source == "detected"
    assert inv.ram_bytes > 0 and inv.cpu_count >= 1
    if not inv.gpus:  # this machine: a CPU build of torch
        assert inv.gpu_state in (GPUState.CPU_BUILD, GPUState.NO_DEVICE, GPUState.NO_TORCH, GPUState.ERROR)
        assert inv.gpu_detail


def test_detect_reads_injected_gpus(monkeypatch):
    monkeypatch.setenv("AICLUSTER_FAKE_GPUS", "RTX 3060:12GiB,GTX 1660:6GiB")
    inv = detect()
    assert inv.source == "injected" and inv.gpu_state == GPUState.INJECTED
    assert [(g.name, g.total_bytes) for g in inv.gpus] == [("RTX 3060", 12 * GiB), ("GTX 1660", 6 * GiB)]
    monkeypatch.setenv("AICLUSTER_FAKE_GPUS", "12GB")
    with pytest.raises(ValueError, match="NAME:SIZE"):
        detect()


def test_forced_tier_takes_the_smallest_gpu_that_meets_it(cfg):
    inv = inventory(12, 6)  # a PC with an RTX 3060 (cuda:0) and a GTX 1660 (cuda:1)
    assert assign_tier(inv, cfg, forced="VRAM6").device == "cuda:1"
    assert assign_tier(inv, cfg, forced="VRAM12").device == "cuda:0"
    assert assign_tier(inv, cfg).device == "cuda:0"  # auto: the best GPU
