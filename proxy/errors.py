"""Errors the proxy answers with, as OpenAI error objects.

Every failure a handler can meet is an `ApiError` with its HTTP status, so the
handlers never guess a status. Deterministic failures (a bad request, an
unknown model, a prompt too long) are 4xx; only failures of the service itself
(no worker, a worker that died, a bug) are 5xx.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from aiohttp import web

from protocol.messages import ErrorCode


class ApiError(Exception):
    """An error the client sees as `{"error": {message, type, param, code}}`."""

    status: int = 500
    type: str = "server_error"
    code: Optional[str] = None

    def __init__(
        self,
        message: str,
        *,
        param: Optional[str] = None,
        code: Optional[str] = None,
        retry_after: Optional[int] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(self.retry_after)}

    def response(self) -> web.Response:
        return web.Response(
            status=self.status,
            text=json.dumps(self.body()),
            content_type="application/json",
            headers=self.headers(),
        )


class InvalidRequest(ApiError):
    status = 400
    type = "invalid_request_error"


class InvalidJson(InvalidRequest):
    code = "invalid_json"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class RequestTooLarge(InvalidRequest):
    """The body is over --max-body-bytes: a 400 invalid_request_error like any other malformed body."""

    code = "request_too_large"


class Unauthorized(ApiError):
    """No API key, or not one of --api-key's: OpenAI's `invalid_api_key` (Anthropic's `authentication_error`)."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "WWW-Authenticate": "Bearer"}


class RequestTimeout(ApiError):
    """The request body did not arrive within --body-timeout; the connection is closed after the answer."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class NotFound(ApiError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class QueueFull(ApiError):
    """Too many requests wait for this model's worker; try again later."""

    status = 429
    type = "rate_limit_error"
    code = "queue_full"


class WorkerUnavailable(ApiError):
    """No live worker can take the request (it died, or it never started)."""

    status = 503
    type = "server_error"
    code = "worker_unavailable"


class WorkerLinkRefused(WorkerUnavailable):
    """The worker's link refuses this proxy (CURVE keys that do not match): waiting will not help."""

    code = "worker_link_refused"


class ShuttingDown(ApiError):
    status = 503
    type = "server_error"
    code = "shutting_down"


class WorkerBusy(ApiError):
    status = 503
    type = "server_error"
    code = "worker_busy"


class InsufficientMemory(ApiError):
    status = 503
    type = "server_error"
    code = "insufficient_memory"


class UpstreamError(ApiError):
    status = 502
    type = "server_error"
    code = "upstream_error"


class InternalError(ApiError):
    status = 500
    type = "server_error"
    code = "internal_error"


_BY_WORKER_CODE: dict[ErrorCode, type[ApiError]] = {
    ErrorCode.BAD_REQUEST: InvalidRequest,
    ErrorCode.CONTEXT_LENGTH_EXCEEDED: ContextLengthExceeded,
    ErrorCode.BUSY: WorkerBusy,
    ErrorCode.INSUFFICIENT_MEMORY: InsufficientMemory,
    ErrorCode.WORKER_DIED: WorkerUnavailable,
    ErrorCode.VERSION_MISMATCH: WorkerUnavailable,
    ErrorCode.INTERNAL: InternalError,
}


def from_worker_error(code: ErrorCode, message: str) -> ApiError:
    """The client-facing error for a worker's typed `Error` of one request."""
    cls = _BY_WORKER_CODE.get(code, InternalError)
    retry_after = 1 if cls.status in (429, 503) else None
    return cls(message, retry_after=retry_after)
