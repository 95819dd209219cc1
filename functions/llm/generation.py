"""From a submitted sequence's outputs to the HTTP response: an SSE stream or one JSON body.

Both paths hold the request's concurrency `Permit` until the generation is over and cancel
the generation in the engine if the client goes away first (which frees its KV slot at the
next step boundary).

Stream frames: OpenAI chunks, then the usage chunk when `stream_options.include_usage`, then
`data: [DONE]`. A generation that fails after the stream started ends with an error frame and
`[DONE]`. A generation detached for migration ends with `event: sllm.detached` and
`data: {"id", "position", "state"}` (the final state, as the detach call returns it) and no
`[DONE]`: the activator resumes that state on the destination at once and continues the stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from functions.llm.errors import Conflict
from functions.llm.params import Output, TokenLogprob
from functions.llm.responses import Formatter
from functions.llm.service import Permit
from functions.llm.transport import DONE, ClientGone, EventStream, json_response, sse, until_disconnect
from sllm_knative.api.instance import DETACHED_EVENT, DETACHED_HEADER


class OutputQueue:
    """The sink a sequence emits into (engine thread) and the queue a handler reads (event loop)."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Output] = asyncio.Queue()
        self.finished = False

    def sink(self, out: Output) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, out)

    async def get(self) -> Output:
        out = await self._queue.get()
        if out.final:
            self.finished = True
        return out


async def _frames(queue: OutputQueue, fmt: Formatter, role_chunk: bool) -> AsyncIterator[bytes]:
    if role_chunk:
        yield sse(fmt.role_chunk())
    while True:
        out = await queue.get()
        if out.error is not None:
            yield sse(out.error.body())
            yield DONE
            return
        if out.detached is not None:
            yield sse({"id": out.detached.id, "position": out.detached.position, "state": out.detached.to_json()},
                      event=DETACHED_EVENT)
            return
        for chunk in fmt.chunks(out):
            yield sse(chunk)
        if out.finish_reason is not None:
            if fmt.include_usage:
                yield sse(fmt.usage_chunk())
            yield DONE
            return


async def respond(request: Request, *, engine: Any, seq: Any, queue: OutputQueue, fmt: Formatter, permit: Permit,
                  stream: bool, want_logprobs: bool, role_chunk: bool = False,
                  prior_logprobs: tuple[TokenLogprob, ...] | None = None) -> Response | EventStream:
    """The response for a submitted sequence; owns permit from here on."""

    def close() -> None:
        if not queue.finished:
            engine.cancel(seq)
        permit.release()

    if stream:
        return EventStream(_frames(queue, fmt, role_chunk), close, headers={"x-request-id": seq.id})
    if prior_logprobs:
        fmt.add_logprobs(list(prior_logprobs))
    return await _whole(request, queue, fmt, want_logprobs, close)




async def _whole(request: Request, queue: OutputQueue, fmt: Formatter, want_logprobs: bool,
                 close: Any) -> Response:
    async def collect() -> Response:
        while True:
            out = await queue.get()
            if out.error is not None:
                raise out.error
            if out.detached is not None:
                # Migrated away: the caller (the activator) resumes the state elsewhere and answers
                # its client with the whole text from there. Anyone else sees a plain 409.
                state = out.detached
                error = Conflict(f"generation {state.id} was detached at position {state.position} for migration",
                                 code="generation_detached")
                return json_response({**error.body(), "state": state.to_json()}, error.status,
                                     headers={DETACHED_HEADER: str(state.position)})
            fmt.add(out)
            if out.finish_reason is not None:
                return json_response(fmt.response(want_logprobs))

    try:
        return await until_disconnect(request, collect())
    except ClientGone:
        return Response(status_code=499)  # nobody is listening; the status is for the access log
    finally:
        close()
