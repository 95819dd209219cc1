"""The autoscaler's HTTP API (loopback): the activator's reports and the CLI's requests.

    POST   /v1/stats                     activator: per-service concurrency every second
    POST   /v1/demand                    activator: a request waits for a service at zero
    POST   /v1/apply                     CLI: YAML (Knative Services, ScalingPolicies)
    DELETE /v1/services/{ns}/{name}      CLI
    GET    /v1/services                  CLI: desired/ready scale, instances, placements
    GET    /v1/nodes                     CLI: the nodes' tiers and slots
    GET    /metrics                      Prometheus
    GET    /healthz                      200 when this replica acts (on Kubernetes: leads), else 503
    GET    /livez                        200 while the process serves (liveness)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from autoscaler import metrics as m
from autoscaler.controller import Autoscaler
from autoscaler.journal import Journal
from sllm_knative.api.autoscaler import DEMAND, STATS, Demand, StatsReport
from sllm_knative.api.wire import InvalidBody, parse_json
from sllm_knative.config import ConfigError, parse_manifest
from sllm_knative.log import get_logger

_log = get_logger("autoscaler")


def _bad_body(exc: InvalidBody) -> Response:
    return JSONResponse({"error": exc.message, "field": exc.field}, status_code=400)


def build_app(scaler: Autoscaler, *, ready: Callable[[], bool] = lambda: True, kube: bool = False,
              journal: Journal | None = None) -> Starlette:
    """`ready` answers /healthz (on Kubernetes: this replica leads, so the Service sends the
    activator's reports to the leader only); with `kube`, services come from the cluster and
    /v1/apply and DELETE are refused with a message that says so. `journal` (local mode) keeps
    each applied document and deletion, for a restarted autoscaler (autoscaler/journal.py)."""

    async def stats(request: Request) -> Response:
        try:
            report = parse_json(StatsReport, await request.body())
        except InvalidBody as exc:
            return _bad_body(exc)
        scaler.on_stats(report)
        return Response(status_code=204)

    async def demand(request: Request) -> Response:
        try:
            doc = parse_json(Demand, await request.body())
        except InvalidBody as exc:
            return _bad_body(exc)
        await scaler.on_demand(str(doc.key), doc.in_flight)
        return Response(status_code=204)

    async def livez(request: Request) -> Response:
        return Response("ok")

    async def healthz(request: Request) -> Response:
        return Response("ok" if ready() else "not leading", status_code=200 if ready() else 503)

    def from_cluster() -> Response:
        return JSONResponse({"error": "services come from the cluster's Revisions here: use kubectl"},
                            status_code=405)

    async def apply(request: Request) -> Response:
        if kube:
            return from_cluster()
        text = (await request.body()).decode("utf-8", errors="replace")
        try:
            manifest = parse_manifest(text, source=request.query_params.get("source", "<request>"))
        except ConfigError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        if not manifest.services and not manifest.policies:
            return JSONResponse({"error": "no Service or ScalingPolicy in the document"}, status_code=400)
        changes = await scaler.apply(manifest)
        if journal is not None:
            journal.applied(text, request.query_params.get("source", "<request>"))
        return JSONResponse({"changes": changes})

    async def delete(request: Request) -> Response:
        if kube:
            return from_cluster()
        key = f"{request.path_params['namespace']}/{request.path_params['name']}"
        if not await scaler.delete(key):
            return JSONResponse({"error": f"service {key} not found"}, status_code=404)
        if journal is not None:
            journal.deleted(key)
        return JSONResponse({"changes": [f"service/{key} deleted"]})

    async def services(request: Request) -> Response:
        return JSONResponse(scaler.snapshot())

    async def nodes(request: Request) -> Response:
        out: list[dict[str, Any]] = []
        running = scaler.slots_in_use()
        for name, slots in scaler.backend.node_slots().items():
            entry: dict[str, Any] = {"name": name, "slots": slots, "running": running.get(name, 0)}
            try:
                entry.update(await scaler.backend.describe_node(name))
            except Exception as exc:  # shown to the user as the node's state
                entry["error"] = str(exc)
            out.append(entry)
        return JSONResponse({"nodes": out})

    async def metrics(request: Request) -> Response:
        for key, rt in scaler.services.items():
            m.DESIRED.labels(key).set(rt.state.scale)
            m.READY.labels(key).set(len(rt.ready()))
        return Response(generate_latest(m.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[
        Route(STATS, stats, methods=["POST"]),
        Route(DEMAND, demand, methods=["POST"]),
        Route("/v1/apply", apply, methods=["POST"]),
        Route("/v1/services/{namespace}/{name}", delete, methods=["DELETE"]),
        Route("/v1/services", services, methods=["GET"]),
        Route("/v1/nodes", nodes, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/livez", livez, methods=["GET"]),
    ])
