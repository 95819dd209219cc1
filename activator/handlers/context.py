"""Which service a request is for (Knative's context handler: the revision lookup): the Host
header names it Knative style, else, on the OpenAI paths, the body's `model` (activator/routing.py).
An unknown one is a 404 with the OpenAI `model_not_found` code."""

from __future__ import annotations

from collections.abc import Callable

from activator import errors
from activator.handlers import Exchange, Routed, RoutedHandler
from activator.metrics import ServiceMeters
from activator.registry import Registry, RoutedService
from activator.routing import OPENAI_PATHS, model_from_body, service_from_host, service_from_model
from sllm_knative.api.keys import ServiceKey


def route(registry: Registry, host: str | None, path: str, body: bytes, default_namespace: str) -> RoutedService:
    known = registry.known
    key = service_from_host(host, known)
    if key is None and path in OPENAI_PATHS:
        key = service_from_model(model_from_body(body), known, default_namespace)
    if key is None:
        model = model_from_body(body) if path in OPENAI_PATHS else None
        what = f"model {model!r}" if model else f"host {host!r}"
        raise errors.NotFound(f"no service serves {what}")
    return registry.get(key)


class ContextHandler:
    def __init__(self, next_handler: RoutedHandler, registry: Registry, meters: Callable[[ServiceKey], ServiceMeters],
                 default_namespace: str) -> None:
        self.next = next_handler
        self.registry = registry
        self.meters = meters
        self.default_namespace = default_namespace

    async def __call__(self, ex: Exchange) -> None:
        svc = route(self.registry, ex.head.host, ex.scope["path"], ex.body, self.default_namespace)
        await self.next(Routed(ex, svc, self.meters(svc.key)))
