"""The pure parts of the handoff: when to detach, where to go, SSE frames and trimming."""

from __future__ import annotations

import json

import pytest

from activator.balancer import RoutedInstance
from activator.migration import (
    Frame,
    MigrationConfig,
    MigrationPhase,
    classify,
    follow_done,
    next_action,
    pick_destination,
    split_frames,
    trim_frame,
)
from functions.llm.drain import drain_target

CFG = MigrationConfig(gap_threshold=2, max_rounds=4, settle_gap=16)


@pytest.mark.parametrize("rounds, gap, want", [
    pytest.param(1, 200, MigrationPhase.PREFILL, id="large-gap-prefills-again"),
    pytest.param(1, 2, MigrationPhase.DETACH, id="gap-at-threshold-detaches"),
    pytest.param(2, 1, MigrationPhase.DETACH, id="small-gap-detaches"),
    pytest.param(2, 0, MigrationPhase.DETACH, id="no-gap-detaches"),
    pytest.param(3, 40, MigrationPhase.PREFILL, id="large-gap-under-the-bound"),
    pytest.param(4, 30, MigrationPhase.FOLLOW, id="rounds-spent-follows"),
    pytest.param(4, 2, MigrationPhase.DETACH, id="rounds-spent-small-gap-detaches"),
    pytest.param(1, 16, MigrationPhase.FOLLOW, id="gap-at-settle-follows"),
    pytest.param(2, 6, MigrationPhase.FOLLOW, id="small-gap-follows"),
    pytest.param(3, 600, MigrationPhase.PREFILL, id="large-gap-gets-another-round-until-the-bound"),
    pytest.param(2, 17, MigrationPhase.PREFILL, id="just-over-settle-prefills-again"),
])
def test_next_action(rounds, gap, want):
    assert next_action(rounds, gap, CFG) is want


def test_next_action_without_follow_or_settle():
    cfg = MigrationConfig(gap_threshold=2, max_rounds=4, settle_gap=0)
    assert next_action(2, 6, cfg) is MigrationPhase.PREFILL  # settle_gap 0: waited rounds until max_rounds
    assert next_action(4, 6, cfg) is MigrationPhase.FOLLOW
    cfg = MigrationConfig(gap_threshold=2, max_rounds=4, settle_gap=16, max_follow=0)
    assert next_action(2, 6, cfg) is MigrationPhase.DETACH  # no follow phase: detach where it would begin
    assert next_action(4, 30, cfg) is MigrationPhase.DETACH


@pytest.mark.parametrize("lags, want", [
    pytest.param([1], True, id="keeps-pace"),
    pytest.param([2], True, id="lag-at-threshold"),
    pytest.param([3], False, id="behind"),
    pytest.param([0], True, id="idle-destination"),
    pytest.param([9] * 63, False, id="behind-within-the-bound"),
    pytest.param([9] * 64, True, id="steps-spent"),
    pytest.param([3, 4, 3, 5, 7, 8, 4, 3], False, id="noisy-but-steady"),
    pytest.param([3, 4, 3, 5, 5, 5, 6, 6], True, id="falling-behind"),
    pytest.param([3, 4, 3, 5, 4, 5, 6, 6], False, id="one-above-is-noise"),
    pytest.param([38, 39, 40, 41, 42, 43, 44, 45], True, id="lag-grows-every-step"),
    pytest.param([40, 39, 38, 37, 36, 35, 34, 33], False, id="catching-up"),
    pytest.param([3, 4, 5, 6, 7, 8, 9], False, id="too-few-steps-to-tell"),
])
def test_follow_done(lags, want):
    assert follow_done(lags, CFG) is want


@pytest.mark.parametrize("kwargs, message", [
    pytest.param({"gap_threshold": -1}, "gap_threshold = -1", id="negative-gap"),
    pytest.param({"max_rounds": 0}, "max_rounds = 0", id="no-rounds"),
    pytest.param({"settle_gap": -1}, "settle_gap = -1", id="negative-settle-gap"),
    pytest.param({"max_follow": -1}, "max_follow = -1", id="negative-follow"),
    pytest.param({"request_timeout_s": 0}, "request_timeout_s = 0", id="zero-timeout"),
])
def test_config_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MigrationConfig(**kwargs)


def inst(name: str, outstanding: int, internal: bool = True, capacity: int = 0) -> RoutedInstance:
    return RoutedInstance(name, f"http://{name}", outstanding=outstanding, capacity=capacity,
                          internal_url=f"http://{name}:1" if internal else "")


@pytest.mark.parametrize("instances, exclude, want", [
    pytest.param([inst("src", 0), inst("b", 3), inst("c", 1)], frozenset(), "c", id="least-loaded-not-source"),
    pytest.param([inst("src", 0), inst("b", 3), inst("c", 1)], frozenset({"c"}), "b", id="excluded-skipped"),
    pytest.param([inst("src", 0), inst("b", 0, internal=False)], frozenset(), None, id="no-internal-api"),
    pytest.param([inst("src", 0)], frozenset(), None, id="only-the-source"),
    pytest.param([inst("src", 0), inst("b", 1, capacity=1), inst("c", 2, capacity=4)], frozenset(), "c",
                 id="room-beats-fewer-outstanding"),
    pytest.param([inst("src", 0), inst("b", 2, capacity=2), inst("c", 1, capacity=1)], frozenset(), "c",
                 id="no-room-anywhere-least-loaded"),
])
def test_pick_destination(instances, exclude, want):
    got = pick_destination(instances, "src", exclude)
    assert (got.id if got else None) == want


@pytest.mark.parametrize("buf, frames, rest", [
    pytest.param(b"data: 1\n\ndata: 2\n\n", [b"data: 1\n\n", b"data: 2\n\n"], b"", id="whole"),
    pytest.param(b"data: 1\n\ndata: 2", [b"data: 1\n\n"], b"data: 2", id="partial-tail"),
    pytest.param(b"", [], b"", id="empty"),
])
def test_split_frames(buf, frames, rest):
    assert split_frames(buf) == (frames, rest)


def data(text: str, finish: str | None = None) -> bytes:
    chunk = {"id": "cmpl-1", "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


@pytest.mark.parametrize("frame, kind", [
    pytest.param(b"event: sllm.detached\ndata: {\"id\": \"x\", \"position\": 9}\n\n", Frame.DETACHED, id="detached"),
    pytest.param(b"data: [DONE]\n\n", Frame.DONE, id="done"),
    pytest.param(data("hi"), Frame.DATA, id="data"),
    pytest.param(b": keep-alive\n\n", Frame.OTHER, id="comment"),
])
def test_classify(frame, kind):
    assert classify(frame)[0] is kind


@pytest.mark.parametrize("frame, skip, text, dropped", [
    pytest.param(data("abc"), 0, "abc", "", id="nothing-to-skip"),
    pytest.param(data("abc"), 3, None, "abc", id="already-delivered"),
    pytest.param(data("abc"), 5, None, "abc", id="part-of-a-larger-skip"),
    pytest.param(data("abcdef"), 2, "cdef", "ab", id="overlap-trimmed"),
    pytest.param(data("", "length"), 4, "", "", id="finish-frame-passes"),
])
def test_trim_frame(frame, skip, text, dropped):
    out, gone = trim_frame(frame, skip)
    assert gone == dropped
    if text is None:
        assert out is None
    else:
        assert json.loads(out[6:])["choices"][0]["text"] == text


@pytest.mark.parametrize("env, want", [
    pytest.param({}, None, id="unset"),
    pytest.param({"SLLM_DRAIN_URL": "http://a/", "SLLM_INSTANCE": "i"}, ("http://a", "i", 20.0), id="default-grace"),
    pytest.param({"SLLM_DRAIN_URL": "http://a", "SLLM_INSTANCE": "i", "SLLM_DRAIN_GRACE_S": "5"},
                 ("http://a", "i", 5.0), id="grace"),
    pytest.param({"SLLM_DRAIN_URL": "http://a"}, None, id="no-instance"),
])
def test_drain_target(env, want):
    assert drain_target(env) == want


def test_drain_target_rejects_bad_grace():
    with pytest.raises(ValueError, match="SLLM_DRAIN_GRACE_S"):
        drain_target({"SLLM_DRAIN_URL": "http://a", "SLLM_INSTANCE": "i", "SLLM_DRAIN_GRACE_S": "soon"})
