"""kill -9 of an instance in the middle of a generation, end to end: real function processes
(exact numerics), the activator as a process exporting every relayed stream's state. A stream
whose instance dies resumes from its last export on another instance (or on one that becomes
ready later), and its client sees exactly the text of an undisturbed run; a stream with no export
to resume from (several choices) ends with a clean `stream_cut` error event, never a hang; a
resume that regenerates different text is cut, not spliced.

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
from tests.migration.test_handoff import Collected, assert_same, body, reference, stream


@pytest.fixture(scope="module")
def exporting(logs) -> Iterator[Activator]:
    """An activator that exports each stream's state every 0.25 s (the default is 1 s): the tiny
    model streams its 480 tokens in about a second, and the kill must come after an export."""
    yield from running(Activator(logs, "--export-interval", "0.25", name="exporting-activator"))


def counters(admin: str, family: str) -> dict[str, float]:
    """One counter family's samples on an activator's /metrics (`admin`: its admin URL), by its
    `result` label."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{admin}{admin_api.METRICS}", timeout=5).text
    return {s.labels["result"]: s.value for fam in text_string_to_metric_families(text) if fam.name == family
            for s in fam.samples if s.name.endswith("_total")}


def wait_for_exports(act: Activator, count: int, outs: list[Collected]) -> None:
    """Until the activator's `ok` exports reach `count`, none of the streams having ended."""
    deadline = time.monotonic() + 30
    while counters(act.admin, "activator_stream_exports")["ok"] < count:
        assert time.monotonic() < deadline, "no export of the streams' states within 30 s"
        assert all(o.done == 0 and not o.errors for o in outs), "a stream ended before its state was exported"
        time.sleep(0.01)


def started(outs: list[Collected], threads: list[threading.Thread], frames: int = 16) -> None:
    """Until every stream has had `frames` frames (logprobs or not)."""
    deadline = time.monotonic() + 60
    while any(o.chunks < frames and t.is_alive() for o, t in zip(outs, threads, strict=True)):
        assert time.monotonic() < deadline, "the streams did not start within 60 s"
        time.sleep(0.002)


def kill_mid_stream(act: Activator, victim: Function, reqs: list[dict], then: Function,
                    add_later: float = 0.0) -> list[Collected]:
    """Stream each of `reqs` through `act` on `victim` alone, at once; kill -9 the victim once every
    stream's state has been exported (two export rounds after they all run), and put `then` in
    rotation (`add_later` seconds after the kill; 0: before it)."""
    act.set_instances(victim)
    outs = [Collected() for _ in reqs]
    threads = [threading.Thread(target=stream, args=(act.url, req, out)) for req, out in zip(reqs, outs, strict=True)]
    for t in threads:
        t.start()
    try:
        started(outs, threads)
        exported = sum(1 for req in reqs if req.get("n", 1) == 1)  # several choices are not exported
        wait_for_exports(act, counters(act.admin, "activator_stream_exports")["ok"] + 2 * exported, outs)
        if not add_later:
            act.set_instances(victim, then)
        victim.kill()
        if add_later:
            time.sleep(add_later)
            act.set_instances(then)
    finally:
        for t in threads:
            t.join(120)
    assert not any(t.is_alive() for t in threads), "a stream hung after its instance was killed"
    return outs


def test_a_killed_instance_s_streams_resume_from_the_last_export(exporting, functions, spare):
    """Four streams on one instance, killed with kill -9: greedy and seeded with logprobs (the
    regenerated tokens skipped frame by frame) and seeded text only (skipped by characters) each
    resume on the other instance from their own last export, and each client sees, token by token,
    the text of an undisturbed run. The fourth has two choices: its stream does not name a movable
    generation, so it is neither exported nor migrated, and it ends at once with a `stream_cut`
    error event, not a hang and not [DONE]."""
    _, b = functions
    reqs = [body(None), body(4242), {k: v for k, v in body(77).items() if k != "logprobs"},
            {**body(5), "n": 2}]
    wants = [reference(b, req) for req in reqs[:3]]
    before = counters(exporting.admin, "activator_stream_recoveries")
    got = kill_mid_stream(exporting, spare("victim"), reqs, then=b)
    for g, w in zip(got[:2], wants[:2], strict=True):
        assert 16 <= len(w.tokens)
        assert_same(g, w)  # token by token, logprob by logprob, text, finish, usage
    assert got[2].errors == [] and got[2].done == 1
    assert (got[2].text, got[2].usage, got[2].finish) == (wants[2].text, wants[2].usage, wants[2].finish)
    cut = got[3]
    assert cut.done == 0, "a cut stream must not end with [DONE]"
    assert [e["error"]["code"] for e in cut.errors] == ["stream_cut"], cut.errors
    assert "broke off the stream" in cut.errors[0]["error"]["message"]
    after = counters(exporting.admin, "activator_stream_recoveries")
    assert after["resumed"] == before["resumed"] + 3, (before, after)
    assert after["diverged"] == before["diverged"] and after["no_instance"] == before["no_instance"]


def test_the_resume_waits_for_an_instance_when_none_is_left(exporting, functions, spare):
    """The dead instance was the service's only one: the resume waits, as a held request does,
    until an instance is in rotation again (here 1.5 s later; on a cluster, the cold start the
    autoscaler makes for that demand), then the client's stream goes on where it was."""
    _, b = functions
    victim = spare("victim-alone")
    want = reference(b, body(99))
    [got] = kill_mid_stream(exporting, victim, [body(99)], then=b, add_later=1.5)
    assert_same(got, want)
    assert "no instance to resume the stream on: waiting for one" in exporting.log_path.read_text()


def test_a_resume_that_differs_from_what_was_sent_is_cut_not_spliced(exporting, functions, spare, tiny_model,
                                                                      logs, tmp_path):
    """The only instance left to resume on computes differently (here: other weights under the same
    served name; on a real cluster, numerics that are not batch-invariant): the text it regenerates
    between the export and what the client has differs, and the client gets a `stream_cut` error
    event instead of an answer spliced from two different generations."""
    from sllm_knative.models import build_model

    impostor = Function("impostor", build_model(tmp_path / "other", seed=1), logs)
    try:
        impostor.wait_ready()
        req = {k: v for k, v in body(None).items() if k != "logprobs"}
        # On a loaded machine the stream can end in the few tokens between the export and the
        # kill (nothing was cut and nothing resumed), or a later export can land before the kill
        # (nothing to regenerate): then the scenario is tried again with a new victim. A clean end
        # after a resume with text to regenerate would be a splice, and fails below.
        covered = False
        for attempt in range(4):
            victim = spare(f"victim-diverged-{attempt}")
            if attempt == 0:
                assert reference(impostor, req).text != reference(victim, req).text
            exporting.set_instances(victim)
            exported = counters(exporting.admin, "activator_stream_exports")["ok"]
            before = counters(exporting.admin, "activator_stream_recoveries")
            out = Collected()
            t = threading.Thread(target=stream, args=(exporting.url, req, out))
            t.start()
            try:
                started([out], [t])
                wait_for_exports(exporting, exported + 1, [out])
                # A few tokens after that export, before the next (0.25 s later): the kill leaves
                # text to regenerate (4 tokens take 10-250 ms here, idle to loaded).
                seen = out.chunks
                while out.chunks < seen + 4 and t.is_alive():
                    time.sleep(0.002)
                exporting.set_instances(victim, impostor)
                victim.kill()
                # Read at once after the kill (the victim exports nothing more; the impostor only
                # after a resume and its prefill): if an export later than the one waited for
                # succeeded, it holds what the client has, nothing is regenerated, and the resume is
                # a clean continuation: not this scenario (seen in CI on a loaded machine).
                covered = counters(exporting.admin, "activator_stream_exports")["ok"] > exported + 1
            finally:
                t.join(60)
            assert not t.is_alive(), "the stream hung"
            after = counters(exporting.admin, "activator_stream_recoveries")
            if not covered and not (out.done == 1 and out.errors == [] and after == before):
                break
    finally:
        impostor.stop()
    assert out.done == 0 and len(out.errors) == 1, (out.done, out.errors, attempt)
    assert out.errors[0]["error"]["code"] == "stream_cut" and "differs" in out.errors[0]["error"]["message"]
    assert after["diverged"] == before["diverged"] + 1, (before, after)


def test_a_stream_of_several_choices_is_never_exported(exporting, functions):
    """A stream of several choices runs for several export intervals and ends with [DONE]; the
    activator tries no export of it (its choices are generations `<id>-0`, `<id>-1`, ..., and the
    stream does not name a movable generation). Before the instance said which streams it can move, this
    stream was exported every interval and answered 404 each time, counted as `finished`."""
    _, b = functions
    exporting.set_instances(b)
    before = counters(exporting.admin, "activator_stream_exports")
    out = Collected()
    t0 = time.monotonic()
    # four choices (four rows a step): two ran 480 tokens in 0.85 s on a fast host, under 4 intervals
    stream(exporting.url, {**body(5), "n": 4}, out)
    assert time.monotonic() - t0 > 3 * 0.25, "the stream ended before the activator's exports came round"
    assert out.errors == [] and out.done == 1
    after = counters(exporting.admin, "activator_stream_exports")
    assert after == before, (before, after)
