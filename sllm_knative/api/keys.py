"""The one identity of a Knative Service across the processes: `ServiceKey(namespace, name)`,
written `namespace/name` ("default/llama-chat") wherever a string is needed (metric labels, logs,
the autoscaler's tables, `ServiceConfig.key`)."""

from __future__ import annotations

import dataclasses

DEFAULT_NAMESPACE = "default"


@dataclasses.dataclass(frozen=True, order=True, slots=True)
class ServiceKey:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"

    @classmethod
    def parse(cls, text: str, default_namespace: str = DEFAULT_NAMESPACE) -> ServiceKey:
        """`namespace/name`, or a bare `name` in `default_namespace`."""
        namespace, _, name = text.rpartition("/")
        if not name:
            raise ValueError(f"service key {text!r}: expected namespace/name")
        return cls(namespace or default_namespace, name)
