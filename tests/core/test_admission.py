"""The placement webhook's decision (autoscaler/kube/admission.py), table-tested: which pods it
gates and gives the loader's mounts and environment, what it leaves alone, that a second call on
its own result changes nothing, and which malformed reviews it names. Patches are applied with a
small RFC 6902 applier that fails where the API server would (adding under a missing parent);
the real API server applies them in tests/kube/test_webhook.py. Also the Revision class lookup
and the HTTP layer (400s naming the field)."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import pytest
import yaml

from autoscaler.kube.admission import (
    DRAM_DIR,
    GATE,
    LOADER_ADDRESS,
    LOADER_DIR,
    MODEL_ANNOTATION,
    SSD_DIR,
    BadReview,
    ClassUnknown,
    admit,
    mutate,
)
from autoscaler.kube.certs import SERVICE, WEBHOOK_CONFIG
from autoscaler.kube.podautoscaler import CLASS, CLASS_ANNOTATION, REVISION_LABEL
from autoscaler.kube.webhook import PATH, PORT, RevisionClasses, WebhookServer
from tests.core.test_manifests import MANIFESTS

KPA = "kpa.autoscaling.knative.dev"
NS = "team"
MODEL = "hf://org/tiny"


# --- a JSON patch applier (RFC 6902: add, test) ----------------------------------------------


def apply_patch(doc: Any, ops: list[dict[str, Any]]) -> Any:
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent = doc
        for p in parts[:-1]:  # a missing parent is an error, as in the API server
            parent = parent[int(p)] if isinstance(parent, list) else parent[p]
        last = parts[-1]
        if op["op"] == "add":
            if isinstance(parent, list):
                if last == "-":
                    parent.append(op["value"])
                else:
                    parent.insert(int(last), op["value"])
            else:
                parent[last] = op["value"]
        elif op["op"] == "test":
            have = parent[int(last)] if isinstance(parent, list) else parent[last]
            if have != op["value"]:
                raise ValueError(f"test failed at {op['path']}: {have!r} != {op['value']!r}")
        else:
            raise ValueError(f"unexpected op {op['op']}")
    return doc


def test_the_applier_refuses_a_missing_parent() -> None:
    with pytest.raises(KeyError):
        apply_patch({"spec": {}}, [{"op": "add", "path": "/spec/containers/0/env/-", "value": 1}])


# --- pods and reviews -------------------------------------------------------------------------


def pod(*, revision: str | None = "chat-00001", service: str | None = "chat", model: str | None = MODEL,
        containers: list[dict[str, Any]] | None = None, own_class: str | None = None,
        **spec: Any) -> dict[str, Any]:
    labels = {}
    if revision:
        labels[REVISION_LABEL] = revision
    if service:
        labels["serving.knative.dev/service"] = service
    annotations = {}
    if model:
        annotations[MODEL_ANNOTATION] = model
    if own_class:
        annotations[CLASS_ANNOTATION] = own_class
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "chat-00001-deployment-abc-", "labels": labels, "annotations": annotations},
            "spec": {"containers": containers if containers is not None else [
                {"name": "user-container", "image": "sllm-knative/function"}], **spec}}


def review(obj: dict[str, Any], operation: str = "CREATE", kind: str = "Pod") -> dict[str, Any]:
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u-1", "kind": {"group": "", "version": "v1", "kind": kind},
                        "resource": {"group": "", "version": "v1", "resource": "pods"},
                        "namespace": NS, "operation": operation, "object": obj}}


def classes(table: dict[str, str | None]) -> Any:
    calls: list[tuple[str, str]] = []

    def lookup(namespace: str, name: str) -> str | None:
        calls.append((namespace, name))
        return table.get(name)

    lookup.calls = calls  # type: ignore[attr-defined]
    return lookup


def patched(answer: dict[str, Any], obj: dict[str, Any]) -> dict[str, Any]:
    resp = answer["response"]
    if "patch" not in resp:
        return obj
    assert resp["patchType"] == "JSONPatch"
    return apply_patch(obj, json.loads(base64.b64decode(resp["patch"])))


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env") or []}


def ref(path: str) -> dict[str, Any]:
    return {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}


WANT_ENV = {"SLLM_LOADER": LOADER_ADDRESS,
            "SLLM_CHECKPOINT": ref(f"metadata.annotations['{MODEL_ANNOTATION}']"),
            "SLLM_SERVICE": f"{NS}/chat", "SLLM_NODE": ref("spec.nodeName"), "SLLM_INSTANCE": ref("metadata.name")}
WANT_VOLUMES = [{"name": "sllm-loader", "hostPath": {"path": LOADER_DIR, "type": "DirectoryOrCreate"}},
                {"name": "sllm-dram", "hostPath": {"path": DRAM_DIR, "type": "DirectoryOrCreate"}},
                {"name": "sllm-ssd", "hostPath": {"path": SSD_DIR, "type": "DirectoryOrCreate"}}]
WANT_MOUNTS = [{"name": "sllm-loader", "mountPath": LOADER_DIR, "readOnly": False},
               {"name": "sllm-dram", "mountPath": DRAM_DIR, "readOnly": True},
               {"name": "sllm-ssd", "mountPath": SSD_DIR, "readOnly": True}]


def test_our_pod_is_gated_and_gets_the_loader_volumes_and_environment() -> None:
    lookup = classes({"chat-00001": CLASS})
    obj = pod()
    answer, _, decision = admit(review(obj), lookup)
    assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
    assert answer["response"]["uid"] == "u-1" and answer["response"]["allowed"] is True
    assert "warnings" not in answer["response"]
    assert decision is not None and decision.outcome == "mutated" and decision.service == f"{NS}/chat"
    assert lookup.calls == [(NS, "chat-00001")]
    out = patched(answer, obj)
    assert out["spec"]["schedulingGates"] == [{"name": GATE}]
    assert out["spec"]["volumes"] == WANT_VOLUMES
    c = out["spec"]["containers"][0]
    assert c["volumeMounts"] == WANT_MOUNTS
    assert env_of(c) == WANT_ENV
    assert [e["name"] for e in c["env"]] == list(WANT_ENV)
    # reinvocation (reinvocationPolicy IfNeeded): nothing more to do
    again, _, d2 = admit(review(out), lookup)
    assert "patch" not in again["response"] and d2 is not None and d2.outcome == "unchanged"


@pytest.mark.parametrize(("case", "obj", "table", "looked_up"), [
    ("no revision label", pod(revision=None), {}, []),
    ("another class (KPA)", pod(), {"chat-00001": KPA}, [(NS, "chat-00001")]),
    ("the Revision has no class", pod(), {"chat-00001": None}, [(NS, "chat-00001")]),
    ("the Revision does not exist", pod(revision="gone-00001"), {}, [(NS, "gone-00001")]),
    ("the pod's own annotation says KPA", pod(own_class=KPA), {"chat-00001": CLASS}, []),
])
def test_other_pods_are_allowed_unchanged(case: str, obj: dict[str, Any], table: dict[str, str | None],
                                          looked_up: list[tuple[str, str]]) -> None:
    lookup = classes(table)
    answer, _, decision = admit(review(obj), lookup)
    assert answer["response"] == {"uid": "u-1", "allowed": True}, case
    assert decision is not None and not decision.patch
    assert lookup.calls == looked_up, case


def test_the_pods_own_class_annotation_is_honoured_without_a_lookup() -> None:
    lookup = classes({"chat-00001": KPA})
    answer, _, _ = admit(review(pod(own_class=CLASS)), lookup)
    assert patched(answer, pod(own_class=CLASS))["spec"]["schedulingGates"] == [{"name": GATE}]
    assert lookup.calls == []


def test_our_pod_without_a_model_is_allowed_unchanged_with_a_warning() -> None:
    answer, _, decision = admit(review(pod(model=None)), classes({"chat-00001": CLASS}))
    resp = answer["response"]
    assert resp["allowed"] is True and "patch" not in resp
    assert len(resp["warnings"]) == 1 and MODEL_ANNOTATION in resp["warnings"][0]
    assert "chat-00001" in resp["warnings"][0] and len(resp["warnings"][0]) <= 120
    assert decision is not None and decision.outcome == "no-model"


def test_an_unreadable_revision_refuses_the_pod() -> None:
    def lookup(namespace: str, name: str) -> str | None:
        raise ClassUnknown(f"could not read Revision {namespace}/{name}: timed out")

    answer, _, decision = admit(review(pod()), lookup)
    assert decision is None
    resp = answer["response"]
    assert resp["allowed"] is False and resp["status"]["code"] == 503
    assert f"Revision {NS}/chat-00001" in resp["status"]["message"]


@pytest.mark.parametrize(("operation", "kind"), [("UPDATE", "Pod"), ("CREATE", "Deployment")])
def test_only_pod_creation_is_mutated(operation: str, kind: str) -> None:
    lookup = classes({"chat-00001": CLASS})
    answer, _, _ = admit(review(pod(), operation, kind), lookup)
    assert answer["response"] == {"uid": "u-1", "allowed": True}
    assert lookup.calls == []


SIDE = {"name": "proxy", "image": "envoy"}


@pytest.mark.parametrize(("case", "obj", "check"), [
    ("the user container is found by name",
     pod(containers=[dict(SIDE), {"name": "user-container", "image": "f"}]),
     lambda o: o["spec"]["containers"][0] == SIDE and env_of(o["spec"]["containers"][1]) == WANT_ENV),
    ("no user-container: the first container",
     pod(containers=[{"name": "main", "image": "f"}, dict(SIDE)]),
     lambda o: env_of(o["spec"]["containers"][0]) == WANT_ENV and o["spec"]["containers"][1] == SIDE),
    ("another gate is kept, ours appended",
     pod(schedulingGates=[{"name": "example.com/other"}]),
     lambda o: o["spec"]["schedulingGates"] == [{"name": "example.com/other"}, {"name": GATE}]),
    ("the user's variables win",
     pod(containers=[{"name": "user-container", "image": "f", "env": [
         {"name": "SLLM_LOADER", "value": "unix:///custom.sock"}, {"name": "SLLM_SERVICE", "value": "mine"}]}]),
     lambda o: env_of(o["spec"]["containers"][0]) == {**WANT_ENV, "SLLM_LOADER": "unix:///custom.sock",
                                                      "SLLM_SERVICE": "mine"}),
    ("the user's volumes and a mount at one of our paths are kept",
     pod(containers=[{"name": "user-container", "image": "f",
                      "volumeMounts": [{"name": "cache", "mountPath": DRAM_DIR}]}],
         volumes=[{"name": "cache", "emptyDir": {}}]),
     lambda o: (o["spec"]["volumes"] == [{"name": "cache", "emptyDir": {}}, *WANT_VOLUMES]
                and o["spec"]["containers"][0]["volumeMounts"] == [
                    {"name": "cache", "mountPath": DRAM_DIR}, WANT_MOUNTS[0], WANT_MOUNTS[2]])),
    ("no service label: the revision names the service",
     pod(service=None),
     lambda o: env_of(o["spec"]["containers"][0])["SLLM_SERVICE"] == f"{NS}/chat-00001"),
])
def test_injection_table(case: str, obj: dict[str, Any], check: Any) -> None:
    lookup = classes({"chat-00001": CLASS})
    answer, _, _ = admit(review(obj), lookup)
    out = patched(answer, obj)
    assert check(out), f"{case}: {json.dumps(out['spec'], indent=1)}"
    again, _, _ = admit(review(out), lookup)
    assert "patch" not in again["response"], f"{case}: not idempotent"


def test_a_foreign_volume_under_our_name_is_kept_and_named_in_a_warning() -> None:
    obj = pod(volumes=[{"name": "sllm-ssd", "emptyDir": {}}])
    answer, _, _ = admit(review(obj), classes({"chat-00001": CLASS}))
    out = patched(answer, obj)
    assert [v["name"] for v in out["spec"]["volumes"]] == ["sllm-ssd", "sllm-loader", "sllm-dram"]
    assert out["spec"]["volumes"][0] == {"name": "sllm-ssd", "emptyDir": {}}
    assert any("sllm-ssd" in w and SSD_DIR in w for w in answer["response"]["warnings"])


def test_a_model_directory_the_user_set_is_not_overridden_by_a_lease() -> None:
    obj = pod(containers=[{"name": "user-container", "image": "f", "env": [{"name": "SLLM_MODEL_DIR", "value": "/m"}]}])
    decision = mutate(obj, NS, CLASS)
    out = apply_patch(obj, decision.patch)
    env = env_of(out["spec"]["containers"][0])
    assert "SLLM_CHECKPOINT" not in env and env["SLLM_MODEL_DIR"] == "/m"
    assert any("SLLM_MODEL_DIR" in w for w in decision.warnings)


def _bad(body: Any, path: list[str | int], value: Any) -> Any:
    body = copy.deepcopy(body)
    at = body
    for p in path[:-1]:
        at = at[p]
    if value is KeyError:
        del at[path[-1]]
    else:
        at[path[-1]] = value
    return body


GOOD = review(pod())


@pytest.mark.parametrize(("body", "field"), [
    ([1, 2], "body"),
    (_bad(GOOD, ["apiVersion"], "admission.k8s.io/v1beta1"), "apiVersion"),
    (_bad(GOOD, ["kind"], "Review"), "kind"),
    (_bad(GOOD, ["request"], KeyError), "request"),
    (_bad(GOOD, ["request", "uid"], ""), "request.uid"),
    (_bad(GOOD, ["request", "kind"], "Pod"), "request.kind"),
    (_bad(GOOD, ["request", "operation"], KeyError), "request.operation"),
    (_bad(GOOD, ["request", "namespace"], 7), "request.namespace"),
    (_bad(GOOD, ["request", "object"], KeyError), "request.object"),
    (_bad(GOOD, ["request", "object", "metadata"], KeyError), "request.object.metadata"),
    (_bad(GOOD, ["request", "object", "spec"], []), "request.object.spec"),
    (_bad(GOOD, ["request", "object", "spec", "containers"], []), "request.object.spec.containers"),
])
def test_a_malformed_review_names_the_field(body: Any, field: str) -> None:
    with pytest.raises(BadReview) as err:
        admit(body, classes({}))
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ")


# --- the Revision lookup ----------------------------------------------------------------------


class FakeKube:
    def __init__(self, revisions: dict[str, dict[str, Any]], error: Exception | None = None) -> None:
        self.revisions, self.error, self.gets = revisions, error, 0

    def get(self, res: Any, name: str, namespace: str = "", **kw: Any) -> dict[str, Any]:
        from kubernetes.client.rest import ApiException

        self.gets += 1
        assert res.plural == "revisions" and kw.get("_request_timeout")
        if self.error is not None:
            raise self.error
        if name not in self.revisions:
            raise ApiException(status=404, reason="Not Found")
        return self.revisions[name]


def _rev(cls: str | None) -> dict[str, Any]:
    return {"metadata": {"annotations": {CLASS_ANNOTATION: cls} if cls else {}}}


def test_revision_classes_are_read_once_per_ttl() -> None:
    now = [0.0]
    kube = FakeKube({"a-00001": _rev(CLASS), "k-00001": _rev(KPA), "n-00001": _rev(None)})
    rc = RevisionClasses(kube, ttl_s=60, clock=lambda: now[0])  # type: ignore[arg-type]
    assert rc(NS, "a-00001") == CLASS and rc(NS, "k-00001") == KPA and rc(NS, "n-00001") is None
    assert kube.gets == 3
    assert rc(NS, "a-00001") == CLASS and rc(NS, "n-00001") is None
    assert kube.gets == 3  # remembered, the class-less one too
    now[0] = 61.0
    assert rc(NS, "a-00001") == CLASS and kube.gets == 4
    assert rc(NS, "missing-00001") is None and rc(NS, "missing-00001") is None
    assert kube.gets == 6  # a missing Revision is not remembered: it may be created next


def test_an_unreadable_revision_is_class_unknown_naming_it() -> None:
    from kubernetes.client.rest import ApiException

    rc = RevisionClasses(FakeKube({}, ApiException(status=403, reason="Forbidden")))  # type: ignore[arg-type]
    with pytest.raises(ClassUnknown) as err:
        rc(NS, "a-00001")
    assert f"Revision {NS}/a-00001" in str(err.value) and "Forbidden" in str(err.value)


# --- the HTTP layer ---------------------------------------------------------------------------


def test_http_answers_reviews_and_names_the_bad_field() -> None:
    from starlette.testclient import TestClient

    server = WebhookServer(classes({"chat-00001": CLASS}), "127.0.0.1", 0)
    client = TestClient(server.app())
    assert client.get("/healthz").status_code == 503  # no certificate yet
    r = client.post(PATH, content=b"{not json")
    assert r.status_code == 400 and "body: not JSON" in r.text
    r = client.post(PATH, json=_bad(GOOD, ["request", "uid"], KeyError))
    assert r.status_code == 400 and "request.uid" in r.text
    r = client.post(PATH, json=GOOD)
    assert r.status_code == 200
    assert patched(r.json(), pod())["spec"]["schedulingGates"] == [{"name": GATE}]
    assert client.get(PATH).status_code == 405


# --- the manifest says what the code assumes ---------------------------------------------------


def test_the_manifest_registers_the_webhook_as_decided() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d
            for d in yaml.safe_load_all((MANIFESTS / "autoscaler" / "webhook.yaml").read_text()) if d}
    svc = docs[("Service", SERVICE)]
    assert svc["metadata"]["namespace"] == "sllm-knative"
    assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(443, PORT)]
    (wh,) = docs[("MutatingWebhookConfiguration", WEBHOOK_CONFIG)]["webhooks"]
    assert wh["clientConfig"]["service"] == {"name": SERVICE, "namespace": "sllm-knative", "path": PATH, "port": 443}
    assert wh["clientConfig"]["caBundle"] == ""
    assert (wh["failurePolicy"], wh["sideEffects"], wh["timeoutSeconds"], wh["reinvocationPolicy"]) == (
        "Fail", "None", 5, "IfNeeded")
    assert wh["rules"] == [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                            "resources": ["pods"], "scope": "Namespaced"}]
    assert wh["objectSelector"] == {"matchExpressions": [{"key": REVISION_LABEL, "operator": "Exists"}]}
    assert wh["namespaceSelector"] == {"matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["kube-system", "sllm-knative"]}]}
