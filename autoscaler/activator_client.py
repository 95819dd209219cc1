"""The autoscaler's side of the activator's admin API (loopback; docs/migration.md):

    PUT    /admin/v1/services/{ns}/{name}   the ready instances of a service (its rotation)
    DELETE /admin/v1/services/{ns}/{name}   the service is gone
    POST   /admin/v1/migrate                move an instance's generations to another instance
(paths and bodies: sllm_knative/api/activator.py)

`Activator` is what the controller needs; `ActivatorClient` does it over HTTP.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import httpx

from autoscaler.backends.base import InstanceRecord
from sllm_knative.api import MigrationOutcome, auth
from sllm_knative.api import activator as activator_api
from sllm_knative.api.autoscaler import StatsReport
from sllm_knative.config import ServiceConfig
from sllm_knative.log import get_logger

_log = get_logger("autoscaler")
MIGRATE_TIMEOUT_S = 300.0


@dataclasses.dataclass(frozen=True)
class MigrationResult:
    """One generation's migration, as the activator answered (`doc` is its JSON, kept for reports)."""

    id: str
    outcome: MigrationOutcome
    tokens: int
    seconds: float
    destination: str | None
    doc: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> MigrationResult:
        try:
            outcome = MigrationOutcome(doc.get("outcome"))
        except ValueError:
            _log.warning("unknown migration outcome; counted as failed", outcome=doc.get("outcome"))
            outcome = MigrationOutcome.FAILED
        return cls(str(doc.get("id", "")), outcome, int(doc.get("tokens") or 0), float(doc.get("seconds") or 0.0),
                   doc.get("destination"), doc)


class Activator(Protocol):
    async def push_endpoints(self, service: ServiceConfig, ready: Sequence[InstanceRecord]) -> None:
        """Make `ready` the service's rotation."""
        ...

    async def remove(self, service: str) -> None:
        """Forget the service (namespace/name)."""
        ...

    async def migrate(self, service: ServiceConfig, source: str,
                      destination: str | None) -> list[MigrationResult] | None:
        """Move the generations of instance `source` onto `destination` (None: the activator's
        choice among the service's ready instances). None when nothing could move: no other
        ready instance, or the activator refused."""
        ...

    async def outstanding(self, service: ServiceConfig, instance: str) -> int | None:
        """Requests the activator has sent to `instance` that have not ended (in rotation or not:
        one may still be on its way there); None when it could not say."""
        ...

    def replica_started(self) -> None:
        """An activator replica (re)started: it knows nothing the autoscaler told the replicas
        before, so what is not in every push must be sent again."""
        ...

    async def close(self) -> None: ...


class ActivatorClient:
    def __init__(self, admin_url: str, token: str | None = None) -> None:
        self.admin_url = admin_url
        # The activator's admin API wants the internal token when it has one (activator/admin.py).
        self.http = httpx.AsyncClient(timeout=5.0, headers=auth.auth_headers(
            token if token is not None else auth.token_from_env()))

    async def push_endpoints(self, service: ServiceConfig, ready: Sequence[InstanceRecord]) -> None:
        body = {"container_concurrency": service.container_concurrency, "hold_timeout_s": service.hold_timeout_seconds,
                "instances": [{"id": i.id, "url": i.url, "node": i.node, "internal_url": i.internal_url}
                              for i in ready]}
        try:
            r = await self.http.put(f"{self.admin_url}{activator_api.SERVICES}/{service.namespace}/{service.name}",
                                    json=body)
            r.raise_for_status()
        except httpx.HTTPError as exc:
            _log.error("could not update the activator", service=service.key, error=str(exc))

    async def remove(self, service: str) -> None:
        ns, name = service.split("/", 1)
        try:
            await self.http.delete(f"{self.admin_url}{activator_api.SERVICES}/{ns}/{name}")
        except httpx.HTTPError as exc:
            _log.warning("could not remove the service from the activator", service=service, error=str(exc))

    def replica_started(self) -> None:
        """Nothing to do: every push carries the service's whole rotation (local mode)."""

    async def withhold(self, service: ServiceConfig, instance: str, withheld: bool = True) -> bool:
        """Keep `instance` out of the service's rotation while its endpoints still list it (or,
        `withheld=False`, put it back). False when the activator did not take it (unreachable,
        or it does not know the service yet)."""
        body = {"namespace": service.namespace, "name": service.name, "instance": instance, "withheld": withheld}
        try:
            r = await self.http.post(f"{self.admin_url}{activator_api.WITHHOLD}", json=body)
            r.raise_for_status()
        except httpx.HTTPError as exc:
            _log.warning("could not withhold the instance", service=service.key, instance=instance,
                         activator=self.admin_url, error=str(exc)[:200])
            return False
        return True

    async def migrate(self, service: ServiceConfig, source: str,
                      destination: str | None) -> list[MigrationResult] | None:
        body = {"namespace": service.namespace, "name": service.name, "source": source, "destination": destination}
        try:
            r = await self.http.post(f"{self.admin_url}{activator_api.MIGRATE}", json=body, timeout=MIGRATE_TIMEOUT_S)
        except httpx.HTTPError as exc:
            _log.warning("migration request failed; draining instead", service=service.key, instance=source,
                         error=str(exc))
            return None
        if r.status_code != 200:
            _log.info("no migration; draining instead", service=service.key, instance=source,
                      status=r.status_code, reason=r.text[:200])
            return None
        return [MigrationResult.from_json(g) for g in r.json().get("generations", [])]

    async def outstanding(self, service: ServiceConfig, instance: str) -> int | None:
        try:
            r = await self.http.get(f"{self.admin_url}{activator_api.STATS}")
            r.raise_for_status()
            report = StatsReport.model_validate(r.json())
        except (httpx.HTTPError, ValueError) as exc:
            _log.warning("could not read the activator's stats", service=service.key, instance=instance,
                         activator=self.admin_url, error=str(exc)[:200])
            return None
        return sum(i.outstanding for s in report.services if str(s.key) == service.key
                   for i in s.instances if i.id == instance)

    async def close(self) -> None:
        await self.http.aclose()
