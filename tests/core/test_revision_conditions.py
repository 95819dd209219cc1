"""The tests' stand-in for the half of Knative's revision reconciler that reads a PodAutoscaler
(`testkit.kube.knative.propagate_autoscaler_status`, a port of `PropagateAutoscalerStatus` in
knative/serving pkg/apis/serving/v1/revision_lifecycle.go): one row per case that function
distinguishes, so the Revision conditions the kube e2e test checks are Knative's."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from autoscaler.kube.podautoscaler import condition
from testkit.kube.knative import propagate_autoscaler_status

NOW = dt.datetime(2026, 12, 6, tzinfo=dt.UTC)


def pa(ready: str | None, initialized: str = "Unknown", reason: str = "", service: str = "rev",
       actual: int | None = None, desired: int | None = None) -> dict[str, Any]:
    conds = [{"type": "ScaleTargetInitialized", "status": initialized}]
    if ready is not None:
        conds.append({"type": "Ready", "status": ready, **({"reason": reason} if reason else {})})
    st: dict[str, Any] = {"conditions": conds, "serviceName": service}
    if actual is not None:
        st["actualScale"] = actual
    if desired is not None:
        st["desiredScale"] = desired
    return st


def rev(resources: str | None = None) -> dict[str, Any]:
    """A Revision's status before the reconcile (ResourcesAvailable as the Deployment half left it)."""
    return {} if resources is None else {"conditions": [{"type": "ResourcesAvailable", "status": resources}]}


def summary(status: dict[str, Any]) -> dict[str, str]:
    return {t: f"{(condition(status, t) or {}).get('status')}/{(condition(status, t) or {}).get('reason', '')}"
            for t in ("Active", "ResourcesAvailable", "ContainerHealthy", "Ready")}


@pytest.mark.parametrize(("before", "pa_status", "want"), [
    pytest.param(rev(), {}, {"Active": "Unknown/Deploying", "ResourcesAvailable": "Unknown/Deploying",
                             "ContainerHealthy": "Unknown/", "Ready": "Unknown/Deploying"}, id="pa-without-ready"),
    pytest.param(rev(), pa("Unknown", reason="Queued"),
                 {"Active": "Unknown/Queued", "ResourcesAvailable": "Unknown/", "ContainerHealthy": "Unknown/",
                  "Ready": "Unknown/"}, id="cold-start-under-way"),
    pytest.param(rev(), pa("True", "True"),
                 {"Active": "True/", "ResourcesAvailable": "True/", "ContainerHealthy": "True/", "Ready": "True/"},
                 id="first-pod-ready"),
    pytest.param(rev(), pa("False", "True", reason="NoTraffic"),
                 {"Active": "False/NoTraffic", "ResourcesAvailable": "True/", "ContainerHealthy": "True/",
                  "Ready": "True/"}, id="scaled-to-zero-stays-ready"),
    pytest.param(rev(), pa("False", "Unknown", reason="TimedOut"),
                 {"Active": "False/TimedOut", "ResourcesAvailable": "False/ProgressDeadlineExceeded",
                  "ContainerHealthy": "Unknown/", "Ready": "False/ProgressDeadlineExceeded"},
                 id="initial-scale-never-achieved"),
    pytest.param(rev(), pa("False", "Unknown", reason="NoTraffic"),
                 {"Active": "False/NoTraffic", "ResourcesAvailable": "Unknown/", "ContainerHealthy": "Unknown/",
                  "Ready": "Unknown/"}, id="idle-before-initialized-is-not-a-failure"),
    pytest.param(rev("False"), pa("True", "True"),
                 {"Active": "True/", "ResourcesAvailable": "False/", "ContainerHealthy": "Unknown/",
                  "Ready": "False/"}, id="a-deployment-failure-is-kept"),
    pytest.param(rev(), pa("True", "True", service=""),
                 {"Active": "True/", "ResourcesAvailable": "Unknown/Deploying", "ContainerHealthy": "True/",
                  "Ready": "Unknown/Deploying"}, id="no-service-name-yet"),
])
def test_revision_conditions_from_the_pa(before, pa_status, want):
    assert summary(propagate_autoscaler_status(before, pa_status, NOW)) == want


@pytest.mark.parametrize(("pa_status", "want"), [
    pytest.param(pa("True", "True", actual=2, desired=3), {"actualReplicas": 2, "desiredReplicas": 3}, id="copied"),
    pytest.param(pa("Unknown", actual=0, desired=-1), {"actualReplicas": 0}, id="unknown-desired-dropped"),
])
def test_replica_counts_from_the_pa(pa_status, want):
    st = propagate_autoscaler_status({"actualReplicas": 9, "desiredReplicas": 9}, pa_status, NOW)
    assert {k: st[k] for k in ("actualReplicas", "desiredReplicas") if k in st} == want


def test_a_condition_keeps_its_transition_time_while_it_holds():
    first = propagate_autoscaler_status({}, pa("True", "True"), NOW)
    later = propagate_autoscaler_status(first, pa("True", "True"), NOW + dt.timedelta(minutes=5))
    assert condition(later, "Ready") == condition(first, "Ready")
    zero = propagate_autoscaler_status(later, pa("False", "True", reason="NoTraffic"), NOW + dt.timedelta(minutes=9))
    assert condition(zero, "Active")["lastTransitionTime"] != condition(first, "Active")["lastTransitionTime"]
    assert condition(zero, "Ready") == condition(first, "Ready")
