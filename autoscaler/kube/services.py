"""The autoscaler's services on Kubernetes: the Revisions of our class, and the ScalingPolicies.

Knative's revision reconciler creates a Revision per change of a Service; each Revision of the
class `llm.autoscaling.sllm-knative.io` is one service of the autoscaler (key
`namespace/revision`, the name the activator routes by). `service_document` turns a Revision into
the Knative Service document the local cluster parses (`sllm_knative.config.parse_service`), so one
parser with one set of checks serves both; a Revision that fails them (no model annotation, a URI
that does not parse) is reported through `problems` for the PodAutoscaler controller to put on
the PA, and is not served. ScalingPolicies are parsed as in the local cluster.

Each ScalingPolicy's status is written back (by the leader, `write_policy_statuses`): its
`observedGeneration`, the Knative Services it is the effective policy of, and a `Ready` condition
(`Applied`, or `InvalidSpec` naming the field when a rule across fields refuses it); see
`policy_status`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from autoscaler.kube.podautoscaler import CLASS, CLASS_ANNOTATION
from sllm_knative.config import ConfigError, Manifest, ServiceConfig
from sllm_knative.config.policy import KNATIVE_SERVICE_LABEL, ScalingPolicy, parse_scaling_policy, policy_for
from sllm_knative.config.service import parse_service
from sllm_knative.kube.client import REVISIONS, SCALINGPOLICIES, Kube, error_message, is_status
from sllm_knative.kube.informer import MODIFIED, SYNC, Informer, key_of
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


READY = "Ready"


def policy_status(doc: dict[str, Any], services: Sequence[str], problem: str, now: str) -> dict[str, Any]:
    """The status ScalingPolicy `doc` should have (pure): the generation acted on, the Knative
    Services it is the effective policy of, and `Ready` (True `Applied`, or False `InvalidSpec`
    with `problem`), whose lastTransitionTime moves only when its status changes."""
    prior: dict[str, Any] = next(
        (c for c in (doc.get("status") or {}).get("conditions") or [] if c.get("type") == READY), {})
    if problem:
        value, reason, message = "False", "InvalidSpec", problem[:1024]
    else:
        names = sorted(set(services))
        value, reason = "True", "Applied"
        message = f"applies to {', '.join(names)}" if names else "applies to no Service of this autoscaler's class yet"
    since = prior.get("lastTransitionTime") if prior.get("status") == value and prior.get("lastTransitionTime") else now
    return {"observedGeneration": int((doc.get("metadata") or {}).get("generation") or 0),
            "services": sorted(set(services)),
            "conditions": [{"type": READY, "status": value, "reason": reason, "message": message,
                            "lastTransitionTime": since}]}


def changes_services(kind: str, obj: dict[str, Any], old: dict[str, Any] | None) -> bool:
    """Whether an informer event on a Revision or a ScalingPolicy can change the services or the
    policies (pure): not a resync, and not a write of the status alone (Knative's on Revisions,
    ours on policies), which leaves the generation, labels and annotations as they were."""
    if kind == SYNC:
        return False
    if kind != MODIFIED or old is None:
        return True
    a, b = old.get("metadata") or {}, obj.get("metadata") or {}
    return any(a.get(f) != b.get(f) for f in ("generation", "labels", "annotations"))


def effective_policies(manifest: Manifest) -> dict[tuple[str, str], list[str]]:
    """(namespace, policy) -> the Knative Services it is the effective policy of (pure)."""
    out: dict[tuple[str, str], list[str]] = {}
    for svc in manifest.services:
        p = policy_for(svc, manifest.policies)
        if p is not None:
            out.setdefault((p.namespace, p.name), []).append(svc.labels.get(KNATIVE_SERVICE_LABEL) or svc.name)
    return out


def parse_revision(revision: dict[str, Any]) -> ServiceConfig:
    """Raises ConfigError naming the field, as for a Service applied locally."""
    return parse_service(service_document(revision), source=f"Revision {key_of(revision)}")


class ServiceSource:
    """Watches Revisions and ScalingPolicies; calls `on_change(manifest, removed)` with every valid
    service of our class and every policy, and the keys of services that went away (in order, one
    call at a time, under a lock: `on_change` must hand the change on and return)."""

    def __init__(self, kube: Kube, on_change: Callable[[Manifest, list[str]], None], resync_s: float = 30.0) -> None:
        self.kube = kube
        self.on_change = on_change
        c = kube.custom
        self.revisions = Informer("revisions", c.list_cluster_custom_object, REVISIONS.group, REVISIONS.version,
                                  REVISIONS.plural, resync_s=resync_s)
        self.policies = Informer("scalingpolicies", c.list_cluster_custom_object, SCALINGPOLICIES.group,
                                 SCALINGPOLICIES.version, SCALINGPOLICIES.plural, resync_s=resync_s)
        self._lock = threading.Lock()
        self._problems: dict[str, str] = {}
        self._known: set[str] = set()
        # Per policy (key), as the last refresh read it: its generation, the Services it applies
        # to, and why it is refused ('' when it is not). What its status should say.
        self._policy_state: dict[str, tuple[int, list[str], str]] = {}
        for inf in (self.revisions, self.policies):
            inf.add_handler(lambda kind, obj, old: self.refresh() if changes_services(kind, obj, old) else None)

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
        """Every valid service of our class and every valid policy, and why each other Revision of
        our class is not served (by key)."""
        manifest, problems, _, _ = self._read()
        return manifest, problems

    def _read(self) -> tuple[Manifest, dict[str, str], dict[str, str], list[dict[str, Any]]]:
        """`manifest()`, why each refused policy is refused (by key), and the policies as read."""
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
        refused: dict[str, str] = {}
        docs = self.policies.items()
        for doc in docs:
            try:
                policies.append(parse_scaling_policy(doc, source=f"ScalingPolicy {key_of(doc)}"))
            except ConfigError as exc:  # the schema refuses most; a rule across fields may not
                refused[key_of(doc)] = str(exc)
        return Manifest(tuple(services), tuple(policies)), problems, refused, docs

    def policy_statuses(self, now: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(policy, the status it should have) for each policy whose status differs, from what the
        last refresh read (nothing is parsed again); a policy whose spec that refresh has not seen
        yet waits for it."""
        with self._lock:
            state = dict(self._policy_state)
        out = []
        for doc in self.policies.items():
            known = state.get(key_of(doc))
            if known is None or known[0] != _generation(doc):
                continue
            want = policy_status(doc, known[1], known[2], now)
            if want != doc.get("status"):
                out.append((doc, want))
        return out

    def write_policy_statuses(self, now: str) -> int:
        """Write every policy status that differs (the leader, each tick); returns how many were written.
        A conflict or a policy deleted meanwhile is left to the next call."""
        written = 0
        for doc, status in self.policy_statuses(now):
            meta, ready = doc["metadata"], status["conditions"][0]
            if ready["status"] == "False":  # written only when it changes: logged once per change
                _log.warning("ScalingPolicy not applied", policy=key_of(doc), error=ready["message"][:300])
            try:
                self.kube.replace_status(SCALINGPOLICIES, meta["name"], {**doc, "status": status}, meta["namespace"],
                                         _request_timeout=10)
                written += 1
            except Exception as exc:
                if not is_status(exc, 409) and not is_status(exc, 404):
                    _log.warning("could not write a ScalingPolicy status", policy=key_of(doc),
                                 error=error_message(exc)[:200])
        return written

    def refresh(self) -> None:
        # One refresh at a time, from reading the caches to handing the change on: the two
        # informers call this on their own threads, and a manifest read before another refresh's
        # must not be handed on after it (it would remove a revision the other had just added).
        with self._lock:
            manifest, problems, refused, docs = self._read()
            effective = effective_policies(manifest)
            self._policy_state = {}
            for doc in docs:
                meta = doc["metadata"]
                self._policy_state[key_of(doc)] = (_generation(doc), effective.get((meta["namespace"], meta["name"]), []),
                                                   refused.get(key_of(doc), ""))
            keys = {s.key for s in manifest.services}
            for key, why in problems.items():
                if self._problems.get(key) != why:
                    _log.warning("revision not served", service=key, error=why[:300])
            self._problems = problems
            removed = sorted(self._known - keys)
            self._known = keys
            self.on_change(manifest, removed)


def _generation(doc: dict[str, Any]) -> int:
    return int((doc.get("metadata") or {}).get("generation") or 0)
