"""The PodAutoscaler controller of our class against a real API server and real pods: the SKS it
owns, replicas through the Deployment's scale subresource, the status Knative's Revision reconciler
reads at each step, the way to zero, Events, and a second replica taking over from a dead leader.

Knative's own controller cannot run here (docs/kubernetes.md): the Revision, Deployment and PA are
created as its revision reconciler would (`knative.revision_objects`), and SKS status is
written by `knative.SksStatusWriter`. The decider's advice is set by the test (in the
autoscaler process it comes from the same decider the local cluster uses).
"""

from __future__ import annotations

import threading
from typing import Any

from autoscaler.kube.binding import DELETION_COST
from autoscaler.kube.pa_controller import PodAutoscalerController
from autoscaler.kube.podautoscaler import CLASS, Advice, Settings, condition
from sllm_knative.kube.client import PODAUTOSCALERS, REVISIONS, SERVERLESSSERVICES, Kube
from testkit.kube.knative import SksStatusWriter, revision_objects
from testkit.kube.nodeagent import NodeAgent
from tests.kube.conftest import agent_selector, until
from tests.kube.test_nodeagent import ENV, SERVER

REV = "chat-00001"


class Advisor:
    def __init__(self) -> None:
        self.advice: dict[str, Advice] = {}
        self.lock = threading.Lock()

    def __call__(self, key: str) -> Advice:
        with self.lock:
            return self.advice.get(key, Advice(-1))

    def set(self, key: str, want: int, ebc: int = -1) -> None:
        with self.lock:
            self.advice[key] = Advice(want, ebc, reason=f"test wants {want}")


def _controller(kube: Kube, advisor: Advisor, who: str, namespace: str, probes: list[str]) -> PodAutoscalerController:
    def probe(pa: dict[str, Any]) -> bool:
        probes.append(pa["metadata"]["name"])
        return True

    return PodAutoscalerController(kube, advisor, settings=Settings(scale_to_zero_grace_s=2.0, probe_period_s=0.3),
                                   prober=probe, identity=who, lease_namespace=namespace, resync_s=5,
                                   lease_duration_s=3.0, renew_deadline_s=2.0, retry_period_s=0.3)


def test_pa_lifecycle_and_takeover(api: Any, namespace: str, node_agent: NodeAgent) -> None:
    kube = Kube(api)
    key = f"{namespace}/{REV}"
    rev = kube.create(REVISIONS, {"apiVersion": REVISIONS.api_version, "kind": "Revision",
                                  "metadata": {"name": REV, "namespace": namespace},
                                  "spec": {"containers": [{"image": "python:3.11"}]}}, namespace)
    container = {"name": "user-container", "image": "python:3.11",
                 "command": ["python", "-c", SERVER, "$(POD_IP)", "8080"], "env": ENV,
                 "ports": [{"containerPort": 8080, "name": "http1"}],
                 "readinessProbe": {"httpGet": {"port": 8080, "path": "/"}, "periodSeconds": 1}}
    deployment, pa = revision_objects(REV, namespace, rev["metadata"]["uid"], [container],
                                      {"nodeSelector": agent_selector(node_agent), "terminationGracePeriodSeconds": 2},
                                      {"autoscaling.knative.dev/class": CLASS}, replicas=1)
    advisor, probes = Advisor(), list[str]()
    standin = SksStatusWriter(kube, namespace).start()
    a = _controller(kube, advisor, "a", namespace, probes).start()
    b = _controller(kube, advisor, "b", namespace, probes).start()
    try:
        assert a.elector.wait_leading(10)
        kube.apps.create_namespaced_deployment(namespace, deployment)
        kube.create(PODAUTOSCALERS, pa, namespace)

        def pa_status() -> dict[str, Any]:
            return kube.get(PODAUTOSCALERS, REV, namespace).get("status") or {}

        def cond(t: str) -> str:
            return (condition(pa_status(), t) or {}).get("status", "")

        # The SKS, owned by the PA; the initial pod becomes ready: the revision's first Ready.
        sks = until(lambda: kube.get(SERVERLESSSERVICES, REV, namespace), 10, "the SKS")
        owner = sks["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"], owner["controller"]) == ("PodAutoscaler", REV, True)
        assert sks["spec"]["mode"] == "Proxy"
        until(lambda: cond("ScaleTargetInitialized") == "True", 30, "ScaleTargetInitialized")
        st = pa_status()
        assert (st["serviceName"], st["metricsServiceName"], st["actualScale"]) == (REV, f"{REV}-private", 1)
        assert st["observedGeneration"] == kube.get(PODAUTOSCALERS, REV, namespace)["metadata"]["generation"]
        assert cond("SKSReady") == "True"

        # The decider wants two: replicas through /scale; Active once they are ready; the
        # activator stays in the path (ebc -1), then leaves it (ebc 0: Serve).
        advisor.set(key, 2)
        a.queue.add(key)
        until(lambda: kube.apps.read_namespaced_deployment(f"{REV}-deployment", namespace).spec.replicas == 2, 10,
              "replicas 2")
        until(lambda: pa_status().get("actualScale") == 2 and cond("Ready") == "True", 30, "two ready pods, PA Ready")
        advisor.set(key, 2, ebc=0)
        a.queue.add(key)
        until(lambda: kube.get(SERVERLESSSERVICES, REV, namespace)["spec"]["mode"] == "Serve", 10, "SKS Serve")

        # To zero: Proxy first and Inactive, the activator probed, the grace period, then 0.
        advisor.set(key, 0)
        a.queue.add(key)
        until(lambda: kube.get(SERVERLESSSERVICES, REV, namespace)["spec"]["mode"] == "Proxy", 10, "SKS Proxy")
        until(lambda: cond("Active") == "False", 10, "Active=False")
        assert (condition(pa_status(), "Active") or {}).get("reason") == "NoTraffic"
        assert kube.apps.read_namespaced_deployment(f"{REV}-deployment", namespace).spec.replicas == 2
        until(lambda: kube.apps.read_namespaced_deployment(f"{REV}-deployment", namespace).spec.replicas == 0, 15,
              "replicas 0 after the grace period")
        assert REV in probes
        until(lambda: pa_status().get("actualScale") == 0, 30, "no pods left")
        assert cond("ScaleTargetInitialized") == "True"  # scaled to zero, the revision stays Ready

        events = kube.core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={REV}").items
        reasons = {e.reason for e in events if e.involved_object.kind == "PodAutoscaler"}
        assert {"Created", "Scaled"} <= reasons, reasons

        # The leader dies without releasing its lease: b waits it out, takes over, and acts.
        a.stop(release=False)
        assert b.elector.wait_leading(10)
        advisor.set(key, 1)
        b.queue.add(key)
        until(lambda: kube.apps.read_namespaced_deployment(f"{REV}-deployment", namespace).spec.replicas == 1, 10,
              "replicas 1 from the new leader")
        until(lambda: cond("Active") == "True", 30, "Active again")
        skss = kube.list(SERVERLESSSERVICES, namespace)["items"]
        assert [s["metadata"]["name"] for s in skss] == [REV]  # no duplicate
    finally:
        a.stop(release=False)
        b.stop()
        standin.stop()


def test_a_stopped_pod_the_replica_count_keeps_is_deleted(api: Any, namespace: str) -> None:
    """A pod the autoscaler stops (marked with the lowest deletion cost) leaves through the
    ReplicaSet when the count goes down. Where the count stays, the controller deletes it
    itself and the ReplicaSet makes the pod the count asks for: here while the decider has no
    advice (the replicas are held, as for a failed start during activation), then beside a count
    that goes down by one for two stopped pods. The pods are never scheduled (no node matches)."""
    kube = Kube(api)
    key = f"{namespace}/{REV}"
    rev = kube.create(REVISIONS, {"apiVersion": REVISIONS.api_version, "kind": "Revision",
                                  "metadata": {"name": REV, "namespace": namespace},
                                  "spec": {"containers": [{"image": "python:3.11"}]}}, namespace)
    deployment, pa = revision_objects(REV, namespace, rev["metadata"]["uid"],
                                      [{"name": "user-container", "image": "python:3.11"}],
                                      {"nodeSelector": {"no-such-node": "x"}}, {"autoscaling.knative.dev/class": CLASS},
                                      replicas=1)
    advisor, marked_lock, marked = Advisor(), threading.Lock(), set[str]()

    def stopping(k: str) -> frozenset[str]:
        with marked_lock:
            return frozenset(marked) if k == key else frozenset()

    def pods() -> list[str]:
        items = kube.core.list_namespaced_pod(namespace, label_selector=f"serving.knative.dev/revision={REV}").items
        return sorted(p.metadata.name for p in items if p.metadata.deletion_timestamp is None)

    def stop(*names: str, want: int | None = None) -> None:
        """What KubeBackend.stop does: mark the pods, and only then do they leave the advice."""
        for name in names:
            kube.core.patch_namespaced_pod(name, namespace, {"metadata": {"annotations": {DELETION_COST: "-1000"}}})
        with marked_lock:
            marked.update(names)
        if want is not None:
            advisor.set(key, want)
        ctl.queue.add(key)

    def deleted_events() -> list[str]:
        evs = kube.core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={REV}").items
        return sorted(e.message for e in evs if e.reason == "StoppedPodDeleted")

    standin = SksStatusWriter(kube, namespace).start()
    ctl = PodAutoscalerController(kube, advisor, settings=Settings(scale_to_zero_grace_s=2.0, probe_period_s=0.3),
                                  prober=lambda pa: True, identity="a", lease_namespace=namespace, resync_s=5,
                                  lease_duration_s=3.0, renew_deadline_s=2.0, retry_period_s=0.3,
                                  stopping=stopping).start()
    try:
        assert ctl.elector.wait_leading(10)
        kube.apps.create_namespaced_deployment(namespace, deployment)
        kube.create(PODAUTOSCALERS, pa, namespace)
        [first] = until(lambda: (p := pods()) and len(p) == 1 and p, 20, "the initial pod")

        # No advice (the replicas are held): the stopped pod is deleted, a new one takes its place.
        stop(first)
        [second] = until(lambda: (p := pods()) and p != [first] and len(p) == 1 and p, 20,
                         "the stopped pod replaced")
        assert kube.apps.read_namespaced_deployment(f"{REV}-deployment", namespace).spec.replicas == 1
        events = until(deleted_events, 10, "the StoppedPodDeleted Event")
        assert events == [f"deleted pod {first}: its instance was stopped and the replica count (1) would keep it or remove another"]
        with marked_lock:
            marked.clear()

        # Three pods; two stopped while the count goes 3 -> 2: the count would keep one of them, so
        # the controller deletes both before it lowers the count, and the ReplicaSet makes one more.
        advisor.set(key, 3)
        ctl.queue.add(key)
        three = until(lambda: (p := pods()) and len(p) == 3 and p, 20, "three pods")
        victims = [n for n in three if n != second]
        stop(*victims, want=2)
        left = until(lambda: (p := pods()) and len(p) == 2 and not set(p) & set(victims) and p, 20,
                     "both stopped pods gone, two pods")
        more = until(lambda: len(e := set(deleted_events()) - set(events)) == 2 and e, 10, "two more Events")
        assert sorted(e.split(":")[0] for e in more) == [f"deleted pod {v}" for v in sorted(victims)], more

        # One pod stopped as the count goes 2 -> 1: the ReplicaSet removes it (the lowest deletion
        # cost); the controller deletes nothing.
        with marked_lock:
            marked.clear()
        stop(left[0], want=1)
        until(lambda: pods() == left[1:], 20, "the ReplicaSet removed the stopped pod")
        assert not [e for e in deleted_events() if f"deleted pod {left[0]}:" in e]
    finally:
        ctl.stop()
        standin.stop()
