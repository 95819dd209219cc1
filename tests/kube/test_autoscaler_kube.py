"""The autoscaler on Kubernetes (`python -m autoscaler --kube`), against the real control plane:
Revisions of our class become services, the decider and the load-time placement are the local
cluster's, and their decisions become pods through scheduling gates and `/scale`.

Real: kube-apiserver, kube-controller-manager (ReplicaSets, garbage collection), kube-scheduler,
the node agent's pods, one loader per node publishing its NodeCache, the autoscaler process.
The placement webhook runs in the autoscaler process and gates the pods (the API server calls it
by URL: the test cluster has no Service networking). Stand-ins, for what cannot run here
(docs/kubernetes.md): Knative's revision reconciler (`knative.revision_objects`) and its
SKS status; the activator's probe answer comes from a small HTTP server in the test, and the
activator's reports are posted by the test as the activator posts them
(`sllm_knative.api.autoscaler`).
"""

from __future__ import annotations

import http.server
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from autoscaler.kube.binding import INSTANCE_LABEL, NODE_ANNOTATION
from autoscaler.kube.certs import WEBHOOK_CONFIG
from autoscaler.kube.podautoscaler import CLASS, condition
from autoscaler.kube.webhook import PATH as WEBHOOK_PATH
from sllm_knative.api.autoscaler import DEMAND, STATS
from sllm_knative.kube.client import NODECACHES, PODAUTOSCALERS, SCALINGPOLICIES, Kube
from sllm_knative.ports import free_port
from testkit.kube.cluster import KubeCluster
from testkit.kube.knative import SksStatusWriter, create_revision
from testkit.kube.nodeagent import NodeAgent
from testkit.proc import Proc
from tests.kube.conftest import agent_selector, until
from tests.kube.test_nodeagent import ENV, SERVER
from tests.kube.test_nodecache import Loader, loaders, store  # noqa: F401  (fixtures)
from tests.kube.test_webhook import webhook_config

REPO = Path(__file__).resolve().parents[2]
REV = "chat-00001"


class ActivatorProbe(http.server.BaseHTTPRequestHandler):
    """Answers Knative's activator probe as the activator does (`K-Network-Probe: activator`)."""

    def do_GET(self) -> None:
        ok = self.headers.get("K-Network-Probe") == "activator"
        body = b"activator" if ok else b"not a probe"
        self.send_response(200 if ok else 400)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a: Any) -> None:
        pass


@pytest.fixture
def probe_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ActivatorProbe)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def dram_holds(status: dict[str, Any], model: str) -> bool:
    """Whether a NodeCache status (or the autoscaler's view of one, /v1/nodes) has `model` in DRAM."""
    return any(c.get("model") == model and "dram" in (c.get("tiers") or [])
               for c in status.get("checkpoints") or [])


def _in_dram(kube: Kube, node: str, model: str) -> bool:
    return dram_holds(kube.get(NODECACHES, node).get("status") or {}, model)


def autoscaler_sees_dram(url: str, node: str, model: str) -> bool:
    """Whether the autoscaler at `url` (its informers, not the API server) has `model` in `node`'s DRAM:
    what the next placement decides from."""
    nodes = httpx.get(f"{url}/v1/nodes", timeout=5).json()["nodes"]
    return any(n["name"] == node and dram_holds(n, model) for n in nodes)


def _pods(kube: Kube, namespace: str) -> list[Any]:
    return [p for p in kube.core.list_namespaced_pod(namespace, label_selector=f"serving.knative.dev/revision={REV}")
            .items if p.metadata.deletion_timestamp is None]


def _is_ready(p: Any) -> bool:
    """Whether a pod (the client's object) runs and is Ready."""
    return p.status.phase == "Running" and any(c.type == "Ready" and c.status == "True"
                                               for c in p.status.conditions or [])


def _ready_pod(kube: Kube, namespace: str) -> Any:
    return next((p for p in _pods(kube, namespace) if _is_ready(p)), None)


def test_autoscaler_places_cold_starts_by_load_time(kube: KubeCluster, api: Any, namespace: str, make_agent: Any,
                                                    store: Path, loaders: Any, probe_url: str,  # noqa: F811
                                                    tmp_path: Path) -> None:
    k = Kube(api)
    agent: NodeAgent = make_agent(2)
    n0, n1 = (s.name for s in agent.specs)
    lo0, lo1 = loaders(n0, kube.kubeconfig, store), loaders(n1, kube.kubeconfig, store)
    model = f"file://{store}/tiny"
    with lo1.client() as c:
        c.prefetch(model, tier="dram", wait=True)
    until(lambda: _in_dram(k, n1, model), 20, f"{n1}'s NodeCache to show the checkpoint in DRAM")

    # The Service's ScalingPolicy (by the Knative Service's name), then its first Revision.
    k.create(SCALINGPOLICIES, {"apiVersion": SCALINGPOLICIES.api_version, "kind": "ScalingPolicy",
                               "metadata": {"name": "chat-keepalive", "namespace": namespace},
                               "spec": {"target": {"serviceName": "chat"}, "keepAlive": "2s"}}, namespace)
    annotations = {"autoscaling.knative.dev/class": CLASS, "sllm-knative.io/model": model}
    container = {"name": "user-container", "image": "python:3.11",
                 "command": ["python", "-c", SERVER, "$(POD_IP)", "8080"], "env": ENV,
                 "ports": [{"containerPort": 8080}],
                 "readinessProbe": {"httpGet": {"port": 8080, "path": "/"}, "periodSeconds": 1}}
    standin = SksStatusWriter(k, namespace).start()
    install = f"{namespace}-sys"  # the autoscaler's Leases and the webhook's Secret (not our pods' namespace)
    k.core.create_namespace({"metadata": {"name": install}})
    assert kube.network is not None
    host_ip, webhook_port = kube.network.host_ip, free_port()
    k.admission.create_mutating_webhook_configuration(
        webhook_config(f"https://{host_ip}:{webhook_port}{WEBHOOK_PATH}", namespace, install))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    autoscaler = Proc("the autoscaler (kube)")
    autoscaler.start([
        sys.executable, "-m", "autoscaler", "--kube", "--kubeconfig", str(kube.kubeconfig), "--port", str(port),
        "--host", "127.0.0.1", "--lease-namespace", install, "--identity", "a", "--resync", "5",
        "--lease-duration", "3", "--scale-to-zero-grace", "1", "--probe-url", probe_url,
        "--webhook-port", str(webhook_port), "--webhook-host", host_ip, "--webhook-san", host_ip],
        tmp_path / "autoscaler.log", env={"PYTHONPATH": str(REPO)}, unset=("KUBECONFIG",))
    try:
        autoscaler.wait_http(f"{base}/healthz", 60)
        create_revision(k, REV, namespace, annotations, [container],
                        {"nodeSelector": agent_selector(agent), "terminationGracePeriodSeconds": 2},
                        labels={"serving.knative.dev/service": "chat"})

        # 1. The Deployment's initial pod is gated by the webhook; nobody planned it, so the
        # autoscaler places it like a scale-up: on the node whose NodeCache has it in DRAM.
        pod = until(lambda: _ready_pod(k, namespace), 60, "the initial pod to be placed and ready")
        assert pod.spec.node_name == n1
        assert pod.metadata.annotations[NODE_ANNOTATION] == n1
        assert pod.metadata.labels[INSTANCE_LABEL]
        assert not pod.spec.scheduling_gates
        env = {e.name: e for e in pod.spec.containers[0].env}  # the webhook connected it to its loader
        assert env["SLLM_LOADER"].value == "unix:///var/run/sllm-knative/loader.sock"
        assert env["SLLM_CHECKPOINT"].value_from.field_ref.field_path == "metadata.annotations['sllm-knative.io/model']"
        placed = [e for e in k.core.list_namespaced_event(namespace, field_selector=(
            f"involvedObject.name={pod.metadata.name}")).items if e.reason == "Placed"]
        assert placed and n1 in placed[0].message and "dram" in placed[0].message, placed
        services = {s["key"]: s for s in httpx.get(f"{base}/v1/services", timeout=5).json()["services"]}
        placed = services[f"{namespace}/{REV}"]["placements"]
        assert [(p["instance"], p["node"], p["tier"]) for p in placed] == [(pod.metadata.name, n1, "dram")], placed
        assert services[f"{namespace}/{REV}"]["policy"] == f"{namespace}/chat-keepalive"

        def pa_status() -> dict[str, Any]:
            return k.get(PODAUTOSCALERS, REV, namespace).get("status") or {}

        until(lambda: (condition(pa_status(), "ScaleTargetInitialized") or {}).get("status") == "True", 30,
              "ScaleTargetInitialized")

        # 2. Idle (the activator reports no concurrency): after the keep-alive the instance goes,
        # through pod-deletion-cost and /scale, and the PA is inactive.
        stop_stats = threading.Event()

        def report() -> None:
            body = {"services": [{"namespace": namespace, "name": REV, "average_concurrency": 0.0, "requests": 0,
                                  "in_flight": 0, "seconds": 1.0}]}
            while not stop_stats.wait(0.5):
                httpx.post(f"{base}{STATS}", json=body, timeout=5)

        reporter = threading.Thread(target=report, daemon=True)
        reporter.start()
        until(lambda: k.apps.read_namespaced_deployment(f"{REV}-deployment", namespace).spec.replicas == 0, 60,
              "replicas 0 after the keep-alive")
        until(lambda: not _pods(k, namespace), 60, "the pod to go")
        assert (condition(pa_status(), "Active") or {}).get("status") == "False"
        stop_stats.set()
        reporter.join(5)

        # 3. The checkpoint moves: out of n1's DRAM, into n0's. The next cold start (a request
        # held at zero: demand) lands where the NodeCache now shows it in DRAM.
        with lo1.client() as c:
            c.evict(model)
        with lo0.client() as c:
            c.prefetch(model, tier="dram", wait=True)
        until(lambda: _in_dram(k, n0, model) and not _in_dram(k, n1, model), 20, "the NodeCaches to show the move")
        r = httpx.post(f"{base}{DEMAND}", json={"namespace": namespace, "name": REV, "in_flight": 1}, timeout=10)
        assert r.status_code == 204, r.text
        pod = until(lambda: _ready_pod(k, namespace), 60, "the cold start's pod")
        assert pod.spec.node_name == n0
        until(lambda: (condition(pa_status(), "Active") or {}).get("status") == "True", 30, "Active again")
        reasons = {e.reason for e in k.core.list_namespaced_event(
            namespace, field_selector=f"involvedObject.name={REV}").items}
        assert "Scaled" in reasons, reasons
    finally:
        autoscaler.stop()
        standin.stop()
        # A Fail webhook nobody serves would block every other test's revision pods.
        k.admission.delete_mutating_webhook_configuration(WEBHOOK_CONFIG)
        k.core.delete_namespace(install)
