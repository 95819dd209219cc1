"""Bad input gives a clear error that names what is wrong and where."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sim.__main__ import main
from sim.hardware import get_profile
from sim.policies import get_policy
from sim.workload import read_trace
from sllm_knative.placement import Tier

HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def test_an_unknown_policy_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown policy 'sllm2'; known: sllm, serverlessllm, knative-default"):
        get_policy("sllm2")


def test_the_cli_refuses_an_unknown_policy(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["run", "--policy", "sllm,ray"])
    assert e.value.code == 2
    assert "unknown policy 'ray'" in capsys.readouterr().err


@pytest.mark.parametrize(("row", "what"), [
    ("2023-11-16 18:15:50.9951690,396\n", "expected 3 columns"),
    ("2023-11-16 18:15:50.9951690,many,109\n", "invalid literal"),
    ("not a time,396,109\n", "Invalid isoformat"),
    ("2023-11-16 18:15:50.9951690,0,109\n", "prompt >= 1"),
])
def test_a_malformed_trace_row_names_the_file_and_line(tmp_path: Path, row: str, what: str) -> None:
    path = tmp_path / "trace.csv"
    path.write_text(HEADER + "2023-11-16 18:15:46.6805900,374,44\n" + row)
    with pytest.raises(ValueError, match=r"trace\.csv:3: malformed trace row") as e:
        read_trace(path)
    assert what in str(e.value)


def test_a_trace_without_its_header_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(ValueError, match=r"t\.csv:1: expected the header"):
        read_trace(path)


def test_a_profile_with_a_negative_bandwidth_names_the_file_and_the_field(tmp_path: Path) -> None:
    path = tmp_path / "rack.json"
    path.write_text(json.dumps({"base": "h100x8", "nominal": {"ssd": -12e9}}))
    with pytest.raises(ValueError, match=r"rack\.json: hardware profile 'rack': nominal\[ssd\] must be a finite "
                                         r"number > 0, got -12000000000\.0"):
        get_profile(str(path))


@pytest.mark.parametrize(("body", "what"), [
    ({"nominal": {"tape": 1e9}}, "'tape' is not a valid Tier"),
    ({"gpus": 8}, "unknown field 'gpus'"),
    ({"efficiency": {"remote": 0}}, "efficiency[remote] must be a finite number > 0"),
    ({"tier_noise": {"ssd": -0.1}}, "tier_noise[ssd] must be a finite number >= 0"),
    ({"tier_noise": {"floppy": 0.1}}, "'floppy' is not a valid Tier"),
])
def test_other_bad_profiles(tmp_path: Path, body: dict[str, object], what: str) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(body))
    with pytest.raises(ValueError) as e:
        get_profile(str(path))
    assert what in str(e.value) and "p.json" in str(e.value)


def test_an_unknown_profile_name() -> None:
    with pytest.raises(ValueError, match="unknown hardware profile 'a100'; known: this-machine, h100x8, h200x8"):
        get_profile("a100")


def test_measured_hops_become_the_profile_rates(tmp_path: Path) -> None:
    """A loader sidecar's measured hops (its bandwidth profile) replace the nominal rates."""
    path = tmp_path / "node.json"
    path.write_text(json.dumps({"base": "this-machine", "hops": {"disk_read": 2.05e9, "dram_map": 27.4e9,
                                                                 "remote:http://store": 46e6}}))
    p = get_profile(str(path))
    assert (p.achieved(Tier.SSD), p.achieved(Tier.DRAM), p.achieved(Tier.REMOTE)) == (2.05e9, 27.4e9, 46e6)
    assert p.name == "node"


def test_a_profile_file_gives_a_tiers_own_load_noise(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"base": "this-machine", "load_noise": 0.3, "tier_noise": {"ssd": 0.15}}))
    p = get_profile(str(path))
    assert (p.load_noise, dict(p.tier_noise)) == (0.3, {Tier.SSD: 0.15})
