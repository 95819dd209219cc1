"""A loader's measured hops as placement's tier rates (pure).

The loader measures hops (`Inventory.bandwidths`, see loader_sidecar/profile.py):

    disk_read        SSD tier -> host memory (direct reads)
    dram_copy        DRAM tier -> process memory (a copy)
    dram_map         DRAM tier mapped with its page tables populated (a CPU instance, no copy)
    host_to_device   a DRAM-tier file -> GPU through the loader extension's pinned ring
    remote:<store>   a store's throughput, from its first transfer on

Placement wants "bytes/s from tier t into the device": SSD is `disk_read`; DRAM is the pinned
copy on a GPU node (`host_to_device`), else the mapping (`dram_map`), else the plain copy (an
upper bound); remote is the fastest store measured, and each store keeps its own rate. A hop
that was not measured (or measured as 0) is absent: nothing here is guessed. The autoscaler's
local backend and the NodeCache the loader publishes both read hops through this one table.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from sllm_knative.placement import Tier

REMOTE_PREFIX = "remote:"
#: Hops that measure the DRAM tier -> device, preferred first.
DRAM_HOPS = ("host_to_device", "dram_map", "dram_copy")
SSD_HOP = "disk_read"


@dataclass(frozen=True)
class TierRates:
    """Measured bytes/s per tier (`tiers`) and per store URI (`stores`); unmeasured ones are absent."""

    tiers: Mapping[Tier, float] = field(default_factory=dict)
    stores: Mapping[str, float] = field(default_factory=dict)


def tier_rates(hops: Mapping[str, float] | Iterable[tuple[str, float]]) -> TierRates:
    """`{"disk_read": 2e9, "dram_map": 15e9, "remote:hf://": 1e8}` -> TierRates(tiers={SSD: 2e9,
    DRAM: 15e9, REMOTE: 1e8}, stores={"hf://": 1e8})."""
    items = hops.items() if isinstance(hops, Mapping) else hops
    measured = {hop: float(v) for hop, v in items if v > 0}
    tiers: dict[Tier, float] = {}
    if SSD_HOP in measured:
        tiers[Tier.SSD] = measured[SSD_HOP]
    for hop in DRAM_HOPS:
        if hop in measured:
            tiers[Tier.DRAM] = measured[hop]
            break
    stores = {hop.removeprefix(REMOTE_PREFIX): v for hop, v in measured.items() if hop.startswith(REMOTE_PREFIX)}
    if stores:  # a model in a store not fetched from yet: the fastest store seen
        tiers[Tier.REMOTE] = max(stores.values())
    return TierRates(tiers, stores)
