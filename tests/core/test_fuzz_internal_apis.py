"""A hypothesis fuzzer on the internal APIs' typed messages (sllm_knative/api/), over real HTTP:

- the activator's admin API (activator/admin.py) in a real `python -m activator` process:
  ServiceUpdate (PUT services), MigrateRequest, WithholdRequest, DrainRequest;
- the autoscaler's API (autoscaler/server.py) as served by uvicorn in this process over the
  in-memory backend (tests/autoscaler/cluster.py, as test_server_bodies.py does; a real
  autoscaler process needs nodes and loaders): Demand and StatsReport, and the CLI's untyped
  /v1/apply (YAML documents: a Service and its ScalingPolicy mutated; 200 or 400, never 500).

Bodies are valid messages with one to three values replaced by arbitrary JSON or removed
(tests/json_mutation.py), arbitrary JSON documents, and bytes that are not JSON. The answer must
be the one the message type gives: a 400 naming the first bad field (`{"error", "field"}`, the
message starting with the field) exactly when the body does not validate, otherwise a 2xx or the
API's documented refusal of a valid body (404 unknown service, 409 nowhere to migrate); never a
500. Both servers must answer normally afterwards.

SLLM_FUZZ_EXAMPLES (default 250) sets the bodies per message type; SLLM_FUZZ_RANDOM=1 draws new ones
instead of the fixed (derandomized) ones.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from activator.upstream import parse_origin
from autoscaler.server import build_app
from sllm_knative.api import activator as admin_api
from sllm_knative.api import autoscaler as scaler_api
from sllm_knative.api.wire import InvalidBody, Message, parse_json
from sllm_knative.placement import Tier
from sllm_knative.ports import free_port
from testkit.proc import Proc
from tests.autoscaler.cluster import Cluster, node, service
from tests.json_mutation import json_values, mutated

EXAMPLES = int(os.environ.get("SLLM_FUZZ_EXAMPLES", "250"))  # per message type
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    derandomize=os.environ.get("SLLM_FUZZ_RANDOM") != "1",  # 1: new cases each run
                    suppress_health_check=list(HealthCheck))

# The valid bodies mutated. A migration's service is known and has no instance (so a valid request is
# answered at once: nothing to migrate), the updates go to their own service, instance URLs are a
# closed loopback port (a request that reached one would be refused at once, never wait).
DEAD = "http://127.0.0.1:9"
ENDPOINT = {"id": "i1", "url": DEAD, "node": "n1", "internal_url": DEAD, "capacity": 2}
ADMIN_BODIES: dict[str, tuple[type[Message], Callable[[], Any], tuple[int, ...]]] = {
    "update": (admin_api.ServiceUpdate, lambda: {"container_concurrency": 4, "hold_timeout_s": 5.0,
                                                  "instances": [dict(ENDPOINT), {**ENDPOINT, "id": "i2"}]}, (200,)),
    "migrate": (admin_api.MigrateRequest, lambda: {"namespace": "default", "name": "fuzz-m", "source": "i1",
                                                   "destination": "i2"}, (200, 404, 409)),
    "withhold": (admin_api.WithholdRequest, lambda: {"namespace": "default", "name": "fuzz-m", "instance": "i1",
                                                     "withheld": True}, (200, 404)),
    "drain": (admin_api.DrainRequest, lambda: {"instance": "nobody"}, (200,)),
}
ADMIN_PATHS = {"update": admin_api.service_path(admin_api.ServiceKey("default", "fuzz-u")),
               "migrate": admin_api.MIGRATE, "withhold": admin_api.WITHHOLD, "drain": admin_api.DRAIN}

STATS = {"namespace": "default", "name": "a", "average_concurrency": 1.5, "requests": 3, "in_flight": 2, "held": 1,
         "oldest_held_s": 0.5, "seconds": 1.0, "instances": [{"id": "i1", "outstanding": 2}]}
SCALER_BODIES: dict[str, tuple[type[Message], Callable[[], Any]]] = {
    scaler_api.DEMAND: (scaler_api.Demand, lambda: {"namespace": "default", "name": "a", "in_flight": 1}),
    scaler_api.STATS: (scaler_api.StatsReport, lambda: copy.deepcopy({"services": [STATS, {**STATS, "name": "b"}],
                                                                      "boot": "fuzz-boot"})),
}


def bodies(make: Callable[[], Any]) -> st.SearchStrategy[bytes]:
    """Raw bodies: a mutated valid one (most), any JSON document, or bytes that may not be JSON."""
    def dump(doc: Any) -> bytes:
        return json.dumps(doc).encode()

    return st.one_of(
        mutated(make).map(dump), mutated(make).map(dump), mutated(make).map(dump),
        json_values().map(dump),
        st.just(make()).map(dump),
        st.binary(max_size=64),
        st.text(max_size=32).map(str.encode),
    )


def expected_invalid(model: type[Message], raw: bytes) -> InvalidBody | None:
    """The refusal the message type gives this body, if any (what the server must answer)."""
    try:
        msg = parse_json(model, raw)
    except InvalidBody as exc:
        return exc
    if isinstance(msg, admin_api.ServiceUpdate):  # the admin API's one check beyond the type
        for i, e in enumerate(msg.instances):
            try:
                parse_origin(e.url)
            except (ValueError, httpx.UnsupportedProtocol) as exc:
                return InvalidBody(f"instances[{i}].url", f"instances[{i}].url: {exc}")
    return None


def check_answer(r: httpx.Response, model: type[Message], raw: bytes, ok: tuple[int, ...]) -> None:
    where = f"{r.status_code} {r.text[:500]} for {raw[:300]!r}"
    assert r.status_code < 500, where
    bad = expected_invalid(model, raw)
    if bad is None:
        assert r.status_code in ok, where
        return
    assert r.status_code == 400, where
    body = r.json()
    assert set(body) == {"error", "field"} and isinstance(body["error"], str), where
    assert body["field"] == bad.field, where
    if bad.field is not None:
        assert bad.field in body["error"], where
    else:  # only a body that is no object names no field
        try:
            doc = json.loads(raw)
        except ValueError:
            return
        assert not isinstance(doc, dict), where


class Activator(Proc):
    def __init__(self, log: Path) -> None:
        super().__init__("activator")
        self.port, self.admin_port = free_port(), free_port()
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        self.start([sys.executable, "-m", "activator", "--port", str(self.port), "--admin-port", str(self.admin_port)],
                   log, unset=("SLLM_INTERNAL_TOKEN",))


@pytest.fixture(scope="module")
def activator(tmp_path_factory) -> Iterator[Activator]:
    act = Activator(tmp_path_factory.mktemp("fuzz-activator") / "activator.log")
    try:
        act.wait_http(f"{act.admin}{admin_api.METRICS}", timeout=30)
        r = httpx.put(f"{act.admin}{admin_api.SERVICES}/default/fuzz-m", json={"instances": []}, timeout=5)
        assert r.status_code == 200, r.text
        yield act
    finally:
        act.stop()


@pytest.mark.parametrize("kind", list(ADMIN_BODIES))
def test_admin_api_fuzzed(activator, kind):
    model, make, ok = ADMIN_BODIES[kind]
    url = activator.admin + ADMIN_PATHS[kind]
    method = "PUT" if kind == "update" else "POST"
    statuses: dict[int, int] = {}
    with httpx.Client(timeout=10) as client:
        @SETTINGS
        @given(raw=bodies(make))
        def one(raw: bytes) -> None:
            r = client.request(method, url, content=raw, headers={"content-type": "application/json"})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            check_answer(r, model, raw, ok)

        one()
        assert statuses.get(400, 0) >= EXAMPLES // 4, statuses  # it fuzzed, and mostly past the parser
        assert sum(n for s, n in statuses.items() if s in ok) >= 1, statuses
        assert client.request(method, url, json=make()).status_code in ok  # the valid body, still served
        assert activator.alive(), activator.tail()
        assert client.get(f"{activator.admin}{admin_api.STATS}").status_code == 200
        r = client.put(f"{activator.admin}{ADMIN_PATHS['update']}", json=ADMIN_BODIES["update"][1]())
        assert r.status_code == 200 and r.json()["instances"] == 2, r.text
    assert "Traceback" not in activator.log()


@pytest.fixture(scope="module")
def autoscaler() -> Iterator[str]:
    """The autoscaler's app over real HTTP (uvicorn in a thread), services a and b deployed."""
    loop = asyncio.new_event_loop()
    cluster = Cluster([node("n1", a=Tier.SSD, b=Tier.SSD)])
    loop.run_until_complete(cluster.deploy(service("a"), service("b")))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(cluster.scaler), host="127.0.0.1", port=port,
                                           log_level="warning", loop="asyncio"))
    thread = threading.Thread(target=lambda: loop.run_until_complete(server.serve()), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(250):
        try:
            httpx.get(f"{url}/livez", timeout=1)
            break
        except httpx.HTTPError:
            threading.Event().wait(0.02)
    yield url
    server.should_exit = True
    thread.join(10)


@pytest.mark.parametrize("path", list(SCALER_BODIES))
def test_autoscaler_api_fuzzed(autoscaler, path):
    model, make = SCALER_BODIES[path]
    statuses: dict[int, int] = {}
    with httpx.Client(timeout=10) as client:
        @SETTINGS
        @given(raw=bodies(make))
        def one(raw: bytes) -> None:
            r = client.post(autoscaler + path, content=raw, headers={"content-type": "application/json"})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            check_answer(r, model, raw, (204,))

        one()
        assert statuses.get(400, 0) >= EXAMPLES // 4 and statuses.get(204, 0) >= 1, statuses
        assert client.post(autoscaler + path, json=make()).status_code == 204
        assert client.get(f"{autoscaler}/livez").status_code == 200
        assert client.get(f"{autoscaler}/v1/services").status_code == 200


def test_autoscaler_apply_fuzzed(autoscaler):
    """POST /v1/apply (the CLI's, YAML): a Service and its ScalingPolicy with values replaced or removed
    are applied (200) or refused with the reason (400), never a 500."""
    docs = list(yaml.safe_load_all(service("fz", initial_scale=None)))
    statuses: dict[int, int] = {}
    with httpx.Client(timeout=10) as client:
        @SETTINGS
        @given(raw=st.one_of(mutated(lambda: copy.deepcopy(docs)).map(lambda d: yaml.safe_dump_all(d).encode()),
                             st.binary(max_size=64)))
        def one(raw: bytes) -> None:
            r = client.post(f"{autoscaler}/v1/apply", content=raw, headers={"content-type": "application/yaml"})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code in (200, 400), f"{r.status_code} {r.text[:500]} for {raw[:600]!r}"
            if r.status_code == 400:
                assert r.json()["error"], r.text

        one()
        assert statuses.get(400, 0) >= EXAMPLES // 4 and statuses.get(200, 0) >= 1, statuses
        assert client.get(f"{autoscaler}/livez").status_code == 200
        assert client.get(f"{autoscaler}/v1/services").status_code == 200
