"""Pure steps of the autoscaler on Kubernetes: pinning gated pods, pairing them with placements,
reading pods and nodes, and the replicas a revision is advised to have."""

from __future__ import annotations

from typing import Any

import pytest

from autoscaler.backends.base import InstanceRecord, InstanceState
from autoscaler.decider import initial_state, spec_for
from autoscaler.kube.activators import admin_urls, rotation_changes
from autoscaler.kube.advice import advice_for
from autoscaler.kube.binding import (
    GATE,
    HOSTNAME,
    INSTANCE_LABEL,
    NODE_ANNOTATION,
    Intent,
    internal_port,
    is_gated,
    node_slots,
    pair,
    pin,
    pod_failed,
    pod_ready,
    selects,
    stranded,
)
from autoscaler.kube.podautoscaler import UNKNOWN
from autoscaler.kube.services import changes_services, policy_status
from autoscaler.services import ServiceRuntime
from autoscaler.window import MetricWindow
from sllm_knative.config import ScalingPolicy
from sllm_knative.config.service import parse_service


def _pod(name: str, created: str = "2026-01-01T00:00:00Z", affinity: dict | None = None,
         gates: tuple[str, ...] = (GATE,)) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "c", "image": "x"}],
                            "schedulingGates": [{"name": g} for g in gates]}
    if affinity is not None:
        spec["affinity"] = affinity
    return {"metadata": {"name": name, "namespace": "ns", "creationTimestamp": created,
                         "labels": {"serving.knative.dev/revision": "chat-00001"}}, "spec": spec}


INTENT = Intent("ns/chat-00001", "chat-00001-1", "node-b", "dram", "fastest: dram")


def _terms(pod: dict[str, Any]) -> list[Any]:
    return pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"]


def test_pin_sets_the_affinity_names_the_instance_and_lifts_only_our_gate() -> None:
    pod = _pod("p", gates=(GATE, "other.io/gate"))
    out = pin(pod, INTENT)
    assert _terms(out) == [{"matchExpressions": [{"key": HOSTNAME, "operator": "In", "values": ["node-b"]}]}]
    assert out["spec"]["schedulingGates"] == [{"name": "other.io/gate"}]
    assert out["metadata"]["labels"][INSTANCE_LABEL] == "chat-00001-1"
    assert out["metadata"]["annotations"][NODE_ANNOTATION] == "node-b"
    assert pod["spec"]["schedulingGates"][0] == {"name": GATE} and "affinity" not in pod["spec"]  # a copy
    assert not is_gated(out) and is_gated(pod)
    assert pin(_pod("q"), INTENT)["spec"]["schedulingGates"] is None  # the last gate: the field goes


def test_pin_only_adds_expressions_to_every_existing_term() -> None:
    """The API server refuses any other change to a gated pod's required affinity."""
    zone = {"key": "zone", "operator": "In", "values": ["a", "b"]}
    gpu = {"key": "gpu", "operator": "Exists"}
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [zone]}, {"matchExpressions": [gpu]}]}}}
    out = pin(_pod("p", affinity=affinity), INTENT)
    host = {"key": HOSTNAME, "operator": "In", "values": ["node-b"]}
    assert _terms(out) == [{"matchExpressions": [zone, host]}, {"matchExpressions": [gpu, host]}]
    assert _terms(pin(out, INTENT)) == _terms(out)  # idempotent


def test_pair_oldest_pods_with_oldest_intents_and_leave_the_rest() -> None:
    pods = [_pod("late", "2026-01-01T00:00:09Z"), _pod("early", "2026-01-01T00:00:01Z"), _pod("mid")]
    i1, i2 = INTENT, Intent("ns/chat-00001", "chat-00001-2", "node-a")
    pairs, left = pair(pods, [i1, i2])
    assert [(p["metadata"]["name"], i.instance) for p, i in pairs] == [("mid", "chat-00001-1"),
                                                                      ("early", "chat-00001-2")]
    assert [p["metadata"]["name"] for p in left] == ["late"]
    assert pair(pods[:1], [i1, i2])[0][0][1] == i1 and pair([], [i1]) == ([], [])


@pytest.mark.parametrize("status, ready, failed", [
    ({"phase": "Pending"}, False, ""),
    ({"phase": "Running", "conditions": [{"type": "Ready", "status": "False"}]}, False, ""),
    ({"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}, True, ""),
    ({"phase": "Failed", "message": "OOMKilled"}, False, "OOMKilled"),
    ({"phase": "Running", "containerStatuses": [{"name": "c", "state": {"waiting": {
        "reason": "CrashLoopBackOff", "message": "back-off 10s"}}}]}, False, "container c: CrashLoopBackOff: back-off 10s"),
    ({"phase": "Pending", "containerStatuses": [{"name": "c", "state": {"waiting": {"reason": "ContainerCreating"}}}]},
     False, ""),
])
def test_pod_ready_and_failed(status: dict[str, Any], ready: bool, failed: str) -> None:
    pod = {"status": status}
    assert (pod_ready(pod), pod_failed(pod)) == (ready, failed)


@pytest.mark.parametrize("allocatable, labels, slots", [
    ({"nvidia.com/gpu": "4"}, {}, 4),
    ({"nvidia.com/gpu": "0"}, {"sllm-knative.io/slots": "2"}, 2),
    ({}, {}, 1),
    ({}, {"sllm-knative.io/slots": "many"}, 1),
])
def test_node_slots(allocatable: dict[str, str], labels: dict[str, str], slots: int) -> None:
    assert node_slots({"metadata": {"labels": labels}, "status": {"allocatable": allocatable}}) == slots


def _live(*names: str, terminating: tuple[str, ...] = (), starting: tuple[str, ...] = (),
          unscheduled: tuple[str, ...] = (), bare: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Pods (ready, running on a node and controlled by the revision's ReplicaSet unless said otherwise)."""
    ready = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
    owner = {"ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rev-1-deployment-7d9f",
                                  "uid": "u", "controller": True}]}
    return [{"metadata": {"name": n, **({"deletionTimestamp": "2026-12-06T00:00:00Z"} if n in terminating else {}),
                          **({} if n in bare else owner)},
             "spec": {} if n in unscheduled else {"nodeName": "node-a"},
             "status": {"phase": "Pending"} if n in unscheduled else {"phase": "Running"} if n in starting else ready}
            for n in names]


@pytest.mark.parametrize("pods, replicas, stopping, deleted", [
    # the ReplicaSet removes the marked pod: the count went down by one
    (_live("a", "b"), 1, {"a"}, []),
    (_live("a", "b", "c"), 1, {"a", "b"}, []),
    # a failed start's pod while the PA holds the replicas (want 0 while activating): the count stays
    (_live("a", starting=("a",)), 1, {"a"}, ["a"]),
    # a stop beside a start of the same revision: the count stays, so does the pod
    (_live("a", "b"), 2, {"a"}, ["a"]),
    # the count goes down by one for two marked pods: one would stay, both are deleted
    (_live("a", "b", "c"), 2, {"a", "c"}, ["a", "c"]),
    # a starting pod ranks before a ready one (then an unscheduled one before both): the
    # ReplicaSet would remove it instead of the marked pod, so the marked pod is deleted first
    (_live("a", "b", starting=("b",)), 1, {"a"}, ["a"]),
    (_live("a", "b", "c", starting=("b",), unscheduled=("c",)), 1, {"a"}, ["a"]),
    # ... unless the count removes those too
    (_live("a", "b", "c", starting=("b",), unscheduled=("c",)), 0, {"a"}, []),
    # a marked pod that is itself starting (a failed start) ranks with the starting ones, first by its cost
    (_live("a", "b", starting=("a", "b")), 1, {"a"}, []),
    # a marked pod already terminating is the ReplicaSet's (or ours) already: not counted, not deleted
    (_live("a", "b", terminating=("a",)), 1, {"a"}, []),
    (_live("a", "b", terminating=("b",)), 1, {"a"}, ["a"]),
    # nothing marked, or the marked pod gone from the list
    (_live("a"), 1, set(), []),
    (_live("b"), 0, {"a"}, []),
    # a pod no ReplicaSet controls is never removed by one: marked, it is deleted whatever the
    # count, and it takes no place in the ReplicaSet's (the count went up to 3 before the mark)
    (_live("a", "b", "c", "d", bare=("a",)), 3, {"a"}, ["a"]),
    (_live("a", "b", bare=("a",)), 0, {"a"}, ["a"]),
    (_live("a", "b", bare=("a",)), 0, {"a", "b"}, ["a", "b"]),
    # one that is merely not marked stays, and an owned pod's rank ignores it
    (_live("a", "b", "c", bare=("c",)), 1, {"a"}, []),
    # a controller reference of another kind does not count
    ([{**p, "metadata": {**p["metadata"], "ownerReferences": [{"kind": "Job", "name": "j", "controller": True}]}}
      for p in _live("a", "b")], 1, {"a"}, ["a"]),
])
def test_stranded_stopped_pods(pods: list[dict[str, Any]], replicas: int, stopping: set[str],
                               deleted: list[str]) -> None:
    assert stranded(pods, replicas, frozenset(stopping)) == deleted


@pytest.mark.parametrize("pods, replicas, stopping, deleted", [
    # scaled to zero, the count held (the grace period, or the activation hold): a ready pod
    # waits for Knative's way to zero; one that never became ready (a failed start) goes now
    (_live("a"), 1, {"a"}, []),
    (_live("a", starting=("a",)), 1, {"a"}, ["a"]),
    (_live("a", "b", starting=("b",)), 2, {"a", "b"}, ["b"]),
    # the count is 0 already: the ReplicaSet removes them all
    (_live("a", starting=("a",)), 0, {"a"}, []),
    # ... but not a pod it does not control: that one goes once the count is 0, or once it serves nothing
    (_live("a", "b", bare=("a",)), 1, {"a"}, []),
    (_live("a", "b", bare=("a",)), 0, {"a"}, ["a"]),
    (_live("a", "b", bare=("a",), starting=("a",)), 1, {"a"}, ["a"]),
])
def test_on_the_way_to_zero_only_pods_that_serve_nothing_are_deleted(
        pods: list[dict[str, Any]], replicas: int, stopping: set[str], deleted: list[str]) -> None:
    assert stranded(pods, replicas, frozenset(stopping), to_zero=True) == deleted


def _runtime(migration: bool = True) -> ServiceRuntime:
    svc = parse_service({"apiVersion": "serving.knative.dev/v1", "kind": "Service",
                         "metadata": {"name": "chat-00001", "namespace": "ns"},
                         "spec": {"template": {"spec": {"containers": [{"image": "x"}]}}}})
    policy = ScalingPolicy("p", "ns", service_name="chat-00001", migration=migration)
    spec = spec_for(svc, None, policy)
    return ServiceRuntime(svc, policy, spec, initial_state(spec, 0.0), MetricWindow(spec.stable_window))


def test_advice_counts_every_instance_that_holds_a_pod_and_the_open_intents() -> None:
    assert advice_for(None, 0).want == UNKNOWN
    rt = _runtime()
    assert advice_for(rt, 1).want == UNKNOWN  # no decision since this process started: leave the replicas
    rt.decided, rt.excess_burst_capacity = True, 3
    for i, state in enumerate([InstanceState.STARTING, InstanceState.READY, InstanceState.DRAINING,
                               InstanceState.STOPPING, InstanceState.STOPPED]):
        rt.instances[f"i{i}"] = InstanceRecord(f"i{i}", rt.key, "n", 0, 0, state=state)
    advice = advice_for(rt, 2)
    assert advice.want == 3 + 2  # starting, ready, draining (its pod is still there) + intents
    assert advice.ebc == -1  # migratable: the activator stays in the path
    # A pod the backend just pinned, before the scale-up that asked for it has recorded it, counts
    # (once: i0 is both the backend's and the controller's).
    assert advice_for(rt, 0, frozenset({"i0", "just-pinned"})).want == 3 + 1
    assert advice_for(_runtime_decided(migration=False), 0).ebc == 3
    rt.failed_starts, rt.last_failure = 2, "i9 on n1: the pod failed"
    assert advice_for(rt, 0).failure == "2 failed start(s) in a row; the last: i9 on n1: the pod failed"


def _runtime_decided(migration: bool) -> ServiceRuntime:
    rt = _runtime(migration)
    rt.decided, rt.excess_burst_capacity = True, 3
    return rt


@pytest.mark.parametrize(("selector", "labels", "admitted"), [
    pytest.param({}, {}, True, id="no-selector"),
    pytest.param({"gpu": "h100"}, {"gpu": "h100", "zone": "a"}, True, id="label-matches"),
    pytest.param({"gpu": "h100"}, {"gpu": "a100"}, False, id="other-value"),
    pytest.param({"gpu": "h100"}, {}, False, id="label-missing"),
    pytest.param({"gpu": "h100", "zone": "a"}, {"gpu": "h100", "zone": "b"}, False, id="one-of-two-differs"),
    pytest.param({"gpu": ""}, {"gpu": ""}, True, id="empty-value"),
])
def test_a_node_selector_admits_nodes_with_every_label(selector: dict[str, str], labels: dict[str, str],
                                                      admitted: bool) -> None:
    assert selects(selector, {"metadata": {"name": "n", "labels": labels}}) is admitted
    assert selects(selector, {"metadata": {"name": "n"}}) is (not selector)


@pytest.mark.parametrize(("slices", "urls"), [
    pytest.param([], [], id="none"),
    pytest.param([{"endpoints": [{"addresses": ["10.0.0.5"], "conditions": {"ready": True}},
                                 {"addresses": ["10.0.0.6"]}]}],
                 ["http://10.0.0.5:8090", "http://10.0.0.6:8090"], id="ready-and-unknown-count"),
    pytest.param([{"endpoints": [{"addresses": ["10.0.0.5"], "conditions": {"ready": False}}]}], [],
                 id="not-ready-left-out"),
    pytest.param([{"endpoints": [{"addresses": ["10.0.0.5", "10.0.0.9"]}]}, {"endpoints": [{"addresses": ["10.0.0.5"]}]}],
                 ["http://10.0.0.5:8090"], id="first-address-once"),
    pytest.param([{"endpoints": [{"addresses": ["fd00::7"]}]}], ["http://[fd00::7]:8090"], id="ipv6"),
    pytest.param([{"endpoints": None}, {}], [], id="no-endpoints"),
])
def test_activator_admin_urls_from_slices(slices: list[dict[str, Any]], urls: list[str]) -> None:
    assert admin_urls(slices, 8090) == urls


@pytest.mark.parametrize(("before", "withheld", "now", "left", "back"), [
    pytest.param(set(), set(), {"a"}, set(), set(), id="first-ready"),
    pytest.param({"a", "b"}, set(), {"a"}, {"b"}, set(), id="scale-down-victim"),
    pytest.param({"a"}, {"b"}, {"a", "b"}, set(), {"b"}, id="called-off"),
    pytest.param({"a"}, {"b"}, {"a"}, set(), set(), id="victim-gone"),
    pytest.param({"a", "b"}, set(), set(), {"a", "b"}, set(), id="all-leave"),
])
def test_rotation_changes(before: set[str], withheld: set[str], now: set[str], left: set[str], back: set[str]) -> None:
    assert rotation_changes(before, withheld, now) == (left, back)


@pytest.mark.parametrize(("annotations", "port"), [
    pytest.param({}, 8081, id="default"),
    pytest.param({"sllm-knative.io/internal-port": "8013"}, 8013, id="annotated"),
    pytest.param({"sllm-knative.io/internal-port": "http"}, 8081, id="not-a-number"),
    pytest.param({"sllm-knative.io/internal-port": "70000"}, 8081, id="out-of-range"),
    pytest.param({"sllm-knative.io/internal-port": "0"}, 8081, id="zero"),
])
def test_the_internal_port_comes_from_the_pods_annotation(annotations: dict[str, str], port: int) -> None:
    assert internal_port({"metadata": {"name": "p", "annotations": annotations}}, 8081) == port


NOW_STAMP, EARLIER = "2026-12-05T12:00:00Z", "2026-12-05T11:00:00Z"


def _policy_doc(generation: int = 2, ready: dict[str, str] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"metadata": {"name": "p", "namespace": "ns", "generation": generation}}
    if ready is not None:
        doc["status"] = {"conditions": [{"type": "Ready", **ready}]}
    return doc


@pytest.mark.parametrize(("doc", "services", "problem", "want_ready", "since"), [
    pytest.param(_policy_doc(), ["chat", "chat", "b"], "", ("True", "Applied", "applies to b, chat"), NOW_STAMP,
                 id="applied-new"),
    pytest.param(_policy_doc(), [], "", ("True", "Applied", "applies to no Service of this autoscaler's class yet"),
                 NOW_STAMP, id="matches-nothing"),
    pytest.param(_policy_doc(), ["chat"], "spec.minScale: must be <= maxScale (1), got 3",
                 ("False", "InvalidSpec", "spec.minScale: must be <= maxScale (1), got 3"), NOW_STAMP, id="invalid"),
    pytest.param(_policy_doc(ready={"status": "True", "lastTransitionTime": EARLIER}), ["chat"], "",
                 ("True", "Applied", "applies to chat"), EARLIER, id="unchanged-keeps-its-time"),
    pytest.param(_policy_doc(ready={"status": "True", "lastTransitionTime": EARLIER}), [], "bad",
                 ("False", "InvalidSpec", "bad"), NOW_STAMP, id="changed-moves-its-time"),
])
def test_policy_status(doc: dict[str, Any], services: list[str], problem: str, want_ready: tuple[str, str, str],
                       since: str) -> None:
    st = policy_status(doc, services, problem, NOW_STAMP)
    [ready] = st["conditions"]
    assert (ready["status"], ready["reason"], ready["message"]) == want_ready
    assert ready["type"] == "Ready" and ready["lastTransitionTime"] == since
    assert st["observedGeneration"] == 2 and st["services"] == sorted(set(services))


def _obj(generation: int = 1, status: str = "", **annotations: str) -> dict[str, Any]:
    return {"metadata": {"name": "x", "generation": generation, "annotations": annotations},
            "status": {"note": status}}


@pytest.mark.parametrize(("kind", "obj", "old", "changes"), [
    pytest.param("SYNC", _obj(), _obj(), False, id="resync"),
    pytest.param("ADDED", _obj(), None, True, id="added"),
    pytest.param("DELETED", _obj(), None, True, id="deleted"),
    pytest.param("MODIFIED", _obj(status="written"), _obj(), False, id="status-only"),
    pytest.param("MODIFIED", _obj(generation=2), _obj(), True, id="spec"),
    pytest.param("MODIFIED", _obj(**{"sllm-knative.io/model": "hf://a/b"}), _obj(), True, id="annotation"),
    pytest.param("MODIFIED", _obj(), None, True, id="no-old-copy"),
])
def test_which_events_refresh_the_services(kind: str, obj: dict[str, Any], old: dict[str, Any] | None,
                                           changes: bool) -> None:
    assert changes_services(kind, obj, old) is changes
