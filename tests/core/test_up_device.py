"""`sllm-knative up --device`: parsing, validation, the --detach argv, and the refusal of a GPU
device where none can be used; and how a loader sidecar counts the machine's GPUs."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from loader_sidecar import inventory
from loader_sidecar.leases import parse_device as lease_device
from sllm_knative.commands import cluster as cmd
from sllm_knative.local.cluster import UpOptions, check_device_usable, parse_device


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    cmd.register(p.add_subparsers())
    return p.parse_args(["up", *argv])


@pytest.mark.parametrize("argv, device, error", [
    pytest.param((), "cpu", None, id="default-cpu"),
    pytest.param(("--device", "cpu"), "cpu", None, id="cpu"),
    pytest.param(("--device", "cuda"), "cuda", None, id="cuda"),
    pytest.param(("--device", "cuda:0"), "cuda:0", None, id="cuda-0"),
    pytest.param(("--device", "cuda:7"), "cuda:7", None, id="cuda-7"),
    pytest.param(("--device", "tpu"), None, "--device = 'tpu', must be cpu, cuda or cuda:N", id="tpu"),
    pytest.param(("--device", "cuda:"), None, "--device = 'cuda:'", id="no-index"),
    pytest.param(("--device", "cuda:x"), None, "--device = 'cuda:x'", id="bad-index"),
    pytest.param(("--device", "cpu:0"), None, "--device = 'cpu:0'", id="cpu-index"),
    pytest.param(("--device", "CUDA"), None, "--device = 'CUDA'", id="upper-case"),
    pytest.param(("--device", ""), None, "--device = ''", id="empty"),
])
def test_up_device(tmp_path: Path, argv: tuple[str, ...], device: str | None, error: str | None) -> None:
    args = parse("--state-dir", str(tmp_path), *argv)
    if error is not None:
        with pytest.raises(ValueError, match="^" + re.escape(error)):
            cmd.up_options(args)
        return
    assert cmd.up_options(args).device == device
    # --detach starts `up` again from _argv_of: the device survives the round trip
    again = parse(*cmd._argv_of(args))
    assert again.device == device and cmd.up_options(again) == cmd.up_options(args)


@pytest.mark.parametrize("text, ok", [("cpu", True), ("cuda", True), ("cuda:12", True), ("gpu", False),
                                      ("cuda:1234", False), (" cpu", False)])
def test_parse_device(tmp_path: Path, text: str, ok: bool) -> None:
    if ok:
        assert parse_device(text) == text and UpOptions(state_dir=tmp_path, device=text).device == text
    else:
        with pytest.raises(ValueError, match="must be cpu, cuda or cuda:N"):
            UpOptions(state_dir=tmp_path, device=text)


def test_cpu_is_always_usable() -> None:
    check_device_usable("cpu")  # imports nothing, refuses nothing


def test_cuda_refused_without_a_gpu() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    for device in ("cuda", "cuda:0"):
        with pytest.raises(RuntimeError, match=rf"^--device {device}: device .*: torch sees no CUDA device"):
            check_device_usable(device)


def _fake_gpus(root: Path, models: list[str]) -> Path:
    for i, model in enumerate(models):
        d = root / f"0000:{i + 1:02x}:00.0"
        d.mkdir(parents=True)
        (d / "information").write_text(f"Model: \t\t {model}\nIRQ:   42\n")
    return root


@pytest.mark.parametrize("models", [[], ["NVIDIA H100 80GB HBM3"], ["NVIDIA H100 80GB HBM3"] * 2])
def test_sidecar_counts_the_drivers_gpus(tmp_path: Path, models: list[str]) -> None:
    """Without nvidia-ml-py a sidecar counts the GPUs the driver lists; every local node's sidecar
    sees the same machine, so two nodes on one GPU each grant a lease on cuda:0."""
    devs = inventory.proc_gpus(_fake_gpus(tmp_path / "gpus", models), dev=tmp_path / "no-dev")
    assert [(d.kind, d.index, d.name) for d in devs] == [("gpu", i, m) for i, m in enumerate(models)]
    gpus = inventory.gpu_count(devs)
    assert gpus == len(models)
    if gpus:
        for _node in ("node-1", "node-2"):
            assert lease_device("cuda", gpus) == "cuda:0"


@pytest.mark.parametrize("files, gpus", [
    pytest.param([], 0, id="none"),
    pytest.param(["nvidia0", "nvidiactl", "nvidia-uvm", "nvidia-modeset"], 1, id="one"),
    pytest.param(["nvidia0", "nvidia1", "nvidiactl", "null"], 2, id="two"),
])
def test_sidecar_counts_device_files_without_proc(tmp_path: Path, files: list[str], gpus: int) -> None:
    dev = tmp_path / "dev"
    dev.mkdir()
    for f in files:
        (dev / f).touch()
    assert inventory.gpu_count(inventory.proc_gpus(tmp_path / "absent", dev=dev)) == gpus


def test_sidecar_without_a_driver(tmp_path: Path) -> None:
    assert inventory.proc_gpus(tmp_path / "absent", dev=tmp_path / "absent") == []
