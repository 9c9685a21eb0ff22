"""A llamacpp backend that really crashes: its engine process dereferences a null pointer
(through ctypes, in libc's ``fputs``) when asked to generate, as ggml's AMX kernel did on
one Xeon. Used as ``backend: crashy:load`` in the crash tests (tests/ is on the workers'
path). ``options.crash_on``: the worker names where it crashes (``"*"``: everywhere);
``options.crash_at: load`` crashes while loading instead. Everything else is the real
llamacpp backend with the shipped Gemma file."""
from __future__ import annotations

import ctypes

from workloads.backends import llamacpp


def load(spec, device: str = "cpu", threads: int = 1, name: str = "model"):
    opts = dict(spec.options)
    extra = {"crash_on": list(opts.pop("crash_on", ["*"])), "crash_at": opts.pop("crash_at", "generate")}
    return llamacpp.load(spec.model_copy(update={"options": opts}), device, threads, name,
                         loader="crashy:load_here", extra=extra)


def load_here(cfg, on_progress=None):
    crash_on = cfg["crash_on"]
    here = "*" in crash_on or cfg.get("worker") in crash_on
    if here and cfg.get("crash_at") == "load":
        null_deref()
    m = llamacpp.load_here(cfg, on_progress)
    if here:
        real = m.submit_ids

        def submit_ids(ids, **kwargs):
            null_deref()
            return real(ids, **kwargs)

        m.submit_ids = submit_ids
    return m


def null_deref() -> None:
    libc = ctypes.CDLL("libc.so.6")
    libc.fputs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
    libc.fputs(b"x", None)
