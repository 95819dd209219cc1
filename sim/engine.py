"""The discrete-event cluster simulator: virtual time on an event heap, the real policy code.

What is simulated (the model, stated; docs/evaluation.md explains the choices):

- Nodes with GPUs, a DRAM tier and an SSD tier (LRU, capacities in bytes), and one loader per
  node running one load at a time, first in first out (as `sllm_knative.placement.model`
  assumes). A load takes `size / rate(tier)` at the profile's achieved rate, scaled by a
  seeded lognormal noise; a load from the SSD or the store goes through the DRAM hop too. A
  finished load leaves the checkpoint in the DRAM tier (and in the SSD tier when it came from
  the store), where the policy keeps those tiers.
- Instances hold `tp` GPUs of one node from placement to stop; ready after their load and the
  start overhead; serve up to `capacity` generations at once (continuous batching). A
  generation's first token comes one prefill after it is admitted, then one decode step per
  token (hardware.py's compute model).
- Requests wait in their service's queue until a ready instance has room (the activator), in
  arrival order.
- The scaler (`autoscaler.decider.decide`) runs per service every TICK_S on a concurrency
  sample taken every second, and at once when a request finds its service at zero.
- Placement is `sllm_knative.placement.place` (load-time policies), with the calibration
  (`observe_load`, `observe_start`, `observe_migration`) folded in for calibrated ones; EVICT
  and MIGRATE run `autoscaler.preemption.plan_preemption` step by step, scale-down victims
  come from `choose_victims` and drain with `plan_drain`.
- Migration is token-based: the destination re-prefills the tokens so far (prompt and
  generated) while the source keeps decoding; the generation then continues there, and the
  source's GPUs are free when the last one moved. Preemption (preemption-based policy) kills
  the victim; its generations restart from scratch in their service's queue.

At scale, placement is offered a shortlist of nodes (every node holding the checkpoint or
loading it, the `SHORTLIST` free nodes with the shortest loader queues, and as many nodes with
an instance that could be displaced); with at most `SHORTLIST_ALL` nodes it sees them all.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from autoscaler.backends.base import InstanceState
from autoscaler.decider import DeciderInputs, DeciderSpec, DeciderState, decide, initial_state
from autoscaler.preemption import (
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
from autoscaler.window import MetricWindow
from sim.hardware import HardwareProfile
from sim.policies import Placer, Policy
from sim.workload import Model, Request
from sllm_knative.api import MigrationOutcome
from sllm_knative.config.autoscaler import TICK_S
from sllm_knative.placement import (
    Action,
    Calibration,
    Instance,
    LoadObservation,
    MigrationObservation,
    ModelRequest,
    NodeInventory,
    Option,
    QueuedLoad,
    Tier,
    choose_victims,
    displaceable,
    observe_load,
    observe_migration,
    observe_start,
    place,
    startup,
)

SHORTLIST = 8
SHORTLIST_ALL = 32


@dataclass(frozen=True)
class SimConfig:
    nodes: int
    capacity: int = 8  # generations an instance serves at once (containerConcurrency)
    target_utilization: float = 0.7  # the KPA target is capacity times this
    keep_alive_s: float = 60.0  # ScalingPolicy keepAlive of the keep-alive policies
    min_residency_s: float = 10.0  # ScalingPolicy minResidency: a fresh instance is protected this long
    fair_share_after_s: float = 15.0  # ScalingPolicy fairShareAfter: a service waiting this long is starving
    tail_s: float = 1800.0  # after the last arrival, how long requests may still finish
    seed: int = 0

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.capacity < 1:
            raise ValueError(f"need nodes >= 1 and capacity >= 1, got {self.nodes}, {self.capacity}")


class Lru:
    """One tier of one node: checkpoints by name, least recently used evicted first."""

    def __init__(self, capacity: float) -> None:
        self.capacity = capacity
        self.used = 0.0
        self.items: OrderedDict[str, int] = OrderedDict()

    def __contains__(self, model: object) -> bool:
        return model in self.items

    def touch(self, model: str) -> None:
        if model in self.items:
            self.items.move_to_end(model)

    def add(self, model: str, size: int) -> list[str]:
        """Store `model`; returns the models evicted to make room (none if it does not fit at all)."""
        if model in self.items:
            self.items.move_to_end(model)
            return []
        if size > self.capacity:
            return []
        evicted = []
        while self.used + size > self.capacity:
            old, old_size = self.items.popitem(last=False)
            self.used -= old_size
            evicted.append(old)
        self.items[model] = size
        self.used += size
        return evicted


@dataclass(eq=False)
class LoadJob:
    model: str
    size: int
    tier: Tier
    start: float
    end: float


@dataclass(eq=False)
class SimNode:
    name: str
    gpus: int
    free_gpus: int
    dram: Lru | None
    ssd: Lru | None
    loader_free_at: float = 0.0
    jobs: deque[LoadJob] = field(default_factory=deque)
    instances: dict[str, SimInstance] = field(default_factory=dict)

    def pending_jobs(self, now: float) -> list[LoadJob]:
        while self.jobs and self.jobs[0].end <= now:
            self.jobs.popleft()
        return list(self.jobs)

    def tier_of(self, model: str, prestaged: bool) -> Tier:
        if self.dram is not None and model in self.dram:
            return Tier.DRAM
        if prestaged or (self.ssd is not None and model in self.ssd):
            return Tier.SSD
        return Tier.REMOTE


@dataclass(eq=False)
class Running:
    req: Request
    start: float  # admitted on the instance running it
    first: float  # its first token (on whichever instance produced it)
    end: float

    def tokens_at(self, t: float, step: float) -> int:
        done = 0 if t < self.first else min(self.req.output, 1 + int((t - self.first) / step) if step > 0 else 1)
        return self.req.prompt + done


@dataclass(eq=False)
class SimInstance:
    id: str
    service: str
    model: Model
    node: str
    state: InstanceState
    placed_at: float
    tier: Tier
    step_s: float  # decode step
    gpus_held: bool = False
    load_end: float | None = None
    ready_at: float | None = None
    stopped_at: float | None = None
    running: dict[int, Running] = field(default_factory=dict)
    claimed: bool = False  # a preemption or drain has it: not a victim again, not a destination
    waiter: _Process | None = None  # the preemption or drain waiting for it to run nothing (WaitIdle)


@dataclass(eq=False)
class Service:
    name: str
    model: Model
    spec: DeciderSpec
    state: DeciderState
    window: MetricWindow = field(default_factory=MetricWindow)
    waiting: deque[Request] = field(default_factory=deque)
    instances: list[SimInstance] = field(default_factory=list)
    last_request_at: float | None = None
    desired: int = 0
    active: bool = False


@dataclass
class Stats:
    cold_starts: dict[str, int] = field(default_factory=dict)  # by tier, plus "joined"
    migrations: int = 0
    migrated_tokens: int = 0
    preemptions: int = 0  # preemption-based: instances killed for another
    restarted: int = 0  # generations restarted from scratch after a preemption
    lost_tokens: int = 0
    evictions: int = 0
    called_off: int = 0
    placements: int = 0
    unplaced: int = 0  # placement attempts that found nothing
    gpu_seconds: float = 0.0
    events: int = 0


@dataclass(eq=False)
class _Process:
    """A preemption (placement's EVICT/MIGRATE) or a drain, executed one step at a time."""

    kind: str  # "preempt" or "drain"
    victim: SimInstance
    option: Option | None = None
    progress: Progress = field(default_factory=Progress)
    successor: SimInstance | None = None  # the instance waiting for the victim's GPUs
    destination: SimInstance | None = None
    done: bool = False


class Simulation:
    def __init__(self, hw: HardwareProfile, policy: Policy, models: Sequence[Model], requests: Sequence[Request],
                 config: SimConfig) -> None:
        self.hw, self.policy, self.cfg = hw, policy, config
        self.models = {m.name: m for m in models}
        for m in models:
            if m.tp > hw.gpus_per_node:
                raise ValueError(f"model {m.name}: tp {m.tp} exceeds the {hw.gpus_per_node} GPUs of a node")
        self.requests = list(requests)
        for r in self.requests:
            if r.model not in self.models:
                raise ValueError(f"request {r.id}: unknown model {r.model!r}")
        self.rng = random.Random(f"sim/{config.seed}")
        self.noise = random.Random(f"noise/{config.seed}")
        self.nodes = {f"n{i:04d}": SimNode(f"n{i:04d}", hw.gpus_per_node, hw.gpus_per_node,
                                           Lru(hw.dram_tier_bytes) if policy.dram_tier else None,
                                           Lru(hw.ssd_tier_bytes) if policy.ssd_cache else None)
                      for i in range(config.nodes)}
        self.node_list = list(self.nodes.values())
        self.holders: dict[str, set[str]] = {}  # model -> nodes holding it in a tier or loading it
        self.bandwidth = {t: hw.nominal[t] for t in (Tier.DRAM, Tier.SSD, Tier.REMOTE)}
        self.actual = {t: hw.achieved(t) for t in (Tier.DRAM, Tier.SSD, Tier.REMOTE)}
        self.calibration = Calibration()
        self.overhead = hw.fresh_process_s if policy.fresh_process else hw.overhead_s
        spec = DeciderSpec(target=config.capacity * config.target_utilization, total=float(config.capacity),
                           keep_alive=config.keep_alive_s if policy.keep_alive else None)
        self.services = {m.name: Service(m.name, m, spec, initial_state(spec, 0.0)) for m in models}
        self.active: dict[str, Service] = {}
        self.instances: dict[str, SimInstance] = {}
        self.heap: list[tuple[float, int, str, object, object]] = []
        self.seq = 0
        self.now = 0.0
        self.ids = 0
        self.first: dict[int, float] = {}
        self.end: dict[int, float] = {}
        self.stats = Stats()
        self._waiting_destinations: list[_Process] = []
        self.trace: list[tuple[str, str, str, str, float]] = []  # ("start", instance, node, tier, time)
        self.last_arrival = self.requests[-1].arrival if self.requests else 0.0
        self.horizon = self.last_arrival + config.tail_s

    def preload(self, node: str, model: str, tier: Tier) -> None:
        """Put `model`'s checkpoint in `tier` (DRAM or SSD) of `node` before the run starts."""
        n = self.nodes.get(node)
        if n is None:
            raise ValueError(f"preload: unknown node {node!r}; nodes are {', '.join(self.nodes)}")
        if model not in self.models:
            raise ValueError(f"preload: unknown model {model!r}")
        lru = {Tier.DRAM: n.dram, Tier.SSD: n.ssd}.get(tier)
        if lru is None:
            raise ValueError(f"preload: policy {self.policy.name} keeps no {tier} tier on {node}")
        lru.add(model, self.models[model].size_bytes)
        self.holders.setdefault(model, set()).add(node)

    # -- the event loop ------------------------------------------------------------------------

    def push(self, t: float, kind: str, a: object = None, b: object = None) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, a, b))

    def run(self) -> Simulation:
        for r in self.requests:
            self.push(r.arrival, "arrival", r)
        self.push(0.0, "second")
        handlers = {"arrival": self._arrival, "second": self._second, "done": self._done, "loaded": self._loaded,
                    "ready": self._ready, "migrated": self._migrated, "timeout": self._timeout}
        heap, pop = self.heap, heapq.heappop
        while heap:
            t, _, kind, a, b = pop(heap)
            if t > self.horizon:
                break
            self.now = t
            self.stats.events += 1
            handlers[kind](a, b)
        self.now = min(self.now, self.horizon) if heap else self.now
        for inst in list(self.instances.values()):
            self._release(inst)
        return self

    # -- requests --------------------------------------------------------------------------------

    def _arrival(self, req: object, _: object) -> None:
        assert isinstance(req, Request)
        svc = self.services[req.model]
        svc.waiting.append(req)
        svc.last_request_at = self.now
        self.active[svc.name] = svc
        svc.active = True
        self._route(svc)
        if svc.waiting and not svc.instances:
            svc.window = svc.window.record(self.now, self._concurrency(svc))
            self._decide(svc)

    def _concurrency(self, svc: Service) -> float:
        return len(svc.waiting) + sum(len(i.running) for i in svc.instances)

    def _route(self, svc: Service) -> None:
        """Admit waiting requests onto ready instances with room, the least loaded first."""
        if not svc.waiting:
            return
        ready = [i for i in svc.instances if i.state == InstanceState.READY and len(i.running) < self.cfg.capacity]
        while svc.waiting and ready:
            inst = min(ready, key=lambda i: len(i.running))
            self._admit(inst, svc.waiting.popleft())
            if len(inst.running) >= self.cfg.capacity:
                ready.remove(inst)

    def _admit(self, inst: SimInstance, req: Request) -> None:
        m = inst.model
        first = self.now + self.hw.prefill_s(req.prompt, m.params, m.tp)
        end = first + (req.output - 1) * inst.step_s
        run = Running(req, self.now, first, end)
        inst.running[req.id] = run
        self.first.setdefault(req.id, first)
        self.push(end, "done", inst, run)

    def _done(self, inst: object, run: object) -> None:
        assert isinstance(inst, SimInstance) and isinstance(run, Running)
        if inst.running.get(run.req.id) is not run:
            return  # moved by a migration (a new event was pushed) or restarted
        del inst.running[run.req.id]
        self.end[run.req.id] = self.now
        svc = self.services[inst.service]
        svc.last_request_at = self.now
        if inst.state == InstanceState.READY:
            self._route(svc)
        elif not inst.running and inst.waiter is not None:
            proc, inst.waiter = inst.waiter, None
            proc.progress = _replace(proc.progress, idle=True)
            self._advance(proc)

    # -- the scaler ------------------------------------------------------------------------------

    def _second(self, _a: object, _b: object) -> None:
        decide_now = int(round(self.now)) % int(TICK_S) == 0
        services = list(self.active.values())
        if decide_now:
            # The real autoscaler scales services concurrently, in no set order; here the service
            # whose oldest request has waited longest places first, so that a fixed iteration
            # order does not starve the same services every tick.
            services.sort(key=lambda s: s.waiting[0].arrival if s.waiting else math.inf)
        for svc in services:
            # A zero sample is recorded only when the decider runs next: between two samples an
            # absent second counts as zero in the window's average anyway (autoscaler/window.py),
            # so the averages the decider sees are the same, at a fraction of the records.
            value = self._concurrency(svc)
            if value or decide_now:
                svc.window = svc.window.record(self.now, value)
            if decide_now:
                self._decide(svc)
            if (not svc.instances and not svc.waiting and svc.state.scale == 0
                    and self.now - (svc.last_request_at or 0.0) > svc.spec.stable_window):
                svc.active = False
                del self.active[svc.name]
        if self.now < self.horizon and (self.active or self.now < self.last_arrival):
            self.push(self.now + 1.0, "second")

    def _decide(self, svc: Service) -> None:
        ready = sum(1 for i in svc.instances if i.state == InstanceState.READY)
        decision, svc.state = decide(svc.spec, DeciderInputs(svc.window, ready, svc.last_request_at),
                                     svc.state, self.now)
        if not decision.valid or decision.desired is None:
            return
        svc.desired = decision.desired
        current = [i for i in svc.instances if i.state in (InstanceState.STARTING, InstanceState.READY)]
        if svc.desired > len(current):
            for _ in range(svc.desired - len(current)):
                if not self._place(svc):
                    self.stats.unplaced += 1
                    break
        elif svc.desired < len(current):
            views = [self._view(i) for i in current if i.state == InstanceState.READY and not i.claimed]
            for victim in choose_victims(views, min(len(views), len(current) - svc.desired)):
                inst = self.instances[victim.name]
                inst.claimed = True
                self._advance(_Process("drain", inst))

    # -- placement -------------------------------------------------------------------------------

    def _place(self, svc: Service) -> bool:
        self.stats.placements += 1
        if self.policy.placer == Placer.LOAD_TIME:
            return self._place_load_time(svc)
        if self.policy.placer == Placer.PREEMPT:
            return self._place_preempt(svc)
        return self._place_random(svc)

    def _request(self, svc: Service) -> ModelRequest:
        starving = bool(svc.waiting) and self.now - svc.waiting[0].arrival >= self.cfg.fair_share_after_s
        return ModelRequest(svc.model.name, svc.model.size_bytes, service=svc.name,
                            holding=len(svc.instances), starving=starving)

    def _shortlist(self, model: Model) -> list[SimNode]:
        if len(self.node_list) <= SHORTLIST_ALL:
            return self.node_list
        chosen = {n: self.nodes[n] for n in sorted(self.holders.get(model.name, ()))}
        free = [n for n in self.node_list if n.free_gpus >= model.tp and n.name not in chosen]
        free.sort(key=lambda n: (max(0.0, n.loader_free_at - self.now), n.free_gpus, n.name))
        for n in free[:SHORTLIST]:
            chosen[n.name] = n
        if len(free) < SHORTLIST:
            busy = [n for n in self.node_list if n.name not in chosen
                    and any(i.state == InstanceState.READY and i.model.tp + n.free_gpus >= model.tp
                            for i in n.instances.values())]
            busy.sort(key=lambda n: (sum(len(i.running) for i in n.instances.values()), n.name))
            for n in busy[:SHORTLIST]:
                chosen[n.name] = n
        return list(chosen.values())

    def _place_load_time(self, svc: Service) -> bool:
        nodes = self._shortlist(svc.model)
        models = {svc.model.name} | {i.model.name for n in nodes for i in n.instances.values()}
        invs = [self._inventory(n, svc.model, models) for n in nodes]
        p = place(self._request(svc), invs, self.calibration if self.policy.calibrate else None)
        if p.chosen is None or p.node is None:
            return self._gang_evict(svc, nodes)
        node = self.nodes[p.node]
        if p.action == Action.PLACE:
            self._start(svc, node)
            return True
        if p.action in (Action.EVICT, Action.MIGRATE):
            victim = self.instances[p.chosen.victim or ""]
            victim.claimed = True
            successor = self._start(svc, node, wait_for_gpus=True)
            self._advance(_Process("preempt", victim, p.chosen, successor=successor))
            return True
        return False  # WAIT: the scaler tries again on its next tick

    def _place_random(self, svc: Service) -> bool:
        tp = svc.model.tp
        free = [n for n in self.node_list if n.free_gpus >= tp]
        if free:
            self._start(svc, self.rng.choice(free))
            return True
        if self.policy.fresh_process:
            return False  # Kubernetes: the pod stays pending until GPUs free up
        req = self._request(svc)
        idle = [i for i in self.instances.values() if i.state == InstanceState.READY and not i.running
                and not i.claimed and i.model.tp + self.nodes[i.node].free_gpus >= tp
                and displaceable(self._view(i), req) is None]
        if not idle:
            return self._gang_evict(svc, self.node_list)
        victim = self.rng.choice(idle)
        self.stats.evictions += 1
        self._stop(victim)
        self._start(svc, self.nodes[victim.node])
        return True

    def _place_preempt(self, svc: Service) -> bool:
        """Shepherd*-like: the node where the model starts fastest (its fastest copy, its loader
        queue) wins; with no free GPUs there, an instance of another service is preempted."""
        req = self._request(svc)
        tp = svc.model.tp
        nodes = self._shortlist(svc.model)
        ranked = sorted(nodes, key=lambda n: (startup(req, self._inventory(n, svc.model, {svc.model.name})).total_s,
                                              n.name))
        for node in ranked:
            if node.free_gpus >= tp:
                self._start(svc, node)
                return True
            victims = [i for i in node.instances.values() if i.state == InstanceState.READY and not i.claimed
                       and i.model.tp + node.free_gpus >= tp and displaceable(self._view(i), req) is None]
            if victims:
                victim = min(victims, key=lambda i: (len(i.running), i.id))
                if victim.running:
                    self.stats.preemptions += 1
                else:
                    self.stats.evictions += 1
                self._kill(victim)
                self._start(svc, node)
                return True
        return self._gang_evict(svc, nodes)

    def _gang_evict(self, svc: Service, nodes: Sequence[SimNode]) -> bool:
        """A model over several GPUs when no single instance frees enough of them: on the node
        with the most GPUs free or held by idle instances that `displaceable` lets go (at least
        `tp`), stop idle ones, the smallest first, until the model fits. Placement has one victim
        per option, so this step is the simulator's (stated in docs/evaluation.md)."""
        tp = svc.model.tp
        if tp == 1 or self.policy.fresh_process:
            return False
        req = self._request(svc)
        best: tuple[int, str, list[SimInstance]] | None = None
        for node in nodes:
            idle = sorted((i for i in node.instances.values() if i.state == InstanceState.READY and not i.running
                           and not i.claimed and displaceable(self._view(i), req) is None),
                          key=lambda i: (i.model.tp, i.id))
            have = node.free_gpus + sum(i.model.tp for i in idle)
            if have >= tp and (best is None or (have, node.name) > (best[0], best[1])):
                best = (have, node.name, idle)
        if best is None:
            return False
        node = self.nodes[best[1]]
        for victim in best[2]:
            if node.free_gpus >= tp:
                break
            self.stats.evictions += 1
            self._stop(victim)
        self._start(svc, node)
        return True

    def _inventory(self, node: SimNode, model: Model, models: Iterable[str]) -> NodeInventory:
        prestaged = self.policy.prestaged_ssd
        checkpoints = {m: t for m in models if (t := node.tier_of(m, prestaged)) != Tier.REMOTE}
        queue = []
        for j in node.pending_jobs(self.now):
            left = j.size if j.start >= self.now else j.size * (j.end - self.now) / (j.end - j.start)
            queue.append(QueuedLoad(j.model, int(left), j.tier))
        tp = model.tp
        views = tuple(self._view(i) for i in node.instances.values()
                      if i.model.name != model.name and i.model.tp + node.free_gpus >= tp or i.service == model.name)
        return NodeInventory(node.name, self.bandwidth, checkpoints, tuple(queue), free_slots=node.free_gpus // tp,
                             instances=views, instance_overhead_s=self.overhead)

    def _view(self, inst: SimInstance) -> Instance:
        svc = self.services[inst.service]
        step = inst.step_s
        return Instance(
            inst.id, inst.model.name, inst.model.size_bytes, inflight=len(inst.running),
            tokens=sum(r.tokens_at(self.now, step) for r in inst.running.values()),
            capacity=self.cfg.capacity, migratable=self.policy.migration,
            ready=inst.state == InstanceState.READY and not inst.claimed,
            protected=inst.ready_at is not None and self.now - inst.ready_at < self.cfg.min_residency_s,
            service_waiting=len(svc.waiting), service_instances=max(1, len(svc.instances)), service=svc.name)

    # -- instances -------------------------------------------------------------------------------

    def _start(self, svc: Service, node: SimNode, wait_for_gpus: bool = False) -> SimInstance:
        m = svc.model
        self.ids += 1
        tier = Tier.REMOTE if not (self.policy.dram_tier or self.policy.ssd_cache or self.policy.prestaged_ssd) \
            else node.tier_of(m.name, self.policy.prestaged_ssd)
        inst = SimInstance(f"i{self.ids}", svc.name, m, node.name, InstanceState.STARTING, self.now, tier,
                           self.hw.decode_step_s(m.params, m.tp))
        self.instances[inst.id] = inst
        node.instances[inst.id] = inst
        self.trace.append(("start", inst.id, node.name, str(tier), self.now))
        svc.instances.append(inst)
        joined = next((j for j in node.pending_jobs(self.now) if j.model == m.name), None)
        if joined is not None:
            inst.load_end = joined.end
            inst.tier = joined.tier
            self.stats.cold_starts["joined"] = self.stats.cold_starts.get("joined", 0) + 1
        else:
            for lru in (node.dram, node.ssd):
                if lru is not None:
                    lru.touch(m.name)
            rate = self.actual[tier] if tier == Tier.DRAM else min(self.actual[tier], self.actual[Tier.DRAM])
            rate *= math.exp(self.noise.gauss(0.0, self.hw.load_noise)) if self.hw.load_noise else 1.0
            start = max(self.now, node.loader_free_at)
            job = LoadJob(m.name, m.size_bytes, tier, start, start + m.size_bytes / rate)
            node.loader_free_at = job.end
            node.jobs.append(job)
            self.holders.setdefault(m.name, set()).add(node.name)
            inst.load_end = job.end
            self.push(job.end, "loaded", node, job)
            self.stats.cold_starts[str(tier)] = self.stats.cold_starts.get(str(tier), 0) + 1
        if not wait_for_gpus:
            self._take_gpus(inst)
        return inst

    def _take_gpus(self, inst: SimInstance) -> None:
        node = self.nodes[inst.node]
        if node.free_gpus < inst.model.tp:
            raise AssertionError(f"{inst.id} on {node.name}: {node.free_gpus} free GPUs, needs {inst.model.tp}")
        node.free_gpus -= inst.model.tp
        inst.gpus_held = True
        inst.placed_at = self.now
        assert inst.load_end is not None
        self.push(max(self.now, inst.load_end) + self.overhead, "ready", inst)

    def _loaded(self, node: object, job: object) -> None:
        assert isinstance(node, SimNode) and isinstance(job, LoadJob)
        for lru in (node.dram, node.ssd if job.tier == Tier.REMOTE else None):
            if lru is None:
                continue
            for gone in lru.add(job.model, job.size):
                if node.tier_of(gone, self.policy.prestaged_ssd) == Tier.REMOTE:
                    self.holders.get(gone, set()).discard(node.name)
        if node.tier_of(job.model, self.policy.prestaged_ssd) == Tier.REMOTE:
            self.holders.get(job.model, set()).discard(node.name)
        if self.policy.calibrate and job.tier != Tier.DEVICE:
            self.calibration = observe_load(self.calibration, LoadObservation(node.name, job.tier, job.size,
                                                                                job.end - job.start),
                                            profile_bandwidth=self.bandwidth[job.tier])

    def _ready(self, inst: object, _: object) -> None:
        assert isinstance(inst, SimInstance)
        if inst.state != InstanceState.STARTING:
            return
        inst.state = InstanceState.READY
        inst.ready_at = self.now
        if self.policy.calibrate:
            self.calibration = observe_start(self.calibration, inst.node, self.overhead)
        self._route(self.services[inst.service])
        for proc in [p for p in self._waiting_destinations if p.destination is inst]:
            self._waiting_destinations.remove(proc)
            proc.progress = _replace(proc.progress, destination=inst.id)
            self._advance(proc)

    def _stop(self, inst: SimInstance) -> None:
        """Stop an instance: its GPUs are free (handed to the instance waiting for them, if any)."""
        if inst.state == InstanceState.STOPPED:
            return
        self._release(inst)
        svc = self.services[inst.service]
        svc.instances.remove(inst)
        del self.nodes[inst.node].instances[inst.id]
        del self.instances[inst.id]
        inst.state = InstanceState.STOPPED
        for run in inst.running.values():  # generations still on it are lost: they restart
            self._restart(run, inst.step_s)
        inst.running.clear()
        self._route(svc)

    def _release(self, inst: SimInstance) -> None:
        if inst.gpus_held:
            inst.gpus_held = False
            self.nodes[inst.node].free_gpus += inst.model.tp
            self.stats.gpu_seconds += (self.now - inst.placed_at) * inst.model.tp

    def _kill(self, victim: SimInstance) -> None:
        """Preemption-based: the victim stops now; its generations restart from scratch."""
        self._stop(victim)

    def _restart(self, run: Running, step: float) -> None:
        self.stats.restarted += 1
        self.stats.lost_tokens += run.tokens_at(self.now, step) - run.req.prompt
        if run.first > self.now:
            self.first.pop(run.req.id, None)
        svc = self.services[run.req.model]
        svc.waiting.appendleft(run.req)

    # -- preemption and drain, as the real plans say ----------------------------------------------

    def _migrated(self, proc: object, attempt: object) -> None:
        assert isinstance(proc, _Process) and isinstance(attempt, MigrationAttempt)
        proc.progress = _replace(proc.progress, migration=attempt)
        self._advance(proc)

    def _timeout(self, proc: object, _: object) -> None:
        """WaitIdle's time is up: the victim still runs something (else it would have resumed)."""
        assert isinstance(proc, _Process)
        if proc.done or proc.victim.waiter is not proc:
            return
        proc.victim.waiter = None
        proc.progress = _replace(proc.progress, idle=False)
        self._advance(proc)

    def _advance(self, proc: _Process) -> None:
        """Run the plan's steps until one needs time (an event resumes it) or the plan is empty."""
        while not proc.done:
            steps = self._plan(proc)
            if not steps:
                self._finish(proc)
                return
            if not self._execute(proc, steps[0]):
                return

    def _plan(self, proc: _Process) -> tuple[Step, ...]:
        v = proc.victim
        alive = v.state != InstanceState.STOPPED
        view = VictimView(v.id, v.service, v.node, v.state, len(v.running)) if alive else None
        if proc.kind == "drain":
            return plan_drain(DrainView(view, proc.progress))
        assert proc.option is not None
        tier = Tier.REMOTE
        if proc.option.destination and proc.option.starts_destination:
            tier = self.nodes[proc.option.destination].tier_of(v.model.name, self.policy.prestaged_ssd)
        return plan_preemption(PreemptionView(proc.option, view, tier, proc.progress))

    def _execute(self, proc: _Process, step: Step) -> bool:
        """Run one step; False when it takes time (the process resumes on an event)."""
        v = proc.victim
        if isinstance(step, LeaveRotation):
            v.state = InstanceState.DRAINING
            proc.progress = _replace(proc.progress, left_rotation=True)
            return True
        if isinstance(step, StartDestination):
            svc = self.services[step.service]
            node = self.nodes[step.node]
            if node.free_gpus < v.model.tp:
                proc.progress = _replace(proc.progress, destination_failed=True)
                return True
            proc.destination = self._start(svc, node)
            self._waiting_destinations.append(proc)
            return False
        if isinstance(step, Migrate):
            return self._migrate(proc, step)
        if isinstance(step, WaitIdle):
            if not v.running:
                proc.progress = _replace(proc.progress, idle=True)
                return True
            v.waiter = proc
            self.push(self.now + step.timeout_s, "timeout", proc)
            return False
        if isinstance(step, Stop):
            if proc.kind == "preempt" and proc.option is not None and proc.option.action == Action.EVICT:
                self.stats.evictions += 1
            self._stop(v)
            proc.progress = _replace(proc.progress, stopped=True)
            return True
        if isinstance(step, CallOff):
            self.stats.called_off += 1
            v.claimed = False
            if step.restore and v.state == InstanceState.DRAINING:
                v.state = InstanceState.READY
                self._route(self.services[v.service])
            proc.done = True
            if proc.successor is not None:  # the instance that waited for the slot is not started
                self._abandon(proc.successor)
            return False
        raise AssertionError(f"unknown step {step}")

    def _migrate(self, proc: _Process, step: Migrate) -> bool:
        v = proc.victim
        dest: SimInstance | None = None
        if step.destination:
            dest = self.instances.get(step.destination)
        elif step.started_on and proc.destination is not None:
            dest = proc.destination
        elif self.policy.migration:
            room = [i for i in self.services[v.service].instances if i is not v and i.state == InstanceState.READY
                    and self.cfg.capacity - len(i.running) >= len(v.running)]
            dest = min(room, key=lambda i: (len(i.running), i.id)) if room else None
        if dest is None or not self.policy.migration or dest.state != InstanceState.READY:
            proc.progress = _replace(proc.progress, migration=MigrationAttempt(refused=True))
            return True
        runs = list(v.running.values())
        if not runs:
            proc.progress = _replace(proc.progress, migration=MigrationAttempt(outcomes=()))
            return True
        tokens = sum(r.tokens_at(self.now, v.step_s) for r in runs)
        seconds = self.hw.prefill_s(tokens, dest.model.params, dest.model.tp)
        t_end = self.now + seconds
        outcomes = []
        for r in runs:
            if r.end <= t_end:
                outcomes.append(MigrationOutcome.FINISHED_ON_SOURCE)
                continue
            del v.running[r.req.id]
            moved = Running(r.req, t_end, r.first, r.end)
            dest.running[r.req.id] = moved
            self.push(moved.end, "done", dest, moved)
            outcomes.append(MigrationOutcome.MIGRATED)
        self.stats.migrations += outcomes.count(MigrationOutcome.MIGRATED)
        self.stats.migrated_tokens += tokens
        if self.policy.calibrate:
            self.calibration = observe_migration(self.calibration, MigrationObservation(tokens, seconds))
        # Generations that end before the handoff finish on the source; the others continue on
        # the destination from the handoff (their end times do not change).
        self.push(t_end, "migrated", proc, MigrationAttempt(outcomes=tuple(outcomes)))
        return False

    def _finish(self, proc: _Process) -> None:
        proc.done = True
        succ = proc.successor
        if succ is not None and succ.state == InstanceState.STARTING:
            if self.nodes[succ.node].free_gpus >= succ.model.tp:
                self._take_gpus(succ)
            else:  # the node's other free GPUs went to someone else meanwhile
                self.stats.called_off += 1
                self._abandon(succ)

    def _abandon(self, inst: SimInstance) -> None:
        if inst.state == InstanceState.STOPPED:
            return
        self._stop(inst)

    # -- results ---------------------------------------------------------------------------------

    def ttfts(self) -> list[float]:
        """Per request, its first token's time after arrival; unserved ones count as waiting until the end."""
        out = []
        for r in self.requests:
            f = self.first.get(r.id)
            out.append((f if f is not None and r.id in self.end else max(self.now, r.arrival)) - r.arrival)
        return out

    def latencies(self) -> list[float]:
        return [self.end.get(r.id, max(self.now, r.arrival)) - r.arrival for r in self.requests]


def _replace(p: Progress, **changes: object) -> Progress:
    import dataclasses

    return dataclasses.replace(p, **changes)  # type: ignore[arg-type]
