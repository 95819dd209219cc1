"""config-autoscaler: the shipped ConfigMap documents exactly the code defaults; bad values are
reported per key."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from sllm_knative.config import AutoscalerConfig, ConfigError, parse_autoscaler_config
from sllm_knative.config.schema import read_packaged_yaml
from sllm_knative.config.service import (
    CONTAINER_CONCURRENCY_MAX_LIMIT,
    MAX_REVISION_TIMEOUT_SECONDS,
    REVISION_TIMEOUT_SECONDS,
)


def _example(relative: str) -> dict[str, str]:
    cm = read_packaged_yaml(relative)
    return yaml.safe_load(cm["data"]["_example"])


def test_shipped_example_block_equals_code_defaults() -> None:
    example = _example("knative/configmaps/autoscaler.yaml")
    assert len(example) == len(dataclasses.fields(AutoscalerConfig))
    assert parse_autoscaler_config(example) == AutoscalerConfig()


def test_config_defaults_constants_match_shipped_config_defaults() -> None:
    example = _example("knative/configmaps/defaults.yaml")
    assert int(example["container-concurrency-max-limit"]) == CONTAINER_CONCURRENCY_MAX_LIMIT
    assert int(example["max-revision-timeout-seconds"]) == MAX_REVISION_TIMEOUT_SECONDS
    assert int(example["revision-timeout-seconds"]) == REVISION_TIMEOUT_SECONDS


def test_example_key_is_documentation_and_empty_data_is_defaults() -> None:
    assert parse_autoscaler_config({"_example": "stable-window: nonsense"}) == AutoscalerConfig()
    assert parse_autoscaler_config(None) == AutoscalerConfig()


@pytest.mark.parametrize("data,field,value", [
    pytest.param({"container-concurrency-target-percentage": "80"},
                 "container_concurrency_target_fraction", 0.8, id="percent-to-fraction"),
    pytest.param({"container-concurrency-target-percentage": "0.5"},
                 "container_concurrency_target_fraction", 0.5, id="legacy-fraction-kept"),
    pytest.param({"stable-window": "2m"}, "stable_window", 120.0, id="stable-window"),
    pytest.param({"scale-to-zero-grace-period": "10s"}, "scale_to_zero_grace_period", 10.0, id="grace"),
    pytest.param({"enable-scale-to-zero": "false"}, "enable_scale_to_zero", False, id="no-scale-to-zero"),
    pytest.param({"initial-scale": "0", "allow-zero-initial-scale": "true"}, "initial_scale", 0, id="zero-initial"),
    pytest.param({"target-burst-capacity": "-1"}, "target_burst_capacity", -1.0, id="unlimited-tbc"),
])
def test_parse_values(data: dict[str, str], field: str, value: object) -> None:
    assert getattr(parse_autoscaler_config(data), field) == pytest.approx(value)


@pytest.mark.parametrize("data,message", [
    pytest.param({"max-scale-up-rate": "0.5"}, 'data.max-scale-up-rate: must be greater than 1.0, got 0.5', id="up-rate"),
    pytest.param({"max-scale-down-rate": "1"}, "data.max-scale-down-rate: must be greater than 1.0", id="down-rate"),
    pytest.param({"stable-window": "5s"}, r"data.stable-window: must be in \[6s, 3600s\], got 5s", id="window-short"),
    pytest.param({"stable-window": "90500ms"}, "must be whole seconds", id="window-precision"),
    pytest.param({"stable-window": "sixty"}, 'data.stable-window: must be a duration such as "60s", got "sixty"',
                 id="window-form"),
    pytest.param({"panic-window-percentage": "1"}, r"must be in \[1.66667, 100\] for a 60s stable window",
                 id="panic-window-under-a-bucket"),
    pytest.param({"panic-threshold-percentage": "100"}, r"must be in \[110, 1000\]", id="panic-threshold"),
    pytest.param({"target-burst-capacity": "-2"}, "must be >= 0 or -1", id="tbc"),
    pytest.param({"container-concurrency-target-percentage": "150"}, r"must be in \(0, 100\]", id="utilisation"),
    pytest.param({"scale-to-zero-grace-period": "1s"}, "must be at least 6s", id="grace"),
    pytest.param({"initial-scale": "0"}, "allow-zero-initial-scale", id="zero-initial-not-allowed"),
    pytest.param({"min-scale": "3", "max-scale": "2"}, r"data.min-scale: must be in \[0, max-scale\]", id="min-over-max"),
    pytest.param({"max-scale-limit": "5", "max-scale": "0"}, r"data.max-scale: must be in \[1, max-scale-limit\]",
                 id="unlimited-over-limit"),
    pytest.param({"scale-down-delay": "1500ms"}, "data.scale-down-delay: must be whole seconds", id="delay-precision"),
    pytest.param({"activator-capacity": "0.5"}, "must be at least 1", id="activator-capacity"),
    pytest.param({"stable-windw": "60s"}, r"data.stable-windw: unknown config-autoscaler key", id="typo"),
    pytest.param({"min-scale": 1}, "ConfigMap values are strings", id="not-a-string"),
])
def test_rejects(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_autoscaler_config(data)
    assert str(info.value).startswith("config-autoscaler: data.")


def test_reports_every_bad_key_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        parse_autoscaler_config({"max-scale-up-rate": "x", "stable-window": "y", "bogus": "1"})
    paths = sorted(str(e).split(":")[0] for e in info.value.errors)
    assert paths == ["data.bogus", "data.max-scale-up-rate", "data.stable-window"]


def test_replace_validates() -> None:
    assert AutoscalerConfig().replace(scale_to_zero_grace_period=6.0).scale_to_zero_grace_period == 6.0
    with pytest.raises(ConfigError, match="scale-to-zero-grace-period"):
        AutoscalerConfig().replace(scale_to_zero_grace_period=1.0)
