"""Plain ASGI pieces of the app: the body size limit, a streamed response that always
runs its clean-up, and the matched route's path for metric labels."""
from __future__ import annotations

from fastapi.responses import JSONResponse, StreamingResponse

from .errors import APIError

__all__ = ["BodyLimit", "ClosingStream", "route_of"]


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413, whether it says its
    length (refused before it is read) or comes in chunks (read here up to the limit, then
    handed on whole; FastAPI would turn an error raised while it reads into a 400). Plain
    ASGI, so that streamed responses pass through untouched."""

    def __init__(self, app, limit: int, gateway):
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


class ClosingStream(StreamingResponse):
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
