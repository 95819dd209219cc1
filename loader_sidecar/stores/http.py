"""`http(s)://` store: plain files under a URL prefix, read with range requests.

Two clients behind one set of rules (the pure functions below, table-tested):

- httpx (async, on the event loop) for sizes (HEAD), small files and `read`;
- http.client (blocking, `blocking_reader`) for the bulk ranges the fetcher moves in worker
  threads: each response body is received with `readinto` into one reused buffer per thread and
  handed to the fetcher, which writes it with `os.pwrite` and checks it with crc32c, both
  without the GIL, so the connections run on every core.

Why http.client for the bulk bytes (1 GiB from nginx on loopback into tmpfs, 4 connections,
2 cores, each writing and checksumming its bytes; best of 3, 2026-11-25): curl 2050 MB/s; httpx
async `aiter_raw` with 1 MiB reads on the event loop 536 MB/s; a sync httpx.Client in 4
threads 656 MB/s, 1250-1320 MB/s with 1 MiB reads; http.client `readinto` a reused buffer
1820-1910 MB/s. The gap is h11's: every body chunk is copied four times with the GIL held (into
its receive buffer, twice while slicing it out, into a bytes object). The same readinto loop
with those four copies added measured 1350 MB/s.

What the blocking path shares with httpx's: the status mapping (`status_error`), the
Content-Range check and the skip when a server ignores Range (`body_offset`), the TLS trust (one
`httpx.create_ssl_context()` for both clients: certifi, or SSL_CERT_FILE / SSL_CERT_DIR),
redirects followed by httpx's rule for credentials (`redirect`: Authorization dropped when the
origin changes, kept for an http -> https upgrade of the same host), timeouts per read
(Stalled), keep-alive connections per origin. What it does not do is proxies: when the
environment names one (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY), `blocking_reader()` is None and
every read goes through httpx, which honours it.

A cut connection (the server closes) loses nothing already received; a reset or a timeout loses
the read in progress (at most RECV_BYTES), which the fetcher's resume asks for again. Cancel
shuts the socket of the request in progress, so a blocked read returns at once; a connect in
progress is not interrupted (it ends within the timeout).
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import re
import select
import socket
import ssl
import threading
import urllib.request
from collections.abc import AsyncIterator, Generator, Mapping
from urllib.parse import urljoin, urlsplit

import httpx

from loader_sidecar.refs import ModelRef, StoreRoot
from loader_sidecar.stores.base import BlockingRead, Cancel, Sink, Store
from sllm_knative.loader.errors import (
    AccessDenied,
    CorruptData,
    LoaderError,
    NotFound,
    Stalled,
    StoreUnavailable,
)

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
BODY_READ_BYTES = 1 << 20
RECV_BYTES = 1 << 20  # one readinto of the blocking path (the buffer each worker thread reuses)
REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 20  # httpx's default
_DRAIN_BYTES = 64 << 10  # a redirect's body read to keep its connection; a longer one closes it
_DEFAULT_PORTS = {"http": 80, "https": 443}

Origin = tuple[str, str, int]


def _larger_body_reads() -> None:
    """httpcore reads responses 64 KiB at a time (a class constant, no option for it): at several
    hundred MB/s that is thousands of trips through h11 and anyio per second, a quarter of a
    checkpoint download's time on a small machine. 1 MiB reads keep the event loop free. Process-wide
    and harmless for other clients (a read returns what has arrived, whatever its maximum)."""
    from httpcore._async import http11

    if getattr(http11.AsyncHTTP11Connection, "READ_NUM_BYTES", BODY_READ_BYTES) < BODY_READ_BYTES:
        http11.AsyncHTTP11Connection.READ_NUM_BYTES = BODY_READ_BYTES


_larger_body_reads()


# -- decisions (pure) ------------------------------------------------------------------------------


def status_error(status: int, where: str) -> LoaderError:
    """The sidecar error for a non-success HTTP status (pure; table-tested)."""
    if status == 404 or status == 410:
        return NotFound(f"{where}: HTTP {status}, not found")
    if status in (401, 403):
        return AccessDenied(f"{where}: HTTP {status}, access denied (check the token)")
    if status == 416:
        return CorruptData(f"{where}: HTTP 416, the file is shorter than its recorded size")
    if status >= 500 or status in (408, 425, 429):
        return StoreUnavailable(f"{where}: HTTP {status}")
    return StoreUnavailable(f"{where}: unexpected HTTP {status}")


def range_start(content_range: str | None, where: str) -> int:
    """The first byte a 206 response carries, from its Content-Range header."""
    m = _CONTENT_RANGE.match(content_range or "")
    if not m:
        raise CorruptData(f"{where}: malformed Content-Range {content_range!r}")
    return int(m.group(1))


def body_offset(status: int, content_range: str | None, start: int, where: str) -> int:
    """How many bytes of the answer to a `Range: bytes=start-` request come before byte `start`:
    0 for a 206 of that range, `start` for a 200 (the server ignored Range); raises otherwise."""
    if status == 206:
        if range_start(content_range, where) != start:
            raise CorruptData(f"{where}: the server answered another range ({content_range})")
        return 0
    if status == 200:
        return start
    raise status_error(status, where)


def origin(url: str) -> Origin:
    """(scheme, host, port) of an http(s) URL, the port defaulted."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or _DEFAULT_PORTS.get(scheme, 0)


def redirect(url: str, location: str | None, headers: Mapping[str, str], where: str) -> tuple[str, dict[str, str]]:
    """Where a redirect from `url` goes and the headers to send there: httpx's rule, Authorization
    dropped when the origin changes unless it is an http -> https upgrade of the same host."""
    if not location:
        raise StoreUnavailable(f"{where}: a redirect without a Location")
    target = urljoin(url, location.strip())
    if urlsplit(target).scheme.lower() not in _DEFAULT_PORTS:
        raise StoreUnavailable(f"{where}: a redirect to a {urlsplit(target).scheme or 'relative'} URL, not http(s)")
    was, now = origin(url), origin(target)
    upgrade = was == ("http", now[1], 80) and now == ("https", was[1], 443)
    if was == now or upgrade:
        return target, dict(headers)
    return target, {k: v for k, v in headers.items() if k.lower() != "authorization"}


def transport_error(exc: BaseException, where: str, timeout_s: float) -> LoaderError:
    """The sidecar error for a failure of the blocking client (socket, TLS or HTTP framing)."""
    if isinstance(exc, TimeoutError):
        return Stalled(f"{where}: no bytes within {timeout_s:g} s")
    return StoreUnavailable(f"{where}: {type(exc).__name__}: {exc or 'connection lost'}")


def proxied(proxies: Mapping[str, str]) -> bool:
    """Whether the environment's proxy settings (urllib's getproxies_environment) name a proxy for
    http(s) requests; no_proxy exceptions are not weighed (any proxy: httpx reads everything)."""
    return any(proxies.get(k) for k in ("http", "https", "all"))


# -- the blocking client ---------------------------------------------------------------------------


def _readable(sock: socket.socket) -> bool:
    poller = select.poll()  # not select(): descriptors past 1024 are common in a busy sidecar
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _Connections:
    """Keep-alive HTTP/1.1 connections per origin, shared by the worker threads."""

    def __init__(self, timeout_s: float, ssl_context: ssl.SSLContext, max_idle: int) -> None:
        self._timeout_s = timeout_s
        self._ssl = ssl_context
        self._max_idle = max_idle
        self._idle: dict[Origin, list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()

    def get(self, where: Origin) -> http.client.HTTPConnection:
        """An idle connection the server has not closed, or a new (unconnected) one."""
        while True:
            with self._lock:
                conn = self._idle.get(where, []).pop() if self._idle.get(where) else None
            if conn is None:
                break
            if conn.sock is not None and not _readable(conn.sock):
                return conn
            conn.close()  # readable while idle: the server closed it (or sent something unasked)
        scheme, host, port = where
        if scheme == "https":
            return http.client.HTTPSConnection(host, port, timeout=self._timeout_s, context=self._ssl)
        return http.client.HTTPConnection(host, port, timeout=self._timeout_s)

    def put(self, where: Origin, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(where, [])
            if conn.sock is not None and len(idle) < self._max_idle:
                idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for c in conns:
            c.close()


class HttpStore(Store):
    def __init__(self, root: StoreRoot, *, timeout_s: float, connections: int,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(root)
        self._ssl = httpx.create_ssl_context()
        self._headers = {"Accept-Encoding": "identity", "User-Agent": "sllm-knative-loader", **(headers or {})}
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s, pool=None), follow_redirects=True, verify=self._ssl,
            limits=httpx.Limits(max_connections=max(16, connections * 4), max_keepalive_connections=connections * 4),
            headers=self._headers,
        )
        self._timeout_s = timeout_s
        self._connections = _Connections(timeout_s, self._ssl, max_idle=connections * 4)
        self._buffers = threading.local()
        self._direct = not proxied(urllib.request.getproxies_environment())

    def url(self, ref: ModelRef, file: str) -> str:
        return f"{self.root.scheme}://{self.root.host}/{ref.path}/{file}"

    def location(self, ref: ModelRef, file: str) -> str:
        return self.url(ref, file)

    async def aclose(self) -> None:
        await self._client.aclose()
        self._connections.close()

    async def size(self, ref: ModelRef, file: str) -> int | None:
        url = self.url(ref, file)
        try:
            resp = await self._client.head(url)
        except httpx.TimeoutException as exc:
            raise Stalled(f"{url}: no answer within {self._timeout_s:g} s") from exc
        except httpx.HTTPError as exc:
            raise StoreUnavailable(f"{url}: {type(exc).__name__}: {exc}") from exc
        if resp.status_code in (404, 410):
            return None
        if resp.status_code != 200:
            raise status_error(resp.status_code, url)
        length = resp.headers.get("x-linked-size") or resp.headers.get("content-length")
        if length is None or not length.isdigit():
            raise CorruptData(f"{url}: the server sent no Content-Length")
        return int(length)

    async def read(self, ref: ModelRef, file: str, start: int, end: int) -> AsyncIterator[bytes]:
        url = self.url(ref, file)
        where = f"{url} bytes {start}-{end - 1}"
        try:
            async with self._client.stream("GET", url, headers={"Range": f"bytes={start}-{end - 1}"}) as resp:
                skip = body_offset(resp.status_code, resp.headers.get("content-range"), start, where)
                left = end - start
                async for chunk in resp.aiter_raw():  # as received: a cut loses nothing already read
                    if skip:
                        cut = min(skip, len(chunk))
                        chunk, skip = chunk[cut:], skip - cut
                    if not chunk:
                        continue
                    if len(chunk) >= left:
                        yield chunk[:left]
                        return
                    left -= len(chunk)
                    yield chunk
        except httpx.TimeoutException as exc:
            raise Stalled(f"{where}: no bytes within {self._timeout_s:g} s") from exc
        except httpx.HTTPError as exc:
            raise StoreUnavailable(f"{where}: {type(exc).__name__}: {exc or 'connection lost'}") from exc

    # -- blocking reads (worker threads) -------------------------------------------------------

    def blocking_reader(self) -> BlockingRead | None:
        return self.read_into if self._direct else None

    def read_into(self, ref: ModelRef, file: str, start: int, end: int, sink: Sink, cancel: Cancel) -> None:
        """The blocking reader (see base.BlockingRead); the sink runs outside every error translation."""
        with contextlib.closing(self._body(self.url(ref, file), start, end, cancel)) as body:
            for view in body:
                sink(view)

    def _body(self, url: str, start: int, end: int, cancel: Cancel) -> Generator[memoryview, None, None]:
        where = f"{url} bytes {start}-{end - 1}"
        headers = {**self._headers, "Range": f"bytes={start}-{end - 1}"}
        for _ in range(MAX_REDIRECTS + 1):
            if cancel.cancelled:
                raise StoreUnavailable(f"{where}: cancelled")
            dest = origin(url)
            conn = self._connections.get(dest)
            reusable = False
            try:
                try:
                    if conn.sock is None:
                        conn.connect()
                    sock: socket.socket = conn.sock
                except OSError as exc:
                    raise transport_error(exc, where, self._timeout_s) from exc
                with cancel.hooked(functools.partial(_shutdown, sock)):
                    try:
                        parts = urlsplit(url)
                        conn.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                                     headers=headers)
                        resp = conn.getresponse()
                        if resp.status in REDIRECTS:
                            resp.read(_DRAIN_BYTES)
                    except (OSError, http.client.HTTPException) as exc:
                        raise transport_error(exc, where, self._timeout_s) from exc
                    if resp.status in REDIRECTS:
                        reusable = resp.isclosed()
                        url, headers = redirect(url, resp.getheader("location"), headers, where)
                        continue
                    skip = body_offset(resp.status, resp.getheader("content-range"), start, where)
                    got = yield from self._receive(resp, skip, end - start, where)
                    reusable = got == end - start and resp.isclosed()  # the whole body read, nothing left
                    return
            finally:
                if reusable:
                    self._connections.put(dest, conn)
                else:
                    conn.close()
        raise StoreUnavailable(f"{where}: more than {MAX_REDIRECTS} redirects")

    def _receive(self, resp: http.client.HTTPResponse, skip: int, length: int,
                 where: str) -> Generator[memoryview, None, int]:
        """The body's bytes after the first `skip`, at most `length` of them, as views of this
        thread's buffer; returns how many it yielded (fewer when the body ends early)."""
        buf = getattr(self._buffers, "view", None)
        if buf is None:
            buf = self._buffers.view = memoryview(bytearray(RECV_BYTES))
        left = length
        while left > 0:
            want = min(len(buf), skip or left)
            try:
                n = resp.readinto(buf[:want])
            except (OSError, http.client.HTTPException) as exc:
                raise transport_error(exc, where, self._timeout_s) from exc
            if not n:
                if resp.length:  # http.client's count of the announced length still to come
                    raise StoreUnavailable(f"{where}: the connection closed with {resp.length} bytes of the "
                                           "response still to come")
                break
            if skip:
                skip -= n
                continue
            left -= n
            yield buf[:n]
        return length - left
