"""An autoscaler over the in-memory backend and activator, with a clock the tests step."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from autoscaler.backends.base import InstanceRecord, InstanceState
from autoscaler.backends.memory import MemoryActivator, MemoryBackend, MemoryNode
from autoscaler.controller import Autoscaler
from autoscaler.services import ServiceRuntime
from sllm_knative.api.autoscaler import ServiceStats, StatsReport
from sllm_knative.config import parse_manifest
from sllm_knative.local.manifests import ALLOW_ZERO_INITIAL_SCALE, service_manifest
from sllm_knative.placement import Tier

GB = 10**9
SIZES = {f"file:///store/{m}": 5 * GB for m in "abcxy"}


def uri(model: str) -> str:
    return f"file:///store/{model}"


def node(name: str, slots: int = 1, **tiers: Tier) -> MemoryNode:
    """A node holding model `m`'s checkpoint on tier `tiers[m]`."""
    return MemoryNode(name, slots, {uri(m): t for m, t in tiers.items()})


def service(name: str, *, keep_alive: str = "5s", initial_scale: int | None = 0, max_scale: int = 2,
            minResidency: str = "0s", **policy: object) -> str:  # noqa: N803 - the ScalingPolicy field's name
    """Service `name` serving model `name`, with its ScalingPolicy's extra fields (minScale, priority, ...).
    No minimum residency unless asked: the scenarios that are not about it preempt fresh instances."""
    policy = {"minResidency": minResidency, **policy}  # JSON values: a bool stays a YAML boolean
    return service_manifest(name, uri(name), keep_alive=keep_alive, initial_scale=initial_scale, max_scale=max_scale,
                            container_concurrency=4,
                            policy=policy)


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Timer:
    def __init__(self, at: float, fn: Callable[[], None]) -> None:
        self.at, self.fn, self.cancelled = at, fn, False

    def cancel(self) -> None:
        self.cancelled = True


class Timers:
    """The autoscaler's `call_later` on the test clock: `Cluster.tick` runs what falls due."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.pending: list[Timer] = []

    def __call__(self, delay: float, fn: Callable[[], None]) -> Timer:
        timer = Timer(self.clock.t + delay, fn)
        self.pending.append(timer)
        return timer

    def next_due(self, by: float) -> Timer | None:
        """The earliest timer due by `by`, taken off the list (cancelled ones are dropped)."""
        self.pending = [t for t in self.pending if not t.cancelled]
        due = min((t for t in self.pending if t.at <= by), key=lambda t: t.at, default=None)
        if due is not None:
            self.pending.remove(due)
        return due


class Cluster:
    def __init__(self, nodes: list[MemoryNode], sizes: Mapping[str, int] = SIZES, **backend: Any) -> None:
        self.backend = MemoryBackend(nodes, sizes, **backend)
        self.activator = MemoryActivator(self.backend)
        self.clock = Clock()
        self.scaler = Autoscaler(self.backend, self.activator, clock=self.clock)
        self.timers = Timers(self.clock)
        self.scaler.call_later = self.timers

    async def deploy(self, *services: str) -> None:
        await self.scaler.apply(parse_manifest("---\n".join((*services, ALLOW_ZERO_INITIAL_SCALE))))
        await self.settle()

    async def settle(self) -> None:
        """Until nothing is under way: evaluations, drains, starts."""
        while self.scaler._tasks or self.backend._tasks:
            await self.scaler.settle()
            await self.backend.settle()

    def rt(self, name: str) -> ServiceRuntime:
        rt = self.scaler.services[f"default/{name}"]
        return rt

    def instances(self, name: str, state: InstanceState | None = None) -> list[InstanceRecord]:
        return [i for i in self.rt(name).instances.values() if state is None or i.state == state]

    def ready_on(self, name: str) -> list[str]:
        """The nodes of the service's ready instances."""
        return sorted(i.node for i in self.instances(name, InstanceState.READY))

    async def demand(self, name: str) -> None:
        await self.scaler.on_demand(f"default/{name}", 1)
        await self.settle()

    def report(self, concurrency: Mapping[str, float] | None = None,
               held: Mapping[str, tuple[int, float]] | None = None) -> None:
        """The activator's per-second report: each service's concurrency (0 unless given) and its
        requests waiting for room with how long the oldest has waited (none unless given)."""
        concurrency, held = concurrency or {}, held or {}
        self.scaler.on_stats(StatsReport(services=[
            ServiceStats(namespace="default", name=key.split("/", 1)[1], average_concurrency=concurrency.get(key, 0.0),
                         in_flight=int(concurrency.get(key, 0)) + held.get(key, (0, 0.0))[0],
                         requests=int(concurrency.get(key, 0)), held=held.get(key, (0, 0.0))[0],
                         oldest_held_s=held.get(key, (0, 0.0))[1], seconds=1.0)
            for key in self.scaler.services]))

    async def tick(self, seconds: float = 1.0, concurrency: Mapping[str, float] | None = None,
                   held: Mapping[str, tuple[int, float]] | None = None) -> None:
        """`seconds` later: the evaluations the autoscaler set for before then (each at its time),
        a report, then the decider for every service."""
        end = self.clock.t + seconds
        while (due := self.timers.next_due(end)) is not None:
            self.clock.t = max(self.clock.t, due.at)
            due.fn()
            await self.settle()
        self.clock.t = end
        self.report(concurrency, held)
        self.scaler.tick()
        await self.settle()

    async def close(self) -> None:
        await self.scaler.close()
