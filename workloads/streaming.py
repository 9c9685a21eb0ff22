"""The worker's side of streamed text: pieces go to the scheduler's stream hub, one client.

A generation task that streams sends each piece, with its offset in the text and the token
ids it came from, to the hub (``cluster/streams.py``, a scheduler plugin) on the worker's
own connection to the scheduler. The hub forwards it to the one client that asked for the
stream (its id is the start of the stream id), keeps what was sent, and drops what was
sent already. When the task starts it asks the hub what the stream has sent so far: a task
run again after its worker died continues from there instead of sending the text twice.

Nothing here knows about clients or routing; the names below are the protocol both sides
share.
"""
from __future__ import annotations

import logging

__all__ = ["STREAM_TOPIC", "PIECE_OP", "CLOSE_OP", "RESUME_HANDLER", "client_of", "StreamSender"]

logger = logging.getLogger("workloads.streaming")

#: the client-side event topic the hub delivers pieces under (``(stream_id, piece)``; None ends)
STREAM_TOPIC = "aicluster-stream"
#: worker -> scheduler message with a piece
PIECE_OP = "aicluster-stream-piece"
#: client -> scheduler message: the reader is done with a stream
CLOSE_OP = "aicluster-stream-close"
#: scheduler handler a task calls when it starts: what has this stream sent already?
RESUME_HANDLER = "aicluster_stream_resume"


def client_of(stream_id: str) -> str:
    """The client a stream belongs to: stream ids are ``"<client id>/<id>[#attempt]"``."""
    return stream_id.rpartition("/")[0]


class StreamSender:
    """Sends one generation's pieces from a task to the hub, in order, on the worker's
    connection to the scheduler (never through pub/sub: only its client receives them)."""

    #: seconds the hub has to answer a task that starts a stream
    TIMEOUT = 10.0

    def __init__(self, worker, stream_id: str):
        self.worker, self.stream_id = worker, stream_id
        self.run = 0
        #: what the stream had sent before this run (``{"ids", "text"}``): this run goes on
        #: from there
        self.prior: dict = {"ids": [], "text": ""}
        self.offset = 0
        #: False when the scheduler has no hub (a plain `dask scheduler` restarted without the
        #: facade's plugins): pieces then go by pub/sub, as before the hub
        self.hub = True

    def start(self, seed: dict | None = None) -> dict:
        """Register this run with the hub; returns what earlier runs sent (empty: none).
        ``seed`` (``{"text", "ids"}``): what the client received before its scheduler restarted."""
        from distributed.utils import sync

        try:
            # (a scheduler without the handler logs it and never answers: hence the timeout)
            got = sync(self.worker.loop, getattr(self.worker.scheduler, RESUME_HANDLER), stream=self.stream_id,
                       seed=seed, callback_timeout=self.TIMEOUT)
        except Exception as e:  # a scheduler without the hub: pub/sub, no resuming
            logger.warning("stream %s: the scheduler has no stream hub (%s: %s); its pieces go by pub/sub",
                           self.stream_id, type(e).__name__, e)
            self.hub = False
            got = None
        if got:
            self.run = int(got["run"])
            self.prior = {"ids": list(got.get("ids") or []), "text": got.get("text") or ""}
        self.offset = len(self.prior["text"])
        return self.prior

    def send(self, piece: str | None, ids: list[int] | None = None) -> None:
        """One piece (None: the stream's end) with the token ids it came from."""
        w = self.worker
        if not self.hub:  # (a message of an unknown op would make the scheduler drop this worker)
            w.log_event(STREAM_TOPIC, (self.stream_id, piece, list(ids or [])))
            return
        msg = {"op": PIECE_OP, "stream": self.stream_id, "run": self.run, "offset": self.offset, "piece": piece,
               "ids": list(ids or [])}
        if piece:
            self.offset += len(piece)
        # from the task's thread onto the worker's event loop, which owns the connection
        w.loop.add_callback(w.batched_send, msg)
