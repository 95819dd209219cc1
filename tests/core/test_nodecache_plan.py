"""The NodeCache publisher's decisions (sllm_knative.kube.nodecache), without a cluster: what one
sync does given the object as seen, what this loader last wrote and what it wants now."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from sllm_knative.kube.nodecache import (
    Plan,
    checkpoint_changes,
    metadata_drift,
    new_object,
    owner_reference,
    plan,
    status_diff,
    warm_requests,
    with_warm,
)

NODE, UID = "gpu-1", "6f1c-uid"


def status(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "observedTime": "2026-01-01T00:00:00Z", "inventoryVersion": 3,
        "tiers": [{"name": "dram", "capacityBytes": 100, "usedBytes": 10, "bandwidthBytesPerSecond": 8e9},
                  {"name": "remote"}],
        "checkpoints": [{"model": "hf://org/a", "state": "Downloaded", "sizeBytes": 10, "tiers": ["dram"]}],
        "loadQueue": [], "summary": {"dram": "hf://org/a", "loading": 0, "failed": 0},
    }
    base.update(over)
    return base


def obj(st: dict[str, Any] | None = None, *, uid: str = UID, node_name: str = NODE) -> dict[str, Any]:
    o = new_object(NODE, uid)
    o["spec"]["nodeName"] = node_name
    o["metadata"]["resourceVersion"] = "41"
    if st is not None:
        o["status"] = st
    return o


LATER = {"observedTime": "2026-01-01T00:00:30Z", "inventoryVersion": 9}


@pytest.mark.parametrize("observed, last, desired, resync, want", [
    pytest.param(None, None, status(), False, Plan("create", "missing"), id="missing-is-created"),
    pytest.param(None, status(), status(), False, Plan("create", "missing"), id="deleted-is-created-again"),
    pytest.param(obj(status(), uid="old-uid"), status(), status(), False,
                 Plan("fix", "metadata", ("metadata.ownerReferences",)), id="owner-of-a-replaced-node"),
    pytest.param(obj(status(), node_name="gpu-2"), status(), status(), False,
                 Plan("fix", "metadata", ("spec.nodeName",)), id="spec-edited"),
    pytest.param(obj(), None, status(), False, Plan("write", "takeover", (
        "status.checkpoints", "status.loadQueue", "status.summary", "status.tiers")), id="first-write-of-a-process"),
    pytest.param(obj(status()), None, status(), False, Plan("write", "takeover"),
                 id="a-restarted-loader-rewrites-once"),
    pytest.param(obj(status()), status(), status(**LATER), False, Plan("none"),
                 id="only-the-time-and-version-moved"),
    pytest.param(obj(status()), status(), status(**LATER), True, Plan("write", "resync"), id="resync-heartbeat"),
    pytest.param(obj(status()), status(), status(loadQueue=[{"model": "hf://org/b", "tier": "remote",
                                                              "remainingBytes": 5}]), False,
                 Plan("write", "changed", ("status.loadQueue (length 0 -> 1)",)), id="the-node-changed"),
    pytest.param(obj(status(checkpoints=[])), status(), status(), False,
                 Plan("write", "foreign", ("status.checkpoints (length 1 -> 0)",)), id="someone-emptied-it"),
    pytest.param(obj(status(observedTime="2030-01-01T00:00:00Z")), status(), status(), False,
                 Plan("write", "foreign", ("status.observedTime",)), id="someone-moved-the-time"),
    pytest.param(obj(status(tiers=[{"name": "dram", "capacityBytes": 100, "usedBytes": 99,
                                     "bandwidthBytesPerSecond": 8e9}, {"name": "remote"}])), status(), status(),
                 False, Plan("write", "foreign", ("status.tiers[0].usedBytes",)), id="someone-edited-a-number"),
    pytest.param(obj(status(tiers=[{"name": "dram", "capacityBytes": 100, "usedBytes": 10,
                                     "bandwidthBytesPerSecond": 8000000000}, {"name": "remote"}])), status(),
                 status(), False, Plan("none"), id="the-server-writes-8e9-as-an-integer"),
])
def test_plan(observed: dict[str, Any] | None, last: dict[str, Any] | None, desired: dict[str, Any], resync: bool,
              want: Plan) -> None:
    got = plan(observed, NODE, UID, last, desired, resync)
    assert (got.action, got.reason) == (want.action, want.reason)
    if want.differs:
        assert got.differs == want.differs


def test_a_plan_does_not_touch_its_inputs() -> None:
    observed, last, desired = obj(status(checkpoints=[])), status(), status()
    before = copy.deepcopy((observed, last, desired))
    plan(observed, NODE, UID, last, desired, True)
    assert (observed, last, desired) == before


@pytest.mark.parametrize("owners, node_name, want", [
    pytest.param([owner_reference(NODE, UID)], NODE, [], id="as-set"),
    pytest.param([{"apiVersion": "v1", "kind": "ConfigMap", "name": NODE, "uid": UID}, owner_reference(NODE, UID)],
                 NODE, [], id="other-owners-are-left-alone"),
    pytest.param([], NODE, ["metadata.ownerReferences"], id="owner-removed"),
    pytest.param([owner_reference("gpu-2", UID)], NODE, ["metadata.ownerReferences"], id="another-node"),
    pytest.param([owner_reference(NODE, UID)], "", ["spec.nodeName"], id="spec-emptied"),
])
def test_metadata_drift(owners: list[dict[str, Any]], node_name: str, want: list[str]) -> None:
    o = {"metadata": {"name": NODE, "ownerReferences": owners}, "spec": {"nodeName": node_name}}
    assert metadata_drift(o, NODE, UID) == want


def test_the_owner_is_the_node_so_the_garbage_collector_deletes_it() -> None:
    o = new_object(NODE, UID)
    assert o["metadata"]["ownerReferences"] == [{"apiVersion": "v1", "kind": "Node", "name": NODE, "uid": UID}]
    assert o["metadata"]["name"] == o["spec"]["nodeName"] == NODE and "status" not in o


@pytest.mark.parametrize("a, b, ignore, want", [
    pytest.param({"x": 1}, {"x": 1.0}, (), [], id="numbers-by-value"),
    pytest.param({"x": [1, 2]}, {"x": [1, 3]}, (), ["status.x[1]"], id="list-item"),
    pytest.param({"x": {"y": 1}}, {"x": {}}, (), ["status.x.y"], id="missing-key"),
    pytest.param({"observedTime": "a", "x": 1}, {"observedTime": "b", "x": 1}, ("observedTime",), [], id="ignored"),
    pytest.param({"x": "1"}, {"x": 1}, (), ["status.x"], id="a-string-is-not-a-number"),
])
def test_status_diff(a: Any, b: Any, ignore: tuple[str, ...], want: list[str]) -> None:
    assert status_diff(a, b, ignore=ignore) == want


def test_checkpoint_changes_name_each_checkpoint_once() -> None:
    before = {"checkpoints": [{"model": "a", "state": "Downloading"}, {"model": "b"}, {"model": "c"}]}
    after = {"checkpoints": [{"model": "a", "state": "Downloaded"}, {"model": "b", "state": "Downloaded"},
                             {"model": "d", "state": "Pending"}]}
    assert checkpoint_changes(before, after) == [("a", "Downloading", "Downloaded"), ("c", "Downloaded", ""),
                                                 ("d", "", "Pending")]
    assert checkpoint_changes(None, {"checkpoints": []}) == []


T0 = 1_796_000_000.0  # 2026-11-30T...Z
STAMP = "2026-11-30T00:53:20.000000Z"  # T0 as with_warm writes it


def _warm(model: str, at: str, tier: str | None = None) -> dict[str, Any]:
    return {"model": model, "requestedAt": at, **({"tier": tier} if tier else {})}


@pytest.mark.parametrize(("warm", "handled", "now", "want"), [
    pytest.param([], (), T0, [], id="none"),
    pytest.param([_warm("m", STAMP)], (), T0 + 1, [("m", "dram", f"m@{STAMP}")], id="new-default-tier"),
    pytest.param([_warm("m", STAMP, "ssd")], (), T0, [("m", "ssd", f"m@{STAMP}")], id="ssd"),
    pytest.param([_warm("m", STAMP)], (f"m@{STAMP}",), T0 + 1, [], id="handled-once"),
    pytest.param([_warm("m", STAMP)], (), T0 + 601, [], id="stale"),
    pytest.param([_warm("m", "yesterday")], (), T0, [], id="bad-time"),
    pytest.param([{"requestedAt": STAMP}], (), T0, [], id="no-model"),
])
def test_warm_requests(warm: list[dict[str, Any]], handled: tuple[str, ...], now: float,
                       want: list[tuple[str, str, str]]) -> None:
    assert warm_requests({"nodeName": NODE, "warm": warm}, handled, now) == want


def test_with_warm_keeps_the_recent_others_and_puts_the_new_one_last() -> None:
    spec = {"nodeName": NODE, "warm": [_warm("old", "2026-01-01T00:00:00Z"), _warm("a", STAMP), _warm("m", STAMP)]}
    out = with_warm(spec, "m", "dram", T0 + 5)
    assert [e["model"] for e in out] == ["a", "m"]  # the stale one dropped, m asked again at the end
    assert out[-1] == {"model": "m", "tier": "dram", "requestedAt": "2026-11-30T00:53:25.000000Z"}
    # asked again, it is a new request even though the earlier one was handled
    assert warm_requests({"warm": out}, (f"a@{STAMP}", f"m@{STAMP}"), T0 + 5) == [
        ("m", "dram", "m@2026-11-30T00:53:25.000000Z")]
    many = {"warm": [_warm(f"x{i}", STAMP) for i in range(20)]}
    assert len(with_warm(many, "m", "dram", T0, keep=16)) == 16
    assert with_warm(None, "m", "ssd", T0) == [{"model": "m", "tier": "ssd", "requestedAt": STAMP}]
