"""Services scale at once: no service's scale-up waits for another service's migration, and
two services never take the same slot (in-memory backend; the migration is held with an
asyncio.Event)."""

from __future__ import annotations

import asyncio

import pytest

from autoscaler.backends.base import InstanceState
from sllm_knative.placement import Tier
from tests.autoscaler.cluster import Cluster, node, service


@pytest.mark.parametrize("one_lock_for_all", [
    pytest.param(False, id="per-service-locks"),
    # The old design (one lock through preemption and migration) fails this scenario: the
    # row checks that the scenario does catch it.
    pytest.param(True, id="one-lock-for-every-service-holds-b-back"),
])
def test_a_cold_start_does_not_wait_for_another_services_migration(one_lock_for_all: bool) -> None:
    """C preempts a busy A on n1 (its generation migrates to A on n2), and that migration is
    held. Meanwhile B cold-starts on the free n3 and becomes ready."""
    async def main() -> None:
        c = Cluster([node("n1", a=Tier.DRAM, c=Tier.DRAM), node("n2", a=Tier.DRAM), node("n3")])
        try:
            await c.deploy(service("a", initial_scale=None, minScale=2), service("b"), service("c"))
            await c.tick()
            busy = next(i for i in c.instances("a") if i.node == "n1")
            c.backend.add_generation(busy.id, 500)
            if one_lock_for_all:
                shared = asyncio.Lock()
                for rt in c.scaler.services.values():
                    rt.lock = shared
            c.activator.hold = asyncio.Event()
            c_start = asyncio.ensure_future(c.scaler.on_demand("default/c", 1))
            await asyncio.wait_for(c.activator.migrating.wait(), 5)
            b_start = asyncio.ensure_future(c.scaler.on_demand("default/b", 1))
            done, _ = await asyncio.wait({b_start}, timeout=2)
            if one_lock_for_all:
                assert not done and c.instances("b") == []
                c.activator.hold.set()
                await asyncio.gather(c_start, b_start)
                return
            assert done, "B's cold start waited for C's preemption"
            await c.backend.settle()
            assert c.ready_on("b") == ["n3"] and c.rt("b").placements[-1]["action"] == "place"
            assert not c_start.done() and c.instances("c") == []  # the migration is still held
            assert busy.state == InstanceState.DRAINING
            c.activator.hold.set()
            await c_start
            await c.settle()
            assert c.ready_on("c") == ["n1"] and c.rt("c").placements[-1]["action"] == "migrate"
            assert busy.id not in c.rt("a").instances
        finally:
            await c.close()

    asyncio.run(main())


def test_two_services_never_take_the_same_slot() -> None:
    async def main() -> None:
        c = Cluster([node("n1", x=Tier.DRAM, y=Tier.DRAM)])
        try:
            await c.deploy(service("x"), service("y"))
            await asyncio.gather(c.scaler.on_demand("default/x", 1), c.scaler.on_demand("default/y", 1))
            await c.settle()
            assert len(c.instances("x")) + len(c.instances("y")) == 1
            assert len(c.backend.starts) == 1
        finally:
            await c.close()

    asyncio.run(main())


def test_a_victim_is_not_taken_twice() -> None:
    """Two cold starts at once with one idle victim between them: one evicts it, the other waits."""
    async def main() -> None:
        c = Cluster([node("n1", x=Tier.DRAM, y=Tier.DRAM, a=Tier.DRAM)])
        try:
            await c.deploy(service("a"), service("x"), service("y"))
            await c.demand("a")
            [a] = c.instances("a")
            await asyncio.gather(c.scaler.on_demand("default/x", 1), c.scaler.on_demand("default/y", 1))
            await c.settle()
            assert c.backend.stopped == [a.id]
            assert len(c.instances("x")) + len(c.instances("y")) == 1
        finally:
            await c.close()

    asyncio.run(main())
