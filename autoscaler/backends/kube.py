"""The Kubernetes backend: instances are pods of a revision's Deployment, placed through scheduling gates.

How the autoscaler's decisions become pods (docs/kubernetes.md):

- `start(service, node, id, tier)` leaves an `Intent` (this instance goes on that node) and waits
  until a gated pod of the revision is paired with it. The intents count towards the replicas the
  PodAutoscaler controller writes (`wanted`), so the Deployment's ReplicaSet creates the pod; the
  admission webhook has gated it; the binder pins it to the intent's node and lifts the gate
  (`autoscaler.kube.binding`), and kube-scheduler binds it there. The instance's id is its pod's
  name, which is also what the activator sees in the revision's EndpointSlices.
- A gated pod nobody asked for (the Deployment's initial scale, a replacement after a node loss)
  is reported as an UNPLANNED event: the controller places it like any scale-up, and the intent
  that placement leaves is paired with that pod.
- READY when the pod is Ready (its IP is the instance's host), FAILED when it cannot become
  ready, EXITED when a ready pod goes away without being stopped.
- `stop` marks the pod with the lowest `controller.kubernetes.io/pod-deletion-cost`, records an
  Event on it saying why (`stop_reason`: `Preempted` naming the service its slot goes to, or a
  scale-down), and takes it out of `wanted`, so the controller's next replica count removes
  exactly that pod; its SIGTERM handoff happens in the pod. Where the count does not go down
  (a failed start while the PA holds its replicas, a stop beside a start of the same revision),
  the PodAutoscaler controller deletes the marked pod itself (`stopping`, `binding.stranded`).
  `stop` returns when the pod is gone.
- Before it pins a pod, the internal token's Secret is put in the pod's namespace (`copy_token`):
  the webhook points the function container's SLLM_INTERNAL_TOKEN at it, and the backend's own
  calls on the pod's internal API (its generation list) carry that token.
- Nodes and inventories come from the Nodes and their NodeCaches (written by each node's loader);
  slots are a node's allocatable GPUs (`autoscaler.kube.binding.node_slots`).

The informers' handlers run on their threads and only wake the binder task on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from autoscaler.backends.base import (
    FALLBACK_BANDWIDTH,
    OCCUPYING,
    EventHandler,
    EventKind,
    InstanceEvent,
    InstanceRecord,
    InstanceState,
    emit_to,
)
from autoscaler.backends.instance_api import fetch_generations
from autoscaler.kube.binding import (
    DELETION_COST,
    Intent,
    instance_of,
    internal_port,
    is_gated,
    node_ready,
    node_slots,
    pair,
    pin,
    pod_failed,
    pod_ready,
    selects,
)
from autoscaler.kube.podautoscaler import REVISION_LABEL
from sllm_knative.api import auth
from sllm_knative.config import ServiceConfig
from sllm_knative.config.nodecache import parse_node_cache
from sllm_knative.kube.client import NODECACHES, Kube, error_message, is_status
from sllm_knative.kube.events import EventRecorder
from sllm_knative.kube.informer import Informer
from sllm_knative.kube.nodecache import with_warm
from sllm_knative.log import get_logger
from sllm_knative.placement import NodeInventory, pool_store_rates

_log = get_logger("autoscaler.backend")

PAIR_TIMEOUT_S = 120.0  # start(): the pod of an intent must appear within this
READY_TIMEOUT_S = 600.0
SETTLE_TIMEOUT_S = 10.0  # the first pass as the leader waits this long at most for its adoptions
UNPLANNED_RETRY_S = 10.0  # an unplanned pod still unpaired is reported again (its service may be new)
TOKEN_RECHECK_S = 60.0  # a namespace's copy of the internal token is looked at again after this
TOKEN_RETRY_S = 2.0  # a pin deferred for want of that copy is tried again after this
HTTP_PORT, INTERNAL_PORT = 8080, 8081  # the function container's ports (functions.llm defaults)


def service_key(pod: dict[str, Any]) -> str:
    meta = pod.get("metadata") or {}
    return f"{meta.get('namespace')}/{(meta.get('labels') or {}).get(REVISION_LABEL, '')}"


class KubeBackend:
    one_machine = False  # nodes are machines of their own: each keeps its measured rates

    def __init__(self, kube: Kube, *, resync_s: float = 30.0, pair_timeout_s: float = PAIR_TIMEOUT_S,
                 ready_timeout_s: float = READY_TIMEOUT_S, internal_token: str | None = None,
                 copy_token: Callable[[str], bool] | None = None) -> None:
        self.kube = kube
        self.pair_timeout_s, self.ready_timeout_s = pair_timeout_s, ready_timeout_s
        self.pods = Informer("backend-pods", kube.core.list_pod_for_all_namespaces, resync_s=resync_s,
                             label_selector=REVISION_LABEL)
        self.nodes = Informer("backend-nodes", kube.core.list_node, resync_s=resync_s)
        self.caches = Informer("backend-nodecaches", kube.custom.list_cluster_custom_object, NODECACHES.group,
                               NODECACHES.version, NODECACHES.plural, resync_s=resync_s)
        self.http = httpx.AsyncClient(timeout=5.0)
        token = internal_token if internal_token is not None else auth.token_from_env()
        self._internal_headers = auth.auth_headers(token)
        # Puts the internal token's Secret in a namespace (autoscaler.kube.internal_token.copy_token):
        # done before a pod there is pinned, since the webhook points its SLLM_INTERNAL_TOKEN at it.
        self.copy_token = copy_token
        self._token_copied: dict[str, float] = {}  # namespace -> when its copy was last seen (monotonic)
        self._intents: dict[str, list[Intent]] = {}  # service -> open intents, oldest first
        self._waiting: dict[str, asyncio.Future[str]] = {}  # intent instance id -> pod name, once paired
        self._records: dict[str, InstanceRecord] = {}  # pod name -> record
        self._unplanned: dict[str, float] = {}  # pods reported as UNPLANNED (when), not yet paired
        self._stopping: dict[str, asyncio.Future[None]] = {}
        # The pods `stop` has marked (pod name -> service), read by the PodAutoscaler controller's
        # workers on their threads (`stopping`): hence the lock.
        self._marked: dict[str, str] = {}
        self._marked_lock = threading.Lock()
        self._announced: set[tuple[str, str]] = set()  # (event kind, pod): each told once
        self._pending: list[InstanceEvent] = []
        self._event_tasks: dict[str, asyncio.Task[None]] = {}  # the latest delivery per instance
        self._handlers: list[EventHandler] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.model_sizes: dict[str, int] = {}
        self.events = EventRecorder(kube, "sllm-knative-autoscaler")
        # Called with a service key when its replica count changes (the PodAutoscaler controller
        # reconciles that revision now rather than at its next event).
        self.nudge: Callable[[str], None] = lambda key: None
        # Only the leading replica pins pods and reports instances; the others keep warm caches.
        self.leading: Callable[[], bool] = lambda: True
        # Whether this replica, leading, has adopted the pods already running (see `sync`).
        self.settled = False
        # Called on the event loop when `settled` becomes True: the controller decides at once
        # (its ticks while it was catching up decided nothing) rather than a tick later.
        self.on_settled: Callable[[], None] = lambda: None
        # Why an instance is stopped, as (Event reason, message) for the Event on its pod: the
        # process that runs the placement sets it (a preemption names the service the slot goes
        # to); without it, a scale-down.
        self.stop_reason: Callable[[InstanceRecord], tuple[str, str]] = lambda rec: ("Stopping", "scaled down")

    # -- lifecycle --------------------------------------------------------------------------

    async def start_watching(self) -> KubeBackend:
        self._loop = asyncio.get_running_loop()
        for inf in (self.pods, self.nodes, self.caches):
            inf.add_handler(lambda kind, obj, old: self.wake())
            inf.start()
        for inf in (self.pods, self.nodes, self.caches):
            await asyncio.to_thread(inf.wait_synced)
        self._task = asyncio.ensure_future(self._run())
        self._kick.set()
        return self

    def poke(self) -> None:
        """Run a binder pass soon (from the event loop)."""
        self._kick.set()

    def wake(self) -> None:
        """Run a binder pass soon (from any thread: an informer's, the leader elector's)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._kick.set)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._event_tasks.values()):
            task.cancel()
        for inf in (self.pods, self.nodes, self.caches):
            await asyncio.to_thread(inf.stop)
        await self.http.aclose()

    def _adopt_running(self) -> list[str]:
        """Pods placed that this replica has no record of (placed before it started, or by the
        replica that led before it): records again, reported as ADOPTED (their names returned).
        A restart loses no pod."""
        adopted = []
        for pod in self.pods.items():
            name = pod["metadata"]["name"]
            if (name not in self._records and instance_of(pod) and not is_gated(pod)
                    and not pod["metadata"].get("deletionTimestamp")):
                self._records[name] = self._record(pod, service_key(pod), "")
                self._pending.append(InstanceEvent(EventKind.ADOPTED, name, self._records[name].node,
                                                   "running before this process started", service_key(pod)))
                adopted.append(name)
        return adopted

    # -- what the PodAutoscaler controller writes -------------------------------------------

    def open_intents(self, service: str) -> int:
        return len(self._intents.get(service, []))

    def placed(self, service: str) -> frozenset[str]:
        """The pods of `service` this backend pinned or adopted that still hold their place."""
        return frozenset(name for name, r in self._records.items() if r.service == service and r.state in OCCUPYING)

    # -- nodes ------------------------------------------------------------------------------

    def _node_objects(self) -> dict[str, dict[str, Any]]:
        return {n["metadata"]["name"]: n for n in self.nodes.items() if node_ready(n)}

    def nodes_for(self, service: ServiceConfig) -> set[str] | None:
        if not service.node_selector:
            return None
        return {name for name, n in self._node_objects().items() if selects(service.node_selector, n)}

    def node_slots(self) -> Mapping[str, int]:
        caches = {c["metadata"]["name"] for c in self.caches.items()}
        return {name: node_slots(n) for name, n in self._node_objects().items() if name in caches}

    async def inventories(self) -> list[NodeInventory]:
        slots = self.node_slots()
        out = []
        for doc in self.caches.items():
            name = doc["metadata"]["name"]
            if name not in slots:
                continue
            try:
                cache = parse_node_cache(doc, source=f"NodeCache {name}")
                for c in cache.checkpoints:
                    if c.size_bytes:
                        self.model_sizes[c.model] = c.size_bytes
                out.append(cache.inventory(free_slots=slots[name], fallback=FALLBACK_BANDWIDTH))
            except ValueError as exc:  # an inventory not (yet) usable: not a candidate
                _log.warning("node inventory unusable", node=name, error=str(exc)[:300])
        return pool_store_rates(out)

    async def describe_node(self, node: str) -> dict[str, Any]:
        doc = self.caches.get(node)
        if doc is None:
            raise KeyError(f"node {node} has no NodeCache")
        return dict(doc.get("status") or {})

    def model_size(self, model: str) -> int | None:
        return self.model_sizes.get(model)

    async def warm(self, node: str, model: str) -> None:
        """Ask `node`'s loader to start moving the checkpoint into DRAM now, before the pod exists:
        a request in its NodeCache's `spec.warm` (the loader watches its NodeCache). Best effort:
        without it, the pod's own lease starts the fill."""
        doc = self.caches.get(node) or {}
        warm = with_warm(doc.get("spec"), model, "dram", time.time())
        try:
            await asyncio.to_thread(self.kube.custom.patch_cluster_custom_object, NODECACHES.group,
                                    NODECACHES.version, NODECACHES.plural, node, {"spec": {"warm": warm}},
                                    _request_timeout=10)
            _log.info("warm asked", node=node, checkpoint=model)
        except Exception as exc:
            _log.warning("could not ask the node's loader to warm", node=node, checkpoint=model,
                         error=error_message(exc)[:200])

    # -- instances --------------------------------------------------------------------------

    async def start(self, service: ServiceConfig, node: str, instance_id: str, tier: str) -> InstanceRecord:
        loop = asyncio.get_running_loop()
        intent = Intent(service.key, instance_id, node, tier,
                        f"the load-time model chose {node}: the checkpoint loads from {tier or 'remote'} there")
        fut: asyncio.Future[str] = loop.create_future()
        self._waiting[instance_id] = fut
        self._intents.setdefault(service.key, []).append(intent)
        _log.info("instance intended", service=service.key, instance=instance_id, node=node, tier=tier,
                  checkpoint=service.model.uri if service.model else None)
        self.nudge(service.key)
        self._kick.set()
        try:
            pod_name = await asyncio.wait_for(asyncio.shield(fut), self.pair_timeout_s)
        except asyncio.TimeoutError:
            self._drop_intent(intent)
            raise RuntimeError(f"no pod of {service.key} appeared within {self.pair_timeout_s:.0f} s for "
                               f"instance {instance_id} (is the PodAutoscaler controller running?)") from None
        finally:
            self._waiting.pop(instance_id, None)
        return self._records[pod_name]

    def _drop_intent(self, intent: Intent) -> None:
        lst = self._intents.get(intent.service, [])
        if intent in lst:
            lst.remove(intent)

    def _record(self, pod: dict[str, Any], service: str, tier: str) -> InstanceRecord:
        meta = pod["metadata"]
        rec = InstanceRecord(meta["name"], service, (pod.get("spec") or {}).get("nodeName") or
                             (meta.get("annotations") or {}).get("sllm-knative.io/placed-node", ""),
                             HTTP_PORT, internal_port(pod, INTERNAL_PORT), tier=tier, started_at=time.time())
        rec.report = {"pod": meta["name"], "namespace": meta.get("namespace")}
        return rec

    async def stop(self, rec: InstanceRecord, grace_s: float = 10.0) -> None:
        ns = rec.service.split("/", 1)[0]
        loop = asyncio.get_running_loop()
        gone: asyncio.Future[None] = loop.create_future()
        self._stopping[rec.id] = gone
        try:
            await asyncio.to_thread(self.kube.core.patch_namespaced_pod, rec.id, ns,
                                    {"metadata": {"annotations": {DELETION_COST: "-1000"}}}, _request_timeout=15)
        except Exception as exc:
            if not is_status(exc, 404):
                _log.warning("could not mark the pod for deletion", service=rec.service, instance=rec.id,
                             node=rec.node, error=error_message(exc)[:200])
        reason, why = self.stop_reason(rec)
        pod = self.pods.get(f"{ns}/{rec.id}") or {"metadata": {"name": rec.id, "namespace": ns}}
        await asyncio.to_thread(self.events.record, {**pod, "apiVersion": "v1", "kind": "Pod"}, "Normal", reason,
                                f"{why}; marked for deletion ({DELETION_COST}: -1000), so that the ReplicaSet "
                                f"removes this pod when the replicas go down")
        # Only now does it leave the replica count: the ReplicaSet deletes the lowest-cost pod (or,
        # where the count stays, the PA controller deletes it: see `stopping`).
        rec.state = InstanceState.STOPPING
        with self._marked_lock:
            self._marked[rec.id] = rec.service
        self.nudge(rec.service)
        self._kick.set()
        _log.info("instance stopping", service=rec.service, instance=rec.id, node=rec.node)
        try:
            await asyncio.wait_for(asyncio.shield(gone), grace_s + 60.0)
        except asyncio.TimeoutError:
            # The replicas were not lowered (is the PA controller stuck?). The pod keeps its
            # instance label, so the next binder pass adopts it again: nothing is lost or doubled.
            _log.warning("pod still there after stop", service=rec.service, instance=rec.id, node=rec.node,
                         waited_s=grace_s + 60.0)
        finally:
            self._stopping.pop(rec.id, None)
            with self._marked_lock:
                self._marked.pop(rec.id, None)
        rec.state = InstanceState.STOPPED
        self._records.pop(rec.id, None)
        _log.info("instance stopped", service=rec.service, instance=rec.id, node=rec.node)

    def stopping(self, service: str) -> frozenset[str]:
        """The pods of `service` that `stop` has marked and that are not gone yet (from any thread).
        An instance is out of the replica count (`advice_for`) before its pod is listed here."""
        with self._marked_lock:
            return frozenset(pod for pod, svc in self._marked.items() if svc == service)

    def wanted(self, service: str, counted: int) -> int:
        """Pods the revision should have: the instances the controller counts plus open intents."""
        return counted + self.open_intents(service)

    def instances(self) -> list[InstanceRecord]:
        return [r for r in self._records.values() if r.state != InstanceState.STOPPED]

    async def generations(self, rec: InstanceRecord, timeout_s: float = 1.0) -> list[dict[str, Any]] | None:
        return await fetch_generations(self.http, rec, self._internal_headers, timeout_s)

    def subscribe(self, handler: EventHandler) -> None:
        self._handlers.append(handler)

    async def _emit(self, event: InstanceEvent) -> None:
        await emit_to(self._handlers, event)

    # -- the binder -------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            await self._kick.wait()
            self._kick.clear()
            try:
                await self.sync()
            except Exception:
                _log.error("binder pass failed", exc_info=True)
                await asyncio.sleep(0.5)
                self._kick.set()

    async def sync(self) -> None:
        """One pass: pair gated pods with intents, report unplanned ones, follow the pods' lives."""
        if not self.leading():
            self.settled = False
            return
        adopting = self._adopt_running()
        pods = [p for p in self.pods.items() if not (p.get("metadata") or {}).get("deletionTimestamp")]
        by_service: dict[str, list[dict[str, Any]]] = {}
        for p in pods:
            if is_gated(p) and not instance_of(p):
                by_service.setdefault(service_key(p), []).append(p)
        for service, gated in by_service.items():
            pairs, left = pair(gated, self._intents.get(service, []))
            for pod, intent in pairs:
                await self._bind(pod, intent)
            for pod in left:
                name = pod["metadata"]["name"]
                if time.monotonic() - self._unplanned.get(name, -1e9) > UNPLANNED_RETRY_S:
                    self._unplanned[name] = time.monotonic()
                    _log.info("unplanned pod: asking for a placement", service=service, instance=name)
                    self._dispatch(InstanceEvent(EventKind.UNPLANNED, name, "", "made by the Deployment",
                                                   service))
        self._follow({p["metadata"]["name"]: p for p in self.pods.items()})
        await self._report()
        if not self.settled:
            # The first pass as the leader: decisions wait until the controller has the pods that
            # run already (their ADOPTED events handled), or it would start them again.
            tasks = [self._event_tasks[n] for n in adopting if n in self._event_tasks]
            if tasks:
                await asyncio.wait(tasks, timeout=SETTLE_TIMEOUT_S)
            self.settled = True
            _log.info("caught up as the leader: deciding from here", adopted=len(adopting))
            self.on_settled()

    async def _token_in(self, namespace: str, service: str, instance: str) -> bool:
        """Whether the internal token's Secret is in `namespace` (copied now if it was not seen there
        within TOKEN_RECHECK_S). On a failure the pod is not pinned, and the binder tries again later."""
        if self.copy_token is None or time.monotonic() - self._token_copied.get(namespace, -1e9) < TOKEN_RECHECK_S:
            return True
        try:
            if await asyncio.to_thread(self.copy_token, namespace):
                self._token_copied[namespace] = time.monotonic()
                return True
            why = "the Secret there holds another token"
        except Exception as exc:
            why = error_message(exc)[:200]
        _log.warning("internal token not copied: pinning deferred", service=service, instance=instance,
                     namespace=namespace, error=why)
        if self._loop is not None:
            self._loop.call_later(TOKEN_RETRY_S, self._kick.set)
        return False

    async def _bind(self, pod: dict[str, Any], intent: Intent) -> None:
        name, ns = pod["metadata"]["name"], pod["metadata"]["namespace"]
        if not await self._token_in(ns, intent.service, name):
            return
        try:
            await asyncio.to_thread(self.kube.core.replace_namespaced_pod, name, ns, pin(pod, intent),
                                    _request_timeout=15)
        except Exception as exc:  # 409: a newer copy arrives through the watch, and we pass again
            _log.info("pinning deferred", service=intent.service, instance=name, node=intent.node,
                      error=error_message(exc)[:200])
            self._kick.set()
            return
        self._drop_intent(intent)
        self._unplanned.pop(name, None)
        rec = self._record(pod, intent.service, intent.tier)
        rec.node = intent.node
        self._records[name] = rec
        _log.info("pod pinned", service=intent.service, instance=name, node=intent.node, intent=intent.instance)
        await asyncio.to_thread(self.events.record, {**pod, "apiVersion": "v1", "kind": "Pod"}, "Normal", "Placed",
                                intent.reason or f"placed on {intent.node}")
        fut = self._waiting.get(intent.instance)
        if fut is not None and not fut.done():
            fut.set_result(name)

    def _follow(self, pods: dict[str, dict[str, Any]]) -> None:
        for name, fut in list(self._stopping.items()):
            if name not in pods and not fut.done():
                fut.set_result(None)
        now = time.time()
        for name, rec in list(self._records.items()):
            pod = pods.get(name)
            if rec.state == InstanceState.STARTING:
                if pod is None:
                    self._pending.append(InstanceEvent(EventKind.FAILED, name, rec.node, "the pod is gone"))
                    self._records.pop(name, None)
                elif pod_ready(pod):
                    rec.host = (pod.get("status") or {}).get("podIP", rec.host)
                    rec.node = (pod.get("spec") or {}).get("nodeName") or rec.node
                    rec.ready_at = now
                    self._pending.append(InstanceEvent(EventKind.READY, name, rec.node))
                elif why := pod_failed(pod):
                    self._pending.append(InstanceEvent(EventKind.FAILED, name, rec.node, why))
                elif now - rec.started_at > self.ready_timeout_s:
                    self._pending.append(InstanceEvent(EventKind.FAILED, name, rec.node,
                                                       f"not ready after {self.ready_timeout_s:.0f} s"))
            elif rec.state in (InstanceState.READY, InstanceState.DRAINING) and pod is None:
                self._records.pop(name, None)
                self._pending.append(InstanceEvent(EventKind.EXITED, name, rec.node, "the pod is gone"))

    async def _report(self) -> None:
        pending, self._pending = self._pending, []
        for ev in pending:
            if (ev.kind, ev.instance) in self._announced:
                continue
            self._announced.add((ev.kind, ev.instance))
            self._dispatch(ev)

    def _dispatch(self, event: InstanceEvent) -> None:
        """Hand `event` to the handlers in a task of its own, after the instance's earlier events:
        a handler may wait on this backend (FAILED -> stop() waits for the binder to see the pod
        go), so the binder must never wait on a handler."""
        before = self._event_tasks.get(event.instance)

        async def deliver() -> None:
            if before is not None:
                await asyncio.wait([before])
            await self._emit(event)

        task = asyncio.ensure_future(deliver())
        self._event_tasks[event.instance] = task

        def forget(t: asyncio.Task[None], instance: str = event.instance) -> None:
            if self._event_tasks.get(instance) is t:
                del self._event_tasks[instance]

        task.add_done_callback(forget)
