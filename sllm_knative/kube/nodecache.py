"""A node's NodeCache, kept equal to its loader's state: the one writer of that object.

Each node runs one loader (a DaemonSet), so each NodeCache has exactly one writer. The
`NodeCachePublisher` runs inside the loader's event loop and makes the cluster match the
loader's truth, level-triggered:

- the object is named after the node, `spec.nodeName` is the node, and it has an owner
  reference to the `v1 Node` (uid read from the API), so the garbage collector deletes it with
  the Node; a NodeCache is never created for a Node that does not exist;
- `status` is written through the status subresource with the last resourceVersion seen; a
  409 is answered by reading the object again and deciding again;
- it writes when the loader's state changed (`wait_changed`, at most one write per
  `min_interval_s`), every `resync_s` (so `observedTime` says the loader is alive), and when
  the object differs from what this loader last wrote: someone else's status is rewritten from
  the loader's truth, someone else's owner reference or spec is put back, a deleted object is
  created again. An informer (list + watch, field selector `metadata.name=<node>`) brings
  those changes within a second;
- a failure (API server unreachable, RBAC, a Node not registered yet) is logged with `node=`
  and retried with exponential backoff up to `resync_s`; it never reaches the caller's loop;
- `spec.warm` is the other direction: the autoscaler asks the node's loader to start moving a
  checkpoint towards DRAM as soon as it has placed an instance there, before the pod exists
  (`with_warm` writes the list, `warm_requests` reads it). Each request is handed to `on_warm`
  once; requests older than `WARM_TTL_S` are ignored and dropped from the list.

The decisions are pure functions (`plan`, `status_diff`, `checkpoint_changes`, `owner_reference`),
table-tested without a cluster; the class only does the I/O, from threads (the official client
is synchronous), with a timeout on every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Container, Mapping
from dataclasses import dataclass
from typing import Any

from sllm_knative.config.crds import API_VERSION
from sllm_knative.config.nodecache import KIND, NodeCache, node_cache_status
from sllm_knative.kube.client import NODECACHES, Kube, error_message, is_status
from sllm_knative.kube.times import parse_rfc3339, rfc3339
from sllm_knative.kube.workqueue import backoff_s
from sllm_knative.log import get_logger

_log = get_logger("sllm_knative.kube.nodecache")

#: Status fields that change on every write without the node changing: not a reason to write.
VOLATILE = ("observedTime", "inventoryVersion")
#: Outcomes passed to `on_outcome` (the loader counts them in a Prometheus counter).
CREATED, WRITTEN, OVERWRITTEN, CONFLICT, NODE_MISSING, ERROR = (
    "created", "written", "overwritten", "conflict", "node_missing", "error")
CONFLICT_RETRIES = 5
WARM_TTL_S = 600.0  # a warm request older than this is stale (the pod came and went, or never did)
WARM_KEPT = 16  # requests kept in spec.warm at most


class NodeMissing(RuntimeError):
    """The Node the NodeCache would belong to does not exist (not registered yet, or deleted)."""


# -- pure decisions ----------------------------------------------------------------------------


def owner_reference(node: str, uid: str) -> dict[str, Any]:
    """The NodeCache's owner: its Node, so the garbage collector deletes it with the Node."""
    return {"apiVersion": "v1", "kind": "Node", "name": node, "uid": uid}


def new_object(node: str, uid: str) -> dict[str, Any]:
    """The NodeCache to create for `node` (status is written separately: create ignores it)."""
    return {"apiVersion": API_VERSION, "kind": KIND,
            "metadata": {"name": node, "labels": {"app.kubernetes.io/managed-by": "sllm-knative-loader"},
                         "ownerReferences": [owner_reference(node, uid)]},
            "spec": {"nodeName": node}}


def metadata_drift(obj: Mapping[str, Any], node: str, uid: str) -> list[str]:
    """What of the object's metadata and spec is not as this loader sets it."""
    out = []
    owners = (obj.get("metadata") or {}).get("ownerReferences") or []
    if not any(o.get("kind") == "Node" and o.get("name") == node and o.get("uid") == uid for o in owners):
        out.append("metadata.ownerReferences")
    if (obj.get("spec") or {}).get("nodeName") != node:
        out.append("spec.nodeName")
    return out


def status_diff(a: Any, b: Any, path: str = "status", ignore: tuple[str, ...] = ()) -> list[str]:
    """The paths where `a` and `b` differ (`status.checkpoints[0].state`); top-level keys in
    `ignore` are skipped. Numbers compare by value (the API server returns 8e9 as 8000000000)."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            if k in ignore:
                continue
            if k not in a or k not in b:
                out.append(f"{path}.{k}")
            else:
                out += status_diff(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path} (length {len(a)} -> {len(b)})"]
        return [p for i, (x, y) in enumerate(zip(a, b, strict=True)) for p in status_diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]


@dataclass(frozen=True)
class Plan:
    """What one sync does. `action`: "create" (the object is missing), "fix" (put the owner
    reference and spec back, then plan again), "write" (the status), or "none". `reason`
    says why (missing, metadata, takeover, foreign, changed, resync); `differs` lists the paths."""

    action: str
    reason: str = ""
    differs: tuple[str, ...] = ()


def plan(observed: Mapping[str, Any] | None, node: str, uid: str, last_written: Mapping[str, Any] | None,
         desired: Mapping[str, Any], resync_due: bool) -> Plan:
    """Decide one sync from the object as last seen (`observed`, None when it does not exist),
    the status this loader last wrote (None before its first write) and the status it wants."""
    if observed is None:
        return Plan("create", "missing")
    drift = metadata_drift(observed, node, uid)
    if drift:
        return Plan("fix", "metadata", tuple(drift))
    current = observed.get("status") or {}
    if last_written is None:
        return Plan("write", "takeover", tuple(status_diff(current, desired, ignore=VOLATILE)))
    foreign = status_diff(last_written, current)
    if foreign:
        return Plan("write", "foreign", tuple(foreign))
    changed = status_diff(current, desired, ignore=VOLATILE)
    if changed:
        return Plan("write", "changed", tuple(changed))
    if resync_due:
        return Plan("write", "resync")
    return Plan("none")


def _stamp_seconds(text: Any) -> float | None:
    when = parse_rfc3339(text)
    return None if when is None else when.timestamp()


def warm_requests(spec: Mapping[str, Any] | None, handled: Container[str], now: float,
                  ttl_s: float = WARM_TTL_S) -> list[tuple[str, str, str]]:
    """(model, tier, key) of each `spec.warm` request not handled yet and asked within `ttl_s` (pure).
    The key (model and time of the request) names it in `handled`."""
    out = []
    for entry in (spec or {}).get("warm") or []:
        model, asked = entry.get("model"), _stamp_seconds(entry.get("requestedAt"))
        key = f"{model}@{entry.get('requestedAt')}"
        if model and asked is not None and now - asked <= ttl_s and key not in handled:
            out.append((str(model), str(entry.get("tier") or "dram"), key))
    return out


def with_warm(spec: Mapping[str, Any] | None, model: str, tier: str, now: float, ttl_s: float = WARM_TTL_S,
              keep: int = WARM_KEPT) -> list[dict[str, Any]]:
    """`spec.warm` once `model` is asked for at `now` (pure): the other requests still within
    `ttl_s`, oldest first, then this one; at most `keep`."""
    others = [e for e in (spec or {}).get("warm") or []
              if e.get("model") != model and (t := _stamp_seconds(e.get("requestedAt"))) is not None
              and now - t <= ttl_s]
    stamp = rfc3339(now, micro=True)
    return [*others, {"model": model, "tier": tier, "requestedAt": stamp}][-keep:]


def checkpoint_changes(before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(checkpoint, old state, new state) for each checkpoint whose state changed between two
    statuses; a checkpoint that appears has old state "", one that goes has new state ""."""
    def states(status: Mapping[str, Any] | None) -> dict[str, str]:
        return {c["model"]: c.get("state", "Downloaded") for c in (status or {}).get("checkpoints") or []}

    old, new = states(before), states(after)
    return [(m, old.get(m, ""), new.get(m, "")) for m in sorted(set(old) | set(new)) if old.get(m) != new.get(m)]


# -- the publisher ----------------------------------------------------------------------------


def _rv(obj: Mapping[str, Any] | None) -> str:
    return str(((obj or {}).get("metadata") or {}).get("resourceVersion") or "")


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {error_message(exc)}"[:400]


class NodeCachePublisher:
    """Keeps the NodeCache of `node` equal to `snapshot()`; see the module docstring.

    `snapshot()` returns the loader's NodeCache now (called on the event loop); `wait_changed(v)`
    returns once the loader's state version is newer than `v`, with that version; `on_outcome`
    is called with each outcome (CREATED, WRITTEN, ...) for metrics; `on_warm(model, tier)` starts
    a fill the autoscaler asked for in `spec.warm` (on the loop, without waiting for it).
    `watch=False` leaves out the informer (foreign writes are then found at the resync, and warm
    requests are not seen).
    """

    def __init__(self, kube: Kube, node: str, snapshot: Callable[[], NodeCache],
                 wait_changed: Callable[[int], Awaitable[int]], *, resync_s: float = 30.0,
                 min_interval_s: float = 0.5, request_timeout_s: float = 10.0, watch: bool = True,
                 on_outcome: Callable[[str], None] | None = None,
                 on_warm: Callable[[str, str], Awaitable[Any]] | None = None) -> None:
        self.kube = kube
        self.node = node
        self._snapshot = snapshot
        self._wait_changed = wait_changed
        self.resync_s = resync_s
        self.min_interval_s = min_interval_s
        self._timeout = (min(5.0, request_timeout_s), request_timeout_s)  # (connect, read) per request
        self._watch = watch
        self._on_outcome = on_outcome or (lambda outcome: None)
        self._on_warm = on_warm
        self._warmed: deque[str] = deque(maxlen=4 * WARM_KEPT)  # keys of the warm requests handed on
        self._warming: set[asyncio.Task[Any]] = set()
        self._log = get_logger("sllm_knative.kube.nodecache", node=node)
        self._observed: dict[str, Any] | None = None  # the object as last seen (None: it does not exist)
        self._known = False  # whether _observed reflects the server (False: read it first)
        self._uid = ""  # the Node's
        self._last_written: dict[str, Any] | None = None  # the status as the server stored our last write
        self._mine: deque[str] = deque(maxlen=32)  # resourceVersions of our own writes
        self._next_resync = 0.0
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._informer: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.writes = 0
        self.failures = 0
        self.last_error = ""

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> NodeCachePublisher:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name=f"nodecache {self.node}")
        if self._watch:
            from sllm_knative.kube.informer import Informer

            self._informer = Informer(f"nodecache-{self.node}", self.kube.custom.list_cluster_custom_object,
                                      NODECACHES.group, NODECACHES.version, NODECACHES.plural,
                                      resync_s=self.resync_s, watch_timeout_s=60,
                                      field_selector=f"metadata.name={self.node}")
            self._informer.add_handler(self._from_informer)
            self._informer.start()
        return self

    async def stop(self) -> None:
        if self._informer is not None:
            # Informer.stop joins its thread (up to 5 s while a watch request is open): not on the loop.
            threading.Thread(target=self._informer.stop, name=f"stop-informer-{self.node}", daemon=True).start()
            self._informer = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # -- events on the object ------------------------------------------------------------------

    def _from_informer(self, kind: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        """On the informer's thread: hand the event to the loop."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop is closing
                loop.call_soon_threadsafe(self._on_event, kind, obj)

    def _on_event(self, kind: str, obj: dict[str, Any]) -> None:
        if kind != "DELETED":
            self._warm(obj)
        if kind == "DELETED":
            uid = (obj.get("metadata") or {}).get("uid")
            seen = ((self._observed or {}).get("metadata") or {}).get("uid")
            if self._observed is not None and uid != seen:
                return  # an older incarnation: the one we know is already newer
            self._log.warning("NodeCache deleted; creating it again")
            self._observed, self._known = None, True
        elif _rv(obj) in self._mine:
            return  # our own write coming back
        else:
            self._observed, self._known = obj, True
        self._kick.set()

    def _warm(self, obj: Mapping[str, Any]) -> None:
        """Start the fills `spec.warm` asks for that were not started yet."""
        if self._on_warm is None:
            return
        for model, tier, key in warm_requests(obj.get("spec"), self._warmed, time.time()):
            self._warmed.append(key)
            self._log.info("warming: the autoscaler placed an instance here", checkpoint=model, tier=tier)
            task = asyncio.ensure_future(self._on_warm(model, tier))
            self._warming.add(task)
            task.add_done_callback(self._warm_done)

    def _warm_done(self, task: asyncio.Task[Any]) -> None:
        self._warming.discard(task)
        exc = None if task.cancelled() else task.exception()
        if exc is not None:  # the pod's own lease will try again, and report
            self._log.warning("warming failed", error=_short(exc))

    # -- the loop ------------------------------------------------------------------------------

    async def _run(self) -> None:
        version = -1
        failures = 0
        changed: asyncio.Future[int] | None = None
        try:
            while True:
                started = time.monotonic()
                try:
                    await self.sync()
                except Exception as exc:
                    failures += 1
                    self.failures += 1
                    self.last_error = _short(exc)
                    self._on_outcome(NODE_MISSING if isinstance(exc, NodeMissing) else ERROR)
                    delay = backoff_s(failures, 0.5, self.resync_s)
                    self._log.warning("NodeCache not published; retrying", error=self.last_error, attempt=failures,
                                      retry_in_s=round(delay, 2))
                    self._known = False  # read the object again before deciding again
                    await asyncio.sleep(delay)
                    continue
                if failures:
                    self._log.info("NodeCache published again", after_failures=failures)
                    failures = 0
                # Wait for a change of the loader's state, an event on the object, or the resync.
                if changed is None or changed.done():
                    if changed is not None:
                        version = changed.result()
                    changed = asyncio.ensure_future(self._wait_changed(version))
                kick = asyncio.ensure_future(self._kick.wait())
                waiters: set[asyncio.Future[Any]] = {changed, kick}
                try:
                    await asyncio.wait(waiters, timeout=max(0.0, self._next_resync - time.monotonic()),
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    kick.cancel()
                self._kick.clear()
                # At most one pass per min_interval_s, however often the state changes.
                await asyncio.sleep(max(0.0, started + self.min_interval_s - time.monotonic()))
        finally:
            if changed is not None:
                changed.cancel()

    async def sync(self) -> Plan:
        """One level-triggered pass: read what is unknown, decide, act; a 409 is answered by
        reading again and deciding again. Returns the plan carried out."""
        for _attempt in range(CONFLICT_RETRIES):
            resync_due = time.monotonic() >= self._next_resync
            if not self._uid or resync_due:  # a Node deleted and registered again has a new uid
                self._uid = await self._node_uid()
            if not self._known:
                self._observed = await self._get()
                self._known = True
            desired = node_cache_status(self._snapshot())
            p = plan(self._observed, self.node, self._uid, self._last_written, desired, resync_due)
            try:
                await self._apply(p, desired)
            except Exception as exc:
                if is_status(exc, 409):  # written in between, or created already: read it again
                    self._on_outcome(CONFLICT)
                    self._log.info("NodeCache conflict; reading it again", action=p.action, reason=p.reason)
                    self._known = False
                    continue
                if is_status(exc, 404) and p.action != "create":  # deleted in between: create it
                    self._observed, self._known = None, True
                    continue
                raise
            if p.action != "fix":
                return p
        raise RuntimeError(f"NodeCache {self.node}: still conflicting after {CONFLICT_RETRIES} attempts")

    async def _apply(self, p: Plan, desired: dict[str, Any]) -> None:
        if p.action == "create":
            self._uid = await self._node_uid()  # the owner must exist now
            obj = await self._call(self.kube.custom.create_cluster_custom_object, NODECACHES.group,
                                   NODECACHES.version, NODECACHES.plural, new_object(self.node, self._uid))
            self._log.info("NodeCache created", owner_uid=self._uid)
            self._on_outcome(CREATED)
            self._seen_own(obj)
            await self._write_status(p, desired)
        elif p.action == "fix":
            assert self._observed is not None
            body = dict(self._observed)
            meta = dict(body.get("metadata") or {})
            others = [o for o in meta.get("ownerReferences") or [] if o.get("kind") != "Node"]
            meta["ownerReferences"] = [*others, owner_reference(self.node, self._uid)]
            body["metadata"] = meta
            body["spec"] = {**(body.get("spec") or {}), "nodeName": self.node}
            self._log.warning("NodeCache owner or spec changed by someone else; putting it back",
                              fields=",".join(p.differs))
            self._seen_own(await self._call(self.kube.custom.replace_cluster_custom_object, NODECACHES.group,
                                            NODECACHES.version, NODECACHES.plural, self.node, body))
        elif p.action == "write":
            await self._write_status(p, desired)

    async def _write_status(self, p: Plan, desired: dict[str, Any]) -> None:
        body = {"apiVersion": API_VERSION, "kind": KIND,
                "metadata": {"name": self.node, "resourceVersion": _rv(self._observed)},
                "spec": {"nodeName": self.node}, "status": desired}
        obj = await self._call(self.kube.custom.replace_cluster_custom_object_status, NODECACHES.group,
                               NODECACHES.version, NODECACHES.plural, self.node, body)
        before, self._last_written = self._last_written, obj.get("status") or {}
        self._seen_own(obj)
        self._next_resync = time.monotonic() + self.resync_s
        self.writes += 1
        if p.reason == "foreign":
            self._on_outcome(OVERWRITTEN)
            self._log.warning("NodeCache status was written by someone else; rewritten from the loader's state",
                              fields=",".join(p.differs[:12]))
        else:
            self._on_outcome(WRITTEN)
        for model, old, new in checkpoint_changes(before, self._last_written):
            self._log.info("checkpoint state published", checkpoint=model, state=new or "gone", was=old or None)

    def _seen_own(self, obj: dict[str, Any]) -> None:
        self._observed, self._known = obj, True
        self._mine.append(_rv(obj))

    # -- requests, from threads, each with a timeout --------------------------------------------

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args, _request_timeout=self._timeout)

    async def _get(self) -> dict[str, Any] | None:
        try:
            obj: dict[str, Any] = await self._call(self.kube.custom.get_cluster_custom_object, NODECACHES.group,
                                                   NODECACHES.version, NODECACHES.plural, self.node)
        except Exception as exc:
            if is_status(exc, 404):
                return None
            raise
        return obj

    async def _node_uid(self) -> str:
        try:
            node = await self._call(self.kube.core.read_node, self.node)
        except Exception as exc:
            if is_status(exc, 404):
                raise NodeMissing(f"Node {self.node} does not exist: a NodeCache is only published for an existing "
                                  f"Node (its owner, which garbage-collects it)") from exc
            raise
        return str(node.metadata.uid)
