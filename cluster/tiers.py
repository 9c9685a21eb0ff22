"""Hardware -> tier label (VRAM12 / VRAM6 / CPU) -> Dask worker resources."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .config import Config
from .devices import Inventory

__all__ = ["TierAssignment", "assign_tier", "tier_for_vram", "tier_of_resources"]


@dataclass(frozen=True)
class TierAssignment:
    """The tier a worker carries, and whether the hardware behind it is real."""

    tier: str
    resources: dict[str, float]
    simulated: bool
    device: str  # "cuda:0" or "cpu"
    device_name: str  # "NVIDIA GeForce RTX 3060" or "cpu (8 cores)"
    vram_total: int | None  # bytes of the GPU this worker uses; None without a real GPU
    reason: str

    @property
    def label(self) -> str:
        return f"{self.tier} (simulated)" if self.simulated else self.tier

    def to_dict(self) -> dict:
        return asdict(self)


def tier_for_vram(vram_bytes: int, config: Config) -> str:
    """The first (best) GPU tier whose ``min_vram`` is met, else the CPU tier."""
    for name, t in config.tiers.items():
        if t.is_gpu and vram_bytes >= t.min_vram:
            return name
    return config.cpu_tier


def tier_of_resources(resources: dict, config_tiers) -> str | None:
    """The tier label among a worker's resources (None for a worker without one)."""
    return next((r for r in resources if r in config_tiers), None)


def assign_tier(inventory: Inventory, config: Config, forced: str = "auto", nthreads: int = 1) -> TierAssignment:
    """Decide a worker's tier from its inventory and config.

    Parameters
    ----------
    inventory
        What ``devices.detect()`` found (or a test injected).
    forced
        ``"auto"`` to derive the tier from the largest GPU, or a tier name. A GPU tier forced
        on a machine without a GPU that large is *simulated*: work runs on the CPU.
    nthreads
        The worker's thread count; a tier with ``slots: 0`` gets one slot per thread.
    """
    best = inventory.best_gpu
    injected = inventory.source != "detected"
    detected = tier_for_vram(best.total_bytes, config) if best else config.cpu_tier
    gpu = best
    if forced not in (None, "", "auto") and forced in config.tiers and config.tiers[forced].is_gpu:
        # a forced tier takes the smallest GPU that meets it, so that a PC with a 3060 and a
        # 1660 can run a VRAM12 worker on the one and a VRAM6 worker on the other
        fits = [g for g in inventory.gpus if g.total_bytes >= config.tiers[forced].min_vram]
        gpu = min(fits, key=lambda g: g.total_bytes) if fits else best
    if forced in (None, "", "auto"):
        tier = detected
        why = f"detected: {gpu.name} with {gpu.total_bytes / 2**30:.1f} GiB" if gpu else f"no usable GPU ({inventory.gpu_state.value})"
    elif forced not in config.tiers:
        raise ValueError(f"tier {forced!r} is not a tier; known: {', '.join(config.tiers)}")
    else:
        tier = forced
        why = f"forced to {forced} (hardware says {detected})"
    spec = config.tiers[tier]
    slots = spec.slots or nthreads
    if not spec.is_gpu:
        return TierAssignment(
            tier=tier, resources={tier: slots}, simulated=False, device="cpu",
            device_name=f"cpu ({inventory.cpu_count} cores)", vram_total=None, reason=why,
        )
    has_gpu = gpu is not None and gpu.total_bytes >= spec.min_vram
    if has_gpu and not injected:
        return TierAssignment(
            tier=tier, resources={tier: slots}, simulated=False, device=f"cuda:{gpu.index}",
            device_name=gpu.name, vram_total=gpu.total_bytes, reason=why,
        )
    if has_gpu:  # an injected inventory: the tier logic is real, the GPU is not
        why += f"; GPU injected by {inventory.gpu_detail}, work runs on the CPU"
        name = f"{gpu.name} (simulated)"
    else:
        why += f"; no GPU with {spec.min_vram / 2**30:.0f} GiB here ({inventory.gpu_state.value}), work runs on the CPU"
        name = "cpu (simulated GPU)"
    return TierAssignment(
        tier=tier, resources={tier: slots}, simulated=True, device="cpu",
        device_name=name, vram_total=None, reason=why,
    )
