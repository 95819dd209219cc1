"""A loader killed in the middle of a fill from the store: `up` restarts it, the cold start that
was waiting on it still gets an instance, and no partly written file is ever kept or served.
Real processes; the store is nginx serving slowly, so that the fill is long enough to be cut."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sllm_knative.commands.resources import invoke
from sllm_knative.loader.client import LoaderClient
from sllm_knative.loader.errors import LoaderError
from sllm_knative.local.manifests import ALLOW_ZERO_INITIAL_SCALE, service_manifest
from sllm_knative.ports import free_port
from testkit.servers import Nginx
from tests.local.test_cluster import cli, services
from tests.local.util import wait_for

STAGING, MARKER = ".staging", ".sllm-entry.json"  # the tiers' layout (loader_sidecar/tiers.py)
HELD_S = 180  # how long the cold start may take, fill cut and redone included


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[tuple[Path, dict, str]]:
    from sllm_knative.convert import convert
    from sllm_knative.models import build_model

    store = tmp_path_factory.mktemp("fault-store")
    convert(build_model(store.parent / "hf-fault"), store / "tiny")
    state = tmp_path_factory.mktemp("fault-state")
    with Nginx(store, slow_rate="48k") as web:  # about 576 KiB: several seconds over a few connections
        uri = f"{web.url}/slow/tiny"
        cli(state, "up", "--detach", "--nodes", "1", "--slots", "1", "--store", f"{web.url}/slow",
            "--port", str(free_port()), "--dram-gb", "1", "--ssd-gb", "1")
        (state / "svc.yaml").write_text("---\n".join([ALLOW_ZERO_INITIAL_SCALE, service_manifest(
            "tiny", uri, keep_alive="600s", initial_scale=0)]))
        cli(state, "apply", "-f", str(state / "svc.yaml"))
        try:
            yield state, json.loads((state / "cluster.json").read_text()), uri
        finally:
            cli(state, "down", check=False)


def entries(loader: str) -> dict[str, str] | None:
    """Tier -> state of the checkpoint's entries (None while the loader does not answer)."""
    try:
        with LoaderClient(loader, timeout=2) as c:
            return {t.name: e.state for t in c.inventory().tiers for e in t.entries}
    except LoaderError:
        return None


def test_a_loader_killed_mid_fill_loses_the_fill_not_the_cold_start(cluster) -> None:
    state, doc, uri = cluster
    node = doc["nodes"][0]
    result: dict = {}

    def cold() -> None:
        try:
            result.update(invoke(doc["activator"], "tiny", "default", "Hello", 4, seed=1, timeout=HELD_S))
        except Exception as exc:  # noqa: BLE001 - the test reports what the client saw
            result["error"] = exc

    t = threading.Thread(target=cold)
    t.start()
    wait_for(lambda: "filling" in (entries(node["loader"]) or {}).values(), 60, "a fill from the store")
    pid = json.loads((state / "cluster.json").read_text())["components"]["loader node-1"]
    os.kill(pid, signal.SIGKILL)
    cut_at = time.monotonic()
    t.join(HELD_S + 30)
    assert "error" not in result, result
    assert result["text"], result
    took = time.monotonic() - cut_at
    svc = services(doc)["default/tiny"]
    assert [i["state"] for i in svc["instances"]] == ["ready"], svc
    # The restarted loader filled it again, and every tier entry on disk is a whole one: published
    # with its marker, its files of the sizes the marker records, nothing left in staging.
    assert entries(node["loader"]) == {"ssd": "ready", "dram": "ready"}
    ssd = Path(state / "nodes" / "node-1" / "ssd")
    for tier in (ssd, Path(next(t.directory for t in LoaderClient(node["loader"], timeout=5).inventory().tiers
                                if t.name == "dram"))):
        assert not any((tier / STAGING).glob("*")), list((tier / STAGING).glob("*"))
        for entry in (p for p in tier.iterdir() if not p.name.startswith(".")):
            files = json.loads((entry / MARKER).read_text())["files"]
            assert {f: (entry / f).stat().st_size for f in files} == files, entry
    log = (state / "logs" / "autoscaler.log").read_text()
    print(f"cold start done {took:.1f}s after the loader was killed")
    assert took < HELD_S and "instance ready" in log
    # An instance whose lease the kill broke failed, and the autoscaler's log says why (its own
    # log's error), before the retry that served.
    for line in log.splitlines():
        if "instance failed to become ready" in line:
            assert "loader" in line.split("detail=", 1)[1], line
