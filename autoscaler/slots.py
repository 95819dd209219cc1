"""Node-slot accounting shared by every service's scaling.

Services scale concurrently (each under its own lock), so a slot is taken in a short critical
section (`SlotLedger.lock`, held with no I/O inside): read what holds slots, place, and
reserve the slot placement chose, before any await. A reservation holds the slot (and counts
as a load in flight on its node) until the instance it was made for exists, or until the
preemption that made it ends; then it is released.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import Callable, Sequence

from autoscaler.services import ServiceRuntime, ServiceTable
from autoscaler.view import LoadInFlight
from sllm_knative.placement import Action, NodeInventory, Option, Placement, Tier


@dataclasses.dataclass(frozen=True)
class Reservation:
    id: int
    service: str  # for whom: namespace/name
    load: LoadInFlight  # the node, and the checkpoint that will load there
    fair_share: bool = False  # taken by fair share (the placement's `fair_share`): said in the victim's Event

    @property
    def node(self) -> str:
        return self.load.node


@dataclasses.dataclass
class Claim:
    """What one scale-up holds while it runs: the slot placement chose (reserved), and for a
    preemption the victim, the migration destination and a reserved destination slot."""

    option: Option
    slot: Reservation | None = None
    destination_slot: Reservation | None = None
    victim_service: ServiceRuntime | None = None
    pinned: list[str] = dataclasses.field(default_factory=list)


class SlotLedger:
    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self._reserved: dict[int, Reservation] = {}
        self._ids = itertools.count(1)

    def reserve(self, service: str, load: LoadInFlight, fair_share: bool = False) -> Reservation:
        """Hold a slot on `load.node` (call it under `lock`, in the section that chose the node)."""
        r = Reservation(next(self._ids), service, load, fair_share)
        self._reserved[r.id] = r
        return r

    def release(self, reservation: Reservation | None) -> None:
        if reservation is not None:
            self._reserved.pop(reservation.id, None)

    def reservations(self) -> list[Reservation]:
        return list(self._reserved.values())

    def per_node(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self._reserved.values():
            out[r.node] = out.get(r.node, 0) + 1
        return out

    def claim(self, table: ServiceTable, rt: ServiceRuntime, decision: Placement, nodes: Sequence[NodeInventory],
              model_size: Callable[[str], int]) -> Claim | None:
        """Reserve what `decision` for `rt` needs (call it under `lock`, in the section that
        placed): its slot, and for a preemption the victim (leaving its service) and the
        migration destination (a reserved slot, or an instance pinned); None for WAIT."""
        chosen = decision.chosen
        if decision.node is None or chosen is None or decision.action == Action.WAIT:
            return None
        now = time.time()
        load = LoadInFlight(decision.node, rt.model, model_size(rt.model), chosen.estimate.tier, now + chosen.free_s)
        claim = Claim(chosen, slot=self.reserve(rt.key, load, decision.fair_share))
        if decision.action == Action.PLACE:
            return claim
        found = table.find(chosen.victim or "")
        if found is None:
            return claim  # the plan calls it off
        vrt, victim = found
        claim.victim_service = vrt
        vrt.leaving.add(victim.id)
        if decision.action == Action.MIGRATE and chosen.destination:
            if chosen.starts_destination:
                tier = next((n.tier_of(vrt.model) for n in nodes if n.name == chosen.destination), Tier.REMOTE)
                claim.destination_slot = self.reserve(
                    vrt.key, LoadInFlight(chosen.destination, vrt.model, model_size(vrt.model), tier, now))
            else:
                vrt.pinned.add(chosen.destination)
                claim.pinned.append(chosen.destination)
        return claim

    def release_claim(self, claim: Claim | None) -> None:
        """Give back everything `claim` holds."""
        if claim is None:
            return
        self.release(claim.slot)
        self.release(claim.destination_slot)
        if claim.victim_service is not None:
            claim.victim_service.leaving.discard(claim.option.victim or "")
            for pinned in claim.pinned:
                claim.victim_service.pinned.discard(pinned)
