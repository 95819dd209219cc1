"""Kubelet's decisions, pure: when a probe runs and flips, whether and when a container restarts."""

from __future__ import annotations

from dataclasses import dataclass

from testkit.kube.nodeagent.spec import Json

MIN_GRACE_S = 2.0  # kubelet's minimumGracePeriodInSeconds


@dataclass(frozen=True)
class ProbeState:
    """A probe worker's memory, as kubelet keeps it: the reported result, the last raw result and
    how many times in a row it came."""

    result: bool | None
    last: bool | None = None
    run: int = 0


def initial_probe_state(kind: str) -> ProbeState:
    """Readiness starts failed, liveness succeeded, startup unknown (kubelet's initial values)."""
    return ProbeState({"readiness": False, "liveness": True, "startup": None}[kind])


def probe_step(state: ProbeState, ok: bool, success_threshold: int, failure_threshold: int) -> ProbeState:
    """Record one probe outcome; the result flips only after a threshold of equal outcomes."""
    run = state.run + 1 if state.last == ok else 1
    need = success_threshold if ok else failure_threshold
    return ProbeState(ok if run >= need else state.result, ok, run)


@dataclass(frozen=True)
class ProbeTiming:
    initial_delay_s: float = 0.0
    period_s: float = 10.0
    timeout_s: float = 1.0
    success_threshold: int = 1
    failure_threshold: int = 3

    @classmethod
    def of(cls, probe: Json) -> ProbeTiming:
        return cls(float(probe.get("initialDelaySeconds", 0)), float(probe.get("periodSeconds", 10)),
                   float(probe.get("timeoutSeconds", 1)), int(probe.get("successThreshold", 1)),
                   int(probe.get("failureThreshold", 3)))


def probe_due(now: float, started: float, last: float | None, timing: ProbeTiming) -> bool:
    """Whether a probe runs now: not before the initial delay, then once a period."""
    if now < started + timing.initial_delay_s:
        return False
    return last is None or now >= last + timing.period_s


def should_restart(policy: str, exit_code: int, init: bool = False) -> bool:
    """Whether an exited container runs again (an init container only reruns after a failure)."""
    if init:
        return exit_code != 0 and policy != "Never"
    return policy == "Always" or (policy == "OnFailure" and exit_code != 0)


def restart_delay(level: int, base_s: float, cap_s: float) -> float:
    """Kubelet's crash back-off: the first restart at once, then base, 2*base, ... up to cap."""
    return 0.0 if level <= 0 else min(cap_s, base_s * 2 ** (level - 1))


def exit_code_of(returncode: int) -> int:
    """Popen's returncode -> the runtime's exit code (killed by signal N -> 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


@dataclass(frozen=True)
class Backoff:
    """The crash back-off's settings: the delays restart_delay gives, and the run time after which
    a container that exits counts as healthy again (its next restart is at once)."""

    base_s: float = 1.0
    cap_s: float = 10.0
    reset_s: float = 60.0

    def level_after(self, level: int, ran_s: float) -> int:
        return 1 if ran_s >= self.reset_s else level + 1

    def delay(self, level: int) -> float:
        return restart_delay(level - 1, self.base_s, self.cap_s)
