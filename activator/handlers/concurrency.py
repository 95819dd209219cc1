"""The service's concurrency as the autoscaler reads it (Knative's concurrency reporter): the
request counts in the service's time-weighted window and in-flight gauge from here until its
response is over, held requests included."""

from __future__ import annotations

import time

from activator.handlers import Routed, RoutedHandler


class ConcurrencyHandler:
    def __init__(self, next_handler: RoutedHandler) -> None:
        self.next = next_handler

    async def __call__(self, r: Routed) -> None:
        window, gauge = r.svc.window, r.meters.in_flight
        window.change(+1, time.monotonic())
        gauge.inc()
        try:
            await self.next(r)
        finally:
            window.change(-1, time.monotonic())
            gauge.dec()
