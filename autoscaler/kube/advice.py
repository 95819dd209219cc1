"""What the PodAutoscaler controller asks of the autoscaler: the replicas a revision should have.

The decider and the placement loop (`autoscaler.controller`, `autoscaler.scaling`) decide how
many instances a service runs and where, exactly as in the local cluster; on Kubernetes each
instance is a pod, so the revision's replicas are the instances the controller counts (starting,
ready, draining: every state that holds a pod), together with the pods the backend has placed
(`KubeBackend.placed`: a pod just pinned is the backend's before the scale-up that asked for it
has recorded it; without it the count dips for that moment, and the ReplicaSet deletes the pod
it just made), plus the placements waiting for their pod (`KubeBackend.open_intents`). An
instance leaves the count only once `KubeBackend.stop` has marked its pod as the one to delete,
so the ReplicaSet removes that pod and no other.
"""

from __future__ import annotations

from autoscaler.backends.base import OCCUPYING
from autoscaler.kube.podautoscaler import UNKNOWN, Advice
from autoscaler.services import ServiceRuntime


def advice_for(rt: ServiceRuntime | None, open_intents: int, placed: frozenset[str] = frozenset()) -> Advice:
    """Pure. No advice (UNKNOWN, replicas left as they are) for a service the autoscaler does not
    know or has had no data for since it started (a restart must not scale anything to zero)."""
    if rt is None or not rt.decided:
        return Advice(UNKNOWN, reason="no decision yet")
    want = len({i.id for i in rt.instances.values() if i.state in OCCUPYING} | placed) + open_intents
    # Live migration splices streams in the activator: a service whose generations may be
    # migrated keeps the activator in its path (Proxy), as Knative does for a TBC of -1.
    ebc = -1 if rt.migration else rt.excess_burst_capacity
    failure = f"{rt.failed_starts} failed start(s) in a row; the last: {rt.last_failure}" if rt.failed_starts else ""
    return Advice(want, ebc, rt.last_decision, failure)
