"""The workload scaling rule (sim/workload.py), the model catalog, and the determinism of a seeded run."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import pytest

from sim.runner import Scenario, percentile, simulate
from sim.workload import TraceRow, catalog, scale_trace, tensor_parallel, zipf_weights

# A made-up trace: 10 requests, one every second (span 9 s, period 10 s with the mean gap added).
ROWS = [TraceRow(float(i), 100 + i, 10 + i) for i in range(10)]


@pytest.mark.parametrize(("rate", "duration", "expected"), [
    (1.0, 10.0, 10),  # one copy, everything kept
    (3.0, 10.0, 30),  # three copies, everything kept
    (2.0, 30.0, 60),  # three periods of two copies
    (1.0, 5.0, None),  # a window shorter than the trace: only the requests inside it
])
def test_integer_rates_copy_the_trace(rate: float, duration: float, expected: int | None) -> None:
    reqs = scale_trace(ROWS, ["a", "b"], rate=rate, duration_s=duration, seed=1)
    assert all(0 <= r.arrival < duration for r in reqs)
    assert [r.arrival for r in reqs] == sorted(r.arrival for r in reqs)
    assert [r.id for r in reqs] == list(range(len(reqs)))
    if expected is not None:
        assert len(reqs) == expected
        # every copy keeps each row's token counts: each (prompt, output) appears rate * periods times
        assert set(Counter((r.prompt, r.output) for r in reqs).values()) == {expected // 10}
    else:
        assert 0 < len(reqs) <= 10


def test_fractional_rates_thin_the_copies() -> None:
    rows = [TraceRow(i * 0.1, 10, 10) for i in range(2000)]
    n = len(scale_trace(rows, ["a"], rate=2.5, duration_s=200.0, seed=3))
    assert 2.5 * 2000 * 0.9 < n < 2.5 * 2000 * 1.1  # thinning keeps 2.5 / 3 of three copies


def test_same_seed_same_requests_other_seed_other_requests() -> None:
    one = scale_trace(ROWS, ["a", "b", "c"], rate=2.0, duration_s=20.0, seed=7)
    assert one == scale_trace(ROWS, ["a", "b", "c"], rate=2.0, duration_s=20.0, seed=7)
    assert one != scale_trace(ROWS, ["a", "b", "c"], rate=2.0, duration_s=20.0, seed=8)


def test_popularity_is_zipf() -> None:
    rows = [TraceRow(i * 0.01, 10, 10) for i in range(20000)]
    models = [f"m{i}" for i in range(10)]
    counts = Counter(r.model for r in scale_trace(rows, models, rate=1.0, duration_s=200.0, zipf=1.0, seed=0))
    ranked = [c for _, c in counts.most_common()]
    w = zipf_weights(10, 1.0)
    for got, weight in zip(ranked[:3], w[:3], strict=True):  # the head follows 1/rank within 5%
        assert got / 20000 == pytest.approx(weight / sum(w), rel=0.05)
    flat = Counter(r.model for r in scale_trace(rows, models, rate=1.0, duration_s=200.0, zipf=0.0, seed=0))
    assert max(flat.values()) / min(flat.values()) < 1.2


@pytest.mark.parametrize(("params", "mem", "tp"), [
    (8e9, 80e9, 1),  # 16 GB in 60% of 80 GB
    (33.7e9, 80e9, 2),  # 67 GB > 48 GB: two GPUs
    (70.6e9, 80e9, 4),  # 141 GB > 96 GB: four
    (70.6e9, 141e9, 2),  # an H200 holds it on two
])
def test_tensor_parallelism(params: float, mem: float, tp: int) -> None:
    assert tensor_parallel(params, mem, 8) == tp


def test_a_model_too_big_for_a_node_is_an_error() -> None:
    with pytest.raises(ValueError, match="does not fit on one node"):
        tensor_parallel(405e9, 80e9, 8)


def test_catalog_is_seeded() -> None:
    assert catalog(20, 1, 80e9, 8) == catalog(20, 1, 80e9, 8)
    assert catalog(20, 1, 80e9, 8) != catalog(20, 2, 80e9, 8)


def test_percentile() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0


def test_a_seeded_run_is_deterministic(tmp_path: Path) -> None:
    s = Scenario(policy="sllm", nodes=3, models=12, rate=0.5, duration_s=240.0, seed=5)
    one, two = simulate(s), simulate(s)
    speed = {"wall_s", "sim_s_per_wall_s", "events_per_s", "cpu_s", "sim_s_per_cpu_s"}
    assert {k: v for k, v in one.items() if k not in speed} == {k: v for k, v in two.items() if k not in speed}
    other = simulate(dataclasses.replace(s, seed=6))
    assert other["requests"] != one["requests"] or other["ttft_p99_s"] != one["ttft_p99_s"]
    assert one["served"] == one["requests"] > 50


def test_a_sweep_writes_json_and_a_plot(tmp_path: Path) -> None:
    """`python -m sim sweep`: one row per (policy, rate) with the outputs the issue asks for."""
    import json

    from sim.__main__ import main

    out = tmp_path / "sweep"
    assert main(["sweep", "--policy", "sllm,locality-blind", "--rates", "0.2,0.4", "--nodes", "2", "--models", "4",
                 "--duration", "120", "--kinds", "llama-3.2-1b", "--out", str(out)]) == 0
    doc = json.loads((out / "sweep.json").read_text())
    assert [(r["policy"], r["scenario"]["rate"]) for r in doc["rows"]] == [
        ("sllm", 0.2), ("locality-blind", 0.2), ("sllm", 0.4), ("locality-blind", 0.4)]
    for r in doc["rows"]:
        assert r["requests"] == r["served"] > 0
        assert 0 <= r["ttft_p50_s"] <= r["ttft_p99_s"] <= r["ttft_max_s"]
        assert 0 <= r["slo_ttft_1s"] <= r["slo_ttft_5s"] <= 1
        assert r["gpu_hours"] > 0 and sum(r["cold_starts"].values()) >= 1
        assert {"migrations", "migrated_tokens", "sim_s_per_wall_s", "events_per_s"} <= set(r)
    assert (out / "ttft_vs_load.png").read_bytes()[:4] == b"\x89PNG"


def test_the_vendored_trace_is_the_published_one() -> None:
    """sim/data holds the Azure conversation trace unchanged: the sha256 its provenance names."""
    import hashlib
    import re

    from sim.workload import DEFAULT_TRACE

    provenance = (DEFAULT_TRACE.parent / "PROVENANCE.md").read_text()
    want = re.search(r"sha256 ([0-9a-f]{64})", provenance)
    assert want, provenance
    assert hashlib.sha256(DEFAULT_TRACE.read_bytes()).hexdigest() == want.group(1)
    assert (DEFAULT_TRACE.parent / "LICENSE").is_file()
