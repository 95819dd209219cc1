"""manifests/activator/: the Deployment's pieces agree with the activator's own flags, with Knative's
`activator-service` (whose pods it takes over), and with the node agent's image table
(tests/kube/test_activator_deployment.py runs it on the test node agent, and
tests/kube/test_rbac_activator.py measures its RBAC)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import tomllib
import yaml

from activator.__main__ import parse_args
from activator.kube import contract
from autoscaler.kube.activators import ADMIN_PORT
from autoscaler.kube.internal_token import KEY as TOKEN_KEY
from autoscaler.kube.internal_token import SECRET as TOKEN_SECRET
from sllm_knative.api.auth import TOKEN_ENV
from testkit.kube.nodeagent.spec import IMAGES, image_repository

ROOT = Path(__file__).resolve().parents[2]
ACTIVATOR = ROOT / "manifests" / "activator"

# knative/serving config/core/deployments/activator.yaml (release 1.23): activator-service's
# selector and the targetPorts of its request ports, and what Knative's activator Deployment
# selects and labels its pods with.
SERVICE_SELECTOR = {"app": "activator"}
SERVICE_TARGET_PORTS = {"http": 8012, "http2": 8013}
KNATIVE_SELECTOR = {"app": "activator", "role": "activator"}
KNATIVE_POD_LABELS = {"app": "activator", "role": "activator", "app.kubernetes.io/component": "activator",
                      "app.kubernetes.io/name": "knative-serving", "app.kubernetes.io/version": "devel"}


def docs() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for f in ("rbac.yaml", "deployment.yaml"):
        out |= {d["kind"]: d for d in yaml.safe_load_all((ACTIVATOR / f).read_text()) if d}
    return out


def container() -> dict[str, Any]:
    [c] = docs()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_the_args_are_the_activators_flags_for_knatives_ports_and_our_autoscaler(
        monkeypatch: pytest.MonkeyPatch) -> None:
    c = container()
    env = {e["name"]: e for e in c["env"]}
    # The admin API is on the pod's address, so the activator wants the token, from the Secret the
    # autoscaler makes (autoscaler/kube/internal_token.py).
    assert env[TOKEN_ENV]["valueFrom"]["secretKeyRef"] == {"name": TOKEN_SECRET, "key": TOKEN_KEY}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    monkeypatch.setenv(TOKEN_ENV, "from-the-secret")
    args = parse_args(c["args"])
    assert (args.admin_host, args.admin_port) == ("$(POD_IP)", ADMIN_PORT)  # the kubelet expands $(POD_IP)
    assert args.kube and args.kubeconfig is None  # in-cluster: the pod's service account
    assert args.host == "0.0.0.0"
    assert (args.port, args.h2c_port) == (contract.HTTP1_PORT, contract.H2C_PORT)
    assert args.autoscaler_url == "http://sllm-autoscaler.sllm-knative.svc.cluster.local:8080"
    assert args.knative_autoscaler_url == contract.KNATIVE_AUTOSCALER_URL
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"  # --pod-name's default
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports.pop("admin") == args.admin_port  # not in activator-service: the autoscaler calls each pod
    assert set(ports.values()) == set(SERVICE_TARGET_PORTS.values()) == {args.port, args.h2c_port}
    for probe in ("readinessProbe", "livenessProbe"):  # kubelet probes: 200 from the health check on 8012
        assert c[probe]["httpGet"]["port"] == args.port


def test_activator_service_selects_our_pods_and_no_selector_overlaps_knatives() -> None:
    dep = docs()["Deployment"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert matches(SERVICE_SELECTOR, labels)
    assert matches(dep["spec"]["selector"]["matchLabels"], labels)
    # Knative's activator Deployment does not select our pods, and ours does not select its.
    assert not matches(KNATIVE_SELECTOR, labels)
    assert not matches(dep["spec"]["selector"]["matchLabels"], KNATIVE_POD_LABELS)
    assert dep["spec"]["replicas"] == 2


def test_the_image_the_namespace_and_the_service_account() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    c = container()
    assert c["image"] == f"sllm-knative/activator:{version}"
    assert IMAGES[image_repository(c["image"])].entrypoint == ("python", "-m", "activator")
    d = docs()
    assert {o["metadata"]["namespace"] for o in (d["Deployment"], d["ServiceAccount"])} == {"knative-serving"}
    assert d["Deployment"]["spec"]["template"]["spec"]["serviceAccountName"] == d["ServiceAccount"]["metadata"]["name"]
    assert d["ClusterRoleBinding"]["subjects"] == [
        {"kind": "ServiceAccount", "name": "sllm-activator", "namespace": "knative-serving"}]
    assert d["ClusterRoleBinding"]["roleRef"]["name"] == d["ClusterRole"]["metadata"]["name"]
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
