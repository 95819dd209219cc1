"""The load of each service over every activator that reports it (pure).

Knative runs the activator as a Deployment of several replicas, and each sees only the requests
it proxies: one replica may hold both streams of a service while another holds none. Each
replica reports every service it knows each report interval (`StatsReport`, named by its
`boot`), so the autoscaler keeps the latest report of each replica and adds them up, as
Knative's autoscaler adds up the concurrency its scrapes return. Taking each report as the
whole (as the controller did) made the service's in-flight count flip between replicas' numbers
at each report, and the concurrency window averaged their samples instead of summing them: with
both streams on one of two replicas, the decider saw 1 where there were 2.

A replica that stops reporting (stopped, replaced) drops out once its report is `STALE_INTERVALS`
of its own intervals old (a report's window length, `ServiceStats.seconds`, is the time since
its previous report).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from sllm_knative.api.autoscaler import StatsReport

#: A replica's report counts until it is this many of its report intervals old.
STALE_INTERVALS = 3.0
#: The shortest interval assumed (a report with no service, or windows shorter than this).
MIN_INTERVAL_S = 1.0


@dataclass
class ServiceLoad:
    """One service's load summed over the replicas' latest reports."""

    average_concurrency: float = 0.0
    requests: int = 0
    in_flight: int = 0
    held: int = 0
    oldest_held_s: float = 0.0  # the longest wait on any replica
    outstanding: dict[str, int] = field(default_factory=dict)  # per instance, summed


def stale_after(report: StatsReport) -> float:
    """Seconds after which `report` no longer counts."""
    interval = max([MIN_INTERVAL_S, *(s.seconds for s in report.services)])
    return STALE_INTERVALS * interval


def fresh(latest: Mapping[str, tuple[float, StatsReport]], now: float) -> dict[str, tuple[float, StatsReport]]:
    """The replicas' latest reports (by boot, with their arrival time) that still count at `now`."""
    return {boot: (at, r) for boot, (at, r) in latest.items() if now - at <= stale_after(r)}


def total(reports: Iterable[StatsReport]) -> dict[str, ServiceLoad]:
    """Per service (`str(ServiceKey)`), the sum of its load over `reports` (one per replica)."""
    out: dict[str, ServiceLoad] = {}
    for report in reports:
        for s in report.services:
            load = out.setdefault(str(s.key), ServiceLoad())
            load.average_concurrency += s.average_concurrency
            load.requests += s.requests
            load.in_flight += s.in_flight
            load.held += s.held
            load.oldest_held_s = max(load.oldest_held_s, s.oldest_held_s)
            for inst in s.instances:
                load.outstanding[inst.id] = load.outstanding.get(inst.id, 0) + inst.outstanding
    return out
