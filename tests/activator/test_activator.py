"""The activator as a process in front of real HTTP upstream processes."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from sllm_knative.api import activator as admin_api
from sllm_knative.api import auth
from sllm_knative.api import autoscaler as autoscaler_api
from sllm_knative.api.keys import ServiceKey
from sllm_knative.ports import free_port
from testkit.proc import Proc

HERE = Path(__file__).parent


class Upstream(Proc):
    def __init__(self, name: str, logs: Path) -> None:
        super().__init__(f"upstream {name}")
        self.name, self.port = name, free_port()
        self.start([sys.executable, str(HERE / "upstream.py"), str(self.port)], logs / f"upstream-{name}.log",
                   env={"UPSTREAM_NAME": name})
        self.wait_http(f"{self.url}/", timeout=20, statuses=None, interval=0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class DemandRecorder(BaseHTTPRequestHandler):
    """Stands in for the autoscaler's HTTP endpoint: records what the activator reports."""

    seen: list[tuple[str, dict]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server API
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        DemandRecorder.seen.append((self.path, body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def recorder() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), DemandRecorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def activator(recorder: str, tmp_path_factory) -> Iterator[tuple[str, str]]:
    port, admin = free_port(), free_port()
    proc = Proc("activator").start(
        [sys.executable, "-m", "activator", "--port", str(port), "--admin-port", str(admin), "--autoscaler-url",
         recorder, "--cold-start-timeout", "3", "--max-body-bytes", "4096", "--report-interval", "0.2"],
        tmp_path_factory.mktemp("activator") / "activator.log")
    try:
        proc.wait_http(f"http://127.0.0.1:{admin}/metrics", timeout=20, statuses=None, interval=0.05)
        yield f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}"
    finally:
        proc.stop(grace=10)


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory) -> Iterator[list[Upstream]]:
    logs = tmp_path_factory.mktemp("upstreams")
    ups = [Upstream("a", logs), Upstream("b", logs)]
    yield ups
    for u in ups:
        u.kill()


def put(admin: str, name: str, instances: list[dict], cc: int = 0, ns: str = "default") -> None:
    r = httpx.put(f"{admin}{admin_api.service_path(ServiceKey(ns, name))}",
                  json={"container_concurrency": cc, "instances": instances})
    assert r.status_code == 200, r.text


def test_routes_by_host_and_by_model(activator, upstreams) -> None:
    public, admin = activator
    put(admin, "llama", [{"id": "a", "url": upstreams[0].url}])
    r = httpx.post(f"{public}/v1/completions", json={"model": "llama"})
    assert r.status_code == 200 and r.json()["instance"] == "a"
    assert r.headers["x-sllm-instance"] == "a"
    r = httpx.post(f"{public}/v1/completions", json={}, headers={"host": "llama.default.example.com"})
    assert r.status_code == 200 and r.json()["instance"] == "a"


@pytest.mark.parametrize(("kwargs", "status", "code"), [
    pytest.param({"json": {"model": "nope"}}, 404, "model_not_found", id="unknown-model"),
    pytest.param({"json": {}, "headers": {"host": "nope.default.example.com"}}, 404, "model_not_found",
                 id="unknown-host"),
    pytest.param({"content": b"x" * 5000}, 413, "request_too_large", id="body-too-large"),
])
def test_bad_requests_get_openai_errors(activator, kwargs, status, code) -> None:
    public, _ = activator
    r = httpx.post(f"{public}/v1/completions", **kwargs)
    assert r.status_code == status
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]


def raw_http(url: str, request: bytes) -> bytes:
    """Send request bytes exactly as given (no client-side normalisation); the whole answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


@pytest.mark.parametrize("target", [
    pytest.param("/internal/export", id="plain"),
    pytest.param("/%69nternal/export", id="percent-encoded"),
    pytest.param("/v1/../internal/export", id="dot-segments"),
    pytest.param("//internal/export", id="double-slash"),
])
def test_internal_paths_are_not_forwarded(activator, upstreams, target: str) -> None:
    public, admin = activator
    put(admin, "llama", [{"id": "a", "url": upstreams[0].url}])
    answer = raw_http(public, f"GET {target} HTTP/1.1\r\nHost: llama.default.example.com\r\n"
                              "Connection: close\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 404 ")
    assert b"secret" not in answer


def test_target_is_forwarded_as_received(activator, upstreams) -> None:
    public, admin = activator
    put(admin, "llama", [{"id": "a", "url": upstreams[0].url}])
    r = httpx.post(f"{public}/v1/completions?x=1%2F2&y", json={"model": "llama"})
    assert r.status_code == 200
    assert (r.json()["raw_path"], r.json()["query"]) == ("/v1/completions", "x=1%2F2&y")
    assert r.json()["host"] == upstreams[0].url.removeprefix("http://")  # the instance's own address


def test_streams_pass_through_chunk_by_chunk(activator, upstreams) -> None:
    public, admin = activator
    put(admin, "llama", [{"id": "a", "url": upstreams[0].url}])
    arrivals = []
    t0 = time.monotonic()
    with httpx.stream("POST", f"{public}/v1/completions",
                      json={"model": "llama", "stream": True, "n_chunks": 4, "delay": 0.5}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic() - t0)
    assert len(arrivals) == 5  # 4 chunks + [DONE]
    # The upstream produces a chunk every 0.5 s: relayed one by one, they arrive that far apart
    # (a buffering proxy would deliver them together at the end).
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:4], strict=False)]
    assert all(g > 0.3 for g in gaps), f"chunks arrived together: {arrivals}"


def test_cold_start_holds_then_forwards_and_reports_demand(activator, upstreams) -> None:
    public, admin = activator
    put(admin, "cold", [])
    DemandRecorder.seen.clear()

    def later() -> None:
        time.sleep(0.8)
        put(admin, "cold", [{"id": "b", "url": upstreams[1].url}])

    threading.Thread(target=later).start()
    t0 = time.monotonic()
    r = httpx.post(f"{public}/v1/completions", json={"model": "cold"}, timeout=10)
    assert r.status_code == 200 and r.json()["instance"] == "b"
    assert time.monotonic() - t0 >= 0.7
    demands = [autoscaler_api.Demand.model_validate(b) for p, b in DemandRecorder.seen if p == autoscaler_api.DEMAND]
    assert demands and demands[0].key == ServiceKey("default", "cold")
    time.sleep(0.5)
    stats = [autoscaler_api.StatsReport.model_validate(b) for p, b in DemandRecorder.seen if p == autoscaler_api.STATS]
    assert any(s.name == "cold" for doc in stats for s in doc.services)


def test_cold_start_timeout_is_503_with_retry_after(activator) -> None:
    public, admin = activator
    put(admin, "never", [])
    r = httpx.post(f"{public}/v1/completions", json={"model": "never"}, timeout=10)
    assert r.status_code == 503
    assert int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["code"] == "cold_start_timeout"


def test_a_service_hold_timeout_replaces_the_activators(activator) -> None:
    """A revision's responseStartTimeoutSeconds (pushed as hold_timeout_s) bounds the hold, not the
    activator's --cold-start-timeout (3 s here)."""
    public, admin = activator
    r = httpx.put(f"{admin}{admin_api.service_path(ServiceKey('default', 'brief'))}",
                  json={"container_concurrency": 0, "hold_timeout_s": 1.0, "instances": []})
    assert r.status_code == 200, r.text
    t0 = time.monotonic()
    r = httpx.post(f"{public}/v1/completions", json={"model": "brief"}, timeout=10)
    assert r.status_code == 503 and r.json()["error"]["code"] == "cold_start_timeout"
    assert 0.9 <= time.monotonic() - t0 < 2.5, time.monotonic() - t0
    assert r.headers["retry-after"] == "1" and "within 1s" in r.json()["error"]["message"]


def test_instance_dead_before_first_byte_is_retried_once(activator, upstreams, tmp_path) -> None:
    public, admin = activator
    doomed = Upstream("doomed", tmp_path)
    put(admin, "retry", [{"id": "doomed", "url": doomed.url}, {"id": "b", "url": upstreams[1].url}])
    # Least-outstanding with a tie picks the first listed: the doomed instance dies mid-request.
    r = httpx.post(f"{public}/v1/completions", json={"model": "retry", "die": "doomed"}, timeout=10)
    doomed.proc.wait(5)
    assert r.status_code == 200 and r.json()["instance"] == "b"
    metrics = httpx.get(f"{admin}/metrics").text
    assert 'activator_retries_total{service="default/retry"} 1.0' in metrics


def test_container_concurrency_spreads_and_queues(activator, upstreams) -> None:
    public, admin = activator
    put(admin, "cc", [{"id": "a", "url": upstreams[0].url}, {"id": "b", "url": upstreams[1].url}], cc=1)

    async def run() -> list[tuple[str, float]]:
        async with httpx.AsyncClient(timeout=10) as c:
            async def one() -> tuple[str, float]:
                t0 = time.monotonic()
                r = await c.post(f"{public}/v1/completions", json={"model": "cc", "delay": 0.5})
                return r.json()["instance"], time.monotonic() - t0
            return await asyncio.gather(*(one() for _ in range(3)))

    results = asyncio.run(run())
    assert {i for i, _ in results} == {"a", "b"}  # least outstanding spreads the load
    durations = sorted(d for _, d in results)
    assert durations[2] >= 0.9, "the third request waits for a slot (containerConcurrency=1, 2 instances)"


def test_requests_waiting_for_room_are_served_in_arrival_order(activator, upstreams) -> None:
    """One instance, one request at a time: the held requests get the slot in the order they came
    (a request that waited longest is never overtaken by a later one)."""
    public, admin = activator
    put(admin, "fifo", [{"id": "a", "url": upstreams[0].url}], cc=1)

    async def run() -> list[int]:
        done: list[int] = []
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=100)) as c:
            async def one(i: int, at: float) -> None:
                await asyncio.sleep(at)
                r = await c.post(f"{public}/v1/completions", json={"model": "fifo", "delay": 0.1})
                assert r.status_code == 200, r.text
                done.append(i)
            # Requests 0-4, then 10 more, every 50 ms; each holds the slot 100 ms, so the queue
            # grows and newcomers keep landing as the slot frees: one must not take it from a
            # request that waited (the activator holds a request 3 s here). 50 ms, not less: on a
            # loaded machine the client's own sends 20 ms apart were seen to leave out of order.
            await asyncio.gather(*(one(i, 0.05 * i) for i in range(5)),
                                 *(one(5 + k, 0.25 + 0.05 * k) for k in range(10)))
        return done

    order = asyncio.run(run())
    assert order == sorted(order), order


@pytest.mark.parametrize(("instances", "field", "error"), [
    pytest.param([{"id": 1}], "instances[0].id", "valid string", id="id-not-a-string"),
    pytest.param([{"id": "a"}], "instances[0].url", "Field required", id="no-url"),
    pytest.param([{"id": "a", "url": "https://10.0.0.7:8443"}], "instances[0].url", "expected http://host[:port]",
                 id="https"),
    pytest.param([{"id": "a", "url": "http://a:1"}, {"id": "b", "url": "10.0.0.7:8080"}], "instances[1].url",
                 "expected http://host[:port]", id="no-scheme"),
])
def test_admin_rejects_bad_updates(activator, instances: list, field: str, error: str) -> None:
    _, admin = activator
    r = httpx.put(f"{admin}{admin_api.SERVICES}/default/x", json={"instances": instances})
    assert r.status_code == 400 and error in r.json()["error"] and r.json()["field"] == field, r.text


SERVICE_PATH = admin_api.SERVICES + "/default/llama"


@pytest.mark.parametrize(("method", "path", "body", "field"), [
    # PUT the ready instances of a service
    pytest.param("PUT", SERVICE_PATH, {"container_concurrency": "2"}, "container_concurrency", id="update-cc-string"),
    pytest.param("PUT", SERVICE_PATH, {"container_concurrency": -1}, "container_concurrency", id="update-cc-negative"),
    pytest.param("PUT", SERVICE_PATH, {"instances": {"id": "a", "url": "http://a:1"}}, "instances",
                 id="update-instances-not-a-list"),
    pytest.param("PUT", SERVICE_PATH, {"instances": [[{"id": "a", "url": "http://a:1"}]]}, "instances[0]",
                 id="update-instance-nested"),
    pytest.param("PUT", SERVICE_PATH, {"instances": [{"id": "a", "url": "http://a:1", "capacity": True}]},
                 "instances[0].capacity", id="update-capacity-bool"),
    pytest.param("PUT", SERVICE_PATH, [1], None, id="update-not-an-object"),
    # POST migrate
    pytest.param("POST", admin_api.MIGRATE, {"name": "llama", "source": "a"}, "namespace", id="migrate-no-namespace"),
    pytest.param("POST", admin_api.MIGRATE, {"namespace": "default", "name": "llama"}, "source",
                 id="migrate-no-source"),
    pytest.param("POST", admin_api.MIGRATE, {"namespace": "default", "name": "llama", "source": 3}, "source",
                 id="migrate-source-int"),
    pytest.param("POST", admin_api.MIGRATE, {"namespace": "default", "name": "", "source": "a"}, "name",
                 id="migrate-name-empty"),
    pytest.param("POST", admin_api.MIGRATE, {"namespace": "default", "name": "llama", "source": "a",
                                             "destination": {"id": "b"}}, "destination", id="migrate-dest-nested"),
    pytest.param("POST", admin_api.MIGRATE, {"namespace": {"ns": "default"}, "name": "llama", "source": "a"},
                 "namespace", id="migrate-namespace-nested"),
    # POST drain
    pytest.param("POST", admin_api.DRAIN, {}, "instance", id="drain-no-instance"),
    pytest.param("POST", admin_api.DRAIN, {"instance": ["a"]}, "instance", id="drain-instance-list"),
    pytest.param("POST", admin_api.DRAIN, {"instance": 7}, "instance", id="drain-instance-int"),
    # POST withhold
    pytest.param("POST", admin_api.WITHHOLD, {"namespace": "default", "name": "llama"}, "instance",
                 id="withhold-no-instance"),
    pytest.param("POST", admin_api.WITHHOLD, {"namespace": "default", "instance": "a"}, "name",
                 id="withhold-no-name"),
    pytest.param("POST", admin_api.WITHHOLD, {"namespace": "default", "name": "llama", "instance": ["a"]},
                 "instance", id="withhold-instance-list"),
])
def test_admin_api_names_the_bad_field(activator, upstreams, method: str, path: str, body, field: str | None) -> None:
    """Every admin body is validated on arrival: a malformed one is a 400 naming the field, never a 500."""
    _, admin = activator
    put(admin, "llama", [{"id": "a", "url": upstreams[0].url}])
    r = httpx.request(method, f"{admin}{path}", json=body)
    assert r.status_code == 400, r.text
    doc = admin_api.AdminError.model_validate(r.json())
    assert doc.field == field and (field is None or field in doc.error), doc


@pytest.mark.parametrize("raw", [pytest.param(b"{not json", id="not-json"), pytest.param(b"", id="empty")])
def test_admin_api_rejects_unreadable_bodies(activator, raw: bytes) -> None:
    _, admin = activator
    for path in (admin_api.MIGRATE, admin_api.DRAIN):
        r = httpx.post(f"{admin}{path}", content=raw)
        assert r.status_code == 400 and "not JSON" in r.json()["error"], r.text


def test_admin_api_answers_typed_bodies(activator, upstreams) -> None:
    _, admin = activator
    put(admin, "typed", [{"id": "a", "url": upstreams[0].url, "node": "n1"}], cc=2)
    stats = admin_api_stats(admin)
    [svc] = [s for s in stats.services if s.key == ServiceKey("default", "typed")]
    assert [(i.id, i.outstanding) for i in svc.instances] == [("a", 0)]
    r = httpx.post(f"{admin}{admin_api.MIGRATE}", json={"namespace": "default", "name": "typed", "source": "a"})
    assert admin_api.MigrateResponse.model_validate(r.json()).generations == []  # nothing in flight on a
    r = httpx.post(f"{admin}{admin_api.DRAIN}", json={"instance": "nobody"})
    assert admin_api.DrainResponse.model_validate(r.json()) == admin_api.DrainResponse(instance="nobody",
                                                                                        generations=[])
    r = httpx.post(f"{admin}{admin_api.MIGRATE}", json={"namespace": "default", "name": "nope", "source": "a"})
    assert r.status_code == 404 and r.json()["error"] == "no service default/nope"
    assert httpx.delete(f"{admin}{admin_api.service_path(ServiceKey('default', 'typed'))}").status_code == 204
    assert all(s.name != "typed" for s in admin_api_stats(admin).services)


def test_a_withheld_instance_stays_out_until_the_updates_drop_it(activator, upstreams) -> None:
    """A scale-down's victim on Kubernetes: withheld, it gets no request even though the next
    endpoint update (there, the revision's EndpointSlices) still lists it; put back, it serves at
    once; once an update leaves it out, it is forgotten, and listed again it serves again."""
    public, admin = activator
    both = [{"id": "a", "url": upstreams[0].url}, {"id": "b", "url": upstreams[1].url}]
    put(admin, "held", both)
    body = {"namespace": "default", "name": "held", "instance": "a"}
    r = httpx.post(f"{admin}{admin_api.WITHHOLD}", json=body)
    assert r.status_code == 200 and admin_api.ServiceUpdated.model_validate(r.json()).instances == 1, r.text
    put(admin, "held", both)  # still listed: still withheld
    served = {httpx.post(f"{public}/v1/completions", json={"model": "held"}).json()["instance"] for _ in range(6)}
    assert served == {"b"}
    r = httpx.post(f"{admin}{admin_api.WITHHOLD}", json={**body, "withheld": False})  # the scale-down called off
    assert r.json()["instances"] == 2, r.text  # back at once, with no update in between
    assert httpx.post(f"{public}/v1/completions", json={"model": "held"}).json()["instance"] == "a"
    httpx.post(f"{admin}{admin_api.WITHHOLD}", json=body).raise_for_status()
    put(admin, "held", both[1:])  # gone from the updates: forgotten
    put(admin, "held", both)
    served = {httpx.post(f"{public}/v1/completions", json={"model": "held"}).json()["instance"] for _ in range(6)}
    assert "a" in served
    r = httpx.post(f"{admin}{admin_api.WITHHOLD}", json={**body, "name": "nope"})
    assert r.status_code == 404 and r.json()["error"] == "no service default/nope"


def test_the_admin_api_wants_the_token_when_there_is_one(tmp_path) -> None:
    port, admin_port = free_port(), free_port()
    token = "adm1n-t0ken"
    proc = Proc("activator (token)").start(
        [sys.executable, "-m", "activator", "--port", str(port), "--admin-port", str(admin_port)],
        tmp_path / "activator.log", env={auth.TOKEN_ENV: token})
    admin = f"http://127.0.0.1:{admin_port}"
    try:
        proc.wait_http(f"{admin}{admin_api.METRICS}", timeout=20)  # metrics stay open (Prometheus)
        for method, path, doc in [("GET", admin_api.STATS, None),
                                  ("POST", admin_api.DRAIN, {"instance": "a"}),
                                  ("POST", admin_api.WITHHOLD, {"namespace": "d", "name": "s", "instance": "a"}),
                                  ("PUT", admin_api.service_path(ServiceKey("d", "s")), {"instances": []})]:
            for headers in ({}, auth.auth_headers("wrong")):
                r = httpx.request(method, f"{admin}{path}", json=doc, headers=headers)
                assert r.status_code == 401 and auth.TOKEN_ENV in r.json()["error"], (path, r.text)
            r = httpx.request(method, f"{admin}{path}", json=doc, headers=auth.auth_headers(token))
            assert r.status_code in (200, 404), (path, r.text)
    finally:
        proc.stop(grace=10)


def test_an_admin_api_off_loopback_without_a_token_does_not_start(tmp_path) -> None:
    r = subprocess.run([sys.executable, "-m", "activator", "--admin-host", "0.0.0.0"], capture_output=True,
                       text=True, timeout=60, env={k: v for k, v in os.environ.items() if k != auth.TOKEN_ENV})
    assert r.returncode == 2 and "--admin-host 0.0.0.0" in r.stderr and auth.TOKEN_ENV in r.stderr, r.stderr


def admin_api_stats(admin: str) -> autoscaler_api.StatsReport:
    return autoscaler_api.StatsReport.model_validate(httpx.get(f"{admin}{admin_api.STATS}").json())


def test_instance_dying_mid_body_is_a_502(activator, upstreams, tmp_path) -> None:
    """A non-streaming body is relayed whole with its length, so a break halfway is reported, not truncated."""
    public, admin = activator
    doomed = Upstream("halfway", tmp_path)
    put(admin, "half", [{"id": "halfway", "url": doomed.url}])
    r = httpx.post(f"{public}/v1/completions", json={"model": "half", "die_mid_body": "halfway"}, timeout=10)
    doomed.proc.wait(5)
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_failed"


@pytest.mark.parametrize("migratable", [False, True])
def test_a_stream_cut_mid_way_ends_with_an_error_event(activator, tmp_path, migratable: bool) -> None:
    """An event stream whose instance dies mid-way ends with an error event, never silently like a
    whole answer: both on the plain relay and on a migratable stream's relay (an internal API and
    an `x-sllm-generation-id`) that no migration was moving."""
    public, admin = activator
    doomed = Upstream("cut", tmp_path)
    extra = {"internal_url": doomed.url} if migratable else {}
    put(admin, "cut", [{"id": "cut", "url": doomed.url, **extra}])
    body = {"model": "cut", "stream": True, "die_mid_stream": "cut", "request_id": "gen-1" if migratable else None}
    with httpx.stream("POST", f"{public}/v1/completions", json=body, timeout=10) as r:
        assert r.status_code == 200
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    doomed.proc.wait(5)
    assert events[:2] == ['{"i": 0, "instance": "cut"}', '{"i": 1, "instance": "cut"}'], events
    assert "[DONE]" not in events
    assert json.loads(events[-1])["error"]["code"] == "stream_cut", events


def test_a_plain_chunked_body_cut_mid_way_is_not_ended_cleanly(activator, tmp_path) -> None:
    """A chunked body that is not an event stream cannot carry an error event: the activator
    breaks the connection off, so the client sees an incomplete body, not a short whole one."""
    public, admin = activator
    doomed = Upstream("cutraw", tmp_path)
    put(admin, "cutraw", [{"id": "cutraw", "url": doomed.url}])
    with pytest.raises(httpx.RemoteProtocolError), httpx.stream(
            "POST", f"{public}/v1/completions", timeout=10,
            json={"model": "cutraw", "stream": True, "die_mid_stream": "cutraw", "chunked": True}) as r:
        assert r.status_code == 200
        r.read()
    doomed.proc.wait(5)


def test_client_leaving_a_stream_releases_its_slot(activator, upstreams) -> None:
    public, admin = activator
    put(admin, "gone", [{"id": "a", "url": upstreams[0].url}], cc=1)
    with httpx.stream("POST", f"{public}/v1/completions",
                      json={"model": "gone", "stream": True, "n_chunks": 50, "delay": 0.1}) as r:
        lines = r.iter_lines()  # kept referenced: a dropped iterator closes the response
        assert next(lines).startswith("data: ")
        svc = next(s for s in httpx.get(f"{admin}{admin_api.STATS}").json()["services"] if s["name"] == "gone")
        assert svc["in_flight"] == 1 and svc["instances"][0]["outstanding"] == 1, svc
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:  # the activator notices the disconnect, closes the upstream stream
        svc = next(s for s in httpx.get(f"{admin}{admin_api.STATS}").json()["services"] if s["name"] == "gone")
        if svc["in_flight"] == 0 and svc["instances"][0]["outstanding"] == 0:
            break
        time.sleep(0.05)
    assert svc["in_flight"] == 0 and svc["instances"][0]["outstanding"] == 0, svc
    # the slot (containerConcurrency 1) is free again: the next request is not held
    r = httpx.post(f"{public}/v1/completions", json={"model": "gone"}, timeout=2)
    assert r.status_code == 200
