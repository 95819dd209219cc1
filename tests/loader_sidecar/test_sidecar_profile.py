"""Bandwidth profile: real start-up measurements, then a moving average of observed transfers."""

from __future__ import annotations

import pytest

from loader_sidecar.profile import Ewma, Profile, measure_file_map, measure_file_read, rate


@pytest.mark.parametrize("samples, alpha, expected", [
    pytest.param([100.0], 0.3, 100.0, id="first-sample-as-is"),
    pytest.param([100.0, 200.0], 0.5, 150.0, id="half"),
    pytest.param([100.0, 200.0, 200.0], 0.5, 175.0, id="three"),
    pytest.param([100.0, 0.0], 0.3, 70.0, id="drop"),
])
def test_ewma(samples, alpha, expected):
    e = Ewma(alpha)
    for s in samples:
        e.update(s)
    assert e.value == pytest.approx(expected) and e.samples == len(samples)


@pytest.mark.parametrize("nbytes, seconds, expected", [
    pytest.param(2 << 20, 2.0, 1 << 20, id="normal"),
    pytest.param(100, 1.0, None, id="too-small"),
    pytest.param(2 << 20, 0.0, None, id="zero-time"),
])
def test_rate(nbytes, seconds, expected):
    assert rate(nbytes, seconds) == expected


def test_observe_updates_hop_average():
    p = Profile(alpha=0.5)
    assert p.observe("remote:x", 10, 1.0) is None  # ignored: too small to mean anything
    p.observe("remote:x", 4 << 20, 1.0)
    p.observe("remote:x", 8 << 20, 1.0)
    assert p.get("remote:x") == pytest.approx(6 << 20)
    assert p.snapshot()["remote:x"][1] == 2


def test_mapping_probe_maps_without_copying(tmp_path):
    n, seconds = measure_file_map(tmp_path, 8 << 20)
    assert n == 8 << 20 and seconds > 0
    assert not list(tmp_path.iterdir())  # the scratch file is gone


def test_start_measurements_are_real(tmp_path):
    n, seconds = measure_file_read(tmp_path, 1 << 20, 2, direct=True)
    assert n == 1 << 20 and seconds > 0
    assert not list(tmp_path.iterdir())  # the scratch file is gone
    p = Profile()
    p.measure_start(tmp_path / "ssd", tmp_path / "dram", 1 << 20, 2)
    snap = p.snapshot()
    assert set(snap) >= {"disk_read", "dram_copy", "dram_map"}
    assert all(v > 0 for v, _ in snap.values())
    # Two runs give two different numbers: measured, not a constant.
    again = Profile()
    again.measure_start(tmp_path / "ssd", tmp_path / "dram", 1 << 20, 2)
    assert again.snapshot()["disk_read"][0] != snap["disk_read"][0]
