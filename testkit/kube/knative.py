"""What stands in for Knative Serving's controller in these tests (it cannot be built here: the Go
module proxy refuses the knative.dev/pkg version serving pins and serves no knative.dev/networking;
see docs/kubernetes.md).

- `revision_objects` builds a Revision, its Deployment and its PodAutoscaler the way Knative's
  revision reconciler does (pkg/reconciler/revision/resources: MakeDeployment, MakePA, meta.go):
  names (`<rev>-deployment`, PA = revision name), the `serving.knative.dev/*` and `app` labels
  on all three, owner references to the Revision, the PA's `scaleTargetRef`, `protocolType` and
  `reachability`. Annotations as Knative copies them: the PA gets the revision's annotations,
  the Deployment and its pod template get them *without* `autoscaling.knative.dev/*` (so a pod
  never carries the autoscaler class: `filterExcludedAndAutoscalingAnnotations`), and the pod
  template also gets `kubectl.kubernetes.io/default-container` naming the serving container.
  The function container stands in for the user container; there is no queue-proxy.
- `SksStatusWriter` writes the one thing our PA controller needs from Knative's
  serverlessservice reconciler: an SKS's status (`serviceName`, `privateServiceName`, Ready).
- `RevisionStatusWriter` does the part of Knative's revision reconciler that reads our PA:
  `propagate_autoscaler_status`, a port of `PropagateAutoscalerStatus`
  (pkg/apis/serving/v1/revision_lifecycle.go), writes the Revision's conditions (`Active`,
  `ResourcesAvailable`, `ContainerHealthy`, `Ready`) and replica counts from the PA's status, so
  the tests can check what a Knative user sees on the Revision at each step. The Deployment half
  of that reconciler (`PropagateDeploymentStatus`, the pods' scheduling and exit reasons) is not
  ported: tests/kube/test_config_deployment.py checks the one part of it our gates touch.
- `PrivateServices` makes, for each SKS, the private Service that reconciler makes
  (`pkg/reconciler/serverlessservice/serverlessservice.go: reconcilePrivateService`,
  `resources/services.go: MakePrivateService`): `<sks>-private`, selecting the scale target
  Deployment's pods, so that the real kube-controller-manager's EndpointSlice controller publishes
  real EndpointSlices for the pods the node agent runs (what our activator watches). The public
  Service and Endpoints (the SKS's Proxy/Serve switch) are not made: nothing here routes through
  them.
"""

from __future__ import annotations

import abc
import copy
import datetime as dt
import threading
from typing import Any, Self

from autoscaler.kube.podautoscaler import LivingConditions, condition
from sllm_knative.kube.client import PODAUTOSCALERS, REVISIONS, SERVERLESSSERVICES, Kube, Resource, is_status
from sllm_knative.kube.informer import Informer
from sllm_knative.log import get_logger

_log = get_logger("tests.kube.standin")


AUTOSCALING_GROUP = "autoscaling.knative.dev"  # knative/serving pkg/apis/autoscaling: GroupName
DEFAULT_CONTAINER = "kubectl.kubernetes.io/default-container"  # resources/meta.go


def revision_objects(name: str, namespace: str, rev_uid: str, containers: list[dict[str, Any]],
                     pod_spec: dict[str, Any], annotations: dict[str, str], replicas: int = 1
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(Deployment, PodAutoscaler) for the Revision `name` (already created, uid `rev_uid`)."""
    labels = {"serving.knative.dev/revision": name, "serving.knative.dev/revisionUID": rev_uid,
              "serving.knative.dev/configuration": name.rsplit("-", 1)[0],
              "serving.knative.dev/service": name.rsplit("-", 1)[0], "app": name}
    owner = {"apiVersion": REVISIONS.api_version, "kind": "Revision", "name": name, "uid": rev_uid,
             "controller": True, "blockOwnerDeletion": True}
    # meta.go: deploymentAnnotations and podAnnotations drop autoscaling.knative.dev/* (and a few
    # routing annotations a test revision does not have); podAutoscalerAnnotations keeps them.
    copied = {k: v for k, v in annotations.items() if not k.startswith(AUTOSCALING_GROUP)}
    serving = next((c.get("name") for c in containers if c.get("ports")), None) or containers[0].get("name")
    pod_annotations = {**copied, **({DEFAULT_CONTAINER: serving} if serving else {})}
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": f"{name}-deployment", "namespace": namespace, "labels": dict(labels),
                     "annotations": copied, "ownerReferences": [owner]},
        "spec": {"replicas": replicas, "progressDeadlineSeconds": 600,
                 "selector": {"matchLabels": {"serving.knative.dev/revisionUID": rev_uid}},
                 "template": {"metadata": {"labels": dict(labels), "annotations": pod_annotations},
                              "spec": {**pod_spec, "containers": containers}}}}
    pa = {
        "apiVersion": "autoscaling.internal.knative.dev/v1alpha1", "kind": "PodAutoscaler",
        "metadata": {"name": name, "namespace": namespace, "labels": labels, "annotations": annotations,
                     "ownerReferences": [owner]},
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"{name}-deployment"},
                 "protocolType": "http1", "reachability": "Reachable"}}
    return deployment, pa


def create_revision(kube: Kube, name: str, namespace: str, annotations: dict[str, str],
                    containers: list[dict[str, Any]], pod_spec: dict[str, Any], *,
                    labels: dict[str, str] | None = None, replicas: int = 1,
                    deployment_containers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Create the Revision `name` and what Knative's revision reconciler makes of it, its
    Deployment and PodAutoscaler (`revision_objects`). `containers` are the Revision's, as the user
    wrote them; `deployment_containers` (default the same) are what its pods run (the tests have no
    queue-proxy, so a serving container may listen on 8012 itself). The pod spec's nodeSelector
    goes on the Revision too, as Knative's kubernetes.podspec-nodeselector copies it onto the pods.
    Returns the Revision."""
    spec: dict[str, Any] = {"containers": containers}
    if "nodeSelector" in pod_spec:
        spec["nodeSelector"] = pod_spec["nodeSelector"]
    rev = kube.create(REVISIONS, {"apiVersion": REVISIONS.api_version, "kind": "Revision",
                                  "metadata": {"name": name, "namespace": namespace, "annotations": annotations,
                                               "labels": dict(labels or {})},
                                  "spec": spec}, namespace)
    deployment, pa = revision_objects(name, namespace, rev["metadata"]["uid"], deployment_containers or containers,
                                      pod_spec, annotations, replicas=replicas)
    kube.apps.create_namespaced_deployment(namespace, deployment)
    kube.create(PODAUTOSCALERS, pa, namespace)
    return rev


class _Standin(abc.ABC):
    """A stand-in for one of Knative's reconcilers: `_reconcile` for every object of `resource` in
    `namespace` that an informer (watch with resync) sees created or changed."""

    def __init__(self, name: str, resource: Resource, kube: Kube, namespace: str, resync_s: float) -> None:
        self.kube, self.namespace = kube, namespace
        self.informer = Informer(name, kube.custom.list_namespaced_custom_object, resource.group, resource.version,
                                 namespace, resource.plural, resync_s=resync_s)
        self.informer.add_handler(lambda kind, obj, old: self._reconcile(obj) if kind != "DELETED" else None)

    @abc.abstractmethod
    def _reconcile(self, obj: dict[str, Any]) -> None:
        """Bring what stands in for Knative's reconciler in line with `obj`."""

    def start(self) -> Self:
        self.informer.start()
        return self

    def stop(self) -> None:
        self.informer.stop()


class SksStatusWriter(_Standin):
    def __init__(self, kube: Kube, namespace: str) -> None:
        super().__init__("sks-standin", SERVERLESSSERVICES, kube, namespace, resync_s=5)
        self._lock = threading.Lock()

    def _reconcile(self, sks: dict[str, Any]) -> None:
        name = sks["metadata"]["name"]
        want = {"serviceName": name, "privateServiceName": f"{name}-private", "observedGeneration":
                sks["metadata"].get("generation", 1),
                "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
        if (sks.get("status") or {}) == want:
            return
        with self._lock:
            try:
                self.kube.replace_status(SERVERLESSSERVICES, name, {**sks, "status": want}, self.namespace)
            except Exception:
                pass  # a stale copy: the next event or resync brings the fresh one


# pkg/apis/serving/v1/revision_types.go and revision_lifecycle.go
RESOURCES_AVAILABLE, CONTAINER_HEALTHY, ACTIVE = "ResourcesAvailable", "ContainerHealthy", "Active"
REVISION_DEPENDENTS = (RESOURCES_AVAILABLE, CONTAINER_HEALTHY)  # Active is not one: a revision at zero is Ready
DEPLOYING, PROGRESS_DEADLINE = "Deploying", "ProgressDeadlineExceeded"


def _status_is(status: dict[str, Any], type_: str, value: str) -> bool:
    return (condition(status, type_) or {}).get("status") == value


def propagate_autoscaler_status(revision_status: dict[str, Any], pa_status: dict[str, Any],
                                now: dt.datetime) -> dict[str, Any]:
    """The Revision's status after Knative's revision reconciler reads its PA's status (a port of
    `RevisionStatus.PropagateAutoscalerStatus`): replica counts, `Active` from the PA's Ready,
    `ResourcesAvailable` and `ContainerHealthy` once the PA's scale target was initialized (never
    over a False the Deployment half set), and Ready from those two."""
    status = copy.deepcopy(revision_status)
    conds = LivingConditions(status, now, REVISION_DEPENDENTS)
    unavailable = _status_is(status, RESOURCES_AVAILABLE, "False") or _status_is(status, CONTAINER_HEALTHY, "False")
    for ours, theirs in (("actualReplicas", "actualScale"), ("desiredReplicas", "desiredScale")):
        status.pop(ours, None)
        if isinstance(pa_status.get(theirs), int) and pa_status[theirs] >= 0:
            status[ours] = pa_status[theirs]
    ready = condition(pa_status, "Ready")
    if ready is None:
        conds.mark(ACTIVE, "Unknown", DEPLOYING)
        if not unavailable:
            conds.mark(RESOURCES_AVAILABLE, "Unknown", DEPLOYING)
        return status
    initialized = _status_is(pa_status, "ScaleTargetInitialized", "True")
    if initialized and not unavailable:
        conds.mark(RESOURCES_AVAILABLE, "True")
        conds.mark(CONTAINER_HEALTHY, "True")
    if _status_is(status, RESOURCES_AVAILABLE, "True") and (not pa_status.get("serviceName") or not initialized):
        conds.mark(RESOURCES_AVAILABLE, "Unknown", DEPLOYING)
    value, reason, message = ready.get("status"), ready.get("reason", ""), ready.get("message", "")
    if value == "False":
        if not initialized and not unavailable and pa_status.get("serviceName") and reason == "TimedOut":
            conds.mark(RESOURCES_AVAILABLE, "False", PROGRESS_DEADLINE, "Initial scale was never achieved")
        conds.mark(ACTIVE, "False", reason, message)
    elif value == "True":
        conds.mark(ACTIVE, "True")
    else:
        conds.mark(ACTIVE, "Unknown", reason, message)
    return status


class RevisionStatusWriter(_Standin):
    """For every PA in `namespace`: its Revision's status as Knative's revision reconciler derives
    it from the PA (`propagate_autoscaler_status`), written through the status subresource."""

    def __init__(self, kube: Kube, namespace: str, resync_s: float = 2.0) -> None:
        super().__init__("revision-standin", PODAUTOSCALERS, kube, namespace, resync_s)
        self._lock = threading.Lock()

    def _reconcile(self, pa: dict[str, Any]) -> None:
        name = pa["metadata"]["name"]
        with self._lock:
            try:
                rev = self.kube.get(REVISIONS, name, self.namespace)
                old = rev.get("status") or {}
                new = propagate_autoscaler_status(old, pa.get("status") or {}, dt.datetime.now(dt.UTC))
                new["observedGeneration"] = rev["metadata"].get("generation", 1)
                if new != old:
                    self.kube.replace_status(REVISIONS, name, {**rev, "status": new}, self.namespace)
            except Exception as exc:  # gone, or a stale copy: the next event or resync brings the fresh one
                _log.info("revision status not written", revision=name, error=str(exc)[:200])


# pkg/networking/constants.go, knative.dev/networking pkg/apis/networking/ports.go,
# pkg/apis/serving/v1/revision_helpers.go
SKS_LABEL = "networking.internal.knative.dev/serverlessservice"
SERVICE_TYPE_LABEL = "networking.internal.knative.dev/serviceType"


def private_service(sks: dict[str, Any], selector: dict[str, str]) -> dict[str, Any]:
    """resources/services.go: MakePrivateService."""
    meta, spec = sks["metadata"], sks.get("spec") or {}
    h2c = spec.get("protocolType") == "h2c"
    target = 8013 if h2c else 8012  # targetPort(): BackendHTTP2Port / BackendHTTPPort
    name = "http2" if h2c else "http"  # ServicePortName
    http: dict[str, Any] = {"name": name, "protocol": "TCP", "port": 80, "targetPort": target}
    if h2c:
        http["appProtocol"] = "kubernetes.io/h2c"  # AppProtocol
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": f"{meta['name']}-private", "namespace": meta["namespace"],
                     "labels": {**(meta.get("labels") or {}), SKS_LABEL: meta["name"], SERVICE_TYPE_LABEL: "Private"},
                     "annotations": dict(meta.get("annotations") or {}),
                     "ownerReferences": [{"apiVersion": SERVERLESSSERVICES.api_version, "kind": "ServerlessService",
                                          "name": meta["name"], "uid": meta["uid"], "controller": True,
                                          "blockOwnerDeletion": True}]},
        "spec": {"selector": selector, "ports": [
            http,
            {"name": "https", "protocol": "TCP", "port": 443, "targetPort": 8112},
            {"name": "http-autometric", "protocol": "TCP", "port": 9090, "targetPort": "http-autometric"},
            {"name": "http-usermetric", "protocol": "TCP", "port": 9091, "targetPort": "http-usermetric"},
            {"name": f"{name}-istio", "protocol": "TCP", "port": target, "targetPort": target}]}}


class PrivateServices(_Standin):
    """For every SKS in `namespace`: its private Service, selecting what its scale target's
    Deployment selects (`getSelector`), created or brought back to the template."""

    def __init__(self, kube: Kube, namespace: str, resync_s: float = 2.0) -> None:
        super().__init__("sks-private-standin", SERVERLESSSERVICES, kube, namespace, resync_s)

    def _reconcile(self, sks: dict[str, Any]) -> None:
        name = sks["metadata"]["name"]
        ref = (sks.get("spec") or {}).get("objectRef") or {}
        try:
            dep = self.kube.apps.read_namespaced_deployment(ref.get("name", ""), self.namespace)
        except Exception as exc:  # not created yet: the next resync tries again
            _log.info("no scale target yet for the SKS", sks=name, target=ref.get("name"), error=str(exc)[:200])
            return
        want = private_service(sks, dict(dep.spec.selector.match_labels or {}))
        try:
            have = self.kube.core.read_namespaced_service(want["metadata"]["name"], self.namespace)
        except Exception as exc:
            if not is_status(exc, 404):
                raise
            self.kube.core.create_namespaced_service(self.namespace, want)
            return
        if (have.spec.selector or {}) != want["spec"]["selector"] or \
                {p.name for p in have.spec.ports or []} != {p["name"] for p in want["spec"]["ports"]}:
            self.kube.core.patch_namespaced_service(want["metadata"]["name"], self.namespace,
                                                   {"spec": {"selector": want["spec"]["selector"],
                                                             "ports": want["spec"]["ports"]}})
