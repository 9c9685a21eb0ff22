"""Text generation through llama-cpp-python (default: Gemma 3 270M, GGUF Q4_K_M, from a package).

All layers go to the GPU on CUDA tiers, none on CPU tiers; the CPU thread count comes from
``options.n_threads`` (default: the worker's torch_threads).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from . import ContextTooLong, TextGenerator
from ._source import local_path, resolve_source

logger = logging.getLogger("workloads.backends.llamacpp")


class LlamaModel(TextGenerator):

    def __init__(self, llm, path: Path, name: str):
        self.llm, self.path, self.name = llm, path, name
        self.n_ctx = llm.n_ctx()
        # the weights are mmap'd from this file (on a GPU tier they are copied to VRAM)
        self.nbytes = path.stat().st_size

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)

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
        """Generate from ``prompt``; ``temperature=0`` is greedy (deterministic).

        ``on_token`` receives text pieces as they come; ``should_stop`` is polled between
        tokens, so a cancelled job stops within a token or two.
        """
        prompt_ids = self.check_fits(prompt, max_tokens)
        import llama_cpp

        self.llm.reset()
        if seed is not None:
            self.llm.set_seed(seed)
        sampler = dict(temp=temperature, top_p=top_p, top_k=40 if temperature > 0 else 1, min_p=0.0, repeat_penalty=1.0)
        stop = [s for s in (stop or []) if s]
        eos = self.llm.token_eos()
        out_ids: list[int] = []
        text_bytes = b""
        emitted = 0
        finish = "length"
        t0 = time.perf_counter()
        first = None
        for tok in self.llm.generate(prompt_ids, reset=True, **sampler):
            if tok == eos or llama_cpp.llama_vocab_is_eog(self.llm._model.vocab, tok):
                finish = "stop"
                break
            if first is None:
                first = time.perf_counter()
            out_ids.append(tok)
            text_bytes += self.llm.detokenize([tok], prev_tokens=prompt_ids + out_ids[:-1])
            text = text_bytes.decode("utf-8", errors="ignore")
            hit = next((s for s in stop if s in text), None)
            if hit is not None:
                text_bytes = text[: text.index(hit)].encode("utf-8")
                finish = "stop"
                break
            if on_token is not None:
                # hold back what could be the start of a stop string
                hold = max((len(s) - 1 for s in stop), default=0)
                safe = len(text) - hold
                if safe > emitted:
                    on_token(text[emitted:safe])
                    emitted = safe
            if len(out_ids) >= max_tokens:
                break
            if should_stop is not None and should_stop():
                finish = "cancelled"
                break
        t1 = time.perf_counter()
        text = text_bytes.decode("utf-8", errors="replace")
        if on_token is not None and len(text) > emitted:
            on_token(text[emitted:])
        return {
            "text": text,
            "prompt_tokens": len(prompt_ids),
            "completion_tokens": len(out_ids),
            "finish_reason": finish,
            "time_to_first_token": (first - t0) if first else None,
            "generate_seconds": t1 - t0,
        }

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None


_log_callback = None


def _route_logs() -> None:
    """llama.cpp's own log goes to the ``llama.cpp`` Python logger. llama-cpp-python's
    callback prints to stderr with a level table older than ggml's (it takes WARN for ERROR),
    so every model load printed "using full-size SWA cache" into the user's terminal.
    llama.cpp warns about its own choices of cache and context sizes, not about the user's
    input, so its warnings are logged at INFO; its errors at ERROR."""
    global _log_callback
    if _log_callback is not None:
        return
    import ctypes

    import llama_cpp

    log = logging.getLogger("llama.cpp")
    levels = {4: logging.ERROR, 3: logging.INFO, 2: logging.DEBUG, 1: logging.DEBUG}
    last = [logging.DEBUG]

    @llama_cpp.llama_log_callback
    def callback(level, text, user_data):
        lvl = last[0] if level == 5 else levels.get(level, logging.DEBUG)  # 5: continues the last line
        last[0] = lvl
        if log.isEnabledFor(lvl):
            msg = text.decode("utf-8", errors="replace").rstrip()
            if msg:
                log.log(lvl, msg)

    _log_callback = callback  # ctypes keeps only a pointer: the callback must stay alive
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


def prepare() -> None:
    """Import the library before the host measures memory, so the import is not counted."""
    import llama_cpp  # noqa: F401

    _route_logs()


def load(spec, device: str = "cpu", threads: int = 1, name: str = "model") -> LlamaModel:
    from llama_cpp import Llama

    path = resolve_source(spec.source)
    opts = dict(spec.options)
    n_ctx = int(opts.pop("n_ctx", 2048))
    n_threads = int(opts.pop("n_threads", threads))
    gpu = device.startswith("cuda")
    gpu_opts = {}
    if gpu:
        import llama_cpp

        if not llama_cpp.llama_supports_gpu_offload():
            logger.warning("model %s: llama-cpp-python was built without GPU support, so it runs on the CPU of "
                           "this GPU worker; reinstall it with CMAKE_ARGS=\"-DGGML_CUDA=on\"", name)
        # all layers on this worker's GPU only: the default split mode would spread them over
        # every visible GPU and ignore main_gpu
        gpu_opts = dict(n_gpu_layers=-1, main_gpu=int(device.split(":")[1]),
                        split_mode=llama_cpp.LLAMA_SPLIT_MODE_NONE)
    llm = Llama(
        model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
        **({"n_gpu_layers": 0} | gpu_opts), verbose=False, **opts,
    )
    return LlamaModel(llm, Path(path), name)


_vocabs: dict = {}


def _vocab(path: Path):
    """The model's vocabulary alone (``vocab_only``: no weights, no context; about 0.5 s),
    kept for the life of the process. Tokenizing with it gives the ids the full model gives."""
    key = (str(path), path.stat().st_mtime_ns)
    v = _vocabs.get(key)
    if v is None:
        import llama_cpp
        from llama_cpp._internals import LlamaModel as _LowLevelModel

        _route_logs()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        v = _vocabs[key] = _LowLevelModel(path_model=str(path), params=params, verbose=False)
    return v


def precheck(spec, prompts: list[str], name: str, max_tokens: int, first_index: int | None = None) -> bool:
    """Refuse (``ContextTooLong``) a prompt that with ``max_tokens`` exceeds the context,
    before any model work; False when the model file is not on this machine (nothing checked).
    ``first_index``: the index of ``prompts[0]`` in the caller's list (None: a single prompt)."""
    path = local_path(spec.source)
    if path is None or not path.is_file():
        return False
    n_ctx = int(spec.options.get("n_ctx", 2048))
    vocab = _vocab(path)
    for i, p in enumerate(prompts):
        if len(p.encode("utf-8")) + 1 + max_tokens <= n_ctx:
            continue  # every token covers at least one byte (plus BOS): it fits without counting
        n = len(vocab.tokenize(p.encode("utf-8"), add_bos=True, special=True))
        if n + max_tokens > n_ctx:
            raise ContextTooLong(name, n, max_tokens, n_ctx, None if first_index is None else first_index + i)
    return True
