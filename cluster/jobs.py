"""The job board: every task submitted through the facade, as the scheduler sees it.

``JobBoard`` is a scheduler plugin that follows the transitions of tasks carrying the
``aicluster`` annotation (all facade calls: ``submit``, ``generate``, ``embed``, pipeline
stages) and keeps the last ``max_jobs`` of them: pending, running (and where), done,
failed (and why) or cancelled. Any client sees the same board (``AICluster.jobs()``,
``aicluster jobs``, ``/aicluster/jobs.json``): the scheduler forgets a finished task as
soon as its client lets go of it, so the board is the only place its history survives.

Cancelling (``AICluster.cancel``) releases the task in Dask and also raises a flag on the
workers: Dask cannot interrupt a running task, so generation loops poll the flag
(``ModelHost.is_cancelled``) and stop within a token or two.

The board is kept in SQLite on the scheduler (``scheduler.jobs_db``), so it survives a
restart: rows that were pending or running when the scheduler went away read ``lost``,
until their client submits them again under the same key (the facade does so by itself,
cluster/redo.py): the row then goes on as usual, counting it in ``resubmitted``.
It keeps the last ``max_jobs`` rows, none older than ``max_age`` seconds. The chunks of one
``embed`` call are one row (``parts``: how many, ``parts_done``).
"""
from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections import OrderedDict

from distributed.diagnostics.plugin import SchedulerPlugin

from workloads.compat import SCHEDULER_LOST, future_state

from .routing import ANNOTATION
from .status import text_table

__all__ = ["JobList", "JobBoard", "job_rows", "format_jobs", "STATES", "JobCancelled", "SchedulerLost", "failure",
           "wait_for_scheduler", "wait_all", "default_jobs_db"]

logger = logging.getLogger("cluster.jobs")

#: the board's states, in the order a job goes through them (``lost``: it was pending or
#: running when the scheduler stopped)
STATES = ("pending", "running", "done", "failed", "cancelled", "lost")

_COLUMNS = ("key", "what", "kind", "tier", "priority", "state", "worker", "address", "submitted", "started",
            "finished", "error", "parts", "parts_done", "resubmitted")


class JobBoard(SchedulerPlugin):
    name = "aicluster-jobs"
    idempotent = True

    def __init__(self, max_jobs: int = 2000, db: str | None = None, max_age: float = 7 * 86400):
        self.max_jobs = max_jobs
        self.max_age = max_age
        #: SQLite file (None: in memory only)
        self.db_path = db
        self.jobs: OrderedDict[str, dict] = OrderedDict()
        #: chunk key -> the row (group) it belongs to, and each chunk's state
        self._group_of: dict[str, str] = {}
        self._parts: dict[str, dict[str, str]] = {}
        self._dirty: set[str] = set()
        self._db: sqlite3.Connection | None = None
        self._db_lock: threading.Lock | None = None  # (made in start: the plugin is pickled to the scheduler)
        self._writing = False
        self._pruned = 0.0
        self.scheduler = None

    async def start(self, scheduler) -> None:
        self.scheduler = scheduler
        self._db_lock = threading.Lock()
        if self.db_path:
            self._open()
            from tornado.ioloop import PeriodicCallback

            self._pc = PeriodicCallback(self._flush_soon, 1000)
            self._pc.start()

    async def close(self) -> None:
        pc = getattr(self, "_pc", None)
        if pc is not None:
            pc.stop()
        self.flush()
        with self._db_lock or threading.Lock():
            if self._db is not None:
                self._db.close()
                self._db = None

    # -- SQLite --------------------------------------------------------------------------------
    def _open(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.db_path)), exist_ok=True)
        db = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # no fsync per flush on the scheduler's event loop
        db.execute(f"CREATE TABLE IF NOT EXISTS jobs ({', '.join(c + (' PRIMARY KEY' if c == 'key' else '') for c in _COLUMNS)})")
        have = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
        for c in _COLUMNS:  # a board written by an older version
            if c not in have:
                db.execute(f"ALTER TABLE jobs ADD COLUMN {c}")
        # what was pending or running when the scheduler stopped will not finish: say so
        db.execute("UPDATE jobs SET state = 'lost', finished = ? WHERE state IN ('pending', 'running')", (time.time(),))
        self._db = db
        self._prune()
        rows = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs ORDER BY submitted DESC LIMIT ?",
                          (self.max_jobs,)).fetchall()
        for row in reversed(rows):
            job = dict(zip(_COLUMNS, row))
            self.jobs[job["key"]] = job
        logger.info("job board: %d rows from %s", len(rows), self.db_path)

    def flush(self) -> None:
        """Write the rows changed since the last flush, here and now (at close)."""
        if self._db is None or not self._dirty:
            return
        keys, self._dirty = self._dirty, set()
        self._write(keys, [tuple(self.jobs[k].get(c) for c in _COLUMNS) for k in keys if k in self.jobs])

    async def _flush_soon(self) -> None:
        """Every second: the changed rows are copied on the event loop and written by a
        thread, so the scheduler goes on with its tasks meanwhile (thousands of small jobs
        per second made each write, and its pruning query, a pause of the whole scheduler)."""
        import asyncio

        if self._db is None or not self._dirty or self._writing:
            return
        keys, self._dirty = self._dirty, set()
        rows = [tuple(self.jobs[k].get(c) for c in _COLUMNS) for k in keys if k in self.jobs]
        self._writing = True
        try:
            await asyncio.to_thread(self._write, keys, rows)
        finally:
            self._writing = False

    def _write(self, keys: set, rows: list) -> None:
        with self._db_lock or threading.Lock():
            if self._db is None:
                return
            try:
                with self._db:
                    self._db.executemany(f"INSERT OR REPLACE INTO jobs ({', '.join(_COLUMNS)}) VALUES "
                                         f"({', '.join('?' * len(_COLUMNS))})", rows)
                if time.time() - self._pruned > 60:  # (its query reads the whole table)
                    self._prune()
            except sqlite3.Error as e:  # a full disk must not stop the scheduler; the board stays in memory
                self._dirty |= keys  # written at a later flush
                logger.warning("job board: cannot write %s: %s", self.db_path, e)

    def _prune(self) -> None:
        self._pruned = time.time()
        self._db.execute("DELETE FROM jobs WHERE submitted < ?", (time.time() - self.max_age,))
        self._db.execute("DELETE FROM jobs WHERE key NOT IN (SELECT key FROM jobs ORDER BY submitted DESC LIMIT ?)",
                         (self.max_jobs,))

    # -- transitions -----------------------------------------------------------------------------
    def transition(self, key, start, finish, *args, **kwargs) -> None:
        s = self.scheduler
        if s is None:
            return
        ts = s.tasks.get(key)
        row_key = self._group_of.get(str(key), str(key))
        job = self.jobs.get(row_key)
        if job is None:
            if finish in ("released", "forgotten") or ts is None or ANNOTATION not in (ts.annotations or {}):
                return  # (a job evicted from the board is not brought back by its last transitions)
            info = ts.annotations[ANNOTATION]
            group = info.get("group")
            if group is not None:  # a chunk of a larger call: its row is the group's
                row_key = str(group)
                self._group_of[str(key)] = row_key
                self._parts.setdefault(row_key, {})[str(key)] = "pending"
                job = self.jobs.get(row_key)
            if job is None:
                chain = info.get("chain") or []
                job = self.jobs[row_key] = {
                    "key": row_key, "what": info.get("what", row_key), "kind": info.get("kind", "task"),
                    "tier": chain[0] if chain else None, "priority": info.get("priority", 0), "state": "pending",
                    "worker": None, "address": None,
                    "submitted": time.time(), "started": None, "finished": None, "error": None,
                    "parts": info.get("parts"), "parts_done": 0 if group is not None else None, "resubmitted": 0,
                }
                while len(self.jobs) > self.max_jobs:
                    old, _ = self.jobs.popitem(last=False)
                    self._parts.pop(old, None)
        elif str(key) in self._group_of:
            self._parts.setdefault(row_key, {}).setdefault(str(key), "pending")
        if job["state"] == "lost" and finish not in ("released", "forgotten", "erred", "memory"):
            # lost with the scheduler, and its client submitted it again under the same key
            job.update(state="pending", worker=None, address=None, started=None, finished=None, error=None,
                       resubmitted=(job.get("resubmitted") or 0) + 1,
                       parts_done=0 if job.get("parts") is not None else None)
        self._dirty.add(row_key)
        if row_key != str(key):
            if finish == "forgotten":
                self._group_of.pop(str(key), None)  # the chunk is gone from the scheduler
            return self._part(row_key, job, str(key), finish, ts, kwargs)
        if job.get("parts") is not None and finish not in ("erred", "forgotten"):
            return  # the task that joins a grouped call's chunks: its row follows the chunks
        now = time.time()
        if finish == "processing" and ts is not None and ts.processing_on is not None:
            ws = ts.processing_on
            job.update(state="running", worker=str(ws.name), address=ws.address, started=now,
                       tier=next((r for r in (ts.resource_restrictions or {})), job["tier"]))
        elif finish == "memory":
            job.update(state="done", finished=now)
        elif finish == "erred":
            exc = kwargs.get("exception_text") or (str(ts.exception_text) if ts is not None and ts.exception_text else "")
            job.update(state="failed", finished=now, error=exc or "error")
        elif finish == "forgotten" and job["state"] not in ("done", "failed"):
            # forgotten before it finished: cancelled (or its client went away)
            job.update(state="cancelled", finished=now)
        elif finish in ("released", "waiting", "queued", "no-worker") and job["state"] not in ("done", "failed"):
            job["state"] = "pending"  # e.g. its worker died and it waits for another

    def _part(self, row_key: str, job: dict, key: str, finish: str, ts, kwargs) -> None:
        """A chunk of a grouped row changed: the row is running while any chunk runs, done when
        all are, failed when one failed (its error), cancelled when they went away unfinished."""
        parts = self._parts[row_key]
        now = time.time()
        if finish == "processing" and ts is not None and ts.processing_on is not None:
            parts[key] = "running"
            ws = ts.processing_on
            workers = {w for w in (job["worker"] or "").split(", ") if w} | {str(ws.name)}
            job.update(worker=", ".join(sorted(workers)), address=ws.address, started=job["started"] or now,
                       tier=next((r for r in (ts.resource_restrictions or {})), job["tier"]))
        elif finish == "memory":
            parts[key] = "done"
        elif finish == "erred":
            parts[key] = "failed"
            exc = kwargs.get("exception_text") or (str(ts.exception_text) if ts is not None and ts.exception_text else "")
            job["error"] = job["error"] or exc or "error"
        elif finish == "forgotten" and parts.get(key) not in ("done", "failed"):
            parts[key] = "cancelled"
        elif finish in ("released", "waiting", "queued", "no-worker") and parts.get(key) not in ("done", "failed"):
            parts[key] = "pending"
        states = list(parts.values())
        job["parts_done"] = max(job["parts_done"] or 0, states.count("done"))
        total = job["parts"] or len(states)
        if "failed" in states:
            job.update(state="failed", finished=job["finished"] or now)
        elif job["parts_done"] >= total:
            job.update(state="done", finished=job["finished"] or now)
        elif "cancelled" in states and "running" not in states:
            job.update(state="cancelled", finished=now)
        elif "running" in states:
            job["state"] = "running"
        else:
            job["state"] = "pending"

    def rows(self, states: list[str] | None = None, limit: int | None = None) -> list[dict]:
        rows = [dict(j) for j in self.jobs.values() if not states or j["state"] in states]
        return rows[-limit:] if limit else rows


def job_rows(dask_scheduler=None, states=None, limit=None) -> list[dict]:
    """The board's rows (run on the scheduler: ``client.run_on_scheduler(job_rows)``)."""
    board = dask_scheduler.plugins.get(JobBoard.name)
    return board.rows(states, limit) if board else []


def format_jobs(rows: list[dict]) -> str:
    """A plain-text table of jobs, oldest first."""
    head = ["key", "what", "tier", "priority", "state", "worker", "seconds"]
    body = []
    for r in rows:
        secs = ""
        if r["started"]:
            secs = f"{(r['finished'] or time.time()) - r['started']:.2f}"
        state = r["state"] + (f" ({r['parts_done']}/{r['parts']} parts)" if r.get("parts") else "")
        if r.get("resubmitted"):
            state += " (resubmitted)" if r["resubmitted"] == 1 else f" (resubmitted {r['resubmitted']}x)"
        body.append([r["key"][:40], r["what"][:40], r["tier"] or "-", str(r.get("priority", 0)), state,
                     r["worker"] or "-", secs])
    out = text_table(head, body)
    if not body:
        out.append("(no jobs yet)")
    out += [f"  {r['key'][:40]}: {r['error']}" for r in rows if r["state"] == "failed" and r["error"]]
    return "\n".join(out)


class JobCancelled(RuntimeError):
    """A job cancelled (by ``AICluster.cancel``, ``aicluster cancel`` or its client) before it finished."""


class SchedulerLost(ConnectionError):
    """A job's future was lost with the scheduler (it restarted, or the link dropped) and
    was not submitted again: the facade redoes its own work by itself (cluster/redo.py),
    except a ``submit`` without ``retries``, and everything when the scheduler does not come
    back."""


def failure(future) -> BaseException | None:
    """Why a completed future has no result (its error, ``SchedulerLost``, or
    ``JobCancelled``), or None.

    Loops over ``as_completed`` use this so that one cancelled job is one failed item, not
    a ``CancelledError`` that ends the whole run, and so that a job lost with the
    scheduler (one the facade could not redo, cluster/redo.py) is reported as such rather
    than as cancelled.
    """
    if future.status in ("finished", "lost", "pending"):
        # lost: its result was on a worker that died after it finished; Dask computes it
        # again (a loop over as_completed adds such a future back and waits for it)
        return None
    if future.status == "error":
        return future.exception()
    # distributed cancels every future with this reason when the client loses the scheduler
    # (Client._reconnect); the future keeps it on its state
    reason = getattr(getattr(future_state(future), "exception", None), "reason", None)
    if reason == SCHEDULER_LOST:
        return SchedulerLost(f"job {future.key} was lost with the scheduler")
    return JobCancelled(f"job {future.key} was {future.status}")


def wait_all(client, futures, timeout: float | None = None) -> None:
    """Until every future is done (finished, failed or cancelled), on ``client``'s own event
    loop. (``distributed.wait`` and ``as_completed`` without ``loop=`` use the process's
    default client, which in a process with several clients can be another one, on another
    loop: "Event ... is bound to a different event loop".)"""
    from distributed import as_completed

    for _ in as_completed(list(futures), loop=client.loop, timeout=timeout):
        pass


def wait_for_scheduler(client, timeout: float = 120) -> None:
    """Until ``client`` is connected again after losing its scheduler (it reconnects by
    itself for ``distributed.comm.timeouts.connect``), or ``SchedulerLost``."""
    deadline = time.monotonic() + timeout
    while client.status != "running":
        if client.status in ("closed", "closing") or time.monotonic() > deadline:
            raise SchedulerLost(f"the scheduler did not come back (client {client.status}); run again to resume")
        time.sleep(0.2)


def default_jobs_db(port: int) -> str:
    """Where ``aicluster scheduler`` keeps its job board when ``scheduler.jobs_db`` is empty."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(base, "aicluster", f"jobs-{port}.sqlite3")


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
