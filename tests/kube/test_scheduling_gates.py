"""Scheduling gates, as the placement controller will use them (KEP-3521 / KEP-3838, stable in 1.30):

a pod created with a gate stays Pending (`SchedulingGated`); while gated its node affinity may be
narrowed and after scheduling not changed at all; with the gate removed the real kube-scheduler
binds it to the node the affinity chose, and the test node agent runs it.

What "narrowed" means to the API server (pkg/apis/core/validation, measured here): a required
node-affinity term may only gain match expressions ("only additions are allowed (no mutations or
deletions)"); editing an expression's values, even to a subset, is refused. So placement pins a
gated pod by *adding* `kubernetes.io/hostname In [node]` to each term (or by setting the
required affinity where the pod had none).
"""

from __future__ import annotations

import json
import time

import pytest
from kubernetes.client.rest import ApiException

from testkit.kube.nodeagent import NodeAgent
from tests.kube.conftest import Clients, agent_selector, until

GATE = "serving.sllm-knative.io/placement"


def _in(key: str, values: list[str]) -> dict:
    return {"key": key, "operator": "In", "values": values}


def _affinity(*expressions: dict) -> dict:
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": list(expressions)}]}}}


def _error(e: ApiException) -> str:
    return str(json.loads(e.body).get("message", e.body))


def test_gated_pod_waits_then_binds_to_the_chosen_node(k: Clients, namespace: str,
                                                       node_agent: NodeAgent) -> None:
    nodes = [s.name for s in node_agent.specs]
    chosen = nodes[1]
    k.core.create_namespaced_pod(namespace, {
        "metadata": {"name": "gated"},
        "spec": {"schedulingGates": [{"name": GATE}], "nodeSelector": agent_selector(node_agent),
                 "affinity": _affinity(_in("kubernetes.io/hostname", nodes)), "terminationGracePeriodSeconds": 2,
                 "containers": [{"name": "c", "image": "python:3.11",
                                 "command": ["python", "-c", "import time; time.sleep(60)"]}]}})

    def scheduled_condition() -> dict | None:
        pod = k.core.read_namespaced_pod("gated", namespace)
        for c in pod.status.conditions or []:
            if c.type == "PodScheduled":
                return {"status": c.status, "reason": c.reason, "node": pod.spec.node_name}
        return None

    cond = until(scheduled_condition, 10, "the PodScheduled condition of the gated pod")
    assert cond == {"status": "False", "reason": "SchedulingGated", "node": None}
    time.sleep(1.5)  # the scheduler has had time to act, and does not
    assert k.core.read_namespaced_pod("gated", namespace).spec.node_name is None

    # While gated: editing an expression (here widening it) is refused; adding one is accepted.
    with pytest.raises(ApiException) as err:
        k.core.patch_namespaced_pod("gated", namespace, {"spec": {"affinity": _affinity(
            _in("kubernetes.io/hostname", [*nodes, "elsewhere"]))}})
    assert err.value.status == 422
    assert "only additions are allowed" in _error(err.value)
    k.core.patch_namespaced_pod("gated", namespace, {"spec": {"affinity": _affinity(
        _in("kubernetes.io/hostname", nodes), _in("kubernetes.io/hostname", [chosen]))}})

    # Gates can only be removed; removing the last one hands the pod to kube-scheduler.
    k.core.patch_namespaced_pod("gated", namespace, {"spec": {"schedulingGates": None}})
    until(lambda: (scheduled_condition() or {}).get("status") == "True", 20, "kube-scheduler to bind the pod")
    pod = k.core.read_namespaced_pod("gated", namespace)
    assert pod.spec.node_name == chosen
    until(lambda: k.core.read_namespaced_pod("gated", namespace).status.phase == "Running", 20,
          "the node agent to run the pod")

    # Once scheduled, the affinity cannot change any more, not even by an addition.
    with pytest.raises(ApiException) as err:
        k.core.patch_namespaced_pod("gated", namespace, {"spec": {"affinity": _affinity(
            _in("kubernetes.io/hostname", nodes), _in("kubernetes.io/hostname", [chosen]),
            _in("kubernetes.io/os", ["linux"]))}})
    assert err.value.status == 422
    # And a gate cannot be added back.
    with pytest.raises(ApiException) as err:
        k.core.patch_namespaced_pod("gated", namespace, {"spec": {"schedulingGates": [{"name": GATE}]}})
    assert err.value.status == 422
