"""The gateway: what the HTTP app does with the cluster (see ``cluster/gateway/__init__.py``)."""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from fastapi import Request

from workloads.backends import GENERATE_BACKENDS, chat_prompt, precheck
from workloads.inputs import check_messages, check_sampling, check_texts

from ..config import ConfigError
from ..dashboard import HTTPStats
from .errors import APIError, DisconnectedError, api_error, param_of
from .schemas import ChatRequest, CompletionRequest, SamplingBody

__all__ = ["Gateway", "StreamRun", "api_keys", "KEYS_ENV", "HTTP_TOPIC"]

logger = logging.getLogger("cluster.gateway")

KEYS_ENV = "AICLUSTER_API_KEYS"
#: the event topic each request is reported on (``cluster.dashboard.HTTPStats`` counts them)
HTTP_TOPIC = HTTPStats.topic


def api_keys(cfg) -> list[str]:
    """The keys a client may present: ``server.api_keys`` and ``$AICLUSTER_API_KEYS``."""
    env = [k.strip() for k in os.environ.get(KEYS_ENV, "").split(",") if k.strip()]
    short = [k for k in env if len(k) < 8]
    if short:
        raise ConfigError(f"${KEYS_ENV}: an API key must be at least 8 characters ({len(short)} shorter)")
    return list(cfg.server.api_keys) + env


class Gateway:
    """The cluster side of the app: submits through the facade's core, waits without
    blocking the event loop, bounds requests per model, checks keys, reports each request to
    the scheduler. The routers (``openai.py``, ``seed.py``, ``admin.py``) are thin over it,
    and a test can drive it without HTTP (``await gw.generate(...)``, ``gw.open_stream``)."""

    def __init__(self, ai, keys: list[str] | None = None):
        self.ai = ai
        self.cfg = ai.config
        self.limits = ai.config.server
        self.keys = list(keys or [])
        self._keys = [k.encode() for k in self.keys]
        # Dask calls that wait (results, cancels) run here, never on the event loop
        self.pool = ThreadPoolExecutor(max_workers=max(32, 4 * self.limits.max_queue), thread_name_prefix="aicluster-http")
        self.inflight: dict[str, int] = {}
        self.started = time.time()
        try:
            ai.client.register_plugin(HTTPStats())
        except Exception:  # an older scheduler without the plugin's module: metrics stay local
            logger.warning("could not register the HTTP metrics plugin on the scheduler", exc_info=True)

    async def run(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self.pool, partial(fn, *args, **kwargs))

    # -- limits --------------------------------------------------------------------------------
    #: how often a waiting non-streamed request looks whether its client is still there
    DISCONNECT_POLL = 0.25

    async def results(self, futures: list, what: str = "the request", http: Request | None = None) -> list:
        """The futures' results within one ``server.request_timeout`` (else they are cancelled:
        504). Waiting holds no thread: Dask's done callbacks wake the event loop. With the
        ``http`` request: a client that hangs up cancels the jobs at once (their batch slots
        and ``max_queue`` places free), not at the timeout."""
        loop = asyncio.get_running_loop()
        waits = []
        for f in futures:
            w = loop.create_future()
            f.add_done_callback(lambda _f, w=w: loop.call_soon_threadsafe(lambda: w.done() or w.set_result(None)))
            waits.append(w)
        done = asyncio.ensure_future(asyncio.gather(*waits))
        deadline = loop.time() + self.limits.request_timeout
        try:
            while not done.done():
                left = deadline - loop.time()
                if left <= 0:
                    self.cancel_soon(futures)
                    raise APIError(504, f"{what} took longer than server.request_timeout "
                                        f"({self.limits.request_timeout:g} s) and was cancelled", "timeout", "timeout")
                await asyncio.wait([done], timeout=min(left, self.DISCONNECT_POLL if http is not None else left))
                if http is not None and not done.done() and await http.is_disconnected():
                    self.cancel_soon(futures)
                    raise DisconnectedError(what)
        finally:
            done.cancel()
        return await self.run(lambda: [f.result() for f in futures])  # done: fetching only

    def cancel_soon(self, futures) -> None:
        """Cancel jobs (on the workers too) without waiting: safe in a ``finally`` of a cancelled task."""
        futures = [f for f in futures if not f.done()]
        if futures:
            self.pool.submit(self.ai.cancel, futures)

    def kind(self, model: str) -> str:
        spec = self.cfg.model(model)
        return "embed" if spec.backend == "sentence_transformers" else "generate"

    def default_model(self, kind: str) -> str:
        named = self.limits.generate_model if kind == "generate" else self.limits.embed_model
        if named:
            return named
        for name in self.cfg.models:
            if self.kind(name) == kind:
                return name
        raise APIError(404, f"no {kind} model in the config", "invalid_request_error", "model_not_found")

    # -- metrics -------------------------------------------------------------------------------
    def report(self, route: str, model: str | None, status: int, seconds: float, ttft: float | None = None,
               tokens: int = 0) -> None:
        msg = {"route": route, "model": model or "-", "status": status, "seconds": seconds, "ttft": ttft,
               "tokens": tokens, "queue": dict(self.inflight), "time": time.time()}
        self.pool.submit(self._log, msg)

    def _log(self, msg) -> None:
        with contextlib.suppress(Exception):
            self.ai.client.log_event(HTTP_TOPIC, msg)

    # -- requests ------------------------------------------------------------------------------
    async def check_key(self, request: Request) -> None:
        """401 unless the request carries one of the keys (none set: every request passes)."""
        keys = self._keys
        if not keys:
            return
        auth = request.headers.get("authorization", "")
        token = auth[7:].strip().encode("utf-8", "replace") if auth.lower().startswith("bearer ") else b""
        if not token or not any(hmac.compare_digest(token, k) for k in keys):
            raise APIError(401, "missing or wrong API key: send \"Authorization: Bearer <key>\" with a key from "
                                "server.api_keys", "invalid_request_error", "invalid_api_key")

    async def answer(self, route: str, model: str, coro_fn, n: int = 1, tokens=lambda out: 0, ttft=lambda out: None):
        """Count the request against its model's queue, run ``coro_fn()``, report it (after it
        left the queue), and turn exceptions into OpenAI errors."""
        t0 = time.perf_counter()
        self.acquire(model, n)
        status, out = 500, None
        try:
            out = await coro_fn()
            status = 200
            return out
        except BaseException as e:
            err = api_error(e)
            status = err.status
            if isinstance(e, asyncio.CancelledError):
                raise
            err.reported = True
            raise err from None
        finally:
            self.release(model, n)
            ok = status == 200
            self.report(route, model, status, time.perf_counter() - t0, ttft(out) if ok else None,
                      tokens(out) if ok else 0)

    def sampling(self, req, max_tokens: int) -> dict:
        """The checked sampling parameters of a request body (400 naming a bad one)."""
        extra = {}
        if isinstance(req, SamplingBody):
            extra = dict(presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                         logit_bias=req.logit_bias)
        if isinstance(req, ChatRequest):
            extra["response_format"] = req.response_format
            if req.logprobs:
                extra["logprobs"] = req.top_logprobs or 0
            elif req.top_logprobs is not None:
                raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        elif isinstance(req, CompletionRequest) and req.logprobs is not None:
            extra["logprobs"] = req.logprobs
        if getattr(req, "stream", False) and "logprobs" in extra:
            raise APIError(400, "logprobs with stream is not supported here; ask without stream", param="logprobs")
        try:
            return check_sampling(max_tokens, req.temperature, getattr(req, "top_p", 1.0), getattr(req, "stop", None),
                             getattr(req, "seed", None), **extra)
        except ValueError as e:
            raise APIError(400, str(e), param=param_of(str(e))) from None

    def generation_model(self, model: str) -> None:
        """400 unless ``model`` generates text (404 for an unknown one)."""
        try:
            kind = self.kind(model)
        except ConfigError as e:
            raise api_error(e) from None
        if kind != "generate":
            raise APIError(400, f"model {model!r} is an embedding model; use /v1/embeddings", param="model")

    async def embed(self, model: str, texts: list[str], count: bool = False):
        """The embedding of ``texts`` (with ``count``: the details, tokens counted)."""
        f = await self.run(self.ai.embed, texts, model=model, details=count, count_tokens=count)
        try:
            (out,) = await self.results([f], "the embedding")
        finally:
            self.cancel_soon([f])
        return out

    # -- generation ------------------------------------------------------------------------------
    def submit(self, model: str, params: dict, prompt: str | None = None, messages: list | None = None,
               stream_id: str | None = None):
        """A routed generation future (called in the pool: routing reads the scheduler's info)."""
        ai = self.ai
        kind = "chat" if messages is not None else "generate"
        spec, route = ai.core.model_route(model, GENERATE_BACKENDS, "generate text" if kind == "generate" else "chat")
        if messages is not None:
            messages = check_messages(messages)
            formatted = chat_prompt(spec, messages, model)
            if formatted is not None:
                precheck(spec, [formatted[0]], model, max_tokens=params["max_tokens"])
        else:
            check_texts(prompt, "prompt")
            precheck(spec, [prompt], model, max_tokens=params["max_tokens"])
        return ai.core.submit_generation(route, model, spec, params, prompt, messages=messages, kind=kind,
                                     stream_id=stream_id)

    async def generate(self, model: str, params: dict, n: int, prompt=None, messages=None,
                       http: Request | None = None) -> list[dict]:
        futures = []
        try:
            for i in range(n):
                p = dict(params, seed=params["seed"] + i) if params.get("seed") is not None and n > 1 else params
                futures.append(await self.run(self.submit, model, p, prompt, messages))
            return await self.results(futures, http=http)
        finally:
            self.cancel_soon(futures)  # the ones not done: a timeout, an error, a client gone

    async def open_stream(self, model: str, params: dict, n: int, prompt=None, messages=None) -> "StreamRun":
        """Submit ``n`` streamed generations (errors here are still HTTP errors)."""
        run = StreamRun(self, n)
        try:
            for i in range(n):
                p = dict(params, seed=params["seed"] + i) if params.get("seed") is not None and n > 1 else params
                sid = run.open(i)
                run.add(i, await self.run(self.submit, model, p, prompt, messages, sid))
        except BaseException:
            run.close()
            raise
        return run

    # -- limits (streams hold their share until they end) -----------------------------------------
    def acquire(self, model: str, n: int = 1) -> None:
        if n > self.limits.max_queue:
            raise APIError(400, f"n={n} is more than server.max_queue ({self.limits.max_queue}) allows at once", param="n")
        if self.inflight.get(model, 0) + n > self.limits.max_queue:
            raise APIError(429, f"model {model!r} has {self.inflight.get(model, 0)} requests running or waiting "
                                f"(server.max_queue is {self.limits.max_queue}); retry later", "rate_limit_exceeded",
                           "queue_full")
        self.inflight[model] = self.inflight.get(model, 0) + n

    def release(self, model: str, n: int = 1) -> None:
        self.inflight[model] -= n
        if n > 0:
            self.report_queue()

    def report_queue(self) -> None:
        self.pool.submit(self._log, {"queue": dict(self.inflight), "time": time.time()})


class StreamRun:
    """The text pieces of ``n`` generations as they come, in order per generation.

    Pieces arrive through the client's pub/sub callback and each generation's end through
    its future; the two travel separately, so the finished result's text, which is
    authoritative, fills in whatever pieces had not arrived yet."""

    def __init__(self, gw: Gateway, n: int):
        self.gw, self.n = gw, n
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.futures: dict[int, Any] = {}
        self.ids: list[str] = []
        self.sent = [""] * n

    def open(self, i: int) -> str:
        sid = self.gw.ai.core.new_stream_id()
        self.gw.ai.core.open_stream(sid, lambda piece: self.loop.call_soon_threadsafe(self.events.put_nowait, (i, piece)))
        self.ids.append(sid)
        return sid

    def add(self, i: int, future) -> None:
        self.futures[i] = future
        future.add_done_callback(lambda f: self.loop.call_soon_threadsafe(self.events.put_nowait, (i, f)))

    async def __aiter__(self):
        """``(index, text piece)`` as they come, then ``(index, result dict)`` per generation."""
        deadline = self.loop.time() + self.gw.limits.request_timeout
        finished: set[int] = set()
        while len(finished) < self.n:
            try:
                i, item = await asyncio.wait_for(self.events.get(), max(0.0, deadline - self.loop.time()))
            except asyncio.TimeoutError:
                raise APIError(504, f"the request took longer than server.request_timeout "
                                    f"({self.gw.limits.request_timeout:g} s) and was cancelled", "timeout",
                               "timeout") from None
            if i in finished or item is None:
                continue
            if isinstance(item, str):
                if item:
                    self.sent[i] += item
                    yield i, item
                continue
            finished.add(i)
            (result,) = await self.gw.run(lambda f=item: [f.result()])  # raises the task's error
            rest = result["text"][len(self.sent[i]):] if result["text"].startswith(self.sent[i]) else ""
            if rest:
                yield i, rest
            yield i, result

    def close(self) -> None:
        """Stop listening and cancel what is still running (the client went away, or an
        error). Synchronous and idempotent: it runs in ``finally`` blocks of cancelled tasks."""
        for sid in self.ids:
            self.gw.ai.core.close_stream(sid)
        self.ids = []
        self.gw.cancel_soon(list(self.futures.values()))
