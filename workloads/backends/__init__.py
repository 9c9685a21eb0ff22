"""How to load a model. Each backend module has ``load(spec, device, threads)``.

Loaded models offer ``nbytes`` (weights held), ``close()``, and either
``encode(texts, batch_size, normalize)`` (embedding backends) or
``generate(prompt, ...)`` / ``count_tokens(text)`` / ``n_ctx`` (text generation).
"""
from __future__ import annotations

__all__ = ["InputError", "ContextTooLong", "WrongModelKind", "TextGenerator"]


class InputError(ValueError):
    """Input a model cannot take; the message names the item and the fix."""


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

    def check_fits(self, prompt: str, max_tokens: int, index: int | None = None) -> list[int]:
        """The prompt's token ids, or ``ContextTooLong`` when prompt + max_tokens exceed n_ctx."""
        ids = self.tokenize(prompt)
        if len(ids) + max_tokens > self.n_ctx:
            raise ContextTooLong(self.name, len(ids), max_tokens, self.n_ctx, index)
        return ids
