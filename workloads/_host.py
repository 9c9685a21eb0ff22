"""Reach the worker's ModelHost from inside a task."""
from __future__ import annotations

from distributed import get_worker

from cluster.plugin import PLUGIN_NAME


def host_and_worker():
    """(ModelHost, worker) of the worker running this task, with a clear error when absent."""
    worker = get_worker()
    host = worker.plugins.get(PLUGIN_NAME)
    if host is None:
        raise RuntimeError(
            f"worker {worker.name} has no ModelHost plugin; start workers with "
            "`--preload cluster.worker` or connect with cluster.connect(), which registers it"
        )
    return host, worker


def where(host, worker) -> dict:
    a = host.assignment
    return {"worker": str(worker.name), "address": worker.address, "tier": a.tier if a else None,
            "simulated": a.simulated if a else False, "device": host.device}
