"""`python -m loader_sidecar` as a process: kill -9 mid-download, restart, nothing unverified served."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from loader_sidecar.tiers import MARKER
from sllm_knative import format as fmt
from sllm_knative.loader.client import LoaderClient


def wait_for(predicate, timeout: float = 20.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.05)
    return value


def entries(client: LoaderClient, tier: str) -> dict[str, tuple[str, int]]:
    t = next(t for t in client.inventory().tiers if t.name == tier)
    return {e.model: (e.state, e.filled) for e in t.entries}


def states(client: LoaderClient, tier: str) -> dict[str, str]:
    return {m: s for m, (s, _) in entries(client, tier).items()}


def test_kill_9_mid_download_then_restart(nginx, sidecar_process, store_root, dram_dir, tmp_path):
    fast, slow = f"{nginx.url}/models", f"{nginx.url}/slow/models"
    proc = sidecar_process([fast, slow]).start()
    with LoaderClient(proc.target, timeout=30) as client:
        with client.acquire("small") as lease:  # a complete checkpoint, to survive the crash
            lease.wait_complete(timeout=30)
        wait_for(lambda: entries(client, "ssd").get(f"{fast}/small", ("",))[0] == "ready")
        assert client.prefetch(f"{slow}/tiny", wait=False).source == "started"
        wait_for(lambda: entries(client, "dram").get(f"{slow}/tiny", ("",))[0] == "filling")
        time.sleep(0.5)  # bytes are arriving (200 kB/s)
    proc.kill9()
    partial = [p for p in dram_dir.iterdir() if not (p / MARKER).exists()]
    assert len(partial) == 1 and (partial[0] / "partition-0.bin").exists()  # sized, half-written, no marker
    assert list((tmp_path / "ssd" / ".staging").iterdir())

    requests_before = len(nginx.requests("/models/small/"))
    proc.start()
    with LoaderClient(proc.target, timeout=30) as client:
        assert states(client, "dram") == {f"{fast}/small": "ready"}
        assert states(client, "ssd") == {f"{fast}/small": "ready"}
        assert not partial[0].exists() and not (tmp_path / "ssd" / ".staging").exists()
        with client.acquire("small") as lease:
            assert lease.source == "dram"  # recovered from disk, no transfer
            lease.wait_complete(timeout=10)
        assert len(nginx.requests("/models/small/")) == requests_before
        with client.acquire(f"{slow}/tiny") as lease:  # fetched again, from the start, verified
            assert lease.source == "remote"
            lease.wait_complete(timeout=30)
            got = Path(lease.partitions[0].path).read_bytes()
    index = fmt.read_index(store_root / "models" / "tiny")
    assert got == (store_root / "models" / "tiny" / index.partitions[0].file).read_bytes()
    assert "dropped unverified or partial entries" in proc.log.read_text()


@pytest.mark.parametrize("args, message", [
    pytest.param([], "at least one --store", id="no-store"),
    pytest.param(["--store", "gopher://x"], "scheme must be one of", id="bad-store"),
    pytest.param(["--store", "file:///m", "--dram-bytes", "lots"], "dram-bytes = 'lots'", id="bad-size"),
])
def test_bad_command_line_is_rejected_before_starting(args, message, tmp_path):
    out = subprocess.run([sys.executable, "-m", "loader_sidecar", "--ssd-dir", str(tmp_path), "--ssd-bytes", "1MiB",
                          *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and message in out.stderr
