"""The pure parts of sllm_knative.kube: the work queue, leader election's step, cache diffs."""

from __future__ import annotations

import datetime as dt
import threading

import pytest

from sllm_knative.kube.informer import ADDED, DELETED, MODIFIED, diff_lists, key_of, split_key
from sllm_knative.kube.leader import Observed, Step, decide
from sllm_knative.kube.times import parse_rfc3339, rfc3339
from sllm_knative.kube.workqueue import ShutDown, WorkQueue, backoff_s


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize("failures, expected", [(0, 0.0), (1, 0.05), (2, 0.1), (3, 0.2), (12, 30.0), (99, 30.0)])
def test_backoff_doubles_and_caps(failures: int, expected: float) -> None:
    assert backoff_s(failures) == pytest.approx(expected)


def test_a_key_waits_once_however_often_it_is_added() -> None:
    q = WorkQueue()
    for k in ["a", "b", "a", "a"]:
        q.add(k)
    assert len(q) == 2
    assert [q.get(0), q.get(0)] == ["a", "b"]
    with pytest.raises(TimeoutError):
        q.get(0)


def test_a_key_added_while_processed_comes_back_after_done_not_before() -> None:
    q = WorkQueue()
    q.add("a")
    assert q.get(0) == "a"
    q.add("a")  # the object changed while a worker reconciles it
    with pytest.raises(TimeoutError):
        q.get(0)  # not handed to a second worker at the same time
    q.done("a")
    assert q.get(0) == "a"
    q.done("a")
    with pytest.raises(TimeoutError):
        q.get(0)


def test_retry_backs_off_per_key_and_forget_resets() -> None:
    clock = FakeClock()
    q = WorkQueue(clock=clock)
    assert q.retry("a") == pytest.approx(0.05)
    assert q.retry("a") == pytest.approx(0.1)  # queued once, the later due time kept too
    assert q.failures("a") == 2
    with pytest.raises(TimeoutError):
        q.get(0)
    clock.t += 0.06
    assert q.get(0) == "a"
    q.done("a")
    q.forget("a")
    assert q.failures("a") == 0
    assert q.retry("a") == pytest.approx(0.05)


def test_add_after_orders_by_due_time() -> None:
    clock = FakeClock()
    q = WorkQueue(clock=clock)
    q.add_after("late", 2.0)
    q.add_after("soon", 1.0)
    clock.t += 1.5
    assert q.get(0) == "soon"
    with pytest.raises(TimeoutError):
        q.get(0)
    clock.t += 1.0
    assert q.get(0) == "late"


def test_shut_down_wakes_a_blocked_worker() -> None:
    q = WorkQueue()
    got: list[BaseException] = []

    def worker() -> None:
        try:
            q.get()
        except ShutDown as e:
            got.append(e)

    t = threading.Thread(target=worker)
    t.start()
    q.shut_down()
    t.join(5)
    assert got and not t.is_alive()


@pytest.mark.parametrize("observed, me, now, step", [
    (None, "a", 0.0, Step.CREATE),
    (Observed("a", 15, 0.0), "a", 100.0, Step.RENEW),  # ours, even if we were slow
    (Observed("b", 15, 0.0), "a", 14.9, Step.WAIT),  # another's, live
    (Observed("b", 15, 0.0), "a", 15.0, Step.TAKE),  # unchanged for a whole lease duration
    (Observed("", 15, 0.0), "a", 0.1, Step.TAKE),  # released
])
def test_leader_election_step(observed: Observed | None, me: str, now: float, step: Step) -> None:
    assert decide(observed, me, now) is step


def _o(name: str, rv: str, ns: str = "n") -> dict:
    return {"metadata": {"name": name, "namespace": ns, "resourceVersion": rv}}


def test_keys() -> None:
    assert key_of(_o("x", "1")) == "n/x"
    assert key_of({"metadata": {"name": "node-1"}}) == "node-1"
    assert split_key("n/x") == ("n", "x")
    assert split_key("node-1") == ("", "node-1")


def test_diff_lists_reports_what_a_relist_changed() -> None:
    old = {"n/a": _o("a", "1"), "n/b": _o("b", "1"), "n/c": _o("c", "1")}
    new = {"n/a": _o("a", "1"), "n/b": _o("b", "2"), "n/d": _o("d", "1")}
    got = sorted((kind, key_of(obj)) for kind, obj, _ in diff_lists(old, new))
    assert got == [(ADDED, "n/d"), (DELETED, "n/c"), (MODIFIED, "n/b")]


@pytest.mark.parametrize(("t", "micro", "text"), [
    pytest.param(1_796_000_000.0, False, "2026-11-30T00:53:20Z", id="seconds"),
    pytest.param(1_796_000_000.25, True, "2026-11-30T00:53:20.250000Z", id="micro"),
    pytest.param(dt.datetime(2026, 11, 30, 1, 53, 20, tzinfo=dt.timezone(dt.timedelta(hours=1))), False,
                 "2026-11-30T00:53:20Z", id="aware-datetime-to-utc"),
])
def test_kubernetes_times_round_trip(t: float | dt.datetime, micro: bool, text: str) -> None:
    assert rfc3339(t, micro=micro) == text
    back = parse_rfc3339(text)
    assert back is not None and back.tzinfo is not None
    assert abs(back.timestamp() - (t.timestamp() if isinstance(t, dt.datetime) else t)) < 1e-6


@pytest.mark.parametrize("text", [None, "", "yesterday", 12, "2026-13-01T00:00:00Z"])
def test_not_a_kubernetes_time(text: object) -> None:
    assert parse_rfc3339(text) is None
