"""End to end on the whole install, as a user applies it: `kubectl apply -k manifests/`, every
component a pod under the node agent, on three nodes.

Knative's side first (its activator Deployment with a stand-in container, `activator-service`,
its HPA and PDB, `config-deployment`), then the install (CRDs, namespace, RBAC, the autoscaler
Deployment with two replicas and leader election, its webhook Service and
MutatingWebhookConfiguration, the activator Deployment taking over `activator-service`, the loader
DaemonSet), the `config-deployment` merge patch, and Knative's activator scaled to zero
(testkit.kube.install.InstalledStack; the test cluster's few changes are listed in that module).

Checked: the install's state (one Ready autoscaler, the Lease's holder; the webhook's caBundle
published by it; `activator-service` on our two pods; a NodeCache per node, published by that
node's loader pod; Knative's `config-deployment` keeping its keys beside ours). Then, through the
activator pods with the official `openai` client: a cold start streams (the pod gated and
mutated by the webhook, called by the API server through its Service, with TLS from the leader's
certificate), placed on the node the load-time model chose (the `Placed` Event), its weights
leased through that node's loader pod; scale to zero after the keep-alive; and the next cold
start, through the other activator pod, on the node whose NodeCache shows the checkpoint in DRAM;
a scale-down with a seeded stream on each of two pods, the victim's generation migrated through
the activator (which the autoscaler found in `activator-service`'s EndpointSlices), both texts
equal to unmigrated runs; and a revision of Knative's KPA class, passed unchanged by the webhook,
served through both activator pods.
Last, the install's RBAC as a whole: the API server's audit log shows none of its three service
accounts refused anything.

The model and the store are test_e2e.py's (the tiny model widened to 5.8 MB, behind nginx's
2 MiB/s location, so a store load takes seconds and a DRAM load milliseconds).
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes import client

from autoscaler.kube.certs import WEBHOOK_CONFIG
from autoscaler.kube.podautoscaler import condition
from sllm_knative.api import instance as instance_api
from sllm_knative.config.autoscaler import KPA_CLASS
from sllm_knative.kube.client import NODECACHES, PODAUTOSCALERS, Kube
from testkit.kube.cluster import KubeCluster
from testkit.kube.install import INSTALL_NAMESPACE, KNATIVE_NAMESPACE, InstalledStack
from testkit.kube.nodeagent import NodeAgent
from testkit.kube.stack import INTERNAL_PORT
from testkit.servers import Nginx
from tests.kube.audit import audit_offset, called
from tests.kube.conftest import until
from tests.kube.test_activator_knative import _echo, _revision, _served
from tests.kube.test_e2e import (  # noqa: F401  (fixtures)
    CONTEXT,
    agent,
    scale_down_migrates,
    store,
    stream_chat,
    stream_completion,
    to_zero_then_cold_start_on_n0,
    web,
)

REV = "chat-00001"
KPA_REV = "echo-00001"
LEASE = "sllm-knative-autoscaler"


def _seconds_behind(stack: InstalledStack, instance: str) -> dict[str, float]:
    placement = stack.placement(REV, instance) or {}
    return {m[1]: float(m[2]) for r in placement.get("reasons", [])
            if (m := re.match(r"not (\S+): [\d.]+s, ([\d.]+)s slower", r))}


# About two minutes alone on two cores; `make test` runs it beside another worker's tests.
@pytest.mark.timeout(480)
def test_the_install_applied_with_kubectl_serves_cold_starts_placed_by_load_time(
        kube: KubeCluster, api: Any, namespace: str, agent: NodeAgent, web: Nginx,  # noqa: F811
        tmp_path: Path) -> None:
    k = Kube(api)
    n0, n1, n2 = (s.name for s in agent.specs)  # n2 never holds the checkpoint
    audit_from = audit_offset(kube.audit_log)
    with InstalledStack(kube, agent, namespace, f"{web.url}/slow", tmp_path) as stack:
        model = f"{stack.store_url}/tiny"  # the store, as the pods reach it
        def failure(what: str) -> str:
            pa = k.get(PODAUTOSCALERS, REV, namespace).get("status")
            return f"{what}\nPA status: {pa}\n{stack.pod_logs()}\n{stack.logs_of_processes()}"

        # The install, running: one leader among two autoscaler replicas, and it is the Ready one.
        [leader] = stack.autoscaler_pods(ready=True)
        assert len(stack.autoscaler_pods()) == 2
        holder = client.CoordinationV1Api(api).read_namespaced_lease(LEASE, INSTALL_NAMESPACE).spec.holder_identity
        assert holder.startswith(leader.metadata.name), (holder, leader.metadata.name)
        # The leader published the webhook's CA in the configuration the install applied empty.
        cfg = k.admission.read_mutating_webhook_configuration(WEBHOOK_CONFIG)
        [wh] = cfg.webhooks
        assert wh.client_config.service.name == "sllm-knative-webhook" and wh.client_config.ca_bundle, wh.client_config
        assert b"BEGIN CERTIFICATE" in base64.b64decode(wh.client_config.ca_bundle)
        # Knative's config-deployment: our key beside Knative's own (its queue-proxy image).
        data = k.core.read_namespaced_config_map("config-deployment", KNATIVE_NAMESPACE).data
        assert data["pod-is-always-schedulable"] == "true" and "queue-sidecar-image" in data, sorted(data)
        # Each node's NodeCache, published by that node's loader pod (its service account).
        for node in (n0, n1, n2):
            obj = until(lambda n=node: (k.get(NODECACHES, n).get("status") or {}).get("tiers") and k.get(NODECACHES, n),
                        30, f"{node}'s NodeCache")
            assert obj["status"]["stores"][0]["uri"] == stack.store_url, obj["status"]["stores"]
            assert stack.loader_pod(node).spec.service_account_name == "sllm-loader"

        # The checkpoint in n1's DRAM, through n1's loader pod; the autoscaler (through its
        # Service) sees it there.
        stack.prefetch(n1, model)
        # A revision of Knative's KPA class beside ours, made now so its pod starts meanwhile: its
        # pod passes the install's webhook unchanged (not our class), and both activator pods
        # serve it at the end (step 5).
        _revision(k, namespace, agent, KPA_REV, KPA_CLASS, replicas=1)
        stack.scaling_policy("chat-keepalive", "chat", keepAlive="3s")
        stack.function_revision(REV, "chat", model, args=["--max-model-len", str(CONTEXT)])
        until(lambda: stack.in_flight(REV) >= 0, 60, "the autoscaler to know the revision")
        first, second = stack.activators

        # 1. A cold start through the first activator pod: the stream is held until the pod
        # placed by the load-time model is ready.
        until(lambda: stack.pods(REV), 60, "the revision's first pod")
        try:
            text = stream_chat(stack.client(REV, activator=first))
        except Exception as exc:
            raise AssertionError(failure(f"the first cold start failed: {exc!r}")) from exc
        assert text, "an empty completion"
        pod = until(lambda: stack.ready_pod(REV), 30, "the serving pod ready")
        assert pod.spec.node_name == n1, failure(f"placed on {pod.spec.node_name}, not {n1}")
        placed = stack.events(pod.metadata.name, "Placed")
        assert placed and n1 in placed[0].message and "dram" in placed[0].message, placed
        behind = _seconds_behind(stack, pod.metadata.name)
        assert len(behind) == 2 and min(behind.values()) > 1.0, failure(f"the alternatives were behind by {behind}")
        # The install's webhook mutated it (through its Service): the loader's socket folder and
        # the internal token's Secret.
        [c] = [c for c in pod.spec.containers if c.name == "user-container"]
        assert {v.name for v in pod.spec.volumes or []} >= {"sllm-loader", "sllm-dram", "sllm-ssd"}, pod.spec.volumes
        [ref] = [e.value_from.secret_key_ref for e in c.env if e.name == "SLLM_INTERNAL_TOKEN"]
        assert (ref.name, ref.key) == ("sllm-knative-internal", "token"), ref
        # Its weights came through n1's loader pod (the lease is there, none elsewhere), and the
        # function's log names the socket in n1's hostPath folder.
        lo0, lo1, lo2 = (stack.loaders[n] for n in (n0, n1, n2))
        assert lo1.leases() == [(model, pod.metadata.name)]
        assert lo0.leases() == lo2.leases() == []
        log = agent.pod_log(namespace, pod.metadata.name, "user-container")
        assert "lease complete" in log and str(lo1.socket.parent.resolve()) in log, log[-3000:]
        loader_log = agent.pod_log(INSTALL_NAMESPACE, stack.loader_pod(n1).metadata.name, "loader")
        assert pod.metadata.name in loader_log, loader_log[-3000:]

        def pa_status() -> dict[str, Any]:
            return k.get(PODAUTOSCALERS, REV, namespace).get("status") or {}

        until(lambda: (condition(pa_status(), "Ready") or {}).get("status") == "True", 60, "the PA Ready")
        # The internal API wants the install's token (made by the autoscaler, copied here).
        internal = f"http://{pod.status.pod_ip}:{INTERNAL_PORT}{instance_api.GENERATIONS}"
        assert httpx.get(internal, timeout=5).status_code == 401
        assert httpx.get(internal, headers=stack.admin_headers(), timeout=5).status_code == 200

        # 2. Idle past the keep-alive: to zero (Proxy, the activator probed through
        # activator-service, then replicas 0), and n1's lease released.
        # 3. The checkpoint moves to n0's DRAM; the next cold start, through the other activator
        # pod, lands on n0 and leases from n0's loader pod.
        pod = to_zero_then_cold_start_on_n0(stack, pa_status, (lo0, lo1), (n0, n1), model,
                                            stack.client(REV, activator=second), text, failure)
        placed = stack.events(pod.metadata.name, "Placed")
        assert placed and n0 in placed[0].message and "dram" in placed[0].message, placed

        # 4. A scale-down with seeded streams in flight, through the first activator pod: two pods
        # (minScale 2), a stream on each, then minScale 0. The autoscaler finds both activator
        # replicas in activator-service's EndpointSlices and asks each, on its pod address with the
        # install's token, to withhold the victim and migrate its generation; the first moves it
        # to the other pod. Each client sees exactly the text of an unmigrated run of its seed.
        openai_client = stack.client(REV, activator=first)
        scale_down_migrates(stack, openai_client, failure)

        # 5. The KPA revision, which our autoscaler leaves alone, through each activator pod.
        for url in (first, second):
            doc = _echo(until(lambda u=url: _served(u, namespace, KPA_REV), 60, f"the KPA revision served by {url}"))
            assert doc["h"]["k-proxy-request"] == ["activator"] and "-deployment-" in doc["pod"], doc
        [kpa_pod] = stack.pods(KPA_REV)
        assert not kpa_pod.spec.scheduling_gates and not any(
            v.name.startswith("sllm-") for v in kpa_pod.spec.volumes or []), kpa_pod.spec

        # The install's RBAC, as a whole: none of its three service accounts was refused anything.
        with kube.audit_log.open("rb") as f:
            f.seek(audit_from)
            events = f.read()
        since = tmp_path / "audit.log"
        since.write_bytes(events[:events.rfind(b"\n") + 1])
        for ns, sa in ((INSTALL_NAMESPACE, "sllm-autoscaler"), (INSTALL_NAMESPACE, "sllm-loader"),
                       (KNATIVE_NAMESPACE, "sllm-activator")):
            calls, refused = called(since, f"system:serviceaccount:{ns}:{sa}")
            # Only this test's namespaces: the autoscaler watches every namespace, and a create in
            # another test's namespace while it is being deleted is refused (403) by the API server
            # for the namespace's termination, not by RBAC.
            ours = {f" in {n}" for n in (namespace, INSTALL_NAMESPACE, KNATIVE_NAMESPACE, "-")}
            refused = [r for r in refused if any(r.endswith(n) for n in ours)]
            assert calls and refused == [], (sa, refused)
