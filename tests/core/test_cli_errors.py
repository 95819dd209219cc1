"""Every CLI error is one line that says what went wrong and where, never a traceback: each
subcommand with no cluster, with a cluster that does not answer, and with bad arguments, run as
the user runs it (a child process); and `describe`, the one function that words them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from sllm_knative.cli import describe
from sllm_knative.ports import free_port


@pytest.mark.parametrize(("exc", "want"), [
    pytest.param(FileNotFoundError(2, "no local cluster here", "/s/cluster.json"), "no local cluster here: /s/cluster.json",
                 id="os-error-with-file"),
    pytest.param(PermissionError(13, "Permission denied"), "Permission denied", id="os-error"),
    pytest.param(httpx.ConnectError("All connection attempts failed",
                                    request=httpx.Request("GET", "http://127.0.0.1:9/v1/services")),
                 "cannot reach GET http://127.0.0.1:9/v1/services: All connection attempts failed "
                 "(is the local cluster running?)", id="unreachable"),
    pytest.param(httpx.ReadTimeout(""), "cannot reach: ReadTimeout (is the local cluster running?)",
                 id="no-request"),
    pytest.param(RuntimeError("loader node-1 exited with code 2: bad store (log x)\nlast log lines:\n..."),
                 "loader node-1 exited with code 2: bad store (log x)", id="first-line-only"),
    pytest.param(ValueError("--nodes = 0, must be between 1 and 64"), "--nodes = 0, must be between 1 and 64",
                 id="value-error"),
    pytest.param(KeyError("services"), "KeyError: 'services'", id="other-named-by-type"),
    pytest.param(RuntimeError(), "RuntimeError", id="empty"),
])
def test_describe(exc: BaseException, want: str) -> None:
    assert describe(exc) == want


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sllm_knative.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "SLLM_LOG_LEVEL": "WARNING"})


def one_line_error(r: subprocess.CompletedProcess[str], *expect: str) -> str:
    assert r.returncode != 0, r
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for e in expect:
        assert e in lines[0], lines[0]
    return lines[0]


def commands(state: Path) -> dict[str, list[str]]:
    """Every subcommand that needs a cluster (or a node's loader), with good arguments."""
    return {
        "apply": ["apply", "--state-dir", str(state), "-f", str(state / "svc.yaml")],
        "get": ["get", "--state-dir", str(state), "services"],
        "get nodes": ["get", "--state-dir", str(state), "nodes"],
        "delete": ["delete", "--state-dir", str(state), "service", "llama"],
        "invoke": ["invoke", "--state-dir", str(state), "llama"],
        "invoke --chat": ["invoke", "--state-dir", str(state), "llama", "--chat", "--prompt", "hi"],
        "logs": ["logs", "--state-dir", str(state)],
        "cache ls": ["cache", "--loader", f"unix://{state}/none.sock", "--timeout", "2", "ls"],
        "cache evict": ["cache", "--loader", f"unix://{state}/none.sock", "--timeout", "2", "evict", "file:///s/m"],
    }


@pytest.mark.parametrize("name", list(commands(Path("/x"))))
def test_no_cluster_is_one_line(name: str, tmp_path: Path) -> None:
    (tmp_path / "svc.yaml").write_text("apiVersion: v1\n")
    line = one_line_error(run(*commands(tmp_path)[name]))
    assert "no local cluster" in line or "none.sock" in line, line


@pytest.mark.parametrize("name", ["apply", "get", "get nodes", "delete", "invoke", "invoke --chat"])
def test_a_cluster_that_does_not_answer_is_one_line(name: str, tmp_path: Path) -> None:
    """cluster.json of a cluster whose supervisor lives (this test's process) but whose activator
    and autoscaler do not answer: the error names what it could not reach."""
    dead = f"http://127.0.0.1:{free_port()}"
    (tmp_path / "cluster.json").write_text(json.dumps({"ready": True, "pid": os.getpid(), "activator": dead,
                                                       "autoscaler": dead, "nodes": [], "groups": []}))
    (tmp_path / "svc.yaml").write_text("apiVersion: v1\n")
    one_line_error(run(*commands(tmp_path)[name]), f"cannot reach POST {dead}" if name.startswith(("apply", "invoke"))
                   else "cannot reach", "is the local cluster running?")


@pytest.mark.parametrize(("args", "expect"), [
    pytest.param(["up", "--nodes", "0"], "--nodes = 0, must be between 1 and 64", id="up-nodes"),
    pytest.param(["up", "--slots", "-1"], "--slots = -1, must be at least 1", id="up-slots"),
    pytest.param(["convert", "/nonexistent-model", "/tmp/never-written"], "/nonexistent-model", id="convert-missing"),
    pytest.param(["logs", "autoscaler"], "no local cluster logs here", id="logs-unknown"),
    # Found only when a component starts: the loader refuses the store, `up` says why and stops.
    pytest.param(["up", "--nodes", "1", "--store", "bogus://x", "--port", str(free_port())],
                 "loader node-1 exited with code 2: store 'bogus://x': scheme must be one of", id="up-bad-store"),
])
def test_bad_arguments_are_one_line(args: list[str], expect: str, tmp_path: Path) -> None:
    if args[0] in ("up", "logs"):
        args = [*args, "--state-dir", str(tmp_path)]
    one_line_error(run(*args), expect)
