"""The activator's exception tree and its one mapping to HTTP responses.

    ActivatorError
     ├── NotFound            unknown Host or model              404
     │    └── RevisionNotFound   Kubernetes mode: unknown revision  404
     ├── BadRequest          unreadable body, bad JSON          400
     ├── TooLarge            body over the size limit           413
     ├── Overloaded          the hold queue is full             503 + Retry-After
     ├── ColdStartTimeout    no instance became ready in time   503 + Retry-After
     ├── UpstreamFailed      instance failed before first byte, twice  502
     ├── StreamCut           a started stream could not go on   error frame (the status is sent)
     └── NoDestination       a migration has nowhere to go      409
"""

from __future__ import annotations

import json


class ActivatorError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None
    retry_after: int | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(ActivatorError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class RevisionNotFound(NotFound):
    code = "revision_not_found"


class BadRequest(ActivatorError):
    status, type = 400, "invalid_request_error"


class TooLarge(ActivatorError):
    status, type, code = 413, "invalid_request_error", "request_too_large"


class Overloaded(ActivatorError):
    status, type, code, retry_after = 503, "server_error", "overloaded", 1


class ColdStartTimeout(ActivatorError):
    status, type, code = 503, "server_error", "cold_start_timeout"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UpstreamFailed(ActivatorError):
    status, type, code = 502, "server_error", "upstream_failed"


class StreamCut(ActivatorError):
    """A stream that had begun broke off and could not be resumed. Its status line has gone
    out, so the client learns it from `error_frame`: a cut stream never ends like a whole one."""

    status, type, code = 502, "server_error", "stream_cut"


class NoDestination(ActivatorError):
    status, type, code = 409, "invalid_request_error", "no_destination"


def error_body(exc: ActivatorError) -> bytes:
    """OpenAI-shaped error JSON."""
    return json.dumps({"error": {"message": exc.message, "type": exc.type, "param": None,
                                 "code": exc.code}}).encode()


def error_frame(exc: ActivatorError) -> bytes:
    """The error as the last event of a server-sent-event stream (the OpenAI client raises it as
    an APIError). It starts with a blank line: it ends a frame the client got only part of."""
    return b"\n\ndata: " + error_body(exc) + b"\n\n"


def error_headers(exc: ActivatorError) -> list[tuple[bytes, bytes]]:
    headers = [(b"content-type", b"application/json")]
    if exc.retry_after is not None:
        headers.append((b"retry-after", str(exc.retry_after).encode()))
    return headers
