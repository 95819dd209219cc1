"""The fixture is the real control plane: admission webhooks, CRD subresources and schemas, RBAC.

Each test talks to the kube-apiserver built from k8s.io/kubernetes through the official
`kubernetes` client; nothing here is imitated.
"""

from __future__ import annotations

import base64
import json
import ssl
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from testkit.kube.cluster import KubeCluster
from tests.kube.conftest import until

ROOT = Path(__file__).resolve().parents[2]


def test_installs_knative_and_project_crds(kube: KubeCluster, api: client.ApiClient) -> None:
    served = {c.metadata.name for c in client.ApiextensionsV1Api(api).list_custom_resource_definition().items}
    for name in ("services.serving.knative.dev", "revisions.serving.knative.dev",
                 "podautoscalers.autoscaling.internal.knative.dev",
                 "serverlessservices.networking.internal.knative.dev",
                 "scalingpolicies.serving.sllm-knative.io", "nodecaches.serving.sllm-knative.io"):
        assert name in served


# --- mutating admission webhook over TLS ------------------------------------------------------


class _Mutator(BaseHTTPRequestHandler):
    """Answers AdmissionReview v1 with a JSON patch that labels the pod and records the call."""

    seen: list[str] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        req = review["request"]
        _Mutator.seen.append(f"{req['operation']} {req['kind']['kind']} {req['namespace']}")
        patch: list[dict[str, object]]
        if req["object"]["metadata"].get("labels"):
            patch = [{"op": "add", "path": "/metadata/labels/sllm-knative.io~1mutated", "value": "by-webhook"}]
        else:
            patch = [{"op": "add", "path": "/metadata/labels", "value": {"sllm-knative.io/mutated": "by-webhook"}}]
        body = json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": {
            "uid": req["uid"], "allowed": True, "patchType": "JSONPatch",
            "patch": base64.b64encode(json.dumps(patch).encode()).decode()}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def webhook_server(kube: KubeCluster, tmp_path: Path) -> Iterator[str]:
    assert kube.ca is not None
    crt, key = kube.ca.issue("webhook", hosts=("127.0.0.1",)).write(tmp_path, "webhook")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Mutator)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(crt), str(key))
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"https://127.0.0.1:{server.server_address[1]}/mutate"
    server.shutdown()
    server.server_close()


def _pod(name: str, labels: dict[str, str] | None = None) -> dict:
    return {"metadata": {"name": name, "labels": labels or {}},
            "spec": {"containers": [{"name": "c", "image": "python:3.11", "command": ["python", "-c", "pass"]}]}}


def test_mutating_webhook_patches_new_pods(kube: KubeCluster, api: client.ApiClient, namespace: str,
                                           webhook_server: str) -> None:
    assert kube.ca is not None
    adm = client.AdmissionregistrationV1Api(api)
    name = f"mutate-{namespace}"
    adm.create_mutating_webhook_configuration({
        "metadata": {"name": name},
        "webhooks": [{
            "name": "pods.test.sllm-knative.io", "admissionReviewVersions": ["v1"], "sideEffects": "None",
            "failurePolicy": "Fail", "timeoutSeconds": 10,
            "clientConfig": {"url": webhook_server, "caBundle": base64.b64encode(kube.ca.cert_pem).decode()},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
            "namespaceSelector": {"matchLabels": {"sllm-test": namespace}},
        }]})
    try:
        core = client.CoreV1Api(api)

        # A webhook configuration takes effect once the API server's informer has seen it.
        def created() -> bool:
            pod_name = f"p-{uuid.uuid4().hex[:6]}"
            pod = core.create_namespaced_pod(namespace, _pod(pod_name))
            if (pod.metadata.labels or {}).get("sllm-knative.io/mutated") == "by-webhook":
                return True
            core.delete_namespaced_pod(pod_name, namespace, grace_period_seconds=0)
            return False

        until(created, 20, "a pod mutated by the webhook")
        core.create_namespaced_pod(namespace, _pod("labelled", {"app": "t"}))
        stored = core.read_namespaced_pod("labelled", namespace)  # what etcd holds, read back
        assert stored.metadata.labels == {"app": "t", "sllm-knative.io/mutated": "by-webhook"}
        assert f"CREATE Pod {namespace}" in _Mutator.seen
    finally:
        adm.delete_mutating_webhook_configuration(name)


# --- CRDs: status subresource and schema ------------------------------------------------------

GROUP, VERSION, PLURAL = "serving.sllm-knative.io", "v1alpha1", "scalingpolicies"


def test_status_subresource_ignores_spec(api: client.ApiClient, namespace: str) -> None:
    co = client.CustomObjectsApi(api)
    obj = co.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "ScalingPolicy", "metadata": {"name": "p"},
        "spec": {"target": {"serviceName": "chat"}, "keepAlive": "30s"}})
    obj["spec"]["keepAlive"] = "5m"
    obj["status"] = {"observedGeneration": 1}
    co.replace_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, "p", obj)
    stored = co.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "p")
    assert stored["spec"]["keepAlive"] == "30s"  # spec through /status is ignored
    assert stored["status"]["observedGeneration"] == 1  # status through /status is kept
    assert stored["metadata"]["generation"] == 1


def test_schema_violation_is_rejected_naming_the_field(api: client.ApiClient, namespace: str) -> None:
    co = client.CustomObjectsApi(api)
    with pytest.raises(ApiException) as err:
        co.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "ScalingPolicy", "metadata": {"name": "bad"},
            "spec": {"target": {"serviceName": "chat"}, "minScale": -1}})
    assert err.value.status == 422
    assert "spec.minScale" in err.value.body


def test_knative_service_schema_is_enforced(api: client.ApiClient, namespace: str) -> None:
    co = client.CustomObjectsApi(api)
    with pytest.raises(ApiException) as err:
        co.create_namespaced_custom_object("serving.knative.dev", "v1", namespace, "services", {
            "apiVersion": "serving.knative.dev/v1", "kind": "Service", "metadata": {"name": "bad"},
            "spec": {"template": {"spec": {"containers": "not-a-list"}}}})
    assert err.value.status == 422
    assert "spec.template.spec.containers" in err.value.body


# --- RBAC -------------------------------------------------------------------------------------


def test_rbac_denies_what_the_role_does_not_grant(kube: KubeCluster, api: client.ApiClient,
                                                  namespace: str) -> None:
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "reader"}})
    rbac.create_namespaced_role(namespace, {"metadata": {"name": "cm-reader"}, "rules": [
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}]})
    rbac.create_namespaced_role_binding(namespace, {
        "metadata": {"name": "reader"}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                                    "name": "cm-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}]})
    as_reader = client.CoreV1Api(kube.api_client_as(namespace, "reader", 600))

    # RBAC bindings reach the authorizer through an informer: wait until the grant is live.
    until(lambda: as_reader.list_namespaced_config_map(namespace) is not None, 15, "the Role to take effect")
    with pytest.raises(ApiException) as err:
        as_reader.create_namespaced_config_map(namespace, {"metadata": {"name": "x"}})
    assert err.value.status == 403
    message = json.loads(err.value.body)["message"]
    assert f'User "system:serviceaccount:{namespace}:reader" cannot create resource "configmaps"' in message
    with pytest.raises(ApiException) as err:
        as_reader.list_namespaced_secret(namespace)
    assert err.value.status == 403
    with pytest.raises(ApiException) as err:
        as_reader.list_namespaced_config_map("default")  # the Role is namespaced
    assert err.value.status == 403
