"""Scaling one service: placement of new instances, preemption, scale-down.

`Scaler.scale_to(service, desired)` runs under the service's own lock, so services scale at
once and one service's preemption (a migration can take minutes) holds up no other service.
Slots are shared through `SlotLedger`: reading what holds slots, placing and reserving the
chosen slot happen in one short section with no I/O inside (`_decide`).

With no free slot, placement may name a victim where the model starts soonest: an idle instance of
another model is stopped (EVICT), a busy one first has its generations migrated by the activator
(MIGRATE), then the new instance starts in its slot. `_preempt` runs `autoscaler.preemption`'s plan.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import random
import re
import time
from collections.abc import Callable, Coroutine
from typing import Any

from autoscaler import metrics
from autoscaler.activator_client import Activator, MigrationResult
from autoscaler.backends.base import Backend, EventKind, InstanceEvent, InstanceRecord, InstanceState
from autoscaler.calibration import fold_migrations, fold_ready
from autoscaler.preemption import (
    DRAIN_WAIT_S,
    PREEMPT_WAIT_S,
    CallOff,
    DrainView,
    LeaveRotation,
    Migrate,
    MigrationAttempt,
    PreemptionView,
    Progress,
    StartDestination,
    Step,
    Stop,
    VictimView,
    WaitIdle,
    plan_drain,
    plan_preemption,
)
from autoscaler.services import ServiceRuntime, ServiceTable, start_backoff_s
from autoscaler.slots import Claim, Reservation, SlotLedger
from autoscaler.view import (
    LoadInFlight,
    instance_view,
    is_protected,
    occupy_all,
    parse_tier,
    running_generations,
)
from sllm_knative.config.autoscaler import TICK_S
from sllm_knative.log import Repeats, get_logger
from sllm_knative.placement import (
    Action,
    Calibration,
    Instance,
    ModelRequest,
    NodeInventory,
    Tier,
    choose_victims,
    observe_stop,
    place_by,
    pool_tier_rates,
)

_log = get_logger("autoscaler")
DEFAULT_MODEL_BYTES = 1 << 30  # until a node has seen the checkpoint
READY_WAIT_S = 330.0  # a backend reports FAILED after 300 s; this only guards against a lost event
EARLY_EVENTS_KEPT = 256  # instances whose events came before their start() returned


class Scaler:
    def __init__(self, backend: Backend, activator: Activator | None, table: ServiceTable,
                 spawn: Callable[[Coroutine[Any, Any, Any]], object],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.backend = backend
        self.clock = clock  # for the start backoff
        self.activator = activator
        self.table = table
        self.slots = SlotLedger()
        self.calibration = Calibration(pooled=backend.one_machine)
        # "load-time" (place) or "random" (place_random: the no-locality ablation, `up --placement`)
        self.placer = "load-time"
        self._rng = random.Random(0)
        self._spawn = spawn
        self._ids = itertools.count(1)
        self._ready: dict[str, asyncio.Future[bool]] = {}
        # Events that came before the instance was recorded (start() had not returned yet), replayed then.
        self._early: collections.OrderedDict[str, list[InstanceEvent]] = collections.OrderedDict()
        self.preempt_wait_s = PREEMPT_WAIT_S
        self.drain_wait_s = DRAIN_WAIT_S
        self._ready_since: dict[str, float] = {}  # when each instance became ready (self.clock): its residency
        self._repeats = Repeats(clock=clock)  # lines logged every tick while a condition lasts

    def model_size(self, model: str) -> int:
        return self.backend.model_size(model) or DEFAULT_MODEL_BYTES

    async def scale_to(self, rt: ServiceRuntime, desired: int) -> None:
        async with rt.lock:
            live = rt.counted()
            for _ in range(desired - len(live)):  # none when scaling down
                await self._scale_up(rt)
            if desired < len(live):
                await self._scale_down(rt, len(live) - desired)

    # -- scale-up --------------------------------------------------------------------------

    async def _scale_up(self, rt: ServiceRuntime) -> None:
        svc = rt.config
        if svc.model is None:
            _log.error("service has no checkpoint annotation", service=svc.key)
            return
        if (wait := rt.retry_at - self.clock()) > 0:
            if (skipped := self._repeats.check(f"backoff {svc.key}", str(rt.failed_starts))) is not None:
                _log.info("not starting: backing off after failed starts", service=svc.key, checkpoint=rt.model,
                          failed_starts=rt.failed_starts, retry_in_s=round(wait, 1),
                          last_failure=rt.last_failure[:200], repeated=skipped or None)
            return
        t0 = time.perf_counter()
        nodes = await self.backend.inventories()
        if self.backend.one_machine:  # one machine's probes: noise around one value each (as `calibration`)
            nodes = pool_tier_rates(nodes)
        if (allowed := self.backend.nodes_for(svc)) is not None:  # the service's nodeSelector
            nodes = [n for n in nodes if n.name in allowed]
        generations = await self._generations_on_full_nodes()
        async with self.slots.lock:  # no await inside: read the slots, place, reserve
            nodes = self._occupied(nodes, generations)
            request = ModelRequest(rt.model, self.model_size(rt.model), rt.priority, service=rt.key,
                                   holding=len(rt.counted()), idle=not rt.in_flight)  # held ones included
            decision = place_by(self.placer, request, nodes, self.calibration, self._rng.random,
                                rt.waited_s(self.clock()), rt.fair_share_after_s, TICK_S)
            claim = self.slots.claim(self.table, rt, decision, nodes, self.model_size)
        placement_s = time.perf_counter() - t0
        metrics.PLACEMENT_SECONDS.observe(placement_s)
        if claim is None or decision.node is None:
            # Every tick while it lasts: logged when the reason changes (numbers aside), else every 30 s.
            shape = re.sub(r"\d+(\.\d+)?", "#", f"{decision.fair_share} {decision.reasons[0] if decision.reasons else ''}")
            if (skipped := self._repeats.check(f"capacity {svc.key}", shape)) is not None:
                _log.info("no free slot: waiting for capacity", service=svc.key, checkpoint=rt.model,
                          waiting=rt.held, waited_s=round(rt.waited_s(self.clock()), 1), starving=decision.fair_share,
                          reasons="; ".join(decision.reasons), repeated=skipped or None)
            return
        self._repeats.clear(f"capacity {svc.key}")
        record: dict[str, Any] = {"action": str(decision.action), "estimate_s": decision.estimate_s,
                                  "placement_s": placement_s, "reasons": list(decision.reasons)}
        try:
            # The checkpoint starts moving into the node's DRAM now: for a preemption, while the
            # victim is emptied and stops (placement's estimate counts on it: `Option.total_s`;
            # a fill that needs the room the victim's lease holds waits for it, the loader's
            # lease wait).
            await self.backend.warm(decision.node, svc.model.uri)
            if decision.action in (Action.EVICT, Action.MIGRATE):
                _log.info("preempting", service=svc.key, checkpoint=rt.model, action=str(decision.action),
                          node=decision.node, victim=claim.option.victim, destination=claim.option.destination,
                          fair_share=decision.fair_share, reason=decision.reasons[0])
                freed = await self._preempt(claim, nodes)
                if freed is None:
                    return
                record.update(freed)
            rec = await self._start(rt, decision.node, str(claim.option.estimate.tier), record, claim.slot,
                                    warmed=True)
        finally:
            self.slots.release_claim(claim)
        _log.info("placed", service=svc.key, checkpoint=rt.model, instance=rec.id, node=decision.node,
                  tier=rec.tier, action=str(decision.action), estimate_s=round(decision.estimate_s, 3),
                  stop_s=record.get("stop_s"), reason=decision.reasons[0],
                  others="; ".join(decision.reasons[1:]) or None)

    async def _generations_on_full_nodes(self) -> dict[str, list[dict[str, Any]] | None]:
        """The generations of the ready instances on nodes with no free slot (the only ones
        placement may displace), read from the instances so their in-flight count and tokens
        are current rather than a second old."""
        used = self._slots_used()
        full = {name for name, slots in self.backend.node_slots().items() if used.get(name, 0) >= slots}
        displaceable = [rec for _, rec in self.table.occupying() if rec.node in full and rec.state == InstanceState.READY]
        asked = [rec for rec in displaceable if rec.internal_port]
        answers = await asyncio.gather(*(self.backend.generations(rec) for rec in asked))
        # Without an internal API there is nothing to ask: the activator's count is all there is.
        out: dict[str, list[dict[str, Any]] | None] = {rec.id: [] for rec in displaceable if not rec.internal_port}
        out.update({rec.id: g for rec, g in zip(asked, answers, strict=True)})
        return out

    def _slots_used(self) -> dict[str, int]:
        used = self.table.slots_in_use()
        for node, n in self.slots.per_node().items():
            used[node] = used.get(node, 0) + n
        return used

    def _occupied(self, nodes: list[NodeInventory],
                  generations: dict[str, list[dict[str, Any]] | None]) -> list[NodeInventory]:
        """The nodes with what holds their slots now: instances (claimed ones are neither
        displaced nor migration destinations), reservations, and the loads in flight."""
        instances: dict[str, list[Instance]] = {}
        loads = [r.load for r in self.slots.reservations()]
        for rt, rec in self.table.occupying():
            size = self.model_size(rt.model)
            view = instance_view(rec, model=rt.model, size_bytes=size, capacity=rt.config.container_concurrency,
                                 priority=rt.priority, migration=rt.migration,
                                 outstanding=rt.outstanding.get(rec.id, 0), generations=generations.get(rec.id),
                                 protected=is_protected(self._ready_since.get(rec.id), rt.min_residency_s,
                                                        self.clock()),
                                 service_waiting=rt.held,
                                 service_instances=len(rt.counted()))
            if rec.id in rt.claimed():
                view = dataclasses.replace(view, ready=False, migratable=False)
            instances.setdefault(rec.node, []).append(view)
            tier = parse_tier(rec.tier)
            if rec.state == InstanceState.STARTING and tier is not None:
                loads.append(LoadInFlight(rec.node, rt.model, size, tier, rec.started_at))
        return occupy_all(nodes, self.backend.node_slots(), self._slots_used(),
                          {node: tuple(v) for node, v in instances.items()}, loads, time.time(),
                          self.calibration.apply)

    async def _start(self, rt: ServiceRuntime, node: str, tier: str, record: dict[str, Any],
                     reservation: Reservation | None = None, warmed: bool = False) -> InstanceRecord:
        """Start an instance of rt's service on `node` (in `reservation`'s slot) and record the
        placement that put it there (`warmed`: its checkpoint was warmed at the decision).
        READY or FAILED comes as a backend event (`on_event`)."""
        svc = rt.config
        if svc.model is not None and not warmed:
            await self.backend.warm(node, svc.model.uri)  # start moving the checkpoint in now
        taken = {r.id for r in self.backend.instances()}  # adopted ones keep their names
        name = next(n for n in (f"{svc.name}-{i}" for i in self._ids) if n not in taken)
        rec = await self.backend.start(svc, node, name, tier)
        inst_id = rec.id  # a backend may name it (Kubernetes: the pod's name)
        rt.instances[inst_id] = rec  # holds the slot from here on: the reservation goes
        self.slots.release(reservation)
        self._ready[inst_id] = asyncio.get_running_loop().create_future()
        if early := self._early.pop(inst_id, None):
            # The backend's events raced start()'s return (on Kubernetes the pod may be ready, or
            # gone, by then): without this the record would stay STARTING, or outlive its pod.
            self._spawn(self._replay(early))
        metrics.COLD_STARTS.labels(svc.key, tier).inc()
        rt.placements.append({"instance": inst_id, "node": node, "tier": tier, **record})
        return rec

    async def await_ready(self, rec: InstanceRecord) -> bool:
        """Until the instance is ready and in the activator's rotation (True), or failed or stopped (False)."""
        fut = self._ready.get(rec.id)
        if fut is None:
            return rec.state == InstanceState.READY
        try:
            return await asyncio.wait_for(asyncio.shield(fut), READY_WAIT_S)
        except asyncio.TimeoutError:
            return False

    def _settle(self, instance: str, ready: bool) -> None:
        fut = self._ready.pop(instance, None)
        if fut is not None and not fut.done():
            fut.set_result(ready)

    async def on_event(self, event: InstanceEvent) -> None:
        """A backend's instance event: ready (into rotation; calibrate), failed or exited (forget
        it); on Kubernetes also an instance to place (UNPLANNED) or to take over (ADOPTED)."""
        if event.kind in (EventKind.UNPLANNED, EventKind.ADOPTED):
            self._take(event)
            return
        found = self.table.find(event.instance)
        if found is None:
            self._settle(event.instance, False)
            self._keep_early(event)
            return
        rt, rec = found
        if event.kind == EventKind.READY:
            if rec.state != InstanceState.STARTING:
                self._settle(rec.id, False)
                return
            rec.state = InstanceState.READY
            self._ready_since[rec.id] = self.clock()
            rt.failed_starts, rt.last_failure, rt.retry_at = 0, "", 0.0
            self.calibration = fold_ready(self.calibration, rec)
            if rec.ready_at:
                metrics.READY_SECONDS.labels(rec.tier).observe(rec.ready_at - rec.started_at)
            _log.info("instance ready", service=rt.key, checkpoint=rt.model, instance=rec.id, node=rec.node,
                      seconds=round((rec.ready_at or 0) - rec.started_at, 3))
            await self.push(rt)
            self._settle(rec.id, True)
        elif event.kind == EventKind.FAILED:
            rt.failed_starts += 1
            rt.last_failure = f"{rec.id} on {rec.node}: {event.detail}"
            backoff = start_backoff_s(rt.failed_starts)
            rt.retry_at = self.clock() + backoff
            _log.error("instance failed to become ready", service=rt.key, checkpoint=rt.model, instance=rec.id,
                       node=rec.node, detail=event.detail, failed_starts=rt.failed_starts, retry_in_s=backoff)
            rec.state = InstanceState.FAILED
            self._settle(rec.id, False)
            await self.backend.stop(rec)
            rt.instances.pop(rec.id, None)
        elif rec.state not in (InstanceState.STOPPING, InstanceState.STOPPED):  # EXITED on its own
            _log.warning("instance exited", service=rt.key, instance=rec.id, node=rec.node, detail=event.detail)
            rec.state = InstanceState.STOPPED
            rt.instances.pop(rec.id, None)
            self._ready_since.pop(rec.id, None)
            self._settle(rec.id, False)
            await self.push(rt)

    def _keep_early(self, event: InstanceEvent) -> None:
        """Keep an event of an instance not in the table: its start() may not have returned yet."""
        self._early.setdefault(event.instance, []).append(event)
        self._early.move_to_end(event.instance)
        while len(self._early) > EARLY_EVENTS_KEPT:  # of instances that never got recorded
            self._early.popitem(last=False)

    async def _replay(self, events: list[InstanceEvent]) -> None:
        for event in events:
            await self.on_event(event)

    def _take(self, event: InstanceEvent) -> None:
        rt = self.table.get(event.service)
        if rt is None:
            _log.warning("instance of an unknown service", service=event.service, instance=event.instance,
                         event=str(event.kind))
            return
        if event.kind == EventKind.ADOPTED:
            rec = next((r for r in self.backend.instances() if r.id == event.instance), None)
            if rec is not None and rec.id not in rt.instances:
                rt.instances[rec.id] = rec
                self._ready[rec.id] = asyncio.get_running_loop().create_future()
                _log.info("instance adopted", service=rt.key, instance=rec.id, node=rec.node)
            return
        _log.info("placing an instance the cluster made", service=rt.key, instance=event.instance)
        self._spawn(self._place_one(rt, event.instance))

    async def _place_one(self, rt: ServiceRuntime, pod: str) -> None:
        async with rt.lock:
            # Placed already if a scale-up holding the lock meanwhile was paired with this very pod.
            # A ReplicaSet's pod in place of one deleted while the count stayed (binding.stranded)
            # stays gated for the next start's intent while the decider has what it wants already.
            if pod in rt.instances:
                return
            if rt.decided and len(rt.counted()) >= rt.state.scale:
                _log.info("unplanned pod left gated: the service has the instances it wants", service=rt.key,
                          instance=pod, desired=rt.state.scale)
                return
            await self._scale_up(rt)

    async def stop(self, rt: ServiceRuntime, rec: InstanceRecord, grace_s: float = 10.0) -> None:
        self._settle(rec.id, False)
        self._ready_since.pop(rec.id, None)
        await self.backend.stop(rec, grace_s)
        rt.instances.pop(rec.id, None)

    async def push(self, rt: ServiceRuntime) -> None:
        """Tell the activator which of rt's instances are ready (its rotation)."""
        if self.activator is not None:
            await self.activator.push_endpoints(rt.config, rt.ready())

    # -- preemption ------------------------------------------------------------------------

    def _victim_view(self, instance: str, running: int | None = 0) -> VictimView | None:
        found = self.table.find(instance)
        if found is None:
            return None
        rt, rec = found
        return VictimView(rec.id, rt.key, rec.node, rec.state, running)

    async def _preempt(self, claim: Claim, nodes: list[NodeInventory]) -> dict[str, Any] | None:
        """Free the victim's slot for the claim's EVICT or MIGRATE option: run the plan's first
        step, look again, plan again. None when it was called off."""
        option, vrt, freed_from = claim.option, claim.victim_service, time.perf_counter()
        tier = claim.destination_slot.load.tier if claim.destination_slot else Tier.REMOTE
        view = PreemptionView(option, self._victim_view(option.victim or ""), tier, wait_s=self.preempt_wait_s)
        destination = option.destination if option.action == Action.MIGRATE else None
        while plan := plan_preemption(view):
            step, done = plan[0], view.progress
            running = view.victim.running if view.victim else 0
            victim = vrt.instances.get(option.victim or "") if vrt is not None else None
            if isinstance(step, CallOff) or vrt is None:
                await self._call_off(step if isinstance(step, CallOff) else CallOff("victim is gone"), vrt)
                metrics.PREEMPTIONS.labels(str(option.action), "called_off").inc()
                return None
            if isinstance(step, StartDestination):
                started = await self._start_destination(vrt, step, claim)
                destination = started or destination
                done = dataclasses.replace(done, destination=started, destination_failed=started is None)
            elif victim is not None:
                if isinstance(step, Stop) and option.action == Action.MIGRATE:
                    freed_from = time.perf_counter()  # its migration is timed (and learnt) apart
                done = await self._run_step(vrt, victim, step, done)
                if isinstance(step, LeaveRotation):
                    # An EVICT victim was idle when placement looked; a request may have landed since.
                    gens = await self.backend.generations(victim) if victim.internal_port else []
                    routed = 0 if self.activator is None else await self.activator.outstanding(vrt.config, victim.id)
                    running = None if gens is None or routed is None else max(len(running_generations(gens)), routed)
            view = dataclasses.replace(view, victim=self._victim_view(option.victim or "", running), progress=done)
        metrics.PREEMPTIONS.labels(str(option.action), "done").inc()
        migration = view.progress.migration
        outcomes = [str(o) for o in migration.outcomes] if migration else []
        _log.info("preempted", service=vrt.key if vrt else None, instance=option.victim, node=option.node,
                  generations=len(outcomes), outcomes=",".join(outcomes))
        stop_s = round(time.perf_counter() - freed_from, 4)  # EVICT: all of it; MIGRATE: its Stop
        self.calibration = observe_stop(self.calibration, stop_s)  # placement's instance_stop_s
        return {"victim": option.victim, "victim_service": vrt.key if vrt else None, "destination": destination,
                "migrations": outcomes, "stop_s": stop_s}

    async def _start_destination(self, vrt: ServiceRuntime, step: StartDestination, claim: Claim) -> str | None:
        """StartDestination: the new instance's id once it is ready, None when it did not become ready."""
        dest = await self._start(vrt, step.node, str(step.tier), {
            "action": "migration-destination",
            "reasons": [f"receives the generations of {claim.option.victim}, preempted on {claim.option.node}"],
        }, claim.destination_slot)
        claim.destination_slot = None
        vrt.pinned.add(dest.id)
        claim.pinned.append(dest.id)
        _log.info("starting a migration destination", service=vrt.key, checkpoint=vrt.model, instance=dest.id,
                  node=dest.node, victim=claim.option.victim)
        return dest.id if await self.await_ready(dest) else None

    async def _run_step(self, rt: ServiceRuntime, rec: InstanceRecord, step: Step, done: Progress,
                        drain: bool = False) -> Progress:
        """Run one step of a preemption or (`drain`) a scale-down's drain on instance `rec` of `rt`;
        the progress after it."""
        if isinstance(step, LeaveRotation):
            rec.state = InstanceState.DRAINING
            await self.push(rt)
            return dataclasses.replace(done, left_rotation=True)
        if isinstance(step, Migrate):
            results = await self.migrate_off(rt, rec, step.destination)
            attempt = MigrationAttempt(refused=True) if results is None else MigrationAttempt(
                outcomes=tuple(r.outcome for r in results))
            return dataclasses.replace(done, migration=attempt)
        if isinstance(step, WaitIdle):
            return dataclasses.replace(done, idle=await self.wait_idle(rt, rec, step.timeout_s, answer=not drain))
        if isinstance(step, Stop):
            if done.idle is False:
                metrics.STOPPED_BUSY.inc()
                _log.warning("stopping an instance that still runs generations", service=rt.key, instance=rec.id,
                             node=rec.node)
            began = time.perf_counter()
            await self.stop(rt, rec)
            if drain:  # a scale-down's stop is a stop too: placement learns it before any preemption
                self.calibration = observe_stop(self.calibration, time.perf_counter() - began)
            return dataclasses.replace(done, stopped=True)
        raise AssertionError(f"not a step on an instance: {step}")

    async def _call_off(self, step: CallOff, vrt: ServiceRuntime | None) -> None:
        _log.warning("preemption called off", service=vrt.key if vrt else None, instance=step.restore,
                     reason=step.reason)
        rec = vrt.instances.get(step.restore) if vrt is not None and step.restore else None
        if vrt is not None and rec is not None and rec.state == InstanceState.DRAINING:
            rec.state = InstanceState.READY
            await self.push(vrt)

    # -- scale-down ------------------------------------------------------------------------

    async def _scale_down(self, rt: ServiceRuntime, count: int) -> None:
        live = [i for i in rt.counted() if i.id not in rt.pinned]
        candidates = [Instance(name=i.id, model=rt.model, size_bytes=1, inflight=rt.outstanding.get(i.id, 0))
                      for i in live]
        victims = {v.name for v in choose_victims(candidates, count)}
        for rec in live:
            if rec.id in victims:
                done = await self._run_step(rt, rec, LeaveRotation(rec.id), Progress())  # no new requests go to it
                self._spawn(self._drain(rt, rec, done))

    async def _drain(self, rt: ServiceRuntime, rec: InstanceRecord, done: Progress) -> None:
        """Migrate the victim's generations to another ready instance, then stop it.

        What cannot move (no other ready instance, a generation that stayed on it) is waited for,
        up to DRAIN_WAIT_S, by asking the instance what it still runs: once it is out of
        rotation the activator no longer reports its outstanding requests."""
        view = DrainView(VictimView(rec.id, rt.key, rec.node, rec.state), done, self.drain_wait_s)
        while plan := plan_drain(view):
            done = await self._run_step(rt, rec, plan[0], view.progress, drain=True)
            gone = rec.id not in rt.instances and not done.stopped
            view = dataclasses.replace(view, victim=None if gone else view.victim, progress=done)

    async def migrate_off(self, rt: ServiceRuntime, rec: InstanceRecord,
                          destination: str | None = None) -> list[MigrationResult] | None:
        """Ask the activator to move rec's generations (to `destination`, else the least loaded
        ready instance); fold each move into the cost model. None when nothing could move (no
        activator, no other ready instance, or the activator refused)."""
        if self.activator is None or not rt.ready():
            return None
        results = await self.activator.migrate(rt.config, rec.id, destination)
        if results is None:
            return None
        self.calibration = fold_migrations(self.calibration, ((r.outcome, r.tokens, r.seconds) for r in results))
        for r in results:
            metrics.MIGRATED_GENERATIONS.labels(str(r.outcome)).inc()
        rt.record_migrations([dict(r.doc) for r in results])
        _log.info("migrated off", service=rt.key, instance=rec.id, node=rec.node, generations=len(results),
                  outcomes=",".join(str(r.outcome) for r in results))
        return results

    async def wait_idle(self, rt: ServiceRuntime, rec: InstanceRecord, timeout_s: float, answer: bool = True) -> bool:
        """Until the instance is idle (True), or `timeout_s` passes (False). Idle: it runs no
        generation, and the activator has no request outstanding on it (one sent just before it
        left rotation may not have reached it yet). With `answer` (a preemption, for another
        service) the instance must say so: one that does not answer may be too busy to. A
        scale-down's drain takes silence for nothing running, as an instance without an
        internal API never says anything."""
        deadline = time.monotonic() + timeout_s
        while True:
            gens = await self.backend.generations(rec) if rec.internal_port else []
            if (gens is not None or not answer) and not running_generations(gens):
                # Only then the activator (every replica's whole report): not on every poll of a busy instance.
                if self.activator is None or await self.activator.outstanding(rt.config, rec.id) == 0:
                    return True
            if rec.id not in rt.instances:  # gone meanwhile (exited): nothing runs on it
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.1)
