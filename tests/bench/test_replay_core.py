"""bench/replay_core.py: the trace slice, sampling, compression, the request -> service rule, the
caps, the summary statistics and the targets of the trace replay (issue 16 §1)."""

from __future__ import annotations

from typing import Any

import pytest

from bench.replay_core import (
    check_targets,
    instance_seconds,
    p99_ratios,
    plan,
    service_of,
    slo_attainment,
    tier_counts,
    ttft_stats,
    unit,
    window,
)
from sim.workload import DEFAULT_TRACE, TraceRow, read_trace

ROWS = [TraceRow(t, p, o) for t, p, o in ((0.0, 10, 5), (1.0, 2000, 300), (2.5, 50, 1), (4.0, 7, 7), (9.0, 1, 1))]
KW: dict[str, Any] = {"sample": 1.0, "compress": 1.0, "services": 3, "checkpoints": 2, "zipf": 1.0,
                      "max_prompt_tokens": 64, "max_tokens": 8}


@pytest.mark.parametrize("start,length,want_t", [
    pytest.param(0.0, 100.0, [0.0, 1.0, 2.5, 4.0, 9.0], id="all"),
    pytest.param(1.0, 3.0, [0.0, 1.5], id="half-open-end"),
    pytest.param(2.5, 0.1, [0.0], id="start-is-inclusive"),
    pytest.param(10.0, 5.0, [], id="past-the-end"),
])
def test_window(start: float, length: float, want_t: list[float]) -> None:
    assert [r.t for r in window(ROWS, start, length)] == want_t


@pytest.mark.parametrize("start,length", [(-1.0, 1.0), (0.0, 0.0)])
def test_window_rejects(start: float, length: float) -> None:
    with pytest.raises(ValueError):
        window(ROWS, start, length)


@pytest.mark.parametrize("compress,want_at", [(1.0, [0.0, 1.0, 2.5, 4.0, 9.0]), (2.0, [0.0, 0.5, 1.25, 2.0, 4.5]),
                                              (10.0, [0.0, 0.1, 0.25, 0.4, 0.9])])
def test_compression_divides_send_times(compress: float, want_at: list[float]) -> None:
    assert [s.at_s for s in plan(ROWS, start_s=0, length_s=100, **{**KW, "compress": compress})] == want_at


def test_caps_and_checkpoints() -> None:
    shots = plan(ROWS, start_s=0, length_s=100, **KW)
    assert [(s.prompt_tokens, s.max_tokens) for s in shots] == [(10, 5), (64, 8), (50, 1), (7, 7), (1, 1)]
    assert all(s.checkpoint == int(s.service[1:]) % 2 for s in shots)
    assert shots[1].prompt_ids(vocab=8192) == [(7 + j) % 8191 + 1 for j in range(64)]
    assert [s.trace_t for s in plan(ROWS, start_s=1.0, length_s=100, **KW)] == [1.0, 2.5, 4.0, 9.0]


@pytest.mark.parametrize("services,zipf", [(1, 1.0), (4, 0.0), (4, 1.0), (6, 1.5)])
def test_services_follow_zipf_and_are_deterministic(services: int, zipf: float) -> None:
    n = 4000
    ranks = [service_of(k, services, zipf, seed=3) for k in range(n)]
    assert ranks == [service_of(k, services, zipf, seed=3) for k in range(n)]
    weights = [1 / (r + 1) ** zipf for r in range(services)]
    for r in range(services):
        assert ranks.count(r) / n == pytest.approx(weights[r] / sum(weights), abs=0.03)


def test_sampling_is_seeded_and_nested() -> None:
    rows = read_trace(DEFAULT_TRACE)
    common = {**KW, "compress": 4.0}
    low = plan(rows, start_s=60, length_s=120, **{**common, "sample": 0.05})
    high = plan(rows, start_s=60, length_s=120, **{**common, "sample": 0.2})
    again = plan(rows, start_s=60, length_s=120, **{**common, "sample": 0.05})
    assert low == again
    assert {s.trace_t for s in low} < {s.trace_t for s in high}
    in_window = len(window(rows, 60, 120))
    assert len(high) == pytest.approx(0.2 * in_window, rel=0.2)
    assert all(60 <= s.trace_t < 180 and s.at_s == pytest.approx((s.trace_t - 60) / 4, abs=1e-3) for s in high)


@pytest.mark.parametrize("bad", [{"sample": 0.0}, {"sample": 1.5}, {"compress": 0.0}, {"services": 0},
                                 {"max_tokens": 0}])
def test_plan_rejects(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        plan(ROWS, start_s=0, length_s=10, **{**KW, **bad})


def test_unit_is_in_range_and_stable() -> None:
    xs = [unit(0, "x", i) for i in range(1000)]
    assert all(0 <= x < 1 for x in xs)
    assert unit(0, "x", 5) == xs[5] != unit(1, "x", 5)


@pytest.mark.parametrize("ttfts,slo,want", [
    ([0.5, 1.0, 1.5, None], 1.0, 0.5),
    ([0.5, 1.0, 1.5, None], 5.0, 0.75),
    ([], 1.0, 0.0),
    ([None, None], 5.0, 0.0),
])
def test_slo_attainment_counts_failures_as_misses(ttfts: list[float | None], slo: float, want: float) -> None:
    assert slo_attainment(ttfts, slo) == want


def test_ttft_stats_nearest_rank() -> None:
    ttfts: list[float | None] = [i / 100 for i in range(1, 101)] + [None]
    s = ttft_stats(ttfts)
    assert (s["ttft_p50_s"], s["ttft_p90_s"], s["ttft_p99_s"], s["ttft_max_s"]) == (0.5, 0.9, 0.99, 1.0)
    assert s["slo_1s"] == round(100 / 101, 4) and s["slo_5s"] == s["slo_1s"]
    assert ttft_stats([None])["ttft_p99_s"] is None


@pytest.mark.parametrize("samples,want", [
    ([{"t": 0.0, "a": 1, "b": 0}, {"t": 2.0, "a": 1, "b": 2}, {"t": 3.0, "a": 0, "b": 0}], 5.0),
    ([{"t": 0.0, "a": 3}], 0.0),
    ([], 0.0),
    ([{"t": 0.0}, {"t": 5.0, "a": 1}], 0.0),
])
def test_instance_seconds(samples: list[dict[str, float]], want: float) -> None:
    assert instance_seconds(samples) == want


def test_tier_counts() -> None:
    assert tier_counts(["ssd", "dram", "ssd", "remote"]) == {"dram": 1, "remote": 1, "ssd": 2}


def row(p99: float | None, failed: int = 0, inst: float | None = 10.0) -> dict[str, Any]:
    return {"ttft_p99_s": p99, "failed": failed, "instance_s": inst}


@pytest.mark.parametrize("rows,want", [
    pytest.param({"sllm": row(0.5), "knative-default": row(6.0, inst=20), "ray-serve": row(4.0),
                  "kserve-localcache": row(1.5), "no-dram-tier": row(0.6), "no-locality": row(0.5),
                  "no-migration": row(0.7)},
                 {"p99_knative-default_over_sllm": True, "p99_ray-serve_over_sllm": False,
                  "p99_kserve-localcache_over_sllm": True, "p99_no-dram-tier_over_sllm": True,
                  "p99_no-locality_over_sllm": False, "p99_no-migration_over_sllm": True,
                  "failed_requests": True, "instance_s_sllm_vs_knative_default": True}, id="mixed"),
    pytest.param({"sllm": row(1.0, failed=1, inst=30), "knative-default": row(None, inst=20)},
                 {"p99_knative-default_over_sllm": None, "p99_ray-serve_over_sllm": None,
                  "p99_kserve-localcache_over_sllm": None, "p99_no-dram-tier_over_sllm": None,
                  "p99_no-locality_over_sllm": None, "p99_no-migration_over_sllm": None,
                  "failed_requests": False, "instance_s_sllm_vs_knative_default": False}, id="missing-and-failed"),
])
def test_targets(rows: dict[str, dict[str, Any]], want: dict[str, bool | None]) -> None:
    assert {t["name"]: t["met"] for t in check_targets(rows)} == want


def test_p99_ratios() -> None:
    assert p99_ratios({"sllm": row(0.5), "x": row(2.0), "y": row(None)}) == {"sllm": 1.0, "x": 4.0, "y": None}


@pytest.mark.parametrize("warmup,want", [
    pytest.param(0.0, [(0.0, 2.5, False), (1.5, 4.0, False)], id="none"),
    pytest.param(1.5, [(0.0, 1.0, True), (1.5, 2.5, False), (3.0, 4.0, False)], id="one-row-before-start"),
    pytest.param(2.5, [(0.0, 0.0, True), (1.0, 1.0, True), (2.5, 2.5, False), (4.0, 4.0, False)],
                 id="from-the-trace-start"),
])
def test_warmup_rows_are_sent_first_and_marked(warmup: float, want: list[tuple[float, float, bool]]) -> None:
    shots = plan(ROWS, start_s=2.5, length_s=2.0, warmup_s=warmup, **KW)
    assert [(s.at_s, s.trace_t, s.warmup) for s in shots] == want


@pytest.mark.parametrize("warmup", [-1.0, 3.0])
def test_warmup_must_fit_before_the_window(warmup: float) -> None:
    with pytest.raises(ValueError, match="warmup_s"):
        plan(ROWS, start_s=2.5, length_s=2.0, warmup_s=warmup, **KW)
