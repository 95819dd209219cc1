"""A standby that takes over on Kubernetes decides as soon as it has adopted the running pods.

The wiring is `autoscaler.kube.main`'s (`decide_when_leading`, `PodAutoscalerController.on_lead`
-> `KubeBackend.wake`), over a `KubeBackend` whose informers are in memory. Before, the new
leader's first binder pass waited for a tick to poke it, the tick's evaluations before that pass
decided nothing (`may_decide` was False until then), and nothing evaluated when the pass ended:
its first decision came a tick after it had caught up, and until then `/v1/services` reported the
service table's initial scale (`desired` 1) for a revision the dead leader had scaled to 2
(tests/kube/test_autoscaler_failover.py failed so on a loaded machine).
"""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace
from typing import Any

import pytest

from autoscaler.backends.base import InstanceState
from autoscaler.backends.kube import KubeBackend
from autoscaler.controller import Autoscaler
from autoscaler.kube.binding import INSTANCE_LABEL
from autoscaler.kube.main import decide_when_leading
from autoscaler.kube.pa_controller import PodAutoscalerController
from autoscaler.kube.podautoscaler import CLASS, CLASS_ANNOTATION, REVISION_LABEL, UNKNOWN, Advice
from autoscaler.kube.services import parse_revision
from sllm_knative.api.autoscaler import ServiceStats, StatsReport
from sllm_knative.config import Manifest
from sllm_knative.kube.informer import key_of

NS, REV = "ns", "chat-00001"
KEY = f"{NS}/{REV}"
NOW = 1000.0


class MemoryInformer:
    """An informer's cache, without a watch."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self._items = {key_of(o): o for o in items}

    def items(self) -> list[dict[str, Any]]:
        return list(self._items.values())

    def get(self, key: str) -> dict[str, Any] | None:
        return self._items.get(key)

    def keys(self) -> list[str]:
        return list(self._items)


def stub_kube() -> Any:
    """What the constructors read off a `Kube` (nothing here calls the API)."""
    return SimpleNamespace(core=SimpleNamespace(list_pod_for_all_namespaces=None, list_node=None),
                           apps=SimpleNamespace(list_deployment_for_all_namespaces=None),
                           custom=SimpleNamespace(list_cluster_custom_object=None))


def revision() -> dict[str, Any]:
    return {"metadata": {"name": REV, "namespace": NS, "labels": {"serving.knative.dev/service": "chat"},
                         "annotations": {CLASS_ANNOTATION: CLASS, "sllm-knative.io/model": "file:///store/tiny",
                                         "autoscaling.knative.dev/target": "1",
                                         "autoscaling.knative.dev/max-scale": "2"}},
            "spec": {"containers": [{"name": "user-container", "image": "python:3.11"}]}}


def placed_pod(name: str, node: str) -> dict[str, Any]:
    """A pod the dead leader pinned, running and ready."""
    return {"metadata": {"name": name, "namespace": NS,
                         "labels": {REVISION_LABEL: REV, INSTANCE_LABEL: f"{REV}-1"}},
            "spec": {"nodeName": node, "containers": [{"name": "user-container"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.5",
                       "conditions": [{"type": "Ready", "status": "True"}]}}


def report(concurrency: float) -> StatsReport:
    return StatsReport(services=[ServiceStats(namespace=NS, name=REV, average_concurrency=concurrency,
                                              requests=10, in_flight=5, seconds=1.0)])


@pytest.mark.parametrize(("leading", "reported", "desired", "decided", "decision"), [
    # Demand for 8 at a target of 0.7 per pod, bounded to max-scale 2: decided at once.
    pytest.param(True, 5.0, 2, True, "bounded to 2", id="takes-over-and-decides"),
    # No report yet: evaluated at once all the same, and the initial scale stays undecided.
    pytest.param(True, None, 1, False, "no data yet", id="takes-over-without-data"),
    # A standby neither adopts nor decides.
    pytest.param(False, 5.0, 1, False, "", id="standby"),
])
def test_a_new_leader_decides_once_it_has_adopted(leading: bool, reported: float | None, desired: int,
                                                  decided: bool, decision: str) -> None:
    async def main() -> None:
        clock = SimpleNamespace(t=NOW)
        backend = KubeBackend(stub_kube())
        backend.pods = MemoryInformer([placed_pod("chat-00001-deployment-a", "n0")])  # type: ignore[assignment]
        backend.nodes = MemoryInformer([])  # type: ignore[assignment]
        backend.caches = MemoryInformer([])  # type: ignore[assignment]
        scaler = Autoscaler(backend, None, clock=lambda: clock.t)
        is_leader = threading.Event()
        decide_when_leading(scaler, backend, is_leader.is_set)
        await scaler.apply(Manifest((parse_revision(revision()),), ()))
        await scaler.settle()
        if reported is not None:  # the activator's reports, since the old leader died
            for t in range(4):
                scaler.on_stats(report(reported), now=NOW + t)
        clock.t = NOW + 4
        # The binder loop, and the elector's thread calling the PA controller's `on_lead` as it
        # takes the Lease (kick the first pass now). No tick runs in this test.
        backend._loop = asyncio.get_running_loop()
        binder = asyncio.ensure_future(backend._run())
        pa = PodAutoscalerController(stub_kube(), lambda key: Advice(UNKNOWN), identity="b", lease_namespace="sys",
                                     workers=0)
        pa.on_lead = backend.wake
        try:
            if leading:
                is_leader.set()
            elector = threading.Thread(target=pa._lead)
            elector.start()
            elector.join()
            for _ in range(100):  # the pass, the ADOPTED and READY events, the evaluation it spawned
                await asyncio.sleep(0.01)
                await scaler.settle()
            rt = scaler.table.get(KEY)
            assert rt is not None
            assert backend.settled is leading
            assert [i.state for i in rt.instances.values()] == ([InstanceState.READY] if leading else [])
            assert (rt.state.scale, rt.decided) == (desired, decided)
            assert decision in rt.last_decision
            assert rt.to_json()["desired"] == desired
        finally:
            binder.cancel()
            pa.queue.shut_down()
            await asyncio.gather(binder, return_exceptions=True)
            await backend.http.aclose()

    asyncio.run(main())
