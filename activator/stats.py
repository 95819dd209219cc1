"""Per-service concurrency as the autoscaler wants it: a pure, time-weighted window.

`change(+1/-1, now)` on request start/end; `report(now)` returns the average concurrency
since the last report (like Knative's activator stats), the requests started, and the
current in-flight count, then starts a new window. Time is a parameter: tests step it.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Report:
    average_concurrency: float
    requests: int
    in_flight: int
    seconds: float


class ConcurrencyWindow:
    def __init__(self, now: float) -> None:
        self.in_flight = 0
        self._start = self._last = now
        self._area = 0.0
        self._requests = 0

    def change(self, delta: int, now: float) -> None:
        self._area += self.in_flight * max(0.0, now - self._last)
        self._last = now
        self.in_flight += delta
        if delta > 0:
            self._requests += delta

    def report(self, now: float, reset: bool = True) -> Report:
        """The window so far; with reset (the autoscaler's report), a new window starts."""
        area = self._area + self.in_flight * max(0.0, now - self._last)
        span = now - self._start
        avg = area / span if span > 0 else float(self.in_flight)
        r = Report(avg, self._requests, self.in_flight, span)
        if reset:
            self._start = self._last = now
            self._area = 0.0
            self._requests = 0
        return r
