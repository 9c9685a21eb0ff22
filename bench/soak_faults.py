"""Faults the soak injects on purpose, to show that it sees them (``bench/soak.py --inject``)."""
from __future__ import annotations

from distributed.diagnostics.plugin import WorkerPlugin


class DropOneReply(WorkerPlugin):
    """Worker pc1 drops the reply of the first generation it finishes: the scheduler never
    hears that the task finished, so its caller waits for an answer that never comes."""

    name = "aicluster-soak-drop-one-reply"
    idempotent = True

    def setup(self, worker) -> None:
        if str(worker.name) != "pc1":
            return
        send = worker.batched_send
        dropped = []

        def batched_send(msg: dict) -> None:
            if (not dropped and msg.get("op") == "task-finished"
                    and str(msg.get("key", "")).startswith(("generate-", "chat-"))):
                dropped.append(msg["key"])
                return
            send(msg)

        worker.batched_send = batched_send
