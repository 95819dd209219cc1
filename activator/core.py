"""The state the activator's two apps share: the registry of services and their instances, the
data-path connection pool, the HTTP client of the internal calls, the autoscaler link, the
capacity (holding and slots) and the migrations. Built once in `python -m activator`."""

from __future__ import annotations

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
        self.migrations = Migrations(self.registry, InstanceClient(self.client, config.migration))
        self._meters: dict[ServiceKey, ServiceMeters] = {}

    def meters(self, key: ServiceKey) -> ServiceMeters:
        m = self._meters.get(key)
        if m is None:
            m = self._meters[key] = ServiceMeters.of(key)
        return m

    async def start(self) -> None:
        self.reporter.start()

    async def stop(self) -> None:
        await self.reporter.stop()
        await self.client.aclose()
        await self.upstream.aclose()
