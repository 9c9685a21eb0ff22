"""The llama.cpp library in this process: its log routed to Python's ``logging``, and a
model's vocabulary loaded alone (to count and check tokens without the model). Both the
worker (``llamacpp.py``, ``engine_proc.py``) and the engine's child use them."""
from __future__ import annotations

import logging
from pathlib import Path

__all__ = ["route_logs", "load_vocab"]


_log_callback = None


def route_logs() -> None:
    """llama.cpp's own log goes to the ``llama.cpp`` Python logger. llama-cpp-python's
    callback prints to stderr with a level table older than ggml's (it takes WARN for ERROR),
    so every model load printed "using full-size SWA cache" into the user's terminal.
    llama.cpp warns about its own choices of cache and context sizes, not about the user's
    input, so its warnings are logged at INFO; its errors at ERROR."""
    global _log_callback
    if _log_callback is not None:
        return
    import ctypes

    import llama_cpp

    log = logging.getLogger("llama.cpp")
    levels = {4: logging.ERROR, 3: logging.INFO, 2: logging.DEBUG, 1: logging.DEBUG}
    last = [logging.DEBUG]

    @llama_cpp.llama_log_callback
    def callback(level, text, user_data):
        lvl = last[0] if level == 5 else levels.get(level, logging.DEBUG)  # 5: continues the last line
        last[0] = lvl
        if log.isEnabledFor(lvl):
            msg = text.decode("utf-8", errors="replace").rstrip()
            if msg:
                log.log(lvl, msg)

    _log_callback = callback  # ctypes keeps only a pointer: the callback must stay alive
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


_vocabs: dict = {}


def load_vocab(path: Path):
    """The model's vocabulary alone (``vocab_only``: no weights, no context; about 0.5 s),
    kept for the life of the process. Tokenizing with it gives the ids the full model gives."""
    key = (str(path), path.stat().st_mtime_ns)
    v = _vocabs.get(key)
    if v is None:
        import llama_cpp

        from ..compat import llama_model_class

        LowLevelModel = llama_model_class()

        route_logs()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        v = _vocabs[key] = LowLevelModel(path_model=str(path), params=params, verbose=True)  # see load()
    return v
