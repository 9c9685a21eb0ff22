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

A result the user already fetched (``result()``, ``gather``) is not computed again: the
facade keeps a reference to the value it handed out while the future is held, and after the
restart submits a task under the same key that returns that value, so the same future gives
the same answer (at ``temperature > 0`` a second run would give other text).

A stream that had sent text is submitted again with what its reader received (text and
token ids, ``Core.received``): the new run goes on from there, so nothing repeats.

Not redone, and why:
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
from dataclasses import dataclass
from typing import Callable

from workloads.compat import SCHEDULER_LOST, FutureState, future_state, rearm, set_future_state, wrap_gather

from .jobs import SchedulerLost, wait_for_scheduler

__all__ = ["Redo", "Resubmitted"]

logger = logging.getLogger("cluster.redo")

#: the reason distributed gives every future when the client loses its scheduler
LOST = SCHEDULER_LOST


@dataclass
class _Recipe:
    seq: int
    what: str
    #: submits the task again under the same key; returns the (new) Future
    resubmit: Callable
    #: False when the task must not be repeated now (a stream that already sent text)
    may_redo: Callable[[], bool] | None = None
    #: called once the recipe is dropped (the future released or cancelled)
    cleanup: Callable[[], None] | None = None
    times: int = 0


@dataclass
class Resubmitted:
    """One task submitted again after the scheduler restarted."""

    key: str
    what: str
    times: int = 1


class _RedoableState(FutureState):
    """A future's state that waits through a lost scheduler (see the module docstring)."""

    __slots__ = ()
    _redo: Callable[[], "Redo | None"] = staticmethod(lambda: None)

    def cancel(self, reason=None, msg=None):
        redo = self._redo()
        if redo is None:
            return super().cancel(reason=reason, msg=msg)
        if reason == LOST:
            if self.status == "error":
                redo._forget(self.key)
                return  # the error the user saw (or will see) stands; nothing to redo
            if redo._lost(self):
                # keep waiting: the task is submitted again once the client has reconnected
                rearm(self)
                return
        elif reason is None and redo._is_waiting(self) and redo.client.status in ("closing", "closed"):
            # the client closes (or gave up reconnecting) while this waits for the scheduler
            redo._forget(self.key)
            return FutureState.set_error(self, redo._gone(self.key), None)
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
        self._swaps: dict = {}  # key -> token of the resubmission under way (see _swap, _abandon)
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._listeners: list[Callable[[list[Resubmitted]], None]] = []
        ref = weakref.ref(self)
        self._state_cls = type("RedoableState", (_RedoableState,), {"__slots__": (), "_redo": staticmethod(ref)})
        #: key -> the value its result() handed out (while its recipe is held)
        self._fetched: dict = {}
        self._watch_gather(client)

    def _watch_gather(self, client) -> None:
        """Remember what tracked futures' ``result()`` / ``gather`` handed out. (distributed
        has no hook for it; ``Client._gather`` is where every fetch goes, on this client only.)"""
        ref = weakref.ref(self)

        def fetched(futures, values) -> None:
            redo = ref()
            if redo is not None:
                for f, v in zip(futures, values):
                    key = getattr(f, "key", None)
                    if key is not None and key in redo._recipes and not isinstance(v, BaseException):
                        redo._fetched[key] = v

        wrap_gather(client, fetched)

    # -- recording --------------------------------------------------------------------------
    def can_redo(self, deps) -> bool:
        """Whether a task that takes the futures ``deps`` can be submitted again: only if
        each of them would be too (a new scheduler does not know the others' keys)."""
        from distributed.client import futures_of

        return all(f.key in self._recipes for f in futures_of(deps))

    def track(self, future, resubmit: Callable, what: str, may_redo: Callable[[], bool] | None = None,
              cleanup: Callable[[], None] | None = None) -> None:
        """``future`` is submitted again by ``resubmit()`` (same key) if the scheduler is lost.
        ``resubmit`` must not hold ``future`` itself (that would keep its key alive)."""
        st = future_state(future)
        if st is None or st.status in ("error", "cancelled"):
            if cleanup is not None:
                cleanup()
            return
        if type(st) is FutureState:
            st.__class__ = self._state_cls  # same slots: only the class changes
        old = self._recipes.get(future.key)
        self._recipes[future.key] = _Recipe(next(self._seq), what, resubmit, may_redo, cleanup)
        if old is not None and old.cleanup is not None:
            old.cleanup()

    def _forget(self, key) -> None:
        self._fetched.pop(key, None)
        recipe = self._recipes.pop(key, None)
        with self._cv:
            self._waiting.pop(key, None)
        if recipe is not None and recipe.cleanup is not None:
            recipe.cleanup()

    def _is_waiting(self, state) -> bool:
        return self._waiting.get(state.key) is state

    def _gone(self, key) -> SchedulerLost:
        if self._closed:
            return SchedulerLost(f"job {key}: the client was closed before the scheduler came back")
        return SchedulerLost(
            f"the scheduler at {self.address} did not come back (the client gave up reconnecting), so job {key} was "
            "not run again; start the scheduler and submit it again")

    def listen(self, callback: Callable[[list[Resubmitted]], None]) -> Callable[[], None]:
        """Call ``callback(items)`` (from a background thread) after each round of
        resubmissions; returns a function that stops it."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback) if callback in self._listeners else None

    def cancel(self, keys) -> None:
        """The user cancelled these: whatever was lost with the scheduler is not redone."""
        for key in keys:
            with self._cv:
                st = self._waiting.get(key)
            self._forget(key)
            if st is not None:
                self._on_loop(lambda st=st: FutureState.cancel(st, reason="cancelled", msg="cancelled by the user")
                              if st.status == "pending" else None, wait=False)

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
        # back into the client's table once distributed has emptied it (this runs inside its
        # loop over the table): meanwhile, gather waits on it, a cancel or release reaches
        # it, and a Future made for the same key shares it
        self.client.loop.add_callback(self._reinsert, state)
        return True

    def _reinsert(self, state) -> None:
        if self._is_waiting(state) and state.key not in self.client.futures:
            self.client.futures[state.key] = state

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._closed:
                    self._cv.wait()
                if self._closed:
                    for key in list(self._waiting):
                        self._fail_one(key, self._gone(key))
                    return
            try:
                # distributed reconnects by itself for its connect timeout, then gives up
                wait_for_scheduler(self.client, timeout=float(getattr(self.client, "_timeout", 30) or 30) + 30)
            except SchedulerLost:
                with self._cv:
                    keys = list(self._waiting)
                for key in keys:
                    self._fail_one(key, self._gone(key))
                continue
            if self.on_reconnected is not None:
                try:
                    self.on_reconnected()  # event topics again, a new view of the workers
                except Exception:  # the scheduler went away again: the next round retries
                    logger.debug("after reconnecting", exc_info=True)
            try:
                self._round()
            except Exception:  # never leave this thread: the futures waiting on it would hang
                logger.exception("resubmitting after the scheduler restarted")

    def _round(self) -> None:
        with self._cv:
            batch = sorted(self._waiting.items(), key=lambda kv: getattr(self._recipes.get(kv[0]), "seq", -1))
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
            again = recipe.resubmit
            if key in self._fetched:  # the user has its answer: that, not a new run
                value = self._fetched[key]
                again = lambda key=key, value=value: self.client.submit(_the, value, key=key, pure=False)  # noqa: E731
            token = object()
            self._swaps[key] = token
            try:
                self._on_loop(lambda recipe=recipe, state=state, token=token, again=again:
                              self._swap(recipe, state, token, again))
            except Exception as e:  # it cannot be submitted again: its waiters get the reason
                logger.warning("could not submit %s again after the scheduler restarted: %s: %s", key,
                               type(e).__name__, e)
                self._on_loop(lambda state=state, token=token, e=e: self._abandon(state, token, e), wait=False)
                continue
            recipe.times += 1
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

    def _swap(self, recipe: _Recipe, state, token, resubmit: Callable | None = None) -> None:
        """On the event loop: submit again, and hand the new task's state to the old Futures."""
        key = state.key
        if self._swaps.get(key) is not token:
            return  # given up on (_abandon ran first)
        del self._swaps[key]
        if self._is_waiting(state):
            return  # lost again before this ran: the next round submits it
        if self._recipes.get(key) is not recipe:  # cancelled or released meanwhile
            if state.status == "pending":
                FutureState.cancel(state, reason="cancelled", msg="cancelled while the scheduler restarted")
            return
        if self.client.futures.get(key) is state:
            del self.client.futures[key]  # (else Client.submit would take it as already submitted)
        try:
            f = (resubmit or recipe.resubmit)()
            if f.key != key:
                raise RuntimeError(f"resubmitted under another key ({f.key} for {key})")
        except BaseException as e:  # its waiters get the reason
            self._forget(key)
            self.client.futures[key] = state  # (not a state Client.submit may have left there)
            FutureState.set_error(state, e, None)
            raise
        self.client.futures[key] = state
        set_future_state(f, state)
        state.status = "pending"

    def _abandon(self, state, token, exc: BaseException) -> None:
        """On the event loop, after the resubmission timed out: unless it went through after
        all, its waiters get the error."""
        if self._swaps.get(state.key) is token:
            del self._swaps[state.key]
            self._forget(state.key)
            FutureState.set_error(state, exc, None)

    def _fail_one(self, key, exc: BaseException) -> None:
        with self._cv:
            st = self._waiting.pop(key, None)
        if st is not None:
            self._forget(key)
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


def _the(value):
    """A task that gives back a result the user had fetched before the scheduler restarted."""
    return value
