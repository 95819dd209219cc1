"""Real processes for migration tests: function instances (the tiny model, exact numerics) and
the activator in front of them, driven through its admin API the way the autoscaler drives it."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sllm_knative.api import activator as admin_api
from sllm_knative.api import auth
from sllm_knative.ports import free_port
from testkit.proc import Proc

REPO = Path(__file__).resolve().parents[2]
MODEL = "tiny"


class Function(Proc):
    """One `python -m functions.llm` instance on free loopback ports."""

    def __init__(self, name: str, model_dir: Path, logs: Path, env: dict[str, str] | None = None, *,
                 served: str = MODEL, max_model_len: int = 512) -> None:
        super().__init__(name)
        self.id = name
        self.port, self.internal_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.internal_url = f"http://127.0.0.1:{self.internal_port}"
        args = [sys.executable, "-m", "functions.llm", "--model", str(model_dir), "--served-model-name", served,
                "--host", "127.0.0.1", "--internal-host", "127.0.0.1", "--port", str(self.port),
                "--internal-port", str(self.internal_port), "--max-model-len", str(max_model_len), "--max-concurrency", "8",
                "--parked-slots", "8", "--step-tokens", "64", "--numerics", "exact"]
        self.start(args, logs / f"{name}.log", env={"SLLM_INSTANCE": name, **(env or {})})

    def endpoint(self) -> dict[str, str]:
        return {"id": self.id, "url": self.url, "internal_url": self.internal_url}

    def wait_ready(self) -> None:
        self.wait_http(f"{self.url}/health/ready")


class Activator(Proc):
    def __init__(self, logs: Path, *extra: str, name: str = "activator", env: dict[str, str] | None = None) -> None:
        super().__init__(name)
        self.port, self.admin_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        self.headers = auth.auth_headers(auth.token_from_env(env or {}))  # its admin API wants its token
        self.start([sys.executable, "-m", "activator", "--port", str(self.port), "--admin-port", str(self.admin_port),
                    *extra], logs / f"{name}.log", env=env)

    def wait_ready(self) -> None:
        self.wait_http(f"{self.admin}{admin_api.METRICS}", timeout=30)  # open without the token

    def set_instances(self, *functions: Function, name: str = MODEL) -> None:
        r = httpx.put(f"{self.admin}{admin_api.SERVICES}/default/{name}",
                      json={"container_concurrency": 0, "instances": [f.endpoint() for f in functions]}, timeout=5,
                      headers=self.headers)
        r.raise_for_status()

    def migrate(self, source: Function, destination: Function | None = None, timeout: float = 60, *,
                name: str = MODEL) -> dict:
        body = {"namespace": "default", "name": name, "source": source.id,
                "destination": destination.id if destination else None}
        r = httpx.post(f"{self.admin}{admin_api.MIGRATE}", json=body, timeout=timeout, headers=self.headers)
        assert r.status_code == 200, r.text
        return r.json()

    def stop(self, grace: float = 10.0) -> int:
        return super().stop(grace)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from sllm_knative.models import build_model

    return build_model(tmp_path_factory.mktemp("migration-tiny") / "tiny")


@pytest.fixture(scope="session")
def logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("migration-logs")


def running(act: Activator) -> Iterator[Activator]:
    """Yield the activator once its admin API answers; stop it afterwards."""
    try:
        act.wait_ready()
        yield act
    finally:
        act.stop()


@pytest.fixture(scope="session")
def activator(logs) -> Iterator[Activator]:
    yield from running(Activator(logs))


@pytest.fixture(scope="session")
def endless_activator(logs) -> Iterator[Activator]:
    """An activator whose migrations never detach on their own (gap 0, unbounded rounds): the window
    in which a test kills the source between rounds."""
    yield from running(Activator(logs, "--migration-gap", "0", "--migration-rounds", "100000",
                                 "--migration-settle-gap", "0", name="endless-activator"))


@pytest.fixture(scope="session")
def following_activator(logs) -> Iterator[Activator]:
    """An activator whose migrations go to the follow phase after round 1 and stay there for 12
    source steps (gap 0 is only met by an idle destination): the queued prefills, then the resume
    behind them, on every run."""
    yield from running(Activator(logs, "--migration-gap", "0", "--migration-settle-gap", "1000000",
                                 "--migration-follow", "12", name="following-activator"))


@pytest.fixture(scope="session")
def functions(tiny_model, logs) -> Iterator[list[Function]]:
    """Two long-lived instances (A, B); tests that kill one start their own."""
    fns = [Function(name, tiny_model, logs) for name in ("a", "b")]
    try:
        for f in fns:
            f.wait_ready()
        yield fns
    finally:
        for f in fns:
            f.stop()


#: the tests that migrate one generation twice run it this long on instances with room for it: 480
#: tokens took 0.9 s on a fast host, less than two migrations may take under load
TWICE_TOKENS, TWICE_LEN = 1500, 2048


@pytest.fixture
def spare(tiny_model, logs):
    """Start extra instances (for tests that kill or terminate one); stopped after the test."""
    made: list[Function] = []

    def start(name: str, env: dict[str, str] | None = None, max_model_len: int = 512) -> Function:
        f = Function(name, tiny_model, logs, env, max_model_len=max_model_len)
        made.append(f)
        f.wait_ready()
        return f

    yield start
    for f in made:
        f.stop()


def kill_source_between_rounds(act: Activator, src: Function, dest: Function) -> dict:
    """Migrate src -> dest on an activator that never detaches on its own (`endless_activator`)
    and kill src a few prefill rounds in; returns the migrate call's result."""
    import threading

    prefills = dest.log_path.read_text().count("prefill for a migration")
    migration: dict = {}
    m = threading.Thread(target=lambda: migration.update(act.migrate(src, dest)))
    m.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and dest.log_path.read_text().count("prefill for a migration") == prefills:
        time.sleep(0.005)
    time.sleep(0.05)  # a few rounds in
    src.kill()
    m.join(60)
    return migration
