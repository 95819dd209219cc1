"""The activator's two HTTP apps, assembled in one place.

Public app (what clients and Knative's ingress reach): a plain ASGI app, one request through a
chain of layers (activator/handlers/, modelled on Knative's activator handler chain):

    ProbeHandler        K-Network-Probe answered here
    RequestHandler      internal paths refused, body read within its limit, the generation named
    ContextHandler      the service: Host, else the OpenAI `model`
    ConcurrencyHandler  counted in the service's window and in-flight gauge
    ProxyHandler        a capacity slot on an instance with room (held through a cold start),
                        forward, relay; a failure before the first byte retried once elsewhere

No Starlette router or middleware on this port: they cost more than everything above together,
and there is one route. Errors become responses in exactly one place (`PublicApp.__call__`).

In Kubernetes mode (`--kube`, Knative's activator; activator/kube/) the chain is Knative's:

    KnativeProbeHandler kubelet and Knative network probes, as Knative's activator answers them
    RevisionHandler     the revision from the Knative-Serving-* headers (404 if unknown), the
                        headers rewritten for the pod (K-Original-Host, K-Proxy-Request)
    RequestHandler      as above (internal paths refused for our class's revisions only)
    Bound               the revision as the routed service
    KnativeStatsHandler a revision of Knative's classes counted for Knative's autoscaler
    ConcurrencyHandler, ProxyHandler   as above (no Knative-Serving-Namespace to the pod)

The same app serves the HTTP/1 port (uvicorn) and the h2c port (hypercorn, `H2cApp`).

Admin app (its own port, loopback unless `--admin-host`; never the public port): activator/admin.py.
"""

from __future__ import annotations

from starlette.types import Message, Receive, Scope, Send

from activator import errors
from activator.admin import build_admin_app
from activator.core import Activator
from activator.handlers import Exchange, Handler
from activator.handlers.concurrency import ConcurrencyHandler
from activator.handlers.context import ContextHandler
from activator.handlers.probe import ProbeHandler
from activator.handlers.proxy import ProxyHandler
from activator.handlers.request import RequestHandler
from activator.kube.handlers import Bound, KnativeProbeHandler, KnativeStatsHandler, RevisionHandler
from activator.request import ClientGone, split_headers
from activator.respond import send_error
from sllm_knative.log import get_logger

__all__ = ["Activator", "H2cApp", "PublicApp", "build_admin_app", "build_public_app", "chain", "kube_chain"]

_log = get_logger("activator")


def chain(act: Activator) -> Handler:
    """The public request path, outermost layer first."""
    cfg = act.config
    proxy = ProxyHandler(act.capacity, act.registry, act.upstream, act.migrations, cfg.cold_start_timeout_s)
    routed = ConcurrencyHandler(proxy)
    return ProbeHandler(RequestHandler(ContextHandler(routed, act.registry, act.meters, cfg.default_namespace),
                                       cfg.max_body_bytes))


def kube_chain(act: Activator) -> Handler:
    """The public request path in Kubernetes mode, outermost layer first."""
    cfg = act.config
    assert cfg.kube is not None
    proxy = ProxyHandler(act.capacity, act.registry, act.upstream, act.migrations, cfg.cold_start_timeout_s,
                         namespace_header=False)
    routed = KnativeStatsHandler(ConcurrencyHandler(proxy), act.knative_stats)
    return KnativeProbeHandler(RevisionHandler(RequestHandler(Bound(routed, act.meters), cfg.max_body_bytes),
                                               act.registry, cfg.kube.cluster_domain))


class PublicApp:
    """The public port: every method and path goes down the chain; lifespan starts and stops the activator."""

    def __init__(self, act: Activator) -> None:
        self.act = act
        self.handle = chain(act) if act.config.kube is None else kube_chain(act)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            try:
                await self.handle(Exchange(scope, receive, send, split_headers(scope["headers"])))
            except errors.ActivatorError as exc:
                if exc.status >= 500:
                    _log.warning("request failed", status=exc.status, error=exc.message)
                await send_error(send, exc)
            except ClientGone:
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


class H2cApp:
    """The same public app on a second server (the h2c port): requests only; the first server's
    lifespan starts and stops the activator."""

    def __init__(self, public: PublicApp) -> None:
        self.public = public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await self.public(scope, receive, send)


def build_public_app(act: Activator) -> PublicApp:
    return PublicApp(act)
