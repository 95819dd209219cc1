"""manifests/loader/: the DaemonSet's pieces agree with each other, with the loader's own flags and
with the image (tests/kube/test_loader_daemonset.py runs it on the test node agent, and
tests/kube/test_rbac_loader.py measures its RBAC)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import tomllib
import yaml

from loader_sidecar.config import add_arguments, from_args
from testkit.kube.nodeagent.spec import image_repository

ROOT = Path(__file__).resolve().parents[2]
LOADER = ROOT / "manifests" / "loader"


def docs() -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in yaml.safe_load_all((LOADER / "daemonset.yaml").read_text()) if d} | {
        d["kind"]: d for d in yaml.safe_load_all((LOADER / "rbac.yaml").read_text()) if d}


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = docs()["DaemonSet"]["spec"]["template"]["spec"]
    return spec


def container(name: str) -> dict[str, Any]:
    spec = pod_spec()
    return next(c for c in [*spec.get("initContainers", []), *spec["containers"]] if c["name"] == name)


def expand(arg: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env[m.group(1)], arg)


def test_the_args_are_loader_flags_and_put_the_socket_and_tiers_in_the_hostpath_mounts() -> None:
    c = container("loader")
    env = {e["name"]: e for e in c["env"]}
    assert env["SLLM_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args([expand(a, {"SLLM_NODE_NAME": "gpu-node-1", "POD_IP": "10.1.2.3"}) for a in c["args"]])
    config = from_args(args, env={})  # a real node: no $SLLM_MOUNT_ROOT
    assert (config.kube_node, config.node) == ("gpu-node-1", "gpu-node-1")
    assert config.listen == "unix:///var/run/sllm-knative/loader.sock"
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    host = {v["name"]: v["hostPath"]["path"] for v in pod_spec()["volumes"] if "hostPath" in v}
    for path in ("/var/run/sllm-knative", str(config.dram_dir), str(config.ssd_dir)):
        assert path in mounts and host[mounts[path]] == path, f"{path}: not the same hostPath folder as on the node"
    assert config.metrics_addr == "10.1.2.3:9464"
    probe = c["readinessProbe"]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert (probe["path"], ports[probe["port"]]) == ("/metrics", 9464)
    assert "limits" not in c["resources"] and c["resources"]["requests"]["memory"], (
        "no memory limit: the DRAM tier's tmpfs pages are charged to the loader")


def test_the_image_the_user_and_the_service_account() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for name in ("own-tiers", "loader"):
        assert container(name)["image"] == f"sllm-knative/loader:{version}"
        assert image_repository(container(name)["image"]) == "sllm-knative/loader"
    dockerfile = (ROOT / "images" / "loader" / "Dockerfile").read_text()
    user = re.findall(r"^USER (\d+):(\d+)$", dockerfile, re.M)[-1]
    sc = container("loader")["securityContext"]
    assert (str(sc["runAsUser"]), str(sc["runAsGroup"]), sc["runAsNonRoot"]) == (*user, True)
    # The init container gives the hostPath folders to that user; relative to workingDir /, they
    # are the folders it mounts.
    init = container("own-tiers")
    assert init["command"][:2] == ["chown", ":".join(user)] and init["workingDir"] == "/"
    assert sorted("/" + p for p in init["command"][2:]) == sorted(m["mountPath"] for m in init["volumeMounts"])
    assert sorted(m["mountPath"] for m in init["volumeMounts"]) == sorted(
        m["mountPath"] for m in container("loader")["volumeMounts"])
    assert pod_spec()["serviceAccountName"] == docs()["ServiceAccount"]["metadata"]["name"]
    assert docs()["ClusterRoleBinding"]["subjects"] == [
        {"kind": "ServiceAccount", "name": "sllm-loader", "namespace": "sllm-knative"}]
    assert docs()["DaemonSet"]["metadata"]["namespace"] == "sllm-knative"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod_spec()["tolerations"]
