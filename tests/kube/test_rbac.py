"""Least privilege, measured: the PodAutoscaler controller and the placement webhook run as their
ServiceAccount with exactly the Roles in manifests/autoscaler/rbac.yaml, through a scenario that
makes them do everything they do. The controller: create an SKS, switch its mode, patch a scale,
write status, record and repeat Events, take and renew its Lease, refuse an SKS it does not own.
The webhook: take its own Lease, create its certificate Secret, watch it and its
MutatingWebhookConfiguration by name, publish the caBundle, rotate (update the Secret), and
admit a pod of our class (reading its Revision). The Kubernetes backend and the service source
(what `python -m autoscaler --kube` adds around them): watch Revisions, ScalingPolicies, Pods,
Nodes and NodeCaches, pin the gated pod to a node (an intent paired with it) and mark it for
deletion (the controller deletes it, the count keeping it); read or make the internal token's Secrets (the install's, Knative's copy, and the copy
in the namespace of the pod it pins), and list the activator replicas. The verbs
they called are read back from the
API server's audit log and compared with the rules, both ways: nothing they called was refused,
and nothing the Roles grant went unused.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from autoscaler.backends.kube import KubeBackend
from autoscaler.kube.activators import NAMESPACE as KNATIVE_NS
from autoscaler.kube.activators import KubeActivators
from autoscaler.kube.admission import GATE, MODEL_ANNOTATION
from autoscaler.kube.certs import LEASE as CERTS_LEASE
from autoscaler.kube.certs import SECRET, WEBHOOK_CONFIG
from autoscaler.kube.internal_token import SECRET as TOKEN_SECRET
from autoscaler.kube.internal_token import copy_token, ensure_token
from autoscaler.kube.pa_controller import LEASE as CONTROLLER_LEASE
from autoscaler.kube.pa_controller import PodAutoscalerController
from autoscaler.kube.podautoscaler import CLASS, CLASS_ANNOTATION, REVISION_LABEL, Advice, Settings
from autoscaler.kube.services import ServiceSource, parse_revision
from autoscaler.kube.webhook import PATH, PlacementWebhook
from sllm_knative.kube.client import (
    NODECACHES,
    PODAUTOSCALERS,
    REVISIONS,
    SCALINGPOLICIES,
    SERVERLESSSERVICES,
    Kube,
)
from sllm_knative.ports import free_port
from testkit.kube.cluster import KubeCluster
from testkit.kube.knative import SksStatusWriter, revision_objects
from testkit.kube.stack import read_token
from tests.kube.audit import apply_docs, assert_exactly_granted, audit_offset
from tests.kube.conftest import ensure_namespace, until
from tests.kube.test_webhook import webhook_config

RBAC = Path(__file__).resolve().parents[2] / "manifests" / "autoscaler" / "rbac.yaml"
SA = ("sllm-knative", "sllm-autoscaler")


def test_the_autoscaler_role_is_exactly_what_it_calls(kube: KubeCluster, api: Any, namespace: str) -> None:
    admin = Kube(api)
    # Only this test's calls count: on this worker's control plane an earlier test may have run the
    # install (the same ServiceAccount), whose pods kept calling while their Roles were deleted.
    since = audit_offset(kube.audit_log)
    docs = [d for d in yaml.safe_load_all(RBAC.read_text()) if d]
    ensure_namespace(admin.core, KNATIVE_NS)  # the activators' Role lives in Knative's namespace
    with contextlib.suppress(Exception):  # made again below, as the service account
        admin.core.delete_namespaced_secret(TOKEN_SECRET, KNATIVE_NS)
    for lease in (CONTROLLER_LEASE, CERTS_LEASE):  # an earlier install's: created again below
        with contextlib.suppress(Exception):
            admin.coordination.delete_namespaced_lease(lease, SA[0])
    apply_docs(api, [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": SA[0]}}, *docs])
    as_sa = Kube(kube.api_client_as(*SA))
    until(lambda: as_sa.custom.list_cluster_custom_object(PODAUTOSCALERS.group, PODAUTOSCALERS.version,
                                                          PODAUTOSCALERS.plural) is not None,
          15, "the ClusterRoleBinding to take effect")

    def may(verb: str, resource: str, name: str) -> bool:  # asked as the admin, so not in the audit log
        from kubernetes import client

        review = client.AuthorizationV1Api(api).create_subject_access_review({"spec": {
            "user": f"system:serviceaccount:{SA[0]}:{SA[1]}", "groups": ["system:serviceaccounts"],
            "resourceAttributes": {"namespace": SA[0], "verb": verb, "resource": resource, "name": name}}})
        return bool(review.status.allowed)

    until(lambda: may("list", "secrets", SECRET), 15, "the webhook's RoleBinding to take effect")

    # Revisions whose pods stay Pending (no node matches): the controller's calls are the point.
    advice: dict[str, Advice] = {}
    lock = threading.Lock()

    def advisor(key: str) -> Advice:
        with lock:
            return advice.get(key, Advice(-1))

    pas = {}
    for rev in ("chat-00001", "taken-00001"):
        r = admin.create(REVISIONS, {"apiVersion": REVISIONS.api_version, "kind": "Revision",
                                     "metadata": {"name": rev, "namespace": namespace,
                                                  "annotations": {CLASS_ANNOTATION: CLASS,
                                                                  MODEL_ANNOTATION: "hf://org/tiny"}},
                                     "spec": {"containers": [{"image": "python:3.11"}]}}, namespace)
        dep, pas[rev] = revision_objects(rev, namespace, r["metadata"]["uid"],
                                         [{"name": "user-container", "image": "python:3.11"}],
                                         {"nodeSelector": {"no-such-node": "x"}}, {"autoscaling.knative.dev/class": CLASS},
                                         replicas=0)
        admin.apps.create_namespaced_deployment(namespace, dep)
    # An SKS the second PA would own, made by someone else first: NotOwned, repeated on each retry.
    admin.create(SERVERLESSSERVICES, {"apiVersion": SERVERLESSSERVICES.api_version, "kind": "ServerlessService",
                                      "metadata": {"name": "taken-00001", "namespace": namespace},
                                      "spec": {"mode": "Proxy", "numActivators": 0, "protocolType": "http1", "objectRef": {
                                          "apiVersion": "apps/v1", "kind": "Deployment", "name": "x"}}}, namespace)

    # The webhook's configuration, called on the pod network's host address, for this namespace.
    assert kube.network is not None
    host, port = kube.network.host_ip, free_port(kube.network.host_ip)
    admin.admission.create_mutating_webhook_configuration(webhook_config(f"https://{host}:{port}{PATH}", namespace, SA[0]))
    # A short validity, so that it rotates (updates its Secret) within the scenario.
    webhook = PlacementWebhook(as_sa, namespace=SA[0], identity="rbac-test", host=host, port=port, extra_hosts=[host],
                               validity_s=6.0, rotate_fraction=0.5, propagation_s=0.3, resync_s=5.0,
                               lease_duration_s=3.0, renew_deadline_s=2.0, retry_period_s=0.3)
    standin = SksStatusWriter(admin, namespace).start()
    # The backend and the service source run on an event loop, as in the autoscaler process.
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def run(coro: Any, timeout_s: float = 30.0) -> Any:
        name = getattr(coro, "__qualname__", repr(coro))
        try:
            return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout_s)
        except TimeoutError:
            raise AssertionError(f"{name} did not return within {timeout_s} s") from None

    source = ServiceSource(as_sa, lambda manifest, removed: None, resync_s=5).start()
    # The internal token: read (or made) in the install's namespace, copied into Knative's; the
    # backend copies it into the namespace of each pod it pins, as in the autoscaler process.
    token = ensure_token(as_sa, SA[0], [KNATIVE_NS])
    assert ensure_token(as_sa, SA[0], [KNATIVE_NS]) == token  # the second start reads it
    backend: KubeBackend | None = None
    backend = run(KubeBackend(as_sa, resync_s=5, internal_token=token,
                              copy_token=lambda ns: copy_token(as_sa, ns, token)).start_watching())
    ctl = PodAutoscalerController(as_sa, advisor, settings=Settings(scale_to_zero_grace_s=1.0),
                                  identity="rbac-test", lease_namespace=SA[0], resync_s=5,
                                  lease_duration_s=3.0, renew_deadline_s=2.0, retry_period_s=0.3,
                                  stopping=backend.stopping).start()
    backend.nudge = ctl.queue.add
    try:
        webhook.start()
        assert ctl.elector.wait_leading(10)
        for pa in pas.values():
            admin.create(PODAUTOSCALERS, pa, namespace)
        key = f"{namespace}/chat-00001"
        until(lambda: (admin.get(PODAUTOSCALERS, "chat-00001", namespace).get("status") or {}).get(
            "metricsServiceName"), 15, "the PA status (SKS created and ready)")
        with lock:
            advice[key] = Advice(1, ebc=0)
        ctl.queue.add(key)
        until(lambda: admin.apps.read_namespaced_deployment("chat-00001-deployment", namespace).spec.replicas == 1,
              10, "replicas 1 through /scale")
        until(lambda: admin.get(SERVERLESSSERVICES, "chat-00001", namespace)["spec"]["mode"] == "Serve", 10,
              "the SKS switched to Serve")

        def not_owned_repeated() -> bool:
            evs = admin.core.list_namespaced_event(namespace, field_selector="involvedObject.name=taken-00001").items
            return any(e.reason == "NotOwned" and (e.count or 0) >= 2 for e in evs)

        until(not_owned_repeated, 20, "the NotOwned Warning, counted twice")

        # The webhook: a rotation (the Secret updated), and a pod of our class admitted through it.
        until(lambda: webhook.certs.rotations >= 2, 15, "the webhook's certificate rotated")

        def admitted() -> Any:
            return admin.core.create_namespaced_pod(namespace, {
                "metadata": {"name": "admitted", "labels": {REVISION_LABEL: "chat-00001"},
                             "annotations": {MODEL_ANNOTATION: "hf://org/tiny"}},
                "spec": {"nodeSelector": {"no-such-node": "x"},
                         "containers": [{"name": "user-container", "image": "python:3.11"}]}})

        pod = until(admitted, 15, "a pod of our class admitted by the webhook")
        assert [g.name for g in pod.spec.scheduling_gates or []] == [GATE]
        assert admin.core.read_namespaced_secret(SECRET, SA[0]).type == "kubernetes.io/tls"

        # The backend pins the gated pod to the node an intent names, then marks it for deletion;
        # the count stays (the advice wants three), so the controller deletes the marked pod itself.
        svc = parse_revision(admin.get(REVISIONS, "chat-00001", namespace))
        rec = run(backend.start(svc, "some-node", "chat-00001-1", "dram"))
        assert rec.id == "admitted"
        assert not admin.core.read_namespaced_pod("admitted", namespace).spec.scheduling_gates
        assert read_token(admin, namespace) == token  # copied into the pod's namespace before it was pinned
        with lock:
            advice[key] = Advice(3, ebc=0)
        run(backend.stop(rec, grace_s=0))  # returns once the pod is gone (the audit log shows the patch)
        assert "admitted" not in [p.metadata.name for p in admin.core.list_namespaced_pod(namespace).items]

        # The ScalingPolicies' status: one applied to chat-00001, one a rule across fields refuses.
        for name, spec in (("chat-policy", {"target": {"serviceName": "chat-00001"}, "keepAlive": "60s"}),
                           ("bad-policy", {"target": {"serviceName": "chat-00001"}, "minScale": 3, "maxScale": 1})):
            admin.create(SCALINGPOLICIES, {"apiVersion": SCALINGPOLICIES.api_version, "kind": "ScalingPolicy",
                                           "metadata": {"name": name, "namespace": namespace}, "spec": spec}, namespace)
        written: list[int] = []  # statuses are written once the source's refresh has read each policy
        until(lambda: written.append(source.write_policy_statuses("2026-12-05T12:00:00Z")) or sum(written) >= 2, 15,
              "both policies' statuses written")
        good = admin.get(SCALINGPOLICIES, "chat-policy", namespace)["status"]
        bad = admin.get(SCALINGPOLICIES, "bad-policy", namespace)["status"]
        assert good["services"] == ["chat-00001"] and good["conditions"][0]["reason"] == "Applied", good
        assert bad["conditions"][0]["reason"] == "InvalidSpec" and "spec.minScale" in bad["conditions"][0]["message"]

        # A placement's warm request, in the chosen node's NodeCache (made here as the loader would).
        warm_node = f"rbac-warm-{namespace}"
        admin.custom.create_cluster_custom_object(NODECACHES.group, NODECACHES.version, NODECACHES.plural, {
            "apiVersion": NODECACHES.api_version, "kind": "NodeCache", "metadata": {"name": warm_node},
            "spec": {"nodeName": warm_node}})
        try:
            until(lambda: backend.caches.get(warm_node), 15, "the backend's informer to see the NodeCache")
            run(backend.warm(warm_node, "hf://org/tiny"))
            warm = admin.get(NODECACHES, warm_node)["spec"].get("warm") or []
            assert [w["model"] for w in warm] == ["hf://org/tiny"], warm
        finally:
            admin.custom.delete_cluster_custom_object(NODECACHES.group, NODECACHES.version, NODECACHES.plural,
                                                      warm_node)

        # The activator replicas from activator-service's EndpointSlices.
        activators = KubeActivators(as_sa, namespace=KNATIVE_NS, resync_s=5).start()
        assert activators.slices is not None
        activators.slices.wait_synced(15)
        run(activators.close())
        time.sleep(1.0)  # a few lease renewals
    finally:
        if backend is not None:
            run(backend.close())
        source.stop()
        loop.call_soon_threadsafe(loop.stop)
        webhook.stop(release=False)
        ctl.stop(release=False)
        standin.stop()
        admin.admission.delete_mutating_webhook_configuration(WEBHOOK_CONFIG)

    assert_exactly_granted(kube.audit_log, f"system:serviceaccount:{SA[0]}:{SA[1]}", docs, "the autoscaler", since)
