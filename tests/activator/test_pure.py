"""Pure pieces of the activator: routing, instance choice, the concurrency window."""

from __future__ import annotations

import pytest

from activator.balancer import Instance, pick
from activator.routing import ServiceKey, model_from_body, service_from_host, service_from_model
from activator.stats import ConcurrencyWindow

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
    pytest.param(b'{"model": 3}', None, id="not-a-string"),
    pytest.param(b"not json", None, id="not-json"),
    pytest.param(b"[1]", None, id="not-an-object"),
])
def test_service_from_model(body: bytes, want: ServiceKey | None) -> None:
    assert service_from_model(model_from_body(body), KNOWN) == want


def _insts(*spec: tuple[str, int, int]) -> list[Instance]:
    return [Instance(i, f"http://{i}", capacity=c, outstanding=o) for i, c, o in spec]


@pytest.mark.parametrize(("instances", "exclude", "want"), [
    pytest.param(_insts(("a", 0, 3), ("b", 0, 1), ("c", 0, 2)), frozenset(), "b", id="least-outstanding"),
    pytest.param(_insts(("a", 1, 1), ("b", 2, 1)), frozenset(), "b", id="skip-full"),
    pytest.param(_insts(("a", 1, 1), ("b", 1, 1)), frozenset(), None, id="all-full"),
    pytest.param(_insts(("a", 0, 0), ("b", 0, 0)), frozenset(), "a", id="tie-keeps-order"),
    pytest.param(_insts(("a", 0, 0), ("b", 0, 5)), frozenset({"a"}), "b", id="excluded"),
    pytest.param([], frozenset(), None, id="none"),
])
def test_pick(instances: list[Instance], exclude: frozenset[str], want: str | None) -> None:
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
