"""The PodAutoscaler reconcile step (autoscaler.kube.podautoscaler), table-driven: what Knative's
Revision reconciler reads from a PA of our class at each step of a revision's life."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from autoscaler.kube.podautoscaler import (
    ACTIVE,
    PROXY,
    READY,
    SCALE_TARGET_INITIALIZED,
    SERVE,
    SKS_READY,
    Advice,
    Pods,
    Settings,
    condition,
    make_sks,
    reconcile,
)

NOW = dt.datetime(2026, 12, 5, 12, 0, 0, tzinfo=dt.timezone.utc)
UID = "pa-uid"


def _pa(status: dict[str, Any] | None = None, generation: int = 3, **annotations: str) -> dict[str, Any]:
    return {"apiVersion": "autoscaling.internal.knative.dev/v1alpha1", "kind": "PodAutoscaler",
            "metadata": {"name": "chat-00001", "namespace": "ns", "uid": UID, "generation": generation,
                         "labels": {"serving.knative.dev/revision": "chat-00001"},
                         "annotations": {"autoscaling.knative.dev/class": "llm.autoscaling.sllm-knative.io",
                                         **{f"autoscaling.knative.dev/{k.replace('_', '-')}": v
                                            for k, v in annotations.items()}}},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "chat-00001-deployment"},
                     "protocolType": "http1"},
            "status": status or {}}


def _sks(mode: str = PROXY, ready: bool = True, private: str = "chat-00001-private") -> dict[str, Any]:
    sks = make_sks(_pa(), mode)
    sks["status"] = {"privateServiceName": private, "serviceName": "chat-00001",
                     "conditions": [{"type": "Ready", "status": "True" if ready else "Unknown",
                                     "message": "" if ready else "no endpoints"}]}
    return sks


def _c(status: dict[str, Any], t: str) -> tuple[str, str]:
    c = condition(status, t) or {}
    return c.get("status", ""), c.get("reason", "")


def _at(seconds: float) -> str:
    return (NOW - dt.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(active: str, since_s: float = 0.0, initialized: bool = True, desired: int = 1) -> dict[str, Any]:
    return {"desiredScale": desired, "serviceName": "chat-00001", "conditions": [
        {"type": ACTIVE, "status": active, "lastTransitionTime": _at(since_s)},
        {"type": SCALE_TARGET_INITIALIZED, "status": "True" if initialized else "Unknown",
         "lastTransitionTime": _at(600)}]}


S = Settings(scale_to_zero_grace_s=30.0)


def test_a_new_pa_gets_a_proxy_sks_and_waits_for_its_private_service() -> None:
    plan = reconcile(_pa(), None, Pods(), replicas=1, advice=Advice(-1), settings=S, now=NOW)
    assert plan.sks_create and plan.sks is not None
    assert plan.sks["spec"] == {"mode": PROXY, "objectRef": _pa()["spec"]["scaleTargetRef"], "numActivators": 0,
                                "protocolType": "http1"}
    ref = plan.sks["metadata"]["ownerReferences"][0]
    assert (ref["uid"], ref["controller"], ref["kind"]) == (UID, True, "PodAutoscaler")
    assert plan.sks["metadata"]["labels"] == {"serving.knative.dev/revision": "chat-00001"}
    assert _c(plan.status, SKS_READY) == ("Unknown", "NotReady")
    assert _c(plan.status, READY)[0] == "Unknown"
    assert plan.status["observedGeneration"] == 3
    assert (plan.status["serviceName"], plan.status["metricsServiceName"]) == ("", "")  # required by the schema
    assert plan.scale is None


def test_an_sks_we_do_not_own_is_a_failure_not_a_takeover() -> None:
    theirs = _sks()
    theirs["metadata"]["ownerReferences"][0]["uid"] = "someone-else"
    plan = reconcile(_pa(), theirs, Pods(), replicas=1, advice=Advice(1), settings=S, now=NOW)
    assert plan.sks is None and plan.scale is None and plan.error
    assert _c(plan.status, ACTIVE) == ("False", "NotOwned")
    assert _c(plan.status, READY) == ("False", "NotOwned")
    assert plan.events[0][:2] == ("Warning", "NotOwned")


@pytest.mark.parametrize("advice, pods, replicas, want_scale, active, mode", [
    # a cold start: the decider wants one, nothing is ready yet: scale, Activating (Queued), Proxy
    (Advice(1), Pods(), 0, 1, ("Unknown", "Queued"), PROXY),
    # ready, and the activator may leave the path
    (Advice(1, ebc=0), Pods(ready=1), 1, None, ("True", ""), SERVE),
    # ready, but the decider keeps the activator in the path (ebc -1: migratable streams)
    (Advice(1, ebc=-1), Pods(ready=1), 1, None, ("True", ""), PROXY),
    # more demand
    (Advice(3, ebc=-1), Pods(ready=1), 1, 3, ("True", ""), PROXY),
    # no data: leave the replicas alone
    (Advice(-1), Pods(ready=1), 1, None, ("True", ""), PROXY),
])
def test_scale_and_mode(advice: Advice, pods: Pods, replicas: int, want_scale: int | None,
                        active: tuple[str, str], mode: str) -> None:
    prior = _status("Unknown") if advice.want == 1 and pods.ready == 0 else _status("True", 100)
    plan = reconcile(_pa(prior), _sks(), pods, replicas, advice, S, NOW)
    assert plan.scale == want_scale
    assert _c(plan.status, ACTIVE) == active
    assert (plan.sks["spec"]["mode"] if plan.sks else PROXY) == mode
    assert plan.status["actualScale"] == pods.ready
    assert plan.status["metricsServiceName"] == "chat-00001-private"


def test_bounds_and_the_initial_scale() -> None:
    plan = reconcile(_pa(_status("True", 100), min_scale="2", max_scale="4"), _sks(), Pods(ready=1), 1,
                     Advice(9), S, NOW)
    assert plan.scale == 4
    plan = reconcile(_pa(_status("True", 100), min_scale="2"), _sks(), Pods(ready=2), 2, Advice(0), S, NOW)
    assert plan.scale is None and plan.status["desiredScale"] == 2
    # not yet initialized: raised to the initial scale
    plan = reconcile(_pa(_status("Unknown", 0, initialized=False), initial_scale="3"), _sks(), Pods(), 0,
                     Advice(1), S, NOW)
    assert plan.scale == 3


@pytest.mark.parametrize("active, since_s, probe_ok, scale, requeue, probe", [
    ("True", 0, False, None, 30.0, False),  # want 0: first Proxy and Inactive, come back after the grace
    ("False", 5, False, None, 1.0, True),  # inactive, the activator has not answered the probe yet
    ("False", 5, True, None, 25.0, False),  # the activator answers; the grace is not over
    ("False", 31, True, 0, None, False),  # the grace is over: zero
])
def test_the_way_to_zero(active: str, since_s: float, probe_ok: bool, scale: int | None,
                         requeue: float | None, probe: bool) -> None:
    plan = reconcile(_pa(_status(active, since_s)), _sks(SERVE), Pods(ready=1), 1, Advice(0), S, NOW,
                     probe_ok=probe_ok)
    assert (plan.scale, plan.requeue_after_s, plan.probe) == (scale, requeue, probe)
    assert plan.sks is not None and plan.sks["spec"]["mode"] == PROXY
    assert _c(plan.status, ACTIVE) == ("False", "NoTraffic")
    assert plan.status["desiredScale"] == 0
    # Scaled to zero, the revision stays Ready (Active is not part of the Revision's readiness).
    assert _c(plan.status, SCALE_TARGET_INITIALIZED)[0] == "True"


def test_conditions_keep_their_transition_time_unless_they_change() -> None:
    prior = _status("True", 100)
    plan = reconcile(_pa(prior), _sks(), Pods(ready=1), 1, Advice(1), S, NOW)
    assert (condition(plan.status, ACTIVE) or {})["lastTransitionTime"] == _at(100)
    assert _c(plan.status, READY) == ("True", "")
    assert (condition(plan.status, READY) or {})["lastTransitionTime"] == NOW.strftime("%Y-%m-%dT%H:%M:%SZ")
    again = reconcile(_pa(plan.status), _sks(), Pods(ready=1), 1, Advice(1), S, NOW + dt.timedelta(seconds=5))
    assert again.status == plan.status  # idempotent: nothing changes, nothing is rewritten


def test_sks_not_ready_holds_the_pa_not_ready() -> None:
    plan = reconcile(_pa(_status("True", 100)), _sks(ready=False), Pods(ready=1), 1, Advice(1), S, NOW)
    assert _c(plan.status, SKS_READY) == ("Unknown", "NotReady")
    assert _c(plan.status, READY) == ("Unknown", "NotReady")


def test_activation_that_never_happens_times_out() -> None:
    plan = reconcile(_pa(_status("Unknown", 700, initialized=False)), _sks(), Pods(), 1, Advice(0), S, NOW)
    assert _c(plan.status, ACTIVE) == ("False", "TimedOut")


@pytest.mark.parametrize(("ready", "active", "initialized"), [
    # the first pod served its request and went idle before a reconcile saw it ready: the PA
    # becomes Active and initialized (not TimedOut, which would fail the revision for good)
    (1, ("True", ""), "True"),
    (0, ("Unknown", "Queued"), "Unknown"),  # still starting: still activating
])
def test_no_scale_to_zero_while_activating(ready: int, active: tuple[str, str], initialized: str) -> None:
    """kpa/scaler.go handleScaleToZero: within the activation timeout a desired 0 is not applied
    while the PA is activating; the reconcile comes back when the timeout would run out."""
    plan = reconcile(_pa(_status("Unknown", 5, initialized=False)), _sks(), Pods(ready=ready), 1, Advice(0), S, NOW)
    assert _c(plan.status, ACTIVE) == active
    assert _c(plan.status, SCALE_TARGET_INITIALIZED)[0] == initialized
    assert plan.scale is None
    assert plan.requeue_after_s == pytest.approx(S.activation_timeout_s - 5)


def test_an_invalid_revision_is_reported_and_nothing_scales() -> None:
    """The autoscaler does not serve the revision (its configuration is invalid): the PA says why
    (Active and Ready False, InvalidConfiguration, the message naming the field), a Warning Event
    says it too, and the replicas are left alone whatever the advice."""
    why = 'Revision ns/chat-00001: spec.template.metadata.annotations["sllm-knative.io/model"]: required'
    plan = reconcile(_pa(_status("True", 100)), _sks(), Pods(ready=1), 1, Advice(3), S, NOW, problem=why)
    assert plan.scale is None
    assert _c(plan.status, ACTIVE) == ("False", "InvalidConfiguration")
    assert condition(plan.status, ACTIVE)["message"] == why
    assert condition(plan.status, READY)["status"] == "False"
    assert plan.events == [("Warning", "InvalidConfiguration", why)]
    assert plan.status["actualScale"] == 1


def test_failed_starts_are_a_warning_event_while_no_pod_is_ready() -> None:
    why = "2 failed start(s) in a row; the last: chat-abc on n1: container user-container: CrashLoopBackOff"
    plan = reconcile(_pa(_status("Unknown")), _sks(), Pods(), 1, Advice(1, failure=why), S, NOW)
    assert plan.events == [("Warning", "InstanceFailed", why)]
    assert plan.scale is None or plan.scale == 1  # the scale is the decider's; the backoff is the autoscaler's
    ready = reconcile(_pa(_status("True", 100)), _sks(), Pods(ready=1), 1, Advice(1, failure=why), S, NOW)
    assert ready.events == []  # one pod serves: not a warning
