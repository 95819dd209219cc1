"""Policies as data: what each system under comparison does, as switches the engine reads.

| policy | scaler | placement | tiers a load can come from | migration |
|---|---|---|---|---|
| sllm | decider + keep-alive | `place` (load-time model), calibrated online | DRAM, SSD, remote | live, token-based |
| serverlessllm | decider + keep-alive | `place`, static (nominal) bandwidths | DRAM, SSD, remote | live, token-based |
| knative-default | decider, Knative's scale-to-zero | random node with free GPUs | remote, every time | none |
| kserve-localcache | decider, Knative's scale-to-zero | random node with free GPUs | SSD (pre-staged on every node) | none |
| locality-blind | decider + keep-alive | random node with free GPUs | DRAM, SSD, remote | none |
| preemption-based | decider + keep-alive | the node with the fastest copy; preempts | DRAM, SSD, remote | preemption (restart) |
| no-dram-tier | as sllm | as sllm | SSD, remote | live |
| no-locality | as sllm | random node with free GPUs, else as sllm (`place_by("random")`) | DRAM, SSD, remote | live |
| no-migration | as sllm | `place`, calibrated, without MIGRATE | DRAM, SSD, remote | none |

"decider" is `autoscaler.decider.decide` (Knative's KPA); keep-alive is its ScalingPolicy
keep-alive; `place` is `sllm_knative.placement.place`; the preemption and drain steps are
`autoscaler.preemption.plan_preemption` / `plan_drain`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Placer(str, Enum):
    """How a policy picks the node for a cold start. LOAD_TIME and RANDOM are the autoscaler's own
    placers, by the names of `sllm_knative.placement.PLACERS` (`sllm-knative up --placement`), and
    run its `place_by`; BLIND and PREEMPT are the baselines' schedulers."""

    LOAD_TIME = "load-time"  # place_by("load-time"): sllm_knative.placement.place_within
    # place_by("random"), the autoscaler's `--placement random`: a seeded random node among those
    # with free GPUs; with none, as LOAD_TIME (wait, evict or migrate)
    RANDOM = "random"
    BLIND = "blind"  # a seeded random node among those with enough free GPUs; with none, a random idle victim
    PREEMPT = "preempt"  # the node with the fastest copy (startup()), preempting a displaceable instance

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Policy:
    name: str
    placer: Placer
    calibrate: bool = False  # fold observed loads, starts and migrations into the estimates
    dram_tier: bool = True  # a finished load leaves the checkpoint in the node's DRAM tier
    ssd_cache: bool = True  # a load from the store leaves it in the node's SSD tier
    prestaged_ssd: bool = False  # every checkpoint is on every node's SSD from the start
    migration: bool = True  # MIGRATE (placement) and drains move generations live
    keep_alive: bool = True  # ScalingPolicy keep-alive; False: Knative's scale-to-zero rules
    fresh_process: bool = False  # a cold start pays the fresh-process overhead
    description: str = ""


_POLICIES = (
    Policy("sllm", Placer.LOAD_TIME, calibrate=True, description="ours: load-time placement, calibrated online"),
    Policy("serverlessllm", Placer.LOAD_TIME, calibrate=False,
           description="the paper's scheduler: load-time estimates from static bandwidths, live migration"),
    Policy("knative-default", Placer.BLIND, dram_tier=False, ssd_cache=False, migration=False, keep_alive=False,
           fresh_process=True, description="Knative KPA, a fresh process loading from the store every cold start"),
    Policy("kserve-localcache", Placer.BLIND, dram_tier=False, ssd_cache=False, prestaged_ssd=True,
           migration=False, keep_alive=False, fresh_process=True,
           description="KServe LocalModelCache: checkpoint pre-staged on every node's SSD, locality-blind"),
    Policy("locality-blind", Placer.BLIND, migration=False,
           description="Serverless / Ray-Serve-like: any node with a free GPU, loads from wherever it is"),
    Policy("preemption-based", Placer.PREEMPT, migration=False,
           description="Shepherd*-like: places for locality, preempting running inference (restarted later)"),
    Policy("no-dram-tier", Placer.LOAD_TIME, calibrate=True, dram_tier=False, description="ours without the DRAM tier"),
    Policy("no-locality", Placer.RANDOM, calibrate=True, description="ours with random placement among free nodes"),
    Policy("no-migration", Placer.LOAD_TIME, calibrate=True, migration=False, description="ours without live migration"),
)

POLICIES: dict[str, Policy] = {p.name: p for p in _POLICIES}
#: The scheduler study's lines (docs/evaluation.md).
STUDY = ("locality-blind", "preemption-based", "serverlessllm", "sllm")


def get_policy(name: str) -> Policy:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}") from None
