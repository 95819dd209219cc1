"""A client that stops reading its stream holds the instance's concurrency slot for at most
--stall-timeout seconds: `EventStream` ends the stream when a write waits longer than that (the
server's write waits while the client's socket is full), runs its close callback (which gives
the slot back and cancels the generation) and reports the stall.

The ASGI `send` here is one that never completes, as uvicorn's does while its transport is paused
for a client that reads nothing. (A real socket cannot be made to stall within a test's time
here: the kernel takes up to 4 MB of unread stream first, more than the tiny model's context
can echo.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from functions.llm.transport import EventStream, sse


async def _frames(count: int) -> AsyncIterator[bytes]:
    for i in range(count):
        yield sse({"i": i})


def _run(send_blocks_after: int | None, stall: float = 0.3) -> dict:
    """Serve a 5-frame stream through EventStream; `send` blocks forever after that many body writes."""
    seen: dict = {"bodies": 0, "closed": 0, "stalled": 0}

    async def go() -> None:
        async def send(message: dict) -> None:
            if message["type"] == "http.response.body":
                if send_blocks_after is not None and seen["bodies"] >= send_blocks_after:
                    await asyncio.Event().wait()  # a client that reads nothing: the write never drains
                seen["bodies"] += 1

        async def receive() -> dict:
            await asyncio.Event().wait()  # the client stays connected
            return {"type": "http.disconnect"}

        stream = EventStream(_frames(5), lambda: seen.__setitem__("closed", seen["closed"] + 1),
                             stall_timeout=stall, on_stall=lambda: seen.__setitem__("stalled", seen["stalled"] + 1))
        t0 = time.monotonic()
        await asyncio.wait_for(stream({"type": "http"}, receive, send), 10)
        seen["seconds"] = time.monotonic() - t0

    asyncio.run(go())
    return seen


@pytest.mark.parametrize("blocks_after", [0, 2, 5], ids=["first-write", "mid-stream", "last-write"])
def test_a_write_that_waits_past_the_bound_ends_the_stream(blocks_after: int) -> None:
    seen = _run(blocks_after)
    assert seen["bodies"] == blocks_after and seen["stalled"] == 1 and seen["closed"] == 1, seen
    assert 0.3 <= seen["seconds"] < 3, seen


def test_a_client_that_reads_is_not_bounded() -> None:
    seen = _run(None)
    assert seen["bodies"] == 6 and seen["stalled"] == 0 and seen["closed"] == 1, seen  # 5 frames and the end
