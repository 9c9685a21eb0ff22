"""Continuous batching for llama.cpp: one resident model decodes many sequences at once.

llama-cpp-python's ``Llama`` decodes one sequence per context, so a worker served one
generation at a time. This engine drives llama.cpp's own batch API directly (the way
llama.cpp's server does with its parallel slots): one context with ``n_seq_max = parallel``
sequences and a unified KV cache, one loop thread that owns it, and requests that join the
running batch as they arrive and leave it the token they finish.

* Each step puts one token per decoding sequence into a ``llama_batch`` and fills the rest
  with prompt tokens of newly admitted requests (their prefill is batched too); logits are
  asked for only where a token is sampled (the last prompt token, every decoded token).
* Each request has its own llama.cpp sampler chain (greedy, or top-k/top-p/min-p/temperature
  with its own seed), stop strings, streaming callback and cancel flag.
* A finished sequence frees its slot at once but keeps its KV cells: a new request whose
  prompt starts with the same tokens (the next turn of a chat, prompts with one system
  prompt) is placed in that slot and its prefill starts after the shared prefix. Slots keep
  their prefixes across users, least recently used given away first, so users A, B, C, D
  taking turns each find their conversation still cached.
* KV cells: one stream of ``n_ctx`` cells per sequence (``kv_unified=False``), so every
  sequence can always use its whole context, and what other slots hold never changes how a
  sequence is computed: a lone request gets exactly the tokens a single-sequence context
  gives, whatever is cached beside it. (A unified cache decodes large batches a few per cent
  faster, but places a new sequence's cells after the others', which changes the order of
  its attention sums; ``options.kv_unified: true`` turns it on, and then an idle engine
  clears the other slots before a lone request, as before.)
* A request may continue a generation that produced tokens elsewhere (a stream whose
  worker died). Greedy: the tokens are fed back one step at a time after the prompt
  (``forced``), the very computation the first run made, so the rest of the text is the
  uninterrupted run's (a prefill of prompt and tokens in one batch rounds differently and
  can change a greedy choice at a near-tie). Sampled: prompt and tokens are one prefill
  (``n_prior``). Either way it goes on with the same text, counts and stop strings.

Why by hand: llama-cpp-python (0.3.x) has no batched or multi-sequence generation, and its
server module is a separate process with its own HTTP API. Nothing here knows about Dask.

Why this module is long: ``BatchEngine`` is one decoding loop (admit by priority, reuse a
cached prefix, prefill, decode every slot in one batch, sample, emit pieces, finish) whose
steps share the slots' state under one lock; split into modules, each step would reach into
the others' state.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

logger = logging.getLogger("workloads.backends.llama_batch")

__all__ = ["BatchEngine", "Request"]


@dataclass
class Request:
    """One generation; the engine fills ``result`` (or ``error``) and sets ``done``."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    on_token: Callable[[str], None] | None = None
    should_stop: Callable[[], bool] | None = None
    priority: int = 0
    #: ``on_piece(text, ids)``: each streamed piece with the token ids it came from
    on_piece: Callable[[str, list[int]], None] | None = None
    #: OpenAI's sampling parameters that llama.cpp samplers implement
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    #: a GBNF grammar the output must follow (response_format json_object / json_schema)
    grammar: str | None = None
    #: log-probabilities of each chosen token, with this many alternatives (None: off)
    logprobs: int | None = None
    #: a continued generation (see the module docstring): tokens produced elsewhere at the end
    #: of ``prompt_ids`` (they count as output), or to feed back one step at a time
    n_prior: int = 0
    forced: list[int] = field(default_factory=list)
    continued: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    result: dict | None = None
    error: BaseException | None = None
    # engine state
    slot: "_Slot | None" = None
    fed: int = 0                 # prompt tokens in the KV cache so far
    reused: int = 0              # of which came from the slot's earlier request
    out_ids: list[int] = field(default_factory=list)
    text_bytes: bytes = b""
    emitted: int = 0
    pending: int | None = None   # a sampled token not yet fed back
    finish: str = "length"
    ids_sent: int = 0            # out_ids handed to on_piece so far
    token_logprobs: list = field(default_factory=list)
    t_submit: float = field(default_factory=time.perf_counter)
    t_start: float | None = None
    t_first: float | None = None
    t_prefill: float | None = None
    sampler: object = None

    def wait(self, timeout: float | None = None) -> dict:
        if not self.done.wait(timeout):
            raise TimeoutError("generation did not finish in time")
        if self.error is not None:
            raise self.error
        return self.result


@dataclass
class _Slot:
    seq: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV cells this sequence holds
    request: Request | None = None
    idle_since: float = 0.0


class BatchEngine:
    """Decode many sequences of one llama.cpp model in one context (see module docstring).

    Parameters
    ----------
    model
        A ``llama_cpp._internals.LlamaModel`` (weights, vocabulary).
    n_ctx
        Context per sequence, in tokens.
    parallel
        Sequences decoded at once (``n_seq_max``); more requests wait their turn.
    n_threads
        llama.cpp CPU threads for both decoding and prefill.
    n_batch
        Tokens per ``llama_decode`` call (prefill chunk), as llama-cpp-python's default.
    min_reuse
        Shortest cached prefix worth reusing, in tokens.
    kv_unified
        One KV cache for every sequence (see the module docstring); default one per sequence.
    flash_attn
        llama.cpp's flash attention (``LLAMA_FLASH_ATTN_TYPE_ENABLED``, else disabled).
    """

    def __init__(self, model, n_ctx: int = 2048, parallel: int = 8, n_threads: int = 1, n_batch: int = 512,
                 n_ubatch: int = 512, name: str = "model", min_reuse: int = 32, kv_unified: bool = False,
                 flash_attn: bool = False):
        import llama_cpp

        from ..compat import llama_context_class

        LlamaContext = llama_context_class()

        self.lib = llama_cpp
        self.model, self.name = model, name
        self.n_ctx, self.parallel, self.n_batch, self.min_reuse = n_ctx, parallel, n_batch, min_reuse
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx * parallel
        params.n_batch = n_batch
        params.n_ubatch = min(n_ubatch, n_batch)
        params.n_seq_max = parallel
        params.kv_unified = kv_unified  # (see the module docstring); every sequence fits its n_ctx
        self.kv_unified = kv_unified
        params.n_threads = n_threads  # the defaults are 4 (notes: set both)
        params.n_threads_batch = n_threads
        params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        self.ctx = LlamaContext(model=model, params=params, verbose=False)
        self.memory = llama_cpp.llama_get_memory(self.ctx.ctx)
        self.vocab = model.vocab
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self.slots = [_Slot(seq=i) for i in range(parallel)]
        self._waiting: list = []  # heap of (-priority, arrival, request)
        self._arrivals = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self.steps = 0
        self.max_active = 0
        self._thread = threading.Thread(target=self._run, name=f"llama-batch-{name}", daemon=True)
        self._thread.start()

    # -- public ----------------------------------------------------------------------------
    def submit(self, req: Request) -> Request:
        with self._cv:
            if self._closed:
                raise RuntimeError(f"model {self.name!r} was unloaded")
            heapq.heappush(self._waiting, (-req.priority, next(self._arrivals), req))
            self._cv.notify()
        return req

    def submit_many(self, reqs: list[Request]) -> list[Request]:
        """Queue ``reqs`` at once: the loop admits them together (the same requests submitted
        together are decoded in the same batches, so greedy output repeats exactly)."""
        with self._cv:
            if self._closed:
                raise RuntimeError(f"model {self.name!r} was unloaded")
            for req in reqs:
                heapq.heappush(self._waiting, (-req.priority, next(self._arrivals), req))
            self._cv.notify()
        return reqs

    def active(self) -> int:
        return sum(1 for s in self.slots if s.request is not None)

    @property
    def healthy(self) -> bool:
        """False once the engine stopped (closed, or its loop failed): the model must be loaded again."""
        return not self._closed

    def close(self, timeout: float = 30) -> bool:
        """Stop: requests still running or waiting end with an error. The loop thread frees
        the context on its way out (never under a running ``llama_decode``); returns False
        when it did not stop within ``timeout`` (its memory is then left to the process)."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is threading.current_thread():
            return True
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("the batch decoder of model %s did not stop within %.0f s; its memory stays allocated",
                           self.name, timeout)
            return False
        return True

    # -- the loop ----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._closed and not self._waiting and not self.active():
                        self._cv.wait()
                    if self._closed:
                        break
                    self._admit()
                self._step()
        except BaseException as e:  # the engine is dead: nobody may wait for it for ever
            logger.exception("batch engine of %s failed", self.name)
            self._fail_all(RuntimeError(f"the batch decoder of model {self.name!r} failed: {e}"))
        else:
            self._fail_all(RuntimeError(f"model {self.name!r} was unloaded while generating"))
        finally:
            # this thread owns the context: it frees it, after its last llama_decode
            self.lib.llama_batch_free(self.batch)
            self.batch = None
            self.ctx.close()

    def _fail_all(self, err: BaseException) -> None:
        with self._cv:
            self._closed = True
            waiting = [r for _, _, r in self._waiting]
            self._waiting.clear()
        for r in waiting + [s.request for s in self.slots if s.request is not None]:
            r.error = err
            try:
                self._release(r)
            finally:
                r.done.set()

    def _admit(self) -> None:
        """Free slots take waiting requests, best priority first. A request goes to the free
        slot whose cached tokens share the longest prefix with its prompt (``min_reuse`` at
        least), else to the empty slot with the lowest number, else to the slot idle longest.

        With a unified KV cache, when nothing is decoding, the slots no waiting request
        reuses are cleared first, so that a lone request computes exactly as in a fresh
        single-sequence context (one stream per sequence needs no clearing: see the module
        docstring).
        """
        if not self._waiting:
            return
        free = [s for s in self.slots if s.request is None]
        take = [heapq.heappop(self._waiting)[2] for _ in range(min(len(free), len(self._waiting)))]
        take = [r for r in take if not self._cancelled(r)]  # cancelled while waiting: no slot, no prefill

        def reuse(s: _Slot, req: Request) -> int:
            # the last prompt token is always decoded again (its logits give the first token);
            # a short shared start (the BOS token, a word) saves nothing
            n = min(_common_prefix(s.cached, req.prompt_ids), len(req.prompt_ids) - 1)
            return n if n >= self.min_reuse else 0

        chosen: dict[int, tuple[_Slot, int]] = {}
        for k, req in enumerate(take):  # prefix reuse first
            best = max(free, key=lambda s: reuse(s, req), default=None)
            if best is not None and reuse(best, req):
                chosen[k] = (best, reuse(best, req))
                free.remove(best)
        if self.kv_unified and not self.active():
            for s in free:  # (cells a cancelled prefill left are not in `cached`: clear them all)
                self.lib.llama_memory_seq_rm(self.memory, s.seq, -1, -1)
                s.cached = []
        for k, req in enumerate(take):
            if k not in chosen:
                slot = min(free, key=lambda s: (bool(s.cached), s.idle_since if s.cached else s.seq))
                chosen[k] = (slot, 0)
                free.remove(slot)
            slot, keep = chosen[k]
            if not self.lib.llama_memory_seq_rm(self.memory, slot.seq, keep, -1):
                # this model's cache cannot drop a tail (recurrent state): start the sequence over
                self.lib.llama_memory_seq_rm(self.memory, slot.seq, -1, -1)
                keep = 0
            slot.cached = slot.cached[:keep]
            slot.request, req.slot = req, slot
            req.fed = req.reused = keep
            req.t_start = time.perf_counter()
            try:
                req.sampler = self._sampler(req)
            except ValueError as e:  # a grammar llama.cpp refuses: this request alone fails
                req.error = e
                self._release(req)
        self.max_active = max(self.max_active, self.active())

    def _sampler(self, req: Request):
        lib = self.lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        add = lambda smpl: lib.llama_sampler_chain_add(chain, smpl)  # noqa: E731
        if req.logit_bias:
            arr = (lib.llama_logit_bias * len(req.logit_bias))(
                *[lib.llama_logit_bias(int(t), float(b)) for t, b in req.logit_bias.items()])
            add(lib.llama_sampler_init_logit_bias(self.n_vocab, len(req.logit_bias), arr))
        if req.presence_penalty or req.frequency_penalty:
            # OpenAI's penalties: over the text generated so far (llama.cpp's sampler sees each
            # token it samples); 64 tokens back, as llama.cpp's server defaults
            add(lib.llama_sampler_init_penalties(self.n_vocab, 64, 1.0, float(req.frequency_penalty),
                                                 float(req.presence_penalty)))
        if req.grammar:
            g = lib.llama_sampler_init_grammar(self.vocab, req.grammar.encode("utf-8"), b"root")
            if not g:
                lib.llama_sampler_free(chain)
                raise ValueError("llama.cpp could not parse the grammar made from response_format")
            add(g)
        if req.temperature <= 0:
            add(lib.llama_sampler_init_greedy())
        else:
            # the chain llama-cpp-python's Llama.generate builds with this project's settings
            add(lib.llama_sampler_init_top_k(40))
            add(lib.llama_sampler_init_typical(1.0, 1))
            add(lib.llama_sampler_init_top_p(req.top_p, 1))
            add(lib.llama_sampler_init_min_p(0.0, 1))
            add(lib.llama_sampler_init_temp(req.temperature))
            seed = lib.LLAMA_DEFAULT_SEED if req.seed is None else req.seed & 0xFFFFFFFF
            add(lib.llama_sampler_init_dist(seed))
        for tok in req.prompt_ids[len(req.prompt_ids) - req.n_prior:]:
            lib.llama_sampler_accept(chain, tok)  # a continued generation: penalties, grammar state
        # (forced tokens are accepted as they are fed back)
        return chain

    def _cancelled(self, r: Request) -> bool:
        """Poll the request's cancel flag; a request cancelled (or whose flag fails) ends here."""
        try:
            stop = r.should_stop is not None and r.should_stop()
        except BaseException as e:
            r.error = e
            self._release(r)
            return True
        if stop:
            r.finish = "cancelled"
            self.finish(r)
        return bool(stop)

    def _step(self) -> None:
        """One ``llama_decode``: a token per decoding sequence, then prompt tokens."""
        b = self.batch
        n = 0
        sample_at: list[tuple[int, Request]] = []
        running = [s.request for s in self.slots if s.request is not None]
        # a request cancelled during its prefill stops before the next chunk
        running = [r for r in running if r.pending is not None or not r.fed or not self._cancelled(r)]
        for r in running:  # decoding sequences first: they never wait for someone's prefill
            if r.pending is not None:
                self._put(n, r.pending, r.fed + len(r.out_ids) - 1, r.slot.seq, True)
                sample_at.append((n, r))
                n += 1
        for r in running:
            if r.fed < len(r.prompt_ids) and n < self.n_batch:
                take = min(len(r.prompt_ids) - r.fed, self.n_batch - n)
                for j in range(take):
                    pos = r.fed + j
                    last = pos == len(r.prompt_ids) - 1
                    self._put(n, r.prompt_ids[pos], pos, r.slot.seq, last)
                    if last:
                        sample_at.append((n, r))
                    n += 1
                r.fed += take
        if n == 0:
            return
        b.n_tokens = n
        rc = self.lib.llama_decode(self.ctx.ctx, b)
        self.steps += 1
        if rc != 0:
            # 1: no room in the KV cache (cannot happen with n_ctx cells per sequence), <0: an
            # error: the requests of this batch fail, their cells are dropped, the engine goes on
            err = RuntimeError(f"llama_decode returned {rc} for model {self.name!r}")
            for r in running:
                if r.slot is not None:
                    self.lib.llama_memory_seq_rm(self.memory, r.slot.seq, -1, -1)
                    r.slot.cached = []
                r.error = err
                self._release(r)
            return
        now = time.perf_counter()
        for i, r in sample_at:
            if r.pending is None and r.t_prefill is None:
                r.t_prefill = now - r.t_start
            if r.forced:  # a continued generation replays what it had produced (already sent)
                tok = r.forced.pop(0)
                self.lib.llama_sampler_accept(r.sampler, tok)
                if r.pending is not None:
                    r.slot.cached.append(r.pending)
                else:
                    r.slot.cached = list(r.prompt_ids)
                r.out_ids.append(tok)
                r.ids_sent = len(r.out_ids)
                r.pending = tok
                continue
            tok = self.lib.llama_sampler_sample(r.sampler, self.ctx.ctx, i)
            if r.logprobs is not None and not self.lib.llama_vocab_is_eog(self.vocab, tok):
                r.token_logprobs.append(self._logprobs(i, tok, r.logprobs))
            if r.pending is not None:
                r.slot.cached.append(r.pending)
            else:  # the prompt is in the cache now
                r.slot.cached = list(r.prompt_ids)
            r.pending = None
            self._take(r, tok, now)

    def _logprobs(self, i: int, tok: int, top: int) -> dict:
        """The chosen token's log-probability under the model (before sampling settings), and
        the ``top`` most likely tokens' (OpenAI's ``logprobs`` / ``top_logprobs``)."""
        import numpy as np

        ptr = self.lib.llama_get_logits_ith(self.ctx.ctx, i)
        logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float64)
        m = logits.max()
        lse = m + np.log(np.exp(logits - m).sum())
        out = {"id": int(tok), "logprob": float(logits[tok] - lse), "top": []}
        if top:
            best = np.argpartition(-logits, top)[:top]
            best = best[np.argsort(-logits[best])]
            out["top"] = [(int(t), float(logits[t] - lse)) for t in best]
        return out

    def _put(self, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        b = self.batch
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = logits

    def _take(self, r: Request, tok: int, now: float) -> None:
        """A sampled token: end of generation, stop string, stream, limit or cancel."""
        if self.lib.llama_vocab_is_eog(self.vocab, tok):
            r.finish = "stop"
            return self.finish(r)
        if r.t_first is None:
            r.t_first = now
        r.out_ids.append(tok)
        before = len(r.text_bytes)
        r.text_bytes += self.model.detokenize([tok], special=False)
        if r.stop:
            text = r.text_bytes.decode("utf-8", errors="ignore")
            # the earliest match in the text wins (not the first stop string in the list);
            # only the new end of the text can hold a new match
            start = max(0, len(r.text_bytes[:before].decode("utf-8", errors="ignore")) - max(map(len, r.stop)))
            hits = [i for i in (text.find(s, start) for s in r.stop) if i >= 0]
            if hits:
                r.text_bytes = text[: min(hits)].encode("utf-8")
                r.finish = "stop"
                return self.finish(r)
        if r.on_token is not None or r.on_piece is not None:
            text = r.text_bytes.decode("utf-8", errors="ignore")
            hold = max((len(s) - 1 for s in r.stop), default=0)  # what could start a stop string
            safe = len(text) - hold
            if safe > r.emitted and not self._emit(r, text[r.emitted:safe]):
                return
            r.emitted = max(r.emitted, safe)
        if r.n_prior + len(r.out_ids) >= r.max_tokens:
            return self.finish(r)
        if self._cancelled(r):
            return
        r.pending = tok

    def _emit(self, r: Request, piece: str) -> bool:
        """Hand a piece to the request's callback; False (the request failed) if it raised."""
        ids, r.ids_sent = r.out_ids[r.ids_sent:], len(r.out_ids)
        try:
            if r.on_piece is not None:
                r.on_piece(piece, ids)
            else:
                r.on_token(piece)
        except BaseException as e:  # the request's own callback: it alone fails
            r.error = e
            self._release(r)
            return False
        return True

    def finish(self, r: Request) -> None:
        t_end = time.perf_counter()
        t_start = r.t_start if r.t_start is not None else t_end  # (cancelled before it had a slot)
        text = r.text_bytes.decode("utf-8", errors="ignore")  # as the streamed pieces were decoded
        if (r.on_token is not None or r.on_piece is not None) and len(text) > r.emitted:
            if not self._emit(r, text[r.emitted:]):
                return
            r.emitted = len(text)
        r.result = {
            "text": text,
            "prompt_tokens": len(r.prompt_ids) - r.n_prior,
            "completion_tokens": r.n_prior + len(r.out_ids),
            "finish_reason": r.finish,
            "time_to_first_token": (r.t_first - t_start) if r.t_first else None,
            "generate_seconds": t_end - t_start,
            "queue_seconds": t_start - r.t_submit,
            "prefill_seconds": r.t_prefill,
            "cached_prompt_tokens": r.reused,
        }
        if r.continued:
            r.result["continued_from"] = r.continued
        if r.logprobs is not None:
            r.result["logprobs"] = self._logprob_rows(r)
        self._release(r)

    def _logprob_rows(self, r: Request) -> list[dict]:
        """Per output token: its text, bytes, log-probability and the top alternatives (the
        tokens cut by a stop string are left out, as their text is)."""
        piece = lambda t: self.model.detokenize([t], special=False)  # noqa: E731
        rows, n = [], len(r.text_bytes)
        for lp in r.token_logprobs:
            b = piece(lp["id"])
            if n <= 0:
                break
            n -= len(b)
            rows.append({"token": b.decode("utf-8", errors="replace"), "bytes": list(b), "logprob": lp["logprob"],
                         "top_logprobs": [{"token": piece(t).decode("utf-8", errors="replace"), "bytes": list(piece(t)),
                                           "logprob": v} for t, v in lp["top"]]})
        return rows

    def _release(self, r: Request) -> None:
        if r.sampler is not None:
            self.lib.llama_sampler_free(r.sampler)
            r.sampler = None
        if r.slot is not None:
            if r.pending is None and r.fed > len(r.slot.cached):
                # a prefill cut short (cancel, error): its cells are not a cached prefix
                self.lib.llama_memory_seq_rm(self.memory, r.slot.seq, len(r.slot.cached), -1)
            r.slot.request = None  # its cells stay: a later prompt with the same start reuses them
            r.slot.idle_since = time.perf_counter()
            r.slot = None
        r.done.set()


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
