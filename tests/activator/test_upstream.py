"""activator/upstream.py against a real HTTP/1.1 server on loopback, on both event loops.

The server is scripted per test (asyncio streams, raw bytes), so each test decides exactly
what goes over the wire: lengths or chunks, keep-alive or close, dying mid-body, stalling.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import httpx
import pytest
import uvloop

from activator.upstream import HIGH_WATER, Pool

Handler = Callable[["Server", int, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture(params=[pytest.param(asyncio.new_event_loop, id="asyncio"),
                        pytest.param(uvloop.new_event_loop, id="uvloop")])
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    def runner(coro: Coroutine[Any, Any, Any]) -> Any:
        with asyncio.Runner(loop_factory=request.param) as r:
            return r.run(asyncio.wait_for(coro, 20))
    return runner


class Req:
    def __init__(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> None:
        self.method, self.target, self.headers, self.body = method, target, headers, body

    def header(self, name: str) -> str | None:
        return next((v for n, v in self.headers if n == name), None)


async def read_request(reader: asyncio.StreamReader) -> Req | None:
    """One request off the connection (None at EOF)."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")[:-2]
    method, target, _ = lines[0].split(" ")
    headers = [(n.strip().lower(), v.strip()) for n, _, v in (line.partition(":") for line in lines[1:])]
    length = int(next((v for n, v in headers if n == "content-length"), "0"))
    return Req(method, target, headers, await reader.readexactly(length))


def response(body: bytes, *extra: str, status: str = "200 OK") -> bytes:
    head = [f"HTTP/1.1 {status}", f"content-length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class Server:
    """Scripted server on 127.0.0.1: `handler(server, connection_index, reader, writer)` per connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[Req] = []
        self.eofs = 0  # connections the client closed
        self._server: asyncio.Server | None = None
        self.url = ""

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._on_connection, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = self.connections
        self.connections += 1
        try:
            await self.handler(self, index, reader, writer)
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def next_request(self, reader: asyncio.StreamReader) -> Req | None:
        req = await read_request(reader)
        if req is None:
            self.eofs += 1
        else:
            self.requests.append(req)
        return req


async def echo_target(server: Server, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers every request on the connection with `<connection index> <target>`, kept alive."""
    while (req := await server.next_request(reader)) is not None:
        writer.write(response(f"{index} {req.target}".encode(), "x-b: 2"))
        await writer.drain()


async def get(pool: Pool, url: str, target: bytes = b"/", method: bytes = b"GET", body: bytes = b"") -> bytes:
    resp = await pool.request(url, method, target, [], body)
    try:
        return await resp.read()
    finally:
        await resp.aclose()


# -- bodies --------------------------------------------------------------------------------------------


def test_request_as_sent_and_content_length_body(run) -> None:
    async def main() -> None:
        async with Server(echo_target) as srv:
            pool = Pool()
            resp = await pool.request(srv.url, b"POST", b"/v1/x%20y?q=1", [(b"x-a", b"1")], b'{"k": 1}')
            assert resp.status == 200 and resp.get(b"x-b") == b"2"
            assert await resp.read() == b"0 /v1/x%20y?q=1" and resp.complete
            await resp.aclose()
            req = srv.requests[0]
            assert (req.method, req.target, req.body) == ("POST", "/v1/x%20y?q=1", b'{"k": 1}')
            assert req.header("host") == srv.url.removeprefix("http://")
            assert req.header("x-a") == "1" and req.header("content-length") == "8"
            await pool.aclose()
    run(main())


def test_chunked_body_is_dechunked(run) -> None:
    async def handler(srv: Server, i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.next_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n1;ext=1\r\n \r\n"
                     b"5\r\nworld\r\n0\r\nx-trailer: t\r\n\r\n")
        await writer.drain()
        await srv.next_request(reader)

    async def main() -> None:
        async with Server(handler) as srv:
            pool = Pool()
            assert await get(pool, srv.url) == b"hello world"
            assert pool.idle(srv.url) == 1  # the last chunk ended the message: the connection is reusable
            await pool.aclose()
    run(main())


# -- connections ---------------------------------------------------------------------------------------


def test_connection_is_reused(run) -> None:
    async def main() -> None:
        async with Server(echo_target) as srv:
            pool = Pool()
            bodies = [await get(pool, srv.url, f"/{i}".encode()) for i in range(3)]
            assert bodies == [b"0 /0", b"0 /1", b"0 /2"]  # all on connection 0
            assert srv.connections == 1 and pool.idle(srv.url) == 1
            await pool.aclose()
    run(main())


def test_response_closed_before_its_body_ended_closes_the_connection(run) -> None:
    async def handler(srv: Server, i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        req = await srv.next_request(reader)
        if i == 0:
            writer.write(response(b"0123456789")[:-5])  # half the body, then wait
            await writer.drain()
            assert await reader.read() == b""  # the client hung up
            srv.eofs += 1
            return
        writer.write(response(f"{i} {req.target if req else ''}".encode()))
        await writer.drain()
        await srv.next_request(reader)

    async def main() -> None:
        async with Server(handler) as srv:
            pool = Pool()
            resp = await pool.request(srv.url, b"GET", b"/a", [])
            assert await resp.__anext__() == b"01234"
            await resp.aclose()
            assert await get(pool, srv.url, b"/b") == b"1 /b"
            assert srv.connections == 2 and srv.eofs == 1
            await pool.aclose()
    run(main())


def test_connection_close_from_the_server_is_not_reused(run) -> None:
    async def handler(srv: Server, i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.next_request(reader)
        writer.write(response(f"{i}".encode(), "connection: close"))
        await writer.drain()

    async def main() -> None:
        async with Server(handler) as srv:
            pool = Pool()
            assert await get(pool, srv.url) == b"0"
            assert pool.idle(srv.url) == 0
            assert await get(pool, srv.url, method=b"POST") == b"1"
            assert srv.connections == 2
            await pool.aclose()
    run(main())


def test_idle_connection_closed_by_the_server_is_not_reused(run) -> None:
    """A keep-alive timeout on the server side: the pool notices the close and connects anew."""
    async def handler(srv: Server, i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.next_request(reader)
        writer.write(response(f"{i}".encode()))
        await writer.drain()
        await asyncio.sleep(0.05)  # then close the idle connection

    async def main() -> None:
        async with Server(handler) as srv:
            pool = Pool()
            assert await get(pool, srv.url) == b"0"
            await asyncio.sleep(0.3)
            assert pool.idle(srv.url) == 0
            assert await get(pool, srv.url, method=b"POST", body=b"x") == b"1"  # not idempotent: no retry needed
            await pool.aclose()
    run(main())


@pytest.mark.parametrize(("method", "retried"), [
    pytest.param(b"GET", True, id="idempotent-resent"),
    pytest.param(b"POST", False, id="post-not-resent"),
])
def test_reused_connection_lost_before_any_response_byte(run, method: bytes, retried: bool) -> None:
    async def handler(srv: Server, i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.next_request(reader)
        writer.write(response(f"{i}".encode()))
        await writer.drain()
        if i == 0:
            await srv.next_request(reader)  # the second request on this connection: closed unanswered
            return
        await srv.next_request(reader)

    async def main() -> None:
        async with Server(handler) as srv:
            pool = Pool()
            assert await get(pool, srv.url) == b"0"
            if retried:
                assert await get(pool, srv.url, method=method) == b"1"
            else:
                with pytest.raises(httpx.RemoteProtocolError, match="before the response"):
                    await get(pool, srv.url, method=method, body=b"x")
            await pool.aclose()
    run(main())


def test_pool_close_closes_idle_connections_and_refuses_requests(run) -> None:
    async def main() -> None:
        async with Server(echo_target) as srv:
            pool = Pool()
            await get(pool, srv.url)
            await pool.aclose()
            for _ in range(50):
                if srv.eofs:
                    break
                await asyncio.sleep(0.01)
            assert srv.eofs == 1
            with pytest.raises(RuntimeError, match="closed"):
                await pool.request(srv.url, b"GET", b"/", [])
    run(main())


# -- failures ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_upstream_dying_mid_body_is_an_error_after_the_bytes_it_sent(run, framing: str) -> None:
    async def handler(srv: Server, i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.next_request(reader)
        if framing == "length":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n7\r\npartial\r\n")
        await writer.drain()  # and the handler returns: the connection closes

    async def main() -> None:
        async with Server(handler) as srv:
            pool = Pool()
            resp = await pool.request(srv.url, b"GET", b"/", [])
            got = []
            with pytest.raises(httpx.RemoteProtocolError, match="middle of the response body"):
                async for chunk in resp:
                    got.append(chunk)
            assert b"".join(got) == b"partial"
            await resp.aclose()
            assert pool.idle(srv.url) == 0
            await pool.aclose()
    run(main())


def test_body_without_length_ends_when_the_server_closes(run) -> None:
    async def handler(srv: Server, i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.next_request(reader)
        writer.write(b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil ")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"close")

    async def main() -> None:
        async with Server(handler) as srv:
            pool = Pool()
            resp = await pool.request(srv.url, b"GET", b"/", [])
            assert await resp.read() == b"until close" and resp.complete
            await resp.aclose()
            assert pool.idle(srv.url) == 0
            await pool.aclose()
    run(main())


def test_connect_error(run) -> None:
    async def main() -> None:
        srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        srv.close()
        await srv.wait_closed()
        with pytest.raises(httpx.ConnectError, match=f"127.0.0.1:{port}"):
            await Pool().request(f"http://127.0.0.1:{port}", b"GET", b"/", [])
    run(main())


def test_malformed_response(run) -> None:
    async def handler(srv: Server, i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.next_request(reader)
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()
        await srv.next_request(reader)

    async def main() -> None:
        async with Server(handler) as srv:
            with pytest.raises(httpx.RemoteProtocolError, match="malformed"):
                await Pool().request(srv.url, b"GET", b"/", [])
    run(main())


def test_unsupported_url(run) -> None:
    async def main() -> None:
        with pytest.raises(httpx.UnsupportedProtocol, match="https://"):
            await Pool().request("https://127.0.0.1:1", b"GET", b"/", [])
    run(main())


# -- timeouts ------------------------------------------------------------------------------------------


async def stall(srv: Server, i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await srv.next_request(reader)
    await reader.read()  # never answers; returns when the client gives up


async def stall_mid_body(srv: Server, i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await srv.next_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n01")
    await writer.drain()
    await reader.read()


def test_read_timeout_waiting_for_the_head(run) -> None:
    async def main() -> None:
        async with Server(stall) as srv:
            pool = Pool(read_timeout=0.2)
            with pytest.raises(httpx.ReadTimeout, match="response head"):
                await pool.request(srv.url, b"GET", b"/", [])
            assert pool.idle(srv.url) == 0
    run(main())


def test_read_timeout_in_the_middle_of_the_body(run) -> None:
    async def main() -> None:
        async with Server(stall_mid_body) as srv:
            pool = Pool(read_timeout=0.2)
            resp = await pool.request(srv.url, b"GET", b"/", [])
            assert await resp.__anext__() == b"01"
            with pytest.raises(httpx.ReadTimeout, match="body bytes"):
                await resp.__anext__()
            with pytest.raises(httpx.ReadTimeout):  # and it stays failed
                await resp.__anext__()
            await resp.aclose()
            assert pool.idle(srv.url) == 0
    run(main())


def test_write_timeout_when_the_server_does_not_read(run) -> None:
    async def handler(srv: Server, i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)  # reads nothing: the request body fills the socket buffers

    async def main() -> None:
        async with Server(handler) as srv:
            with pytest.raises(httpx.WriteTimeout, match="request body"):
                await Pool(write_timeout=0.3).request(srv.url, b"POST", b"/", [], b"x" * (48 << 20))
    run(main())


# -- bodies in volume and in time ----------------------------------------------------------------------


def test_large_bodies_both_ways_with_backpressure(run) -> None:
    """A 4 MiB request body arrives whole; a 24 MiB response is not read ahead of the consumer
    (the server cannot write much beyond HIGH_WATER plus the socket buffers), then arrives intact."""
    total = 24 << 20
    blob = os.urandom(total)
    written = []

    async def handler(srv: Server, i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        req = await srv.next_request(reader)
        assert req is not None
        writer.write(f"HTTP/1.1 200 OK\r\ncontent-length: {total}\r\nx-sha: {hashlib.sha256(req.body).hexdigest()}"
                     "\r\n\r\n".encode())
        for off in range(0, total, 1 << 20):
            writer.write(blob[off:off + (1 << 20)])
            await writer.drain()
            written.append(off + (1 << 20))
        await srv.next_request(reader)

    async def main() -> None:
        body = os.urandom(4 << 20)
        async with Server(handler) as srv:
            pool = Pool()
            resp = await pool.request(srv.url, b"POST", b"/", [], body)
            assert resp.get(b"x-sha") == hashlib.sha256(body).hexdigest().encode()
            await asyncio.sleep(0.3)  # consume nothing for a while
            assert written[-1] < total // 2, f"the pool read {written[-1]} bytes ahead of its consumer"
            assert (HIGH_WATER << 2) < total // 2
            digest = hashlib.sha256()
            async for chunk in resp:
                digest.update(chunk)
            assert digest.digest() == hashlib.sha256(blob).digest()
            await resp.aclose()
            assert pool.idle(srv.url) == 1
            await pool.aclose()
    run(main())


def test_sse_chunks_are_delivered_one_by_one(run) -> None:
    """The server sends the next event only after the client has received the previous one:
    a client that waited for more data, or for the end, would deadlock here."""
    received: list[asyncio.Event] = []  # made inside the test's loop

    async def handler(srv: Server, i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.next_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for n in range(5):
            event = f"data: {n}\n\n".encode()
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
            await received[n].wait()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await srv.next_request(reader)

    async def main() -> None:
        received.extend(asyncio.Event() for _ in range(5))
        async with Server(handler) as srv:
            pool = Pool()
            resp = await pool.request(srv.url, b"POST", b"/v1/completions", [], b"{}")
            events = []
            async for chunk in resp:
                events.append(chunk)
                received[len(events) - 1].set()
            assert events == [f"data: {n}\n\n".encode() for n in range(5)]
            await resp.aclose()
            await pool.aclose()
    run(main())


def test_interim_responses_are_skipped(run) -> None:
    async def handler(srv: Server, i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.next_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n" +
                     response(b"final", status="201 Created"))
        await writer.drain()
        await srv.next_request(reader)

    async def main() -> None:
        async with Server(handler) as srv:
            pool = Pool()
            resp = await pool.request(srv.url, b"POST", b"/", [], b"x")
            assert resp.status == 201 and resp.get(b"link") is None
            assert await resp.read() == b"final"
            await resp.aclose()
            await pool.aclose()
    run(main())


def test_head_response_has_no_body(run) -> None:
    async def handler(srv: Server, i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (req := await srv.next_request(reader)) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" if req.method == "HEAD" else
                         response(f"{i}".encode()))
            await writer.drain()

    async def main() -> None:
        async with Server(handler) as srv:
            pool = Pool()
            resp = await pool.request(srv.url, b"HEAD", b"/", [])
            assert resp.get(b"content-length") == b"100" and await resp.read() == b""
            await resp.aclose()
            assert await get(pool, srv.url) == b"1"  # a HEAD's connection is not reused
            await pool.aclose()
    run(main())
