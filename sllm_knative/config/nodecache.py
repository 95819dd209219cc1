"""`serving.sllm-knative.io/v1alpha1 NodeCache`: the published checkpoint inventory of one node.

Cluster-scoped, one per node, named after the node. The loader writes `status` (tiers with
capacity and measured bandwidth, cached checkpoints, queued loads); placement turns it into a
`placement.NodeInventory` together with what the autoscaler knows itself (free slots,
running instances). `node_cache_document` is the inverse of `parse_node_cache`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import jsonschema

from sllm_knative.config.crds import API_VERSION, NODE_CACHE_CRD, VERSION
from sllm_knative.config.errors import Collector, show
from sllm_knative.config.model_uri import parse_model_uri
from sllm_knative.config.schema import check_document, crd_schema, validator_for
from sllm_knative.placement import Instance, NodeInventory, QueuedLoad, Tier

KIND = "NodeCache"


@dataclass(frozen=True)
class TierStatus:
    tier: Tier
    bandwidth: float
    capacity_bytes: int | None = None
    used_bytes: int | None = None


@dataclass(frozen=True)
class CachedCheckpoint:
    model: str
    size_bytes: int
    tiers: tuple[Tier, ...]
    last_used_time: str | None = None

    @property
    def fastest(self) -> Tier:
        return min(self.tiers, key=lambda t: t.rank)


@dataclass(frozen=True)
class NodeCache:
    node: str
    tiers: tuple[TierStatus, ...] = ()
    checkpoints: tuple[CachedCheckpoint, ...] = ()
    load_queue: tuple[QueuedLoad, ...] = ()
    observed_time: str | None = None

    def inventory(self, *, free_slots: int, instances: Sequence[Instance] = (),
                  instance_overhead_s: float = 0.0) -> NodeInventory:
        """The placement view of this node; raises ValueError while no inventory is published."""
        if not self.tiers:
            raise ValueError(f"node {self.node}: no inventory published yet (status.tiers is empty)")
        return NodeInventory(
            name=self.node,
            bandwidth={t.tier: t.bandwidth for t in self.tiers},
            checkpoints={c.model: c.fastest for c in self.checkpoints},
            load_queue=self.load_queue,
            free_slots=free_slots,
            instances=tuple(instances),
            instance_overhead_s=instance_overhead_s,
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
        tiers.append(TierStatus(tier, float(t["bandwidthBytesPerSecond"]), cap, used))
    present = {t.tier for t in tiers}
    if tiers and Tier.REMOTE not in present:
        errors.add(("status", "tiers"), "must include the remote tier (the node's bandwidth from the model store)")
    checkpoints: list[CachedCheckpoint] = []
    for i, c in enumerate(status.get("checkpoints") or []):
        path = ("status", "checkpoints", i)
        try:
            parse_model_uri(c["model"])
        except ValueError as exc:
            errors.add(path + ("model",), str(exc))
        if any(x.model == c["model"] for x in checkpoints):
            errors.add(path + ("model",), f"checkpoint {show(c['model'])} is listed twice")
        held = tuple(Tier(t) for t in c["tiers"])
        for j, t in enumerate(held):
            if t == Tier.REMOTE:
                errors.add(path + ("tiers", j), "remote is not a node tier; list where the node holds a copy")
            elif t not in present:
                errors.add(path + ("tiers", j), f"tier {t} is not among status.tiers")
        checkpoints.append(CachedCheckpoint(c["model"], c["sizeBytes"], held, c.get("lastUsedTime")))
    queue: list[QueuedLoad] = []
    for i, q in enumerate(status.get("loadQueue") or []):
        tier = Tier(q["tier"])
        if tier not in present:
            errors.add(("status", "loadQueue", i, "tier"), f"tier {tier} is not among status.tiers")
        queue.append(QueuedLoad(q["model"], q["remainingBytes"], tier))
    errors.raise_if_any(source)
    return NodeCache(node, tuple(tiers), tuple(checkpoints), tuple(queue), status.get("observedTime"))


def node_cache_document(cache: NodeCache) -> dict[str, Any]:
    """The NodeCache resource a loader publishes for `cache` (parses back to an equal value)."""
    tiers = []
    for t in cache.tiers:
        entry: dict[str, Any] = {"name": t.tier.value, "bandwidthBytesPerSecond": t.bandwidth}
        if t.capacity_bytes is not None:
            entry["capacityBytes"] = t.capacity_bytes
        if t.used_bytes is not None:
            entry["usedBytes"] = t.used_bytes
        tiers.append(entry)
    checkpoints = []
    for c in cache.checkpoints:
        cp: dict[str, Any] = {"model": c.model, "sizeBytes": c.size_bytes, "tiers": [t.value for t in c.tiers]}
        if c.last_used_time is not None:
            cp["lastUsedTime"] = c.last_used_time
        checkpoints.append(cp)
    status: dict[str, Any] = {
        "tiers": tiers,
        "checkpoints": checkpoints,
        "loadQueue": [{"model": q.model, "tier": q.tier.value, "remainingBytes": q.remaining_bytes}
                      for q in cache.load_queue],
    }
    if cache.observed_time is not None:
        status["observedTime"] = cache.observed_time
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": cache.node},
        "spec": {"nodeName": cache.node},
        "status": status,
    }
