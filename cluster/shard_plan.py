"""The split-model planner, pure: a GGUF model's layout and the workers' budgets in, a
``ShardPlan`` out (no Dask, no sockets; ``cluster/shards.py`` asks the workers and calls it).

``read_layout`` parses the GGUF header itself because ``gguf.GGUFReader`` maps every
tokenizer string into numpy first (30 s for Gemma 3's 262k-token vocabulary on this machine).
The plan fills the best tiers first, the fewest workers that hold the model.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from dask.utils import format_bytes

from workloads.shard_protocol import ShardPart, ShardPlan

__all__ = ["GGUFLayout", "read_layout", "ShardPlanError", "candidates_of", "plan", "COMPUTE_SLACK"]

#: slack per shard for llama.cpp's compute buffers, on top of the weights and the KV cache
COMPUTE_SLACK = 64 * 2**20


class ShardPlanError(RuntimeError):
    """The cluster cannot hold the model split over the workers asked for."""


# -- the model's layout, from its GGUF header ---------------------------------------------
@dataclass
class GGUFLayout:
    """What the planner needs of a GGUF model: bytes per repeating layer, the input and
    output layers, and the KV cache per layer at the context the model runs with."""

    path: str
    arch: str
    n_layer: int
    layer_bytes: list[int]
    input_bytes: int  # token embeddings: always on the head (llama.cpp keeps the input layer on the CPU)
    output_bytes: int  # output norm + output matrix (a copy of the embeddings when they are tied)
    kv_bytes_per_layer: int
    n_ctx: int

    @property
    def total(self) -> int:
        return sum(self.layer_bytes) + self.output_bytes + self.n_layer * self.kv_bytes_per_layer


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _read_gguf_header(path: str) -> tuple[dict, list[tuple[str, list[int], int]]]:
    """``(metadata, [(tensor name, dims, ggml type)])`` of a GGUF file; arrays of the
    metadata are skipped (only their length is kept)."""
    with open(path, "rb") as f:
        data = f.read(64 * 2**20)  # the header of any model sits in the first few MB
    pos = 0

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return v[0]

    def string():
        nonlocal pos
        n = take("<Q")
        s = data[pos:pos + n].decode("utf-8", errors="replace")
        pos += n
        return s

    def value(t):
        nonlocal pos
        if t in _GGUF_SCALARS:
            return take(_GGUF_SCALARS[t])
        if t == 8:
            return string()
        if t == 9:
            et, n = take("<I"), take("<Q")
            if et in _GGUF_SCALARS:
                pos += n * struct.calcsize(_GGUF_SCALARS[et])
            else:
                for _ in range(n):
                    value(et)
            return n
        raise ValueError(f"{path}: unknown GGUF value type {t}")

    if data[:4] != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    pos = 4
    version, n_tensors, n_kv = take("<I"), take("<Q"), take("<Q")
    if version < 2:
        raise ValueError(f"{path}: GGUF version {version} is too old")
    meta = {}
    for _ in range(n_kv):
        key = string()
        meta[key] = value(take("<I"))
    tensors = []
    for _ in range(n_tensors):
        name = string()
        dims = [take("<Q") for _ in range(take("<I"))]
        ggml_type = take("<I")
        take("<Q")  # offset
        tensors.append((name, dims, ggml_type))
    return meta, tensors


_layouts: dict = {}


def read_layout(path: str | os.PathLike, n_ctx: int) -> GGUFLayout:
    """The model's layout (cached per file and context); ``n_ctx`` is the whole KV cache in
    tokens (the batch engine's context is ``options.n_ctx`` x ``options.parallel``)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    path = str(path)
    key = (path, os.stat(path).st_mtime_ns, n_ctx)
    if key in _layouts:
        return _layouts[key]
    meta, tensors = _read_gguf_header(path)
    arch = meta.get("general.architecture", "llama")
    n_layer = int(meta[f"{arch}.block_count"])
    layer = [0] * n_layer
    other: dict[str, int] = {}
    for name, dims, t in tensors:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(t)]
        n = 1
        for d in dims:
            n *= d
        nbytes = n // block * size
        if name.startswith("blk."):
            layer[int(name.split(".")[1])] += nbytes
        else:
            other[name] = other.get(name, 0) + nbytes
    embd = other.get("token_embd.weight", 0)
    output = other.get("output.weight", embd) + other.get("output_norm.weight", 0)
    n_head = int(meta.get(f"{arch}.attention.head_count", 1))
    n_head_kv = int(meta.get(f"{arch}.attention.head_count_kv", n_head))
    n_embd = int(meta.get(f"{arch}.embedding_length", 0))
    k_len = int(meta.get(f"{arch}.attention.key_length", n_embd // max(n_head, 1)))
    v_len = int(meta.get(f"{arch}.attention.value_length", k_len))
    kv = n_ctx * n_head_kv * (k_len + v_len) * 2  # f16 K and V for every position
    out = _layouts[key] = GGUFLayout(path, arch, n_layer, layer, embd, output, kv, n_ctx)
    return out


def candidates_of(states: dict, tiers, model: str | None = None) -> list[dict]:
    """Workers that run a shard server now, from ``{address: host_state()}``: address,
    name, tier, tier rank (0: best), endpoint, free budget (counting as free what the
    worker holds for ``model``'s own earlier shard), simulated."""
    order = {t: i for i, t in enumerate(tiers)}
    out = []
    for addr, st in states.items():
        if not isinstance(st, dict) or not (st.get("shard_server") or {}).get("alive"):
            continue
        budget = st["budget"] or 0
        free = budget - (st["used"] or 0) + int((st.get("shards") or {}).get(model, 0))
        out.append({"address": addr, "name": st["name"], "tier": st["tier"] or "?", "rank": order.get(st["tier"], len(order)),
                    "endpoint": st["shard_server"]["endpoint"], "free": max(free, 0), "budget": budget,
                    "simulated": bool(st["simulated"]), "connected": bool(st["shard_server"].get("connected")),
                    "holds": model in (st.get("shards") or {})})
    out.sort(key=lambda c: (c["rank"], c["name"]))
    return out


def plan(model: str, layout: GGUFLayout, candidates: list[dict], workers: list[str] | None = None) -> ShardPlan:
    """Divide ``layout``'s layers over ``candidates`` (see ``candidates_of``).

    ``workers`` (names or addresses): use exactly these, in this order, layers in
    proportion to their free budget. Otherwise: best tiers first (then most free), the
    fewest workers whose free budgets hold the model. The head is the first worker.
    Raises ``ShardPlanError`` naming the shortfall.
    """
    if not candidates:
        raise ShardPlanError(
            f"no worker runs a shard server, so model {model!r} cannot be split; start workers with "
            f"--shard-server (or worker.shard_server: true / local.workers[].shard_server: true in config.yaml)")
    if workers:
        by = {c["address"]: c for c in candidates} | {c["name"]: c for c in candidates}
        missing = [w for w in workers if w not in by]
        if missing:
            raise ShardPlanError(
                f"model {model!r}: {', '.join(map(repr, missing))} is not a worker with a shard server; workers "
                f"with one: " + ", ".join(c["name"] for c in candidates))
        chosen = [by[w] for w in workers]
        if len({c["address"] for c in chosen}) != len(chosen):
            raise ShardPlanError(f"model {model!r}: a worker is named twice in {workers}")
        busy = [c["name"] for c in chosen if _busy(c)]
        if busy:
            raise ShardPlanError(f"model {model!r}: the shard server(s) of {', '.join(busy)} serve another split "
                                 f"model's head (one head at a time); unload that model first (ai.unload)")
        parts = _divide(model, layout, chosen)
        if parts is None:
            raise ShardPlanError(_shortfall(model, layout, chosen, "the workers named"))
        return _finish(model, layout, chosen, parts)
    smallest = min(_need(layout, i, i) for i in range(layout.n_layer + 1))
    ordered = sorted((c for c in candidates if c["free"] >= smallest and not _busy(c)),
                     key=lambda c: (c["rank"], -c["free"]))
    for k in range(1, len(ordered) + 1):
        parts = _divide(model, layout, ordered[:k])
        if parts is not None:
            return _finish(model, layout, ordered[:k], parts)
    raise ShardPlanError(_shortfall(model, layout, sorted(candidates, key=lambda c: (c["rank"], -c["free"])),
                                    "all shard servers together"))


def _busy(c: dict) -> bool:
    """A server that a head of another model holds (a server serves one head at a time)."""
    return bool(c.get("connected")) and not c.get("holds")


def _need(layout: GGUFLayout, first: int, last: int) -> int:
    """Bytes of layers first..last (index n_layer: the output layer) with their KV cache."""
    n = 0
    for i in range(first, last + 1):
        n += layout.output_bytes if i == layout.n_layer else layout.layer_bytes[i] + layout.kv_bytes_per_layer
    return n + COMPUTE_SLACK


def _divide(model: str, layout: GGUFLayout, chosen: list[dict]) -> list[tuple[int, int, int]] | None:
    """``[(first, last, bytes)]`` per chosen worker, or None when they cannot hold it.

    Layers go in proportion to free budget, then move from any worker over its budget to
    the next; every chosen worker gets at least one layer.
    """
    n = layout.n_layer + 1  # the output layer is placed like a layer (on the last device)
    if len(chosen) > n:
        return None
    free = [max(c["free"], 0) for c in chosen]
    free[0] = max(free[0] - layout.input_bytes, 0)  # the head also holds the input layer
    total_free = sum(free) or 1
    counts = [max(1, round(n * f / total_free)) for f in free]
    while sum(counts) > n:
        counts[counts.index(max(counts))] -= 1
    while sum(counts) < n:
        counts[free.index(max(free))] += 1
    for _ in range(n * len(chosen)):  # move layers off over-full workers
        spans = _spans(counts)
        over = [i for i, (a, b) in enumerate(spans) if _need(layout, a, b) > free[i]]
        if not over:
            return [(a, b, _need(layout, a, b)) for a, b in spans]
        i = over[0]
        if counts[i] <= 1:
            return None
        room = [j for j in range(len(counts)) if j != i and _need(layout, *_grow(spans, j, i)) <= free[j]]
        if not room:
            return None
        counts[i] -= 1
        counts[min(room, key=lambda j: abs(j - i))] += 1
    return None


def _spans(counts: list[int]) -> list[tuple[int, int]]:
    out, start = [], 0
    for c in counts:
        out.append((start, start + c - 1))
        start += c
    return out


def _grow(spans, j: int, i: int) -> tuple[int, int]:
    """Span of worker j after taking one layer from worker i (an approximation for the check:
    j's span grows by one layer at its end nearest to i)."""
    a, b = spans[j]
    return (a, b + 1) if j < i else (a - 1, b)


def _shortfall(model: str, layout: GGUFLayout, chosen: list[dict], who: str) -> str:
    need = _need(layout, 0, layout.n_layer) + (len(chosen) - 1) * COMPUTE_SLACK + layout.input_bytes
    have = sum(max(c["free"], 0) for c in chosen)
    each = ", ".join(f"{c['name']} {format_bytes(c['free'])}" for c in chosen)
    short = max(need - have, 0)
    return (f"model {model!r} needs about {format_bytes(need)} (weights + a KV cache of {layout.n_ctx} tokens) but "
            f"{who} have {format_bytes(have)} free ({each}); short by {format_bytes(short)}"
            + (" (no worker can take the largest layer)" if short == 0 else "")
            + ". Add a worker with a shard server, unload other models, or lower the model's options.n_ctx or "
              "options.parallel.")


def _finish(model: str, layout: GGUFLayout, chosen: list[dict], parts) -> ShardPlan:
    head = chosen[0]
    return ShardPlan(
        model=model, head=head["address"], head_name=head["name"], head_bytes=layout.input_bytes,
        parts=[ShardPart(c["address"], c["name"], c["tier"], c["endpoint"], a, b, nb, c["free"])
               for c, (a, b, nb) in zip(chosen, parts)],
        n_layer=layout.n_layer, n_ctx=layout.n_ctx, total=_need(layout, 0, layout.n_layer),
        simulated=any(c["simulated"] for c in chosen))
