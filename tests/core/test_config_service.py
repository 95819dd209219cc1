"""Knative Service parsing: Knative's CRD schema first, then annotation and container rules;
every problem reported with its path."""

from __future__ import annotations

import copy
from decimal import Decimal
from typing import Any

import pytest

from sllm_knative.config import (
    KPA_CLASS,
    SLLM_CLASS,
    AutoscalerConfig,
    Autoscaling,
    ConfigError,
    parse_service,
)

DELETE = object()

BASE: dict[str, Any] = {
    "apiVersion": "serving.knative.dev/v1",
    "kind": "Service",
    "metadata": {"name": "llama", "namespace": "ml", "labels": {"team": "nlp"}},
    "spec": {
        "template": {
            "metadata": {
                "annotations": {
                    "autoscaling.knative.dev/class": SLLM_CLASS,
                    "sllm-knative.io/model": "hf://meta-llama/Llama-3.2-1B",
                },
            },
            "spec": {
                "containerConcurrency": 4,
                "containers": [{
                    "image": "ghcr.io/sllm-knative/llm-function:0.1.0",
                    "args": ["--max-batch", "4"],
                    "env": [{"name": "A", "value": "1"}],
                    "ports": [{"containerPort": 8080}],
                    "resources": {"limits": {"memory": "16Gi", "cpu": "500m", "nvidia.com/gpu": 1}},
                }],
            },
        },
    },
}

ANN = ("spec", "template", "metadata", "annotations")
CONTAINER = ("spec", "template", "spec", "containers", 0)


def doc_with(*changes: tuple[tuple[Any, ...], Any]) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    for path, value in changes:
        node = doc
        for key in path[:-1]:
            node = node.setdefault(key, {}) if isinstance(key, str) else node[key]
        if value is DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return doc


def errors_of(doc: Any, **kwargs: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_service(doc, **kwargs)
    return [str(e) for e in info.value.errors]


def test_parses_the_base_service() -> None:
    s = parse_service(BASE)
    assert (s.name, s.namespace, s.key) == ("llama", "ml", "ml/llama")
    assert s.managed and s.autoscaler_class == SLLM_CLASS and s.metric == "concurrency"
    assert str(s.model) == "hf://meta-llama/Llama-3.2-1B"
    assert s.container_concurrency == 4 and s.timeout_seconds == 300
    c = s.container
    assert c.image == "ghcr.io/sllm-knative/llm-function:0.1.0" and c.args == ("--max-batch", "4") and c.port == 8080
    assert c.env[0].name == "A" and c.env[0].value == "1"
    assert c.resources.get("memory") == Decimal(16 * 2**30)
    assert c.resources.get("cpu") == Decimal("0.5") and c.resources.get("nvidia.com/gpu") == 1
    assert s.labels == {"team": "nlp"}
    assert s.autoscaling == Autoscaling(klass=SLLM_CLASS)


@pytest.mark.parametrize("key,value,field,expected", [
    pytest.param("min-scale", "1", "min_scale", 1, id="min-scale"),
    pytest.param("minScale", "2", "min_scale", 2, id="legacy-minScale"),
    pytest.param("max-scale", "10", "max_scale", 10, id="max-scale"),
    pytest.param("initial-scale", "3", "initial_scale", 3, id="initial-scale"),
    pytest.param("activation-scale", "2", "activation_scale", 2, id="activation-scale"),
    pytest.param("target", "2.5", "target", 2.5, id="target"),
    pytest.param("target-utilization-percentage", "80", "target_utilization", 0.8, id="utilisation"),
    pytest.param("metric", "rps", "metric", "rps", id="metric"),
    pytest.param("window", "2m", "window", 120.0, id="window"),
    pytest.param("panic-window-percentage", "20", "panic_window_percentage", 20.0, id="panic-window"),
    pytest.param("panic-threshold-percentage", "300", "panic_threshold_percentage", 300.0, id="panic-threshold"),
    pytest.param("scale-to-zero-pod-retention-period", "90s", "scale_to_zero_pod_retention_period", 90.0,
                 id="retention"),
    pytest.param("scale-down-delay", "15m", "scale_down_delay", 900.0, id="scale-down-delay"),
    pytest.param("target-burst-capacity", "-1", "target_burst_capacity", -1.0, id="tbc-unlimited"),
    pytest.param("class", KPA_CLASS, "klass", KPA_CLASS, id="kpa-class"),
])
def test_annotations(key: str, value: str, field: str, expected: object) -> None:
    s = parse_service(doc_with((ANN + (f"autoscaling.knative.dev/{key}",), value)))
    assert getattr(s.autoscaling, field) == pytest.approx(expected) if isinstance(expected, float) else expected


MIN = 'spec.template.metadata.annotations["autoscaling.knative.dev/min-scale"]'


@pytest.mark.parametrize("changes,expected", [
    pytest.param([(ANN + ("autoscaling.knative.dev/min-scale",), "x")],
                 [f'{MIN}: must be an integer >= 0, got "x"'], id="min-scale-not-int"),
    pytest.param([(ANN + ("autoscaling.knative.dev/min-scale",), "-1")],
                 [f'{MIN}: must be an integer >= 0, got "-1"'], id="min-scale-negative"),
    pytest.param([(ANN + ("autoscaling.knative.dev/min-scale",), 1)],
                 [f"{MIN}: must be a string, got 1 (an integer)"], id="annotation-not-string"),
    pytest.param([(ANN + ("autoscaling.knative.dev/min-scale",), "5"), (ANN + ("autoscaling.knative.dev/max-scale",), "2")],
                 [f"{MIN}: min-scale (5) must be <= max-scale (2)"], id="min-over-max"),
    pytest.param([(ANN + ("autoscaling.knative.dev/min-scale",), "1"), (ANN + ("autoscaling.knative.dev/minScale",), "2")],
                 ['spec.template.metadata.annotations["autoscaling.knative.dev/minScale"]: set twice: also as '
                  '"autoscaling.knative.dev/min-scale"; keep "autoscaling.knative.dev/min-scale"'], id="alias-twice"),
    pytest.param([(ANN + ("autoscaling.knative.dev/minscale",), "1")],
                 ['spec.template.metadata.annotations["autoscaling.knative.dev/minscale"]: unknown autoscaling annotation'],
                 id="typo"),
    pytest.param([(ANN + ("autoscaling.knative.dev/metric-aggregation-algorithm",), "weightedExponential")],
                 ['spec.template.metadata.annotations["autoscaling.knative.dev/metric-aggregation-algorithm"]: '
                  "is not supported"], id="unsupported"),
    pytest.param([(ANN + ("autoscaling.knative.dev/window",), "5s")],
                 ['spec.template.metadata.annotations["autoscaling.knative.dev/window"]: must be a duration in [6s, 3600s]'],
                 id="window-too-short"),
    pytest.param([(ANN + ("autoscaling.knative.dev/window",), "6500ms")],
                 ['spec.template.metadata.annotations["autoscaling.knative.dev/window"]: must be whole seconds'],
                 id="window-precision"),
    pytest.param([(ANN + ("autoscaling.knative.dev/target",), "0")],
                 ['spec.template.metadata.annotations["autoscaling.knative.dev/target"]: must be a number >= 0.01'],
                 id="target-zero"),
    pytest.param([(ANN + ("autoscaling.knative.dev/target-utilization-percentage",), "120")],
                 ['["autoscaling.knative.dev/target-utilization-percentage"]: must be a number in [1, 100]'],
                 id="utilisation-over-100"),
    pytest.param([(ANN + ("autoscaling.knative.dev/panic-threshold-percentage",), "100")],
                 ['["autoscaling.knative.dev/panic-threshold-percentage"]: must be a number in [110, 1000]'],
                 id="panic-threshold-low"),
    pytest.param([(ANN + ("autoscaling.knative.dev/panic-window-percentage",), "1"),
                  (ANN + ("autoscaling.knative.dev/window",), "10s")],
                 ['["autoscaling.knative.dev/panic-window-percentage"]: gives a panic window under 1s'],
                 id="panic-window-under-a-second"),
    pytest.param([(ANN + ("autoscaling.knative.dev/target-burst-capacity",), "-5")],
                 ['["autoscaling.knative.dev/target-burst-capacity"]: must be a number >= 0, or -1'], id="tbc"),
    pytest.param([(ANN + ("autoscaling.knative.dev/scale-down-delay",), "2h")],
                 ['["autoscaling.knative.dev/scale-down-delay"]: must be a duration in [0s, 3600s]'], id="delay-long"),
    pytest.param([(ANN + ("autoscaling.knative.dev/initial-scale",), "0")],
                 ['["autoscaling.knative.dev/initial-scale"]: must be an integer >= 1 (0 needs allow-zero-initial-scale'],
                 id="initial-zero-not-allowed"),
    pytest.param([(ANN + ("autoscaling.knative.dev/activation-scale",), "0")],
                 ['["autoscaling.knative.dev/activation-scale"]: must be an integer >= 1'], id="activation-zero"),
    pytest.param([(ANN + ("autoscaling.knative.dev/metric",), "cpu")],
                 ['["autoscaling.knative.dev/metric"]: must be one of concurrency, rps for class '
                  f"{SLLM_CLASS}"], id="metric-for-class"),
    pytest.param([(ANN + ("autoscaling.knative.dev/class",), "foo.autoscaling.knative.dev")],
                 ['["autoscaling.knative.dev/class"]: unknown Knative class'], id="bad-knative-class"),
    pytest.param([(ANN + ("sllm-knative.io/model",), DELETE)],
                 ['spec.template.metadata.annotations["sllm-knative.io/model"]: required for services of class'],
                 id="model-required-for-class"),
    pytest.param([(ANN + ("sllm-knative.io/model",), "ftp://x/y")],
                 ['spec.template.metadata.annotations["sllm-knative.io/model"]: unsupported scheme'], id="model-scheme"),
    pytest.param([(ANN + ("sllm-knative.io/modle",), "hf://a/b")],
                 ['spec.template.metadata.annotations["sllm-knative.io/modle"]: unknown annotation'], id="sllm-typo"),
    pytest.param([(("metadata", "annotations"), {"autoscaling.knative.dev/min-scale": "1"})],
                 ['metadata.annotations["autoscaling.knative.dev/min-scale"]: autoscaling annotations take effect '
                  "only on spec.template.metadata.annotations"], id="autoscaling-on-service"),
    pytest.param([(("metadata", "annotations"), {"sllm-knative.io/model": "hf://other/model"})],
                 ['metadata.annotations["sllm-knative.io/model"]: set on both'], id="model-conflict"),
    pytest.param([(("metadata", "name"), "9llama")],
                 ['metadata.name: must be a DNS-1035 label'], id="name-starts-with-digit"),
    pytest.param([(("metadata", "name"), "a" * 64)],
                 ['metadata.name: must be a DNS-1035 label (at most 63'], id="name-too-long"),
    pytest.param([(("metadata", "name"), "Llama")],
                 ["metadata.name: must be a lowercase DNS name"], id="name-uppercase"),
    pytest.param([(("metadata", "name"), DELETE)], ["metadata.name: required field is missing"], id="name-missing"),
    pytest.param([(("spec", "template", "spec", "containerConcurrency"), 1001)],
                 [r"spec.template.spec.containerConcurrency: must be in [0, 1000]"], id="cc-over-limit"),
    pytest.param([(("spec", "template", "spec", "containerConcurrency"), "4")],
                 ['spec.template.spec.containerConcurrency: must be an integer, got "4" (a string)'], id="cc-string"),
    pytest.param([(("spec", "template", "spec", "timeoutSeconds"), 900)],
                 ["spec.template.spec.timeoutSeconds: must be in [1, 600]"], id="timeout"),
    pytest.param([(("spec", "template", "spec", "timeoutSeconds"), 60),
                  (("spec", "template", "spec", "responseStartTimeoutSeconds"), 90)],
                 ["spec.template.spec.responseStartTimeoutSeconds: must be in [1, timeoutSeconds (60)], got 90"],
                 id="response-start-over-timeout"),
    pytest.param([(CONTAINER + ("imagee",), "x")], ["spec.template.spec.containers[0].imagee: unknown field"],
                 id="unknown-container-field"),
    pytest.param([(("spec", "template", "spec", "nodeName"), "n1")], ["spec.template.spec.nodeName: unknown field"],
                 id="podspec-field-knative-forbids"),
    pytest.param([(CONTAINER + ("image",), DELETE)], ["spec.template.spec.containers[0].image: required"],
                 id="image-missing"),
    pytest.param([(CONTAINER + ("resources",), {"limits": {"memory": "16GB"}})],
                 ['spec.template.spec.containers[0].resources.limits.memory: must be a quantity such as "500m", "2" or '
                  '"16Gi", got "16GB"'], id="bad-quantity"),
    pytest.param([(CONTAINER + ("resources",), {"limits": {"cpu": "1"}, "requests": {"cpu": "2"}})],
                 ["spec.template.spec.containers[0].resources.requests.cpu: must be <= the limit"], id="request-over-limit"),
    pytest.param([(CONTAINER + ("ports",), [{"containerPort": 8013}])],
                 ["spec.template.spec.containers[0].ports[0].containerPort: port 8013 is reserved by Knative"],
                 id="reserved-port"),
    pytest.param([(CONTAINER + ("env",), [{"value": "x"}])],
                 ["spec.template.spec.containers[0].env[0].name: required field is missing"], id="env-name"),
    pytest.param([(("spec", "template", "spec", "containers"), [])],
                 ["spec.template.spec.containers: must have at least one container"], id="no-containers"),
    pytest.param([(("spec", "template", "spec", "containers"), [{"image": "a"}, {"image": "b"}])],
                 ["spec.template.spec.containers: with several containers exactly one must declare a port"],
                 id="two-containers-no-port"),
    pytest.param([(("spec", "traffic"), [{"percent": "100"}])],
                 ['spec.traffic[0].percent: must be an integer, got "100" (a string)'], id="traffic-schema"),
    pytest.param([(("spec", "template", "metdata"), {})], ["spec.template.metdata: unknown field"], id="typo-in-spec"),
    pytest.param([(("metadata", "labels"), {"team": 3})], ["metadata.labels.team: must be a string, got 3"],
                 id="label-not-string"),
    pytest.param([(ANN + ("sllm-knative.io/internal-port",), "http")],
                 ['spec.template.metadata.annotations["sllm-knative.io/internal-port"]: must be a port number'],
                 id="internal-port-not-a-number"),
    pytest.param([(ANN + ("sllm-knative.io/internal-prot",), "8013")],
                 ['spec.template.metadata.annotations["sllm-knative.io/internal-prot"]: unknown annotation'],
                 id="sllm-annotation-typo"),
    pytest.param([(("spec", "template", "spec", "nodeSelector"), {"gpu": 1})],
                 ["spec.template.spec.nodeSelector.gpu: must be a string, got 1"], id="node-selector-value-int"),
    pytest.param([(("spec", "template", "spec", "nodeSelector"), ["gpu=a100"])],
                 ["spec.template.spec.nodeSelector: must be"], id="node-selector-list"),
])
def test_rejects_with_path(changes: list[tuple[tuple[Any, ...], Any]], expected: list[str]) -> None:
    got = errors_of(doc_with(*changes))
    for want in expected:
        assert any(g.startswith(want) or want in g for g in got), f"{want!r} not in {got}"
    assert len(got) == len(expected), got


def test_wrong_kind_is_reported_before_schema() -> None:
    assert errors_of(doc_with((("kind",), "Deployment"))) == ['kind: must be "Service", got "Deployment"']
    assert errors_of([1, 2]) == ["<root>: must be a map (a Knative Service), got [1, 2]"]


def test_all_problems_of_one_document_together() -> None:
    got = errors_of(doc_with(
        (ANN + ("autoscaling.knative.dev/min-scale",), "x"),
        (ANN + ("autoscaling.knative.dev/window",), "1s"),
        (CONTAINER + ("ports",), [{"containerPort": 9090}]),
    ))
    assert len(got) == 3


def test_cluster_config_changes_validation() -> None:
    allow_zero = AutoscalerConfig(allow_zero_initial_scale=True)
    s = parse_service(doc_with((ANN + ("autoscaling.knative.dev/initial-scale",), "0")), defaults=allow_zero)
    assert s.autoscaling.initial_scale == 0
    limited = AutoscalerConfig(max_scale_limit=5)
    assert errors_of(doc_with((ANN + ("autoscaling.knative.dev/max-scale",), "8")), defaults=limited) == [
        'spec.template.metadata.annotations["autoscaling.knative.dev/max-scale"]: must be in [1, 5] (max-scale-limit), '
        'got "8"']


def test_the_node_selector_is_kept() -> None:
    """Knative's kubernetes.podspec-nodeselector: on Kubernetes, placement keeps to nodes with these labels."""
    s = parse_service(doc_with((("spec", "template", "spec", "nodeSelector"), {"gpu": "h100", "zone": "a"})))
    assert s.node_selector == {"gpu": "h100", "zone": "a"}
    assert parse_service(BASE).node_selector == {}


@pytest.mark.parametrize("spec,hold", [
    pytest.param({}, None, id="unset-the-activator-decides"),
    pytest.param({"timeoutSeconds": 90}, 90, id="timeout"),
    pytest.param({"timeoutSeconds": 90, "responseStartTimeoutSeconds": 20}, 20, id="response-start-wins"),
    pytest.param({"responseStartTimeoutSeconds": 20}, 20, id="response-start-alone"),
])
def test_the_hold_timeout_is_the_revisions(spec: dict[str, Any], hold: int | None) -> None:
    s = parse_service(doc_with(*((("spec", "template", "spec", k), v) for k, v in spec.items())))
    assert s.hold_timeout_seconds == hold


@pytest.mark.parametrize("resources,cores,slots,threads", [
    pytest.param({"requests": {"cpu": "2"}}, 16, 4, 2, id="request-wins"),
    pytest.param({"requests": {"cpu": "1500m"}}, 16, 4, 2, id="request-rounded-up"),
    pytest.param({"requests": {"cpu": "100m"}}, 16, 4, 1, id="small-request-one"),
    pytest.param({"limits": {"cpu": "8"}}, 16, 4, 4, id="a-limit-is-not-a-request"),
    pytest.param({}, 16, 4, 4, id="node-share"),
    pytest.param({}, 2, 2, 1, id="this-machine"),
    pytest.param({}, 2, 6, 1, id="more-slots-than-cores"),
    pytest.param({"requests": {"cpu": "0"}}, 8, 2, 4, id="zero-request-is-unset"),
])
def test_compute_threads_are_the_instance_share(resources: dict[str, Any], cores: int, slots: int,
                                                threads: int) -> None:
    s = parse_service(doc_with((CONTAINER + ("resources",), resources)))
    assert s.compute_threads(cores, slots) == threads


def test_defaults_when_unset() -> None:
    doc = doc_with((ANN, {}), (("metadata", "namespace"), DELETE))
    s = parse_service(doc)
    assert s.namespace == "default" and s.autoscaler_class == KPA_CLASS and not s.managed and s.model is None
    hpa = parse_service(doc_with((ANN, {"autoscaling.knative.dev/class": "hpa.autoscaling.knative.dev"})))
    assert hpa.metric == "cpu"


def test_serving_container_is_the_one_with_a_port() -> None:
    s = parse_service(doc_with((("spec", "template", "spec", "containers"), [
        {"image": "sidecar:1"}, {"image": "llm:1", "ports": [{"containerPort": 9000}]}])))
    assert s.container.image == "llm:1" and s.container.port == 9000 and len(s.containers) == 2
    single = parse_service(doc_with((CONTAINER + ("ports",), DELETE)))
    assert single.container.port == 8080 and single.containers[0].port == 8080
