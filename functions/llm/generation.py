"""From a request's submitted sequences (one per choice: `n`) to the HTTP response: an SSE
stream or one JSON body.

Both paths hold the request's concurrency `Permit` until every choice is over and cancel the
unfinished ones in the engine if the client goes away first (which frees their KV slots at the
next step boundary). The choices of a request with `n` > 1 stream interleaved, each chunk under
its index; the usage counts the prompt once and the tokens of every choice.

Stream frames: OpenAI chunks, then the usage chunk when `stream_options.include_usage`, then
`data: [DONE]`. A generation that fails after the stream started ends with an error frame and
`[DONE]`. A generation detached for migration ends with `event: sllm.detached` and
`data: {"id", "position", "state"}` (the final state, as the detach call returns it) and no
`[DONE]`: the activator resumes that state on the destination at once and continues the stream.
Only a one-choice generation is ever detached: the activator migrates the generation it named,
and the choices of a request with `n` > 1 carry other names (`<name>-<index>`), so such a
request finishes where it started. A one-choice stream says so with the `x-sllm-generation-id`
response header (the generation's name); the activator exports and migrates only streams that
carry it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from functions.llm.errors import ApiError, Conflict
from functions.llm.params import Output, TokenLogprob
from functions.llm.responses import Formatter, total_usage
from functions.llm.service import Permit
from functions.llm.transport import DONE, ClientGone, EventStream, json_response, sse, until_disconnect
from sllm_knative.api.instance import DETACHED_EVENT, DETACHED_HEADER, GENERATION_ID_HEADER


class OutputQueue:
    """The sinks a request's sequences emit into (engine thread) and the queue its handler reads
    (event loop): (choice index, output) in the order they were emitted."""

    def __init__(self, choices: int = 1) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[int, Output]] = asyncio.Queue()
        self.ended: set[int] = set()  # choices whose final output was read
        self.choices = choices

    def sink_for(self, index: int) -> Callable[[Output], None]:
        def sink(out: Output) -> None:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (index, out))
        return sink

    def sink(self, out: Output) -> None:
        """The sink of a one-choice request (choice 0)."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (0, out))

    @property
    def finished(self) -> bool:
        return len(self.ended) == self.choices

    async def get(self) -> tuple[int, Output]:
        index, out = await self._queue.get()
        if out.final:
            self.ended.add(index)
        return index, out


def _several_detached() -> ApiError:
    return ApiError("a choice of a request with n > 1 was detached; such a request cannot migrate")


async def _frames(queue: OutputQueue, fmts: list[Formatter], role_chunk: bool,
                  ended: Callable[[], None]) -> AsyncIterator[bytes]:
    """The stream's frames; `ended` runs once the generation is over, before its last frames go
    out (the concurrency slot is free by the time the client sees the end: a client that sends
    its next request at once must not find it still taken)."""
    if role_chunk:
        for fmt in fmts:
            yield sse(fmt.role_chunk())
    while True:
        index, out = await queue.get()
        if out.detached is not None and len(fmts) > 1:
            out = dataclasses.replace(out, detached=None, error=_several_detached())
        if out.error is not None:
            ended()
            yield sse(out.error.body())
            yield DONE
            return
        if out.detached is not None:
            ended()
            yield sse({"id": out.detached.id, "position": out.detached.position, "state": out.detached.to_json()},
                      event=DETACHED_EVENT)
            return
        if queue.finished:
            ended()
        for chunk in fmts[index].chunks(out):
            yield sse(chunk)
        if queue.finished:
            if fmts[0].include_usage:
                yield sse(fmts[0].usage_chunk(total_usage(fmts)))
            yield DONE
            return


async def respond(request: Request, *, engine: Any, seqs: list[Any], queue: OutputQueue, fmts: list[Formatter],
                  permit: Permit, stream: bool, want_logprobs: bool, role_chunk: bool = False,
                  prior_logprobs: tuple[TokenLogprob, ...] | None = None) -> Response | EventStream:
    """The response for a request's submitted sequences (choice i: seqs[i], fmts[i]); owns permit from here on."""

    def close() -> None:
        for index, seq in enumerate(seqs):
            if index not in queue.ended:
                engine.cancel(seq)
        permit.release()

    if stream:
        service = request.app.state.service

        def stalled() -> None:
            service.metrics.stalled_streams.inc()
            service.log.warning("client stopped reading: stream ended", id=fmts[0].id,
                                stall_timeout_s=service.cfg.stall_timeout_s)

        headers = {"x-request-id": fmts[0].id}
        if len(seqs) == 1:  # one generation, named as the request: what a migration can move
            headers[GENERATION_ID_HEADER] = fmts[0].id
        return EventStream(_frames(queue, fmts, role_chunk, permit.release), close,
                           headers=headers, stall_timeout=service.cfg.stall_timeout_s,
                           on_stall=stalled)
    if prior_logprobs:
        fmts[0].add_logprobs(list(prior_logprobs))
    return await _whole(request, queue, fmts, want_logprobs, close)


async def _whole(request: Request, queue: OutputQueue, fmts: list[Formatter], want_logprobs: bool,
                 close: Any) -> Response:
    async def collect() -> Response:
        while True:
            index, out = await queue.get()
            if out.detached is not None and len(fmts) > 1:
                raise _several_detached()
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
            fmts[index].add(out)
            if queue.finished:
                return json_response(fmts[0].response(want_logprobs, fmts))

    try:
        return await until_disconnect(request, collect())
    except ClientGone:
        return Response(status_code=499)  # nobody is listening; the status is for the access log
    finally:
        close()
