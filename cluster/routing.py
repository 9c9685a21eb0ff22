"""Model/job -> Dask resources, with fallback tiers and affinity to resident models.

Two layers keep a task out of Dask's ``no-worker`` state:

* the client resolves a tier from the live workers before submitting, and raises
  ``NoWorkerForTier`` at once when nothing can serve it;
* ``TierGuard``, a scheduler plugin, catches the race where the chosen worker dies or
  leaves before the task runs: it re-routes the task along its fallback chain, or, when no
  worker of the chain comes back within ``routing.restart_grace`` seconds (a nanny
  restarting a crashed worker), fails it with the same clear error. Dask itself would
  leave the task waiting forever.
"""
from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, field, replace

from distributed.diagnostics.plugin import SchedulerPlugin

from workloads.compat import restrict_resources, transitions

__all__ = ["NoWorkerForTier", "WorkersPaused", "Route", "live_tiers", "resolve", "slot_share", "TierGuard", "ModelAffinity", "ANNOTATION"]

logger = logging.getLogger("cluster.routing")

#: task annotation carrying ``{"chain": [tier, *fallbacks], "what": "..."}``
ANNOTATION = "aicluster"


class NoWorkerForTier(RuntimeError):
    """No live worker carries the requested tier or any of its fallbacks."""

    def __init__(self, chain: list[str], live: list[str], what: str = "this task"):
        self.chain, self.live, self.what = list(chain), list(live), what
        wanted = chain[0] + (f" (or fallbacks {', '.join(chain[1:])})" if len(chain) > 1 else " (no fallback configured)")
        lives = ", ".join(live) or "none: no worker is connected"
        super().__init__(
            f"no live worker can run {what}: it needs tier {wanted}; live tiers: {lives}. "
            f"Start one with `aicluster worker SCHEDULER_ADDRESS --tier {chain[0]}`, "
            f"or add a fallback under routing.fallback.{chain[0]} in config.yaml."
        )

    def __reduce__(self):
        return (type(self), (self.chain, self.live, self.what))


class WorkersPaused(RuntimeError):
    """A task's only workers stayed paused (memory) for the whole grace period."""

    def __init__(self, what: str, paused: list[tuple[str, int | None, int | None]], grace: float):
        from dask.utils import format_bytes

        self.args_ = (what, paused, grace)
        each = ", ".join(f"{n} ({format_bytes(m) if m is not None else '?'} of {format_bytes(lim) if lim else '?'})"
                         for n, m, lim in paused)
        super().__init__(
            f"{what}: every worker that can run it is paused for memory ({each}) and stayed paused for "
            f"{grace:.0f} s (routing.restart_grace). Unload models (ai.unload), free the data the workers hold, "
            f"or give them a larger memory_limit")

    def __reduce__(self):
        return (type(self), self.args_)


def live_tiers(workers: dict, tiers) -> dict[str, list[str]]:
    """``{tier: [worker addresses]}`` from ``scheduler_info()["workers"]``.

    Running and *paused* workers count: a worker pauses under memory pressure and resumes
    by itself, and Dask holds its tasks until then (the TierGuard does not fail them).
    Closing and closed workers do not.
    """
    out: dict[str, list[str]] = {}
    for addr, w in workers.items():
        if str(w.get("status", "running")).removeprefix("Status.") not in ("running", "paused"):
            continue
        for r, count in (w.get("resources") or {}).items():
            if r in tiers and count > 0:
                out.setdefault(r, []).append(addr)
    return out


@dataclass
class Route:
    """Where a call goes: the tier's resource, preferred workers, and the annotation."""

    tier: str
    chain: list[str]
    workers: list[str] = field(default_factory=list)
    fell_back: bool = False
    #: the live workers of ``tier`` when the route was resolved
    tier_workers: list[str] = field(default_factory=list)
    #: how much of the tier resource one task takes: 1 (a worker's slot), or a fraction for
    #: a model that decodes several requests at once (``slot_share``)
    amount: float = 1.0
    #: the model the task uses: ``ModelAffinity`` sends it where the model is resident
    model: str | None = None

    def submit_kwargs(self) -> dict:
        # A worker list is strict, never ``allow_other_workers=True``: Dask treats loose
        # restrictions as no restrictions at all when it steals work, so an idle worker
        # *without* the tier's resource can take the task and its state machine dies on a
        # KeyError (distributed 2026.8, stealing.py ``_get_thief``). If the listed workers
        # leave, the task falls into ``no-worker`` and the TierGuard below re-routes it to
        # the tier (or its fallbacks) without the worker list. Residency is not a list
        # made here: ``ModelAffinity`` decides it on the scheduler, from free slots.
        kw: dict = {"resources": {self.tier: self.amount}}
        if self.workers:
            kw["workers"] = list(self.workers)
        return kw

    def spread(self) -> "Route":
        """The same tier without the preferred workers (all of the tier's workers share the work)."""
        return replace(self, workers=[])

    def shared(self, amount: float) -> "Route":
        """The same route for tasks that take ``amount`` of the tier resource each."""
        return replace(self, amount=amount)

    def annotation(self, what: str, kind: str = "task", priority: int = 0) -> dict:
        info = {"chain": self.chain[self.chain.index(self.tier):], "what": what, "kind": kind}
        if self.amount != 1:
            info["amount"] = self.amount
        if self.model:
            info["model"] = self.model
        if priority:
            info["priority"] = priority
        return {ANNOTATION: info}


def slot_share(parallel: int) -> float:
    """The fraction of a tier resource one generation task takes when the model decodes
    ``parallel`` requests at once: ``1/2**k``, the largest power-of-two fraction that lets
    ``parallel`` tasks share one slot. Powers of two add up exactly in floating point, so a
    worker's resource comes back to exactly 1 and a task that needs the whole slot (a GPU
    benchmark job) runs once the generations are done; with a ``parallel`` that is not a
    power of two, the few extra tasks wait in the model's queue, which costs nothing."""
    import math

    return 1.0 if parallel <= 1 else 2.0 ** -math.ceil(math.log2(parallel))


def resolve(chain: list[str], live: dict[str, list[str]], what: str = "this task") -> Route:
    """Pick the first tier of ``chain`` that has a live worker."""
    for tier in chain:
        if live.get(tier):
            return Route(tier=tier, chain=list(chain), fell_back=tier != chain[0], tier_workers=list(live[tier]))
    raise NoWorkerForTier(chain, sorted(live), what)


class TierGuard(SchedulerPlugin):
    """Re-route or fail tasks that fall into ``no-worker`` (see module docstring)."""

    name = "aicluster-tier-guard"
    idempotent = True

    def __init__(self, grace: float = 30.0) -> None:
        #: seconds a task waits for a worker of its tiers to (re)join before it fails: a
        #: crashed worker's nanny restarts it, and its tasks should run there again
        self.grace = grace
        self.scheduler = None
        self.rerouted = 0
        self.failed = 0
        #: key -> the token of its scheduled final look (one timer per wait)
        self._waiting: dict = {}
        #: set by ``AICluster.close`` of an embedded cluster: its workers are leaving on
        #: purpose, so their tasks are neither re-routed nor waited for
        self.closing = False

    async def start(self, scheduler) -> None:
        self.scheduler = scheduler

    def remove_worker(self, scheduler, worker, *, stimulus_id=None, **kwargs) -> None:
        if self.closing:
            return
        # tasks already waiting in no-worker (e.g. for a paused worker that then died) are
        # not transitioned again by Dask: look at them once more
        self._recheck(scheduler)

    def add_worker(self, scheduler, worker) -> None:
        # a task waiting out the grace runs as soon as a worker of an acceptable tier joins
        # (a restarted worker has a new address: Dask would not give it a task pinned to
        # the old one, nor one routed to a fallback tier while the first tier was away)
        if not self.closing:
            self._recheck(scheduler)

    def log_event(self, topic, msg) -> None:
        # a worker that registered while starting up, or that resumes after a pause, becomes
        # "running" later: tasks pinned elsewhere or waiting for its tier get it then
        if (not self.closing and self.scheduler is not None and isinstance(msg, dict)
                and msg.get("action") == "worker-status-change" and msg.get("status") == "running"):
            self._recheck(self.scheduler)

    def _recheck(self, scheduler) -> None:
        for ts in list(scheduler.unrunnable):
            if (ts.annotations or {}).get(ANNOTATION, {}).get("chain"):
                scheduler.loop.add_callback(self._handle, ts.key)

    def transition(self, key, start, finish, *args, **kwargs) -> None:
        if start == "no-worker" and finish != "no-worker":
            self._waiting.pop(key, None)  # its wait is over
        if finish != "no-worker" or self.scheduler is None or self.closing:
            return
        ts = self.scheduler.tasks.get(key)
        if ts is not None and (ts.annotations or {}).get(ANNOTATION, {}).get("chain"):
            # Transitions must not be started from inside a transition hook.
            self.scheduler.loop.add_callback(self._handle, key)

    def _handle(self, key, final: bool = False) -> None:
        s = self.scheduler
        ts = s.tasks.get(key)
        if ts is None or ts.state != "no-worker" or self.closing:
            return
        info = ts.annotations[ANNOTATION]
        chain, what = list(info["chain"]), info.get("what", str(key))
        amount = info.get("amount", 1)
        live: dict[str, int] = {}
        paused: dict[str, int] = {}
        for ws in s.workers.values():
            into = live if ws.status.name == "running" else paused if ws.status.name == "paused" else None
            if into is None:
                continue
            for r, v in ws.resources.items():
                if r in chain and v > 0:
                    into[r] = into.get(r, 0) + 1
        stimulus_id = f"aicluster-tier-guard-{key}"
        for tier in chain:
            if paused.get(tier) and not live.get(tier):
                # the tier's worker paused under memory pressure (its ModelHost evicts idle
                # models to get it going): Dask runs the task when it resumes; if it dies,
                # remove_worker looks at the task again; if it stays paused, it fails
                restrict_resources(ts, {tier: amount})
                ts.worker_restrictions = None
                if final or self.grace <= 0:
                    later = chain[chain.index(tier) + 1:]
                    if any(live.get(t) for t in later):
                        continue  # a fallback tier has a running worker: it goes there
                    ws_paused = [(str(ws.name), ws.memory.process, ws.memory_limit) for ws in s.workers.values()
                                 if ws.status.name == "paused" and any(ws.resources.get(t, 0) > 0 for t in chain)]
                    return self._fail(key, WorkersPaused(what, ws_paused, self.grace), stimulus_id)
                logger.info("%s waits for a paused worker of tier %s (up to %.0f s)", key, tier, self.grace)
                self._start_timer(key)
                return
            if live.get(tier):
                logger.warning("re-routing %s from %s to tier %s: no live worker has its tier", key, dict(ts.resource_restrictions or {}), tier)
                restrict_resources(ts, {tier: amount})
                ts.worker_restrictions = None
                transitions(s, {key: "processing"}, stimulus_id)
                self.rerouted += 1
                return
        if not final and self.grace > 0:
            # nothing can run it now; a worker may be restarting (nanny) or rejoining
            # (aicluster worker): look again after the grace period, or as soon as a worker
            # joins (add_worker)
            logger.warning("%s: no live worker for tiers %s; waiting up to %.0f s for one to join", key, chain, self.grace)
            self._start_timer(key)
            return
        all_live = sorted({r for ws in s.workers.values() for r in ws.resources})
        self._fail(key, NoWorkerForTier(chain, all_live, what), stimulus_id)

    def _start_timer(self, key) -> None:
        """One final look per wait, ``grace`` after the task fell into no-worker; a task that
        leaves no-worker drops its timer (``transition``), so a later wait gets a full grace."""
        if key in self._waiting:
            return
        token = object()
        self._waiting[key] = token
        self.scheduler.loop.call_later(self.grace, self._final, key, token)

    def _final(self, key, token=None) -> None:
        if self._waiting.get(key) is not token:
            return  # that wait ended (the task ran, or waits again with its own timer)
        del self._waiting[key]
        self._handle(key, final=True)

    def _fail(self, key, exc: BaseException, stimulus_id: str) -> None:
        s = self.scheduler
        logger.warning("failing %s: %s", key, exc)
        recs = s.transition(key, "erred", stimulus_id, exception=pickle.dumps(exc), cause=key,
                            exception_text=f"{type(exc).__name__}: {exc}", traceback_text="")
        transitions(s, recs, stimulus_id)
        self.failed += 1


class ModelAffinity(SchedulerPlugin):
    """Model work goes to a worker that holds the model while it has a free slot; the
    overflow goes to the rest of the tier (Dask picks the least busy worker, which loads
    the model once), so a worker that joins mid-batch gets work at once.

    Decided on the scheduler when a task arrives (``update_graph``, before Dask places
    it), from what every worker reports in its heartbeat (resident and loading models) and
    the tier resource it has left: the client cannot know the free slots, and a worker
    list fixed at submission would pin a whole batch to one worker. The pin is a strict
    worker list on that one task; if that worker leaves, the TierGuard re-routes it.
    """

    name = "aicluster-affinity"
    idempotent = True

    def __init__(self, prefer_resident: bool = True) -> None:
        self.prefer_resident = prefer_resident
        self.pinned = 0
        self.overflow = 0

    def update_graph(self, scheduler, *, tasks=None, **kwargs) -> None:
        if not self.prefer_resident:
            return
        planned: dict[str, float] = {}  # slots given away in this call, not yet on the workers
        for key in tasks or ():
            ts = scheduler.tasks.get(key)
            if ts is None or ts.worker_restrictions or not ts.resource_restrictions or ts.state != "released":
                continue  # only tasks new in this graph (not one already placed under the same key)
            if any(dep.state != "memory" for dep in ts.dependencies):
                continue  # it waits for upstream stages: a slot free now says nothing about then
            model = (ts.annotations or {}).get(ANNOTATION, {}).get("model")
            if not model or len(ts.resource_restrictions) != 1:
                continue
            ((tier, amount),) = ts.resource_restrictions.items()
            best, best_free = None, 0.0
            for ws in scheduler.workers.values():
                if ws.status.name != "running" or ws.resources.get(tier, 0) <= 0:
                    continue
                host = (ws.metrics or {}).get("aicluster") or {}
                if model not in (host.get("models") or {}) and model not in (host.get("loading") or []):
                    continue
                free = ws.resources[tier] - ws.used_resources.get(tier, 0) - planned.get(ws.address, 0)
                if free >= amount and free > best_free:
                    best, best_free = ws, free
            if best is None:
                self.overflow += 1
                continue
            ts.worker_restrictions = {best.address}
            planned[best.address] = planned.get(best.address, 0) + amount
            self.pinned += 1
