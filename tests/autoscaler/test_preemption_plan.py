"""Preemption and drain as plans (pure): where a preemption stands in, the steps still to take
out. Each row is one situation the adapter (autoscaler.scaling) can find itself in."""

from __future__ import annotations

import pytest

from autoscaler.backends.base import InstanceState
from autoscaler.preemption import (
    CallOff,
    DrainView,
    LeaveRotation,
    Migrate,
    MigrationAttempt,
    PreemptionView,
    Progress,
    StartDestination,
    Step,
    Stop,
    VictimView,
    WaitIdle,
    plan_drain,
    plan_preemption,
)
from sllm_knative.api import MigrationOutcome
from sllm_knative.placement import Action, Estimate, Option, Tier

V = "a-1"  # the victim, an instance of default/a on n1
WAIT = 10.0
M = MigrationOutcome


def option(action: Action, destination: str | None = None, starts: bool = False) -> Option:
    return Option(action, Estimate("n1", Tier.DRAM, 0.0, 0.5, 0.3), victim=V, destination=destination,
                  starts_destination=starts)


EVICT = option(Action.EVICT)
ONTO_A2 = option(Action.MIGRATE, "a-2")
ONTO_N2 = option(Action.MIGRATE, "n2", starts=True)


def victim(state: InstanceState = InstanceState.READY, running: int | None = 0) -> VictimView:
    return VictimView(V, "default/a", "n1", state, running)


READY = victim()
LEFT = victim(InstanceState.DRAINING)


def view(opt: Option, v: VictimView | None = READY, **progress: object) -> PreemptionView:
    return PreemptionView(opt, v, Tier.DRAM, Progress(**progress), WAIT)  # type: ignore[arg-type]


def migrated(*outcomes: MigrationOutcome) -> MigrationAttempt:
    return MigrationAttempt(outcomes=outcomes)


@pytest.mark.parametrize("v,want", [
    # EVICT: the victim was idle when placement looked.
    pytest.param(view(EVICT), (LeaveRotation(V), WaitIdle(V, WAIT), Stop(V)), id="evict-an-idle-victim"),
    pytest.param(view(EVICT, victim(InstanceState.DRAINING, running=2), left_rotation=True),
                 (Migrate(V), WaitIdle(V, WAIT), Stop(V)), id="evict-a-request-landed-since-migrate-it"),
    pytest.param(view(EVICT, victim(InstanceState.DRAINING, running=1), left_rotation=True,
                      migration=MigrationAttempt(refused=True)),
                 (WaitIdle(V, WAIT), Stop(V)), id="evict-nothing-could-move-wait-for-it"),
    pytest.param(view(EVICT, LEFT, left_rotation=True), (WaitIdle(V, WAIT), Stop(V)), id="evict-out-of-rotation"),
    pytest.param(view(EVICT, victim(InstanceState.DRAINING, running=None), left_rotation=True),
                 (Migrate(V), WaitIdle(V, WAIT), Stop(V)), id="evict-the-victim-did-not-answer-move-what-can"),
    pytest.param(view(EVICT, victim(InstanceState.DRAINING, running=None), left_rotation=True,
                      migration=MigrationAttempt(refused=True), idle=False),
                 (CallOff(f"{V} still runs generations after {WAIT:g}s", V),),
                 id="evict-still-not-idle-after-the-wait-put-it-back"),
    # MIGRATE onto a ready instance of the victim's model.
    pytest.param(view(ONTO_A2), (LeaveRotation(V), Migrate(V, "a-2"), WaitIdle(V, WAIT), Stop(V)),
                 id="migrate-onto-a-ready-instance"),
    pytest.param(view(ONTO_A2, LEFT, left_rotation=True), (Migrate(V, "a-2"), WaitIdle(V, WAIT), Stop(V)),
                 id="migrate-out-of-rotation"),
    pytest.param(view(ONTO_A2, LEFT, left_rotation=True, migration=migrated(M.MIGRATED, M.FINISHED_ON_SOURCE)),
                 (WaitIdle(V, WAIT), Stop(V)), id="migrated-and-finished-on-source"),
    pytest.param(view(ONTO_A2, LEFT, left_rotation=True, migration=migrated(M.RECOVERED, M.FAILED)),
                 (WaitIdle(V, WAIT), Stop(V)), id="recovered-or-failed-left-the-victim"),
    pytest.param(view(ONTO_A2, LEFT, left_rotation=True, migration=migrated(M.MIGRATED), idle=True),
                 (Stop(V),), id="idle-stop-it"),
    pytest.param(view(ONTO_A2, LEFT, left_rotation=True, migration=migrated(M.MIGRATED), idle=True, stopped=True),
                 (), id="stopped-the-slot-is-free"),
    # MIGRATE onto a new instance on a free node (the locality move).
    pytest.param(view(ONTO_N2), (StartDestination("default/a", "n2", Tier.DRAM), LeaveRotation(V),
                                 Migrate(V, started_on="n2"), WaitIdle(V, WAIT), Stop(V)),
                 id="migrate-onto-a-new-instance-starts-it-first"),
    pytest.param(view(ONTO_N2, destination="a-3"), (LeaveRotation(V), Migrate(V, "a-3"), WaitIdle(V, WAIT), Stop(V)),
                 id="the-new-instance-is-ready"),
    # Called off.
    pytest.param(view(ONTO_N2, destination_failed=True),
                 (CallOff("the instance of default/a on n2, to receive the generations of a-1, did not become ready"),),
                 id="the-new-instance-failed"),
    pytest.param(view(EVICT, None), (CallOff("victim a-1 is gone"),), id="the-victim-is-gone"),
    pytest.param(view(EVICT, victim(InstanceState.STARTING)), (CallOff("victim a-1 is starting, not ready"),),
                 id="the-victim-is-starting"),
    pytest.param(view(ONTO_A2, victim(InstanceState.DRAINING)), (CallOff("victim a-1 is draining, not ready"),),
                 id="the-victim-is-draining-already"),
    pytest.param(view(ONTO_A2, LEFT, left_rotation=True, migration=MigrationAttempt(refused=True)),
                 (CallOff("the activator moved nothing off a-1", V),), id="migration-refused-back-into-rotation"),
    pytest.param(view(ONTO_A2, LEFT, left_rotation=True, migration=migrated(M.MIGRATED, M.STAYED_ON_SOURCE)),
                 (CallOff("1 generation(s) stayed on a-1", V),), id="a-generation-stayed-on-the-victim"),
    pytest.param(view(EVICT, LEFT, left_rotation=True, idle=False),
                 (CallOff("a-1 still runs generations after 10s", V),), id="still-busy-after-the-wait"),
    pytest.param(view(ONTO_A2, None, left_rotation=True), (), id="exited-after-leaving-rotation-the-slot-is-free"),
])
def test_plan_preemption(v: PreemptionView, want: tuple[Step, ...]) -> None:
    assert plan_preemption(v) == want


@pytest.mark.parametrize("action", [Action.PLACE, Action.WAIT])
def test_plan_preemption_needs_a_victim(action: Action) -> None:
    with pytest.raises(ValueError, match="not a preemption"):
        plan_preemption(view(option(action)))


def test_each_step_of_a_plan_leads_to_the_next() -> None:
    """Run a locality move step by step, folding what each step did into the view: every plan
    is the rest of the one before."""
    v = view(ONTO_N2)
    results = {
        StartDestination: lambda p: Progress(destination="a-3"),
        LeaveRotation: lambda p: Progress(destination=p.destination, left_rotation=True),
        Migrate: lambda p: Progress(p.destination, left_rotation=True, migration=migrated(M.MIGRATED)),
        WaitIdle: lambda p: Progress(p.destination, left_rotation=True, migration=p.migration, idle=True),
        Stop: lambda p: Progress(p.destination, left_rotation=True, migration=p.migration, idle=True, stopped=True),
    }
    plan = plan_preemption(v)
    taken = []
    while plan:
        step = plan[0]
        taken.append(step)
        v = PreemptionView(v.option, LEFT if not isinstance(step, StartDestination) else v.victim, v.destination_tier,
                           results[type(step)](v.progress), WAIT)
        following = plan_preemption(v)
        # The rest of the plan before, with the started instance named where it was "the one started on n2".
        assert following == tuple(Migrate(V, "a-3") if s == Migrate(V, started_on="n2") else s for s in plan[1:])
        plan = following
    assert [type(s) for s in taken] == [StartDestination, LeaveRotation, Migrate, WaitIdle, Stop]
    assert taken[2] == Migrate(V, "a-3")


def drain(v: VictimView | None = READY, **progress: object) -> DrainView:
    return DrainView(v, Progress(**progress), 600.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("v,want", [
    pytest.param(drain(), (LeaveRotation(V), Migrate(V), WaitIdle(V, 600.0), Stop(V)), id="a-ready-instance"),
    pytest.param(drain(LEFT, left_rotation=True), (Migrate(V), WaitIdle(V, 600.0), Stop(V)), id="out-of-rotation"),
    pytest.param(drain(LEFT, left_rotation=True, migration=MigrationAttempt(refused=True)),
                 (WaitIdle(V, 600.0), Stop(V)), id="no-other-instance-wait-for-it"),
    pytest.param(drain(LEFT, left_rotation=True, migration=migrated(M.STAYED_ON_SOURCE)),
                 (WaitIdle(V, 600.0), Stop(V)), id="stayed-on-source-wait-for-it"),
    pytest.param(drain(LEFT, left_rotation=True, migration=migrated(), idle=False), (Stop(V),),
                 id="still-busy-after-the-wait-stops-anyway"),
    pytest.param(drain(None), (), id="gone"),
    pytest.param(drain(LEFT, left_rotation=True, migration=migrated(), idle=True, stopped=True), (), id="stopped"),
])
def test_plan_drain(v: DrainView, want: tuple[Step, ...]) -> None:
    assert plan_drain(v) == want
