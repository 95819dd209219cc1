"""Pure pieces of the activator: routing, request heads, instance choice, the concurrency window,
the capacity slot, the upstream client's URL parsing and request encoding."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest

from activator import errors
from activator.balancer import RoutedInstance, pick
from activator.capacity import Capacity
from activator.config import ActivatorConfig
from activator.metrics import ServiceMeters
from activator.registry import Registry, RoutedService
from activator.request import RequestHead, is_internal, request_target, response_headers, split_headers
from activator.routing import (
    model_list,
    names_service,
    requested_model,
    service_from_host,
    service_from_model,
)
from activator.stats import ConcurrencyWindow
from activator.upstream import Origin, Pool, encode_request, parse_origin
from sllm_knative.api.activator import Endpoint
from sllm_knative.api.keys import ServiceKey

KNOWN = {ServiceKey("default", "llama"), ServiceKey("team-a", "qwen")}


@pytest.mark.parametrize(("host", "want"), [
    pytest.param("llama.default.example.com", ServiceKey("default", "llama"), id="knative-domain"),
    pytest.param("llama.default.example.com:8080", ServiceKey("default", "llama"), id="with-port"),
    pytest.param("qwen.team-a.svc.cluster.local", ServiceKey("team-a", "qwen"), id="cluster-local"),
    pytest.param("qwen.team-a", ServiceKey("team-a", "qwen"), id="short"),
    pytest.param("LLAMA.Default.example.com", ServiceKey("default", "llama"), id="case-insensitive"),
    pytest.param("llama.other.example.com", None, id="wrong-namespace"),
    pytest.param("localhost:8080", None, id="plain-host"),
    pytest.param("", None, id="empty"),
    pytest.param(None, None, id="missing"),
])
def test_service_from_host(host: str | None, want: ServiceKey | None) -> None:
    assert service_from_host(host, KNOWN) == want


@pytest.mark.parametrize(("body", "want"), [
    pytest.param(b'{"model": "llama"}', ServiceKey("default", "llama"), id="name"),
    pytest.param(b'{"model": "team-a/qwen"}', ServiceKey("team-a", "qwen"), id="namespaced"),
    pytest.param(b'{"model": "qwen"}', None, id="other-namespace"),
])
def test_service_from_model(body: bytes, want: ServiceKey | None) -> None:
    assert service_from_model(requested_model(body), KNOWN) == want


@pytest.mark.parametrize(("host", "want"), [
    pytest.param("llama.default.example.com", True, id="knative-domain"),
    pytest.param("missing.default:8080", True, id="short-with-port"),
    pytest.param("127.0.0.1:8080", False, id="ipv4"),
    pytest.param("[::1]:8080", False, id="ipv6"),
    pytest.param("localhost:8080", False, id="localhost"),
    pytest.param("", False, id="empty"),
    pytest.param(None, False, id="missing"),
])
def test_names_service(host: str | None, want: bool) -> None:
    assert names_service(host) is want


@pytest.mark.parametrize(("body", "message"), [
    pytest.param(b'{"model": 3}', "'model' must be a string, not int", id="not-a-string"),
    pytest.param(b'{"prompt": "hi"}', "names no 'model'", id="no-model"),
    pytest.param(b"not json", "not valid JSON", id="not-json"),
    pytest.param(b"\xff\xfe", "not valid JSON", id="not-utf8"),
    pytest.param(b"[1]", "must be a JSON object, not list", id="not-an-object"),
])
def test_a_body_that_names_no_model_says_why(body: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        requested_model(body)


@pytest.mark.parametrize(("services", "default_namespace", "ids"), [
    pytest.param({}, "default", [], id="none"),
    pytest.param({ServiceKey("team-a", "qwen"): 5, ServiceKey("default", "llama"): 7}, "default",
                 ["llama", "team-a/qwen"], id="default-namespace-by-name"),
    pytest.param({ServiceKey("default", "llama"): 7}, "team-a", ["default/llama"], id="other-default"),
])
def test_model_list_names_each_service_as_its_model(services, default_namespace: str, ids: list[str]) -> None:
    doc = model_list(services, default_namespace)
    assert doc["object"] == "list" and [m["id"] for m in doc["data"]] == ids
    for m in doc["data"]:
        assert m["object"] == "model" and m["owned_by"] == "sllm-knative"
        # each id routes back to its service
        assert service_from_model(m["id"], set(services), default_namespace) is not None
        assert m["created"] == services[service_from_model(m["id"], set(services), default_namespace)]


def _insts(*spec: tuple[str, int, int]) -> list[RoutedInstance]:
    return [RoutedInstance(i, f"http://{i}", capacity=c, outstanding=o) for i, c, o in spec]


@pytest.mark.parametrize(("instances", "exclude", "want"), [
    pytest.param(_insts(("a", 0, 3), ("b", 0, 1), ("c", 0, 2)), frozenset(), "b", id="least-outstanding"),
    pytest.param(_insts(("a", 1, 1), ("b", 2, 1)), frozenset(), "b", id="skip-full"),
    pytest.param(_insts(("a", 1, 1), ("b", 1, 1)), frozenset(), None, id="all-full"),
    pytest.param(_insts(("a", 0, 0), ("b", 0, 0)), frozenset(), "a", id="tie-keeps-order"),
    pytest.param(_insts(("a", 0, 0), ("b", 0, 5)), frozenset({"a"}), "b", id="excluded"),
    pytest.param([], frozenset(), None, id="none"),
])
def test_pick(instances: list[RoutedInstance], exclude: frozenset[str], want: str | None) -> None:
    got = pick(instances, exclude)
    assert (got.id if got else None) == want


def test_concurrency_window_is_time_weighted() -> None:
    w = ConcurrencyWindow(now=0.0)
    w.change(+1, 0.0)
    w.change(+1, 1.0)  # 1 in flight for 1 s, then 2 for 1 s
    w.change(-2, 2.0)  # then 0 for 2 s
    r = w.report(4.0)
    assert r.average_concurrency == pytest.approx((1 + 2) / 4)
    assert r.requests == 2 and r.in_flight == 0
    assert w.report(6.0).average_concurrency == 0.0  # a new window started
    w.change(+1, 6.0)
    assert w.report(8.0, reset=False).average_concurrency == pytest.approx(1.0)
    assert w.report(10.0).average_concurrency == pytest.approx(1.0)  # peek did not reset


@pytest.mark.parametrize(("raw", "want"), [
    pytest.param([(b"host", b"llama.default.example.com"), (b"accept", b"*/*")],
                 RequestHead("llama.default.example.com", None, False, False, b"", [(b"accept", b"*/*")]),
                 id="host-out-rest-forwarded"),
    pytest.param([(b"content-length", b"12"), (b"connection", b"keep-alive"), (b"keep-alive", b"timeout=5"),
                  (b"expect", b"100-continue"), (b"te", b"trailers"), (b"x-a", b"1")],
                 RequestHead(None, b"12", False, False, b"", [(b"x-a", b"1")]), id="hop-by-hop-dropped"),
    pytest.param([(b"transfer-encoding", b"chunked")], RequestHead(None, None, True, False, b"", []), id="chunked"),
    pytest.param([(b"k-network-probe", b"queue"), (b"k-network-hash", b"abc")],
                 RequestHead(None, None, False, True, b"abc",
                             [(b"k-network-probe", b"queue"), (b"k-network-hash", b"abc")]), id="knative-probe"),
    pytest.param([(b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")],
                 RequestHead(None, None, False, False, b"", [(b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")]),
                 id="duplicates-kept"),
    pytest.param([(b"x-sllm-generation-id", b"cmpl-mine-000"), (b"x-a", b"1")],
                 RequestHead(None, None, False, False, b"", [(b"x-a", b"1")]), id="generation-id-is-the-activators"),
])
def test_split_headers(raw: list[tuple[bytes, bytes]], want: RequestHead) -> None:
    assert split_headers(raw) == want


@pytest.mark.parametrize(("length", "chunked", "want"), [
    pytest.param(None, False, False, id="no-framing"),
    pytest.param(b"0", False, False, id="empty"),
    pytest.param(b"5", False, True, id="length"),
    pytest.param(None, True, True, id="chunked"),
])
def test_request_head_has_body(length: bytes | None, chunked: bool, want: bool) -> None:
    assert RequestHead(None, length, chunked, False, b"", []).has_body is want


@pytest.mark.parametrize(("path", "want"), [
    pytest.param("/internal/v1/generations/x", True, id="internal"),
    pytest.param("/admin", True, id="admin"),
    pytest.param("/v1/completions", False, id="public"),
    pytest.param("//internal/v1/prefill", True, id="double-slash"),
    pytest.param("/v1/../internal/v1/resume", True, id="dot-dot"),
    pytest.param("/./admin/x", True, id="dot"),
    pytest.param("/v1/internal", False, id="not-a-prefix"),
    pytest.param("/admin/v1/stats", True, id="admin-api"),
])
def test_is_internal(path: str, want: bool) -> None:
    assert is_internal(path) is want


@pytest.mark.parametrize(("scope", "want"), [
    pytest.param({"path": "/v1/models", "raw_path": b"/v1/models", "query_string": b""}, b"/v1/models", id="plain"),
    pytest.param({"path": "/a/b c", "raw_path": b"/a/b%20c", "query_string": b"x=1&y=%2F"}, b"/a/b%20c?x=1&y=%2F",
                 id="raw-not-re-encoded"),
    pytest.param({"path": "/a b", "query_string": b""}, b"/a%20b", id="no-raw-path"),
])
def test_request_target(scope: dict, want: bytes) -> None:
    assert request_target(scope) == want


def test_response_headers_drop_hop_by_hop_and_keep_duplicates() -> None:
    upstream = [(b"date", b"x"), (b"server", b"uvicorn"), (b"content-length", b"3"), (b"connection", b"close"),
                (b"transfer-encoding", b"chunked"), (b"content-type", b"application/json"), (b"set-cookie", b"a=1"),
                (b"set-cookie", b"b=2")]
    assert response_headers(upstream, "llm-1") == [
        (b"content-type", b"application/json"), (b"set-cookie", b"a=1"), (b"set-cookie", b"b=2"),
        (b"x-sllm-instance", b"llm-1")]


@pytest.mark.parametrize(("url", "want"), [
    pytest.param("http://127.0.0.1:8080", Origin("127.0.0.1", 8080, b"127.0.0.1:8080", b""), id="host-port"),
    pytest.param("http://pod.ns.svc", Origin("pod.ns.svc", 80, b"pod.ns.svc", b""), id="default-port"),
    pytest.param("http://10.0.0.7:8012/base/", Origin("10.0.0.7", 8012, b"10.0.0.7:8012", b"/base"), id="prefix"),
    pytest.param("http://[::1]:9000", Origin("::1", 9000, b"[::1]:9000", b""), id="ipv6"),
])
def test_parse_origin(url: str, want: Origin) -> None:
    assert parse_origin(url) == want


@pytest.mark.parametrize("url", [
    pytest.param("https://10.0.0.7:8443", id="https"),
    pytest.param("10.0.0.7:8080", id="no-scheme"),
    pytest.param("http://:8080", id="no-host"),
    pytest.param("http://h:notaport", id="bad-port"),
    pytest.param("http://u:p@h:1", id="userinfo"),
    pytest.param("http://h:1/?q=1", id="query"),
])
def test_parse_origin_rejects(url: str) -> None:
    with pytest.raises(httpx.UnsupportedProtocol, match="upstream URL"):
        parse_origin(url)


@pytest.mark.parametrize(("method", "body", "want"), [
    pytest.param(b"GET", b"", b"GET /base/v1/models?x=1 HTTP/1.1\r\nhost: h:1\r\nx-a: 1\r\n\r\n", id="get-no-length"),
    pytest.param(b"POST", b"{}", b"POST /base/v1/models?x=1 HTTP/1.1\r\nhost: h:1\r\nx-a: 1\r\n"
                 b"content-length: 2\r\n\r\n{}", id="post-body"),
    pytest.param(b"POST", b"", b"POST /base/v1/models?x=1 HTTP/1.1\r\nhost: h:1\r\nx-a: 1\r\n"
                 b"content-length: 0\r\n\r\n", id="post-empty"),
])
def test_encode_request(method: bytes, body: bytes, want: bytes) -> None:
    origin = Origin("h", 1, b"h:1", b"/base")
    assert encode_request(origin, method, b"/v1/models?x=1", [(b"x-a", b"1")], body) == want


@pytest.mark.parametrize(("kwargs", "field"), [
    pytest.param({"connect_timeout": 0}, "connect_timeout", id="connect"),
    pytest.param({"write_timeout": -1}, "write_timeout", id="write"),
    pytest.param({"read_timeout": 0}, "read_timeout", id="read"),
    pytest.param({"idle_expiry": 0}, "idle_expiry", id="expiry"),
    pytest.param({"max_idle_per_origin": -1}, "max_idle_per_origin", id="max-idle"),
])
def test_pool_rejects_bad_settings(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Pool(**kwargs)


def _capacity(*instances: tuple[str, int]) -> tuple[Capacity, RoutedService, ServiceMeters, list[RoutedService]]:
    """A registry with one service of the given (id, capacity) instances; demand is recorded."""
    registry = Registry()
    key = ServiceKey("default", "slots")
    svc = registry.set_service(key)
    svc.instances = [RoutedInstance(i, f"http://{i}", capacity=c) for i, c in instances]
    demanded: list[RoutedService] = []

    async def demand(s: RoutedService) -> None:
        demanded.append(s)

    return Capacity(ActivatorConfig(cold_start_timeout_s=0.2), registry, demand), svc, ServiceMeters.of(key), demanded


def test_slot_is_released_on_every_path() -> None:
    async def run() -> None:
        cap, svc, meters, _ = _capacity(("a", 1))
        [inst] = svc.instances
        deadline = time.monotonic() + 1
        released: list[str] = []
        async with cap.slot(svc, frozenset(), deadline, meters) as slot:
            assert slot.instance is inst and inst.outstanding == 1
            slot.on_release(released.append, "first")
        assert inst.outstanding == 0 and released == ["first"]
        with pytest.raises(RuntimeError):  # an error inside: released all the same
            async with cap.slot(svc, frozenset(), deadline, meters):
                raise RuntimeError("boom")
        assert inst.outstanding == 0
        async with cap.slot(svc, frozenset(), deadline, meters) as slot:  # released early: once only
            await slot.release()
            assert inst.outstanding == 0
        assert inst.outstanding == 0
        async with cap.slot(svc, frozenset(), deadline, meters) as slot:  # handed over: the new owner releases
            slot.on_release(released.append, "handed")
            release = slot.hand_over()
        assert inst.outstanding == 1 and released == ["first"]
        await release()
        assert inst.outstanding == 0 and released == ["first", "handed"]

    asyncio.run(run())


def test_slot_waits_for_room_then_times_out() -> None:
    async def run() -> None:
        cap, svc, meters, _ = _capacity(("a", 1))
        [inst] = svc.instances
        async with cap.slot(svc, frozenset(), time.monotonic() + 5, meters):
            async def second() -> str:
                async with cap.slot(svc, frozenset(), time.monotonic() + 5, meters) as slot:
                    return slot.instance.id
            waiting = asyncio.ensure_future(second())
            await asyncio.sleep(0.05)
            assert not waiting.done() and svc.held == 1  # held until the first slot is given back
        assert await waiting == "a" and svc.held == 0 and inst.outstanding == 0
        async with cap.slot(svc, frozenset(), time.monotonic() + 5, meters):
            with pytest.raises(errors.ColdStartTimeout):  # no room before the deadline
                async with cap.slot(svc, frozenset(), time.monotonic() + 0.1, meters):
                    pass
        cold, cold_svc, cold_meters, demanded = _capacity()
        with pytest.raises(errors.ColdStartTimeout):  # no instance at all: the autoscaler hears of it first
            async with cold.slot(cold_svc, frozenset(), time.monotonic() + 0.1, cold_meters):
                pass
        assert demanded == [cold_svc]

    asyncio.run(run())


def test_a_cold_request_keeps_its_place_in_line_while_the_autoscaler_hears_of_it() -> None:
    """The first request's demand call is slow (the autoscaler places the first instance before
    it answers); a second request's is quick. The first is held, and first in line, from its
    arrival: the instance's one slot goes to it."""
    async def run() -> None:
        registry = Registry()
        svc = registry.set_service(ServiceKey("default", "cold"))
        meters = ServiceMeters.of(svc.key)
        answer_first = asyncio.Event()
        calls = 0

        async def demand(s: RoutedService) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                await answer_first.wait()

        cap = Capacity(ActivatorConfig(), registry, demand)

        async def request(name: str) -> tuple[str, str]:
            async with cap.slot(svc, frozenset(), time.monotonic() + 5, meters) as slot:
                order.append(name)
                await asyncio.sleep(0.05)  # holds the one slot a while
                return name, slot.instance.id

        order: list[str] = []
        first = asyncio.ensure_future(request("first"))
        await asyncio.sleep(0.01)
        second_sent = time.monotonic()
        second = asyncio.ensure_future(request("second"))
        await asyncio.sleep(0.01)
        # Both held; the oldest is the first, in line since before the second was sent (its demand
        # has not answered yet). A bound on the wait itself failed once: 17.9 ms after two 10 ms sleeps.
        assert calls == 2 and svc.held == 2, (calls, svc.held)
        assert svc.waiters[0].since < second_sent <= svc.waiters[1].since, svc.waiters
        assert svc.oldest_held_s(time.monotonic()) > time.monotonic() - second_sent
        svc.instances = [RoutedInstance("i", "http://i", capacity=1)]
        svc.breaker.poke_soon()
        await asyncio.sleep(0.01)
        answer_first.set()
        assert [await first, await second] == [("first", "i"), ("second", "i")] and order == ["first", "second"]
        assert svc.held == 0 and not svc.waiters

    asyncio.run(run())


def test_endpoints_keep_instances_across_updates() -> None:
    async def run() -> None:
        registry = Registry()
        key = ServiceKey("default", "x")
        registry.set_service(key, container_concurrency=3)
        await registry.set_endpoints(key, [Endpoint(id="a", url="http://a:1/", internal_url="http://a:2/")])
        [a] = registry.get(key).instances
        a.outstanding = 2
        await registry.set_endpoints(key, [Endpoint(id="a", url="http://a:1", capacity=5),
                                           Endpoint(id="b", url="http://b:1")])
        first, b = registry.get(key).instances
        assert first is a and a.outstanding == 2 and a.capacity == 5 and a.internal_url == ""
        assert b.capacity == 3 and b.url == "http://b:1"

    asyncio.run(run())
