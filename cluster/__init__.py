"""dask-ai-cluster: a resource-tagged Dask cluster for AI work on PCs with unequal GPUs."""
from __future__ import annotations

__all__ = ["connect", "AICluster", "load_config", "ConfigError", "NoWorkerForTier", "ModelDoesNotFit", "local_cluster"]


def __getattr__(name: str):
    # Lazy: importing `cluster` (e.g. as a --preload) should not import the client stack.
    if name in ("connect", "AICluster"):
        from . import client

        return getattr(client, name)
    if name in ("load_config", "ConfigError"):
        from . import config

        return getattr(config, name)
    if name == "NoWorkerForTier":
        from .routing import NoWorkerForTier

        return NoWorkerForTier
    if name == "ModelDoesNotFit":
        from .plugin import ModelDoesNotFit

        return ModelDoesNotFit
    if name == "local_cluster":
        from .local import local_cluster

        return local_cluster
    raise AttributeError(f"module 'cluster' has no attribute {name!r}")
