"""``aicluster serve``: the whole cluster behind one HTTP endpoint (the gateway).

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

Layout (FastAPI's "Bigger Applications"): ``service.Gateway`` is the cluster side (submits,
waits, limits, keys, metrics); the routers ``openai.py``, ``seed.py`` and ``admin.py`` are
thin over it; ``errors.py`` maps exceptions to OpenAI's error bodies; ``schemas.py`` holds
the request bodies; ``middleware.py`` the body limit. A new route goes into the router of
its family (ARCHITECTURE.md).
"""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from . import admin, openai, seed
from .admin import redacted_config
from .errors import APIError, api_error
from .middleware import BodyLimit, route_of
from .service import HTTP_TOPIC, KEYS_ENV, Gateway, StreamRun, api_keys

__all__ = ["create_app", "Gateway", "StreamRun", "api_keys", "api_error", "APIError", "KEYS_ENV", "HTTP_TOPIC",
           "redacted_config"]


def create_app(gateway: Gateway) -> FastAPI:
    """The FastAPI app for ``gateway``: its routers, error handlers and body limit."""
    app = FastAPI(title="dask-ai-cluster", version="1", docs_url="/docs", redoc_url=None)
    app.state.gateway = gw = gateway

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

    app.add_middleware(BodyLimit, limit=gw.limits.max_body, gateway=gw)
    for family in (openai, seed, admin):
        app.include_router(family.router)
    return app
