"""Online calibration: bandwidth and start-time averages, the least-squares migration cost, and
their effect on placement."""

from __future__ import annotations

import pytest

from sllm_knative.placement import (
    Calibration,
    LoadObservation,
    MigrationCost,
    MigrationObservation,
    ModelRequest,
    NodeInventory,
    Tier,
    ewma,
    fit_migration_cost,
    observe_load,
    observe_migration,
    observe_start,
    observe_stop,
    place,
)

GB = 10**9
PRIOR = MigrationCost(a=1e-3, b=0.4)


@pytest.mark.parametrize("old,new,alpha,want", [
    pytest.param(None, 5.0, 0.3, 5.0, id="first-observation"),
    pytest.param(10.0, 0.0, 0.3, 7.0, id="moves-by-alpha"),
    pytest.param(10.0, 20.0, 1.0, 20.0, id="alpha-one-forgets"),
])
def test_ewma(old: float | None, new: float, alpha: float, want: float) -> None:
    assert ewma(old, new, alpha) == pytest.approx(want)


def test_observe_load_updates_one_node_and_tier() -> None:
    cal = observe_load(Calibration(), LoadObservation("a", Tier.SSD, 4 * GB, 2.0))
    assert cal.bandwidth == {("a", Tier.SSD): pytest.approx(2 * GB)}
    cal = observe_load(cal, LoadObservation("a", Tier.SSD, 1 * GB, 1.0))  # 1 GB/s observed
    assert cal.bandwidth[("a", Tier.SSD)] == pytest.approx(2 * GB + 0.3 * (1 * GB - 2 * GB))
    seeded = observe_load(Calibration(), LoadObservation("b", Tier.DRAM, GB, 1.0), profile_bandwidth=11 * GB)
    assert seeded.bandwidth[("b", Tier.DRAM)] == pytest.approx(11 * GB + 0.3 * (GB - 11 * GB))


@pytest.mark.parametrize("obs", [
    pytest.param(LoadObservation("a", Tier.SSD, 0, 1.0), id="no-bytes"),
    pytest.param(LoadObservation("a", Tier.SSD, GB, 0.0), id="no-time"),
    pytest.param(LoadObservation("a", Tier.SSD, GB, float("inf")), id="infinite-time"),
])
def test_observe_load_rejects(obs: LoadObservation) -> None:
    with pytest.raises(ValueError, match="must be a finite number > 0"):
        observe_load(Calibration(), obs)


def test_calibration_changes_the_placement() -> None:
    request = ModelRequest("hf://org/m", 4 * GB)
    nodes = [
        NodeInventory("a", {Tier.SSD: 4 * GB, Tier.REMOTE: GB}, {"hf://org/m": Tier.SSD}),
        NodeInventory("b", {Tier.REMOTE: 2 * GB}),
    ]
    assert place(request, nodes).node == "a"  # profile: 1 s from a's SSD vs 2 s from the store on b
    cal = Calibration()
    for _ in range(6):  # a's disk turns out to be shared and slow: 0.5 GB/s
        cal = observe_load(cal, LoadObservation("a", Tier.SSD, 4 * GB, 8.0), profile_bandwidth=4 * GB)
    assert cal.bandwidth[("a", Tier.SSD)] < 1.2 * GB
    p = place(request, nodes, cal)
    assert p.node == "b" and p.estimate_s == pytest.approx(2.0)
    # Start times count too, once they are a pattern: one slow start on b is not enough (it is
    # shrunk towards the mean of both nodes), five are.
    once = observe_start(observe_start(cal, "a", 0.1), "b", 4.0)
    assert place(request, nodes, once).node == "b"
    for _ in range(4):
        once = observe_start(observe_start(once, "a", 0.1), "b", 4.0)
    assert place(request, nodes, once).node == "a"


@pytest.mark.parametrize("starts, node, want", [
    pytest.param([], "a", None, id="nothing-observed"),
    pytest.param([("a", 2.0)], "a", 2.0, id="one-node-its-own-mean"),
    pytest.param([("a", 2.0)], "z", 2.0, id="unobserved-gets-the-mean"),
    # a: 1 s once, b: 5 s once. Mean 3 s; a (1 * 1 + 3 * 3) / 4 = 2.5, b (1 * 5 + 3 * 3) / 4 = 3.5.
    pytest.param([("a", 1.0), ("b", 5.0)], "a", 2.5, id="one-sample-moves-a-node-a-quarter"),
    pytest.param([("a", 1.0), ("b", 5.0)], "b", 3.5, id="one-slow-start-is-mostly-noise"),
    # Seen three times at 1 s (ewma 1 s): (3 * 1 + 3 * 3) / 6 = 2.
    pytest.param([("a", 1.0)] * 3 + [("b", 5.0)] * 3, "a", 2.0, id="three-samples-move-it-half-way"),
])
def test_node_overhead_is_shrunk_towards_the_mean_of_all_nodes(
        starts: list[tuple[str, float]], node: str, want: float | None) -> None:
    cal = Calibration()
    for name, seconds in starts:
        cal = observe_start(cal, name, seconds)
    got = cal.node_overhead(node)
    assert got == (pytest.approx(want) if want is not None else None)


def test_unobserved_node_gets_the_mean_start_overhead() -> None:
    """A node never seen starting an instance is not assumed to start it for free."""
    cal = observe_start(observe_start(Calibration(), "a", 0.2), "b", 0.4)
    fresh = cal.apply(NodeInventory("c", {Tier.REMOTE: GB}))
    assert fresh.instance_overhead_s == pytest.approx(0.3)
    # So a checkpoint in a's DRAM still beats a remote load on a node with no history.
    request = ModelRequest("m", GB // 10)
    nodes = [NodeInventory("a", {Tier.REMOTE: GB, Tier.DRAM: 10 * GB}, checkpoints={"m": Tier.DRAM}),
             NodeInventory("c", {Tier.REMOTE: GB})]
    assert place(request, nodes, observe_start(Calibration(), "a", 0.2)).node == "a"


def test_apply_leaves_unknown_nodes_alone() -> None:
    n = NodeInventory("c", {Tier.REMOTE: GB}, instance_overhead_s=0.5)
    cal = observe_start(observe_load(Calibration(), LoadObservation("a", Tier.SSD, GB, 1.0)), "a", 1.0)
    assert cal.apply(n) is n


def _obs(*pairs: tuple[int, float]) -> list[MigrationObservation]:
    return [MigrationObservation(t, s) for t, s in pairs]


@pytest.mark.parametrize("observations,want", [
    pytest.param([], PRIOR, id="no-data-uses-prior"),
    pytest.param(_obs((1000, 1.5), (3000, 3.5), (5000, 5.5)), MigrationCost(1e-3, 0.5), id="exact-line"),
    pytest.param(_obs((2000, 2.0), (2000, 3.0)), MigrationCost(1e-3, 0.5), id="one-token-count-keeps-prior-slope"),
    pytest.param(_obs((1000, 3.0), (5000, 1.0)), MigrationCost(0.0, 2.0), id="negative-slope-clamped"),
    pytest.param(_obs((1000, 0.5), (3000, 2.5)), MigrationCost(2.5 * 3000 / (1000**2 + 3000**2) + 0.5 * 1000 / (1000**2 + 3000**2), 0.0),
                 id="negative-intercept-refit-through-origin"),
])
def test_fit_migration_cost(observations: list[MigrationObservation], want: MigrationCost) -> None:
    got = fit_migration_cost(observations, PRIOR)
    assert (got.a, got.b) == (pytest.approx(want.a), pytest.approx(want.b))


def test_fit_recovers_a_noisy_line() -> None:
    noise = [0.05, -0.04, 0.02, -0.03, 0.01, -0.02, 0.04, -0.05]
    obs = [MigrationObservation(t, 2e-4 * t + 0.3 + e) for t, e in zip(range(500, 8500, 1000), noise, strict=True)]
    got = fit_migration_cost(obs, PRIOR)
    assert got.a == pytest.approx(2e-4, rel=0.05) and got.b == pytest.approx(0.3, abs=0.05)


def test_observe_migration_refits_over_the_most_recent() -> None:
    cal = Calibration(prior=PRIOR, migration_cost=PRIOR)
    for t, s in [(1000, 100.0), (2000, 200.0)]:  # an old regime, pushed out below
        cal = observe_migration(cal, MigrationObservation(t, s), keep=3)
    for t in (1000, 2000, 3000):
        cal = observe_migration(cal, MigrationObservation(t, 1e-3 * t + 0.5), keep=3)
    assert len(cal.migrations) == 3
    assert (cal.migration_cost.a, cal.migration_cost.b) == (pytest.approx(1e-3), pytest.approx(0.5))
    assert cal.migration_cost.seconds(4000) == pytest.approx(4.5)
    with pytest.raises(ValueError, match="tokens"):
        observe_migration(cal, MigrationObservation(-1, 1.0))


def test_bad_alpha() -> None:
    with pytest.raises(ValueError, match="alpha"):
        Calibration(alpha=0.0)


def test_observe_stop_learns_one_stop_time_for_every_node() -> None:
    node = NodeInventory("a", {Tier.REMOTE: GB}, instance_stop_s=0.25)
    assert Calibration().apply(node).instance_stop_s == 0.25  # nothing observed: the node's own
    cal = observe_stop(Calibration(), 0.5)
    assert cal.stop_s == 0.5
    cal = observe_stop(cal, 1.5)
    assert cal.stop_s == pytest.approx(0.8)  # 0.5 moved by alpha 0.3 towards 1.5
    assert cal.apply(node).instance_stop_s == pytest.approx(0.8)
    assert cal.apply(NodeInventory("b", {Tier.REMOTE: GB})).instance_stop_s == pytest.approx(0.8)
    for bad in (-0.1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="seconds"):
            observe_stop(cal, bad)


def _demo_nodes() -> tuple[ModelRequest, list[NodeInventory]]:
    """The demo's flake (step 6, after scale-to-zero): node-1 holds the checkpoint in DRAM, node-2
    holds nothing; both free. One machine, so the store (`file://`, in the page cache) measures
    1.56 GB/s and each loader's DRAM probe is noise around one value."""
    store = "file:///demo/store"
    request = ModelRequest(f"{store}/llama-a", int(0.53 * GB))
    one = NodeInventory("node-1", {Tier.DRAM: 4.2 * GB, Tier.SSD: 0.65 * GB, Tier.REMOTE: 1.56 * GB},
                        {request.model: Tier.DRAM}, remote_bandwidth={store: 1.56 * GB})
    two = NodeInventory("node-2", {Tier.DRAM: 5.5 * GB, Tier.SSD: 0.69 * GB, Tier.REMOTE: 1.56 * GB},
                        remote_bandwidth={store: 1.56 * GB})
    return request, [one, two]


@pytest.mark.parametrize("pooled,slow_leases,starts,want", [
    # Two DRAM leases on node-1 took 0.5 s on a busy host (1.06 GB/s): kept per node, node-1's
    # DRAM ranks below node-2's remote fetch, which on one machine goes through the same DRAM.
    pytest.param(False, 2, {}, "node-2", id="per-node-a-slow-lease-sends-the-load-to-the-store"),
    pytest.param(True, 2, {}, "node-1", id="one-machine-the-dram-hit-wins"),
    # Starts observed on node-1 only slower than on node-2: per node, node-2's quick starts win;
    # one machine, a start is a start wherever it ran.
    pytest.param(False, 0, {"node-1": [0.6] * 6, "node-2": [0.15] * 6}, "node-2", id="per-node-slow-starts"),
    pytest.param(True, 0, {"node-1": [0.6] * 6, "node-2": [0.15] * 6}, "node-1", id="one-machine-starts-pooled"),
])
def test_one_machine_pools_what_it_learns(pooled: bool, slow_leases: int, starts: dict[str, list[float]],
                                           want: str) -> None:
    request, nodes = _demo_nodes()
    cal = Calibration(pooled=pooled)
    for _ in range(slow_leases):
        cal = observe_load(cal, LoadObservation("node-1", Tier.DRAM, request.size_bytes, 0.5))
    for name, seconds in starts.items():
        for s in seconds:
            cal = observe_start(cal, name, s)
    p = place(request, nodes, cal)
    assert p.node == want, p.reasons
    if pooled:
        assert p.chosen is not None and p.chosen.estimate.tier == Tier.DRAM, p.reasons


def test_pooled_keys_every_node_alike() -> None:
    cal = observe_load(Calibration(pooled=True), LoadObservation("node-3", Tier.SSD, 2 * GB, 1.0))
    applied = [cal.apply(NodeInventory(n, {Tier.SSD: GB, Tier.REMOTE: GB})) for n in ("node-1", "node-3")]
    assert [a.bandwidth[Tier.SSD] for a in applied] == [pytest.approx(2 * GB)] * 2
    per_node = observe_load(Calibration(), LoadObservation("node-3", Tier.SSD, 2 * GB, 1.0))
    assert per_node.apply(NodeInventory("node-1", {Tier.SSD: GB, Tier.REMOTE: GB})).bandwidth[Tier.SSD] == GB
