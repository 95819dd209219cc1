"""The admin app (loopback unless `--admin-host` says otherwise; never the public port): the autoscaler pushes services and their
ready instances, reads stats and metrics, withholds instances and triggers migrations; an
instance going away asks for its drain. Paths and bodies: sllm_knative/api/activator.py. Every
body is validated on arrival: a malformed one is a 400 naming the field.

With an internal token (`SLLM_INTERNAL_TOKEN`, sllm_knative/api/auth.py) every call but
`/metrics` must carry it (401 otherwise); off loopback the activator refuses to start without one
(activator/__main__.py), since on Kubernetes the admin port is on the pod network.

In Kubernetes mode the endpoints come from the revisions' EndpointSlices (activator/kube/source.py)
and nothing else: the service pushes (PUT and DELETE) are a 409 saying so; stats, withholds,
drains, migrations (instances named by pod name) and metrics work as in local mode."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import httpx
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from activator import errors, metrics
from activator.core import Activator
from activator.upstream import parse_origin
from sllm_knative.api import activator as api
from sllm_knative.api import auth
from sllm_knative.api.keys import ServiceKey
from sllm_knative.api.wire import InvalidBody, M, Message, parse_json


def _json(msg: Message, status: int = 200) -> JSONResponse:
    return JSONResponse(msg.model_dump(mode="json"), status_code=status)


def _error(message: str, status: int, field: str | None = None) -> JSONResponse:
    return _json(api.AdminError(error=message, field=field), status)


async def _body(request: Request, model: type[M]) -> M:
    return parse_json(model, await request.body())


def build_admin_app(act: Activator, token: str | None = None) -> Starlette:
    registry, migrations = act.registry, act.migrations

    def guarded(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def check(request: Request) -> Response:
            if not auth.token_ok(request.headers.get(auth.HEADER), token):
                return _error(f"{request.url.path}: the admin API needs 'Authorization: Bearer <token>' with this "
                              f"activator's {auth.TOKEN_ENV}", 401)
            return await handler(request)
        return check

    def from_cluster(key: ServiceKey) -> JSONResponse:
        return _error(f"{key}: this activator runs in Kubernetes mode, where a revision's endpoints come from "
                      "its EndpointSlices only; the admin API takes drains and migrations, not endpoints", 409)

    async def put_service(request: Request) -> Response:
        key = ServiceKey(request.path_params["namespace"], request.path_params["name"])
        if act.kube is not None:
            return from_cluster(key)
        try:
            update = await _body(request, api.ServiceUpdate)
            for i, e in enumerate(update.instances):
                try:
                    parse_origin(e.url)  # the data path speaks plain HTTP to instances
                except (ValueError, httpx.UnsupportedProtocol) as exc:
                    raise InvalidBody(f"instances[{i}].url", f"instances[{i}].url: {exc}") from None
        except InvalidBody as exc:
            return _error(f"bad service update for {key}: {exc.message}", 400, exc.field)
        registry.set_service(key, update.container_concurrency, update.hold_timeout_s)
        await registry.set_endpoints(key, update.instances)
        return _json(api.ServiceUpdated(service=str(key), instances=len(registry.get(key).instances)))

    async def delete_service(request: Request) -> Response:
        key = ServiceKey(request.path_params["namespace"], request.path_params["name"])
        if act.kube is not None:
            return from_cluster(key)
        registry.remove_service(key)
        return Response(status_code=204)

    async def get_stats(request: Request) -> Response:
        return _json(act.reporter.stats())

    async def migrate(request: Request) -> Response:
        try:
            req = await _body(request, api.MigrateRequest)
        except InvalidBody as exc:
            return _error(f"bad migrate request: {exc.message}", 400, exc.field)
        if req.key not in registry.known:
            return _error(f"no service {req.key}", 404)
        try:
            results = await migrations.migrate(req.key, req.source, req.destination)
        except errors.ActivatorError as exc:
            return _error(exc.message, exc.status)
        return _json(api.MigrateResponse(service=str(req.key), source=req.source,
                                         generations=[r.to_message() for r in results]))

    async def withhold(request: Request) -> Response:
        """Out of rotation while the endpoint updates still list it (a scale-down's victim)."""
        try:
            req = await _body(request, api.WithholdRequest)
        except InvalidBody as exc:
            return _error(f"bad withhold request: {exc.message}", 400, exc.field)
        if req.key not in registry.known:
            return _error(f"no service {req.key}", 404)
        await registry.withhold(req.key, req.instance, req.withheld)
        return _json(api.ServiceUpdated(service=str(req.key), instances=len(registry.get(req.key).instances)))

    async def drain(request: Request) -> Response:
        """An instance is going away (SIGTERM): out of rotation, its generations migrated elsewhere."""
        try:
            req = await _body(request, api.DrainRequest)
        except InvalidBody as exc:
            return _error(f"bad drain request: {exc.message}", 400, exc.field)
        results = await migrations.drain(req.instance)
        return _json(api.DrainResponse(instance=req.instance, generations=[r.to_message() for r in results]))

    async def get_metrics(request: Request) -> Response:
        return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[
        Route(api.SERVICE_ROUTE, guarded(put_service), methods=["PUT"]),
        Route(api.SERVICE_ROUTE, guarded(delete_service), methods=["DELETE"]),
        Route(api.STATS, guarded(get_stats), methods=["GET"]),
        Route(api.MIGRATE, guarded(migrate), methods=["POST"]),
        Route(api.WITHHOLD, guarded(withhold), methods=["POST"]),
        Route(api.DRAIN, guarded(drain), methods=["POST"]),
        Route(api.METRICS, get_metrics, methods=["GET"]),
    ])
