"""The simulated cluster's state, as data: what the event loop (engine.py) changes and the
policy adapters (adapters.py) read.

    SimConfig     the run's knobs (nodes, an instance's capacity, the scaling policy's times)
    SimNode       a node: its GPUs, its DRAM and SSD tiers (`Lru`, None where the policy keeps
                  no such tier), its loader's queue of `LoadJob`s and the instances on it
    SimInstance   an instance: `tp` GPUs of one node, its state, the generations it runs
    Running       one generation on an instance: admitted, first token, end
    Service       a service (one model): the scaler's spec, state and metric window, its
                  queue of waiting requests, its instances
    Stats         counters for the summary (cold starts by tier, migrations, GPU-seconds, ...)
    Process       a preemption or drain in progress (adapters.py runs its steps)
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from autoscaler.backends.base import InstanceState
from autoscaler.decider import DeciderSpec, DeciderState
from autoscaler.preemption import Progress
from autoscaler.window import MetricWindow
from sim.workload import Model, Request
from sllm_knative.placement import Option, Tier


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
    max_scale: int = 0  # instances per service at most (the max-scale annotation); 0: unbounded
    stable_window_s: float | None = None  # the window annotation (KPA stable window); None: the default
    #: the replay's fresh-process controller scales instead of the decider (the validation sets it
    #: for knative-default and kserve-localcache): bench/replay_profiles.FreshController keeps one
    #: instance while a request waits or runs and stops it once `keep_alive_s` have passed since
    #: the last one ended, timed by its 50 ms poll, not by the decider's per-second metric window
    kpa_stand_in: bool = False

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
    #: with no DRAM tier (`dram` None): the loader still holds a checkpoint in host memory while
    #: an instance leases it, so a second instance of it on this node loads from DRAM (the
    #: replay's no-dram-tier evicts only unleased copies; loader policies only)
    leased_in_dram: bool = False

    def pending_jobs(self, now: float) -> list[LoadJob]:
        while self.jobs and self.jobs[0].end <= now:
            self.jobs.popleft()
        return list(self.jobs)

    def tier_of(self, model: str, prestaged: bool) -> Tier:
        if self.dram is not None and model in self.dram:
            return Tier.DRAM
        if self.leased_in_dram and any(i.model.key == model for i in self.instances.values()):
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
    compute_free_at: float = 0.0  # serial_prefill: when the prefills admitted so far are done
    gpus_held: bool = False
    load_end: float | None = None
    hop_s: float = 0.0  # a warmed successor's last hop (DRAM to device): after its GPUs are taken
    ready_at: float | None = None
    stopped_at: float | None = None
    running: dict[int, Running] = field(default_factory=dict)
    claimed: bool = False  # a preemption or drain has it: not a victim again, not a destination
    waiter: Process | None = None  # the preemption or drain waiting for it to run nothing (WaitIdle)


@dataclass(eq=False)
class Service:
    name: str
    model: Model
    spec: DeciderSpec
    state: DeciderState
    window: MetricWindow = field(default_factory=MetricWindow)
    waiting: deque[Request] = field(default_factory=deque)
    instances: list[SimInstance] = field(default_factory=list)
    last_request_at: float | None = None  # as the autoscaler knows it: the last report that showed a request
    last_end_at: float | None = None  # when the last request ended (the replay's fresh-process controller counts from it)
    desired: int = 0
    active: bool = False
    hot_at: float = -math.inf  # when a sample above the scaler's target was last recorded
    #: `adapters.scale` found `keeps_one` true for one ready instance with this state and hot mark,
    #: and it stays true (with no keep-alive recheck due) until this time: the decision is skipped
    quiet_until: float = -math.inf
    quiet_state: DeciderState | None = None
    quiet_hot: float = -math.inf
    #: The activator's report, kept as it goes: the concurrency integral since the last report
    #: (`area`, up to `area_at`) and whether a request started since then (`started`); the tick
    #: records the second's average, as the autoscaler does from each report
    area: float = 0.0
    area_at: float = 0.0
    started: bool = False


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
    quiet_skips: int = 0  # scaler decisions skipped as known (`Service.quiet_until`)


@dataclass(eq=False)
class Process:
    """A preemption (placement's EVICT/MIGRATE) or a drain, executed one step at a time."""

    kind: str  # "preempt" or "drain"
    victim: SimInstance
    option: Option | None = None
    progress: Progress = field(default_factory=Progress)
    successor: SimInstance | None = None  # the instance waiting for the victim's GPUs
    destination: SimInstance | None = None
    done: bool = False
    stopping: bool = False  # its Stop step waits for the victim's stop time (HardwareProfile.stop_s)


def replace_progress(p: Progress, **changes: object) -> Progress:
    """`p` with `changes` (a process's progress is immutable, as the plans take it)."""
    return dataclasses.replace(p, **changes)  # type: ignore[arg-type]
