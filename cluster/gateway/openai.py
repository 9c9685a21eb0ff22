"""OpenAI's API: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(``stream``: server-sent events in OpenAI's chunk format), ``POST /v1/embeddings``."""
from __future__ import annotations

import base64
import json
import time
import uuid

from fastapi import APIRouter, Depends, Request

from ..config import ConfigError
from .deps import AUTHED, gateway
from .errors import APIError, api_error
from .middleware import ClosingStream
from .schemas import ChatRequest, CompletionRequest, EmbeddingRequest
from .service import Gateway

__all__ = ["router", "list_models", "respond"]

router = APIRouter()


@router.get("/v1/models", dependencies=AUTHED)
async def list_models_route(gw: Gateway = Depends(gateway)):
    return await list_models(gw)


async def list_models(gw: Gateway) -> dict:
    """OpenAI's model list, with where each model is resident (and quarantined)."""
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


@router.post("/v1/completions", dependencies=AUTHED)
async def completions(req: CompletionRequest, http: Request, gw: Gateway = Depends(gateway)):
    prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    if len(prompts) != 1:
        raise APIError(400, "send one prompt per request (a list of several is not supported here)", param="prompt")
    params = gw.sampling(req, req.max_tokens or 16)
    return await respond(gw, "/v1/completions", req, params, prompt=prompts[0], http=http)


@router.post("/v1/chat/completions", dependencies=AUTHED)
async def chat_completions(req: ChatRequest, http: Request, gw: Gateway = Depends(gateway)):
    params = gw.sampling(req, req.max_completion_tokens or req.max_tokens or gw.limits.default_max_tokens)
    return await respond(gw, "/v1/chat/completions", req, params, messages=req.messages, http=http)


async def respond(gw: Gateway, route: str, req, params: dict, prompt=None, messages=None, http: Request | None = None):
    """A completion or chat completion in OpenAI's shape: one JSON answer, or server-sent
    events with ``stream`` (errors before the first token are HTTP errors, after it they go
    into the stream)."""
    chat = messages is not None
    gw.generation_model(req.model)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    obj = "chat.completion" if chat else "text_completion"
    if not req.stream:
        results = await gw.answer(route, req.model,
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

    return ClosingStream(events(), finish, media_type="text/event-stream",
                   headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.post("/v1/embeddings", dependencies=AUTHED)
async def embeddings(req: EmbeddingRequest, gw: Gateway = Depends(gateway)):
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
    out = await gw.answer("/v1/embeddings", req.model, lambda: gw.embed(req.model, texts, count=True))
    vecs = out["embeddings"]
    data = []
    for i, v in enumerate(vecs):
        emb = base64.b64encode(v.astype("<f4").tobytes()).decode() if req.encoding_format == "base64" else v.tolist()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    n_tokens = sum(b["tokens"] for b in out["batches"])  # the model's tokens, as OpenAI counts
    return {"object": "list", "data": data, "model": req.model,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}


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
