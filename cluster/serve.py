"""``aicluster serve``: the whole cluster behind one HTTP endpoint.

* OpenAI's API: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``
  (with ``stream`` as server-sent events in OpenAI's chunk format), ``POST /v1/embeddings``;
  errors in OpenAI's body (``{"error": {"message", "type", "param", "code"}}``) and codes.
* The seed's routes, as thin aliases over the same calls: ``POST /inference``,
  ``POST /embed``, ``POST /embed-batch``, ``GET /health``, ``GET /status``, ``GET /config``,
  ``GET /models``.

Every request becomes the same routed futures as the Python facade (``AICluster``): tiers
and fallbacks, resident affinity, batched decoding, the job board, cancel. The FastAPI app
holds one cluster client; Dask calls run in a thread pool (the app's event loop never
waits on one), and streamed text reaches the event loop through the client's pub/sub
callback. Keys (``server.api_keys`` / ``$AICLUSTER_API_KEYS``), a body size limit, a
per-request timeout that cancels the job, and a bound on requests per model (429) keep it
safe to share; a client that goes away mid-stream cancels its generation on the worker.
Each request is reported to the scheduler (``HTTPStats`` plugin) for ``/metrics`` and the
dashboard.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Literal, Union

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from . import routing
from .config import ConfigError

__all__ = ["create_app", "Gateway", "api_keys", "KEYS_ENV"]

logger = logging.getLogger("cluster.serve")

KEYS_ENV = "AICLUSTER_API_KEYS"
HTTP_TOPIC = "aicluster-http"


def api_keys(cfg) -> list[str]:
    """The keys a client may present: ``server.api_keys`` and ``$AICLUSTER_API_KEYS``."""
    env = [k.strip() for k in os.environ.get(KEYS_ENV, "").split(",") if k.strip()]
    short = [k for k in env if len(k) < 8]
    if short:
        raise ConfigError(f"${KEYS_ENV}: an API key must be at least 8 characters ({len(short)} shorter)")
    return list(cfg.server.api_keys) + env


# -- errors ------------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def api_error(exc: BaseException) -> APIError:
    """The HTTP answer for an exception of the facade or a worker. Only input errors are
    4xx; anything unexpected is a 500 whose error id is logged with its traceback."""
    from workloads.backends import InputError, ModelCrashed

    from .jobs import JobCancelled, SchedulerLost
    from .plugin import ModelDoesNotFit

    if isinstance(exc, APIError):
        return exc
    name = type(exc).__name__
    msg = str(exc)
    if isinstance(exc, routing.NoWorkerForTier):
        return APIError(503, msg, "service_unavailable", "no_worker_for_tier")
    if isinstance(exc, ModelDoesNotFit):
        return APIError(503, msg, "service_unavailable", "model_does_not_fit")
    if name in ("ShardPlanError", "ShardServerError", "ShardLost"):  # a model split across workers
        return APIError(503, msg, "service_unavailable", "shard_unavailable")
    if isinstance(exc, ModelCrashed):
        return APIError(503, msg, "service_unavailable", "model_crashed")
    if isinstance(exc, ConfigError) and "unknown model" in msg:
        return APIError(404, msg.split(";")[0] + "; GET /v1/models lists the models", "invalid_request_error",
                        "model_not_found", "model")
    if name == "ContextTooLong":
        return APIError(400, msg, "invalid_request_error", "context_length_exceeded", "prompt")
    if isinstance(exc, InputError) or name in ("InputError", "InputTypeError", "WrongModelKind", "NoChatTemplate",
                                                "TextTooLong", "StreamCut"):
        return APIError(400, msg, "invalid_request_error")
    if isinstance(exc, SchedulerLost) or getattr(exc, "reason", None) == "scheduler-connection-lost":
        # (a request that had not streamed text yet is submitted again by the facade instead)
        return APIError(503, "the cluster's scheduler restarted while this answer was being streamed, so it is cut "
                             "short; send the request again", "service_unavailable", "scheduler_restarted")
    if isinstance(exc, (JobCancelled, asyncio.CancelledError)) or name in ("CancelledError", "FutureCancelledError"):
        return APIError(409, "the job was cancelled on the cluster (aicluster cancel, or its client went away)",
                        "cancelled", "cancelled")
    if isinstance(exc, DisconnectedError):
        return APIError(499, "the client closed the connection; its job was cancelled", "cancelled", "client_closed")
    eid = uuid.uuid4().hex[:12]
    logger.error("request failed [error id %s]: %s: %s", eid, name, msg,
                 exc_info=(type(exc), exc, exc.__traceback__))
    return APIError(500, f"internal error {eid} ({name}: {msg}); the server's log has its traceback under this id",
                    "server_error", "internal_error")


class DisconnectedError(Exception):
    """The HTTP client went away before its answer was ready."""


# -- request bodies (OpenAI's field names) ------------------------------------------------------
#: OpenAI parameters this server does not implement, each with why: asked for, they get a 400
#: that names them (never a 200 that ignored them). Unknown fields get one too, as OpenAI does.
UNSUPPORTED = {
    "tools": "tool calls: no model here has a tool-calling template",
    "tool_choice": "tool calls: no model here has a tool-calling template",
    "functions": "function calls: no model here has a tool-calling template",
    "function_call": "function calls: no model here has a tool-calling template",
    "parallel_tool_calls": "tool calls: no model here has a tool-calling template",
    "echo": "echo of the prompt",
    "suffix": "fill-in-the-middle suffixes",
    "best_of": "best_of (use n and pick)",
    "audio": "audio output", "modalities": "other modalities than text", "prediction": "predicted outputs",
    "reasoning_effort": "reasoning models", "web_search_options": "web search",
    "dimensions": "other embedding sizes than the model's",
}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data):
        if isinstance(data, dict):
            for key in data:
                if key in UNSUPPORTED and key not in cls.model_fields:
                    raise APIError(400, f"parameter {key!r} is not supported by this server ({UNSUPPORTED[key]})",
                                   param=key, code="unsupported_parameter")
        return data


class _Sampling(_Body):
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: dict | None = None
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # OpenAI's end-user id: accepted, used for nothing
    # accepted where they change nothing here
    store: bool | None = None
    metadata: dict | None = None
    service_tier: str | None = None


class CompletionRequest(_Sampling):
    model: str
    prompt: Union[str, list[str]]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=5)


class ChatRequest(_Sampling):
    model: str
    messages: list[dict]
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: dict | None = None


class EmbeddingRequest(_Body):
    model: str
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None


class _SeedBody(BaseModel):
    model_config = ConfigDict(extra="ignore")  # the seed's clients send what they like


class InferenceRequest(_SeedBody):
    prompt: str
    max_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.7, ge=0, le=2)
    model: str | None = None


class EmbedRequest(_SeedBody):
    text: str
    model: str | None = None


class EmbedBatchRequest(_SeedBody):
    texts: list[str]
    model: str | None = None


# -- the gateway -------------------------------------------------------------------------------
class Gateway:
    """The cluster side of the app: submits through the facade, waits without blocking the
    event loop, bounds requests per model, reports each request to the scheduler."""

    def __init__(self, ai, keys: list[str] | None = None):
        self.ai = ai
        self.cfg = ai.config
        self.limits = ai.config.server
        self.keys = list(keys or [])
        # Dask calls that wait (results, cancels) run here, never on the event loop
        self.pool = ThreadPoolExecutor(max_workers=max(32, 4 * self.limits.max_queue), thread_name_prefix="aicluster-http")
        self.inflight: dict[str, int] = {}
        self.started = time.time()
        from .dashboard import HTTPStats

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

    # -- generation ------------------------------------------------------------------------------
    def submit(self, model: str, params: dict, prompt: str | None = None, messages: list | None = None,
               stream_id: str | None = None):
        """A routed generation future (called in the pool: routing reads the scheduler's info)."""
        from .client import GENERATE_BACKENDS, _check_messages, _check_texts, precheck

        ai = self.ai
        kind = "chat" if messages is not None else "generate"
        spec, route = ai._model_route(model, GENERATE_BACKENDS, "generate text" if kind == "generate" else "chat")
        if messages is not None:
            import importlib

            messages = _check_messages(messages)
            formatted = importlib.import_module("workloads.backends").chat_prompt(spec, messages, model)
            if formatted is not None:
                precheck(spec, [formatted[0]], model, max_tokens=params["max_tokens"])
        else:
            _check_texts(prompt, "prompt")
            precheck(spec, [prompt], model, max_tokens=params["max_tokens"])
        return ai._submit_generation(route, model, spec, params, prompt, messages=messages, kind=kind,
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
        sid = self.gw.ai.new_stream_id()
        self.gw.ai._open_stream(sid, lambda piece: self.loop.call_soon_threadsafe(self.events.put_nowait, (i, piece)))
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
            self.gw.ai._close_stream(sid)
        self.ids = []
        self.gw.cancel_soon(list(self.futures.values()))


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413, whether it says its
    length (refused before it is read) or comes in chunks (read here up to the limit, then
    handed on whole; FastAPI would turn an error raised while it reads into a 400). Plain
    ASGI, so that streamed responses pass through untouched."""

    def __init__(self, app, limit: int, gateway: Gateway):
        self.app, self.limit, self.gw = app, limit, gateway

    async def _refuse(self, scope, receive, send, size: str) -> None:
        self.gw.report("(body too large)", None, 413, 0.0)
        err = APIError(413, f"the request body is {size} bytes; server.max_body is {self.limit}",
                       "invalid_request_error", "request_too_large")
        await JSONResponse(err.body(), status_code=413)(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await self._refuse(scope, receive, send, length.decode())
        body, more = b"", True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body") or b""
            more = msg.get("more_body", False)
            if len(body) > self.limit:
                return await self._refuse(scope, receive, send, f"more than {self.limit}")
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: the client's disconnect, for streamed answers

        return await self.app(scope, replay, send)


class _Stream(StreamingResponse):
    """A streamed response that runs ``on_close`` however it ends, also when the client is
    gone before the body starts (the body generator's ``finally`` would never run then)."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def route_of(request) -> str:
    """The matched route's path template (a bounded set of metric labels), not the raw path."""
    route = request.scope.get("route")
    return getattr(route, "path", None) or "(no route)"


def _param_of(msg: str) -> str | None:
    head = msg.split(" ", 1)[0].split("[", 1)[0].rstrip(":")
    return head if head.isidentifier() else None


def _logprobs(r: dict, chat: bool):
    """OpenAI's ``logprobs`` of a choice from the engine's rows (None when not asked)."""
    rows = r.get("logprobs")
    if rows is None:
        return None
    if chat:
        return {"content": [{"token": t["token"], "logprob": t["logprob"], "bytes": t["bytes"],
                             "top_logprobs": t["top_logprobs"]} for t in rows], "refusal": None}
    offsets, at = [], 0
    for t in rows:
        offsets.append(at)
        at += len(t["token"])
    return {"tokens": [t["token"] for t in rows], "token_logprobs": [t["logprob"] for t in rows],
            "top_logprobs": [{a["token"]: a["logprob"] for a in t["top_logprobs"]} for t in rows],
            "text_offset": offsets}


def _usage(results: list[dict]) -> dict:
    prompt = results[0]["prompt_tokens"] if results else 0
    completion = sum(r["completion_tokens"] for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish(reason: str) -> str:
    return {"stop": "stop", "length": "length"}.get(reason, "stop")


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


# -- the app -----------------------------------------------------------------------------------
def create_app(gateway: Gateway):
    """The FastAPI app for ``gateway``."""
    app = FastAPI(title="dask-ai-cluster", version="1", docs_url="/docs", redoc_url=None)
    gw = gateway
    limits = gw.limits

    # errors raised before a route's own accounting (keys, bodies, validation) are counted here
    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        if not getattr(exc, "reported", False):
            gw.report(route_of(request), None, exc.status, 0.0)
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        err = api_error(exc)
        gw.report(route_of(request), None, err.status, 0.0)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        def say(e) -> str:
            where = ".".join(str(p) for p in e.get("loc", ())[1:]) or "body"
            if e.get("type") == "extra_forbidden":  # as OpenAI answers an unknown argument
                return f"unrecognized request argument {where!r}: this server does not know it"
            return f"{where}: {e.get('msg')}"

        msg = "; ".join(say(e) for e in errs)
        gw.report(route_of(request), None, 400, 0.0)
        return JSONResponse(APIError(400, msg or "invalid request", param=param).body(), status_code=400)

    app.add_middleware(BodyLimit, limit=limits.max_body, gateway=gw)

    keys = [k.encode() for k in gw.keys]

    async def check_key(request: Request) -> None:
        if not keys:
            return
        auth = request.headers.get("authorization", "")
        token = auth[7:].strip().encode("utf-8", "replace") if auth.lower().startswith("bearer ") else b""
        if not token or not any(hmac.compare_digest(token, k) for k in keys):
            raise APIError(401, "missing or wrong API key: send \"Authorization: Bearer <key>\" with a key from "
                                "server.api_keys", "invalid_request_error", "invalid_api_key")

    authed = [Depends(check_key)]

    async def answer(route: str, model: str, coro_fn, n: int = 1, tokens=lambda out: 0, ttft=lambda out: None):
        """Count the request against its model's queue, run ``coro_fn()``, report it (after it
        left the queue), and turn exceptions into OpenAI errors."""
        t0 = time.perf_counter()
        gw.acquire(model, n)
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
            gw.release(model, n)
            ok = status == 200
            gw.report(route, model, status, time.perf_counter() - t0, ttft(out) if ok else None,
                      tokens(out) if ok else 0)

    def sampling(req, max_tokens: int) -> dict:
        from .client import _sampling

        extra = {}
        if isinstance(req, _Sampling):
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
            return _sampling(max_tokens, req.temperature, getattr(req, "top_p", 1.0), getattr(req, "stop", None),
                             getattr(req, "seed", None), **extra)
        except ValueError as e:
            raise APIError(400, str(e), param=_param_of(str(e))) from None

    # -- OpenAI ---------------------------------------------------------------------------------
    @app.get("/v1/models", dependencies=authed)
    async def list_models():
        rows = await gw.run(gw.ai.status)
        data = []
        for name, spec in gw.cfg.models.items():
            data.append({"id": name, "object": "model", "created": int(gw.started), "owned_by": "aicluster",
                         "kind": gw.kind(name), "backend": spec.backend, "tier": spec.tier,
                         "resident_on": [r["name"] for r in rows if name in r["models"]],
                         # crashed there (native code): not served there until unloaded
                         "quarantined_on": {r["name"]: r["quarantined"][name]["message"] for r in rows
                                            if name in (r.get("quarantined") or {})}})
        return {"object": "list", "data": data}

    @app.post("/v1/completions", dependencies=authed)
    async def completions(req: CompletionRequest, http: Request):
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if len(prompts) != 1:
            raise APIError(400, "send one prompt per request (a list of several is not supported here)", param="prompt")
        params = sampling(req, req.max_tokens or 16)
        return await respond("/v1/completions", req, params, prompt=prompts[0], http=http)

    @app.post("/v1/chat/completions", dependencies=authed)
    async def chat_completions(req: ChatRequest, http: Request):
        params = sampling(req, req.max_completion_tokens or req.max_tokens or limits.default_max_tokens)
        return await respond("/v1/chat/completions", req, params, messages=req.messages, http=http)

    def generation_model(model: str) -> None:
        try:
            kind = gw.kind(model)
        except ConfigError as e:
            raise api_error(e) from None
        if kind != "generate":
            raise APIError(400, f"model {model!r} is an embedding model; use /v1/embeddings", param="model")

    async def respond(route: str, req, params: dict, prompt=None, messages=None, http: Request | None = None):
        chat = messages is not None
        generation_model(req.model)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        if not req.stream:
            results = await answer(route, req.model,
                                   lambda: gw.generate(req.model, params, req.n, prompt, messages, http=http),
                                   n=req.n, tokens=lambda rs: sum(r["completion_tokens"] for r in rs),
                                   ttft=lambda rs: rs[0].get("time_to_first_token"))
            choices = []
            for i, r in enumerate(results):
                c = {"index": i, "finish_reason": _finish(r["finish_reason"]), "logprobs": _logprobs(r, chat)}
                if chat:
                    c["message"] = {"role": "assistant", "content": r["text"]}
                else:
                    c["text"] = r["text"]
                choices.append(c)
            return {"id": rid, "object": obj, "created": created, "model": req.model, "choices": choices,
                    "usage": _usage(results), "system_fingerprint": None,
                    "x_aicluster": [{k: r.get(k) for k in ("worker", "tier", "simulated")} for r in results]}
        # a stream: everything that can fail before the first token (the model, its template, a
        # prompt over the context, no worker, a full queue) is an HTTP error, sent before the 200
        gw.acquire(req.model, req.n)
        t0 = time.perf_counter()
        try:
            run = await gw.open_stream(req.model, params, req.n, prompt, messages)
        except BaseException as e:
            gw.release(req.model, req.n)
            err = api_error(e)
            if err.code == "context_length_exceeded" and chat:
                err.param = "messages"
            gw.report(route, req.model, err.status, time.perf_counter() - t0)
            err.reported = True
            raise err from None
        state = {"first": None, "results": [], "status": 499, "open": True}

        def finish() -> None:  # exactly once, whatever ends the response (or never starts it)
            if not state["open"]:
                return
            state["open"] = False
            run.close()
            gw.release(req.model, req.n)
            gw.report(route, req.model, state["status"], time.perf_counter() - t0, state["first"],
                      sum(r["completion_tokens"] for r in state["results"]))
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(i, text=None, delta=None, finish=None):
            c = {"index": i, "finish_reason": finish, "logprobs": None}
            if chat:
                c["delta"] = delta if delta is not None else {"content": text}
            else:
                c["text"] = text or ""
            return {"id": rid, "object": kind, "created": created, "model": req.model, "choices": [c],
                    "system_fingerprint": None}

        async def events():
            try:
                if chat:
                    for i in range(req.n):
                        yield _sse(chunk(i, delta={"role": "assistant", "content": ""}))
                async for i, item in run:
                    if isinstance(item, str):
                        if state["first"] is None:
                            state["first"] = time.perf_counter() - t0
                        yield _sse(chunk(i, text=item))
                    else:
                        state["results"].append(item)
                        yield _sse(chunk(i, delta={}, finish=_finish(item["finish_reason"])))
                if include_usage:
                    yield _sse({"id": rid, "object": kind, "created": created, "model": req.model, "choices": [],
                                "usage": _usage(state["results"])})
                state["status"] = 200
                yield b"data: [DONE]\n\n"
            except Exception as e:
                err = api_error(e)
                state["status"] = err.status
                yield _sse(err.body())  # the 200 went out already: the error goes into the stream
                yield b"data: [DONE]\n\n"
            finally:
                finish()  # a client gone (cancelled generator) lands here too: no await before it

        return _Stream(events(), finish, media_type="text/event-stream",
                       headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/embeddings", dependencies=authed)
    async def embeddings(req: EmbeddingRequest):
        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        try:
            kind = gw.kind(req.model)
        except ConfigError as e:
            raise api_error(e) from None
        if kind != "embed":
            raise APIError(400, f"model {req.model!r} generates text; use /v1/chat/completions", param="model")
        if not all(isinstance(t, str) for t in texts):
            raise APIError(400, "input must be text (a string or a list of strings), not token ids; with LangChain's "
                                "OpenAIEmbeddings set check_embedding_ctx_length=False", param="input")
        out = await answer("/v1/embeddings", req.model, lambda: embed(req.model, texts, count=True))
        vecs = out["embeddings"]
        data = []
        for i, v in enumerate(vecs):
            emb = base64.b64encode(v.astype("<f4").tobytes()).decode() if req.encoding_format == "base64" else v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        n_tokens = sum(b["tokens"] for b in out["batches"])  # the model's tokens, as OpenAI counts
        return {"object": "list", "data": data, "model": req.model,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    async def embed(model: str, texts: list[str], count: bool = False):
        f = await gw.run(gw.ai.embed, texts, model=model, details=count, count_tokens=count)
        try:
            (out,) = await gw.results([f], "the embedding")
        finally:
            gw.cancel_soon([f])
        return out

    # -- the seed's routes ------------------------------------------------------------------------
    @app.post("/inference", dependencies=authed)
    async def inference(req: InferenceRequest):
        model = req.model or gw.default_model("generate")
        params = sampling(req, req.max_tokens)
        (r,) = await answer("/inference", model, lambda: gw.generate(model, params, 1, prompt=req.prompt),
                            tokens=lambda rs: rs[0]["completion_tokens"])
        return {"text": r["text"], "model": model, "prompt_tokens": r["prompt_tokens"],
                "completion_tokens": r["completion_tokens"], "finish_reason": r["finish_reason"],
                "worker": r["worker"], "tier": r["tier"], "simulated": r["simulated"],
                "tokens_per_second": r["tokens_per_second"]}

    @app.post("/embed", dependencies=authed)
    async def embed_one(req: EmbedRequest):
        model = req.model or gw.default_model("embed")
        (v,) = await answer("/embed", model, lambda: embed(model, [req.text]))
        return {"embedding": v.tolist(), "dimensions": int(v.shape[0]), "model": model}

    @app.post("/embed-batch", dependencies=authed)
    async def embed_batch(req: EmbedBatchRequest):
        model = req.model or gw.default_model("embed")
        vecs = await answer("/embed-batch", model, lambda: embed(model, req.texts))
        return {"embeddings": vecs.tolist(), "count": int(vecs.shape[0]), "dimensions": int(vecs.shape[1]),
                "model": model}

    @app.get("/health")
    async def health():
        tiers = await gw.run(gw.ai.live_tiers)
        n = sum(len(w) for w in tiers.values())
        body = {"status": "ok" if n else "no workers", "workers": n, "tiers": {t: len(w) for t, w in tiers.items()}}
        return JSONResponse(body, status_code=200 if n else 503)

    @app.get("/status", dependencies=authed)
    async def status():
        rows = await gw.run(gw.ai.status)
        return json.loads(json.dumps({"scheduler": gw.ai.scheduler_address, "workers": list(rows),
                                      "requests_in_flight": dict(gw.inflight)}, default=str))

    @app.get("/config", dependencies=authed)
    async def config():
        return redacted_config(gw.cfg)

    @app.get("/models", dependencies=authed)
    async def models():
        listing = await list_models()
        return {"models": [{k: m[k] for k in ("id", "kind", "backend", "tier", "resident_on")} for m in listing["data"]]}

    return app


def redacted_config(cfg) -> dict:
    """The config as a dict, without secrets or file paths: API keys, certificate and key
    files, and model sources that are paths become ``"<redacted>"``."""
    data = cfg.model_dump(exclude={"path"})
    data["server"]["api_keys"] = ["<redacted>"] * len(data["server"]["api_keys"])
    for k in ("ca_file", "cert_file", "key_file"):
        if data["security"][k]:
            data["security"][k] = "<redacted>"
    for m in data["models"].values():
        if not str(m["source"]).startswith("package:"):
            m["source"] = "<redacted path>"
    return data
