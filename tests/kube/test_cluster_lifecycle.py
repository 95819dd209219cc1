"""The control plane leaves nothing behind: after `down`, and after its owner is SIGKILLed.

These start their own clusters through the by-hand command (`python -m testkit.kube.cluster`),
so they also prove that command works.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from sllm_knative.local.procs import alive
from testkit.kube.cluster import BINARIES, missing_binaries
from testkit.kube.network import sweep_stale
from tests.kube.conftest import until

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(bool(missing_binaries()) and os.environ.get("CI") != "true",
                                reason="run `make kube-bins` first")


def _control_plane_pids(workdir: Path) -> list[int]:
    """Processes running one of our binaries with this cluster's folder on their command line."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info["cmdline"] or []
        if cmd and Path(cmd[0]).name in BINARIES and any(str(workdir) in a for a in cmd):
            found.append(p.info["pid"])
    return found


def _network_objects(owner: int) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show", "type", "bridge"], capture_output=True, text=True).stdout
    return [w for w in (out + links).split() if w.rstrip(":") in (f"sb{owner}",) or w.startswith(f"sllm{owner}n")]


def _up(state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "testkit.kube.cluster", "up", "--dir", str(state)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_up_then_down_leaves_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    r = _up(state)
    assert r.returncode == 0, r.stderr
    assert "kubeconfig:" in r.stdout
    supervisor = int((state / "supervisor.pid").read_text())
    assert len(_control_plane_pids(state)) == 4
    assert _network_objects(supervisor)  # the bridge exists while it is up

    r = subprocess.run([sys.executable, "-m", "testkit.kube.cluster", "down", "--dir", str(state)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert not alive(supervisor)
    assert _control_plane_pids(state) == []
    assert _network_objects(supervisor) == []
    assert not state.exists()


def test_sigkill_of_the_owner_takes_the_control_plane_with_it(tmp_path: Path) -> None:
    state = tmp_path / "state"
    r = _up(state)
    assert r.returncode == 0, r.stderr
    supervisor = int((state / "supervisor.pid").read_text())
    pids = _control_plane_pids(state)
    assert len(pids) == 4

    os.kill(supervisor, signal.SIGKILL)
    # PR_SET_PDEATHSIG: each binary gets SIGKILL when the process that started it dies.
    until(lambda: not any(alive(p) for p in pids), 30, "the control plane to exit after its owner died")
    until(lambda: not alive(supervisor), 10, "the owner to be reaped")
    # What the kernel does not clean up (the namespaces and bridge) is swept by the next run.
    assert _network_objects(supervisor)
    removed = sweep_stale()
    assert f"sb{supervisor}" in removed
    assert _network_objects(supervisor) == []
