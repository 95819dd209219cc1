"""What the controller feeds back into the load-time model (pure; see docs/placement.md,
"Online calibration"): a ready instance's lease timing (the load's bandwidth) and start
overhead, and the cost of each generation a migration moved."""

from __future__ import annotations

from collections.abc import Iterable

from autoscaler.backends.base import InstanceRecord
from sllm_knative.api import MigrationOutcome
from sllm_knative.placement import (
    Calibration,
    LoadObservation,
    MigrationObservation,
    Tier,
    observe_load,
    observe_migration,
    observe_start,
)

MIN_CALIBRATION_BYTES = 64 << 20  # a smaller transfer measures latency, not bandwidth
_LEASE_TIERS = {"dram": Tier.DRAM, "ssd": Tier.SSD, "remote": Tier.REMOTE}


def fold_ready(cal: Calibration, rec: InstanceRecord) -> Calibration:
    """Fold the observed load (lease timing) and the start overhead (the rest of start to
    ready) of a ready instance into the model; unchanged when it has no ready time."""
    if not rec.ready_at:
        return cal
    lease = rec.lease
    load_s = 0.0
    if lease.get("lease_complete") and lease.get("lease_requested"):
        load_s = max(0.0, lease["lease_complete"] - lease["lease_requested"])
        tier = _LEASE_TIERS.get(lease.get("source", ""))
        if tier is not None and load_s > 0 and lease.get("bytes", 0) >= MIN_CALIBRATION_BYTES:
            cal = observe_load(cal, LoadObservation(rec.node, tier, lease["bytes"], load_s))
    overhead = max(0.0, rec.ready_at - rec.started_at - load_s)
    return observe_start(cal, rec.node, overhead)


def fold_migrations(cal: Calibration, moved: Iterable[tuple[MigrationOutcome, int, float]]) -> Calibration:
    """Fold each migrated generation (outcome, tokens, seconds) into the `a * tokens + b` fit."""
    for outcome, tokens, seconds in moved:
        if outcome == MigrationOutcome.MIGRATED:
            cal = observe_migration(cal, MigrationObservation(tokens, seconds))
    return cal
