"""manifests/: the CRDs are well-formed apiextensions.k8s.io/v1 objects rendered from the code,
kustomize builds them, and every example validates against the schema it claims."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from sllm_knative.config import load_manifest
from sllm_knative.config.crds import CRDS, GROUP, VERSION, render
from sllm_knative.config.schema import crd_schema, knative_service_validator, validate, validator_for

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
EXAMPLES = sorted((MANIFESTS / "examples").glob("*.yaml"))


def _crd_files() -> dict[str, dict[str, Any]]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted((MANIFESTS / "crds").glob("*.yaml"))
            if p.name != "kustomization.yaml"}


@pytest.mark.parametrize("name", sorted(CRDS))
def test_crd_files_are_rendered_from_the_code(name: str) -> None:
    path = MANIFESTS / "crds" / name
    assert path.read_text() == render(CRDS[name]), (
        f"{path} is stale: run `python -m sllm_knative.config crds manifests/crds`")


def _structural_problems(node: dict[str, Any], path: str) -> list[str]:
    """The rules of a structural schema (apiextensions v1) that `kubectl explain` relies on:
    a type everywhere, a description on every field, nothing typed inside oneOf/anyOf/allOf,
    no properties beside an additionalProperties schema."""
    problems = []
    if "type" not in node and not node.get("x-kubernetes-int-or-string") and not node.get(
            "x-kubernetes-preserve-unknown-fields"):
        problems.append(f"{path}: no type")
    if "properties" in node and isinstance(node.get("additionalProperties"), dict):
        problems.append(f"{path}: properties and additionalProperties together")
    for key in ("oneOf", "anyOf", "allOf"):
        for i, branch in enumerate(node.get(key, [])):
            bad = set(branch) & {"type", "description", "default", "properties", "items", "additionalProperties"}
            if bad:
                problems.append(f"{path}.{key}[{i}]: {sorted(bad)} not allowed in a structural schema")
    for name, sub in node.get("properties", {}).items():
        sub_path = f"{path}.{name}"
        if "description" not in sub and sub_path not in (".metadata",):
            problems.append(f"{sub_path}: no description")
        problems += _structural_problems(sub, sub_path)
    if "items" in node:
        problems += _structural_problems(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        problems += _structural_problems(node["additionalProperties"], f"{path}{{}}")
    if node.get("x-kubernetes-list-type") == "map":
        keys = node.get("x-kubernetes-list-map-keys", [])
        required = node["items"].get("required", [])
        if not keys or not set(keys) <= set(required):
            problems.append(f"{path}: list-type map keys {keys} must be required")
    return problems


@pytest.mark.parametrize("name", sorted(CRDS))
def test_crd_shape(name: str) -> None:
    crd = _crd_files()[name]
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1" and crd["kind"] == "CustomResourceDefinition"
    spec = crd["spec"]
    names = spec["names"]
    assert crd["metadata"]["name"] == f"{names['plural']}.{GROUP}" and spec["group"] == GROUP
    assert names["kind"][0].isupper() and names["singular"] == names["kind"].lower()
    assert names["listKind"] == names["kind"] + "List"
    assert spec["scope"] in ("Namespaced", "Cluster")
    versions = spec["versions"]
    assert [v["name"] for v in versions] == [VERSION]
    assert sum(v["storage"] for v in versions) == 1 and all(v["served"] for v in versions)
    for v in versions:
        schema = v["schema"]["openAPIV3Schema"]
        assert schema["type"] == "object" and "spec" in schema["required"]
        assert _structural_problems(schema, "") == []
        for col in v.get("additionalPrinterColumns", []):
            assert col["jsonPath"].startswith(".") and col["type"] in ("string", "integer", "number", "date", "boolean")


def test_kustomization_lists_every_crd_file() -> None:
    listed = yaml.safe_load((MANIFESTS / "crds" / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(_crd_files())
    assert yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())["resources"] == [
        "namespace.yaml", "crds", "autoscaler", "loader", "activator"]


def _kubectl() -> str | None:
    built = Path(__file__).resolve().parents[2] / ".kube-bins" / "kubectl"  # `make kube-bins`
    return str(built) if built.exists() else shutil.which("kubectl")


@pytest.mark.skipif(_kubectl() is None, reason="no kubectl: run `make kube-bins`")
def test_kustomize_builds_the_install() -> None:
    out = subprocess.run([str(_kubectl()), "kustomize", str(MANIFESTS)], check=True, capture_output=True, text=True,
                         timeout=60).stdout
    objects = list(yaml.safe_load_all(out))
    crds = sorted(o["metadata"]["name"] for o in objects if o["kind"] == "CustomResourceDefinition")
    assert crds == sorted(c["metadata"]["name"] for c in CRDS.values())
    others = sorted((o["kind"], o["metadata"]["name"]) for o in objects if o["kind"] != "CustomResourceDefinition")
    assert others == [("ClusterRole", "sllm-knative-activator"), ("ClusterRole", "sllm-knative-autoscaler"),
                      ("ClusterRole", "sllm-knative-loader"),
                      ("ClusterRoleBinding", "sllm-knative-activator"), ("ClusterRoleBinding", "sllm-knative-autoscaler"),
                      ("ClusterRoleBinding", "sllm-knative-loader"),
                      ("DaemonSet", "sllm-loader"), ("Deployment", "sllm-activator"), ("Deployment", "sllm-autoscaler"),
                      ("MutatingWebhookConfiguration", "sllm-knative-placement"),
                      ("Namespace", "sllm-knative"), ("Role", "sllm-knative-autoscaler-activators"),
                      ("Role", "sllm-knative-autoscaler-leader"),
                      ("Role", "sllm-knative-autoscaler-webhook"),
                      ("RoleBinding", "sllm-knative-autoscaler-activators"),
                      ("RoleBinding", "sllm-knative-autoscaler-leader"),
                      ("RoleBinding", "sllm-knative-autoscaler-webhook"),
                      ("Service", "sllm-autoscaler"), ("Service", "sllm-knative-webhook"),
                      ("ServiceAccount", "sllm-activator"), ("ServiceAccount", "sllm-autoscaler"),
                      ("ServiceAccount", "sllm-loader")]
    assert all(o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "sllm-knative" for o in objects)


def _example_documents() -> list[Any]:
    return [pytest.param(doc, id=f"{path.name}#{i + 1}")
            for path in EXAMPLES for i, doc in enumerate(yaml.safe_load_all(path.read_text())) if doc]


@pytest.mark.parametrize("doc", _example_documents())
def test_example_validates_against_its_crd(doc: dict[str, Any]) -> None:
    if doc["apiVersion"] == "serving.knative.dev/v1":
        assert doc["kind"] == "Service"
        validator = knative_service_validator()
    else:
        assert doc["apiVersion"] == f"{GROUP}/{VERSION}"
        by_kind = {c["spec"]["names"]["kind"]: c for c in _crd_files().values()}
        validator = validator_for(crd_schema(by_kind[doc["kind"]], VERSION))
    assert validate(validator, doc) == []


def test_examples_cover_every_kind_and_parse() -> None:
    m = load_manifest(*EXAMPLES)
    assert len(m.services) >= 2 and len(m.policies) >= 2 and len(m.node_caches) >= 1
    assert all(s.managed and s.model is not None for s in m.services)
    # The same schemas reject a broken copy: validation is not vacuous.
    broken = yaml.safe_load((MANIFESTS / "examples" / "scalingpolicy-keepalive.yaml").read_text())
    broken["spec"]["keepAlive"] = "soon"
    broken["spec"]["maxScale"] = "3"
    by_kind = {c["spec"]["names"]["kind"]: c for c in _crd_files().values()}
    errors = validate(validator_for(crd_schema(by_kind["ScalingPolicy"], VERSION)), broken)
    assert [str(e).split(":")[0] for e in errors] == ["spec.keepAlive", "spec.maxScale"]
