"""Instance choice and per-instance capacity.

`pick` is pure: least outstanding requests among instances with a free slot, ties broken by
the order given (stable, so tests are deterministic). `Breaker` holds one instance's
capacity (Knative's containerConcurrency; 0 means unlimited); capacity is only ever taken
inside `async with breaker.slot()`, so it is released on every path.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Sequence


@dataclasses.dataclass
class RoutedInstance:
    """One ready instance as the activator routes to it: its addresses (from an `Endpoint`
    update), its capacity and the requests outstanding on it."""

    id: str
    url: str
    node: str = ""
    capacity: int = 0  # 0 = unlimited
    outstanding: int = 0
    internal_url: str = ""  # the instance's internal (migration) API, if it has one

    def has_room(self) -> bool:
        return self.capacity == 0 or self.outstanding < self.capacity


def pick(instances: Sequence[RoutedInstance], exclude: frozenset[str] = frozenset()) -> RoutedInstance | None:
    best: RoutedInstance | None = None
    for inst in instances:
        if inst.id in exclude or not inst.has_room():
            continue
        if best is None or inst.outstanding < best.outstanding:
            best = inst
    return best


class Breaker:
    """Capacity of one service's instances; waiters are woken as slots free up."""

    def __init__(self) -> None:
        self._changed = asyncio.Condition()
        self._pokes: set[asyncio.Task[None]] = set()

    @contextlib.asynccontextmanager
    async def slot(self, inst: RoutedInstance) -> AsyncIterator[RoutedInstance]:
        inst.outstanding += 1
        try:
            yield inst
        finally:
            inst.outstanding -= 1
            async with self._changed:
                self._changed.notify_all()

    async def wait_for_change(self, timeout: float) -> None:
        async with self._changed:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)

    async def poke(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def poke_soon(self) -> None:
        """Wake the waiters once the running task yields (from code that must not await)."""
        task = asyncio.get_running_loop().create_task(self.poke())
        self._pokes.add(task)
        task.add_done_callback(self._pokes.discard)
