"""One job on the whole cluster: a queue of chunks that every capable worker pulls from.

``ai.embed(texts, spread=True)``, ``ai.generate(prompts, spread=True)`` and the batch
commands' ``--spread`` split a large job over every worker that can run the model: the
workers of the model's tier and of its fallback tiers whose model budget fits the model.
Each worker is kept busy with a few chunks pinned to it (more for a worker whose last
benchmark of this model was faster); when one finishes, that worker gets the next chunk.
Faster workers thus do more of the job, corrected as chunks finish, and a worker that
slows down or leaves (its chunks are re-routed by the TierGuard) does less: a pull queue,
not a split fixed in advance. Results come back in input order.

Why on the client: Dask places a task on one tier's resource; a job across tiers with
different speeds needs a chunk queue that Dask does not have (work stealing moves queued
tasks only between workers with the same restrictions).
"""
from __future__ import annotations

import concurrent.futures
import math
import threading
import uuid
from dataclasses import dataclass, field
from typing import Callable

from distributed import as_completed

from workloads.embeddings import embed_task
from workloads.llm import generate_task

from . import routing
from .jobs import failure

__all__ = ["spread_embed", "spread_generate", "run_spread", "capable_workers", "Helper"]


@dataclass
class Helper:
    """A worker that takes part in a spread job."""

    address: str
    name: str
    tier: str
    speed: float | None = None   # its last benchmark of the model (units of the benchmark)
    depth: int = 2               # chunks kept in flight on it
    done: int = 0                # items it finished
    chunks: int = 0
    pending: set = field(default_factory=set)


def capable_workers(core, spec, model: str, tier: str | None = None, bench_job: str | None = None) -> list[Helper]:
    """The live workers of the model's tier and its fallback tiers whose model budget fits
    the model (its measured size where it is resident, else its configured footprint)."""
    chain = core.config.fallback_chain(tier or spec.tier)
    workers = core.workers()
    sizes = [((w.get("metrics") or {}).get("aicluster") or {}).get("models", {}).get(model, {}).get("bytes", 0)
             for w in workers.values()]
    need = max([spec.footprint, *sizes])
    out, too_small = [], []
    for addr, w in workers.items():
        if str(w.get("status", "running")).removeprefix("Status.") != "running":
            continue
        tiers = [t for t in chain if (w.get("resources") or {}).get(t, 0) > 0]
        if not tiers:
            continue
        host = (w.get("metrics") or {}).get("aicluster") or {}
        budget = host.get("budget")
        if budget is not None and budget < need:
            too_small.append(f"{w.get('name')} ({budget / 1e9:.1f} GB)")
            continue
        bench = (host.get("bench") or {}).get(bench_job or "") or {}
        speed = bench.get("value") if (bench.get("params") or {}).get("model") == model else None
        out.append(Helper(address=addr, name=str(w.get("name")), tier=tiers[0], speed=speed))
    if not out:
        live = sorted(routing.live_tiers(workers, core.config.tiers))
        if too_small:
            raise routing.NoWorkerForTier(chain, live, f"model {model!r} (needs {need / 1e9:.2f} GB; budgets too small: "
                                                       f"{', '.join(too_small)})")
        raise routing.NoWorkerForTier(chain, live, f"model {model!r}")
    return out


def _depths(helpers: list[Helper], base: int) -> None:
    """Chunks in flight per worker: ``base``, scaled by benchmark speed where known."""
    speeds = [h.speed for h in helpers if h.speed]
    ref = sorted(speeds)[len(speeds) // 2] if speeds else None
    for h in helpers:
        h.depth = base if not (ref and h.speed) else max(1, min(4 * base, round(base * h.speed / ref)))


def run_spread(core, helpers: list[Helper], chunks: list[tuple[int, int]], submit_chunk: Callable,
               on_part: Callable[[int, object, Helper], None] | None = None, depth: int = 2,
               on_error: Callable[[int, BaseException], None] | None = None,
               cancelled: Callable[[], bool] = lambda: False) -> dict[int, object]:
    """Run ``chunks`` (``(offset, size)`` pairs) on ``helpers``, each pulling the next chunk
    as one of its own finishes; returns ``{offset: result}``.

    ``submit_chunk(offset, size, helper)`` returns a Future pinned to the helper.
    ``on_part(offset, result, helper)`` is called as each chunk finishes (progress, files).
    A chunk that fails ends the job with its error (the chunks still queued are cancelled),
    or, with ``on_error(offset, error)``, is reported there and the job goes on.
    """
    _depths(helpers, depth)
    queue = list(reversed(chunks))  # pop() takes the first chunks first
    results: dict[int, object] = {}
    owner: dict = {}  # key -> (offset, size, helper, future)
    ac = as_completed([], loop=core.client.loop)

    def feed(h: Helper) -> None:
        if cancelled():
            from .jobs import JobCancelled

            raise JobCancelled("the spread job was cancelled")
        while queue and len(h.pending) < h.depth:
            off, size = queue.pop()
            f = submit_chunk(off, size, h)
            owner[f.key] = (off, size, h, f)
            h.pending.add(f.key)
            ac.add(f)

    for h in helpers:
        feed(h)
    try:
        for f in ac:
            off, size, h, _ = owner.pop(f.key)
            h.pending.discard(f.key)
            err = failure(f)
            if err is not None:
                if on_error is None:
                    raise err
                on_error(off, err)
                feed(h)
                continue
            results[off] = res = f.result()
            h.chunks += 1
            h.done += size
            if on_part is not None:
                on_part(off, res, h)
            feed(h)
    except BaseException:
        if owner:  # the chunks still running stop too (a generation within a token or two)
            core.cancel([f for *_, f in owner.values()])
        raise
    return results


def _pinned_route(core, h: Helper, model: str, amount: float) -> routing.Route:
    chain = core.config.fallback_chain(h.tier)
    return routing.Route(tier=h.tier, chain=chain, workers=[h.address], model=model, amount=amount)


def _background(fn: Callable[[Callable[[], bool]], object], name: str) -> concurrent.futures.Future:
    """Run ``fn(cancelled)`` in a thread; its result or error through a Future. Cancelling
    the Future (``.cancel()``) makes ``cancelled()`` true, and the job stops feeding and
    cancels its chunks still running."""
    out: concurrent.futures.Future = concurrent.futures.Future()
    stop = threading.Event()
    orig_cancel = out.cancel

    def cancel() -> bool:
        stop.set()
        return orig_cancel() or True

    out.cancel = cancel  # a running job cannot be cancelled by Future alone: tell it
    out.set_running_or_notify_cancel()

    def run():
        try:
            value = fn(stop.is_set)
        except BaseException as e:  # handed to the caller through the Future
            if not out.done():
                out.set_exception(e)
            return
        if not out.done():
            out.set_result(value)

    threading.Thread(target=run, name=name, daemon=True).start()
    return out


def spread_embed(core, spec, model: str, items: list[str], params: dict, chunk_size: int | None = None,
                 single: bool = False, details: bool = False, tier: str | None = None, priority: int = 0,
                 on_part=None, helpers: list[Helper] | None = None, skip: set[int] = frozenset(),
                 wait: bool = False):
    """``ai.embed(..., spread=True)``: a Future (or, ``wait=True``, the result) of the
    vectors of ``items`` in input order, computed on every capable worker."""
    import numpy as np

    helpers = helpers or capable_workers(core, spec, model, tier, bench_job="embed_throughput")
    if chunk_size is None:  # small enough that each worker pulls several
        chunk_size = max(params.get("batch_size", 64), math.ceil(len(items) / (8 * len(helpers))))
    token = uuid.uuid4().hex[:12]
    fn = embed_task

    def submit_chunk(off, size, h):
        route = _pinned_route(core, h, model, 1.0)
        return core.submit_routed(route, f"embed with {model} (spread)", fn, items[off:off + size], model, spec, params,
                                 offset=off, kind="embed", key=f"embed-{model}-{token}-{off}", priority=priority)

    def job(cancelled=lambda: False):
        chunks = [(o, min(chunk_size, len(items) - o)) for o in range(0, len(items), chunk_size) if o not in skip]
        parts = run_spread(core, helpers, chunks, submit_chunk, on_part, cancelled=cancelled)
        if skip:
            return parts  # the caller holds the skipped chunks (a resumed CLI run)
        ordered = [parts[o] for o in sorted(parts)]
        arr = np.concatenate([p["embeddings"] for p in ordered], axis=0)
        if single:
            arr = arr[0]
        if not details:
            return arr
        return {"embeddings": arr, "batches": [{k: v for k, v in p.items() if k != "embeddings"} for p in ordered],
                "workers": {h.name: h.done for h in helpers}}

    return job() if wait else _background(job, f"aicluster-spread-{token}")


def spread_generate(core, spec, model: str, prompts: list[str], params: dict | list[dict], tier: str | None = None,
                    priority: int = 0, on_part=None, on_error=None, wait: bool = False):
    """``ai.generate(prompts, spread=True)``: a Future of the result dicts in prompt order;
    each worker keeps as many prompts in flight as its model decodes at once. ``params``:
    one dict for all prompts, or one per prompt."""
    helpers = capable_workers(core, spec, model, tier, bench_job="llm_throughput")
    amount = routing.slot_share(int(spec.options.get("parallel", 8))) if spec.backend == "llamacpp" else 1.0
    fn = generate_task

    def submit_chunk(i, _size, h):
        route = _pinned_route(core, h, model, amount)
        return core.submit_routed(route, f"generate with {model} (spread)", fn, prompts[i], model, spec,
                                 params[i] if isinstance(params, list) else params, index=i, kind="generate", key=f"generate-{model}-{uuid.uuid4().hex[:12]}",
                                 priority=priority, task_priority=priority)

    def job(cancelled=lambda: False):
        res = run_spread(core, helpers, [(i, 1) for i in range(len(prompts))], submit_chunk, on_part=on_part,
                         depth=round(1 / amount), on_error=on_error, cancelled=cancelled)
        return [res.get(i) for i in range(len(prompts))]

    return job() if wait else _background(job, "aicluster-spread-generate")
