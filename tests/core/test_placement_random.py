"""`up --placement random` (the no-locality ablation of bench/replay.py): a cold start goes to a
node drawn among those with a free slot, whatever tier holds the checkpoint; with no free slot
it decides as the load-time placement does."""

from __future__ import annotations

from pathlib import Path

import pytest

from sllm_knative.local.cluster import UpOptions
from sllm_knative.placement import (
    Action,
    Instance,
    ModelRequest,
    NodeInventory,
    Tier,
    place,
    place_random,
)

GB = 10**9
M = "hf://org/llama"
REQ = ModelRequest(M, 5 * GB)
BW = {Tier.DRAM: 10 * GB, Tier.SSD: 2 * GB, Tier.REMOTE: 0.5 * GB}


def node(name: str, tier: Tier | None = None, *, free: int = 1, instances: tuple[Instance, ...] = ()) -> NodeInventory:
    return NodeInventory(name, dict(BW), {M: tier} if tier else {}, (), free, instances, 0.3)


NODES = [node("c", Tier.DRAM), node("a"), node("b", Tier.SSD, free=0), node("d", Tier.SSD)]


@pytest.mark.parametrize("pick,want_node,want_tier,want_s", [
    pytest.param(0.0, "a", Tier.REMOTE, 10.3, id="first-free-by-name-remote"),
    pytest.param(0.34, "c", Tier.DRAM, 0.8, id="second-free-dram"),
    pytest.param(0.99, "d", Tier.SSD, 2.8, id="last-free-ssd"),
])
def test_random_picks_among_free_nodes_whatever_the_tier(pick: float, want_node: str, want_tier: Tier,
                                                         want_s: float) -> None:
    d = place_random(REQ, NODES, pick)
    assert (d.action, d.node) == (Action.PLACE, want_node)
    assert d.chosen is not None and d.chosen.estimate.tier == want_tier
    assert d.estimate_s == pytest.approx(want_s)
    assert "random among 3 free node(s)" in d.reasons[0]


def test_load_time_placement_would_pick_dram_for_every_pick() -> None:
    assert place(REQ, NODES).node == "c"
    assert {place_random(REQ, NODES, p / 10).node for p in range(10)} == {"a", "c", "d"}


def test_no_free_slot_decides_as_load_time_placement() -> None:
    full = [node("a", Tier.DRAM, free=0, instances=(Instance("x", "hf://org/other", GB, priority=0),)),
            node("b", free=0)]
    assert place_random(REQ, full, 0.5) == place(REQ, full)


@pytest.mark.parametrize("pick", [-0.1, 1.0, 2.0])
def test_pick_outside_unit_interval_is_rejected(pick: float) -> None:
    with pytest.raises(ValueError, match="pick must be in"):
        place_random(REQ, NODES, pick)


@pytest.mark.parametrize("placement,ok", [("load-time", True), ("random", True), ("nearest", False)])
def test_up_option(tmp_path: Path, placement: str, ok: bool) -> None:
    if ok:
        assert UpOptions(state_dir=tmp_path, placement=placement).placement == placement
    else:
        with pytest.raises(ValueError, match="--placement"):
            UpOptions(state_dir=tmp_path, placement=placement)
