"""The host-to-device probe (review finding F10): the extension's own read_to_device of a DRAM-tier
file, timed in a subprocess (loader_sidecar.h2d_probe) so that the sidecar holds no CUDA context."""

from __future__ import annotations

import json
import logging
import os
import types
from pathlib import Path

import pytest

from loader_sidecar import profile
from loader_sidecar.profile import (
    H2DProbeError,
    H2DResult,
    measure_host_to_device,
    parse_h2d_result,
    run_h2d_probe,
)

GOOD = {"bytes": 64 << 20, "seconds": 0.005, "device_name": "NVIDIA H100 80GB HBM3"}
_DROP = object()  # a field left out of the line


def _line(**changes: object) -> str:
    doc = {**GOOD, **changes}
    return json.dumps({k: v for k, v in doc.items() if v is not _DROP})



def test_a_good_line_parses_to_a_typed_result() -> None:
    r = parse_h2d_result("a warning torch printed\n" + _line(first_seconds=0.3) + "\n\n")
    assert r == H2DResult(64 << 20, 0.005, "NVIDIA H100 80GB HBM3")
    assert r.rate == pytest.approx((64 << 20) / 0.005)
    assert parse_h2d_result(_line(seconds=1)).seconds == 1.0  # an integer number of seconds is fine


@pytest.mark.parametrize("stdout, why", [
    pytest.param("", "no output", id="empty"),
    pytest.param("\n  \n", "no output", id="blank"),
    pytest.param("Segmentation fault", "not JSON", id="garbage"),
    pytest.param('{"bytes": 1, ', "not JSON", id="truncated"),
    pytest.param("[1, 2]", "not a JSON object", id="a-list"),
    pytest.param(_line(bytes=_DROP), "bytes", id="missing-bytes"),
    pytest.param(_line(seconds=_DROP), "seconds", id="missing-seconds"),
    pytest.param(_line(device_name=_DROP), "device_name", id="missing-device-name"),
    pytest.param(_line(bytes=-4096), "bytes", id="negative-bytes"),
    pytest.param(_line(bytes=0), "bytes", id="zero-bytes"),
    pytest.param(_line(bytes=1.5), "bytes", id="fractional-bytes"),
    pytest.param(_line(bytes=True), "bytes", id="boolean-bytes"),
    pytest.param(_line(bytes="67108864"), "bytes", id="string-bytes"),
    pytest.param(_line(seconds=-0.1), "seconds", id="negative-seconds"),
    pytest.param(_line(seconds=0), "seconds", id="zero-seconds"),
    pytest.param(_line(seconds=float("nan")), "seconds", id="nan-seconds"),
    pytest.param(_line(seconds=float("inf")), "seconds", id="infinite-seconds"),
    pytest.param(_line(seconds="0.1"), "seconds", id="string-seconds"),
    pytest.param(_line(device_name=""), "device_name", id="empty-device-name"),
    pytest.param(_line(device_name=3), "device_name", id="numeric-device-name"),
])
def test_bad_probe_output_is_rejected(stdout: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_h2d_result(stdout)


@pytest.fixture()
def no_gpu() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("torch sees a GPU here: the probe would succeed (test_probe_on_a_gpu covers that)")


def test_the_real_probe_fails_clearly_without_a_gpu(no_gpu: None, tmp_path: Path) -> None:
    f = tmp_path / "scratch"
    f.write_bytes(os.urandom(1 << 20))
    with pytest.raises(H2DProbeError) as info:
        run_h2d_probe(f, 1 << 20, "cuda:0")
    msg = str(info.value)
    assert "loader_sidecar.h2d_probe" in msg and "exited with status 1" in msg
    assert "torch sees no CUDA device" in msg  # the probe's stderr, passed on


def test_a_failed_probe_leaves_no_estimate_and_is_logged(no_gpu: None, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="loader_sidecar.profile"):
        assert measure_host_to_device(tmp_path / "dram", 1 << 20) is None
    failed = [r for r in caplog.records if r.getMessage() == "bandwidth probe failed"]
    assert failed and failed[0].fields["hop"] == "host_to_device"  # type: ignore[attr-defined]
    assert "torch sees no CUDA device" in failed[0].fields["error"]  # type: ignore[attr-defined]
    assert not list((tmp_path / "dram").iterdir())  # the scratch file is gone


def test_the_sidecar_starts_without_a_host_to_device_estimate_when_the_probe_fails(
        no_gpu: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node whose extension claims a GPU that the probe cannot use: the other hops are measured,
    host_to_device stays absent, nothing raises."""
    real = profile._C
    monkeypatch.setattr(profile, "_C", types.SimpleNamespace(
        cuda_compiled=lambda: True, cuda_available=lambda: True, read_to_host=real.read_to_host))
    p = profile.Profile()
    p.measure_start(tmp_path / "ssd", tmp_path / "dram", 1 << 20, 2)
    assert set(p.snapshot()) == {"disk_read", "dram_copy", "dram_map"}


@pytest.mark.gpu
def test_probe_on_a_gpu(tmp_path: Path) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    dram = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path  # the DRAM tier is tmpfs
    d = dram / f"sllm-h2d-test-{os.getpid()}"
    d.mkdir()
    try:
        f = d / "scratch"
        f.write_bytes(os.urandom(64 << 20))
        r = run_h2d_probe(f, 64 << 20, "cuda:0")  # raises with the probe's stderr if it fails
    finally:
        for x in d.iterdir():
            x.unlink()
        d.rmdir()
    assert r.bytes == 64 << 20 and r.device_name
    assert 0 < r.rate < 100e9, f"{r.rate / 1e9:.2f} GB/s from {r.device_name}"
    res = measure_host_to_device(tmp_path / "dram", 16 << 20)
    assert res is not None and 0 < res.rate < 100e9
