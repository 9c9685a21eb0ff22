"""Reach the worker's ModelHost (``cluster.plugin``) from inside a task.

The plugin's name lives here, on the lower side: the task functions look the plugin up by
it, and ``cluster.plugin`` registers itself under it (cluster/ imports workloads/, never the
other way; see ARCHITECTURE.md)."""
from __future__ import annotations

from distributed import get_worker

#: the name the ModelHost worker plugin is registered under
PLUGIN_NAME = "aicluster-modelhost"


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
