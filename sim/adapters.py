"""The policy adapters: where the simulator calls the real policy code, on views of its state.

    tick, scale        the scaler: a concurrency sample every second per active service, and
                       `autoscaler.decider.decide` every TICK_S (and at once for a request that
                       finds its service at zero); scale-down victims from `choose_victims`
    place_instance     placement: `sllm_knative.placement.place` on node inventories (load-time
                       policies, with the calibration for calibrated ones), random, or the
                       preemption-based ranking by `startup`; `view` and `_inventory` build the
                       placement's views of instances and nodes
    (sim/plans.py)     a preemption (placement's EVICT/MIGRATE, `plan_preemption`) or a drain
                       (`plan_drain`) run step by step; this module starts them

Nothing here decides anything itself, except `_gang_evict` (a model over several GPUs when no
single victim frees enough of them; stated in docs/evaluation.md) and the order in which
services are scaled within one tick.

At scale, placement is offered a shortlist of nodes (every node holding the checkpoint or
loading it, the `SHORTLIST` free nodes with the shortest loader queues, and as many nodes with
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from autoscaler.backends.base import InstanceState
from autoscaler.decider import DeciderInputs, decide, keep_alive_mark, keeps_one
from sim.cluster import Process, Service, SimInstance, SimNode
from sim.plans import advance
from sim.policies import Placer
from sim.workload import Model
from sllm_knative.config.autoscaler import RECHECK_LATE_S, TICK_S
from sllm_knative.placement import (
    Action,
    Instance,
    ModelRequest,
    NodeInventory,
    QueuedLoad,
    Tier,
    choose_victims,
    displaceable,
    place_by,
    startup,
)

if TYPE_CHECKING:
    from sim.engine import Simulation

SHORTLIST = 8
SHORTLIST_ALL = 32


# -- the scaler ------------------------------------------------------------------------------

#: tick() skips a scaler decision whose outcome is known (`Service.quiet_until`); a test turns
#: this off to check that the skip changes nothing the simulation computes
SKIP_QUIET = True


def tick(sim: Simulation, _a: object, _b: object) -> None:
    """Every second: a concurrency sample per active service; every TICK_S, the decider too."""
    decide_now = int(round(sim.now)) % int(TICK_S) == 0
    services = list(sim.active.values())
    if decide_now:
        # The real autoscaler scales services concurrently, in no set order; here the service
        # whose oldest request has waited longest places first, so that a fixed iteration
        # order does not starve the same services every tick.
        services.sort(key=lambda s: s.waiting[0].arrival if s.waiting else math.inf)
    now = sim.now
    for svc in services:
        # The activator's report of the second that ends now, as the autoscaler records it: the
        # time-weighted average concurrency (a request shorter than a second counts too), and
        # the service as busy now if a request started in it or is in flight.
        # A zero sample is recorded only when the decider runs next: between two samples an
        # absent second counts as zero in the window's average anyway (autoscaler/window.py),
        # so the averages the decider sees are the same, at a fraction of the records.
        current = len(svc.waiting)  # sim.concurrency(svc), inline: once a second per service
        for i in svc.instances:
            current += len(i.running)
        value = svc.area + current * (now - svc.area_at)  # over REPORT_S = 1 s
        svc.area, svc.area_at = 0.0, now
        if current or svc.started:
            svc.last_request_at = now
            svc.started = False
        if value or decide_now:
            svc.window = svc.window.record(now, value)
            if value > svc.spec.target:
                svc.hot_at = now
        if decide_now:
            if (SKIP_QUIET and now < svc.quiet_until and svc.state is svc.quiet_state and svc.hot_at == svc.quiet_hot
                    and len(svc.instances) == 1 and svc.instances[0].state == InstanceState.READY):
                sim.stats.quiet_skips += 1  # scale() would keep the one instance and change nothing
            else:
                scale(sim, svc)
        if (not svc.instances and not svc.waiting and svc.state.scale == 0
                and sim.now - (svc.last_request_at or 0.0) > svc.spec.stable_window):
            svc.active = False
            del sim.active[svc.name]
    if sim.now < sim.horizon and (sim.active or sim.now < sim.last_arrival):
        sim.push(sim.now + 1.0, "second")


def scale(sim: Simulation, svc: Service) -> None:
    """Run the decider for `svc` and act on its decision: place instances or drain some."""
    ready = live = 0  # instances ready, and ready or starting
    for i in svc.instances:
        if i.state == InstanceState.READY:
            ready += 1
            live += 1
        elif i.state == InstanceState.STARTING:
            live += 1
    spec, now = svc.spec, sim.now
    if sim.cfg.kpa_stand_in:
        svc.desired, recheck = stand_in(svc, live, now, sim.cfg.keep_alive_s)
        if recheck is not None:
            sim.push(now + recheck, "recheck", svc)
        _act(sim, svc, live)
        return
    # Every caller has just recorded a sample at `now`. Nine evaluations in ten find a service
    # at one instance, under its target and inside its keep-alive: `keeps_one` says when decide
    # would return one instance and the same state, and the averages are not computed then.
    last, busy = svc.last_request_at, svc.window.last_nonzero()
    last_busy = busy if last is None else last if busy is None else max(last, busy)
    if keeps_one(spec, svc.state, ready, last_busy, now - svc.hot_at > spec.stable_window + 2.0, now):
        svc.desired = svc.state.scale
        # decide's `recheck_in_s` for this decision, from the same marks
        mark = keep_alive_mark(svc.state.active_since, last_busy)
        recheck = None if mark is None or spec.keep_alive is None else mark + spec.keep_alive - now
        # Until the keep-alive can run out (its mark only moves later: the state's active_since
        # is fixed and the last request only grows), with the same state, the same one ready
        # instance and no new sample above the target (so still calm), keeps_one stays true and
        # no recheck falls due within a tick: tick() skips this call until then.
        floor = keep_alive_mark(svc.state.active_since, last)
        if ready == live == 1 == svc.desired and floor is not None and spec.keep_alive is not None:
            svc.quiet_until, svc.quiet_state, svc.quiet_hot = floor + spec.keep_alive - TICK_S, svc.state, svc.hot_at
    else:
        decision, svc.state = decide(spec, DeciderInputs(svc.window, ready, svc.last_request_at), svc.state, now)
        if not decision.valid or decision.desired is None:
            return
        svc.desired = decision.desired
        recheck = decision.recheck_in_s
    if recheck is not None and 0 < recheck < TICK_S:  # as the autoscaler: decide again when the keep-alive ends
        sim.push(now + recheck + RECHECK_LATE_S, "recheck", svc)
    _act(sim, svc, live)


def stand_in(svc: Service, live: int, now: float, keep_alive_s: float) -> tuple[int, float | None]:
    """bench/replay_profiles.FreshController's decision (`SimConfig.kpa_stand_in`): one instance
    while a request of the service waits or runs, and for `keep_alive_s` after the last one
    ended; (desired, seconds until it changes by itself, None: when a request comes or goes)."""
    if svc.waiting or any(i.running for i in svc.instances):
        return 1, None
    if not live or svc.last_end_at is None:
        return 0, None
    left = svc.last_end_at + keep_alive_s - now
    return (1, left) if left > 1e-9 else (0, None)  # not a rounding error's worth of time again


def _act(sim: Simulation, svc: Service, live: int) -> None:
    """Start instances up to `svc.desired`, or drain the ones above it."""
    if svc.desired > live:
        for _ in range(svc.desired - live):
            if not place_instance(sim, svc):
                sim.stats.unplaced += 1
                break
    elif svc.desired < live:
        views = [view(sim, i) for i in svc.instances if i.state == InstanceState.READY and not i.claimed]
        for victim in choose_victims(views, min(len(views), live - svc.desired)):
            inst = sim.instances[victim.name]
            inst.claimed = True
            advance(sim, Process("drain", inst))


# -- placement -------------------------------------------------------------------------------


def place_instance(sim: Simulation, svc: Service) -> bool:
    """Place one instance of `svc` as the policy says; False when nothing could be placed."""
    sim.stats.placements += 1
    if sim.policy.placer in (Placer.LOAD_TIME, Placer.RANDOM):
        return _place_by(sim, svc)
    if sim.policy.placer == Placer.PREEMPT:
        return _place_preempt(sim, svc)
    return _place_blind(sim, svc)


def _waited(sim: Simulation, svc: Service) -> float:
    """How long the service's oldest waiting request has waited (0 with none waiting)."""
    return sim.now - svc.waiting[0].arrival if svc.waiting else 0.0


def _request(sim: Simulation, svc: Service, starving: bool | None = None) -> ModelRequest:
    """The request to place; starving once waited past the bound unless `starving` says."""
    if starving is None:
        starving = bool(svc.waiting) and _waited(sim, svc) >= sim.cfg.fair_share_after_s
    return ModelRequest(svc.model.key, svc.model.size_bytes, service=svc.name,
                        holding=len(svc.instances), starving=starving, idle=not sim.concurrency(svc))


def _shortlist(sim: Simulation, model: Model) -> list[SimNode]:
    if len(sim.node_list) <= SHORTLIST_ALL:
        return sim.node_list
    chosen = {n: sim.nodes[n] for n in sorted(sim.holders.get(model.key, ()))}
    now = sim.now
    free = [n for n in sim.node_list if n.free_gpus >= model.tp and n.name not in chosen]
    # The SHORTLIST first in (loader busy for, free GPUs, name) order: nsmallest is sorted()[:k].
    for n in heapq.nsmallest(SHORTLIST, free, key=lambda n: (
            n.loader_free_at - now if n.loader_free_at > now else 0.0, n.free_gpus, n.name)):
        chosen[n.name] = n
    if len(free) < SHORTLIST:
        busy = [n for n in sim.node_list if n.name not in chosen
                and any(i.state == InstanceState.READY and i.model.tp + n.free_gpus >= model.tp
                        for i in n.instances.values())]
        for n in heapq.nsmallest(SHORTLIST, busy, key=lambda n: (
                sum(len(i.running) for i in n.instances.values()), n.name)):
            chosen[n.name] = n
    return list(chosen.values())


def _place_by(sim: Simulation, svc: Service) -> bool:
    """As the autoscaler places (`placement.place_by`, the policy's placer by its name): the
    load-time model with fair share in time for the bound, or for RANDOM a random node among the
    free ones (all of them, not a shortlist: the draw is among every free node), and the
    load-time model when none is free."""
    blind = sim.policy.placer == Placer.RANDOM
    free = [n for n in sim.node_list if n.free_gpus >= svc.model.tp] if blind else []
    nodes = free or _shortlist(sim, svc.model)
    models = {svc.model.key} | {i.model.key for n in nodes for i in n.instances.values()}
    invs = [_inventory(sim, n, svc.model, models) for n in nodes]
    p = place_by(sim.policy.placer.value, _request(sim, svc, starving=False), invs,
                 sim.calibration if sim.policy.calibrate else None, sim.rng.random,
                 _waited(sim, svc), sim.cfg.fair_share_after_s, TICK_S)
    if p.chosen is None or p.node is None:
        return _gang_evict(sim, svc, nodes)
    node = sim.nodes[p.node]
    if p.action == Action.PLACE:
        sim.start(svc, node)
        return True
    if p.action in (Action.EVICT, Action.MIGRATE):
        victim = sim.instances[p.chosen.victim or ""]
        victim.claimed = True
        stop = sim.hw.stop_s if p.action == Action.EVICT else 0.0
        successor = sim.start(svc, node, wait_for_gpus=True, load_from=sim.now + stop)
        advance(sim, Process("preempt", victim, p.chosen, successor=successor))
        return True
    return False  # WAIT: the scaler tries again on its next tick


def _place_blind(sim: Simulation, svc: Service) -> bool:
    """The locality-blind baselines (BLIND): a random node with enough free GPUs; with none, a
    fresh-process policy's pod waits (`schedule_pending`), the others stop a random idle victim."""
    tp = svc.model.tp
    free = [n for n in sim.node_list if n.free_gpus >= tp]
    if free:
        sim.start(svc, sim.rng.choice(free))
        return True
    if sim.policy.fresh_process:
        # Kubernetes: the pod stays pending and is scheduled the moment GPUs free up, in the
        # order the pods were created (`schedule_pending`), before any later arrival's pod.
        if svc not in sim.pending:
            sim.pending.append(svc)
        return False
    req = _request(sim, svc)
    idle = [i for i in sim.instances.values() if i.state == InstanceState.READY and not i.running
            and not i.claimed and i.model.tp + sim.nodes[i.node].free_gpus >= tp
            and displaceable(view(sim, i), req) is None]
    if not idle:
        return _gang_evict(sim, svc, sim.node_list)
    victim = sim.rng.choice(idle)
    sim.stats.evictions += 1
    sim.stop(victim)
    sim.start(svc, sim.nodes[victim.node])
    return True


def schedule_pending(sim: Simulation) -> None:
    """GPUs were freed: the pending pods (fresh-process policies) that still want an instance
    are placed, oldest first, while a node has room (the scheduler reacts at once, not on the
    next tick; a replay run showed a service waiting 68 s instead of 17 s without this)."""
    while sim.pending:
        svc = sim.pending[0]
        current = sum(1 for i in svc.instances if i.state in (InstanceState.STARTING, InstanceState.READY))
        if not svc.waiting or current >= max(1, svc.desired):
            sim.pending.pop(0)
            continue
        if not any(n.free_gpus >= svc.model.tp for n in sim.node_list):
            return
        sim.pending.pop(0)
        sim.stats.placements += 1
        _place_blind(sim, svc)


def _place_preempt(sim: Simulation, svc: Service) -> bool:
    """Shepherd*-like: the node where the model starts fastest (its fastest copy, its loader
    queue) wins; with no free GPUs there, an instance of another service is preempted."""
    req = _request(sim, svc)
    tp = svc.model.tp
    nodes = _shortlist(sim, svc.model)
    ranked = sorted(nodes, key=lambda n: (startup(req, _inventory(sim, n, svc.model, {svc.model.key})).total_s,
                                          n.name))
    for node in ranked:
        if node.free_gpus >= tp:
            sim.start(svc, node)
            return True
        victims = [i for i in node.instances.values() if i.state == InstanceState.READY and not i.claimed
                   and i.model.tp + node.free_gpus >= tp and displaceable(view(sim, i), req) is None]
        if victims:
            victim = min(victims, key=lambda i: (len(i.running), i.id))
            if victim.running:
                sim.stats.preemptions += 1
            else:
                sim.stats.evictions += 1
            sim.kill(victim)
            sim.start(svc, node)
            return True
    return _gang_evict(sim, svc, nodes)


def _gang_evict(sim: Simulation, svc: Service, nodes: Sequence[SimNode]) -> bool:
    """A model over several GPUs when no single instance frees enough of them: on the node
    with the most GPUs free or held by idle instances that `displaceable` lets go (at least
    `tp`), stop idle ones, the smallest first, until the model fits. Placement has one victim
    per option, so this step is the simulator's (stated in docs/evaluation.md)."""
    tp = svc.model.tp
    if tp == 1 or sim.policy.fresh_process:
        return False
    req = _request(sim, svc)
    best: tuple[int, str, list[SimInstance]] | None = None
    for node in nodes:
        idle = sorted((i for i in node.instances.values() if i.state == InstanceState.READY and not i.running
                       and not i.claimed and displaceable(view(sim, i), req) is None),
                      key=lambda i: (i.model.tp, i.id))
        have = node.free_gpus + sum(i.model.tp for i in idle)
        if have >= tp and (best is None or (have, node.name) > (best[0], best[1])):
            best = (have, node.name, idle)
    if best is None:
        return False
    node = sim.nodes[best[1]]
    for victim in best[2]:
        if node.free_gpus >= tp:
            break
        sim.stats.evictions += 1
        sim.stop(victim)
    sim.start(svc, node)
    return True


def _inventory(sim: Simulation, node: SimNode, model: Model, models: Iterable[str]) -> NodeInventory:
    prestaged = sim.policy.prestaged_ssd
    checkpoints = {m: t for m in models if (t := node.tier_of(m, prestaged)) != Tier.REMOTE}
    queue = []
    for j in node.pending_jobs(sim.now):
        left = j.size if j.start >= sim.now else j.size * (j.end - sim.now) / (j.end - j.start)
        queue.append(QueuedLoad(j.model, int(left), j.tier))
    tp = model.tp
    views = tuple(view(sim, i) for i in node.instances.values()
                  if i.model.key != model.key and i.model.tp + node.free_gpus >= tp or i.service == model.name)
    return NodeInventory(node.name, sim.bandwidth, checkpoints, tuple(queue), free_slots=node.free_gpus // tp,
                         instances=views, instance_overhead_s=sim.overhead)


def view(sim: Simulation, inst: SimInstance) -> Instance:
    """Placement's view of an instance (`sllm_knative.placement.Instance`)."""
    svc = sim.services[inst.service]
    step = inst.step_s
    return Instance(
        inst.id, inst.model.key, inst.model.size_bytes, inflight=len(inst.running),
        tokens=sum(r.tokens_at(sim.now, step) for r in inst.running.values()),
        capacity=sim.cfg.capacity, migratable=sim.policy.migration,
        ready=inst.state == InstanceState.READY and not inst.claimed,
        protected=inst.ready_at is not None and sim.now - inst.ready_at < sim.cfg.min_residency_s,
        service_waiting=len(svc.waiting), service_instances=max(1, len(svc.instances)), service=svc.name)
