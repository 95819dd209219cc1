"""`http(s)://` store: plain files under a URL prefix, read with range requests (httpx)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx

from loader_sidecar.errors import AccessDenied, CorruptData, LoaderError, NotFound, Stalled, StoreUnavailable
from loader_sidecar.refs import ModelRef, StoreRoot
from loader_sidecar.stores.base import Store

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
BODY_READ_BYTES = 1 << 20


def _larger_body_reads() -> None:
    """httpcore reads responses 64 KiB at a time (a class constant, no option for it): at several
    hundred MB/s that is thousands of trips through h11 and anyio per second, a quarter of a
    checkpoint download's time on a small machine. 1 MiB reads keep the event loop free. Process-wide
    and harmless for other clients (a read returns what has arrived, whatever its maximum)."""
    from httpcore._async import http11

    if getattr(http11.AsyncHTTP11Connection, "READ_NUM_BYTES", BODY_READ_BYTES) < BODY_READ_BYTES:
        http11.AsyncHTTP11Connection.READ_NUM_BYTES = BODY_READ_BYTES


_larger_body_reads()


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


class HttpStore(Store):
    def __init__(self, root: StoreRoot, *, timeout_s: float, connections: int,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(root)
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s, pool=None), follow_redirects=True,
            limits=httpx.Limits(max_connections=max(16, connections * 4), max_keepalive_connections=connections * 4),
            headers={"Accept-Encoding": "identity", "User-Agent": "sllm-knative-loader", **(headers or {})},
        )
        self._timeout_s = timeout_s

    def url(self, ref: ModelRef, file: str) -> str:
        return f"{self.root.scheme}://{self.root.host}/{ref.path}/{file}"

    def location(self, ref: ModelRef, file: str) -> str:
        return self.url(ref, file)

    async def aclose(self) -> None:
        await self._client.aclose()

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
                if resp.status_code == 206:
                    skip = 0
                    if range_start(resp.headers.get("content-range"), where) != start:
                        raise CorruptData(f"{where}: the server answered another range "
                                          f"({resp.headers.get('content-range')})")
                elif resp.status_code == 200:
                    skip = start  # the server ignores Range: skip to our first byte
                else:
                    raise status_error(resp.status_code, where)
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
