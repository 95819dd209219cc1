"""The activator's link to the autoscaler (sllm_knative/api/autoscaler.py): demand at once when
a request arrives for a service with no instance (scale from zero must not wait for a report),
and every service's concurrency window each report interval, the first at once. Every report
names this process (`boot`, random at its start): an autoscaler that hears a new one knows the
activator (re)started with no service and pushes every service's endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import httpx

from activator.config import ActivatorConfig
from activator.registry import Registry, RoutedService
from sllm_knative.api import autoscaler as api
from sllm_knative.log import get_logger

_log = get_logger("activator")


class Reporter:
    def __init__(self, config: ActivatorConfig, registry: Registry, http: httpx.AsyncClient) -> None:
        self.config = config
        self.registry = registry
        self.http = http
        self.boot = uuid.uuid4().hex
        self._task: asyncio.Task[None] | None = None

    async def demand(self, svc: RoutedService) -> None:
        """Scale from zero reacts to the first request at once: tell the autoscaler now (only for a
        service it scales: in Kubernetes mode a revision of another class is Knative's)."""
        if not self.config.autoscaler_url or not svc.ours:
            return
        body = api.Demand(namespace=svc.key.namespace, name=svc.key.name, in_flight=svc.window.in_flight)
        try:
            await self.http.post(f"{self.config.autoscaler_url}{api.DEMAND}", json=body.model_dump(), timeout=5.0)
        except httpx.HTTPError as exc:
            _log.warning("could not reach the autoscaler", service=str(svc.key), error=str(exc))

    def stats(self, reset: bool = False) -> api.StatsReport:
        """Per-service concurrency of the services our autoscaler scales; reset=True closes the
        window (only the autoscaler report does)."""
        now = time.monotonic()
        out = []
        for svc in self.registry.services():
            if not svc.ours:
                continue
            r = svc.window.report(now, reset=reset)
            out.append(api.ServiceStats(
                namespace=svc.key.namespace, name=svc.key.name, average_concurrency=r.average_concurrency,
                requests=r.requests, in_flight=r.in_flight, held=svc.held, oldest_held_s=svc.oldest_held_s(now),
                seconds=r.seconds,
                instances=[api.InstanceLoad(id=i.id, outstanding=i.outstanding) for i in svc.loads()]))
        return api.StatsReport(services=out, boot=self.boot)

    async def _loop(self) -> None:
        while True:
            if self.config.autoscaler_url:
                try:
                    await self.http.post(f"{self.config.autoscaler_url}{api.STATS}",
                                         json=self.stats(reset=True).model_dump(), timeout=5.0)
                except httpx.HTTPError as exc:
                    _log.debug("stats report failed", error=str(exc))
            await asyncio.sleep(self.config.report_interval_s)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
