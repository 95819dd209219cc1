"""The metric window's shared bucket list (autoscaler/window.py): the same answers as the
straightforward window it replaced, for any sequence of samples, and windows left behind by
`record` keep their value."""

from __future__ import annotations

import copy
import math
import pickle
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autoscaler.window import MetricWindow
from sllm_knative.config.autoscaler import BUCKET_S


@dataclass(frozen=True)
class Reference:
    """The window as it was written first: every record rebuilds the tuple of buckets."""

    horizon_s: float = 60.0
    buckets: tuple[tuple[int, float, int], ...] = ()
    first: int | None = None

    def record(self, t: float, value: float) -> Reference:
        idx = math.floor(t / BUCKET_S)
        newest = max(idx, self.buckets[-1][0]) if self.buckets else idx
        oldest_kept = newest - math.ceil(self.horizon_s / BUCKET_S) + 1
        if idx < oldest_kept:
            return self
        merged: list[tuple[int, float, int]] = []
        placed = False
        for b in self.buckets:
            if b[0] < oldest_kept:
                continue
            if b[0] == idx:
                merged.append((idx, b[1] + value, b[2] + 1))
                placed = True
            else:
                if not placed and b[0] > idx:
                    merged.append((idx, value, 1))
                    placed = True
                merged.append(b)
        if not placed:
            merged.append((idx, value, 1))
        first = idx if self.first is None else min(self.first, idx)
        return Reference(self.horizon_s, tuple(merged), first)

    def average(self, now: float, window_s: float) -> float | None:
        n = math.floor(now / BUCKET_S)
        width = max(1, round(window_s / BUCKET_S))
        start = n - width + 1
        inside = [b for b in self.buckets if start <= b[0] <= n]
        if not inside or self.first is None:
            return None
        lo = max(self.first, start)
        return sum(s / c for _, s, c in inside) / (inside[-1][0] - lo + 1)

    def last_nonzero(self) -> float | None:
        for idx, s, _ in reversed(self.buckets):
            if s > 0:
                return (idx + 1) * BUCKET_S
        return None


def same(w: MetricWindow, r: Reference, probes: list[tuple[float, float]]) -> None:
    assert w.buckets == r.buckets and w.first == r.first
    assert w.last_nonzero() == r.last_nonzero()
    for now, width in probes:
        assert w.average(now, width) == r.average(now, width)  # exactly: the same sums in the same order


def window(samples: list[tuple[float, float]], horizon: float = 10.0) -> MetricWindow:
    w = MetricWindow(horizon_s=horizon)
    for t, v in samples:
        w = w.record(t, v)
    return w


@pytest.mark.parametrize("samples,buckets", [
    pytest.param([(0.0, 1.0), (0.4, 2.0), (0.9, 3.0)], [(0, 6.0, 3)], id="one-second-accumulates"),
    pytest.param([(float(t), 1.0) for t in range(45)], [(i, 1.0, 1) for i in range(35, 45)],
                 id="drop-and-compact-many-horizons"),
    pytest.param([(0.0, 1.0), (100.0, 2.0)], [(100, 2.0, 1)], id="gap-longer-than-horizon-drops-all"),
    pytest.param([(0.0, 1.0), (9.0, 2.0)], [(0, 1.0, 1), (9, 2.0, 1)], id="horizon-edge-kept"),
    pytest.param([(0.0, 1.0), (10.0, 2.0)], [(10, 2.0, 1)], id="horizon-edge-dropped"),
    pytest.param([(5.0, 1.0), (2.0, 2.0)], [(2, 2.0, 1), (5, 1.0, 1)], id="late-sample-inserted"),
    pytest.param([(5.0, 1.0), (3.0, 2.0), (3.5, 1.0)], [(3, 3.0, 2), (5, 1.0, 1)], id="late-sample-merged"),
    pytest.param([(20.0, 1.0), (10.0, 2.0)], [(20, 1.0, 1)], id="late-sample-past-horizon-dropped"),
    pytest.param([(3.0, 1.0), (1.0, 2.0), (4.0, 3.0)], [(1, 2.0, 1), (3, 1.0, 1), (4, 3.0, 1)],
                 id="in-order-after-a-late-one"),
    pytest.param([(-2.5, 1.0), (-1.0, 2.0)], [(-3, 1.0, 1), (-1, 2.0, 1)], id="negative-times"),
])
def test_buckets(samples: list[tuple[float, float]], buckets: list[tuple[int, float, int]]) -> None:
    w = window(samples)
    assert list(w.buckets) == buckets
    r = Reference(10.0)
    for t, v in samples:
        r = r.record(t, v)
    same(w, r, [(t, width) for t in (-5.0, 0.0, 4.0, 9.5, 20.0, 45.0, 100.0) for width in (1.0, 6.0, 10.0)])


def test_a_window_keeps_its_value_after_record() -> None:
    """`record` shares the bucket list with the window it came from; neither sees the other's samples."""
    base = window([(float(t), 1.0) for t in range(5)])
    same_second = base.record(4.5, 5.0)  # both are at the end of the shared list
    later = base.record(6.0, 2.0)  # appends base's newest bucket to the shared list
    forked = same_second.record(7.0, 3.0)  # must not append after `later`'s bucket
    late = later.record(1.0, 4.0)  # copies
    assert base.buckets == tuple((i, 1.0, 1) for i in range(5))
    assert same_second.buckets == base.buckets[:4] + ((4, 6.0, 2),)
    assert later.buckets == base.buckets + ((6, 2.0, 1),)
    assert forked.buckets == same_second.buckets + ((7, 3.0, 1),)
    assert late.buckets == ((0, 1.0, 1), (1, 5.0, 2), (2, 1.0, 1), (3, 1.0, 1), (4, 1.0, 1), (6, 2.0, 1))
    assert base.average(4.0, 10.0) == 1.0 and forked.average(7.0, 10.0) == pytest.approx((4 + 3 + 3) / 8)


def test_immutable_and_compared_by_value() -> None:
    w = window([(0.0, 1.0), (1.0, 2.0)])
    with pytest.raises(AttributeError):
        w.first = 5
    again = MetricWindow(10.0, [(0, 1.0, 1), (1, 2.0, 1)], 0)
    assert again == w and hash(again) == hash(w) and "buckets=((0, 1.0, 1), (1, 2.0, 1))" in repr(w)
    assert again.record(2.0, 1.0) == w.record(2.0, 1.0)
    for twin in (copy.copy(w), copy.deepcopy(w), pickle.loads(pickle.dumps(w))):
        assert twin == w and twin.average(1.0, 10.0) == w.average(1.0, 10.0)


@pytest.mark.parametrize("buckets", [
    pytest.param([(1, 1.0, 1), (0, 1.0, 1)], id="descending"),
    pytest.param([(0, 1.0, 1), (0, 1.0, 1)], id="repeated"),
    pytest.param([(0, 1.0, 1), (10, 1.0, 1)], id="wider-than-the-horizon"),
])
def test_constructor_rejects_buckets_record_would_not_keep(buckets: list[tuple[int, float, int]]) -> None:
    with pytest.raises(ValueError):
        MetricWindow(10.0, buckets, 0)


samples = st.lists(st.tuples(st.floats(-50.0, 400.0, allow_nan=False), st.sampled_from([0.0, 0.0, 1.0, 2.5, 7.0])),
                   max_size=120)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(samples, st.sampled_from([1.0, 2.5, 6.0, 60.0]), st.booleans(), st.data())
def test_matches_the_reference(seq: list[tuple[float, float]], horizon: float, in_order: bool,
                               data: st.DataObject) -> None:
    """Random samples (in time order, mostly, as reporters send them, or in any order), and now
    and then a record from an older window: the same buckets, averages and last busy second."""
    if in_order:
        seq = sorted(seq, key=lambda s: s[0])
    w, r = MetricWindow(horizon), Reference(horizon)
    history = [(w, r)]
    for t, v in seq:
        if data.draw(st.integers(0, 9)) == 0:  # go back to an older window, as a caller may
            w, r = history[data.draw(st.integers(0, len(history) - 1))]
        w, r = w.record(t, v), r.record(t, v)
        history.append((w, r))
        probes = [(t, horizon), (t, 6.0), (t + 3.0, 60.0), (t - 2.0, 1.0)]
        same(w, r, probes)
    for w, r in history:  # every window left behind still answers as it did
        same(w, r, [(t, 60.0) for t, _ in seq[:5]])
