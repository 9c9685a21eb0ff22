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
"""
from __future__ import annotations

import time
from collections import OrderedDict

from distributed.diagnostics.plugin import SchedulerPlugin

from .routing import ANNOTATION
from .status import text_table

__all__ = ["JobBoard", "job_rows", "format_jobs", "STATES", "JobCancelled", "failure"]

#: the board's states, in the order a job goes through them
STATES = ("pending", "running", "done", "failed", "cancelled")


class JobBoard(SchedulerPlugin):
    name = "aicluster-jobs"
    idempotent = True

    def __init__(self, max_jobs: int = 2000):
        self.max_jobs = max_jobs
        self.jobs: OrderedDict[str, dict] = OrderedDict()
        self.scheduler = None

    async def start(self, scheduler) -> None:
        self.scheduler = scheduler

    def transition(self, key, start, finish, *args, **kwargs) -> None:
        s = self.scheduler
        if s is None:
            return
        ts = s.tasks.get(key)
        job = self.jobs.get(str(key))
        if job is None:
            if finish in ("released", "forgotten") or ts is None or ANNOTATION not in (ts.annotations or {}):
                return  # (a job evicted from the board is not brought back by its last transitions)
            info = ts.annotations[ANNOTATION]
            chain = info.get("chain") or []
            job = self.jobs[str(key)] = {
                "key": str(key), "what": info.get("what", str(key)), "kind": info.get("kind", "task"),
                "tier": chain[0] if chain else None, "priority": info.get("priority", 0), "state": "pending",
                "worker": None, "address": None,
                "submitted": time.time(), "started": None, "finished": None, "error": None,
            }
            while len(self.jobs) > self.max_jobs:
                self.jobs.popitem(last=False)
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
        body.append([r["key"][:40], r["what"][:40], r["tier"] or "-", str(r.get("priority", 0)), r["state"],
                     r["worker"] or "-", secs])
    out = text_table(head, body)
    if not body:
        out.append("(no jobs yet)")
    out += [f"  {r['key'][:40]}: {r['error']}" for r in rows if r["state"] == "failed" and r["error"]]
    return "\n".join(out)


class JobCancelled(RuntimeError):
    """A job cancelled (by ``AICluster.cancel``, ``aicluster cancel`` or its client) before it finished."""


def failure(future) -> BaseException | None:
    """Why a completed future has no result (its error, or ``JobCancelled``), or None.

    Loops over ``as_completed`` use this so that one cancelled job is one failed item, not
    a ``CancelledError`` that ends the whole run.
    """
    if future.status == "finished":
        return None
    if future.status == "error":
        return future.exception()
    return JobCancelled(f"job {future.key} was {future.status}")
