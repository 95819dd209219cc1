"""The activators as the autoscaler reaches them on Kubernetes (the `Activator` protocol of
autoscaler/activator_client.py), for scale-down and preemption with migration.

Knative's `activator-service` may have several replicas, and a stream runs through exactly one of
them, so every call goes to every replica:

- the replicas: the ready addresses of the Service's EndpointSlices (label
  `kubernetes.io/service-name`), at the activators' admin port, which is on the pod network with
  the internal token (activator/admin.py); or fixed admin URLs (`--activator-admin`, an activator
  outside the cluster, as in the tests);
- `push_endpoints`: the rotation itself comes from the revisions' EndpointSlices
  (activator/kube/source.py), so only what the autoscaler adds is sent: an instance that left
  the ready set while its pod still stands (a scale-down's victim, DRAINING) is withheld on
  every replica (`POST /admin/v1/withhold`), and put back if it returns (the scale-down called off);
- withholds are kept per replica until it acknowledges them: one that failed, or a replica that
  does not know the revision yet, gets them again at `resend` (the leader's tick), and a replica
  that (re)started (`replica_started`: a stats report with a new boot id) gets them all again,
  since a fresh activator routes to every ready pod of its EndpointSlices, victims included;
- `migrate`: asked of every replica at once; the generations they moved together are the answer,
  None when every replica refused or failed (the scaler then waits for the instance to go idle).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

from autoscaler.activator_client import ActivatorClient, MigrationResult
from autoscaler.backends.base import InstanceRecord
from sllm_knative.config import ServiceConfig
from sllm_knative.kube.client import Kube
from sllm_knative.kube.informer import Informer
from sllm_knative.log import get_logger

_log = get_logger("autoscaler.activators")

NAMESPACE = "knative-serving"
SERVICE = "activator-service"  # Knative's, taken over by ours (manifests/activator)
ADMIN_PORT = 8090  # the activator Deployment's --admin-port (manifests/activator/deployment.yaml)
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
WITHHELD_KEPT = 256  # per service: the withheld instances remembered, to put back if they return


def admin_urls(slices: Sequence[dict[str, Any]], port: int) -> list[str]:
    """The admin URL of every ready endpoint of an EndpointSlice list (pure), sorted."""
    out = set()
    for s in slices:
        for ep in s.get("endpoints") or []:
            if (ep.get("conditions") or {}).get("ready") is False:
                continue
            for address in (ep.get("addresses") or [])[:1]:
                host = f"[{address}]" if ":" in address else address
                out.add(f"http://{host}:{port}")
    return sorted(out)


def rotation_changes(before: set[str], withheld: set[str], now: set[str]) -> tuple[set[str], set[str]]:
    """(to withhold, to put back) when the ready set goes from `before` to `now` (pure): an
    instance that left is withheld; a withheld one that is ready again goes back."""
    return before - now, withheld & now


class KubeActivators:
    def __init__(self, kube: Kube | None, *, static: Sequence[str] = (), namespace: str = NAMESPACE,
                 service: str = SERVICE, admin_port: int = ADMIN_PORT, resync_s: float = 30.0,
                 token: str | None = None) -> None:
        self.static = list(static)
        self.admin_port = admin_port
        self.token = token
        self.slices: Informer | None = None
        if kube is not None and not self.static:
            self.slices = Informer("activator-slices", kube.discovery.list_namespaced_endpoint_slice, namespace,
                                   label_selector=f"{SERVICE_NAME_LABEL}={service}", resync_s=resync_s)
        self._clients: dict[str, ActivatorClient] = {}
        self._ready: dict[str, set[str]] = {}  # service -> the ready instances last pushed
        self._withheld: dict[str, set[str]] = {}  # service -> the instances withheld since
        self._services: dict[str, ServiceConfig] = {}  # service -> its config, for resends
        self._sent: dict[str, dict[str, set[str]]] = {}  # replica URL -> service -> withholds it took

    def start(self) -> KubeActivators:
        if self.slices is not None:
            self.slices.start()
        return self

    def replicas(self) -> list[ActivatorClient]:
        urls = self.static or admin_urls(self.slices.items() if self.slices else [], self.admin_port)
        for url in urls:
            if url not in self._clients:
                self._clients[url] = ActivatorClient(url, self.token)
        return [self._clients[u] for u in urls]

    async def push_endpoints(self, service: ServiceConfig, ready: Sequence[InstanceRecord]) -> None:
        now = {r.id for r in ready}
        withheld = self._withheld.setdefault(service.key, set())
        left, back = rotation_changes(self._ready.get(service.key, set()), withheld, now)
        self._ready[service.key] = now
        withheld -= back
        withheld |= left
        if len(withheld) > WITHHELD_KEPT:  # of instances long gone; a called-off one comes back soon
            withheld.clear()
            withheld |= left
        self._services[service.key] = service
        replicas = self.replicas()
        for instance in sorted(back):
            await asyncio.gather(*(c.withhold(service, instance, False) for c in replicas))
            for c in replicas:
                self._sent.get(c.admin_url, {}).get(service.key, set()).discard(instance)
            _log.info("instance back in rotation", service=service.key, instance=instance, activators=len(replicas))
        for instance in sorted(left):
            _log.info("instance withheld", service=service.key, instance=instance, activators=len(replicas))
        await self._send_withholds(service, replicas)

    async def _send_withholds(self, service: ServiceConfig, replicas: list[ActivatorClient]) -> None:
        """Every withhold of `service` that a replica has not acknowledged yet, to that replica."""
        want = self._withheld.get(service.key, set())

        async def send(c: ActivatorClient) -> None:
            have = self._sent.setdefault(c.admin_url, {}).setdefault(service.key, set())
            have &= want
            for instance in sorted(want - have):
                if await c.withhold(service, instance, True):
                    have.add(instance)

        await asyncio.gather(*(send(c) for c in replicas))

    async def resend(self) -> None:
        """Withholds not acknowledged yet (a replica that failed, restarted or is new), sent again;
        replicas that left are forgotten."""
        replicas = self.replicas()
        live = {c.admin_url for c in replicas}
        for url in [u for u in self._sent if u not in live]:
            del self._sent[url]
        for key, service in list(self._services.items()):
            if self._withheld.get(key):
                await self._send_withholds(service, replicas)

    def replica_started(self) -> None:
        """A replica (re)started and knows no withhold: `resend` sends every one again (to
        every replica, since the report does not say which; a withhold is idempotent)."""
        self._sent.clear()

    async def remove(self, service: str) -> None:
        self._ready.pop(service, None)  # the revision's slices go with it
        self._withheld.pop(service, None)
        self._services.pop(service, None)
        for sent in self._sent.values():
            sent.pop(service, None)

    async def migrate(self, service: ServiceConfig, source: str,
                      destination: str | None) -> list[MigrationResult] | None:
        replicas = self.replicas()
        if not replicas:
            _log.warning("no activator to migrate through", service=service.key, instance=source)
            return None
        answers = await asyncio.gather(*(c.migrate(service, source, destination) for c in replicas))
        moved = [r for a in answers if a is not None for r in a]
        if not moved and any(a is None for a in answers):
            return None  # a replica that may hold the streams refused: not "nothing to move"
        return moved

    async def outstanding(self, service: ServiceConfig, instance: str) -> int | None:
        """Summed over every replica (each routes its own requests); None if one could not say."""
        answers = await asyncio.gather(*(c.outstanding(service, instance) for c in self.replicas()))
        return None if any(a is None for a in answers) else sum(a or 0 for a in answers)

    async def close(self) -> None:
        if self.slices is not None:
            await asyncio.to_thread(self.slices.stop)
        for c in self._clients.values():
            with contextlib.suppress(Exception):
                await c.close()
