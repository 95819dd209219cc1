"""Errors of the inference function, and their one mapping to OpenAI-shaped responses.

    ApiError (Exception)                 .status .message .type .param .code
     ├── BadRequest                      400 invalid_request_error
     │    └── ContextLengthExceeded      400 code context_length_exceeded
     ├── Unauthorized                    401 (internal API token)
     ├── NotFound                        404 (unknown model, generation, route)
     ├── Conflict                        409 (resume/detach/prefill out of order)
     ├── PayloadTooLarge                 413 (request body over the limit)
     ├── TooManyRequests                 429 (concurrency limit reached)
     └── Unavailable                     503 (not ready yet, shutting down, engine failed)

Every error body is `{"error": {"message", "type", "param", "code"}}`, as the OpenAI API
returns it; `error_response` is the only place that turns an exception into a response.
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    status = 500
    type = "server_error"
    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class BadRequest(ApiError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(BadRequest):
    default_code = "context_length_exceeded"


class Unauthorized(ApiError):
    status = 401
    type = "authentication_error"
    default_code = "invalid_token"


class NotFound(ApiError):
    status = 404
    type = "invalid_request_error"


class Conflict(ApiError):
    status = 409
    type = "invalid_request_error"


class PayloadTooLarge(ApiError):
    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"


class TooManyRequests(ApiError):
    status = 429
    type = "rate_limit_error"
    default_code = "concurrency_limit_exceeded"


class Unavailable(ApiError):
    status = 503
    type = "service_unavailable"


def model_not_found(name: object) -> NotFound:
    return NotFound(f"The model `{name}` does not exist.", param="model", code="model_not_found")


def error_response(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """(status, body) for any exception raised while serving a request."""
    if isinstance(exc, ApiError):
        return exc.status, exc.body()
    status = getattr(exc, "status_code", None)  # starlette HTTPException: unknown route, wrong method
    if isinstance(status, int) and 400 <= status < 500:
        detail = getattr(exc, "detail", None) or "request error"
        kind = NotFound if status == 404 else BadRequest
        err = kind(str(detail), code="not_found" if status == 404 else "bad_request")
        return status, err.body()
    return 500, ApiError("The server had an error while processing your request.", code="internal_error").body()
