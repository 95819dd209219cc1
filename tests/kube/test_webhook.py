"""The placement webhook against the real API server: the MutatingWebhookConfiguration of
manifests/autoscaler/webhook.yaml (failurePolicy Fail, its selectors), registered with
`clientConfig.url` on the pod network's host address (the test cluster has no Service
networking) and narrowed to the test's namespace; the webhook (certificate controller and
HTTPS server, `PlacementWebhook`) runs here, as the autoscaler's replicas would.

- pods of our class (Revision, Deployment as Knative makes them: the class is on the Revision,
  not on the pod) are created gated, with the loader's volumes and environment; a pod of another
  class, and one of ours without a model, are left alone and run;
- with the webhook down pod creation is refused (the ReplicaSet's FailedCreate Event names the
  webhook), and once it is back the missing pod is created and none was lost;
- a rotation changes the caBundle, every replica serves the new certificate, new pods get in;
- a second replica, not leading, serves the Secret's certificate and admits pods.
"""

from __future__ import annotations

import base64
import socket
import ssl
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from kubernetes.client.rest import ApiException

from autoscaler.kube.admission import DRAM_DIR, GATE, LOADER_ADDRESS, LOADER_DIR, MODEL_ANNOTATION, SSD_DIR
from autoscaler.kube.certs import CA_KEY, CERT_KEY, SECRET, WEBHOOK_CONFIG
from autoscaler.kube.podautoscaler import CLASS, CLASS_ANNOTATION, REVISION_LABEL
from autoscaler.kube.webhook import PATH, PlacementWebhook
from sllm_knative.kube.client import REVISIONS, Kube, error_message
from sllm_knative.ports import free_port
from testkit.kube.cluster import KubeCluster
from testkit.kube.knative import revision_objects
from testkit.kube.nodeagent import NodeAgent
from testkit.kube.util import webhook_config  # noqa: F401  (other tests import it from here)
from tests.kube.conftest import agent_selector, until

WEBHOOK_NAME = "placement.sllm-knative.io"
MODEL = "hf://org/tiny"
KPA = "kpa.autoscaling.knative.dev"
SLEEP = ["python", "-c", "import time; time.sleep(600)"]


def ca_bundle(kube: Kube) -> bytes:
    wh = kube.admission.read_mutating_webhook_configuration(WEBHOOK_CONFIG).webhooks[0]
    return base64.b64decode(wh.client_config.ca_bundle or "")


def served_certificate(host: str, port: int, trust: bytes) -> bytes:
    """The DER certificate a server presents, verified against `trust` for `host`."""
    ctx = ssl.create_default_context(cadata=trust.decode())
    with socket.create_connection((host, port), timeout=5) as raw, ctx.wrap_socket(raw, server_hostname=host) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


@dataclass
class Env:
    cluster: KubeCluster
    admin: Kube
    install: str
    pods: str
    port: int
    replicas: list[PlacementWebhook] = field(default_factory=list)

    @property
    def host(self) -> str:
        assert self.cluster.network is not None
        return self.cluster.network.host_ip

    def start(self, identity: str, port: int | None = None, kube: Kube | None = None,
              **kw: Any) -> PlacementWebhook:
        kw = {"lease_duration_s": 3.0, "renew_deadline_s": 2.0, "retry_period_s": 0.3, "resync_s": 5.0,
              "propagation_s": 1.0, **kw}
        w = PlacementWebhook(kube or self.admin, namespace=self.install, identity=identity, host=self.host,
                             port=port or self.port, extra_hosts=[self.host], **kw)
        self.replicas.append(w)
        w.start()
        until(lambda: ca_bundle(self.admin) and ca_bundle(self.admin) == self.secret()[CA_KEY], 15,
              "the caBundle to equal the Secret's ca.crt")
        return w

    def secret(self) -> dict[str, bytes]:
        s = self.admin.core.read_namespaced_secret(SECRET, self.install)
        return {k: base64.b64decode(v) for k, v in (s.data or {}).items()}

    def revision(self, name: str, annotations: dict[str, str]) -> dict[str, Any]:
        return self.admin.create(REVISIONS, {"apiVersion": REVISIONS.api_version, "kind": "Revision",
                                             "metadata": {"name": name, "namespace": self.pods,
                                                          "annotations": annotations},
                                             "spec": {"containers": [{"image": "python:3.11"}]}}, self.pods)

    def deployment(self, name: str, annotations: dict[str, str], agent: NodeAgent, replicas: int = 1,
                   env: list[dict[str, Any]] | None = None) -> None:
        rev = self.revision(name, annotations)
        container = {"name": "user-container", "image": "python:3.11", "command": SLEEP, "env": env or []}
        dep, _ = revision_objects(name, self.pods, rev["metadata"]["uid"], [container],
                                  {"nodeSelector": agent_selector(agent), "terminationGracePeriodSeconds": 1},
                                  annotations, replicas=replicas)
        # as Knative makes it: the class stays on the Revision (and the PA), never on the pod
        assert CLASS_ANNOTATION not in dep["spec"]["template"]["metadata"]["annotations"]
        self.admin.apps.create_namespaced_deployment(self.pods, dep)

    def pods_of(self, revision: str) -> list[Any]:
        return [p for p in self.admin.core.list_namespaced_pod(self.pods, label_selector=f"{REVISION_LABEL}={revision}").items
                if p.metadata.deletion_timestamp is None]

    def bare_pod(self, name: str, revision: str, model: str | None = MODEL) -> Any:
        return self.admin.core.create_namespaced_pod(self.pods, {
            "metadata": {"name": name, "labels": {REVISION_LABEL: revision, "serving.knative.dev/service": "chat"},
                         "annotations": {MODEL_ANNOTATION: model} if model else {}},
            "spec": {"nodeSelector": {"no-such-node": "x"}, "terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "user-container", "image": "python:3.11", "command": SLEEP}]}})


@pytest.fixture
def env(kube: KubeCluster, api: Any, namespace: str) -> Iterator[Env]:
    admin = Kube(api)
    install = f"sllm-wh-{uuid.uuid4().hex[:6]}"
    admin.core.create_namespace({"metadata": {"name": install}})
    assert kube.network is not None
    port = free_port(kube.network.host_ip)
    admin.admission.create_mutating_webhook_configuration(
        webhook_config(f"https://{kube.network.host_ip}:{port}{PATH}", namespace, install))
    e = Env(kube, admin, install, namespace, port)
    try:
        yield e
    finally:
        for w in e.replicas:
            w.stop(release=False)
        admin.admission.delete_mutating_webhook_configuration(WEBHOOK_CONFIG)
        admin.core.delete_namespace(install)


def _mutated(pod: Any, namespace: str, service: str) -> None:
    """A pod as the webhook leaves it: gated, the loader's volumes, mounts and environment."""
    assert [g.name for g in pod.spec.scheduling_gates or []] == [GATE]
    vols = {v.name: (v.host_path.path, v.host_path.type) for v in pod.spec.volumes if v.host_path}
    assert vols == {"sllm-loader": (LOADER_DIR, "DirectoryOrCreate"), "sllm-dram": (DRAM_DIR, "DirectoryOrCreate"),
                    "sllm-ssd": (SSD_DIR, "DirectoryOrCreate")}
    (c,) = pod.spec.containers
    mounts = {m.name: (m.mount_path, bool(m.read_only)) for m in c.volume_mounts if m.name.startswith("sllm-")}
    assert mounts == {"sllm-loader": (LOADER_DIR, False), "sllm-dram": (DRAM_DIR, True), "sllm-ssd": (SSD_DIR, True)}
    env = {e.name: e.value if e.value_from is None else e.value_from.field_ref.field_path for e in c.env}
    assert env["SLLM_CHECKPOINT"] == f"metadata.annotations['{MODEL_ANNOTATION}']"
    assert (env["SLLM_SERVICE"], env["SLLM_NODE"], env["SLLM_INSTANCE"]) == (
        f"{namespace}/{service}", "spec.nodeName", "metadata.name")


def _scheduled(pod: Any) -> tuple[str, str]:
    cond = next((c for c in pod.status.conditions or [] if c.type == "PodScheduled"), None)
    return (cond.status, cond.reason) if cond else ("", "")


def test_pods_of_our_class_are_gated_with_the_loader_mounts(env: Env, node_agent: NodeAgent) -> None:
    env.start("a")
    env.deployment("chat-00001", {CLASS_ANNOTATION: CLASS, MODEL_ANNOTATION: MODEL}, node_agent, replicas=2,
                   env=[{"name": "SLLM_LOADER", "value": "unix:///custom/loader.sock"}])
    pods = until(lambda: len(env.pods_of("chat-00001")) == 2 and env.pods_of("chat-00001"), 30, "two pods of chat")
    for p in pods:
        _mutated(p, env.pods, "chat")
        # the user's own variable stays
        assert {e.name: e.value for e in p.spec.containers[0].env}["SLLM_LOADER"] == "unix:///custom/loader.sock"
    until(lambda: all(_scheduled(p) == ("False", "SchedulingGated") for p in env.pods_of("chat-00001")), 10,
          "both pods SchedulingGated")
    time.sleep(1.0)  # the scheduler has had its chance, and did not bind them
    assert all(p.spec.node_name is None for p in env.pods_of("chat-00001"))


def test_other_pods_are_left_alone(env: Env, node_agent: NodeAgent) -> None:
    env.start("a")
    env.deployment("kpa-00001", {CLASS_ANNOTATION: KPA, MODEL_ANNOTATION: MODEL}, node_agent)
    env.deployment("bare-00001", {CLASS_ANNOTATION: CLASS}, node_agent)  # ours, but no model
    for rev in ("kpa-00001", "bare-00001"):
        def pods(rev: str = rev) -> list[Any]:
            return env.pods_of(rev)

        (p,) = until(pods, 30, f"the pod of {rev}")
        assert not p.spec.scheduling_gates, rev
        assert not [v for v in p.spec.volumes or [] if v.name.startswith("sllm-")], rev
        assert not [e for e in p.spec.containers[0].env or [] if e.name.startswith("SLLM_")], rev
        until(lambda: pods()[0].status.phase == "Running", 30, f"the pod of {rev} to run")


def test_webhook_down_refuses_pods_and_none_is_lost(env: Env, node_agent: NodeAgent) -> None:
    a = env.start("a")
    bundle = ca_bundle(env.admin)
    env.deployment("chat-00001", {CLASS_ANNOTATION: CLASS, MODEL_ANNOTATION: MODEL}, node_agent)
    (first,) = until(lambda: env.pods_of("chat-00001"), 30, "the first pod")
    a.stop()

    env.admin.apps.patch_namespaced_deployment_scale("chat-00001-deployment", env.pods, {"spec": {"replicas": 2}})

    def failed_create() -> list[str]:
        evs = env.admin.core.list_namespaced_event(env.pods, field_selector="reason=FailedCreate").items
        return [e.message for e in evs if e.involved_object.kind == "ReplicaSet"]

    messages = until(failed_create, 20, "the ReplicaSet's FailedCreate Event")
    assert any(f'failed calling webhook "{WEBHOOK_NAME}"' in m for m in messages), messages
    with pytest.raises(ApiException) as err:
        env.bare_pod("direct", "chat-00001")
    assert WEBHOOK_NAME in error_message(err.value)
    assert [p.metadata.uid for p in env.pods_of("chat-00001")] == [first.metadata.uid]

    # back (a restarted replica): the ReplicaSet's retry creates the missing pod; the first is
    # still there, and the certificate (and so the caBundle) survived the restart
    env.start("b")
    pods = until(lambda: len(env.pods_of("chat-00001")) == 2 and env.pods_of("chat-00001"), 60,
                 "the second pod after the webhook came back")
    assert first.metadata.uid in {p.metadata.uid for p in pods}
    for p in pods:
        _mutated(p, env.pods, "chat")
    assert ca_bundle(env.admin) == bundle


def test_rotation_changes_the_ca_bundle_and_pods_still_get_in(env: Env) -> None:
    env.revision("chat-00001", {CLASS_ANNOTATION: CLASS, MODEL_ANNOTATION: MODEL})
    w = env.start("a", validity_s=16.0, rotate_fraction=0.5)
    before, cert0 = ca_bundle(env.admin), env.secret()[CERT_KEY]
    until(lambda: ca_bundle(env.admin) != before, 20, "a rotation to change the caBundle")
    after = until(lambda: env.secret()[CERT_KEY] != cert0 and env.secret(), 10, "the rotated Secret")
    assert ca_bundle(env.admin) == after[CA_KEY]
    cas = x509.load_pem_x509_certificates(after[CA_KEY])
    # the previous CA is kept while it is valid: a replica still serving the old certificate is trusted
    assert len(cas) == 2 and cas[1].public_bytes(serialization.Encoding.PEM) == before
    until(lambda: served_certificate(env.host, env.port, after[CA_KEY]) == der(after[CERT_KEY]), 10,
          "the server to serve the rotated certificate")
    assert w.certs.rotations >= 2
    events = env.admin.core.list_namespaced_event(env.install, field_selector=f"involvedObject.name={SECRET}").items
    assert {"CertificateCreated", "CertificateRotated"} <= {e.reason for e in events}
    p = env.bare_pod("after-rotation", "chat-00001")  # no retry: admitted at the first try
    assert [g.name for g in p.spec.scheduling_gates or []] == [GATE]


def test_a_second_replica_serves_the_same_certificate(env: Env) -> None:
    env.revision("chat-00001", {CLASS_ANNOTATION: CLASS, MODEL_ANNOTATION: MODEL})
    a = env.start("a")
    assert a.certs.elector.wait_leading(10)
    b = env.start("b", port=free_port(env.host))
    assert not b.certs.elector.is_leader and b.certs.rotations == 0
    secret = env.secret()
    for w in (a, b):
        assert served_certificate(env.host, w.server.port, ca_bundle(env.admin)) == der(secret[CERT_KEY])
    # the API server calls b (a's server stops; a keeps leading): pods get in through b
    a.server.stop()
    env.admin.admission.patch_mutating_webhook_configuration(WEBHOOK_CONFIG, [
        {"op": "replace", "path": "/webhooks/0/clientConfig/url", "value": f"https://{env.host}:{b.server.port}{PATH}"}])
    p = until(lambda: env.bare_pod("through-b", "chat-00001"), 15, "a pod admitted through the second replica")
    assert [g.name for g in p.spec.scheduling_gates or []] == [GATE]
    assert b.server.reviews >= 1 and a.certs.elector.is_leader
    assert LOADER_ADDRESS in {e.value for e in p.spec.containers[0].env}
