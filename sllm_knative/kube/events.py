"""Decisions recorded as Kubernetes Events on the object they concern (`kubectl describe` shows them).

`EventRecorder.record(obj, type, reason, message)` writes a core/v1 Event whose
`involvedObject` is `obj`. A repeat of the same (object, type, reason, message) within
`window_s` bumps the first Event's `count` and `lastTimestamp` instead of adding another,
as client-go's event correlator does. Recording never raises: an Event that cannot be written
is logged and dropped (Events are best effort in Kubernetes too).
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

from sllm_knative.kube.client import Kube, error_message
from sllm_knative.kube.times import rfc3339
from sllm_knative.log import get_logger

_log = get_logger("sllm_knative.kube.events")

NORMAL, WARNING = "Normal", "Warning"


def involved(obj: dict[str, Any]) -> dict[str, Any]:
    """The `involvedObject` reference for an object in the API's JSON shape."""
    meta = obj.get("metadata") or {}
    ref = {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"), "name": meta.get("name"),
           "namespace": meta.get("namespace"), "uid": meta.get("uid"),
           "resourceVersion": meta.get("resourceVersion")}
    return {k: v for k, v in ref.items() if v}


class EventRecorder:
    def __init__(self, kube: Kube, component: str, instance: str = "", window_s: float = 600.0) -> None:
        self.kube, self.component, self.instance = kube, component, instance
        self.window_s = window_s
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str, str, str], tuple[str, str, int, float]] = {}  # -> (ns, name, count, at)

    def record(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        ref = involved(obj)
        namespace = ref.get("namespace") or "default"  # cluster-scoped objects' Events live in default
        key = (str(ref.get("uid") or f"{namespace}/{ref.get('name')}"), type_, reason, message)
        now = time.monotonic()
        with self._lock:
            prior = self._seen.get(key)
            if prior and now - prior[3] > self.window_s:
                prior = None
        try:
            if prior:
                ns, name, count, first = prior
                self.kube.core.patch_namespaced_event(name, ns, {"count": count + 1, "lastTimestamp": rfc3339()})
                with self._lock:
                    self._seen[key] = (ns, name, count + 1, first)
                return
            name = f"{ref.get('name')}.{uuid.uuid4().hex[:16]}"
            stamp = rfc3339()
            self.kube.core.create_namespaced_event(namespace, {
                "metadata": {"name": name, "namespace": namespace},
                "involvedObject": ref, "type": type_, "reason": reason, "message": message[:1024],
                "source": {"component": self.component}, "reportingComponent": self.component,
                "reportingInstance": self.instance or self.component,
                "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1})
            with self._lock:
                self._seen[key] = (namespace, name, 1, now)
                if len(self._seen) > 4096:  # forget the oldest half
                    for k in sorted(self._seen, key=lambda k: self._seen[k][3])[:2048]:
                        del self._seen[k]
        except Exception as exc:
            _log.warning("could not record an event", object=f"{namespace}/{ref.get('name')}", reason=reason,
                         error=error_message(exc)[:200])
