"""The pipeline stage a worker runs (``run_stage``), and the spec language both sides read:
``$name`` / ``$name.key`` references, ``{name}`` templates, ``"package.module:function"``
kinds. Compiling and submitting a pipeline is the client's side: ``cluster/pipeline.py``.
"""
from __future__ import annotations

import importlib
import string
import time
from typing import Callable

from .backends import InputError
from .embeddings import embed_task
from .host import host_and_worker, where
from .inputs import check_messages
from .llm import generate_task

__all__ = ["run_stage", "resolve", "as_text", "ref", "pick", "import_callable", "GENERATE_DEFAULTS",
           "EMBED_DEFAULTS"]

GENERATE_DEFAULTS = {"max_tokens": 128, "temperature": 0.0, "top_p": 1.0, "stop": [], "seed": None}
EMBED_DEFAULTS = {"batch_size": 64, "normalize": False, "truncate": False}


# -- references and templates --------------------------------------------------------------
def ref(value) -> tuple[str, str | None] | None:
    """``"$name"`` / ``"$name.key"`` -> (name, key); anything else -> None."""
    if isinstance(value, str) and value.startswith("$") and len(value) > 1:
        name, _, key = value[1:].partition(".")
        return name, key or None
    return None


def as_text(value) -> str:
    """A stage output as prompt text: a generation's text, list items one per line."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "text" in value:
        return str(value["text"])
    if isinstance(value, (list, tuple)):
        return "\n".join(as_text(v) for v in value)
    return str(value)


def pick(value, key):
    if key is None:
        return value
    if isinstance(value, dict):
        return value[key]
    if isinstance(value, (list, tuple)) and key.isdigit():
        return value[int(key)]
    return getattr(value, key)


def resolve(value, env: dict):
    """Replace references in ``value`` by their values from ``env`` (runs on the worker)."""
    r = ref(value)
    if r:
        return pick(env[r[0]], r[1])
    if isinstance(value, str):
        out = []
        for literal, fieldname, _, _ in string.Formatter().parse(value):
            out.append(literal)
            if fieldname is not None:
                name, _, key = fieldname.partition(".")
                out.append(as_text(pick(env[name], key or None)))
        return "".join(out)
    if isinstance(value, dict):
        return {k: resolve(v, env) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [resolve(v, env) for v in value]
    return value


def import_callable(path: str) -> Callable:
    module, _, attr = path.partition(":")
    fn = getattr(importlib.import_module(module), attr)
    if not callable(fn):
        raise TypeError(f"{path} is not callable")
    return fn


# -- running on a worker --------------------------------------------------------------------
def run_stage(pipeline: str, stage: str, kind: str, st: dict, fn, params: dict, upstream: dict,
              model: str | None = None, model_spec=None, task_priority: int = 0) -> dict:
    """Run one stage on this worker; ``upstream`` maps stage names to their results."""
    from distributed import get_worker

    start = time.time()
    env = {**params, **{k: v["output"] for k, v in upstream.items()}}
    worker = get_worker()
    info: dict = {}
    if kind == "generate":
        prompt = resolve(st["prompt"], env)
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"stage {stage!r}: the prompt is empty after filling in its references")
        opts = {**GENERATE_DEFAULTS, **(st.get("options") or {})}
        out = generate_task(prompt, model, model_spec, opts, task_priority=task_priority)
        out["prompt"] = prompt
        output = out
        info = {k: out[k] for k in ("tier", "simulated")}
    elif kind == "chat":
        msgs = resolve(st["messages"], env)
        opts = {**GENERATE_DEFAULTS, **(st.get("options") or {})}
        out = generate_task(None, model, model_spec, opts, task_priority=task_priority, messages=check_messages(msgs))
        out["messages"] = msgs
        output = out
        info = {k: out[k] for k in ("tier", "simulated")}
    elif kind == "embed":
        texts = resolve(st["texts"], env)
        single = isinstance(texts, str)
        items = [texts] if single else list(texts)
        if not items:
            raise InputError(f"stage {stage!r}: no texts to embed")
        for i, t in enumerate(items):
            if not isinstance(t, str) or not t.strip():
                raise InputError(f"stage {stage!r}: text {i} is {'empty' if isinstance(t, str) else type(t).__name__}")
        opts = {**EMBED_DEFAULTS, **(st.get("options") or {})}
        out = embed_task(items, model, model_spec, opts)
        output = out["embeddings"][0] if single else out["embeddings"]
        info = {k: out[k] for k in ("tier", "simulated")}
    else:
        func = import_callable(fn) if isinstance(fn, str) else fn
        args = resolve(st.get("args", {}), env)
        output = func(*args) if isinstance(args, list) else func(**args)
        try:
            host, _ = host_and_worker()
            info = {k: v for k, v in where(host, worker).items() if k in ("tier", "simulated")}
        except RuntimeError:
            info = {"tier": None, "simulated": False}
    return {"stage": stage, "output": output, "worker": str(worker.name), "address": worker.address,
            "start": start, "end": time.time(), **info}
