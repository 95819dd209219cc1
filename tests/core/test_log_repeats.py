"""`sllm_knative.log.Repeats`: a line logged on every tick while a condition lasts (a service
waiting for capacity, a start backing off) is logged when it first appears, when its text
changes, and otherwise once every `every_s` seconds with the count of lines left out."""

from __future__ import annotations

import pytest

from sllm_knative.log import Repeats

# Each step: (time, key, text, what check answers: None = left out, n = logged after n left out).
CASES = [
    pytest.param([(0, "a", "x", 0), (2, "a", "x", None), (4, "a", "x", None), (30, "a", "x", 2)],
                 id="the same line: once, then after every_s with the count left out"),
    pytest.param([(0, "a", "x", 0), (2, "a", "y", 0), (4, "a", "y", None), (6, "a", "x", 1)],
                 id="a changed text is logged at once, with what was left out of the one before"),
    pytest.param([(0, "a", "x", 0), (1, "b", "x", 0), (2, "a", "x", None), (3, "b", "x", None)],
                 id="keys are independent"),
    pytest.param([(0, "a", "x", 0), (29.9, "a", "x", None), (30, "a", "x", 1), (31, "a", "x", None)],
                 id="every_s is measured from the last line logged"),
]


@pytest.mark.parametrize("steps", CASES)
def test_repeats(steps: list[tuple[float, str, str, int | None]]) -> None:
    now = [0.0]
    r = Repeats(every_s=30.0, clock=lambda: now[0])
    for t, key, text, want in steps:
        now[0] = t
        assert r.check(key, text) == want, (t, key, text)


def test_clear_logs_the_next_line_at_once() -> None:
    now = [0.0]
    r = Repeats(every_s=30.0, clock=lambda: now[0])
    assert r.check("a", "x") == 0
    now[0] = 1
    assert r.check("a", "x") is None
    r.clear("a")  # the condition ended
    now[0] = 2
    assert r.check("a", "x") == 0
