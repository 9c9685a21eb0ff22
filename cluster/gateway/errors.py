"""Errors in OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``): what
each exception of the facade or a worker answers over HTTP."""
from __future__ import annotations

import asyncio
import logging
import uuid

from workloads.backends import InputError, ModelCrashed
from workloads.compat import SCHEDULER_LOST

from .. import routing
from ..config import ConfigError
from ..jobs import JobCancelled, SchedulerLost
from ..plugin import ModelDoesNotFit

__all__ = ["APIError", "api_error", "DisconnectedError", "param_of"]

logger = logging.getLogger("cluster.gateway")


class DisconnectedError(Exception):
    """The HTTP client went away before its answer was ready."""


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
    if isinstance(exc, SchedulerLost) or getattr(exc, "reason", None) == SCHEDULER_LOST:
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


def param_of(msg: str) -> str | None:
    head = msg.split(" ", 1)[0].split("[", 1)[0].rstrip(":")
    return head if head.isidentifier() else None
