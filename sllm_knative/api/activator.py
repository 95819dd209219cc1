"""The activator's admin API (loopback only; never on the public port): what the autoscaler and
the instances call (autoscaler/activator_client.py, functions/llm/drain.py).

    PUT    /admin/v1/services/{namespace}/{name}  ServiceUpdate -> ServiceUpdated   the ready instances
    DELETE /admin/v1/services/{namespace}/{name}  -> 204                             the service is gone
    GET    /admin/v1/stats                        -> StatsReport (sllm_knative/api/autoscaler.py)
    POST   /admin/v1/migrate                      MigrateRequest -> MigrateResponse  (409 no_destination)
    POST   /admin/v1/drain                        DrainRequest -> DrainResponse      (an instance is going)
    POST   /admin/v1/withhold                     WithholdRequest -> ServiceUpdated  (out of rotation while listed)
    GET    /metrics                               Prometheus

Errors are `AdminError`, `{"error": "<message>", "field": "<path>" | null}`; a malformed body is a
400 naming the field, an unknown service a 404.
"""

from __future__ import annotations

from sllm_knative.api.keys import ServiceKey
from sllm_knative.api.migration import MigrationOutcome
from sllm_knative.api.wire import Int, Message, NonEmptyStr, NonNegInt, PositiveFloat

ROOT = "/admin"  # never forwarded from the activator's public port
PREFIX = f"{ROOT}/v1"
SERVICES = f"{PREFIX}/services"
SERVICE_ROUTE = SERVICES + "/{namespace}/{name}"
STATS = f"{PREFIX}/stats"
MIGRATE = f"{PREFIX}/migrate"
DRAIN = f"{PREFIX}/drain"
WITHHOLD = f"{PREFIX}/withhold"
METRICS = "/metrics"


def service_path(key: ServiceKey) -> str:
    return f"{SERVICES}/{key.namespace}/{key.name}"


class Endpoint(Message):
    """One ready instance of a service."""

    id: str
    url: str  # the public API, plain http://host:port (the data path speaks nothing else)
    node: str = ""
    internal_url: str | None = None  # the internal (migration) API, if it has one
    capacity: NonNegInt | None = None  # concurrent requests at most (None: the service's; 0: unlimited)


class ServiceUpdate(Message):
    container_concurrency: NonNegInt = 0  # Knative's containerConcurrency (0: unlimited)
    hold_timeout_s: PositiveFloat | None = None  # how long a request may wait for room (None: the activator's)
    instances: list[Endpoint] = []


class ServiceUpdated(Message):
    service: str
    instances: int  # in rotation after the change: the listed ones less the withheld


class MigrateRequest(Message):
    namespace: NonEmptyStr
    name: NonEmptyStr
    source: NonEmptyStr  # the instance whose generations move
    destination: str | None = None  # None: the ready instance with the fewest outstanding requests

    @property
    def key(self) -> ServiceKey:
        return ServiceKey(self.namespace, self.name)


class GenerationMigration(Message):
    """What became of one generation (docs/migration.md, "Abort rules")."""

    id: str
    outcome: MigrationOutcome
    tokens: Int  # position at the detach (prompt + generated)
    rounds: Int  # waited prefill rounds
    seconds: float
    destination: str | None  # where it runs now, when it moved
    gaps: list[int] = []  # tokens not yet sent after each waited round
    lags: list[int] = []  # tokens sent but not computed at each follow step
    follow: Int = 0  # follow steps (len(lags))


class MigrateResponse(Message):
    service: str
    source: str
    generations: list[GenerationMigration]


class WithholdRequest(Message):
    """Keep `instance` out of the service's rotation while its endpoint updates still list it: a
    scale-down's victim on Kubernetes, where the rotation comes from EndpointSlices."""

    namespace: NonEmptyStr
    name: NonEmptyStr
    instance: NonEmptyStr
    withheld: bool = True  # False: back into rotation (a scale-down called off)

    @property
    def key(self) -> ServiceKey:
        return ServiceKey(self.namespace, self.name)


class DrainRequest(Message):
    instance: NonEmptyStr


class DrainResponse(Message):
    instance: str
    generations: list[GenerationMigration]


class AdminError(Message):
    error: str
    field: str | None = None
