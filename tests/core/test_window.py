"""The metric window: Knative's bucketed averages over the stable and panic windows."""

from __future__ import annotations

import pytest

from autoscaler.window import MetricWindow


def window(*samples: tuple[float, float], horizon: float = 60.0) -> MetricWindow:
    w = MetricWindow(horizon_s=horizon)
    for t, v in samples:
        w = w.record(t, v)
    return w


@pytest.mark.parametrize("samples,now,width,want", [
    pytest.param([], 10.0, 60.0, None, id="empty-is-no-data"),
    pytest.param([(0.0, 4.0)], 0.5, 60.0, 4.0, id="one-sample"),
    pytest.param([(0.0, 4.0), (1.0, 2.0)], 1.0, 60.0, 3.0, id="average-since-first-sample"),
    pytest.param([(0.0, 4.0), (2.0, 2.0)], 2.0, 60.0, 2.0, id="missing-second-counts-as-zero"),
    pytest.param([(0.0, 4.0), (0.5, 2.0)], 0.9, 60.0, 3.0, id="samples-in-one-second-averaged"),
    pytest.param([(0.0, 6.0)], 5.0, 60.0, 6.0, id="quiet-reporter-does-not-decay"),
    pytest.param([(0.0, 6.0)], 60.0, 60.0, None, id="nothing-inside-the-window"),
    pytest.param([(float(t), 10.0 if t < 50 else 0.0) for t in range(60)], 59.0, 6.0, 0.0, id="panic-window-sees-the-drop"),
    pytest.param([(float(t), 10.0 if t < 50 else 0.0) for t in range(60)], 59.0, 60.0, 50 * 10.0 / 60, id="stable-lags"),
    pytest.param([(float(t), 1.0) for t in range(100)], 99.0, 60.0, 1.0, id="old-samples-out-of-window"),
])
def test_average(samples: list[tuple[float, float]], now: float, width: float, want: float | None) -> None:
    got = window(*samples).average(now, width)
    assert got == (pytest.approx(want) if want is not None else None)


def test_record_keeps_only_the_horizon_and_accepts_late_samples() -> None:
    w = window(*[(float(t), 1.0) for t in range(30)], horizon=10.0)
    assert [b[0] for b in w.buckets] == list(range(20, 30))
    late = w.record(25.2, 3.0)
    assert dict((i, s) for i, s, _ in late.buckets)[25] == pytest.approx(4.0)
    assert w.record(5.0, 9.0) is w  # older than the horizon: dropped
    out_of_order = window((3.0, 1.0), (1.0, 2.0))
    assert [b[0] for b in out_of_order.buckets] == [1, 3] and out_of_order.first == 1


def test_last_nonzero() -> None:
    assert window((0.0, 1.0), (5.5, 2.0), (9.0, 0.0)).last_nonzero() == 6.0  # busy through second 5
    assert window((0.0, 0.0)).last_nonzero() is None


@pytest.mark.parametrize("t,v", [(0.0, -1.0), (0.0, float("nan")), (float("inf"), 1.0)])
def test_record_rejects(t: float, v: float) -> None:
    with pytest.raises(ValueError):
        MetricWindow().record(t, v)
