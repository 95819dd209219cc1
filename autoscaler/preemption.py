"""Freeing a slot (placement's EVICT or MIGRATE) and draining an instance, as plans (pure).

`plan_preemption(view)` reads where a preemption stands (the option placement chose, the
victim as it is now, what has been done so far) and returns the steps still to take, the
next one first. The adapter (`autoscaler.scaling`) runs the first step, folds what happened
into the view (`Progress`) and plans again, until the plan is empty (the slot is free) or is
a `CallOff`. Each situation is a row of tests/autoscaler/test_preemption_plan.py.

The steps, in the order they come (docs/migration.md, "Placement / preemption"):

1. `StartDestination`: MIGRATE onto a free slot of another node (ServerlessLLM's locality
   move) starts an instance of the victim's service there and waits until it is ready.
2. `LeaveRotation`: the victim takes no new request.
3. `Migrate`: its generations move (MIGRATE always; EVICT only if a request landed on the
   victim since placement saw it idle, or its generation list did not answer).
4. `WaitIdle`: what is still running on it ends (up to a few seconds): the instance answers
   that it runs nothing, and the activator's first report after it left rotation shows no
   request of the activator's still outstanding on it (one may be on its way there).
5. `Stop`: the victim stops; its slot is free.

A scale-down drains its victim with the same steps (`plan_drain`): out of rotation, its
generations migrate to another ready instance of its service where there is one, what cannot
move is waited for (up to DRAIN_WAIT_S), and it stops; a drain is never called off.

`CallOff` ends a preemption that cannot free the slot, putting the victim back into rotation
if it left it: the victim is gone or not ready when the preemption begins, the destination
did not start, the activator moved nothing where MIGRATE needs it, a generation stayed on the
victim, or something still runs on it after the wait.
"""

from __future__ import annotations

import dataclasses

from autoscaler.backends.base import InstanceState
from sllm_knative.api import MigrationOutcome
from sllm_knative.placement import Action, Option, Tier

PREEMPT_WAIT_S = 10.0  # what did not migrate off a victim is waited for this long, then it is called off
DRAIN_WAIT_S = 600.0  # what cannot migrate off a scale-down victim is waited for this long, then it stops


@dataclasses.dataclass(frozen=True)
class StartDestination:
    """Start an instance of `service` on `node` (its checkpoint there is on `tier`) and wait until it is ready."""

    service: str
    node: str
    tier: Tier


@dataclasses.dataclass(frozen=True)
class LeaveRotation:
    """Take `instance` out of the activator's rotation: no new request lands on it."""

    instance: str


@dataclasses.dataclass(frozen=True)
class Migrate:
    """Move the generations of `instance` onto `destination` (an instance), or onto the
    instance StartDestination started on `started_on`, or (both None) onto the ready
    instance of its service the activator picks."""

    instance: str
    destination: str | None = None
    started_on: str | None = None


@dataclasses.dataclass(frozen=True)
class WaitIdle:
    """Wait until `instance` runs no generation, at most `timeout_s`."""

    instance: str
    timeout_s: float


@dataclasses.dataclass(frozen=True)
class Stop:
    """Stop `instance`: its slot is free."""

    instance: str


@dataclasses.dataclass(frozen=True)
class CallOff:
    """Give up: the slot is not freed. `restore` names the victim to put back into rotation
    (None when it never left)."""

    reason: str
    restore: str | None = None


Step = StartDestination | LeaveRotation | Migrate | WaitIdle | Stop | CallOff


@dataclasses.dataclass(frozen=True)
class VictimView:
    """The victim as it is now: its service, node, state, and the generations it runs
    (waiting or running, as last seen: placement's count, then the instance's own list once
    it has left rotation; None when that list did not answer, so it is not known to be idle)."""

    instance: str
    service: str
    node: str
    state: InstanceState
    running: int | None = 0


@dataclasses.dataclass(frozen=True)
class MigrationAttempt:
    """What the Migrate step got: `refused` when nothing could move (no activator, no other
    ready instance, or the activator refused), else each generation's outcome."""

    refused: bool = False
    outcomes: tuple[MigrationOutcome, ...] = ()


@dataclasses.dataclass(frozen=True)
class Progress:
    """What the adapter has done. `destination` is the instance StartDestination started."""

    destination: str | None = None
    destination_failed: bool = False
    left_rotation: bool = False
    migration: MigrationAttempt | None = None
    idle: bool | None = None  # None: not waited yet; False: still busy after the wait
    stopped: bool = False


@dataclasses.dataclass(frozen=True)
class PreemptionView:
    option: Option  # placement's EVICT or MIGRATE
    victim: VictimView | None  # None: no longer there
    destination_tier: Tier = Tier.REMOTE  # of the victim's checkpoint on a destination node to start
    progress: Progress = Progress()
    wait_s: float = PREEMPT_WAIT_S


def plan_preemption(view: PreemptionView) -> tuple[Step, ...]:
    """The steps still to take to free the victim's slot; () when it is free."""
    option, victim, done = view.option, view.victim, view.progress
    if option.action not in (Action.EVICT, Action.MIGRATE) or option.victim is None:
        raise ValueError(f"not a preemption: {option.action} with victim {option.victim}")
    if done.stopped:
        return ()
    if victim is None:
        # Gone on its own after it left rotation: its slot is free. Before: nothing to do here.
        return () if done.left_rotation else (CallOff(f"victim {option.victim} is gone"),)
    restore = victim.instance if done.left_rotation else None
    if not done.left_rotation and victim.state != InstanceState.READY:
        return (CallOff(f"victim {victim.instance} is {victim.state}, not ready"),)
    migrate = option.action == Action.MIGRATE
    steps: list[Step] = []
    move: Migrate | None = None
    if migrate:
        if option.starts_destination and option.destination:
            if done.destination_failed:
                return (CallOff(f"the instance of {victim.service} on {option.destination}, to receive the "
                                f"generations of {victim.instance}, did not become ready"),)
            if done.destination is None:
                steps.append(StartDestination(victim.service, option.destination, view.destination_tier))
                move = Migrate(victim.instance, started_on=option.destination)
            else:
                move = Migrate(victim.instance, done.destination)
        else:
            move = Migrate(victim.instance, option.destination)
    elif victim.running is None or victim.running > 0:
        # A request landed on an idle victim since placement looked, or it did not say: what
        # streams the activator has on it move; WaitIdle then needs its answer that nothing runs.
        move = Migrate(victim.instance)
    if not done.left_rotation:
        steps.append(LeaveRotation(victim.instance))
    if done.migration is None:
        if move is not None:
            steps.append(move)
    else:
        if migrate and done.migration.refused:
            return (CallOff(f"the activator moved nothing off {victim.instance}", restore),)
        stayed = done.migration.outcomes.count(MigrationOutcome.STAYED_ON_SOURCE)
        if stayed:
            return (CallOff(f"{stayed} generation(s) stayed on {victim.instance}", restore),)
    if done.idle is False:
        return (CallOff(f"{victim.instance} still runs generations after {view.wait_s:g}s", restore),)
    if done.idle is None:
        steps.append(WaitIdle(victim.instance, view.wait_s))
    steps.append(Stop(victim.instance))
    return tuple(steps)


@dataclasses.dataclass(frozen=True)
class DrainView:
    victim: VictimView | None  # None: no longer there
    progress: Progress = Progress()
    wait_s: float = DRAIN_WAIT_S


def plan_drain(view: DrainView) -> tuple[Step, ...]:
    """The steps still to take to stop a scale-down victim; () when it is stopped or gone."""
    victim, done = view.victim, view.progress
    if victim is None or done.stopped:
        return ()
    steps: list[Step] = []
    if not done.left_rotation:
        steps.append(LeaveRotation(victim.instance))
    if done.migration is None:
        steps.append(Migrate(victim.instance))
    if done.idle is None:
        steps.append(WaitIdle(victim.instance, view.wait_s))
    steps.append(Stop(victim.instance))
    return tuple(steps)
