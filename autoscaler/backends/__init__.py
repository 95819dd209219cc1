"""Cluster backends behind one protocol (`base.Backend`): `local` (processes on this machine)
and `memory` (simulated nodes and instances, for tests)."""

from autoscaler.backends.base import (
    OCCUPYING,
    Backend,
    EventHandler,
    EventKind,
    InstanceEvent,
    InstanceRecord,
    InstanceState,
)

__all__ = ["OCCUPYING", "Backend", "EventHandler", "EventKind", "InstanceEvent", "InstanceRecord", "InstanceState"]
