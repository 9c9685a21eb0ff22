"""Text generation through llama-cpp-python (default: Gemma 3 270M, GGUF Q4_K_M, from a package).

All layers go to the GPU on CUDA tiers, none on CPU tiers; the CPU thread count comes from
``options.n_threads`` (default: the worker's torch_threads). One resident model decodes up
to ``options.parallel`` requests at once (continuous batching, ``llama_batch.py``), in a
child process of the worker (``engine_proc.py``: a native crash ends that process, not the
worker); ``options.isolate: false`` keeps it in the worker's own process.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from .base import ContextTooLong, TextGenerator
from .llama_lib import load_vocab, route_logs
from .sources import local_path, resolve_source

__all__ = ["LlamaModel", "load", "load_here", "load_vocab", "precheck", "chat_prompt", "grammar_for", "prepare",
           "engine_options", "FLASH_ATTN_DEFAULT"]

logger = logging.getLogger("workloads.backends.llamacpp")


class LlamaModel(TextGenerator):
    """A resident GGUF model that decodes up to ``parallel`` requests at once.

    ``generate`` may be called from many threads: each call joins the model's running
    batch (``llama_batch.BatchEngine``) and waits for its own result.
    """

    #: ModelHost lets many tasks use this model at once (the engine serialises the decoding)
    concurrent = True
    #: a generation cut short elsewhere can be continued from its tokens (``submit(resume=)``)
    can_resume = True

    def __init__(self, model, path: Path, name: str, n_ctx: int, parallel: int, n_threads: int,
                 chat_format: str | None = None, **engine_opts):
        from .llama_batch import BatchEngine

        self.model, self.path, self.name, self.n_ctx, self.parallel = model, path, name, n_ctx, parallel
        self.chat_format = chat_format
        self.engine = BatchEngine(model, n_ctx=n_ctx, parallel=parallel, n_threads=n_threads, name=name, **engine_opts)
        # the weights are mmap'd from this file (on a GPU tier they are copied to VRAM)
        self.nbytes = path.stat().st_size

    def tokenize(self, text: str) -> list[int]:
        from .chat import tokenize_prompt

        return tokenize_prompt(self.model, text)

    def detokenize(self, ids: list[int]) -> str:
        return self.model.detokenize(ids, special=False).decode("utf-8", errors="ignore")

    def chat_prompt(self, messages: list[dict]) -> tuple[str, list[str]]:
        """``(prompt, stops)`` of chat ``messages`` with this model's template (``chat.py``)."""
        from .chat import llama_chat_prompt

        return llama_chat_prompt(self.model, messages, self.chat_format, self.name)

    def submit(self, prompt: str, max_tokens: int = 128, **kwargs):
        """Queue a generation; returns its ``llama_batch.Request`` (``.wait()`` for the result).
        Keyword arguments: those of ``submit_ids``."""
        return self.submit_ids(self.check_fits(prompt, max_tokens), max_tokens=max_tokens, **kwargs)

    def submit_ids(
        self,
        prompt_ids: list[int],
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: list[str] | None = None,
        seed: int | None = None,
        on_token: Callable[[str], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        priority: int = 0,
        on_piece: Callable[[str, list[int]], None] | None = None,
        resume: dict | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logit_bias: dict | None = None,
        grammar: str | None = None,
        logprobs: int | None = None,
    ):
        """Queue a generation of token ids. ``on_piece(text, ids)`` receives each streamed
        piece with its token ids; ``resume`` (``{"ids": [...], "text": "..."}``) continues a
        generation that produced ``ids`` (and sent ``text``) elsewhere."""
        from .llama_batch import Request

        self.check_bias(logit_bias, self.model.n_vocab())
        prior = [int(t) for t in (resume or {}).get("ids") or []]
        # greedy: the produced tokens are fed back one step at a time, as the first run computed
        # them (the same text); sampled: one prefill (see llama_batch's module docstring)
        replay = temperature <= 0
        req = Request(
            prompt_ids=list(prompt_ids) + ([] if replay else prior), max_tokens=max_tokens, temperature=temperature,
            top_p=top_p, seed=seed, stop=[s for s in (stop or []) if s], on_token=on_token, on_piece=on_piece,
            should_stop=should_stop, priority=priority, presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty, logprobs=logprobs, grammar=grammar,
            n_prior=0 if replay else len(prior), forced=list(prior) if replay else [], continued=len(prior),
            logit_bias={int(k): float(v) for k, v in (logit_bias or {}).items()} or None)
        if prior:  # the text so far, as the first run built it (token by token)
            req.text_bytes = b"".join(self.model.detokenize([t], special=False) for t in prior)
            req.emitted = len((resume or {}).get("text") or "")
            if len(prior) >= max_tokens:  # it had produced everything: nothing to decode
                req.out_ids, req.forced, req.n_prior, req.ids_sent = [], [], len(prior), 0
                self.engine.finish(req)
                return req
        return self.engine.submit(req)

    def generate(self, prompt: str, **kwargs) -> dict:
        """Generate from ``prompt``; ``temperature=0`` is greedy (deterministic for a lone
        request and for the same batch; see the module docstring of ``llama_batch``).

        ``on_token`` receives text pieces as they come; ``should_stop`` is polled between
        tokens, so a cancelled job stops within a token or two.
        """
        return self.submit(prompt, **kwargs).wait()

    def stats(self) -> dict:
        """The engine's counters (see ``engine_proc.ChildModel.stats``)."""
        e = self.engine
        return {"active": e.active(), "max_active": e.max_active, "steps": e.steps}

    @property
    def healthy(self) -> bool:
        """False when the batch decoder stopped (the worker's ModelHost loads the model again)."""
        return self.engine is not None and self.engine.healthy

    def abort(self) -> None:
        """End every generation now (with an error) and take no more; ``close`` frees the model."""
        if self.engine is not None:
            self.engine.close()

    def close(self) -> None:
        if self.engine is not None:
            if not self.engine.close():
                # its loop is still inside llama_decode: freeing the weights under it would crash
                # the process; they stay allocated (the engine logged a warning)
                self.engine, self.model = None, None
                return
            self.engine = None
        if self.model is not None:
            self.model.close()
            self.model = None


def prepare() -> None:
    """Import the library before the host measures memory, so the import is not counted."""
    import llama_cpp  # noqa: F401

    route_logs()


#: options.<key> this backend understands (see the README's Backends table); ``shard_plan``
#: is set by the client for a model split across workers (``shard:`` in config.yaml)
OPTIONS = ("n_ctx", "n_threads", "parallel", "prefix_cache", "chat_format", "n_batch", "n_ubatch", "use_mmap",
           "repack", "kv_unified", "flash_attn", "isolate", "shard_plan")


def engine_options(opts: dict, name: str) -> tuple[int, int, dict]:
    """``(n_ctx, parallel, batch-engine keyword arguments)`` from a model's options."""
    import llama_cpp

    from .base import InputError

    n_ctx = int(opts.get("n_ctx", 2048))
    parallel = int(opts.get("parallel", 8))
    n_batch = int(opts.get("n_batch", 512))
    most = min(n_batch, llama_cpp.llama_max_parallel_sequences())
    if not 1 <= parallel <= most:
        raise InputError(f"models.{name}.options.parallel must be between 1 and {most} (llama.cpp's limit and "
                         f"n_batch), got {parallel}")
    # prefix_cache: false turns prompt-prefix reuse off (no prefix is ever long enough)
    min_reuse = 32 if opts.get("prefix_cache", True) else n_ctx + 1
    return n_ctx, parallel, {"n_batch": n_batch, "n_ubatch": int(opts.get("n_ubatch", 512)), "min_reuse": min_reuse,
                             "kv_unified": bool(opts.get("kv_unified", False)),
                             "flash_attn": bool(opts.get("flash_attn", FLASH_ATTN_DEFAULT))}


#: llama.cpp's flash attention (``options.flash_attn``): off by default, as llama-cpp-python's
#: ``Llama``, whose greedy tokens the tests compare with. On, Gemma 3 270M decodes about 10%
#: faster on one CPU thread here (83-87 -> 92 tokens/s), but its tokens differ slightly,
#: and concurrent requests of a split model gave other greedy text than a lone one
FLASH_ATTN_DEFAULT = False


#: what the engine's child process calls to load the model (a test names its own)
CHILD_LOADER = "workloads.backends.llamacpp:load_here"


def load(spec, device: str = "cpu", threads: int = 1, name: str = "model", loader: str = CHILD_LOADER,
         extra: dict | None = None):
    """The resident model of ``spec``: its engine in a child process (``engine_proc.py``), or
    in this process with ``options.isolate: false``; a split model's head (``llama_head``).
    ``loader`` and ``extra`` (more settings for it): what the child loads with."""
    from .base import InputError

    opts = dict(spec.options)
    unknown = sorted(set(opts) - set(OPTIONS))
    if unknown:
        raise InputError(f"models.{name}.options: unknown option(s) {', '.join(unknown)} for the llamacpp backend; "
                         f"known: {', '.join(o for o in OPTIONS if o != 'shard_plan')}")
    if opts.get("shard_plan"):  # split across workers: this worker is the head (llama_head.py)
        from .llama_head import load_sharded

        return load_sharded(spec, device=device, threads=int(opts.get("n_threads", threads)), name=name)
    path = resolve_source(spec.source)
    n_threads = int(opts.get("n_threads", threads))
    n_ctx, _, _ = engine_options(opts, name)
    cfg = {"options": opts, "device": device, "threads": n_threads, "name": name, "path": str(path), **(extra or {})}
    if not opts.get("isolate", True):
        route_logs()
        return load_here(cfg)
    from .engine_proc import ChildModel

    return ChildModel(name, Path(path), loader, cfg, n_ctx=n_ctx, chat_format=opts.get("chat_format"), device=device)


def load_here(cfg: dict, on_progress: Callable[[float], None] | None = None) -> LlamaModel:
    """Load the model in this process (the engine's child, or the worker with isolate off).

    ``cfg``: name, path, options, device, threads, and for a split model's head the shard
    servers' ``endpoints`` and ``tensor_split`` (registered as llama.cpp devices first).
    """
    import ctypes

    import llama_cpp

    from ..compat import llama_model_class

    LowLevelModel = llama_model_class()

    route_logs()
    name, path, opts, device = cfg["name"], Path(cfg["path"]), dict(cfg["options"]), cfg.get("device", "cpu")
    n_ctx, parallel, engine_opts = engine_options(opts, name)
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0
    params.use_mmap = bool(opts.get("use_mmap", True))
    # repack: false skips llama.cpp's CPU weight repacking, which a shard server does not do
    # either: then a split model's greedy tokens equal this process's token for token
    params.use_extra_bufts = bool(opts.get("repack", True))
    if cfg.get("endpoints"):  # a split model's head: every layer on the shard servers
        from .rpc_server import ggml_libs

        ggml, rpc = ggml_libs()
        for ep in cfg["endpoints"]:
            reg = rpc.ggml_backend_rpc_add_server(ep.encode())
            if not reg:
                raise RuntimeError(f"llama.cpp could not add shard server {ep}")
            ggml.ggml_backend_register(reg)
        # the input layer stays here; gpu_layers (the shard speed probe): only that many
        # repeating layers on the servers, the output layer here too
        params.n_gpu_layers = int(cfg.get("gpu_layers", -1))
        params.split_mode = llama_cpp.LLAMA_SPLIT_MODE_LAYER
        split = (ctypes.c_float * llama_cpp.llama_max_devices())(*cfg["tensor_split"])
        params.tensor_split = split
    elif device.startswith("cuda"):
        if not llama_cpp.llama_supports_gpu_offload():
            logger.warning("model %s: llama-cpp-python was built without GPU support, so it runs on the CPU of "
                           "this GPU worker; reinstall it with make install LLAMA_CMAKE_ARGS=\"-DGGML_RPC=ON "
                           "-DGGML_CUDA=ON\"", name)
        # all layers on this worker's GPU only: the default split mode would spread them over
        # every visible GPU and ignore main_gpu
        params.n_gpu_layers = -1
        params.main_gpu = int(device.split(":")[1])
        params.split_mode = llama_cpp.LLAMA_SPLIT_MODE_NONE
    if on_progress is not None:
        @llama_cpp.llama_progress_callback
        def progress(p, user):
            on_progress(float(p))
            return True

        params.progress_callback = progress  # (kept alive by `progress` until the load returns)
    # verbose=True: llama-cpp-python would otherwise point fds 1 and 2 at /dev/null while it
    # loads, which races with any other thread of the process (an in-process worker, the
    # client) and can leave its output gone for good; the log goes to Python logging instead
    model = LowLevelModel(path_model=str(path), params=params, verbose=True)
    try:
        return LlamaModel(model, path, name, n_ctx=n_ctx, parallel=parallel, n_threads=int(cfg.get("threads", 1)),
                          chat_format=opts.get("chat_format"), **engine_opts)
    except BaseException:
        model.close()
        raise


def grammar_for(response_format) -> str | None:
    """A GBNF grammar for OpenAI's ``response_format``: None for ``{"type": "text"}``, JSON
    for ``json_object``, the schema's JSON for ``json_schema`` (llama-cpp-python's own
    converter, the one llama.cpp's server uses in Python form)."""
    import json

    from .base import InputError

    if not isinstance(response_format, dict) or "type" not in response_format:
        raise InputError(f"response_format must be {{\"type\": \"text\" | \"json_object\" | \"json_schema\"}}, "
                         f"got {response_format!r:.80}")
    kind = response_format["type"]
    if kind == "text":
        return None
    from llama_cpp import llama_grammar

    if kind == "json_object":
        return llama_grammar.JSON_GBNF
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise InputError("response_format.json_schema.schema must be a JSON schema (an object)")
        try:
            return llama_grammar.json_schema_to_gbnf(json.dumps(schema))
        except Exception as e:  # the converter's own words on what it cannot express
            raise InputError(f"response_format.json_schema: this schema cannot be turned into a grammar: {e}") from None
    raise InputError(f"response_format.type {kind!r} is not one of text, json_object, json_schema")


def precheck(spec, prompts: list[str], name: str, max_tokens: int, first_index: int | None = None) -> bool:
    """Refuse (``ContextTooLong``) a prompt that with ``max_tokens`` exceeds the context,
    before any model work; False when the model file is not on this machine (nothing checked).
    ``first_index``: the index of ``prompts[0]`` in the caller's list (None: a single prompt)."""
    from .chat import tokenize_prompt

    path = local_path(spec.source)
    if path is None or not path.is_file():
        return False
    n_ctx = int(spec.options.get("n_ctx", 2048))
    vocab = load_vocab(path)
    for i, p in enumerate(prompts):
        if len(p.encode("utf-8")) + 1 + max_tokens <= n_ctx:
            continue  # every token covers at least one byte (plus BOS): it fits without counting
        n = len(tokenize_prompt(vocab, p))
        if n + max_tokens > n_ctx:
            raise ContextTooLong(name, n, max_tokens, n_ctx, None if first_index is None else first_index + i)
    return True


def chat_prompt(spec, messages: list[dict], name: str) -> tuple[str, list[str]] | None:
    """``(prompt, stops)`` of chat ``messages`` from the model's vocabulary alone, or None
    when the model file is not on this machine (the worker formats them)."""
    from .chat import llama_chat_prompt

    path = local_path(spec.source)
    if path is None or not path.is_file():
        return None
    return llama_chat_prompt(load_vocab(path), messages, spec.options.get("chat_format"), name)
