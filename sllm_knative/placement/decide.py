"""Placement: choose where a new instance starts, as a pure function returning a decision value.

Every node yields options, each with an estimated time until the instance is ready:

- PLACE: the node has a free slot: `startup(m, n)`.
- EVICT: no free slot, but an idle instance of another model (kept alive, not serving) with a
  priority no higher than the request's can be stopped: its slot frees after the node's
  `instance_stop_s` (learnt from observed evictions). The successor's checkpoint is warmed at
  the decision, so its fill into DRAM runs during the stop and only the last hop (DRAM to
  device, `Estimate.last_hop_s`) waits for it: `max(stop + hop, queue_wait + load) + overhead`
  (`max(stop, queue_wait) + load + overhead` for a checkpoint already in DRAM).
- MIGRATE: no free slot; a busy, migratable instance of another model with a priority no
  higher than the request's moves its in-flight generations away, either onto a ready
  instance of its own model with room for them (cost `a * tokens + b`) or onto a free slot of
  another node (that node's startup time for its model, plus the same cost). The slot frees
  when the emptied victim has stopped: `max(migration + stop + hop, queue_wait + load) + overhead`,
  warmed as EVICT's.
- WAIT: no free slot; the node's instance expected to finish first frees its slot after
  `remaining_s`: `max(remaining, queue_wait) + load + overhead`.

The option with the smallest estimate wins; ties go to the least disruptive action (PLACE,
EVICT, WAIT, MIGRATE), then the faster tier, then the node name. Instances of the requested
model itself are never displaced (the caller routes to them instead), nor are instances that
are not ready (starting or draining).

Overload (`displaceable`): an instance counts as idle only when nothing is routed to it and
its own generation list answered empty; one whose list did not answer can only be migrated.
A protected instance (fresh: started for waiting requests, within its minimum residency) and
an instance whose own service has requests waiting are not displaced for another service of
the same priority, so two services cannot keep evicting each other's new instances (a higher
priority still displaces them). A request of a service with no request waiting or running
(`ModelRequest.idle`: only its keep-alive, initialScale or minScale wants the instance, as
after its own instance was evicted) displaces no instance of its own priority: it takes a free
slot or waits, as a pending pod does on Kubernetes. Fair share overrides the protections: for
a starving request (its service waited past its bound) a service holding more than one
instance, and at least two more than the asking service, gives one up, its generations
migrated onto a sibling with room: the counts even out instead of trading one slot back and
forth between services that all wait.

`place_within` decides when a request counts as starving: once its service has waited past its
bound, or earlier, at the last moment a fair-share placement (by its own estimate) still brings
the first instance up within the bound while without it the request could only wait.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

from sllm_knative.placement.calibration import Calibration, MigrationCost
from sllm_knative.placement.model import Estimate, Instance, ModelRequest, NodeInventory, startup


class Action(str, Enum):
    PLACE = "place"
    EVICT = "evict"
    WAIT = "wait"
    MIGRATE = "migrate"

    def __str__(self) -> str:
        return self.value


_DISRUPTION = {Action.PLACE: 0, Action.EVICT: 1, Action.WAIT: 2, Action.MIGRATE: 3}


@dataclass(frozen=True)
class Option:
    """One way to start the model on `node`. `free_s` is the time until a slot is free there
    (0 with a free slot); `victim` the instance stopped, migrated or waited for;
    `destination` the instance that receives a migrated instance's generations or, when
    `starts_destination` is set, the node with a free slot where an instance of the victim's
    model must start first to receive them."""

    action: Action
    estimate: Estimate
    free_s: float = 0.0
    victim: str | None = None
    destination: str | None = None
    starts_destination: bool = False
    reason: str = ""

    @property
    def node(self) -> str:
        return self.estimate.node

    @property
    def total_s(self) -> float:
        e = self.estimate
        if self.action in (Action.EVICT, Action.MIGRATE):
            # The successor's checkpoint is warmed at the decision (the autoscaler's
            # `Scaler._scale_up`): its fill into DRAM runs while the victim is emptied and
            # stops, and only the last hop waits for the slot.
            return max(self.free_s + e.last_hop_s, e.queue_wait_s + e.load_s) + e.overhead_s
        return max(self.free_s, e.queue_wait_s) + e.load_s + e.overhead_s

    def _key(self) -> tuple[float, int, int, str]:
        return (self.total_s, _DISRUPTION[self.action], self.estimate.tier.rank, self.node)


@dataclass(frozen=True)
class Placement:
    """The decision. `options` holds every option considered, best first; `estimates` the best
    option of each node; `reasons` says why the chosen one won and why each node lost.
    With no option at all, `action` is WAIT, `node` None and `estimate_s` infinite."""

    action: Action
    node: str | None
    estimate_s: float
    chosen: Option | None
    options: tuple[Option, ...]
    reasons: tuple[str, ...]
    fair_share: bool = False  # decided for a starving request (`place_within`)

    @property
    def estimates(self) -> tuple[Option, ...]:
        return _best_per_node(self.options)


def _best_per_node(options: Sequence[Option]) -> tuple[Option, ...]:
    """The first (best) option of each node, in the order given."""
    seen: set[str] = set()
    best: list[Option] = []
    for o in options:
        if o.node not in seen:
            seen.add(o.node)
            best.append(o)
    return tuple(best)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _rate(bytes_per_s: float) -> str:
    """A bandwidth in GB/s, or in MB/s below 1 GB/s (a slow store is not "0.00 GB/s")."""
    return f"{bytes_per_s / 1e9:.2f} GB/s" if bytes_per_s >= 1e9 else f"{bytes_per_s / 1e6:.1f} MB/s"


def _describe(request: ModelRequest, node: NodeInventory, e: Estimate) -> str:
    if e.joined:
        return f"joins the queued load of {request.model} from {e.tier} ({e.queue_wait_s:.2f}s), start {e.overhead_s:.2f}s"
    parts = []
    if e.queue_wait_s > 0:
        parts.append(f"queue {e.queue_wait_s:.2f}s")
    if e.load_s > 0:
        bw = node.rate(e.tier, request.model)
        parts.append(f"load {e.load_s:.2f}s from {e.tier} ({_gb(request.size_bytes)} at {_rate(bw)})")
    else:
        parts.append(f"checkpoint resident on the {e.tier}")
    parts.append(f"start {e.overhead_s:.2f}s")
    return ", ".join(parts)


@dataclass(frozen=True)
class _Target:
    seconds: float
    destination: str
    starts: bool
    how: str


def _migration_targets(victim: Instance, home: NodeInventory, nodes: Sequence[NodeInventory],
                       cost: MigrationCost) -> _Target | None:
    """The cheapest place for `victim`'s generations: a ready instance of its service with room
    (its reserve included), else a new instance on another node's free slot."""
    move = cost.seconds(victim.tokens)
    best: _Target | None = None
    for n in nodes:
        for other in n.instances:
            if (other.name != victim.name and other.owner == victim.owner and other.ready
                    and other.receivable() >= victim.inflight):
                cand = _Target(move, other.name, False, f"onto instance {other.name} on {n.name}")
                best = cand if best is None or cand.seconds < best.seconds else best
    for n in nodes:
        if n.name == home.name or n.free_slots <= 0:
            continue
        e = startup(ModelRequest(victim.model, victim.size_bytes), n)
        cand = _Target(e.total_s + move, n.name, True, f"onto a new instance on {n.name} ({e.total_s:.2f}s to start)")
        best = cand if best is None or cand.seconds < best.seconds else best
    return best


def displaceable(inst: Instance, request: ModelRequest) -> str | None:
    """Why `inst` may not be stopped or migrated to start `request` (None: it may)."""
    if inst.owner == request.owner:
        return "an instance of the requesting service (requests go to it instead)"
    if inst.priority > request.priority:
        return f"priority {inst.priority} over the request's {request.priority}"
    if not inst.ready:
        return "not ready (starting or draining)"
    if inst.priority < request.priority:
        return None  # a strict order between services: no ping-pong to guard against
    if request.idle:
        return "the requesting service has no request waiting or running (its keep-alive takes only a free slot)"
    if request.starving and inst.service_instances > max(1, request.holding + 1):
        return None  # fair share: a service holding more than one instance, and more than the asker, gives one up
    if inst.protected:
        return "protected (fresh: serving what it was started for, or within its minimum residency)"
    if inst.service_waiting > 0:
        return f"its own service has {inst.service_waiting} request(s) waiting"
    return None


def _options(request: ModelRequest, node: NodeInventory, nodes: Sequence[NodeInventory],
             cost: MigrationCost) -> Iterable[Option]:
    e = startup(request, node)
    base = _describe(request, node, e)
    if node.free_slots > 0:
        yield Option(Action.PLACE, e, reason=f"free slot; {base}")
        return
    ending = [i for i in node.instances if i.remaining_s is not None]
    if ending:
        first = min(ending, key=lambda i: (i.remaining_s, i.name))
        yield Option(Action.WAIT, e, free_s=first.remaining_s or 0.0, victim=first.name,
                     reason=f"no free slot; {first.name} expected to finish in {first.remaining_s:.2f}s; {base}")
    stop = node.instance_stop_s  # a victim's slot frees once it has stopped, emptied by a migration or idle
    for inst in node.instances:
        if displaceable(inst, request) is not None:
            continue
        if inst.idle:
            yield Option(Action.EVICT, e, free_s=stop, victim=inst.name,
                         reason=f"no free slot; stop idle instance {inst.name} ({inst.model})"
                                f"{f' in {stop:.2f}s' if stop else ''}; {base}")
        elif inst.migratable:
            target = _migration_targets(inst, node, nodes, cost)
            if target is None:
                continue
            yield Option(Action.MIGRATE, e, free_s=target.seconds + stop, victim=inst.name,
                         destination=target.destination, starts_destination=target.starts,
                         reason=f"no free slot; migrate {inst.name} ({inst.inflight} generation(s), "
                                f"{inst.tokens} tokens) {target.how} in {target.seconds:.2f}s"
                                f"{f', then stop it in {stop:.2f}s' if stop else ''}; {base}")


def place(request: ModelRequest, nodes: Sequence[NodeInventory], calibration: Calibration | None = None) -> Placement:
    """Choose the node (and, with no free slot, the instance to evict, migrate or wait for)
    that starts `request` soonest. Calibrated bandwidths and overheads replace the inventory's."""
    cal = calibration or Calibration()
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        raise ValueError(f"node names must be unique, got {names}")
    nodes = [cal.apply(n) for n in nodes]
    options = sorted((o for n in nodes for o in _options(request, n, nodes, cal.migration_cost)), key=Option._key)
    if not options:
        why = "no nodes" if not nodes else (
            "no free slot, no instance that can be stopped or migrated, and no instance with a known end")
        return Placement(Action.WAIT, None, math.inf, None, (), (f"wait for capacity: {why}",), request.starving)
    best = options[0]
    reasons = [f"{best.action} on {best.node}: {best.total_s:.2f}s ({best.reason})"]
    for o in _best_per_node(options)[1:]:
        reasons.append(f"not {o.node}: {o.total_s:.2f}s, {o.total_s - best.total_s:.2f}s slower ({o.action}: {o.reason})")
    return Placement(best.action, best.node, best.total_s, best, tuple(options), tuple(reasons), request.starving)


def place_within(request: ModelRequest, nodes: Sequence[NodeInventory], calibration: Calibration | None,
                 waited_s: float, bound_s: float, period_s: float = 0.0) -> Placement:
    """`place` for a service whose oldest waiting request has waited `waited_s` (0: none waits),
    under its fair-share bound `bound_s`, by a caller that decides again `period_s` later. The
    request is starving (fair share may take an instance of a service holding more than one)
    once it has waited past the bound, and sooner when waiting on would miss it: a placement
    without fair share could only wait, and the next decision would come too late for the
    fair-share placement, by its own estimate, to have the instance up within the bound. Before
    that moment the queue may still drain, and nothing is taken. A placement that can act now
    (a free slot, an idle instance nobody protects) is taken as it is."""
    if waited_s >= bound_s:
        return place(dataclasses.replace(request, starving=True), nodes, calibration)
    plain = place(request, nodes, calibration)
    if (request.starving or waited_s <= 0.0 or plain.action != Action.WAIT
            or waited_s + plain.estimate_s < bound_s):
        return plain
    eager = place(dataclasses.replace(request, starving=True), nodes, calibration)
    if (eager.node is not None and eager.estimate_s < plain.estimate_s
            and waited_s + period_s + eager.estimate_s >= bound_s):
        return eager
    return plain


PLACERS = ("load-time", "random")  # `sllm-knative up --placement`: how a cold start picks its node


def place_by(placer: str, request: ModelRequest, nodes: Sequence[NodeInventory], calibration: Calibration | None,
             pick: Callable[[], float], waited_s: float, bound_s: float, period_s: float) -> Placement:
    """The placement `placer` (one of PLACERS) makes: "random" draws among the free nodes
    (`place_random`, `pick()` the draw, called only then); otherwise, and for "random" with no
    free slot, `place_within` (fair share in time for the bound)."""
    if placer == "random" and any(n.free_slots > 0 for n in nodes):
        return place_random(request, nodes, pick(), calibration)
    return place_within(request, nodes, calibration, waited_s, bound_s, period_s)


def place_random(request: ModelRequest, nodes: Sequence[NodeInventory], pick: float,
                 calibration: Calibration | None = None) -> Placement:
    """The `no-locality` ablation (`up --placement random`): a node drawn at random among those
    with a free slot, whatever tier holds the checkpoint there; `pick` in [0, 1) is the draw
    (node `floor(pick * k)` of the k free nodes sorted by name). With no free slot anywhere it
    decides as `place` (wait, evict or migrate): only the choice among free nodes is blind."""
    if not 0.0 <= pick < 1.0:
        raise ValueError(f"pick must be in [0, 1), got {pick}")
    free = sorted((n for n in nodes if n.free_slots > 0), key=lambda n: n.name)
    if not free:
        return place(request, nodes, calibration)
    cal = calibration or Calibration()
    node = cal.apply(free[int(pick * len(free))])
    e = startup(request, node)
    option = Option(Action.PLACE, e, reason=f"random among {len(free)} free node(s); {_describe(request, node, e)}")
    return Placement(Action.PLACE, node.name, option.total_s, option, (option,),
                     (f"{Action.PLACE} on {node.name}: {option.total_s:.2f}s ({option.reason})",))


def choose_victims(instances: Sequence[Instance], count: int) -> tuple[Instance, ...]:
    """The `count` instances to remove on scale-down: idle ones first, then those with the
    fewest in-flight generations and tokens (the cheapest to drain or migrate), then by name."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    ranked = sorted(instances, key=lambda i: (not i.idle, i.inflight, i.tokens, i.name))
    return tuple(ranked[:count])
