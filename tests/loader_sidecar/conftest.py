"""Fixtures of the loader sidecar tests: small real checkpoints, a store directory, nginx, S3 (moto),
and sidecars (the real gRPC server, in a thread or as a process)."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from loader_sidecar.config import Config, add_arguments, from_args
from sllm_knative.loader.client import LoaderClient
from sllm_knative.ports import free_port
from testkit.proc import Proc
from testkit.servers import Nginx, nginx_path, wait_port
from testkit.sidecar import SidecarThread

REPO = Path(__file__).resolve().parents[2]
HF_TOKEN = "hf_test_token_123"
SMALL_BLOCK = 64 << 10


@pytest.fixture(scope="session")
def store_root(tmp_path_factory) -> Path:
    """A store directory: models/{tiny,small,tiny-hf,corrupt} and hf/org/small/main/ (HF layout).

    tiny: one partition, one block. small: ~4.4 MB in two partitions of 64 KiB checksum blocks.
    tiny-hf: the plain Hugging Face checkpoint of tiny. corrupt: small with one flipped byte.
    """
    from sllm_knative.convert import convert
    from sllm_knative.models import TINY, ModelSpec, build_model

    root = tmp_path_factory.mktemp("store")
    models = root / "models"
    hf_tiny = build_model(root / "src" / "tiny", TINY)
    hf_small = build_model(root / "src" / "small", ModelSpec(hidden_size=128, intermediate_size=512,
                                                             num_hidden_layers=4, vocab_size=512))
    convert(hf_tiny, models / "tiny")
    convert(hf_small, models / "small", partitions=2, block_size=SMALL_BLOCK)
    shutil.copytree(hf_tiny, models / "tiny-hf")
    shutil.copytree(models / "small", models / "corrupt")
    part = models / "corrupt" / "partition-1.bin"
    with open(part, "r+b") as f:
        f.seek(5 * SMALL_BLOCK + 100)
        b = f.read(1)
        f.seek(5 * SMALL_BLOCK + 100)
        f.write(bytes([b[0] ^ 0xFF]))
    shutil.copytree(models / "small", root / "hf" / "org" / "small" / "main")
    return root


@pytest.fixture(scope="session")
def hf_token() -> str:
    return HF_TOKEN


@pytest.fixture(scope="session")
def nginx(store_root) -> Iterator[Nginx]:
    if nginx_path() is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light; .ci/run installs it)")
    with Nginx(store_root, slow_rate="200k", hf_token=HF_TOKEN) as web:
        yield web


@pytest.fixture(scope="session")
def s3(store_root) -> Iterator[str]:
    """A moto S3 server on loopback holding models/ under s3://models-bucket/ckpt/."""
    pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    wait_port(port)
    endpoint = f"http://127.0.0.1:{port}"
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
                          aws_secret_access_key="test")
    client.create_bucket(Bucket="models-bucket")
    for model in ("small", "tiny-hf"):
        for f in (store_root / "models" / model).iterdir():
            client.upload_file(str(f), "models-bucket", f"ckpt/{model}/{f.name}")
    yield endpoint
    server.stop()


@pytest.fixture(autouse=True)
def _aws_env(monkeypatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture
def dram_dir() -> Iterator[Path]:
    """A DRAM tier on tmpfs (/dev/shm), removed afterwards."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")
    d = base / f"sllm-test-{uuid.uuid4().hex[:8]}"
    yield d
    shutil.rmtree(d, ignore_errors=True)


def make_config(tmp_path: Path, dram_dir: Path, stores: list[str], *extra: str, env: dict | None = None) -> Config:
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = ["--node", "test", "--listen", f"unix://{tmp_path}/loader.sock", "--ssd-dir", str(tmp_path / "ssd"),
            "--dram-dir", str(dram_dir), "--ssd-bytes", "64MiB", "--dram-bytes", "64MiB", "--profile-bytes", "1MiB",
            "--chunk-bytes", "256KiB", "--fill-segment-bytes", "256KiB", "--retry-backoff", "0.05",
            "--timeout", "5"]
    for s in stores:
        args += ["--store", s]
    return from_args(p.parse_args(args + list(extra)), env=env or {"HF_ENDPOINT": "", "HF_TOKEN": ""})


@pytest.fixture
def sidecar(tmp_path, dram_dir) -> Iterator[Callable[..., tuple[SidecarThread, LoaderClient]]]:
    """sidecar(stores, *flags, env=...) -> (running sidecar, connected client); all stopped afterwards."""
    started: list[tuple[SidecarThread, LoaderClient]] = []

    def start(stores: list[str], *extra: str, env: dict | None = None) -> tuple[SidecarThread, LoaderClient]:
        config = make_config(tmp_path, dram_dir, stores, *extra, env=env)
        thread = SidecarThread(config).start()
        client = LoaderClient(thread.address, timeout=30)
        started.append((thread, client))
        return thread, client

    yield start
    for thread, client in reversed(started):
        client.close()
        thread.stop()


class SidecarProcess:
    """`python -m loader_sidecar` as a child process (for kill -9 and the CLI)."""

    def __init__(self, tmp_path: Path, dram_dir: Path, stores: list[str], *extra: str) -> None:
        self.socket = tmp_path / "proc.sock"
        self.target = f"unix://{self.socket}"
        self.args = [sys.executable, "-m", "loader_sidecar", "--node", "proc", "--listen", self.target,
                     "--ssd-dir", str(tmp_path / "ssd"), "--dram-dir", str(dram_dir), "--ssd-bytes", "64MiB",
                     "--dram-bytes", "64MiB", "--profile-bytes", "1MiB", "--chunk-bytes", "64KiB",
                     "--retry-backoff", "0.05", "--timeout", "5", *[a for s in stores for a in ("--store", s)],
                     *extra]
        self.log = tmp_path / "sidecar.log"
        self.process = Proc("sidecar")

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.process.proc

    def start(self, timeout: float = 30.0) -> SidecarProcess:
        self.socket.unlink(missing_ok=True)
        self.process.start(self.args, self.log, env={"PYTHONPATH": str(REPO), "HF_ENDPOINT": "", "HF_TOKEN": ""},
                           append=True)
        self.process.wait_until(self.socket.exists, timeout, "listening")
        return self

    def kill9(self) -> None:
        self.process.kill()

    def stop(self) -> None:
        self.process.stop(grace=15)


@pytest.fixture
def sidecar_process(tmp_path, dram_dir) -> Iterator[Callable[..., SidecarProcess]]:
    procs: list[SidecarProcess] = []

    def make(stores: list[str], *extra: str) -> SidecarProcess:
        p = SidecarProcess(tmp_path, dram_dir, stores, *extra)
        procs.append(p)
        return p

    yield make
    for p in procs:
        p.stop()

