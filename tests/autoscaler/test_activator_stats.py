"""Several activator replicas report one service: the autoscaler adds up their latest reports
(autoscaler/activator_stats.py) instead of taking each as the whole."""

from __future__ import annotations

import asyncio

import pytest

from autoscaler.activator_stats import STALE_INTERVALS, fresh, total
from sllm_knative.api.autoscaler import InstanceLoad, ServiceStats, StatsReport
from tests.autoscaler.cluster import Cluster, node, service


def stats(name: str, *, concurrency: float = 0.0, in_flight: int = 0, requests: int = 0, held: int = 0,
          oldest: float = 0.0, seconds: float = 1.0, outstanding: dict[str, int] | None = None) -> ServiceStats:
    return ServiceStats(namespace="default", name=name, average_concurrency=concurrency, requests=requests,
                        in_flight=in_flight, held=held, oldest_held_s=oldest, seconds=seconds,
                        instances=[InstanceLoad(id=i, outstanding=n) for i, n in (outstanding or {}).items()])


def report(boot: str, *services: ServiceStats) -> StatsReport:
    return StatsReport(services=list(services), boot=boot)


def test_total_adds_up_the_replicas() -> None:
    a = report("a", stats("chat", concurrency=2.0, in_flight=2, requests=2, held=1, oldest=0.5, outstanding={"p1": 2}),
               stats("echo", concurrency=0.5, in_flight=1, requests=1))
    b = report("b", stats("chat", concurrency=0.5, in_flight=1, requests=3, held=2, oldest=1.5,
                          outstanding={"p1": 1, "p2": 1}))
    loads = total([a, b])
    chat, echo = loads["default/chat"], loads["default/echo"]
    assert (chat.average_concurrency, chat.in_flight, chat.requests, chat.held) == (2.5, 3, 5, 3)
    assert chat.oldest_held_s == 1.5  # the longest wait on any replica
    assert chat.outstanding == {"p1": 3, "p2": 1}
    assert (echo.average_concurrency, echo.in_flight, echo.outstanding) == (0.5, 1, {})
    assert total([]) == {}


@pytest.mark.parametrize(("age", "seconds", "kept"), [
    (0.0, 1.0, True),
    (STALE_INTERVALS * 1.0, 1.0, True),  # the last moment it counts
    (STALE_INTERVALS * 1.0 + 0.01, 1.0, False),  # a replica that stopped reporting drops out
    (5.0, 2.0, True),  # a replica reporting every 2 s counts for 6 s
    (3.5, 0.2, False),  # intervals shorter than a second count as one second
])
def test_fresh(age: float, seconds: float, kept: bool) -> None:
    latest = {"a": (100.0, report("a", stats("chat", seconds=seconds)))}
    assert ("a" in fresh(latest, 100.0 + age)) is kept


def test_the_autoscaler_sees_the_streams_of_every_replica() -> None:
    """Two streams on replica a, none on replica b, reported in turn: the service has 2 in flight
    whichever reported last (it was whichever's number), and its window's mean is 2, not 1; once a
    stops reporting, its report drops out."""
    async def main() -> None:
        c = Cluster([node("n1")])
        await c.deploy(service("chat"))
        on = c.scaler.on_stats
        t = c.clock.t
        for k in range(3):
            on(report("a", stats("chat", concurrency=2.0, in_flight=2, requests=2 if k == 0 else 0)), now=t + k)
            assert c.rt("chat").in_flight == 2
            on(report("b", stats("chat")), now=t + k + 0.5)
            assert c.rt("chat").in_flight == 2
        window = c.rt("chat").window
        assert window.average(t + 2.6, 3.0) == pytest.approx(2.0)
        on(report("b", stats("chat")), now=t + 2 + STALE_INTERVALS + 0.5)  # a's last report is 3.5 s old
        assert c.rt("chat").in_flight == 0
        await c.close()

    asyncio.run(main())
