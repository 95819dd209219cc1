"""The autoscaler's Deployment from manifests/autoscaler/, run on the test node agent: the
command, args, environment and probes the manifest declares are what the image would run
(`sllm-knative/autoscaler` -> `python -m autoscaler`), with the pod's service account.

Checked on the real control plane: both replicas run; exactly one is Ready, and it is the holder
of the autoscaler's Lease (readiness is leadership, so the Service routes the activator's reports
to the leader); both are live (`/livez`) and serve the webhook's certificate from its Secret
(the webhook Service publishes not-ready addresses); deleting the leader's pod releases the Lease
at once (its SIGTERM shutdown runs) and hands readiness to another replica.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import ssl
from pathlib import Path
from typing import Any

import httpx
import yaml

from autoscaler.kube.certs import SECRET
from autoscaler.kube.internal_token import SECRET as TOKEN_SECRET
from testkit.kube.nodeagent import NodeAgent
from tests.kube.audit import apply_docs
from tests.kube.conftest import agent_selector, ensure_namespace, until

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests" / "autoscaler"
NS = "sllm-knative"
LEASE = "sllm-knative-autoscaler"


def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((MANIFESTS / name).read_text()) if d]


def _pods(k: Any) -> list[Any]:
    return [p for p in k.core.list_namespaced_pod(NS, label_selector="app.kubernetes.io/name=sllm-knative-autoscaler")
            .items if p.metadata.deletion_timestamp is None]


def _ready(p: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])


def _answers(url: str, status: int) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == status
    except httpx.HTTPError:
        return False


def _tls_ok(ip: str) -> bool:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # the certificate names the Service
    with socket.create_connection((ip, 8443), timeout=3) as raw, ctx.wrap_socket(raw) as tls:
        return tls.getpeercert(binary_form=True) is not None


def test_the_deployment_runs_one_leader_and_two_webhooks(api: Any, k: Any, make_agent: Any) -> None:
    agent: NodeAgent = make_agent(2)
    deployment = next(d for d in _docs("deployment.yaml") if d["kind"] == "Deployment")
    # Test-only: keep the replicas on this agent's nodes (other tests' nodes share the cluster).
    deployment["spec"]["template"]["spec"]["nodeSelector"] = agent_selector(agent)
    ensure_namespace(k.core, "knative-serving")  # Knative is installed first; one of our Roles is in its namespace
    for ns in (NS, "knative-serving"):  # a fresh install: no internal token yet (other tests made theirs)
        with contextlib.suppress(Exception):
            k.core.delete_namespaced_secret(TOKEN_SECRET, ns)
    apply_docs(api, [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
                     *_docs("rbac.yaml"),
                     *[d for d in _docs("webhook.yaml") if d["kind"] == "Service"]])
    k.apps.create_namespaced_deployment(NS, deployment)
    try:
        pods = until(lambda: (lambda ps: ps if len(ps) == 2 and all(p.status.phase == "Running" for p in ps) else None)(
            _pods(k)), 60, "both replicas running")
        leader = until(lambda: (lambda rs: rs[0] if len(rs) == 1 else None)([p for p in _pods(k) if _ready(p)]), 60,
                       "exactly one Ready replica")
        holder = k.coord.read_namespaced_lease(LEASE, NS).spec.holder_identity
        assert holder.startswith(leader.metadata.name), (holder, leader.metadata.name)
        for p in pods:
            # Running is not listening yet (the standby is never Ready, so nothing else says it is):
            # live within 30 s.
            until(functools.partial(_answers, f"http://{p.status.pod_ip}:8080/livez", 200), 30,
                  f"{p.metadata.name} live")
            assert httpx.get(f"http://{p.status.pod_ip}:8080/healthz", timeout=5).status_code == (
                200 if p.metadata.name == leader.metadata.name else 503)
            until(functools.partial(_tls_ok, p.status.pod_ip), 30, f"the webhook's TLS on {p.metadata.name}")
        assert k.core.read_namespaced_secret(SECRET, NS).type == "kubernetes.io/tls"
        # The install's internal token, made by the replicas at their start, and its copy in Knative's
        # namespace for the activator Deployment: the same token.
        tokens = [k.core.read_namespaced_secret(TOKEN_SECRET, ns).data["token"] for ns in (NS, "knative-serving")]
        assert tokens[0] and tokens[0] == tokens[1]

        # The leader's pod goes. On SIGTERM it releases the Lease (the holder changes long before
        # the lease's 15 s would run out); another replica takes it and becomes the one Ready
        # replica: the survivor, or the Deployment's replacement pod if that one asks first.
        gone = leader.metadata.name
        k.core.delete_namespaced_pod(gone, NS)  # its own grace period (20 s), as a rollout or a drain deletes it
        until(lambda: not k.coord.read_namespaced_lease(LEASE, NS).spec.holder_identity.startswith(gone), 10,
              "the deleted leader to release the Lease")
        new = until(lambda: (lambda rs: rs[0] if len(rs) == 1 and rs[0].metadata.name != gone else None)(
            [p for p in _pods(k) if _ready(p)]), 60, "another replica to lead and become the one Ready replica")
        assert k.coord.read_namespaced_lease(LEASE, NS).spec.holder_identity.startswith(new.metadata.name)
    finally:
        k.apps.delete_namespaced_deployment("sllm-autoscaler", NS)
