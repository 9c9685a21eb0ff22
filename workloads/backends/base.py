"""What every backend shares: the input errors, the crash report and ``TextGenerator``
(token counting and the context check). ``workloads.backends`` re-exports all of it."""
from __future__ import annotations

__all__ = ["InputError", "InputTypeError", "ContextTooLong", "WrongModelKind", "ModelCrashed", "TextGenerator"]


class InputError(ValueError):
    """Input a model cannot take; the message names the item and the fix."""


class InputTypeError(InputError, TypeError):
    """Input of the wrong type (a TypeError too, for callers that catch those)."""


class ContextTooLong(InputError):
    """A prompt (plus the tokens asked for) longer than the model's context window."""

    def __init__(self, model: str, prompt_tokens: int, max_tokens: int, n_ctx: int, index: int | None = None):
        self.args_ = (model, prompt_tokens, max_tokens, n_ctx, index)
        which = f"prompt {index}" if index is not None else "the prompt"
        super().__init__(
            f"{which} is {prompt_tokens} tokens and asks for {max_tokens} more, but model {model!r} has a "
            f"context of {n_ctx} tokens; shorten the prompt or lower max_tokens "
            f"(or raise models.{model}.options.n_ctx)"
        )

    def __reduce__(self):
        return (type(self), self.args_)


class WrongModelKind(InputError):
    """An embedding model asked to generate, or the reverse."""


class ModelCrashed(RuntimeError):
    """A model's native code killed its process (SIGSEGV, SIGILL, SIGABRT, ...) on a worker.

    The worker itself lives on: the model ran in a child process (``engine_proc.py``). The
    worker quarantines the model until it is unloaded or its config changes.
    """

    def __init__(self, model: str, worker: str, signal: str | None, frame: str | None = None,
                 library: str | None = None, detail: str | None = None, during: str = "generating",
                 note: str = ""):
        self.model, self.worker, self.signal, self.frame, self.library = model, worker, signal, frame, library
        self.detail, self.during, self.note = detail, during, note
        where = f" in {frame}" if frame else ""
        lib = f" ({library})" if library else ""
        super().__init__(
            f"model {model!r} crashed on worker {worker} while {during}: {signal or 'killed'}{where}{lib}"
            + (f" [{detail}]" if detail and signal == "SIGABRT" and "GGML" in (detail or "") else "")
            + ". The worker and its other models carry on; the model is quarantined there until "
            f"ai.unload({model!r}) or a config change. If this PC's llama.cpp build is at fault, rebuild it "
            "(make install LLAMA_CPU_ARGS=...; `aicluster doctor` checks the build against the CPU)"
            + (f". {note}" if note else ""))

    def with_note(self, note: str) -> "ModelCrashed":
        """The same crash with ``note`` added to what it says."""
        return ModelCrashed(self.model, self.worker, self.signal, self.frame, self.library, self.detail,
                            self.during, f"{self.note} {note}".strip())

    def __reduce__(self):
        return (type(self), (self.model, self.worker, self.signal, self.frame, self.library, self.detail,
                             self.during, self.note))


class TextGenerator:
    """What the generation backends share: token counting and the context check.

    Subclasses set ``name`` and ``n_ctx`` and implement ``tokenize(text) -> list[int]``
    (with the special tokens the model adds) and ``generate(...)``.
    """

    kind = "generate"
    name: str
    n_ctx: int

    def tokenize(self, text: str) -> list[int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def check_bias(self, logit_bias: dict | None, n_vocab: int) -> None:
        """``InputError`` for a ``logit_bias`` token id outside the vocabulary (llama.cpp's
        sampler would read past its array)."""
        bad = [t for t in (logit_bias or {}) if not 0 <= int(t) < n_vocab]
        if bad:
            raise InputError(f"logit_bias: token id(s) {', '.join(map(str, bad[:5]))} are not in model "
                             f"{self.name!r}'s vocabulary (0 to {n_vocab - 1})")

    def check_fits(self, prompt: str, max_tokens: int, index: int | None = None) -> list[int]:
        """The prompt's token ids, or ``ContextTooLong`` when prompt + max_tokens exceed n_ctx."""
        ids = self.tokenize(prompt)
        if len(ids) + max_tokens > self.n_ctx:
            raise ContextTooLong(self.name, len(ids), max_tokens, self.n_ctx, index)
        return ids
