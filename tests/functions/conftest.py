"""Session fixtures: the tiny model, and real `python -m functions.llm` server processes."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from functions.llm import kernels
from sllm_knative.ports import free_port
from testkit.proc import Proc

# Tests of our AVX512-BF16 kernel (functions/llm/kernels.py) run where this CPU can run it.
NEEDS_KERNEL = pytest.mark.skipif(not kernels.built(),
                                  reason="this CPU has no AVX512-BF16 (or the extension was built without it)")
NEEDS_AMX = pytest.mark.skipif(kernels.AMX_BF16 not in kernels.runnable(),
                               reason="this CPU has no AMX-BF16, or Linux does not grant this process its tiles")
# Our kernels, each skipped with its reason where it cannot run.
OUR_KERNELS = [pytest.param(kernels.AVX512_BF16, marks=NEEDS_KERNEL, id="avx512"),
               pytest.param(kernels.AMX_BF16, marks=NEEDS_AMX, id="amx")]

REPO = Path(__file__).resolve().parents[2]
MAX_MODEL_LEN = 1024
MAX_CONCURRENCY = 4
MAX_BODY_BYTES = 65536


class Server(Proc):
    """One inference-function process on free loopback ports."""

    def __init__(self, model_dir: Path, log_path: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        super().__init__("server")
        self.port = free_port()
        self.internal_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.internal_url = f"http://127.0.0.1:{self.internal_port}"
        args = [sys.executable, "-m", "functions.llm", "--model", str(model_dir), "--served-model-name", "tiny",
                "--host", "127.0.0.1", "--internal-host", "127.0.0.1", "--port", str(self.port),
                "--internal-port", str(self.internal_port), "--max-model-len", str(MAX_MODEL_LEN),
                "--max-concurrency", str(MAX_CONCURRENCY), "--parked-slots", "3",
                "--max-body-bytes", str(MAX_BODY_BYTES), "--step-tokens", "64", *extra]
        self.start(args, log_path, env=env)

    def wait_ready(self, timeout: float = 90.0) -> dict:
        return self.wait_http(f"{self.url}/health/ready", timeout).json()

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from sllm_knative.models import build_model

    return build_model(tmp_path_factory.mktemp("llm-tiny") / "tiny")


@pytest.fixture(scope="session")
def server_pair(tiny_model, tmp_path_factory) -> Iterator[tuple[Server, Server]]:
    """Two instances of the same model (A and B), started together; migration moves between them."""
    logs = tmp_path_factory.mktemp("llm-logs")
    a = Server(tiny_model, logs / "a.log")
    b = Server(tiny_model, logs / "b.log")
    try:
        a.wait_ready()
        b.wait_ready()
        yield a, b
    finally:
        a.stop()
        b.stop()


@pytest.fixture(scope="session")
def server(server_pair) -> Server:
    return server_pair[0]
