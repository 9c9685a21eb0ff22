"""How to load a model. Each backend module has ``load(spec, device, threads)``.

Loaded models offer ``nbytes`` (weights held), ``close()``, and either
``encode(texts, batch_size, normalize)`` (embedding backends) or
``generate(prompt, ...)`` / ``count_tokens(text)`` / ``n_ctx`` (text generation).
"""
from __future__ import annotations

__all__ = ["InputError", "InputTypeError", "ContextTooLong", "WrongModelKind", "ModelCrashed", "TextGenerator", "precheck", "chat_prompt",
           "BUILTIN", "GENERATE_BACKENDS", "EMBED_BACKENDS", "backend_module"]

import importlib

from .base import ContextTooLong, InputError, InputTypeError, ModelCrashed, TextGenerator, WrongModelKind

#: the backends shipped here (``models.<name>.backend``); a user's own is "package.module:load"
BUILTIN = ("sentence_transformers", "llamacpp", "transformers")
#: which of them generate text, which embed
GENERATE_BACKENDS = ("llamacpp", "transformers")
EMBED_BACKENDS = ("sentence_transformers",)


def backend_module(backend: str):
    """``(module, function name)`` that load a model of ``backend``: a built-in one of this
    package (imported on first use: torch and llama.cpp load only where a model of theirs
    does), or a user's ``"package.module:function"`` (a name in the config, so imported by
    name)."""
    if backend in BUILTIN:
        return importlib.import_module(f"{__name__}.{backend}"), "load"
    module, _, attr = backend.partition(":")
    return importlib.import_module(module), attr or "load"



def precheck(spec, items: list[str], name: str, max_tokens: int | None = None, first_index: int | None = None,
             truncate: bool = False) -> bool:
    """Check inputs against the model's limits without loading it: prompts against the
    context (llamacpp), texts against what the embedding model reads (sentence_transformers).

    Raises the backend's ``InputError``; returns False when nothing could be checked here
    (another backend, or the model file is not on this machine), True otherwise.
    """
    if spec.backend == "llamacpp" and max_tokens is not None:
        from .llamacpp import precheck as check

        return check(spec, items, name, max_tokens, first_index)
    if spec.backend == "sentence_transformers":
        from .sentence_transformers import precheck as check

        return check(spec, items, name, truncate, first_index or 0)
    return False


def chat_prompt(spec, messages: list[dict], name: str) -> tuple[str, list[str]] | None:
    """``(prompt, stops)`` for chat ``messages`` without loading the model (llama.cpp, when
    its file is on this machine); None when only the worker can tell (it formats them)."""
    if spec.backend == "llamacpp":
        from .llamacpp import chat_prompt as fmt

        return fmt(spec, messages, name)
    return None
