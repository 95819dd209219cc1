"""The loader's measured hops as placement's tier rates (sllm_knative.loader.hops): one table,
read by the autoscaler's local backend and by the NodeCache the loader publishes."""

from __future__ import annotations

import pytest

from sllm_knative.loader.hops import tier_rates
from sllm_knative.placement import Tier


@pytest.mark.parametrize("hops,tiers,stores", [
    pytest.param({}, {}, {}, id="nothing-measured-is-absent-not-guessed"),
    pytest.param({"disk_read": 2e9, "dram_copy": 5e9}, {Tier.SSD: 2e9, Tier.DRAM: 5e9}, {}, id="cpu-copy"),
    pytest.param({"dram_copy": 5e9, "dram_map": 15e9}, {Tier.DRAM: 15e9}, {}, id="a-cpu-node-maps"),
    pytest.param({"dram_map": 15e9, "host_to_device": 20e9}, {Tier.DRAM: 20e9}, {}, id="a-gpu-node-copies-pinned"),
    pytest.param({"remote:hf://": 1e8, "remote:file:///s": 1e9}, {Tier.REMOTE: 1e9},
                 {"hf://": 1e8, "file:///s": 1e9}, id="remote-is-the-fastest-store"),
    pytest.param({"disk_read": 0.0, "remote:hf://": 0.0}, {}, {}, id="a-zero-rate-is-no-measurement"),
])
def test_tier_rates(hops: dict[str, float], tiers: dict[Tier, float], stores: dict[str, float]) -> None:
    got = tier_rates(hops)
    assert (dict(got.tiers), dict(got.stores)) == (tiers, stores)
    assert tier_rates(list(hops.items())) == got
