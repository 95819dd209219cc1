"""The state the activator's two apps share: the registry of services and their instances, the
data-path connection pool, the HTTP client of the internal calls, the autoscaler link, the
capacity (holding and slots) and the migrations; in Kubernetes mode also the cluster as the source
of revisions and endpoints (activator/kube/source.py) and the link to Knative's autoscaler
(activator/kube/kpa.py). Built once in `python -m activator`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx

from activator.capacity import Capacity
from activator.config import ActivatorConfig
from activator.handoff import Migrations
from activator.metrics import ServiceMeters
from activator.migration import InstanceClient
from activator.registry import Registry
from activator.reporter import Reporter
from activator.upstream import Pool
from sllm_knative.api.keys import ServiceKey

if TYPE_CHECKING:
    from activator.kube.kpa import KnativeStats
    from activator.kube.source import KubeSource


class Activator:
    def __init__(self, config: ActivatorConfig) -> None:
        self.config = config
        self.registry = Registry()
        self.upstream = Pool(connect_timeout=10.0, write_timeout=30.0, read_timeout=None)  # the data path
        # Everything else: the autoscaler, the instances' internal APIs.
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None, write=30.0),
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256))
        self.reporter = Reporter(config, self.registry, self.client)
        self.capacity = Capacity(config, self.registry, self.reporter.demand)
        self.migrations = Migrations(self.registry, InstanceClient(self.client, config.migration), self.capacity)
        self._meters: dict[ServiceKey, ServiceMeters] = {}
        self.kube: KubeSource | None = None
        self.knative_stats: KnativeStats | None = None
        if config.kube is not None:
            from activator.kube.kpa import KnativeStats
            from activator.kube.source import KubeSource
            from sllm_knative.kube.client import Kube, connect

            # connect() raises KubeConfigError when no cluster is configured (python -m
            # activator turns it into exit 2).
            self.kube = KubeSource(Kube(connect(config.kube.kubeconfig)), self.registry, config.kube.resync_s)
            if config.kube.knative_autoscaler_url:
                self.knative_stats = KnativeStats(config.kube.knative_autoscaler_url, config.kube.pod_name)

    def meters(self, key: ServiceKey) -> ServiceMeters:
        m = self._meters.get(key)
        if m is None:
            m = self._meters[key] = ServiceMeters.of(key)
        return m

    async def start_kube(self) -> None:
        """Kubernetes mode, before the ports open: the informers listed and the registry filled."""
        if self.kube is not None:
            assert self.config.kube is not None
            await self.kube.start(self.config.kube.sync_timeout_s)

    async def start(self) -> None:
        self.reporter.start()
        self.migrations.start()
        if self.knative_stats is not None:
            self.knative_stats.start()

    async def stop(self) -> None:
        await self.migrations.stop()
        await self.reporter.stop()
        if self.knative_stats is not None:
            await self.knative_stats.stop()
        if self.kube is not None:
            await self.kube.stop()
        await self.client.aclose()
        await self.upstream.aclose()
