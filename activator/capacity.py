"""Capacity: holding a request until an instance of its service has room, and the slot it then
holds on that instance (Knative's throttler and breaker).

    async with capacity.slot(svc, exclude, deadline, meters) as slot:   # waits (cold start, full)
        ... slot.inst ...                                                 # forwarded there
    # released here, on every path

`Slot` is the one owner of an instance's capacity slot from acquire to release: entering picks
the instance with room (poking the autoscaler first when the service has none) and takes its
slot; leaving gives it back and runs what was registered with `on_release`, whatever happened
in between. A response that outlives the block (a stream a migration may move to another
instance) takes the slot over with `hand_over`, after which leaving does nothing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

from activator import errors
from activator.balancer import RoutedInstance
from activator.config import ActivatorConfig
from activator.metrics import ServiceMeters
from activator.registry import Registry, RoutedService
from sllm_knative.log import get_logger

_log = get_logger("activator")

Demand = Callable[[RoutedService], Awaitable[None]]


class Slot:
    """One request's slot on one instance of `svc` (see the module doc)."""

    def __init__(self, capacity: Capacity, svc: RoutedService, exclude: frozenset[str], deadline: float,
                 meters: ServiceMeters) -> None:
        self._capacity = capacity
        self.svc = svc
        self._exclude = exclude
        self._deadline = deadline
        self._meters = meters
        self._stack = contextlib.AsyncExitStack()
        self.inst: RoutedInstance | None = None

    @property
    def instance(self) -> RoutedInstance:
        assert self.inst is not None, "the slot is not held"
        return self.inst

    async def __aenter__(self) -> Slot:
        inst = await self._capacity.wait_for_room(self.svc, self._exclude, self._deadline, self._meters)
        await self._stack.enter_async_context(self.svc.breaker.slot(inst))  # no await before: still has room
        self.inst = inst
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.release()

    def on_release(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run `callback(*args)` when the slot is given back (before the breaker hears of it)."""
        self._stack.callback(callback, *args)

    async def release(self) -> None:
        """Give the slot back now (idempotent; leaving the block does it otherwise)."""
        await self._stack.aclose()

    def hand_over(self) -> Callable[[], Awaitable[None]]:
        """The slot's release, for a new owner that outlives this block; leaving it no longer releases."""
        return self._stack.pop_all().aclose


class Capacity:
    def __init__(self, config: ActivatorConfig, registry: Registry, demand: Demand) -> None:
        self.config = config
        self.registry = registry
        self.demand = demand

    def slot(self, svc: RoutedService, exclude: frozenset[str], deadline: float, meters: ServiceMeters) -> Slot:
        return Slot(self, svc, exclude, deadline, meters)

    async def wait_for_room(self, svc: RoutedService, exclude: frozenset[str], deadline: float,
                            meters: ServiceMeters) -> RoutedInstance:
        """The least loaded instance with room, at once or after a wait (Overloaded when too many
        wait already, ColdStartTimeout past the deadline)."""
        inst = svc.turn(exclude)  # none while others wait for room: they came first
        if inst is not None:  # warm: no wait
            meters.queue_seconds.observe(0.0)
            return inst
        if svc.held >= self.config.max_held_per_service:
            raise errors.Overloaded(f"{svc.key}: {svc.held} requests already waiting")
        with svc.hold(exclude) as me:  # in line from now: the demand below may take a while
            if not svc.instances:
                meters.cold_starts.inc()
                await self.demand(svc)
            found = await self.registry.wait_for_instance(svc, deadline, me)
        waited = time.monotonic() - me.since
        meters.queue_seconds.observe(waited)
        if found is None:
            held = svc.hold_timeout_s or self.config.cold_start_timeout_s
            raise errors.ColdStartTimeout(f"{svc.key}: no instance with room within {held:g}s",
                                          retry_after=max(1, int(held // 10)))
        _log.info("held request routed", service=str(svc.key), instance=found.id, node=found.node,
                  waited_s=round(waited, 3), still_held=svc.held)
        return found
