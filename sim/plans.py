"""Preemptions and drains run step by step, as the real plans say: a preemption (placement's
EVICT/MIGRATE, `autoscaler.preemption.plan_preemption`) or a scale-down's drain (`plan_drain`)
is a `Process` that `advance` runs until a step needs time; `migrated`, `stopped`, `timeout`,
`destination_ready` and `victim_idle` resume it when its event comes. Split from adapters.py,
which starts these processes (placement, the scaler's scale-down)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from autoscaler.backends.base import InstanceState
from autoscaler.preemption import (
    CallOff,
    DrainView,
    LeaveRotation,
    Migrate,
    MigrationAttempt,
    PreemptionView,
    StartDestination,
    Step,
    Stop,
    VictimView,
    WaitIdle,
    plan_drain,
    plan_preemption,
)
from sim.cluster import Process, Running, SimInstance, replace_progress
from sllm_knative.api import MigrationOutcome
from sllm_knative.placement import Action, MigrationObservation, Tier, observe_migration, observe_stop

if TYPE_CHECKING:
    from sim.engine import Simulation


def migrated(sim: Simulation, proc: object, attempt: object) -> None:
    """A migration's handoff time came: the process goes on with its outcome."""
    assert isinstance(proc, Process) and isinstance(attempt, MigrationAttempt)
    proc.progress = replace_progress(proc.progress, migration=attempt)
    advance(sim, proc)


def stopped(sim: Simulation, proc: object, _: object) -> None:
    """A Stop step's victim has stopped (`stop_s` after the step): its slot is free; a
    calibrating policy learns how long the stop took, a preemption's or a scale-down's, as the
    real autoscaler does."""
    assert isinstance(proc, Process)
    proc.stopping = False
    sim.stop(proc.victim)
    proc.progress = replace_progress(proc.progress, stopped=True)
    if sim.policy.calibrate:
        sim.calibration = observe_stop(sim.calibration, sim.hw.stop_s)
    advance(sim, proc)


def timeout(sim: Simulation, proc: object, _: object) -> None:
    """WaitIdle's time is up: the victim still runs something (else it would have resumed)."""
    assert isinstance(proc, Process)
    if proc.done or proc.victim.waiter is not proc:
        return
    proc.victim.waiter = None
    proc.progress = replace_progress(proc.progress, idle=False)
    advance(sim, proc)


def advance(sim: Simulation, proc: Process) -> None:
    """Run the plan's steps until one needs time (an event resumes it) or the plan is empty."""
    while not proc.done:
        steps = _plan(sim, proc)
        if not steps:
            _finish(sim, proc)
            return
        if not _execute(sim, proc, steps[0]):
            return


def _plan(sim: Simulation, proc: Process) -> tuple[Step, ...]:
    v = proc.victim
    alive = v.state != InstanceState.STOPPED
    view = VictimView(v.id, v.service, v.node, v.state, len(v.running)) if alive else None
    if proc.kind == "drain":
        return plan_drain(DrainView(view, proc.progress))
    assert proc.option is not None
    tier = Tier.REMOTE
    if proc.option.destination and proc.option.starts_destination:
        tier = sim.nodes[proc.option.destination].tier_of(v.model.key, sim.policy.prestaged_ssd)
    return plan_preemption(PreemptionView(proc.option, view, tier, proc.progress))


def _execute(sim: Simulation, proc: Process, step: Step) -> bool:
    """Run one step; False when it takes time (the process resumes on an event)."""
    v = proc.victim
    if isinstance(step, LeaveRotation):
        v.state = InstanceState.DRAINING
        proc.progress = replace_progress(proc.progress, left_rotation=True)
        return True
    if isinstance(step, StartDestination):
        svc = sim.services[step.service]
        node = sim.nodes[step.node]
        if node.free_gpus < v.model.tp:
            proc.progress = replace_progress(proc.progress, destination_failed=True)
            return True
        proc.destination = sim.start(svc, node)
        sim.waiting_destinations.append(proc)
        return False
    if isinstance(step, Migrate):
        return _migrate(sim, proc, step)
    if isinstance(step, WaitIdle):
        if not v.running:
            proc.progress = replace_progress(proc.progress, idle=True)
            return True
        v.waiter = proc
        sim.push(sim.now + step.timeout_s, "timeout", proc)
        return False
    if isinstance(step, Stop):
        if proc.stopping:
            return False  # the "stopped" event resumes it
        if proc.kind == "preempt" and proc.option is not None and proc.option.action == Action.EVICT:
            sim.stats.evictions += 1
        if sim.hw.stop_s > 0:  # the victim's slot frees when its process has stopped
            proc.stopping = True
            sim.push(sim.now + sim.hw.stop_s, "stopped", proc)
            return False
        sim.stop(v)
        proc.progress = replace_progress(proc.progress, stopped=True)
        return True
    if isinstance(step, CallOff):
        sim.stats.called_off += 1
        v.claimed = False
        if step.restore and v.state == InstanceState.DRAINING:
            v.state = InstanceState.READY
            sim.route(sim.services[v.service])
        proc.done = True
        if proc.successor is not None:  # the instance that waited for the slot is not started
            _abandon(sim, proc.successor)
        return False
    raise AssertionError(f"unknown step {step}")


def _migrate(sim: Simulation, proc: Process, step: Migrate) -> bool:
    v = proc.victim
    dest: SimInstance | None = None
    if step.destination:
        dest = sim.instances.get(step.destination)
    elif step.started_on and proc.destination is not None:
        dest = proc.destination
    elif sim.policy.migration:
        room = [i for i in sim.services[v.service].instances if i is not v and i.state == InstanceState.READY
                and sim.cfg.capacity - len(i.running) >= len(v.running)]
        dest = min(room, key=lambda i: (len(i.running), i.id)) if room else None
    if dest is None or not sim.policy.migration or dest.state != InstanceState.READY:
        proc.progress = replace_progress(proc.progress, migration=MigrationAttempt(refused=True))
        return True
    runs = list(v.running.values())
    if not runs:
        proc.progress = replace_progress(proc.progress, migration=MigrationAttempt(outcomes=()))
        return True
    tokens = sum(r.tokens_at(sim.now, v.step_s) for r in runs)
    seconds = sim.hw.prefill_s(tokens, dest.model.params, dest.model.tp)
    t_end = sim.now + seconds
    outcomes = []
    for r in runs:
        if r.end <= t_end:
            outcomes.append(MigrationOutcome.FINISHED_ON_SOURCE)
            continue
        del v.running[r.req.id]
        moved = Running(r.req, t_end, r.first, r.end)
        dest.running[r.req.id] = moved
        sim.push(moved.end, "done", dest, moved)
        outcomes.append(MigrationOutcome.MIGRATED)
    sim.stats.migrations += outcomes.count(MigrationOutcome.MIGRATED)
    sim.stats.migrated_tokens += tokens
    if sim.policy.calibrate:
        sim.calibration = observe_migration(sim.calibration, MigrationObservation(tokens, seconds))
    # Generations that end before the handoff finish on the source; the others continue on
    # the destination from the handoff (their end times do not change).
    sim.push(t_end, "migrated", proc, MigrationAttempt(outcomes=tuple(outcomes)))
    return False


def _finish(sim: Simulation, proc: Process) -> None:
    proc.done = True
    succ = proc.successor
    if succ is not None and succ.state == InstanceState.STARTING:
        if sim.nodes[succ.node].free_gpus >= succ.model.tp:
            sim.take_gpus(succ)
        else:  # the node's other free GPUs went to someone else meanwhile
            sim.stats.called_off += 1
            _abandon(sim, succ)


def _abandon(sim: Simulation, inst: SimInstance) -> None:
    if inst.state == InstanceState.STOPPED:
        return
    sim.stop(inst)


def destination_ready(sim: Simulation, inst: SimInstance) -> None:
    """A migration's destination is ready: the preemptions waiting for it go on."""
    for proc in [p for p in sim.waiting_destinations if p.destination is inst]:
        sim.waiting_destinations.remove(proc)
        proc.progress = replace_progress(proc.progress, destination=inst.id)
        advance(sim, proc)


def victim_idle(sim: Simulation, proc: Process) -> None:
    """The victim a process waits for (WaitIdle) runs nothing any more: the process goes on."""
    proc.progress = replace_progress(proc.progress, idle=True)
    advance(sim, proc)
