"""sllm_knative.mounts: container paths under $SLLM_MOUNT_ROOT, and the service account's client
built from files there (as kubernetes.config.load_incluster_config builds it in a real pod)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sllm_knative.kube.client import KubeConfigError
from sllm_knative.mounts import container_path, mount_root, service_account_client, unix_target


@pytest.mark.parametrize("path, root, want", [
    pytest.param("/var/run/x", "/r/pod/rootfs/c", "/r/pod/rootfs/c/var/run/x", id="absolute-moves"),
    pytest.param("/var/run/x", "/r/", "/r/var/run/x", id="root-with-slash"),
    pytest.param("/var/run/x", "", "/var/run/x", id="no-root"),
    pytest.param("var/run/x", "/r", "var/run/x", id="relative-stays"),
])
def test_container_path(path: str, root: str, want: str) -> None:
    assert container_path(path, root) == Path(want)


def test_mount_root_reads_the_environment() -> None:
    assert mount_root({"SLLM_MOUNT_ROOT": "/r"}) == "/r"
    assert mount_root({}) == ""


def test_the_service_account_client_reads_its_files_under_the_root(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    sa = tmp_path / "var" / "run" / "secrets" / "kubernetes.io" / "serviceaccount"
    sa.mkdir(parents=True)
    (sa / "token").write_text("the-token")
    (sa / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.200.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    cfg = service_account_client(str(tmp_path)).configuration
    assert cfg.host == "https://10.200.0.1:6443"
    assert cfg.ssl_ca_cert == str(sa / "ca.crt")
    assert cfg.api_key["BearerToken"] == "bearer the-token"

    (sa / "token").unlink()  # the files are looked for there, not at the real container path
    with pytest.raises(Exception, match="token"):
        service_account_client(str(tmp_path))


def test_the_service_account_client_needs_a_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(KubeConfigError, match="KUBERNETES_SERVICE_HOST"):
        service_account_client("/nowhere")


@pytest.mark.parametrize("target,with_root,want", [
    pytest.param("unix:///var/run/x/loader.sock", True, "unix://{real}/loader.sock", id="socket-through-real-folder"),
    pytest.param("unix:///var/run/x/loader.sock", False, "unix:///var/run/x/loader.sock", id="no-root-unchanged"),
    pytest.param("10.0.0.1:7070", True, "10.0.0.1:7070", id="tcp-unchanged"),
])
def test_unix_target(tmp_path: Path, target: str, with_root: bool, want: str) -> None:
    real = tmp_path / "node" / "hostpath" / "x"
    real.mkdir(parents=True)
    root = tmp_path / "rootfs"
    (root / "var" / "run").mkdir(parents=True)
    (root / "var" / "run" / "x").symlink_to(real)
    assert unix_target(target, str(root) if with_root else "") == want.format(real=real.resolve())
