"""Streamed text, private and exactly once: the scheduler's stream hub and the client's end.

Dask's pub/sub sends every event of a topic to every client subscribed to it, so one topic
for all streams let each notebook and gateway receive everyone's text, and one topic per
stream would grow the scheduler's event log without end. Instead, a generation task sends
its pieces to ``StreamHub`` (a scheduler plugin) on the worker's connection
(``workloads/streaming.py``), and the hub hands each one to the client whose id starts the
stream id, on that client's own connection, as an event of the ``aicluster-stream`` topic
its handler already listens to. The scheduler's cost per token does not depend on how many
clients are connected.

The hub also keeps, per open stream, the text and token ids sent so far. A task that runs
again (its worker died) asks for them when it starts and continues from there; a piece is
taken only at the offset the stream has reached, so no reader sees text twice. Pieces reach
the client with their token ids, so after a scheduler restart (a new hub that knows
nothing) the facade submits the stream again with what it had received, and the new run
goes on from there too. A stream's record goes when it ends, when its reader closes it, or
when its client leaves.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from distributed.diagnostics.plugin import SchedulerPlugin

from workloads.compat import send_to_scheduler
from workloads.streaming import CLOSE_OP, PIECE_OP, RESUME_HANDLER, STREAM_TOPIC, client_of

__all__ = ["StreamHub", "STREAM_TOPIC"]

logger = logging.getLogger("cluster.streams")


@dataclass
class _Stream:
    run: int = 0
    text: str = ""
    ids: list = field(default_factory=list)
    last: float = field(default_factory=time.time)


class StreamHub(SchedulerPlugin):
    """Routes stream pieces from workers to the one client of each stream (see module doc)."""

    name = "aicluster-streams"
    idempotent = True

    #: records of streams with no word for this long are dropped (a cancelled task's stream
    #: whose reader never closed it)
    FORGET = 3600.0

    def __init__(self) -> None:
        self.scheduler = None
        self.streams: dict[str, _Stream] = {}
        #: pieces dropped because they were sent already (a run after a worker died) or came
        #: from a run that another one replaced
        self.dropped = 0
        self.forwarded = 0

    async def start(self, scheduler) -> None:
        self.scheduler = scheduler
        # Dask's documented extension points for a scheduler's own messages and handlers
        scheduler.stream_handlers[PIECE_OP] = self.on_piece
        scheduler.stream_handlers[CLOSE_OP] = self.on_close
        scheduler.handlers[RESUME_HANDLER] = self.resume

    def resume(self, stream: str, seed: dict | None = None) -> dict:
        """A task begins a run of ``stream``: what it sent before, and the new run's number
        (pieces of older runs are dropped from now on). ``seed``: what the client had
        received when its scheduler restarted (this hub never saw it), to go on from."""
        s = self.streams.get(stream)
        if s is None:
            s = self.streams[stream] = _Stream()
            if seed:
                s.text, s.ids = str(seed.get("text") or ""), list(seed.get("ids") or [])
        s.run += 1
        s.last = time.time()
        self._forget_old()
        return {"run": s.run, "text": s.text, "ids": list(s.ids)}

    def on_piece(self, stream: str, run: int, offset: int, piece: str | None, ids: list | None = None,
                 worker: str | None = None) -> None:
        s = self.streams.get(stream)
        if s is None or run != s.run:
            self.dropped += 1  # a run that another replaced, or a stream already ended
            return
        s.last = time.time()
        if piece is not None:
            if offset != len(s.text):
                self.dropped += 1
                return
            s.text += piece
            s.ids += list(ids or [])
        else:
            del self.streams[stream]
        comm = self.scheduler.client_comms.get(client_of(stream))
        if comm is None:
            return
        self.forwarded += 1
        comm.send({"op": "event", "topic": STREAM_TOPIC, "event": (time.time(), (stream, piece, list(ids or [])))})

    def on_close(self, stream: str, client: str | None = None) -> None:
        self.streams.pop(stream, None)

    def remove_client(self, scheduler, client: str) -> None:
        for sid in [sid for sid in self.streams if client_of(sid) == client]:
            del self.streams[sid]

    def _forget_old(self) -> None:
        if len(self.streams) < 1000:
            return
        now = time.time()
        for sid in [sid for sid, s in self.streams.items() if now - s.last > self.FORGET]:
            del self.streams[sid]


def close_stream(client, stream_id: str) -> None:
    """Tell the hub the reader is done with ``stream_id`` (its record is dropped)."""
    try:
        send_to_scheduler(client, {"op": CLOSE_OP, "stream": stream_id})
    except Exception:  # closing: the hub forgets the client's streams when it leaves
        pass
