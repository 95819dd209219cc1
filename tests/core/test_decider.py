"""The decider: Knative's KPA core (rows after Knative's documented behaviour), the full
`decide` pipeline in scenarios that step `now`, ServerlessLLM keep-alive, and spec resolution."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoscaler.decider import (
    DeciderInputs,
    DeciderSpec,
    DeciderState,
    Decision,
    PanicState,
    decide,
    excess_burst_capacity,
    initial_state,
    keeps_one,
    kpa_step,
    spec_for,
)
from autoscaler.window import MetricWindow
from sllm_knative.config import AutoscalerConfig, ScalingPolicy, parse_service

NOW = 1000.0
# Knative's unit tests presume 75% utilisation, rates of 10 and a panic threshold of 200%.
KNATIVE = DeciderSpec(target=10.0, total=10.0 / 0.75, target_burst_capacity=100.0, max_scale_up_rate=10.0,
                      max_scale_down_rate=10.0, panic_threshold=2.0, stable_window=60.0, panic_window=6.0)


def spec(**changes: object) -> DeciderSpec:
    return dataclasses.replace(KNATIVE, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize("s,stable,panic,ready,state,want,panicking", [
    pytest.param(KNATIVE, 50.0, 10.0, 1, PanicState(), 5, False, id="stable-mode-increase"),
    pytest.param(KNATIVE, 50.0, 50.0, 5, PanicState(), 5, False, id="stable-mode-no-change-already-scaled"),
    pytest.param(KNATIVE, 50.0, 50.0, 8, PanicState(), 5, False, id="stable-mode-decrease"),
    pytest.param(KNATIVE, 0.0, 0.0, 1, PanicState(), 0, False, id="no-traffic-scales-to-zero"),
    pytest.param(KNATIVE, 50.0, 100.0, 1, PanicState(), 10, True, id="panic-doubles-pod-count"),
    pytest.param(spec(target=1.0), 50.0, 30.0, 5, PanicState(NOW - 5, 5), 50, True,
                 id="panic-uses-stable-when-larger"),
    pytest.param(spec(target=1.0), 20.0, 30.0, 5, PanicState(NOW - 5, 5), 30, True,
                 id="panic-uses-panic-when-larger"),
    pytest.param(KNATIVE, 1.0, 1.0, 10, PanicState(NOW - 30, 100), 100, True, id="panic-never-scales-down"),
    pytest.param(KNATIVE, 1.0, 1.0, 10, PanicState(NOW - 61, 100), 1, False, id="unpanic-after-stable-window"),
    pytest.param(spec(target=1.0), 6.0, 6.0, 1, PanicState(), 6, True, id="exponential-growth-tracked"),
    pytest.param(KNATIVE, 1000.0, 1001.0, 1, PanicState(), 10, True, id="scale-up-rate-limited"),
    pytest.param(spec(target=1.0, max_scale_up_rate=1.1), 3.0, 3.1, 2, PanicState(), 3, True,
                 id="small-scale-up-rate-still-grows-by-one"),
    pytest.param(KNATIVE, 1.0, 1.0, 100, PanicState(), 10, False, id="scale-down-rate-limited"),
    pytest.param(spec(max_scale_down_rate=1.1), 1.0, 1.0, 100, PanicState(), 90, False,
                 id="small-scale-down-rate"),
    pytest.param(spec(max_scale_down_rate=1.1, reachable=False), 1.0, 1.0, 100, PanicState(), 1, False,
                 id="unreachable-scales-down-freely"),
    pytest.param(KNATIVE, 1000.0, 888.0, 0, PanicState(), 10, True, id="no-ready-pods-counts-as-one"),
    pytest.param(spec(activation_scale=3), 1.0, 1.0, 0, PanicState(), 3, False, id="activation-scale"),
    pytest.param(spec(activation_scale=3), 0.0, 0.0, 1, PanicState(), 0, False, id="activation-scale-needs-demand"),
])
def test_kpa_step(s: DeciderSpec, stable: float, panic: float, ready: int, state: PanicState, want: int,
                  panicking: bool) -> None:
    result, new = kpa_step(s, stable, panic, ready, state, NOW)
    assert (result.desired, result.panicking) == (want, panicking), result.reason
    if panicking:
        assert new.max_pods >= want and new.since is not None
    else:
        assert new == PanicState(None, 0) or new.since is None


def test_panic_window_extends_while_over_threshold() -> None:
    result, state = kpa_step(spec(target=1.0), 11.0, 25.0, 10, PanicState(), NOW)
    assert (result.desired, state.since) == (25, NOW)
    result, state = kpa_step(spec(target=1.0), 30.0, 80.0, 40, state, NOW + 30)
    assert (result.desired, state.since) == (80, NOW + 30)  # still surging: panic time moves
    result, state = kpa_step(spec(target=1.0), 30.0, 41.0, 40, PanicState(NOW, 80), NOW + 30)
    assert (result.desired, state.since) == (80, NOW)  # below threshold: panic time kept, pods held


@pytest.mark.parametrize("tbc,ready,panic,want", [
    pytest.param(-1.0, 1, 26.0, -1, id="unlimited"),
    pytest.param(0.0, 1, 49.0, 0, id="zero"),
    pytest.param(100.0, 1, 50.0, -137, id="not-enough-capacity"),
    pytest.param(100.0, 20, 10.0, 156, id="spare-capacity"),
])
def test_excess_burst_capacity(tbc: float, ready: int, panic: float, want: int) -> None:
    assert excess_burst_capacity(spec(target_burst_capacity=tbc), ready, panic) == want


# --- scenarios: step `now`, feed one sample per tick, ready follows the last decision -----------


class Sim:
    """Drives `decide` like the adapter would: the activator reports every second, the decider
    ticks every two seconds, instances are ready at once."""

    def __init__(self, s: DeciderSpec, *, t0: float = 0.0, ready: int = 0, scale: int | None = 0) -> None:
        self.spec = s
        self.window = MetricWindow(horizon_s=s.stable_window)
        self.state = initial_state(s, t0, ready=ready, scale=scale)
        self.ready = ready
        self.last_request: float | None = None
        self.log: list[tuple[float, Decision]] = []

    def sample(self, t: float, concurrency: float) -> None:
        self.window = self.window.record(t, concurrency)
        if concurrency > 0:
            self.last_request = t

    def tick(self, t: float, concurrency: float) -> Decision:
        self.sample(t, concurrency)
        d, self.state = decide(self.spec, DeciderInputs(self.window, self.ready, self.last_request), self.state, t)
        if d.valid and d.desired is not None:
            self.ready = d.desired
        self.log.append((t, d))
        return d

    def run(self, start: float, end: float, load: Callable[[float], float], step: float = 2.0) -> None:
        t = start
        while t < end:
            self.tick(t, load(t))
            for k in range(1, int(step)):
                if t + k < end:
                    self.sample(t + k, load(t + k))
            t += step

    def desired_at(self, t: float) -> int:
        return next(d.desired for ts, d in self.log if ts == t)  # type: ignore[misc]

    def first_time(self, predicate: Callable[[Decision], bool], after: float = -1e18) -> float:
        return next(ts for ts, d in self.log if ts > after and predicate(d))


def test_no_data_yet_is_a_no_op() -> None:
    s = spec()
    state = initial_state(s, 0.0, scale=0)
    d, new = decide(s, DeciderInputs(MetricWindow(), ready=0), state, 5.0)
    assert (d.valid, d.desired, new) == (False, None, state)
    assert "no data yet" in d.reason


def test_scale_from_zero_on_the_first_request_at_once() -> None:
    sim = Sim(spec(target=2.8, total=4.0))
    sim.run(0.0, 300.0, lambda t: 0.0)
    assert all(d.desired == 0 for _, d in sim.log)
    d = sim.tick(300.4, 1.0)  # the activator holds a request and reports it straight away
    assert d.desired == 1 and d.reason.startswith("scale from zero")


def test_panic_mode_entry_and_exit() -> None:
    s = spec(target=10.0)
    sim = Sim(s, ready=1, scale=1)
    sim.run(0.0, 240.0, lambda t: 60.0 if 60 <= t < 70 else 8.0)
    assert sim.desired_at(58.0) == 1 and not any(d.panicking for ts, d in sim.log if ts < 60)
    assert sim.first_time(lambda d: d.panicking) == 60.0  # a 10 s burst is seen within a tick
    # Over the threshold: panic-window demand of at least twice the instances ready at that tick.
    ready = {t: prev.desired for (t, _), (_, prev) in zip(sim.log[1:], sim.log, strict=False)}
    over = [t for t, d in sim.log[1:] if math.ceil(d.panic / s.target) / max(1, ready[t]) >= s.panic_threshold]
    exit_ = sim.first_time(lambda d: not d.panicking, after=60.0)
    assert exit_ == min(t for t, _ in sim.log if t > max(over) + s.stable_window)
    during = [d.desired for ts, d in sim.log if 60.0 <= ts < exit_]
    assert during == sorted(during) and during[-1] == 6, "never scales down while panicking"
    assert any("panicking, holding 6" in d.reason for _, d in sim.log)
    assert sim.desired_at(exit_) < 6 and sim.log[-1][1].desired == 1  # 8 concurrent at target 10


def test_scale_down_follows_the_stable_window() -> None:
    sim = Sim(spec(target=10.0), ready=3, scale=3)
    sim.run(0.0, 120.0, lambda t: 30.0)
    assert sim.desired_at(118.0) == 3
    sim.run(120.0, 240.0, lambda t: 10.0)
    assert sim.desired_at(150.0) == 2  # the stable average is between 20 and 30
    assert sim.first_time(lambda d: d.desired == 1, after=120.0) >= 150.0
    assert sim.desired_at(238.0) == 1


@pytest.mark.parametrize("grace,retention,zero_at", [
    pytest.param(30.0, 0.0, 60.0 + 30.0, id="grace"),
    pytest.param(30.0, 90.0, 60.0 + 90.0, id="retention-longer-than-grace"),
    pytest.param(30.0, 10.0, 60.0 + 30.0, id="grace-longer-than-retention"),
])
def test_scale_to_zero_after_stable_window_then_grace_and_retention(grace: float, retention: float,
                                                                    zero_at: float) -> None:
    s = spec(target=7.0, scale_to_zero_grace=grace, scale_to_zero_retention=retention)
    sim = Sim(s, ready=1, scale=1)
    last = 100.0
    sim.run(0.0, 400.0, lambda t: 1.0 if t <= last else 0.0)
    inactive = sim.first_time(lambda d: "inactive" in d.reason)
    assert inactive == pytest.approx(last + s.stable_window, abs=2.0)
    zero = sim.first_time(lambda d: d.desired == 0)
    assert zero == pytest.approx(last + zero_at, abs=2.0)
    assert all(d.desired == (1 if ts < zero else 0) for ts, d in sim.log)


def test_a_freshly_active_service_keeps_one_instance_for_a_stable_window() -> None:
    s = spec(scale_to_zero_grace=6.0)
    sim = Sim(s)  # at zero
    sim.tick(0.0, 1.0)  # one request: one instance, active from the next tick
    sim.run(2.0, 200.0, lambda t: 0.0)
    zero = sim.first_time(lambda d: d.desired == 0)
    assert zero >= 2.0 + s.stable_window + 6.0 - 2.0
    assert any("active" in d.reason and "stable window" in d.reason for _, d in sim.log)


def test_scale_down_delay_holds_the_maximum() -> None:
    s = spec(target=10.0, stable_window=6.0, panic_window=1.0, scale_down_delay=30.0, scale_to_zero_grace=6.0)
    sim = Sim(s, ready=1, scale=1)
    sim.run(0.0, 120.0, lambda t: 40.0 if t < 20 else 0.0)
    assert sim.desired_at(18.0) == 4
    for t, d in sim.log:
        window = [x.recommended for ts, x in sim.log if t - s.scale_down_delay < ts <= t]
        held = max(w for w in window if w is not None)
        if held >= 2:
            assert d.desired == held, (t, d.reason)
    last_four = max(ts for ts, d in sim.log if d.recommended == 4)
    assert sim.first_time(lambda d: d.desired < 4) == last_four + s.scale_down_delay
    assert any("scale-down delay 30s holds 4" in d.reason for _, d in sim.log)
    undelayed = Sim(dataclasses.replace(s, scale_down_delay=0.0), ready=1, scale=1)
    undelayed.run(0.0, 120.0, lambda t: 40.0 if t < 20 else 0.0)
    assert undelayed.first_time(lambda d: d.desired < 4) < last_four + s.scale_down_delay
    assert sim.first_time(lambda d: d.desired == 0) > undelayed.first_time(lambda d: d.desired == 0)


@pytest.mark.parametrize("changes,load,want", [
    pytest.param({"min_scale": 2}, 0.0, 2, id="min-scale-floor"),
    pytest.param({"max_scale": 3}, 500.0, 3, id="max-scale-cap"),
    pytest.param({"enable_scale_to_zero": False}, 0.0, 1, id="scale-to-zero-disabled"),
    pytest.param({"min_scale": 0, "max_scale": 0}, 0.0, 0, id="unbounded-goes-to-zero"),
])
def test_bounds(changes: dict[str, object], load: float, want: int) -> None:
    sim = Sim(spec(**changes), ready=1, scale=1)
    sim.run(0.0, 600.0, lambda t: load)
    assert sim.log[-1][1].desired == want


def test_initial_scale_holds_until_reached_once() -> None:
    s = spec(initial_scale=3, scale_to_zero_grace=6.0)
    window = MetricWindow().record(0.0, 0.0)
    state = initial_state(s, 0.0)  # a new service: starts at its initial scale
    assert state.scale == 3 and not state.initialized
    d, state = decide(s, DeciderInputs(window, ready=1), state, 0.0)
    assert d.desired == 3 and "bounded to 3" in d.reason
    d, state = decide(s, DeciderInputs(window.record(2.0, 0.0), ready=3), state, 2.0)
    assert state.initialized and d.desired == 1  # the scale-down rate halves 3 -> 1


def test_restart_starts_in_panic_and_keeps_the_scale() -> None:
    s = spec(target=10.0)
    state = initial_state(s, 0.0, ready=5, scale=5)
    assert state.panic.since == 0.0
    window = MetricWindow().record(1.0, 3.0)
    d, state = decide(s, DeciderInputs(window, ready=5), state, 1.0)
    assert d.desired == 5 and d.panicking


@pytest.mark.parametrize("keep_alive,zero_after", [
    pytest.param(20.0, 20.0, id="shorter-than-knative"),
    pytest.param(150.0, 150.0, id="longer-than-knative"),
    pytest.param(0.0, 0.0, id="zero-releases-at-once"),
])
def test_keep_alive_releases_the_last_instance_after_the_last_request(keep_alive: float, zero_after: float) -> None:
    s = spec(target=7.0, keep_alive=keep_alive)
    sim = Sim(s, ready=1, scale=1)
    last = 100.0
    sim.run(0.0, 400.0, lambda t: 1.0 if t <= last else 0.0)
    zero = sim.first_time(lambda d: d.desired == 0)
    assert zero == pytest.approx(last + max(zero_after, 2.0), abs=2.0)
    # It stays at zero although the stable average still remembers the traffic.
    assert all(d.desired == (1 if ts < zero else 0) for ts, d in sim.log)
    assert any("keep-alive" in d.reason for _, d in sim.log)
    d = sim.tick(401.0, 1.0)  # the next request starts it again at once
    assert d.desired == 1 and d.reason.startswith("scale from zero")


def test_keep_alive_counts_from_the_activators_last_request() -> None:
    s = spec(target=7.0, keep_alive=30.0)
    window = MetricWindow(horizon_s=60.0).record(0.0, 0.0)
    state = DeciderState(scale=1, active_since=-500.0, initialized=True)
    d, _ = decide(s, DeciderInputs(window, ready=1, last_request_at=-10.0), state, 0.0)
    assert d.desired == 1 and "idle 10.0s < 30s" in d.reason
    d, _ = decide(s, DeciderInputs(window, ready=1, last_request_at=-40.0), state, 0.0)
    assert d.desired == 0


@pytest.mark.parametrize("last_request,ready,want_desired,want_recheck", [
    pytest.param(-10.0, 1, 1, 20.0, id="idle-decide-again-when-it-ends"),
    pytest.param(-29.5, 1, 1, 0.5, id="about-to-end"),
    pytest.param(-40.0, 1, 0, None, id="over-nothing-to-recheck"),
    pytest.param(0.0, 1, 1, None, id="serving-the-end-is-not-known-yet"),
])
def test_keep_alive_says_when_its_decision_changes(last_request: float, ready: int, want_desired: int,
                                                  want_recheck: float | None) -> None:
    s = spec(target=7.0, keep_alive=30.0)
    window = MetricWindow(horizon_s=60.0).record(0.0, 0.0)
    state = DeciderState(scale=1, active_since=-500.0, initialized=True)
    d, _ = decide(s, DeciderInputs(window, ready=ready, last_request_at=last_request), state, 0.0)
    assert d.desired == want_desired
    assert d.recheck_in_s == (None if want_recheck is None else pytest.approx(want_recheck))


def test_knatives_rules_and_more_than_one_instance_set_no_recheck() -> None:
    window = MetricWindow(horizon_s=60.0).record(0.0, 0.0)
    state = DeciderState(scale=1, active_since=-500.0, initialized=True)
    d, _ = decide(spec(target=7.0), DeciderInputs(window, ready=1, last_request_at=-10.0), state, 0.0)
    assert d.recheck_in_s is None
    busy = MetricWindow(horizon_s=60.0).record(0.0, 30.0)
    d, _ = decide(spec(target=7.0, keep_alive=30.0), DeciderInputs(busy, ready=1, last_request_at=-1.0), state, 0.0)
    assert d.desired > 1 and d.recheck_in_s is None


def test_keep_alive_does_not_hold_more_than_one_instance() -> None:
    s = spec(target=10.0, keep_alive=300.0)
    sim = Sim(s, ready=1, scale=1)
    sim.run(0.0, 300.0, lambda t: 40.0 if t < 100 else 0.0)
    assert max(d.desired for _, d in sim.log) >= 4 and sim.log[-1][1].desired == 1


# --- spec resolution: policy > annotation > config-autoscaler --------------------------------


def _svc(annotations: dict[str, str] | None = None, cc: int = 4) -> object:
    return parse_service({
        "apiVersion": "serving.knative.dev/v1", "kind": "Service", "metadata": {"name": "llama"},
        "spec": {"template": {"metadata": {"annotations": annotations or {}},
                              "spec": {"containerConcurrency": cc, "containers": [{"image": "x"}]}}},
    })


@pytest.mark.parametrize("annotations,cc,policy,field,want", [
    pytest.param({}, 4, None, "target", 2.8, id="cc-times-utilisation"),
    pytest.param({}, 4, None, "total", 4.0, id="total-is-cc"),
    pytest.param({}, 0, None, "target", 70.0, id="unlimited-cc-uses-default-target"),
    pytest.param({"autoscaling.knative.dev/target": "2"}, 4, None, "target", 1.4, id="target-annotation"),
    pytest.param({"autoscaling.knative.dev/target": "10"}, 4, None, "target", 2.8, id="target-capped-by-cc"),
    pytest.param({"autoscaling.knative.dev/target": "2"}, 4, ScalingPolicy("p", "default", "llama",
                 target_concurrency=3.0), "target", 2.1, id="policy-target-wins"),
    pytest.param({"autoscaling.knative.dev/target-utilization-percentage": "50"}, 4, None, "target", 2.0,
                 id="utilisation-annotation"),
    pytest.param({"autoscaling.knative.dev/metric": "rps"}, 4, None, "target", 140.0, id="rps-default"),
    pytest.param({"autoscaling.knative.dev/metric": "rps", "autoscaling.knative.dev/target": "20"}, 4, None,
                 "target", 14.0, id="rps-target-not-capped-by-cc"),
    pytest.param({"autoscaling.knative.dev/window": "20s"}, 4, None, "panic_window", 2.0, id="panic-window-10pct"),
    pytest.param({"autoscaling.knative.dev/panic-window-percentage": "50"}, 4, None, "panic_window", 30.0,
                 id="panic-window-annotation"),
    pytest.param({"autoscaling.knative.dev/panic-threshold-percentage": "300"}, 4, None, "panic_threshold", 3.0,
                 id="panic-threshold-ratio"),
    pytest.param({"autoscaling.knative.dev/min-scale": "1"}, 4, ScalingPolicy("p", "default", "llama", min_scale=2),
                 "min_scale", 2, id="policy-min-wins"),
    pytest.param({"autoscaling.knative.dev/max-scale": "5"}, 4, None, "max_scale", 5, id="max-annotation"),
    pytest.param({"autoscaling.knative.dev/scale-to-zero-pod-retention-period": "1m"}, 4, None,
                 "scale_to_zero_retention", 60.0, id="retention"),
    pytest.param({}, 4, None, "scale_to_zero_grace", 30.0, id="grace-from-config"),
    pytest.param({}, 4, ScalingPolicy("p", "default", "llama", keep_alive=45.0), "keep_alive", 45.0,
                 id="keep-alive-from-policy"),
    pytest.param({}, 4, None, "keep_alive", None, id="no-policy-knative-rules"),
    pytest.param({"autoscaling.knative.dev/activation-scale": "2"}, 4, None, "activation_scale", 2,
                 id="activation-scale"),
])
def test_spec_for(annotations: dict[str, str], cc: int, policy: ScalingPolicy | None, field: str,
                  want: object) -> None:
    got = getattr(spec_for(_svc(annotations, cc), AutoscalerConfig(), policy), field)  # type: ignore[arg-type]
    assert got == (pytest.approx(want) if isinstance(want, float) else want)


def test_spec_for_matches_the_knative_defaults() -> None:
    s = spec_for(_svc(), None)  # type: ignore[arg-type]
    assert (s.stable_window, s.panic_window, s.panic_threshold, s.max_scale_up_rate, s.max_scale_down_rate) == (
        60.0, 6.0, 2.0, 1000.0, 2.0)
    assert (s.target_burst_capacity, s.initial_scale, s.scale_down_delay) == (211.0, 1, 0.0)


@pytest.mark.parametrize("annotations,policy,cfg,message", [
    pytest.param({"autoscaling.knative.dev/max-scale": "2"}, ScalingPolicy("p", "default", "llama", min_scale=3),
                 AutoscalerConfig(), "min-scale 3 exceeds max-scale 2", id="policy-min-over-annotation-max"),
    pytest.param({"autoscaling.knative.dev/class": "hpa.autoscaling.knative.dev"}, None, AutoscalerConfig(),
                 "metric 'cpu' is scaled by Kubernetes' HPA", id="hpa-metric"),
    pytest.param({"autoscaling.knative.dev/max-scale": "3"}, ScalingPolicy("p", "default", "llama", max_scale=9),
                 AutoscalerConfig(max_scale_limit=5), r"max-scale 9 is outside \[1, 5\]", id="policy-over-limit"),
])
def test_spec_for_rejects(annotations: dict[str, str], policy: ScalingPolicy | None, cfg: AutoscalerConfig,
                          message: str) -> None:
    with pytest.raises(ValueError, match=message):
        spec_for(_svc(annotations), cfg, policy)  # type: ignore[arg-type]


def test_spec_rejects_inconsistent_values() -> None:
    with pytest.raises(ValueError, match="max scale up/down rates must be > 1"):
        spec(max_scale_up_rate=1.0)
    with pytest.raises(ValueError, match="panic window"):
        spec(panic_window=90.0)


# -- keeps_one: decide's answer for a calm service at one instance, without the averages -------

_PANICS = st.sampled_from([PanicState(), PanicState(None, 3), PanicState(NOW - 10.0, 2)])


@st.composite
def _case(draw: st.DrawFn) -> tuple[DeciderSpec, DeciderState, int, list[tuple[float, float]], float | None]:
    s = spec(target=draw(st.sampled_from([1.0, 5.6, 10.0])),
             keep_alive=draw(st.sampled_from([None, 0.0, 5.0, 60.0])),
             min_scale=draw(st.sampled_from([0, 0, 0, 1])),
             activation_scale=draw(st.sampled_from([1, 1, 1, 2])),
             panic_threshold=draw(st.sampled_from([2.0, 2.0, 1.0, 0.5])),
             scale_down_delay=draw(st.sampled_from([0.0, 0.0, 0.0, 30.0])),
             enable_scale_to_zero=draw(st.sampled_from([True, True, True, False])),
             stable_window=draw(st.sampled_from([60.0, 6.0, 6.6])), panic_window=6.0)
    state = DeciderState(scale=draw(st.sampled_from([1, 1, 1, 0, 2])), panic=draw(_PANICS),
                         recent=draw(st.sampled_from([(), (), ((NOW - 5.0, 2),)])),
                         active_since=draw(st.sampled_from([None, NOW - 100.0, NOW - 30.0, NOW - 2.0])),
                         inactive_since=draw(st.sampled_from([None, None, NOW - 5.0])),
                         zero_since=draw(st.sampled_from([None, None, NOW - 50.0])),
                         initialized=draw(st.sampled_from([True, True, False])))
    ready = draw(st.integers(0, 3))
    # samples over the last two minutes, in time order, the last one at NOW (as the simulator records)
    ts = sorted(draw(st.lists(st.floats(NOW - 120.0, NOW - 0.01), max_size=30)))
    values = [0.0, 1.0, 3.0, 5.0, 5.6, 6.0, 10.0, 20.0]
    samples = [(t, draw(st.sampled_from(values))) for t in ts] + [(NOW, draw(st.sampled_from(values)))]
    last_request = draw(st.sampled_from([None, NOW - 100.0, NOW - 40.0, NOW - 3.0]))
    return s, state, ready, samples, last_request


@settings(max_examples=2000, deadline=None)
@given(_case())
def test_keeps_one_agrees_with_decide(case: tuple[DeciderSpec, DeciderState, int, list[tuple[float, float]],
                                                  float | None]) -> None:
    s, state, ready, samples, last_request = case
    w = MetricWindow()
    for t, v in samples:
        w = w.record(t, v)
    inside = [v for t, v in samples if math.floor(t) >= math.floor(NOW) - round(s.stable_window) + 1]
    calm = max(inside) <= s.target
    marks = [t for t in (last_request, w.last_nonzero()) if t is not None]
    if not keeps_one(s, state, ready, max(marks) if marks else None, calm, NOW):
        return
    decision, new = decide(s, DeciderInputs(w, ready, last_request), state, NOW)
    assert decision.valid and decision.desired == state.scale == 1
    assert new == state


def test_keeps_one_says_so_for_a_calm_service_in_its_keep_alive() -> None:
    s = spec(target=5.6, keep_alive=60.0)
    state = DeciderState(scale=1, active_since=NOW - 100.0, initialized=True)
    w = MetricWindow().record(NOW - 30.0, 2.0).record(NOW, 0.0)
    assert keeps_one(s, state, 1, w.last_nonzero(), True, NOW)
    decision, new = decide(s, DeciderInputs(w, 1, None), state, NOW)
    assert (decision.desired, new) == (1, state)
    # not when a sample was above the target, past the keep-alive, panicking, or under Knative's rules
    assert not keeps_one(s, state, 1, w.last_nonzero(), False, NOW)
    assert not keeps_one(s, state, 1, w.last_nonzero(), True, NOW + 60.0)
    assert not keeps_one(s, dataclasses.replace(state, panic=PanicState(NOW - 1.0, 1)), 1, None, True, NOW)
    assert not keeps_one(spec(target=5.6), state, 1, w.last_nonzero(), True, NOW)
