"""The control loop: desired scale per service, placement of new instances, scale-down.

Inputs arrive as calls: `apply` (services and policies from YAML), `on_stats` (the
activator's per-service concurrency every second), `on_demand` (a request is waiting at
zero: decide at once). Every TICK_S the decider runs for every service. Decisions come from
the pure functions in `autoscaler.decider` and `sllm_knative.placement`; this module only
keeps their state, calls the backend, and tells the activator which instances are ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import time
from typing import Any

import httpx

from autoscaler import metrics
from autoscaler.backend import InstanceRecord, LocalBackend
from autoscaler.decider import DeciderSpec, DeciderState, Metrics, decide, initial_state, spec_for
from autoscaler.window import MetricWindow
from sllm_knative.config import TICK_S, Manifest, ScalingPolicy, ServiceConfig, policy_for
from sllm_knative.log import get_logger
from sllm_knative.placement import (
    Calibration,
    Instance,
    LoadObservation,
    MigrationObservation,
    ModelRequest,
    Placement,
    Tier,
    choose_victims,
    observe_load,
    observe_migration,
    observe_start,
    place,
)

_log = get_logger("autoscaler")
DRAIN_WAIT_S = 600.0  # what cannot migrate is waited for this long before the instance is stopped
MIGRATE_TIMEOUT_S = 300.0
DEFAULT_MODEL_BYTES = 1 << 30  # until a node has seen the checkpoint
MIN_CALIBRATION_BYTES = 64 << 20


@dataclasses.dataclass
class ServiceRuntime:
    config: ServiceConfig
    policy: ScalingPolicy | None
    spec: DeciderSpec
    state: DeciderState
    window: MetricWindow
    last_request_at: float | None = None
    in_flight: int = 0
    instances: dict[str, InstanceRecord] = dataclasses.field(default_factory=dict)
    outstanding: dict[str, int] = dataclasses.field(default_factory=dict)
    last_decision: str = ""
    placements: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    migrations: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # the latest migration results

    def ready(self) -> list[InstanceRecord]:
        return [i for i in self.instances.values() if i.state == "ready"]

    def live(self) -> list[InstanceRecord]:
        return [i for i in self.instances.values() if i.state in ("starting", "ready")]


class Autoscaler:
    def __init__(self, backend: LocalBackend, activator_admin: str | None) -> None:
        self.backend = backend
        self.activator_admin = activator_admin
        backend.drain_url = activator_admin
        self.services: dict[str, ServiceRuntime] = {}
        self.policies: list[ScalingPolicy] = []
        self.calibration = Calibration()
        self.http = httpx.AsyncClient(timeout=5.0)
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()  # one scaling action at a time per process
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- configuration ---------------------------------------------------------------------

    async def apply(self, manifest: Manifest) -> list[str]:
        changes = []
        new = {(q.namespace, q.name) for q in manifest.policies}
        self.policies = [p for p in self.policies if (p.namespace, p.name) not in new] + list(manifest.policies)
        for p in manifest.policies:
            changes.append(f"scalingpolicy/{p.namespace}/{p.name} configured")
        now = time.monotonic()
        for svc in manifest.services:
            policy = policy_for(svc, self.policies)
            spec = spec_for(svc, manifest.autoscaler, policy)
            rt = self.services.get(svc.key)
            if rt is None:
                rt = ServiceRuntime(svc, policy, spec, initial_state(spec, now), MetricWindow(spec.stable_window))
                self.services[svc.key] = rt
                changes.append(f"service/{svc.key} created")
            else:
                rt.config, rt.policy, rt.spec = svc, policy, spec
                changes.append(f"service/{svc.key} configured")
            await self._push_endpoints(rt)
        for rt in list(self.services.values()):  # policies may now match other services
            policy = policy_for(rt.config, self.policies)
            if policy != rt.policy:
                rt.policy, rt.spec = policy, spec_for(rt.config, manifest.autoscaler, policy)
        for key in [s.key for s in manifest.services]:
            self._spawn(self.evaluate(key))
        return changes

    async def delete(self, key: str) -> bool:
        rt = self.services.pop(key, None)
        if rt is None:
            return False
        for inst in rt.live():
            await self.backend.stop(inst)
        if self.activator_admin:
            ns, name = key.split("/", 1)
            with contextlib.suppress(httpx.HTTPError):
                await self.http.delete(f"{self.activator_admin}/internal/services/{ns}/{name}")
        return True

    # -- inputs from the activator ---------------------------------------------------------

    def on_stats(self, doc: dict[str, Any], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for s in doc.get("services", []):
            rt = self.services.get(f"{s['namespace']}/{s['name']}")
            if rt is None:
                continue
            rt.window = rt.window.record(now, float(s["average_concurrency"]))
            rt.in_flight = int(s["in_flight"])
            if s["in_flight"] or s["requests"]:
                rt.last_request_at = now
            rt.outstanding = {i["id"]: int(i["outstanding"]) for i in s.get("instances", [])}

    async def on_demand(self, key: str, in_flight: int) -> None:
        """A request waits for a service at zero: record it and decide now, not at the next tick."""
        rt = self.services.get(key)
        if rt is None:
            return
        now = time.monotonic()
        rt.window = rt.window.record(now, float(max(1, in_flight)))
        rt.last_request_at = now
        await self.evaluate(key)

    # -- decisions -------------------------------------------------------------------------

    async def evaluate(self, key: str) -> None:
        rt = self.services.get(key)
        if rt is None:
            return
        now = time.monotonic()
        metrics = Metrics(rt.window, len(rt.ready()), rt.last_request_at)
        decision, rt.state = decide(rt.spec, metrics, rt.state, now)
        rt.last_decision = decision.reason
        if not decision.valid or decision.desired is None:
            return
        await self.scale_to(rt, decision.desired)

    async def scale_to(self, rt: ServiceRuntime, desired: int) -> None:
        async with self._lock:
            live = rt.live()
            if desired > len(live):
                for _ in range(desired - len(live)):
                    await self._scale_up(rt)
            elif desired < len(live):
                await self._scale_down(rt, len(live) - desired)

    async def _scale_up(self, rt: ServiceRuntime) -> None:
        svc = rt.config
        if svc.model is None:
            _log.error("service has no checkpoint annotation", model=svc.key)
            return
        t0 = time.perf_counter()
        running = self.running_per_node()
        nodes = await self.backend.inventories(running)
        model = svc.model.uri
        size = self.backend.model_sizes.get(model, DEFAULT_MODEL_BYTES)
        priority = rt.policy.priority if rt.policy else 0
        decision: Placement = place(ModelRequest(model, size, priority), nodes, self.calibration)
        placement_s = time.perf_counter() - t0
        metrics.PLACEMENT_SECONDS.observe(placement_s)
        if decision.node is None or decision.action.value != "place":
            _log.info("no free slot: waiting for capacity", model=svc.key, reasons="; ".join(decision.reasons))
            return
        tier = str(decision.chosen.estimate.tier) if decision.chosen else ""
        await self.backend.warm(decision.node, model)  # start moving the checkpoint in now
        inst_id = f"{svc.name}-{next(self._ids)}"
        rec = await self.backend.start(svc, decision.node, inst_id, tier)
        rt.instances[inst_id] = rec
        metrics.COLD_STARTS.labels(svc.key, tier).inc()
        rt.placements.append({"instance": inst_id, "node": decision.node, "tier": tier,
                              "estimate_s": decision.estimate_s, "placement_s": placement_s,
                              "reasons": list(decision.reasons)})
        _log.info("placed", model=svc.key, instance=inst_id, node=decision.node, tier=tier,
                  estimate_s=round(decision.estimate_s, 3), reason=decision.reasons[0])
        self._spawn(self._await_ready(rt, rec))

    async def _await_ready(self, rt: ServiceRuntime, rec: InstanceRecord) -> None:
        ok = await self.backend.wait_ready(rec)
        if rec.state != "starting":
            return
        if not ok:
            _log.error("instance failed to become ready", model=rt.config.key, instance=rec.id, node=rec.node)
            rec.state = "failed"
            await self.backend.stop(rec)
            rt.instances.pop(rec.id, None)
            return
        rec.state = "ready"
        self._calibrate(rec)
        if rec.ready_at:
            metrics.READY_SECONDS.labels(rec.tier).observe(rec.ready_at - rec.started_at)
        _log.info("instance ready", model=rt.config.key, instance=rec.id, node=rec.node,
                  seconds=round((rec.ready_at or 0) - rec.started_at, 3))
        await self._push_endpoints(rt)

    def _calibrate(self, rec: InstanceRecord) -> None:
        """Fold the observed load (lease timing) and the start overhead (the rest) into the model."""
        if not rec.ready_at:
            return
        lease = rec.lease
        load_s = 0.0
        if lease.get("lease_complete") and lease.get("lease_requested"):
            load_s = max(0.0, lease["lease_complete"] - lease["lease_requested"])
            tier = {"dram": Tier.DRAM, "ssd": Tier.SSD, "remote": Tier.REMOTE}.get(lease.get("source", ""))
            # A small transfer measures latency, not bandwidth: only large ones calibrate it.
            if tier is not None and load_s > 0 and lease.get("bytes", 0) >= MIN_CALIBRATION_BYTES:
                self.calibration = observe_load(self.calibration, LoadObservation(rec.node, tier, lease["bytes"],
                                                                                  load_s))
        overhead = max(0.0, rec.ready_at - rec.started_at - load_s)
        self.calibration = observe_start(self.calibration, rec.node, overhead)

    async def _scale_down(self, rt: ServiceRuntime, count: int) -> None:
        live = rt.live()
        candidates = [Instance(name=i.id, model=rt.config.model.uri if rt.config.model else "", size_bytes=1,
                               inflight=rt.outstanding.get(i.id, 0)) for i in live]
        victims = {v.name for v in choose_victims(candidates, count)}
        for rec in live:
            if rec.id not in victims:
                continue
            rec.state = "draining"
            await self._push_endpoints(rt)  # no new requests go to it
            self._spawn(self._drain_and_stop(rt, rec))

    async def _drain_and_stop(self, rt: ServiceRuntime, rec: InstanceRecord) -> None:
        """Migrate the victim's streaming generations to another ready instance, then stop it.

        What cannot move (non-streaming requests, or no other ready instance) is waited for,
        as before, up to DRAIN_WAIT_S."""
        await self.migrate_off(rt, rec)
        deadline = time.monotonic() + DRAIN_WAIT_S
        while rt.outstanding.get(rec.id, 0) > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await self.backend.stop(rec)
        rt.instances.pop(rec.id, None)

    async def migrate_off(self, rt: ServiceRuntime, rec: InstanceRecord) -> list[dict[str, Any]]:
        """Ask the activator to move rec's generations; fold each move into the cost model."""
        if not self.activator_admin or not rt.ready():
            return []
        body = {"namespace": rt.config.namespace, "name": rt.config.name, "source": rec.id}
        try:
            r = await self.http.post(f"{self.activator_admin}/internal/migrate", json=body, timeout=MIGRATE_TIMEOUT_S)
        except httpx.HTTPError as exc:
            _log.warning("migration request failed; draining instead", model=rt.config.key, instance=rec.id,
                         error=str(exc))
            return []
        if r.status_code != 200:
            _log.info("no migration; draining instead", model=rt.config.key, instance=rec.id, status=r.status_code,
                      reason=r.text[:200])
            return []
        results: list[dict[str, Any]] = r.json().get("generations", [])
        for g in results:
            if g.get("outcome") == "migrated":
                self.calibration = observe_migration(self.calibration,
                                                     MigrationObservation(int(g["tokens"]), float(g["seconds"])))
        rt.migrations.extend(results)
        del rt.migrations[:-20]
        _log.info("migrated off", model=rt.config.key, instance=rec.id, generations=len(results),
                  outcomes=",".join(str(g.get("outcome")) for g in results))
        return results

    def running_per_node(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for rt in self.services.values():
            for i in rt.instances.values():
                if i.state in ("starting", "ready", "draining"):
                    out[i.node] = out.get(i.node, 0) + 1
        return out

    async def _push_endpoints(self, rt: ServiceRuntime) -> None:
        if not self.activator_admin:
            return
        ns, name = rt.config.namespace, rt.config.name
        body = {"container_concurrency": rt.config.container_concurrency,
                "instances": [{"id": i.id, "url": i.url, "node": i.node, "internal_url": i.internal_url}
                              for i in rt.ready()]}
        try:
            r = await self.http.put(f"{self.activator_admin}/internal/services/{ns}/{name}", json=body)
            r.raise_for_status()
        except httpx.HTTPError as exc:
            _log.error("could not update the activator", model=rt.config.key, error=str(exc))

    # -- the loop --------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            for key in list(self.services):
                try:
                    await self.evaluate(key)
                except Exception:
                    _log.error("evaluation failed", exc_info=True, model=key)

    def snapshot(self) -> dict[str, Any]:
        return {
            "services": [{
                "key": key, "model": rt.config.model.uri if rt.config.model else None,
                "desired": rt.state.scale, "ready": len(rt.ready()), "in_flight": rt.in_flight,
                "decision": rt.last_decision,
                "policy": f"{rt.policy.namespace}/{rt.policy.name}" if rt.policy else None,
                "instances": [dataclasses.asdict(i) for i in rt.instances.values()],
                "placements": rt.placements[-10:],
                "migrations": rt.migrations[-10:],
            } for key, rt in self.services.items()],
        }

    async def close(self) -> None:
        for rt in self.services.values():
            for inst in rt.live():
                await self.backend.stop(inst, grace_s=3.0)
        await self.http.aclose()
        await self.backend.close()
