"""Online calibration of the load-time model, as pure updates of an immutable value.

- Bandwidths: an exponentially weighted moving average per (node, tier) of the rate each
  observed load achieved (bytes / seconds), seeded with the loader's startup profile.
- Instance overhead: the same average per node, of observed instance start times, shrunk
  towards the mean of all nodes until the node has a few observations of its own (`SHRINK`):
  one slow start on a busy machine is noise, not a property of the node, and must not
  outweigh a checkpoint in that node's DRAM.
- Instance stop: the same average, over all nodes (the stop path is the same everywhere), of
  the observed time from an eviction's decision to the victim's slot being free; an eviction
  is estimated as immediate until the first one is observed.
- One machine (`pooled`, the local backend): its nodes are processes of one host, so a load or
  start observed on any node is learnt for all of them (keyed by `ONE_MACHINE`); kept per node,
  one slow observation would rank one node's DRAM below another node's remote fetch.
- Migration cost: `seconds = a * tokens + b`, refitted by least squares over the most recent
  observed migrations (a >= 0, b >= 0; a prior stands in until two different token counts
  have been seen).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from sllm_knative.placement.model import NodeInventory, Tier

#: Default weight of a new observation in the moving averages.
ALPHA = 0.3
#: The node key every observation is learnt under when the nodes are one machine (`pooled`).
ONE_MACHINE = "*"
#: How many migrations the fit keeps (the most recent ones).
MAX_MIGRATIONS = 256
#: A node's own start overhead counts as this many observations of the all-node mean: with n
#: observations of its own, its estimate is (n * own + SHRINK * mean) / (n + SHRINK).
SHRINK = 3


@dataclass(frozen=True)
class MigrationCost:
    """Seconds to migrate in-flight generations holding `tokens` tokens: `a * tokens + b`.
    The prior (0.2 ms/token recompute, 0.5 s fixed) is a conservative CPU-class guess that
    the first observed migrations replace."""

    a: float = 2e-4
    b: float = 0.5

    def seconds(self, tokens: int) -> float:
        return self.a * tokens + self.b


@dataclass(frozen=True)
class LoadObservation:
    """One finished load: `size_bytes` moved from `tier` to the device on `node` in `seconds`
    (loader time only, not the time it waited in the queue)."""

    node: str
    tier: Tier
    size_bytes: int
    seconds: float


@dataclass(frozen=True)
class MigrationObservation:
    tokens: int
    seconds: float


@dataclass(frozen=True)
class Calibration:
    """Estimates learnt from observations; `apply` folds them into a node inventory."""

    bandwidth: Mapping[tuple[str, Tier], float] = field(default_factory=dict)
    overhead: Mapping[str, float] = field(default_factory=dict)
    starts: Mapping[str, int] = field(default_factory=dict)  # observed starts per node
    stop_s: float | None = None  # observed stop time, preemptions' and scale-downs' (None: none observed)
    migrations: tuple[MigrationObservation, ...] = ()
    migration_cost: MigrationCost = field(default_factory=MigrationCost)
    prior: MigrationCost = field(default_factory=MigrationCost)
    alpha: float = ALPHA
    pooled: bool = False  # every node is the same machine: observations are learnt for all of them

    def __post_init__(self) -> None:
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")

    def key(self, node: str) -> str:
        """The name `node`'s observations are learnt under: its own, or `ONE_MACHINE` when pooled."""
        return ONE_MACHINE if self.pooled else node

    def apply(self, node: NodeInventory) -> NodeInventory:
        """`node` with its bandwidths, instance overhead and stop time replaced by the calibrated ones."""
        key = self.key(node.name)
        learnt = {tier: bw for (name, tier), bw in self.bandwidth.items() if name == key}
        overhead = self.node_overhead(node.name)
        if overhead is not None and key not in self.overhead and node.instance_overhead_s != 0:
            overhead = None  # a node with no observation keeps its own profile, if it has one
        if not learnt and overhead is None and self.stop_s is None:
            return node
        return dataclasses.replace(
            node,
            bandwidth={**node.bandwidth, **learnt},
            instance_overhead_s=node.instance_overhead_s if overhead is None else overhead,
            instance_stop_s=node.instance_stop_s if self.stop_s is None else self.stop_s,
        )


    @functools.cached_property
    def _overhead_mean(self) -> float | None:
        """The mean of every node's start overhead (once per value: `place` asks for each node)."""
        return sum(self.overhead.values()) / len(self.overhead) if self.overhead else None

    def node_overhead(self, node: str) -> float | None:
        """`node`'s start overhead: its own average shrunk towards the mean of every node's
        (`SHRINK`); the mean alone for a node never seen starting an instance (nodes run the
        same instance runtime: not for free); None before any start was observed."""
        mean = self._overhead_mean
        if mean is None:
            return None
        own = self.overhead.get(self.key(node))
        if own is None:
            return mean
        n = self.starts.get(self.key(node), 1)
        return (n * own + SHRINK * mean) / (n + SHRINK)


def ewma(old: float | None, new: float, alpha: float) -> float:
    """`new` when there is no estimate yet, else `old` moved by `alpha` towards `new`."""
    return new if old is None else old + alpha * (new - old)


def _positive(name: str, x: float) -> None:
    if not (x > 0 and math.isfinite(x)):
        raise ValueError(f"{name} must be a finite number > 0, got {x}")


def observe_load(cal: Calibration, obs: LoadObservation, *, profile_bandwidth: float | None = None) -> Calibration:
    """Fold one observed load into the bandwidth estimate of (node, tier). The first
    observation blends with `profile_bandwidth` (the loader's profile) when given."""
    _positive("size_bytes", obs.size_bytes)
    _positive("seconds", obs.seconds)
    key = (cal.key(obs.node), obs.tier)
    old = cal.bandwidth.get(key, profile_bandwidth)
    bw = ewma(old, obs.size_bytes / obs.seconds, cal.alpha)
    return dataclasses.replace(cal, bandwidth={**cal.bandwidth, key: bw})


def observe_start(cal: Calibration, node: str, seconds: float, *, profile: float | None = None) -> Calibration:
    """Fold one observed instance start (process start to ready, load excluded) into `node`'s overhead."""
    if not (seconds >= 0 and math.isfinite(seconds)):
        raise ValueError(f"seconds must be a finite number >= 0, got {seconds}")
    key = cal.key(node)
    value = ewma(cal.overhead.get(key, profile), seconds, cal.alpha)
    return dataclasses.replace(cal, overhead={**cal.overhead, key: value},
                               starts={**cal.starts, key: cal.starts.get(key, 0) + 1})


def observe_stop(cal: Calibration, seconds: float) -> Calibration:
    """Fold one observed stop into the stop time: an eviction's decision to the victim's slot being
    free, a migration's emptied victim stopping, or a scale-down's instance stopping."""
    if not (seconds >= 0 and math.isfinite(seconds)):
        raise ValueError(f"seconds must be a finite number >= 0, got {seconds}")
    return dataclasses.replace(cal, stop_s=ewma(cal.stop_s, seconds, cal.alpha))


def observe_migration(cal: Calibration, obs: MigrationObservation, *, keep: int = MAX_MIGRATIONS) -> Calibration:
    """Record one migration and refit the cost over the last `keep` of them."""
    if obs.tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {obs.tokens}")
    if not (obs.seconds >= 0 and math.isfinite(obs.seconds)):
        raise ValueError(f"seconds must be a finite number >= 0, got {obs.seconds}")
    kept = (cal.migrations + (obs,))[-keep:]
    return dataclasses.replace(cal, migrations=kept, migration_cost=fit_migration_cost(kept, cal.prior))


def fit_migration_cost(observations: Sequence[MigrationObservation], prior: MigrationCost) -> MigrationCost:
    """Least-squares `seconds = a * tokens + b` with a, b >= 0.

    No observations: the prior. One distinct token count: the prior's slope, and the
    intercept that fits the mean. A fit with a negative coefficient is refitted with that
    coefficient fixed at zero.
    """
    n = len(observations)
    if n == 0:
        return prior
    xs = [float(o.tokens) for o in observations]
    ys = [o.seconds for o in observations]
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return MigrationCost(prior.a, max(0.0, my - prior.a * mx))
    a = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    b = my - a * mx
    if a < 0:
        return MigrationCost(0.0, max(0.0, my))
    if b < 0:
        through_origin = sum(x * y for x, y in zip(xs, ys, strict=True)) / sum(x * x for x in xs)
        return MigrationCost(max(0.0, through_origin), 0.0)
    return MigrationCost(a, b)
