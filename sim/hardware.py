"""Hardware profiles as data: what a node has and how fast each hop and each token is.

A profile gives per node: GPUs and their memory, the DRAM and SSD tier capacities, the rate of
each load path into the device (`nominal`: the number a static estimate would use, from a data
sheet or a measurement; `achieved`: what a load really gets in the simulation, nominal times an
efficiency), the instance start overhead, and the compute model of one GPU:

    prefill_s(tokens) = tokens * 2 * params / (tp * flops * mfu)          (compute bound)
    decode step      = 2 * params (bf16 bytes) / (tp * hbm * hbm_eff)     (memory bound)

Decode is one step per generated token whatever the batch (a memory-bound step reads the
weights once for the whole batch); prefill is per request and does not slow the batch down,
unless the profile says `serial_prefill` (an instance computing one forward at a time, as this
machine's one-thread CPU instances do: its prefills run one after another). Both are
simplifications, stated in docs/evaluation.md.

Every number's source is in the comment beside it (docs/evaluation.md has the same table).
`measured_hops` turns a loader sidecar's measured bandwidth profile (its hop names, see
`sllm_knative.loader.hops`) into a profile's rates, so this machine's numbers can come from a
real sidecar's inventory.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sllm_knative.loader.hops import tier_rates
from sllm_knative.placement import Tier

GB = 1e9
TB = 1e12

#: The tiers a profile must give a rate for (device-resident checkpoints load in no time).
LOAD_TIERS = (Tier.DRAM, Tier.SSD, Tier.REMOTE)


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    gpus_per_node: int
    gpu_mem_bytes: float
    dram_tier_bytes: float  # the DRAM tier's capacity (checkpoints kept in host memory)
    ssd_tier_bytes: float  # the SSD tier's capacity
    nominal: Mapping[Tier, float]  # bytes/s into the device from each tier, as estimated statically
    efficiency: Mapping[Tier, float]  # achieved / nominal, per tier
    overhead_s: float  # instance start beyond the load (fork, CUDA context, KV cache)
    fresh_process_s: float  # the same for a fresh process and import (knative-default, kserve)
    flops: float  # dense bf16 FLOP/s of one GPU
    mfu: float  # fraction of `flops` a prefill reaches
    hbm_bytes_s: float  # device memory bandwidth of one GPU
    hbm_eff: float  # fraction of it a decode step reaches
    load_noise: float = 0.1  # each load's achieved rate is scaled by a seeded lognormal of this sigma
    #: per tier, that sigma where it differs from `load_noise` (this machine: a 0.04 s map of a
    #: DRAM copy jitters by a third, a 0.25 s SSD read by a seventh)
    tier_noise: Mapping[Tier, float] = field(default_factory=dict)
    #: > 0: the instances starting at once share this many CPU cores (this machine: every node's
    #: starts run on the same 2 vCPUs), so a start's overhead is stretched by starting / cores
    #: (at its start; 0: each start has its own CPU, the GPU servers' case)
    shared_cores: int = 0
    #: > 0: the cores that fresh processes starting side by side share in effect (processor
    #: sharing, `Simulation._share`), where it is fewer than `shared_cores`: this machine's fresh
    #: starts progressed as if on 1.3 of its 2 vCPUs (sim/replay_logs.py `start_cores`); 0: `shared_cores`
    start_cores: float = 0.0
    #: each request's prefill (its first token after admission) is scaled by a seeded lognormal
    #: of this sigma (this machine: the spread of warm TTFTs on shared CPUs); 0: exactly the formula
    compute_noise: float = 0.0
    #: a cold-started instance takes its first request this long after it is ready (the demand
    #: reaching the scaler, the endpoint reaching the activator); 0: at once
    activation_s: float = 0.0
    #: an instance runs one forward at a time (this machine: one compute thread per instance), so
    #: the prefills admitted to it run one after another: a request's first token waits for the
    #: prefills admitted before it. False: each prefill runs beside the others (a GPU's batch)
    serial_prefill: bool = False
    #: a fresh process's load (knative-default, kserve-localcache) takes this many times the
    #: loader's load from the same tier: it reads the checkpoint with its own path (a plain
    #: safetensors/torch load), not the loader's pipelined reader
    fresh_load_factor: float = 1.0
    #: seconds a stopped instance holds its slot (an eviction's or a drain's Stop step: out of
    #: rotation, checked idle, the process stopped); 0: the slot frees at once
    stop_s: float = 0.0
    notes: Mapping[str, str] = field(default_factory=dict)  # the source of each number

    def __post_init__(self) -> None:
        where = f"hardware profile {self.name!r}"
        positive: dict[str, float] = {
            "gpus_per_node": self.gpus_per_node, "gpu_mem_bytes": self.gpu_mem_bytes,
            "dram_tier_bytes": self.dram_tier_bytes, "ssd_tier_bytes": self.ssd_tier_bytes,
            "flops": self.flops, "mfu": self.mfu, "hbm_bytes_s": self.hbm_bytes_s, "hbm_eff": self.hbm_eff,
            "fresh_load_factor": self.fresh_load_factor,
        }
        for tier in LOAD_TIERS:
            if tier not in self.nominal:
                raise ValueError(f"{where}: no nominal bandwidth for tier {tier}")
            positive[f"nominal[{tier}]"] = self.nominal[tier]
            positive[f"efficiency[{tier}]"] = self.efficiency.get(tier, 1.0)
        for what, v in positive.items():
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ValueError(f"{where}: {what} must be a finite number > 0, got {v!r}")
        for what, v in (("overhead_s", self.overhead_s), ("fresh_process_s", self.fresh_process_s),
                        ("load_noise", self.load_noise), ("shared_cores", self.shared_cores),
                        ("start_cores", self.start_cores),
                        ("compute_noise", self.compute_noise), ("activation_s", self.activation_s),
                        ("stop_s", self.stop_s)):
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"{where}: {what} must be a finite number >= 0, got {v!r}")
        for tier, v in self.tier_noise.items():
            if not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)):
                raise ValueError(f"{where}: tier_noise[{tier}] must be a finite number >= 0, got {v!r}")
        if self.mfu > 1 or self.hbm_eff > 1:
            raise ValueError(f"{where}: mfu and hbm_eff are fractions (<= 1), got {self.mfu}, {self.hbm_eff}")

    def achieved(self, tier: Tier) -> float:
        return self.nominal[tier] * self.efficiency.get(tier, 1.0)

    def prefill_s(self, tokens: int, params: float, tp: int) -> float:
        return tokens * 2.0 * params / (tp * self.flops * self.mfu)

    def decode_step_s(self, params: float, tp: int) -> float:
        return 2.0 * params / (tp * self.hbm_bytes_s * self.hbm_eff)

    def with_measured_hops(self, hops: Mapping[str, float]) -> HardwareProfile:
        """This profile with the rates a loader sidecar measured (`disk_read`, `host_to_device`,
        `dram_map`, `remote:<store>`, ...; bytes/s), taken as achieved (efficiency 1)."""
        rates = tier_rates(hops).tiers
        nominal = {**self.nominal, **rates}
        efficiency = {t: (1.0 if t in rates else self.efficiency.get(t, 1.0)) for t in LOAD_TIERS}
        return dataclasses.replace(self, nominal=nominal, efficiency=efficiency)


# ---------------------------------------------------------------------------------------------
# The profiles. Sources: docs/evaluation.md, "Hardware profiles" (the same numbers, one table).

# This machine: 2 vCPUs, no GPU; the "device" is the CPU and a node has 2 slots (the local
# cluster of `sllm-knative up`). Measured numbers from docs/benchmarks.md.
THIS_MACHINE = HardwareProfile(
    name="this-machine",
    gpus_per_node=2,  # local cluster: 2 slots per node (docs/benchmarks.md, Cold start)
    gpu_mem_bytes=4 * GB,  # no GPU: a slot holds a model the CPU can serve (SmolLM2/0.53 GB class)
    dram_tier_bytes=1 * 2**30,  # local cluster DRAM tier 1 GiB per node (Cold start)
    ssd_tier_bytes=2 * 2**30,  # SSD tier 2 GiB per node (Cold start)
    nominal={Tier.DRAM: 6.0 * GB,  # 0.53 GB in load_s 0.088 s (Cold start, dram row)
             Tier.SSD: 1.27 * GB,  # 0.53 GB in load_s 0.417 s (Cold start, ssd row)
             Tier.REMOTE: 0.046 * GB},  # nginx limit_rate 10m x 4 ranges: 46 MB/s observed (Cold start)
    efficiency={Tier.DRAM: 1.0, Tier.SSD: 1.0, Tier.REMOTE: 1.0},  # measured: achieved is nominal
    overhead_s=0.06,  # sllm start_s 0.058-0.067 s, zygote fork (Cold start)
    fresh_process_s=2.58,  # knative_default start_s 2.583 s, fresh python + torch import (Cold start)
    # Compute: the 200 MB float32 Llama (50M params) of bench/migration.py: re-prefill 4.78e-3
    # s/token (cost_fit) and a decode step 15-21 ms; expressed as FLOP/s and bytes/s so that
    # the formulas above give those times for 50M params.
    flops=2.0 * 50e6 / 4.78e-3, mfu=1.0,
    hbm_bytes_s=2.0 * 50e6 / 0.017, hbm_eff=1.0,
    load_noise=0.05,
    serial_prefill=True,  # an instance computes on one CPU thread: its prefills run one after another
    notes={"source": "docs/benchmarks.md: Cold start (loads, overheads), Migration (compute)"},
)

# An 8-GPU H100 SXM server (DGX H100 class).
H100X8 = HardwareProfile(
    name="h100x8",
    gpus_per_node=8,  # DGX H100: 8 x H100 SXM
    gpu_mem_bytes=80 * GB,  # H100 SXM data sheet: 80 GB HBM3
    dram_tier_bytes=1.5 * TB,  # DGX H100 has 2 TB of system memory; 1.5 TB given to the DRAM tier
    ssd_tier_bytes=4 * 3.84 * TB,  # 4 NVMe data drives of 3.84 TB (issue 16: "several drives")
    nominal={Tier.DRAM: 50 * GB,  # PCIe Gen5 x16 host-to-device, about 50 GB/s achievable per GPU (issue 16)
             Tier.SSD: 4 * 12 * GB,  # 4 PCIe Gen5 NVMe drives at about 12 GB/s sequential read each (issue 16)
             Tier.REMOTE: 100e9 / 8},  # 100 Gb/s link to the model store (issue 16: 25-100 Gb/s)
    # Assumptions (no measurement on this hardware yet): pinned copies reach the PCIe figure;
    # striped NVMe reads reach 85% of the drives' sum; an object-store download over TCP 70% of
    # the line rate. Only the calibrated policy (sllm) learns these; static estimates use nominal.
    efficiency={Tier.DRAM: 1.0, Tier.SSD: 0.85, Tier.REMOTE: 0.7},
    overhead_s=1.0,  # assumption: fork of a pre-imported runtime, CUDA context and KV cache allocation
    fresh_process_s=10.0,  # assumption: a fresh container process (python, torch, CUDA init, engine start)
    flops=989e12,  # H100 SXM data sheet: 989 TFLOP/s dense bf16
    mfu=0.4,  # assumption: prefill at 40% MFU
    hbm_bytes_s=3.35e12,  # H100 SXM data sheet: 3.35 TB/s HBM3
    hbm_eff=0.6,  # assumption: a decode step reaches 60% of HBM bandwidth
    notes={"source": "issue 16 (link, NVMe, PCIe), NVIDIA H100 and DGX H100 data sheets, assumptions as marked"},
)

# The same server with H200 GPUs: more and faster device memory, the same host side.
H200X8 = dataclasses.replace(
    H100X8,
    name="h200x8",
    gpu_mem_bytes=141 * GB,  # H200 data sheet: 141 GB HBM3e
    hbm_bytes_s=4.8e12,  # H200 data sheet: 4.8 TB/s
    dram_tier_bytes=2 * TB,  # DGX H200: 2 TB system memory, all of it offered to the tier
    notes={"source": "as h100x8; NVIDIA H200 data sheet for memory size and bandwidth"},
)

PROFILES: dict[str, HardwareProfile] = {p.name: p for p in (THIS_MACHINE, H100X8, H200X8)}


def get_profile(name: str) -> HardwareProfile:
    """A built-in profile by name, or a JSON file (see `profile_from_json`)."""
    if name in PROFILES:
        return PROFILES[name]
    path = Path(name)
    if path.suffix == ".json":
        return profile_from_json(path)
    raise ValueError(f"unknown hardware profile {name!r}; known: {', '.join(PROFILES)} (or a .json file)")


def profile_from_json(path: Path) -> HardwareProfile:
    """A profile from a JSON file: `{"base": "h100x8", ...fields to replace...}`; `nominal` and
    `efficiency` map tier names (dram, ssd, remote) to numbers; `hops` takes a loader sidecar's
    measured bandwidths (`{"disk_read": 2.0e9, ...}`). Errors name the file and the field."""
    try:
        raw: dict[str, Any] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read a hardware profile: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a hardware profile is a JSON object")
    base = PROFILES.get(str(raw.pop("base", "h100x8")))
    if base is None:
        raise ValueError(f"{path}: unknown base profile; known: {', '.join(PROFILES)}")
    hops = raw.pop("hops", None)
    changes: dict[str, Any] = {}
    fields = {f.name for f in dataclasses.fields(HardwareProfile)}
    for key, value in raw.items():
        if key not in fields:
            raise ValueError(f"{path}: unknown field {key!r}; known: {', '.join(sorted(fields))}")
        if key in ("nominal", "efficiency", "tier_noise"):
            try:
                changes[key] = {**getattr(base, key), **{Tier(t): float(v) for t, v in value.items()}}
            except (ValueError, AttributeError, TypeError) as e:
                raise ValueError(f"{path}: {key}: {e}") from None
        else:
            changes[key] = value
    changes.setdefault("name", path.stem)
    try:
        profile = dataclasses.replace(base, **changes)
        return profile.with_measured_hops(hops) if hops else profile
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None
