"""A tiny model backend for ModelHost tests: a numpy buffer of a set size.

Named in config as ``backend: "tinymodels:load"`` (the dotted-path backend hook users have
for their own models). Real memory is allocated, so the RSS-delta measurement is real too.
"""
from __future__ import annotations

import threading
import time

import numpy as np

LOADS: dict[str, int] = {}
_lock = threading.Lock()


class Tiny:
    kind = "embed"

    def __init__(self, name: str, nbytes: int):
        self.name = name
        self.buffer = np.ones(nbytes, dtype=np.uint8)  # touched, so it is resident
        self.nbytes = nbytes
        self.closed = False

    def close(self):
        self.closed = True
        self.buffer = None


def load(spec, device="cpu", threads=1, name="model"):
    opts = spec.options
    time.sleep(float(opts.get("delay", 0)))
    with _lock:
        LOADS[name] = LOADS.get(name, 0) + 1
    return Tiny(name, int(opts["mb"] * 1_000_000))
