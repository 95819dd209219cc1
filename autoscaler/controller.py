"""The control loop: desired scale per service, from the activator's reports and the decider.

Inputs arrive as calls: `apply` (services and policies from YAML), `on_stats` (the
activator's per-service concurrency every second), `on_demand` (a request is waiting at
zero: decide at once). Every TICK_S the decider runs for every service. Decisions come from
the pure functions in `autoscaler.decider`, `sllm_knative.placement` and
`autoscaler.preemption`; the pieces that act on them:

    services.py         the service table (config, decider state, instances, placements)
    scaling.py          scale-up (placement, slot reservations), preemption, scale-down
    calibration.py      observations folded into the load-time model
    activator_client.py the activator's admin API (rotation, migrations)
    backends/           the cluster (`Backend`): local processes, or in memory for tests
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from autoscaler.activator_client import Activator
from autoscaler.activator_stats import fresh, total
from autoscaler.backends.base import Backend
from autoscaler.decider import DeciderInputs, decide
from autoscaler.scaling import Scaler
from autoscaler.services import ServiceRuntime, ServiceTable
from sllm_knative.api.autoscaler import StatsReport
from sllm_knative.config import RECHECK_LATE_S, TICK_S, Manifest
from sllm_knative.log import get_logger

_log = get_logger("autoscaler")


class Cancellable(Protocol):
    """What `Autoscaler.call_later` returns: an asyncio.TimerHandle, or a test's timer."""

    def cancel(self) -> None: ...


class Autoscaler:
    def __init__(self, backend: Backend, activator: Activator | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.backend = backend
        self.activator = activator
        self.clock = clock  # the decider's time (monotonic seconds)
        self.table = ServiceTable()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._evaluating: dict[str, asyncio.Task[Any]] = {}  # the tick's evaluation of each service
        # Each service's next evaluation before the tick, where its decision changes by itself
        # then (the end of a keep-alive: `Decision.recheck_in_s`).
        self._rechecks: dict[str, Cancellable] = {}
        # How a recheck is scheduled: the event loop's timer (tests step a clock of their own).
        self.call_later: Callable[[float, Callable[[], None]], Cancellable] = (
            lambda delay, fn: asyncio.get_running_loop().call_later(delay, fn))
        self.scaler = Scaler(backend, activator, self.table, self._spawn, clock=lambda: self.clock())
        backend.subscribe(self.scaler.on_event)
        # Whether scaling decisions may be taken now. On Kubernetes: only on the leader, and only
        # once its backend has adopted the pods already running (a decision taken before would
        # count none of them and start them again).
        self.may_decide: Callable[[], bool] = lambda: True
        self._boots: set[str] = set()  # the activator processes heard from (StatsReport.boot)
        # each activator replica's latest report and when it came (by boot; "" for one without)
        self._latest: dict[str, tuple[float, StatsReport]] = {}

    @property
    def services(self) -> dict[str, ServiceRuntime]:
        return self.table.services

    # -- configuration ---------------------------------------------------------------------

    async def apply(self, manifest: Manifest) -> list[str]:
        changes, touched = self.table.apply(manifest, self.clock())
        for rt in touched:
            await self.scaler.push(rt)
        for rt in touched:
            self._spawn(self._evaluate_logged(rt.key))
        return changes

    async def delete(self, key: str) -> bool:
        rt = self.table.remove(key)
        if rt is None:
            return False
        for inst in rt.live():
            await self.scaler.stop(rt, inst)
        if self.activator is not None:
            await self.activator.remove(key)
        return True

    # -- inputs from the activator ---------------------------------------------------------

    def on_stats(self, report: StatsReport, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        if report.boot is not None and report.boot not in self._boots:
            # An activator we have not heard from: it started (or restarted: it knows no service
            # then), or we did. Give it every service's rotation now, not at the next change.
            self._boots.add(report.boot)
            if self.activator is not None:
                self.activator.replica_started()
            if self.table.services:
                _log.info("an activator started: pushing every service's endpoints", boot=report.boot,
                          services=len(self.table.services))
            for svc in list(self.table.services.values()):
                self._spawn(self.scaler.push(svc))
        # Each replica sees only what it proxies: its latest report joins the others' (activator_stats).
        self._latest[report.boot or ""] = (now, report)
        self._latest = fresh(self._latest, now)
        loads = total(r for _, r in self._latest.values())
        for s in report.services:
            rt = self.table.get(str(s.key))
            load = loads.get(str(s.key))
            if rt is None or load is None:
                continue
            rt.window = rt.window.record(now, load.average_concurrency)
            rt.in_flight = load.in_flight
            rt.held, rt.oldest_held_s, rt.stats_at = load.held, load.oldest_held_s, now
            if load.in_flight or load.requests:
                rt.last_request_at = now
            rt.outstanding = load.outstanding

    async def on_demand(self, key: str, in_flight: int) -> None:
        """A request waits for a service at zero: record it and decide now, not at the next tick."""
        rt = self.table.get(key)
        if rt is None:
            return
        now = self.clock()
        rt.window = rt.window.record(now, float(max(1, in_flight)))
        rt.last_request_at = now
        rt.in_flight = max(rt.in_flight, in_flight, 1)  # until the next report: a request waits (not `idle`)
        await self.evaluate(key)

    # -- decisions -------------------------------------------------------------------------

    async def evaluate(self, key: str) -> None:
        rt = self.table.get(key)
        if rt is None or not self.may_decide():
            return
        now = self.clock()
        metrics = DeciderInputs(rt.window, len(rt.ready()), rt.last_request_at)
        before = rt.state.scale
        decision, rt.state = decide(rt.spec, metrics, rt.state, now)
        rt.last_decision = decision.reason
        if not decision.valid or decision.desired is None:
            return
        if not rt.decided or decision.desired != before:
            # A change of the desired scale, and the first decision since this process started
            # (on Kubernetes, a standby's first once it leads): what `desired` in /v1/services says.
            _log.info("scale decided", service=key, desired=decision.desired, was=before, ready=metrics.ready,
                      first=not rt.decided or None, reason=decision.reason)
        rt.decided, rt.excess_burst_capacity = True, decision.excess_burst_capacity
        self._recheck(key, decision.recheck_in_s)
        await self.scaler.scale_to(rt, decision.desired)

    def _recheck(self, key: str, delay_s: float | None) -> None:
        """Evaluate `key` again `delay_s` from now (replacing one already set; None: at the tick)."""
        if (old := self._rechecks.pop(key, None)) is not None:
            old.cancel()
        if delay_s is not None and delay_s < TICK_S:  # a later one: a tick comes first
            # A hair past the end, so that the clock has passed it when the decider reads it.
            self._rechecks[key] = self.call_later(delay_s + RECHECK_LATE_S, lambda: self._fire_recheck(key))

    def _fire_recheck(self, key: str) -> None:
        self._rechecks.pop(key, None)
        self._evaluate_soon(key)

    def slots_in_use(self) -> dict[str, int]:
        return self.table.slots_in_use()

    # -- the loop --------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def settle(self) -> None:
        """Until every task this controller spawned (evaluations, drains) has ended (tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            self.tick()

    def tick(self) -> None:
        """Evaluate every service, each in its own task: a service still busy with its last
        evaluation (a preemption can take minutes) is skipped, and holds up no other."""
        for key in list(self.table.services):
            self._evaluate_soon(key)
        for key in [k for k in self._evaluating if k not in self.table.services]:
            del self._evaluating[key]

    def _evaluate_soon(self, key: str) -> None:
        """Evaluate `key` in a task of its own, unless its last evaluation is still running."""
        running = self._evaluating.get(key)
        if key in self.table.services and (running is None or running.done()):
            self._evaluating[key] = self._spawn(self._evaluate_logged(key))

    async def _evaluate_logged(self, key: str) -> None:
        try:
            await self.evaluate(key)
        except Exception:
            _log.error("evaluation failed", exc_info=True, service=key)

    def snapshot(self) -> dict[str, Any]:
        return self.table.snapshot()

    async def close(self) -> None:
        for handle in self._rechecks.values():
            handle.cancel()
        self._rechecks.clear()
        for rt in self.table:
            for inst in rt.live():
                await self.scaler.stop(rt, inst, grace_s=3.0)
        if self.activator is not None:
            await self.activator.close()
        await self.backend.close()

