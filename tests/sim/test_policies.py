"""One tiny hand-checked scenario per policy: three nodes of one GPU, two models of 2 GB.

The test profile (TINY) makes every number easy to compute by hand:

    DRAM -> GPU 10 GB/s: 2 GB in 0.2 s      SSD 2 GB/s: 1 s      remote store 0.1 GB/s: 20 s
    instance start 0.5 s (fresh process 3 s)
    1e9 parameters: prefill 2e9 FLOP/token at 2e13 FLOP/s = 1e-4 s/token (100 tokens: 0.01 s),
    decode 2e9 bytes at 1e12 B/s = 2 ms/token

A request that finds its service at zero is placed at once (the scaler runs on arrival), so its
TTFT is load + start + prefill.
"""

from __future__ import annotations

import dataclasses

import pytest

from sim import adapters
from sim.cluster import SimConfig
from sim.engine import Simulation
from sim.hardware import GB, HardwareProfile
from sim.policies import POLICIES, get_policy
from sim.workload import Model, Request
from sllm_knative.placement import PLACERS, Tier

TINY = HardwareProfile(
    name="tiny", gpus_per_node=1, gpu_mem_bytes=10 * GB, dram_tier_bytes=10 * GB, ssd_tier_bytes=100 * GB,
    nominal={Tier.DRAM: 10 * GB, Tier.SSD: 2 * GB, Tier.REMOTE: 0.1 * GB},
    efficiency={Tier.DRAM: 1.0, Tier.SSD: 1.0, Tier.REMOTE: 1.0},
    overhead_s=0.5, fresh_process_s=3.0, flops=2e13, mfu=1.0, hbm_bytes_s=1e12, hbm_eff=1.0, load_noise=0.0,
)
A = Model("a", "test", 1e9, 1)
B = Model("b", "test", 1e9, 1)
PREFILL_100 = 100 * 2 * 1e9 / 2e13  # 0.01 s
STEP = 2e9 / 1e12  # 2 ms
N0, N1, N2 = "n0000", "n0001", "n0002"


def sim(policy: str, requests: list[Request], preload: list[tuple[str, str, Tier]], seed: int = 0) -> Simulation:
    s = Simulation(TINY, get_policy(policy), [A, B], requests, SimConfig(nodes=3, seed=seed, tail_s=120.0))
    for node, model, tier in preload:
        s.preload(node, model, tier)
    return s.run()


def one_a(policy: str, preload: list[tuple[str, str, Tier]], seed: int = 0) -> Simulation:
    return sim(policy, [Request(0, 0.0, "a", 100, 1)], preload, seed)


def node_of_first(s: Simulation) -> str:
    placed = [e for e in s.trace if e[0] == "start"]
    return str(placed[0][2])


# -- a single cold start: which node, which tier, what TTFT --------------------------------------

LOCAL = [(N1, "a", Tier.DRAM), (N2, "a", Tier.SSD)]


@pytest.mark.parametrize(("policy", "preload", "node", "tier", "ttft"), [
    # the load-time model picks the DRAM copy: 0.2 s load + 0.5 s start + 0.01 s prefill
    ("sllm", LOCAL, N1, "dram", 0.2 + 0.5 + PREFILL_100),
    ("serverlessllm", LOCAL, N1, "dram", 0.2 + 0.5 + PREFILL_100),
    ("no-migration", LOCAL, N1, "dram", 0.2 + 0.5 + PREFILL_100),
    # no DRAM tier: the SSD copy, 1 s + 0.5 s + 0.01 s
    ("no-dram-tier", [(N2, "a", Tier.SSD)], N2, "ssd", 1.0 + 0.5 + PREFILL_100),
    # no tiers: the store every time, in a fresh process: 20 s + 3 s + 0.01 s (every node alike)
    ("knative-default", [], None, "remote", 20.0 + 3.0 + PREFILL_100),
    # pre-staged on every node's SSD, in a fresh process: 1 s + 3 s + 0.01 s
    ("kserve-localcache", [], None, "ssd", 1.0 + 3.0 + PREFILL_100),
    # preemption-based places for locality too: the DRAM copy
    ("preemption-based", LOCAL, N1, "dram", 0.2 + 0.5 + PREFILL_100),
])
def test_a_cold_start_goes_where_the_policy_says(policy: str, preload: list[tuple[str, str, Tier]],
                                                 node: str | None, tier: str, ttft: float) -> None:
    s = one_a(policy, preload)
    assert s.ttfts() == [pytest.approx(ttft, abs=1e-9)]
    assert s.stats.cold_starts == {tier: 1}
    if node is not None:
        assert node_of_first(s) == node


HAND = {N0: 20.0 + 0.5 + PREFILL_100, N1: 0.2 + 0.5 + PREFILL_100, N2: 1.0 + 0.5 + PREFILL_100}


@pytest.mark.parametrize("policy", ["locality-blind", "no-locality"])
def test_random_placement_ignores_where_the_checkpoint_is(policy: str) -> None:
    """Any node with a free GPU: the TTFT is that node's load time, and over seeds some land
    away from the DRAM copy."""
    nodes = set()
    for seed in range(8):
        s = one_a(policy, LOCAL, seed)
        node = node_of_first(s)
        nodes.add(node)
        assert s.ttfts() == [pytest.approx(HAND[node], abs=1e-9)], (seed, node)
    assert nodes - {N1}, nodes


def test_a_request_while_its_only_instance_drains_starts_one_at_once() -> None:
    """The activator tells the autoscaler of a request it holds with no instance in rotation, and a
    draining one is not. a's request at 0 s (DRAM copy on n0001) is served at 0.71 s; the report
    at 1 s is the last with load, so the keep-alive (5 s) counts from the end of second 1 and runs
    out at 7 s, and the instance drains, its stop taking 1 s (to 8.01 s). a's next request at
    7.5 s starts an instance on the free n0002 (its SSD copy: 1 s + 0.5 s + 0.01 s) then, not at
    the next tick (8 s)."""
    s = Simulation(dataclasses.replace(TINY, stop_s=1.0), get_policy("sllm"), [A, B],
                   [Request(0, 0.0, "a", 100, 1), Request(1, 7.5, "a", 100, 1)],
                   SimConfig(nodes=3, seed=0, tail_s=60.0, keep_alive_s=5.0))
    for node, model, tier in LOCAL:
        s.preload(node, model, tier)
    s.run()
    assert [(e[2], e[4]) for e in s.trace if e[0] == "start"] == [(N1, 0.0), (N2, 7.5)]
    assert s.ttfts() == [pytest.approx(0.2 + 0.5 + PREFILL_100, abs=1e-9),
                         pytest.approx(1.0 + 0.5 + PREFILL_100, abs=1e-9)]


def b_then_a_on_one_gpu(policy: str, **cfg: float) -> Simulation:
    """One node of one GPU holding both checkpoints in DRAM, stops taking 1 s: b's 1-token request
    at 0 s, then a's at 15 s (b's instance is idle and past its minimum residency)."""
    s = Simulation(dataclasses.replace(TINY, stop_s=1.0), get_policy(policy), [A, B],
                   [Request(0, 0.0, "b", 100, 1), Request(1, 15.0, "a", 100, 1)],
                   SimConfig(nodes=1, seed=0, tail_s=120.0, **cfg))
    s.preload(N0, "a", Tier.DRAM)
    s.preload(N0, "b", Tier.DRAM)
    return s.run()


@pytest.mark.parametrize(("policy", "ttft"), [
    # placement's EVICT: the idle b stops (1 s), a's DRAM copy (0.2 s) is warmed meanwhile, then
    # its hop (the whole load, from DRAM) follows the stop: 1 + 0.2 + 0.5 + 0.01
    ("sllm", 1.0 + 0.2 + 0.5 + PREFILL_100),
    # random only among free nodes, as the autoscaler's `--placement random`: with none free it
    # decides as sllm (`place_by`), so it waits for the stop the same way
    ("no-locality", 1.0 + 0.2 + 0.5 + PREFILL_100),
    # the baseline's own rule: a random idle victim goes at once, its stop not waited for
    ("locality-blind", 0.2 + 0.5 + PREFILL_100),
])
def test_with_no_free_gpu_random_placement_decides_as_its_policy_says(policy: str, ttft: float) -> None:
    """One node of one GPU holding both checkpoints in DRAM; b's instance, idle since its answer
    at 0.71 s, holds the GPU past its minimum residency when a arrives at 15 s. b's keep-alive
    (20 s) is over before a's instance could be displaced in turn (protected until 26.7 s)."""
    s = b_then_a_on_one_gpu(policy, keep_alive_s=20.0)
    assert s.ttfts() == [pytest.approx(0.2 + 0.5 + PREFILL_100, abs=1e-9), pytest.approx(ttft, abs=1e-9)]
    assert s.stats.evictions == 1 and s.stats.cold_starts == {"dram": 2}


@pytest.mark.parametrize("policy", ["sllm", "no-locality", "locality-blind", "preemption-based"])
def test_an_evicted_service_with_no_request_does_not_evict_back(policy: str) -> None:
    """As above with the default 60 s keep-alive: b's keep-alive still runs after its instance
    was evicted for a, but b has no request, so it takes no slot back from a (placement's
    `ModelRequest.idle`). Before, b re-placed itself every time a's instance was past its minimum
    residency, and a in turn: 4 evictions and 6 cold starts for two requests."""
    s = b_then_a_on_one_gpu(policy)
    assert s.stats.evictions + s.stats.preemptions == 1 and s.stats.cold_starts == {"dram": 2}
    assert [e[4] for e in s.trace if e[0] == "start"] == [0.0, 15.0]


def test_every_policy_has_a_hand_checked_test() -> None:
    covered = {"sllm", "serverlessllm", "no-migration", "no-dram-tier", "knative-default", "kserve-localcache",
               "preemption-based", "locality-blind", "no-locality"}
    assert covered == set(POLICIES)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_a_policy_named_for_an_autoscaler_placer_runs_that_placer(policy: str, monkeypatch) -> None:
    # `sllm-knative up --placement X` and a sim policy whose Placer is X run the same place_by(X);
    # the baselines' schedulers (BLIND, PREEMPT) have names no autoscaler placer has.
    called: list[str] = []
    real = adapters.place_by

    def spy(placer, *args):
        called.append(placer)
        return real(placer, *args)

    monkeypatch.setattr(adapters, "place_by", spy)
    sim(policy, [Request(0, 0.0, "a", 100, 1)], []).run()
    placer = POLICIES[policy].placer.value
    assert set(called) == ({placer} if placer in PLACERS else set())


def test_every_autoscaler_placer_has_a_sim_policy() -> None:
    assert {p.placer.value for p in POLICIES.values()} >= set(PLACERS)


# -- a busy GPU holds the DRAM copy: migrate, preempt, or go elsewhere ----------------------------

# b streams a long answer on n0001 (its DRAM copy), placed at t=0: ready at 0.7 s, first token at
# 0.71 s, 20000 tokens end at 0.71 + 19999 * 2 ms = 40.708 s. n0002 holds b on its SSD.
# a arrives at t=15 s (b's instance is past its 10 s minimum residency); a is in n0001's DRAM.
BUSY = [(N1, "a", Tier.DRAM), (N1, "b", Tier.DRAM), (N2, "b", Tier.SSD)]
B_LONG = Request(0, 0.0, "b", 100, 20000)
A_LATE = Request(1, 15.0, "a", 100, 1)


def tokens_at(t: float) -> int:
    """b's prompt plus the tokens generated by time t (the first at 0.71 s, then one per step)."""
    return 100 + 1 + int((t - 0.71) / STEP)


@pytest.mark.parametrize("policy", ["sllm", "serverlessllm"])
def test_migration_frees_the_gpu_that_holds_the_checkpoint(policy: str) -> None:
    """Placement's options for a at 15 s: n0000 or n0002 from the store, 20 + 0.5 = 20.5 s; or
    migrate b off n0001 onto a new instance on n0002 (its SSD copy: 1 + 0.5 = 1.5 s) at the prior
    cost 2e-4 s/token * 7246 tokens + 0.5 s = 1.95 s, then a from DRAM: 1.5 + 1.95 + 0.2 + 0.5 =
    4.15 s. MIGRATE wins. What happens: a's load runs at once (ends 15.2 s); b's destination is
    ready at 16.5 s; the migration re-prefills b's tokens so far there (0.1 ms each); b's old
    instance then stops, a takes its GPU and starts (0.5 s) and prefills (0.01 s)."""
    s = sim(policy, [B_LONG, A_LATE], BUSY)
    migration_s = tokens_at(16.5) * 1e-4
    ttft_a = 16.5 + migration_s + 0.5 + PREFILL_100 - 15.0
    assert s.ttfts()[1] == pytest.approx(ttft_a, abs=1e-3)
    assert s.stats.migrations == 1
    assert s.stats.migrated_tokens == tokens_at(16.5)
    assert s.ttfts()[0] == pytest.approx(0.71, abs=1e-9)
    assert s.latencies()[0] == pytest.approx(0.71 + 19999 * STEP, abs=1e-6)  # b's answer did not stop
    assert s.stats.restarted == 0
    assert s.stats.cold_starts == {"dram": 2, "ssd": 1}  # b at 0 s, b's destination, a


def test_without_migration_the_new_instance_loads_from_the_store() -> None:
    """No MIGRATE option: a goes to a free GPU, n0000 (ties go to the node name), from the store."""
    s = sim("no-migration", [B_LONG, A_LATE], BUSY)
    assert s.ttfts()[1] == pytest.approx(20.0 + 0.5 + PREFILL_100, abs=1e-9)
    assert s.stats.migrations == 0
    assert s.stats.cold_starts == {"dram": 1, "remote": 1}


def test_preemption_kills_the_running_generation_and_restarts_it() -> None:
    """Shepherd*-like: a goes to n0001 (its DRAM copy); b's instance is killed at 15 s and its
    generation restarts from scratch on a free node (n0002, its SSD copy, placed at the scaler's
    next tick, 16 s): ready at 17.5 s, 20000 tokens again."""
    s = sim("preemption-based", [B_LONG, A_LATE], BUSY)
    assert s.ttfts()[1] == pytest.approx(0.2 + 0.5 + PREFILL_100, abs=1e-9)
    assert s.stats.preemptions == 1
    assert s.stats.restarted == 1
    assert s.stats.lost_tokens == tokens_at(15.0) - 100
    assert s.ttfts()[0] == pytest.approx(0.71, abs=1e-9)  # its first token came before the preemption
    assert s.latencies()[0] == pytest.approx(16.0 + 1.5 + PREFILL_100 + 19999 * STEP, abs=1e-6)


def test_calibration_learns_the_achieved_rate_and_static_estimates_do_not() -> None:
    """The store delivers half its nominal rate (0.05 GB/s): after one load the calibrated
    policy's estimate for (n0000, remote) moves from the nominal 0.1 GB/s by the moving
    average's weight 0.3 towards it, 0.085 GB/s; the static one keeps no estimate of its own."""
    import dataclasses

    half = dataclasses.replace(TINY, efficiency={Tier.DRAM: 1.0, Tier.SSD: 1.0, Tier.REMOTE: 0.5})
    for policy, expected in (("sllm", 0.085 * GB), ("serverlessllm", None)):
        s = Simulation(half, get_policy(policy), [A, B], [Request(0, 0.0, "a", 100, 1)], SimConfig(nodes=3))
        s.run()
        learnt = s.calibration.bandwidth.get((N0, Tier.REMOTE))
        assert learnt == (pytest.approx(expected) if expected else None), policy
        assert s.ttfts() == [pytest.approx(40.0 + 0.5 + PREFILL_100)]
