"""Text generation through Hugging Face transformers: a model directory or a GGUF file.

``source`` is a directory with ``config.json`` and weights (``save_pretrained`` output), or
a ``.gguf`` file (transformers de-quantises it to ``dtype``, so it needs the memory of the
full-precision model and loads slowly: Gemma 3 270M takes about 45 s here, against 0.7 s
through the ``llamacpp`` backend). Nothing is fetched from a hub (``local_files_only``).

Options (config.yaml ``models.<name>.options``):
  dtype: auto | float32 | float16 | bfloat16   (auto: float16 on CUDA, float32 on CPU)
  n_ctx: the context window to enforce (default: the model's max_position_embeddings)
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from .base import InputError, TextGenerator
from .sources import resolve_source


class TransformersLM(TextGenerator):

    def __init__(self, model, tokenizer, name: str, device: str, n_ctx: int, chat_format: str | None = None):
        self.model, self.tokenizer, self.name, self.device, self.n_ctx = model, tokenizer, name, device, n_ctx
        self.chat_format = chat_format
        self.nbytes = int(model.get_memory_footprint())

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def chat_prompt(self, messages: list[dict]) -> tuple[str, list[str]]:
        """``(prompt, stops)`` of chat ``messages`` with the tokenizer's chat template."""
        from .chat import NoChatTemplate, named_format

        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            try:
                prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as e:  # the template's raise_exception (roles that do not alternate, ...)
                raise InputError(f"model {self.name!r}: its chat template refuses these messages: {e}") from None
        elif self.chat_format:
            prompt = named_format(self.chat_format, messages, self.name).prompt
        else:
            raise NoChatTemplate(f"model {self.name!r} cannot chat: its tokenizer has no chat template and config.yaml "
                                 f"names none; set models.{self.name}.options.chat_format (e.g. chatml), or use "
                                 "generate with a prompt")
        if tok.bos_token and prompt.startswith(tok.bos_token):
            prompt = prompt[len(tok.bos_token):]  # the tokenizer adds it
        # the end of the turn is the tokenizer's EOS, which generation stops at (it never shows in the text)
        return prompt, []

    def generate(
        self,
        prompt: str,
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: list[str] | None = None,
        seed: int | None = None,
        on_token: Callable[[str], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> dict:
        """Same contract as ``llamacpp.LlamaModel.generate``; ``temperature=0`` is greedy."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        ids = self.check_fits(prompt, max_tokens)
        stop = [s for s in (stop or []) if s]
        tok = self.tokenizer
        prompt_len = len(ids)
        state = {"first": None, "emitted": 0, "cancelled": False}
        t0 = time.perf_counter()

        def decoded(seq) -> str:
            return tok.decode(seq[prompt_len:], skip_special_tokens=True)

        class Stops(StoppingCriteria):
            # stop strings and cancellation, checked after every token
            def __call__(self, input_ids, scores, **kwargs):
                if state["first"] is None:
                    state["first"] = time.perf_counter()
                if should_stop is not None and should_stop():
                    state["cancelled"] = True
                    return True
                if stop:
                    text = decoded(input_ids[0].tolist())
                    return any(s in text for s in stop)
                return False

        class Streamer(BaseStreamer):
            def __init__(self):
                self.out: list[int] = []
                self.skipped_prompt = False

            def put(self, value):
                if not self.skipped_prompt:  # generate() first puts the prompt
                    self.skipped_prompt = True
                    return
                self.out.extend(value.reshape(-1).tolist())
                text = tok.decode(self.out, skip_special_tokens=True)
                if text.endswith("\ufffd"):  # half a multi-byte character
                    return
                hold = max((len(s) - 1 for s in stop), default=0)
                safe = len(text) - hold
                if any(s in text for s in stop):
                    return
                if safe > state["emitted"]:
                    on_token(text[state["emitted"]:safe])
                    state["emitted"] = safe

            def end(self):
                pass

        kwargs = dict(max_new_tokens=max_tokens, stopping_criteria=StoppingCriteriaList([Stops()]),
                      pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        if temperature > 0:
            if seed is not None:
                torch.manual_seed(seed)
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=40)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if on_token is not None:
            kwargs["streamer"] = Streamer()
        input_ids = torch.tensor([ids], device=self.model.device)
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
        t1 = time.perf_counter()
        new = out[0].tolist()[prompt_len:]
        eos = _eos_ids(self.model, tok)
        finish = "length"
        if new and new[-1] in eos:
            new, finish = new[:-1], "stop"
        text = tok.decode(new, skip_special_tokens=True)
        hit = next((s for s in stop if s in text), None)
        if hit is not None:
            text, finish = text[: text.index(hit)], "stop"
        if state["cancelled"]:
            finish = "cancelled"
        if on_token is not None and len(text) > state["emitted"]:
            on_token(text[state["emitted"]:])
        return {
            "text": text,
            "prompt_tokens": prompt_len,
            "completion_tokens": len(new),
            "finish_reason": finish,
            "time_to_first_token": (state["first"] - t0) if state["first"] else None,
            "generate_seconds": t1 - t0,
        }

    def close(self) -> None:
        self.model = None
        self.tokenizer = None


def _eos_ids(model, tok) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    return ids


def prepare() -> None:
    """Import the library before the host measures memory, so the import is not counted."""
    import torch  # noqa: F401
    import transformers  # noqa: F401


def _dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    except KeyError:
        raise InputError(f"options.dtype {name!r} is not one of auto, float32, float16, bfloat16") from None


def load(spec, device: str = "cpu", threads: int = 1, name: str = "model") -> TransformersLM:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    opts = dict(spec.options)
    dtype = _dtype(str(opts.pop("dtype", "auto")), device)
    n_ctx = opts.pop("n_ctx", None)
    chat_format = opts.pop("chat_format", None)
    path = Path(resolve_source(spec.source))
    if path.is_file():
        if path.suffix != ".gguf":
            raise InputError(f"model {name!r}: source {path} is a file but not a .gguf; give a model directory or a GGUF file")
        where, extra = str(path.parent), {"gguf_file": path.name}
    else:
        if not (path / "config.json").exists():
            raise InputError(f"model {name!r}: {path} has no config.json; it is not a transformers model directory")
        where, extra = str(path), {}
    tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True, **extra)
    model = AutoModelForCausalLM.from_pretrained(where, local_files_only=True, dtype=dtype, **extra, **opts)
    model.to(device)
    model.eval()
    if n_ctx is None:
        n_ctx = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
    return TransformersLM(model, tokenizer, name, device, int(n_ctx), chat_format=chat_format)
