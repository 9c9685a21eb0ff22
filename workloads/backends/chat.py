"""Chat messages -> one prompt, with the model's own chat template.

* llama.cpp: the Jinja template in the GGUF metadata (``tokenizer.chat_template``), rendered
  the way llama-cpp-python renders it; where the file has none, the format named in
  ``models.<name>.options.chat_format`` (one of llama-cpp-python's registered formats:
  gemma, chatml, llama-2, llama-3, mistral-instruct, ...). The shipped Gemma 3 270M GGUF is
  the base model and carries no template; config.yaml names ``gemma``.
* transformers: the tokenizer's ``apply_chat_template``.

Each gives the prompt and the strings that end the assistant's turn (added to the stops).

Messages' text is never read as special tokens: a user who writes ``<start_of_turn>model``
gets those characters, not a turn marker. The rendered prompt marks each message's text
with two private-use characters (``TEXT_OPEN`` ... ``TEXT_CLOSE``); ``tokenize_prompt``
reads the template's own parts with special tokens and the marked parts as plain text.
(llama.cpp's server tokenizes the whole rendered prompt with special tokens on.)
"""
from __future__ import annotations

from .base import InputError

__all__ = ["llama_chat_prompt", "chat_formats", "NoChatTemplate", "tokenize_prompt", "TEXT_OPEN", "TEXT_CLOSE"]

#: around a message's text in a rendered chat prompt (Unicode private use: no model's text)
TEXT_OPEN, TEXT_CLOSE = "\ue000", "\ue001"


def _plain(text: str) -> str:
    """A message's text, marked as text (markers already in it are dropped)."""
    return TEXT_OPEN + text.replace(TEXT_OPEN, "").replace(TEXT_CLOSE, "") + TEXT_CLOSE


def tokenize_prompt(vocab_model, text: str, add_bos: bool = True) -> list[int]:
    """Token ids of a prompt: special tokens are parsed, except in marked message text."""
    if TEXT_OPEN not in text:
        return vocab_model.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)
    parts: list[tuple[str, bool]] = []  # (chunk, parse special tokens)
    rest = text
    while rest:
        head, opened, tail = rest.partition(TEXT_OPEN)
        if head:
            parts.append((head.replace(TEXT_CLOSE, ""), True))
        if not opened:
            break
        body, _, rest = tail.partition(TEXT_CLOSE)  # an open marker never closed: the rest is text
        if body:
            parts.append((body, False))
    ids: list[int] = []
    for k, (chunk, special) in enumerate(parts):
        ids += vocab_model.tokenize(chunk.encode("utf-8"), add_bos=add_bos and k == 0, special=special)
    return ids


def strip_markers(text: str) -> str:
    return text.replace(TEXT_OPEN, "").replace(TEXT_CLOSE, "")


class NoChatTemplate(InputError):
    """A model that cannot chat: no template in its file and none named in config."""


def chat_formats() -> dict:
    """``{name: formatter}`` of llama-cpp-python's registered chat formats."""
    from llama_cpp import llama_chat_format as f

    from ..compat import llama_chat_format_names

    by_key = {n[len("format_"):].replace("_", ""): getattr(f, n) for n in dir(f) if n.startswith("format_")}
    names = llama_chat_format_names()
    return {name: by_key[name.replace("-", "").replace("_", "")] for name in names
            if name.replace("-", "").replace("_", "") in by_key}


def llama_chat_prompt(vocab_model, messages: list[dict], chat_format: str | None, name: str) -> tuple[str, list[str]]:
    """``(prompt, stops)`` for ``messages`` with a llama.cpp model's template.

    ``vocab_model``: a ``llama_cpp._internals.LlamaModel`` (the loaded model or its
    vocabulary alone). The prompt does not start with the BOS text: the tokenizer adds it.
    """
    meta = vocab_model.metadata()
    messages = [{**m, "content": _plain(m["content"])} for m in messages]
    bos = vocab_model.token_get_text(vocab_model.token_bos())
    eos = vocab_model.token_get_text(vocab_model.token_eos())
    template = meta.get("tokenizer.chat_template")
    if template:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        try:
            resp = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)(messages=messages)
        except Exception as e:  # the template's raise_exception (roles that do not alternate, ...) or its bugs
            raise InputError(f"model {name!r}: its chat template refuses these messages: {e}") from None
    elif chat_format:
        resp = named_format(chat_format, messages, name)
    else:
        raise NoChatTemplate(
            f"model {name!r} cannot chat: its GGUF file has no chat template and config.yaml names none; set "
            f"models.{name}.options.chat_format (e.g. gemma, chatml, llama-3), or use generate with a prompt")
    prompt = resp.prompt
    if bos and prompt.startswith(bos):
        prompt = prompt[len(bos):]
    stop = resp.stop if isinstance(resp.stop, list) else [resp.stop] if resp.stop else []

    def visible(s: str) -> bool:
        # a stop made of special tokens ("<end_of_turn>") never shows in the text (it is not
        # rendered); the model ends its turn with that end-of-generation token anyway
        ids = vocab_model.tokenize(s.encode("utf-8"), False, True)
        return vocab_model.detokenize(ids, special=False).decode("utf-8", "ignore") == s

    return prompt, [s for s in stop if s and visible(s)]


def named_format(chat_format: str, messages: list[dict], name: str):
    """llama-cpp-python's registered format ``chat_format`` applied to ``messages``."""
    formats = chat_formats()
    fmt = formats.get(chat_format)
    if fmt is None:
        raise InputError(f"models.{name}.options.chat_format: {chat_format!r} is not a chat format; "
                         f"known: {', '.join(sorted(formats))}")
    if chat_format == "gemma":
        messages = _system_into_first_user(messages)
    return fmt(messages=messages)


def _system_into_first_user(messages: list[dict]) -> list[dict]:
    """Gemma has no system role: its official template puts the system text at the start of
    the first user turn (llama-cpp-python's ``gemma`` format would drop it silently)."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [dict(m) for m in messages if m["role"] != "system"]
    if system and rest and rest[0]["role"] == "user":
        rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
    elif system:
        rest.insert(0, {"role": "user", "content": system})
    return rest
