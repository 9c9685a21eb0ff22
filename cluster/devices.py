"""What hardware a worker has: CUDA GPUs (name, VRAM total/free), RAM and CPU cores.

This inventory is the one seam that tests replace: ``detect()`` honours the
``AICLUSTER_FAKE_GPUS`` environment variable (``"RTX 3060:12GB,GTX 1660:6GB"``), and an
inventory made that way says ``source="injected"`` so every display calls it simulated.
Optional hardware has an explicit state, as in ``distributed.diagnostics.nvml``: when GPU
detection is off, ``gpu_state`` says why instead of reporting a fake number.
"""
from __future__ import annotations

import enum
import os
import socket
from dataclasses import asdict, dataclass, field

import psutil

__all__ = ["GPU", "GPUState", "Inventory", "detect", "FAKE_ENV"]

FAKE_ENV = "AICLUSTER_FAKE_GPUS"


class GPUState(str, enum.Enum):
    AVAILABLE = "available"
    NO_TORCH = "torch is not installed"
    CPU_BUILD = "torch is a CPU-only build (no CUDA)"
    NO_DEVICE = "no CUDA device visible (no driver, or CUDA_VISIBLE_DEVICES is empty)"
    ERROR = "CUDA initialisation failed"
    INJECTED = "injected for a test or simulation"


@dataclass(frozen=True)
class GPU:
    index: int
    name: str
    total_bytes: int
    free_bytes: int | None = None


@dataclass(frozen=True)
class Inventory:
    gpus: tuple[GPU, ...]
    gpu_state: GPUState
    gpu_detail: str
    ram_bytes: int
    cpu_count: int
    hostname: str
    source: str = "detected"  # "detected" or "injected"
    extra: dict = field(default_factory=dict)

    @property
    def best_gpu(self) -> GPU | None:
        return max(self.gpus, key=lambda g: g.total_bytes, default=None)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["gpu_state"] = self.gpu_state.value
        return d


def _parse_fake(spec: str) -> tuple[GPU, ...]:
    from dask.utils import parse_bytes

    gpus = []
    for i, item in enumerate(p for p in spec.split(",") if p.strip()):
        name, sep, size = item.rpartition(":")
        if not sep or not name.strip():
            raise ValueError(f"{FAKE_ENV}: {item!r} is not NAME:SIZE (e.g. 'RTX 3060:12GB')")
        total = int(parse_bytes(size.strip()))
        gpus.append(GPU(index=i, name=name.strip(), total_bytes=total, free_bytes=total))
    return tuple(gpus)


def _cuda_gpus() -> tuple[tuple[GPU, ...], GPUState, str]:
    try:
        import torch
    except ImportError:
        return (), GPUState.NO_TORCH, "pip install torch (a CUDA build) to use GPUs"
    if torch.version.cuda is None:
        return (), GPUState.CPU_BUILD, f"torch {torch.__version__} was built without CUDA"
    try:
        n = torch.cuda.device_count()
    except Exception as e:  # driver problems surface as assorted RuntimeErrors
        return (), GPUState.ERROR, f"{type(e).__name__}: {e}"
    if n == 0:
        return (), GPUState.NO_DEVICE, f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees 0 devices"
    gpus = []
    for i in range(n):
        # device properties only: torch.cuda.mem_get_info would create a CUDA context (a few
        # hundred MB) on every GPU of the PC in every worker process; free memory comes from
        # the ModelHost of the worker that uses the GPU
        props = torch.cuda.get_device_properties(i)
        gpus.append(GPU(index=i, name=props.name, total_bytes=int(props.total_memory), free_bytes=None))
    return tuple(gpus), GPUState.AVAILABLE, f"CUDA {torch.version.cuda}"


def detect() -> Inventory:
    """Detect this machine's GPUs, RAM and CPU cores (or read ``$AICLUSTER_FAKE_GPUS``)."""
    fake = os.environ.get(FAKE_ENV)
    if fake is not None:
        gpus, state, detail, source = _parse_fake(fake), GPUState.INJECTED, f"{FAKE_ENV}={fake!r}", "injected"
    else:
        gpus, state, detail = _cuda_gpus()
        source = "detected"
    return Inventory(
        gpus=gpus,
        gpu_state=state,
        gpu_detail=detail,
        ram_bytes=int(psutil.virtual_memory().total),
        cpu_count=os.cpu_count() or 1,
        hostname=socket.gethostname(),
        source=source,
    )
