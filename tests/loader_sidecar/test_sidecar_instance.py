"""An instance that leases its own checkpoint: `python -m functions.llm --checkpoint URI --loader ADDRESS`
as a real process against `python -m loader_sidecar` as a real process, over a local file store.

This is how a Kubernetes pod loads by itself (and how the local cluster's zygote children load):
no one hands the instance a directory; it asks its node's loader for the checkpoint, holds the
lease while it serves, and the lease ends when it exits.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sllm_knative.loader.client import LoaderClient
from sllm_knative.local import procs
from sllm_knative.local.zygote import spawn_via
from sllm_knative.ports import free_port
from testkit.proc import Proc

REPO = Path(__file__).resolve().parents[2]


class Instance(Proc):
    """One `python -m functions.llm` process that leases `checkpoint` from the loader at `loader`."""

    def __init__(self, tmp_path: Path, loader: str, checkpoint: str, name: str = "inst-1") -> None:
        super().__init__(f"the instance {name}")
        self.port, self.internal_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.timing = tmp_path / f"{name}.timing.json"
        argv = [sys.executable, "-m", "functions.llm", "--checkpoint", checkpoint, "--loader", loader,
                "--lease-timing", str(self.timing), "--served-model-name", "tiny",
                "--host", "127.0.0.1", "--port", str(self.port),
                "--internal-host", "127.0.0.1", "--internal-port", str(self.internal_port),
                "--max-model-len", "256", "--max-concurrency", "2"]
        self.start(argv, tmp_path / f"{name}.log", env={"SLLM_INSTANCE": name}, unset=("SLLM_LOADER", "SLLM_MODEL_DIR"))

    def wait_ready(self, timeout: float = 120.0) -> dict:
        return self.wait_http(f"{self.url}/health/ready", timeout).json()

    def wait_exit(self, timeout: float = 120.0) -> int:
        return self.wait(timeout)

    def stop(self, grace: float = 30.0) -> int:
        return super().stop(grace)


@pytest.fixture
def instances() -> Iterator[list[Instance]]:
    started: list[Instance] = []
    yield started
    for inst in started:
        inst.stop()


def leases(target: str) -> list[tuple[str, str]]:
    with LoaderClient(target, timeout=10) as client:
        return [(lease.model, lease.instance) for lease in client.inventory().leases]


def test_the_instance_leases_its_checkpoint_loads_it_and_serves(sidecar_process, store_root, tmp_path,
                                                                 instances):
    store = f"file://{store_root}/models"
    loader = sidecar_process([store]).start()
    checkpoint = f"{store}/tiny"
    inst = Instance(tmp_path, loader.target, checkpoint)
    instances.append(inst)

    report = inst.wait_ready()
    assert report["status"] == "ready" and "lease_s" in report["startup"], report
    r = httpx.post(f"{inst.url}/v1/completions", timeout=60,
                   json={"model": "tiny", "prompt": "Hello there", "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny" and body["usage"]["completion_tokens"] >= 1, body
    assert isinstance(body["choices"][0]["text"], str)

    # The lease is the instance's, for as long as it serves; its timing is where the backend reads it.
    assert leases(loader.target) == [(checkpoint, "inst-1")]
    timing = json.loads(inst.timing.read_text())
    assert timing["source"] == "remote" and timing["bytes"] > 0 and timing["followed"] is False, timing
    assert timing["lease_requested"] <= timing["lease_granted"] <= timing["lease_complete"]
    assert "lease complete" in inst.log() and checkpoint in inst.log()

    # It ends with the instance: released on shutdown (or when the process and its stream go).
    assert inst.stop() == 0, inst.log()
    deadline = time.monotonic() + 10
    while leases(loader.target) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leases(loader.target) == []

    # A second instance finds the checkpoint in the DRAM tier.
    again = Instance(tmp_path, loader.target, checkpoint, name="inst-2")
    instances.append(again)
    again.wait_ready()
    assert json.loads(again.timing.read_text())["source"] == "dram"


def test_a_checkpoint_neither_the_loader_nor_its_store_has_ends_the_instance_with_a_clear_error(
        sidecar_process, store_root, tmp_path, instances):
    store = f"file://{store_root}/models"
    loader = sidecar_process([store]).start()
    checkpoint = f"{store}/no-such-model"
    inst = Instance(tmp_path, loader.target, checkpoint)
    instances.append(inst)

    code = inst.wait_exit()
    log = inst.log()
    assert code == 3, log
    failure = next((line for line in log.splitlines() if "model load failed" in line), None)
    assert failure is not None, log
    assert checkpoint in failure and loader.target in failure, failure  # names what and where
    assert "NOT_FOUND" in failure, failure
    assert "Traceback" not in log, log  # the error says it all
    assert not inst.timing.exists()
    assert leases(loader.target) == []


def test_the_zygote_only_forks_and_its_child_leases_by_itself(sidecar_process, store_root, tmp_path):
    """`python -m functions.zygote` pre-imports and forks; the child is an ordinary instance given
    --checkpoint/--loader, which takes its lease from the loader (the zygote never talks to it)."""
    store = f"file://{store_root}/models"
    loader = sidecar_process([store]).start()
    sock = tmp_path / "zygote.sock"
    zygote = Proc("the zygote").start([sys.executable, "-m", "functions.zygote", str(sock)], tmp_path / "zygote.log")
    pid = 0
    try:
        zygote.wait_until(sock.exists, 120, "listening")
        assert leases(loader.target) == []
        port, log, timing = free_port(), tmp_path / "child.log", tmp_path / "child.timing.json"
        pid = spawn_via(str(sock), ["--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
                                    "--internal-host", "127.0.0.1", "--internal-port", str(free_port()),
                                    "--max-model-len", "256", "--checkpoint", f"{store}/tiny",
                                    "--loader", loader.target, "--lease-timing", str(timing)],
                        str(log), {"SLLM_INSTANCE": "forked-1"})
        deadline = time.monotonic() + 60
        while True:
            assert procs.alive(pid) and time.monotonic() < deadline, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        assert leases(loader.target) == [(f"{store}/tiny", "forked-1")]
        assert json.loads(timing.read_text())["bytes"] > 0
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                       json={"model": "tiny", "prompt": "Hi", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200, r.text

        # The zygote takes no lease: a request that asks it to (the old protocol) is refused.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(str(sock))
            conn.sendall(json.dumps({"argv": [], "log": str(log), "lease": {"model": "x"}}).encode() + b"\n")
            assert "unknown request fields: lease" in json.loads(conn.makefile("r").readline())["error"]
    finally:
        if pid:
            procs.stop(pid, grace_s=10.0, group=False)
        zygote.stop(grace=5.0)
    assert not procs.alive(pid)
