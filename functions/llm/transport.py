"""HTTP plumbing shared by the public and internal apps: bodies, JSON, server-sent events.

`EventStream` is an ASGI response that sends SSE frames from an async iterator, stops as soon
as the client disconnects or leaves a write unread for `stall_timeout` seconds (its socket
full: the server's write waits for it to drain), and always runs its `on_close` callback (which
cancels the generation and returns the concurrency slot), whether the stream ended, failed,
stalled, or the client went away before the first byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from functions.llm.errors import BadRequest, PayloadTooLarge

T = TypeVar("T")


class ClientGone(Exception):
    """The client closed the connection before its response was ready."""


class ClientStalled(Exception):
    """The client stopped reading: a write waited longer than the stream's bound."""


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(body), status_code=status, media_type="application/json", headers=headers)


def sse(obj: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    data = obj if isinstance(obj, bytes) else dumps(obj)
    return head + b"data: " + data + b"\n\n"


DONE = b"data: [DONE]\n\n"


async def read_json(request: Request, max_bytes: int, empty: Any = None) -> Any:
    """The request body parsed as JSON; 413 over max_bytes, 400 if it is not JSON.

    An empty body is `empty` if given, else an error.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"The request body is {declared} bytes, the limit is {max_bytes}.")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"The request body is over the limit of {max_bytes} bytes.")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip() and empty is not None:
        return empty
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"We could not parse the JSON body of your request: {exc}", code="invalid_json") from None


async def _disconnected(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await work; raise ClientGone (and cancel work) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request.receive))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise ClientGone()
    finally:
        for t in (task, watch):
            if not t.done():
                t.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watch


class EventStream:
    """ASGI response: `text/event-stream` frames from an async iterator (chunked, no length)."""

    def __init__(self, frames: AsyncIterator[bytes], on_close: Callable[[], None],
                 headers: dict[str, str] | None = None, stall_timeout: float | None = None,
                 on_stall: Callable[[], None] | None = None) -> None:
        self.status_code = 200
        self.stall_timeout = stall_timeout
        self._on_stall = on_stall
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no")]
        self.raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        self._frames = frames
        self._on_close = on_close

    async def _send_all(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for frame in self._frames:
            await self._send_body(send, frame, True)
        await self._send_body(send, b"", False)  # the last write waits for the client like any other

    async def _send_body(self, send: Send, body: bytes, more: bool) -> None:
        try:
            async with asyncio.timeout(self.stall_timeout):  # in this task: no task per frame
                await send({"type": "http.response.body", "body": body, "more_body": more})
        except TimeoutError:
            raise ClientStalled() from None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            sender = asyncio.ensure_future(self._send_all(send))
            watch = asyncio.ensure_future(_disconnected(receive))
            done, _ = await asyncio.wait({sender, watch}, return_when=asyncio.FIRST_COMPLETED)
            for t in (sender, watch):
                if not t.done():
                    t.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await t
            if sender in done and sender.exception() is not None:
                exc = sender.exception()
                if isinstance(exc, ClientStalled):  # ended here: the server closes the connection
                    if self._on_stall is not None:
                        self._on_stall()
                elif not isinstance(exc, OSError):  # a write to a closed connection is a disconnect
                    raise exc  # type: ignore[misc]
        finally:
            self._on_close()
            with contextlib.suppress(Exception):
                await self._frames.aclose()  # type: ignore[attr-defined]
