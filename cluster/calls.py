"""Model calls and Dask-style mapping behind the facade's verbs (``ai.generate``, ``ai.chat``,
``ai.embed``, ``ai.map``): check the input (``workloads.inputs``) and the model's limits
(``workloads.backends.precheck``) before anything is submitted, route through the core,
and submit. ``AICluster`` documents the parameters; these do the work.
"""
from __future__ import annotations

import functools
import math
import uuid
from typing import Callable, Iterable

import dask
from dask.utils import funcname
from distributed import Future

from workloads.backends import EMBED_BACKENDS, GENERATE_BACKENDS, InputError, chat_prompt, precheck
from workloads.embeddings import concat_task, embed_task
from workloads.inputs import check_backend_sampling, check_messages, check_sampling, check_texts, sampling_kwargs

from . import routing
from .core import Core

__all__ = ["generate", "chat", "embed", "submit", "map_tasks"]


def generate(core: Core, prompt, model: str, max_tokens: int, temperature: float, top_p: float, stop, seed,
             stream: bool, tier: str | None, priority: int, spread: bool, sampling: dict):
    prompts, single = check_texts(prompt, "prompt")
    params = check_sampling(max_tokens, temperature, top_p, stop, seed, **sampling_kwargs(sampling))
    if stream and not single:
        raise InputError("stream=True takes a single prompt")
    spec, route = core.model_route(model, GENERATE_BACKENDS, "generate text", tier)
    check_backend_sampling(spec, model, params)
    precheck(spec, prompts, model, max_tokens=max_tokens, first_index=None if single else 0)
    if spread and not spec.sharded:  # a split model has one head: its batch takes every prompt
        from .spread import spread_generate

        return spread_generate(core, spec, model, prompts, params, tier=tier, priority=priority)
    futures = [core.submit_generation(route, model, spec, params, p, index=None if single else i, stream=stream,
                                      priority=priority) for i, p in enumerate(prompts)]
    return futures[0] if single else futures


def chat(core: Core, messages, model: str, max_tokens: int, temperature: float, top_p: float, stop, seed,
         stream: bool, tier: str | None, priority: int, sampling: dict):
    msgs = check_messages(messages)
    params = check_sampling(max_tokens, temperature, top_p, stop, seed, **sampling_kwargs(sampling))
    spec, route = core.model_route(model, GENERATE_BACKENDS, "chat", tier)
    check_backend_sampling(spec, model, params)
    # at the caller when the model file is here: no template, or a prompt over the context,
    # fails before anything is submitted (the worker formats the messages itself)
    formatted = chat_prompt(spec, msgs, model)
    if formatted is not None:
        precheck(spec, [formatted[0]], model, max_tokens=max_tokens)
    return core.submit_generation(route, model, spec, params, None, messages=msgs, stream=stream,
                                  priority=priority, kind="chat")


def embed(core: Core, texts, model: str, batch_size: int, normalize: bool, truncate: bool, chunk_size: int | None,
          details: bool, tier: str | None, priority: int, spread: bool, count_tokens: bool) -> Future:
    items, single = check_texts(texts, "text")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    spec, route = core.model_route(model, EMBED_BACKENDS, "embed texts", tier)
    precheck(spec, items, model, truncate=truncate, first_index=0)
    params = dict(batch_size=batch_size, normalize=normalize, truncate=truncate)
    if count_tokens:
        params["count_tokens"] = True
    if spread:
        from .spread import spread_embed

        return spread_embed(core, spec, model, items, params, chunk_size=chunk_size, single=single,
                            details=details, tier=tier, priority=priority)
    if chunk_size is None:
        n_workers = max(1, len(route.tier_workers))
        chunk_size = max(16 * batch_size, math.ceil(len(items) / (2 * n_workers)))
    what = f"embed with {model}"
    token = uuid.uuid4().hex[:12]
    starts = range(0, len(items), chunk_size)

    def submit_all() -> Future:
        parts = [  # one row on the job board, its chunks under it
            core.submit_routed(route, what, embed_task, items[i:i + chunk_size], model, spec, params, offset=i,
                               kind="embed", key=f"embed-{model}-{token}-{i}", priority=priority,
                               group=f"embed-{model}-{token}", parts=len(starts), redo=False)
            for i in starts
        ]
        return core.client.submit(concat_task, parts, single=single, details=details,
                                  key=f"embed-{model}-{token}", priority=priority)

    f = submit_all()
    # the chunks are let go once the joining task holds them: a restart redoes the whole call
    core.redo.track(f, submit_all, what)
    return f


def submit(core: Core, fn: Callable, args: tuple, tier: str | None, key, pure: bool, retries, priority: int,
           kwargs: dict) -> Future:
    opts = dict(key=key, pure=pure, retries=retries, priority=priority, redo=bool(retries))
    what = f"{funcname(fn)}"
    if tier is None:
        return core.submit_anywhere(what, fn, *args, **opts, **kwargs)
    return core.submit_routed(core.route(tier, what), what, fn, *args, **opts, **kwargs)


def map_tasks(core: Core, fn: Callable, iterables: tuple[Iterable, ...], tier: str | None, pure: bool, retries,
              key, priority: int, batch_size: int | None, kwargs: dict) -> list[Future]:
    what = f"{funcname(fn)}"
    route = core.route(tier, what) if tier is not None else None
    ann = route.annotation(what) if route else {routing.ANNOTATION: {"chain": [], "what": what, "kind": "task"}}
    where = route.submit_kwargs() if route else {}
    if retries:
        iterables = tuple(list(it) for it in iterables)
    with dask.annotate(**ann):
        futures = core.client.map(fn, *iterables, key=key, pure=pure, retries=retries, priority=priority,
                                  batch_size=batch_size, **where, **kwargs)
    if retries and core.redo.can_redo((iterables, kwargs)):
        # fn's own keyword arguments bound here, so none is taken for a submit option
        call = functools.partial(fn, **kwargs) if kwargs else fn
        for f, args in zip(futures, zip(*iterables)):
            opts = dict(key=f.key, pure=pure, retries=retries, priority=priority, redo=False)
            if route is None:  # (the key, not the Future: a recipe must not hold the user's future)
                again = lambda args=args, opts=opts: core.submit_anywhere(what, call, *args, **opts)
            else:
                again = lambda args=args, opts=opts: core.submit_routed(route, what, call, *args, **opts)
            core.redo.track(f, again, what)
    return futures
