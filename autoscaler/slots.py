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

from autoscaler.view import LoadInFlight


@dataclasses.dataclass(frozen=True)
class Reservation:
    id: int
    service: str  # for whom: namespace/name
    load: LoadInFlight  # the node, and the checkpoint that will load there
    fair_share: bool = False  # taken by fair share (the placement's `fair_share`): said in the victim's Event

    @property
    def node(self) -> str:
        return self.load.node


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
