"""The layers of the public request path, outermost first (assembled in activator/app.py; the
model is the handler chain of Knative's activator, cmd/activator/main.go):

    probe.py        Knative's network probe: answered here
    request.py      internal paths refused, the body read within its limit, the generation named
    context.py      which service: Host, else the OpenAI `model` -> Routed
    concurrency.py  the service's concurrency window and in-flight gauge (what the autoscaler reads)
    proxy.py        a capacity slot on an instance (activator/capacity.py), forward, relay; one retry

Each layer is an async callable that takes the exchange and awaits the next layer. An
`ActivatorError` raised before the response starts becomes the error response in one place
(`PublicApp`, activator/app.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable

from starlette.types import Receive, Scope, Send

from activator.metrics import ServiceMeters
from activator.registry import RoutedService
from activator.request import RequestHead


@dataclasses.dataclass(slots=True)
class Exchange:
    """One public request on its way down the layers."""

    scope: Scope
    receive: Receive
    send: Send
    head: RequestHead
    body: bytes = b""
    gen_id: str | None = None  # the generation name the activator gave it (completions and chat)
    svc: RoutedService | None = None  # in Kubernetes mode, the revision (found before the body is read)


@dataclasses.dataclass(slots=True)
class Routed:
    """An exchange once its service is known."""

    ex: Exchange
    svc: RoutedService
    meters: ServiceMeters


Handler = Callable[[Exchange], Awaitable[None]]
RoutedHandler = Callable[[Routed], Awaitable[None]]
