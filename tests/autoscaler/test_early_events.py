"""A backend's READY or FAILED can come before its start() returns (on Kubernetes the pod may be
ready, or gone, before the scale-up runs again). The autoscaler keeps such an event and applies it
once the instance is recorded: the instance ends READY, or leaves the table, never a STARTING
record that outlives its pod."""

from __future__ import annotations

import asyncio

import pytest

from autoscaler.backends.base import InstanceState
from sllm_knative.placement import Tier
from tests.autoscaler.cluster import Cluster, node, service


@pytest.mark.parametrize(("eager", "fails", "states", "stopped"), [
    pytest.param(False, False, [InstanceState.READY], 0, id="ready-after-start-returned"),
    pytest.param(True, False, [InstanceState.READY], 0, id="ready-before-start-returned"),
    pytest.param(False, True, [], 1, id="failed-after-start-returned"),
    pytest.param(True, True, [], 1, id="failed-before-start-returned"),
])
def test_an_event_before_start_returns_is_applied(eager: bool, fails: bool, states: list[InstanceState],
                                                  stopped: int) -> None:
    async def main() -> None:
        c = Cluster([node("n1", a=Tier.DRAM)], eager_events=eager, fail=["default/a"] if fails else [])
        try:
            await c.deploy(service("a"))
            await c.demand("a")
            await c.settle()
            await asyncio.sleep(0.05)  # the replayed events' task
            await c.settle()
            assert [i.state for i in c.instances("a")] == states
            assert len(c.backend.stopped) == stopped  # a failed start's instance is stopped once
            assert len(c.backend.starts) >= 1
            assert not c.scaler.scaler._early  # nothing left waiting for a record
        finally:
            await c.close()

    asyncio.run(main())
