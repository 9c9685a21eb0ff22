"""The workers as the clients see them, without a round trip per request: the scheduler
plugin ``WorkerEvents`` publishes joins, leaves and status changes as numbered events, and
each client's ``WorkerView`` (``Core.view``) keeps the table that routing reads."""
from __future__ import annotations

import threading
import time

from distributed.diagnostics.plugin import SchedulerPlugin

__all__ = ["WorkerEvents", "WorkerView", "worker_list", "WORKERS_TOPIC"]

WORKERS_TOPIC = "aicluster-workers"


class WorkerEvents(SchedulerPlugin):
    """Tells clients when a worker joins, leaves or changes status (paused, running), as
    events on the ``aicluster-workers`` topic, numbered so a client can put them in order
    after a snapshot (``worker_list``)."""

    name = "aicluster-worker-events"
    idempotent = True

    #: how long a worker that left is remembered (for clients that connect meanwhile)
    REMEMBER = 120.0

    def __init__(self) -> None:
        self.scheduler = None
        self.seq = 0
        self._known: dict[str, dict] = {}
        #: address -> (entry, time.time() it left): a client that connects while a crashed
        #: worker's nanny restarts it learns that its tier is coming back (WorkerView)
        self.left: dict[str, tuple[dict, float]] = {}

    async def start(self, scheduler) -> None:
        self.scheduler = scheduler
        self._known = {a: _worker_entry(ws) for a, ws in scheduler.workers.items()}  # (joined before the plugin)

    def _emit(self, op: str, address: str) -> None:
        s = self.scheduler
        if s is None:
            return
        self.seq += 1
        ws = s.workers.get(address)
        entry = _worker_entry(ws) if ws is not None and op != "remove" else {}
        if op == "remove":
            now = time.time()
            if address in self._known:
                self.left[address] = (self._known.pop(address), now)
            self.left = {a: v for a, v in self.left.items() if now - v[1] < self.REMEMBER}
        elif entry:
            self._known[address] = entry
            self.left.pop(address, None)
        s.log_event(WORKERS_TOPIC, {"seq": self.seq, "op": op, "address": address, **entry})

    def add_worker(self, scheduler, worker) -> None:
        self._emit("add", worker)

    def remove_worker(self, scheduler, worker, *, stimulus_id=None, **kwargs) -> None:
        self._emit("remove", worker)

    def log_event(self, topic, msg) -> None:
        if isinstance(msg, dict) and msg.get("action") == "worker-status-change" and isinstance(topic, str):
            self._emit("status", topic)  # the topic of a status change is the worker's address


def _worker_entry(ws) -> dict:
    return {"name": str(ws.name), "resources": dict(ws.resources), "status": ws.status.name}


def worker_list(dask_scheduler=None) -> dict:
    """``{"seq": n, "workers": {address: {name, resources, status}}, "left": {address:
    [entry, seconds ago]}}`` (run on the scheduler)."""
    plugin = dask_scheduler.plugins.get(WorkerEvents.name)
    now = time.time()
    left = {a: [e, now - t] for a, (e, t) in plugin.left.items() if now - t < plugin.REMEMBER} if plugin else {}
    return {"seq": plugin.seq if plugin is not None else 0,
            "workers": {a: _worker_entry(ws) for a, ws in dask_scheduler.workers.items()}, "left": left,
            "uptime": now - getattr(dask_scheduler, "time_started", now - 1e9)}


class WorkerView:
    """The workers as this client knows them, kept by the scheduler's events: routing reads
    it with no round trip. (``Client.scheduler_info()`` costs one per call, and the client's
    own 2-second refresh can overwrite it with an identity that lists no workers, which made
    about 1 in 2,000 routing calls fail with every worker up.) A tier that looks empty is
    checked against the scheduler before anyone is told so (``confirm``)."""

    def __init__(self, client) -> None:
        self.client = client
        self._lock = threading.Lock()
        self._workers: dict[str, dict] = {}
        self._seq = -1
        self._early: list[dict] = []  # events that came before the snapshot
        #: workers that left, with when (monotonic): a crashed worker's nanny brings it back
        self._left: dict[str, tuple[dict, float]] = {}
        self._refreshing = 0
        self._stale = False
        #: when (monotonic) the scheduler started, as of the last snapshot
        self._scheduler_started = float("-inf")
        client.subscribe_topic(WORKERS_TOPIC, self._on_event)
        self.refresh()

    def resubscribe(self) -> None:
        """After the client reconnected to a restarted scheduler (distributed does not send
        its subscriptions again): subscribe, then a new snapshot."""
        with self._lock:
            self._seq = -1
        self.client.subscribe_topic(WORKERS_TOPIC, self._on_event)
        self.refresh()

    def refresh(self) -> None:
        """Take a snapshot from the scheduler (one round trip). Events that arrive meanwhile
        are kept and applied after it when they are newer."""
        with self._lock:
            self._refreshing += 1
            self._stale = False
        try:
            snap = self.client.run_on_scheduler(worker_list)
        finally:
            with self._lock:
                self._refreshing -= 1
        with self._lock:
            now = time.monotonic()
            self._scheduler_started = now - float(snap.get("uptime", 1e9))
            for addr, entry in self._workers.items():
                if addr not in snap["workers"]:
                    self._left[addr] = (entry, now)
            for addr, (entry, ago) in (snap.get("left") or {}).items():  # left before this client came
                if addr not in snap["workers"] and addr not in self._left:
                    self._left[addr] = (entry, now - ago)
            self._workers, self._seq = snap["workers"], snap["seq"]
            early, self._early = self._early, []
            for msg in sorted(early, key=lambda m: m["seq"]):
                self._apply(msg)

    def _on_event(self, event) -> None:
        msg = event[1]
        with self._lock:
            if self._seq < 0 or self._refreshing:
                self._early.append(msg)
                return
            if msg["seq"] != self._seq + 1:
                # an event missed (or numbered from 1 again: a new scheduler): the next read
                # takes a snapshot (not here: this runs on the client's event loop)
                self._stale = True
            self._apply(msg, force=msg["seq"] < self._seq)

    def _apply(self, msg: dict, force: bool = False) -> None:
        if msg["seq"] <= self._seq and not force:
            return
        self._seq = msg["seq"]
        if msg["op"] == "remove":
            entry = self._workers.pop(msg["address"], None)
            if entry is not None:
                self._left[msg["address"]] = (entry, time.monotonic())
        else:
            self._workers[msg["address"]] = {k: msg[k] for k in ("name", "resources", "status") if k in msg}

    def workers(self) -> dict[str, dict]:
        if self._stale:
            self.refresh()
        with self._lock:
            return dict(self._workers)

    def starting(self, within: float) -> bool:
        """Whether the scheduler started less than ``within`` seconds ago and no worker has
        joined it yet: its workers are likely on their way (a restarted scheduler, or a
        scheduler, workers and a script started together)."""
        with self._lock:
            return not self._workers and time.monotonic() - self._scheduler_started < within

    def recently_left(self, chain: list[str], within: float) -> str | None:
        """The first tier of ``chain`` that a worker left less than ``within`` seconds ago
        (its nanny, or `aicluster worker`, is likely bringing it back), or None."""
        now = time.monotonic()
        with self._lock:
            self._left = {a: (e, t) for a, (e, t) in self._left.items() if now - t < max(within, 60)}
            recent = [e for e, t in self._left.values() if now - t < within]
        for tier in chain:
            if any((e.get("resources") or {}).get(tier, 0) > 0 for e in recent):
                return tier
        return None
