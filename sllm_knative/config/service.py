"""A Knative `serving.knative.dev/v1 Service`, as a model owner writes it, parsed into typed values.

Validation runs in a fixed order: the document's kind, then Knative's own CRD schema (strict:
unknown fields are errors), then the rules Knative's webhook and this system add (names,
annotation values, containers, the checkpoint URI). Every problem is reported with its path;
all problems of one document are reported together.

Autoscaling annotations belong on `spec.template.metadata.annotations` (they configure the
revision). Annotation values left unset stay `None` in `Autoscaling`; the `config-autoscaler`
defaults fill them in when the autoscaler builds its decider spec.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sllm_knative.config.autoscaler import (
    HPA_CLASS,
    KPA_CLASS,
    PANIC_THRESHOLD_MAX,
    PANIC_THRESHOLD_MIN,
    RETENTION_MAX_S,
    SCALE_DOWN_DELAY_MAX_S,
    SLLM_CLASS,
    TARGET_MIN,
    WINDOW_MAX_S,
    WINDOW_MIN_S,
    AutoscalerConfig,
    panic_window,
)
from sllm_knative.config.errors import Collector, Path, show
from sllm_knative.config.model_uri import ModelURI, parse_model_uri
from sllm_knative.config.schema import check_document, knative_service_validator
from sllm_knative.config.values import parse_duration, parse_float, parse_int, parse_quantity

API_VERSION = "serving.knative.dev/v1"
KIND = "Service"

AUTOSCALING_PREFIX = "autoscaling.knative.dev/"
SLLM_PREFIX = "sllm-knative.io/"
MODEL_ANNOTATION = "sllm-knative.io/model"
# The instance's internal (migration) API port, an annotation of the revision. Knative copies it
# onto the PodAutoscaler (MakePA) and the pods; its private Service carries only its own ports, so
# the activator and the autoscaler learn the port from here. Without it a revision's generations
# are not migratable (forwarding is unaffected).
INTERNAL_PORT_ANNOTATION = "sllm-knative.io/internal-port"


def internal_port_of(annotations: Mapping[str, str]) -> int | None:
    """The port `INTERNAL_PORT_ANNOTATION` names in `annotations`: None when absent or not a port."""
    raw = annotations.get(INTERNAL_PORT_ANNOTATION, "")
    return int(raw) if isinstance(raw, str) and raw.isdigit() and 0 < int(raw) < 65536 else None

#: From Knative's config-defaults ConfigMap (`container-concurrency-max-limit`,
#: `max-revision-timeout-seconds`, `revision-timeout-seconds`); a test checks them against the
#: shipped `_example` block.
CONTAINER_CONCURRENCY_MAX_LIMIT = 1000
MAX_REVISION_TIMEOUT_SECONDS = 600
REVISION_TIMEOUT_SECONDS = 300

#: Ports the Knative queue-proxy reserves; a user container cannot listen on them.
RESERVED_PORTS = frozenset({8012, 8013, 8022, 9090, 9091})
DEFAULT_PORT = 8080

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class Autoscaling:
    """The `autoscaling.knative.dev/*` annotations of the revision template (None = not set).
    Durations in seconds; `target_utilization` as a fraction (70% -> 0.7)."""

    klass: str | None = None
    metric: str | None = None
    target: float | None = None
    target_utilization: float | None = None
    min_scale: int | None = None
    max_scale: int | None = None
    initial_scale: int | None = None
    activation_scale: int | None = None
    window: float | None = None
    panic_window_percentage: float | None = None
    panic_threshold_percentage: float | None = None
    scale_to_zero_pod_retention_period: float | None = None
    scale_down_delay: float | None = None
    target_burst_capacity: float | None = None


@dataclass(frozen=True)
class EnvVar:
    name: str
    value: str | None = None
    value_from: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Resources:
    """Container resources, quantities as exact Decimals (`"500m"` -> 0.5, `"1Gi"` -> 1073741824)."""

    limits: Mapping[str, Decimal] = field(default_factory=dict)
    requests: Mapping[str, Decimal] = field(default_factory=dict)

    def get(self, name: str) -> Decimal | None:
        """The limit for `name`, else its request (Kubernetes defaults requests to limits)."""
        return self.limits.get(name, self.requests.get(name))


@dataclass(frozen=True)
class Container:
    image: str
    name: str = ""
    command: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    env: tuple[EnvVar, ...] = ()
    resources: Resources = field(default_factory=Resources)
    port: int | None = None


@dataclass(frozen=True)
class ServiceConfig:
    """A parsed Knative Service. `container` is the serving container (the one with a port,
    or the only one); `autoscaler_class` and `metric` are the effective values."""

    name: str
    namespace: str
    container: Container
    containers: tuple[Container, ...]
    autoscaling: Autoscaling = field(default_factory=Autoscaling)
    autoscaler_class: str = KPA_CLASS
    metric: str = "concurrency"
    container_concurrency: int = 0
    timeout_seconds: int = REVISION_TIMEOUT_SECONDS
    # How long the activator holds a request for an instance with room: the revision's
    # responseStartTimeoutSeconds, else its timeoutSeconds when set; None: the activator's own
    # --cold-start-timeout. Past it the request gets a 503 with Retry-After.
    hold_timeout_seconds: int | None = None
    model: ModelURI | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    template_labels: Mapping[str, str] = field(default_factory=dict)
    template_annotations: Mapping[str, str] = field(default_factory=dict)
    # spec.template.spec.nodeSelector (Knative's kubernetes.podspec-nodeselector feature): the
    # node labels its pods require; on Kubernetes, placement only considers nodes that have them.
    node_selector: Mapping[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """`namespace/name`, the identity used across components."""
        return f"{self.namespace}/{self.name}"

    @property
    def managed(self) -> bool:
        """Whether this system's autoscaler owns the service (class llm.autoscaling.sllm-knative.io)."""
        return self.autoscaler_class == SLLM_CLASS

    def compute_threads(self, node_cores: int, node_slots: int) -> int:
        """An instance's compute threads: its share of the node. The serving container's
        `resources.requests.cpu` when set (rounded up: "1500m" -> 2), else the node's cores
        divided among its slots; at least 1. Without it every instance's torch would use every
        core, and a node's instances would thrash each other."""
        cpu = self.container.resources.requests.get("cpu")
        if cpu is not None and cpu > 0:
            return max(1, math.ceil(cpu))
        return max(1, node_cores // max(1, node_slots))


# --- annotations ------------------------------------------------------------------------

AnnotationParser = Callable[[str, AutoscalerConfig], Any]


def _ranged_duration(lo: float, hi: float, whole: bool) -> AnnotationParser:
    def parse(text: str, cfg: AutoscalerConfig) -> float:
        seconds = parse_duration(text)
        if not lo <= seconds <= hi:
            raise ValueError(f"must be a duration in [{lo:g}s, {hi:g}s], got {show(text)}")
        if whole and seconds != round(seconds):
            raise ValueError(f"must be whole seconds, got {show(text)}")
        return seconds

    return parse


def _initial_scale(text: str, cfg: AutoscalerConfig) -> int:
    if cfg.allow_zero_initial_scale:
        return parse_int(text, minimum=0)
    try:
        return parse_int(text, minimum=1)
    except ValueError:
        raise ValueError(
            f"must be an integer >= 1 (0 needs allow-zero-initial-scale in config-autoscaler), got {show(text)}"
        ) from None


def _max_scale(text: str, cfg: AutoscalerConfig) -> int:
    n = parse_int(text, minimum=0)
    if cfg.max_scale_limit > 0 and not 0 < n <= cfg.max_scale_limit:
        raise ValueError(f"must be in [1, {cfg.max_scale_limit}] (max-scale-limit), got {show(text)}")
    return n


def _tbc(text: str, cfg: AutoscalerConfig) -> float:
    x = parse_float(text)
    if x < 0 and x != -1:
        raise ValueError(f"must be a number >= 0, or -1 for unlimited, got {show(text)}")
    return x


def _utilization(text: str, cfg: AutoscalerConfig) -> float:
    return parse_float(text, minimum=1, maximum=100) / 100.0


def _klass(text: str, cfg: AutoscalerConfig) -> str:
    if not text:
        raise ValueError("cannot be empty")
    if text.endswith(".knative.dev") and text not in (KPA_CLASS, HPA_CLASS):
        raise ValueError(f"unknown Knative class {show(text)}: use {KPA_CLASS}, {HPA_CLASS} or {SLLM_CLASS}")
    return text


# canonical key -> (Autoscaling field, legacy alias or None, parser)
_AUTOSCALING: dict[str, tuple[str, str | None, AnnotationParser]] = {
    "class": ("klass", None, _klass),
    "metric": ("metric", None, lambda t, c: t),
    "target": ("target", None, lambda t, c: parse_float(t, minimum=TARGET_MIN)),
    "target-utilization-percentage": ("target_utilization", "targetUtilizationPercentage", _utilization),
    "min-scale": ("min_scale", "minScale", lambda t, c: parse_int(t, minimum=0)),
    "max-scale": ("max_scale", "maxScale", _max_scale),
    "initial-scale": ("initial_scale", "initialScale", _initial_scale),
    "activation-scale": ("activation_scale", None, lambda t, c: parse_int(t, minimum=1)),
    "window": ("window", None, _ranged_duration(WINDOW_MIN_S, WINDOW_MAX_S, whole=True)),
    "panic-window-percentage": (
        "panic_window_percentage", "panicWindowPercentage", lambda t, c: parse_float(t, minimum=1, maximum=100)),
    "panic-threshold-percentage": (
        "panic_threshold_percentage", "panicThresholdPercentage",
        lambda t, c: parse_float(t, minimum=PANIC_THRESHOLD_MIN, maximum=PANIC_THRESHOLD_MAX)),
    "scale-to-zero-pod-retention-period": (
        "scale_to_zero_pod_retention_period", None, _ranged_duration(0, RETENTION_MAX_S, whole=False)),
    "scale-down-delay": ("scale_down_delay", None, _ranged_duration(0, SCALE_DOWN_DELAY_MAX_S, whole=True)),
    "target-burst-capacity": ("target_burst_capacity", "targetBurstCapacity", _tbc),
}
_ALIASES = {alias: key for key, (_, alias, _) in _AUTOSCALING.items() if alias}
_UNSUPPORTED = {
    "metric-aggregation-algorithm": "is not supported: the decider averages the window linearly, "
    "like Knative's default",
}

_METRICS_BY_CLASS = {KPA_CLASS: ("concurrency", "rps"), SLLM_CLASS: ("concurrency", "rps")}


def _autoscaling(annotations: Mapping[str, str], base: Path, cfg: AutoscalerConfig, errors: Collector) -> Autoscaling:
    values: dict[str, Any] = {}
    seen: dict[str, str] = {}
    for key, raw in annotations.items():
        if not key.startswith(AUTOSCALING_PREFIX):
            continue
        short = key[len(AUTOSCALING_PREFIX):]
        canonical = _ALIASES.get(short, short)
        path = base + (key,)
        if short in _UNSUPPORTED:
            errors.add(path, _UNSUPPORTED[short])
            continue
        if canonical not in _AUTOSCALING:
            errors.add(path, f"unknown autoscaling annotation (known: {', '.join(sorted(_AUTOSCALING))})")
            continue
        if canonical in seen:
            errors.add(path, f"set twice: also as {show(seen[canonical])}; keep {show(AUTOSCALING_PREFIX + canonical)}")
            continue
        seen[canonical] = key
        attr, _, parse = _AUTOSCALING[canonical]
        try:
            values[attr] = parse(raw, cfg)
        except ValueError as exc:
            errors.add(path, str(exc))
    result = Autoscaling(**values)
    _check_autoscaling(result, base, cfg, errors)
    return result


def _check_autoscaling(a: Autoscaling, base: Path, cfg: AutoscalerConfig, errors: Collector) -> None:
    def at(name: str) -> Path:
        return base + (AUTOSCALING_PREFIX + name,)

    lo = a.min_scale if a.min_scale is not None else cfg.min_scale
    hi = a.max_scale if a.max_scale is not None else cfg.max_scale
    if hi > 0 and lo > hi:
        which = "min-scale" if a.min_scale is not None else "max-scale"
        errors.add(at(which), f"min-scale ({lo}) must be <= max-scale ({hi})")
    if a.activation_scale is not None and hi > 0 and a.activation_scale > hi:
        errors.add(at("activation-scale"), f"must be <= max-scale ({hi}), got {a.activation_scale}")
    if a.panic_window_percentage is not None:
        window = a.window if a.window is not None else cfg.stable_window
        if a.panic_window_percentage / 100.0 * window < 1.0:
            errors.add(at("panic-window-percentage"),
                       f"gives a panic window under 1s with a {window:g}s stable window "
                       f"(smallest: {100.0 / window:g}); panic window would be {panic_window(window, a.panic_window_percentage):g}s")
    klass = a.klass or cfg.pod_autoscaler_class
    if a.metric is not None:
        allowed = _METRICS_BY_CLASS.get(klass)
        if allowed is not None and a.metric not in allowed:
            errors.add(at("metric"), f"must be one of {', '.join(allowed)} for class {klass}, got {show(a.metric)}")
        elif klass == HPA_CLASS and not a.metric:
            errors.add(at("metric"), "cannot be empty")


# --- the document -----------------------------------------------------------------------


def parse_service(doc: Any, *, defaults: AutoscalerConfig | None = None, source: str = "") -> ServiceConfig:
    """Validate a Knative Service document (a dict from YAML/JSON) and return its typed values.

    Raises `ConfigError` listing every problem with its path, for example
    `spec.template.metadata.annotations["autoscaling.knative.dev/min-scale"]: must be an integer >= 0, got "x"`.
    """
    cfg = defaults or AutoscalerConfig()
    check_document(doc, API_VERSION, KIND, "a Knative Service", knative_service_validator(), source)
    errors = Collector()

    meta = doc.get("metadata") or {}
    name = meta.get("name", "")
    if not name:
        errors.add(("metadata", "name"), "required field is missing")
    elif not _DNS1035.match(name) or len(name) > 63:
        errors.add(("metadata", "name"),
                   f"must be a DNS-1035 label (at most 63 lowercase letters, digits, '-', starting with a letter), "
                   f"got {show(name)}")
    namespace = meta.get("namespace") or "default"
    annotations: dict[str, str] = dict(meta.get("annotations") or {})
    spec = doc.get("spec") or {}
    template = spec.get("template") or {}
    tmeta = template.get("metadata") or {}
    tspec = template.get("spec") or {}
    tann: dict[str, str] = dict(tmeta.get("annotations") or {})
    tbase: Path = ("spec", "template", "metadata", "annotations")

    for key in annotations:
        if key.startswith(AUTOSCALING_PREFIX):
            errors.add(("metadata", "annotations", key),
                       "autoscaling annotations take effect only on spec.template.metadata.annotations")
    autoscaling = _autoscaling(tann, tbase, cfg, errors)
    model = _model(annotations, tann, errors)
    klass = autoscaling.klass or cfg.pod_autoscaler_class
    metric = autoscaling.metric or ("cpu" if klass == HPA_CLASS else "concurrency")
    if klass == SLLM_CLASS and model is None and MODEL_ANNOTATION not in annotations and MODEL_ANNOTATION not in tann:
        errors.add(tbase + (MODEL_ANNOTATION,), f"required for services of class {SLLM_CLASS}")

    cc = tspec.get("containerConcurrency", 0)
    if not 0 <= cc <= CONTAINER_CONCURRENCY_MAX_LIMIT:
        errors.add(("spec", "template", "spec", "containerConcurrency"),
                   f"must be in [0, {CONTAINER_CONCURRENCY_MAX_LIMIT}] (0 = unlimited), got {cc}")
    timeout = tspec.get("timeoutSeconds", REVISION_TIMEOUT_SECONDS) or REVISION_TIMEOUT_SECONDS
    if not 0 < timeout <= MAX_REVISION_TIMEOUT_SECONDS:
        errors.add(("spec", "template", "spec", "timeoutSeconds"),
                   f"must be in [1, {MAX_REVISION_TIMEOUT_SECONDS}], got {timeout}")
    response_start = tspec.get("responseStartTimeoutSeconds")
    if response_start is not None and not 0 < response_start <= timeout:
        errors.add(("spec", "template", "spec", "responseStartTimeoutSeconds"),
                   f"must be in [1, timeoutSeconds ({timeout})], got {response_start}")
    containers, serving = _containers(tspec.get("containers") or [], errors)
    errors.raise_if_any(source)
    return ServiceConfig(
        name=name,
        namespace=namespace,
        container=serving,
        containers=containers,
        autoscaling=autoscaling,
        autoscaler_class=klass,
        metric=metric,
        container_concurrency=cc,
        timeout_seconds=timeout,
        hold_timeout_seconds=response_start or tspec.get("timeoutSeconds") or None,
        model=model,
        labels=dict(meta.get("labels") or {}),
        annotations=annotations,
        template_labels=dict(tmeta.get("labels") or {}),
        template_annotations=tann,
        node_selector=dict(tspec.get("nodeSelector") or {}),  # the schema checked it: label -> string
    )


def _model(annotations: Mapping[str, str], tann: Mapping[str, str], errors: Collector) -> ModelURI | None:
    found: dict[Path, str] = {}
    for base, anns in ((("metadata", "annotations"), annotations),
                       (("spec", "template", "metadata", "annotations"), tann)):
        for key, value in anns.items():
            if not key.startswith(SLLM_PREFIX):
                continue
            if key == INTERNAL_PORT_ANNOTATION:
                if internal_port_of(anns) is None:
                    errors.add(base + (key,), f"must be a port number in [1, 65535], got {show(value)}")
                continue
            if key != MODEL_ANNOTATION:
                errors.add(base + (key,), f"unknown annotation (known: {MODEL_ANNOTATION}, {INTERNAL_PORT_ANNOTATION})")
                continue
            found[base + (key,)] = value
    if not found:
        return None
    if len(set(found.values())) > 1:
        path = next(iter(found))
        errors.add(path, "set on both metadata and spec.template.metadata with different values; "
                         "keep it on spec.template.metadata.annotations")
        return None
    path, value = next(reversed(found.items()))
    try:
        return parse_model_uri(value)
    except ValueError as exc:
        errors.add(path, str(exc))
        return None


def _containers(raw: list[dict[str, Any]], errors: Collector) -> tuple[tuple[Container, ...], Container]:
    base: Path = ("spec", "template", "spec", "containers")
    out: list[Container] = []
    with_ports: list[int] = []
    for i, c in enumerate(raw):
        path = base + (i,)
        image = c.get("image", "")
        if not image:
            errors.add(path + ("image",), "required: the container image")
        ports = c.get("ports") or []
        port: int | None = None
        if ports:
            with_ports.append(i)
            if len(ports) > 1:
                errors.add(path + ("ports",), f"at most one port per container, got {len(ports)}")
            p = ports[0].get("containerPort", DEFAULT_PORT)
            if not 0 < p < 65536:
                errors.add(path + ("ports", 0, "containerPort"), f"must be in [1, 65535], got {p}")
            elif p in RESERVED_PORTS:
                errors.add(path + ("ports", 0, "containerPort"),
                           f"port {p} is reserved by Knative (reserved: {', '.join(map(str, sorted(RESERVED_PORTS)))})")
            port = p
        env: list[EnvVar] = []
        for j, e in enumerate(c.get("env") or []):
            if "value" in e and "valueFrom" in e and e["value"]:
                errors.add(path + ("env", j), "set value or valueFrom, not both")
            env.append(EnvVar(e["name"], e.get("value"), e.get("valueFrom")))
        out.append(Container(
            image=image,
            name=c.get("name", ""),
            command=tuple(c.get("command") or ()),
            args=tuple(c.get("args") or ()),
            env=tuple(env),
            resources=_resources(c.get("resources") or {}, path + ("resources",), errors),
            port=port,
        ))
    if not out:
        errors.add(base, "must have at least one container")
        return (), Container(image="")
    if len(out) > 1 and len(with_ports) != 1:
        errors.add(base, f"with several containers exactly one must declare a port (the serving one), got {len(with_ports)}")
    index = with_ports[0] if with_ports else 0
    if out[index].port is None:
        out[index] = dataclasses.replace(out[index], port=DEFAULT_PORT)
    return tuple(out), out[index]


def _resources(raw: Mapping[str, Any], path: Path, errors: Collector) -> Resources:
    parsed: dict[str, dict[str, Decimal]] = {"limits": {}, "requests": {}}
    for kind in ("limits", "requests"):
        for name, q in (raw.get(kind) or {}).items():
            try:
                value = parse_quantity(q)
            except ValueError as exc:
                errors.add(path + (kind, name), str(exc))
                continue
            if value < 0:
                errors.add(path + (kind, name), f"cannot be negative, got {show(q)}")
                continue
            parsed[kind][name] = value
    for name, req in parsed["requests"].items():
        lim = parsed["limits"].get(name)
        if lim is not None and req > lim:
            errors.add(path + ("requests", name), f"must be <= the limit ({lim}), got {req}")
    return Resources(parsed["limits"], parsed["requests"])
