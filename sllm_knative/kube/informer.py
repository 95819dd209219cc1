"""List + watch into a cache, with resync: how every controller here learns the cluster's state.

An `Informer` runs one thread per watched collection:

1. list (raw JSON, `_preload_content=False`), replace the cache, and call the handler for what
   appeared, changed or vanished since the last list;
2. watch from the list's resourceVersion, applying each event to the cache and calling the
   handler; a watch that ends is restarted from the last resourceVersion seen, and a `410 Gone`
   (the version is too old) or any error falls back to step 1 after a backoff;
3. every `resync_s`, call the handler with every cached object (event type `SYNC`), so a
   reconciler that missed nothing still re-checks its world.

Objects are plain dicts in the API's JSON shape (camelCase), whatever the API group: the watch's
`raw_object`, and the list's raw body. Handlers run on the informer's thread and should only
enqueue keys (`key_of`).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

from sllm_knative.kube.workqueue import backoff_s
from sllm_knative.log import get_logger

_log = get_logger("sllm_knative.kube.informer")

Handler = Callable[[str, dict[str, Any], "dict[str, Any] | None"], None]  # (type, obj, old)

ADDED, MODIFIED, DELETED, SYNC = "ADDED", "MODIFIED", "DELETED", "SYNC"


def key_of(obj: dict[str, Any]) -> str:
    """`namespace/name`, or `name` for a cluster-scoped object."""
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{ns}/{meta['name']}" if ns else str(meta["name"])


def split_key(key: str) -> tuple[str, str]:
    """(namespace, name); namespace is '' for a cluster-scoped key."""
    ns, _, name = key.rpartition("/")
    return ns, name


def diff_lists(old: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]]
               ) -> list[tuple[str, dict[str, Any], dict[str, Any] | None]]:
    """The events that turn cache `old` into `new`: ADDED, MODIFIED (resourceVersion changed), DELETED."""
    events: list[tuple[str, dict[str, Any], dict[str, Any] | None]] = []
    for k, obj in new.items():
        before = old.get(k)
        if before is None:
            events.append((ADDED, obj, None))
        elif _rv(before) != _rv(obj):
            events.append((MODIFIED, obj, before))
    for k, obj in old.items():
        if k not in new:
            events.append((DELETED, obj, obj))
    return events


def _rv(obj: dict[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion", ""))


class Informer:
    """Watch one collection: `list_fn(*args, **kwargs)` is an official-client list method (for
    example `CoreV1Api.list_namespaced_pod, "ns"` or `CustomObjectsApi.list_cluster_custom_object,
    group, version, plural`); selectors go in `kwargs`."""

    def __init__(self, name: str, list_fn: Callable[..., Any], *args: Any, resync_s: float = 30.0,
                 watch_timeout_s: int = 300, request_timeout_s: float = 30.0, **kwargs: Any) -> None:
        self.name = name
        self._list_fn, self._args, self._kwargs = list_fn, args, kwargs
        self.resync_s = resync_s
        self.watch_timeout_s = watch_timeout_s
        self.request_timeout_s = request_timeout_s  # a list, or the margin past a watch's end
        self._handlers: list[Handler] = []
        self._lock = threading.Lock()
        self._cache: dict[str, dict[str, Any]] = {}
        self._rv = ""
        self.synced = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watch: Any = None
        self.relists = 0  # lists after the first (errors, 410 Gone)

    def add_handler(self, handler: Handler) -> None:
        self._handlers.append(handler)

    # -- the cache --------------------------------------------------------------------------

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            return self._cache.get(key)

    def items(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._cache.values())

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._cache)

    # -- running ----------------------------------------------------------------------------

    def start(self) -> Informer:
        self._thread = threading.Thread(target=self._run, name=f"informer-{self.name}", daemon=True)
        self._thread.start()
        return self

    def wait_synced(self, timeout_s: float = 30.0) -> None:
        if not self.synced.wait(timeout_s):
            raise TimeoutError(f"informer {self.name}: no successful list within {timeout_s} s")

    def stop(self) -> None:
        self._stop.set()
        w = self._watch
        if w is not None:
            w.stop()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _emit(self, kind: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        for h in self._handlers:
            try:
                h(kind, obj, old)
            except Exception:  # a handler's bug must not stop the watch
                _log.error("informer handler failed", exc_info=True, informer=self.name, key=key_of(obj))

    def _list(self) -> None:
        resp = self._list_fn(*self._args, _preload_content=False, _request_timeout=self.request_timeout_s,
                             **self._kwargs)
        body = json.loads(resp.data)
        items = {key_of(o): o for o in body.get("items") or []}
        with self._lock:
            old, self._cache = self._cache, items
            self._rv = (body.get("metadata") or {}).get("resourceVersion", "")
        for kind, obj, before in diff_lists(old, items):
            self._emit(kind, obj, before)

    def _run(self) -> None:
        failures = 0
        next_resync = time.monotonic() + self.resync_s
        listed = False
        while not self._stop.is_set():
            try:
                if not listed:
                    if self.synced.is_set():
                        self.relists += 1
                    self._list()
                    listed = True
                    self.synced.set()
                    failures = 0
                listed, next_resync = self._watch_once(next_resync)
            except Exception as exc:
                if self._stop.is_set():  # stop() ended the watch under us: not a failure
                    return
                listed = False
                failures += 1
                delay = backoff_s(failures, 0.2, 10.0)
                _log.warning("informer list/watch failed; relisting", informer=self.name, error=_short(exc),
                             retry_in_s=round(delay, 2))
                self._stop.wait(delay)

    def _watch_once(self, next_resync: float) -> tuple[bool, float]:
        """Watch until the stream ends or a resync is due; (still listed?, next resync time)."""
        from kubernetes import watch

        timeout = max(1, min(self.watch_timeout_s, int(next_resync - time.monotonic()) + 1))
        w = self._watch = watch.Watch()
        try:
            for ev in w.stream(self._list_fn, *self._args, resource_version=self._rv,
                               timeout_seconds=timeout, allow_watch_bookmarks=True,
                               # the server ends the watch at `timeout`; a server that stops
                               # answering must not hold this thread beyond a margin after that
                               _request_timeout=timeout + self.request_timeout_s, **self._kwargs):
                if self._stop.is_set():
                    break
                kind, raw = ev["type"], ev.get("raw_object") or {}
                if kind == "ERROR":
                    if raw.get("code") == 410:  # our resourceVersion is too old: list again
                        _log.info("watch expired; relisting", informer=self.name)
                        return False, next_resync
                    raise RuntimeError(f"watch error: {raw.get('message', raw)}")
                rv = _rv(raw)
                if rv:
                    self._rv = rv
                if kind == "BOOKMARK":
                    continue
                key = key_of(raw)
                with self._lock:
                    old = self._cache.get(key)
                    if kind == DELETED:
                        self._cache.pop(key, None)
                    else:
                        self._cache[key] = raw
                self._emit(kind, raw, old)
                if time.monotonic() >= next_resync:
                    break
        finally:
            w.stop()
            self._watch = None
        if time.monotonic() >= next_resync:
            for obj in self.items():
                self._emit(SYNC, obj, obj)
            next_resync = time.monotonic() + self.resync_s
        return True, next_resync


def _short(exc: BaseException) -> str:
    from sllm_knative.kube.client import error_message

    return f"{type(exc).__name__}: {error_message(exc)}"[:300]
