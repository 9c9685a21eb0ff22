"""The facade people use from notebooks and scripts: ``from cluster import connect``.

``connect()`` returns an ``AICluster``: the Dask ``Client`` (``.client``) plus routing by
tier, model calls that go where the model is resident, and a status table.
"""
from __future__ import annotations

import functools
import importlib
import logging
import math
import queue
import time
import uuid
from dataclasses import replace
from typing import Any, Callable, Iterable, Iterator, Sequence

import dask
from dask.utils import funcname
from distributed import Client, Future

from . import routing
from workloads.backends import InputError, InputTypeError

from .config import Config, load_config
from .jobs import JobBoard, format_jobs, job_rows
from .plugin import PLUGIN_NAME, ModelHost
from .redo import Redo, Resubmitted
from .status import format_table, worker_rows
from .streams import STREAM_TOPIC, StreamHub, close_stream

__all__ = ["AICluster", "connect", "ClusterStatus", "GenerationStream", "JobList"]

logger = logging.getLogger("cluster.client")

#: Task functions of the workloads package, named so that ``cluster`` does not import it.
TASKS = {
    "generate": "workloads.llm:generate_task",
    "embed": "workloads.embeddings:embed_task",
    "concat": "workloads.embeddings:concat_task",
    "load": "workloads.llm:load_task",
}
GENERATE_BACKENDS = ("llamacpp", "transformers")
EMBED_BACKENDS = ("sentence_transformers",)


def precheck(spec, items: list[str], model: str, **kwargs) -> bool:
    """Inputs over the model's limits are refused here, before anything is submitted, when
    the model file is on this machine (``workloads.backends.precheck``); otherwise the
    worker refuses them before it queues the work."""
    return importlib.import_module("workloads.backends").precheck(spec, items, model, **kwargs)


def _task(name: str) -> Callable:
    module, _, attr = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


class ClusterStatus(list):
    """Worker rows (a list of dicts) that print as a table and render in notebooks."""

    def __str__(self) -> str:
        return format_table(self)

    def _repr_html_(self) -> str:
        import html

        cols = ["name", "tier", "simulated", "device", "device_name", "vram_total", "memory_limit", "budget", "used", "running"]
        head = "".join(f"<th>{c}</th>" for c in cols + ["models"])
        body = ""
        for r in self:
            cells = "".join(f"<td>{html.escape(str(r[c]))}</td>" for c in cols)
            models = ", ".join(f"{n} ({m['bytes'] / 1e6:.0f} MB)" for n, m in r["models"].items())
            body += f"<tr>{cells}<td>{html.escape(models)}</td></tr>"
        note = "<p><i>simulated</i>: tier forced on a machine without such a GPU; work runs on the CPU.</p>" if any(r["simulated"] for r in self) else ""
        return f"<table><tr>{head}</tr>{body}</table>{note}"

    def to_dict(self) -> dict:
        return {"workers": list(self)}

    @property
    def tiers(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for r in self:
            out.setdefault(r["tier"], []).append(r["name"])
        return out




class GenerationStream:
    """Text pieces of one generation as they are produced; ``.result()`` gives the final dict."""

    def __init__(self, ai: "AICluster", stream_id: str | None = None):
        self.ai = ai
        self.stream_id = stream_id = stream_id or ai.new_stream_id()
        self._q: queue.Queue = queue.Queue()
        ai._open_stream(stream_id, self._q.put)
        self.future: Future | None = None

    def __iter__(self) -> Iterator[str]:
        sent = ""
        try:
            while True:
                try:
                    msg = self._q.get(timeout=0.2)
                except queue.Empty:
                    if self.future is not None and self.future.done() and self._q.empty():
                        if self.future.status == "error":
                            self.future.result()  # raises the task's error
                        if self.future.status == "cancelled":
                            from .jobs import SchedulerLost, failure

                            err = failure(self.future)
                            if isinstance(err, SchedulerLost):  # never a silently shorter text
                                raise SchedulerLost(f"the stream was cut: {err}; generate again") from None
                            raise err
                        break
                    continue
                if msg is None:
                    break
                sent += msg
                yield msg
            # the finished result's text is authoritative: pieces that did not arrive (events
            # and results travel apart) are sent now, so the stream is never shorter
            text = self.future.result()["text"]
            if text.startswith(sent) and len(text) > len(sent):
                yield text[len(sent):]
        finally:
            self.ai._close_stream(self.stream_id)

    def result(self, timeout=None) -> dict:
        return self.future.result(timeout=timeout)


class AICluster:
    """A Dask client plus tier routing and model calls. Use ``connect()`` to make one."""

    def __init__(self, client: Client, config: Config, cluster=None):
        self.client = client
        self.config = config
        self.cluster = cluster
        client.register_plugin(routing.TierGuard(grace=config.routing.restart_grace))
        client.register_plugin(routing.WorkerEvents())
        client.register_plugin(routing.ModelAffinity(prefer_resident=config.routing.prefer_resident))
        client.register_plugin(JobBoard())
        client.register_plugin(StreamHub())
        client.register_plugin(ModelHost(config))
        self._streams: dict[str, Callable] = {}
        self._subscribed = False
        #: the workers as the scheduler's events report them: routing reads this, no round trip
        self._view = routing.WorkerView(client)
        self._comm = client.scheduler_comm
        #: per stream id: what it has received ({"text", "ids"}: a stream generated again after
        #: a scheduler restart goes on from there), and its current attempt (a new one each time)
        self._received: dict[str, dict] = {}
        self._attempt: dict[str, int] = {}
        #: facade tasks lost with a restarting scheduler are submitted again (cluster/redo.py)
        self._redo = Redo(client, on_reconnected=self._check_reconnected)

    def _check_reconnected(self) -> None:
        """After the client reconnected to a (restarted) scheduler: subscribe to this facade's
        event topics again (distributed does not) and take a new snapshot of the workers."""
        comm = self.client.scheduler_comm
        if comm is None or comm is self._comm:
            return
        first = self._comm is None
        self._comm = comm
        if first:
            return
        if self._subscribed:
            self.client.subscribe_topic(STREAM_TOPIC, self._on_stream_event)
        self._view.resubscribe()

    def new_stream_id(self) -> str:
        """An id for a stream of this client (the scheduler's hub sends its pieces here only)."""
        return f"{self.client.id}/{uuid.uuid4().hex}"

    def _open_stream(self, stream_id: str, sink: Callable[[str | None], None]) -> None:
        """Send the text pieces of stream ``stream_id`` (from ``new_stream_id``) to ``sink``
        (None ends the stream); ``sink`` is called on the client's event loop thread and must
        not block."""
        self._check_reconnected()
        if not self._subscribed:
            self.client.subscribe_topic(STREAM_TOPIC, self._on_stream_event)
            self._subscribed = True
        self._streams[stream_id] = sink

    def _on_stream_event(self, event) -> None:
        tagged, piece, *rest = event[1]
        stream_id, _, attempt = str(tagged).partition("#")
        sink = self._streams.get(stream_id)
        if sink is not None and str(self._attempt.get(stream_id, 0)) == (attempt or "0"):
            if piece:
                got = self._received.setdefault(stream_id, {"text": "", "ids": []})
                got["text"] += piece
                got["ids"] += list(rest[0]) if rest and rest[0] else []
            sink(piece)

    def _close_stream(self, stream_id: str) -> None:
        """The reader is done with the stream (its "sent text" mark stays while the
        future is held: a finished stream is not generated again after a restart)."""
        if self._streams.pop(stream_id, None) is not None:
            close_stream(self.client, f"{stream_id}#{self._attempt.get(stream_id, 0)}")

    def _forget_stream(self, stream_id: str) -> None:
        self._received.pop(stream_id, None)
        self._attempt.pop(stream_id, None)

    # -- plumbing ----------------------------------------------------------------------------
    @property
    def dashboard_link(self) -> str:
        return self.config.dashboard_link(self.client)

    @property
    def scheduler_address(self) -> str:
        return self.client.scheduler.address

    def _workers(self) -> dict:
        """Every worker's identity with its metrics (one round trip; status, planning).
        Asked of the scheduler directly: ``Client.scheduler_info()`` hands back a cached
        identity that the client's periodic refresh can replace with one listing no workers."""
        return self.client.run_on_scheduler(_identity_workers)

    def live_tiers(self) -> dict[str, list[str]]:
        """``{tier: [worker addresses]}`` of the workers connected now."""
        self._check_reconnected()
        return routing.live_tiers(self._view.workers(), self.config.tiers)

    def _resolve(self, chain: list[str], what: str) -> routing.Route:
        """``routing.resolve`` on the event-fed view; a chain that looks empty is checked
        against the scheduler once before it is an error (the view may lag a restart)."""
        try:
            return routing.resolve(chain, self.live_tiers(), what)
        except routing.NoWorkerForTier:
            self._view.refresh()
            try:
                return routing.resolve(chain, self.live_tiers(), what)
            except routing.NoWorkerForTier:
                # a worker of the chain left moments ago (crashed: its nanny restarts it): the
                # task waits for it like a task already running there would (TierGuard, for
                # routing.restart_grace), instead of failing in the few seconds of the restart
                grace = self.config.routing.restart_grace
                tier = self._view.recently_left(chain, grace) if grace > 0 else None
                if tier is None and grace > 0 and self._view.starting(grace):
                    tier = chain[0]  # a scheduler that just started, before its workers joined: wait for them
                if tier is None:
                    raise
                return routing.Route(tier=tier, chain=list(chain))

    def _check_tier(self, tier: str) -> None:
        if tier not in self.config.tiers:
            raise InputError(f"tier {tier!r} is not a tier; known: {', '.join(self.config.tiers)}")

    def route(self, tier: str, what: str = "this task") -> routing.Route:
        """Where work for ``tier`` goes now (raises ``NoWorkerForTier`` when nowhere)."""
        self._check_tier(tier)
        return self._resolve(self.config.fallback_chain(tier), what)

    def _submit_routed(self, route: routing.Route, what: str, fn, *args, kind: str = "task", priority: int = 0,
                       group: str | None = None, parts: int | None = None, _redo: bool = True, **kwargs) -> Future:
        """``fn(*args)`` along ``route``; ``group``/``parts``: this task is one of ``parts``
        chunks of one call, shown as one row on the job board. ``_redo``: submitted again
        under the same key if the scheduler restarts while the future is held
        (cluster/redo.py)."""
        ann = route.annotation(what, kind, priority)
        if group is not None:
            ann[routing.ANNOTATION].update(group=group, parts=parts)
        with dask.annotate(**ann):
            f = self.client.submit(fn, *args, **route.submit_kwargs(), priority=priority, **kwargs)
        if _redo and self._redo.can_redo((args, kwargs)):
            again = {**kwargs, "kind": kind, "priority": priority, "group": group, "parts": parts, "_redo": False,
                     "key": f.key}
            self._redo.track(f, lambda: self._submit_routed(route, what, fn, *args, **again), what)
        return f

    def _submit_anywhere(self, what: str, fn, *args, kind: str = "task", priority: int = 0, _redo: bool = True,
                         **kwargs) -> Future:
        # on the job board too (an empty chain: no tier, nothing for the TierGuard to do)
        info = {"chain": [], "what": what, "kind": kind, **({"priority": priority} if priority else {})}
        with dask.annotate(**{routing.ANNOTATION: info}):
            f = self.client.submit(fn, *args, priority=priority, **kwargs)
        if _redo and self._redo.can_redo((args, kwargs)):
            again = {**kwargs, "kind": kind, "priority": priority, "_redo": False, "key": f.key}
            self._redo.track(f, lambda: self._submit_anywhere(what, fn, *args, **again), what)
        return f

    def on_resubmit(self, callback: Callable[[list[Resubmitted]], None]) -> Callable[[], None]:
        """Call ``callback(items)`` each time jobs lost with a restarted scheduler have been
        submitted again (items: ``Resubmitted(key, what, times)``); returns a function that
        stops it. Without a callback the facade logs a warning that says how many."""
        return self._redo.listen(callback)

    # -- generic work ------------------------------------------------------------------------
    def submit(self, fn: Callable, *args, tier: str | None = None, key: str | None = None,
               pure: bool = False, retries: int | None = None, priority: int = 0, **kwargs) -> Future:
        """``Client.submit`` routed to a tier (with fallback); ``tier=None`` runs anywhere.

        ``key``, ``pure``, ``retries`` and ``priority`` are Dask's; other keyword arguments
        go to ``fn``. With ``retries``, the task is also submitted again if the scheduler
        restarts while you hold its future (even if it had finished: its result was on the
        old cluster); without, it may have side effects, so a restart cancels it
        (``SchedulerLost``), as Dask does.
        """
        opts = dict(key=key, pure=pure, retries=retries, priority=priority, _redo=bool(retries))
        what = f"{funcname(fn)}"
        if tier is None:
            return self._submit_anywhere(what, fn, *args, **opts, **kwargs)
        return self._submit_routed(self.route(tier, what), what, fn, *args, **opts, **kwargs)

    def map(self, fn: Callable, *iterables: Iterable, tier: str | None = None, pure: bool = False,
            retries: int | None = None, key: str | list | None = None, priority: int = 0,
            batch_size: int | None = None, **kwargs) -> list[Future]:
        """``Client.map`` routed to a tier (with fallback); ``key``, ``pure``, ``retries``,
        ``priority`` and ``batch_size`` are Dask's, other keyword arguments go to ``fn``. With
        ``retries``, each task is also submitted again after a scheduler restart (see ``submit``)."""
        what = f"{funcname(fn)}"
        route = self.route(tier, what) if tier is not None else None
        ann = route.annotation(what) if route else {routing.ANNOTATION: {"chain": [], "what": what, "kind": "task"}}
        where = route.submit_kwargs() if route else {}
        if retries:
            iterables = tuple(list(it) for it in iterables)
        with dask.annotate(**ann):
            futures = self.client.map(fn, *iterables, key=key, pure=pure, retries=retries, priority=priority,
                                      batch_size=batch_size, **where, **kwargs)
        if retries and self._redo.can_redo((iterables, kwargs)):
            # fn's own keyword arguments bound here, so none is taken for a submit option
            call = functools.partial(fn, **kwargs) if kwargs else fn
            for f, args in zip(futures, zip(*iterables)):
                opts = dict(key=f.key, pure=pure, retries=retries, priority=priority, _redo=False)
                if route is None:  # (the key, not the Future: a recipe must not hold the user's future)
                    again = lambda args=args, opts=opts: self._submit_anywhere(what, call, *args, **opts)
                else:
                    again = lambda args=args, opts=opts: self._submit_routed(route, what, call, *args, **opts)
                self._redo.track(f, again, what)
        return futures

    # -- models ------------------------------------------------------------------------------
    def _model_route(self, model: str, kinds: tuple[str, ...], verb: str, tier: str | None = None) -> tuple[Any, routing.Route]:
        spec = self.config.model(model)
        if spec.backend in sum((GENERATE_BACKENDS, EMBED_BACKENDS), ()) and spec.backend not in kinds:
            raise InputError(f"model {model!r} ({spec.backend}) cannot {verb}; models that can: "
                             + ", ".join(n for n, m in self.config.models.items() if m.backend in kinds))
        if spec.sharded and "llamacpp" in kinds:
            # split across workers: the head that holds it, or a new plan (cluster/shards.py)
            from . import shards

            return shards.route_for(self, model, spec, int(spec.options.get("parallel", 8)))
        chain = self.config.fallback_chain(tier or spec.tier)
        if tier is not None:
            self._check_tier(tier)
        # where the model is resident is decided on the scheduler (routing.ModelAffinity)
        route = replace(self._resolve(chain, f"model {model!r}"), model=model)
        if spec.backend == "llamacpp" and "llamacpp" in kinds:
            # one resident model decodes `parallel` requests at once: each takes a share of the slot
            route = route.shared(routing.slot_share(int(spec.options.get("parallel", 8))))
        return spec, route

    def generate(self, prompt: str | Sequence[str], model: str = "gemma-270m", max_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 1.0, stop: str | Sequence[str] | None = None,
                 seed: int | None = None, stream: bool = False, tier: str | None = None, priority: int = 0,
                 spread: bool = False, **sampling) -> Future | list[Future] | GenerationStream:
        """Generate text with ``model`` on its tier; returns a Future (a list for a list of prompts).

        Parameters
        ----------
        prompt
            One prompt, or a list (one task each, spread over the tier's workers).
        max_tokens
            Tokens to generate at most (> 0). Prompt + max_tokens must fit the context.
        temperature, top_p, seed
            Sampling; ``temperature=0`` (default) is greedy and deterministic.
        stop
            A string, or a list of strings, that ends generation (not included in the text).
        stream
            Return a ``GenerationStream`` (single prompt only): iterate it for text pieces.
        tier
            Override the model's tier (fallbacks still apply).
        priority
            Dask priority: higher runs first where work queues (a worker's tasks, the
            model's batch slots); shown on the job board.
        spread
            A list of prompts over every worker that can run the model (its tier and the
            fallback tiers whose budget fits it), each kept busy as it finishes prompts;
            returns one ``concurrent.futures.Future`` of the results in prompt order.
        sampling
            OpenAI's ``presence_penalty``, ``frequency_penalty`` (-2 to 2), ``logit_bias``
            (``{token_id: -100..100}``), ``logprobs`` (alternatives per token, 0-20: the
            result gets ``logprobs``) and ``response_format`` (``{"type": "json_object"}``
            or ``{"type": "json_schema", "json_schema": {"schema": {...}}}``: the output is
            held to that JSON by a grammar); llamacpp models.

        The result dict holds ``text``, ``prompt_tokens``, ``completion_tokens``,
        ``finish_reason``, timings, and the ``worker`` / ``tier`` that ran it.
        """
        prompts, single = _check_texts(prompt, "prompt")
        params = _sampling(max_tokens, temperature, top_p, stop, seed, **_sampling_kwargs(sampling))
        if stream and not single:
            raise InputError("stream=True takes a single prompt")
        spec, route = self._model_route(model, GENERATE_BACKENDS, "generate text", tier)
        _check_backend_sampling(spec, model, params)
        precheck(spec, prompts, model, max_tokens=max_tokens, first_index=None if single else 0)
        if spread and not spec.sharded:  # a split model has one head: its batch takes every prompt
            from .spread import spread_generate

            return spread_generate(self, spec, model, prompts, params, tier=tier, priority=priority)
        futures = [self._submit_generation(route, model, spec, params, p, index=None if single else i, stream=stream,
                                           priority=priority) for i, p in enumerate(prompts)]
        return futures[0] if single else futures

    def _submit_generation(self, route, model: str, spec, params: dict, prompt: str | None, index=None,
                           messages=None, stream: bool = False, priority: int = 0, kind: str = "generate",
                           stream_id: str | None = None):
        """One generation task: a Future, or a ``GenerationStream`` with ``stream``; with a
        ``stream_id`` the caller opened (``_open_stream``), a Future whose pieces go there."""
        extra: dict = {} if messages is None else {"messages": messages}
        s = None
        if stream:
            s = GenerationStream(self)
            stream_id = s.stream_id
        what = f"{kind} with {model}"

        def submit(key: str, attempt: int = 0) -> Future:
            if stream_id is not None:
                # pieces come as (f"{stream_id}#{attempt}", piece, ids): after a redo, pieces that
                # a run lost with the old connection still sends are told apart and dropped
                self._attempt[stream_id] = attempt
                extra.update(stream_id=f"{stream_id}#{attempt}")
                got = self._received.get(stream_id)
                if attempt and got and got["text"]:
                    # the new scheduler's hub knows nothing of it: go on from what arrived here
                    extra["resume_from"] = {"text": got["text"], "ids": list(got["ids"])}
            return self._submit_routed(route, what, _task("generate"), prompt, model, spec, params, index=index,
                                       kind=kind, key=key, priority=priority, task_priority=priority, _redo=False,
                                       **extra)

        key = f"{kind}-{model}-{uuid.uuid4().hex[:12]}"
        f = submit(key)
        if stream_id is None:
            self._redo.track(f, lambda: submit(key), what)  # (the key: a recipe must not hold the future)
        else:
            # after a scheduler restart, a stream goes on from the text it has sent (its
            # pieces carry their token ids; a backend that cannot continue says the stream was cut)
            attempts = iter(range(1, 1 << 30))
            self._redo.track(f, lambda: submit(key, next(attempts)), what,
                             cleanup=lambda: self._forget_stream(stream_id))
        if s is None:
            return f
        s.future = f
        return s

    def chat(self, messages: Sequence[dict], model: str = "gemma-270m", max_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, stop: str | Sequence[str] | None = None,
             seed: int | None = None, stream: bool = False, tier: str | None = None,
             priority: int = 0, **sampling) -> Future | GenerationStream:
        """The assistant's next turn after ``messages`` (``[{"role": "user", "content": ...}]``,
        roles system / user / assistant), with the model's own chat template (see
        workloads/backends/chat.py). A Future of the same dict as ``generate`` plus
        ``message`` (``{"role": "assistant", "content": ...}``); ``stream=True`` gives a
        ``GenerationStream``. The other parameters are ``generate``'s (``sampling``: OpenAI's
        penalties, ``logit_bias``, ``logprobs``, ``response_format``)."""
        msgs = _check_messages(messages)
        params = _sampling(max_tokens, temperature, top_p, stop, seed, **_sampling_kwargs(sampling))
        spec, route = self._model_route(model, GENERATE_BACKENDS, "chat", tier)
        _check_backend_sampling(spec, model, params)
        # at the caller when the model file is here: no template, or a prompt over the context,
        # fails before anything is submitted (the worker formats the messages itself)
        formatted = importlib.import_module("workloads.backends").chat_prompt(spec, msgs, model)
        if formatted is not None:
            precheck(spec, [formatted[0]], model, max_tokens=max_tokens)
        return self._submit_generation(route, model, spec, params, None, messages=msgs, stream=stream,
                                       priority=priority, kind="chat")

    def chat_now(self, messages: Sequence[dict], **kwargs) -> dict:
        """Blocking ``chat``: the result dict (``r["message"]["content"]`` is the answer)."""
        return self.chat(messages, **kwargs).result()

    def generate_now(self, prompt: str | Sequence[str], **kwargs) -> dict | list[dict]:
        """Blocking ``generate``: the result dict (or list of dicts)."""
        f = self.generate(prompt, **kwargs)
        return self.client.gather(f)

    def embed(self, texts: str | Sequence[str], model: str = "minilm", batch_size: int = 64,
              normalize: bool = False, truncate: bool = False, chunk_size: int | None = None,
              details: bool = False, tier: str | None = None, priority: int = 0, spread: bool = False,
              count_tokens: bool = False) -> Future:
        """Embed ``texts`` on the model's tier; a Future of one array in the input order.

        Parameters
        ----------
        texts
            A list of non-empty strings (or one string, giving a 1-D vector).
        batch_size
            Texts per forward pass on the worker.
        normalize
            L2-normalise each vector.
        truncate
            Allow texts longer than the model reads to be cut (default: an error).
        chunk_size
            Texts per Dask task. None: at least 16 batches' worth, and about two tasks per
            live worker of the tier, so task overhead stays small.
        details
            Return ``{"embeddings": array, "batches": [{worker, tier, n, seconds}, ...]}``.
        count_tokens
            Each batch of ``details`` also says how many tokens the model read (``tokens``).
        priority
            Dask priority (higher first), on every chunk; shown on the job board.
        spread
            Split the job over every worker that can run the model (its tier and the
            fallback tiers whose budget fits it), a queue of chunks that each worker pulls
            from as it finishes, so faster workers do more; returns a
            ``concurrent.futures.Future`` of the same result.
        """
        items, single = _check_texts(texts, "text")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        spec, route = self._model_route(model, EMBED_BACKENDS, "embed texts", tier)
        precheck(spec, items, model, truncate=truncate, first_index=0)
        params = dict(batch_size=batch_size, normalize=normalize, truncate=truncate)
        if count_tokens:
            params["count_tokens"] = True
        if spread:
            from .spread import spread_embed

            return spread_embed(self, spec, model, items, params, chunk_size=chunk_size, single=single,
                                details=details, tier=tier, priority=priority)
        if chunk_size is None:
            n_workers = max(1, len(route.tier_workers))
            chunk_size = max(16 * batch_size, math.ceil(len(items) / (2 * n_workers)))
        fn = _task("embed")
        what = f"embed with {model}"
        token = uuid.uuid4().hex[:12]
        starts = range(0, len(items), chunk_size)

        def submit() -> Future:
            parts = [  # one row on the job board, its chunks under it
                self._submit_routed(route, what, fn, items[i:i + chunk_size], model, spec, params, offset=i,
                                    kind="embed", key=f"embed-{model}-{token}-{i}", priority=priority,
                                    group=f"embed-{model}-{token}", parts=len(starts), _redo=False)
                for i in starts
            ]
            return self.client.submit(_task("concat"), parts, single=single, details=details,
                                      key=f"embed-{model}-{token}", priority=priority)

        f = submit()
        # the chunks are let go once the joining task holds them: a restart redoes the whole call
        self._redo.track(f, submit, what)
        return f

    def embed_now(self, texts: str | Sequence[str], **kwargs):
        """Blocking ``embed``: a numpy array (or the details dict)."""
        return self.embed(texts, **kwargs).result()

    def unload(self, model: str) -> dict[str, bool]:
        """Unload ``model`` from every worker (a split model: its head, and the layers its
        workers' shard servers held); ``{worker: was_resident}``."""
        from .shards import forget_plan

        forget_plan(self, model)
        return self.client.run(_unload_on_worker, model)

    # -- models split across workers (cluster/shards.py) ----------------------------------------
    def plan_shards(self, model: str, workers: Sequence[str] | None = None):
        """How ``model`` would be split across the workers that run a shard server now: a
        ``ShardPlan`` (a table in Jupyter and ``print``). ``workers`` (names or addresses,
        head first): split over exactly these. Raises ``ShardPlanError`` naming the shortfall."""
        from .shards import plan_for

        return plan_for(self, model, list(workers) if workers else None)

    def load_model(self, model: str, progress: bool = True) -> dict:
        """Load ``model`` now (a split model: across its planned workers, with a progress bar
        of the layers sent) rather than on first use; returns the head's resident info."""
        from .shards import load_model

        return load_model(self, model, progress)

    # -- pipelines and patterns (workloads/pipeline.py, workloads/patterns.py) ---------------
    def pipeline(self, spec, priority: int = 0, **params):
        """Check and submit a pipeline (a dict, a YAML path, or a shipped name like ``"rag"``);
        returns a ``PipelineRun`` whose ``result()`` is a ``PipelineResult`` (outputs by stage,
        with worker, tier and time span per stage). ``params`` override the spec's params;
        ``priority`` is the run's Dask priority (a stage's own ``priority:`` wins)."""
        return importlib.import_module("workloads.pipeline").submit_pipeline(self, spec, params, priority)

    def run_pipeline(self, spec, priority: int = 0, **params):
        """Blocking ``pipeline``: the ``PipelineResult``."""
        return self.pipeline(spec, priority=priority, **params).result()

    def fan_out(self, value, branches, aggregate: str = "all", priority: int = 0, **kwargs):
        """One input through several branches at once; ``aggregate`` is first, all, majority,
        weighted_average (``weights=``) or ensemble (``combine=``). See workloads/patterns.py."""
        return importlib.import_module("workloads.patterns").fan_out(self, value, branches, aggregate,
                                                                     priority=priority, **kwargs)

    def batch(self, branch, items, in_flight: int = 8, progress: bool = True, errors: str = "raise",
              priority: int = 0) -> list:
        """``branch`` over many ``items`` with at most ``in_flight`` at once and a progress bar."""
        return importlib.import_module("workloads.patterns").batch(self, branch, items, in_flight, progress, errors,
                                                                   priority)

    # -- benchmarks (workloads/bench.py, workloads/bench_report.py) --------------------------
    def bench(self, suite: str = "quick", tiers=None, workers=None, report: str | None = None,
              parallel: bool = False, progress: bool = True) -> list[dict]:
        """Run a benchmark suite (quick, models, full, seed) on every worker, or on the given
        ``tiers`` / ``workers``; returns the records and, with ``report=FOLDER``, writes
        report.md, results.csv and PNG charts there."""
        mod = importlib.import_module("workloads.bench_report")
        records = mod.run_suite(self, suite, tiers=tiers, workers=workers, parallel=parallel, progress=progress)
        if report:
            mod.write_report(records, report, title=f"Cluster benchmark ({suite})")
        return records

    def run_jobs(self, jobs: list, on_result=None, in_flight: int = 4, progress: bool = True,
                 ids: list | None = None, priority: int = 0) -> dict:
        """Run job dicts in the GPU job-queue seed's format; returns ``{"results": [...],
        "stats": {...}}`` (see workloads/bench_report.py). ``ids``: job_id of jobs naming none;
        ``priority``: of jobs without a ``"priority"`` key."""
        mod = importlib.import_module("workloads.bench_report")
        outcomes, wall = mod.run_jobs(self, jobs, on_result=on_result, in_flight=in_flight, progress=progress, ids=ids,
                                      priority=priority)
        return {"results": outcomes, "stats": mod.job_stats(outcomes, wall, self.config.cpu_tier)}

    # -- jobs --------------------------------------------------------------------------------
    def jobs(self, state: str | Sequence[str] | None = None, limit: int | None = None) -> "JobList":
        """Jobs submitted through any client of this cluster, oldest first.

        ``state``: one of pending, running, done, failed, cancelled (or a list of them).
        Each row has key, what, kind, tier, state, worker, submitted/started/finished times
        and the error of a failed job.
        """
        states = [state] if isinstance(state, str) else list(state) if state else None
        from .jobs import STATES

        for st in states or ():
            if st not in STATES:
                raise InputError(f"state {st!r} is not one of {', '.join(STATES)}")
        return JobList(self.client.run_on_scheduler(job_rows, states=states, limit=limit))

    def job(self, key: str | Future) -> dict:
        """One job's row (see ``jobs``)."""
        key = key.key if isinstance(key, Future) else key
        for row in self.client.run_on_scheduler(job_rows):
            if row["key"] == str(key):
                return row
        if key in self.client.futures:  # submitted by this client, not yet on the scheduler
            return {"key": str(key), "what": str(key), "kind": "task", "tier": None, "state": "pending",
                    "worker": None, "address": None, "submitted": None, "started": None, "finished": None, "error": None}
        raise KeyError(f"no job {key!r} on the job board (it keeps the last 2000 jobs)")

    def cancel(self, job: str | Future | Sequence[str | Future]) -> None:
        """Cancel jobs (futures or keys, from any client). A running generation stops within
        a token or two; other running tasks finish but their results are dropped."""
        items = list(job) if isinstance(job, (list, tuple)) else [job]
        keys = [j.key if isinstance(j, Future) else j for j in items]
        futures = [j if isinstance(j, Future) else Future(j, self.client) for j in items]
        # Dask first: the scheduler forgets the task, so a generation that stops early is not
        # recorded as done; then the flag that ends the running loop within a token or two
        self._redo.cancel(keys)  # not submitted again after a scheduler restart either
        self.client.cancel(futures, force=True)
        self.client.run(_cancel_on_worker, keys)

    # -- status ------------------------------------------------------------------------------
    def status(self) -> ClusterStatus:
        """Workers with tier, simulated/real, device, VRAM/RAM, resident models, running tasks."""
        return ClusterStatus(worker_rows(self._workers(), self.config.tier_names))

    def close(self) -> None:
        """Disconnect; an embedded cluster is shut down (workers first, then the scheduler)."""
        self._redo.close()
        if self.cluster is not None and self.client.status == "running":
            # The embedded cluster goes away on purpose: the TierGuard stops re-routing, and
            # every task is released, so that no worker leaves with results the scheduler
            # still wants ("Removing worker ... lose already computed task(s)"). Then workers
            # before the scheduler: a worker process whose scheduler vanished first logs a
            # heartbeat traceback on the way out.
            # A task still running (Ctrl-C in the middle of a job) is abandoned: its worker
            # would log the cancelled task, and its nanny that it had to kill the busy
            # process; both are expected here, so those two loggers keep quiet meanwhile.
            nanny_log = logging.getLogger("distributed.nanny")
            level = nanny_log.level
            try:
                self.client.run_on_scheduler(_stand_down)
                self.client.run(_quiet_shutdown)
                keys = list(self.client.futures)
                if keys:
                    self.client.cancel([Future(k, self.client) for k in keys], force=True)
                nanny_log.setLevel(logging.ERROR)
                self.cluster.scale(0)
                deadline = time.monotonic() + 15
                while self.client.scheduler_info(n_workers=-1)["workers"] and time.monotonic() < deadline:
                    time.sleep(0.1)
            except Exception:  # closing anyway
                logger.debug("graceful worker shutdown failed", exc_info=True)
            finally:
                self.client.close()
                self.cluster.close()
                nanny_log.setLevel(level)
            return
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()

    def __enter__(self) -> "AICluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        tiers = {t: len(a) for t, a in self.live_tiers().items()}
        return f"<AICluster {self.scheduler_address} tiers={tiers} dashboard={self.dashboard_link}>"


class JobList(list):
    """Job rows (dicts) that print as a table and render in notebooks."""

    def __str__(self) -> str:
        return format_jobs(self)

    def _repr_html_(self) -> str:
        import html

        return "<pre>" + html.escape(format_jobs(self)) + "</pre>"

    def by_state(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self:
            out[r["state"]] = out.get(r["state"], 0) + 1
        return out


def _stand_down(dask_scheduler=None) -> None:
    guard = dask_scheduler.plugins.get(routing.TierGuard.name)
    if guard is not None:
        guard.closing = True


def _quiet_shutdown(dask_worker=None) -> None:
    logging.getLogger("distributed.worker.state_machine").setLevel(logging.ERROR)


def _cancel_on_worker(keys: list, dask_worker=None) -> None:
    host = dask_worker.plugins.get(PLUGIN_NAME)
    if host is not None:
        for k in keys:
            host.cancel(k)


async def _unload_on_worker(model: str, dask_worker=None) -> bool:
    import asyncio

    host = dask_worker.plugins.get(PLUGIN_NAME)
    if host is None:
        return False
    # in a thread: unload waits for a task that is using the model, and the worker's
    # event loop (heartbeats) must not wait with it
    was = bool(await asyncio.to_thread(host.unload, model))
    return host.release_shard(model) or was


def _sampling(max_tokens, temperature, top_p, stop, seed, presence_penalty=0.0, frequency_penalty=0.0,
              logit_bias=None, logprobs=None, response_format=None) -> dict:
    """Checked generation parameters (each error names the parameter and the value). The
    ones past ``seed`` are OpenAI's, done by llama.cpp's samplers; they are in the result
    only when set, so backends without them (transformers) are not asked."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
        raise InputError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    if isinstance(temperature, bool) or not (isinstance(temperature, (int, float)) and temperature >= 0):
        raise InputError(f"temperature must be >= 0, got {temperature!r}")
    if isinstance(top_p, bool) or not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise InputError(f"top_p must be in (0, 1], got {top_p!r}")
    # one string is one stop string (as in OpenAI's API), not a list of its characters
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(s, str) for s in stop):
        raise InputError(f"stop must be a string or a list of strings, got {stop!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InputError(f"seed must be an integer, got {seed!r}")
    out = dict(max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p), stop=stop, seed=seed)
    for name, v in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -2 <= v <= 2:
            raise InputError(f"{name} must be a number from -2 to 2, got {v!r}")
        if v:
            out[name] = float(v)
    if logit_bias:
        if not isinstance(logit_bias, dict):
            raise InputError(f"logit_bias must map token ids to numbers from -100 to 100, got {logit_bias!r:.60}")
        bias = {}
        for k, v in logit_bias.items():
            try:
                tok = int(k)
            except (TypeError, ValueError):
                raise InputError(f"logit_bias: {k!r} is not a token id") from None
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
                raise InputError(f"logit_bias[{k!r}] must be a number from -100 to 100, got {v!r}")
            bias[tok] = float(v)
        out["logit_bias"] = bias
    if logprobs is not None:
        if isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= 20:
            raise InputError(f"logprobs (the alternatives per token) must be an integer from 0 to 20, got {logprobs!r}")
        out["logprobs"] = logprobs
    if response_format is not None:
        from workloads.backends.llamacpp import grammar_for

        grammar = grammar_for(response_format)
        if grammar:
            out["grammar"] = grammar
    return out


#: what `_sampling` adds for llama.cpp's samplers only
LLAMA_SAMPLING = ("presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "grammar")


def _check_backend_sampling(spec, model: str, params: dict) -> None:
    extra = [k for k in LLAMA_SAMPLING if k in params]
    if extra and spec.backend == "transformers":
        names = ", ".join("response_format" if k == "grammar" else k for k in extra)
        raise InputError(f"model {model!r} (transformers) does not support {names}; the llamacpp backend does")


def _sampling_kwargs(kwargs: dict) -> dict:
    allowed = ("presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "response_format")
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise InputTypeError(f"unexpected keyword argument(s) {', '.join(unknown)}; sampling takes "
                             f"{', '.join(allowed)}")
    return kwargs


ROLES = ("system", "user", "assistant")


def _check_messages(messages) -> list[dict]:
    """Chat messages as plain ``{"role", "content"}`` dicts, or an error naming the bad one."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InputError("messages must be a non-empty list of {\"role\": ..., \"content\": ...}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InputTypeError(f"message {i} is a {type(m).__name__}, not a {{\"role\", \"content\"}} mapping")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise InputError(f"message {i}: role {role!r} is not one of {', '.join(ROLES)}")
        if isinstance(content, list):  # OpenAI's content parts: text only here
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise InputError(f"message {i}: only text content is supported")
            content = "".join(p.get("text", "") for p in content)
        if not isinstance(content, str) or not content.strip():
            raise InputError(f"message {i} ({role}) has no text content")
        out.append({"role": role, "content": content})
    if out[-1]["role"] == "assistant":
        raise InputError("the last message is the assistant's: end with a user message to get an answer")
    return out


def _check_texts(value, what: str) -> tuple[list[str], bool]:
    """A list of non-empty strings (and whether a single string was given)."""
    if isinstance(value, str):
        items, single = [value], True
    elif isinstance(value, (list, tuple)):
        items, single = list(value), False
    else:
        raise InputTypeError(f"expected a string or a list of strings as {what}s, got {type(value).__name__}")
    if not items:
        raise InputError(f"no {what}s given: the list is empty")
    for i, t in enumerate(items):
        if not isinstance(t, str):
            raise InputTypeError(f"{what} {i} is a {type(t).__name__}, not a string: {t!r:.60}")
        if not t.strip():
            raise InputError(f"{what} {i} is empty")
    return items, single


def connect(config: str | dict | Config | None = None, address: str | None = None,
            timeout: float = 30, **cluster_kwargs) -> AICluster:
    """Connect to a cluster, or start the embedded one.

    Parameters
    ----------
    config
        A config.yaml path, dict or Config (None: $AICLUSTER_CONFIG, ./config.yaml, the project's).
    address
        A scheduler address (``tcp://192.168.1.10:8786``); None starts the embedded cluster of
        ``local.workers`` (simulated tiers on a machine without GPUs) and waits for its workers.
    cluster_kwargs
        Passed to ``cluster.local.local_cluster`` (e.g. ``dashboard_port=0``).

    Examples
    --------
    >>> from cluster import connect
    >>> ai = connect()                                   # embedded cluster
    >>> ai = connect(address="tcp://192.168.1.10:8786")  # the scheduler on PC1
    >>> ai.submit(sum, [1, 2], tier="VRAM12").result()
    3
    """
    cfg = load_config(config)
    if address is None:
        _refuse_in_worker_bootstrap()
        processes = cluster_kwargs.get("processes")
        if (cfg.local.processes if processes is None else processes):
            where = _unguarded_main_call()
            if where:
                raise RuntimeError(f"{where}: {MAIN_GUARD_HELP}")
        from .local import local_cluster

        cluster = local_cluster(cfg, **cluster_kwargs)
        try:
            client = Client(cluster, security=cfg.security_object())
            client.wait_for_workers(len(cfg.local.workers), timeout=timeout)
            ai = AICluster(client, cfg, cluster)
            _wait_for_hosts(client, len(cfg.local.workers), timeout=15)
        except BaseException:
            cluster.close()  # do not leave worker processes behind
            raise
        return ai
    if cluster_kwargs:
        raise TypeError(f"{', '.join(cluster_kwargs)} only apply to the embedded cluster (address=None)")
    from .security import check_address

    address = check_address(address, cfg.security.tls, cfg.path or "the config")
    try:
        client = Client(address, security=cfg.security_object(), timeout=timeout)
    except OSError as e:
        raise ConnectionError(
            f"cannot reach the scheduler at {address} ({e}). Is `aicluster scheduler` (or "
            f"`dask scheduler --preload cluster.scheduler`) running there, and is the port open?"
        ) from None
    return AICluster(client, cfg)


def _identity_workers(dask_scheduler=None) -> dict:
    return dask_scheduler.identity(n_workers=-1)["workers"]


def _hosts_reporting(dask_scheduler=None) -> int:
    return sum(1 for ws in dask_scheduler.workers.values() if "aicluster" in (ws.metrics or {}))


def _wait_for_hosts(client, n: int, timeout: float) -> None:
    """Until ``n`` workers' heartbeats carry their ModelHost (budget, models, shard server),
    so that the first ``status()`` of a new embedded cluster shows them (at most ``timeout``)."""
    deadline = time.monotonic() + timeout
    while client.run_on_scheduler(_hosts_reporting) < n and time.monotonic() < deadline:
        time.sleep(0.1)


MAIN_GUARD_HELP = (
    "connect() is called at the top level of this script; the embedded cluster starts each worker in a "
    "new Python process that imports the script, which would call connect() again, without end. Put the "
    "calls under  if __name__ == \"__main__\":  (see the README, \"From Python and notebooks\")."
)


def _unguarded_main_call() -> str | None:
    """``"script.py:12"`` when this call comes from the top level of the ``__main__`` script,
    outside ``if __name__ == "__main__":`` (each worker process would run it again), else None.
    """
    import ast
    import sys

    frame = sys._getframe(1)
    while frame is not None and not (frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__") == "__main__"):
        frame = frame.f_back
    path = frame.f_globals.get("__file__") if frame is not None else None
    if not path or not str(path).endswith(".py"):
        return None  # a notebook, `python -c`, an interactive session: nothing re-imports them
    try:
        tree = ast.parse(open(path, encoding="utf-8").read())
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    line = frame.f_lineno

    def is_main_guard(node) -> bool:
        t = node.test
        return (isinstance(t, ast.Compare) and len(t.ops) == 1 and isinstance(t.ops[0], ast.Eq)
                and {ast.unparse(t.left), ast.unparse(t.comparators[0])} == {"__name__", "'__main__'"})

    for node in ast.walk(tree):
        if isinstance(node, ast.If) and is_main_guard(node) and node.lineno <= line <= (node.end_lineno or line):
            return None
    return f"{path}:{line}"


def _refuse_in_worker_bootstrap() -> None:
    """Inside a process that multiprocessing is still starting (it re-imports the parent's
    script as ``__mp_main__``), starting a cluster would fork processes without end; Python
    answers with a wall of tracebacks. Say what to do instead, once, and leave."""
    import multiprocessing

    if getattr(multiprocessing.current_process(), "_inheriting", False):
        import sys

        print(f"aicluster: {MAIN_GUARD_HELP}", file=sys.stderr, flush=True)
        raise SystemExit(1)
