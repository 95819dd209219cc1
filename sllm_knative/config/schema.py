"""Validate Kubernetes objects against CRD schemas (Knative's, and ours) with jsonschema.

A CRD's `openAPIV3Schema` is a structural OpenAPI v3 schema with Kubernetes extensions. It
becomes a JSON Schema by these rules (what `kubectl apply --validate=strict` enforces):

- an object with `properties` rejects fields it does not list, unless it carries
  `x-kubernetes-preserve-unknown-fields: true` or an `additionalProperties` schema;
- `nullable: true` admits `null`; `x-kubernetes-int-or-string` admits an integer or a string;
- `format: int32` / `int64` bound the integer range; boolean `exclusiveMinimum` /
  `exclusiveMaximum` (OpenAPI v3.0) become JSON Schema's numeric ones;
- the root `metadata` (left open by every CRD, since the API server checks ObjectMeta itself)
  is replaced by a schema of ObjectMeta.

Errors come back as `FieldError`s with paths (`spec.template.spec.containers[0].image`) and
short messages ("unknown field", "must be a string, got 1").
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from functools import cache
from importlib import resources
from typing import Any

import jsonschema
import yaml

from sllm_knative.config.errors import FieldError, Path, show

_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}

_STRING_MAP: dict[str, Any] = {"type": "object", "additionalProperties": {"type": "string"}}

#: Patterns the schemas share; errors for them are explained in words (see _pattern_meaning).
PATTERN_DNS1035 = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
PATTERN_DURATION = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$|^0$"
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"

#: ObjectMeta as a user may write it (server-populated fields are accepted too, so that objects
#: read back from a cluster validate). Names are DNS-1123 subdomains, namespaces DNS-1123 labels;
#: the Knative Service rule (DNS-1035: starts with a letter) is checked by its parser.
OBJECT_META: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": _DNS_SUBDOMAIN, "maxLength": 253},
        "generateName": {"type": "string"},
        "namespace": {"type": "string", "pattern": _DNS_LABEL, "maxLength": 63},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
        "uid": {"type": "string"},
        "resourceVersion": {"type": "string"},
        "generation": {"type": "integer"},
        "creationTimestamp": {"type": ["string", "null"]},
        "deletionTimestamp": {"type": ["string", "null"]},
        "deletionGracePeriodSeconds": {"type": "integer"},
        "managedFields": {"type": "array", "items": {"type": "object"}},
        "selfLink": {"type": "string"},
    },
}


def to_json_schema(openapi: Mapping[str, Any], *, root: bool = True) -> dict[str, Any]:
    """A CRD `openAPIV3Schema` as a strict JSON Schema (rules in the module docstring)."""
    out = _convert(openapi)
    if root:
        out.setdefault("properties", {})["metadata"] = copy.deepcopy(OBJECT_META)
    return out


def _convert(node: Any) -> Any:
    if isinstance(node, list):
        return [_convert(x) for x in node]
    if not isinstance(node, Mapping):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: _convert(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not"):
            out[key] = _convert(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [_convert(x) for x in value]
        elif key.startswith("x-kubernetes-") or key in ("nullable", "default", "example", "externalDocs"):
            continue
        else:
            out[key] = value
    # OpenAPI v3.0 (and Kubernetes) spell exclusive bounds as booleans beside minimum/maximum.
    for bound, flag in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if isinstance(node.get(flag), bool):
            if node[flag] and bound in node:
                out[flag] = out.pop(bound)
            else:
                out.pop(flag, None)
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    fmt = node.get("format")
    if fmt in _INT_RANGES and node.get("type") == "integer":
        lo, hi = _INT_RANGES[fmt]
        out.setdefault("minimum", lo)
        out.setdefault("maximum", hi)
    strict = (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    )
    if strict:
        out["additionalProperties"] = False
    return out


def crd_schema(crd: Mapping[str, Any], version: str) -> dict[str, Any]:
    """The JSON Schema of one served version of a CustomResourceDefinition."""
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return to_json_schema(v["schema"]["openAPIV3Schema"])
    names = ", ".join(v["name"] for v in crd["spec"]["versions"])
    raise KeyError(f"CRD {crd['metadata']['name']} has no version {version!r} (has {names})")


def read_packaged_yaml(relative: str) -> Any:
    """A YAML file shipped in `sllm_knative/schemas/` (e.g. `knative/crds/service.yaml`)."""
    ref = resources.files("sllm_knative.schemas").joinpath(relative)
    return yaml.safe_load(ref.read_text(encoding="utf-8"))


@cache
def knative_service_validator() -> jsonschema.protocols.Validator:
    """Validator for `serving.knative.dev/v1 Service`, built from the shipped Knative CRD."""
    schema = crd_schema(read_packaged_yaml("knative/crds/service.yaml"), "v1")
    return _validator(schema)


def _validator(schema: dict[str, Any]) -> jsonschema.protocols.Validator:
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    cls.check_schema(schema)
    return cls(schema)


def validator_for(schema: dict[str, Any]) -> jsonschema.protocols.Validator:
    """A checked jsonschema validator for an already converted schema."""
    return _validator(schema)


def validate(validator: jsonschema.protocols.Validator, instance: Any) -> list[FieldError]:
    """Every schema violation of `instance`, as FieldErrors sorted by path."""
    errors: list[FieldError] = []
    for err in validator.iter_errors(instance):
        errors.extend(_field_errors(err))
    unique = {(e.path, e.message): e for e in errors}
    return sorted(unique.values(), key=lambda e: (tuple(str(p) for p in e.path), e.message))


_TYPE_NAMES = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "a boolean",
    "object": "a map",
    "array": "a list",
    "null": "null",
}


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a map"
    return type(value).__name__


def _brief(value: Any) -> str:
    if isinstance(value, dict | list):
        return _kind(value)
    return f"{show(value)} ({_kind(value)})"


def _pattern_meaning(pattern: str) -> str:
    if "KMGTPE" in pattern:
        return 'must be a quantity such as "500m", "2" or "16Gi"'
    if pattern == PATTERN_DNS1035:
        return "must be a DNS-1035 label (a-z, 0-9 and '-', starting with a letter)"
    if pattern == PATTERN_DURATION:
        return 'must be a duration such as "30s", "5m" or "1h30m"'
    if pattern == _DNS_LABEL:
        return "must be a lowercase DNS label (a-z, 0-9 and '-', starting and ending alphanumeric)"
    if pattern == _DNS_SUBDOMAIN:
        return "must be a lowercase DNS name (labels of a-z, 0-9 and '-' joined by '.')"
    return f"must match the pattern {pattern}"


def _field_errors(err: jsonschema.ValidationError) -> Iterator[FieldError]:
    path: Path = tuple(err.absolute_path)
    v, s, inst = err.validator, err.schema, err.instance
    if v == "additionalProperties" and isinstance(inst, dict):
        known = set(s.get("properties", {}))
        for extra in sorted(k for k in inst if k not in known):
            yield FieldError(path + (extra,), "unknown field")
    elif v == "required" and isinstance(inst, dict):
        for name in err.validator_value:
            if name not in inst:
                yield FieldError(path + (name,), "required field is missing")
    elif v == "type":
        want = err.validator_value
        wants = [want] if isinstance(want, str) else list(want)
        names = " or ".join(_TYPE_NAMES.get(w, w) for w in wants)
        yield FieldError(path, f"must be {names}, got {_brief(inst)}")
    elif v == "anyOf" and all("type" in sub and len(sub) == 1 for sub in err.validator_value):
        names = " or ".join(_TYPE_NAMES.get(sub["type"], sub["type"]) for sub in err.validator_value)
        yield FieldError(path, f"must be {names}, got {_brief(inst)}")
    elif v == "oneOf" and all(set(sub) == {"required"} for sub in err.validator_value):
        options = [sub["required"][0] for sub in err.validator_value]
        present = [o for o in options if isinstance(inst, dict) and o in inst]
        yield FieldError(path, f"set exactly one of {', '.join(options)} (set: {', '.join(present) or 'none'})")
    elif v == "enum":
        allowed = ", ".join(show(x) for x in err.validator_value)
        yield FieldError(path, f"must be one of {allowed}, got {show(inst)}")
    elif v in ("minimum", "exclusiveMinimum"):
        op = ">=" if v == "minimum" else ">"
        yield FieldError(path, f"must be {op} {err.validator_value}, got {show(inst)}")
    elif v in ("maximum", "exclusiveMaximum"):
        op = "<=" if v == "maximum" else "<"
        yield FieldError(path, f"must be {op} {err.validator_value}, got {show(inst)}")
    elif v == "pattern":
        yield FieldError(path, f"{_pattern_meaning(err.validator_value)}, got {show(inst)}")
    elif v == "maxLength":
        yield FieldError(path, f"must be at most {err.validator_value} characters, got {len(inst)}")
    elif v == "minLength":
        yield FieldError(path, f"must be at least {err.validator_value} characters long")
    elif v == "minItems":
        yield FieldError(path, f"must have at least {err.validator_value} item(s)")
    else:
        yield FieldError(path, err.message)


def check_document(doc: Any, api_version: str, kind: str, what: str, validator: jsonschema.protocols.Validator,
                   source: str = "") -> None:
    """The first steps of every resource parser: a map with the right apiVersion and kind, then
    valid against its schema. Raises ConfigError listing every problem found at that step."""
    from sllm_knative.config.errors import Collector, ConfigError

    if not isinstance(doc, dict):
        raise ConfigError([FieldError((), f"must be a map ({what}), got {show(doc)}")], source)
    errors = Collector()
    if doc.get("apiVersion") != api_version:
        errors.add(("apiVersion",), f"must be {show(api_version)}, got {show(doc.get('apiVersion'))}")
    if doc.get("kind") != kind:
        errors.add(("kind",), f"must be {show(kind)}, got {show(doc.get('kind'))}")
    errors.raise_if_any(source)
    errors.extend(validate(validator, doc))
    errors.raise_if_any(source)
