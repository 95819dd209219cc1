"""bench/replay.py's glue that needs no process: the services' manifests each profile applies
(parsed by the project's config model), the per-profile summary row, the --window option."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bench.replay import _window, main, summarize
from bench.replay_client import Outcome
from bench.replay_profiles import SLLM_PROFILES, manifests
from sllm_knative.config import parse_manifest


@pytest.mark.parametrize("profile,migration", [("sllm", True), ("no-dram-tier", True), ("no-locality", True),
                                               ("no-migration", False)])
def test_manifests_parse_and_carry_the_profile(profile: str, migration: bool) -> None:
    m = parse_manifest(manifests(Path("/store"), 5, 2, 6.0, SLLM_PROFILES[profile].get("policy")))
    services = {s.key: s for s in m.services}
    assert sorted(services) == [f"default/s{r}" for r in range(5)]
    assert [services[f"default/s{r}"].model.uri for r in range(5)] == [  # type: ignore[union-attr]
        f"file:///store/c{r % 2}" for r in range(5)]
    assert len(m.policies) == 5
    assert all(p.keep_alive == 6.0 and p.migration is migration for p in m.policies)
    assert all(s.autoscaling.max_scale == 1 for s in m.services)


def test_manifests_carry_max_scale() -> None:
    m = parse_manifest(manifests(Path("/store"), 3, 2, 6.0, None, max_scale=2))
    assert [s.autoscaling.max_scale for s in m.services] == [2, 2, 2]


@pytest.mark.parametrize("argv,says", [
    (["--max-scale", "2"], "runs only the sllm-type profiles"),
    (["--max-scale", "2", "--profiles", "sllm,knative-default"], "knative-default start one instance"),
    (["--max-scale", "0", "--profiles", "sllm"], "--max-scale must be at least 1, got 0"),
])
def test_max_scale_refused_where_a_profile_cannot_honour_it(argv: list[str], says: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--out", "/nonexistent/never-written", *argv])
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_summary_row_counts_failures_and_instances() -> None:
    outs = [Outcome(0, "s0", 0.0, sent_s=0.01, ttft_s=0.3, ok=True, instance="a"),
            Outcome(1, "s1", 1.0, sent_s=1.2, ttft_s=2.0, ok=True, instance="b"),
            Outcome(2, "s0", 2.0, sent_s=2.0, ttft_s=None, ok=False, error="boom"),
            Outcome(3, "s0", 3.0, sent_s=3.0, ttft_s=0.5, ok=False, instance="a", error="cut"),
            Outcome(4, "s2", 0.0, sent_s=0.0, ttft_s=9.0, ok=True, instance="c", warmup=True),
            Outcome(5, "s2", 0.0, sent_s=0.0, ttft_s=None, ok=False, warmup=True)]
    row = summarize("x", {"outcomes": outs, "cold_starts": [{}, {}], "cold_starts_by_tier": {"ssd": 2},
                          "samples": [{"t": 0.0, "s0": 1}, {"t": 4.0, "s0": 0}]})
    # the warm-up's requests: out of the latency statistics, in the failures and the instances
    assert (row["requests"], row["warmup_requests"], row["failed"]) == (4, 2, 3)
    assert (row["cold_starts"], row["instances_seen"]) == (2, 3)
    assert (row["ttft_p50_s"], row["ttft_max_s"], row["slo_1s"], row["slo_5s"]) == (0.3, 2.0, 0.25, 0.5)
    assert row["instance_s"] == 4.0 and row["late_send_max_s"] == 0.2


@pytest.mark.parametrize("text,want", [("600,480", (600.0, 480.0)), ("0,60.5", (0.0, 60.5))])
def test_window_option(text: str, want: tuple[float, float]) -> None:
    assert _window(text) == want


@pytest.mark.parametrize("text", ["600", "a,b", "1,2,3"])
def test_window_option_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        _window(text)
