"""The autoscaler's API validates the activator's reports where they arrive: over real HTTP, a
malformed /v1/stats or /v1/demand body is a 400 naming the field, never a 500; a good one acts."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from autoscaler.server import build_app
from sllm_knative.api.autoscaler import DEMAND, STATS
from sllm_knative.placement import Tier
from sllm_knative.ports import free_port
from tests.autoscaler.cluster import Cluster, node, service


@pytest.fixture
def served() -> Iterator[tuple[str, Cluster]]:
    loop = asyncio.new_event_loop()
    cluster = Cluster([node("n1", a=Tier.SSD)])
    loop.run_until_complete(cluster.deploy(service("a")))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(cluster.scaler), host="127.0.0.1", port=port,
                                           log_level="warning", loop="asyncio"))
    t = threading.Thread(target=lambda: loop.run_until_complete(server.serve()), daemon=True)
    t.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            httpx.get(f"{url}/v1/services", timeout=1)
            break
        except httpx.HTTPError:
            threading.Event().wait(0.02)
    yield url, cluster
    server.should_exit = True
    t.join(10)


STATS_OK = {"namespace": "default", "name": "a", "average_concurrency": 1.5, "requests": 3, "in_flight": 2,
            "seconds": 1.0, "instances": [{"id": "i1", "outstanding": 2}]}


@pytest.mark.parametrize(("path", "body", "field"), [
    (DEMAND, b"[1, 2]", None),
    (DEMAND, b"not json", None),
    (DEMAND, b'{"name": "a"}', "namespace"),
    (DEMAND, b'{"namespace": "default", "name": ""}', "name"),
    (DEMAND, b'{"namespace": "default", "name": "a", "in_flight": "2"}', "in_flight"),
    (DEMAND, b'{"namespace": "default", "name": "a", "in_flight": -1}', "in_flight"),
    (STATS, b'{"services": {"namespace": "default"}}', "services"),
    (STATS, b'{"services": [{"namespace": "default", "name": "a"}]}', "services[0].average_concurrency"),
    (STATS, b'{"services": [{"namespace": "default", "name": "a", "average_concurrency": 1, "requests": 1,'
            b' "in_flight": 1, "seconds": 1, "instances": [{"id": "i1"}]}]}', "services[0].instances[0].outstanding"),
    (STATS, b'{"services": [{"namespace": "default", "name": "a", "average_concurrency": "x", "requests": 1,'
            b' "in_flight": 1, "seconds": 1}]}', "services[0].average_concurrency"),
])
def test_malformed_report_is_400_naming_the_field(served, path: str, body: bytes, field: str | None) -> None:
    url, _ = served
    r = httpx.post(f"{url}{path}", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["field"] == field
    if field:
        assert r.json()["error"].startswith(f"{field}:")


def test_good_reports_act(served) -> None:
    url, cluster = served
    assert httpx.post(f"{url}{STATS}", json={"services": [STATS_OK]}).status_code == 204
    rt = cluster.rt("a")
    assert (rt.in_flight, rt.outstanding) == (2, {"i1": 2})
    assert httpx.post(f"{url}{DEMAND}", json={"namespace": "default", "name": "a", "in_flight": 1}).status_code == 204
