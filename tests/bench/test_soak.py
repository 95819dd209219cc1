"""bench/soak.py: its verdicts on tables, and its short version (one minute on a local cluster of
real processes), which must meet every target: no failed request, no growth in descriptors,
threads or processes, memory flat after warm-up, nothing left after `down` (issue 17 §1)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.soak import FD_GROWTH, check, cycle_shots, main, slope_mb_per_min
from sim.workload import DEFAULT_TRACE, TraceRow, read_trace
from testkit.overload import SERVICES

MB = 1_000_000


def stats(rss_mb: float = 100, fds: int = 20, threads: int = 10, children: int = 0, zombies: int = 0,
          pid: int = 1) -> dict[str, Any]:
    return {"pid": pid, "rss": int(rss_mb * MB), "fds": fds, "threads": threads, "children": children,
            "zombies": zombies}


@pytest.mark.parametrize("last, failed, left, unmet", [
    pytest.param(stats(), 0, [], [], id="unchanged"),
    pytest.param(stats(rss_mb=131), 0, [], [], id="rss-within-32MB"),
    pytest.param(stats(rss_mb=133), 0, [], ["loader n1: RSS flat (<= 132 MB)"], id="rss-grew"),
    pytest.param(stats(fds=20 + FD_GROWTH + 1), 0, [], [f"loader n1: fds grow <= {FD_GROWTH}"], id="fds-grew"),
    pytest.param(stats(threads=15), 0, [], ["loader n1: threads grow <= 4"], id="threads-grew"),
    pytest.param(stats(zombies=1), 0, [], ["loader n1: no zombie"], id="zombie"),
    pytest.param(stats(pid=2), 0, [], ["loader n1: the same process throughout"], id="restarted"),
    pytest.param(stats(), 1, [], ["zero failed requests"], id="a-failed-request"),
    pytest.param(stats(), 0, ["process 7"], ["nothing left after down"], id="left-behind"),
])
def test_check(last: dict[str, Any], failed: int, left: list[str], unmet: list[str]) -> None:
    got = check({"loader n1": stats()}, {"loader n1": last}, failed, left)
    assert [t["target"] for t in got if not t["met"]] == unmet


@pytest.mark.parametrize("disk, unmet", [
    pytest.param({"instance_logs": 212, "dram_bytes": 3 << 30, "ssd_staging_files": 0}, [], id="at-the-bounds"),
    pytest.param({"instance_logs": 213, "dram_bytes": 0, "ssd_staging_files": 0},
                 ["instance log files <= 212 (a log and a timing file each of the 100 kept and of the starts "
                  "under way, at most one a slot)"], id="logs-pile-up"),
    pytest.param({"instance_logs": 0, "dram_bytes": (3 << 30) + 1, "ssd_staging_files": 0},
                 ["DRAM tiers within their budgets (<= 3 x 1 GiB)"], id="dram-over-budget"),
    pytest.param({"instance_logs": 0, "dram_bytes": 0, "ssd_staging_files": 2},
                 ["no SSD staging file at idle"], id="staging-left"),
])
def test_check_disk(disk: dict[str, int], unmet: list[str]) -> None:
    got = check({}, {}, 0, [], disk)
    assert [t["target"] for t in got if not t["met"]] == unmet


def test_a_zygote_with_instances_left_at_idle_is_a_finding() -> None:
    got = check({"zygote n1": stats()}, {"zygote n1": stats(children=1)}, 0, [])
    assert [t["target"] for t in got if not t["met"]] == ["zygote n1: no child process at idle"]


@pytest.mark.parametrize("points, want", [
    pytest.param([(0, 0), (60, 10 * MB)], 10.0, id="10MB-a-minute"),
    pytest.param([(0, 5 * MB), (30, 5 * MB), (60, 5 * MB)], 0.0, id="flat"),
    pytest.param([(0, 0)], None, id="one-point"),
    pytest.param([(5, 0), (5, MB)], None, id="no-time-between"),
])
def test_slope(points: list[tuple[float, float]], want: float | None) -> None:
    got = slope_mb_per_min(points)
    assert got == (pytest.approx(want) if want is not None else None)


def test_cycles_replay_successive_windows_of_the_trace_and_wrap() -> None:
    rows = [TraceRow(float(t), 10, 5) for t in range(0, 100)]  # one request a second for 100 s
    kw: dict[str, Any] = {"burst_s": 30.0, "sample": 1.0, "compress": 2.0, "max_tokens": 8}
    first, third, wrapped = (cycle_shots(rows, c, **kw) for c in (0, 2, 3))
    assert len(first) == 30 and [s.at_s for s in first[:3]] == [0.0, 0.5, 1.0]  # compressed 2x
    assert {s.service for s in first} <= set(SERVICES)
    assert len(third) == 30 and wrapped == first  # three windows of 30 s in 100 s: cycle 3 is cycle 0 again
    real = cycle_shots(read_trace(DEFAULT_TRACE), 0, burst_s=10.0, sample=0.2, compress=2.0, max_tokens=8)
    assert 2 <= len(real) <= 30 and all(0 <= s.at_s < 5.0 for s in real)


def test_the_short_soak_meets_its_targets(tmp_path: Path) -> None:
    out = tmp_path / "out"
    rc = main(["--out", str(out), "--minutes", "1", "--burst", "10", "--sample", "0.2", "--compress", "2",
               "--work", str(tmp_path / "work")])
    doc = json.loads((out / "soak.json").read_text())
    assert rc == 0, [t for t in doc["targets"] if not t["met"]]
    assert doc["cycles"] >= 2 and doc["requests"] >= 5 and doc["failed"] == 0
    assert (out / "soak.png").stat().st_size > 0
    # It measured every component, and what it says is what the processes had.
    assert {"activator", "autoscaler"} <= set(doc["last_idle"]["components"])
    assert sum(1 for n in doc["last_idle"]["components"] if n.startswith("loader ")) == 3
    assert all(c["rss"] > 10 * MB and c["fds"] > 3 for c in doc["last_idle"]["components"].values())
