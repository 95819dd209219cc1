"""A service's observed concurrency (or requests per second) over time, in one-second buckets.

Pure and immutable: `record` returns a new window. Averages follow Knative's bucketed
window average: over the buckets from the later of the first sample ever and the window's
start, up to the last sample (a second with no sample counts as zero; the seconds after the
last sample are not counted, so a reporter that goes quiet does not drag the average to
zero). A window with no sample inside it has no data (`None`).

Reporters (the activator) send the service-wide concurrency every second, zeros included;
several samples in one second are averaged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sllm_knative.config.autoscaler import BUCKET_S


def _index(t: float) -> int:
    return math.floor(t / BUCKET_S)


@dataclass(frozen=True)
class MetricWindow:
    """Buckets `(second, sum, count)` in ascending order, kept for `horizon_s` seconds."""

    horizon_s: float = 60.0
    buckets: tuple[tuple[int, float, int], ...] = ()
    first: int | None = None

    def __post_init__(self) -> None:
        if not self.horizon_s >= BUCKET_S:
            raise ValueError(f"horizon_s must be >= {BUCKET_S}, got {self.horizon_s}")

    def record(self, t: float, value: float) -> MetricWindow:
        """A window with `value` observed at time `t` (seconds). Samples older than the horizon
        (relative to the newest one) are dropped."""
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"metric value must be a finite number >= 0, got {value}")
        if not math.isfinite(t):
            raise ValueError(f"time must be finite, got {t}")
        idx = _index(t)
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
        return MetricWindow(self.horizon_s, tuple(merged), first)

    def average(self, now: float, window_s: float) -> float | None:
        """The average over the `window_s` seconds ending at `now`; None with no sample in it."""
        n = _index(now)
        width = max(1, round(window_s / BUCKET_S))
        start = n - width + 1
        inside = [b for b in self.buckets if start <= b[0] <= n]
        if not inside or self.first is None:
            return None
        lo = max(self.first, start)
        last = inside[-1][0]
        total = sum(s / c for _, s, c in inside)
        return total / (last - lo + 1)

    def last_nonzero(self) -> float | None:
        """The end of the latest second with a non-zero sample (busy until at least then), if any is kept."""
        for idx, s, _ in reversed(self.buckets):
            if s > 0:
                return (idx + 1) * BUCKET_S
        return None
