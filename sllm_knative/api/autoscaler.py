"""The autoscaler's API as the activator calls it (autoscaler/server.py serves it):

    POST /v1/demand   Demand        a request waits for a service at zero: decide now
    POST /v1/stats    StatsReport   per-service concurrency, every report interval

`StatsReport` is also the answer of the activator's own `GET /admin/v1/stats`
(sllm_knative/api/activator.py). The CLI's calls (apply, services, nodes) are not typed here.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from sllm_knative.api.keys import ServiceKey
from sllm_knative.api.wire import Message, NonEmptyStr, NonNegFloat, NonNegInt

DEMAND = "/v1/demand"
STATS = "/v1/stats"


class Demand(Message):
    namespace: NonEmptyStr
    name: NonEmptyStr
    in_flight: NonNegInt = 1  # requests of the service in the activator now (held ones included)

    @property
    def key(self) -> ServiceKey:
        return ServiceKey(self.namespace, self.name)


class InstanceLoad(Message):
    id: str
    outstanding: NonNegInt  # requests forwarded to it and not yet answered


class ServiceStats(Message):
    namespace: NonEmptyStr
    name: NonEmptyStr
    average_concurrency: float  # time-weighted over the window
    requests: NonNegInt  # started in the window
    in_flight: NonNegInt  # now
    held: NonNegInt = 0  # of those, waiting for an instance with room
    oldest_held_s: NonNegFloat = 0.0  # how long the longest-waiting of them has waited
    seconds: float  # the window's length
    instances: list[InstanceLoad] = []

    @property
    def key(self) -> ServiceKey:
        return ServiceKey(self.namespace, self.name)


Boot = Annotated[str, Field(min_length=1, max_length=64)]


class StatsReport(Message):
    services: list[ServiceStats] = []
    # The reporting activator process (random at its start): one the autoscaler has not heard
    # from before has just started (or restarted) and may know no service yet.
    boot: Boot | None = None
