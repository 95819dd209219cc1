"""A crashed activator or loader is restarted by `up`, as a kubelet restarts a crashed
container, and the cluster serves again: real processes killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sllm_knative.commands.resources import invoke
from sllm_knative.local.cluster import restart_delay, restartable
from sllm_knative.local.manifests import ALLOW_ZERO_INITIAL_SCALE, service_manifest
from sllm_knative.ports import free_port
from tests.local.test_cluster import cli, services
from tests.local.util import wait_for
from tests.migration.test_recovery import counters


@pytest.mark.parametrize(("restarts", "want"), [(1, 0.5), (2, 1.0), (3, 2.0), (7, 30.0), (50, 30.0)])
def test_restart_delay_doubles_to_a_bound(restarts: int, want: float) -> None:
    assert restart_delay(restarts) == want


@pytest.mark.parametrize(("component", "want"), [
    ("activator", True), ("loader node-1", True), ("autoscaler", True), ("zygote node-1", True), ("up", False)])
def test_what_is_restarted(component: str, want: bool) -> None:
    assert restartable(component) is want


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[tuple[Path, dict]]:
    from sllm_knative.convert import convert
    from sllm_knative.models import build_model

    store = tmp_path_factory.mktemp("restart-store")
    convert(build_model(store.parent / "hf-restart"), store / "tiny")
    state = tmp_path_factory.mktemp("restart-state")
    cli(state, "up", "--detach", "--nodes", "1", "--slots", "2", "--store", f"file://{store}",
        "--port", str(free_port()), "--dram-gb", "1", "--ssd-gb", "1")
    (state / "svc.yaml").write_text(service_manifest("tiny", f"file://{store}/tiny", keep_alive="600s"))
    cli(state, "apply", "-f", str(state / "svc.yaml"))
    try:
        yield state, json.loads((state / "cluster.json").read_text())
    finally:
        cli(state, "down", check=False)


def component(state: Path, name: str) -> tuple[int, int]:
    """(pid, restarts so far) of a component, from the cluster file."""
    doc = json.loads((state / "cluster.json").read_text())
    return doc["components"][name], doc.get("restarts", {}).get(name, 0)


def test_a_killed_activator_is_restarted_and_serves_at_once(cluster) -> None:
    state, doc = cluster
    first = invoke(doc["activator"], "tiny", "default", "Hello", 4, seed=1)  # warm now
    placed = len(services(doc)["default/tiny"]["placements"])
    pid, restarts = component(state, "activator")
    # A stream in flight when the activator dies: its client sees the connection break. Killed once
    # its first tokens have arrived (a fixed 0.5 s once outlasted a 400-token stream on a fast host),
    # 1500 tokens past any end-of-sequence: about 1.5 s of stream left at the fastest.
    broke: list[BaseException] = []
    streaming = threading.Event()
    body = {"model": "tiny", "prompt": "A long story", "max_tokens": 1500, "stream": True, "temperature": 0,
            "ignore_eos": True}

    def reader() -> None:
        try:
            with httpx.stream("POST", f"{doc['activator']}/v1/completions", json=body, timeout=60,
                              headers={"host": "tiny.default.example.com"}) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        streaming.set()
        except httpx.HTTPError as exc:
            broke.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    assert streaming.wait(60), "the stream did not start"
    assert t.is_alive(), "the stream ended before the kill"
    os.kill(pid, signal.SIGKILL)
    t.join(60)
    assert broke and isinstance(broke[0], httpx.TransportError), broke
    wait_for(lambda: component(state, "activator")[1] == restarts + 1, 30, "the activator restarted")
    # Once it answers, the autoscaler has pushed the service's endpoints (it heard a new activator):
    # the warm instance serves, no cold start.
    def listening() -> bool:
        try:
            return httpx.get(f"{doc['activator']}/v1/models", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(listening, 30, "the restarted activator answers")
    wait_for(lambda: [m["id"] for m in httpx.get(f"{doc['activator']}/v1/models").json()["data"]] == ["tiny"],
             3, "the restarted activator knows the service (its first report brings the endpoints)")
    again = invoke(doc["activator"], "tiny", "default", "Hello", 4, seed=1)
    assert again["text"] == first["text"] and again["instance"] == first["instance"]
    assert len(services(doc)["default/tiny"]["placements"]) == placed
    log = (state / "logs" / "autoscaler.log").read_text()
    assert "an activator started: pushing every service's endpoints" in log


def test_a_killed_loader_is_restarted_with_its_tiers(cluster) -> None:
    from sllm_knative.loader.client import LoaderClient
    from sllm_knative.loader.errors import LoaderError

    state, doc = cluster
    node = doc["nodes"][0]
    invoke(doc["activator"], "tiny", "default", "Hello", 4, seed=1)  # its checkpoint is in the node's tiers
    with LoaderClient(node["loader"], timeout=10) as c:
        before = {(t.name, e.model) for t in c.inventory().tiers for e in t.entries if e.state == "ready"}
    assert ("dram", next(iter(m for _, m in before))) in before, before  # the checkpoint is in DRAM
    pid, restarts = component(state, "loader node-1")
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: component(state, "loader node-1")[1] == restarts + 1, 30, "the loader restarted")

    def inventory() -> set[tuple[str, str]] | None:
        try:
            with LoaderClient(node["loader"], timeout=2) as c:
                return {(t.name, e.model) for t in c.inventory().tiers for e in t.entries if e.state == "ready"}
        except LoaderError:  # not listening yet
            return None

    wait_for(lambda: inventory() == before, 60, "the restarted loader has its tiers back")
    # The cluster still serves.
    assert invoke(doc["activator"], "tiny", "default", "Hello", 4, seed=1)["text"]


def test_a_killed_autoscaler_is_restarted_adopts_its_instances_and_serves_held_requests(cluster, tmp_path) -> None:
    state, doc = cluster
    # A second service, at zero: a request for it waits in the activator while the autoscaler is down.
    store = next(iter(services(doc).values()))["model"].rsplit("/", 1)[0]
    (tmp_path / "cold.yaml").write_text("---\n".join([ALLOW_ZERO_INITIAL_SCALE, service_manifest(
        "cold", f"{store}/tiny", keep_alive="600s", initial_scale=0)]))
    cli(state, "apply", "-f", str(tmp_path / "cold.yaml"))
    warm = invoke(doc["activator"], "tiny", "default", "Hello", 4, seed=1)
    before = {k: [i["id"] for i in s["instances"]] for k, s in services(doc).items()}
    assert before == {"default/tiny": [warm["instance"]], "default/cold": []}, before
    pid, restarts = component(state, "autoscaler")
    os.kill(pid, signal.SIGKILL)
    held: dict = {}
    t = threading.Thread(target=lambda: held.update(invoke(doc["activator"], "cold", "default", "Hi", 4, seed=1)))
    t.start()
    # Meanwhile the warm instance still serves: the activator has its rotation.
    assert invoke(doc["activator"], "tiny", "default", "Hello", 4, seed=1)["text"] == warm["text"]
    wait_for(lambda: component(state, "autoscaler")[1] == restarts + 1, 30, "the autoscaler restarted")
    t.join(120)
    assert held.get("text"), "the request held while the autoscaler was down was not served"
    after = {k: [i["id"] for i in s["instances"]] for k, s in services(doc).items()}
    # The running instance was adopted (the same one, not a second), the held request got one.
    assert after["default/tiny"] == before["default/tiny"], after
    assert len(after["default/cold"]) == 1, after
    log = (state / "logs" / "autoscaler.log").read_text()
    assert "instance adopted" in log and "restarted: journal replayed" in log
    # Exactly the instances the autoscaler knows run on the node: no orphan.
    records = sorted(p.stem for p in (state / "instances").glob("*.json"))
    assert records == sorted(after["default/tiny"] + after["default/cold"]), records
    zygote, _ = component(state, "zygote node-1")  # instances are the zygote's children
    children = Path(f"/proc/{zygote}/task/{zygote}/children").read_text().split()
    assert len(children) == len(records), (children, records)


def test_a_killed_instance_s_stream_goes_on_from_its_last_export_on_the_replacement(cluster) -> None:
    """kill -9 of the service's only instance mid-stream (the official openai client, seeded
    sampling): the activator resumes the stream from its last export of the generation's state
    (every second) on the instance the autoscaler starts in its place, and the client gets
    exactly the text of an undisturbed run, with no error and one [DONE]."""
    from openai import OpenAI

    state, doc = cluster
    client = OpenAI(base_url=f"{doc['activator']}/v1", api_key="unused", max_retries=0, timeout=300)
    req = {"model": "tiny", "prompt": "A long story", "max_tokens": 1500, "temperature": 1.0, "seed": 2,
           "extra_body": {"ignore_eos": True}}

    def run(on_chunk: Any = None) -> str:
        text = []
        for chunk in client.completions.create(stream=True, **req):
            text.append(chunk.choices[0].text if chunk.choices else "")
            if on_chunk is not None:
                on_chunk()
        return "".join(text)

    want = run()  # undisturbed; warms the service
    [inst] = services(doc)["default/tiny"]["instances"]
    def exports() -> float:
        return counters(doc["activator_admin"], "activator_stream_exports")["ok"]

    exported = exports()
    outcome: dict = {"chunks": 0}

    def reader() -> None:
        try:
            outcome["text"] = run(lambda: outcome.update(chunks=outcome["chunks"] + 1))
        except Exception as exc:  # the openai client raises an error event as APIError
            outcome["error"] = f"{type(exc).__name__}: {exc}"

    t = threading.Thread(target=reader)
    t.start()
    wait_for(lambda: exports() > exported and outcome["chunks"] > 0, 60, "an export of the stream's state")
    assert "text" not in outcome, "the stream ended before the kill: make it longer"
    os.kill(inst["pid"], signal.SIGKILL)
    t.join(240)
    assert not t.is_alive(), "the client hangs"
    assert "error" not in outcome, outcome
    assert outcome["text"] == want
    after = [i["id"] for i in services(doc)["default/tiny"]["instances"]]
    assert inst["id"] not in after and len(after) == 1, after
    log = (state / "logs" / "activator.log").read_text()
    assert "resuming it from its last export" in log and "outcome=recovered" in log


def test_a_killed_zygote_is_restarted_its_instances_go_and_the_next_request_starts_one(cluster) -> None:
    state, doc = cluster
    first = invoke(doc["activator"], "tiny", "default", "Hello", 4, seed=1)  # warm: an instance of node-1's zygote
    pid, restarts = component(state, "zygote node-1")
    os.kill(pid, signal.SIGKILL)  # its instances die with it (PR_SET_PDEATHSIG)
    wait_for(lambda: component(state, "zygote node-1")[1] == restarts + 1, 30, "the zygote restarted")
    wait_for(lambda: first["instance"] not in {i["id"] for i in services(doc)["default/tiny"]["instances"]}, 30,
             "the autoscaler to see the zygote's instance gone")
    # The next request cold-starts an instance from the new zygote (once it has imported again).
    again = invoke(doc["activator"], "tiny", "default", "Hello", 4, seed=1, timeout=180)
    assert again["text"] == first["text"] and again["instance"] != first["instance"]
    lines = (state / "up.log").read_text().splitlines()
    assert any("component exited; restarting it" in ln and 'component="zygote node-1"' in ln for ln in lines)
