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
when most of it is dropped, so its length stays within a few horizons. `average` finds the
window's start by bisection and sums only the buckets inside, in the same order as before.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from operator import itemgetter

from sllm_knative.config.autoscaler import BUCKET_S

Bucket = tuple[int, float, int]  # (second, sum of the samples, how many)

_second = itemgetter(0)
_set = object.__setattr__


def _index(t: float) -> int:
    return math.floor(t / BUCKET_S)


class MetricWindow:
    """Buckets `(second, sum, count)` in ascending order, kept for `horizon_s` seconds."""

    __slots__ = ("horizon_s", "first", "_span", "_closed", "_lo", "_hi", "_newest")

    horizon_s: float
    first: int | None  # the second of the first sample ever recorded (None: no sample yet)
    _span: int
    _closed: list[Bucket]
    _lo: int
    _hi: int
    _newest: Bucket | None

    def __init__(self, horizon_s: float = 60.0, buckets: Iterable[Bucket] = (), first: int | None = None) -> None:
        if not horizon_s >= BUCKET_S:
            raise ValueError(f"horizon_s must be >= {BUCKET_S}, got {horizon_s}")
        span = math.ceil(horizon_s / BUCKET_S)  # buckets kept
        closed = list(buckets)
        if any(a[0] >= b[0] for a, b in zip(closed, closed[1:], strict=False)) or (
                closed and closed[0][0] <= closed[-1][0] - span):
            raise ValueError(f"buckets must be in ascending seconds within the horizon, got {closed}")
        newest = closed.pop() if closed else None
        self._init(horizon_s, first, span, closed, 0, len(closed), newest)

    def _init(self, horizon_s: float, first: int | None, span: int, closed: list[Bucket], lo: int, hi: int,
              newest: Bucket | None) -> None:
        _set(self, "horizon_s", horizon_s)
        _set(self, "first", first)
        _set(self, "_span", span)
        _set(self, "_closed", closed)  # shared with the windows recorded from this one; append-only
        _set(self, "_lo", lo)  # this window's buckets are _closed[_lo:_hi] and _newest
        _set(self, "_hi", hi)
        _set(self, "_newest", newest)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"MetricWindow is immutable: cannot set {name}")

    @classmethod
    def _of(cls, base: MetricWindow, closed: list[Bucket], lo: int, hi: int, newest: Bucket,
            first: int) -> MetricWindow:
        w = cls.__new__(cls)
        w._init(base.horizon_s, first, base._span, closed, lo, hi, newest)
        return w

    @property
    def buckets(self) -> tuple[Bucket, ...]:
        """All the buckets kept, oldest first (a copy: O(horizon))."""
        tail = (self._newest,) if self._newest is not None else ()
        return tuple(self._closed[self._lo:self._hi]) + tail

    def record(self, t: float, value: float) -> MetricWindow:
        """A window with `value` observed at time `t` (seconds). Samples older than the horizon
        (relative to the newest one) are dropped."""
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"metric value must be a finite number >= 0, got {value}")
        if not math.isfinite(t):
            raise ValueError(f"time must be finite, got {t}")
        idx = _index(t)
        newest = self._newest
        first = idx if self.first is None else min(self.first, idx)
        if newest is None:
            return self._of(self, [], 0, 0, (idx, value, 1), first)
        if idx == newest[0]:
            return self._of(self, self._closed, self._lo, self._hi, (idx, newest[1] + value, newest[2] + 1), first)
        if idx < newest[0]:
            return self._record_late(idx, value, first)
        closed, lo, hi = self._closed, self._lo, self._hi
        if hi != len(closed):  # a window recorded from this one appended already: fork
            closed, lo, hi = closed[lo:hi], 0, hi - lo
        closed.append(newest)
        hi += 1
        oldest_kept = idx - self._span + 1
        while lo < hi and closed[lo][0] < oldest_kept:
            lo += 1
        if lo > 2 * self._span and lo > hi - lo:  # mostly dropped: copy what is kept down
            closed, lo, hi = closed[lo:hi], 0, hi - lo
        return self._of(self, closed, lo, hi, (idx, value, 1), first)

    def _record_late(self, idx: int, value: float, first: int) -> MetricWindow:
        """A sample before the newest second: merged into a copy of the buckets, O(horizon)."""
        assert self._newest is not None
        if idx < self._newest[0] - self._span + 1:
            return self
        merged = list(self.buckets)
        at = bisect_left(merged, idx, key=_second)
        if at < len(merged) and merged[at][0] == idx:
            _, s, c = merged[at]
            merged[at] = (idx, s + value, c + 1)
        else:
            merged.insert(at, (idx, value, 1))
        newest = merged.pop()
        return self._of(self, merged, 0, len(merged), newest, first)

    def average(self, now: float, window_s: float) -> float | None:
        """The average over the `window_s` seconds ending at `now`; None with no sample in it."""
        newest = self._newest
        if newest is None or self.first is None:
            return None
        n = _index(now)
        width = max(1, round(window_s / BUCKET_S))
        start = n - width + 1
        closed, lo, hi = self._closed, self._lo, self._hi
        inside = closed[bisect_left(closed, start, lo, hi, key=_second):bisect_right(closed, n, lo, hi, key=_second)]
        if start <= newest[0] <= n:
            inside.append(newest)
        if not inside:
            return None
        total = sum(s / c for _, s, c in inside)  # as before, oldest first: the same float
        return total / (inside[-1][0] - max(self.first, start) + 1)

    def last_nonzero(self) -> float | None:
        """The end of the latest second with a non-zero sample (busy until at least then), if any is kept."""
        if self._newest is not None and self._newest[1] > 0:
            return (self._newest[0] + 1) * BUCKET_S
        closed = self._closed
        for i in range(self._hi - 1, self._lo - 1, -1):
            if closed[i][1] > 0:
                return (closed[i][0] + 1) * BUCKET_S
        return None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MetricWindow):
            return NotImplemented
        return (self.horizon_s, self.buckets, self.first) == (other.horizon_s, other.buckets, other.first)

    def __hash__(self) -> int:
        return hash((self.horizon_s, self.buckets, self.first))

    def __repr__(self) -> str:
        return f"MetricWindow(horizon_s={self.horizon_s!r}, buckets={self.buckets!r}, first={self.first!r})"
