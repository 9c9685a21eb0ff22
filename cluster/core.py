"""The core every feature submits through: routes, routed work, model work, streams, workers.

``AICluster`` (the facade users hold) owns one ``Core`` as ``ai.core``; the gateway, spread,
split models, pipelines, patterns, benchmarks and the CLI use it the same way, so no module
reaches into another's internals (ARCHITECTURE.md, "A request's path"). What it does:

* **Routes.** ``route(tier)`` / ``resolve(chain)`` read the workers from the scheduler's
  events (``workerview.WorkerView``, no round trip); ``model_route(model, kinds, verb)`` gives
  ``(spec, Route)`` for a model: its tier chain, a share of a batch slot for llama.cpp, or
  the head of a split model (``cluster/shards.py``).
* **Submits.** ``submit_routed(route, what, fn, ...)`` and ``submit_anywhere(what, fn, ...)``
  annotate the task for the job board and the TierGuard and record how to submit it again
  after a scheduler restart (``cluster/redo.py``); ``submit_generation`` is one generation
  (a Future, or a ``GenerationStream``) whose stream goes on from its text after a restart.
* **Streams.** ``open_stream(id, sink)`` / ``close_stream(id)`` deliver the text pieces the
  workers publish (``cluster/streams.py``) to a sink on the client's event loop.
* **Workers.** ``workers()``: every worker's identity and metrics, asked of the scheduler.
"""
from __future__ import annotations

import queue
import uuid
from dataclasses import replace
from typing import Any, Callable, Iterator

import dask
from distributed import Client, Future

from workloads.backends import BUILTIN, EMBED_BACKENDS, GENERATE_BACKENDS, InputError
from workloads.llm import generate_task
from workloads.transfer import FetchError

from . import routing, shards
from .config import Config
from .jobs import SchedulerLost, failure
from .modelfiles import offer_from_client
from .plugin import cancel_on_worker
from .redo import Redo
from .streams import STREAM_TOPIC, close_stream
from .workerview import WorkerView

__all__ = ["Core", "GenerationStream"]


class Core:
    """Routing, submission, streams and the worker listing of one client (see the module)."""

    def __init__(self, client: Client, config: Config):
        self.client = client
        self.config = config
        self._streams: dict[str, Callable] = {}
        self._subscribed = False
        #: the workers as the scheduler's events report them: routing reads this, no round trip
        self.view = WorkerView(client)
        self._comm = client.scheduler_comm
        #: per stream id: what it has received ({"text", "ids"}: a stream generated again after
        #: a scheduler restart goes on from there), and its current attempt (a new one each time)
        self.received: dict[str, dict] = {}
        self._attempt: dict[str, int] = {}
        #: tasks lost with a restarting scheduler are submitted again (cluster/redo.py)
        self.redo = Redo(client, on_reconnected=self.check_reconnected)
        #: model sources this client has looked for in the cluster (``offer``): once a session
        self._offered: set[str] = set()

    def check_reconnected(self) -> None:
        """After the client reconnected to a (restarted) scheduler: subscribe to the event
        topics again (distributed does not) and take a new snapshot of the workers."""
        comm = self.client.scheduler_comm
        if comm is None or comm is self._comm:
            return
        first = self._comm is None
        self._comm = comm
        if first:
            return
        if self._subscribed:
            self.client.subscribe_topic(STREAM_TOPIC, self._on_stream_event)
        self.view.resubscribe()

    def close(self) -> None:
        self.redo.close()

    # -- workers and routes --------------------------------------------------------------------
    def workers(self) -> dict:
        """Every worker's identity with its metrics (one round trip; status, planning).
        Asked of the scheduler directly: ``Client.scheduler_info()`` hands back a cached
        identity that the client's periodic refresh can replace with one listing no workers."""
        return self.client.run_on_scheduler(_identity_workers)

    def live_tiers(self) -> dict[str, list[str]]:
        """``{tier: [worker addresses]}`` of the workers connected now."""
        self.check_reconnected()
        return routing.live_tiers(self.view.workers(), self.config.tiers)

    def resolve(self, chain: list[str], what: str) -> routing.Route:
        """``routing.resolve`` on the event-fed view; a chain that looks empty is checked
        against the scheduler once before it is an error (the view may lag a restart)."""
        try:
            return routing.resolve(chain, self.live_tiers(), what)
        except routing.NoWorkerForTier:
            self.view.refresh()
            try:
                return routing.resolve(chain, self.live_tiers(), what)
            except routing.NoWorkerForTier:
                # a worker of the chain left moments ago (crashed: its nanny restarts it): the
                # task waits for it like a task already running there would (TierGuard, for
                # routing.restart_grace), instead of failing in the few seconds of the restart
                grace = self.config.routing.restart_grace
                tier = self.view.recently_left(chain, grace) if grace > 0 else None
                if tier is None and grace > 0 and self.view.starting(grace):
                    tier = chain[0]  # a scheduler that just started, before its workers joined: wait for them
                if tier is None:
                    raise
                return routing.Route(tier=tier, chain=list(chain))

    def check_tier(self, tier: str) -> None:
        if tier not in self.config.tiers:
            raise InputError(f"tier {tier!r} is not a tier; known: {', '.join(self.config.tiers)}")

    def route(self, tier: str, what: str = "this task") -> routing.Route:
        """Where work for ``tier`` goes now (raises ``NoWorkerForTier`` when nowhere)."""
        self.check_tier(tier)
        return self.resolve(self.config.fallback_chain(tier), what)

    def offer(self, model: str, spec) -> None:
        """A model file that is on this client's PC and on no PC of the cluster goes to the
        scheduler's PC before the first work of it (``modelfiles.offer_from_client``), so the
        workers can fetch it from there; once per source and session."""
        source = spec.source
        if spec.backend not in BUILTIN or source in self._offered:
            return
        try:
            offer_from_client(self.client, source)
        except FetchError as e:  # (the scheduler's PC refused it: no room, a chunk spoiled on the way)
            raise InputError(f"model {model!r}: its file {source!r} is only on this PC, and sending it to the "
                             f"scheduler's PC failed ({type(e).__name__}: {e})") from None
        self._offered.add(source)

    def model_route(self, model: str, kinds: tuple[str, ...], verb: str, tier: str | None = None) -> tuple[Any, routing.Route]:
        """``(spec, Route)`` for work of ``model`` whose backend is one of ``kinds`` (``verb``
        names the work in the error for a model of another kind): its tier chain (or ``tier``
        with its fallbacks), the worker where it is resident decided on the scheduler
        (``routing.ModelAffinity``), a share of a batch slot for llama.cpp, or the head of a
        split model (``cluster/shards.py``; the spec then carries its plan)."""
        spec = self.config.model(model)
        if spec.backend in GENERATE_BACKENDS + EMBED_BACKENDS and spec.backend not in kinds:
            raise InputError(f"model {model!r} ({spec.backend}) cannot {verb}; models that can: "
                             + ", ".join(n for n, m in self.config.models.items() if m.backend in kinds))
        self.offer(model, spec)
        if spec.sharded and "llamacpp" in kinds:
            return shards.route_for(self, model, spec, int(spec.options.get("parallel", 8)))
        chain = self.config.fallback_chain(tier or spec.tier)
        if tier is not None:
            self.check_tier(tier)
        route = replace(self.resolve(chain, f"model {model!r}"), model=model)
        if spec.backend == "llamacpp" and "llamacpp" in kinds:
            # one resident model decodes `parallel` requests at once: each takes a share of the slot
            route = route.shared(routing.slot_share(int(spec.options.get("parallel", 8))))
        return spec, route

    # -- submitting ----------------------------------------------------------------------------
    def submit_routed(self, route: routing.Route, what: str, fn, *args, kind: str = "task", priority: int = 0,
                      group: str | None = None, parts: int | None = None, redo: bool = True, **kwargs) -> Future:
        """``fn(*args, **kwargs)`` along ``route``, shown as ``what`` (of ``kind``) on the job
        board; ``group``/``parts``: this task is one of ``parts`` chunks of one call, shown as
        one row. ``redo``: submitted again under the same key if the scheduler restarts while
        the future is held (cluster/redo.py). Dask's ``key``, ``pure``, ``retries`` pass through."""
        ann = route.annotation(what, kind, priority)
        if group is not None:
            ann[routing.ANNOTATION].update(group=group, parts=parts)
        with dask.annotate(**ann):
            f = self.client.submit(fn, *args, **route.submit_kwargs(), priority=priority, **kwargs)
        if redo and self.redo.can_redo((args, kwargs)):
            again = {**kwargs, "kind": kind, "priority": priority, "group": group, "parts": parts, "redo": False,
                     "key": f.key}
            self.redo.track(f, lambda: self.submit_routed(route, what, fn, *args, **again), what)
        return f

    def submit_anywhere(self, what: str, fn, *args, kind: str = "task", priority: int = 0, redo: bool = True,
                        **kwargs) -> Future:
        """``fn(*args, **kwargs)`` on any worker, on the job board too (no tier: nothing for
        the TierGuard to do); ``redo`` as in ``submit_routed``."""
        info = {"chain": [], "what": what, "kind": kind, **({"priority": priority} if priority else {})}
        with dask.annotate(**{routing.ANNOTATION: info}):
            f = self.client.submit(fn, *args, priority=priority, **kwargs)
        if redo and self.redo.can_redo((args, kwargs)):
            again = {**kwargs, "kind": kind, "priority": priority, "redo": False, "key": f.key}
            self.redo.track(f, lambda: self.submit_anywhere(what, fn, *args, **again), what)
        return f

    def submit_generation(self, route, model: str, spec, params: dict, prompt: str | None, index=None,
                          messages=None, stream: bool = False, priority: int = 0, kind: str = "generate",
                          stream_id: str | None = None):
        """One generation task (``workloads.llm.generate_task``) of checked ``params``
        (``workloads.inputs.check_sampling``): a Future, or a ``GenerationStream`` with
        ``stream``; with a ``stream_id`` the caller opened (``open_stream``), a Future whose
        pieces go there. After a scheduler restart it is submitted again, a stream going on
        from the text it has sent."""
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
                got = self.received.get(stream_id)
                if attempt and got and got["text"]:
                    # the new scheduler's hub knows nothing of it: go on from what arrived here
                    extra["resume_from"] = {"text": got["text"], "ids": list(got["ids"])}
            return self.submit_routed(route, what, generate_task, prompt, model, spec, params, index=index,
                                      kind=kind, key=key, priority=priority, task_priority=priority, redo=False,
                                      **extra)

        key = f"{kind}-{model}-{uuid.uuid4().hex[:12]}"
        f = submit(key)
        if stream_id is None:
            self.redo.track(f, lambda: submit(key), what)  # (the key: a recipe must not hold the future)
        else:
            # after a scheduler restart, a stream goes on from the text it has sent (its
            # pieces carry their token ids; a backend that cannot continue says the stream was cut)
            attempts = iter(range(1, 1 << 30))
            self.redo.track(f, lambda: submit(key, next(attempts)), what,
                            cleanup=lambda: self._forget_stream(stream_id))
        if s is None:
            return f
        s.future = f
        return s

    def cancel(self, items: list) -> None:
        """Cancel jobs (futures or keys, from any client): not submitted again after a
        scheduler restart, forgotten by the scheduler (so a generation that stops early is
        not recorded as done), then the flag that ends a running generation loop on its
        worker within a token or two."""
        keys = [j.key if isinstance(j, Future) else j for j in items]
        futures = [j if isinstance(j, Future) else Future(j, self.client) for j in items]
        self.redo.cancel(keys)
        self.client.cancel(futures, force=True)
        self.client.run(cancel_on_worker, keys)

    # -- streams -------------------------------------------------------------------------------
    def new_stream_id(self) -> str:
        """An id for a stream of this client (the scheduler's hub sends its pieces here only)."""
        return f"{self.client.id}/{uuid.uuid4().hex}"

    def open_stream(self, stream_id: str, sink: Callable[[str | None], None]) -> None:
        """Send the text pieces of stream ``stream_id`` (from ``new_stream_id``) to ``sink``
        (None ends the stream); ``sink`` is called on the client's event loop thread and must
        not block."""
        self.check_reconnected()
        if not self._subscribed:
            self.client.subscribe_topic(STREAM_TOPIC, self._on_stream_event)
            self._subscribed = True
        self._streams[stream_id] = sink

    def close_stream(self, stream_id: str) -> None:
        """The reader is done with the stream (its "sent text" mark stays while the
        future is held: a finished stream is not generated again after a restart)."""
        if self._streams.pop(stream_id, None) is not None:
            close_stream(self.client, f"{stream_id}#{self._attempt.get(stream_id, 0)}")

    def _on_stream_event(self, event) -> None:
        tagged, piece, *rest = event[1]
        stream_id, _, attempt = str(tagged).partition("#")
        sink = self._streams.get(stream_id)
        if sink is not None and str(self._attempt.get(stream_id, 0)) == (attempt or "0"):
            if piece:
                got = self.received.setdefault(stream_id, {"text": "", "ids": []})
                got["text"] += piece
                got["ids"] += list(rest[0]) if rest and rest[0] else []
            sink(piece)

    def _forget_stream(self, stream_id: str) -> None:
        self.received.pop(stream_id, None)
        self._attempt.pop(stream_id, None)


class GenerationStream:
    """Text pieces of one generation as they are produced; ``.result()`` gives the final dict."""

    def __init__(self, core: Core, stream_id: str | None = None):
        self.core = core
        self.stream_id = stream_id = stream_id or core.new_stream_id()
        self._q: queue.Queue = queue.Queue()
        core.open_stream(stream_id, self._q.put)
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
            self.core.close_stream(self.stream_id)

    def result(self, timeout=None) -> dict:
        return self.future.result(timeout=timeout)


def _identity_workers(dask_scheduler=None) -> dict:
    return dask_scheduler.identity(n_workers=-1)["workers"]
