"""kill -9 of an instance in the middle of a generation, end to end: real function processes
(exact numerics), the activator as a process exporting every relayed stream's state. A stream
whose instance dies resumes from its last export on another instance (or on one that becomes
ready later), and its client sees exactly the text of an undisturbed run; a stream with no export
to resume from (several choices) ends with a clean `stream_cut` error event, never a hang.

The pure parts (which text is kept, the check of the regenerated text) are in
tests/activator/test_recovery_pure.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from sllm_knative.api import activator as admin_api
from tests.migration.conftest import Activator, Function, running
from tests.migration.test_handoff import Collected, assert_same, body, choices, reference, stream


@pytest.fixture(scope="module")
def exporting(logs) -> Iterator[Activator]:
    """An activator that exports each stream's state every 0.25 s (the default is 1 s): the tiny
    model streams its 480 tokens in about a second, and the kill must come after an export."""
    yield from running(Activator(logs, "--export-interval", "0.25", name="exporting-activator"))


def counters(act: Activator, family: str) -> dict[str, float]:
    """One counter family's samples on the activator's /metrics, by its `result` label."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{act.admin}{admin_api.METRICS}", timeout=5).text
    return {s.labels["result"]: s.value for fam in text_string_to_metric_families(text) if fam.name == family
            for s in fam.samples if s.name.endswith("_total")}


def wait_for_export(act: Activator, before: float, out: Collected) -> None:
    """Until the activator has exported a stream's state since `before` (its `ok` count)."""
    deadline = time.monotonic() + 30
    while counters(act, "activator_stream_exports")["ok"] <= before:
        assert time.monotonic() < deadline, "no export of the stream's state within 30 s"
        assert out.done == 0 and not out.errors, "the stream ended before its state was exported"
        time.sleep(0.01)


def kill_mid_stream(act: Activator, victim: Function, req: dict, then: Function, add_later: float = 0.0) -> Collected:
    """Stream `req` through `act` on `victim` alone, kill -9 the victim after an export of the
    stream's state, and put `then` in rotation (`add_later` seconds after the kill; 0: before it)."""
    act.set_instances(victim)
    exported = counters(act, "activator_stream_exports")["ok"]
    recovered = counters(act, "activator_stream_recoveries")["resumed"]
    out = Collected()
    t = threading.Thread(target=stream, args=(act.url, req, out))
    t.start()
    try:
        deadline = time.monotonic() + 60
        while out.chunks < 16 and t.is_alive():  # 16 frames in (logprobs or not)
            assert time.monotonic() < deadline, "the stream did not start within 60 s"
            time.sleep(0.002)
        wait_for_export(act, exported, out)
        if not add_later:
            act.set_instances(victim, then)
        victim.kill()
        if add_later:
            time.sleep(add_later)
            act.set_instances(then)
    finally:
        t.join(120)
    assert not t.is_alive(), "the stream hung after its instance was killed"
    assert counters(act, "activator_stream_recoveries")["resumed"] == recovered + 1, "the stream was not resumed"
    return out


@pytest.mark.parametrize("seed", [pytest.param(None, id="greedy"), pytest.param(4242, id="seeded")])
def test_a_killed_instance_s_streams_resume_from_the_last_export(exporting, functions, spare, seed):
    _, b = functions
    victim = spare(f"victim-{seed}")
    want = reference(b, body(seed))
    before = counters(exporting, "activator_stream_recoveries")
    got = kill_mid_stream(exporting, victim, body(seed), then=b)
    assert 16 <= len(want.tokens)
    assert_same(got, want)  # token by token, logprob by logprob, text, finish, usage
    after = counters(exporting, "activator_stream_recoveries")
    assert after["resumed"] == before["resumed"] + 1, (before, after)
    assert after["diverged"] == before["diverged"] and after["no_instance"] == before["no_instance"]


def test_a_stream_without_logprobs_is_checked_by_its_text(exporting, functions, spare):
    """Without logprobs the resumed stream's already-sent text is skipped by characters (with
    logprobs, by whole frames): both paths regenerate and compare what the client has."""
    _, b = functions
    req = {k: v for k, v in body(77).items() if k != "logprobs"}
    want = reference(b, req)
    got = kill_mid_stream(exporting, spare("victim-text"), req, then=b)
    assert got.errors == [] and got.done == 1
    assert got.text == want.text and got.usage == want.usage and got.finish == want.finish


def test_the_resume_waits_for_an_instance_when_none_is_left(exporting, functions, spare):
    """The dead instance was the service's only one: the resume waits, as a held request does,
    until an instance is in rotation again (here 1.5 s later; on a cluster, the cold start the
    autoscaler makes for that demand), then the client's stream goes on where it was."""
    _, b = functions
    victim = spare("victim-alone")
    want = reference(b, body(99))
    got = kill_mid_stream(exporting, victim, body(99), then=b, add_later=1.5)
    assert_same(got, want)
    assert "no instance to resume the stream on: waiting for one" in exporting.log_path.read_text()


def test_a_stream_with_no_state_to_resume_from_ends_with_an_error_event(exporting, functions, spare):
    """Several choices are not exported (nor migrated): the instance's death ends the client's
    stream with a `stream_cut` error event at once, not a hang and not a clean end."""
    _, b = functions
    victim = spare("victim-choices")
    exporting.set_instances(victim)
    req = {**body(5, max_tokens=480), "n": 2}
    started = threading.Event()
    result: list[tuple[list[str], list[str], int]] = []
    t = threading.Thread(target=lambda: result.append(choices(exporting.url, req, started)))
    t.start()
    try:
        assert started.wait(60)
        exporting.set_instances(victim, b)
        victim.kill()
    finally:
        t.join(60)
    assert not t.is_alive(), "the stream hung after its instance was killed"
    [(texts, errors, done)] = result
    assert done == 0, "a cut stream must not end with [DONE]"
    assert len(errors) == 1 and "stream_cut" in errors[0] and "before any export" in errors[0], errors


def test_a_resume_that_differs_from_what_was_sent_is_cut_not_spliced(exporting, functions, spare, tiny_model,
                                                                      logs, tmp_path):
    """The only instance left to resume on computes differently (here: other weights under the same
    served name; on a real cluster, numerics that are not batch-invariant): the text it regenerates
    between the export and what the client has differs, and the client gets a `stream_cut` error
    event instead of an answer spliced from two different generations."""
    from sllm_knative.models import build_model

    victim = spare("victim-diverged")
    impostor = Function("impostor", build_model(tmp_path / "other", seed=1), logs)
    try:
        impostor.wait_ready()
        req = {k: v for k, v in body(None).items() if k != "logprobs"}
        assert reference(impostor, req).text != reference(victim, req).text
        exporting.set_instances(victim)
        exported = counters(exporting, "activator_stream_exports")["ok"]
        before = counters(exporting, "activator_stream_recoveries")
        out = Collected()
        t = threading.Thread(target=stream, args=(exporting.url, req, out))
        t.start()
        try:
            deadline = time.monotonic() + 60
            while out.chunks < 16 and t.is_alive():
                assert time.monotonic() < deadline, "the stream did not start within 60 s"
                time.sleep(0.002)
            wait_for_export(exporting, exported, out)
            # A few tokens after that export, before the next (0.25 s later): the kill leaves text
            # to regenerate (4 tokens take 10-250 ms here, idle to loaded).
            seen = out.chunks
            while out.chunks < seen + 4 and t.is_alive():
                time.sleep(0.002)
            exporting.set_instances(victim, impostor)
            victim.kill()
        finally:
            t.join(60)
        assert not t.is_alive(), "the stream hung"
    finally:
        impostor.stop()
    after = counters(exporting, "activator_stream_recoveries")
    assert out.done == 0 and len(out.errors) == 1, (out.done, out.errors)
    assert out.errors[0]["error"]["code"] == "stream_cut" and "differs" in out.errors[0]["error"]["message"]
    assert after["diverged"] == before["diverged"] + 1, (before, after)
