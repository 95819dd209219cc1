"""The local backend: nodes are loader sidecars plus a zygote each; instances are processes.

Each node (`LocalNode`) has a loader sidecar (gRPC on a Unix socket: the node's checkpoint
tiers and measured bandwidths) and a zygote (`python -m functions.zygote`, a pre-imported
instance runtime that forks instances; its wire protocol is sllm_knative/local/zygote.py). An
instance is a process the zygote forked, given `--checkpoint URI --loader ADDRESS`: it leases
its checkpoint from the node's loader itself and writes the lease timing next to its log. A
watcher per instance polls its readiness (`/health/ready`), then its liveness, and reports
READY, FAILED and EXITED events.

With a record folder (`records`: `<state>/instances` in a cluster `sllm-knative up` runs), each
instance's record is kept there as a file while it lives, so that a restarted autoscaler finds
the instances still running (`adopt_running`) instead of starting them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from autoscaler.backends.base import (
    FALLBACK_BANDWIDTH,
    EventHandler,
    EventKind,
    InstanceEvent,
    InstanceRecord,
    InstanceState,
    emit_to,
)
from autoscaler.backends.instance_api import fetch_generations
from sllm_knative import atomic
from sllm_knative.api import auth
from sllm_knative.config import ServiceConfig
from sllm_knative.loader.hops import tier_rates
from sllm_knative.local import procs, zygote
from sllm_knative.log import get_logger
from sllm_knative.placement import Instance, NodeInventory, Tier, pool_store_rates
from sllm_knative.ports import free_port

_log = get_logger("autoscaler.backend")

READY_TIMEOUT_S = 300.0
LIVENESS_PERIOD_S = 1.0
LOGS_KEPT = 100  # the logs of the latest instances kept (a kubelet keeps a dead container's too)


def logs_to_prune(logs: Mapping[str, float], live: set[str], keep: int = LOGS_KEPT) -> list[str]:
    """The instance ids whose logs go (`logs`: instance id -> last write time): all but the
    `keep` latest, never a live instance's. Scale-to-zero starts instances all day, and each
    leaves a log and a timing file."""
    done = sorted((t, i) for i, t in logs.items() if i not in live)
    room = max(0, keep - sum(1 for i in logs if i in live))
    return [i for _, i in done[:max(0, len(done) - room)]]


@dataclasses.dataclass(frozen=True)
class LocalNode:
    """A node of the local cluster (placement's view of a node is `NodeInventory`)."""

    name: str
    loader: str  # gRPC target of its loader sidecar
    zygote: str  # Unix socket of its pre-imported runtime
    slots: int
    logs: Path


def inventory_to_node(node: LocalNode, inv: Any, running: int, size_hint: dict[str, int],
                      instances: tuple[Instance, ...] = ()) -> NodeInventory:
    """A loader's Inventory message, plus the instances the controller runs there, as the
    planner's NodeInventory (pure)."""
    # Measured hops as tier rates (sllm_knative.loader.hops); an unmeasured tier falls back.
    rates = tier_rates((b.hop, b.bytes_per_second) for b in inv.bandwidths)
    bw = {**FALLBACK_BANDWIDTH, **rates.tiers}
    stores = dict(rates.stores)
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


def last_error(lines: list[str]) -> str:
    """The message of the last ERROR line of a component's structured log ('' if none): its
    `error=` field when it has one, else its `msg=`."""
    for line in reversed(lines):
        if " ERROR " not in line:
            continue
        for field in ("error=", "msg="):
            at = line.find(field)
            if at < 0:
                continue
            value = line[at + len(field):]
            if value.startswith('"'):
                end = value.find('" ', 1)
                return value[1:end if end > 0 else len(value)].rstrip('"')
            return value.split(" ", 1)[0]
        return line.strip()
    return ""


class LocalBackend:
    one_machine = True  # every node is this machine: its memory, its disk, its cores

    def __init__(self, nodes: list[LocalNode], device: str = "cpu", internal_token: str | None = None,
                 drain_url: str | None = None, records: Path | None = None) -> None:
        self.nodes = {n.name: n for n in nodes}
        self.records = records
        self.device = device
        self.http = httpx.AsyncClient(timeout=5.0)
        # The instances' internal API requires this token when set (`sllm-knative up` gives every
        # process of a cluster the same SLLM_INTERNAL_TOKEN).
        token = internal_token if internal_token is not None else auth.token_from_env()
        self._internal_headers = auth.auth_headers(token)
        self.model_sizes: dict[str, int] = {}
        self.drain_url = drain_url  # the activator's admin URL: instances drain there on SIGTERM
        self._instances: dict[str, InstanceRecord] = {}
        self._handlers: list[EventHandler] = []
        self._watchers: set[asyncio.Task[None]] = set()

    # -- nodes -----------------------------------------------------------------------------

    def node_slots(self) -> Mapping[str, int]:
        return {name: n.slots for name, n in self.nodes.items()}

    async def inventory(self, node: str) -> Any:
        """The node's loader Inventory message (gRPC)."""
        from sllm_knative.loader.client import LoaderClient

        def get() -> Any:
            with LoaderClient(self.nodes[node].loader) as c:
                return c.inventory()

        return await asyncio.to_thread(get)

    async def inventories(self) -> list[NodeInventory]:
        out = []
        for name, node in self.nodes.items():
            try:
                inv = await self.inventory(name)
            except Exception as exc:  # a node whose loader does not answer is not a candidate
                _log.warning("node inventory unavailable", node=name, error=str(exc))
                continue
            out.append(inventory_to_node(node, inv, 0, self.model_sizes))
        return pool_store_rates(out)

    def nodes_for(self, service: ServiceConfig) -> set[str] | None:
        return None  # local nodes carry no labels: a nodeSelector has nothing to select on

    async def describe_node(self, node: str) -> dict[str, Any]:
        inv = await self.inventory(node)
        return {"tiers": [{"name": t.name, "capacity": t.capacity, "used": t.used,
                           "checkpoints": [{"model": e.model, "size": e.size, "state": e.state} for e in t.entries]}
                          for t in inv.tiers],
                "bandwidths": {b.hop: b.bytes_per_second for b in inv.bandwidths}}

    def model_size(self, model: str) -> int | None:
        return self.model_sizes.get(model)

    async def warm(self, node: str, model: str) -> None:
        """Tell the node's loader to start moving the checkpoint into DRAM now (no wait)."""
        from sllm_knative.loader.client import LoaderClient

        def prefetch() -> None:
            with LoaderClient(self.nodes[node].loader) as c:
                c.prefetch(model, tier="dram", wait=False)

        try:
            await asyncio.to_thread(prefetch)
        except Exception as exc:  # the instance's own acquire will retry and report
            _log.warning("warming failed", node=node, checkpoint=model, error=str(exc))

    # -- instances -------------------------------------------------------------------------

    async def start(self, service: ServiceConfig, node: str, instance_id: str, tier: str) -> InstanceRecord:
        n = self.nodes[node]
        rec = InstanceRecord(instance_id, service.key, node, free_port(), free_port(), tier=tier,
                             started_at=time.time())
        argv = ["--served-model-name", service.name, "--device", self.device,
                "--host", "127.0.0.1", "--port", str(rec.port),
                "--internal-host", "127.0.0.1", "--internal-port", str(rec.internal_port)]
        if service.container_concurrency:
            argv += ["--max-concurrency", str(service.container_concurrency)]
        argv += list(service.container.args)  # the user container's args, as Knative passes them
        log = n.logs / f"{instance_id}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {e.name: e.value for e in service.container.env if e.value is not None}
        env.update(SLLM_SERVICE=service.key, SLLM_INSTANCE=instance_id, SLLM_NODE=node)
        # Its share of the node's cores (local nodes share this machine's), unless the service sets it.
        env.setdefault("SLLM_THREADS", str(service.compute_threads(os.cpu_count() or 1, n.slots)))
        if self.drain_url:
            env["SLLM_DRAIN_URL"] = self.drain_url
        # The instance leases its checkpoint from the node's loader itself (as a pod would).
        rec.timing_path = str(log.with_suffix(".timing.json"))
        if service.model:  # without one the instance exits at once: it has nothing to serve
            argv += ["--checkpoint", service.model.uri, "--loader", n.loader, "--lease-timing", rec.timing_path]
        rec.pid = await asyncio.to_thread(zygote.spawn_via, n.zygote, argv, str(log), env)
        _log.info("instance starting", service=service.key, checkpoint=service.model.uri if service.model else None,
                  instance=instance_id, node=node, pid=rec.pid, tier=tier)
        self._instances[rec.id] = rec
        self._keep(rec)
        self._follow(rec)  # its events come after this returns
        # Old instances' logs go in the background, off the cold start's path.
        pruning = asyncio.ensure_future(asyncio.to_thread(self._prune_logs, n.logs))
        self._watchers.add(pruning)
        pruning.add_done_callback(self._watchers.discard)
        return rec

    def _follow(self, rec: InstanceRecord) -> None:
        task = asyncio.ensure_future(self._watch(rec))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    # -- records of the running instances (for a restarted autoscaler) -----------------------

    def _keep(self, rec: InstanceRecord) -> None:
        if self.records is not None:
            atomic.write_json(self.records / f"{rec.id}.json", rec.to_json(), durable=False)

    def _forget(self, rec: InstanceRecord) -> None:
        if self.records is not None:
            (self.records / f"{rec.id}.json").unlink(missing_ok=True)

    async def adopt_running(self) -> list[str]:
        """Take over the instances an earlier autoscaler of this cluster started that still run:
        each is followed as a starting one (ADOPTED now, READY once it answers its readiness
        probe). A record whose process is gone, or whose port answers for another model, is
        dropped; a process that is ours but does not answer is stopped. The adopted ids."""
        if self.records is None or not self.records.is_dir():
            return []
        adopted = []
        for path in sorted(self.records.glob("*.json")):
            try:
                doc = json.loads(path.read_text())
                rec = InstanceRecord(**{**doc, "state": InstanceState.STARTING})
            except (OSError, ValueError, TypeError) as exc:
                _log.warning("unreadable instance record dropped", path=str(path), error=str(exc))
                path.unlink(missing_ok=True)
                continue
            served = await self._serves(rec)
            if served is None or rec.node not in self.nodes:
                path.unlink(missing_ok=True)
                if served is False and rec.node in self.nodes:  # ours, and broken: do not leave it behind
                    await asyncio.to_thread(procs.stop, rec.pid, 5.0, False)
                _log.info("instance record dropped", service=rec.service, instance=rec.id, node=rec.node,
                          alive=procs.alive(rec.pid))
                continue
            self._instances[rec.id] = rec
            adopted.append(rec.id)
            _log.info("instance adopted", service=rec.service, instance=rec.id, node=rec.node, pid=rec.pid)
            await self._emit(InstanceEvent(EventKind.ADOPTED, rec.id, rec.node, service=rec.service))
            self._follow(rec)
        return adopted

    async def _serves(self, rec: InstanceRecord) -> bool | None:
        """True: the record's process runs and its port answers for the record's service; False:
        it runs but its port does not answer; None: it is gone, or the port serves something else
        (the pid or the port was reused)."""
        if not procs.alive(rec.pid):
            return None
        try:
            r = await self.http.get(f"{rec.url}/health/live", timeout=2.0)
        except httpx.HTTPError:
            return False
        name = rec.service.rsplit("/", 1)[-1]
        try:
            models = (await self.http.get(f"{rec.url}/v1/models", timeout=2.0)).json()["data"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None
        return True if r.status_code == 200 and [m.get("id") for m in models] == [name] else None

    async def wait_ready(self, rec: InstanceRecord, timeout_s: float = READY_TIMEOUT_S) -> bool:
        """Until the instance answers its readiness probe (True; its report and lease timing are
        on the record), or exits, is stopped, or `timeout_s` passes (False)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and rec.state == InstanceState.STARTING:
            if not procs.alive(rec.pid):
                return False
            try:
                r = await self.http.get(f"{rec.url}/health/ready", timeout=2.0)
                if r.status_code == 200:
                    rec.report = r.json()
                    rec.ready_at = rec.ready_at or time.time()  # an adopted instance keeps its own
                    with contextlib.suppress(OSError, ValueError):
                        rec.lease = json.loads(Path(rec.timing_path).read_text())
                    return True
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.02)
        return False

    async def _watch(self, rec: InstanceRecord) -> None:
        """READY or FAILED once the instance starts; EXITED if it goes away on its own afterwards."""
        ok = await self.wait_ready(rec)
        if rec.state != InstanceState.STARTING:  # stopped while it started: nothing to report
            return
        if ok:
            self._keep(rec)  # with its ready time and lease timing, for an adoption
            await self._emit(InstanceEvent(EventKind.READY, rec.id, rec.node))
        else:
            await self._emit(InstanceEvent(EventKind.FAILED, rec.id, rec.node, self._why(rec)))
            return
        while rec.state in (InstanceState.READY, InstanceState.DRAINING):
            await asyncio.sleep(LIVENESS_PERIOD_S)
            if rec.state in (InstanceState.READY, InstanceState.DRAINING) and not procs.alive(rec.pid):
                self._instances.pop(rec.id, None)
                self._forget(rec)
                await self._emit(InstanceEvent(EventKind.EXITED, rec.id, rec.node, "the process is gone"))
                return

    def _prune_logs(self, logs: Path) -> None:
        found: dict[str, float] = {}
        for p in logs.glob("*.log"):
            with contextlib.suppress(OSError):
                found[p.stem] = p.stat().st_mtime
        for instance in logs_to_prune(found, set(self._instances)):
            for p in (logs / f"{instance}.log", logs / f"{instance}.timing.json"):
                p.unlink(missing_ok=True)

    def _why(self, rec: InstanceRecord) -> str:
        """Why an instance did not become ready: its log's last error line, else what is known."""
        log = self.nodes[rec.node].logs / f"{rec.id}.log" if rec.node in self.nodes else None
        try:
            lines = log.read_text(errors="replace").splitlines()[-200:] if log else []
        except OSError:
            lines = []
        return last_error(lines) or ("the process exited while starting" if not procs.alive(rec.pid)
                                     else f"not ready within {READY_TIMEOUT_S:.0f}s")

    async def _emit(self, event: InstanceEvent) -> None:
        await emit_to(self._handlers, event)

    def subscribe(self, handler: EventHandler) -> None:
        self._handlers.append(handler)

    def instances(self) -> list[InstanceRecord]:
        return list(self._instances.values())

    async def generations(self, rec: InstanceRecord, timeout_s: float = 1.0) -> list[dict[str, Any]] | None:
        return await fetch_generations(self.http, rec, self._internal_headers, timeout_s)

    async def stop(self, rec: InstanceRecord, grace_s: float = 10.0) -> None:
        rec.state = InstanceState.STOPPING
        await asyncio.to_thread(procs.stop, rec.pid, grace_s, False)
        rec.state = InstanceState.STOPPED
        self._instances.pop(rec.id, None)
        self._forget(rec)
        _log.info("instance stopped", service=rec.service, instance=rec.id, node=rec.node)

    async def close(self) -> None:
        for task in list(self._watchers):
            task.cancel()
        await self.http.aclose()
