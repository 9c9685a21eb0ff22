"""The split-model planner, pure: a GGUF model's layout and the workers' budgets in, a
``ShardPlan`` out (no Dask, no sockets; ``cluster/shards.py`` asks the workers and calls it).

``read_layout`` reads the GGUF header with ``workloads/backends/gguf_file.py`` (by hand:
``gguf.GGUFReader`` takes 30 s over Gemma 3's 262k-token vocabulary on this machine).
The plan fills the best tiers first, the fewest workers that hold the model; the output
layer sits on the head's own server unless ``shard.output: last``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from itertools import combinations

from dask.utils import format_bytes

from workloads.backends.gguf_file import read_header, tensor_nbytes
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

    @cached_property
    def cumulative(self) -> list[int]:
        """Bytes of layers 0..i-1 with their KV cache (index n_layer + 1: with the output layer)."""
        out = [0]
        for b in self.layer_bytes:
            out.append(out[-1] + b + self.kv_bytes_per_layer)
        out.append(out[-1] + self.output_bytes)
        return out


_layouts: dict = {}


def read_layout(path: str | os.PathLike, n_ctx: int) -> GGUFLayout:
    """The model's layout (cached per file and context); ``n_ctx`` is the whole KV cache in
    tokens (the batch engine's context is ``options.n_ctx`` x ``options.parallel``)."""
    path = str(path)
    key = (path, os.stat(path).st_mtime_ns, n_ctx)
    if key in _layouts:
        return _layouts[key]
    header = read_header(path)
    meta = header.meta
    arch = meta.get("general.architecture", "llama")
    n_layer = int(meta[f"{arch}.block_count"])
    layer = [0] * n_layer
    other: dict[str, int] = {}
    for t in header.tensors:
        nbytes = tensor_nbytes(t.dims, t.ggml_type)
        if t.name.startswith("blk."):
            layer[int(t.name.split(".")[1])] += nbytes
        else:
            other[t.name] = other.get(t.name, 0) + nbytes
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
        if not isinstance(st, dict) or not st.get("shard_server"):
            continue
        srv = _server_for(st, model)
        if not srv.get("alive"):
            continue
        budget = st["budget"] or 0
        free = budget - (st["used"] or 0) + int((st.get("shards") or {}).get(model, 0))
        out.append({"address": addr, "name": st["name"], "tier": st["tier"] or "?", "rank": order.get(st["tier"], len(order)),
                    "endpoint": srv["endpoint"], "free": max(free, 0), "budget": budget,
                    "threads": srv.get("threads", 1), "tls": bool(srv.get("tls")),
                    "device_key": srv.get("device_key", st["name"]),
                    "simulated": bool(st["simulated"]), "connected": bool(srv.get("connected")),
                    "taken": srv.get("model") not in (None, model),
                    "holds": model in (st.get("shards") or {})})
    out.sort(key=lambda c: (c["rank"], c["name"]))
    return out


def _server_for(st: dict, model: str | None) -> dict:
    """Of a worker's shard servers (``host_state``), the one for ``model``: the one its
    layers are on, else a free one (no head connected, no split model's layers), else the
    first (busy: ``_busy`` leaves the worker out)."""
    servers = st.get("shard_servers") or [st["shard_server"]]
    alive = [s for s in servers if s.get("alive")]
    return (next((s for s in alive if model is not None and s.get("model") == model), None)
            or next((s for s in alive if not s.get("connected") and not s.get("model")), None)
            or (alive or servers)[0])


def plan(model: str, layout: GGUFLayout, candidates: list[dict], workers: list[str] | None = None,
         output: str = "head", by: str = "speed") -> ShardPlan:
    """Divide ``layout``'s layers over ``candidates`` (see ``candidates_of``).

    ``workers`` (names or addresses): use exactly these, in this order, layers in
    proportion to their free budget. Otherwise: best tiers first (then most free), the
    fewest workers whose free budgets hold the model. The head is the first worker.
    ``output="head"``: the head's own shard server takes the last layers and the output
    layer (the head's part comes last in the layer order), so the logits go from it to the
    head over the head PC's loopback and only hidden states cross the LAN; ``"last"``: the
    head's part comes first and the output layer sits on the last worker's server.
    ``by="speed"`` and every candidate with a measured ``speed`` (``layer_ms``, ``link_ms``,
    ``out_ms``; see ``workloads/backends/shard_speed.py``): the head, the workers and their
    layers that give the least time per token within every budget (``_by_speed``); else by
    memory as above. Raises ``ShardPlanError`` naming the shortfall.
    """
    if by not in ("speed", "memory"):
        raise ShardPlanError(f"shard.plan must be speed or memory, not {by!r}")
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
            raise ShardPlanError(f"model {model!r}: every shard server of {', '.join(busy)} serves another split "
                                 f"model (one head each); unload one of those (ai.unload), or give the workers "
                                 f"more servers (worker.shard_models)")
        if by == "speed" and all(c.get("speed") for c in chosen):
            best = _by_speed(layout, [chosen], output)
            if best is not None:
                return _finish(model, layout, best[1], best[2], best[3], output, speed=True)
        order = _order(chosen, output)
        parts = _divide(model, layout, order, order.index(chosen[0]))
        if parts is None:
            raise ShardPlanError(_shortfall(model, layout, chosen, "the workers named"))
        return _finish(model, layout, chosen[0], order, parts, output)
    smallest = min(_need(layout, i, i) for i in range(layout.n_layer + 1))
    ordered = sorted((c for c in candidates if c["free"] >= smallest and not _busy(c)),
                     key=lambda c: (c["rank"], -c["free"]))
    if by == "speed" and ordered and all(c.get("speed") for c in ordered):
        fast = sorted(ordered, key=lambda c: c["speed"]["layer_ms"])[:MAX_SEARCH]
        sets = [[h, *rest] for n in range(len(fast)) for rest in combinations(fast, n)
                for h in fast if h not in rest]
        best = _by_speed(layout, sets, output)
        if best is not None:
            out = _finish(model, layout, best[1], best[2], best[3], output, speed=True)
            out.notes += _left_out(layout, [c for c in ordered if c not in best[2]], best, output)
            return out
    for k in range(1, len(ordered) + 1):
        order = _order(ordered[:k], output)
        parts = _divide(model, layout, order, order.index(ordered[0]))
        if parts is not None:
            return _finish(model, layout, ordered[0], order, parts, output)
    raise ShardPlanError(_shortfall(model, layout, sorted(candidates, key=lambda c: (c["rank"], -c["free"])),
                                    "all shard servers together"))


#: the speed planner tries every head and subset of at most this many fastest servers
MAX_SEARCH = 6


def _by_speed(layout: GGUFLayout, sets: list[list[dict]], output: str):
    """The best of ``sets`` (each: the head first, then the others): ``(ms per token, head,
    layer order, parts)``, or None when none of them holds the model. Within a set, the
    layers go to the fastest servers first (each server at least one): decoding goes through
    the parts one after the other, so time per token is the sum of each part's layers times
    its ms per layer, plus the output layer on its holder, plus one link per part. Sets
    within 3% of the fastest: the fewest workers wins (fewer links to fail)."""
    found = []
    for chosen in sets:
        order = _order(chosen, output)
        parts = _fill_fastest(layout, order, order.index(chosen[0]))
        if parts is None:
            continue
        ms = sum(_part_ms(layout, c, a, b) for c, (a, b, _) in zip(order, parts))
        found.append((ms, chosen[0], order, parts))
    if not found:
        return None
    fastest = min(f[0] for f in found)
    return min((f for f in found if f[0] <= fastest * 1.03), key=lambda f: (len(f[2]), f[0]))


def _part_ms(layout: GGUFLayout, c: dict, first: int, last: int) -> float:
    """Expected ms per token of layers first..last on ``c`` (index n_layer: the output layer),
    with what each token through its server costs beyond them (``link_ms``: the round trips
    to it and the server's own latency in answering them). The head's own server is charged
    it too: the network part is loopback there, but a server that answers late (a PC held to
    a CPU quota waits for its next period) does so for its own head as well; measured from a
    PC's own server, ``link_ms`` is that latency alone."""
    sp = c["speed"]
    layers = min(last, layout.n_layer - 1) - first + 1
    return (max(layers, 0) * sp["layer_ms"] + (sp["out_ms"] if last >= layout.n_layer else 0.0)
            + sp["link_ms"])


def _fill_fastest(layout: GGUFLayout, order: list[dict], head: int) -> list[tuple[int, int, int]] | None:
    """``[(first, last, bytes)]`` per server of ``order`` (layer order): one layer each, then
    every other layer to the fastest server with room; None when they cannot hold it."""
    n = layout.n_layer + 1
    if len(order) > n:
        return None
    free = [max(c["free"], 0) for c in order]
    free[head] = max(free[head] - layout.input_bytes, 0)
    counts = [1] * len(order)
    by_speed = sorted(range(len(order)), key=lambda i: order[i]["speed"]["layer_ms"])
    for _ in range(n - len(order)):
        spans = _spans(counts)
        room = [i for i in by_speed if _need(layout, *_grow_at_end(spans, i)) <= free[i]]
        if not room:
            return None
        counts[room[0]] += 1
    # growing one span shifts the ones after it: check every span as it finally lies; a
    # layer moves off an over-full server to the fastest with room
    return _settle(layout, counts, free, lambda room, i: min(room, key=by_speed.index))


def _settle(layout: GGUFLayout, counts: list[int], free: list[int], choose) -> list[tuple[int, int, int]] | None:
    """``[(first, last, bytes)]`` of ``counts`` layers per worker (in layer order), once no
    worker is over its ``free`` bytes: a layer at a time moves off the first over-full worker
    to ``choose(room, i)``, one of the workers with room for it; None when none has room."""
    for _ in range(len(counts) * (sum(counts) + 1)):
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
        counts[choose(room, i)] += 1
    return None


def _grow_at_end(spans, i: int) -> tuple[int, int]:
    a, b = spans[i]
    return a, b + 1


def _left_out(layout: GGUFLayout, others: list[dict], best, output: str) -> list[str]:
    """Why each server not in the speed plan is left out."""
    ms, head, order, _ = best
    notes = []
    for c in others:
        sp = c["speed"]
        notes.append(f"{c['name']} left out: the others hold the model, and each layer there would take "
                     f"{sp['layer_ms']:.2f} ms per token (against {min(o['speed']['layer_ms'] for o in order):.2f} "
                     f"ms on {min(order, key=lambda o: o['speed']['layer_ms'])['name']}) plus "
                     f"{sp['link_ms']:.1f} ms for its link")
    return notes


def _order(chosen: list[dict], output: str) -> list[dict]:
    """The layer order of the chosen workers (head first in ``chosen``): with the output on
    the head, the head's part comes last, so the output layer (placed after the last layer,
    on the last device) is on its server."""
    if output not in ("head", "last"):
        raise ShardPlanError(f"shard.output must be head or last, not {output!r}")
    return chosen[1:] + chosen[:1] if output == "head" else list(chosen)


def _busy(c: dict) -> bool:
    """A worker whose chosen server (``_server_for``) a head of another model holds, or
    that another model's layers are reserved on (a server serves one head at a time)."""
    return bool(c.get("connected") or c.get("taken")) and not c.get("holds")


def _need(layout: GGUFLayout, first: int, last: int) -> int:
    """Bytes of layers first..last (index n_layer: the output layer) with their KV cache."""
    cum = layout.cumulative
    return cum[last + 1] - cum[first] + COMPUTE_SLACK


def _divide(model: str, layout: GGUFLayout, chosen: list[dict], head: int = 0) -> list[tuple[int, int, int]] | None:
    """``[(first, last, bytes)]`` per chosen worker (in layer order; ``chosen[head]`` is the
    head, which also holds the input layer), or None when they cannot hold it.

    Layers go in proportion to free budget, then move from any worker over its budget to
    the next; every chosen worker gets at least one layer.
    """
    n = layout.n_layer + 1  # the output layer is placed like a layer (on the last device)
    if len(chosen) > n:
        return None
    free = [max(c["free"], 0) for c in chosen]
    free[head] = max(free[head] - layout.input_bytes, 0)  # the head also holds the input layer
    total_free = sum(free) or 1
    counts = [max(1, round(n * f / total_free)) for f in free]
    while sum(counts) > n:
        counts[counts.index(max(counts))] -= 1
    while sum(counts) < n:
        counts[free.index(max(free))] += 1
    # move layers off over-full workers, each to the nearest with room
    return _settle(layout, counts, free, lambda room, i: min(room, key=lambda j: abs(j - i)))


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
            f"{who} have {format_bytes(have)} free ({each}); "
            + (f"short by {format_bytes(short)}" if short > 0 else
               "enough in all, but the layers cannot be divided among them (a layer is placed whole, and "
               "no worker has room for a share of whole layers)")
            + ". Add a worker with a shard server, unload other models, or lower the model's options.n_ctx or "
              "options.parallel.")


def _finish(model: str, layout: GGUFLayout, head: dict, chosen: list[dict], parts, output: str,
            speed: bool = False) -> ShardPlan:
    timed = all(c.get("speed") for c in chosen)
    return ShardPlan(
        model=model, head=head["address"], head_name=head["name"], head_bytes=layout.input_bytes,
        parts=[ShardPart(c["address"], c["name"], c["tier"], c["endpoint"], a, b, nb, c["free"],
                         round(_part_ms(layout, c, a, b), 2) if timed else None,
                         c["speed"]["layer_ms"] if timed else None)
               for c, (a, b, nb) in zip(chosen, parts)],
        n_layer=layout.n_layer, n_ctx=layout.n_ctx, total=_need(layout, 0, layout.n_layer),
        simulated=any(c["simulated"] for c in chosen), output=output, by="speed" if speed else "memory",
        tls=any(c.get("tls") for c in chosen))
