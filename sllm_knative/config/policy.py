"""`serving.sllm-knative.io/v1alpha1 ScalingPolicy`: ServerlessLLM scaling for Knative Services.

A policy lives in a namespace and applies to the Services of that namespace it targets, by
name or by label selector. Where a field is set it overrides the Service's annotation of the
same meaning (policy > annotation > config-autoscaler default). When several policies apply
to one Service, one naming it beats one selecting it; among equals the policy whose name
sorts first wins (`matching_policies` lists them all, so callers can report the overlap).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import jsonschema

from sllm_knative.config.crds import API_VERSION, SCALING_POLICY_CRD, VERSION
from sllm_knative.config.errors import Collector, Path, show
from sllm_knative.config.schema import check_document, crd_schema, validator_for
from sllm_knative.config.service import ServiceConfig
from sllm_knative.config.values import parse_duration

KIND = "ScalingPolicy"

_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


@dataclass(frozen=True)
class LabelRequirement:
    key: str
    operator: str
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "In":
            return labels.get(self.key) in self.values
        if self.operator == "NotIn":
            return labels.get(self.key) not in self.values
        if self.operator == "Exists":
            return self.key in labels
        return self.key not in labels  # DoesNotExist


@dataclass(frozen=True)
class LabelSelector:
    match_labels: Mapping[str, str] = field(default_factory=dict)
    match_expressions: tuple[LabelRequirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Kubernetes semantics: every label and every requirement must hold; empty matches all."""
        return all(labels.get(k) == v for k, v in self.match_labels.items()) and all(
            r.matches(labels) for r in self.match_expressions
        )


@dataclass(frozen=True)
class ScalingPolicy:
    """A parsed ScalingPolicy. Exactly one of `service_name` and `selector` is set. Unset
    knobs are None (the Service's annotations and the cluster defaults apply)."""

    name: str
    namespace: str
    service_name: str | None = None
    selector: LabelSelector | None = None
    keep_alive: float | None = None
    min_scale: int | None = None
    max_scale: int | None = None
    target_concurrency: float | None = None
    priority: int = 0
    migration: bool = True
    min_residency: float | None = None
    fair_share_after: float | None = None

    def applies_to(self, service: ServiceConfig) -> bool:
        if service.namespace != self.namespace:
            return False
        if self.service_name is not None:
            # On Kubernetes the autoscaler's services are Revisions (`chat-00001`); each carries
            # the name of the Knative Service it belongs to, which is what a policy names.
            return self.service_name in (service.name, service.labels.get(KNATIVE_SERVICE_LABEL))
        return self.selector is not None and self.selector.matches(service.labels)


KNATIVE_SERVICE_LABEL = "serving.knative.dev/service"


@cache
def _validator() -> jsonschema.protocols.Validator:
    return validator_for(crd_schema(SCALING_POLICY_CRD, VERSION))


def _label_key_problem(key: str) -> str | None:
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or not _DNS_SUBDOMAIN.match(prefix)):
        return f"label key prefix must be a DNS subdomain, got {show(key)}"
    if not _LABEL_NAME.match(name):
        return f"must be a label key (up to 63 of A-Z, a-z, 0-9, '-', '_', '.', alphanumeric at both ends), got {show(key)}"
    return None


def _label_value_problem(value: str) -> str | None:
    if value and not _LABEL_NAME.match(value):
        return f"must be a label value (up to 63 of A-Z, a-z, 0-9, '-', '_', '.'), got {show(value)}"
    return None


def _selector(raw: Mapping[str, Any], base: Path, errors: Collector) -> LabelSelector:
    labels: dict[str, str] = dict(raw.get("matchLabels") or {})
    for k, v in labels.items():
        problem = _label_key_problem(k)
        if problem:
            errors.add(base + ("matchLabels", k), problem)
        problem = _label_value_problem(v)
        if problem:
            errors.add(base + ("matchLabels", k), problem)
    reqs: list[LabelRequirement] = []
    for i, r in enumerate(raw.get("matchExpressions") or []):
        path = base + ("matchExpressions", i)
        values = tuple(r.get("values") or ())
        problem = _label_key_problem(r["key"])
        if problem:
            errors.add(path + ("key",), problem)
        if r["operator"] in ("In", "NotIn") and not values:
            errors.add(path + ("values",), f"must be non-empty for operator {r['operator']}")
        if r["operator"] in ("Exists", "DoesNotExist") and values:
            errors.add(path + ("values",), f"must be empty for operator {r['operator']}")
        reqs.append(LabelRequirement(r["key"], r["operator"], values))
    return LabelSelector(labels, tuple(reqs))


def parse_scaling_policy(doc: Any, *, source: str = "") -> ScalingPolicy:
    """Validate a ScalingPolicy document against the CRD schema and the rules the schema cannot
    express (durations, min <= max, selector operators); raise `ConfigError` with every problem."""
    check_document(doc, API_VERSION, KIND, "a ScalingPolicy", _validator(), source)
    errors = Collector()

    meta = doc.get("metadata") or {}
    if not meta.get("name"):
        errors.add(("metadata", "name"), "required field is missing")
    spec = doc["spec"]
    target = spec["target"]
    selector = _selector(target["selector"], ("spec", "target", "selector"), errors) if "selector" in target else None
    durations: dict[str, float | None] = {}
    for name in ("keepAlive", "minResidency", "fairShareAfter"):
        durations[name] = None
        if name in spec:
            try:
                durations[name] = parse_duration(spec[name])
            except ValueError as exc:
                errors.add(("spec", name), str(exc))
    lo, hi = spec.get("minScale"), spec.get("maxScale")
    if lo is not None and hi and lo > hi:
        errors.add(("spec", "minScale"), f"must be <= maxScale ({hi}), got {lo}")
    errors.raise_if_any(source)
    return ScalingPolicy(
        name=meta["name"],
        namespace=meta.get("namespace") or "default",
        service_name=target.get("serviceName"),
        selector=selector,
        keep_alive=durations["keepAlive"],
        min_scale=lo,
        max_scale=hi,
        target_concurrency=spec.get("targetConcurrency"),
        priority=spec.get("priority", 0),
        migration=spec.get("migration", True),
        min_residency=durations["minResidency"],
        fair_share_after=durations["fairShareAfter"],
    )


def matching_policies(service: ServiceConfig, policies: Sequence[ScalingPolicy]) -> tuple[ScalingPolicy, ...]:
    """The policies that apply to `service`, the effective one first (by name beats by selector,
    then policy name order)."""
    applying = [p for p in policies if p.applies_to(service)]
    return tuple(sorted(applying, key=lambda p: (p.service_name is None, p.name)))


def policy_for(service: ServiceConfig, policies: Sequence[ScalingPolicy]) -> ScalingPolicy | None:
    """The effective policy of `service`, or None when no policy applies."""
    found = matching_policies(service, policies)
    return found[0] if found else None
