"""The layers of the public path that differ in Kubernetes mode (the contract: activator/kube/contract.py):

    KnativeProbeHandler   kubelet probes, `K-Network-Probe: probe` (hash) and `: activator`, as Knative answers them
    RevisionHandler       the revision from the Knative-Serving-* headers (or a cluster-local Host);
                          404 for one the Revision informer does not know; headers rewritten for the pod
    KnativeStatsHandler   a revision of Knative's classes: counted for Knative's autoscaler (activator/kube/kpa.py)

assembled with the shared layers in activator/app.py (`kube_chain`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from activator import errors
from activator.handlers import Exchange, Handler, Routed, RoutedHandler
from activator.kube import contract
from activator.kube.kpa import KnativeStats
from activator.metrics import ServiceMeters
from activator.registry import Registry
from activator.respond import send_whole
from sllm_knative.api.keys import ServiceKey


class KnativeProbeHandler:
    def __init__(self, next_handler: Handler) -> None:
        self.next = next_handler

    async def __call__(self, ex: Exchange) -> None:
        answer = contract.probe_answer(ex.head.forward)
        if answer is None:
            await self.next(ex)
            return
        status, headers, body = answer
        if status != 200 or body:
            headers = [*headers, (b"content-type", b"text/plain; charset=utf-8")]
        await send_whole(ex.send, status, headers, body)


class RevisionHandler:
    """Knative's context handler: which revision, or a 404; the request's headers become what the
    pod gets (`contract.rewrite`)."""

    def __init__(self, next_handler: Handler, registry: Registry, cluster_domain: str) -> None:
        self.next = next_handler
        self.registry = registry
        self.cluster_domain = cluster_domain

    async def __call__(self, ex: Exchange) -> None:
        head = ex.head
        key = contract.revision_from(head.forward, head.host, self.cluster_domain)
        if key is None:
            raise errors.RevisionNotFound(
                "the request names no revision: it needs the Knative-Serving-Revision and "
                "Knative-Serving-Namespace headers (or a Host <revision>.<namespace>.svc."
                f"{self.cluster_domain}); Host was {head.host!r}")
        if key not in self.registry.known:
            raise errors.RevisionNotFound(f"revision {key.name!r} not found in namespace {key.namespace!r} "
                                          "(no such serving.knative.dev/v1 Revision)")
        ex.svc = self.registry.get(key)
        ex.head = dataclasses.replace(head, forward=contract.rewrite(head.forward, head.host))
        await self.next(ex)


class Bound:
    """The revision found by RevisionHandler, handed on as a routed request."""

    def __init__(self, next_handler: RoutedHandler, meters: Callable[[ServiceKey], ServiceMeters]) -> None:
        self.next = next_handler
        self.meters = meters

    async def __call__(self, ex: Exchange) -> None:
        svc = ex.svc
        assert svc is not None, "Bound runs after RevisionHandler"
        await self.next(Routed(ex, svc, self.meters(svc.key)))


class KnativeStatsHandler:
    """A request of a revision our autoscaler does not scale is counted for Knative's (the
    concurrency reporter's handler); ours go by untouched (their demand goes to our autoscaler)."""

    def __init__(self, next_handler: RoutedHandler, stats: KnativeStats | None) -> None:
        self.next = next_handler
        self.stats = stats

    async def __call__(self, r: Routed) -> None:
        if self.stats is None or r.svc.ours:
            await self.next(r)
            return
        key = r.svc.key
        self.stats.request_in(key)
        try:
            await self.next(r)
        finally:
            self.stats.request_out(key)
