"""The planner's view of the cluster, built from what the controller runs (pure).

A backend reports each node as its loader sees it (`Backend.inventories`); the controller
knows what it runs there: the instances holding a slot (`instance_view`), the slots reserved
for starts under way, and the loads in flight (instances starting, each loading its
checkpoint through the node's loader, one load at a time). `occupy` puts them together into
the `NodeInventory` that `place` takes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from autoscaler.backends.base import InstanceRecord, InstanceState
from sllm_knative.placement import Instance, NodeInventory, QueuedLoad, Tier


def running_generations(generations: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The entries of an instance's generation list that still compute: waiting or running (a
    parked prefill only waits for a migration; detached and finished ones are done)."""
    return [g for g in generations or [] if g.get("status") in ("waiting", "running")]


def instance_view(rec: InstanceRecord, *, model: str, size_bytes: int, capacity: int, priority: int,
                  migration: bool, outstanding: int, generations: list[dict[str, Any]] | None,
                  protected: bool = False, service_waiting: int = 0, service_instances: int = 1) -> Instance:
    """The planner's view of a live instance.

    `outstanding` is the activator's count of requests routed to it (reported every second);
    `generations` the instance's own list (`GET /internal/v1/generations`: id, status,
    position), None when it was not asked or did not answer. In flight is the larger of the
    two (either may lag the other by a moment); tokens are the positions (prompt plus
    generated) of its waiting and running generations, what a migration recomputes. It can
    be migrated only when ready with an internal API and its policy allows migration. Without
    an answer it is not known to be idle (`answered`). `protected`, `service_waiting` and
    `service_instances` are its service's overload facts (see `Instance`)."""
    running = running_generations(generations)
    ready = rec.state == InstanceState.READY
    inflight = max(outstanding, len(running))
    # Its KV slots are its concurrency plus its parked slots (the function's default: as many):
    # what runs beyond the concurrency limit (resumed migrations) and what is parked use them up.
    parked = sum(1 for g in generations or [] if g.get("status") == "parked")
    reserve = max(0, capacity - parked - max(0, inflight - capacity))
    return Instance(
        name=rec.id, model=model, size_bytes=size_bytes, service=rec.service,
        inflight=inflight,
        tokens=sum(int(g.get("position", 0)) for g in running),
        capacity=capacity, priority=priority,
        migratable=migration and ready and bool(rec.internal_port),
        ready=ready, answered=generations is not None, protected=protected,
        service_waiting=service_waiting, service_instances=max(1, service_instances),
        reserve=reserve,
    )


def is_protected(ready_since: float | None, min_residency_s: float, now: float) -> bool:
    """Fresh: ready (since `ready_since`; None: not ready yet) for less than its minimum residency."""
    return ready_since is not None and now - ready_since < min_residency_s


@dataclasses.dataclass(frozen=True)
class LoadInFlight:
    """A checkpoint on its way to the device on `node`: an instance starting there, or a start
    about to begin in a reserved slot. `since` is when it began (wall clock)."""

    node: str
    model: str
    size_bytes: int
    tier: Tier
    since: float


def parse_tier(name: str) -> Tier | None:
    try:
        return Tier(name)
    except ValueError:
        return None


def load_queue(loads: Iterable[LoadInFlight], node: NodeInventory, now: float) -> tuple[QueuedLoad, ...]:
    """The node's loader queue as the load-time model takes it: the loads in flight there, first
    started first, each with the bytes still to move after `now - since` seconds at the node's
    rate for its tier (a resident checkpoint moves nothing). Pass a calibrated `node`."""
    out = []
    for load in sorted((x for x in loads if x.node == node.name), key=lambda x: (x.since, x.model)):
        if load.tier == Tier.DEVICE:
            remaining = 0
        else:
            moved = max(0.0, now - load.since) * node.rate(load.tier, load.model)
            remaining = max(0, int(load.size_bytes - moved))
        out.append(QueuedLoad(load.model, remaining, load.tier))
    return tuple(out)


def occupy(node: NodeInventory, *, slots: int, used: int, instances: tuple[Instance, ...],
           queue: tuple[QueuedLoad, ...]) -> NodeInventory:
    """`node` (as its backend reported it) with what the controller runs there: `used` of its
    `slots` taken (instances holding one, plus reservations), those instances, its load queue."""
    return dataclasses.replace(node, free_slots=max(0, slots - used), instances=instances, load_queue=queue)


def occupy_all(nodes: Iterable[NodeInventory], slots: Mapping[str, int], used: Mapping[str, int],
               instances: Mapping[str, tuple[Instance, ...]], loads: Iterable[LoadInFlight], now: float,
               calibrate: Callable[[NodeInventory], NodeInventory] | None = None) -> list[NodeInventory]:
    """`occupy` for every node; `calibrate` (a Calibration's `apply`) gives the rates the queue
    estimate uses."""
    loads = list(loads)
    out = []
    for n in nodes:
        rated = calibrate(n) if calibrate is not None else n
        out.append(occupy(n, slots=slots.get(n.name, n.free_slots), used=used.get(n.name, 0),
                          instances=instances.get(n.name, ()), queue=load_queue(loads, rated, now)))
    return out
