"""Our activator's Deployment (manifests/activator/) taking over Knative's `activator-service`, on the
real control plane and the test node agent, through the install and uninstall steps
docs/kubernetes.md gives ("Replacing Knative's activator"), run with kubectl.

Knative's side is its real release-1.23 manifests (`sllm_knative/schemas/knative/deployments/
activator.yaml`, vendored unmodified: the Deployment `activator` and the Service `activator-service`; the
HorizontalPodAutoscaler and PodDisruptionBudget of `config/core/deployments/activator-hpa.yaml`,
copied in testkit/kube/install.py), with one change: Knative's activator image cannot run here, so its container is a
stand-in that answers every request with `knative-activator` on the same port.

Checked: our pods become Ready through the manifest's probes, running the manifest's command,
args and env (the image's entry point, `--kube`, the in-cluster configuration from the projected
service-account token: the API server's audit log shows the ServiceAccount's calls, none
refused); they answer Knative's probe on their pod IP, on 8012 and on 8013 (h2c) and route a
revision's request to its pod; once Knative's Deployment is scaled to 0 the Service's Endpoints
(what Knative's SKS reconciler reads) and EndpointSlices hold exactly our pods, Knative's HPA
stays off (`ScalingDisabled`) and its PDB covers our pods; restoring Knative's activator and
deleting ours gives the Service back to Knative's pod.
"""

from __future__ import annotations

import copy
import functools
import subprocess
import uuid
from pathlib import Path
from typing import Any

import httpx
import yaml

from autoscaler.kube.activators import ADMIN_PORT
from autoscaler.kube.internal_token import ensure_token
from sllm_knative.api import activator as admin_api
from sllm_knative.api import auth
from sllm_knative.config.autoscaler import SLLM_CLASS
from sllm_knative.kube.client import Kube
from testkit.kube.cluster import BIN_DIR, KubeCluster
from testkit.kube.install import activator_for_test_cluster, kubectl, kustomize
from testkit.kube.install import knative_activator_docs as knative_docs
from tests.kube.audit import called
from tests.kube.conftest import agent_selector, ensure_namespace, start_agent, until
from tests.kube.test_activator_knative import (
    _echo,
    _headers,
    _ready_pods,
    _revision,
    cluster,  # noqa: F401  (a fixture)
)

ROOT = Path(__file__).resolve().parents[2]
OURS = ROOT / "manifests" / "activator"
NS = "knative-serving"
OUR_PODS = "app.kubernetes.io/name=sllm-activator"
KNATIVE_PODS = "app=activator,role=activator"

def our_docs(selector: dict[str, str]) -> list[dict[str, Any]]:
    """`kubectl kustomize manifests/activator`, with what this test cluster needs changed in the
    Deployment and nothing else (testkit.kube.install.activator_for_test_cluster): the pods bind
    their pod IP (`--host=$(POD_IP)`: the node agent's pods on one node share its network
    namespace, so two replicas on a node would collide on 0.0.0.0:8012; on a real node each pod
    has its own) and keep to this test's nodes. The autoscaler URLs stay as the manifest has them
    (this cluster has no DNS for them: the reports fail with warnings, which the routing does not
    depend on)."""
    return activator_for_test_cluster(kustomize(OURS), selector)


def ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def ready_ips(admin: Kube, selector: str) -> set[str]:
    return {p.status.pod_ip for p in admin.core.list_namespaced_pod(NS, label_selector=selector).items
            if ready(p) and p.metadata.deletion_timestamp is None}


def service_endpoints(admin: Kube) -> tuple[set[str], set[tuple[str | None, int]]]:
    """activator-service's Endpoints (what Knative's SKS reconciler reads): ready addresses, ports."""
    ep = admin.core.read_namespaced_endpoints("activator-service", NS)
    ips, ports = set(), set()
    for s in ep.subsets or []:
        ips |= {a.ip for a in s.addresses or []}
        ports |= {(p.name, p.port) for p in s.ports or []}
    return ips, ports


def slice_endpoints(admin: Kube) -> set[str]:
    """The ready addresses of activator-service's EndpointSlices."""
    slices = admin.discovery.list_namespaced_endpoint_slice(
        NS, label_selector="kubernetes.io/service-name=activator-service").items
    return {a for s in slices for e in s.endpoints or [] if (e.conditions.ready is not False) for a in e.addresses}


def pod_logs(agent_root: Path) -> str:
    out = []
    for f in sorted((agent_root / "pods").glob(f"{NS}_sllm-activator-*/*.log")):
        out.append(f"--- {f.parent.name}/{f.name}\n{f.read_text(errors='replace')[-2000:]}")
    return "\n".join(out) or "(no activator pod ran)"


def test_the_activator_deployment_takes_over_activator_service_and_gives_it_back(
        kube: KubeCluster, api: Any, cluster: tuple[Kube, str], tmp_path: Path) -> None:  # noqa: F811
    admin, ns = cluster
    # The Knative install this replaces: its namespace, and the namespace's CA bundle, which the
    # projected service-account volumes need (the root CA publisher writes it).
    ensure_namespace(admin.core, NS)
    until(lambda: admin.core.read_namespaced_config_map("kube-root-ca.crt", NS), 30, f"kube-root-ca.crt in {NS}")
    until(lambda: admin.core.read_namespaced_service_account("default", NS), 30, f"the default ServiceAccount in {NS}")
    agent = start_agent(kube, tmp_path / "agent", nodes=2)
    selector = agent_selector(agent)
    knative = knative_docs(selector)
    try:
        kubectl(kube.kubeconfig, "apply", "-f", "-", stdin=yaml.safe_dump_all(knative))
        knative_ip = until(lambda: ready_ips(admin, KNATIVE_PODS), 60, "Knative's activator (stand-in) Ready")
        until(lambda: service_endpoints(admin)[0] == knative_ip, 30, "activator-service on Knative's pod")
        audit_from = kube.audit_log.stat().st_size if kube.audit_log.exists() else 0

        # Install (docs/kubernetes.md): ours first, Ready; then Knative's scaled to zero. The
        # activator pods read the internal token's Secret, which the autoscaler makes at its start.
        token = ensure_token(admin, NS)
        kubectl(kube.kubeconfig, "apply", "-f", "-", stdin=yaml.safe_dump_all(our_docs(selector)))
        try:
            kubectl(kube.kubeconfig, "-n", NS, "rollout", "status", "deployment/sllm-activator", "--timeout=120s")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{pod_logs(agent.root)}") from None
        ours = ready_ips(admin, OUR_PODS)
        assert len(ours) == 2, ours
        kubectl(kube.kubeconfig, "-n", NS, "scale", "deployment", "activator", "--replicas=0")
        until(lambda: service_endpoints(admin)[0] == ours, 60, "activator-service on our pods only")
        until(lambda: slice_endpoints(admin) == ours, 30, "activator-service's slices on our pods only")
        assert service_endpoints(admin)[1] >= {("http", 8012), ("http2", 8013)}

        # Each pod, on its own address: Knative's probe on both ports, and ours (not the stand-in)
        # answering a request for no revision.
        for ip in ours:
            r = httpx.get(f"http://{ip}:8012/", headers={"K-Network-Probe": "activator"}, timeout=10)
            assert (r.status_code, r.text) == (200, "activator")
            with httpx.Client(http1=False, http2=True, timeout=10) as c:
                r = c.get(f"http://{ip}:8013/", headers={"K-Network-Probe": "activator"})
            assert (r.http_version, r.status_code, r.text) == ("HTTP/2", 200, "activator")
            r = httpx.get(f"http://{ip}:8012/", timeout=10)
            assert r.status_code == 404 and r.json()["error"]["code"] == "revision_not_found", r.text
            # The admin API on the pod's address (the autoscaler's withholds and migrations), only
            # with the install's token.
            assert httpx.get(f"http://{ip}:{ADMIN_PORT}{admin_api.STATS}", timeout=10).status_code == 401
            r = httpx.get(f"http://{ip}:{ADMIN_PORT}{admin_api.STATS}", headers=auth.auth_headers(token), timeout=10)
            assert r.status_code == 200 and "services" in r.json(), r.text

        # A revision's request, through each of our pods to the revision's pod.
        name = f"echo-{uuid.uuid4().hex[:4]}-00001"
        _revision(admin, ns, agent, name, SLLM_CLASS, replicas=1)
        [pod] = until(lambda: _ready_pods(admin, ns, name, 1), 60, "the revision's pod Ready")
        def routed(ip: str) -> httpx.Response | None:
            r = httpx.get(f"http://{ip}:8012/hello", headers=_headers(ns, name), timeout=10)
            return r if r.status_code == 200 else None

        for ip in ours:
            doc = _echo(until(functools.partial(routed, ip), 30, f"the activator at {ip} routing the revision"))
            assert (doc["pod"], doc["path"], doc["h"]["k-proxy-request"]) == (pod.metadata.name, "/hello",
                                                                              ["activator"])

        # The pods reached the API server as their ServiceAccount (in-cluster, the projected token).
        with kube.audit_log.open("rb") as f:
            f.seek(audit_from)
            events = f.read()
        since = tmp_path / "audit.log"
        since.write_bytes(events[:events.rfind(b"\n") + 1])
        calls, refused = called(since, f"system:serviceaccount:{NS}:sllm-activator")
        assert refused == [] and ("serving.knative.dev", "revisions", "list") in calls, (calls, refused)

        # Knative's HPA leaves a Deployment at zero alone; its PDB now counts our pods.
        from kubernetes import client

        def hpa_disabled() -> bool:
            hpa = client.AutoscalingV2Api(admin.api).read_namespaced_horizontal_pod_autoscaler("activator", NS)
            conds = {c.type: (c.status, c.reason) for c in hpa.status.conditions or []}
            return conds.get("ScalingActive") == ("False", "ScalingDisabled")

        until(hpa_disabled, 60, "Knative's HPA ScalingDisabled", interval=1)
        assert admin.apps.read_namespaced_deployment("activator", NS).spec.replicas == 0
        # minAvailable 80% of two pods rounds up to both: no voluntary eviction of either.
        until(lambda: (s := client.PolicyV1Api(admin.api).read_namespaced_pod_disruption_budget(
            "activator-pdb", NS).status) and (s.expected_pods, s.current_healthy, s.disruptions_allowed) == (2, 2, 0),
              30, "Knative's PDB counting our two pods")

        # Uninstall: Knative's back first (activator-service never empty), then ours deleted.
        kubectl(kube.kubeconfig, "-n", NS, "scale", "deployment", "activator", "--replicas=1")
        kubectl(kube.kubeconfig, "-n", NS, "rollout", "status", "deployment/activator", "--timeout=120s")
        kubectl(kube.kubeconfig, "delete", "-k", str(OURS))
        knative_ip = ready_ips(admin, KNATIVE_PODS)
        until(lambda: service_endpoints(admin)[0] == knative_ip, 60, "activator-service back on Knative's pod")
        [back] = knative_ip
        assert httpx.get(f"http://{back}:8012/", timeout=10).text == "knative-activator"
        until(lambda: not admin.core.list_namespaced_pod(NS, label_selector=OUR_PODS).items, 60,
              "our activator pods gone")
    finally:
        for d in reversed(copy.deepcopy(knative)):
            subprocess.run([str(BIN_DIR / "kubectl"), "--kubeconfig", str(kube.kubeconfig), "delete",
                            "--ignore-not-found", "--wait=false", "-f", "-"], input=yaml.safe_dump(d),
                           capture_output=True, text=True, timeout=60)
        subprocess.run([str(BIN_DIR / "kubectl"), "--kubeconfig", str(kube.kubeconfig), "delete",
                        "--ignore-not-found", "--wait=false", "-k", str(OURS)], capture_output=True, text=True,
                       timeout=60)
        agent.stop(delete_nodes=True)
