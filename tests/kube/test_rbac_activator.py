"""Least privilege, measured: the activator as Knative's (`python -m activator --kube`) runs as its
ServiceAccount (`--kubeconfig` holding a token of `knative-serving/sllm-activator`) with exactly
the ClusterRole in manifests/activator/rbac.yaml, through what it does in a cluster: list and
watch the revisions, PodAutoscalers and EndpointSlices, route a request to a warm revision of
our class, hold one for a revision at zero (its demand to our autoscaler) and release it when
the pod becomes ready, and resync. The revisions are made as in test_activator_knative.py
(knative: Knative's objects, the private Services whose slices the real EndpointSlice
controller publishes for the node agent's pods). The verbs it called are read back from the API
server's audit log (from this test's start) and compared with the rules, both ways: nothing it
called was refused, and nothing the ClusterRole grants went unused.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from sllm_knative.config.autoscaler import SLLM_CLASS
from sllm_knative.kube.client import REVISIONS, Kube
from sllm_knative.ports import free_port
from testkit.kube.cluster import KubeCluster
from testkit.kube.nodeagent import NodeAgent
from testkit.proc import Proc
from tests.kube.audit import apply_docs, assert_exactly_granted, audit_offset
from tests.kube.conftest import until
from tests.kube.test_activator_knative import (  # noqa: F401  (fixtures)
    Recorder,
    _echo,
    _headers,
    _pending,
    _ready_pods,
    _revision,
    _served,
    cluster,
    recorder,
)

ROOT = Path(__file__).resolve().parents[2]
RBAC = ROOT / "manifests" / "activator" / "rbac.yaml"
SA = ("knative-serving", "sllm-activator")
RESYNC_S = 3


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop(grace=10)


def test_the_activator_role_is_exactly_what_it_calls(kube: KubeCluster, api: Any,
                                                     cluster: tuple[Kube, str],  # noqa: F811
                                                     node_agent: NodeAgent, recorder: Recorder,  # noqa: F811
                                                     tmp_path: Path, procs: list[Proc]) -> None:
    admin, ns = cluster
    docs = [d for d in yaml.safe_load_all(RBAC.read_text()) if d]
    apply_docs(api, [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": SA[0]}}, *docs])
    as_sa = Kube(kube.api_client_as(*SA))
    until(lambda: as_sa.list(REVISIONS) is not None, 15, "the ClusterRoleBinding to take effect")
    # A warm revision of our class, before the activator starts (its first lists see it).
    warm = f"warm-{uuid.uuid4().hex[:4]}-00001"
    _revision(admin, ns, node_agent, warm, SLLM_CLASS, replicas=1)
    until(lambda: _ready_pods(admin, ns, warm, 1), 60, "the warm revision's pod ready")
    audit_from = audit_offset(kube.audit_log)

    kubeconfig = kube.kubeconfig_as(*SA, tmp_path / "activator-kubeconfig")
    port, h2c, admin_port = free_port(), free_port(), free_port()
    act = Proc("activator").start(
        [sys.executable, "-m", "activator", "--kube", "--kubeconfig", str(kubeconfig), "--host", "127.0.0.1",
         "--port", str(port), "--h2c-port", str(h2c), "--admin-port", str(admin_port),
         "--autoscaler-url", recorder.url, "--knative-autoscaler-url", "", "--pod-name", "activator-rbac-0",
         "--kube-resync", str(RESYNC_S), "--cold-start-timeout", "90"],
        tmp_path / "activator.log")
    procs.append(act)
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return httpx.get(url, headers={"K-Network-Probe": "activator"}, timeout=2).text == "activator"
        except httpx.TransportError:
            return False

    act.wait_until(answers, 60, "answering Knative's probe")

    # Routed: the warm revision's pod, found through its EndpointSlice.
    pod = _ready_pods(admin, ns, warm, 1)[0]  # type: ignore[index]
    doc = _echo(until(lambda: _served(url, ns, warm), 30, "the activator serving the warm revision"))
    assert doc["pod"] == pod.metadata.name

    # Held at zero, its demand reported, released once its pod is ready (a new revision, seen
    # through the watches).
    cold = f"cold-{uuid.uuid4().hex[:4]}-00001"
    _revision(admin, ns, node_agent, cold, SLLM_CLASS, replicas=0)
    until(lambda: f"msg=revision service={ns}/{cold}" in act.log(), 30, "the activator knowing the new revision")
    thread, out = _pending(lambda: httpx.post(f"{url}/v1/completions", json={"prompt": "hi"},
                                              headers=_headers(ns, cold), timeout=120))
    until(lambda: recorder.demand_for(ns, cold), 10, "demand for the revision at zero")
    assert thread.is_alive() and not out, f"the request was not held: {out}"
    admin.apps.patch_namespaced_deployment_scale(f"{cold}-deployment", ns, {"spec": {"replicas": 1}})
    thread.join(90)
    assert out and not isinstance(out[0], Exception), out
    assert _echo(out[0])["path"] == "/v1/completions"

    time.sleep(RESYNC_S + 1)  # a resync of every informer
    assert act.stop(grace=10) != -9, f"the activator ignored SIGTERM:\n{act.tail()}"
    log = act.log()
    for line in ('msg="kubernetes source synced"', f'msg="instance ready" service={ns}/{warm}',
                 f'msg="instance ready" service={ns}/{cold}'):
        assert line in log, f"the scenario did not make the activator log {line!r}:\n{act.tail()}"

    assert_exactly_granted(kube.audit_log, f"system:serviceaccount:{SA[0]}:{SA[1]}", docs, "the activator",
                           since=audit_from)
