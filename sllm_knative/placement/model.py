"""The load-time model: node inventories in, estimated startup time out. Pure, no I/O.

    startup(m, n) = queue_wait(n) + S / bandwidth(n, tier(m, n)) + instance_overhead(n)

`tier(m, n)` is the fastest tier of node n holding model m (device = already resident, DRAM,
SSD, else the remote store); `bandwidth(n, t)` is the node's measured rate for loading from
tier t into the device (bytes/s; see `calibration` for the online updates); from the remote
tier it is the rate of the store that holds m (`remote_bandwidth`, by store URI) when that
store has been measured, else the node's remote rate; a load from the SSD or the store goes
through the DRAM tier, so it is bounded by the DRAM hop's rate too; `queue_wait(n)`
is the time for the loads already queued on n to finish: the node's loader runs one load at
a time, first in first out. A model that is already in n's queue is not loaded twice: the new
instance waits for that load to finish.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum


class Tier(str, Enum):
    """Where a checkpoint is, fastest first."""

    DEVICE = "device"
    DRAM = "dram"
    SSD = "ssd"
    REMOTE = "remote"

    @property
    def rank(self) -> int:
        """0 for the fastest tier (device), 3 for the remote store."""
        return TIERS.index(self)

    def __str__(self) -> str:
        return self.value


TIERS = (Tier.DEVICE, Tier.DRAM, Tier.SSD, Tier.REMOTE)


@dataclass(frozen=True)
class QueuedLoad:
    """A load waiting for (or running on) a node's loader: `remaining_bytes` still to move from `tier`."""

    model: str
    remaining_bytes: int
    tier: Tier

    def __post_init__(self) -> None:
        if self.remaining_bytes < 0:
            raise ValueError(f"queued load of {self.model}: remaining_bytes must be >= 0, got {self.remaining_bytes}")


@dataclass(frozen=True)
class Instance:
    """A running instance occupying a slot. `tokens` counts the prompt and generated tokens of
    its in-flight generations (what a migration must recompute); `remaining_s` is the expected
    time until they all end (None when unknown); `capacity` is its containerConcurrency
    (0 = unlimited). `ready` is False while it starts or drains: it holds its slot but is
    neither stopped, migrated, nor a migration destination.

    What keeps it from being displaced for another service (decide.py, "Overload"): `answered`
    is False when its own generation list was not read (then it is not known to be idle);
    `protected` while it is fresh (started for waiting requests, within its minimum
    residency); `service_waiting` counts its service's requests waiting for capacity;
    `service_instances` how many instances its service holds (fair share takes one of a
    service that holds more than one)."""

    name: str
    model: str
    size_bytes: int
    inflight: int = 0
    tokens: int = 0
    capacity: int = 0
    remaining_s: float | None = None
    priority: int = 0
    migratable: bool = True
    ready: bool = True
    answered: bool = True
    protected: bool = False
    service_waiting: int = 0
    service_instances: int = 1
    # The service it belongs to. Services may share a checkpoint (`model`) but not instances: a
    # generation moves only onto an instance of its own service. Empty: the model names it.
    service: str = ""
    # Generations it can take beyond `capacity` as a migration destination: its free parked
    # prefill slots. A prefilled resume is admitted at the concurrency limit (the parked slot
    # is its reservation), so a sibling at its limit can still receive a victim's generation.
    reserve: int = 0

    def __post_init__(self) -> None:
        if self.size_bytes <= 0:
            raise ValueError(f"instance {self.name}: size_bytes must be > 0, got {self.size_bytes}")
        if self.service_waiting < 0 or self.service_instances < 1 or self.reserve < 0:
            raise ValueError(f"instance {self.name}: service_waiting and reserve must be >= 0, service_instances >= 1")
        if self.inflight < 0 or self.tokens < 0 or self.capacity < 0:
            raise ValueError(f"instance {self.name}: inflight, tokens and capacity must be >= 0")
        if self.remaining_s is not None and not (self.remaining_s >= 0 and math.isfinite(self.remaining_s)):
            raise ValueError(f"instance {self.name}: remaining_s must be a finite number >= 0, got {self.remaining_s}")

    @property
    def idle(self) -> bool:
        """Nothing routed to it and nothing in its own generation list (which must have answered)."""
        return self.inflight == 0 and self.answered

    def spare(self) -> float:
        """How many more generations it can take (inf when its concurrency is unlimited)."""
        return math.inf if self.capacity == 0 else max(0, self.capacity - self.inflight)

    @property
    def owner(self) -> str:
        """Its service (the model where no service is given)."""
        return self.service or self.model

    def receivable(self) -> float:
        """How many migrated generations it can take: its spare room plus its reserve."""
        return self.spare() + self.reserve


@dataclass(frozen=True)
class NodeInventory:
    """What the planner knows about one node. `bandwidth` maps a tier to bytes/s for loading
    from it into the device; it must cover the remote store and every tier named in
    `checkpoints` and `load_queue` (a device-resident checkpoint needs no bandwidth: it loads
    in no time unless `bandwidth[DEVICE]` says otherwise)."""

    name: str
    bandwidth: Mapping[Tier, float]
    checkpoints: Mapping[str, Tier] = field(default_factory=dict)
    load_queue: tuple[QueuedLoad, ...] = ()
    free_slots: int = 1
    instances: tuple[Instance, ...] = ()
    instance_overhead_s: float = 0.0
    # Seconds from the decision to stop an idle instance here to its slot being free (take it out
    # of rotation, check it is still idle, stop the process): what an EVICT waits before the new
    # instance starts. 0 until a stop is observed (calibration.observe_stop: preemptions and scale-downs).
    instance_stop_s: float = 0.0
    # Measured rates of individual stores (store URI -> bytes/s): a model under one of them
    # loads from the remote tier at its store's rate, not the node's `bandwidth[REMOTE]`.
    remote_bandwidth: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("node name cannot be empty")
        for tier, bw in self.bandwidth.items():
            if not (bw > 0 and math.isfinite(bw)):
                raise ValueError(f"node {self.name}: bandwidth[{tier}] must be a finite number > 0, got {bw}")
        needed = {Tier.REMOTE} | {t for t in self.checkpoints.values() if t != Tier.DEVICE}
        needed |= {q.tier for q in self.load_queue if q.tier != Tier.DEVICE}
        missing = sorted(str(t) for t in needed - set(self.bandwidth))
        if missing:
            raise ValueError(f"node {self.name}: no bandwidth for tier(s) {', '.join(missing)}")
        if self.free_slots < 0:
            raise ValueError(f"node {self.name}: free_slots must be >= 0, got {self.free_slots}")
        if not (self.instance_overhead_s >= 0 and math.isfinite(self.instance_overhead_s)):
            raise ValueError(f"node {self.name}: instance_overhead_s must be >= 0, got {self.instance_overhead_s}")
        if not (self.instance_stop_s >= 0 and math.isfinite(self.instance_stop_s)):
            raise ValueError(f"node {self.name}: instance_stop_s must be >= 0, got {self.instance_stop_s}")
        for store, bw in self.remote_bandwidth.items():
            if not (bw > 0 and math.isfinite(bw)):
                raise ValueError(f"node {self.name}: remote_bandwidth[{store}] must be a finite number > 0, got {bw}")

    def tier_of(self, model: str) -> Tier:
        """The fastest tier of this node holding `model` (REMOTE when it holds none)."""
        return self.checkpoints.get(model, Tier.REMOTE)

    def rate(self, tier: Tier, model: str = "") -> float:
        """Bytes/s for loading `model` from `tier` into the device (remote: its store's rate).

        A load from the SSD or the store passes through the DRAM tier on its way to the device
        (pipelined behind the fill), so it is never faster than the DRAM tier's own hop: a fast
        local store (a file:// path in the page cache) must not make a remote load look quicker
        than the DRAM copy another node already holds."""
        bw = self.bandwidth[tier]
        if tier == Tier.REMOTE:
            store = store_of(model, self.remote_bandwidth)
            if store is not None:
                bw = self.remote_bandwidth[store]
        if tier in (Tier.SSD, Tier.REMOTE) and Tier.DRAM in self.bandwidth:
            bw = min(bw, self.bandwidth[Tier.DRAM])
        return bw

    def load_seconds(self, size_bytes: int, tier: Tier, model: str = "") -> float:
        if tier == Tier.DEVICE and Tier.DEVICE not in self.bandwidth:
            return 0.0
        return size_bytes / self.rate(tier, model)


def pool_store_rates(nodes: Sequence[NodeInventory]) -> list[NodeInventory]:
    """Every node with the store rates measured anywhere: a store's rate is a property of the
    store and the network more than of the node, so a node that has not fetched from a store
    yet borrows the mean of the nodes that have (its own measurements stay as they are)."""
    seen: dict[str, list[float]] = {}
    for n in nodes:
        for store, bw in n.remote_bandwidth.items():
            seen.setdefault(store, []).append(bw)
    pooled = {store: sum(v) / len(v) for store, v in seen.items()}
    return [n if set(n.remote_bandwidth) == set(pooled)
            else replace(n, remote_bandwidth={**pooled, **n.remote_bandwidth}) for n in nodes]


#: The tiers whose rates are the machine's own (memory, disk, the device's link), pooled by
#: `pool_tier_rates` where every node is the same machine.
MACHINE_TIERS = (Tier.SSD, Tier.DRAM, Tier.DEVICE)


def pool_tier_rates(nodes: Sequence[NodeInventory]) -> list[NodeInventory]:
    """Every node with the mean of the nodes' SSD, DRAM and device rates: for nodes that are
    one machine (the local backend), whose loaders each probe the same memory and disk once at
    start, while they start together on the same cores. Each probe is noise around one value:
    compared across nodes, a slow probe on the node that holds a checkpoint in DRAM would make a
    remote fetch on another node look faster than that DRAM hit, which on one machine it never
    is (the fetch passes through the same DRAM). Store rates are pooled by `pool_store_rates`."""
    seen: dict[Tier, list[float]] = {}
    for n in nodes:
        for tier in MACHINE_TIERS:
            if tier in n.bandwidth:
                seen.setdefault(tier, []).append(n.bandwidth[tier])
    pooled = {tier: sum(v) / len(v) for tier, v in seen.items()}
    return [replace(n, bandwidth={**n.bandwidth, **pooled}) for n in nodes]


def store_of(model: str, stores: Mapping[str, float]) -> str | None:
    """The most specific store URI that `model` (a checkpoint URI) lies under, at a path
    segment boundary (`http://h/ckpt` holds `http://h/ckpt/a`, not `http://h/ckptx/a`)."""
    best = None
    for store in stores:
        root = store.rstrip("/")
        if model == root or model.startswith(root + "/"):
            if best is None or len(root) > len(best.rstrip("/")):
                best = store
    return best


@dataclass(frozen=True)
class ModelRequest:
    """The model to start: its key (the checkpoint URI), its size, its service's priority.
    `starving`: its service has waited past its fair-share bound, so a service holding more
    than one instance, and more than one more than the asking service holds (`holding`), gives
    one up for it (decide.py, "Overload"). `idle`: its service has no request waiting or
    running, and only its keep-alive, initialScale or minScale asks for the instance: it takes a
    free slot and displaces no instance of its own priority (else two services whose
    keep-alives both run evict each other's instance in turn, each re-created for no request)."""

    model: str
    size_bytes: int
    priority: int = 0
    starving: bool = False
    service: str = ""  # the service asking (empty: the model names it; see Instance.service)
    holding: int = 0  # instances the asking service holds already (fair share evens the counts out)
    idle: bool = False  # no request of the asking service waits or runs: no displacing its own priority

    @property
    def owner(self) -> str:
        return self.service or self.model

    def __post_init__(self) -> None:
        if self.size_bytes <= 0:
            raise ValueError(f"model {self.model}: size_bytes must be > 0, got {self.size_bytes}")


@dataclass(frozen=True)
class Estimate:
    """startup(m, n) split into its terms. When `joined` is true the model is already in the
    node's load queue: `queue_wait_s` runs until that load ends and `load_s` is 0.

    `hop_s` is the part of `load_s` that only the started instance can do: the last hop, from
    the DRAM tier into the device. A load from the SSD or the store fills the DRAM tier first,
    and that fill needs no slot: a checkpoint warmed while a victim stops (a preemption's
    successor, `decide.Option.total_s`) is only the hop away once the slot is free. For a
    checkpoint already in DRAM (or on the device) the hop is the whole load, as it is when
    `hop_s` is None."""

    node: str
    tier: Tier
    queue_wait_s: float
    load_s: float
    overhead_s: float
    joined: bool = False
    hop_s: float | None = None

    @property
    def last_hop_s(self) -> float:
        return self.load_s if self.hop_s is None else self.hop_s

    @property
    def total_s(self) -> float:
        return self.queue_wait_s + self.load_s + self.overhead_s


def startup(request: ModelRequest, node: NodeInventory) -> Estimate:
    """The estimated time to start `request.model` on `node`, assuming a free slot."""
    waited = 0.0
    for q in node.load_queue:
        waited += node.load_seconds(q.remaining_bytes, q.tier, q.model)
        if q.model == request.model:
            return Estimate(node.name, q.tier, waited, 0.0, node.instance_overhead_s, joined=True)
    tier = node.tier_of(request.model)
    # A resident checkpoint needs no I/O, so it does not queue behind the loader.
    queue = 0.0 if tier == Tier.DEVICE else waited
    load = node.load_seconds(request.size_bytes, tier, request.model)
    hop = load
    if tier in (Tier.SSD, Tier.REMOTE) and Tier.DRAM in node.bandwidth:  # filled into DRAM, then the hop
        hop = min(load, node.load_seconds(request.size_bytes, Tier.DRAM))
    return Estimate(node.name, tier, queue, load, node.instance_overhead_s, hop_s=hop)
