"""Writing responses to the client: a whole body in one write, a chunked stream, an error; and
relaying an upstream body chunk by chunk."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator

import httpx
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from activator import errors
from sllm_knative.log import get_logger

_log = get_logger("activator")


async def send_whole(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    if not any(n == b"content-length" for n, _ in headers):
        headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_stream(scope: Scope, receive: Receive, send: Send, status: int, headers: list[tuple[bytes, bytes]],
                      chunks: AsyncIterator[bytes]) -> None:
    """Chunked response; Starlette's StreamingResponse stops it if the client disconnects."""
    response = StreamingResponse(chunks, status_code=status)
    response.raw_headers = headers
    await response(scope, receive, send)


async def send_error(send: Send, exc: errors.ActivatorError) -> None:
    await send_whole(send, exc.status, errors.error_headers(exc), errors.error_body(exc))


async def relay(first: bytes, rest: AsyncIterator[bytes], *, events: bool = False) -> AsyncGenerator[bytes, None]:
    """Pass the upstream body through chunk by chunk. A break after the first byte must not look
    like the end of the body: a server-sent-event stream (`events`) ends with an error event;
    any other body is aborted (the exception propagates, the connection closes without the
    chunked body's last chunk, and the client sees an incomplete response)."""
    if first:
        yield first
    try:
        async for chunk in rest:
            yield chunk
    except httpx.HTTPError as exc:
        _log.warning("upstream stream broke after the first byte", error=f"{type(exc).__name__}: {exc}")
        if not events:
            raise
        yield errors.error_frame(errors.StreamCut(f"the instance broke off the stream: {type(exc).__name__}"))


async def prepend(chunk: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if chunk:
        yield chunk
    async for more in rest:
        yield more
