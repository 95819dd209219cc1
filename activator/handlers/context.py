"""Which service a request is for (Knative's context handler: the revision lookup): the Host
header names it Knative style, else, on the OpenAI paths, the body's `model` (activator/routing.py).
An unknown one is a 404 with the OpenAI `model_not_found` code; a body that cannot name one (not
JSON, not an object, no `model`) a 400 that says so.

`GET /v1/models` (and `/v1/models/{model}`) with no Host naming a service is answered here, as
OpenAI's model list of every service routed through this activator: applications call it first.
With a Host that names a service it goes to that service's instance, like any other request."""

from __future__ import annotations

import json
from collections.abc import Callable

from activator import errors
from activator.handlers import Exchange, Routed, RoutedHandler
from activator.metrics import ServiceMeters
from activator.registry import Registry, RoutedService
from activator.respond import send_whole
from activator.routing import (
    MODELS_PATH,
    OPENAI_PATHS,
    model_card,
    model_list,
    names_service,
    requested_model,
    service_from_host,
    service_from_model,
)
from sllm_knative.api.keys import ServiceKey


def route(registry: Registry, host: str | None, path: str, body: bytes, default_namespace: str) -> RoutedService:
    known = registry.known
    key = service_from_host(host, known)
    if key is not None:
        return registry.get(key)
    if path in OPENAI_PATHS:
        try:
            model = requested_model(body)
        except ValueError as e:
            if names_service(host):  # a service's Host, but no such service: that is what went wrong
                raise errors.NotFound(f"no service serves host {host!r}") from None
            raise errors.BadRequest(f"{e}; or name the service in the Host header "
                                    "(<service>.<namespace>.<domain>)") from None
        key = service_from_model(model, known, default_namespace)
        if key is None:
            raise errors.NotFound(f"no service serves model {model!r}")
        return registry.get(key)
    raise errors.NotFound(f"no service serves host {host!r}")


def models(registry: Registry, path: str, default_namespace: str) -> bytes:
    """The body of a model-list request not routed to one service: the list, or one model's card."""
    created = {s.key: s.created for s in registry.services()}
    if path.rstrip("/") == MODELS_PATH:
        return json.dumps(model_list(created, default_namespace)).encode()
    model = path[len(MODELS_PATH) + 1:]
    key = service_from_model(model, registry.known, default_namespace)
    if key is None:
        raise errors.NotFound(f"The model `{model}` does not exist.")
    return json.dumps(model_card(key, created[key], default_namespace)).encode()


class ContextHandler:
    def __init__(self, next_handler: RoutedHandler, registry: Registry, meters: Callable[[ServiceKey], ServiceMeters],
                 default_namespace: str) -> None:
        self.next = next_handler
        self.registry = registry
        self.meters = meters
        self.default_namespace = default_namespace

    async def __call__(self, ex: Exchange) -> None:
        path = ex.scope["path"]
        if (ex.scope["method"] in ("GET", "HEAD") and (path == MODELS_PATH or path.startswith(MODELS_PATH + "/"))
                and service_from_host(ex.head.host, self.registry.known) is None):
            body = models(self.registry, path, self.default_namespace)
            await send_whole(ex.send, 200, [(b"content-type", b"application/json")], body)
            return
        svc = route(self.registry, ex.head.host, path, ex.body, self.default_namespace)
        await self.next(Routed(ex, svc, self.meters(svc.key)))
