"""The pure parts of the overload burst (testkit/overload.py), which tests/local/test_overload.py
and bench/overload.py read their verdicts from."""

from __future__ import annotations

import pytest

from testkit.overload import Outcome, Shot, first_tokens, peak_concurrency


def _out(service: str, at: float, sent: float, ttft: float | None, end: float = 100.0) -> Outcome:
    return Outcome(Shot(at, service, 0), sent_s=sent, end_s=end, ttft_s=ttft)


@pytest.mark.parametrize(("outcomes", "want"), [
    pytest.param([_out("s1", 0.0, 0.1, 2.0)], {"s1": 2.0}, id="one-request"),
    # the first scheduled was sent last and served second (containerConcurrency 1): the service's
    # first token is the other request's, 15.8 s after the first send, not 15.9 + 5 s
    pytest.param([_out("s4", 6.6, 21.34, 20.7), _out("s4", 6.7, 21.13, 15.8)], {"s4": 15.8},
                 id="served-out-of-schedule-order"),
    pytest.param([_out("s1", 0.0, 0.0, None), _out("s1", 1.0, 1.0, 3.0)], {"s1": 4.0}, id="first-refused"),
    pytest.param([_out("s1", 0.0, 0.0, None), _out("s2", 0.0, 0.5, 0.5)], {"s1": None, "s2": 0.5}, id="none-served"),
    pytest.param([], {}, id="empty"),
])
def test_first_tokens(outcomes: list[Outcome], want: dict[str, float | None]) -> None:
    assert first_tokens(outcomes) == pytest.approx(want)


def test_peak_concurrency() -> None:
    outs = [_out("s1", 0, 0.0, 1.0, end=5.0), _out("s1", 0, 1.0, 1.0, end=2.0), _out("s2", 0, 3.0, 1.0, end=4.0)]
    assert peak_concurrency(outs) == 2
