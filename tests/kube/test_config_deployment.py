"""Why the install sets `pod-is-always-schedulable: "true"` in Knative's `config-deployment`, and how
it does so without disturbing the rest of that ConfigMap, on the real control plane.

Knative's revision reconciler (knative/serving `pkg/reconciler/revision/reconcile_resources.go`,
`reconcileDeployment`): when the Deployment wants replicas and has none available, it reads the
first pod, and unless `config-deployment` says `pod-is-always-schedulable: "true"` it marks the
Revision `ResourcesAvailable=False` with the reason of any `PodScheduled=False` condition. The
first test shows that a pod of ours, waiting at its placement gate, is in exactly that state on
every cold start (Knative's controller cannot run here, so the test stops at the state it reads).
The second applies Knative's real `config-deployment` (release 1.23, vendored unmodified in `sllm_knative/schemas/knative`)
as Knative's install does, then our change as the install documents it (a merge patch), and
checks that only our key changed; then it shows why the install does not use `kubectl apply`:
both a client-side and a server-side apply of a ConfigMap holding only our key delete Knative's.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from autoscaler.kube.binding import GATE
from testkit.kube.cluster import BIN_DIR, KubeCluster
from testkit.kube.nodeagent import NodeAgent
from tests.kube.conftest import Clients, ensure_namespace, until

REPO = Path(__file__).resolve().parents[2]
PATCH = REPO / "manifests" / "knative" / "config-deployment-patch.yaml"
KNATIVE = REPO / "sllm_knative" / "schemas" / "knative" / "configmaps" / "deployment.yaml"  # vendored, unmodified


def test_a_gated_pod_is_what_knative_marks_unschedulable(k: Clients, namespace: str, node_agent: NodeAgent) -> None:
    labels = {"app": "gated"}
    k.apps.create_namespaced_deployment(namespace, {
        "metadata": {"name": "chat-00001-deployment"},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels},
                              "spec": {"schedulingGates": [{"name": GATE}],
                                       "containers": [{"name": "c", "image": "python:3.11"}]}}}})

    def state() -> tuple[Any, ...] | None:
        dep = k.apps.read_namespaced_deployment("chat-00001-deployment", namespace)
        pods = k.core.list_namespaced_pod(namespace, label_selector="app=gated").items
        if not pods:
            return None
        cond = next((c for c in pods[0].status.conditions or [] if c.type == "PodScheduled"), None)
        return (dep.spec.replicas, dep.status.available_replicas or 0, cond.status if cond else None,
                cond.reason if cond else None)

    # What reconcileDeployment reads: replicas > 0, none available, the first pod PodScheduled=False.
    assert until(state, 20, "the gated pod's conditions") == (1, 0, "False", "SchedulingGated")


def _kubectl(kube: KubeCluster, *args: str, stdin: str | None = None) -> str:
    return subprocess.run([str(BIN_DIR / "kubectl"), "--kubeconfig", str(kube.kubeconfig), *args], input=stdin,
                          check=True, capture_output=True, text=True, timeout=60).stdout


def test_the_merge_patch_changes_only_our_key_and_apply_would_not(kube: KubeCluster, k: Clients,
                                                                   tmp_path: Path) -> None:
    knative = yaml.safe_load(KNATIVE.read_text())
    # Knative ships the key unset (false, pkg/deployment/config.go); only its _example documents it.
    assert "pod-is-always-schedulable" not in knative["data"]
    assert 'pod-is-always-schedulable: "false"' in knative["data"]["_example"]
    ours_only = tmp_path / "ours-only.yaml"
    ours_only.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
        "name": "config-deployment", "namespace": "knative-serving"}, "data": yaml.safe_load(PATCH.read_text())["data"]}))

    def data() -> dict[str, str]:
        return dict(k.core.read_namespaced_config_map("config-deployment", "knative-serving").data or {})

    ensure_namespace(k.core, "knative-serving")  # other tests on this control plane use it too
    try:
        _kubectl(kube, "apply", "-f", str(KNATIVE))  # as Knative's install does (client-side)
        before = data()
        assert len(before) == 2  # the queue-proxy image and the example
        _kubectl(kube, "-n", "knative-serving", "patch", "configmap", "config-deployment", "--type", "merge",
                 "--patch-file", str(PATCH))
        assert data() == {**before, "pod-is-always-schedulable": "true"}

        for how in (["apply", "--server-side", "--field-manager=sllm-knative", "--force-conflicts"], ["apply"]):
            _kubectl(kube, "delete", "-f", str(KNATIVE))
            _kubectl(kube, "apply", "-f", str(KNATIVE))
            _kubectl(kube, *how, "-f", str(ours_only))
            assert data() == {"pod-is-always-schedulable": "true"}, (how, sorted(data()))
    finally:
        _kubectl(kube, "-n", "knative-serving", "delete", "configmap", "config-deployment", "--ignore-not-found")
