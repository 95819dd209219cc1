"""The load-time model's queue-wait term, fed from the loads in flight per node (instances
starting there, and slots reserved for starts about to begin): pure, then end to end in the
controller with the in-memory backend."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest

from autoscaler.backends.memory import MemoryNode
from autoscaler.view import LoadInFlight, load_queue, occupy
from sllm_knative.placement import ModelRequest, NodeInventory, QueuedLoad, Tier, place
from tests.autoscaler.cluster import GB, Cluster, node, service, uri

BW: Mapping[Tier, float] = {Tier.DRAM: 10 * GB, Tier.SSD: 2 * GB, Tier.REMOTE: 0.5 * GB}
X, Y = uri("x"), uri("y")
NOW = 5000.0


def inventory(name: str, slots: int = 2, **tiers: Tier) -> NodeInventory:
    return NodeInventory(name, dict(BW), {uri(m): t for m, t in tiers.items()}, free_slots=slots,
                         instance_overhead_s=0.3)


@pytest.mark.parametrize("loads,want", [
    pytest.param([], (), id="nothing-in-flight"),
    pytest.param([LoadInFlight("n1", X, 5 * GB, Tier.SSD, NOW)], (QueuedLoad(X, 5 * GB, Tier.SSD),),
                 id="just-begun"),
    pytest.param([LoadInFlight("n1", X, 5 * GB, Tier.SSD, NOW - 2)], (QueuedLoad(X, 1 * GB, Tier.SSD),),
                 id="two-seconds-at-2-gb-per-second"),
    pytest.param([LoadInFlight("n1", X, 5 * GB, Tier.SSD, NOW - 10)], (QueuedLoad(X, 0, Tier.SSD),),
                 id="done-loading-still-starting"),
    pytest.param([LoadInFlight("n1", X, 5 * GB, Tier.REMOTE, NOW + 3)], (QueuedLoad(X, 5 * GB, Tier.REMOTE),),
                 id="reserved-behind-a-migration-not-begun"),
    pytest.param([LoadInFlight("n1", Y, 1 * GB, Tier.DRAM, NOW), LoadInFlight("n1", X, 5 * GB, Tier.SSD, NOW - 1),
                  LoadInFlight("n2", X, 5 * GB, Tier.SSD, NOW)],
                 (QueuedLoad(X, 3 * GB, Tier.SSD), QueuedLoad(Y, 1 * GB, Tier.DRAM)),
                 id="first-begun-first-other-nodes-left-out"),
    pytest.param([LoadInFlight("n1", X, 5 * GB, Tier.DEVICE, NOW - 1)], (QueuedLoad(X, 0, Tier.DEVICE),),
                 id="resident-moves-nothing"),
])
def test_load_queue(loads: list[LoadInFlight], want: tuple[QueuedLoad, ...]) -> None:
    assert load_queue(loads, inventory("n1"), NOW) == want


def place_second(nodes: list[NodeInventory], first_on: str) -> tuple[str | None, float]:
    """X has just been placed on `first_on`; where does Y go, and when is it ready?"""
    tier = next(n for n in nodes if n.name == first_on).tier_of(X)
    loads = [LoadInFlight(first_on, X, 5 * GB, tier, NOW)]
    seen = [occupy(n, slots=n.free_slots, used=int(n.name == first_on), instances=(),
                   queue=load_queue(loads, n, NOW)) for n in nodes]
    decision = place(ModelRequest(Y, 5 * GB), seen)
    return decision.node, decision.estimate_s


@pytest.mark.parametrize("nodes,want_node,want_s", [
    # X loads from n1's SSD for 2.5 s: Y behind it on n1 would be ready at 5.3 s, on n2 at 2.8 s.
    pytest.param([inventory("n1", x=Tier.SSD, y=Tier.SSD), inventory("n2", x=Tier.SSD, y=Tier.SSD)], "n2", 2.8,
                 id="different-nodes-when-that-is-faster"),
    # Both in n1's DRAM (0.5 s each); n2 has only the store (10 s): behind X on n1 is still faster.
    pytest.param([inventory("n1", x=Tier.DRAM, y=Tier.DRAM), inventory("n2")], "n1", 1.3,
                 id="the-same-node-when-the-other-tier-is-much-slower"),
])
def test_a_second_cold_start_sees_the_first_load(nodes: list[NodeInventory], want_node: str, want_s: float) -> None:
    got, estimate = place_second(nodes, "n1")
    assert (got, round(estimate, 6)) == (want_node, want_s)


@pytest.mark.parametrize("nodes,want", [
    pytest.param([node("n1", slots=2, x=Tier.SSD, y=Tier.SSD), node("n2", slots=2, x=Tier.SSD, y=Tier.SSD)],
                 {"x": "n1", "y": "n2"}, id="different-nodes-when-that-is-faster"),
    pytest.param([node("n1", slots=2, x=Tier.DRAM, y=Tier.DRAM), node("n2", slots=2)],
                 {"x": "n1", "y": "n1"}, id="the-same-node-when-the-other-tier-is-much-slower"),
])
def test_two_cold_starts_at_the_same_moment(nodes: list[MemoryNode], want: dict[str, str]) -> None:
    async def main() -> None:
        # 0.1 real seconds a simulated one: the second start must come within the first's 0.5
        # simulated seconds of load to queue behind it (at the default 1 ms a simulated second, a
        # loaded machine let the first load end before the second start began: queue_s 0.0)
        c = Cluster(nodes, time_scale=0.1)
        try:
            await c.deploy(service("x"), service("y"))
            await asyncio.gather(c.scaler.on_demand("default/x", 1), c.scaler.on_demand("default/y", 1))
            await c.settle()
            assert {name: c.ready_on(name) for name in want} == {name: [n] for name, n in want.items()}
            first, second = c.backend.starts
            if want["x"] == want["y"]:  # the second load queued behind the first on the node's loader
                assert 0 < second.queue_s <= first.load_s
            else:
                assert first.queue_s == second.queue_s == 0
            y_reasons = c.rt("y").placements[-1]["reasons"]
            assert ("queue" in y_reasons[0]) == (want["x"] == want["y"]), y_reasons
        finally:
            await c.close()

    asyncio.run(main())
