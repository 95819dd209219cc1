"""The innermost layer: a capacity slot on an instance with room (held until an instance is
ready, activator/capacity.py), the request forwarded there with the instance's response head and
first body chunk fetched before the client's response starts, then the response relayed.

A failure before the first byte is retried once on another instance (the failed one leaves
rotation until the autoscaler says otherwise), unless a migration was moving that request: then
it is finished from the last exported state. A small body with a length goes out whole in one
write; anything else is streamed chunk by chunk (no buffering of SSE). A non-streaming request
that its instance let go of for a migration (`x-sllm-detached`) is finished on the destination.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from functools import partial

import httpx

from activator import errors
from activator.capacity import Capacity, Slot
from activator.handlers import Exchange, Routed
from activator.handoff import Migrations
from activator.migration import Tracked, state_of
from activator.registry import Registry, RoutedService
from activator.request import GENERATION_ID, request_target, response_headers
from activator.respond import relay, send_stream, send_whole
from activator.upstream import Pool, UpstreamResponse
from sllm_knative.api.instance import DETACHED_HEADER
from sllm_knative.log import get_logger

_log = get_logger("activator")
SMALL_BODY = 1 << 20  # non-streaming bodies up to this size are relayed whole, with their length
_DETACHED = DETACHED_HEADER.encode()

After = Callable[[], Awaitable[None]]  # what an attempt leaves to do once its slot is given back


class ProxyHandler:
    def __init__(self, capacity: Capacity, registry: Registry, upstream: Pool, migrations: Migrations,
                 cold_start_timeout_s: float, namespace_header: bool = True) -> None:
        self.capacity = capacity
        # Local mode tells the instance its namespace (`Knative-Serving-Namespace`); in Kubernetes
        # mode the revision headers never reach the pod (Knative's contract, activator/kube/).
        self.namespace_header = namespace_header
        self.registry = registry
        self.upstream = upstream
        self.migrations = migrations
        self.cold_start_timeout_s = cold_start_timeout_s

    async def __call__(self, r: Routed) -> None:
        ex, svc = r.ex, r.svc
        deadline = time.monotonic() + (svc.hold_timeout_s or self.cold_start_timeout_s)
        headers = list(ex.head.forward)
        if self.namespace_header:
            headers.append((b"knative-serving-namespace", svc.key.namespace.encode()))
        if ex.gen_id is not None:
            headers.append((GENERATION_ID, ex.gen_id.encode()))
        tried: set[str] = set()
        for attempt in range(2):
            if await self._attempt(r, headers, deadline, tried, attempt):
                return
        raise errors.UpstreamFailed(f"{svc.key}: instances failed before responding ({', '.join(sorted(tried))})")

    async def _attempt(self, r: Routed, headers: list[tuple[bytes, bytes]], deadline: float, tried: set[str],
                       attempt: int) -> bool:
        """One instance: True once the client is answered, False when it failed before the first byte."""
        ex, svc, meters = r.ex, r.svc, r.meters
        after: After | None = None
        retry = False
        async with self.capacity.slot(svc, frozenset(tried), deadline, meters) as slot:
            with self.migrations.track(ex.gen_id, svc, slot.instance) as tracked:
                inst = slot.instance
                t0 = time.perf_counter()
                resp: UpstreamResponse | None = None
                try:
                    resp = await self.upstream.request(inst.url, ex.scope["method"].encode("ascii"),
                                                       request_target(ex.scope), headers, ex.body)
                    first = await anext(resp, b"")
                except httpx.TransportError as exc:
                    if resp is not None:
                        resp.close()
                    if tracked is not None and tracked.migrating and tracked.last_state is not None:
                        # The source died while a migration was moving this request: finish it from
                        # the last exported state instead of starting over.
                        after = partial(self.migrations.finish_whole, ex.send, svc, tracked, None)
                    else:
                        after, retry = partial(self._failed, svc, inst.id, inst.node, tried, attempt, r, exc), True
                except BaseException:
                    if resp is not None:
                        resp.close()
                    raise
                else:
                    meters.proxy_seconds.observe(time.perf_counter() - t0)
                    meters.request_done(svc.key, resp.status)
                    if tracked is not None and resp.get(_DETACHED) is not None:
                        # The instance let go of this non-streaming generation for a migration: finish
                        # it on the destination and answer with that.
                        try:
                            data = first + await resp.read()
                        except httpx.TransportError:
                            data = b""
                        finally:
                            resp.close()
                        after = partial(self.migrations.finish_whole, ex.send, svc, tracked, state_of(data))
                    else:
                        after = await self._respond(ex, svc, slot, resp, first, tracked)
        if after is not None:
            await after()
        return not retry

    async def _failed(self, svc: RoutedService, inst_id: str, node: str, tried: set[str], attempt: int, r: Routed,
                      exc: httpx.TransportError) -> None:
        tried.add(inst_id)
        _log.warning("instance failed before the first byte", service=str(svc.key), instance=inst_id,
                     node=node, attempt=attempt, error=f"{type(exc).__name__}: {exc}")
        await self.registry.drop_instance(svc.key, inst_id)
        if attempt == 0:
            r.meters.retries.inc()

    async def _respond(self, ex: Exchange, svc: RoutedService, slot: Slot, resp: UpstreamResponse, first: bytes,
                       tracked: Tracked | None) -> After | None:
        """Relay `resp` (its first chunk in hand) while the slot is held, or read a small body and
        leave its one write for after the slot is given back; `resp` is released either way."""
        inst = slot.instance
        out = response_headers(resp.headers, inst.id)
        gen_id = resp.get(GENERATION_ID)
        if gen_id and resp.status == 200 and inst.internal_url and \
                (resp.get(b"content-type") or b"").startswith(b"text/event-stream"):
            # A stream a migration may move: the slot and the response go with it (a migration
            # swaps them for the destination's).
            tracked = self.migrations.track_stream(gen_id.decode("latin-1"), svc, inst, tracked)
            tracked.upstream.push_async_callback(slot.hand_over())
            tracked.upstream.push_async_callback(resp.aclose)
            stream = self.migrations.relay(first, resp, tracked)
            try:
                await send_stream(ex.scope, ex.receive, ex.send, resp.status, out, stream)
            finally:
                await stream.aclose()
                self.migrations.streams.remove(tracked)
                await tracked.close()
            return None
        try:
            length = resp.get(b"content-length")
            if length is not None and length.isdigit() and int(length) <= SMALL_BODY:
                # A small, complete body: one write with its length instead of a re-chunked stream.
                try:
                    data = first + await resp.read()
                except httpx.TransportError:
                    raise errors.UpstreamFailed(f"{svc.key}: instance {inst.id} broke off its response") from None
                out.append((b"content-length", length if ex.scope["method"] == "HEAD" else str(len(data)).encode()))
                return partial(send_whole, ex.send, resp.status, out, data)
            stream = relay(first, resp, events=(resp.get(b"content-type") or b"").startswith(b"text/event-stream"))
            try:
                await send_stream(ex.scope, ex.receive, ex.send, resp.status, out, stream)
            finally:
                await stream.aclose()
            return None
        finally:
            resp.close()
