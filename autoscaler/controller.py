"""The control loop: desired scale per service, placement of new instances, preemption, scale-down.

Inputs arrive as calls: `apply` (services and policies from YAML), `on_stats` (the
activator's per-service concurrency every second), `on_demand` (a request is waiting at
zero: decide at once). Every TICK_S the decider runs for every service. Decisions come from
the pure functions in `autoscaler.decider` and `sllm_knative.placement`; this module only
keeps their state, calls the backend, and tells the activator which instances are ready.

With no free slot, placement may name a victim on the node where the model starts soonest:
an idle instance of another model is stopped (EVICT), a busy one first has its streaming
generations migrated by the activator (MIGRATE), then the new instance starts in its slot.
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
from autoscaler.backend import OCCUPYING, InstanceRecord, LocalBackend, instance_view, running_generations
from autoscaler.decider import DeciderSpec, DeciderState, Metrics, decide, initial_state, spec_for
from autoscaler.window import MetricWindow
from sllm_knative.config import TICK_S, Manifest, ScalingPolicy, ServiceConfig, policy_for
from sllm_knative.log import get_logger
from sllm_knative.placement import (
    Action,
    Calibration,
    Instance,
    LoadObservation,
    MigrationObservation,
    ModelRequest,
    NodeInventory,
    Option,
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
PREEMPT_WAIT_S = 10.0  # what did not migrate off a preemption victim is waited for this long, then it is called off
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
        nodes = await self.backend.inventories(running, await self._instances_per_node(running))
        model = svc.model.uri
        size = self.backend.model_sizes.get(model, DEFAULT_MODEL_BYTES)
        priority = rt.policy.priority if rt.policy else 0
        decision: Placement = place(ModelRequest(model, size, priority), nodes, self.calibration)
        placement_s = time.perf_counter() - t0
        metrics.PLACEMENT_SECONDS.observe(placement_s)
        chosen = decision.chosen
        if decision.node is None or chosen is None or decision.action == Action.WAIT:
            _log.info("no free slot: waiting for capacity", model=svc.key, reasons="; ".join(decision.reasons))
            return
        record: dict[str, Any] = {"action": str(decision.action), "estimate_s": decision.estimate_s,
                                  "placement_s": placement_s, "reasons": list(decision.reasons)}
        if decision.action in (Action.EVICT, Action.MIGRATE):
            _log.info("preempting", model=svc.key, action=str(decision.action), node=decision.node,
                      victim=chosen.victim, destination=chosen.destination, reason=decision.reasons[0])
            freed = await self._preempt(chosen, nodes)
            if freed is None:
                return
            record.update(freed)
        rec = await self._start(rt, decision.node, str(chosen.estimate.tier), record)
        _log.info("placed", model=svc.key, instance=rec.id, node=decision.node, tier=rec.tier,
                  action=str(decision.action), estimate_s=round(decision.estimate_s, 3), reason=decision.reasons[0])
        self._spawn(self._await_ready(rt, rec))

    async def _start(self, rt: ServiceRuntime, node: str, tier: str, record: dict[str, Any]) -> InstanceRecord:
        """Start an instance of rt's service on `node` and record the placement that put it there."""
        svc = rt.config
        if svc.model is not None:
            await self.backend.warm(node, svc.model.uri)  # start moving the checkpoint in now
        inst_id = f"{svc.name}-{next(self._ids)}"
        rec = await self.backend.start(svc, node, inst_id, tier)
        rt.instances[inst_id] = rec
        metrics.COLD_STARTS.labels(svc.key, tier).inc()
        rt.placements.append({"instance": inst_id, "node": node, "tier": tier, **record})
        return rec

    async def _instances_per_node(self, running: dict[str, int]) -> dict[str, tuple[Instance, ...]]:
        """Every instance holding a slot, as the planner sees it. Ready instances on full nodes
        (the only ones placement may displace) are asked for their generations, so their
        in-flight count and tokens are current rather than a second old."""
        full = {name for name, n in self.backend.nodes.items() if running.get(name, 0) >= n.slots}
        held = [(rt, rec) for rt in self.services.values() for rec in rt.instances.values()
                if rec.state in OCCUPYING]
        asked = [rec for _, rec in held if rec.node in full and rec.state == "ready"]
        answers = await asyncio.gather(*(self.backend.generations(rec) for rec in asked))
        generations = {rec.id: g for rec, g in zip(asked, answers, strict=True)}
        out: dict[str, list[Instance]] = {}
        for rt, rec in held:
            model = rt.config.model.uri if rt.config.model else ""
            out.setdefault(rec.node, []).append(instance_view(
                rec, model=model, size_bytes=self.backend.model_sizes.get(model, DEFAULT_MODEL_BYTES),
                capacity=rt.config.container_concurrency, priority=rt.policy.priority if rt.policy else 0,
                migration=rt.policy.migration if rt.policy else True, outstanding=rt.outstanding.get(rec.id, 0),
                generations=generations.get(rec.id)))
        return {node: tuple(instances) for node, instances in out.items()}

    def _find(self, instance_id: str) -> tuple[ServiceRuntime, InstanceRecord] | None:
        for rt in self.services.values():
            rec = rt.instances.get(instance_id)
            if rec is not None:
                return rt, rec
        return None

    async def _preempt(self, option: Option, nodes: list[NodeInventory]) -> dict[str, Any] | None:
        """Free the victim's slot for the chosen EVICT or MIGRATE option; None when it could not be.

        The victim leaves the activator's rotation first (no new request lands on it). MIGRATE
        moves its generations (streaming or not) to the destination the planner named, starting
        an instance there first when the planner chose a free slot on another node. Whatever is
        still running on the victim afterwards (a generation that stayed on the source, a
        request that landed just before it left rotation) is waited for up
        to PREEMPT_WAIT_S; if it has not ended, the preemption is called off and the victim
        goes back into rotation. Otherwise the victim is stopped."""
        found = self._find(option.victim or "")
        if found is None or found[1].state != "ready":
            _log.warning("preemption victim is gone or not ready", instance=option.victim)
            return None
        vrt, victim = found
        migrate = option.action == Action.MIGRATE
        destination = option.destination if migrate else None
        if migrate and option.starts_destination and option.destination:
            model = vrt.config.model.uri if vrt.config.model else ""
            tier = next((str(n.tier_of(model)) for n in nodes if n.name == option.destination), "")
            dest = await self._start(vrt, option.destination, tier, {
                "action": "migration-destination", "reasons": [f"receives the generations of {victim.id}, "
                                                               f"preempted on {victim.node}"]})
            _log.info("starting a migration destination", model=vrt.config.key, instance=dest.id, node=dest.node,
                      victim=victim.id)
            if not await self._await_ready(vrt, dest):
                return None
            destination = dest.id
        victim.state = "draining"
        await self._push_endpoints(vrt)
        results: list[dict[str, Any]] | None = []
        # An EVICT victim was idle when placement looked; a request may have landed since.
        if migrate or running_generations(await self.backend.generations(victim)):
            results = await self.migrate_off(vrt, victim, destination)
        stayed = [g for g in results or [] if g.get("outcome") == "stayed_on_source"]
        if (migrate and results is None) or stayed or not await self._wait_idle(victim, PREEMPT_WAIT_S):
            _log.warning("preemption called off: the victim still runs generations", model=vrt.config.key,
                         instance=victim.id, stayed=len(stayed), migrated=results is not None)
            victim.state = "ready"
            await self._push_endpoints(vrt)
            return None
        await self.backend.stop(victim)
        vrt.instances.pop(victim.id, None)
        outcomes = [str(g.get("outcome")) for g in results or []]
        _log.info("preempted", model=vrt.config.key, instance=victim.id, node=victim.node,
                  generations=len(outcomes), outcomes=",".join(outcomes))
        return {"victim": victim.id, "victim_service": vrt.config.key, "destination": destination,
                "migrations": outcomes}

    async def _wait_idle(self, rec: InstanceRecord, timeout_s: float) -> bool:
        """Until the instance runs no generation (True), or `timeout_s` passes (False). An
        instance that does not answer runs nothing this controller could wait for."""
        deadline = time.monotonic() + timeout_s
        while True:
            if not running_generations(await self.backend.generations(rec)):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.1)

    async def _await_ready(self, rt: ServiceRuntime, rec: InstanceRecord) -> bool:
        ok = await self.backend.wait_ready(rec)
        if rec.state != "starting":
            return False
        if not ok:
            _log.error("instance failed to become ready", model=rt.config.key, instance=rec.id, node=rec.node)
            rec.state = "failed"
            await self.backend.stop(rec)
            rt.instances.pop(rec.id, None)
            return False
        rec.state = "ready"
        self._calibrate(rec)
        if rec.ready_at:
            metrics.READY_SECONDS.labels(rec.tier).observe(rec.ready_at - rec.started_at)
        _log.info("instance ready", model=rt.config.key, instance=rec.id, node=rec.node,
                  seconds=round((rec.ready_at or 0) - rec.started_at, 3))
        await self._push_endpoints(rt)
        return True

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
        """Migrate the victim's generations to another ready instance, then stop it.

        What cannot move (no other ready instance, a generation that stayed on it) is waited for,
        up to DRAIN_WAIT_S, by asking the instance what it still runs: once it is out of
        rotation the activator no longer reports its outstanding requests."""
        await self.migrate_off(rt, rec)
        await self._wait_idle(rec, DRAIN_WAIT_S)
        await self.backend.stop(rec)
        rt.instances.pop(rec.id, None)

    async def migrate_off(self, rt: ServiceRuntime, rec: InstanceRecord,
                          destination: str | None = None) -> list[dict[str, Any]] | None:
        """Ask the activator to move rec's generations (to `destination`, else the least loaded
        ready instance); fold each move into the cost model. None when nothing could move (no
        activator, no other ready instance, or the activator refused)."""
        if not self.activator_admin or not rt.ready():
            return None
        body = {"namespace": rt.config.namespace, "name": rt.config.name, "source": rec.id,
                "destination": destination}
        try:
            r = await self.http.post(f"{self.activator_admin}/internal/migrate", json=body, timeout=MIGRATE_TIMEOUT_S)
        except httpx.HTTPError as exc:
            _log.warning("migration request failed; draining instead", model=rt.config.key, instance=rec.id,
                         error=str(exc))
            return None
        if r.status_code != 200:
            _log.info("no migration; draining instead", model=rt.config.key, instance=rec.id, status=r.status_code,
                      reason=r.text[:200])
            return None
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
                if i.state in OCCUPYING:
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
