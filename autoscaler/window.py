"""A service's observed concurrency (or requests per second) over time, in one-second buckets.

Immutable: `record` returns a new window and leaves the one it was called on as it was. Averages
follow Knative's bucketed window average: over the buckets from the later of the first sample
ever and the window's start, up to the last sample (a second with no sample counts as zero; the
seconds after the last sample are not counted, so a reporter that goes quiet does not drag the
average to zero). A window with no sample inside it has no data (`None`).

Reporters (the activator) send the service-wide concurrency every second, zeros included;
several samples in one second are averaged.

How it stays cheap (the autoscaler and the simulator record every second for every service):
a window is a slice `[lo, hi)` of a list of closed buckets, plus the newest bucket, which the
window holds itself. A sample in the newest second makes a new newest bucket, O(1); a sample in a
later second appends the newest bucket to the list, O(1), when no other window has appended
past `hi` already (the list is shared between a window and the windows recorded from it, and
each reads only its own slice, which nobody changes). A window recorded from an older one
copies its slice first, and so does a sample older than the newest second (rare: reporters
send in time order). Dropping buckets past the horizon raises `lo`; the list is copied down
when most of it is dropped, so its length stays within a few horizons. The list keeps each
closed bucket's second and mean beside it: `average` finds the window's start by bisection and
sums the means inside, in the same order as before (the same float); the latest busy second is
kept up to date by `record`, so `last_nonzero` scans nothing.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Iterable

from sllm_knative.config.autoscaler import BUCKET_S

Bucket = tuple[int, float, int]  # (second, sum of the samples, how many)

_set = object.__setattr__
_new = object.__new__


def _index(t: float) -> int:
    return math.floor(t / BUCKET_S)


def _busy(buckets: list[Bucket]) -> int | None:
    return next((i for i, s, _ in reversed(buckets) if s > 0), None)


class _Closed:
    """Closed buckets, oldest first, in parallel lists: the buckets, their seconds (bisected by
    `average`) and their means (summed by `average`). Only appended to while windows share it."""

    __slots__ = ("buckets", "seconds", "means")

    def __init__(self, buckets: list[Bucket]) -> None:
        self.buckets = buckets
        self.seconds = [i for i, _, _ in buckets]
        self.means = [s / c for _, s, c in buckets]


class MetricWindow:
    """Buckets `(second, sum, count)` in ascending order, kept for `horizon_s` seconds."""

    # One slot: a window is set with one assignment, not eight (through object.__setattr__,
    # setting eight slots one by one took about 60% of `record`'s time). `_s` holds:
    #   horizon_s  float
    #   first      int | None: the second of the first sample ever recorded (None: no sample yet)
    #   span       int: how many buckets are kept
    #   closed     _Closed: shared with the windows recorded from this one
    #   lo, hi     int: this window's buckets are closed[lo:hi] and then newest
    #   newest     Bucket | None
    #   busy       int | None: the latest second kept with a sample above zero
    __slots__ = ("_s",)

    _s: tuple[float, int | None, int, _Closed, int, int, Bucket | None, int | None]

    def __init__(self, horizon_s: float = 60.0, buckets: Iterable[Bucket] = (), first: int | None = None) -> None:
        if not horizon_s >= BUCKET_S:
            raise ValueError(f"horizon_s must be >= {BUCKET_S}, got {horizon_s}")
        span = math.ceil(horizon_s / BUCKET_S)
        closed = list(buckets)
        if any(a[0] >= b[0] for a, b in zip(closed, closed[1:], strict=False)) or (
                closed and closed[0][0] <= closed[-1][0] - span):
            raise ValueError(f"buckets must be in ascending seconds within the horizon, got {closed}")
        busy = _busy(closed)
        newest = closed.pop() if closed else None
        self._init(horizon_s, first, span, _Closed(closed), 0, len(closed), newest, busy)

    def _init(self, horizon_s: float, first: int | None, span: int, closed: _Closed, lo: int, hi: int,
              newest: Bucket | None, busy: int | None) -> None:
        _set(self, "_s", (horizon_s, first, span, closed, lo, hi, newest, busy))

    @property
    def horizon_s(self) -> float:
        return self._s[0]

    @property
    def first(self) -> int | None:
        """The second of the first sample ever recorded (None: no sample yet)."""
        return self._s[1]

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"MetricWindow is immutable: cannot set {name}")

    def _of(self, closed: _Closed, lo: int, hi: int, newest: Bucket, first: int, busy: int | None) -> MetricWindow:
        w = _new(MetricWindow)  # _init, inline: record makes one window per sample
        s = self._s
        _set(w, "_s", (s[0], first, s[2], closed, lo, hi, newest, busy))
        return w

    @property
    def buckets(self) -> tuple[Bucket, ...]:
        """All the buckets kept, oldest first (a copy: O(horizon))."""
        _, _, _, closed, lo, hi, newest, _ = self._s
        tail = (newest,) if newest is not None else ()
        return tuple(closed.buckets[lo:hi]) + tail

    def record(self, t: float, value: float) -> MetricWindow:
        """A window with `value` observed at time `t` (seconds). Samples older than the horizon
        (relative to the newest one) are dropped."""
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"metric value must be a finite number >= 0, got {value}")
        if not math.isfinite(t):
            raise ValueError(f"time must be finite, got {t}")
        idx = math.floor(t / BUCKET_S)  # _index
        _, first, span, closed, lo, hi, newest, busy = self._s
        if first is None or idx < first:
            first = idx
        if newest is None:
            return self._of(_Closed([]), 0, 0, (idx, value, 1), first, idx if value > 0 else None)
        if idx == newest[0]:
            return self._of(closed, lo, hi, (idx, newest[1] + value, newest[2] + 1), first,
                            idx if value > 0 else busy)
        if idx < newest[0]:
            return self._record_late(idx, value, first)
        if hi != len(closed.buckets):  # a window recorded from this one appended already: fork
            closed, lo, hi = _Closed(closed.buckets[lo:hi]), 0, hi - lo
        closed.buckets.append(newest)  # the three lists stay parallel
        closed.seconds.append(newest[0])
        closed.means.append(newest[1] / newest[2])
        hi += 1
        oldest_kept = idx - span + 1
        seconds = closed.seconds
        while lo < hi and seconds[lo] < oldest_kept:
            lo += 1
        if lo > 2 * span and lo > hi - lo:  # mostly dropped: copy what is kept down
            closed, lo, hi = _Closed(closed.buckets[lo:hi]), 0, hi - lo
        if value > 0:
            busy = idx
        elif busy is not None and busy < oldest_kept:
            busy = None
        return self._of(closed, lo, hi, (idx, value, 1), first, busy)

    def _record_late(self, idx: int, value: float, first: int) -> MetricWindow:
        """A sample before the newest second: merged into a copy of the buckets, O(horizon)."""
        newest, span = self._s[6], self._s[2]
        assert newest is not None
        if idx < newest[0] - span + 1:
            return self
        merged = list(self.buckets)
        at = bisect_left([i for i, _, _ in merged], idx)
        if at < len(merged) and merged[at][0] == idx:
            _, s, c = merged[at]
            merged[at] = (idx, s + value, c + 1)
        else:
            merged.insert(at, (idx, value, 1))
        busy = _busy(merged)
        newest = merged.pop()
        return self._of(_Closed(merged), 0, len(merged), newest, first, busy)

    def average(self, now: float, window_s: float) -> float | None:
        """The average over the `window_s` seconds ending at `now`; None with no sample in it."""
        _, first, _, closed, lo, hi, newest, _ = self._s
        if newest is None or first is None:
            return None
        n = _index(now)
        width = max(1, round(window_s / BUCKET_S))
        start = n - width + 1
        seconds = closed.seconds
        i = bisect_left(seconds, start, lo, hi)
        j = bisect_right(seconds, n, i, hi)
        means = closed.means[i:j]
        last = seconds[j - 1] if j > i else None
        if start <= newest[0] <= n:
            means.append(newest[1] / newest[2])
            last = newest[0]
        if last is None:
            return None
        # The means of the buckets inside, oldest first, as before: the same float.
        return sum(means) / (last - max(first, start) + 1)

    def last_nonzero(self) -> float | None:
        """The end of the latest second with a non-zero sample (busy until at least then), if any is kept."""
        busy = self._s[7]
        return (busy + 1) * BUCKET_S if busy is not None else None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MetricWindow):
            return NotImplemented
        return (self.horizon_s, self.buckets, self.first) == (other.horizon_s, other.buckets, other.first)

    def __hash__(self) -> int:
        return hash((self.horizon_s, self.buckets, self.first))

    def __reduce__(self) -> tuple[type[MetricWindow], tuple[float, tuple[Bucket, ...], int | None]]:
        # copy, deepcopy and pickle rebuild it from its value (its attributes cannot be set).
        return MetricWindow, (self.horizon_s, self.buckets, self.first)

    def __repr__(self) -> str:
        return f"MetricWindow(horizon_s={self.horizon_s!r}, buckets={self.buckets!r}, first={self.first!r})"
