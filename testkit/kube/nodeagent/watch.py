"""List+watch of one resource, the way an informer's reflector does it: list, then watch from
the list's resourceVersion (bookmarks move it on), re-list on 410 Gone, retry after errors."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

from testkit.kube.nodeagent.api import Api
from testkit.kube.nodeagent.spec import Json


def _response_lines(resp: Any) -> Iterator[bytes]:
    buf = b""
    for chunk in resp.stream(amt=None, decode_content=False):
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                yield line
    if buf.strip():
        yield buf


def _abort_response(resp: Any) -> None:
    """Unblock a thread reading a watch stream (urllib3 response)."""
    with contextlib.suppress(Exception):
        sock = getattr(getattr(resp, "connection", None), "sock", None)
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(Exception):
        resp.close()


class Watcher:
    """List then watch from the list's resourceVersion; re-list on 410 Gone or after errors."""

    def __init__(self, list_fn: Callable[..., Any], *, on_sync: Callable[[list[Json]], None],
                 on_event: Callable[[str, Json], None], log: Any, timeout_s: int = 60, **selector: Any) -> None:
        self._list, self._sync, self._event, self._log = list_fn, on_sync, on_event, log
        self._timeout, self._selector = timeout_s, selector
        self._stop = threading.Event()
        self._resp: Any = None
        self.relists = 0
        self._thread = threading.Thread(target=self._run, name="watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._resp is not None:
            _abort_response(self._resp)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        rv: str | None = None
        while not self._stop.is_set():
            try:
                if rv is None:
                    data = Api.data(self._list(_preload_content=False, _request_timeout=30, **self._selector))
                    rv = data["metadata"]["resourceVersion"]
                    self.relists += 1
                    self._sync(data.get("items") or [])
                self._resp = self._list(watch=True, resource_version=rv, allow_watch_bookmarks=True,
                                        timeout_seconds=self._timeout, _preload_content=False,
                                        _request_timeout=(10, self._timeout + 15), **self._selector)
                try:
                    for line in _response_lines(self._resp):
                        if self._stop.is_set():
                            return
                        ev = json.loads(line)
                        kind, obj = ev.get("type"), ev.get("object") or {}
                        if kind == "ERROR":
                            if obj.get("code") == 410:
                                self._log.info("watch expired (410 Gone): re-listing")
                                rv = None
                                break
                            raise RuntimeError(f"watch error: {obj.get('message')}")
                        rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                        if kind != "BOOKMARK":
                            self._event(kind, obj)
                finally:
                    resp, self._resp = self._resp, None
                    with contextlib.suppress(Exception):
                        resp.release_conn()
            except Exception as e:
                if self._stop.is_set():
                    return
                if Api.status_of(e) == 410:
                    rv = None
                    continue
                self._log.warning("watch failed; retrying", error=repr(e)[:300])
                self._stop.wait(1.0)
