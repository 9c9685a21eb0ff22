"""Checks of what callers send (prompts, texts, chat messages, sampling parameters), the
same for every door: the Python facade, the HTTP gateway, pipelines, the CLI. Each error is
an ``InputError`` that names the item, the parameter and the value."""
from __future__ import annotations

from .backends import InputError, InputTypeError

__all__ = ["check_sampling", "check_backend_sampling", "sampling_kwargs", "check_messages", "check_texts",
           "LLAMA_SAMPLING", "ROLES"]


def check_sampling(max_tokens, temperature, top_p, stop, seed, presence_penalty=0.0, frequency_penalty=0.0,
              logit_bias=None, logprobs=None, response_format=None) -> dict:
    """Checked generation parameters (each error names the parameter and the value). The
    ones past ``seed`` are OpenAI's, done by llama.cpp's samplers; they are in the result
    only when set, so backends without them (transformers) are not asked."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
        raise InputError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    if isinstance(temperature, bool) or not (isinstance(temperature, (int, float)) and temperature >= 0):
        raise InputError(f"temperature must be >= 0, got {temperature!r}")
    if isinstance(top_p, bool) or not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise InputError(f"top_p must be in (0, 1], got {top_p!r}")
    # one string is one stop string (as in OpenAI's API), not a list of its characters
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(s, str) for s in stop):
        raise InputError(f"stop must be a string or a list of strings, got {stop!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InputError(f"seed must be an integer, got {seed!r}")
    out = dict(max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p), stop=stop, seed=seed)
    for name, v in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -2 <= v <= 2:
            raise InputError(f"{name} must be a number from -2 to 2, got {v!r}")
        if v:
            out[name] = float(v)
    if logit_bias:
        if not isinstance(logit_bias, dict):
            raise InputError(f"logit_bias must map token ids to numbers from -100 to 100, got {logit_bias!r:.60}")
        bias = {}
        for k, v in logit_bias.items():
            try:
                tok = int(k)
            except (TypeError, ValueError):
                raise InputError(f"logit_bias: {k!r} is not a token id") from None
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
                raise InputError(f"logit_bias[{k!r}] must be a number from -100 to 100, got {v!r}")
            bias[tok] = float(v)
        out["logit_bias"] = bias
    if logprobs is not None:
        if isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= 20:
            raise InputError(f"logprobs (the alternatives per token) must be an integer from 0 to 20, got {logprobs!r}")
        out["logprobs"] = logprobs
    if response_format is not None:
        from .backends.llamacpp import grammar_for

        grammar = grammar_for(response_format)
        if grammar:
            out["grammar"] = grammar
    return out


#: what `check_sampling` adds for llama.cpp's samplers only
LLAMA_SAMPLING = ("presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "grammar")


def check_backend_sampling(spec, model: str, params: dict) -> None:
    extra = [k for k in LLAMA_SAMPLING if k in params]
    if extra and spec.backend == "transformers":
        names = ", ".join("response_format" if k == "grammar" else k for k in extra)
        raise InputError(f"model {model!r} (transformers) does not support {names}; the llamacpp backend does")


def sampling_kwargs(kwargs: dict) -> dict:
    allowed = ("presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "response_format")
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise InputTypeError(f"unexpected keyword argument(s) {', '.join(unknown)}; sampling takes "
                             f"{', '.join(allowed)}")
    return kwargs


ROLES = ("system", "user", "assistant")


def check_messages(messages) -> list[dict]:
    """Chat messages as plain ``{"role", "content"}`` dicts, or an error naming the bad one."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InputError("messages must be a non-empty list of {\"role\": ..., \"content\": ...}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InputTypeError(f"message {i} is a {type(m).__name__}, not a {{\"role\", \"content\"}} mapping")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise InputError(f"message {i}: role {role!r} is not one of {', '.join(ROLES)}")
        if isinstance(content, list):  # OpenAI's content parts: text only here
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise InputError(f"message {i}: only text content is supported")
            content = "".join(p.get("text", "") for p in content)
        if not isinstance(content, str) or not content.strip():
            raise InputError(f"message {i} ({role}) has no text content")
        out.append({"role": role, "content": content})
    if out[-1]["role"] == "assistant":
        raise InputError("the last message is the assistant's: end with a user message to get an answer")
    return out


def check_texts(value, what: str) -> tuple[list[str], bool]:
    """A list of non-empty strings (and whether a single string was given)."""
    if isinstance(value, str):
        items, single = [value], True
    elif isinstance(value, (list, tuple)):
        items, single = list(value), False
    else:
        raise InputTypeError(f"expected a string or a list of strings as {what}s, got {type(value).__name__}")
    if not items:
        raise InputError(f"no {what}s given: the list is empty")
    for i, t in enumerate(items):
        if not isinstance(t, str):
            raise InputTypeError(f"{what} {i} is a {type(t).__name__}, not a string: {t!r:.60}")
        if not t.strip():
            raise InputError(f"{what} {i} is empty")
    return items, single
