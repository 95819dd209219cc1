"""Load YAML files of Kubernetes objects (what `kubectl apply -f` takes) into typed values.

One file may hold several documents (`---`). Supported: Knative `Service`, `ScalingPolicy`,
`NodeCache` and the `config-autoscaler` ConfigMap (whose settings then apply to the Services
of the same file). YAML is parsed safely and duplicate keys are errors, as in kubectl's
strict mode. All documents are checked; every problem is reported, prefixed with its
`file#document`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sllm_knative.config import crds
from sllm_knative.config.autoscaler import AutoscalerConfig, parse_autoscaler_config
from sllm_knative.config.errors import ConfigError, FieldError, combine, show
from sllm_knative.config.nodecache import NodeCache, parse_node_cache
from sllm_knative.config.policy import ScalingPolicy, parse_scaling_policy
from sllm_knative.config.service import ServiceConfig, parse_service

CONFIG_AUTOSCALER = "config-autoscaler"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of keeping the last one."""


def _mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    out: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in out:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {show(key)} (line {mark.line + 1}, column {mark.column + 1})", mark)
        out[key] = loader.construct_object(value_node, deep=deep)
    return out


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load_yaml(text: str, source: str = "") -> list[Any]:
    """The non-empty documents of a YAML stream; syntax errors and duplicate keys raise ConfigError."""
    try:
        docs = list(yaml.load_all(text, Loader=_StrictLoader))  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([FieldError((), f"invalid YAML: {where}{problem}")], source) from exc
    return [d for d in docs if d is not None]


@dataclass(frozen=True)
class Manifest:
    """The typed objects of one or more YAML files."""

    services: tuple[ServiceConfig, ...] = ()
    policies: tuple[ScalingPolicy, ...] = ()
    node_caches: tuple[NodeCache, ...] = ()
    autoscaler: AutoscalerConfig | None = None


def _kind(doc: Any) -> tuple[str, str]:
    if not isinstance(doc, dict):
        return "", ""
    return str(doc.get("apiVersion", "")), str(doc.get("kind", ""))


def parse_manifest(text: str, *, source: str = "", defaults: AutoscalerConfig | None = None) -> Manifest:
    """Parse every document of `text`; raise one ConfigError listing every problem."""
    docs = load_yaml(text, source)
    name = source or "<input>"
    where = [f"{name}#{i + 1}" if len(docs) > 1 else name for i in range(len(docs))]
    failures: list[ConfigError] = []
    autoscaler: AutoscalerConfig | None = None
    for doc, src in zip(docs, where, strict=True):
        if _kind(doc) == ("v1", "ConfigMap") and (doc.get("metadata") or {}).get("name") == CONFIG_AUTOSCALER:
            try:
                autoscaler = parse_autoscaler_config(doc.get("data"), source=src)
            except ConfigError as exc:
                failures.append(exc)
    cfg = autoscaler or defaults or AutoscalerConfig()
    services: list[ServiceConfig] = []
    policies: list[ScalingPolicy] = []
    caches: list[NodeCache] = []
    for doc, src in zip(docs, where, strict=True):
        api, kind = _kind(doc)
        try:
            if (api, kind) == ("serving.knative.dev/v1", "Service"):
                services.append(parse_service(doc, defaults=cfg, source=src))
            elif (api, kind) == (crds.API_VERSION, "ScalingPolicy"):
                policies.append(parse_scaling_policy(doc, source=src))
            elif (api, kind) == (crds.API_VERSION, "NodeCache"):
                caches.append(parse_node_cache(doc, source=src))
            elif (api, kind) == ("v1", "ConfigMap") and (doc.get("metadata") or {}).get("name") == CONFIG_AUTOSCALER:
                continue
            else:
                raise ConfigError([FieldError(("kind",), (
                    f"unsupported object {show(api)} {show(kind)}: expected a serving.knative.dev/v1 Service, "
                    f"a {crds.API_VERSION} ScalingPolicy or NodeCache, or the {CONFIG_AUTOSCALER} ConfigMap"))], src)
        except ConfigError as exc:
            failures.append(exc)
    if failures:
        raise combine(failures)
    _check_unique(services, policies, caches, where)
    return Manifest(tuple(services), tuple(policies), tuple(caches), autoscaler)


def _check_unique(services: list[ServiceConfig], policies: list[ScalingPolicy], caches: list[NodeCache],
                  where: list[str]) -> None:
    seen: dict[tuple[str, str], int] = {}
    keys = [("Service", s.key) for s in services] + [("ScalingPolicy", f"{p.namespace}/{p.name}") for p in policies]
    keys += [("NodeCache", c.node) for c in caches]
    for kind, key in keys:
        seen[(kind, key)] = seen.get((kind, key), 0) + 1
    dupes = [f"{kind} {key}" for (kind, key), n in seen.items() if n > 1]
    if dupes:
        raise ConfigError([FieldError(("metadata", "name"), f"defined more than once: {', '.join(dupes)}")],
                          where[0] if where else "")


def load_manifest(*paths: str | Path, defaults: AutoscalerConfig | None = None) -> Manifest:
    """Parse YAML files (as `kubectl apply -f a.yaml -f b.yaml`) into one Manifest; a
    config-autoscaler ConfigMap applies to the Services of its own file."""
    parts: list[Manifest] = []
    failures: list[ConfigError] = []
    for p in paths:
        try:
            parts.append(parse_manifest(Path(p).read_text(encoding="utf-8"), source=str(p), defaults=defaults))
        except ConfigError as exc:
            failures.append(exc)
    if failures:
        raise combine(failures)
    merged = Manifest(
        tuple(s for m in parts for s in m.services),
        tuple(p for m in parts for p in m.policies),
        tuple(c for m in parts for c in m.node_caches),
        next((m.autoscaler for m in parts if m.autoscaler is not None), None),
    )
    _check_unique(list(merged.services), list(merged.policies), list(merged.node_caches),
                  [str(p) for p in paths])
    return merged
