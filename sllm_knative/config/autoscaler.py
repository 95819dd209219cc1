"""Cluster-wide autoscaling defaults: Knative's `config-autoscaler` ConfigMap.

Defaults, then parse, then normalise, then validate, as Knative's own config package does.
The dataclass defaults are the values of the ConfigMap's `_example` block shipped in
`sllm_knative/schemas/knative/configmaps/autoscaler.yaml`; a test keeps the two equal.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sllm_knative.config.errors import Collector, Path, show
from sllm_knative.config.values import parse_bool, parse_duration

#: Knative's autoscaling constants (pkg/apis/autoscaling): window bounds, the smallest target,
#: the metric bucket size, the panic threshold range, the longest delays.
WINDOW_MIN_S = 6.0
WINDOW_MAX_S = 3600.0
TARGET_MIN = 0.01
BUCKET_S = 1.0
PANIC_THRESHOLD_MIN = 110.0
PANIC_THRESHOLD_MAX = 1000.0
SCALE_DOWN_DELAY_MAX_S = 3600.0
RETENTION_MAX_S = 3600.0
#: The autoscaler's evaluation period (not configurable in Knative either).
TICK_S = 2.0
#: How far past the moment a decision changes by itself (`Decision.recheck_in_s`: a keep-alive's
#: end) the autoscaler evaluates the service again, between ticks.
RECHECK_LATE_S = 0.01

KPA_CLASS = "kpa.autoscaling.knative.dev"
HPA_CLASS = "hpa.autoscaling.knative.dev"
SLLM_CLASS = "llm.autoscaling.sllm-knative.io"


@dataclass(frozen=True)
class AutoscalerConfig:
    """The parsed `config-autoscaler` ConfigMap; durations in seconds, percentages as fractions
    where Knative keeps fractions (`container_concurrency_target_fraction`)."""

    container_concurrency_target_fraction: float = 0.7
    container_concurrency_target_default: float = 100.0
    rps_target_default: float = 200.0
    target_burst_capacity: float = 211.0
    stable_window: float = 60.0
    panic_window_percentage: float = 10.0
    panic_threshold_percentage: float = 200.0
    max_scale_up_rate: float = 1000.0
    max_scale_down_rate: float = 2.0
    enable_scale_to_zero: bool = True
    scale_to_zero_grace_period: float = 30.0
    scale_to_zero_pod_retention_period: float = 0.0
    pod_autoscaler_class: str = KPA_CLASS
    activator_capacity: float = 100.0
    initial_scale: int = 1
    allow_zero_initial_scale: bool = False
    min_scale: int = 0
    max_scale: int = 0
    scale_down_delay: float = 0.0
    max_scale_limit: int = 0

    def replace(self, **changes: Any) -> AutoscalerConfig:
        """A copy with some fields changed, validated like a parsed ConfigMap."""
        cfg = dataclasses.replace(self, **changes)
        errors = Collector(("data",))
        _validate(cfg, errors)
        errors.raise_if_any("config-autoscaler")
        return cfg


def _number(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError
    return x


def _integer(text: str) -> int:
    return int(text)


def _text(text: str) -> str:
    return text


# ConfigMap key -> (field, parser). Parsers raise ValueError; the message names the form.
_KEYS: dict[str, tuple[str, Callable[[str], Any], str]] = {
    "container-concurrency-target-percentage": ("container_concurrency_target_fraction", _number, "a number"),
    "container-concurrency-target-default": ("container_concurrency_target_default", _number, "a number"),
    "requests-per-second-target-default": ("rps_target_default", _number, "a number"),
    "target-burst-capacity": ("target_burst_capacity", _number, "a number"),
    "stable-window": ("stable_window", parse_duration, 'a duration such as "60s"'),
    "panic-window-percentage": ("panic_window_percentage", _number, "a number"),
    "panic-threshold-percentage": ("panic_threshold_percentage", _number, "a number"),
    "max-scale-up-rate": ("max_scale_up_rate", _number, "a number"),
    "max-scale-down-rate": ("max_scale_down_rate", _number, "a number"),
    "enable-scale-to-zero": ("enable_scale_to_zero", parse_bool, '"true" or "false"'),
    "scale-to-zero-grace-period": ("scale_to_zero_grace_period", parse_duration, 'a duration such as "30s"'),
    "scale-to-zero-pod-retention-period": (
        "scale_to_zero_pod_retention_period", parse_duration, 'a duration such as "0s"'),
    "pod-autoscaler-class": ("pod_autoscaler_class", _text, "a class name"),
    "activator-capacity": ("activator_capacity", _number, "a number"),
    "initial-scale": ("initial_scale", _integer, "an integer"),
    "allow-zero-initial-scale": ("allow_zero_initial_scale", parse_bool, '"true" or "false"'),
    "min-scale": ("min_scale", _integer, "an integer"),
    "max-scale": ("max_scale", _integer, "an integer"),
    "scale-down-delay": ("scale_down_delay", parse_duration, 'a duration such as "0s"'),
    "max-scale-limit": ("max_scale_limit", _integer, "an integer"),
}

_FIELD_TO_KEY = {field: key for key, (field, _, _) in _KEYS.items()}


def parse_autoscaler_config(data: Mapping[str, Any] | None, *, source: str = "config-autoscaler") -> AutoscalerConfig:
    """The `data` of a `config-autoscaler` ConfigMap -> AutoscalerConfig.

    Missing keys keep their defaults; `_example` is documentation and ignored; unknown keys
    and invalid values raise `ConfigError` with one line per problem (`data.stable-window: ...`).
    """
    errors = Collector(("data",))
    values: dict[str, Any] = {}
    for key, raw in (data or {}).items():
        if key == "_example":
            continue
        if key not in _KEYS:
            errors.add((key,), f"unknown config-autoscaler key (known: {', '.join(sorted(_KEYS))})")
            continue
        field, parse, form = _KEYS[key]
        if not isinstance(raw, str):
            errors.add((key,), f"must be a string (ConfigMap values are strings), got {show(raw)}")
            continue
        try:
            values[field] = parse(raw.strip())
        except ValueError:
            errors.add((key,), f"must be {form}, got {show(raw)}")
    errors.raise_if_any(source)
    cfg = _normalise(AutoscalerConfig(**values))
    _validate(cfg, errors)
    errors.raise_if_any(source)
    return cfg


def _normalise(cfg: AutoscalerConfig) -> AutoscalerConfig:
    # Percent -> fraction. Values in (0, 1] are legacy fractions and kept as they are.
    if cfg.container_concurrency_target_fraction > 1.0:
        return dataclasses.replace(
            cfg, container_concurrency_target_fraction=cfg.container_concurrency_target_fraction / 100.0
        )
    return cfg


def _validate(cfg: AutoscalerConfig, errors: Collector) -> None:
    def bad(field: str, message: str) -> None:
        key = _FIELD_TO_KEY[field]
        path: Path = (key,)
        errors.add(path, message)

    if cfg.scale_to_zero_grace_period < WINDOW_MIN_S:
        bad("scale_to_zero_grace_period", f"must be at least {WINDOW_MIN_S:g}s, got {cfg.scale_to_zero_grace_period:g}s")
    if cfg.scale_to_zero_pod_retention_period < 0:
        bad("scale_to_zero_pod_retention_period", "cannot be negative")
    if cfg.target_burst_capacity < 0 and cfg.target_burst_capacity != -1:
        bad("target_burst_capacity", f"must be >= 0 or -1 (unlimited), got {cfg.target_burst_capacity:g}")
    frac = cfg.container_concurrency_target_fraction
    if not 0 < frac <= 1:
        bad("container_concurrency_target_fraction", f"must be in (0, 100], got {frac * 100:g}")
    elif cfg.container_concurrency_target_default * frac < TARGET_MIN:
        bad("container_concurrency_target_default",
            f"times the target percentage must be at least {TARGET_MIN}, got {cfg.container_concurrency_target_default:g}")
    if frac > 0 and cfg.rps_target_default * frac < TARGET_MIN:
        bad("rps_target_default", f"times the target percentage must be at least {TARGET_MIN}, got {cfg.rps_target_default:g}")
    for field in ("max_scale_up_rate", "max_scale_down_rate"):
        rate = getattr(cfg, field)
        if rate <= 1.0:
            bad(field, f"must be greater than 1.0, got {rate:g}")
    sw = cfg.stable_window
    if not WINDOW_MIN_S <= sw <= WINDOW_MAX_S:
        bad("stable_window", f"must be in [{WINDOW_MIN_S:g}s, {WINDOW_MAX_S:g}s], got {sw:g}s")
    elif sw != round(sw):
        bad("stable_window", f"must be whole seconds, got {sw:g}s")
    else:
        panic = cfg.panic_window_percentage / 100.0 * sw
        if panic < BUCKET_S or panic > sw:
            lowest = 100.0 * BUCKET_S / sw
            bad("panic_window_percentage", f"must be in [{lowest:g}, 100] for a {sw:g}s stable window, "
                f"got {cfg.panic_window_percentage:g}")
    if not PANIC_THRESHOLD_MIN <= cfg.panic_threshold_percentage <= PANIC_THRESHOLD_MAX:
        bad("panic_threshold_percentage",
            f"must be in [{PANIC_THRESHOLD_MIN:g}, {PANIC_THRESHOLD_MAX:g}], got {cfg.panic_threshold_percentage:g}")
    if cfg.initial_scale < 0 or (cfg.initial_scale == 0 and not cfg.allow_zero_initial_scale):
        bad("initial_scale", f"must be >= 1 (>= 0 with allow-zero-initial-scale), got {cfg.initial_scale}")
    if cfg.max_scale_limit < 0:
        bad("max_scale_limit", f"cannot be negative, got {cfg.max_scale_limit}")
    if cfg.max_scale < 0 or (cfg.max_scale_limit > 0 and not 0 < cfg.max_scale <= cfg.max_scale_limit):
        bad("max_scale", f"must be in [{1 if cfg.max_scale_limit else 0}, max-scale-limit], got {cfg.max_scale}")
    if cfg.min_scale < 0 or (cfg.max_scale > 0 and cfg.min_scale > cfg.max_scale):
        bad("min_scale", f"must be in [0, max-scale], got {cfg.min_scale}")
    if cfg.activator_capacity < 1:
        bad("activator_capacity", f"must be at least 1, got {cfg.activator_capacity:g}")
    if cfg.scale_down_delay < 0:
        bad("scale_down_delay", f"cannot be negative, got {cfg.scale_down_delay:g}s")
    elif cfg.scale_down_delay != round(cfg.scale_down_delay):
        bad("scale_down_delay", f"must be whole seconds, got {cfg.scale_down_delay:g}s")
    if not cfg.pod_autoscaler_class:
        bad("pod_autoscaler_class", "cannot be empty")


def panic_window(stable_window: float, panic_window_percentage: float) -> float:
    """The panic window in seconds: a percentage of the stable window, rounded to whole
    seconds and at least one bucket (Knative rounds the same way)."""
    return max(BUCKET_S, float(round(stable_window * panic_window_percentage / 100.0)))
