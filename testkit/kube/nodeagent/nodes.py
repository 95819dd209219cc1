"""One node: its Node object, heartbeats and Lease, the watch of its pods, and its death.

`register` creates the Node (or takes over one of that name) with capacity, allocatable,
labels and the InternalIP of its network namespace; a heartbeat thread renews the node's Lease
in `kube-node-lease` every `lease_renew_s` and posts the node status (the Ready condition's
heartbeat) every `status_update_s`, as kubelet does. A list+watch of the pods bound to the node
(field selector `spec.nodeName`) admits each pod to one PodWorker, once. `kill` is a machine
dying: SIGKILL everywhere, the node off the network, nothing written any more.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import TYPE_CHECKING

from sllm_knative.log import get_logger
from testkit.kube.network import NodeNetwork
from testkit.kube.nodeagent.api import Api
from testkit.kube.nodeagent.pods import PodWorker
from testkit.kube.nodeagent.spec import Json, NodeSpec
from testkit.kube.nodeagent.status import micro_time, node_labels, node_status, rfc3339
from testkit.kube.nodeagent.watch import Watcher

if TYPE_CHECKING:
    from testkit.kube.nodeagent.agent import NodeAgent

_log = get_logger("nodeagent")


class NodeRunner:
    """One node: registration, heartbeats and lease renewals, and the watch of its pods."""

    def __init__(self, agent: NodeAgent, spec: NodeSpec, net: NodeNetwork) -> None:
        self.agent, self.spec, self.net, self.ip = agent, spec, net, net.ip
        self.name = spec.name
        self.log = _log.bind(node=spec.name)
        self.hostpath_root = agent.root / "nodes" / spec.name / "hostpath"
        self.allocatable = {"cpu": spec.cpu, "memory": spec.memory}
        self.workers: dict[str, PodWorker] = {}
        self.done_uids: set[str] = set()
        self.dead = False
        self._mu = threading.Lock()
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name=f"heartbeat-{spec.name}", daemon=True)
        self._watcher: Watcher | None = None
        self.heartbeats = 0
        self.lease_renewals = 0

    # -- registration and heartbeats ----------------------------------------------------------
    def register(self) -> None:
        api, now = self.agent.api, rfc3339()
        self.hostpath_root.mkdir(parents=True, exist_ok=True)
        annotations = {"node.alpha.kubernetes.io/ttl": "0", "sllm-knative.io/node-agent": self.agent.agent_id}
        body = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": self.name, "labels": node_labels(self.spec), "annotations": annotations},
                "spec": {},
                "status": node_status(self.spec, self.ip, now, kubelet_version=self.agent.kubelet_version)}
        try:
            api.core.create_node(body, _request_timeout=10)
            self.log.info("node registered", ip=self.ip, cpu=self.spec.cpu, memory=self.spec.memory, gpus=self.spec.gpus)
        except Exception as e:
            if Api.status_of(e) != 409:
                raise
            api.core.patch_node(self.name, {"metadata": {"labels": node_labels(self.spec),
                                                         "annotations": annotations},
                                            "spec": {"unschedulable": None}},
                                _content_type=Api.MERGE, _request_timeout=10)
            self.log.info("node already registered: taken over", ip=self.ip)
        self._post_status()
        self._renew_lease()

    def _post_status(self, ready: bool = True) -> None:
        api = self.agent.api
        existing: list[Json] = []
        with contextlib.suppress(Exception):
            existing = (Api.data(api.core.read_node_status(self.name, _preload_content=False, _request_timeout=10))
                        .get("status", {}).get("conditions") or [])
        st = node_status(self.spec, self.ip, rfc3339(), existing, self.agent.kubelet_version, ready)
        api.core.patch_node_status(self.name, {"status": st}, _content_type=Api.MERGE, _request_timeout=10)
        self.heartbeats += 1

    def _renew_lease(self) -> None:
        api = self.agent.api
        spec = {"holderIdentity": self.name, "leaseDurationSeconds": 40, "renewTime": micro_time()}
        try:
            api.coord.patch_namespaced_lease(self.name, "kube-node-lease", {"spec": spec}, _content_type=Api.MERGE,
                                             _request_timeout=10)
        except Exception as e:
            if Api.status_of(e) != 404:
                raise
            node = Api.data(api.core.read_node(self.name, _preload_content=False, _request_timeout=10))
            api.coord.create_namespaced_lease("kube-node-lease", {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.name, "namespace": "kube-node-lease",
                             "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": self.name,
                                                  "uid": node["metadata"]["uid"]}]},
                "spec": {"holderIdentity": self.name, "leaseDurationSeconds": 40}}, _request_timeout=10)
            # renewTime is a MicroTime: patched as our own string, not through the client's models
            api.coord.patch_namespaced_lease(self.name, "kube-node-lease", {"spec": spec}, _content_type=Api.MERGE,
                                             _request_timeout=10)
        self.lease_renewals += 1

    def _beat(self) -> None:
        next_status = time.monotonic() + self.agent.status_update_s
        while not self._stop.wait(self.agent.lease_renew_s):
            try:
                self._renew_lease()
                if time.monotonic() >= next_status:
                    self._post_status()
                    next_status = time.monotonic() + self.agent.status_update_s
            except Exception as e:
                if not self._stop.is_set():
                    self.log.warning("heartbeat failed", error=repr(e)[:300])

    # -- pods ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._heartbeat.start()
        self._watcher = Watcher(self.agent.api.core.list_pod_for_all_namespaces, on_sync=self._on_sync,
                                on_event=self._on_event, log=self.log, timeout_s=self.agent.watch_timeout_s,
                                field_selector=f"spec.nodeName={self.name}")
        self._watcher.start()

    def _on_sync(self, pods: list[Json]) -> None:
        uids = {p["metadata"]["uid"] for p in pods}
        with self._mu:
            stale = [w for uid, w in self.workers.items() if uid not in uids]
        for w in stale:
            w.removed()
        for p in pods:
            self._on_event("MODIFIED", p)

    def _on_event(self, kind: str, pod: Json) -> None:
        uid = pod["metadata"]["uid"]
        with self._mu:
            if self.dead or self._stop.is_set():
                return
            self.workers = {u: w for u, w in self.workers.items() if not w.finished.is_set()}
            w = self.workers.get(uid)
            if kind == "DELETED":
                if w is not None:
                    w.removed()
                self.done_uids.add(uid)
                return
            if w is not None:
                w.update(pod)
                return
            if uid in self.done_uids:
                return
            w = PodWorker(self, pod)
            self.workers[uid] = w
            self.done_uids.add(uid)  # one worker per pod, ever
        w.log.info("pod admitted")
        w.start()

    def kill(self, mark_not_ready: bool = False) -> None:
        """The node dies: SIGKILL every container, no more heartbeats, leases or status. With
        `mark_not_ready` it first posts Ready=False itself and a last status of each pod (containers
        terminated, not ready), as a kubelet going down would: the controller then has nothing to
        do (it marks pods not ready only when it finds a node's heartbeats missing)."""
        if mark_not_ready:
            self._post_status(ready=False)
        with self._mu:
            self.dead = True
            self._stop.set()
            workers = list(self.workers.values())
        for w in workers:
            w.kill(report=mark_not_ready)
        self.net.cut()
        self._join(workers)
        self.log.warning("node killed", pods=len(workers))

    def stop(self) -> None:
        with self._mu:
            self._stop.set()
            workers = list(self.workers.values())
        for w in workers:
            w.stop()
        self._join(workers)

    def _join(self, workers: list[PodWorker]) -> None:
        """Stop watching, then wait for the pod workers and the heartbeat to finish."""
        if self._watcher:
            self._watcher.stop()
        for w in workers:
            w.join(10)
        if self._heartbeat.is_alive():
            self._heartbeat.join(5)
