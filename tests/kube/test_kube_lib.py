"""sllm_knative.kube against a real API server: the informer, leader election and Events."""

from __future__ import annotations

import threading
import time
from typing import Any

from sllm_knative.kube.client import Kube
from sllm_knative.kube.events import WARNING, EventRecorder
from sllm_knative.kube.informer import ADDED, DELETED, MODIFIED, SYNC, Informer
from sllm_knative.kube.leader import LeaderElector
from tests.kube.conftest import until


def _cm(name: str, value: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "data": {"v": value}}


def test_informer_lists_watches_and_resyncs(api: Any, namespace: str) -> None:
    kube = Kube(api)
    kube.core.create_namespaced_config_map(namespace, _cm("before", "1"))
    seen: list[tuple[str, str]] = []
    lock = threading.Lock()

    def handler(kind: str, obj: dict, old: dict | None) -> None:
        with lock:
            seen.append((kind, obj["metadata"]["name"]))

    inf = Informer("cm", kube.core.list_namespaced_config_map, namespace, resync_s=2.0)
    inf.add_handler(handler)
    inf.start()
    try:
        inf.wait_synced(10)
        assert (ADDED, "before") in seen
        kube.core.create_namespaced_config_map(namespace, _cm("after", "1"))
        until(lambda: inf.get(f"{namespace}/after"), 10, "the watch to deliver the new ConfigMap")
        kube.core.patch_namespaced_config_map("after", namespace, {"data": {"v": "2"}})
        until(lambda: (inf.get(f"{namespace}/after") or {}).get("data", {}).get("v") == "2", 10,
              "the watch to deliver the change")
        kube.core.delete_namespaced_config_map("before", namespace)
        until(lambda: inf.get(f"{namespace}/before") is None, 10, "the watch to deliver the deletion")
        until(lambda: (SYNC, "after") in seen, 10, "a resync of the cached objects")
        with lock:
            kinds = [k for k, n in seen if n == "after"]
        assert kinds[:2] == [ADDED, MODIFIED]
        assert (DELETED, "before") in seen
        # The cache holds the API's JSON shape, whatever the group.
        assert (inf.get(f"{namespace}/after") or {}).get("metadata", {}).get("namespace") == namespace
    finally:
        inf.stop()


def _elector(kube: Kube, namespace: str, who: str, log: list[str]) -> LeaderElector:
    return LeaderElector(kube, namespace, "the-lease", who, lease_duration_s=3.0, renew_deadline_s=2.0,
                         retry_period_s=0.3, on_started_leading=lambda: log.append(f"{who} leads"),
                         on_stopped_leading=lambda: log.append(f"{who} stops"))


def test_one_leader_and_a_takeover_after_a_crash_or_at_once_after_a_release(api: Any, namespace: str) -> None:
    kube = Kube(api)
    log: list[str] = []
    a = _elector(kube, namespace, "a", log).start()
    assert a.wait_leading(10)
    b = _elector(kube, namespace, "b", log).start()
    time.sleep(1.5)  # b keeps trying while a renews
    assert not b.is_leader and log == ["a leads"]
    assert b.last_holder == "a"

    # A crash: a stops renewing without releasing. b waits out the lease duration, then takes it.
    t0 = time.monotonic()
    a.stop(release=False)
    assert b.wait_leading(10)
    waited = time.monotonic() - t0
    assert waited >= 2.0, f"b took a live lease after {waited:.1f} s"
    lease = kube.coordination.read_namespaced_lease("the-lease", namespace)
    assert lease.spec.holder_identity == "b" and lease.spec.lease_transitions == 1

    # A graceful stop releases: the next candidate leads within a few retry periods.
    c = _elector(kube, namespace, "c", log).start()
    time.sleep(0.5)
    t0 = time.monotonic()
    b.stop(release=True)
    assert c.wait_leading(10)
    assert time.monotonic() - t0 < 2.0
    c.stop()
    assert log == ["a leads", "a stops", "b leads", "b stops", "c leads", "c stops"]


def test_events_are_recorded_on_the_object_and_repeats_counted(api: Any, namespace: str) -> None:
    kube = Kube(api)
    cm = kube.api.sanitize_for_serialization(kube.core.create_namespaced_config_map(namespace, _cm("subject", "1")))
    cm.update(apiVersion="v1", kind="ConfigMap")
    rec = EventRecorder(kube, "sllm-test", "instance-1")
    rec.record(cm, WARNING, "NoModel", "the service has no sllm-knative.io/model annotation")
    rec.record(cm, WARNING, "NoModel", "the service has no sllm-knative.io/model annotation")
    events = kube.core.list_namespaced_event(namespace, field_selector="involvedObject.name=subject").items
    assert len(events) == 1
    ev = events[0]
    assert (ev.reason, ev.type, ev.count, ev.involved_object.kind, ev.involved_object.uid) == (
        "NoModel", "Warning", 2, "ConfigMap", cm["metadata"]["uid"])
    assert ev.source.component == "sllm-test"
