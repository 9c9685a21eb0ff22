"""Embedding tasks: a batch of texts on one worker, and the concatenation in input order."""
from __future__ import annotations

import time

import numpy as np

from .host import host_and_worker, where
from .backends import WrongModelKind, precheck


def embed_task(texts: list[str], model: str, spec, params: dict, offset: int = 0) -> dict:
    host, worker = host_and_worker()
    t0 = time.perf_counter()
    # a text longer than the model reads is refused before this task waits for the model
    precheck(spec, texts, model, truncate=params.get("truncate", False), first_index=offset)
    params = dict(params)
    count = params.pop("count_tokens", False)
    with host.acquire(model, spec) as m:
        if getattr(m, "kind", "embed") != "embed":
            raise WrongModelKind(f"model {model!r} generates text; it cannot embed")
        vectors = m.encode(texts, offset=offset, **params)
        # the tokens the model read (a text cut by truncate counts what was read)
        tokens = sum(min(n, m.max_seq_length) for n in m.count_tokens(texts)) if count else None
    out = {"offset": offset, "embeddings": vectors, "n": len(texts), "seconds": time.perf_counter() - t0,
           **where(host, worker)}
    if tokens is not None:
        out["tokens"] = tokens
    return out


def concat_task(parts: list[dict], single: bool = False, details: bool = False):
    parts = sorted(parts, key=lambda p: p["offset"])
    arr = np.concatenate([p["embeddings"] for p in parts], axis=0)
    if single:
        arr = arr[0]
    if not details:
        return arr
    batches = [{k: v for k, v in p.items() if k != "embeddings"} for p in parts]
    return {"embeddings": arr, "batches": batches}
