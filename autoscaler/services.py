"""The service table: every Knative Service the autoscaler scales, with its decider state, its
instances and what it last decided, placed and migrated.

Each service has its own lock (`ServiceRuntime.lock`): one scaling action of a service at a
time, while other services scale at once (slots are shared through `autoscaler.slots`).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from typing import Any

from autoscaler.backends.base import HOLDING_SLOT, OCCUPYING, InstanceRecord, InstanceState
from autoscaler.decider import DeciderSpec, DeciderState, initial_state, spec_for
from autoscaler.window import MetricWindow
from sllm_knative.config import Manifest, ScalingPolicy, ServiceConfig, policy_for

MIGRATIONS_KEPT = 20  # the latest migration results of a service, for `sllm-knative get`
MIN_RESIDENCY_S = 10.0  # a new instance is not displaced for another service this long (ScalingPolicy minResidency)
FAIR_SHARE_AFTER_S = 15.0  # a request waiting this long takes an instance of a service holding two (fairShareAfter)
START_BACKOFF_S, START_BACKOFF_MAX_S = 5.0, 300.0  # after failed starts in a row: 5, 10, 20 s ... 5 min


def start_backoff_s(failed_starts: int) -> float:
    """How long a service waits before its next start after `failed_starts` failures in a row (pure)."""
    if failed_starts <= 0:
        return 0.0
    return min(START_BACKOFF_MAX_S, START_BACKOFF_S * 2 ** min(failed_starts - 1, 16))


@dataclasses.dataclass
class ServiceRuntime:
    config: ServiceConfig
    policy: ScalingPolicy | None
    spec: DeciderSpec
    state: DeciderState
    window: MetricWindow
    last_request_at: float | None = None
    in_flight: int = 0
    # From the activator's last report: requests waiting for an instance with room, how long the
    # oldest of them had waited, and when the report came (the autoscaler's clock).
    held: int = 0
    oldest_held_s: float = 0.0
    stats_at: float | None = None
    instances: dict[str, InstanceRecord] = dataclasses.field(default_factory=dict)
    outstanding: dict[str, int] = dataclasses.field(default_factory=dict)
    last_decision: str = ""
    decided: bool = False  # the decider has had data since this process started
    excess_burst_capacity: int = -1  # from the last valid decision (-1: the activator stays in the path)
    placements: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    migrations: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # the latest migration results
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock, repr=False)
    # Instances another service's preemption is taking away (victims) or moving generations
    # onto (destinations): neither is displaced nor chosen for scale-down meanwhile; a victim
    # no longer counts towards the service's scale.
    leaving: set[str] = dataclasses.field(default_factory=set)
    pinned: set[str] = dataclasses.field(default_factory=set)
    # Starts that failed in a row (a checkpoint that cannot be loaded, a crashing image), why the
    # last did, and when the next start may be tried (the scaler's clock): a backoff, not a loop.
    failed_starts: int = 0
    last_failure: str = ""
    retry_at: float = 0.0

    @property
    def key(self) -> str:
        return self.config.key

    @property
    def model(self) -> str:
        return self.config.model.uri if self.config.model else ""

    @property
    def priority(self) -> int:
        return self.policy.priority if self.policy else 0

    @property
    def migration(self) -> bool:
        return self.policy.migration if self.policy else True

    @property
    def min_residency_s(self) -> float:
        p = self.policy
        return p.min_residency if p is not None and p.min_residency is not None else MIN_RESIDENCY_S

    @property
    def fair_share_after_s(self) -> float:
        p = self.policy
        return p.fair_share_after if p is not None and p.fair_share_after is not None else FAIR_SHARE_AFTER_S

    def waited_s(self, now: float) -> float:
        """How long its longest-waiting request has waited by `now` (0 with none waiting)."""
        if not self.held or self.stats_at is None:
            return 0.0
        return self.oldest_held_s + max(0.0, now - self.stats_at)

    def ready(self) -> list[InstanceRecord]:
        return [i for i in self.instances.values() if i.state == InstanceState.READY]

    def live(self) -> list[InstanceRecord]:
        """Starting and ready instances."""
        return [i for i in self.instances.values() if i.state in (InstanceState.STARTING, InstanceState.READY)]

    def counted(self) -> list[InstanceRecord]:
        """The live instances scaling counts: less the victims of a preemption under way (they are going)."""
        return [i for i in self.live() if i.id not in self.leaving]

    def claimed(self) -> set[str]:
        return self.leaving | self.pinned

    def record_migrations(self, results: list[dict[str, Any]]) -> None:
        self.migrations.extend(results)
        del self.migrations[:-MIGRATIONS_KEPT]

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key, "model": self.model or None,
            "desired": self.state.scale, "ready": len(self.ready()), "in_flight": self.in_flight,
            "decision": self.last_decision,
            "policy": f"{self.policy.namespace}/{self.policy.name}" if self.policy else None,
            "instances": [i.to_json() for i in self.instances.values()],
            "placements": self.placements[-10:],
            "migrations": self.migrations[-10:],
            "failed_starts": self.failed_starts, "last_failure": self.last_failure or None,
        }


class ServiceTable:
    def __init__(self) -> None:
        self.services: dict[str, ServiceRuntime] = {}
        self.policies: list[ScalingPolicy] = []

    def get(self, key: str) -> ServiceRuntime | None:
        return self.services.get(key)

    def __iter__(self) -> Iterator[ServiceRuntime]:
        return iter(list(self.services.values()))

    def apply(self, manifest: Manifest, now: float) -> tuple[list[str], list[ServiceRuntime]]:
        """Services and policies from YAML: the change lines and the services it names."""
        changes = []
        new = {(q.namespace, q.name) for q in manifest.policies}
        self.policies = [p for p in self.policies if (p.namespace, p.name) not in new] + list(manifest.policies)
        for p in manifest.policies:
            changes.append(f"scalingpolicy/{p.namespace}/{p.name} configured")
        touched = []
        for svc in manifest.services:
            policy = policy_for(svc, self.policies)
            spec = spec_for(svc, manifest.autoscaler, policy)
            rt = self.services.get(svc.key)
            if rt is None:
                rt = ServiceRuntime(svc, policy, spec, initial_state(spec, now), MetricWindow(spec.stable_window))
                self.services[svc.key] = rt
                changes.append(f"service/{svc.key} created")
            else:
                rt.config, rt.policy, rt.spec = svc, policy, spec
                changes.append(f"service/{svc.key} configured")
            touched.append(rt)
        for rt in self:  # policies may now match other services
            policy = policy_for(rt.config, self.policies)
            if policy != rt.policy:
                rt.policy, rt.spec = policy, spec_for(rt.config, manifest.autoscaler, policy)
        return changes, touched

    def remove(self, key: str) -> ServiceRuntime | None:
        return self.services.pop(key, None)

    def find(self, instance_id: str) -> tuple[ServiceRuntime, InstanceRecord] | None:
        for rt in self.services.values():
            rec = rt.instances.get(instance_id)
            if rec is not None:
                return rt, rec
        return None

    def occupying(self, states: tuple[InstanceState, ...] = OCCUPYING) -> list[tuple[ServiceRuntime, InstanceRecord]]:
        """Every instance holding a slot (in one of `states`), with its service."""
        return [(rt, rec) for rt in self.services.values() for rec in rt.instances.values() if rec.state in states]

    def slots_in_use(self) -> dict[str, int]:
        """Slots taken, per node: the instances holding one, and the stopping ones until their
        processes exit (`HOLDING_SLOT`)."""
        out: dict[str, int] = {}
        for _, rec in self.occupying(HOLDING_SLOT):
            out[rec.node] = out.get(rec.node, 0) + 1
        return out

    def snapshot(self) -> dict[str, Any]:
        return {"services": [rt.to_json() for rt in self.services.values()]}
