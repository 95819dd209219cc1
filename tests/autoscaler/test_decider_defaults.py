"""DeciderSpec's defaults are config-autoscaler's (AutoscalerConfig): one copy of the values."""

from __future__ import annotations

from autoscaler.decider import DeciderSpec, spec_for
from sllm_knative.config import AutoscalerConfig, panic_window, parse_manifest
from sllm_knative.local.manifests import service_manifest

CFG = AutoscalerConfig()


def test_defaults_are_the_config_defaults() -> None:
    assert DeciderSpec(target=1.0, total=1.0) == DeciderSpec(
        target=1.0,
        total=1.0,
        target_burst_capacity=CFG.target_burst_capacity,
        panic_threshold=CFG.panic_threshold_percentage / 100.0,
        stable_window=CFG.stable_window,
        panic_window=panic_window(CFG.stable_window, CFG.panic_window_percentage),
        max_scale_up_rate=CFG.max_scale_up_rate,
        max_scale_down_rate=CFG.max_scale_down_rate,
        min_scale=CFG.min_scale,
        max_scale=CFG.max_scale,
        initial_scale=CFG.initial_scale,
        scale_down_delay=CFG.scale_down_delay,
        enable_scale_to_zero=CFG.enable_scale_to_zero,
        scale_to_zero_grace=CFG.scale_to_zero_grace_period,
        scale_to_zero_retention=CFG.scale_to_zero_pod_retention_period,
    )


def test_a_service_that_sets_nothing_resolves_to_the_defaults() -> None:
    """spec_for on the default config changes nothing but what the service itself sets."""
    text = service_manifest("a", "file:///store/a", window="60s", max_scale=0)
    [svc] = parse_manifest(text.split("---")[0]).services
    spec = spec_for(svc, CFG)
    assert spec == DeciderSpec(target=spec.target, total=spec.total)
