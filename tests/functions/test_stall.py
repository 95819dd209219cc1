"""A client that stops reading its stream holds the instance's concurrency slot for at most
--stall-timeout seconds: `EventStream` ends the stream when a write waits longer than that (the
server's write waits while the client's socket is full), runs its close callback (which gives
the slot back and cancels the generation) and reports the stall.

The first tests use an ASGI `send` that never completes, as uvicorn's does while its transport is
paused for a client that reads nothing. The last does it for real: a server process and a client
socket that stops reading an answer larger than the kernel buffers in between (up to 4 MB on the
sending side here)."""

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


def test_a_real_client_that_stops_reading_gives_its_slot_back(tiny_model, tmp_path) -> None:
    """The same on a real socket and a real server process: a client sends a streaming request and
    then reads nothing. Its answer (4 choices of 1000 tokens, each frame with 20 alternatives:
    about 6 MB) is more than the kernel buffers on both ends take (the sender's grows to
    net.ipv4.tcp_wmem's 4 MB here), so the server's write waits; the client holds its concurrency
    slot only until that wait reaches --stall-timeout (2 s). Meanwhile another client is served at
    once, and afterwards the slot is free again."""
    import json
    import socket

    import httpx

    from tests.functions.conftest import Server

    server = Server(tiny_model, tmp_path / "stall.log", "--stall-timeout", "2")
    try:
        server.wait_ready()
        body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "Once upon a time"}],
                           "max_tokens": 1000, "n": 4, "stream": True, "logprobs": True, "top_logprobs": 20,
                           "ignore_eos": True, "temperature": 0}).encode()
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window it offers
        slow.connect(("127.0.0.1", server.port))
        slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert slow.recv(1024).startswith(b"HTTP/1.1 200"), "the slow client's stream did not start"
        t0 = time.monotonic()
        # It reads nothing more. Another client meanwhile: served at once (the limit is 4).
        r = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 4},
                       timeout=30)
        assert r.status_code == 200 and time.monotonic() - t0 < 2.0, (r.status_code, time.monotonic() - t0)
        deadline = t0 + 30
        while server.metric("sllm_function_stalled_streams_total") < 1:
            assert time.monotonic() < deadline, "the stalled stream was never ended"
            time.sleep(0.1)
        assert time.monotonic() - t0 >= 2.0  # not before the bound
        assert server.metric("sllm_function_requests_in_flight") == 0  # its slot is back
        assert "client stopped reading: stream ended" in server.log_path.read_text()
        slow.close()
    finally:
        server.stop()
