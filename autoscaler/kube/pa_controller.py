"""The PodAutoscaler controller for our class: informers, a work queue, leader election, Events,
around the pure step in `autoscaler.kube.podautoscaler`.

- Informers (list + watch + resync) on PodAutoscalers, ServerlessServices, the revisions'
  Deployments and Pods fill caches; every change enqueues the PA it concerns (`ns/name`; the SKS,
  Deployment and Pods of a revision map to its PA by name and by the `serving.knative.dev/revision`
  label). The informers run in every replica, so a new leader starts with a warm cache.
- Workers run only while this replica leads (a `coordination.k8s.io` Lease): each takes a key,
  reads the caches, asks the advisor (the decider) what the revision wants, calls `reconcile`, and
  applies the plan: create or update the SKS, patch the Deployment's `scale` subresource
  (JSON patch of `/spec/replicas`, as Knative's scaler does), delete the pods the autoscaler
  stopped that this count would keep (`binding.stranded`), write the status through the status
  subresource (only when it changed), record the plan's Events, and requeue when asked.
- Conflicts (409) and failures retry the key with backoff; a PA that is gone is forgotten.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable
from typing import Any

from autoscaler.kube.binding import pod_ready, stranded
from autoscaler.kube.podautoscaler import (
    CLASS,
    CLASS_ANNOTATION,
    REVISION_LABEL,
    Advice,
    Pods,
    Settings,
    reconcile,
    sks_name,
)
from sllm_knative.kube.client import PODAUTOSCALERS, SERVERLESSSERVICES, Kube, error_message, is_status
from sllm_knative.kube.events import EventRecorder
from sllm_knative.kube.informer import Informer, key_of, split_key
from sllm_knative.kube.leader import LeaderElector
from sllm_knative.kube.workqueue import ShutDown, WorkQueue
from sllm_knative.log import get_logger

LEASE = "sllm-knative-autoscaler"  # the Lease of the active replica (leader election)
_log = get_logger("autoscaler.kube")

REQUEST_TIMEOUT_S = 15.0  # a write the API server does not answer fails, and the key is retried

Advisor = Callable[[str], Advice]  # "ns/revision" -> what the decider wants
Prober = Callable[[dict[str, Any]], bool]  # PA -> does the activator answer for the revision?
Stopping = Callable[[str], frozenset[str]]  # "ns/revision" -> its pods the autoscaler is stopping


PROBE_URL = "http://{service}.{namespace}.svc.cluster.local"  # the revision's public Service


def http_prober(url_template: str = PROBE_URL, timeout_s: float = 2.0) -> Prober:
    """Knative's activator probe (kpa/scaler.go activatorProbe): GET the revision's public service
    with `K-Network-Probe: activator`; the activator is in the path when it answers 200 `activator`
    (the revision's own pods answer the probe with `queue`, or not at all)."""
    import httpx

    def probe(pa: dict[str, Any]) -> bool:
        meta = pa["metadata"]
        service = (pa.get("status") or {}).get("serviceName") or meta["name"]
        url = url_template.format(service=service, namespace=meta["namespace"], revision=meta["name"])
        try:
            r = httpx.get(f"{url}/healthz", timeout=timeout_s, headers={
                "K-Network-Probe": "activator", "Knative-Serving-Revision": meta["name"],
                "Knative-Serving-Namespace": meta["namespace"]})
        except httpx.HTTPError as exc:
            _log.info("activator probe failed", pa=f"{meta['namespace']}/{meta['name']}", error=str(exc)[:200])
            return False
        return r.status_code == 200 and r.text == "activator"

    return probe


def pod_counts(pods: list[dict[str, Any]]) -> Pods:
    """Knative's PodAccessor.PodCountsByState: ready, not ready, pending, terminating."""
    ready = not_ready = pending = terminating = 0
    for p in pods:
        st = p.get("status") or {}
        if (p.get("metadata") or {}).get("deletionTimestamp"):
            terminating += 1
        elif st.get("phase") == "Pending":
            pending += 1
        elif st.get("phase") == "Running":
            if pod_ready(p):
                ready += 1
            else:
                not_ready += 1
    return Pods(ready, not_ready, pending, terminating)


def ours(pa: dict[str, Any]) -> bool:
    return ((pa.get("metadata") or {}).get("annotations") or {}).get(CLASS_ANNOTATION) == CLASS


class PodAutoscalerController:
    def __init__(self, kube: Kube, advisor: Advisor, *, settings: Settings | None = None,
                 prober: Prober | None = None, identity: str, lease_namespace: str,
                 lease_name: str = LEASE, workers: int = 2, resync_s: float = 30.0,
                 lease_duration_s: float = 15.0, renew_deadline_s: float = 10.0, retry_period_s: float = 2.0,
                 problem: Callable[[str], str] = lambda key: "",
                 stopping: Stopping = lambda key: frozenset(),
                 clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.timezone.utc)) -> None:
        self.kube, self.advisor = kube, advisor
        self.settings = settings or Settings()
        self.prober = prober or (lambda pa: False)
        self.identity, self.workers, self.clock = identity, workers, clock
        self.problem = problem  # why the autoscaler does not serve a revision ('' when it does)
        self.stopping = stopping  # the pods KubeBackend.stop marked for deletion
        self.events = EventRecorder(kube, "sllm-knative-autoscaler", identity)
        self.queue = WorkQueue()
        c = kube.custom
        self.pas = Informer("podautoscalers", c.list_cluster_custom_object, PODAUTOSCALERS.group,
                            PODAUTOSCALERS.version, PODAUTOSCALERS.plural, resync_s=resync_s)
        self.skss = Informer("serverlessservices", c.list_cluster_custom_object, SERVERLESSSERVICES.group,
                             SERVERLESSSERVICES.version, SERVERLESSSERVICES.plural, resync_s=resync_s)
        self.deployments = Informer("deployments", kube.apps.list_deployment_for_all_namespaces,
                                    resync_s=resync_s, label_selector=REVISION_LABEL)
        self.pods = Informer("pods", kube.core.list_pod_for_all_namespaces, resync_s=resync_s, label_selector=REVISION_LABEL)
        self.pas.add_handler(lambda kind, obj, old: self._enqueue_pa(obj))
        self.skss.add_handler(lambda kind, obj, old: self._enqueue_key(key_of(obj)))
        for inf in (self.deployments, self.pods):
            inf.add_handler(lambda kind, obj, old: self._enqueue_revision(obj))
        self.elector = LeaderElector(kube, lease_namespace, lease_name, identity,
                                     lease_duration_s=lease_duration_s, renew_deadline_s=renew_deadline_s,
                                     retry_period_s=retry_period_s, on_started_leading=self._lead,
                                     on_stopped_leading=self._follow)
        self._threads: list[threading.Thread] = []
        self.reconciles = 0
        # Called (on the elector's thread) each time this replica starts leading, after the workers
        # started: the process's other leader-only work begins at once, not at its next tick.
        self.on_lead: Callable[[], None] = lambda: None

    # -- enqueueing -------------------------------------------------------------------------

    def _enqueue_key(self, key: str) -> None:
        pa = self.pas.get(key)
        if pa is not None and ours(pa):
            self.queue.add(key)

    def _enqueue_pa(self, pa: dict[str, Any]) -> None:
        if ours(pa):
            self.queue.add(key_of(pa))

    def _enqueue_revision(self, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        rev = (meta.get("labels") or {}).get(REVISION_LABEL)
        if rev:
            self._enqueue_key(f"{meta.get('namespace')}/{rev}")

    # -- running ----------------------------------------------------------------------------

    def start(self) -> PodAutoscalerController:
        for inf in (self.pas, self.skss, self.deployments, self.pods):
            inf.start()
        for inf in (self.pas, self.skss, self.deployments, self.pods):
            inf.wait_synced()
        self.elector.start()
        return self

    def stop(self, release: bool = True) -> None:
        self.elector.stop(release=release)
        self.queue.shut_down()
        for t in self._threads:
            t.join(timeout=5)
        for inf in (self.pas, self.skss, self.deployments, self.pods):
            inf.stop()

    def _lead(self) -> None:
        _log.info("leading: reconciling PodAutoscalers", identity=self.identity)
        for key in self.pas.keys():
            self._enqueue_key(key)
        for i in range(self.workers):
            t = threading.Thread(target=self._work, name=f"pa-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        self.on_lead()

    def _follow(self) -> None:
        # Lost the lease: stop acting at once. A process should exit and restart as a candidate.
        _log.error("stopped leading", identity=self.identity)
        self.queue.shut_down()

    def _work(self) -> None:
        while True:
            try:
                key = self.queue.get()
            except ShutDown:
                return
            try:
                if not self.elector.is_leader:
                    continue
                requeue = self.reconcile_key(str(key))
                self.queue.forget(key)
                if requeue is not None:
                    self.queue.add_after(key, requeue)
            except Exception as exc:
                delay = self.queue.retry(key)
                level = _log.info if is_status(exc, 409) else _log.warning
                level("reconcile failed; retrying", pa=str(key), error=error_message(exc)[:300],
                      retry_in_s=round(delay, 2))
            finally:
                self.queue.done(key)

    # -- one reconcile ----------------------------------------------------------------------

    def reconcile_key(self, key: str) -> float | None:
        pa = self.pas.get(key)
        if pa is None or not ours(pa):
            return None
        ns, name = split_key(key)
        sks = self.skss.get(f"{ns}/{sks_name(name)}")
        pods = [p for p in self.pods.items()
                if (p.get("metadata") or {}).get("namespace") == ns
                and ((p.get("metadata") or {}).get("labels") or {}).get(REVISION_LABEL) == name]
        target = ((pa.get("spec") or {}).get("scaleTargetRef") or {}).get("name", "")
        deployment = self.deployments.get(f"{ns}/{target}")
        replicas = ((deployment or {}).get("spec") or {}).get("replicas") if deployment else None
        # Read before the advice: a pod listed here has already left the count the advice gives.
        marked = self.stopping(key)
        advice = self.advisor(key)
        now = self.clock()
        problem = self.problem(key)
        plan = reconcile(pa, sks, pod_counts(pods), replicas, advice, self.settings, now, problem=problem)
        if plan.probe:
            plan = reconcile(pa, sks, pod_counts(pods), replicas, advice, self.settings, now,
                             probe_ok=self.prober(pa), problem=problem)
        self.reconciles += 1

        if plan.sks is not None:
            if plan.sks_create:
                self.kube.create(SERVERLESSSERVICES, plan.sks, ns, _request_timeout=REQUEST_TIMEOUT_S)
                self.events.record(pa, "Normal", "Created", f"created ServerlessService {sks_name(name)}")
            else:
                self.kube.replace(SERVERLESSSERVICES, sks_name(name), plan.sks, ns, _request_timeout=REQUEST_TIMEOUT_S)
                _log.info("sks updated", pa=key, mode=plan.sks["spec"]["mode"])
        # The stopped pods this count would keep go first: before the count goes down, so that the
        # ReplicaSet does not remove a starting pod in their place (binding.stranded).
        count = plan.scale if plan.scale is not None else replicas
        if marked and deployment is not None and count is not None:
            for pod in stranded(pods, count, marked, to_zero=advice.want == 0):
                self._delete_stopped(pa, pod, count)
        if plan.scale is not None and deployment is not None:
            self.kube.apps.patch_namespaced_deployment_scale(
                target, ns, [{"op": "add", "path": "/spec/replicas", "value": plan.scale}],
                _request_timeout=REQUEST_TIMEOUT_S)
            _log.info("scaled", pa=key, replicas=plan.scale, was=replicas, want=advice.want, reason=advice.reason)
        for type_, reason, message in plan.events:
            self.events.record(pa, type_, reason, message)
        if plan.status != (pa.get("status") or {}):
            body = {**pa, "status": plan.status}
            # 409 on a stale read: retried
            self.kube.replace_status(PODAUTOSCALERS, name, body, ns, _request_timeout=REQUEST_TIMEOUT_S)
        if plan.error:
            raise RuntimeError(plan.error)
        return plan.requeue_after_s

    def _delete_stopped(self, pa: dict[str, Any], pod: str, replicas: int) -> None:
        """Delete a pod the autoscaler stopped that the ReplicaSet keeps at `replicas` (its
        SIGTERM handoff runs as in any deletion; a pod already gone is fine)."""
        ns, key = pa["metadata"]["namespace"], key_of(pa)
        try:
            self.kube.core.delete_namespaced_pod(pod, ns, _request_timeout=REQUEST_TIMEOUT_S)
        except Exception as exc:
            if is_status(exc, 404):
                return
            raise
        why = f"its instance was stopped and the replica count ({replicas}) would keep it or remove another"
        _log.info("stopped pod deleted", pa=key, instance=pod, replicas=replicas)
        self.events.record(pa, "Normal", "StoppedPodDeleted", f"deleted pod {pod}: {why}")
