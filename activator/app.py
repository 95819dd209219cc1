"""The activator's two HTTP apps, assembled in one place.

Public app (what clients and Knative's ingress reach): a plain ASGI app with one route, one
request through the layers:

    probe? internal path? -> size limit -> route (Host, else OpenAI `model`) -> count
      -> hold until an instance with room is ready (cold start: poke the autoscaler first)
      -> forward with the instance's breaker slot held (activator/upstream.py), the response
         head and first body chunk fetched before the response starts (a failure before it is
         retried once on another instance)
      -> a small body with a length goes out whole in one write; anything else is streamed
         chunk by chunk (no buffering of SSE); slot and connection released at the end

No Starlette router or middleware on this port: they cost more than everything above
together, and there is one route. Errors become responses in exactly one place
(`PublicApp.__call__` via `_send_error`).

Admin app (loopback only, never the public port): the autoscaler pushes services and their
ready instances, and reads stats and metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import posixpath
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from typing import Any
from urllib.parse import quote

import httpx
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from activator import errors, metrics
from activator.balancer import Instance, pick
from activator.migration import (
    DETACHED_HEADER,
    MigrationConfig,
    StreamTable,
    Tracked,
    migrate_instance,
    pick_destination,
    resume_whole,
    splice,
)
from activator.registry import Registry, Service
from activator.routing import OPENAI_PATHS, ServiceKey, model_from_body, service_from_host, service_from_model
from activator.upstream import Pool, UpstreamResponse, parse_origin
from sllm_knative.log import get_logger

_log = get_logger("activator")

# Not forwarded in either direction: connection-level fields, and the framing and addressing that
# the activator sets itself (Host is the instance's, lengths are recomputed). `date`/`server`
# of the instance are dropped as nginx does; the activator's server adds its own.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
                        b"trailer", b"transfer-encoding", b"upgrade", b"host", b"content-length", b"expect",
                        b"proxy-connection"})
_RESPONSE_DROP = HOP_BY_HOP | {b"date", b"server"}
SMALL_BODY = 1 << 20  # non-streaming bodies up to this size are relayed whole, with their length
# Paths of the instances' internal (migration) API: never forwarded from the public port.
INTERNAL_PREFIXES = ("/internal", "/admin")
# The activator names each generation it forwards (the instance uses the name as the generation
# id), so a migration can find a non-streaming one before its response exists. Never taken
# from a client.
GENERATION_ID = b"x-sllm-generation-id"
_DETACHED = DETACHED_HEADER.encode()


@dataclasses.dataclass(frozen=True)
class ActivatorConfig:
    autoscaler_url: str | None = None
    cold_start_timeout_s: float = 120.0
    max_body_bytes: int = 10 << 20
    max_held_per_service: int = 1000
    report_interval_s: float = 1.0
    default_namespace: str = "default"
    migration: MigrationConfig = dataclasses.field(default_factory=MigrationConfig)

    def __post_init__(self) -> None:
        if self.cold_start_timeout_s <= 0:
            raise ValueError(f"cold_start_timeout_s = {self.cold_start_timeout_s}, must be > 0")
        if self.max_body_bytes <= 0:
            raise ValueError(f"max_body_bytes = {self.max_body_bytes}, must be > 0")
        if self.max_held_per_service < 1:
            raise ValueError(f"max_held_per_service = {self.max_held_per_service}, must be >= 1")


# -- pure helpers of the request path ---------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RequestHead:
    """What the activator reads from a request's headers, and the ones it forwards."""

    host: str | None
    content_length: bytes | None
    chunked: bool
    probe: bool  # Knative's network probe (`K-Network-Probe`)
    probe_hash: bytes
    forward: list[tuple[bytes, bytes]]

    @property
    def has_body(self) -> bool:
        return self.chunked or (self.content_length is not None and self.content_length != b"0")


def split_headers(raw: Iterable[tuple[bytes, bytes]]) -> RequestHead:
    """One pass over the ASGI headers (names in lower case): routing fields out, hop-by-hop ones dropped."""
    host = length = None
    chunked = probe = False
    probe_hash = b""
    forward = []
    for name, value in raw:
        if name in HOP_BY_HOP:
            if name == b"host":
                host = value.decode("latin-1")
            elif name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                chunked = True
            continue
        if name == b"k-network-probe":
            probe = bool(value)
        elif name == b"k-network-hash":
            probe_hash = value
        elif name == GENERATION_ID:
            continue
        forward.append((name, value))
    return RequestHead(host, length, chunked, probe, probe_hash, forward)


def is_internal(path: str) -> bool:
    """Whether a (percent-decoded) path names an instance's internal API, dot segments and
    repeated slashes resolved as the instance's server might."""
    if "//" in path or "/." in path:
        path = posixpath.normpath("/" + path.lstrip("/"))
    return path.startswith(INTERNAL_PREFIXES)


def request_target(scope: Scope) -> bytes:
    """Path and query as the client sent them (not re-encoded)."""
    raw = scope.get("raw_path") or quote(scope["path"]).encode("ascii")
    query = scope.get("query_string")
    return raw + b"?" + query if query else raw


def response_headers(upstream: list[tuple[bytes, bytes]], instance: str) -> list[tuple[bytes, bytes]]:
    """The instance's response headers for the client, duplicates (set-cookie) kept, plus which instance answered."""
    out = [(n, v) for n, v in upstream if n not in _RESPONSE_DROP]
    out.append((b"x-sllm-instance", instance.encode("latin-1")))
    return out


@dataclasses.dataclass
class _Meters:
    """One service's metric children (looked up once, not per request)."""

    in_flight: Gauge
    proxy_seconds: Histogram
    queue_seconds: Histogram
    cold_starts: Counter
    retries: Counter
    requests: dict[int, Counter]

    @classmethod
    def of(cls, key: ServiceKey) -> _Meters:
        name = str(key)
        return cls(metrics.IN_FLIGHT.labels(name), metrics.PROXY_SECONDS.labels(name),
                   metrics.QUEUE_SECONDS.labels(name), metrics.COLD_STARTS.labels(name),
                   metrics.RETRIES.labels(name), {})

    def request_done(self, key: ServiceKey, status: int) -> None:
        counter = self.requests.get(status)
        if counter is None:
            counter = self.requests[status] = metrics.REQUESTS.labels(str(key), str(status))
        counter.inc()


class _ClientGone(Exception):
    """The client disconnected while its request body was being read."""


class Activator:
    """State shared by the two apps: the registry, the HTTP clients, the autoscaler link."""

    def __init__(self, config: ActivatorConfig) -> None:
        self.config = config
        self.registry = Registry()
        self.streams = StreamTable()  # streaming responses by generation id (what a migration can move)
        self.upstream = Pool(connect_timeout=10.0, write_timeout=30.0, read_timeout=None)  # the data path
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None, write=30.0),
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256))
        self._meters: dict[ServiceKey, _Meters] = {}
        self._reporter: asyncio.Task[None] | None = None

    # -- autoscaler link -------------------------------------------------------------------

    async def _demand(self, svc: Service) -> None:
        """Scale from zero reacts to the first request at once: tell the autoscaler now."""
        if not self.config.autoscaler_url:
            return
        body = {"namespace": svc.key.namespace, "name": svc.key.name, "in_flight": svc.window.in_flight}
        try:
            await self.client.post(f"{self.config.autoscaler_url}/v1/demand", json=body, timeout=5.0)
        except httpx.HTTPError as exc:
            _log.warning("could not reach the autoscaler", service=str(svc.key), error=str(exc))

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.report_interval_s)
            if not self.config.autoscaler_url:
                continue
            try:
                await self.client.post(f"{self.config.autoscaler_url}/v1/stats", json=self.stats(reset=True),
                                       timeout=5.0)
            except httpx.HTTPError as exc:
                _log.debug("stats report failed", error=str(exc))

    def stats(self, reset: bool = False) -> dict[str, Any]:
        """Per-service concurrency; reset=True closes the window (only the autoscaler report does)."""
        now = time.monotonic()
        out = []
        for svc in self.registry.services():
            r = svc.window.report(now, reset=reset)
            out.append({"namespace": svc.key.namespace, "name": svc.key.name,
                        "average_concurrency": r.average_concurrency, "requests": r.requests,
                        "in_flight": r.in_flight, "held": svc.held, "seconds": r.seconds,
                        "instances": [{"id": i.id, "outstanding": i.outstanding} for i in svc.instances]})
        return {"services": out}

    async def start(self) -> None:
        self._reporter = asyncio.create_task(self._report_loop())

    async def stop(self) -> None:
        if self._reporter:
            self._reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reporter
        await self.client.aclose()
        await self.upstream.aclose()

    # -- the request path ------------------------------------------------------------------

    def route(self, host: str | None, path: str, body: bytes) -> Service:
        known = self.registry.known
        key = service_from_host(host, known)
        if key is None and path in OPENAI_PATHS:
            key = service_from_model(model_from_body(body), known, self.config.default_namespace)
        if key is None:
            model = model_from_body(body) if path in OPENAI_PATHS else None
            what = f"model {model!r}" if model else f"host {host!r}"
            raise errors.NotFound(f"no service serves {what}")
        return self.registry.get(key)

    def meters(self, key: ServiceKey) -> _Meters:
        m = self._meters.get(key)
        if m is None:
            m = self._meters[key] = _Meters.of(key)
        return m

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """One public request, answered through `send`; ActivatorError only before the response starts."""
        head = split_headers(scope["headers"])
        if head.probe:  # Knative's network probe contract
            await _send_whole(send, 200, [(b"k-network-hash", head.probe_hash)], b"activator")
            return
        path = scope["path"]
        if is_internal(path):
            raise errors.NotFound(f"no route for {path}")
        body = await _read_body(receive, head, self.config.max_body_bytes) if head.has_body else b""
        svc = self.route(head.host, path, body)
        meters = self.meters(svc.key)
        svc.window.change(+1, time.monotonic())
        meters.in_flight.inc()
        try:
            await self._forward(scope, receive, send, head, body, svc, meters)
        finally:
            svc.window.change(-1, time.monotonic())
            meters.in_flight.dec()

    async def _acquire(self, svc: Service, exclude: frozenset[str], deadline: float, meters: _Meters) -> Instance:
        inst = pick(svc.instances, exclude)
        if inst is not None:  # warm: no wait
            meters.queue_seconds.observe(0.0)
            return inst
        if not svc.instances:
            meters.cold_starts.inc()
            await self._demand(svc)
        if svc.held >= self.config.max_held_per_service:
            raise errors.Overloaded(f"{svc.key}: {svc.held} requests already waiting")
        t0 = time.monotonic()
        svc.held += 1
        try:
            found = await self.registry.wait_for_instance(svc, deadline, exclude)
        finally:
            svc.held -= 1
        meters.queue_seconds.observe(time.monotonic() - t0)
        if found is None:
            raise errors.ColdStartTimeout(
                f"{svc.key}: no instance became ready within {self.config.cold_start_timeout_s:g}s",
                retry_after=max(1, int(self.config.cold_start_timeout_s // 10)))
        return found

    async def _forward(self, scope: Scope, receive: Receive, send: Send, head: RequestHead, body: bytes,
                       svc: Service, meters: _Meters) -> None:
        deadline = time.monotonic() + self.config.cold_start_timeout_s
        method = scope["method"].encode("ascii")
        target = request_target(scope)
        headers = [*head.forward, (b"knative-serving-namespace", svc.key.namespace.encode())]
        gen_id = None
        if method == b"POST" and scope["path"] in OPENAI_PATHS:
            gen_id = ("chatcmpl-" if scope["path"].endswith("/chat/completions") else "cmpl-") + uuid.uuid4().hex
            headers.append((GENERATION_ID, gen_id.encode()))
        tried: set[str] = set()
        for attempt in range(2):
            inst = await self._acquire(svc, frozenset(tried), deadline, meters)
            slot = contextlib.AsyncExitStack()
            await slot.enter_async_context(svc.breaker.slot(inst))
            tracked = None
            if gen_id is not None and inst.internal_url:  # migratable from the moment it is sent
                tracked = Tracked(gen_id, svc.key, inst, svc.breaker)
                self.streams.add(tracked)
                slot.callback(self.streams.remove, tracked)
            t0 = time.perf_counter()
            resp = None
            try:
                resp = await self.upstream.request(inst.url, method, target, headers, body)
                first = await anext(resp, b"")
            except httpx.TransportError as exc:
                if resp is not None:
                    resp.close()
                if tracked is not None and tracked.migrating and tracked.last_state is not None:
                    # The source died while a migration was moving this request: finish it from
                    # the last exported state instead of starting over.
                    await slot.aclose()
                    await self._finish_whole(send, svc, tracked, None)
                    return
                await slot.aclose()
                tried.add(inst.id)
                _log.warning("instance failed before the first byte", service=str(svc.key), instance=inst.id,
                             node=inst.node, attempt=attempt, error=f"{type(exc).__name__}: {exc}")
                await self.registry.drop_instance(svc.key, inst.id)
                if attempt == 0:
                    meters.retries.inc()
                continue
            except BaseException:
                if resp is not None:
                    resp.close()
                await slot.aclose()
                raise
            meters.proxy_seconds.observe(time.perf_counter() - t0)
            meters.request_done(svc.key, resp.status)
            if tracked is not None and resp.get(_DETACHED) is not None:
                # The instance let go of this non-streaming generation for a migration: finish it
                # on the destination and answer with that.
                try:
                    data = first + await resp.read()
                except httpx.TransportError:
                    data = b""
                finally:
                    resp.close()
                    await slot.aclose()
                await self._finish_whole(send, svc, tracked, _state_of(data))
                return
            await self._respond(scope, receive, send, svc, inst, slot, resp, first, tracked)
            return
        raise errors.UpstreamFailed(f"{svc.key}: instances failed before responding ({', '.join(sorted(tried))})")

    async def _respond(self, scope: Scope, receive: Receive, send: Send, svc: Service, inst: Instance,
                       slot: contextlib.AsyncExitStack, resp: UpstreamResponse, first: bytes,
                       tracked: Tracked | None = None) -> None:
        """Relay the response of `resp` (its first chunk in hand); release `resp` and `slot` however it ends."""
        out = response_headers(resp.headers, inst.id)
        gen_id = resp.get(b"x-request-id")
        if gen_id and resp.status == 200 and inst.internal_url and \
                (resp.get(b"content-type") or b"").startswith(b"text/event-stream"):
            if tracked is None or tracked.id != gen_id.decode("latin-1"):  # an instance that chose its own id
                tracked = Tracked(gen_id.decode("latin-1"), svc.key, inst, svc.breaker)
                self.streams.add(tracked)
            tracked.upstream.push_async_callback(slot.aclose)
            tracked.upstream.push_async_callback(resp.aclose)
            relay = self._relay_tracked(first, resp, tracked)
            try:
                await _stream(scope, receive, send, resp.status, out, relay)
            finally:
                await relay.aclose()
                self.streams.remove(tracked)
                await tracked.close()
            return
        try:
            length = resp.get(b"content-length")
            if length is not None and length.isdigit() and int(length) <= SMALL_BODY:
                # A small, complete body: one write with its length instead of a re-chunked stream.
                try:
                    data = first + await resp.read()
                except httpx.TransportError:
                    raise errors.UpstreamFailed(f"{svc.key}: instance {inst.id} broke off its response") from None
                resp.close()
                await slot.aclose()
                out.append((b"content-length", length if scope["method"] == "HEAD" else str(len(data)).encode()))
                await _send_whole(send, resp.status, out, data)
                return
            relay = _relay(first, resp)
            try:
                await _stream(scope, receive, send, resp.status, out, relay)
            finally:
                await relay.aclose()
        finally:
            resp.close()
            await slot.aclose()

    # -- migration -------------------------------------------------------------------------

    async def _finish_whole(self, send: Send, svc: Service, tracked: Tracked, state: dict[str, Any] | None) -> None:
        """Answer a non-streaming request whose generation left its instance (state None: the
        instance died mid-migration, use the last export) from the instance that finishes it."""
        self.streams.add(tracked)  # still movable while it runs on the destination
        try:
            resp = await resume_whole(self.client, tracked, state, self._resume_candidates, self.config.migration)
        finally:
            self.streams.remove(tracked)
            tracked.ended = True
        if resp is None:
            raise errors.UpstreamFailed(f"{svc.key}: the migrated request {tracked.id} could not be resumed")
        out = response_headers([(k.lower(), v) for k, v in resp.headers.raw], tracked.instance.id)
        await _send_whole(send, resp.status_code, out, resp.content)

    async def _relay_tracked(self, first: bytes, rest: AsyncIterator[bytes],
                             tracked: Tracked) -> AsyncGenerator[bytes, None]:
        """`_relay` for a stream a migration may switch: chunks pass through (and are kept, unparsed)
        until a migration starts, then `splice` takes over frame by frame."""
        broken = False
        held = b""  # a chunk received after the migration began: splice must see it (it may be the detach)
        if first:
            tracked.keep(first)
            yield first
        try:
            while not tracked.migrating:
                chunk = await anext(rest, None)
                if chunk is None:
                    if not tracked.migrating:
                        return
                    break
                if tracked.migrating:
                    held = chunk
                    break
                tracked.keep(chunk)
                yield chunk
        except httpx.HTTPError as exc:
            if not tracked.migrating:
                _log.warning("upstream stream broke after the first byte", error=f"{type(exc).__name__}: {exc}")
                return
            broken = True
        async for out in splice(self.client, tracked, _prepend(held, rest), self._resume_candidates,
                                self.config.migration, broken=broken):
            yield out

    def _resume_candidates(self, tracked: Tracked, tried: frozenset[str]) -> list[Instance]:
        """Where a detached (or orphaned) generation may resume: its destination first, then any other."""
        out = [tracked.destination] if tracked.destination and tracked.destination.id not in tried else []
        with contextlib.suppress(KeyError):
            for inst in self.registry.get(tracked.key).instances:
                if inst.id not in tried and inst.internal_url and inst not in out and inst.id != tracked.instance.id:
                    out.append(inst)
        return out

    async def drain(self, instance_id: str) -> list[dict[str, Any]]:
        """Take an instance out of rotation in every service and migrate its streams (where possible)."""
        results: list[dict[str, Any]] = []
        for svc in self.registry.services():
            if any(i.id == instance_id for i in svc.instances):
                await self.registry.drop_instance(svc.key, instance_id)
            if self.streams.on_instance(svc.key, instance_id):
                try:
                    results += await self.migrate(svc.key, instance_id, None)
                except errors.NoDestination as exc:
                    _log.warning("drain: nowhere to migrate", instance=instance_id, error=exc.message)
        return results

    async def migrate(self, key: ServiceKey, source: str, destination: str | None) -> list[dict[str, Any]]:
        """Move every stream running on `source` (in parallel) to `destination` (None: the least loaded)."""
        svc = self.registry.get(key)
        streams = self.streams.on_instance(key, source)

        def choose(tried: frozenset[str]) -> Instance | None:
            if destination is not None:
                named = [i for i in svc.instances if i.id == destination and i.id not in tried]
                return named[0] if named and named[0].internal_url else None
            return pick_destination(svc.instances, source, tried)

        if streams and choose(frozenset()) is None:
            raise errors.NoDestination(f"{key}: no ready instance to migrate {source}'s generations to")
        results = await migrate_instance(self.client, streams, choose, self.config.migration)
        _log.info("migrated", service=str(key), instance=source, generations=len(results),
                  outcomes=",".join(r.outcome for r in results))
        return [r.to_json() for r in results]


async def _relay(first: bytes, rest: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
    """Pass the upstream body through chunk by chunk (a break after the first byte ends the stream)."""
    if first:
        yield first
    try:
        async for chunk in rest:
            yield chunk
    except httpx.HTTPError as exc:
        _log.warning("upstream stream broke after the first byte", error=f"{type(exc).__name__}: {exc}")


async def _prepend(chunk: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if chunk:
        yield chunk
    async for more in rest:
        yield more


async def _read_body(receive: Receive, head: RequestHead, limit: int) -> bytes:
    declared = head.content_length
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise errors.TooLarge(f"request body of {declared.decode()} bytes exceeds the {limit}-byte limit")
    parts, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise errors.TooLarge(f"request body exceeds the {limit}-byte limit")
        parts.append(chunk)
        if not message.get("more_body", False):
            return parts[0] if len(parts) == 1 else b"".join(parts)


def _state_of(body: bytes) -> dict[str, Any] | None:
    """The generation state an instance put in its answer to a detached non-streaming request."""
    with contextlib.suppress(ValueError):
        doc = json.loads(body)
        state = doc.get("state") if isinstance(doc, dict) else None
        return state if isinstance(state, dict) else None
    return None


async def _send_whole(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    if not any(n == b"content-length" for n, _ in headers):
        headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _stream(scope: Scope, receive: Receive, send: Send, status: int, headers: list[tuple[bytes, bytes]],
                  chunks: AsyncIterator[bytes]) -> None:
    """Chunked response; Starlette's StreamingResponse stops it if the client disconnects."""
    response = StreamingResponse(chunks, status_code=status)
    response.raw_headers = headers
    await response(scope, receive, send)


async def _send_error(send: Send, exc: errors.ActivatorError) -> None:
    await _send_whole(send, exc.status, errors.error_headers(exc), errors.error_body(exc))


class PublicApp:
    """The public port: every method and path goes to `Activator.handle`; lifespan starts and stops it."""

    def __init__(self, act: Activator) -> None:
        self.act = act

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            try:
                await self.act.handle(scope, receive, send)
            except errors.ActivatorError as exc:
                if exc.status >= 500:
                    _log.warning("request failed", status=exc.status, error=exc.message)
                await _send_error(send, exc)
            except _ClientGone:
                pass
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        else:
            raise RuntimeError(f"the activator's public port serves HTTP, not {scope['type']!r}")

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message: Message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.act.start()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": f"{type(exc).__name__}: {exc}"})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.act.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return


def build_public_app(act: Activator) -> PublicApp:
    return PublicApp(act)


def build_admin_app(act: Activator) -> Starlette:
    async def put_service(request: Request) -> Response:
        key = ServiceKey(request.path_params["namespace"], request.path_params["name"])
        try:
            doc = await request.json()
            cc = int(doc.get("container_concurrency", 0))
            endpoints = doc.get("instances", [])
            if cc < 0 or not isinstance(endpoints, list) or not all(
                    isinstance(e, dict) and isinstance(e.get("id"), str) and isinstance(e.get("url"), str)
                    for e in endpoints):
                raise ValueError("instances must be a list of {id, url[, node, capacity]}")
            for e in endpoints:
                parse_origin(e["url"])  # the data path speaks plain HTTP to instances
        except (ValueError, TypeError, httpx.UnsupportedProtocol) as exc:
            return JSONResponse({"error": f"bad service update for {key}: {exc}"}, status_code=400)
        act.registry.set_service(key, cc)
        await act.registry.set_endpoints(key, endpoints)
        return JSONResponse({"service": str(key), "instances": len(endpoints)})

    async def delete_service(request: Request) -> Response:
        act.registry.remove_service(ServiceKey(request.path_params["namespace"], request.path_params["name"]))
        return Response(status_code=204)

    async def get_stats(request: Request) -> Response:
        return JSONResponse(act.stats())

    async def migrate(request: Request) -> Response:
        try:
            doc = await request.json()
            if not isinstance(doc, dict):
                raise ValueError("the body must be a JSON object")
            for field in ("namespace", "name", "source"):
                if not isinstance(doc.get(field), str) or not doc[field]:
                    raise ValueError(f"'{field}' must be a non-empty string")
            dest = doc.get("destination")
            if dest is not None and not isinstance(dest, str):
                raise ValueError("'destination' must be a string or null")
            key = ServiceKey(doc["namespace"], doc["name"])
            if key not in act.registry.known:
                return JSONResponse({"error": f"no service {key}"}, status_code=404)
        except ValueError as exc:
            return JSONResponse({"error": f"bad migrate request: {exc}"}, status_code=400)
        try:
            results = await act.migrate(key, doc["source"], dest)
        except errors.ActivatorError as exc:
            return JSONResponse({"error": exc.message}, status_code=exc.status)
        return JSONResponse({"service": str(key), "source": doc["source"], "generations": results})

    async def drain(request: Request) -> Response:
        """An instance is going away (SIGTERM): out of rotation, its generations migrated elsewhere."""
        try:
            doc = await request.json()
            if not isinstance(doc, dict) or not isinstance(doc.get("instance"), str) or not doc["instance"]:
                raise ValueError("the body must be {\"instance\": \"<id>\"}")
        except ValueError as exc:
            return JSONResponse({"error": f"bad drain request: {exc}"}, status_code=400)
        results = await act.drain(doc["instance"])
        return JSONResponse({"instance": doc["instance"], "generations": results})

    async def get_metrics(request: Request) -> Response:
        return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[
        Route("/internal/services/{namespace}/{name}", put_service, methods=["PUT"]),
        Route("/internal/services/{namespace}/{name}", delete_service, methods=["DELETE"]),
        Route("/internal/stats", get_stats, methods=["GET"]),
        Route("/internal/migrate", migrate, methods=["POST"]),
        Route("/internal/drain", drain, methods=["POST"]),
        Route("/metrics", get_metrics, methods=["GET"]),
    ])
