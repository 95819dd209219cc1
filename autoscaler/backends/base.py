"""The seam between the control loop and a cluster: what the autoscaler asks of a backend.

The controller (`autoscaler.controller`) depends on `Backend` only. `LocalBackend` runs
instances as processes on this machine (loader sidecars and zygotes); `MemoryBackend`
simulates nodes and instances in memory for tests; a Kubernetes backend would do the same
through pods, scheduling gates and NodeCaches.

What a backend covers:

- nodes: `node_slots` (instance slots per node), `inventories` (for placement: the
  checkpoints each node's loader holds, by tier, and its measured bandwidths), `describe_node`
  (the same for people), `model_size`;
- instances: `start` one of a service on a node, `stop` one (SIGTERM and a grace period for it
  to drain), `instances` (those it runs, with their state), `generations` (what one runs now);
- the loader: `warm` a checkpoint on a node now, before the instance asks for it;
- events: `subscribe` a handler, called with an `InstanceEvent` when an instance becomes
  ready, fails to start, or exits without being stopped. Events for an instance come after
  `start` returned its record, one at a time per instance.

Instance state belongs to the record (`InstanceRecord.state`): the backend sets STARTING,
STOPPING and STOPPED; the controller sets READY (on the READY event), DRAINING and FAILED.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Mapping
from enum import Enum
from typing import Any, Protocol, runtime_checkable

from sllm_knative.config import ServiceConfig
from sllm_knative.placement import NodeInventory, Tier


class InstanceState(str, Enum):
    STARTING = "starting"  # placed; loading its checkpoint and starting
    READY = "ready"  # serving: in the activator's rotation
    DRAINING = "draining"  # out of rotation; its generations migrate or finish before it stops
    STOPPING = "stopping"  # being stopped (SIGTERM, then SIGKILL after the grace period)
    STOPPED = "stopped"  # gone
    FAILED = "failed"  # did not become ready; stopped

    def __str__(self) -> str:
        return self.value


#: A node's tier rates until its loader has measured them (the loader probes disk and DRAM at
#: start; a remote store is measured on its first transfer). Bytes per second.
FALLBACK_BANDWIDTH = {Tier.REMOTE: 100e6, Tier.SSD: 500e6, Tier.DRAM: 5e9}

#: States in which an instance holds a slot of its node: it counts among its service's instances,
#: and placement may see it as a victim or a migration destination.
OCCUPYING = (InstanceState.STARTING, InstanceState.READY, InstanceState.DRAINING)

#: States in which an instance's process still takes up its node's slot: the above, and a stopping
#: one until its process has exited. It holds its device memory and DRAM lease until then, and on
#: Kubernetes its pod's GPU request (the scheduler counts it until the pod is gone). Out of its
#: service's count and nobody's victim, a stopping instance still leaves no slot free.
HOLDING_SLOT = (*OCCUPYING, InstanceState.STOPPING)


@dataclasses.dataclass
class InstanceRecord:
    """One instance a backend runs (mutable: its state changes as it lives). Placement's view of
    an instance is `sllm_knative.placement.Instance`, built from this by `autoscaler.view`."""

    id: str
    service: str  # namespace/name
    node: str
    port: int
    internal_port: int  # 0: no internal (migration) API
    pid: int = 0
    state: InstanceState = InstanceState.STARTING
    started_at: float = 0.0  # wall clock
    ready_at: float | None = None
    tier: str = ""  # where the checkpoint was when the instance was placed
    report: dict[str, Any] = dataclasses.field(default_factory=dict)  # the instance's startup report
    timing_path: str = ""
    lease: dict[str, Any] = dataclasses.field(default_factory=dict)  # when its checkpoint lease completed
    host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        self.state = InstanceState(self.state)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def internal_url(self) -> str:
        return f"http://{self.host}:{self.internal_port}"

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "state": self.state.value}


class EventKind(str, Enum):
    READY = "ready"  # answers its readiness probe (the record carries ready_at, report, lease)
    FAILED = "failed"  # did not become ready (exited while starting, or timed out)
    EXITED = "exited"  # a ready instance went away without being stopped
    # Kubernetes: the cluster made an instance of `service` nobody asked for (a Deployment's
    # initial scale, a replacement): place it as a scale-up; the intent is paired with it.
    UNPLANNED = "unplanned"
    # Kubernetes: an instance that was running before this process started (a restart): take
    # its record (`Backend.instances()`) into the service's instances; READY follows.
    ADOPTED = "adopted"

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True)
class InstanceEvent:
    kind: EventKind
    instance: str
    node: str
    detail: str = ""
    service: str = ""  # namespace/name; set for UNPLANNED and ADOPTED


EventHandler = Callable[[InstanceEvent], Awaitable[None]]


@runtime_checkable
class Backend(Protocol):
    #: Every node is a process group on one machine (the local backend): the nodes' measured
    #: rates and start times are that machine's, and the scaler pools them across nodes (the
    #: probes with `pool_tier_rates`, what it learns with `Calibration.pooled`).
    one_machine: bool

    def node_slots(self) -> Mapping[str, int]:
        """Instance slots per node, every node the backend has."""
        ...

    async def inventories(self) -> list[NodeInventory]:
        """Every reachable node as placement sees it before the controller adds what it runs
        there: checkpoints by tier and measured bandwidths; `free_slots` is the node's slot
        count, `instances` and `load_queue` are empty. A node that does not answer is left out."""
        ...

    def nodes_for(self, service: ServiceConfig) -> set[str] | None:
        """The nodes `service`'s instances may run on (its nodeSelector against the nodes'
        labels), None when any node may."""
        ...

    async def describe_node(self, node: str) -> dict[str, Any]:
        """For people (`GET /v1/nodes`): `tiers` (name, capacity, used, checkpoints) and
        `bandwidths` (hop -> bytes/s). Raises when the node does not answer."""
        ...

    def model_size(self, model: str) -> int | None:
        """The checkpoint's size in bytes, once a node has reported it."""
        ...

    async def warm(self, node: str, model: str) -> None:
        """Tell the node's loader to start moving the checkpoint towards the device now (no wait)."""
        ...

    async def start(self, service: ServiceConfig, node: str, instance_id: str, tier: str) -> InstanceRecord:
        """Start an instance of `service` on `node`; its record is STARTING. READY or FAILED follows as an event."""
        ...

    async def stop(self, rec: InstanceRecord, grace_s: float = 10.0) -> None:
        """Stop the instance: it may drain for `grace_s` (its SIGTERM handoff), then it is killed."""
        ...

    def instances(self) -> list[InstanceRecord]:
        """The instances this backend runs (not yet stopped), with their state."""
        ...

    async def generations(self, rec: InstanceRecord, timeout_s: float = 1.0) -> list[dict[str, Any]] | None:
        """The generations the instance runs (`GET /internal/v1/generations`: id, status,
        position), None when it does not answer."""
        ...

    def subscribe(self, handler: EventHandler) -> None:
        """Call `handler` with every instance event from now on."""
        ...

    async def close(self) -> None: ...


async def emit_to(handlers: list[EventHandler], event: InstanceEvent) -> None:
    """Call every handler with `event`; a handler's failure is logged and does not stop the others."""
    from sllm_knative.log import get_logger

    for handler in handlers:
        try:
            await handler(event)
        except Exception:
            get_logger("autoscaler.backend").error("instance event handler failed", exc_info=True,
                                                   instance=event.instance, node=event.node)
