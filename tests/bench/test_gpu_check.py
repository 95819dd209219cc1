"""The GPU check (bench/gpu/, issue 18): its dry run end to end, and its pure parts.

The dry run is what `make gpu-check DRY=1` runs: the carried wheel bundle is complete and installs
offline for CPython 3.12, and the check runs every phase that needs no GPU (the gates through the
host reader, the GPU tests collected and skipped, the loading benchmark at a tiny size on the CPU,
the other benchmarks' command lines parsed by their own parsers). It needs `make gpu-wheels`
(make test builds it first).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from bench.gpu import check, wheels

REPO = Path(__file__).resolve().parents[2]


def test_dry_run_of_the_prepared_command(tmp_path: Path) -> None:
    bundle = REPO / ".gpu-wheels"
    assert (bundle / wheels.STAMP).is_file(), "no wheel bundle: run `make gpu-wheels` (make test does)"
    out = tmp_path / "out"
    tmp = tmp_path / "tmp"  # its own temporary directory: nothing of ours may be left in it
    tmp.mkdir()
    env = dict(os.environ, OUT=str(out), SITE=str(tmp_path / "site"), TMPDIR=str(tmp))
    r = subprocess.run(["bash", "bench/gpu/run.sh", "--dry"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    report = check.validate(json.loads((out / "gpu-check.json").read_text()))
    assert report.dry and report.stopped_at is None and report.left == []
    assert [p.name for p in report.phases] == [p.name for p in check.PHASES]
    assert all(p.status == "passed" for p in report.phases), [(p.name, p.error) for p in report.phases]
    by = {p.name: p.detail for p in report.phases}
    assert by["tests"]["tests"] > 0 and by["tests"]["skipped"] == by["tests"]["tests"]
    assert by["direct_read"]["16MiB_slots"]["bytes"] == 64 << 20
    assert by["coldstart_8b"]["args"]["shape"] == "llama-8b" and by["migration"]["args"]["numerics"] == "fast"
    loading = report.results["loading"]
    assert loading["device"] == "cpu" and not loading.get("partial")
    assert {r["loader"] for r in loading["rows"] if "gbps" in r} == {"sllm_knative", "safetensors"}
    for name in ("gpu-check.png", "loading.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    log = (out / "log.txt").read_text()
    assert "the wheel bundle is complete" in log and "gpu check: 10 of 10 phases without failure" in log
    assert len(list(out.iterdir())) <= 8  # what the device tool brings back from $OUT
    # (pytest's and torch's caches may stay; bench/loading.py once left its tmpfs mount point)
    assert [p.name for p in tmp.iterdir() if p.name.startswith("sllm")] == []


# -- run_phases: the fail-fast order -----------------------------------------------------------------


def _phase(name: str, gate: bool, outcome: str, least_s: float = 0.0) -> check.Phase:
    def fn(ctx: check.Ctx) -> dict[str, Any]:
        if outcome == "gate":
            raise check.GateFailed(f"{name} broke", f"fix {name}")
        if outcome == "error":
            raise RuntimeError(f"{name} broke")
        return {"ran": name}
    return check.Phase(name, fn, gate, least_s)


@pytest.mark.parametrize("phases, left_s, statuses, stopped, left", [
    pytest.param([("a", True, "ok"), ("b", False, "ok")], 100, ["passed", "passed"], None, [], id="all-pass"),
    pytest.param([("a", True, "gate"), ("b", False, "ok")], 100, ["failed"], "a", ["b"], id="gate-stops"),
    pytest.param([("a", False, "error"), ("b", False, "ok")], 100, ["failed", "passed"], None, [],
                 id="measurement-goes-on"),
    pytest.param([("a", True, "ok"), ("b", False, "ok", 50.0), ("c", False, "ok")], 10,
                 ["passed", "skipped", "skipped"], None, ["b", "c"], id="no-time-left"),
])
def test_run_phases(tmp_path: Path, phases: list[tuple[Any, ...]], left_s: float, statuses: list[str],
                    stopped: str | None, left: list[str]) -> None:
    table = tuple(_phase(*p) for p in phases)
    ctx = check.Ctx(out=tmp_path, work=tmp_path, dry=True, deadline=time.monotonic() + left_s, results={})
    report = check.Report(dry=True, started="now", device={}, phases=[])
    saves = []
    check.run_phases(ctx, report, [p.name for p in table], lambda: saves.append(1), table)
    assert [p.status for p in report.phases] == statuses
    assert report.stopped_at == stopped and report.left == left
    failed = [p for p in report.phases if p.status == "failed"]
    assert all(p.error and "broke" in p.error for p in failed)
    assert all(p.fix == f"fix {p.name}" for p in failed if p.gate)
    assert len(saves) == sum(1 for s in statuses if s != "skipped")


@pytest.mark.parametrize("mutate, message", [
    pytest.param(lambda d: d.pop("phases"), "no 'phases'", id="no-phases"),
    pytest.param(lambda d: d["phases"][0].update(status="fine"), "phases[0].status", id="bad-status"),
    pytest.param(lambda d: d["phases"][0].update(seconds="1"), "phases[0].seconds", id="seconds-string"),
    pytest.param(lambda d: d.update(dry="no"), "report.dry", id="dry-string"),
    pytest.param(lambda d: d["phases"][0].pop("gate"), "phases[0]: no 'gate'", id="no-gate"),
])
def test_validate_rejects(mutate: Any, message: str) -> None:
    doc = {"dry": True, "started": "t", "device": {}, "left": [], "results": {}, "command": "c",
           "phases": [{"name": "environment", "gate": True, "status": "passed", "seconds": 1.0, "detail": {}}]}
    check.validate(doc)
    mutate(doc)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check.validate(doc)


# -- the wheel bundle: what to carry, and whether it is complete ---------------------------------------

V = wheels.Version
R = wheels.Requirement
PURE = frozenset(wheels.parse_wheel_filename("x-1-py3-none-any.whl")[3])
LINUX_311 = frozenset(wheels.parse_wheel_filename("x-1-cp311-cp311-manylinux_2_17_x86_64.whl")[3])


def wheel(name: str, version: str, *requires: str, tags: frozenset[Any] = PURE) -> wheels.Wheel:
    return wheels.Wheel(name, V(version), tuple(R(r) for r in requires), tags, f"{name}-{version}.whl")


@pytest.mark.parametrize("bundle, image, roots, expect", [
    pytest.param([wheel("a", "1.0", "b>=2")], {"b": V("2.1")}, ["a"], [], id="complete"),
    pytest.param([wheel("a", "1.0", "b>=2")], {}, ["a"], ["a-1.0.whl needs b>=2: neither"], id="missing"),
    pytest.param([wheel("a", "1.0")], {}, ["a>=2"], ["the project needs a>=2, the bundle carries a-1.0.whl"],
                 id="bundle-too-old"),
    pytest.param([], {"a": V("1.0")}, ["a>=2"], ["the project needs a>=2, the image has a 1.0"], id="image-too-old"),
    pytest.param([], {"a": None}, ["a>=2"], [], id="image-version-unknown"),
    pytest.param([wheel("a", "1.0", "c; python_version < '3.10'", "d; sys_platform == 'win32'")], {}, ["a"], [],
                 id="markers-not-for-the-target"),
    pytest.param([wheel("a", "1.0", "e; extra == 'fast'")], {}, ["a[fast]"], ["a-1.0.whl needs e: neither"],
                 id="extra-walked"),
    pytest.param([wheel("a", "1.0", tags=LINUX_311)], {}, ["a"], ["a-1.0.whl: not installable"], id="wrong-python"),
    pytest.param([], {}, ["torch>=2"], [], id="never-carried"),
])
def test_bundle_problems(bundle: list[wheels.Wheel], image: dict[str, Any], roots: list[str],
                         expect: list[str]) -> None:
    found = wheels.problems({w.name: w for w in bundle}, image, [R(r) for r in roots], wheels.target_environment(),
                            wheels.target_tags())
    assert len(found) == len(expect), found
    for got, want in zip(found, expect, strict=True):
        assert got.startswith(want), (got, want)


def test_carried_stops_at_the_image() -> None:
    resolved = {"a": (V("1"), (R("numpy"), R("grpcio"))), "numpy": (V("2"), ()),
                "grpcio": (V("1.85"), (R("typing-extensions"),)), "typing-extensions": (V("4"), ()),
                "torch": (V("2.13"), (R("nvidia-cublas"),)), "nvidia-cublas": (V("13"), ())}
    image = {"numpy": None, "grpcio": None, "typing-extensions": None}
    roots = [R("a"), R("torch")]
    got = wheels.carried(resolved, image, roots, wheels.target_environment())
    # numpy: the image's; grpcio: carried anyway (the stubs need a newer one); torch and its CUDA
    # wheels: never (the image's CUDA torch is the one to use).
    assert got == {"a": V("1"), "grpcio": V("1.85")}
    with pytest.raises(ValueError, match="no b"):
        wheels.carried({}, {}, [R("b")], wheels.target_environment())


def test_a_benchmark_past_its_time_is_stopped_with_sigterm_and_cleans_up(tmp_path: Path) -> None:
    """check._subprocess stops a benchmark at its time limit with SIGTERM, which exit_on_sigterm
    turns into SystemExit, so the benchmark's `finally` (stopping its cluster) runs."""
    marker = tmp_path / "cleaned"
    program = ("import pathlib, time\nfrom bench._common import exit_on_sigterm\nexit_on_sigterm()\n"
               f"try:\n    time.sleep(120)\nfinally:\n    pathlib.Path({str(marker)!r}).write_text('down')\n")
    ctx = check.Ctx(out=tmp_path, work=tmp_path, dry=True, deadline=time.monotonic() + 1, results={})
    t0 = time.monotonic()
    run = check._subprocess(ctx, ["-c", program], budget_s=1)
    assert run["rc"] is None and run["timed_out_after_s"] == 10.0  # the least a benchmark is given
    assert marker.read_text() == "down"
    assert time.monotonic() - t0 < 60  # stopped by SIGTERM, not waited out
