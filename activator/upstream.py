"""Keep-alive HTTP/1.1 connections to instances: the client on the activator's data path.

    pool = Pool()
    resp = await pool.request("http://10.0.0.7:8080", b"POST", b"/v1/completions", headers, body)
    resp.status, resp.headers, resp.get(b"content-type")   # once the status line and headers are in
    async for chunk in resp: ...                          # the body as it arrives (de-chunked)
    await resp.aclose()                                   # the connection goes back to the pool

Why not httpx here: a proxied request through httpx's transport costs the httpcore pool, h11's
pure-Python parser and anyio's wrappers, about a third of the activator's time per request. This
module is one asyncio Protocol per connection with httptools' (llhttp) response parser; the
request is one write. httpx remains the client for everything else (admin, autoscaler, the
migration calls).

Semantics, kept equal to httpx's `aiter_raw` so callers (and `activator.migration.splice`) need
not care which client fetched a body:

- the body is yielded de-chunked, not content-decoded, each chunk as soon as it arrives (what
  arrived together is yielded together); the body ends at its length, its last chunk, or, for a
  response with neither, when the server closes;
- failures raise httpx's transport exceptions: `ConnectError`/`ConnectTimeout` (no connection),
  `WriteError`/`WriteTimeout` (sending the request), `ReadTimeout` (a wait for the head or a chunk
  past `read_timeout`), `RemoteProtocolError` (the server closed before the response was complete,
  or sent something that is not HTTP/1.x), `UnsupportedProtocol` (not an http:// URL).

Connections: at most one request at a time each; after a complete response that the server
keeps alive, `aclose()` returns it to its origin's idle list (most recently used first, at most
`max_idle_per_origin`, dropped after `idle_expiry` seconds); an incomplete or closed one is
closed. A connection the server closed while idle is noticed by its Protocol and never reused.
When a reused connection closes before any byte of the response (the server timed it out as the
request went out), an idempotent request is sent once more on a new connection, as Go's
net/http does; a POST is not (it may have been received), the error goes to the caller.
Reading is paused while more than `HIGH_WATER` bytes of body wait for the consumer.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import socket
import time
from collections.abc import Iterable
from typing import cast
from urllib.parse import urlsplit

import httptools
import httpx

HIGH_WATER = 256 << 10  # body bytes buffered before reading from the upstream pauses
LOW_WATER = 64 << 10  # ... and resumes
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
_BODYLESS_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"DELETE"})


@dataclasses.dataclass(frozen=True)
class Origin:
    """Where an instance URL points: the address to connect to and what the request line needs."""

    host: str
    port: int
    host_header: bytes  # `host[:port]` as in the URL
    prefix: bytes  # a path the instance URL carries, prepended to every target ("" if none)


@functools.lru_cache(maxsize=4096)
def parse_origin(url: str) -> Origin:
    """`http://host[:port][/prefix]` -> Origin; anything else raises httpx.UnsupportedProtocol."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise httpx.UnsupportedProtocol(f"upstream URL {url!r}: {exc}") from None
    if parts.scheme != "http" or not parts.hostname:
        raise httpx.UnsupportedProtocol(f"upstream URL {url!r}: expected http://host[:port], the data path "
                                        "speaks plain HTTP/1.1 to instances")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise httpx.UnsupportedProtocol(f"upstream URL {url!r}: no user, query or fragment allowed")
    return Origin(parts.hostname, port or 80, parts.netloc.encode("idna"), parts.path.rstrip("/").encode())


def encode_request(origin: Origin, method: bytes, target: bytes, headers: Iterable[tuple[bytes, bytes]],
                   body: bytes) -> bytes:
    """The request head (and body) as one buffer. `headers` must not hold Host, Content-Length,
    Transfer-Encoding or Connection: the request line's framing is this function's."""
    out = [method, b" ", origin.prefix, target, b" HTTP/1.1\r\nhost: ", origin.host_header, b"\r\n"]
    for name, value in headers:
        out += (name, b": ", value, b"\r\n")
    if body or method not in _BODYLESS_METHODS:
        out += (b"content-length: ", str(len(body)).encode(), b"\r\n")
    out += (b"\r\n", body)
    return b"".join(out)


class UpstreamResponse:
    """One response: status and headers at once, the body as an async iterator of chunks."""

    def __init__(self, conn: _Connection, status: int, headers: list[tuple[bytes, bytes]],
                 read_timeout: float | None) -> None:
        self.status = status
        self.headers = headers  # (lower-case name, value), in the order received
        self._conn = conn
        self._read_timeout = read_timeout
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._complete = False  # the whole body has arrived
        self._error: httpx.TransportError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False

    def get(self, name: bytes, default: bytes | None = None) -> bytes | None:
        """The first value of a header (name in lower case)."""
        for n, v in self.headers:
            if n == name:
                return v
        return default

    # -- fed by the connection ---------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER:
            self._conn.pause_reading()
        self._wake()

    def _end(self) -> None:
        self._complete = True
        self._wake()

    def _fail(self, error: httpx.TransportError) -> None:
        if not self._complete and self._error is None:
            self._error = error
            self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- read by the caller ------------------------------------------------------------------

    def __aiter__(self) -> UpstreamResponse:
        return self

    async def __anext__(self) -> bytes:
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._complete or self._closed:
                raise StopAsyncIteration
            await self._wait()
        chunk = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        self._conn.resume_reading()
        return chunk

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            if self._read_timeout is None:
                await self._waiter
            else:
                await asyncio.wait_for(self._waiter, self._read_timeout)
        except asyncio.TimeoutError:
            error = httpx.ReadTimeout(f"no body bytes from {self._conn.name} within {self._read_timeout:g}s")
            self._fail(error)
            self._conn.close()
            raise error from None
        finally:
            self._waiter = None

    async def read(self) -> bytes:
        """The whole (rest of the) body."""
        if self._complete and not self._chunks:
            return b""
        return b"".join([chunk async for chunk in self])

    @property
    def complete(self) -> bool:
        """The whole body has arrived (it may still be buffered here)."""
        return self._complete

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        """Done with this response: the connection is reused if the body was complete, else closed."""
        if not self._closed:
            self._closed = True
            self._conn.release(reusable=self._complete)


class _Connection(asyncio.Protocol):
    """One upstream connection. Protocol callbacks feed httptools; httptools calls `on_*` back."""

    def __init__(self, pool: Pool, origin: Origin) -> None:
        self.pool = pool
        self.origin = origin
        self.name = f"{origin.host}:{origin.port}"
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._head: asyncio.Future[UpstreamResponse] | None = None  # waiting for status and headers
        self._response: UpstreamResponse | None = None  # whose body is being received
        self._headers: list[tuple[bytes, bytes]] = []
        self._read_timeout: float | None = None
        self._head_only = False  # a HEAD request: no body follows the headers
        self._until_close = False  # a body with neither a length nor chunks: it ends when the server closes
        self.received = False  # any byte of the current response
        self._keep_alive = False
        self._reading_paused = False
        self._drained: asyncio.Future[None] | None = None  # set while the transport's write buffer is full

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is one without subclassing it
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self._head is None and self._response is None:
            self._error(httpx.RemoteProtocolError(f"{self.name} sent {len(data)} bytes with no request pending"))
            return
        self.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._error(httpx.RemoteProtocolError(f"{self.name} switched protocols; the data path relays HTTP/1.1"))
        except httptools.HttpParserError as exc:
            self._error(httpx.RemoteProtocolError(f"{self.name} sent a malformed response: {exc}"))

    def eof_received(self) -> bool:
        self.closed = True
        return False  # the transport closes itself; connection_lost ends the body or fails it

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        if self._response is not None and self._until_close and not self._response.complete:
            self._response._end()  # a body without length ends with the connection
            self._response = None
        else:
            why = f": {exc}" if exc else ""
            if self._head is not None:
                what = "closed the connection before the response" if not self.received else \
                    "closed the connection in the middle of the response head"
                self._error(httpx.RemoteProtocolError(f"{self.name} {what}{why}"))
            elif self._response is not None and not self._response.complete:
                self._error(httpx.RemoteProtocolError(f"{self.name} closed the connection in the middle of the "
                                                      f"response body{why}"))

    def pause_writing(self) -> None:
        self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    # -- httptools callbacks -------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        headers, self._headers = self._headers, []
        if 100 <= status < 200:
            return  # an interim response (100 Continue, 103 Early Hints): the real one follows
        if self._head is None or self._head.done():
            return
        resp = UpstreamResponse(self, status, headers, self._read_timeout)
        self._response = resp
        te = next((v for n, v in headers if n == b"transfer-encoding"), b"")
        self._until_close = (not self._head_only and status not in (204, 304) and b"chunked" not in te.lower()
                             and not any(n == b"content-length" for n, _ in headers))
        self._head.set_result(resp)
        if self._head_only:  # llhttp would wait for a body the Content-Length announces
            self._keep_alive = False
            self._response = None
            resp._end()

    def on_body(self, body: bytes) -> None:
        if self._response is not None and not self._head_only:
            self._response._feed(body)

    def on_message_complete(self) -> None:
        if self._response is None:
            return  # the end of an interim response
        self._keep_alive = self._parser.should_keep_alive()
        resp, self._response = self._response, None
        resp._end()

    # -- used by the pool and the response ------------------------------------------------------

    async def send(self, method: bytes, target: bytes, headers: Iterable[tuple[bytes, bytes]], body: bytes,
                   write_timeout: float, read_timeout: float | None) -> UpstreamResponse:
        """Write the request, wait for the response head. Any failure closes the connection."""
        if self.transport is None or self.transport.is_closing():
            raise httpx.RemoteProtocolError(f"{self.name} closed the connection before the request")
        self.received = False
        self._keep_alive = False
        self._head_only = method == b"HEAD"
        self._read_timeout = read_timeout
        self._headers = []
        loop = asyncio.get_running_loop()
        self._head = head = loop.create_future()
        try:
            try:
                self.transport.write(encode_request(self.origin, method, target, headers, body))
            except (OSError, RuntimeError) as exc:
                raise httpx.WriteError(f"cannot send the request to {self.name}: {exc}") from exc
            if self._drained is not None:
                try:
                    await asyncio.wait_for(self._drained, write_timeout)
                except asyncio.TimeoutError:
                    raise httpx.WriteTimeout(f"{self.name} did not take the request body within "
                                             f"{write_timeout:g}s") from None
            if read_timeout is None:
                return await head
            try:
                return await asyncio.wait_for(head, read_timeout)
            except asyncio.TimeoutError:
                raise httpx.ReadTimeout(f"no response head from {self.name} within {read_timeout:g}s") from None
        except BaseException:
            self.close()
            raise
        finally:
            self._head = None

    def _error(self, error: httpx.TransportError) -> None:
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)
        elif self._response is not None:
            self._response._fail(error)
        self.close()

    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    def release(self, reusable: bool) -> None:
        if reusable and self._keep_alive and not self.closed:
            self.pool._put_idle(self)
        else:
            self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Pool:
    """Idle keep-alive connections per origin; see the module docstring for the contract."""

    def __init__(self, *, connect_timeout: float = 10.0, write_timeout: float = 30.0,
                 read_timeout: float | None = None, max_idle_per_origin: int = 64,
                 idle_expiry: float = 60.0) -> None:
        for name, value in (("connect_timeout", connect_timeout), ("write_timeout", write_timeout),
                            ("idle_expiry", idle_expiry)):
            if value <= 0:
                raise ValueError(f"{name} = {value}, must be > 0")
        if read_timeout is not None and read_timeout <= 0:
            raise ValueError(f"read_timeout = {read_timeout}, must be > 0 or None (no limit)")
        if max_idle_per_origin < 0:
            raise ValueError(f"max_idle_per_origin = {max_idle_per_origin}, must be >= 0")
        self.connect_timeout = connect_timeout
        self.write_timeout = write_timeout
        self.read_timeout = read_timeout
        self.max_idle_per_origin = max_idle_per_origin
        self.idle_expiry = idle_expiry
        self._idle: dict[Origin, list[_Connection]] = {}
        self._closed = False

    async def request(self, url: str, method: bytes, target: bytes, headers: Iterable[tuple[bytes, bytes]],
                      body: bytes = b"") -> UpstreamResponse:
        """Send one request to the instance at `url`; return once its status and headers are in.

        `target` is the path and query as received (`/v1/models?x=1`); `headers` exclude the
        framing ones (see `encode_request`)."""
        if self._closed:
            raise RuntimeError("the upstream pool is closed")
        origin = parse_origin(url)
        headers = list(headers)
        conn = self._take_idle(origin)
        if conn is not None:
            try:
                return await conn.send(method, target, headers, body, self.write_timeout, self.read_timeout)
            except httpx.RemoteProtocolError:
                if conn.received or method not in IDEMPOTENT:
                    raise
        conn = await self._connect(origin)
        return await conn.send(method, target, headers, body, self.write_timeout, self.read_timeout)

    def idle(self, url: str) -> int:
        """Idle connections kept for the instance at `url`."""
        return sum(not c.closed for c in self._idle.get(parse_origin(url), ()))

    async def aclose(self) -> None:
        self._closed = True
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

    def _take_idle(self, origin: Origin) -> _Connection | None:
        conns = self._idle.get(origin)
        now = time.monotonic()
        while conns:
            conn = conns.pop()
            if not conn.closed and now - conn.idle_since < self.idle_expiry:
                return conn
            conn.close()
        return None

    def _put_idle(self, conn: _Connection) -> None:
        conns = self._idle.setdefault(conn.origin, [])
        if self._closed or len(conns) >= self.max_idle_per_origin:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        conns.append(conn)

    async def _connect(self, origin: Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self, origin), origin.host, origin.port),
                self.connect_timeout)
        except asyncio.TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {origin.host}:{origin.port} took over "
                                       f"{self.connect_timeout:g}s") from None
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {origin.host}:{origin.port}: {exc}") from exc
        return conn
