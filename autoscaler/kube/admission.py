"""The placement webhook's decision for one pod, as pure functions: AdmissionReview v1 in, JSONPatch out.

A pod goes through this only when the API server sends it (the MutatingWebhookConfiguration
`sllm-knative-placement`: Pod CREATE, objectSelector `serving.knative.dev/revision Exists`).
It is *ours* when its Revision's autoscaler class is `llm.autoscaling.sllm-knative.io`:

- Knative does not copy `autoscaling.knative.dev/*` annotations onto the Deployment or the pod
  template (knative/serving `pkg/reconciler/revision/resources/meta.go`: `podAnnotations` filters
  them out), and the Revision reconciler creates the Deployment before the PodAutoscaler
  (`revision.go`: reconcileDeployment, then reconcilePA), so the first pods may exist before the
  PA does. The class is therefore read from the Revision the pod's `serving.knative.dev/revision`
  label names (`lookup`), unless the pod carries the class annotation itself.
- Our pod with the `sllm-knative.io/model` annotation (which Knative does copy onto the pod) gets,
  idempotently (the webhook may be invoked again, `reinvocationPolicy: IfNeeded`):
  the scheduling gate `sllm-knative.io/placement` (the placement controller lifts it once it has
  pinned the pod to a node); in the user container (`user-container`, else the first) the node
  tier volumes of the node's loader (a DaemonSet: `sllm-loader` read-write for its socket,
  `sllm-dram` and `sllm-ssd` read-only, each at the same path as on the node) and the
  environment `functions/llm/config.py` reads: SLLM_LOADER, SLLM_CHECKPOINT (from the
  annotation), SLLM_SERVICE, SLLM_NODE, SLLM_INSTANCE, and (when the webhook is given the
  internal token's Secret, as `python -m autoscaler --kube` gives it) SLLM_INTERNAL_TOKEN from
  that Secret in the pod's namespace, so the function's internal API wants the install's token
  (the Kubernetes backend copies the Secret there before it pins the pod; until it exists the
  container cannot start). Nothing the pod already sets is replaced.
- Our pod without the model annotation is allowed unchanged, with a warning naming the
  annotation (the PodAutoscaler controller reports it on the PA).
- Every other pod is allowed unchanged.

A review that is not a well-formed AdmissionReview v1 raises `BadReview` naming the field.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from autoscaler.kube.internal_token import KEY as TOKEN_KEY
from autoscaler.kube.podautoscaler import CLASS, CLASS_ANNOTATION, REVISION_LABEL
from sllm_knative.api.auth import TOKEN_ENV
from sllm_knative.config.service import MODEL_ANNOTATION

GATE = "sllm-knative.io/placement"
SERVICE_LABEL = "serving.knative.dev/service"
USER_CONTAINER = "user-container"  # Knative's name for the serving container

# Where the node's loader (a DaemonSet, docs/sidecar.md) keeps its socket and tiers; the pod
# mounts each at the same path, so the paths the loader hands out in a lease resolve in the pod.
LOADER_DIR = "/var/run/sllm-knative"
LOADER_ADDRESS = f"unix://{LOADER_DIR}/loader.sock"  # a gRPC target, as sllm_knative/loader/client.py takes it
DRAM_DIR = "/dev/shm/sllm-knative"
SSD_DIR = "/var/lib/sllm-knative/ssd"


@dataclass(frozen=True)
class TierVolume:
    name: str
    path: str
    read_only: bool

    def volume(self) -> dict[str, Any]:
        return {"name": self.name, "hostPath": {"path": self.path, "type": "DirectoryOrCreate"}}

    def mount(self) -> dict[str, Any]:
        return {"name": self.name, "mountPath": self.path, "readOnly": self.read_only}


VOLUMES = (TierVolume("sllm-loader", LOADER_DIR, False), TierVolume("sllm-dram", DRAM_DIR, True),
           TierVolume("sllm-ssd", SSD_DIR, True))

# (namespace, revision) -> the Revision's autoscaler class, None when it has none or does not
# exist; raises ClassUnknown when it cannot tell (the API server did not answer).
Lookup = Callable[[str, str], str | None]


class BadReview(ValueError):
    """The request body is not an AdmissionReview v1 this webhook can answer; `field` names where."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.field, self.problem = where, problem


class ClassUnknown(RuntimeError):
    """The pod's Revision could not be read, so its class is unknown: the pod is refused (with
    `failurePolicy: Fail` its ReplicaSet retries), never admitted ungated."""


@dataclass(frozen=True)
class Request:
    uid: str
    namespace: str
    operation: str
    kind: str
    pod: dict[str, Any]


@dataclass
class Decision:
    patch: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    outcome: str = "ignored"  # ignored, other-class, no-model, mutated, unchanged (already mutated)
    service: str | None = None  # namespace/name, when the pod belongs to a revision


def parse_review(body: Any) -> Request:
    """The parts of an AdmissionReview v1 request we use; BadReview names the first bad field."""
    if not isinstance(body, dict):
        raise BadReview("body", f"an AdmissionReview object, got {type(body).__name__}")
    if body.get("apiVersion") != "admission.k8s.io/v1":
        raise BadReview("apiVersion", f"must be admission.k8s.io/v1, got {body.get('apiVersion')!r}")
    if body.get("kind") != "AdmissionReview":
        raise BadReview("kind", f"must be AdmissionReview, got {body.get('kind')!r}")
    req = body.get("request")
    if not isinstance(req, dict):
        raise BadReview("request", "missing or not an object")
    uid = req.get("uid")
    if not isinstance(uid, str) or not uid:
        raise BadReview("request.uid", "missing or not a non-empty string")
    kind = req.get("kind")
    if not isinstance(kind, dict) or not isinstance(kind.get("kind"), str):
        raise BadReview("request.kind", "missing or not a GroupVersionKind object")
    operation = req.get("operation")
    if not isinstance(operation, str):
        raise BadReview("request.operation", "missing or not a string")
    namespace = req.get("namespace") or ""
    if not isinstance(namespace, str):
        raise BadReview("request.namespace", "not a string")
    obj = req.get("object")
    if (kind.get("group", ""), kind["kind"], operation) == ("", "Pod", "CREATE"):
        if not isinstance(obj, dict):
            raise BadReview("request.object", "a Pod CREATE must carry the pod as an object")
        for part in ("metadata", "spec"):
            if not isinstance(obj.get(part), dict):
                raise BadReview(f"request.object.{part}", "missing or not an object")
        if not isinstance(obj["spec"].get("containers"), list) or not obj["spec"]["containers"]:
            raise BadReview("request.object.spec.containers", "missing or empty")
    return Request(uid, namespace, operation, kind["kind"], obj if isinstance(obj, dict) else {})


def pod_class(pod: Mapping[str, Any], namespace: str, lookup: Lookup) -> str | None:
    """The autoscaler class of a revision's pod: its own annotation if it has one (Knative never
    copies it there), else its Revision's (`lookup`, which may raise when it cannot tell)."""
    meta = pod.get("metadata") or {}
    own = (meta.get("annotations") or {}).get(CLASS_ANNOTATION)
    if own:
        return str(own)
    revision = (meta.get("labels") or {}).get(REVISION_LABEL)
    return lookup(namespace, revision) if revision else None


def _append(ops: list[dict[str, Any]], path: str, existing: Any, items: list[Any]) -> None:
    """Append items to the array at path: one `add` of the whole array when there is none yet."""
    if not items:
        return
    if not isinstance(existing, list):
        ops.append({"op": "add", "path": path, "value": items})
    else:
        ops += [{"op": "add", "path": f"{path}/-", "value": it} for it in items]


def environment(namespace: str, labels: Mapping[str, str]) -> list[dict[str, Any]]:
    """The variables the function container reads (functions/llm/config.py), in this order."""
    service = f"{namespace}/{labels.get(SERVICE_LABEL) or labels[REVISION_LABEL]}"

    def ref(path: str) -> dict[str, Any]:
        return {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}

    return [{"name": "SLLM_LOADER", "value": LOADER_ADDRESS},
            {"name": "SLLM_CHECKPOINT", "valueFrom": ref(f"metadata.annotations['{MODEL_ANNOTATION}']")},
            {"name": "SLLM_SERVICE", "value": service},
            {"name": "SLLM_NODE", "valueFrom": ref("spec.nodeName")},
            {"name": "SLLM_INSTANCE", "valueFrom": ref("metadata.name")}]


def token_env(secret: str) -> dict[str, Any]:
    """SLLM_INTERNAL_TOKEN from the internal token's Secret `secret` in the pod's namespace."""
    return {"name": TOKEN_ENV, "valueFrom": {"secretKeyRef": {"name": secret, "key": TOKEN_KEY}}}


def user_container(containers: list[dict[str, Any]]) -> int:
    return next((i for i, c in enumerate(containers) if c.get("name") == USER_CONTAINER), 0)


def mutate(pod: Mapping[str, Any], namespace: str, cls: str | None, token_secret: str | None = None) -> Decision:
    """What to do with a revision's pod of autoscaler class `cls` (see the module docstring);
    `token_secret` names the internal token's Secret to point SLLM_INTERNAL_TOKEN at."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    if not labels.get(REVISION_LABEL):
        return Decision(outcome="ignored")
    service = f"{namespace}/{labels.get(SERVICE_LABEL) or labels[REVISION_LABEL]}"
    if cls != CLASS:
        return Decision(outcome="other-class", service=service)
    if not (meta.get("annotations") or {}).get(MODEL_ANNOTATION):
        return Decision(outcome="no-model", service=service, warnings=[
            f"sllm-knative: no {MODEL_ANNOTATION} annotation on revision {labels[REVISION_LABEL]}: "
            "pod not gated, no loader mounts"])
    spec = pod.get("spec") or {}
    ops: list[dict[str, Any]] = []
    warnings: list[str] = []

    gates = spec.get("schedulingGates")
    if not any(g.get("name") == GATE for g in gates or []):
        _append(ops, "/spec/schedulingGates", gates, [{"name": GATE}])

    volumes = spec.get("volumes")
    have = {v.get("name"): v for v in volumes or []}
    for tv in VOLUMES:
        if tv.name in have and (have[tv.name].get("hostPath") or {}).get("path") != tv.path:
            warnings.append(f"sllm-knative: the pod's own volume {tv.name} is kept; the loader needs "
                            f"hostPath {tv.path}")
    _append(ops, "/spec/volumes", volumes, [tv.volume() for tv in VOLUMES if tv.name not in have])

    idx = user_container(spec["containers"])
    container = spec["containers"][idx]
    base = f"/spec/containers/{idx}"
    mounts = container.get("volumeMounts")
    taken = {m.get("mountPath") for m in mounts or []}
    _append(ops, f"{base}/volumeMounts", mounts, [tv.mount() for tv in VOLUMES if tv.path not in taken])

    env = container.get("env")
    names = {e.get("name") for e in env or []}
    wanted = [e for e in [*environment(namespace, labels), *([token_env(token_secret)] if token_secret else [])]
              if e["name"] not in names]
    if "SLLM_MODEL_DIR" in names and any(e["name"] == "SLLM_CHECKPOINT" for e in wanted):
        # functions/llm/config.py refuses both; the user's choice of a directory wins
        wanted = [e for e in wanted if e["name"] != "SLLM_CHECKPOINT"]
        warnings.append("sllm-knative: the container sets SLLM_MODEL_DIR, so SLLM_CHECKPOINT is not set "
                        "and the checkpoint is not leased")
    _append(ops, f"{base}/env", env, wanted)
    return Decision(ops, warnings, "mutated" if ops else "unchanged", service)


def response(uid: str, decision: Decision) -> dict[str, Any]:
    """An AdmissionReview v1 answer: allowed, with the patch (JSONPatch, base64) if any."""
    resp: dict[str, Any] = {"uid": uid, "allowed": True}
    if decision.patch:
        resp["patchType"] = "JSONPatch"
        resp["patch"] = base64.b64encode(json.dumps(decision.patch, separators=(",", ":")).encode()).decode()
    if decision.warnings:
        resp["warnings"] = list(decision.warnings)
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": resp}


def refusal(uid: str, code: int, message: str) -> dict[str, Any]:
    """An AdmissionReview v1 answer that refuses the request with this status."""
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "response": {"uid": uid, "allowed": False, "status": {"code": code, "message": message}}}


def admit(body: Any, lookup: Lookup, token_secret: str | None = None) -> tuple[dict[str, Any], Request, Decision | None]:
    """Answer one review: (the AdmissionReview to send back, the request, the decision or None
    when the class could not be learned). Raises BadReview for a malformed review."""
    req = parse_review(body)
    if (req.kind, req.operation) != ("Pod", "CREATE"):
        return response(req.uid, Decision()), req, Decision()
    try:
        cls = pod_class(req.pod, req.namespace, lookup)
    except ClassUnknown as exc:
        return refusal(req.uid, 503, f"sllm-knative placement webhook: {exc}"), req, None
    decision = mutate(req.pod, req.namespace, cls, token_secret)
    return response(req.uid, decision), req, decision
