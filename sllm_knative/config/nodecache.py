"""`serving.sllm-knative.io/v1alpha1 NodeCache`: the published checkpoint inventory of one node.

Cluster-scoped, one per node, named after the node. The node's loader is its one writer
(sllm_knative.kube.nodecache): `status` holds the tiers with capacity, use and measured
bandwidth, the stores with theirs, every checkpoint on the node or on its way there with its
state (KServe's LocalModelNode vocabulary: Pending, Downloading, Downloaded, DownloadError),
the queued loads, and a `summary` derived from the checkpoints for printer columns (checked
on parse, never stored in the typed value). Placement turns it into a
`placement.NodeInventory` together with what the autoscaler knows itself (free slots,
running instances). `node_cache_document` is the inverse of `parse_node_cache`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import cache
from typing import Any

import jsonschema

from sllm_knative.config.crds import API_VERSION, NODE_CACHE_CRD, VERSION
from sllm_knative.config.errors import Collector, show
from sllm_knative.config.model_uri import parse_model_uri
from sllm_knative.config.schema import check_document, crd_schema, validator_for
from sllm_knative.placement import Instance, NodeInventory, QueuedLoad, Tier

KIND = "NodeCache"
#: How many checkpoint names a summary string lists before "+N more".
SUMMARY_NAMES = 8


class CheckpointState(str, Enum):
    """A checkpoint's state on a node (KServe's LocalModelNode vocabulary, without its `Model` prefix)."""

    PENDING = "Pending"
    DOWNLOADING = "Downloading"
    DOWNLOADED = "Downloaded"
    DOWNLOAD_ERROR = "DownloadError"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class TierStatus:
    tier: Tier
    bandwidth: float | None = None  # bytes/s into the device; None until measured
    capacity_bytes: int | None = None
    used_bytes: int | None = None


@dataclass(frozen=True)
class StoreStatus:
    """A model store root the loader may fetch from, with its measured rate (None until its first fetch)."""

    uri: str
    bandwidth: float | None = None


@dataclass(frozen=True)
class CachedCheckpoint:
    model: str
    size_bytes: int | None
    tiers: tuple[Tier, ...]  # complete copies; non-empty exactly when Downloaded
    last_used_time: str | None = None
    state: CheckpointState = CheckpointState.DOWNLOADED
    filling: tuple[Tier, ...] = ()  # tiers with a copy being filled now
    message: str | None = None  # why the last attempt failed (DownloadError)

    @property
    def fastest(self) -> Tier:
        if not self.tiers:
            raise ValueError(f"checkpoint {self.model} has no complete copy on the node (state {self.state})")
        return min(self.tiers, key=lambda t: t.rank)


@dataclass(frozen=True)
class Summary:
    """The printer-column view of the checkpoints (derived, never set by hand)."""

    dram: str = ""
    ssd: str = ""
    loading: int = 0
    failed: int = 0


def _names(models: list[str]) -> str:
    models = sorted(models)
    shown = ", ".join(models[:SUMMARY_NAMES])
    return shown + (f", +{len(models) - SUMMARY_NAMES} more" if len(models) > SUMMARY_NAMES else "")


def summarize(checkpoints: Sequence[CachedCheckpoint]) -> Summary:
    return Summary(
        dram=_names([c.model for c in checkpoints if Tier.DRAM in c.tiers]),
        ssd=_names([c.model for c in checkpoints if Tier.SSD in c.tiers]),
        loading=sum(c.state in (CheckpointState.PENDING, CheckpointState.DOWNLOADING) for c in checkpoints),
        failed=sum(c.state == CheckpointState.DOWNLOAD_ERROR for c in checkpoints),
    )


@dataclass(frozen=True)
class NodeCache:
    node: str
    tiers: tuple[TierStatus, ...] = ()
    checkpoints: tuple[CachedCheckpoint, ...] = ()
    load_queue: tuple[QueuedLoad, ...] = ()
    observed_time: str | None = None
    stores: tuple[StoreStatus, ...] = ()
    inventory_version: int | None = None

    @property
    def summary(self) -> Summary:
        return summarize(self.checkpoints)

    def inventory(self, *, free_slots: int, instances: Sequence[Instance] = (),
                  instance_overhead_s: float = 0.0, fallback: Mapping[Tier, float] | None = None) -> NodeInventory:
        """The placement view of this node; raises ValueError while no inventory is published, or
        when a tier it needs has no measured bandwidth and `fallback` names none."""
        if not self.tiers:
            raise ValueError(f"node {self.node}: no inventory published yet (status.tiers is empty)")
        measured = {t.tier: t.bandwidth for t in self.tiers if t.bandwidth is not None}
        return NodeInventory(
            name=self.node,
            bandwidth={**(fallback or {}), **measured},
            checkpoints={c.model: c.fastest for c in self.checkpoints if c.tiers},
            load_queue=self.load_queue,
            free_slots=free_slots,
            instances=tuple(instances),
            instance_overhead_s=instance_overhead_s,
            remote_bandwidth={s.uri: s.bandwidth for s in self.stores if s.bandwidth is not None},
        )


@cache
def _validator() -> jsonschema.protocols.Validator:
    return validator_for(crd_schema(NODE_CACHE_CRD, VERSION))


def parse_node_cache(doc: Any, *, source: str = "") -> NodeCache:
    """Validate a NodeCache document (schema, then the rules across fields) and return it typed."""
    check_document(doc, API_VERSION, KIND, "a NodeCache", _validator(), source)
    errors = Collector()

    meta = doc.get("metadata") or {}
    node = doc["spec"]["nodeName"]
    if meta.get("namespace"):
        errors.add(("metadata", "namespace"), "NodeCache is cluster-scoped: remove the namespace")
    if meta.get("name") != node:
        errors.add(("metadata", "name"), f"must equal spec.nodeName ({show(node)}), got {show(meta.get('name'))}")
    status = doc.get("status") or {}
    tiers: list[TierStatus] = []
    for i, t in enumerate(status.get("tiers") or []):
        tier = Tier(t["name"])
        if any(x.tier == tier for x in tiers):
            errors.add(("status", "tiers", i, "name"), f"tier {tier} is listed twice")
        cap, used = t.get("capacityBytes"), t.get("usedBytes")
        if cap is not None and used is not None and used > cap:
            errors.add(("status", "tiers", i, "usedBytes"), f"must be <= capacityBytes ({cap}), got {used}")
        bw = t.get("bandwidthBytesPerSecond")
        tiers.append(TierStatus(tier, None if bw is None else float(bw), cap, used))
    present = {t.tier for t in tiers}
    if tiers and Tier.REMOTE not in present:
        errors.add(("status", "tiers"), "must include the remote tier (the node's bandwidth from the model store)")
    stores: list[StoreStatus] = []
    for i, st in enumerate(status.get("stores") or []):
        if any(x.uri == st["uri"] for x in stores):
            errors.add(("status", "stores", i, "uri"), f"store {show(st['uri'])} is listed twice")
        bw = st.get("bandwidthBytesPerSecond")
        stores.append(StoreStatus(st["uri"], None if bw is None else float(bw)))
    checkpoints: list[CachedCheckpoint] = []
    for i, c in enumerate(status.get("checkpoints") or []):
        checkpoints.append(_checkpoint(c, ("status", "checkpoints", i), present, checkpoints, errors))
    queue: list[QueuedLoad] = []
    for i, q in enumerate(status.get("loadQueue") or []):
        tier = Tier(q["tier"])
        if tier not in present:
            errors.add(("status", "loadQueue", i, "tier"), f"tier {tier} is not among status.tiers")
        queue.append(QueuedLoad(q["model"], q["remainingBytes"], tier))
    if "summary" in status:
        _check_summary(status["summary"], summarize(checkpoints), errors)
    errors.raise_if_any(source)
    return NodeCache(node, tuple(tiers), tuple(checkpoints), tuple(queue), status.get("observedTime"),
                     tuple(stores), status.get("inventoryVersion"))


def _checkpoint(c: dict[str, Any], path: tuple[str | int, ...], present: set[Tier],
                seen: Sequence[CachedCheckpoint], errors: Collector) -> CachedCheckpoint:
    try:
        parse_model_uri(c["model"])
    except ValueError as exc:
        errors.add(path + ("model",), str(exc))
    if any(x.model == c["model"] for x in seen):
        errors.add(path + ("model",), f"checkpoint {show(c['model'])} is listed twice")
    state = CheckpointState(c.get("state", CheckpointState.DOWNLOADED.value))
    lists: dict[str, tuple[Tier, ...]] = {}
    for field in ("tiers", "filling"):
        held = tuple(Tier(t) for t in c.get(field) or [])
        for j, t in enumerate(held):
            if t == Tier.REMOTE:
                errors.add(path + (field, j), "remote is not a node tier; list where the node holds a copy")
            elif t not in present:
                errors.add(path + (field, j), f"tier {t} is not among status.tiers")
            elif t in held[:j]:
                errors.add(path + (field, j), f"tier {t} is listed twice")
        lists[field] = held
    if state == CheckpointState.DOWNLOADED and not lists["tiers"]:
        errors.add(path + ("tiers",), "a Downloaded checkpoint lists the tiers holding its complete copies")
    elif state != CheckpointState.DOWNLOADED and lists["tiers"]:
        errors.add(path + ("tiers",), f"must be empty when state is {state} (a complete copy makes it Downloaded)")
    if c.get("message") is not None and state != CheckpointState.DOWNLOAD_ERROR:
        errors.add(path + ("message",), f"only a DownloadError checkpoint has a message (state is {state})")
    return CachedCheckpoint(c["model"], c.get("sizeBytes"), lists["tiers"], c.get("lastUsedTime"), state,
                            lists["filling"], c.get("message"))


def _check_summary(given: dict[str, Any], derived: Summary, errors: Collector) -> None:
    for key, want in (("dram", derived.dram), ("ssd", derived.ssd), ("loading", derived.loading),
                      ("failed", derived.failed)):
        got = given.get(key, "" if isinstance(want, str) else 0)
        if got != want:
            errors.add(("status", "summary", key), f"must be {show(want)} (derived from status.checkpoints), "
                                                   f"got {show(got)}")


def node_cache_document(cache: NodeCache) -> dict[str, Any]:
    """The NodeCache resource a loader publishes for `cache` (parses back to an equal value)."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": cache.node},
        "spec": {"nodeName": cache.node},
        "status": node_cache_status(cache),
    }


def node_cache_status(cache: NodeCache) -> dict[str, Any]:
    """The `status` of `cache`'s NodeCache document (summary included; no null values)."""
    tiers = []
    for t in cache.tiers:
        entry: dict[str, Any] = {"name": t.tier.value}
        if t.capacity_bytes is not None:
            entry["capacityBytes"] = t.capacity_bytes
        if t.used_bytes is not None:
            entry["usedBytes"] = t.used_bytes
        if t.bandwidth is not None:
            entry["bandwidthBytesPerSecond"] = t.bandwidth
        tiers.append(entry)
    stores = []
    for st in cache.stores:
        store: dict[str, Any] = {"uri": st.uri}
        if st.bandwidth is not None:
            store["bandwidthBytesPerSecond"] = st.bandwidth
        stores.append(store)
    checkpoints = []
    for c in cache.checkpoints:
        cp: dict[str, Any] = {"model": c.model, "state": c.state.value, "tiers": [t.value for t in c.tiers]}
        if c.size_bytes is not None:
            cp["sizeBytes"] = c.size_bytes
        if c.filling:
            cp["filling"] = [t.value for t in c.filling]
        if c.message is not None:
            cp["message"] = c.message
        if c.last_used_time is not None:
            cp["lastUsedTime"] = c.last_used_time
        checkpoints.append(cp)
    summary = cache.summary
    status: dict[str, Any] = {}
    if cache.observed_time is not None:
        status["observedTime"] = cache.observed_time
    if cache.inventory_version is not None:
        status["inventoryVersion"] = cache.inventory_version
    status.update({
        "tiers": tiers,
        "stores": stores,
        "checkpoints": checkpoints,
        "loadQueue": [{"model": q.model, "tier": q.tier.value, "remainingBytes": q.remaining_bytes}
                      for q in cache.load_queue],
        "summary": {**{k: v for k, v in (("dram", summary.dram), ("ssd", summary.ssd)) if v},
                    "loading": summary.loading, "failed": summary.failed},
    })
    return status
