"""Facade work survives a scheduler restart: what was lost with it is submitted again.

When the client loses its scheduler, distributed cancels every future it holds
(``Client._reconnect``: ``FutureCancelledError``, reason ``scheduler-connection-lost``) and
asks the user to "re-run your work". For the work the facade submitted on a user's behalf
(generations, chats, embeddings, benchmark jobs, pipeline stages, spread chunks, and
``submit``/``map`` calls that asked for ``retries``) the facade can do that itself: it knows
how each task was submitted, and the task's key.

How: each such future's shared state (``FutureState``, one per key, held by every Future of
that key) gets a subclass whose ``cancel`` for that one reason keeps the state pending
instead. Whoever waits on the future (``result()``, ``as_completed``, ``wait``, a
``GenerationStream``) goes on waiting. Once the client has reconnected, a thread submits the
task again under the same key (the same route: a worker of its tier runs it, or the
TierGuard re-routes it when its worker is gone) and puts the old state back in the client's
table, so the task's answer reaches the Futures the user holds. Submission and the swap run
on the client's event loop, so no answer can arrive in between.

Not redone, and why:
* a stream that already sent text (repeating it would corrupt what the reader has): it
  ends with ``SchedulerLost``;
* a ``submit``/``map`` without ``retries`` (it may have side effects): Dask's cancellation
  stands, which the facade reports as ``SchedulerLost``;
* when the scheduler does not come back before the client gives up (Dask's connect
  timeout), every waiting future fails with ``SchedulerLost`` naming the address.

Written here because distributed has no hook for it: ``Client`` resubmits nothing after a
reconnect, and ``retries`` only covers a worker that fails a task, not a scheduler that is
gone.
"""
from __future__ import annotations

import concurrent.futures
import itertools
import logging
import threading
import weakref
from dataclasses import dataclass, field
from typing import Callable

from distributed.client import FutureState

from .jobs import SchedulerLost, wait_for_scheduler

__all__ = ["Redo", "Resubmitted"]

logger = logging.getLogger("cluster.redo")

#: the reason distributed gives every future when the client loses its scheduler
LOST = "scheduler-connection-lost"


@dataclass
class _Recipe:
    seq: int
    what: str
    #: submits the task again under the same key; returns the (new) Future
    resubmit: Callable
    #: False when the task must not be repeated now (a stream that already sent text)
    may_redo: Callable[[], bool] | None = None
    times: int = 0


@dataclass
class Resubmitted:
    """One task submitted again after the scheduler restarted."""

    key: str
    what: str
    times: int = 1
    extra: dict = field(default_factory=dict)


class _RedoableState(FutureState):
    """A future's state that waits through a lost scheduler (see the module docstring)."""

    __slots__ = ()
    _redo: Callable[[], "Redo | None"] = staticmethod(lambda: None)

    def cancel(self, reason=None, msg=None):
        redo = self._redo()
        if reason == LOST and redo is not None and redo._lost(self):
            # keep waiting: the task is submitted again once the client has reconnected
            self.status = "pending"
            self._get_event().clear()
            return
        if redo is not None:
            redo._forget(self.key)
        super().cancel(reason=reason, msg=msg)


class Redo:
    """The facade's record of how to submit its tasks again (one per ``AICluster``)."""

    def __init__(self, client, on_reconnected: Callable[[], None] | None = None) -> None:
        self.client = client
        self.address = self._address()  # (a client that gave up forgets it)
        self.on_reconnected = on_reconnected
        self._recipes: dict = {}
        self._seq = itertools.count()
        self._waiting: dict = {}  # key -> state lost with the scheduler, not yet submitted again
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._listeners: list[Callable[[list[Resubmitted]], None]] = []
        #: tasks submitted again so far (all restarts)
        self.resubmitted = 0
        ref = weakref.ref(self)
        self._state_cls = type("RedoableState", (_RedoableState,), {"__slots__": (), "_redo": staticmethod(ref)})

    # -- recording --------------------------------------------------------------------------
    def track(self, future, resubmit: Callable, what: str, may_redo: Callable[[], bool] | None = None) -> None:
        """``future`` is submitted again by ``resubmit()`` (same key) if the scheduler is lost."""
        st = future._state
        if st is None or st.status in ("error", "cancelled"):
            return
        if type(st) is FutureState:
            st.__class__ = self._state_cls  # same slots: only the class changes
        self._recipes[future.key] = _Recipe(next(self._seq), what, resubmit, may_redo)

    def _forget(self, key) -> None:
        self._recipes.pop(key, None)
        with self._cv:
            self._waiting.pop(key, None)

    def listen(self, callback: Callable[[list[Resubmitted]], None]) -> Callable[[], None]:
        """Call ``callback(items)`` (from a background thread) after each round of
        resubmissions; returns a function that stops it."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback) if callback in self._listeners else None

    def cancel(self, keys) -> None:
        """The user cancelled these: whatever was lost with the scheduler is not redone."""
        for key in keys:
            self._recipes.pop(key, None)
            with self._cv:
                st = self._waiting.pop(key, None)
            if st is not None:
                self._on_loop(lambda st=st: FutureState.cancel(st, reason="cancelled", msg="cancelled by the user"),
                              wait=False)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    # -- the lost scheduler -----------------------------------------------------------------
    def _lost(self, state) -> bool:
        """Called on the event loop as distributed cancels ``state``: True when it is redone."""
        recipe = self._recipes.get(state.key)
        if recipe is None or self._closed:
            return False
        if recipe.may_redo is not None and not recipe.may_redo():
            return False
        with self._cv:
            self._waiting[state.key] = state
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="aicluster-redo", daemon=True)
                self._thread.start()
            self._cv.notify_all()
        return True

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._closed:
                    self._cv.wait()
                if self._closed:
                    self._fail_all(SchedulerLost("the client was closed before the scheduler came back"))
                    return
            try:
                # distributed reconnects by itself for its connect timeout, then gives up
                wait_for_scheduler(self.client, timeout=float(getattr(self.client, "_timeout", 30) or 30) + 30)
            except SchedulerLost:
                self._fail_all(SchedulerLost(
                    f"the scheduler at {self.address} did not come back (the client gave up reconnecting), so "
                    "this job was not run again; start the scheduler and submit it again"))
                continue
            if self.on_reconnected is not None:
                try:
                    self.on_reconnected()  # event topics again, a new view of the workers
                except Exception:  # the scheduler went away again: the next round retries
                    logger.debug("after reconnecting", exc_info=True)
            self._round()

    def _round(self) -> None:
        with self._cv:
            batch = sorted(self._waiting.items(), key=lambda kv: self._recipes[kv[0]].seq
                           if kv[0] in self._recipes else -1)
        done: list[Resubmitted] = []
        for key, state in batch:
            if self.client.status != "running":
                return  # lost again: the next round takes the rest
            with self._cv:
                if self._waiting.get(key) is not state:
                    continue  # cancelled meanwhile
                del self._waiting[key]
            recipe = self._recipes.get(key)
            if recipe is None:  # (never left waiting)
                self._set_error(state, SchedulerLost(f"job {key} was lost with the scheduler"))
                continue
            try:
                self._on_loop(lambda: self._swap(recipe, state))
            except Exception as e:  # it cannot be submitted again: its waiters get the reason
                logger.warning("could not submit %s again after the scheduler restarted: %s", key, e)
                self._set_error(state, e)
                continue
            recipe.times += 1
            self.resubmitted += 1
            done.append(Resubmitted(str(key), recipe.what, recipe.times))
        if done:
            if self._listeners:
                for cb in list(self._listeners):
                    try:
                        cb(done)
                    except Exception:
                        logger.exception("resubmission listener failed")
            else:
                logger.warning("the scheduler restarted: %d job(s) lost with it were submitted again (%s)", len(done),
                               ", ".join(sorted({d.what for d in done}))[:300])

    def _swap(self, recipe: _Recipe, state) -> None:
        """On the event loop: submit again, and hand the new task's state to the old Futures."""
        f = recipe.resubmit()
        if f.key != state.key:
            raise RuntimeError(f"resubmitted under another key ({f.key} for {state.key})")
        self.client.futures[f.key] = state
        f._state = state
        state.status = "pending"

    def _fail_all(self, exc: BaseException) -> None:
        with self._cv:
            lost, self._waiting = list(self._waiting.values()), {}
        for st in lost:
            self._recipes.pop(st.key, None)
            self._set_error(st, exc)

    def _set_error(self, state, exc: BaseException) -> None:
        def fail():
            FutureState.set_error(state, exc, None)

        try:
            self._on_loop(fail, wait=False)
        except Exception:  # no event loop any more
            fail()

    def _on_loop(self, fn: Callable, wait: bool = True):
        out: concurrent.futures.Future = concurrent.futures.Future()

        def call():
            try:
                out.set_result(fn())
            except BaseException as e:
                out.set_exception(e)

        self.client.loop.add_callback(call)
        return out.result(timeout=60) if wait else None

    def _address(self) -> str:
        try:
            return self.client.scheduler.address
        except Exception:
            return "?"
