"""Configuration: defaults -> parse -> normalise -> validate, with messages naming the flag."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from loader_sidecar.config import add_arguments, from_args, parse_size
from sllm_knative.loader.errors import BadRequest


@pytest.mark.parametrize("text, expected", [
    pytest.param("1048576", 1 << 20, id="plain-bytes"),
    pytest.param("512MiB", 512 << 20, id="mib"),
    pytest.param("2GiB", 2 << 30, id="gib"),
    pytest.param("10GB", 10 * 10**9, id="gb-decimal"),
    pytest.param("1.5G", int(1.5e9), id="fraction"),
    pytest.param("64k", 64_000, id="lowercase-k"),
    pytest.param("4 KiB", 4096, id="space"),
])
def test_parse_size(text, expected):
    assert parse_size(text, "x") == expected


@pytest.mark.parametrize("text", [pytest.param("", id="empty"), pytest.param("-1", id="negative"),
                                  pytest.param("12XB", id="unit"), pytest.param("MiB", id="no-number")])
def test_parse_size_rejects(text):
    with pytest.raises(BadRequest, match=r"ssd-bytes = .*expected a byte count"):
        parse_size(text, "ssd-bytes")


def _parse(*argv: str, env: dict | None = None):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return from_args(p.parse_args(list(argv)), env=env or {})


def test_defaults_are_local_and_per_node(tmp_path):
    c = _parse("--store", "file:///models", "--node", "n1", env={"XDG_CACHE_HOME": str(tmp_path)})
    assert c.listen == "unix:///tmp/sllm-knative/n1/loader.sock"
    assert c.dram_dir == Path("/dev/shm/sllm-knative/n1")
    assert c.ssd_dir == tmp_path / "sllm-knative" / "n1" / "ssd"
    assert c.ssd_bytes > 0 and c.dram_bytes > 0
    assert (c.connections, c.chunk_bytes, c.retries) == (4, 16 << 20, 5)
    assert c.hf_endpoint == "https://huggingface.co" and c.hf_token is None


def test_environment_supplies_hf_and_s3_settings():
    c = _parse("--store", "hf://", env={"HF_ENDPOINT": "http://127.0.0.1:9/hf/", "HF_TOKEN": "hf_secret",
                                        "AWS_ENDPOINT_URL": "http://127.0.0.1:5000"})
    assert (c.hf_endpoint, c.hf_token, c.s3_endpoint) == ("http://127.0.0.1:9/hf", "hf_secret",
                                                          "http://127.0.0.1:5000")
    assert "hf_secret" not in repr(c)  # the token never shows in logs


@pytest.mark.parametrize("argv, env, want", [
    pytest.param([], {}, (None, None, 30.0, None), id="off-by-default"),
    pytest.param(["--kube-node", "gpu-1.example", "--kubeconfig", __file__, "--kube-resync", "5"], {},
                 ("gpu-1.example", __file__, 5.0, "gpu-1.example"), id="flags"),
    pytest.param([], {"SLLM_NODE_NAME": "gpu-2"}, ("gpu-2", None, 30.0, "gpu-2"), id="downward-api-env"),
    pytest.param(["--node", "local"], {"SLLM_NODE_NAME": "gpu-2"}, ("gpu-2", None, 30.0, "local"),
                 id="node-flag-wins-for-paths"),
])
def test_nodecache_publishing_flags(argv, env, want):
    c = _parse("--store", "file:///m", *argv, env=env)
    assert (c.kube_node, c.kubeconfig, c.kube_resync_s) == want[:3]
    if want[3] is not None:
        assert c.node == want[3]


@pytest.mark.parametrize("argv, message", [
    pytest.param([], "at least one --store", id="no-store"),
    pytest.param(["--store", "ftp://x"], "scheme", id="bad-store"),
    pytest.param(["--connections", "0"], "connections = 0, must be in", id="connections"),
    pytest.param(["--chunk-bytes", "1000"], "chunk-bytes = 1000, must be a positive multiple of 4096", id="chunk"),
    pytest.param(["--timeout", "0"], "timeout = 0.0, must be greater than 0", id="timeout"),
    pytest.param(["--node", "a/b"], "node = 'a/b'", id="node"),
    pytest.param(["--listen", "unix://rel.sock"], "absolute path", id="listen-relative-unix"),
    pytest.param(["--listen", "nohost"], "expected host:port", id="listen-no-port"),
    pytest.param(["--metrics", "9100"], "expected host:port", id="metrics"),
    pytest.param(["--dram-bytes", "0"], "dram-bytes = 0, must be positive", id="dram-zero"),
    pytest.param(["--kube-node", "Node_1"], "kube-node = 'Node_1', must be a Kubernetes Node name", id="kube-node"),
    pytest.param(["--kube-node", "n1", "--kubeconfig", "/nonexistent/kubeconfig"],
                 "kubeconfig = '/nonexistent/kubeconfig', no such file", id="kubeconfig-missing"),
    pytest.param(["--kube-node", "n1", "--kube-resync", "0.5"], "kube-resync = 0.5, must be at least 1",
                 id="kube-resync"),
])
def test_invalid_flags_are_rejected(argv, message):
    store = [] if any(a == "--store" for a in argv) or argv == [] else ["--store", "file:///m"]
    with pytest.raises(BadRequest, match=message):
        _parse(*store, *argv, "--ssd-bytes", "1GiB", *([] if "--dram-bytes" in argv else ["--dram-bytes", "1GiB"]))


def test_under_a_mount_root_the_container_paths_are_found_there(tmp_path):
    """$SLLM_MOUNT_ROOT (the test node agent: no mount namespace, a symlink at each mountPath):
    the socket, the tiers and the kubeconfig move under it; the socket through its folder's real
    path, which is short enough for a socket (107 bytes) where the mount folder is not."""
    root = tmp_path / "pods" / ("p" * 60) / "rootfs" / "loader"
    volume = tmp_path / "hostpath" / "run"
    volume.mkdir(parents=True)
    (root / "var" / "run").mkdir(parents=True)
    (root / "var" / "run" / "sllm-knative").symlink_to(volume)
    kubeconfig = root / "etc" / "kube" / "config"
    kubeconfig.parent.mkdir(parents=True)
    kubeconfig.write_text("apiVersion: v1\n")
    c = _parse("--store", "hf://", "--kube-node", "n1", "--listen", "unix:///var/run/sllm-knative/loader.sock",
               "--ssd-dir", "/var/lib/sllm-knative/ssd", "--dram-dir", "/dev/shm/sllm-knative",
               "--kubeconfig", "/etc/kube/config", "--ssd-bytes", "1GiB", env={"SLLM_MOUNT_ROOT": str(root)})
    assert c.listen == f"unix://{volume.resolve()}/loader.sock"
    assert c.ssd_dir == (root / "var" / "lib" / "sllm-knative" / "ssd").resolve()
    assert c.dram_dir == (root / "dev" / "shm" / "sllm-knative").resolve()
    assert c.kubeconfig == str(kubeconfig)
    assert c.mount_root == str(root)
    # A TCP listener and store URIs are not paths in the container.
    c = _parse("--store", "file:///models", "--listen", "127.0.0.1:7070", "--ssd-dir", "rel/ssd",
               "--ssd-bytes", "1GiB", env={"SLLM_MOUNT_ROOT": str(root)})
    assert (c.listen, [s.uri for s in c.stores]) == ("127.0.0.1:7070", ["file:///models"])
    assert c.ssd_dir == Path("rel/ssd").resolve()  # relative: to the working directory, as without a root


def test_without_a_mount_root_paths_are_taken_as_given():
    c = _parse("--store", "hf://", "--listen", "unix:///var/run/sllm-knative/loader.sock",
               "--dram-dir", "/dev/shm/sllm-knative", "--ssd-dir", "/var/lib/sllm-knative/ssd", "--ssd-bytes", "1GiB")
    assert (c.listen, c.dram_dir, c.ssd_dir, c.mount_root) == (
        "unix:///var/run/sllm-knative/loader.sock", Path("/dev/shm/sllm-knative"), Path("/var/lib/sllm-knative/ssd"), "")
