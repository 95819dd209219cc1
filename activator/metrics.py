"""The activator's Prometheus metrics (one registry per process, served on the admin port's /metrics).

Per service: requests by status, the wait for an instance with room, cold starts, the time to the
first body byte, requests in flight, retries. Migrations: how many by outcome, how long each
took, and the gap each handoff left in a client's stream (from the source's last frame to the
destination's first), with the largest one seen. Recovery: the periodic exports of streams' states
and what became of streams whose instance died.
"""

from __future__ import annotations

import dataclasses

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from sllm_knative.api.keys import ServiceKey
from sllm_knative.api.migration import MigrationOutcome

REGISTRY = CollectorRegistry()

REQUESTS = Counter("activator_requests_total", "Requests by service and outcome", ["service", "code"],
                   registry=REGISTRY)
QUEUE_SECONDS = Histogram("activator_queue_seconds", "Time a request waited for an instance with room",
                          ["service"], registry=REGISTRY,
                          buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))
COLD_STARTS = Counter("activator_cold_starts_total", "Requests that arrived with no ready instance",
                      ["service"], registry=REGISTRY)
PROXY_SECONDS = Histogram("activator_proxy_seconds", "Time from forwarding to the first body byte",
                          ["service"], registry=REGISTRY,
                          buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30))
IN_FLIGHT = Gauge("activator_in_flight", "Requests in flight or held", ["service"], registry=REGISTRY)
RETRIES = Counter("activator_retries_total", "Requests retried on another instance", ["service"],
                  registry=REGISTRY)

MIGRATIONS = Counter("activator_migrations_total", "Generations a migration tried to move, by outcome",
                     ["outcome"], registry=REGISTRY)
MIGRATION_SECONDS = Histogram("activator_migration_seconds",
                              "One generation's migration, from its first export to the switch",
                              registry=REGISTRY, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))
HANDOFF_GAP_SECONDS = Histogram("activator_migration_gap_seconds",
                                "Client-visible gap of a migrated stream: from the source's last frame "
                                "to the destination's first", registry=REGISTRY,
                                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
HANDOFF_GAP_MAX = Gauge("activator_migration_gap_max_seconds",
                        "The largest client-visible gap of a migrated stream since the activator started",
                        registry=REGISTRY)
for _outcome in MigrationOutcome:  # every outcome shows (at 0) before the first migration
    MIGRATIONS.labels(_outcome.value)
_gap_max = 0.0

EXPORTS = Counter("activator_stream_exports_total",
                  "Periodic exports of relayed streams' generation states (--export-interval), by result",
                  ["result"], registry=REGISTRY)
RECOVERIES = Counter("activator_stream_recoveries_total",
                     "Streams whose instance died, by what became of them: resumed from the last export, "
                     "cut because the resumed text differed from what was sent (diverged), or cut because "
                     "no instance took the resume (no_instance)", ["result"], registry=REGISTRY)
EXPORT_RESULTS = ("ok", "finished", "failed")
RECOVERY_RESULTS = ("resumed", "diverged", "no_instance")
for _result in EXPORT_RESULTS:
    EXPORTS.labels(_result)
for _result in RECOVERY_RESULTS:
    RECOVERIES.labels(_result)


def observe_migration(outcome: MigrationOutcome, seconds: float) -> None:
    MIGRATIONS.labels(outcome.value).inc()
    MIGRATION_SECONDS.observe(seconds)


def observe_export(result: str) -> None:
    EXPORTS.labels(result).inc()


def observe_recovery(result: str) -> None:
    RECOVERIES.labels(result).inc()


def observe_handoff_gap(seconds: float) -> None:
    global _gap_max
    HANDOFF_GAP_SECONDS.observe(seconds)
    if seconds > _gap_max:
        _gap_max = seconds
        HANDOFF_GAP_MAX.set(seconds)


@dataclasses.dataclass
class ServiceMeters:
    """One service's metric children (looked up once, not per request)."""

    in_flight: Gauge
    proxy_seconds: Histogram
    queue_seconds: Histogram
    cold_starts: Counter
    retries: Counter
    requests: dict[int, Counter]

    @classmethod
    def of(cls, key: ServiceKey) -> ServiceMeters:
        name = str(key)
        return cls(IN_FLIGHT.labels(name), PROXY_SECONDS.labels(name), QUEUE_SECONDS.labels(name),
                   COLD_STARTS.labels(name), RETRIES.labels(name), {})

    def request_done(self, key: ServiceKey, status: int) -> None:
        counter = self.requests.get(status)
        if counter is None:
            counter = self.requests[status] = REQUESTS.labels(str(key), str(status))
        counter.inc()
