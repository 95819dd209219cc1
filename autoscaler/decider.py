"""The scaling decider: Knative's KPA, plus ServerlessLLM keep-alive, as pure functions.

    spec = spec_for(service, config, policy)            what the service asks for
    decision, state = decide(spec, metrics, state, now)   one evaluation; time is a parameter

`decide` composes small steps, in Knative's order:

1. averages over the stable window and the panic window (no sample in the stable window:
   "no data yet", a no-op decision);
2. `kpa_step`: desired pods from the stable average, rate-limited (max scale up/down rates),
   raised to the activation scale, panic mode (enter when the panic-window demand reaches the
   panic threshold times the ready pods; never scale down while panicking; leave after a
   stable window below the threshold);
3. scale-down delay: the maximum desired count over the last `scale_down_delay` seconds;
4. bounds: min-scale (raised to initial-scale until that scale was reached once), max-scale;
5. the way to zero. Knative rules: a service active for less than the stable window keeps
   one instance; then it goes inactive and keeps one instance for the larger of the
   scale-to-zero grace period and the pod retention period. With a ScalingPolicy keep-alive
   instead: the last instance stays until `keep_alive` seconds after the last request;
6. the excess burst capacity (EBC): ready capacity minus target burst capacity minus the
   panic-window demand (-1: unlimited TBC, the activator stays in the path).

Scale from zero needs no special case: the activator's first held request is a non-zero
sample, the stable average becomes positive and the desired count at least one, in the same
evaluation. The adapter calls `decide` right away when such a sample arrives, besides its
regular tick (`sllm_knative.config.TICK_S`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from autoscaler.window import MetricWindow
from sllm_knative.config import AutoscalerConfig, ScalingPolicy, ServiceConfig, panic_window
from sllm_knative.config.autoscaler import TARGET_MIN

METRICS = ("concurrency", "rps")


_DEFAULTS = AutoscalerConfig()  # the config-autoscaler defaults: the one copy of the default values
_DEFAULT_PANIC_WINDOW = panic_window(_DEFAULTS.stable_window, _DEFAULTS.panic_window_percentage)


@dataclass(frozen=True)
class DeciderSpec:
    """Everything the decider needs about one service; durations in seconds.

    `target` is the per-instance value aimed at (after target utilisation), `total` the
    per-instance capacity used for the EBC; `panic_threshold` is a ratio (2.0 = 200%);
    `max_scale` 0 means unbounded; `keep_alive` None means Knative's scale-to-zero rules.
    The other defaults are `AutoscalerConfig`'s (`spec_for` resolves a service's own)."""

    target: float
    total: float
    metric: str = "concurrency"
    target_burst_capacity: float = _DEFAULTS.target_burst_capacity
    panic_threshold: float = _DEFAULTS.panic_threshold_percentage / 100.0
    stable_window: float = _DEFAULTS.stable_window
    panic_window: float = _DEFAULT_PANIC_WINDOW
    max_scale_up_rate: float = _DEFAULTS.max_scale_up_rate
    max_scale_down_rate: float = _DEFAULTS.max_scale_down_rate
    min_scale: int = _DEFAULTS.min_scale
    max_scale: int = _DEFAULTS.max_scale
    initial_scale: int = _DEFAULTS.initial_scale
    activation_scale: int = 1  # Knative's activation-scale annotation; it has no cluster-wide default
    scale_down_delay: float = _DEFAULTS.scale_down_delay
    enable_scale_to_zero: bool = _DEFAULTS.enable_scale_to_zero
    scale_to_zero_grace: float = _DEFAULTS.scale_to_zero_grace_period
    scale_to_zero_retention: float = _DEFAULTS.scale_to_zero_pod_retention_period
    keep_alive: float | None = None
    reachable: bool = True

    def __post_init__(self) -> None:
        problems = []
        if not self.target >= TARGET_MIN:
            problems.append(f"target must be >= {TARGET_MIN}, got {self.target}")
        if self.max_scale_up_rate <= 1 or self.max_scale_down_rate <= 1:
            problems.append("max scale up/down rates must be > 1")
        if not 0 < self.panic_window <= self.stable_window:
            problems.append(f"panic window must be in (0, stable window], got {self.panic_window}")
        if self.min_scale < 0 or self.max_scale < 0 or (self.max_scale and self.min_scale > self.max_scale):
            problems.append(f"need 0 <= min_scale <= max_scale (or max 0), got {self.min_scale}, {self.max_scale}")
        if self.activation_scale < 1 or self.initial_scale < 0:
            problems.append("activation_scale must be >= 1 and initial_scale >= 0")
        if self.keep_alive is not None and self.keep_alive < 0:
            problems.append(f"keep_alive must be >= 0, got {self.keep_alive}")
        if problems:
            raise ValueError("; ".join(problems))


def spec_for(service: ServiceConfig, config: AutoscalerConfig | None = None,
             policy: ScalingPolicy | None = None) -> DeciderSpec:
    """Resolve a service's decider spec: policy field > annotation > config-autoscaler default.

    The target follows Knative: containerConcurrency (or the default target when it is 0)
    or the RPS default, replaced by the target annotation (the policy's targetConcurrency),
    capped by containerConcurrency, times the target utilisation.
    """
    cfg = config or AutoscalerConfig()
    a = service.autoscaling
    if service.metric not in METRICS:
        raise ValueError(f"service {service.key}: metric {service.metric!r} is scaled by Kubernetes' HPA; "
                         f"this autoscaler scales on {' or '.join(METRICS)}")
    cc = service.container_concurrency
    total = cfg.rps_target_default if service.metric == "rps" else float(cc or cfg.container_concurrency_target_default)
    wanted = policy.target_concurrency if policy and policy.target_concurrency is not None else a.target
    if wanted is not None:
        total = float(min(wanted, cc) if service.metric == "concurrency" and cc else wanted)
    utilisation = a.target_utilization if a.target_utilization is not None else cfg.container_concurrency_target_fraction
    stable = a.window if a.window is not None else cfg.stable_window
    panic_pct = a.panic_window_percentage if a.panic_window_percentage is not None else cfg.panic_window_percentage
    threshold = a.panic_threshold_percentage if a.panic_threshold_percentage is not None else cfg.panic_threshold_percentage

    def pick(policy_value: int | None, annotation: int | None, default: int) -> int:
        return policy_value if policy_value is not None else annotation if annotation is not None else default

    lo = pick(policy.min_scale if policy else None, a.min_scale, cfg.min_scale)
    hi = pick(policy.max_scale if policy else None, a.max_scale, cfg.max_scale)
    if hi and lo > hi:
        raise ValueError(f"service {service.key}: min-scale {lo} exceeds max-scale {hi} "
                         f"(after applying ScalingPolicy {policy.name if policy else '-'})")
    if cfg.max_scale_limit and not 0 < hi <= cfg.max_scale_limit:
        raise ValueError(f"service {service.key}: max-scale {hi} is outside [1, {cfg.max_scale_limit}] (max-scale-limit)")
    return DeciderSpec(
        target=max(TARGET_MIN, total * utilisation),
        total=total,
        metric=service.metric,
        target_burst_capacity=a.target_burst_capacity if a.target_burst_capacity is not None else cfg.target_burst_capacity,
        panic_threshold=threshold / 100.0,
        stable_window=stable,
        panic_window=panic_window(stable, panic_pct),
        max_scale_up_rate=cfg.max_scale_up_rate,
        max_scale_down_rate=cfg.max_scale_down_rate,
        min_scale=lo,
        max_scale=hi,
        initial_scale=a.initial_scale if a.initial_scale is not None else cfg.initial_scale,
        activation_scale=a.activation_scale or 1,
        scale_down_delay=a.scale_down_delay if a.scale_down_delay is not None else cfg.scale_down_delay,
        enable_scale_to_zero=cfg.enable_scale_to_zero,
        scale_to_zero_grace=cfg.scale_to_zero_grace_period,
        scale_to_zero_retention=(a.scale_to_zero_pod_retention_period
                                 if a.scale_to_zero_pod_retention_period is not None
                                 else cfg.scale_to_zero_pod_retention_period),
        keep_alive=policy.keep_alive if policy else None,
    )


@dataclass(frozen=True)
class DeciderInputs:
    """What the adapter observed: the metric window, the ready instances, and when the
    service last had a request in flight (the activator knows; None if never)."""

    window: MetricWindow
    ready: int
    last_request_at: float | None = None


@dataclass(frozen=True)
class PanicState:
    since: float | None = None
    max_pods: int = 0


@dataclass(frozen=True)
class DeciderState:
    """The decider's memory between evaluations. `scale` is the instance count last decided
    (the adapter starts a service at its initial scale: see `initial_state`)."""

    scale: int = 0
    panic: PanicState = PanicState()
    recent: tuple[tuple[float, int], ...] = ()
    active_since: float | None = None
    inactive_since: float | None = None
    zero_since: float | None = None
    initialized: bool = False


def initial_state(spec: DeciderSpec, now: float, *, ready: int = 0, scale: int | None = None) -> DeciderState:
    """The state of a new decider.

    A new service (`scale` None) starts at its initial scale, which min-scale is raised to
    until it has been reached once. A decider restarted for a running service passes the
    service's current `scale`; like Knative's, it then starts in panic mode when more than
    one instance is ready, so it never scales down before it has data.
    """
    if scale is None:
        return DeciderState(scale=spec.initial_scale, active_since=now if ready > 0 else None,
                            initialized=ready >= spec.initial_scale)
    panic = PanicState(now, ready) if ready > 1 else PanicState(None, ready)
    return DeciderState(scale=scale, panic=panic, active_since=now if ready > 0 else None, initialized=True)


@dataclass(frozen=True)
class Decision:
    """One evaluation. `valid` False means no data yet: leave the scale as it is.
    `recommended` is what the load alone asks for (the KPA step), before the scale-down
    delay, the bounds and the rules for the last instance shape it into `desired`."""

    valid: bool
    desired: int | None
    recommended: int | None = None
    excess_burst_capacity: int = 0
    stable: float = 0.0
    panic: float = 0.0
    panicking: bool = False
    reason: str = ""
    # Seconds from now until this decision changes by itself if nothing else happens: the end of
    # a keep-alive (None: only new data changes it). The adapter decides again then, not at its
    # next tick, so the last instance goes when its keep-alive ends, not up to a tick later.
    recheck_in_s: float | None = None


@dataclass(frozen=True)
class KpaResult:
    desired: int
    panicking: bool
    reason: str


def _pods(value: float, target: float) -> float:
    # Round away float noise (2.8 / 2.8000000000000003) before the ceiling.
    return float(math.ceil(round(value / target, 9)))


def kpa_step(spec: DeciderSpec, stable: float, panic: float, ready: int, state: PanicState,
             now: float) -> tuple[KpaResult, PanicState]:
    """Knative's autoscaler core: desired pods from the stable and panic averages."""
    base = max(1.0, float(ready))
    max_up = math.ceil(spec.max_scale_up_rate * base)
    max_down = math.floor(base / spec.max_scale_down_rate) if spec.reachable else 0
    dspc, dppc = _pods(stable, spec.target), _pods(panic, spec.target)
    want_stable = int(min(max(dspc, max_down), max_up))
    want_panic = int(min(max(dppc, max_down), max_up))
    if spec.activation_scale > 1:
        if dspc > 0:
            want_stable = max(want_stable, spec.activation_scale)
        if dppc > 0:
            want_panic = max(want_panic, spec.activation_scale)
    over = dppc / base >= spec.panic_threshold
    since, max_pods = state.since, state.max_pods
    if over:
        since = now
    elif since is not None and since + spec.stable_window < now:
        since, max_pods = None, 0
    desired = want_stable
    reason = f"stable {stable:.2f}/{spec.target:g} per instance -> {want_stable}"
    if since is not None:
        desired = max(desired, want_panic)
        reason = f"panic {panic:.2f}/{spec.target:g} per instance -> {want_panic}, stable -> {want_stable}"
        if desired < max_pods:
            reason += f"; panicking, holding {max_pods}"
        max_pods = max(max_pods, desired)
        desired = max_pods
    if dspc > max_up:
        reason += f" (scale-up rate limits {int(dspc)} to {max_up})"
    elif dspc < max_down:
        reason += f" (scale-down rate limits {int(dspc)} to {max_down})"
    elif 0 < dspc < spec.activation_scale:
        reason += f" (activation scale {spec.activation_scale})"
    return KpaResult(desired, since is not None, reason), PanicState(since, max_pods)


def excess_burst_capacity(spec: DeciderSpec, ready: int, panic: float) -> int:
    """Spare capacity beyond the target burst: -1 with unlimited TBC, 0 with TBC 0."""
    if spec.target_burst_capacity == 0:
        return 0
    if spec.target_burst_capacity < 0:
        return -1
    return math.floor(ready * spec.total - spec.target_burst_capacity - panic)


def apply_bounds(x: int, lo: int, hi: int) -> int:
    """Clamp to [lo, hi]; hi 0 means no upper bound."""
    x = max(x, lo)
    return min(x, hi) if hi > 0 else x


def decide(spec: DeciderSpec, metrics: DeciderInputs, state: DeciderState, now: float) -> tuple[Decision, DeciderState]:
    """One evaluation at time `now` (seconds, any epoch, monotonic)."""
    stable = metrics.window.average(now, spec.stable_window)
    if stable is None:
        return Decision(False, None, reason="no data yet: keeping the current scale"), state
    panic = metrics.window.average(now, spec.panic_window) or 0.0
    kpa, panic_state = kpa_step(spec, stable, panic, metrics.ready, state.panic, now)
    notes = [kpa.reason]

    desired = kpa.desired
    recent: tuple[tuple[float, int], ...] = ()
    if spec.scale_down_delay > 0:
        recent = tuple((t, d) for t, d in state.recent if t > now - spec.scale_down_delay) + ((now, desired),)
        held = max(d for _, d in recent)
        if held > desired:
            notes.append(f"scale-down delay {spec.scale_down_delay:g}s holds {held}")
            desired = held

    initialized = state.initialized or metrics.ready >= spec.initial_scale
    lo = spec.min_scale if initialized else max(spec.min_scale, spec.initial_scale)
    if not spec.enable_scale_to_zero:
        lo = max(lo, 1)
    bounded = apply_bounds(desired, lo, spec.max_scale)
    if bounded != desired:
        notes.append(f"bounded to {bounded} (min {lo}, max {spec.max_scale or 'unbounded'})")
    desired = bounded

    active_since = state.active_since if state.active_since is not None or metrics.ready == 0 else now
    inactive_since = None
    recheck_in_s = None
    if state.scale > 0 and lo == 0 and desired <= 1:
        if spec.keep_alive is not None:
            desired, note, recheck_in_s = _keep_alive(spec, metrics, active_since, now)
            notes.append(note)
        elif desired == 0:
            desired, inactive_since, note = _knative_to_zero(spec, state, active_since, now)
            notes.append(note)
    if state.scale == 0 and lo == 0 and desired > 0 and not _new_demand(metrics, state.zero_since):
        # What is left of the traffic before the scale to zero (keep-alive can release the
        # last instance while the stable average is still positive) is no reason to start again.
        desired = 0
        notes.append("no request since the scale to zero")
    elif state.scale == 0 and desired > 0:
        notes.insert(0, "scale from zero")
    if desired == 0 and metrics.ready == 0:
        active_since = None
    zero_since = (state.zero_since if state.scale == 0 else now) if desired == 0 else None

    decision = Decision(
        valid=True,
        desired=desired,
        recommended=kpa.desired,
        excess_burst_capacity=excess_burst_capacity(spec, metrics.ready, panic),
        stable=stable,
        panic=panic,
        panicking=kpa.panicking,
        reason="; ".join(notes),
        recheck_in_s=recheck_in_s if desired == 1 else None,
    )
    new_state = DeciderState(
        scale=desired,
        panic=panic_state,
        recent=recent,
        active_since=active_since,
        inactive_since=inactive_since,
        zero_since=zero_since,
        initialized=initialized,
    )
    return decision, new_state


def keeps_one(spec: DeciderSpec, state: DeciderState, ready: int, last_busy: float | None, calm: bool,
              now: float) -> bool:
    """Whether `decide` at `now` would, without computing its averages, return a valid decision
    for one instance and an unchanged state (`desired == state.scale == 1`, the new state equal
    to `state`): a service at one instance (`ready` 0 or 1) under a ScalingPolicy keep-alive,
    not panicking, within its keep-alive. False means "not known", not "it would change".

    The window's averages enter only through the KPA step, which asks for at most one instance
    and does not panic when `calm`: every sample in the window's last stable window is at most
    `spec.target` (an average is at most its largest bucket's mean); the caller also knows that
    the window has a sample in it (else decide has no data). `last_busy` is the later of the
    last request and the window's `last_nonzero()`. A simulator that decides every service
    every two seconds skips the averages nine times in ten with this (tests/core/test_decider.py
    checks it against decide)."""
    if not (calm and state.scale == 1 and ready <= 1 and spec.keep_alive is not None
            and spec.min_scale == 0 and spec.enable_scale_to_zero and spec.activation_scale == 1
            and spec.panic_threshold > 1 and spec.scale_down_delay <= 0
            and state.initialized and state.panic.since is None and not state.recent
            and state.inactive_since is None and state.zero_since is None
            and (state.active_since is not None or ready == 0)):
        return False
    mark = keep_alive_mark(state.active_since, last_busy)
    return mark is None or now - mark < spec.keep_alive


def keep_alive_mark(active_since: float | None, last_busy: float | None) -> float | None:
    """Where a keep-alive counts from: the later of the last time the service was busy and the
    time it became active, of those known (None: neither)."""
    if last_busy is None or active_since is None:
        return active_since if last_busy is None else last_busy
    return max(last_busy, active_since)


def _last_busy(metrics: DeciderInputs) -> float | None:
    marks = [t for t in (metrics.last_request_at, metrics.window.last_nonzero()) if t is not None]
    return max(marks) if marks else None


def _new_demand(metrics: DeciderInputs, zero_since: float | None) -> bool:
    """Whether a request was seen after the service went to zero (always, if it never did)."""
    if zero_since is None:
        return True
    busy = _last_busy(metrics)
    return busy is not None and busy > zero_since


def _keep_alive(spec: DeciderSpec, metrics: DeciderInputs, active_since: float | None,
                now: float) -> tuple[int, str, float | None]:
    """ServerlessLLM: keep the last instance until `keep_alive` seconds after the last request.
    (desired, note, seconds until the keep-alive ends while idle: when to decide again)."""
    assert spec.keep_alive is not None
    mark = keep_alive_mark(active_since, _last_busy(metrics))
    idle = now - mark if mark is not None else 0.0
    if idle <= 0:
        return 1, "keep-alive: serving", None
    if idle >= spec.keep_alive:
        return 0, f"keep-alive over: idle {idle:.1f}s >= {spec.keep_alive:g}s", None
    return 1, f"keep-alive: idle {idle:.1f}s < {spec.keep_alive:g}s", spec.keep_alive - idle


def _knative_to_zero(spec: DeciderSpec, state: DeciderState, active_since: float | None,
                     now: float) -> tuple[int, float | None, str]:
    """Knative: stay active for a stable window, then inactive for max(grace, retention)."""
    if active_since is not None and now - active_since < spec.stable_window:
        return 1, None, f"active {now - active_since:.1f}s < stable window {spec.stable_window:g}s"
    since = state.inactive_since if state.inactive_since is not None else now
    hold = max(spec.scale_to_zero_grace, spec.scale_to_zero_retention)
    if now - since < hold:
        return 1, since, f"inactive {now - since:.1f}s < {hold:g}s (scale-to-zero grace/retention)"
    return 0, since, f"scale to zero after {now - since:.1f}s inactive"

