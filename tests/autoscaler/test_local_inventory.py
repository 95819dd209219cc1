"""The autoscaler's view of the cluster for placement: a loader's Inventory message plus the
instances the controller runs, turned into the planner's NodeInventory and Instances (pure).
(Was tests/core/test_autoscaler_inventory.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from autoscaler.backends.base import FALLBACK_BANDWIDTH, InstanceRecord, InstanceState
from autoscaler.backends.local import LocalNode, inventory_to_node, last_error
from autoscaler.view import instance_view
from sllm_knative.loader import loader_pb2 as pb
from sllm_knative.placement import Instance, Tier

A = "http://store/slow/a"
B = "http://store/slow/b"


def record(state: InstanceState = InstanceState.READY, internal_port: int = 9001) -> InstanceRecord:
    return InstanceRecord("a-1", "default/a", "node-1", 9000, internal_port, state=state)


def gen(status: str, position: int) -> dict[str, Any]:
    return {"id": f"cmpl-{status}-{position}", "status": status, "position": position, "cached": 0}


@pytest.mark.parametrize("rec,outstanding,generations,migration,want", [
    pytest.param(record(), 0, [], True, (0, 0, True, True), id="idle"),
    pytest.param(record(), 0, [gen("running", 40)], True, (1, 40, True, True), id="the-activator-report-lags"),
    pytest.param(record(), 2, [gen("running", 10)], True, (2, 10, True, True),
                 id="a-routed-request-not-yet-on-the-engine"),
    pytest.param(record(), 0, [gen("parked", 100), gen("detached", 50), gen("finished", 9), gen("waiting", 7)], True,
                 (1, 7, True, True), id="parked-detached-and-finished-do-not-count"),
    pytest.param(record(), 3, None, True, (3, 0, True, True), id="no-answer-falls-back-to-the-activator"),
    pytest.param(record(InstanceState.STARTING), 0, None, True, (0, 0, False, False), id="starting"),
    pytest.param(record(InstanceState.DRAINING), 1, [gen("running", 5)], True, (1, 5, False, False), id="draining"),
    pytest.param(record(), 1, [gen("running", 5)], False, (1, 5, False, True), id="policy-forbids-migration"),
    pytest.param(record(internal_port=0), 1, None, True, (1, 0, False, True), id="no-internal-api"),
])
def test_instance_view(rec: InstanceRecord, outstanding: int, generations: list[dict[str, Any]] | None,
                       migration: bool, want: tuple[int, int, bool, bool]) -> None:
    got = instance_view(rec, model=A, size_bytes=1000, capacity=4, priority=3, migration=migration,
                        outstanding=outstanding, generations=generations)
    assert (got.inflight, got.tokens, got.migratable, got.ready) == want
    assert (got.name, got.model, got.size_bytes, got.capacity, got.priority) == ("a-1", A, 1000, 4, 3)


@pytest.mark.parametrize("generations,reserve,answered", [
    pytest.param([], 4, True, id="every-parked-slot-free"),
    pytest.param([gen("parked", 10), gen("running", 5)], 3, True, id="one-parked"),
    pytest.param([gen("running", 5)] * 6, 2, True, id="two-resumed-beyond-the-limit-use-two"),
    pytest.param([gen("running", 5)] * 8, 0, True, id="all-kv-slots-taken"),
    pytest.param(None, 4, False, id="no-answer"),
])
def test_the_reserve_is_the_free_kv_slots_beyond_the_limit(generations: list[dict[str, Any]] | None, reserve: int,
                                                           answered: bool) -> None:
    got = instance_view(record(), model=A, size_bytes=1000, capacity=4, priority=0, migration=True, outstanding=0,
                        generations=generations, service_waiting=2, service_instances=3, protected=True)
    assert (got.reserve, got.answered, got.service, got.service_waiting, got.service_instances, got.protected) == (
        reserve, answered, "default/a", 2, 3, True)


def inventory(hops: dict[str, float], tiers: dict[str, list[tuple[str, int, str]]]) -> pb.Inventory:
    return pb.Inventory(
        node="node-1",
        bandwidths=[pb.Bandwidth(hop=h, bytes_per_second=v, samples=1) for h, v in hops.items()],
        tiers=[pb.TierInventory(name=name, entries=[pb.CheckpointEntry(model=m, size=size, state=state)
                                                    for m, size, state in entries])
               for name, entries in tiers.items()])


NODE = LocalNode("node-1", "unix:///tmp/loader.sock", "/tmp/zygote.sock", slots=2, logs=Path("/tmp"))


@pytest.mark.parametrize("hops,want", [
    pytest.param({}, FALLBACK_BANDWIDTH, id="nothing-measured-yet"),
    pytest.param({"disk_read": 2e9, "dram_copy": 8e9, "remote:http://store/slow": 25e6},
                 {Tier.SSD: 2e9, Tier.DRAM: 8e9, Tier.REMOTE: 25e6}, id="measured-hops"),
    pytest.param({"dram_copy": 8e9, "dram_map": 15e9, "host_to_device": 20e9}, {**FALLBACK_BANDWIDTH, Tier.DRAM: 20e9},
                 id="a-gpu-node-loads-dram-at-the-pinned-copy-rate"),
    pytest.param({"dram_copy": 5e9, "dram_map": 15e9}, {**FALLBACK_BANDWIDTH, Tier.DRAM: 15e9},
                 id="a-cpu-node-maps-the-dram-tier"),
    pytest.param({"remote:file:///store": 1e9, "remote:http://store/slow": 25e6},
                 {**FALLBACK_BANDWIDTH, Tier.REMOTE: 1e9}, id="unknown-stores-get-the-fastest-seen"),
    pytest.param({"disk_read": 0.0}, FALLBACK_BANDWIDTH, id="a-zero-rate-is-no-measurement"),
])
def test_inventory_bandwidths(hops: dict[str, float], want: dict[Tier, float]) -> None:
    assert dict(inventory_to_node(NODE, inventory(hops, {}), 0, {}).bandwidth) == want


def test_inventory_keeps_each_stores_rate() -> None:
    hops = {"remote:file:///store": 1e9, "remote:http://store/slow": 25e6}
    node = inventory_to_node(NODE, inventory(hops, {}), 0, {})
    assert dict(node.remote_bandwidth) == {"file:///store": 1e9, "http://store/slow": 25e6}
    assert node.rate(Tier.REMOTE, A) == 25e6  # A lives in the slow store
    assert node.rate(Tier.REMOTE, "file:///store/m") == 1e9
    assert node.rate(Tier.REMOTE, "s3://bucket/m") == 1e9  # an unmeasured store: the node's remote rate


def test_inventory_checkpoints_slots_and_instances() -> None:
    sizes: dict[str, int] = {}
    busy = Instance("a-1", A, 1000, inflight=1, tokens=40)
    inv = inventory({}, {"ssd": [(A, 1000, "ready"), (B, 3000, "ready")],
                         "dram": [(B, 3000, "ready"), ("http://store/slow/c", 500, "filling")]})
    node = inventory_to_node(NODE, inv, 1, sizes, (busy,))
    assert dict(node.checkpoints) == {A: Tier.SSD, B: Tier.DRAM}  # the fastest complete copy; filling ones are not
    assert sizes == {A: 1000, B: 3000}
    assert (node.free_slots, node.instances) == (1, (busy,))
    assert inventory_to_node(NODE, inv, 3, sizes).free_slots == 0  # more running than slots (a slot being freed)


@pytest.mark.parametrize(("lines", "want"), [
    pytest.param(['2026-12-06T00:54:00Z ERROR functions.llm msg="model load failed" instance=a '
                  'error="checkpoint \'x\': the loader at unix:///s does not answer" node=n'],
                 "checkpoint 'x': the loader at unix:///s does not answer", id="quoted-error-field"),
    pytest.param(["t ERROR functions.llm msg=boom instance=a"], "boom", id="msg-only"),
    pytest.param(["t ERROR functions.llm msg=first error=one", "t INFO functions.llm msg=later"], "one",
                 id="last-error-line-not-last-line"),
    pytest.param(["t ERROR a msg=old", "t ERROR b error=new"], "new", id="the-last-of-several"),
    pytest.param(["t INFO functions.llm msg=ready"], "", id="no-error"),
    pytest.param([], "", id="empty-log"),
])
def test_last_error_of_an_instance_log(lines: list[str], want: str) -> None:
    assert last_error(lines) == want
