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
from dataclasses import dataclass, field

from distributed.diagnostics.plugin import SchedulerPlugin

__all__ = ["NoWorkerForTier", "Route", "live_tiers", "resolve", "TierGuard", "ANNOTATION"]

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

    def submit_kwargs(self) -> dict:
        # Affinity is a strict ``workers=`` list, never ``allow_other_workers=True``: Dask
        # treats loose restrictions as no restrictions at all when it steals work, so an
        # idle worker *without* the tier's resource can take the task and its state machine
        # dies on a KeyError (distributed 2026.8, stealing.py ``_get_thief``). If the
        # preferred workers leave, the task falls into ``no-worker`` and the TierGuard
        # below re-routes it to the tier (or its fallbacks) without the worker list.
        kw: dict = {"resources": {self.tier: 1}}
        if self.workers:
            kw["workers"] = list(self.workers)
        return kw

    def spread(self) -> "Route":
        """The same tier without the preferred workers (all of the tier's workers share the work)."""
        return Route(tier=self.tier, chain=self.chain, workers=[], fell_back=self.fell_back,
                     tier_workers=self.tier_workers)

    def annotation(self, what: str, kind: str = "task") -> dict:
        return {ANNOTATION: {"chain": self.chain[self.chain.index(self.tier):], "what": what, "kind": kind}}


def resolve(chain: list[str], live: dict[str, list[str]], what: str = "this task", prefer: list[str] = ()) -> Route:
    """Pick the first tier of ``chain`` that has a live worker.

    ``prefer`` lists worker addresses to favour (e.g. where a model is resident); only those
    with the chosen tier are kept.
    """
    for tier in chain:
        if live.get(tier):
            workers = [w for w in prefer if w in live[tier]]
            return Route(tier=tier, chain=list(chain), workers=workers, fell_back=tier != chain[0],
                         tier_workers=list(live[tier]))
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
        for ts in list(scheduler.unrunnable):
            if (ts.annotations or {}).get(ANNOTATION, {}).get("chain"):
                scheduler.loop.add_callback(self._handle, ts.key)

    def transition(self, key, start, finish, *args, **kwargs) -> None:
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
                # the tier's worker paused under memory pressure: Dask runs the task when it
                # resumes; if it dies instead, remove_worker below looks at the task again
                logger.info("%s waits for a paused worker of tier %s", key, tier)
                ts.resource_restrictions = {tier: 1}
                ts.worker_restrictions = None
                return
            if live.get(tier):
                logger.warning("re-routing %s from %s to tier %s: no live worker has its tier", key, dict(ts.resource_restrictions or {}), tier)
                ts.resource_restrictions = {tier: 1}
                ts.worker_restrictions = None
                s.transitions({key: "processing"}, stimulus_id)
                self.rerouted += 1
                return
        if not final and self.grace > 0:
            # nothing can run it now; a worker may be restarting (nanny) or rejoining
            # (aicluster worker): look again after the grace period. A worker that joins
            # meanwhile gets the task from Dask itself.
            logger.warning("%s: no live worker for tiers %s; waiting up to %.0f s for one to join", key, chain, self.grace)
            s.loop.call_later(self.grace, self._handle, key, True)
            return
        all_live = sorted({r for ws in s.workers.values() for r in ws.resources})
        exc = NoWorkerForTier(chain, all_live, what)
        logger.warning("failing %s: %s", key, exc)
        recs = s.transition(key, "erred", stimulus_id, exception=pickle.dumps(exc), cause=key,
                            exception_text=f"NoWorkerForTier: {exc}", traceback_text="")
        s.transitions(recs, stimulus_id)
        self.failed += 1
