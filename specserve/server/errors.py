"""OpenAI-shaped errors: every failure leaves the server as ``{"error": {message, type, param, code}}``.

Maps the AsyncEngine's exceptions, the engine's ValueErrors, rate limits (429 with Retry-After),
FastAPI's validation errors and Starlette's HTTP errors to the status OpenAI would give. Knows
nothing about the engine's internals and never produces a bare 500.
"""

from __future__ import annotations

import logging
import math
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from specserve.server.async_engine import EngineError, QueueFullError, ShuttingDownError
from specserve.server.limits import RateLimitExceeded

logger = logging.getLogger(__name__)

# the fields of SamplingParams / requests whose name opens the engine's ValueError messages
_PARAMS = {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "prompt", "messages", "n",
           "logprobs", "top_logprobs"}


class APIError(Exception):
    """An error with its HTTP status and OpenAI error body fields."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer", **self.headers} if self.status == 401 else self.headers
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def invalid(message: str, param: str | None = None) -> APIError:
    """400 invalid_request_error."""
    return APIError(400, message, param=param)


def from_exception(e: BaseException) -> APIError:
    """The OpenAI error for any exception the handlers let through."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ValueError):
        first = str(e).split(" ", 1)[0]
        return invalid(str(e), param=first if first in _PARAMS else None)
    if isinstance(e, RateLimitExceeded):
        return APIError(429, str(e), type="rate_limit_error", code="rate_limit_exceeded",
                        headers={"Retry-After": str(max(1, math.ceil(e.retry_after)))})
    if isinstance(e, QueueFullError):
        return APIError(429, str(e), type="rate_limit_error", code="queue_full")
    if isinstance(e, ShuttingDownError):
        return APIError(503, str(e), type="service_unavailable", code="shutting_down")
    if isinstance(e, EngineError):
        return APIError(500, str(e), type="internal_server_error", code="engine_error")
    return APIError(500, f"internal error: {e!r}", type="internal_server_error")


def _validation_message(err: dict) -> tuple[str, str | None]:
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    if err.get("type") == "json_invalid":
        ctx = err.get("ctx", {}).get("error", "")
        return f"the request body is not valid JSON ({ctx})", None
    if not loc and err.get("type") == "missing":
        return "the request body is missing: send a JSON object", None
    where = ".".join(loc) or "body"
    message = f"{where}: {err.get('msg', 'invalid value').removeprefix('Value error, ')}"
    if loc and "input" in err and err.get("type") != "missing":  # a body-level error would repeat the body
        got = repr(err["input"])
        message += f", got {got[:200]}"
    return message, (loc[0] if loc else None)


def install(app: FastAPI) -> None:
    """Register the handlers that reshape every error into the OpenAI body."""

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        messages = [_validation_message(e) for e in errors] or [("invalid request", None)]
        return invalid("; ".join(m for m, _ in messages), param=messages[0][1]).response()

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see GET /v1/models and the OpenAI API"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail) or HTTPStatus(exc.status_code).phrase
        kind = "invalid_request_error" if exc.status_code < 500 else "internal_server_error"
        return APIError(exc.status_code, message, type=kind, code=HTTPStatus(exc.status_code).phrase.lower()
                        .replace(" ", "_")).response()

    async def on_known(request: Request, exc: Exception) -> JSONResponse:
        err = from_exception(exc)
        if err.status >= 500:
            logger.error("request %s %s failed: %r", request.method, request.url.path, exc)
        return err.response()

    for kind in (APIError, ValueError, RateLimitExceeded, QueueFullError, ShuttingDownError, EngineError):
        app.add_exception_handler(kind, on_known)
    # the last resort: Starlette sends this body, then re-raises so that the server logs the bug
    app.add_exception_handler(Exception, on_known)
