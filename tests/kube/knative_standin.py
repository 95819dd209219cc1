"""What stands in for Knative Serving's controller in these tests (it cannot be built here: the Go
module proxy refuses the knative.dev/pkg version serving pins and serves no knative.dev/networking;
see docs/kubernetes.md).

- `revision_objects` builds a Revision, its Deployment and its PodAutoscaler the way Knative's
  revision reconciler does (pkg/reconciler/revision/resources: MakeDeployment, MakePA): names
  (`<rev>-deployment`, PA = revision name), the `serving.knative.dev/*` labels, owner references
  to the Revision, the PA's `scaleTargetRef`, `protocolType` and `reachability`. The function
  container stands in for the user container; there is no queue-proxy.
- `SksStatusWriter` writes the one thing our PA controller needs from Knative's
  serverlessservice reconciler: an SKS's status (`serviceName`, `privateServiceName`, Ready).
  It does not create the public and private Services and Endpoints that reconciler makes.
"""

from __future__ import annotations

import threading
from typing import Any

from sllm_knative.kube.client import REVISIONS, SERVERLESSSERVICES, Kube
from sllm_knative.kube.informer import Informer


def revision_objects(name: str, namespace: str, rev_uid: str, containers: list[dict[str, Any]],
                     pod_spec: dict[str, Any], annotations: dict[str, str], replicas: int = 1
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(Deployment, PodAutoscaler) for the Revision `name` (already created, uid `rev_uid`)."""
    labels = {"serving.knative.dev/revision": name, "serving.knative.dev/revisionUID": rev_uid,
              "serving.knative.dev/configuration": name.rsplit("-", 1)[0],
              "serving.knative.dev/service": name.rsplit("-", 1)[0]}
    owner = {"apiVersion": REVISIONS.api_version, "kind": "Revision", "name": name, "uid": rev_uid,
             "controller": True, "blockOwnerDeletion": True}
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": f"{name}-deployment", "namespace": namespace, "labels": {**labels, "app": name},
                     "annotations": annotations, "ownerReferences": [owner]},
        "spec": {"replicas": replicas, "progressDeadlineSeconds": 600,
                 "selector": {"matchLabels": {"serving.knative.dev/revisionUID": rev_uid}},
                 "template": {"metadata": {"labels": {**labels, "app": name}, "annotations": annotations},
                              "spec": {**pod_spec, "containers": containers}}}}
    pa = {
        "apiVersion": "autoscaling.internal.knative.dev/v1alpha1", "kind": "PodAutoscaler",
        "metadata": {"name": name, "namespace": namespace, "labels": labels, "annotations": annotations,
                     "ownerReferences": [owner]},
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"{name}-deployment"},
                 "protocolType": "http1", "reachability": "Reachable"}}
    return deployment, pa


class SksStatusWriter:
    def __init__(self, kube: Kube, namespace: str) -> None:
        self.kube, self.namespace = kube, namespace
        self.informer = Informer("sks-standin", kube.custom.list_namespaced_custom_object,
                                 SERVERLESSSERVICES.group, SERVERLESSSERVICES.version, namespace,
                                 SERVERLESSSERVICES.plural, resync_s=5)
        self.informer.add_handler(lambda kind, obj, old: self._fill(obj) if kind != "DELETED" else None)
        self._lock = threading.Lock()

    def start(self) -> SksStatusWriter:
        self.informer.start()
        return self

    def stop(self) -> None:
        self.informer.stop()

    def _fill(self, sks: dict[str, Any]) -> None:
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
