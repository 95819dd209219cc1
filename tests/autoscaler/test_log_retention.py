"""The local backend keeps the logs of the latest instances, not of every instance since `up`:
scale-to-zero starts instances all day (bench/soak.py saw one log file more per cold start)."""

from __future__ import annotations

import pytest

from autoscaler.backends.local import logs_to_prune


@pytest.mark.parametrize("logs, live, keep, pruned", [
    pytest.param({}, set(), 2, [], id="none"),
    pytest.param({"a": 1, "b": 2}, set(), 2, [], id="within-the-bound"),
    pytest.param({"a": 1, "b": 2, "c": 3, "d": 4}, set(), 2, ["a", "b"], id="oldest-go-first"),
    pytest.param({"a": 1, "b": 2, "c": 3}, {"a"}, 2, ["b"], id="a-live-instance-keeps-its-log-and-counts"),
    pytest.param({"a": 1, "b": 2, "c": 3}, {"a", "b", "c"}, 2, [], id="never-a-live-one-even-over-the-bound"),
    pytest.param({"a": 5, "b": 2, "c": 3}, set(), 1, ["b", "c"], id="by-last-write-not-by-name"),
    pytest.param({"a": 1, "b": 2}, set(), 0, ["a", "b"], id="keep-none"),
])
def test_logs_to_prune(logs: dict[str, float], live: set[str], keep: int, pruned: list[str]) -> None:
    assert logs_to_prune(logs, live, keep) == pruned
