"""Placement-driven preemption on the real control plane: the local cluster's plan
(autoscaler/preemption.py, placement's `displaceable`) run against the Kubernetes backend.

Two nodes of one slot each (one GPU), both taken by the two pods of a low-priority Service
(`batch`, its ScalingPolicy's `minScale: 2`), each pod streaming one long seeded completion.
Then a Revision of a higher-priority Service (`chat`, `priority: 10`) appears, whose checkpoint
sits in n1's DRAM: its cold start (Knative's initial scale, and a request held by the activator)
finds no free slot, and placement's cheapest option is to migrate the stream off `batch`'s pod on
n1 onto its sibling on n0 (docs/placement.md, "Overload": a higher priority displaces a lower one).

What the test shows, on the API server where it can: the victim is withheld from the activator's
rotation (the autoscaler's log, before its pod goes), its generation migrated through the
activator (its metric, the autoscaler's placement record) with the text identical to unmigrated
runs of the same seeds, the victim pod marked with `controller.kubernetes.io/pod-deletion-cost`
(seen by a watch in the pod's last state) and deleted with a `Preempted` Event saying who took
its slot and why, and `chat`'s pod placed on n1 (its `Placed` Event), serving through the
activator to the official `openai` client. `batch` stays at one pod, waiting for capacity: it may
not displace the higher priority.

The second test takes the other rule of docs/placement.md's "Overload": the same priority,
batch's two idle pods protected (`minResidency`), so chat's request waits with nothing placement
may take until it has waited `fairShareAfter`; then fair share gives it one of batch's two, and
that idle pod is evicted (withheld and stopped, nothing to migrate), its `Preempted` Event saying
fair share.

The stack (loaders, stand-ins for Knative, webhook, autoscaler, activator) is
`testkit.kube.stack.Stack`, as in test_e2e.py.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from autoscaler.kube.binding import DELETION_COST
from sllm_knative.kube.client import Kube
from sllm_knative.kube.informer import Informer
from testkit.kube.cluster import KubeCluster
from testkit.kube.nodeagent import NodeAgent
from testkit.kube.stack import Stack
from testkit.servers import Nginx
from tests.kube.conftest import start_agent, until
from tests.kube.test_e2e import CONTEXT, SPEC, stream_chat, stream_completion, stream_on_each_pod

LOW, HIGH = "batch", "chat"
LOW_REV, HIGH_REV = f"{LOW}-00001", f"{HIGH}-00001"


@pytest.fixture
def agent(kube: KubeCluster) -> Iterator[NodeAgent]:
    root = Path(tempfile.mkdtemp(prefix="sllm-pre-", dir="/tmp"))  # short: the loader's socket lies under it
    a = start_agent(kube, root, nodes=2)  # one GPU each: one slot each
    try:
        yield a
    finally:
        a.stop(delete_nodes=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file store with two checkpoints of the e2e model: one per Service."""
    from sllm_knative.convert import convert
    from sllm_knative.models import build_model

    root = tmp_path_factory.mktemp("pre-store")
    convert(build_model(root / "src" / "tiny", SPEC), root / "models" / "tiny")
    shutil.copytree(root / "models" / "tiny", root / "models" / "tiny-chat")
    return root / "models"


@pytest.fixture
def web(store: Path) -> Iterator[Nginx]:
    with Nginx(store, slow_rate="2m") as nginx:
        yield nginx


class PodRecord:
    """Each pod of the namespace as a watch last saw it, the deleted ones in their final state."""

    def __init__(self, k: Kube, namespace: str) -> None:
        self.last: dict[str, dict[str, Any]] = {}
        self.deleted: dict[str, dict[str, Any]] = {}
        self._mu = threading.Lock()
        self.informer = Informer("test-pods", k.core.list_namespaced_pod, namespace, resync_s=3600)
        self.informer.add_handler(self._on)

    def _on(self, kind: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        name = obj["metadata"]["name"]
        with self._mu:
            self.last[name] = obj
            if kind == "DELETED":
                self.deleted[name] = obj

    def start(self) -> PodRecord:
        self.informer.start()
        self.informer.wait_synced()
        return self

    def stop(self) -> None:
        self.informer.stop()


@dataclass
class Cluster:
    """The stack on two one-slot nodes, chat's checkpoint in n1's DRAM, and a record of the pods."""

    k: Kube
    stack: Stack
    record: PodRecord
    n0: str
    n1: str
    low_model: str
    high_model: str

    def failure(self, what: str) -> str:
        return (f"{what}\nautoscaler services: {self.stack.services()}\n{self.stack.logs_of_processes(6000)}\n"
                f"{self.stack.pod_logs(2000)}")

    def fill(self, **low_policy: Any) -> tuple[str, str]:
        """batch takes both slots: two pods (its ScalingPolicy's minScale 2 and `low_policy`), one
        per node. Returns (its pod on n1, its pod on n0)."""
        stack = self.stack
        stack.scaling_policy(LOW, LOW, minScale=2, **low_policy)
        stack.function_revision(LOW_REV, LOW, self.low_model, args=["--max-model-len", str(CONTEXT)])
        pods = until(lambda: len(stack.ready_pods(LOW_REV)) == 2 and stack.ready_pods(LOW_REV), 180,
                     "batch's two pods ready")
        on = {p.spec.node_name: p.metadata.name for p in pods}
        assert sorted(on) == sorted([self.n0, self.n1]), self.failure(f"batch's pods are not one per node: {on}")
        until(lambda: len(stack.rotation(LOW_REV)) == 2, 30, "both batch pods in the activator's rotation")
        return on[self.n1], on[self.n0]

    def chat(self) -> None:
        """chat's Revision (no pod yet: Knative's initial scale asks the autoscaler for one)."""
        self.stack.function_revision(HIGH_REV, HIGH, self.high_model, args=["--max-model-len", str(CONTEXT)],
                                     replicas=0)
        until(lambda: self.stack.in_flight(HIGH_REV) >= 0, 30, "the autoscaler to know chat's revision")

    def waits(self, revision: str, log: str) -> bool:
        """Whether `log` (the autoscaler's) has a scale-up of `revision` waiting for capacity. By
        service key: the autoscaler also sees the revisions of earlier tests' namespaces that are
        still being deleted."""
        key = f"service={self.stack.namespace}/{revision} "
        return any("no free slot: waiting for capacity" in line and key in line for line in log.splitlines())

    def preempted(self, victim: str) -> Any:
        """The victim's pod deleted with the lowest deletion cost; the Preempted Event on it."""
        until(lambda: victim in self.record.deleted, 60, "the victim's pod deleted")
        final = self.record.deleted[victim]
        assert (final["metadata"].get("annotations") or {}).get(DELETION_COST) == "-1000", final["metadata"]
        [event] = self.stack.events(victim, "Preempted")
        assert HIGH_REV in event.message and self.n1 in event.message and DELETION_COST in event.message, event.message
        return event


@pytest.fixture
def cluster(kube: KubeCluster, api: Any, namespace: str, agent: NodeAgent, web: Nginx,
            tmp_path: Path) -> Iterator[Cluster]:
    k = Kube(api)
    n0, n1 = (s.name for s in agent.specs)
    low_model, high_model = f"{web.url}/slow/tiny", f"{web.url}/slow/tiny-chat"
    install = f"{namespace}-sys"
    stack = Stack(kube, agent, namespace, install, f"{web.url}/slow", tmp_path, identity="pre")
    k.core.create_namespace({"metadata": {"name": install}})
    record = PodRecord(k, namespace).start()
    try:
        stack.start_loaders()
        stack.prefetch(n1, high_model)  # chat's checkpoint loads fastest on n1
        stack.start()
        until(lambda: stack.autoscaler_sees_dram(n1, high_model), 30, f"the autoscaler to see {n1}'s DRAM copy")
        yield Cluster(k, stack, record, n0, n1, low_model, high_model)
    finally:
        record.stop()
        stack.stop()
        k.core.delete_namespace(install)


def test_a_higher_priority_cold_start_migrates_a_stream_off_a_full_node_and_takes_its_slot(
        cluster: Cluster, namespace: str) -> None:
    c, stack, n1 = cluster, cluster.stack, cluster.n1
    stack.scaling_policy(HIGH, HIGH, priority=10, keepAlive="120s")
    victim, sibling = c.fill()

    # A seeded stream on each of batch's pods; the autoscaler must see both (reported each second).
    low = stack.client(LOW_REV)
    seeds = (11, 12)
    got, threads = stream_on_each_pod(stack, low, LOW_REV, seeds)
    migrated_before = stack.migrated()

    # chat's Revision: its cold start finds both slots taken by a lower priority.
    c.chat()
    high = stack.client(HIGH_REV)
    try:
        text = stream_chat(high)  # held by the activator until chat's pod is ready
    except Exception as exc:
        raise AssertionError(c.failure(f"chat's cold start failed: {exc!r}")) from exc
    assert text, "an empty completion"
    for t in threads:
        t.join(180)
    assert set(got) == set(seeds), c.failure(f"a batch stream did not finish: {sorted(got)}")

    # chat's pod took the victim's slot, on n1, as placement chose (its Placed Event says so).
    [chat_pod] = until(lambda: stack.ready_pods(HIGH_REV), 60, "chat's pod ready")
    assert chat_pod.spec.node_name == n1, c.failure(f"chat placed on {chat_pod.spec.node_name}, not {n1}")
    placed = stack.events(chat_pod.metadata.name, "Placed")
    assert placed and n1 in placed[0].message, placed
    placement = stack.placement(HIGH_REV, chat_pod.metadata.name)
    assert placement is not None, c.failure("no placement record for chat's pod")
    assert (placement["action"], placement["victim"], placement["victim_service"]) == (
        "migrate", victim, f"{namespace}/{LOW_REV}"), placement
    assert placement["migrations"] == ["migrated"], placement
    # Placement knew the victim's stream from the pod's own generation list, which the
    # autoscaler read from its internal API with the install's token.
    moved = re.search(r"migrate \S+ \((\d+) generation\(s\), (\d+) tokens\)", placement["reasons"][0])
    assert moved and int(moved[1]) == 1 and int(moved[2]) > 0, placement["reasons"]
    assert stack.migrated() == migrated_before + 1, c.failure("no migration through the activator")

    # The victim: withheld before anything else (the autoscaler told the activator), then
    # marked with the lowest deletion cost, deleted, and the Event on it says why.
    assert "priority 10 over 0" in c.preempted(victim).message
    log = stack.autoscaler.log()
    withheld = log.find("instance withheld")
    assert withheld >= 0 and victim in log[withheld:withheld + 400], c.failure("the victim was never withheld")
    assert log.find("msg=preempting") < withheld < log.find("instance stopping"), c.failure("withheld out of order")
    assert [p.metadata.name for p in stack.pods(LOW_REV)] == [sibling], stack.pods(LOW_REV)

    # The PAs' Events: chat scaled up from zero; batch scaled down from two.
    scaled = {e.involved_object.name: e.message for e in c.k.core.list_namespaced_event(namespace).items
              if e.reason == "Scaled"}
    assert HIGH_REV in scaled and LOW_REV in scaled, scaled
    assert stack.replicas(LOW_REV) == 1 and stack.replicas(HIGH_REV) == 1

    # The migrated stream's text is the unmigrated run's: the same seeds on the sibling alone.
    with ThreadPoolExecutor(len(seeds)) as pool:
        want = dict(zip(seeds, pool.map(lambda s: stream_completion(low, s), seeds), strict=True))
    assert got == want, c.failure("a migrated stream's text differs from the unmigrated run")

    # chat serves warm through the activator from the pod on n1; batch, one pod short of its
    # minScale, waits: it may not displace the higher priority.
    assert stream_chat(high) == text
    assert list(stack.rotation(HIGH_REV)) == [chat_pod.metadata.name]
    until(lambda: c.waits(LOW_REV, stack.autoscaler.log()[withheld:]), 30, "batch's scale-up to wait for capacity")
    assert [p.spec.node_name for p in stack.pods(LOW_REV)] == [c.n0]


def test_fair_share_evicts_an_idle_protected_instance_for_a_request_that_waited(cluster: Cluster,
                                                                                namespace: str) -> None:
    """The same priority: batch's two idle pods are protected (minResidency 600 s), so chat's
    request waits, with no instance placement may take, until it has waited `fairShareAfter` (3 s);
    then fair share lets it take one of the two (batch holds two, chat none), and since that pod
    runs nothing it is evicted (withheld, stopped), not migrated."""
    c, stack, n1 = cluster, cluster.stack, cluster.n1
    stack.scaling_policy(HIGH, HIGH, fairShareAfter="3s", minResidency="600s", keepAlive="120s")
    victim, sibling = c.fill(minResidency="600s")
    c.chat()
    sent = time.monotonic()
    try:
        text = stream_chat(stack.client(HIGH_REV))  # held until chat's pod is ready
    except Exception as exc:
        raise AssertionError(c.failure(f"chat's cold start failed: {exc!r}")) from exc
    assert text and time.monotonic() - sent > 3.0  # it waited out fairShareAfter first

    [chat_pod] = until(lambda: stack.ready_pods(HIGH_REV), 60, "chat's pod ready")
    assert chat_pod.spec.node_name == n1, c.failure(f"chat placed on {chat_pod.spec.node_name}, not {n1}")
    placement = stack.placement(HIGH_REV, chat_pod.metadata.name)
    assert placement is not None, c.failure("no placement record for chat's pod")
    assert (placement["action"], placement["victim"], placement["migrations"]) == ("evict", victim, []), placement
    # Before fair share applied, placement found nothing it may take: batch's pods were protected.
    log = stack.autoscaler.log()
    assert c.waits(HIGH_REV, log[:log.find("msg=preempting")]), c.failure("chat never waited")

    message = c.preempted(victim).message
    assert "fair share" in message and "fairShareAfter (3s)" in message, message
    withheld = log.find("instance withheld")
    assert withheld >= 0 and victim in log[withheld:withheld + 400], c.failure("the victim was never withheld")
    assert [p.metadata.name for p in stack.pods(LOW_REV)] == [sibling]
    assert stack.replicas(LOW_REV) == 1 and stack.replicas(HIGH_REV) == 1
    # batch, one short of its minScale, may not take chat's pod back: it is protected, and batch has
    # no request waiting.
    until(lambda: c.waits(LOW_REV, stack.autoscaler.log()[log.find("msg=preempted"):]), 30,
          "batch's scale-up to wait for capacity")
    assert list(stack.rotation(HIGH_REV)) == [chat_pod.metadata.name]
