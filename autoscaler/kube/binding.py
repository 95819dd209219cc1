"""Binding gated pods to the nodes placement chose, as pure functions.

A pod of our class is created with the scheduling gate `sllm-knative.io/placement` (added by the
admission webhook). The autoscaler decides where each new instance of a revision goes (the same
load-time model as the local cluster) and leaves an `Intent`; the placement controller pairs each
gated pod with the oldest open intent of its revision, pins the pod to the intent's node and lifts
the gate, so kube-scheduler binds it there. How a gated pod may change (measured in
tests/kube/test_scheduling_gates.py): required node-affinity terms may only *gain* match
expressions, so pinning adds `kubernetes.io/hostname In [node]` to every term (or sets a required
affinity with that one term), and gates may only be removed.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from autoscaler.kube.admission import GATE  # the webhook adds it; the binder lifts it
from sllm_knative.config.service import internal_port_of

INSTANCE_LABEL = "sllm-knative.io/instance"
NODE_ANNOTATION = "sllm-knative.io/placed-node"
REASON_ANNOTATION = "sllm-knative.io/placement"
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
HOSTNAME = "kubernetes.io/hostname"


@dataclass(frozen=True)
class Intent:
    """The autoscaler's decision for one new instance of a revision (`namespace/revision`)."""

    service: str
    instance: str
    node: str
    tier: str = ""
    reason: str = ""


def is_gated(pod: dict[str, Any]) -> bool:
    return any(g.get("name") == GATE for g in (pod.get("spec") or {}).get("schedulingGates") or [])


def instance_of(pod: dict[str, Any]) -> str:
    return ((pod.get("metadata") or {}).get("labels") or {}).get(INSTANCE_LABEL, "")


def pin(pod: dict[str, Any], intent: Intent) -> dict[str, Any]:
    """The pod, pinned to `intent.node` with the gate lifted and the instance named (a new dict)."""
    out = copy.deepcopy(pod)
    meta, spec = out.setdefault("metadata", {}), out.setdefault("spec", {})
    meta.setdefault("labels", {})[INSTANCE_LABEL] = intent.instance
    ann = meta.setdefault("annotations", {})
    ann[NODE_ANNOTATION] = intent.node
    if intent.reason:
        ann[REASON_ANNOTATION] = intent.reason[:1024]
    expr = {"key": HOSTNAME, "operator": "In", "values": [intent.node]}
    required = (spec.setdefault("affinity", {}).setdefault("nodeAffinity", {})
                .get("requiredDuringSchedulingIgnoredDuringExecution"))
    if required and required.get("nodeSelectorTerms"):
        for term in required["nodeSelectorTerms"]:
            exprs = term.setdefault("matchExpressions", [])
            if expr not in exprs:
                exprs.append(expr)
    else:
        spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"] = {
            "nodeSelectorTerms": [{"matchExpressions": [expr]}]}
    gates = [g for g in spec.get("schedulingGates") or [] if g.get("name") != GATE]
    spec["schedulingGates"] = gates or None
    return out


def pair(gated: list[dict[str, Any]], intents: list[Intent]) -> tuple[list[tuple[dict[str, Any], Intent]],
                                                                      list[dict[str, Any]]]:
    """Pair gated pods (oldest first) with open intents (oldest first); the pods left over have no
    intent (the Deployment made them on its own: its initial scale, or a replacement)."""
    pods = sorted(gated, key=lambda p: ((p.get("metadata") or {}).get("creationTimestamp", ""),
                                        (p.get("metadata") or {}).get("name", "")))
    n = min(len(pods), len(intents))
    return list(zip(pods[:n], intents[:n], strict=True)), pods[n:]


def stranded(pods: list[dict[str, Any]], replicas: int, stopping: frozenset[str], to_zero: bool = False) -> list[str]:
    """The pods in `stopping` (marked for deletion by `KubeBackend.stop`) that a ReplicaSet at
    `replicas` would not remove, so the autoscaler must delete them itself: all the marked pods
    (sorted) when any of them would stay, else none. On the way to zero (`to_zero`: the
    decider wants no instance) only those not ready: Knative's way to zero (Proxy, the
    activator's probe, the grace period, then 0 replicas) removes a ready one.

    The ReplicaSet removes `len(pods not terminating) - replicas` pods in the order of its
    ranking (`_deletion_rank`), where the deletion cost comes only after being unscheduled,
    pending and not ready. A marked pod stays when the count does not go down for it: a failed
    start's pod while the PA holds its replicas during activation (want 0 -> UNKNOWN), or a stop
    beside a start of the same revision. It would also stay if an unmarked pod ranked before it,
    a pod still starting, which the ReplicaSet would remove in its place. Deleted first (before
    the count goes down), every marked pod goes and no other: the ReplicaSet makes the pods the
    count still asks for, which the next intents are paired with (gated until then).

    A pod no ReplicaSet controls (made by hand with the revision's label, or orphaned) is never
    removed by one, whatever the count: marked, it is deleted here, on the way to zero too once
    it serves nothing or the count is 0."""
    active = [p for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")]
    marked = sorted(n for p in active if (n := _name(p)) in stopping)
    owned = [p for p in active if _replicaset_controls(p)]
    ranked = sorted(owned, key=lambda p: _deletion_rank(p, stopping))
    if {_name(p) for p in ranked[:max(0, len(owned) - replicas)]} >= set(marked):
        return []
    if not to_zero:
        return marked
    # a ready pod waits for Knative's way to zero, which the ReplicaSet ends: not a bare one at 0
    waits = {_name(p) for p in (active if replicas > 0 else owned) if pod_ready(p)}
    return [n for n in marked if n not in waits]


def _replicaset_controls(pod: dict[str, Any]) -> bool:
    return any(ref.get("kind") == "ReplicaSet" and ref.get("controller")
               for ref in (pod.get("metadata") or {}).get("ownerReferences") or [])


def _name(pod: dict[str, Any]) -> str:
    return (pod.get("metadata") or {}).get("name", "")


def _deletion_rank(pod: dict[str, Any], stopping: frozenset[str]) -> tuple[bool, int, bool, int]:
    """Which pods a ReplicaSet scaling down removes first, lowest first (kubernetes
    pkg/controller/controller_utils.go, ActivePodsWithRanks): unscheduled, then Pending before
    Unknown before Running, then not ready, then the lower pod-deletion-cost (the marked pods')."""
    status = pod.get("status") or {}
    phase = {"Pending": 0, "Unknown": 1, "Running": 2}.get(status.get("phase", "Pending"), 0)
    marked = _name(pod) in stopping
    return bool((pod.get("spec") or {}).get("nodeName")), phase, pod_ready(pod), -1 if marked else 0


def pod_ready(pod: dict[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") == "Running" and condition_true(pod, "Ready")


def pod_failed(pod: dict[str, Any]) -> str:
    """Why the pod will not become ready ('' while it still may): failed phase, a crash loop, an
    image that cannot be pulled."""
    st = pod.get("status") or {}
    if st.get("phase") == "Failed":
        return st.get("message") or st.get("reason") or "the pod failed"
    for cs in st.get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in ("CrashLoopBackOff", "ErrImagePull", "ImagePullBackOff", "CreateContainerError"):
            return f"container {cs.get('name')}: {waiting.get('reason')}: {waiting.get('message', '')}".strip()
    return ""


def node_slots(node: dict[str, Any]) -> int:
    """Instance slots of a Node: its allocatable GPUs, else the label `sllm-knative.io/slots`, else 1."""
    alloc = (node.get("status") or {}).get("allocatable") or {}
    try:
        gpus = int(alloc.get("nvidia.com/gpu", 0))
    except ValueError:
        gpus = 0
    if gpus > 0:
        return gpus
    try:
        return max(0, int(((node.get("metadata") or {}).get("labels") or {}).get("sllm-knative.io/slots", 1)))
    except ValueError:
        return 1


def node_ready(node: dict[str, Any]) -> bool:
    return condition_true(node, "Ready")


def condition_true(obj: dict[str, Any], type_: str) -> bool:
    """Whether a Pod's or Node's status condition `type_` is True."""
    return any(c.get("type") == type_ and c.get("status") == "True"
               for c in (obj.get("status") or {}).get("conditions") or [])


def selects(selector: Mapping[str, str], node: dict[str, Any]) -> bool:
    """Whether a pod's nodeSelector admits `node` (every label present with that value)."""
    labels = (node.get("metadata") or {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


def internal_port(pod: dict[str, Any], default: int) -> int:
    """The port of the pod's internal (migration) API: the revision's annotation, which Knative
    copies onto its pods, else `default` (functions.llm's)."""
    port = internal_port_of((pod.get("metadata") or {}).get("annotations") or {})
    return default if port is None else port
