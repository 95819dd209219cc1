"""The registry fed from the cluster: which revisions exist, whose autoscaler scales each, and their
ready pods, through three informers (sllm_knative/kube/informer.py) on the one Kubernetes client:

- Revisions (`serving.knative.dev/v1`): a revision the activator knows; any other is a 404, as
  Knative's context handler answers from its Revision lister (`context_handler.go`).
- PodAutoscalers (`autoscaling.internal.knative.dev/v1alpha1`): the class, protocol type and
  containerConcurrency of each revision (`endpoints.revision_info`).
- EndpointSlices (`discovery.k8s.io/v1`) of the revisions' private Services, selected by the labels
  the SKS reconciler puts on `<revision>-private` (`services.go: MakePrivateService`) and the
  EndpointSlice controller copies onto its slices: the ready pods, straight to the pods' addresses
  (no ClusterIP hop). Knative's activator watches the same Service's Endpoints
  (`pkg/activator/net/revision_backends.go`); it also probes not-yet-ready pods through their
  queue-proxy to use them a little earlier, which this activator does not: a pod is used once
  Kubernetes marks it ready.

In Kubernetes mode these are the only source of endpoints: the admin API's service pushes are
refused (activator/admin.py), its drains and migrations name instances by pod name.

The informers' handlers run on their threads and only hand the event to the event loop; one task
there updates an index of slices by revision and brings each changed revision's registry entry up
to date (level-triggered: from the caches, whatever the events were). A resync revisits every
revision, which also brings back an instance the proxy dropped after a connection failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from typing import Any

from activator.kube import contract
from activator.kube.endpoints import endpoints_of, revision_info, slice_revision
from activator.registry import Registry
from sllm_knative.api.keys import ServiceKey
from sllm_knative.kube.client import PODAUTOSCALERS, REVISIONS, Kube
from sllm_knative.kube.informer import DELETED, Informer, key_of, split_key
from sllm_knative.log import get_logger

_log = get_logger("activator")
Obj = dict[str, Any]


class KubeSource:
    def __init__(self, kube: Kube, registry: Registry, resync_s: float = 30.0) -> None:
        self.kube = kube
        self.registry = registry
        self.revisions = Informer("revisions", kube.custom.list_cluster_custom_object, REVISIONS.group,
                                  REVISIONS.version, REVISIONS.plural, resync_s=resync_s)
        self.pas = Informer("podautoscalers", kube.custom.list_cluster_custom_object, PODAUTOSCALERS.group,
                            PODAUTOSCALERS.version, PODAUTOSCALERS.plural, resync_s=resync_s)
        self.slices = Informer("endpointslices", kube.discovery.list_endpoint_slice_for_all_namespaces,
                               label_selector=contract.PRIVATE_SLICES_SELECTOR, resync_s=resync_s)
        self._by_revision: dict[ServiceKey, dict[str, Obj]] = {}  # revision -> slice key -> slice
        self._owner: dict[str, ServiceKey] = {}  # slice key -> revision
        self._shown: dict[ServiceKey, tuple[str, ...]] = {}  # the ready pods last logged
        self._queue: asyncio.Queue[ServiceKey] = asyncio.Queue()
        self._queued: set[ServiceKey] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: asyncio.Task[None] | None = None

    # -- running ----------------------------------------------------------------------------

    async def start(self, timeout_s: float = 60.0) -> None:
        """Start the informers and return once each listed and the registry holds what they saw
        (TimeoutError naming the informer that could not list)."""
        self._loop = asyncio.get_running_loop()
        self._worker = asyncio.create_task(self._work(), name="kube-source")
        for inf, what in ((self.revisions, "revision"), (self.pas, "pa"), (self.slices, "slice")):
            inf.add_handler(functools.partial(self._post, what))
            inf.start()
        for inf in (self.revisions, self.pas, self.slices):
            await asyncio.to_thread(inf.wait_synced, timeout_s)
        await asyncio.sleep(0)  # the events of the first lists are posted by now: apply them
        await self._queue.join()
        _log.info("kubernetes source synced", revisions=len(self.revisions.keys()),
                  podautoscalers=len(self.pas.keys()), endpointslices=len(self.slices.keys()))

    async def stop(self) -> None:
        for inf in (self.revisions, self.pas, self.slices):
            await asyncio.to_thread(inf.stop)
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker

    def _post(self, what: str, kind: str, obj: Obj, old: Obj | None) -> None:
        """On an informer's thread: hand the event to the loop."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed in between
            loop.call_soon_threadsafe(self._event, what, kind, obj)

    def _event(self, what: str, kind: str, obj: Obj) -> None:
        if what != "slice":
            ns, name = split_key(key_of(obj))
            self._enqueue(ServiceKey(ns, name))
            return
        skey = key_of(obj)
        before = self._owner.get(skey)
        now = None if kind == DELETED else slice_revision(obj)
        if before is not None and before != now:
            self._by_revision.get(before, {}).pop(skey, None)
            self._owner.pop(skey, None)
            self._enqueue(before)
        if now is not None:
            self._by_revision.setdefault(now, {})[skey] = obj
            self._owner[skey] = now
            self._enqueue(now)

    def _enqueue(self, key: ServiceKey) -> None:
        if key not in self._queued:
            self._queued.add(key)
            self._queue.put_nowait(key)

    async def _work(self) -> None:
        while True:
            key = await self._queue.get()
            self._queued.discard(key)
            try:
                await self.sync(key)
            except Exception:  # one revision's surprise must not stop the others' updates
                _log.error("revision update failed", exc_info=True, service=str(key))
            finally:
                self._queue.task_done()

    # -- one revision -------------------------------------------------------------------------

    async def sync(self, key: ServiceKey) -> None:
        """Bring the registry's entry for revision `key` up to date with the caches."""
        revision = self.revisions.get(str(key))
        if revision is None:
            if key in self.registry.known:
                self.registry.remove_service(key)
                self._shown.pop(key, None)
                _log.info("revision gone", service=str(key))
            if not self._by_revision.get(key):
                self._by_revision.pop(key, None)
            return
        info = revision_info(revision, self.pas.get(str(key)))
        new = key not in self.registry.known
        svc = self.registry.set_service(key, info.container_concurrency, info.hold_timeout_s)
        if new or svc.ours != info.ours:
            _log.info("revision", service=str(key), autoscaler_class=info.autoscaler_class,
                      protocol=info.protocol, container_concurrency=info.container_concurrency)
        svc.ours = info.ours
        endpoints = endpoints_of(self._by_revision.get(key, {}).values(), info)
        await self.registry.set_endpoints(key, endpoints)
        pods = tuple(e.id for e in endpoints)
        before = self._shown.get(key, ())
        if before != pods:
            self._shown[key] = pods
            for e in endpoints:
                if e.id not in before:
                    _log.info("instance ready", service=str(key), instance=e.id, node=e.node, url=e.url)
            for gone in sorted(set(before) - set(pods)):
                _log.info("instance out of rotation", service=str(key), instance=gone)
            _log.info("revision endpoints", service=str(key), ready=len(pods))
