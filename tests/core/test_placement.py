"""Placement: the load-time model picks the node where the model starts soonest, and with no
free slot weighs waiting, evicting an idle instance and migrating a busy one."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import pytest

from sllm_knative.placement import (
    Action,
    Calibration,
    Instance,
    MigrationCost,
    ModelRequest,
    NodeInventory,
    QueuedLoad,
    Tier,
    choose_victims,
    place,
    place_by,
    place_within,
    pool_store_rates,
    pool_tier_rates,
    startup,
    store_of,
)

GB = 10**9
M = "hf://org/llama"  # the model to start, 5 GB
OTHER = "hf://org/other"  # a 1 GB model other instances serve
REQ = ModelRequest(M, 5 * GB)
BW: Mapping[Tier, float] = {Tier.DRAM: 10 * GB, Tier.SSD: 2 * GB, Tier.REMOTE: 0.5 * GB}
COST = Calibration(migration_cost=MigrationCost(a=2e-4, b=0.5))


def node(name: str, tier: Tier | None = None, *, free: int = 1, queue: tuple[QueuedLoad, ...] = (),
         instances: tuple[Instance, ...] = (), bw: Mapping[Tier, float] | None = None,
         overhead: float = 0.3) -> NodeInventory:
    return NodeInventory(name, dict(bw or BW), {M: tier} if tier else {}, queue, free, instances, overhead)


def busy(name: str, *, tokens: int = 10_000, remaining: float | None = 60.0, migratable: bool = True,
         priority: int = 0, model: str = OTHER, capacity: int = 4, inflight: int = 2, ready: bool = True) -> Instance:
    return Instance(name, model, 1 * GB, inflight=inflight, tokens=tokens, capacity=capacity, remaining_s=remaining,
                    priority=priority, migratable=migratable, ready=ready)


def idle(name: str, *, model: str = OTHER, priority: int = 0, ready: bool = True) -> Instance:
    return Instance(name, model, 1 * GB, priority=priority, ready=ready)


@pytest.mark.parametrize("nodes,want_node,want_tier,want_s", [
    pytest.param([node("ssd", Tier.SSD), node("remote"), node("dram", Tier.DRAM), node("resident", Tier.DEVICE)],
                 "resident", Tier.DEVICE, 0.3, id="resident-beats-dram"),
    pytest.param([node("ssd", Tier.SSD), node("remote"), node("dram", Tier.DRAM)],
                 "dram", Tier.DRAM, 0.8, id="dram-beats-ssd"),
    pytest.param([node("remote"), node("ssd", Tier.SSD)], "ssd", Tier.SSD, 2.8, id="ssd-beats-remote"),
    pytest.param([node("remote")], "remote", Tier.REMOTE, 10.3, id="remote-only"),
    pytest.param([node("dram", Tier.DRAM, queue=(QueuedLoad("hf://org/big", 20 * GB, Tier.SSD),)),
                  node("ssd", Tier.SSD)], "ssd", Tier.SSD, 2.8, id="queue-behind-a-big-load-changes-the-choice"),
    pytest.param([node("dram", Tier.DRAM, queue=(QueuedLoad("hf://org/small", GB, Tier.DRAM),)),
                  node("ssd", Tier.SSD)], "dram", Tier.DRAM, 0.9, id="short-queue-keeps-the-choice"),
    pytest.param([node("ssd", Tier.SSD, queue=(QueuedLoad("hf://org/x", 2 * GB, Tier.REMOTE), QueuedLoad(M, GB, Tier.REMOTE))),
                  node("remote")], "ssd", Tier.REMOTE, 6.3, id="joins-its-own-queued-load"),
    pytest.param([node("slow-disk", Tier.SSD, bw={**BW, Tier.SSD: 0.25 * GB}), node("dram", Tier.DRAM)],
                 "dram", Tier.DRAM, 0.8, id="slow-disk-vs-dram-copy-elsewhere"),
    pytest.param([node("slow-disk", Tier.SSD, bw={**BW, Tier.SSD: 0.25 * GB}),
                  node("fast-net", bw={**BW, Tier.REMOTE: 2.5 * GB})],
                 "fast-net", Tier.REMOTE, 2.3, id="slow-disk-loses-to-a-fast-network"),
    pytest.param([node("dram", Tier.DRAM, free=0), node("ssd", Tier.SSD)], "ssd", Tier.SSD, 2.8,
                 id="full-node-with-nothing-to-free-is-skipped"),
    pytest.param([node("dram", Tier.DRAM, overhead=5.0), node("ssd", Tier.SSD, overhead=0.1)], "ssd", Tier.SSD, 2.6,
                 id="instance-overhead-counts"),
    pytest.param([node("b", Tier.DRAM), node("a", Tier.DRAM)], "a", Tier.DRAM, 0.8, id="tie-goes-to-node-name"),
])
def test_place_picks_the_fastest_start(nodes: list[NodeInventory], want_node: str, want_tier: Tier,
                                       want_s: float) -> None:
    p = place(REQ, nodes, COST)
    assert p.action == Action.PLACE and p.node == want_node
    assert p.chosen is not None and p.chosen.estimate.tier == want_tier
    assert p.estimate_s == pytest.approx(want_s)
    totals = [o.total_s for o in p.estimates]
    assert totals == sorted(totals) and len(p.estimates) == len({o.node for o in p.options})
    assert p.reasons[0].startswith(f"place on {want_node}: {want_s:.2f}s")
    assert len(p.reasons) == len(p.estimates)


@pytest.mark.parametrize("nodes,action,want_node,victim,destination,want_s", [
    pytest.param([node("a", Tier.DRAM, free=0, instances=(busy("x"),)),
                  node("b", free=0, instances=(busy("y", remaining=30.0),))],
                 Action.MIGRATE, "a", "x", "y", 2.5 + 0.8, id="migrate-onto-an-instance-of-its-model"),
    pytest.param([node("a", Tier.DRAM, free=0, instances=(busy("x", remaining=1.0),)),
                  node("b", free=0, instances=(busy("y", remaining=30.0),))],
                 Action.WAIT, "a", "x", None, 1.0 + 0.8, id="wait-when-the-generation-ends-soon"),
    pytest.param([node("a", Tier.DRAM, free=0, instances=(busy("x", tokens=200_000),)),
                  node("b", free=0, instances=(busy("y", remaining=5.0, migratable=False),))],
                 Action.WAIT, "b", "y", None, 5.0 + 10.3, id="wait-elsewhere-when-migration-is-dear"),
    pytest.param([node("a", Tier.DRAM, free=0, instances=(busy("x", migratable=False, remaining=None),)),
                  node("b", free=0, instances=(busy("y", remaining=20.0, migratable=False),))],
                 Action.WAIT, "b", "y", None, 20.0 + 10.3, id="migration-disabled-by-policy"),
    pytest.param([node("a", Tier.DRAM, free=0, instances=(busy("x", priority=5, remaining=None),)),
                  node("b", free=0, instances=(busy("y", remaining=20.0, migratable=False),))],
                 Action.WAIT, "b", "y", None, 20.0 + 10.3, id="higher-priority-is-not-displaced"),
    pytest.param([node("a", Tier.DRAM, free=0, instances=(idle("x"),)),
                  node("b", free=0, instances=(busy("y"),))],
                 Action.EVICT, "a", "x", None, 0.8, id="evict-an-idle-instance"),
    pytest.param([node("a", Tier.DRAM, free=0, instances=(idle("x", model=M),)),
                  node("b", Tier.SSD, free=0, instances=(idle("z"),))],
                 Action.EVICT, "b", "z", None, 2.8, id="never-evict-its-own-model"),
    pytest.param([node("a", Tier.DRAM, free=0, instances=(busy("x", inflight=3),)),
                  node("b", free=0, instances=(busy("y", capacity=4, inflight=2, remaining=30.0),))],
                 Action.WAIT, "b", "y", None, 30.0 + 10.3, id="no-room-for-its-generations"),
    pytest.param([node("a", Tier.DRAM, free=0, instances=(busy("x", tokens=1000),)), node("b")],
                 Action.MIGRATE, "a", "x", "b", (2.0 + 0.3) + (0.2 + 0.5) + 0.8,
                 id="locality-move-a-busy-instance-to-a-free-node"),
    pytest.param([node("a", Tier.DRAM, free=0, instances=(idle("x", ready=False),)),
                  node("b", Tier.SSD, free=0, instances=(idle("z"),))],
                 Action.EVICT, "b", "z", None, 2.8, id="a-starting-instance-is-not-evicted"),
    pytest.param([node("a", Tier.DRAM, free=0, instances=(busy("x", ready=False, remaining=None),)),
                  node("b", free=0, instances=(busy("y", remaining=20.0, migratable=False),))],
                 Action.WAIT, "b", "y", None, 20.0 + 10.3, id="a-draining-instance-is-not-migrated"),
    pytest.param([node("a", Tier.DRAM, free=0, instances=(busy("x", remaining=None),)),
                  node("b", free=0, instances=(busy("y", remaining=30.0, ready=False),))],
                 Action.WAIT, "b", "y", None, 30.0 + 10.3, id="a-starting-instance-is-no-migration-destination"),
    pytest.param([node("a", Tier.DRAM, free=0, instances=(busy("x", tokens=300, inflight=1),)),
                  node("b", Tier.REMOTE, free=0, instances=(idle("y"),))],
                 Action.MIGRATE, "a", "x", "y", (0.06 + 0.5) + 0.8,
                 id="preempt-the-dram-node-rather-than-evict-for-a-remote-load"),
])
def test_no_free_slot(nodes: list[NodeInventory], action: Action, want_node: str, victim: str,
                      destination: str | None, want_s: float) -> None:
    p = place(REQ, nodes, COST)
    assert (p.action, p.node) == (action, want_node), p.reasons
    assert p.chosen is not None and p.chosen.victim == victim and p.chosen.destination == destination
    assert p.chosen.starts_destination == (destination in {n.name for n in nodes})
    assert p.estimate_s == pytest.approx(want_s)


STARVING = ModelRequest(M, 5 * GB, starving=True)


def inst(name: str, *, node_waiting: int = 0, instances: int = 1, **kw: object) -> Instance:
    """An instance of OTHER (1 GB) with the overload fields: its service's waiting requests and instance count."""
    args: dict = {"inflight": 0, "tokens": 0, "capacity": 4, "remaining_s": None, "migratable": True, **kw}
    return Instance(name, OTHER, 1 * GB, service_waiting=node_waiting, service_instances=instances, **args)


@pytest.mark.parametrize("request_,nodes,action,want_node,victim", [
    pytest.param(REQ, [node("a", Tier.DRAM, free=0, instances=(inst("x", inflight=1, migratable=False),)),
                       node("b", Tier.SSD, free=0, instances=(inst("z"),))],
                 Action.EVICT, "b", "z", id="a-generation-that-has-not-started-is-not-idle"),
    pytest.param(REQ, [node("a", Tier.DRAM, free=0, instances=(inst("x", answered=False, migratable=False),)),
                       node("b", Tier.SSD, free=0, instances=(inst("z"),))],
                 Action.EVICT, "b", "z", id="an-instance-that-did-not-answer-is-not-idle"),
    pytest.param(REQ, [node("a", Tier.DRAM, free=0, instances=(inst("x", answered=False),)),
                       node("b", free=0, instances=(inst("y", inflight=1, migratable=False, remaining_s=30.0),
                                                    inst("sib", inflight=0)))],
                 Action.MIGRATE, "a", "x", id="an-instance-that-did-not-answer-can-still-be-migrated"),
    pytest.param(REQ, [node("a", Tier.DRAM, free=0, instances=(inst("x", protected=True),)),
                       node("b", Tier.SSD, free=0, instances=(inst("z"),))],
                 Action.EVICT, "b", "z", id="a-fresh-instance-is-protected"),
    pytest.param(REQ, [node("a", Tier.DRAM, free=0, instances=(inst("x", node_waiting=2),))],
                 Action.WAIT, None, None, id="two-services-that-each-want-the-others-slot"),
    pytest.param(ModelRequest(M, 5 * GB, priority=1),
                 [node("a", Tier.DRAM, free=0, instances=(inst("x", protected=True, node_waiting=2),))],
                 Action.EVICT, "a", "x", id="a-higher-priority-displaces-a-fresh-instance"),
    pytest.param(REQ, [node("a", Tier.DRAM, free=0, instances=(inst("x", node_waiting=1, instances=2),))],
                 Action.WAIT, None, None, id="not-starving-yet-the-waiting-service-keeps-both"),
    pytest.param(STARVING, [node("a", Tier.DRAM, free=0, instances=(inst("x", node_waiting=1, instances=2),))],
                 Action.EVICT, "a", "x", id="a-starving-service-takes-one-of-two-idle"),
    pytest.param(STARVING, [node("a", Tier.DRAM, free=0,
                                 instances=(inst("x", inflight=1, tokens=100, protected=True, node_waiting=3,
                                                 instances=2),)),
                            node("b", free=0, instances=(inst("sib", inflight=1, protected=True, node_waiting=3,
                                                              instances=2),))],
                 Action.MIGRATE, "a", "x", id="a-starving-service-takes-one-of-two-busy-onto-its-sibling"),
    pytest.param(STARVING, [node("a", Tier.DRAM, free=0,
                                 instances=(inst("x", inflight=1, tokens=100, instances=2, node_waiting=3),)),
                            node("b", free=0, instances=(inst("sib", inflight=4, instances=2, node_waiting=3),))],
                 Action.WAIT, None, None, id="a-sibling-without-room-is-no-destination"),
    pytest.param(STARVING, [node("a", Tier.DRAM, free=0,
                                 instances=(inst("x", inflight=1, tokens=100, instances=2, capacity=1),)),
                            node("b", free=0, instances=(inst("sib", inflight=1, instances=2, capacity=1,
                                                              reserve=1),))],
                 Action.MIGRATE, "a", "x", id="a-sibling-at-its-limit-takes-it-in-its-reserve"),
    pytest.param(STARVING, [node("a", Tier.DRAM, free=0, instances=(inst("x", protected=True),))],
                 Action.WAIT, None, None, id="a-starving-service-does-not-take-an-only-instance"),
    pytest.param(ModelRequest(M, 5 * GB, starving=True, holding=1),
                 [node("a", Tier.DRAM, free=0, instances=(inst("x", node_waiting=1, instances=2),))],
                 Action.WAIT, None, None, id="fair-share-evens-out-one-against-two-stays"),
    pytest.param(ModelRequest(M, 5 * GB, starving=True, holding=1),
                 [node("a", Tier.DRAM, free=0, instances=(inst("x", node_waiting=1, instances=3),))],
                 Action.EVICT, "a", "x", id="fair-share-evens-out-one-against-three-takes"),
    pytest.param(REQ, [node("a", Tier.DRAM, free=0, instances=(inst("x", inflight=1, tokens=50, service="s1"),)),
                       node("b", free=0, instances=(inst("y", service="s2", inflight=1, migratable=False),))],
                 Action.WAIT, None, None, id="a-service-sharing-the-checkpoint-is-no-destination"),
    pytest.param(ModelRequest(OTHER, 1 * GB, service="s2"),
                 [node("a", Tier.DRAM, free=0, instances=(inst("x", service="s1"),))],
                 Action.EVICT, "a", "x", id="another-service-of-the-same-checkpoint-is-displaced"),
    # a service with no request waiting or running (its keep-alive wants back the instance it
    # was evicted from) displaces no instance of its priority: the ping-pong of two keep-alives
    pytest.param(ModelRequest(M, 5 * GB, idle=True), [node("a", Tier.DRAM, free=0, instances=(inst("x"),))],
                 Action.WAIT, None, None, id="a-service-with-no-request-displaces-no-idle-instance"),
    # a strict order between priorities has no ping-pong: a higher one still displaces (a pending
    # pod of a higher PriorityClass preempts on Kubernetes too)
    pytest.param(ModelRequest(M, 5 * GB, idle=True, priority=1), [node("a", Tier.DRAM, free=0, instances=(inst("x"),))],
                 Action.EVICT, "a", "x", id="a-higher-priority-with-no-request-still-displaces"),
    pytest.param(ModelRequest(M, 5 * GB, idle=True, starving=True, holding=1),
                 [node("a", Tier.DRAM, free=0, instances=(inst("x", instances=3),))],
                 Action.WAIT, None, None, id="nor-by-fair-share"),
    pytest.param(ModelRequest(M, 5 * GB, idle=True), [node("a", Tier.DRAM, free=0, instances=(inst("x"),)),
                                                     node("b", Tier.SSD)],
                 Action.PLACE, "b", None, id="it-takes-a-free-slot"),
])
def test_overload_rules(request_: ModelRequest, nodes: list[NodeInventory], action: Action, want_node: str | None,
                        victim: str | None) -> None:
    p = place(request_, nodes, COST)
    assert (p.action, p.node) == (action, want_node), p.reasons
    assert (p.chosen.victim if p.chosen else None) == victim, p.reasons


def test_migration_cost_decides_between_migrate_and_place() -> None:
    nodes = [node("a", Tier.DRAM, free=0, instances=(busy("x", tokens=1000),)), node("b")]
    assert place(REQ, nodes, COST).action == Action.MIGRATE
    dear = Calibration(migration_cost=MigrationCost(a=0.01, b=2.0))  # 12 s to move 1000 tokens
    p = place(REQ, nodes, dear)
    assert (p.action, p.node, p.estimate_s) == (Action.PLACE, "b", pytest.approx(10.3))
    # x would start on b (2.3 s) and move (12 s) before M loads from a's DRAM (0.8 s).
    assert any(o.action == Action.MIGRATE and o.total_s == pytest.approx(2.3 + 12.0 + 0.8) for o in p.options)


def test_nothing_possible_is_a_wait_for_capacity() -> None:
    p = place(REQ, [node("a", free=0, instances=(busy("x", migratable=False, remaining=None),))], COST)
    assert (p.action, p.node, p.chosen, p.options) == (Action.WAIT, None, None, ())
    assert math.isinf(p.estimate_s) and "wait for capacity" in p.reasons[0]
    assert place(REQ, [], COST).reasons == ("wait for capacity: no nodes",)


def test_reasons_explain_the_choice() -> None:
    p = place(REQ, [node("ssd", Tier.SSD), node("dram", Tier.DRAM,
                                                  queue=(QueuedLoad("hf://org/z", GB, Tier.DRAM),))], COST)
    assert p.reasons[0] == ("place on dram: 0.90s (free slot; queue 0.10s, load 0.50s from dram "
                            "(5.00 GB at 10.00 GB/s), start 0.30s)")
    assert p.reasons[1].startswith("not ssd: 2.80s, 1.90s slower (place: free slot; load 2.50s from ssd")
    # A slow store (nginx's limit_rate in the tests) reads in MB/s, not "0.00 GB/s".
    slow = place(ModelRequest(M, 750 * 10**6), [node("r", bw={**BW, Tier.REMOTE: 2e6})], COST)
    assert "load 375.00s from remote (0.75 GB at 2.0 MB/s)" in slow.reasons[0], slow.reasons


def test_startup_formula() -> None:
    n = node("n", Tier.SSD, queue=(QueuedLoad("hf://org/q", 4 * GB, Tier.REMOTE),), overhead=0.25)
    e = startup(REQ, n)
    assert (e.queue_wait_s, e.load_s, e.overhead_s, e.total_s) == pytest.approx((8.0, 2.5, 0.25, 10.75))
    resident = startup(REQ, node("r", Tier.DEVICE, queue=n.load_queue))
    assert (resident.queue_wait_s, resident.load_s) == (0.0, 0.0)  # no I/O, no queue
    measured = startup(REQ, node("r", Tier.DEVICE, bw={**BW, Tier.DEVICE: 50 * GB}))
    assert measured.load_s == pytest.approx(0.1)


@pytest.mark.parametrize("make,message", [
    pytest.param(lambda: NodeInventory("n", {Tier.SSD: GB}), "no bandwidth for tier", id="remote-bandwidth-required"),
    pytest.param(lambda: NodeInventory("n", dict(BW), {M: Tier.DRAM} | {"x": Tier.DEVICE}, free_slots=-1),
                 "free_slots", id="negative-slots"),
    pytest.param(lambda: NodeInventory("n", {Tier.REMOTE: 0.0}), "bandwidth", id="zero-bandwidth"),
    pytest.param(lambda: NodeInventory("n", {Tier.REMOTE: GB}, {M: Tier.SSD}), "no bandwidth for tier\\(s\\) ssd",
                 id="checkpoint-tier-without-bandwidth"),
    pytest.param(lambda: NodeInventory("n", {Tier.REMOTE: GB}, instance_stop_s=math.nan), "instance_stop_s",
                 id="stop-time-not-a-number"),
    pytest.param(lambda: ModelRequest(M, 0), "size_bytes", id="empty-model"),
    pytest.param(lambda: Instance("i", M, GB, remaining_s=-1.0), "remaining_s", id="negative-remaining"),
    pytest.param(lambda: QueuedLoad(M, -1, Tier.SSD), "remaining_bytes", id="negative-queue"),
    pytest.param(lambda: place(REQ, [node("a"), node("a")]), "unique", id="duplicate-nodes"),
])
def test_bad_inputs_are_rejected(make: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()  # type: ignore[operator]


@pytest.mark.parametrize("instances,count,want", [
    pytest.param([busy("b", tokens=10), idle("a"), busy("c", tokens=5)], 1, ["a"], id="idle-first"),
    pytest.param([busy("b", tokens=10), busy("c", tokens=5)], 1, ["c"], id="fewest-tokens"),
    pytest.param([busy("b", tokens=10, inflight=1), busy("c", tokens=5, inflight=3)], 1, ["b"],
                 id="fewest-generations-first"),
    pytest.param([idle("z"), idle("y"), busy("x")], 2, ["y", "z"], id="name-breaks-ties"),
    pytest.param([idle("a")], 3, ["a"], id="more-than-there-are"),
    pytest.param([idle("a")], 0, [], id="none"),
])
def test_choose_victims(instances: list[Instance], count: int, want: list[str]) -> None:
    assert [i.name for i in choose_victims(instances, count)] == want


STORES = {"http://h/ckpt": 1.0, "http://h/ckpt/big": 2.0, "s3://bucket/": 3.0}


@pytest.mark.parametrize("model,want", [
    pytest.param("http://h/ckpt/llama", "http://h/ckpt", id="under-a-store"),
    pytest.param("http://h/ckpt/big/llama", "http://h/ckpt/big", id="most-specific-store"),
    pytest.param("http://h/ckptx/llama", None, id="segment-boundary"),
    pytest.param("http://h/ckpt", "http://h/ckpt", id="the-root-itself"),
    pytest.param("s3://bucket/prefix/m", "s3://bucket/", id="trailing-slash-store"),
    pytest.param("hf://org/llama", None, id="no-store"),
    pytest.param("", None, id="no-model"),
])
def test_store_of(model: str, want: str | None) -> None:
    assert store_of(model, STORES) == want


def test_remote_loads_use_the_models_store_rate() -> None:
    """Two stores: node a has measured the fast one only, node b the slow one (where M lives) and
    holds nothing. With one remote rate per node, a's fast store made it look 10x faster for M."""
    fast, slow = "http://fast/m", "hf://org"  # M = hf://org/llama is in the slow store
    a = NodeInventory("a", {**BW, Tier.REMOTE: 5 * GB}, remote_bandwidth={fast: 5 * GB}, instance_overhead_s=0.3)
    b = NodeInventory("b", {**BW, Tier.REMOTE: 0.5 * GB}, remote_bandwidth={slow: 0.5 * GB}, instance_overhead_s=0.3)
    assert startup(REQ, a).load_s == pytest.approx(1.0)  # a alone does not know the slow store
    pooled = pool_store_rates([a, b])
    assert dict(pooled[0].remote_bandwidth) == {fast: 5 * GB, slow: 0.5 * GB}
    assert pooled[1] is b or dict(pooled[1].remote_bandwidth) == {fast: 5 * GB, slow: 0.5 * GB}
    assert startup(REQ, pooled[0]).load_s == pytest.approx(10.0)
    assert startup(ModelRequest("http://fast/m/x", 5 * GB), pooled[1]).load_s == pytest.approx(1.0)
    # A queued load counts at its own store's rate too: 5 GB from the fast store waits 1 s, not 10.
    q = NodeInventory("q", BW, {M: Tier.SSD}, (QueuedLoad("http://fast/m/y", 5 * GB, Tier.REMOTE),), 1,
                      remote_bandwidth={fast: 5 * GB})
    assert startup(REQ, q).queue_wait_s == pytest.approx(1.0)


def test_pooled_rates_keep_a_nodes_own_measurement() -> None:
    s = "http://store/x"
    a = NodeInventory("a", BW, remote_bandwidth={s: 1 * GB})
    b = NodeInventory("b", BW, remote_bandwidth={s: 3 * GB})
    c = NodeInventory("c", BW)
    pa, pb_, pc = pool_store_rates([a, b, c])
    assert pa.remote_bandwidth[s] == 1 * GB and pb_.remote_bandwidth[s] == 3 * GB  # their own
    assert pc.remote_bandwidth[s] == 2 * GB  # the mean of those who measured it
    assert pool_store_rates([c]) == [c]


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_store_rates_must_be_positive(bad: float) -> None:
    with pytest.raises(ValueError, match=r"remote_bandwidth\[http://s\]"):
        NodeInventory("n", BW, remote_bandwidth={"http://s": bad})


def test_a_fast_store_never_beats_a_dram_copy() -> None:
    """A file:// store in the page cache can measure faster than the DRAM tier's copy probe; a
    remote load still goes through DRAM, so the node holding the DRAM copy must win."""
    store = "file:///models"
    model = ModelRequest(f"{store}/llama", 5 * GB)
    holder = NodeInventory("holder", BW, {model.model: Tier.DRAM}, instance_overhead_s=0.3,
                           remote_bandwidth={store: 40 * GB})
    other = NodeInventory("other", BW, instance_overhead_s=0.3, remote_bandwidth={store: 40 * GB})
    assert other.rate(Tier.REMOTE, model.model) == BW[Tier.DRAM]
    assert other.rate(Tier.SSD) == BW[Tier.SSD]  # slower than DRAM: unchanged
    got = place(model, [other, holder], Calibration())
    assert got.node == "holder" and got.chosen is not None and got.chosen.estimate.tier == Tier.DRAM, got.reasons


@pytest.mark.parametrize("stop,want_node,action,want_s", [
    # a's DRAM copy behind an idle instance of another model (0.5 + 0.3 s once the slot is free)
    # against b's free slot and a load from the SSD (2.5 + 0.3 s)
    pytest.param(0.0, "a", Action.EVICT, 0.8, id="a-stop-not-yet-observed-is-taken-as-immediate"),
    pytest.param(1.0, "a", Action.EVICT, 1.8, id="the-stop-adds-to-the-eviction"),
    pytest.param(3.0, "b", Action.PLACE, 2.8, id="a-slow-stop-loses-to-a-free-slot-elsewhere"),
])
def test_an_eviction_waits_for_the_victim_to_stop(stop: float, want_node: str, action: Action, want_s: float) -> None:
    a = dataclasses.replace(node("a", Tier.DRAM, free=0, instances=(idle("x"),)), instance_stop_s=stop)
    p = place(REQ, [a, node("b", Tier.SSD)])
    assert (p.node, p.action) == (want_node, action)
    assert p.estimate_s == pytest.approx(want_s)
    if action == Action.EVICT and stop:
        assert f"stop idle instance x ({OTHER}) in {stop:.2f}s" in p.reasons[0]


@pytest.mark.parametrize("stop,want_node,action,want_s", [
    # a's DRAM copy (0.5 + 0.3 s) behind busy x, whose generations move onto y on b (2.5 s for
    # 10,000 tokens), then x stops; against b's free slot and a remote load at 1.25 GB/s (4.0 + 0.3 s)
    pytest.param(0.0, "a", Action.MIGRATE, 2.5 + 0.8, id="a-stop-not-yet-observed-is-taken-as-immediate"),
    pytest.param(0.5, "a", Action.MIGRATE, 2.5 + 0.5 + 0.8, id="the-stop-adds-to-the-migration"),
    pytest.param(1.5, "b", Action.PLACE, 4.3, id="a-slow-stop-loses-to-a-free-slot-elsewhere"),
])
def test_a_migration_frees_the_slot_when_its_emptied_victim_has_stopped(stop: float, want_node: str, action: Action,
                                                                       want_s: float) -> None:
    a = dataclasses.replace(node("a", Tier.DRAM, free=0, instances=(busy("x"),)), instance_stop_s=stop)
    b = node("b", instances=(busy("y", remaining=30.0),), bw={**BW, Tier.REMOTE: 1.25 * GB})
    p = place(REQ, [a, b], COST)
    assert (p.node, p.action) == (want_node, action), p.reasons
    assert p.estimate_s == pytest.approx(want_s)
    migrate = [r for r in p.reasons if "migrate x" in r]
    assert migrate and (f"then stop it in {stop:.2f}s" in migrate[0]) == bool(stop), migrate


@pytest.mark.parametrize("action,stop,a_tier,b_store,want_node,want_s", [
    # a holds M on its SSD (2.5 s: a 2.0 s fill into DRAM, then the 0.5 s hop to the device)
    # behind x; b has a free slot and loads M from the store (5 GB at b_store GB/s, + 0.3 s). The
    # successor's checkpoint is warmed at the decision: the fill runs while x is stopped.
    pytest.param(Action.EVICT, 1.0, Tier.SSD, 1.25, "a", max(1.0 + 0.5, 2.5) + 0.3, id="the-fill-hides-the-stop"),
    pytest.param(Action.EVICT, 3.0, Tier.SSD, 1.25, "a", max(3.0 + 0.5, 2.5) + 0.3, id="a-stop-longer-than-the-fill"),
    pytest.param(Action.EVICT, 3.0, Tier.DRAM, 1.25, "a", 3.0 + 0.5 + 0.3, id="a-dram-copy-is-the-hop-alone"),
    # 2.8 s against b's 3.3 s: without the warm (stop, then the whole load: 3.8 s) b would win
    pytest.param(Action.EVICT, 1.0, Tier.SSD, 5 / 3, "a", 2.8, id="the-warm-wins-against-a-free-slot"),
    pytest.param(Action.EVICT, 4.0, Tier.SSD, 5 / 3, "b", 3.3, id="a-long-stop-loses-to-a-free-slot"),
    # busy x's 10,000 tokens move onto y on b (2.5 s), then x stops (0.5 s); the fill ran meanwhile
    pytest.param(Action.MIGRATE, 0.5, Tier.SSD, 1.25, "a", max(2.5 + 0.5 + 0.5, 2.5) + 0.3, id="migrate-and-stop-hide-the-fill"),
])
def test_a_preemptions_successor_is_warmed_during_the_stop(action: Action, stop: float, a_tier: Tier, b_store: float,
                                                          want_node: str, want_s: float) -> None:
    a = dataclasses.replace(node("a", a_tier, free=0, instances=(idle("x") if action == Action.EVICT else busy("x"),)),
                            instance_stop_s=stop)
    b = node("b", instances=(busy("y", remaining=30.0),), bw={**BW, Tier.REMOTE: b_store * GB})
    p = place(REQ, [a, b], COST)
    assert (p.node, p.action) == (want_node, action if want_node == "a" else Action.PLACE), p.reasons
    assert p.estimate_s == pytest.approx(want_s)
    e = startup(REQ, a)
    assert (e.load_s, e.last_hop_s) == pytest.approx((2.5 if a_tier == Tier.SSD else 0.5, 0.5))


TWO_IDLE = [node("a", Tier.DRAM, free=0, instances=(inst("x", node_waiting=1, instances=2),))]  # EVICT x: 0.8 s


@pytest.mark.parametrize("nodes,waited,action,fair_share", [
    pytest.param(TWO_IDLE, 0.0, Action.WAIT, False, id="nobody-waits"),
    pytest.param(TWO_IDLE, 10.0, Action.WAIT, False, id="slack-left-the-queue-may-drain"),
    pytest.param(TWO_IDLE, 14.1, Action.WAIT, False, id="still-0.1s-more-than-the-start-takes"),
    pytest.param(TWO_IDLE, 14.2, Action.EVICT, True, id="the-last-moment-the-start-meets-the-bound"),
    pytest.param(TWO_IDLE, 15.0, Action.EVICT, True, id="past-the-bound"),
    pytest.param(TWO_IDLE, 40.0, Action.EVICT, True, id="long-past-the-bound"),
    pytest.param([*TWO_IDLE, node("b", Tier.SSD)], 14.5, Action.PLACE, False, id="a-free-slot-meets-the-bound"),
    pytest.param([node("a", Tier.DRAM, free=0, instances=(inst("x", protected=True),))], 14.5, Action.WAIT, False,
                 id="nothing-to-take-from-an-only-instance"),
    pytest.param([node("a", Tier.DRAM, free=0, instances=(inst("x", protected=True, remaining_s=1.0),
                                                          inst("y", node_waiting=1, instances=2)))],
                 13.5, Action.WAIT, False, id="an-instance-ending-in-time-is-waited-for"),
    pytest.param([node("a", Tier.DRAM, free=0, instances=(inst("x", protected=True, remaining_s=3.0),
                                                          inst("y", node_waiting=1, instances=2)))],
                 13.5, Action.WAIT, False, id="one-ending-too-late-waits-while-slack-is-left"),
    pytest.param([node("a", Tier.DRAM, free=0, instances=(inst("x", protected=True, remaining_s=3.0),
                                                          inst("y", node_waiting=1, instances=2)))],
                 14.5, Action.EVICT, True, id="then-it-is-not-waited-for"),
])
def test_fair_share_is_taken_in_time_for_the_bound(nodes: list[NodeInventory], waited: float, action: Action,
                                                   fair_share: bool) -> None:
    p = place_within(REQ, nodes, COST, waited, 15.0)
    assert (p.action, p.fair_share) == (action, fair_share), p.reasons
    assert place_within(STARVING, nodes, COST, 0.0, 15.0).fair_share  # a request marked starving stays so
    # A caller that decides again 2 s later acts 2 s sooner: its next decision would be too late.
    early = place_within(REQ, nodes, COST, waited - 2.0, 15.0, period_s=2.0) if waited >= 2.0 else p
    assert (early.action, early.fair_share) == (action, fair_share), early.reasons


@pytest.mark.parametrize("placer,nodes,waited,action,node_,draws", [
    pytest.param("random", [node("dram", Tier.DRAM), node("remote")], 0.0, Action.PLACE, "remote", 1,
                 id="random-draws-among-free-nodes"),
    pytest.param("random", TWO_IDLE, 14.5, Action.EVICT, "a", 0, id="random-without-a-free-slot-places-within"),
    pytest.param("load-time", [node("dram", Tier.DRAM), node("remote")], 0.0, Action.PLACE, "dram", 0,
                 id="load-time-never-draws"),
    pytest.param("load-time", TWO_IDLE, 14.5, Action.EVICT, "a", 0, id="load-time-takes-fair-share-in-time"),
])
def test_place_by_the_placer(placer: str, nodes: list[NodeInventory], waited: float, action: Action, node_: str,
                             draws: int) -> None:
    drawn: list[float] = []

    def pick() -> float:
        drawn.append(0.9)
        return 0.9

    p = place_by(placer, REQ, nodes, COST, pick, waited, 15.0, 0.0)
    assert (p.action, p.node, len(drawn)) == (action, node_, draws), p.reasons


@pytest.mark.parametrize("dram,want", [
    # The demo's flake: node-1's DRAM probe came out slow (a busy start), under the store's rate.
    pytest.param((1.2, 5.5), "node-1", id="a-slow-dram-probe-is-pooled-away"),
    pytest.param((4.2, 5.5), "node-1", id="comparable-probes"),
])
def test_one_machines_tier_rates_are_pooled(dram: tuple[float, float], want: str) -> None:
    store = "file:///demo/store"
    request = ModelRequest(f"{store}/llama-a", int(0.53 * GB))
    one = NodeInventory("node-1", {Tier.DRAM: dram[0] * GB, Tier.SSD: 0.6 * GB, Tier.REMOTE: 1.56 * GB},
                        {request.model: Tier.DRAM}, remote_bandwidth={store: 1.56 * GB})
    two = NodeInventory("node-2", {Tier.DRAM: dram[1] * GB, Tier.SSD: 0.7 * GB, Tier.REMOTE: 1.56 * GB},
                        remote_bandwidth={store: 1.56 * GB})
    if dram[0] * GB < 1.56 * GB:  # unpooled, the fetch on node-2 looks faster than node-1's DRAM hit
        assert place(request, [one, two]).node == "node-2"
    pooled = pool_tier_rates([one, two])
    assert [n.bandwidth[Tier.DRAM] for n in pooled] == [pytest.approx((dram[0] + dram[1]) / 2 * GB)] * 2
    assert [n.bandwidth[Tier.SSD] for n in pooled] == [pytest.approx(0.65 * GB)] * 2
    assert [n.bandwidth[Tier.REMOTE] for n in pooled] == [1.56 * GB] * 2  # a store's rate is not the machine's
    got = place(request, pooled)
    assert got.node == want and got.chosen is not None and got.chosen.estimate.tier == Tier.DRAM, got.reasons
