"""The autoscaler's services on Kubernetes: the Revisions of our class, and the ScalingPolicies.

Knative's revision reconciler creates a Revision per change of a Service; each Revision of the
class `llm.autoscaling.sllm-knative.io` is one service of the autoscaler (key
`namespace/revision`, the name the activator routes by). `service_document` turns a Revision into
the Knative Service document the local cluster parses (`sllm_knative.config.parse_service`), so one
parser with one set of checks serves both; a Revision that fails them (no model annotation, a URI
that does not parse) is reported through `problems` for the PodAutoscaler controller to put on
the PA, and is not served. ScalingPolicies are parsed as in the local cluster.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from autoscaler.kube.podautoscaler import CLASS, CLASS_ANNOTATION
from sllm_knative.config import ConfigError, Manifest, ServiceConfig
from sllm_knative.config.policy import ScalingPolicy, parse_scaling_policy
from sllm_knative.config.service import parse_service
from sllm_knative.kube.client import REVISIONS, SCALINGPOLICIES, Kube
from sllm_knative.kube.informer import Informer, key_of
from sllm_knative.log import get_logger

_log = get_logger("autoscaler.kube")


def service_document(revision: dict[str, Any]) -> dict[str, Any]:
    """The Knative Service a Revision is the template of (pure): name = the revision's name."""
    meta = revision.get("metadata") or {}
    annotations = dict(meta.get("annotations") or {})
    return {"apiVersion": "serving.knative.dev/v1", "kind": "Service",
            "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace"),
                         "labels": dict(meta.get("labels") or {})},
            "spec": {"template": {"metadata": {"annotations": annotations}, "spec": revision.get("spec") or {}}}}


def ours(revision: dict[str, Any]) -> bool:
    return ((revision.get("metadata") or {}).get("annotations") or {}).get(CLASS_ANNOTATION) == CLASS


def parse_revision(revision: dict[str, Any]) -> ServiceConfig:
    """Raises ConfigError naming the field, as for a Service applied locally."""
    return parse_service(service_document(revision), source=f"Revision {key_of(revision)}")


class ServiceSource:
    """Watches Revisions and ScalingPolicies; calls `on_change(manifest, removed)` with every valid
    service of our class and every policy, and the keys of services that went away (in order, one
    call at a time, under a lock: `on_change` must hand the change on and return)."""

    def __init__(self, kube: Kube, on_change: Callable[[Manifest, list[str]], None], resync_s: float = 30.0) -> None:
        self.on_change = on_change
        c = kube.custom
        self.revisions = Informer("revisions", c.list_cluster_custom_object, REVISIONS.group, REVISIONS.version,
                                  REVISIONS.plural, resync_s=resync_s)
        self.policies = Informer("scalingpolicies", c.list_cluster_custom_object, SCALINGPOLICIES.group,
                                 SCALINGPOLICIES.version, SCALINGPOLICIES.plural, resync_s=resync_s)
        self._lock = threading.Lock()
        self._problems: dict[str, str] = {}
        self._known: set[str] = set()
        for inf in (self.revisions, self.policies):
            inf.add_handler(lambda kind, obj, old: self.refresh() if kind != "SYNC" else None)

    def start(self) -> ServiceSource:
        for inf in (self.revisions, self.policies):
            inf.start()
        for inf in (self.revisions, self.policies):
            inf.wait_synced()
        self.refresh()
        return self

    def stop(self) -> None:
        for inf in (self.revisions, self.policies):
            inf.stop()

    def problem(self, key: str) -> str:
        """Why the Revision `key` is not served ('' when it is, or is not ours)."""
        with self._lock:
            return self._problems.get(key, "")

    def manifest(self) -> tuple[Manifest, dict[str, str]]:
        services: list[ServiceConfig] = []
        problems: dict[str, str] = {}
        for rev in self.revisions.items():
            if not ours(rev):
                continue
            try:
                services.append(parse_revision(rev))
            except ConfigError as exc:
                problems[key_of(rev)] = str(exc)
        policies: list[ScalingPolicy] = []
        for doc in self.policies.items():
            try:
                policies.append(parse_scaling_policy(doc, source=f"ScalingPolicy {key_of(doc)}"))
            except ConfigError as exc:  # the schema refuses most; a rule across fields may not
                _log.warning("ScalingPolicy ignored", policy=key_of(doc), error=str(exc)[:300])
        return Manifest(tuple(services), tuple(policies)), problems

    def refresh(self) -> None:
        # One refresh at a time, from reading the caches to handing the change on: the two
        # informers call this on their own threads, and a manifest read before another refresh's
        # must not be handed on after it (it would remove a revision the other had just added).
        with self._lock:
            manifest, problems = self.manifest()
            keys = {s.key for s in manifest.services}
            for key, why in problems.items():
                if self._problems.get(key) != why:
                    _log.warning("revision not served", service=key, error=why[:300])
            self._problems = problems
            removed = sorted(self._known - keys)
            self._known = keys
            self.on_change(manifest, removed)
