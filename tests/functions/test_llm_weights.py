"""LeasedCheckpoint (functions/llm/weights.py) against a scripted loader client: which wait each
device gets, the timing file, and errors that name the checkpoint and the loader."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from functions.llm import weights
from sllm_knative.loader import client as loader_client
from sllm_knative.loader import errors


class FakeLease:
    def __init__(self, directory: Path, fail: errors.LoaderError | None = None) -> None:
        self.id, self.model, self.source, self.total_bytes = "l1", "hf://org/m", "ssd", 1 << 20
        self.directory = str(directory)
        self.fail = fail
        self.filled = threading.Event()
        self.waits: list[tuple[int, int]] = []
        self.released = False

    def wait(self, partition: int, nbytes: int) -> int:
        self.waits.append((partition, nbytes))
        if self.fail:
            raise self.fail
        return nbytes

    def wait_complete(self) -> None:
        self.filled.wait(5)
        if self.fail:
            raise self.fail

    def release(self) -> None:
        self.released = True


class FakeClient:
    leases: list[FakeLease] = []
    refuse: errors.LoaderError | None = None

    def __init__(self, target: str) -> None:
        self.target = target
        self.closed = False

    def acquire(self, model: str, device: str = "cpu", instance: str = "") -> FakeLease:
        if FakeClient.refuse:
            raise FakeClient.refuse
        return FakeClient.leases.pop(0)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(loader_client, "LoaderClient", FakeClient)
    FakeClient.leases, FakeClient.refuse = [], None
    return FakeClient


def source(tmp_path: Path, device: str) -> weights.LeasedCheckpoint:
    return weights.LeasedCheckpoint("unix:///run/loader.sock", "hf://org/m", device, "i-1", tmp_path / "t.json")


def test_on_the_cpu_the_instance_waits_for_the_whole_fill_and_the_timing_is_written_first(fake, tmp_path):
    lease = FakeLease(tmp_path)
    lease.filled.set()
    fake.leases = [lease]
    src = source(tmp_path, "cpu")
    with src.acquire() as path:
        assert path == tmp_path and src.follow is None
        timing = json.loads((tmp_path / "t.json").read_text())
        assert (timing["source"], timing["bytes"], timing["followed"]) == ("ssd", 1 << 20, False)
        assert timing["lease_requested"] <= timing["lease_granted"] <= timing["lease_complete"]
    assert lease.released


def test_on_a_gpu_the_load_follows_the_watermark(fake, tmp_path):
    lease = FakeLease(tmp_path)
    fake.leases = [lease]
    src = source(tmp_path, "cuda:0")
    with src.acquire():  # returns before the fill completes
        assert src.follow is not None and src.follow(1, 4096) == 4096 and lease.waits == [(1, 4096)]
        assert not (tmp_path / "t.json").exists()
        lease.filled.set()
        for _ in range(100):
            if (tmp_path / "t.json").exists():
                break
            threading.Event().wait(0.02)
        assert json.loads((tmp_path / "t.json").read_text())["followed"] is True
    assert lease.released


def test_a_refused_lease_names_the_checkpoint_and_the_loader(fake, tmp_path):
    fake.refuse = errors.NotFound("hf://org/m: no such model [NOT_FOUND]")
    with pytest.raises(weights.LeaseFailed, match=r"checkpoint 'hf://org/m': the loader at unix:///run/loader.sock "
                                                  r"refused the lease: .*NOT_FOUND"):
        source(tmp_path, "cpu").request()


@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
def test_a_fill_that_fails_names_the_checkpoint_and_the_loader(fake, tmp_path, device):
    lease = FakeLease(tmp_path, fail=errors.CorruptData("block 3 of partition-0.bin [DATA_LOSS]"))
    lease.filled.set()
    fake.leases = [lease]
    src = source(tmp_path, device)
    with pytest.raises(weights.LeaseFailed, match="hf://org/m.*unix:///run/loader.sock could not fill it.*DATA_LOSS"):
        with src.acquire():
            assert src.follow is not None  # only the GPU gets here: the CPU waited for the fill
            src.follow(0, 1)
    assert lease.released and not (tmp_path / "t.json").exists()
