"""The discrete-event cluster simulator: virtual time on an event heap (the arrivals, known up
front, in a sorted list merged with it), the real policy code.

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
- The scaler (`autoscaler.decider.decide`) runs per service every TICK_S on the activator's
  report of every second (the second's time-weighted average concurrency, and busy when a
  request started in it or is in flight), at once when a request finds its service at zero, and where its
  last decision said it changes by itself (a keep-alive's end), as the autoscaler does.
- Placement is `sllm_knative.placement.place` (load-time policies), with the calibration
  (`observe_load`, `observe_start`, `observe_migration`) folded in for calibrated ones; EVICT
  and MIGRATE run `autoscaler.preemption.plan_preemption` step by step, scale-down victims
  come from `choose_victims` and drain with `plan_drain`.
- Migration is token-based: the destination re-prefills the tokens so far (prompt and
  generated) while the source keeps decoding; the generation then continues there, and the
  source's GPUs are free when the last one moved. Preemption (preemption-based policy) kills
  the victim; its generations restart from scratch in their service's queue.

The simulator in four modules:

    engine.py     this: the event loop (`Simulation.run`), requests (arrival, admission,
                  completion) and the instance lifecycle (load, ready, stop, GPU accounting)
    cluster.py    the cluster's state as data: nodes with GPUs, DRAM/SSD tiers (LRU) and a
                  loader queue; instances, services, running generations, counters
    adapters.py   the calls into the real policy code: the scaler tick (`decide`) and placement
                  (`place`, `startup`, `choose_victims`)
    plans.py      preemptions and drains run step by step by the real plans (`plan_preemption`,
                  `plan_drain`)
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import random
from collections.abc import Callable, Sequence
from functools import partial

from autoscaler.backends.base import InstanceState
from autoscaler.decider import DeciderSpec, initial_state
from sim import adapters, plans
from sim.cluster import LoadJob, Lru, Process, Running, Service, SimConfig, SimInstance, SimNode, Stats
from sim.hardware import HardwareProfile
from sim.policies import Policy
from sim.workload import Model, Request
from sllm_knative.config import AutoscalerConfig, panic_window
from sllm_knative.placement import Calibration, LoadObservation, Tier, observe_load, observe_start

__all__ = ["Simulation"]


def _arrival_time(req: Request) -> float:
    return req.arrival


class Simulation:
    """One run: build it, `preload` checkpoints if wanted, `run()`, then read `stats`, `ttfts()`,
    `latencies()` and `trace`. The methods without a leading underscore are also called by the
    policy adapters (adapters.py): `push` an event, `route` a service's queue, `start`, `stop`,
    `kill` an instance, `take_gpus` for one, `release` its GPUs, `concurrency` of a service."""

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
                                           Lru(hw.ssd_tier_bytes) if policy.ssd_cache else None,
                                           leased_in_dram=not policy.dram_tier and not policy.fresh_process)
                      for i in range(config.nodes)}
        self.node_list = list(self.nodes.values())
        self.holders: dict[str, set[str]] = {}  # model -> nodes holding it in a tier or loading it
        self.bandwidth = {t: hw.nominal[t] for t in (Tier.DRAM, Tier.SSD, Tier.REMOTE)}
        self.actual = {t: hw.achieved(t) for t in (Tier.DRAM, Tier.SSD, Tier.REMOTE)}
        self.calibration = Calibration()
        self.overhead = hw.fresh_process_s if policy.fresh_process else hw.overhead_s
        # Fresh processes on shared cores (`_share`): the start work left of each, when it was
        # last brought up to date, and the generation of the "shared" events that are current.
        self.sharing = bool(hw.shared_cores) and policy.fresh_process
        self.start_cores = hw.start_cores or float(hw.shared_cores)
        self.work_left: dict[str, float] = {}
        self.work_at = 0.0
        self.work_gen = 0
        spec = DeciderSpec(target=config.capacity * config.target_utilization, total=float(config.capacity),
                           keep_alive=config.keep_alive_s if policy.keep_alive else None,
                           max_scale=config.max_scale)
        if config.stable_window_s is not None:
            spec = dataclasses.replace(spec, stable_window=config.stable_window_s, panic_window=panic_window(
                config.stable_window_s, AutoscalerConfig().panic_window_percentage))
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
        self.waiting_destinations: list[Process] = []
        self.pending: list[Service] = []  # fresh-process policies: services whose pod waits for GPUs
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
        m = self.models[model]
        lru.add(m.key, m.size_bytes)
        self.holders.setdefault(m.key, set()).add(node)

    # -- the event loop ------------------------------------------------------------------------

    def push(self, t: float, kind: str, a: object = None, b: object = None) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, a, b))

    def run(self) -> Simulation:
        # The arrivals are known up front: they stay in one sorted list, merged with the heap as
        # the loop goes, instead of 200,000 entries in it (a heap of the events in flight pops in
        # fewer, cache-warm steps). An arrival comes first at a tie with a heap event.
        arrivals = sorted(self.requests, key=_arrival_time)  # stable: ties in request order
        self.push(0.0, "second")
        handlers: dict[str, Callable[[object, object], None]] = {
            "second": partial(adapters.tick, self), "done": self._done,
            "loaded": self._loaded, "ready": self._ready, "migrated": partial(plans.migrated, self),
            "timeout": partial(plans.timeout, self), "recheck": self._recheck, "shared": self._shared, "stopped": partial(plans.stopped, self)}
        heap, pop, horizon, events, arrival = self.heap, heapq.heappop, self.horizon, 0, self._arrival
        nxt = iter(arrivals)
        req = next(nxt, None)
        due = req.arrival if req is not None else math.inf
        while True:
            if heap and heap[0][0] < due:
                t, _, kind, a, b = pop(heap)
                if t > horizon:
                    break
                self.now = t
                events += 1
                handlers[kind](a, b)
            elif req is not None:
                if due > horizon:
                    break
                self.now = due
                events += 1
                r, req = req, next(nxt, None)
                due = req.arrival if req is not None else math.inf
                arrival(r, None)
            else:
                break
        self.stats.events += events
        for inst in list(self.instances.values()):
            self.release(inst)
        return self

    # -- requests --------------------------------------------------------------------------------

    def _arrival(self, req: object, _: object) -> None:
        assert isinstance(req, Request)
        svc = self.services[req.model]
        self._integrate(svc)
        svc.waiting.append(req)
        svc.started = True
        self.active[svc.name] = svc
        svc.active = True
        self.route(svc)
        if svc.waiting and not any(i.state == InstanceState.READY for i in svc.instances):
            # The activator's demand: it holds the request with no instance of the service in
            # rotation (none, or only starting or draining ones) and tells the autoscaler now.
            svc.last_request_at = self.now
            self.sample(svc, self.concurrency(svc))
            adapters.scale(self, svc)

    def _integrate(self, svc: Service) -> None:
        """Bring the service's concurrency integral up to now (before its concurrency changes:
        a request arrives or completes)."""
        svc.area += self.concurrency(svc) * (self.now - svc.area_at)
        svc.area_at = self.now

    def _recheck(self, svc: object, _: object) -> None:
        """Where the scaler's last decision said it changes by itself (the end of a keep-alive,
        `Decision.recheck_in_s`), it decides again, between its ticks, as the autoscaler does."""
        assert isinstance(svc, Service)
        if svc.name not in self.active:
            return
        self.sample(svc, self.concurrency(svc))
        adapters.scale(self, svc)

    def sample(self, svc: Service, value: float) -> None:
        """Record a concurrency sample in the service's window (and when it was above the target)."""
        svc.window = svc.window.record(self.now, value)
        if value > svc.spec.target:
            svc.hot_at = self.now

    def concurrency(self, svc: Service) -> float:
        n = len(svc.waiting)
        for i in svc.instances:  # a loop, not sum() over a generator: most services have one instance
            n += len(i.running)
        return n

    def route(self, svc: Service) -> None:
        """Admit waiting requests onto ready instances with room, the least loaded first (the
        first of equals, in the service's order)."""
        waiting = svc.waiting
        capacity, ready = self.cfg.capacity, InstanceState.READY
        while waiting:
            best, least = None, capacity
            for i in svc.instances:
                n = len(i.running)
                if n < least and i.state == ready:
                    best, least = i, n
            if best is None:
                return
            self._admit(best, waiting.popleft())

    def _admit(self, inst: SimInstance, req: Request) -> None:
        m = inst.model
        prefill = self.hw.prefill_s(req.prompt, m.params, m.tp)
        if self.hw.compute_noise:
            prefill *= math.exp(self.noise.gauss(0.0, self.hw.compute_noise))
        if self.sharing and self.work_left:  # fresh processes importing share the cores with this prefill
            prefill *= max(1.0, (len(self.work_left) + 1) / self.hw.shared_cores)
        if self.hw.serial_prefill:  # one forward at a time: after the prefills admitted before it
            first = max(self.now, inst.compute_free_at) + prefill
            inst.compute_free_at = first
        else:
            first = self.now + prefill
        end = first + (req.output - 1) * inst.step_s
        run = Running(req, self.now, first, end)
        inst.running[req.id] = run
        self.first.setdefault(req.id, first)
        self.seq += 1  # self.push, inline: one a request
        heapq.heappush(self.heap, (end, self.seq, "done", inst, run))

    def _done(self, inst: object, run: object) -> None:
        assert isinstance(inst, SimInstance) and isinstance(run, Running)
        if inst.running.get(run.req.id) is not run:
            return  # moved by a migration (a new event was pushed) or restarted
        svc = self.services[inst.service]
        self._integrate(svc)
        del inst.running[run.req.id]
        self.end[run.req.id] = self.now
        svc.last_end_at = self.now
        if inst.state == InstanceState.READY:
            if svc.waiting:
                self.route(svc)
        elif not inst.running and inst.waiter is not None:
            proc, inst.waiter = inst.waiter, None
            plans.victim_idle(self, proc)

    # -- instances -------------------------------------------------------------------------------

    def start(self, svc: Service, node: SimNode, wait_for_gpus: bool = False, load_from: float = 0.0) -> SimInstance:
        """A new instance of `svc` on `node`. A preemption's successor (`wait_for_gpus`) has its
        checkpoint warmed at the decision, as the autoscaler does: a fill from the SSD or the
        store starts now, and only its last hop (DRAM to device, `hop_s`) waits for the GPUs; a
        load from DRAM is that hop alone and starts at `load_from` at the earliest (an
        eviction's successor: once the victim has stopped)."""
        m = svc.model
        self.ids += 1
        tier = Tier.REMOTE if not (self.policy.dram_tier or self.policy.ssd_cache or self.policy.prestaged_ssd) \
            else node.tier_of(m.key, self.policy.prestaged_ssd)
        inst = SimInstance(f"i{self.ids}", svc.name, m, node.name, InstanceState.STARTING, self.now, tier,
                           self.hw.decode_step_s(m.params, m.tp))
        self.instances[inst.id] = inst
        node.instances[inst.id] = inst
        self.trace.append(("start", inst.id, node.name, str(tier), self.now))
        svc.instances.append(inst)
        joined = next((j for j in node.pending_jobs(self.now) if j.model == m.key), None)
        if joined is not None:
            inst.load_end = joined.end
            inst.tier = joined.tier
            self.stats.cold_starts["joined"] = self.stats.cold_starts.get("joined", 0) + 1
        else:
            for lru in (node.dram, node.ssd):
                if lru is not None:
                    lru.touch(m.key)
            rate = self.actual[tier] if tier == Tier.DRAM else min(self.actual[tier], self.actual[Tier.DRAM])
            sigma = self.hw.tier_noise.get(tier, self.hw.load_noise)
            rate *= math.exp(self.noise.gauss(0.0, sigma)) if sigma else 1.0
            if self.policy.fresh_process:
                rate /= self.hw.fresh_load_factor
            warmed = wait_for_gpus and tier in (Tier.SSD, Tier.REMOTE)
            start = max(self.now, node.loader_free_at, self.now if warmed else load_from)
            job = LoadJob(m.key, m.size_bytes, tier, start, start + m.size_bytes / rate)
            if warmed:
                inst.hop_s = m.size_bytes / self.actual[Tier.DRAM]
            node.loader_free_at = job.end
            node.jobs.append(job)
            self.holders.setdefault(m.key, set()).add(node.name)
            inst.load_end = job.end
            self.push(job.end, "loaded", node, job)
            self.stats.cold_starts[str(tier)] = self.stats.cold_starts.get(str(tier), 0) + 1
        if not wait_for_gpus:
            self.take_gpus(inst)
        return inst

    def take_gpus(self, inst: SimInstance) -> None:
        node = self.nodes[inst.node]
        if node.free_gpus < inst.model.tp:
            raise AssertionError(f"{inst.id} on {node.name}: {node.free_gpus} free GPUs, needs {inst.model.tp}")
        node.free_gpus -= inst.model.tp
        inst.gpus_held = True
        inst.placed_at = self.now
        assert inst.load_end is not None
        overhead = self.overhead
        if self.sharing:
            self._share(add=inst.id)
            return
        if self.hw.shared_cores:  # the starts in progress (this one included) share the cores
            starting = sum(1 for i in self.instances.values() if i.state == InstanceState.STARTING and i.gpus_held)
            overhead *= max(1.0, starting / self.hw.shared_cores)
        self.push(max(self.now + inst.hop_s, inst.load_end) + overhead + self.hw.activation_s, "ready", inst)

    def _share(self, add: str | None = None, remove: str | None = None) -> None:
        """Processor sharing of the fresh processes' start work (`self.sharing`): every start in
        its work phase runs at min(1, cores / starts in that phase), so a start slows down when
        another begins beside it and speeds up when one ends, as the imports of processes
        started together do (each is `fresh_process_s` of work alone). Brings every start's work
        up to now, adds or removes one, and schedules when each will be done at the new rate."""
        if self.work_left:
            rate = min(1.0, self.start_cores / len(self.work_left))
            spent = (self.now - self.work_at) * rate
            for k in self.work_left:
                self.work_left[k] -= spent
        self.work_at = self.now
        if add is not None:
            self.work_left[add] = self.overhead
        if remove is not None:
            self.work_left.pop(remove, None)
        self.work_gen += 1
        if self.work_left:
            rate = min(1.0, self.start_cores / len(self.work_left))
            for k, left in self.work_left.items():
                self.push(self.now + max(0.0, left) / rate, "shared", self.instances[k], self.work_gen)

    def _shared(self, inst: object, gen: object) -> None:
        """A fresh process's start work is done (if `gen` is still current): it loads its
        checkpoint (the imports come before `from_pretrained`) and is ready after that."""
        assert isinstance(inst, SimInstance)
        if gen != self.work_gen or inst.id not in self.work_left:
            return
        self._share(remove=inst.id)
        assert inst.load_end is not None
        load = max(0.0, inst.load_end - inst.placed_at)
        self.push(self.now + load + self.hw.activation_s, "ready", inst)

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
        self.route(self.services[inst.service])
        plans.destination_ready(self, inst)

    def stop(self, inst: SimInstance) -> None:
        """Stop an instance: its GPUs are free (handed to the instance waiting for them, if any)."""
        if inst.state == InstanceState.STOPPED:
            return
        self.release(inst)
        if inst.id in self.work_left:
            self._share(remove=inst.id)
        svc = self.services[inst.service]
        svc.instances.remove(inst)
        del self.nodes[inst.node].instances[inst.id]
        del self.instances[inst.id]
        inst.state = InstanceState.STOPPED
        for run in inst.running.values():  # generations still on it are lost: they restart
            self._restart(run, inst.step_s)
        inst.running.clear()
        self.route(svc)
        if self.pending:
            adapters.schedule_pending(self)

    def release(self, inst: SimInstance) -> None:
        if inst.gpus_held:
            inst.gpus_held = False
            self.nodes[inst.node].free_gpus += inst.model.tp
            self.stats.gpu_seconds += (self.now - inst.placed_at) * inst.model.tp

    def kill(self, victim: SimInstance) -> None:
        """Preemption-based: the victim stops now; its generations restart from scratch."""
        self.stop(victim)

    def _restart(self, run: Running, step: float) -> None:
        self.stats.restarted += 1
        self.stats.lost_tokens += run.tokens_at(self.now, step) - run.req.prompt
        if run.first > self.now:
            self.first.pop(run.req.id, None)
        svc = self.services[run.req.model]
        svc.waiting.appendleft(run.req)

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

