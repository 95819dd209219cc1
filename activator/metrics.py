"""The activator's Prometheus metrics (one registry per process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
