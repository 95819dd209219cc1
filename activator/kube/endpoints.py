"""What the activator needs to know of a revision, from its Kubernetes objects, as pure functions.

- `revision_info(revision, pa)`: the autoscaler class (the PodAutoscaler's
  `autoscaling.knative.dev/class`, else the Revision's, else KPA: `pa_lifecycle.go: Class`), the
  protocol type (`spec.protocolType`), `containerConcurrency` and the instance's internal
  (migration) port, if the revision declares one.
- `slice_revision(slice)`: which revision an EndpointSlice belongs to (the labels its private
  Service passed on to it), or None for any other slice.
- `endpoints_of(slices, info)`: the revision's ready pods as the registry's endpoints, one per pod,
  the instance id = the pod's name (`targetRef.name`), so the autoscaler's admin calls (drain,
  migrate) name them as it names pods. An endpoint is ready when `conditions.ready` is true or
  absent (the EndpointSlice API: "nil should be interpreted as true"); a terminating pod's is
  false. The address is the endpoint's first one, the port the slice's port named for the protocol
  (`http` or `http2`, what `revision_backends.go: endpointsToDests` picks).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from activator.kube import contract
from sllm_knative.api.activator import Endpoint
from sllm_knative.api.keys import ServiceKey
from sllm_knative.config.autoscaler import KPA_CLASS, SLLM_CLASS
from sllm_knative.config.service import INTERNAL_PORT_ANNOTATION, internal_port_of

Obj = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class RevisionInfo:
    autoscaler_class: str = KPA_CLASS
    protocol: str = "http1"
    container_concurrency: int = 0
    internal_port: int | None = None
    hold_timeout_s: float | None = None  # responseStartTimeoutSeconds, else timeoutSeconds (Knative defaults it)

    @property
    def ours(self) -> bool:
        return self.autoscaler_class == SLLM_CLASS

    @property
    def port_name(self) -> str:
        return contract.port_name(self.protocol)


def _meta(obj: Obj | None, field: str) -> dict[str, str]:
    return dict(((obj or {}).get("metadata") or {}).get(field) or {})


def revision_info(revision: Obj | None, pa: Obj | None) -> RevisionInfo:
    pa_ann, rev_ann = _meta(pa, "annotations"), _meta(revision, "annotations")
    cls = pa_ann.get(contract.CLASS_ANNOTATION) or rev_ann.get(contract.CLASS_ANNOTATION) or KPA_CLASS
    pa_spec, rev_spec = (pa or {}).get("spec") or {}, (revision or {}).get("spec") or {}
    protocol = pa_spec.get("protocolType") or _revision_protocol(rev_spec)
    cc = _int(pa_spec.get("containerConcurrency", rev_spec.get("containerConcurrency"))) or 0
    internal = internal_port_of(pa_ann) if pa_ann.get(INTERNAL_PORT_ANNOTATION) else internal_port_of(rev_ann)
    hold = _int(rev_spec.get("responseStartTimeoutSeconds")) or _int(rev_spec.get("timeoutSeconds"))
    return RevisionInfo(cls, protocol, max(cc, 0), internal, float(hold) if hold and hold > 0 else None)


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _revision_protocol(spec: Obj) -> str:
    """pkg/apis/serving/v1/revision_helpers.go: GetProtocol (a container port named h2c)."""
    for c in spec.get("containers") or []:
        for p in c.get("ports") or []:
            if p.get("name") == "h2c":
                return "h2c"
    return "http1"


def slice_revision(eps: Obj) -> ServiceKey | None:
    labels, meta = _meta(eps, "labels"), eps.get("metadata") or {}
    rev, ns = labels.get(contract.REVISION_LABEL), meta.get("namespace")
    if not rev or not ns or labels.get(contract.SERVICE_TYPE_LABEL) != contract.PRIVATE:
        return None
    return ServiceKey(ns, rev)


def _url(address: str, port: int, address_type: str) -> str:
    host = f"[{address}]" if address_type == "IPv6" or ":" in address else address
    return f"http://{host}:{port}"


def slice_endpoints(eps: Obj, info: RevisionInfo) -> list[Endpoint]:
    """The ready endpoints of one slice (none when it lacks the protocol's port)."""
    port = next((p.get("port") for p in eps.get("ports") or [] if p.get("name") == info.port_name), None)
    if not port:
        return []
    kind = eps.get("addressType", "IPv4")
    out = []
    for ep in eps.get("endpoints") or []:
        addresses = ep.get("addresses") or []
        if not addresses or (ep.get("conditions") or {}).get("ready") is False:
            continue
        ref = ep.get("targetRef") or {}
        pod = str(ref["name"]) if ref.get("kind", "Pod") == "Pod" and ref.get("name") else str(addresses[0])
        internal = _url(addresses[0], info.internal_port, kind) if info.internal_port else None
        out.append(Endpoint(id=pod, url=_url(addresses[0], int(port), kind), node=ep.get("nodeName") or "",
                            internal_url=internal))
    return out


def endpoints_of(slices: Iterable[Obj], info: RevisionInfo) -> list[Endpoint]:
    """Every ready pod of the revision once, ordered by pod name (a pod in two slices while the
    controller moves it counts once)."""
    seen: dict[str, Endpoint] = {}
    for eps in slices:
        for e in slice_endpoints(eps, info):
            seen.setdefault(e.id, e)
    return [seen[k] for k in sorted(seen)]
