"""Tooling as contract: ruff on the tree and mypy on every package (which checks the extension's
.pyi stub against all its callers) run with the test suite, so CI enforces them. The package list
is the Makefile's PACKAGES, so `make lint` and this test check the same thing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean() -> None:
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _packages() -> list[str]:
    for line in (ROOT / "Makefile").read_text().splitlines():
        if line.startswith("PACKAGES :="):
            return line.split(":=", 1)[1].split()
    raise AssertionError("Makefile has no PACKAGES := line")


def test_mypy_is_clean_on_every_package() -> None:
    packages = _packages()
    assert {"sllm_knative", "activator", "autoscaler", "loader_sidecar", "functions", "bench"} <= set(packages)
    r = subprocess.run([sys.executable, "-m", "mypy", *packages], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
