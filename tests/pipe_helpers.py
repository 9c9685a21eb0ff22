"""Deterministic stage functions for pipeline tests (imported by name on in-process workers)."""
from __future__ import annotations

import threading
import time

_lock = threading.Lock()
RUNNING = {"now": 0, "max": 0}


def sleepy(seconds: float, tag: str) -> str:
    time.sleep(seconds)
    return tag


def join(*parts) -> str:
    return "+".join(parts)


def constant(x, value):
    return value


def fail(x=None):
    raise ValueError("this stage always fails")


def counted(x):
    with _lock:
        RUNNING["now"] += 1
        RUNNING["max"] = max(RUNNING["max"], RUNNING["now"])
    time.sleep(0.3)
    with _lock:
        RUNNING["now"] -= 1
    return x * 2


def reset_counter(dask_worker=None):
    RUNNING.update(now=0, max=0)


def read_counter(dask_worker=None):
    return dict(RUNNING)
