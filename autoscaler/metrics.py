"""The autoscaler's Prometheus metrics (one registry per process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry()

COLD_STARTS = Counter("autoscaler_cold_starts_total", "Instances started, by the tier the checkpoint came from",
                      ["service", "tier"], registry=REGISTRY)
PLACEMENT_SECONDS = Histogram("autoscaler_placement_seconds", "Time to decide where an instance starts",
                              registry=REGISTRY, buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5))
READY_SECONDS = Histogram("autoscaler_instance_ready_seconds", "Instance start to ready", ["tier"],
                          registry=REGISTRY, buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300))
DESIRED = Gauge("autoscaler_desired_scale", "Instances the decider wants", ["service"], registry=REGISTRY)
READY = Gauge("autoscaler_ready_instances", "Instances ready", ["service"], registry=REGISTRY)
PREEMPTIONS = Counter("autoscaler_preemptions_total",
                      "Slots freed for another service (placement's evict or migrate): done or called off",
                      ["action", "result"], registry=REGISTRY)
MIGRATED_GENERATIONS = Counter("autoscaler_migrated_generations_total",
                               "Generations the activator was asked to move (preemption, scale-down), by outcome",
                               ["outcome"], registry=REGISTRY)
STOPPED_BUSY = Counter("autoscaler_stopped_busy_total",
                       "Instances stopped while they still ran generations (a scale-down's drain past its wait)",
                       registry=REGISTRY)
