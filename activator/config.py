"""The activator's settings (`python -m activator` flags)."""

from __future__ import annotations

import dataclasses

from activator.migration.config import MigrationConfig
from sllm_knative.config.service import REVISION_TIMEOUT_SECONDS


@dataclasses.dataclass(frozen=True)
class KubeSettings:
    """Kubernetes mode (`--kube`)."""

    kubeconfig: str | None = None  # None: $KUBECONFIG, else in-cluster
    cluster_domain: str = "cluster.local"
    knative_autoscaler_url: str | None = None  # ws://...; None: KPA revisions' demand is not reported
    pod_name: str = "activator"  # this activator's pod: the `pod_name` of its stats to Knative
    resync_s: float = 30.0
    sync_timeout_s: float = 60.0  # the informers' first lists, before the ports open

    def __post_init__(self) -> None:
        if self.resync_s <= 0:
            raise ValueError(f"resync_s = {self.resync_s}, must be > 0")


@dataclasses.dataclass(frozen=True)
class ActivatorConfig:
    autoscaler_url: str | None = None
    # The hold of a service that sets neither responseStartTimeoutSeconds nor timeoutSeconds:
    # Knative's own default timeoutSeconds (config-defaults revision-timeout-seconds, 300 s), so a
    # local Service is held as long as the same Service on Knative.
    cold_start_timeout_s: float = float(REVISION_TIMEOUT_SECONDS)
    max_body_bytes: int = 10 << 20
    max_held_per_service: int = 1000
    report_interval_s: float = 1.0
    default_namespace: str = "default"
    migration: MigrationConfig = dataclasses.field(default_factory=MigrationConfig)
    kube: KubeSettings | None = None  # None: local mode; else Knative's activator (activator/kube/)

    def __post_init__(self) -> None:
        if self.cold_start_timeout_s <= 0:
            raise ValueError(f"cold_start_timeout_s = {self.cold_start_timeout_s}, must be > 0")
        if self.max_body_bytes <= 0:
            raise ValueError(f"max_body_bytes = {self.max_body_bytes}, must be > 0")
        if self.max_held_per_service < 1:
            raise ValueError(f"max_held_per_service = {self.max_held_per_service}, must be >= 1")
