"""The node's NodeCache: the loader's state as the cluster sees it, and the publisher that writes it.

`node_cache` is pure: the Inventory message plus the fills under way and the failed ones, as a
`sllm_knative.config.NodeCache`. The state of each checkpoint, in KServe's vocabulary:

    Downloaded     a complete, verified copy (marker written) in the SSD or DRAM tier
    Downloading    no complete copy yet, and a tier entry filling (bytes arriving)
    Pending        a fill was asked for and has no tier entry yet (reading the index, waiting for room)
    DownloadError  the last fill failed and nothing above holds (`message` says why)

The load queue is one entry per checkpoint with bytes still to move (a remote fetch that
fills DRAM and SSD at once is one load), from the tier the bytes come from, fewest remaining
first; the loader runs them concurrently, not one after the other. The copy a fresh fetch makes
from DRAM to the SSD is not a load (no instance waits for it).

`start_publisher` connects with `sllm_knative.kube.client` and starts a
`sllm_knative.kube.nodecache.NodeCachePublisher` on the loader's loop; the autoscaler's warm
requests (`spec.warm`) become prefetches into DRAM, as if a client had asked for them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from loader_sidecar.fetch import Failure
from sllm_knative.config.nodecache import (
    CachedCheckpoint,
    CheckpointState,
    NodeCache,
    StoreStatus,
    TierStatus,
)
from sllm_knative.kube.times import rfc3339
from sllm_knative.loader import loader_pb2 as pb
from sllm_knative.loader.hops import tier_rates
from sllm_knative.placement import QueuedLoad, Tier

if TYPE_CHECKING:
    from loader_sidecar.node import Node
    from sllm_knative.kube.nodecache import NodeCachePublisher

_NODE_TIERS = (Tier.DRAM, Tier.SSD)  # fastest first, as checkpoints list them


def node_cache(name: str, inv: pb.Inventory, in_flight: Mapping[str, str], failures: Mapping[str, Failure],
               now: float) -> NodeCache:
    """The NodeCache of Kubernetes Node `name` for this loader state (pure)."""
    rates = tier_rates((b.hop, b.bytes_per_second) for b in inv.bandwidths)
    by_tier = {Tier(t.name): t for t in inv.tiers}
    tiers = [TierStatus(tier, rates.tiers.get(tier), int(by_tier[tier].capacity), int(by_tier[tier].used))
             for tier in _NODE_TIERS if tier in by_tier]
    tiers.append(TierStatus(Tier.REMOTE, rates.tiers.get(Tier.REMOTE)))

    ready: dict[str, list[Tier]] = {}
    filling: dict[str, dict[Tier, pb.CheckpointEntry]] = {}
    sizes: dict[str, int] = {}
    last_use: dict[str, float] = {}
    for tier in _NODE_TIERS:
        if tier not in by_tier:
            continue
        for e in by_tier[tier].entries:
            if e.state == "ready":
                ready.setdefault(e.model, []).append(tier)
                sizes[e.model] = int(e.size)  # a complete copy's size is the checkpoint's
            else:
                filling.setdefault(e.model, {})[tier] = e
                sizes.setdefault(e.model, int(e.size))
            if e.last_use > 0:
                last_use[e.model] = max(last_use.get(e.model, 0.0), e.last_use)

    checkpoints = []
    for model in sorted(set(ready) | set(filling) | set(in_flight) | set(failures)):
        held = tuple(ready.get(model, ()))
        state = (CheckpointState.DOWNLOADED if held else CheckpointState.DOWNLOADING if model in filling
                 else CheckpointState.PENDING if model in in_flight else CheckpointState.DOWNLOAD_ERROR)
        failure = failures.get(model) if state == CheckpointState.DOWNLOAD_ERROR else None
        checkpoints.append(CachedCheckpoint(
            model=model, size_bytes=sizes.get(model) or None, tiers=held,
            last_used_time=rfc3339(last_use[model]) if model in last_use else None, state=state,
            filling=tuple(t for t in _NODE_TIERS if t in filling.get(model, {})),
            message=f"{failure.kind}: {failure.message}" if failure else None))

    queue = []
    for model, entries in filling.items():
        if Tier.DRAM in entries:  # into DRAM: from the SSD copy if there is one, else from the store
            e, source = entries[Tier.DRAM], Tier.SSD if Tier.SSD in ready.get(model, ()) else Tier.REMOTE
        elif Tier.DRAM in ready.get(model, ()):
            continue  # the SSD copy of a fresh fetch, made from DRAM off any instance's path
        else:
            e, source = entries[Tier.SSD], Tier.REMOTE
        queue.append(QueuedLoad(model, max(0, int(e.size) - int(e.filled)), source))
    queue.sort(key=lambda q: (q.remaining_bytes, q.model))

    return NodeCache(node=name, tiers=tuple(tiers), checkpoints=tuple(checkpoints), load_queue=tuple(queue),
                     observed_time=rfc3339(now), stores=tuple(StoreStatus(s, rates.stores.get(s)) for s in inv.stores),
                     inventory_version=int(inv.version))


def snapshot(node: Node, name: str) -> NodeCache:
    """The NodeCache of the running node `node` now."""
    return node_cache(name, node.inventory(), node.fetcher.in_flight(), dict(node.fetcher.failures), time.time())


def start_publisher(node: Node) -> NodeCachePublisher:
    """Connect (the flags, else $KUBECONFIG, else the pod's service account) and start publishing
    on the running loop. Raises KubeConfigError when there is no cluster to talk to."""
    from sllm_knative.kube.client import Kube, KubeConfigError, connect
    from sllm_knative.kube.nodecache import NodeCachePublisher

    config = node.config
    assert config.kube_node is not None
    name = config.kube_node
    try:
        kube = Kube(connect(config.kubeconfig))  # in a pod: its service account, under the mount root if any
    except KubeConfigError:
        raise
    except Exception as exc:  # a kubeconfig the client cannot use (kubernetes.config.ConfigException, ...)
        where = config.kubeconfig or "$KUBECONFIG"
        raise KubeConfigError(f"kubeconfig {where}: {type(exc).__name__}: {exc}") from exc
    return NodeCachePublisher(kube, name, lambda: snapshot(node, name), node.notifier.wait_newer,
                              resync_s=config.kube_resync_s, on_outcome=node.metrics.nodecache_outcome,
                              on_warm=lambda model, tier: node.prefetch(model, tier, wait=False)).start()
