"""The local backend: nodes are loader sidecars plus a zygote each; instances are processes.

What the control loop asks of a backend: the nodes' inventories (for placement), warm a
checkpoint on a node now, start an instance of a service on a node, wait until it is ready,
list the generations it runs, stop it. Kubernetes would do the same through pods, scheduling
gates and NodeCaches.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import httpx

from sllm_knative.config import ServiceConfig
from sllm_knative.local import procs, zygote
from sllm_knative.log import get_logger
from sllm_knative.placement import Instance, NodeInventory, Tier, pool_store_rates
from sllm_knative.ports import free_port

_log = get_logger("autoscaler.backend")

# Used until a node has measured the hop (the sidecar probes disk and DRAM at start; the
# remote store is measured on its first transfer).
FALLBACK_BANDWIDTH = {Tier.REMOTE: 100e6, Tier.SSD: 500e6, Tier.DRAM: 5e9}
# States in which an instance holds a slot of its node.
OCCUPYING = ("starting", "ready", "draining")


@dataclasses.dataclass(frozen=True)
class Node:
    name: str
    loader: str  # gRPC target of its loader sidecar
    zygote: str  # Unix socket of its pre-imported runtime
    slots: int
    logs: Path


@dataclasses.dataclass
class InstanceRecord:
    id: str
    service: str
    node: str
    port: int
    internal_port: int
    pid: int = 0
    state: str = "starting"  # starting -> ready -> stopping
    started_at: float = 0.0  # wall clock
    ready_at: float | None = None
    tier: str = ""  # where the checkpoint was when the instance was placed
    report: dict[str, Any] = dataclasses.field(default_factory=dict)  # the instance's startup report
    timing_path: str = ""
    lease: dict[str, Any] = dataclasses.field(default_factory=dict)  # when its checkpoint lease completed

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def internal_url(self) -> str:
        return f"http://127.0.0.1:{self.internal_port}"


def running_generations(generations: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The entries of an instance's generation list that still compute: waiting or running (a
    parked prefill only waits for a migration; detached and finished ones are done)."""
    return [g for g in generations or [] if g.get("status") in ("waiting", "running")]


def instance_view(rec: InstanceRecord, *, model: str, size_bytes: int, capacity: int, priority: int,
                  migration: bool, outstanding: int, generations: list[dict[str, Any]] | None) -> Instance:
    """The planner's view of a live instance (pure).

    `outstanding` is the activator's count of requests routed to it (reported every second);
    `generations` the instance's own list (`GET /internal/v1/generations`: id, status,
    position), None when it was not asked or did not answer. In flight is the larger of the
    two (either may lag the other by a moment); tokens are the positions (prompt plus
    generated) of its waiting and running generations, what a migration recomputes. It can
    be migrated only when ready with an internal API and its policy allows migration."""
    running = running_generations(generations)
    return Instance(
        name=rec.id, model=model, size_bytes=size_bytes,
        inflight=max(outstanding, len(running)),
        tokens=sum(int(g.get("position", 0)) for g in running),
        capacity=capacity, priority=priority,
        migratable=migration and rec.state == "ready" and bool(rec.internal_port),
        ready=rec.state == "ready",
    )


def inventory_to_node(node: Node, inv: Any, running: int, size_hint: dict[str, int],
                      instances: tuple[Instance, ...] = ()) -> NodeInventory:
    """A loader's Inventory message, plus the instances the controller runs there, as the
    planner's NodeInventory (pure)."""
    bw = dict(FALLBACK_BANDWIDTH)
    hops = {b.hop: b.bytes_per_second for b in inv.bandwidths if b.bytes_per_second > 0}
    if "disk_read" in hops:
        bw[Tier.SSD] = hops["disk_read"]
    # DRAM tier -> device: the pinned copy on a GPU node; on the CPU the instance maps the
    # partition (dram_map; a sidecar without that probe: the memory copy, an upper bound).
    for hop in ("host_to_device", "dram_map", "dram_copy"):
        if hop in hops:
            bw[Tier.DRAM] = hops[hop]
            break
    stores = {k.removeprefix("remote:"): v for k, v in hops.items() if k.startswith("remote:")}
    if stores:  # a model in a store this node has not fetched from yet: the fastest it has seen
        bw[Tier.REMOTE] = max(stores.values())
    checkpoints: dict[str, Tier] = {}
    for tier in inv.tiers:
        t = Tier.DRAM if tier.name == "dram" else Tier.SSD
        for e in tier.entries:
            if e.state == "ready":
                size_hint[e.model] = int(e.size)
                if e.model not in checkpoints or t.rank < checkpoints[e.model].rank:
                    checkpoints[e.model] = t
    return NodeInventory(name=node.name, bandwidth=bw, checkpoints=checkpoints,
                         free_slots=max(0, node.slots - running), instances=instances, remote_bandwidth=stores)


class LocalBackend:
    def __init__(self, nodes: list[Node], device: str = "cpu", internal_token: str | None = None) -> None:
        self.nodes = {n.name: n for n in nodes}
        self.device = device
        self.http = httpx.AsyncClient(timeout=5.0)
        # The instances' internal API requires this token when set (`sllm-knative up` gives every
        # process of a cluster the same SLLM_INTERNAL_TOKEN).
        token = internal_token if internal_token is not None else os.environ.get("SLLM_INTERNAL_TOKEN")
        self._internal_headers = {"authorization": f"Bearer {token}"} if token else {}
        self.model_sizes: dict[str, int] = {}
        self.drain_url: str | None = None  # the activator's admin URL: instances drain there on SIGTERM

    async def inventory(self, node: str) -> Any:
        from loader_sidecar.client import LoaderClient

        def get() -> Any:
            with LoaderClient(self.nodes[node].loader) as c:
                return c.inventory()

        return await asyncio.to_thread(get)

    async def inventories(self, running: dict[str, int],
                          instances: dict[str, tuple[Instance, ...]] | None = None) -> list[NodeInventory]:
        out = []
        for name, node in self.nodes.items():
            try:
                inv = await self.inventory(name)
            except Exception as exc:  # a node whose loader does not answer is not a candidate
                _log.warning("node inventory unavailable", node=name, error=str(exc))
                continue
            out.append(inventory_to_node(node, inv, running.get(name, 0), self.model_sizes,
                                         (instances or {}).get(name, ())))
        return pool_store_rates(out)

    async def generations(self, rec: InstanceRecord, timeout_s: float = 1.0) -> list[dict[str, Any]] | None:
        """The generations the instance runs (its internal API), None when it does not answer."""
        try:
            r = await self.http.get(f"{rec.internal_url}/internal/v1/generations", headers=self._internal_headers,
                                    timeout=timeout_s)
            r.raise_for_status()
            data = r.json()["data"]
        except httpx.HTTPStatusError as exc:  # not a transient: a token or version mismatch
            _log.warning("generations refused", model=rec.service, instance=rec.id, node=rec.node,
                         status=exc.response.status_code)
            return None
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            _log.debug("generations unavailable", model=rec.service, instance=rec.id, node=rec.node, error=str(exc))
            return None
        return data if isinstance(data, list) else None

    async def warm(self, node: str, model: str) -> None:
        """Tell the node's loader to start moving the checkpoint into DRAM now (no wait)."""
        from loader_sidecar.client import LoaderClient

        def prefetch() -> None:
            with LoaderClient(self.nodes[node].loader) as c:
                c.prefetch(model, tier="dram", wait=False)

        try:
            await asyncio.to_thread(prefetch)
        except Exception as exc:  # the instance's own acquire will retry and report
            _log.warning("warming failed", node=node, model=model, error=str(exc))

    async def start(self, svc: ServiceConfig, node: str, instance_id: str, tier: str) -> InstanceRecord:
        n = self.nodes[node]
        rec = InstanceRecord(instance_id, svc.key, node, free_port(), free_port(), tier=tier, started_at=time.time())
        argv = ["--served-model-name", svc.name, "--device", self.device,
                "--host", "127.0.0.1", "--port", str(rec.port),
                "--internal-host", "127.0.0.1", "--internal-port", str(rec.internal_port)]
        if svc.container_concurrency:
            argv += ["--max-concurrency", str(svc.container_concurrency)]
        argv += list(svc.container.args)  # the user container's args, as Knative passes them
        log = n.logs / f"{instance_id}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {e.name: e.value for e in svc.container.env if e.value is not None}
        env.update(SLLM_INSTANCE=instance_id, SLLM_NODE=node)
        if self.drain_url:
            env["SLLM_DRAIN_URL"] = self.drain_url
        lease = {"loader": n.loader, "model": svc.model.uri if svc.model else "", "device": self.device,
                 "instance": instance_id}
        rec.timing_path = str(log.with_suffix(".timing.json"))
        rec.pid = await asyncio.to_thread(zygote.spawn_via, n.zygote, argv, str(log), env, lease, rec.timing_path)
        _log.info("instance starting", model=svc.key, instance=instance_id, node=node, pid=rec.pid, tier=tier)
        return rec

    async def wait_ready(self, rec: InstanceRecord, timeout_s: float = 300.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and rec.state == "starting":
            if not procs.alive(rec.pid):
                return False
            try:
                r = await self.http.get(f"{rec.url}/health/ready", timeout=2.0)
                if r.status_code == 200:
                    rec.report = r.json()
                    rec.ready_at = time.time()
                    with contextlib.suppress(OSError, ValueError):
                        rec.lease = json.loads(Path(rec.timing_path).read_text())
                    return True
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.02)
        return False

    async def stop(self, rec: InstanceRecord, grace_s: float = 10.0) -> None:
        rec.state = "stopping"
        await asyncio.to_thread(procs.stop, rec.pid, grace_s, False)
        _log.info("instance stopped", model=rec.service, instance=rec.id, node=rec.node)

    async def close(self) -> None:
        await self.http.aclose()
