"""A cluster in memory: simulated nodes and instances behind the `Backend` protocol, and an
activator that migrates simulated generations, for tests and simulations.

Nodes are data (`MemoryNode`: slots, the tier of each checkpoint, bandwidths, the start
overhead). Starting an instance simulates the node's loader: one load at a time, first in
first out; a model already loading on the node is joined, not loaded twice; a resident
checkpoint loads in no time; a finished load leaves the checkpoint in the node's DRAM tier.
Each instance's start latency (simulated seconds) is kept in `starts`; the instance becomes
ready after that latency times `time_scale` in real time (asyncio), and a READY event follows
(its record's lease timing and ready time in simulated seconds after its start, for
calibration). The controller's own clock is real time.
Generations are data too: `add_generation` puts one on an instance, `MemoryActivator.migrate`
moves them (and can be held with an `asyncio.Event`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import Mapping, Sequence
from typing import Any

from autoscaler.activator_client import MigrationResult
from autoscaler.backends.base import EventHandler, EventKind, InstanceEvent, InstanceRecord, InstanceState
from sllm_knative.api import MigrationOutcome
from sllm_knative.config import ServiceConfig
from sllm_knative.placement import NodeInventory, Tier

GB = 10**9
DEFAULT_BANDWIDTH: Mapping[Tier, float] = {Tier.DRAM: 10 * GB, Tier.SSD: 2 * GB, Tier.REMOTE: 0.5 * GB}


@dataclasses.dataclass(frozen=True)
class MemoryNode:
    name: str
    slots: int = 1
    checkpoints: Mapping[str, Tier] = dataclasses.field(default_factory=dict)
    bandwidth: Mapping[Tier, float] = dataclasses.field(default_factory=lambda: dict(DEFAULT_BANDWIDTH))
    overhead_s: float = 0.3


@dataclasses.dataclass(frozen=True)
class SimulatedStart:
    """One start: where, from which tier, and its simulated seconds (queue, load, overhead)."""

    instance: str
    node: str
    tier: Tier
    queue_s: float
    load_s: float
    overhead_s: float

    @property
    def latency_s(self) -> float:
        return self.queue_s + self.load_s + self.overhead_s


class MemoryBackend:
    one_machine = False  # each node is given its own bandwidths

    def __init__(self, nodes: Sequence[MemoryNode], model_sizes: Mapping[str, int], *,
                 time_scale: float = 0.001, fail: Sequence[str] = (), eager_events: bool = False,
                 stop_s: float = 0.0) -> None:
        self.nodes = {n.name: n for n in nodes}
        self.checkpoints: dict[str, dict[str, Tier]] = {n.name: dict(n.checkpoints) for n in nodes}
        self.model_sizes = dict(model_sizes)
        self.time_scale = time_scale
        self.fail = set(fail)  # services (namespace/name) whose instances fail to start
        # READY or FAILED is told before start() returns, as a Kubernetes pod can be ready (or
        # gone) before the caller of start() runs again.
        self.eager_events = eager_events
        self.stop_s = stop_s  # simulated seconds an instance takes to stop
        self.starts: list[SimulatedStart] = []
        self.warmed: list[tuple[str, str]] = []
        self.stopped: list[str] = []
        self.generations_of: dict[str, list[dict[str, Any]]] = {}
        self._loader_free: dict[str, float] = {n.name: 0.0 for n in nodes}  # simulated clock
        self._loading: dict[tuple[str, str], float] = {}  # (node, model) -> when its load ends (simulated)
        self._t0 = time.monotonic()
        self._instances: dict[str, InstanceRecord] = {}
        self._handlers: list[EventHandler] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._ports = itertools.count(20000)
        self._gen_ids = itertools.count(1)

    def _now(self) -> float:
        """Simulated seconds since the backend began."""
        return (time.monotonic() - self._t0) / self.time_scale if self.time_scale else 0.0

    # -- nodes -----------------------------------------------------------------------------

    def node_slots(self) -> Mapping[str, int]:
        return {name: n.slots for name, n in self.nodes.items()}

    async def inventories(self) -> list[NodeInventory]:
        await asyncio.sleep(0)  # as I/O would: other tasks run meanwhile
        return [NodeInventory(n.name, dict(n.bandwidth), dict(self.checkpoints[n.name]), free_slots=n.slots,
                              instance_overhead_s=n.overhead_s) for n in self.nodes.values()]

    def nodes_for(self, service: ServiceConfig) -> set[str] | None:
        return None  # local nodes carry no labels: a nodeSelector has nothing to select on

    async def describe_node(self, node: str) -> dict[str, Any]:
        n = self.nodes[node]
        tiers: dict[str, list[dict[str, Any]]] = {}
        for model, tier in self.checkpoints[node].items():
            tiers.setdefault(str(tier), []).append({"model": model, "size": self.model_sizes.get(model, 0),
                                                    "state": "ready"})
        return {"tiers": [{"name": t, "checkpoints": c} for t, c in tiers.items()],
                "bandwidths": {str(t): bw for t, bw in n.bandwidth.items()}}

    def model_size(self, model: str) -> int | None:
        return self.model_sizes.get(model)

    async def warm(self, node: str, model: str) -> None:
        await asyncio.sleep(0)
        self.warmed.append((node, model))

    # -- instances -------------------------------------------------------------------------

    def _simulate(self, node: MemoryNode, model: str, instance: str) -> SimulatedStart:
        """The start's queue, load and overhead on the node's loader (and the loader's new state)."""
        now = self._now()
        tier = self.checkpoints[node.name].get(model, Tier.REMOTE)
        joined = self._loading.get((node.name, model))
        if joined is not None and joined > now:
            return SimulatedStart(instance, node.name, tier, joined - now, 0.0, node.overhead_s)
        if tier == Tier.DEVICE:
            return SimulatedStart(instance, node.name, tier, 0.0, 0.0, node.overhead_s)
        begin = max(now, self._loader_free[node.name])
        inv = NodeInventory(node.name, dict(node.bandwidth))
        load_s = inv.load_seconds(self.model_sizes.get(model, GB), tier, model)
        self._loader_free[node.name] = self._loading[(node.name, model)] = begin + load_s
        return SimulatedStart(instance, node.name, tier, begin - now, load_s, node.overhead_s)

    async def start(self, service: ServiceConfig, node: str, instance_id: str, tier: str) -> InstanceRecord:
        await asyncio.sleep(0)
        model = service.model.uri if service.model else ""
        sim = self._simulate(self.nodes[node], model, instance_id)
        self.starts.append(sim)
        rec = InstanceRecord(instance_id, service.key, node, next(self._ports), next(self._ports), tier=tier,
                             started_at=time.time())
        self._instances[rec.id] = rec
        self.generations_of[rec.id] = []
        if self.eager_events:
            await self._become_ready(rec, model, sim)
            return rec
        task = asyncio.ensure_future(self._become_ready(rec, model, sim))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return rec

    async def _become_ready(self, rec: InstanceRecord, model: str, sim: SimulatedStart) -> None:
        await asyncio.sleep(sim.latency_s * self.time_scale)
        if rec.state != InstanceState.STARTING:
            return
        if sim.tier != Tier.DEVICE:  # the loaded checkpoint stays in the node's DRAM tier
            have = self.checkpoints[rec.node].get(model)
            if have is None or Tier.DRAM.rank < have.rank:
                self.checkpoints[rec.node][model] = Tier.DRAM
        if rec.service in self.fail:
            self._instances.pop(rec.id, None)
            await self._emit(InstanceEvent(EventKind.FAILED, rec.id, rec.node, "simulated failure"))
            return
        # Times as the simulation has them, so calibration learns the simulated rates and overheads.
        rec.lease = {"lease_requested": rec.started_at, "lease_complete": rec.started_at + sim.queue_s + sim.load_s,
                     "source": str(sim.tier), "bytes": self.model_sizes.get(model, GB)}
        rec.ready_at = rec.started_at + sim.latency_s
        await self._emit(InstanceEvent(EventKind.READY, rec.id, rec.node))

    async def _emit(self, event: InstanceEvent) -> None:
        for handler in self._handlers:
            await handler(event)

    def subscribe(self, handler: EventHandler) -> None:
        self._handlers.append(handler)

    def instances(self) -> list[InstanceRecord]:
        return list(self._instances.values())

    async def generations(self, rec: InstanceRecord, timeout_s: float = 1.0) -> list[dict[str, Any]] | None:
        await asyncio.sleep(0)
        if rec.id not in self._instances:
            return None
        return [dict(g) for g in self.generations_of.get(rec.id, [])]

    async def stop(self, rec: InstanceRecord, grace_s: float = 10.0) -> None:
        rec.state = InstanceState.STOPPING
        if self.stop_s:  # only then a yield point: a stop of no time stays one step
            await asyncio.sleep(self.stop_s * self.time_scale)
        self._instances.pop(rec.id, None)
        self.generations_of.pop(rec.id, None)
        rec.state = InstanceState.STOPPED
        self.stopped.append(rec.id)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    # -- what tests do to the simulated instances ------------------------------------------

    def add_generation(self, instance: str, position: int = 100) -> str:
        """A generation running on `instance` with `position` tokens (prompt + generated)."""
        gid = f"cmpl-{next(self._gen_ids)}"
        self.generations_of[instance].append({"id": gid, "status": "running", "position": position, "cached": 0})
        return gid

    def finish_generations(self, instance: str) -> None:
        self.generations_of[instance] = []

    async def crash(self, instance: str) -> None:
        """The instance's process goes away on its own."""
        rec = self._instances.pop(instance)
        self.generations_of.pop(instance, None)
        await self._emit(InstanceEvent(EventKind.EXITED, rec.id, rec.node, "simulated crash"))

    async def settle(self) -> None:
        """Until every start under way has become ready or failed."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


class MemoryActivator:
    """The activator's admin API over a MemoryBackend: rotations, and migrations that move the
    simulated generations. `hold`, when set, is waited for before a migration moves anything;
    `migrating` is set as soon as one is asked for; `outcome` is what each generation gets."""

    def __init__(self, backend: MemoryBackend) -> None:
        self.backend = backend
        self.rotation: dict[str, list[str]] = {}
        self.migrations: list[tuple[str, str | None]] = []  # (source, destination asked for)
        self.hold: asyncio.Event | None = None
        self.migrating = asyncio.Event()
        self.outcome = MigrationOutcome.MIGRATED
        self.refuse = False
        self.on_the_way: dict[str, int] = {}  # requests sent to an instance that it has not seen yet

    async def push_endpoints(self, service: ServiceConfig, ready: Sequence[InstanceRecord]) -> None:
        self.rotation[service.key] = [r.id for r in ready]

    async def remove(self, service: str) -> None:
        self.rotation.pop(service, None)

    def replica_started(self) -> None:
        """Nothing to resend: every push carries the whole rotation."""

    async def outstanding(self, service: ServiceConfig, instance: str) -> int | None:
        return self.on_the_way.get(instance, 0)

    async def migrate(self, service: ServiceConfig, source: str,
                      destination: str | None) -> list[MigrationResult] | None:
        self.migrations.append((source, destination))
        self.migrating.set()
        if self.hold is not None:
            await self.hold.wait()
        others = [i for i in self.rotation.get(service.key, []) if i != source]
        target = destination or (others[0] if others else None)
        if self.refuse or target is None:
            return None
        moving = self.backend.generations_of.get(source, [])
        results = [MigrationResult(g["id"], self.outcome, int(g["position"]), 0.1,
                                   target if self.outcome.moved else None,
                                   {"id": g["id"], "outcome": str(self.outcome), "tokens": g["position"]})
                   for g in moving]
        if self.outcome.moved:
            self.backend.generations_of.setdefault(target, []).extend(moving)
        if self.outcome != MigrationOutcome.STAYED_ON_SOURCE:
            self.backend.generations_of[source] = []
        return results

    async def close(self) -> None:
        pass
