"""The local cluster end to end: real processes (loader sidecars, zygotes, function instances,
activator, autoscaler), real HTTP and gRPC, the official openai client."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from sllm_knative.commands.resources import invoke
from sllm_knative.local import procs
from sllm_knative.local.manifests import service_manifest
from sllm_knative.ports import free_port as _free_port
from tests.local.util import wait_for

CLI = [sys.executable, "-m", "sllm_knative.cli"]


def cli(state: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([*CLI, *args, "--state-dir", str(state)], capture_output=True, text=True, timeout=120)
    if check and r.returncode != 0:
        raise AssertionError(f"{args}: {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    from sllm_knative.convert import convert
    from sllm_knative.models import build_model

    root = tmp_path_factory.mktemp("store")
    convert(build_model(root.parent / "hf-tiny"), root / "tiny")
    return root


@pytest.fixture(scope="module")
def cluster(store: Path, tmp_path_factory) -> Iterator[tuple[Path, dict]]:
    state = tmp_path_factory.mktemp("state")
    port = _free_port()
    cli(state, "up", "--detach", "--nodes", "2", "--slots", "2", "--store", f"file://{store}",
        "--port", str(port), "--dram-gb", "1", "--ssd-gb", "1")
    doc = json.loads((state / "cluster.json").read_text())
    (state / "svc.yaml").write_text(service_manifest("tiny", f"file://{store}/tiny", keep_alive="3s",
                                                     container_concurrency=1))
    out = cli(state, "apply", "-f", str(state / "svc.yaml")).stdout
    assert "service/default/tiny created" in out
    yield state, doc
    cli(state, "down", check=False)


def services(doc: dict) -> dict:
    return {s["key"]: s for s in httpx.get(f"{doc['autoscaler']}/v1/services").json()["services"]}


def test_cold_then_warm_invoke(cluster) -> None:
    state, doc = cluster
    cold = invoke(doc["activator"], "tiny", "default", "Hello", 6, seed=1)
    warm = invoke(doc["activator"], "tiny", "default", "Hello", 6, seed=1)
    assert cold["text"] and cold["text"] == warm["text"]  # greedy: the same answer
    # containerConcurrency 1 at Knative's 70% target: one waiting request may ask for two
    # instances, so the warm request may go to either; both must be ready ones.
    ready = {i["id"] for i in services(doc)["default/tiny"]["instances"] if i["state"] == "ready"}
    assert {cold["instance"], warm["instance"]} <= ready
    # Each instance is given its share of the node: this machine's cores over the node's 2 slots
    # (exact numerics, the CPU default, computes with one thread whatever the share).
    for i in services(doc)["default/tiny"]["instances"]:
        if i["state"] == "ready":
            compute = i["report"]["compute"]
            assert {k: compute.get(k) for k in ("numerics", "threads", "threads_setting")} == {
                "numerics": "exact", "threads": 1, "threads_setting": max(1, (os.cpu_count() or 1) // 2)}, i
    assert warm["ttft_s"] < cold["ttft_s"]
    listing = cli(state, "get", "instances").stdout
    assert "ready" in listing and cold["instance"] in listing
    metrics = httpx.get(f"{doc['autoscaler']}/metrics").text
    first = re.search(r'autoscaler_cold_starts_total\{service="default/tiny",tier="remote"\} (\d+)', metrics)
    assert first and int(first.group(1)) >= 1, metrics  # the first instance's checkpoint came from the store
    # Every node's loader serves its Prometheus metrics (`up` passes --metrics), and the node the
    # cold start ran on shows the fill from the store into its tiers.
    served = {n["name"]: httpx.get(n["metrics"]).text for n in doc["nodes"]}
    assert all("sllm_loader_tier_capacity_bytes" in m for m in served.values()), served
    moved = [float(v) for m in served.values()
             for v in re.findall(r'sllm_loader_transfer_bytes_total\{hop="remote"\} (\S+)', m)]
    assert moved and max(moved) > 0, served


def test_openai_client_streams_through_the_activator(cluster) -> None:
    from openai import OpenAI

    _, doc = cluster
    client = OpenAI(base_url=f"{doc['activator']}/v1", api_key="unused")
    stream = client.completions.create(model="tiny", prompt="Serverless", max_tokens=5, stream=True, temperature=0)
    pieces = [c.choices[0].text for c in stream if c.choices]
    plain = client.completions.create(model="tiny", prompt="Serverless", max_tokens=5, temperature=0)
    assert "".join(pieces) == plain.choices[0].text
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert chat.choices[0].message.role == "assistant"


def test_unknown_model_and_host_are_404(cluster) -> None:
    _, doc = cluster
    r = httpx.post(f"{doc['activator']}/v1/completions", json={"model": "missing", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(f"{doc['activator']}/v1/completions", json={"prompt": "x"},
                   headers={"host": "missing.default.example.com"})
    assert r.status_code == 404


def test_the_activator_lists_its_services_and_names_a_bad_body(cluster) -> None:
    """What applications do first (list the models) and get wrong (a body that is not JSON), through
    the activator's base URL with the official client: OpenAI's shapes, not a routing 404."""
    import openai

    _, doc = cluster
    client = openai.OpenAI(base_url=f"{doc['activator']}/v1", api_key="unused", max_retries=0)
    placed = len(services(doc)["default/tiny"]["placements"])
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").owned_by == "sllm-knative"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("missing")
    assert len(services(doc)["default/tiny"]["placements"]) == placed  # answered without a cold start
    for body, message in [(b"{not json", "not valid JSON"), (b'["tiny"]', "must be a JSON object"),
                          (b'{"prompt": "hi"}', "names no 'model'")]:
        r = httpx.post(f"{doc['activator']}/v1/completions", content=body,
                       headers={"content-type": "application/json"})
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
        assert r.json()["error"]["type"] == "invalid_request_error"
    # The CLI says it in one line, without a traceback.
    state, _ = cluster
    r = cli(state, "invoke", "missing", check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == ("error: /v1/completions for service default/missing: HTTP 404: "
                                "no service serves model 'missing'"), r.stderr


def internal_routes() -> list[tuple[str, str]]:
    """(method, path) of every route of the instance's internal API and the activator's admin
    API, from their route tables (a new route is covered without touching this test); path
    parameters filled in. The health and metrics routes both apps share with public ones are left out."""
    from starlette.routing import Route

    from activator.admin import build_admin_app
    from functions.llm.app import COMMON_ROUTES
    from functions.llm.internal import build
    from sllm_knative.api import activator as admin_api

    public = {r.path for r in COMMON_ROUTES} | {admin_api.METRICS}
    # Built for their route tables only: nothing is served, so the apps get only the attributes
    # their builders read.
    service = SimpleNamespace(cfg=SimpleNamespace(internal_token=None), metrics=SimpleNamespace(requests=None))
    act = SimpleNamespace(registry=None, migrations=None)
    found = []
    for app in (build(service), build_admin_app(act)):  # type: ignore[arg-type]
        for r in app.routes:
            if isinstance(r, Route) and r.path not in public:
                path = re.sub(r"\{[^}:]+(:[^}]+)?\}", "x", r.path)
                found += [(m, path) for m in sorted(r.methods or ()) if m != "HEAD"]
    return found


def test_internal_paths_are_never_forwarded_and_private_files_are_owner_only(cluster) -> None:
    from sllm_knative.loader.client import LoaderClient

    _, doc = cluster
    routes = internal_routes()
    assert {p.split("/")[1] for _, p in routes} == {"internal", "admin"} and len(routes) >= 10, routes
    host = {"host": "tiny.default.example.com"}  # a service that exists: only the path is refused
    for method, path in routes:
        for spelling in (path, "/v1/../" + path.lstrip("/"), "/" + path, path.replace("/v1/", "/./v1/")):
            r = httpx.request(method, f"{doc['activator']}{spelling}", headers=host, json={}, timeout=30)
            assert r.status_code == 404 and "no route for" in r.json()["error"]["message"], (method, spelling, r.text)
            assert "x-sllm-instance" not in r.headers, (method, spelling)  # answered by the activator itself
    # The nodes' private files: the loader's and the zygote's sockets are their owner's, and the
    # tiers and sockets sit under a folder nobody else may enter.
    for n in doc["nodes"]:
        with LoaderClient(n["loader"], timeout=10) as client:
            tiers = [Path(t.directory) for t in client.inventory().tiers]
        sockets = [Path(n["loader"].removeprefix("unix://")), Path(n["zygote"])]
        for p in sockets:
            assert p.stat().st_mode & 0o777 == 0o600, f"{p} is {oct(p.stat().st_mode & 0o777)}"
        for p in [*sockets, *tiers]:
            # `up` closes the node folders' roots, one or two levels up (not some folder far
            # above, such as pytest's own temporary root).
            closed = [a for a in p.parents[:2] if a.stat().st_mode & 0o077 == 0 and a.stat().st_uid == os.getuid()]
            assert closed, f"{p}: neither of the two folders above it is closed to group and others"


def test_load_scales_to_two_then_back_and_to_zero_then_cold_start_lands_on_dram(cluster) -> None:
    state, doc = cluster
    # containerConcurrency 1, target 70%: six streams at once ask for more than max-scale 2.
    # The load lasts several autoscaler ticks (2 s), so the decision cannot fall between two.
    seen_two = []

    def watch() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not seen_two:
            if services(doc)["default/tiny"]["ready"] == 2:
                seen_two.append(time.monotonic())
            time.sleep(0.1)

    with ThreadPoolExecutor(7) as pool:
        watcher = pool.submit(watch)
        results = list(pool.map(lambda i: invoke(doc["activator"], "tiny", "default", f"load {i}", 400), range(6)))
        watcher.result()
    assert all(r["text"] for r in results)
    assert seen_two, "the service never reached two ready instances under load"
    nodes = {i["node"] for i in services(doc)["default/tiny"]["instances"]}
    # Load gone: back down, then to zero after the keep-alive (3 s).
    wait_for(lambda: services(doc)["default/tiny"]["ready"] == 0 and not services(doc)["default/tiny"]["instances"],
             60, "scale to zero")
    # Scaled to zero, the checkpoint stays in the DRAM tier of every node that ran an instance
    # under the load: the next cold start goes to one of them.
    inv = httpx.get(f"{doc['autoscaler']}/v1/nodes").json()["nodes"]
    in_dram = {n["name"] for n in inv for t in n.get("tiers", []) if t["name"] == "dram"
               for c in t["checkpoints"] if c["model"].endswith("/tiny") and c["state"] == "ready"}
    assert nodes and nodes <= in_dram, (nodes, in_dram)
    again = invoke(doc["activator"], "tiny", "default", "again", 4)
    placed = services(doc)["default/tiny"]["placements"][-1]
    assert placed["node"] in in_dram, json.dumps(services(doc)["default/tiny"]["placements"], indent=1)
    assert placed["tier"] == "dram", placed
    assert again["text"]


def test_kill_9_of_up_leaves_no_orphans_and_a_new_up_cleans(store: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    cli(state, "up", "--detach", "--nodes", "1", "--store", f"file://{store}", "--port", str(_free_port()),
        "--dram-gb", "1", "--ssd-gb", "1")
    doc = json.loads((state / "cluster.json").read_text())
    children = doc["groups"]
    assert children and all(procs.alive(p) for p in children)
    os.kill(doc["pid"], signal.SIGKILL)
    wait_for(lambda: not any(procs.alive(p) for p in children), 20, "children to die with up")
    r = cli(state, "get", "services", check=False)
    assert r.returncode == 2 and "not running" in r.stderr
    cli(state, "up", "--detach", "--nodes", "1", "--store", f"file://{store}", "--port", str(_free_port()),
        "--dram-gb", "1", "--ssd-gb", "1")
    assert "no local cluster" not in cli(state, "down").stdout
    assert not (state / "cluster.json").exists()
