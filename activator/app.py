"""The activator's two HTTP apps, assembled in one place.

Public app (what clients and Knative's ingress reach), one request through the layers:

    size limit -> route (Host, else OpenAI `model`) -> count (concurrency window)
      -> hold until an instance with room is ready (cold start: poke the autoscaler first)
      -> forward with the instance's breaker slot held, first body chunk fetched before the
         response starts (a failure before it is retried once on another instance)
      -> stream the rest chunk by chunk (no buffering of SSE); slot released at the end

Admin app (loopback only, never the public port): the autoscaler pushes services and their
ready instances, and reads stats and metrics. Errors become responses in exactly one place
(`_error_response`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from activator import errors, metrics
from activator.balancer import Instance
from activator.migration import (
    MigrationConfig,
    StreamTable,
    Tracked,
    migrate_instance,
    pick_destination,
    splice,
)
from activator.registry import Registry, Service
from activator.routing import OPENAI_PATHS, ServiceKey, model_from_body, service_from_host, service_from_model
from sllm_knative.log import get_logger

_log = get_logger("activator")

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "transfer-encoding", "upgrade", "host", "content-length"})
_UPSTREAM_TIMEOUT = httpx.Timeout(10.0, read=None, write=30.0).as_dict()
SMALL_BODY = 1 << 20  # non-streaming bodies up to this size are relayed whole, with their length
# Paths of the instances' internal (migration) API: never forwarded from the public port.
INTERNAL_PREFIXES = ("/internal", "/admin")


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


class Activator:
    """State shared by the two apps: the registry, the HTTP client, the autoscaler link."""

    def __init__(self, config: ActivatorConfig) -> None:
        self.config = config
        self.registry = Registry()
        self.streams = StreamTable()  # streaming responses by generation id (what a migration can move)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        self.transport = httpx.AsyncHTTPTransport(limits=limits)
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None, write=30.0),
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256))
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
        await self.transport.aclose()

    # -- the request path ------------------------------------------------------------------

    def route(self, request: Request, body: bytes) -> Service:
        known = self.registry.known
        key = service_from_host(request.headers.get("host"), known)
        if key is None and request.url.path in OPENAI_PATHS:
            key = service_from_model(model_from_body(body), known, self.config.default_namespace)
        if key is None:
            model = model_from_body(body) if request.url.path in OPENAI_PATHS else None
            what = f"model {model!r}" if model else f"host {request.headers.get('host')!r}"
            raise errors.NotFound(f"no service serves {what}")
        return self.registry.get(key)

    async def handle(self, request: Request) -> Response:
        if request.headers.get("k-network-probe"):  # Knative's network probe contract
            return Response("activator", headers={"k-network-hash": request.headers.get("k-network-hash", "")})
        if request.url.path.startswith(INTERNAL_PREFIXES):
            raise errors.NotFound(f"no route for {request.url.path}")
        body = await _read_body(request, self.config.max_body_bytes)
        svc = self.route(request, body)
        svc.window.change(+1, time.monotonic())
        metrics.IN_FLIGHT.labels(str(svc.key)).inc()
        stack = contextlib.AsyncExitStack()
        stack.callback(self._done, svc)
        try:
            return await self._forward(request, body, svc, stack)
        except BaseException:
            await stack.aclose()
            raise

    def _done(self, svc: Service) -> None:
        svc.window.change(-1, time.monotonic())
        metrics.IN_FLIGHT.labels(str(svc.key)).dec()

    async def _acquire(self, svc: Service, exclude: frozenset[str], deadline: float) -> Instance:
        if not svc.instances:
            metrics.COLD_STARTS.labels(str(svc.key)).inc()
            await self._demand(svc)
        if svc.held >= self.config.max_held_per_service:
            raise errors.Overloaded(f"{svc.key}: {svc.held} requests already waiting")
        t0 = time.monotonic()
        svc.held += 1
        try:
            inst = await self.registry.wait_for_instance(svc, deadline, exclude)
        finally:
            svc.held -= 1
        metrics.QUEUE_SECONDS.labels(str(svc.key)).observe(time.monotonic() - t0)
        if inst is None:
            raise errors.ColdStartTimeout(
                f"{svc.key}: no instance became ready within {self.config.cold_start_timeout_s:g}s",
                retry_after=max(1, int(self.config.cold_start_timeout_s // 10)))
        return inst

    async def _forward(self, request: Request, body: bytes, svc: Service,
                       stack: contextlib.AsyncExitStack) -> Response:
        deadline = time.monotonic() + self.config.cold_start_timeout_s
        headers = [(k, v) for k, v in request.headers.items() if k not in HOP_BY_HOP]
        headers.append(("knative-serving-namespace", svc.key.namespace))
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        tried: set[str] = set()
        for attempt in range(2):
            inst = await self._acquire(svc, frozenset(tried), deadline)
            slot = contextlib.AsyncExitStack()
            await slot.enter_async_context(svc.breaker.slot(inst))
            t0 = time.perf_counter()
            resp = None
            try:
                # Straight to the transport: the client's auth, redirect and cookie layers have
                # nothing to do on the data path and cost a third of the proxy's time.
                req = httpx.Request(request.method, inst.url + target, headers=headers, content=body,
                                    extensions={"timeout": _UPSTREAM_TIMEOUT})
                resp = await self.transport.handle_async_request(req)
                chunks = resp.aiter_raw()
                first = await anext(chunks, b"")
            except (httpx.TransportError, httpx.StreamError) as exc:
                if resp is not None:
                    await resp.aclose()
                await slot.aclose()
                tried.add(inst.id)
                _log.warning("instance failed before the first byte", service=str(svc.key), instance=inst.id,
                             node=inst.node, attempt=attempt, error=f"{type(exc).__name__}: {exc}")
                await self.registry.drop_instance(svc.key, inst.id)
                if attempt == 0:
                    metrics.RETRIES.labels(str(svc.key)).inc()
                continue
            metrics.PROXY_SECONDS.labels(str(svc.key)).observe(time.perf_counter() - t0)
            metrics.REQUESTS.labels(str(svc.key), str(resp.status_code)).inc()
            out_headers = {k: v for k, v in resp.headers.items() if k not in HOP_BY_HOP}
            out_headers["x-sllm-instance"] = inst.id
            gen_id = resp.headers.get("x-request-id")
            if gen_id and resp.status_code == 200 and inst.internal_url and \
                    resp.headers.get("content-type", "").startswith("text/event-stream"):
                tracked = Tracked(gen_id, svc.key, inst, svc.breaker)
                tracked.upstream.push_async_callback(slot.aclose)
                tracked.upstream.push_async_callback(resp.aclose)
                self.streams.add(tracked)
                stack.callback(self.streams.remove, tracked)
                stack.push_async_callback(tracked.close)
                return StreamingResponse(self._relay_tracked(first, chunks, stack, tracked),
                                         status_code=resp.status_code, headers=out_headers)
            stack.push_async_callback(slot.aclose)
            stack.push_async_callback(resp.aclose)
            length = resp.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) <= SMALL_BODY:
                # A small, complete body: send it with its length in one write instead of
                # re-chunking it (headers, body and terminator would be three writes).
                try:
                    rest = [c async for c in chunks]
                except httpx.HTTPError:
                    await stack.aclose()
                    raise errors.UpstreamFailed(f"{svc.key}: instance {inst.id} broke off its response") from None
                return Response(b"".join([first, *rest]), status_code=resp.status_code, headers=out_headers,
                                background=BackgroundTask(stack.aclose))
            return StreamingResponse(_relay(first, chunks, stack), status_code=resp.status_code, headers=out_headers)
        raise errors.UpstreamFailed(f"{svc.key}: instances failed before responding ({', '.join(sorted(tried))})")

    # -- migration -------------------------------------------------------------------------

    async def _relay_tracked(self, first: bytes, rest: AsyncIterator[bytes], stack: contextlib.AsyncExitStack,
                             tracked: Tracked) -> AsyncIterator[bytes]:
        """`_relay` for a stream a migration may switch: chunks pass through (and are kept, unparsed)
        until a migration starts, then `splice` takes over frame by frame."""
        broken = False
        held = b""  # a chunk received after the migration began: splice must see it (it may be the detach)
        try:
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
        finally:
            await stack.aclose()

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


async def _relay(first: bytes, rest: AsyncIterator[bytes], stack: contextlib.AsyncExitStack) -> AsyncIterator[bytes]:
    """Pass the upstream body through chunk by chunk; release the slot however it ends."""
    try:
        if first:
            yield first
        async for chunk in rest:
            yield chunk
    except httpx.HTTPError as exc:
        _log.warning("upstream stream broke after the first byte", error=f"{type(exc).__name__}: {exc}")
    finally:
        await stack.aclose()


async def _prepend(chunk: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if chunk:
        yield chunk
    async for more in rest:
        yield more


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise errors.TooLarge(f"request body of {declared} bytes exceeds the {limit}-byte limit")
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise errors.TooLarge(f"request body exceeds the {limit}-byte limit")
        parts.append(chunk)
    return b"".join(parts)


def _error_response(exc: errors.ActivatorError) -> Response:
    return Response(errors.error_body(exc), status_code=exc.status,
                    headers={k.decode(): v.decode() for k, v in errors.error_headers(exc)})


def build_public_app(act: Activator) -> Starlette:
    async def endpoint(request: Request) -> Response:
        try:
            return await act.handle(request)
        except errors.ActivatorError as exc:
            if exc.status >= 500:
                _log.warning("request failed", status=exc.status, error=exc.message)
            return _error_response(exc)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await act.start()
        try:
            yield
        finally:
            await act.stop()

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", endpoint, methods=methods)], lifespan=lifespan)


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
        except (ValueError, TypeError) as exc:
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
