"""One reconcile of a PodAutoscaler of class `llm.autoscaling.sllm-knative.io`, as a pure function.

What Knative expects of a PA-class controller (../shared/KNATIVE-CONTRACT.md; knative/serving
`pkg/reconciler/autoscaling/kpa/kpa.go`, `kpa/scaler.go`, `resources/sks.go`,
`pkg/apis/autoscaling/v1alpha1/pa_lifecycle.go`), in the order `reconcile` applies it:

1. The ServerlessService named after the PA, controlled by it: created in Proxy mode until its
   status names a private service; an SKS controlled by something else is a `NotOwned` failure,
   not something to take over.
2. The desired scale comes from the decider (`Advice.want`, -1 while it has no data), bounded
   by min/max-scale and raised to the initial scale until that was reached once.
3. The SKS mode: Serve when the revision should run and the decider's excess burst capacity
   allows the activator to leave the path (`ebc >= 0`), else Proxy. (Our decider returns -1,
   the activator stays in the path, while the revision's generations must stay migratable.)
4. The way to zero: want 0 -> Proxy and `Active=False (NoTraffic)`; the replicas drop to 0 only
   once the activator answers the revision's probe (`probe_ok`) and the PA has been inactive for
   the scale-to-zero grace period (and the pod retention period); until then the reconcile
   asks to be called again when that time is up.
5. Status: `serviceName` (SKS status), `metricsServiceName` (the SKS's private service),
   `desiredScale`, `actualScale` (ready pods), the conditions `Active`,
   `ScaleTargetInitialized`, `SKSReady` and `Ready` (all three true), each keeping its
   `lastTransitionTime` unless its status changes, and `observedGeneration`.
"""

from __future__ import annotations

import copy
import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from sllm_knative.kube.times import parse_rfc3339, rfc3339

CLASS = "llm.autoscaling.sllm-knative.io"
CLASS_ANNOTATION = "autoscaling.knative.dev/class"
MIN_SCALE = "autoscaling.knative.dev/min-scale"
MAX_SCALE = "autoscaling.knative.dev/max-scale"
INITIAL_SCALE = "autoscaling.knative.dev/initial-scale"
REVISION_LABEL = "serving.knative.dev/revision"

PROXY, SERVE = "Proxy", "Serve"
ACTIVE, SCALE_TARGET_INITIALIZED, SKS_READY, READY = "Active", "ScaleTargetInitialized", "SKSReady", "Ready"
DEPENDENTS = (ACTIVE, SCALE_TARGET_INITIALIZED, SKS_READY)
UNKNOWN = -1  # the decider has no data yet


@dataclass(frozen=True)
class Advice:
    """What the decider wants for the revision now."""

    want: int  # desired pods; UNKNOWN (-1) while the decider has no data
    ebc: int = -1  # excess burst capacity; -1: keep the activator in the path
    reason: str = ""
    failure: str = ""  # why the last starts failed (a Warning Event while none is ready), '' when fine


@dataclass(frozen=True)
class Pods:
    ready: int = 0
    not_ready: int = 0
    pending: int = 0
    terminating: int = 0


@dataclass(frozen=True)
class Settings:
    scale_to_zero_grace_s: float = 30.0
    pod_retention_s: float = 0.0
    initial_scale: int = 1
    allow_zero_initial_scale: bool = False
    probe_period_s: float = 1.0
    # kpa/scaler.go handleScaleToZero: a PA still activating (Active Unknown) is not scaled to
    # zero until this long after it began: config-deployment's progress-deadline (600 s by
    # default) plus Knative's activationTimeoutBuffer (10 s).
    activation_timeout_s: float = 610.0


@dataclass
class Plan:
    """What the adapter must do: create or update the SKS, patch the scale, write the status."""

    sks: dict[str, Any] | None = None  # the SKS to create/update (None: leave it)
    sks_create: bool = False
    scale: int | None = None  # patch /spec/replicas to this (None: leave it)
    status: dict[str, Any] = field(default_factory=dict)
    requeue_after_s: float | None = None
    probe: bool = False  # the adapter should probe the activator for this revision
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    error: str = ""  # reconcile failed (the status says why)


def _int_annotation(annotations: dict[str, str], key: str) -> int | None:
    try:
        return max(0, int(annotations[key]))
    except (KeyError, ValueError):
        return None


def sks_name(pa_name: str) -> str:
    return pa_name  # anames.SKS: the SKS is named after the PA


def make_sks(pa: dict[str, Any], mode: str, num_activators: int = 0) -> dict[str, Any]:
    """The SKS Knative's MakeSKS would build for this PA (labels copied, the PA as controller)."""
    meta, spec = pa["metadata"], pa.get("spec") or {}
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k == "autoscaling.knative.dev/metric"}
    # protocolType is required by the SKS schema; Knative defaults a PA's to http1.
    sks_spec: dict[str, Any] = {"mode": mode, "objectRef": spec.get("scaleTargetRef"),
                                "numActivators": num_activators, "protocolType": spec.get("protocolType") or "http1"}
    return {
        "apiVersion": "networking.internal.knative.dev/v1alpha1", "kind": "ServerlessService",
        "metadata": {"name": sks_name(meta["name"]), "namespace": meta["namespace"],
                     "labels": dict(meta.get("labels") or {}), "annotations": annotations,
                     "ownerReferences": [{"apiVersion": pa.get("apiVersion", "autoscaling.internal.knative.dev/v1alpha1"),
                                          "kind": "PodAutoscaler", "name": meta["name"], "uid": meta["uid"],
                                          "controller": True, "blockOwnerDeletion": True}]},
        "spec": sks_spec,
    }


def controlled_by(obj: dict[str, Any], owner_uid: str) -> bool:
    return any(r.get("controller") and r.get("uid") == owner_uid
               for r in (obj.get("metadata") or {}).get("ownerReferences") or [])


def condition(status: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c.get("type") == type_), None)


def _is(status: dict[str, Any], type_: str, value: str) -> bool:
    c = condition(status, type_)
    return c is not None and c.get("status") == value


class LivingConditions:
    """Knative's living condition set (knative.dev/pkg apis.NewLivingConditionSet) over a status
    dict: Ready is True when every dependent is, False when one is False (with its reason), else
    Unknown; marking any condition recomputes it. The PA's dependents by default; the tests'
    stand-in for Knative's revision reconciler passes the Revision's."""

    def __init__(self, status: dict[str, Any], now: dt.datetime, dependents: tuple[str, ...] = DEPENDENTS) -> None:
        self.status, self.now, self.dependents = status, now, dependents
        status.setdefault("conditions", [])
        for t in (*dependents, READY):  # InitializeConditions
            if condition(status, t) is None:
                self._set(t, "Unknown", "", "")

    def _set(self, type_: str, value: str, reason: str, message: str) -> None:
        conds = self.status["conditions"]
        old = condition(self.status, type_)
        new = {"type": type_, "status": value, "lastTransitionTime": rfc3339(self.now)}
        if reason:
            new["reason"] = reason
        if message:
            new["message"] = message
        if old is not None:
            if old.get("status") == value:
                new["lastTransitionTime"] = old.get("lastTransitionTime", new["lastTransitionTime"])
            conds[conds.index(old)] = new
        else:
            conds.append(new)

    def mark(self, type_: str, value: str, reason: str = "", message: str = "") -> None:
        self._set(type_, value, reason, message)
        self._ready()

    def _ready(self) -> None:
        deps = [condition(self.status, t) or {} for t in self.dependents]
        bad = next((c for c in deps if c.get("status") == "False"), None)
        unknown = next((c for c in deps if c.get("status") == "Unknown"), None)
        if bad:
            self._set(READY, "False", bad.get("reason", ""), bad.get("message", ""))
        elif unknown:
            self._set(READY, "Unknown", unknown.get("reason", ""), unknown.get("message", ""))
        else:
            self._set(READY, "True", "", "")
        self.status["conditions"].sort(key=lambda c: c["type"])


def _since(status: dict[str, Any], type_: str, value: str, now: dt.datetime) -> float | None:
    """Seconds the condition has held `value`, None when it does not."""
    c = condition(status, type_)
    if c is None or c.get("status") != value:
        return None
    t = parse_rfc3339(c.get("lastTransitionTime"))
    return (now - t).total_seconds() if t else 0.0


def bounds(pa: dict[str, Any], settings: Settings, initialized: bool) -> tuple[int, int, int]:
    """(min, max, initial) scale; max 0 means unbounded. min ignored for unreachable revisions."""
    ann = (pa.get("metadata") or {}).get("annotations") or {}
    reachable = (pa.get("spec") or {}).get("reachability") != "Unreachable"
    lo = (_int_annotation(ann, MIN_SCALE) or 0) if reachable else 0
    hi = _int_annotation(ann, MAX_SCALE) or 0
    initial = settings.initial_scale
    rev_initial = _int_annotation(ann, INITIAL_SCALE)
    if rev_initial is not None and (rev_initial > 0 or settings.allow_zero_initial_scale):
        initial = rev_initial
    return lo, hi, initial


def reconcile(pa: dict[str, Any], sks: dict[str, Any] | None, pods: Pods, replicas: int | None,
              advice: Advice, settings: Settings, now: dt.datetime, probe_ok: bool = False,
              problem: str = "") -> Plan:
    """One reconcile. `problem` says why the autoscaler does not serve the revision (its
    configuration is invalid): the PA then reports it (`Active=False, InvalidConfiguration`, a
    Warning Event) and nothing scales, until the Revision is fixed."""
    meta = pa["metadata"]
    status = copy.deepcopy(pa.get("status") or {})
    conds = LivingConditions(status, now)
    plan = Plan(status=status)
    initialized = _is(status, SCALE_TARGET_INITIALIZED, "True")

    # 1. The SKS: ours, or a failure that names who holds the name.
    if sks is not None and not controlled_by(sks, meta["uid"]):
        conds.mark(ACTIVE, "False", "NotOwned", f'There is an existing ServerlessService "{sks_name(meta["name"])}" '
                                                "that we do not own.")
        plan.error = f"PA {meta['name']} does not own SKS {sks_name(meta['name'])}"
        plan.events.append(("Warning", "NotOwned", plan.error))
        return _finish(plan, pa, status)
    if sks is None or not (sks.get("status") or {}).get("privateServiceName"):
        want_sks = make_sks(pa, PROXY)
        if sks is None:
            plan.sks, plan.sks_create = want_sks, True
        elif _spec_differs(sks, want_sks):
            plan.sks = {**sks, "spec": want_sks["spec"]}
        conds.mark(SKS_READY, "Unknown", "NotReady", "SKS does not have a private service name yet")
        # The PA schema requires both names: empty until the SKS has them (as Knative's Go
        # structs serialize them), or the API server refuses the whole status.
        status.setdefault("serviceName", "")
        status.setdefault("metricsServiceName", "")
        _compute_active(conds, status, pa, settings, UNKNOWN, pods, initialized)
        status["actualScale"] = pods.ready
        if "desiredScale" not in status:
            status["desiredScale"] = UNKNOWN
        return _finish(plan, pa, status)

    sks_status = sks.get("status") or {}
    status["metricsServiceName"] = sks_status["privateServiceName"]
    if problem:
        status["serviceName"] = sks_status.get("serviceName", "")
        status["actualScale"] = pods.ready
        conds.mark(ACTIVE, "False", "InvalidConfiguration", problem[:1024])
        plan.events.append(("Warning", "InvalidConfiguration", problem[:1024]))
        return _finish(plan, pa, status)

    # 2. The desired scale, bounded (kpa/scaler.go scale): nothing to apply while the decider
    # has no data; otherwise min/max-scale, and the initial scale until it was reached once.
    lo, hi, initial = bounds(pa, settings, initialized)
    want = advice.want
    if want >= 0:
        floor = max(lo, initial) if (initial > 1 and not initialized) else lo
        want = max(want, floor)
        if hi:
            want = min(want, hi)

    # 4. The way to zero: Proxy first, the activator's answer, the grace period, then 0. Not while
    # activating (kpa/scaler.go handleScaleToZero): a first pod that served its request and went
    # idle before a reconcile saw it ready would otherwise mark the PA TimedOut, and Knative's
    # Revision reconciler then fails the revision for good ("Initial scale was never achieved").
    activating_for = _since(status, ACTIVE, "Unknown", now)
    if want == 0 and activating_for is not None and activating_for < settings.activation_timeout_s:
        want = UNKNOWN
        plan.requeue_after_s = settings.activation_timeout_s - activating_for
    apply = want >= 0
    if want == 0 and (replicas or 0) > 0:
        inactive_for = _since(status, ACTIVE, "False", now)
        wait = max(settings.scale_to_zero_grace_s, settings.pod_retention_s)
        if inactive_for is None:  # not yet marked inactive: this reconcile does that
            apply, plan.requeue_after_s = False, wait
        elif not probe_ok:
            apply, plan.probe, plan.requeue_after_s = False, True, settings.probe_period_s
        elif inactive_for < wait:
            apply, plan.requeue_after_s = False, wait - inactive_for
    if apply and replicas != want:
        plan.scale = want
        plan.events.append(("Normal", "Scaled", f"replicas {replicas if replicas is not None else '-'} -> {want}"
                            + (f": {advice.reason}" if advice.reason else "")))

    # 3. The SKS mode.
    mode = PROXY
    if want > 0 and advice.ebc >= 0:
        mode = SERVE
    want_sks = make_sks(pa, mode)
    if _spec_differs(sks, want_sks):
        plan.sks = {**sks, "spec": want_sks["spec"]}
    status["serviceName"] = sks_status.get("serviceName", "")
    sks_ready = condition(sks_status, "Ready") or {}
    if sks_ready.get("status") == "True":
        conds.mark(SKS_READY, "True")
    else:
        conds.mark(SKS_READY, "Unknown", "NotReady", sks_ready.get("message", ""))

    # 5. Status.
    status["actualScale"] = pods.ready
    prior = status.get("desiredScale")
    if not (want == UNKNOWN and isinstance(prior, int) and prior >= 0):
        status["desiredScale"] = want
    _compute_active(conds, status, pa, settings, want, pods, initialized)
    if advice.failure and pods.ready == 0:  # the starts fail (the autoscaler backs off between them)
        plan.events.append(("Warning", "InstanceFailed", advice.failure[:1024]))
    return _finish(plan, pa, status)


def _spec_differs(sks: dict[str, Any], want: dict[str, Any]) -> bool:
    have = sks.get("spec") or {}
    return any(have.get(k) != v for k, v in want["spec"].items())


def _compute_active(conds: LivingConditions, status: dict[str, Any], pa: dict[str, Any], settings: Settings,
                    want: int, pods: Pods, initialized: bool) -> None:
    """kpa.go computeActiveCondition."""
    lo, _, initial = bounds(pa, settings, initialized)
    min_ready = max(lo, 1) if initialized else max(lo, initial)
    if pods.ready >= min_ready and status.get("serviceName"):
        conds.mark(SCALE_TARGET_INITIALIZED, "True")
    if want == 0 or min_ready == 0:
        if _is(status, ACTIVE, "Unknown") and min_ready > 0:
            conds.mark(ACTIVE, "False", "TimedOut", "The target could not be activated.")
        else:
            conds.mark(ACTIVE, "False", "NoTraffic", "The target is not receiving traffic.")
    elif pods.ready < min_ready:
        if want > 0 or not _is(status, ACTIVE, "False"):
            conds.mark(ACTIVE, "Unknown", "Queued",
                       "Requests to the target are being buffered as resources are provisioned.")
        else:
            conds.mark(ACTIVE, "False", "NoTraffic", "The target is not receiving traffic.")
    elif want > 0 or not _is(status, ACTIVE, "False"):
        conds.mark(ACTIVE, "True")


def _finish(plan: Plan, pa: dict[str, Any], status: dict[str, Any]) -> Plan:
    status["observedGeneration"] = pa["metadata"].get("generation", 0)
    plan.status = status
    return plan
