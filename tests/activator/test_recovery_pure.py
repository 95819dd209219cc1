"""The pure parts of resuming a stream whose instance died (activator/migration/tracked.py,
splice.py): which delivered text a stream keeps once its state is exported, which export it keeps,
and the check of a resumed generation's regenerated text against what the client already has.
End to end, with real processes and kill -9: tests/migration/test_recovery.py."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from activator.balancer import Breaker, RoutedInstance
from activator.migration.splice import _Regenerated
from activator.migration.tracked import StreamTable, Tracked
from sllm_knative.api.instance import GenerationState
from sllm_knative.api.keys import ServiceKey
from sllm_knative.api.migration import MigrationOutcome


def frame(text: str) -> bytes:
    return b"data: " + json.dumps({"choices": [{"text": text, "index": 0}]}).encode() + b"\n\n"


def state(position: int, text_offset: int) -> GenerationState:
    return GenerationState.model_validate({
        "version": 1, "id": "cmpl-1", "kind": "completion", "tokens": list(range(position)), "prompt_len": 1,
        "position": position, "sampling": {"temperature": 0.0}, "text_offset": text_offset})


def run(steps: list[tuple[str, Any]]) -> Tracked:
    """Play steps on a fresh Tracked: ("send", text) a frame passes the relay, ("mark", None) an
    export is asked for, ("export", (position, text_offset)) its answer arrives."""
    async def play() -> Tracked:
        t = Tracked("cmpl-1", ServiceKey("default", "m"), RoutedInstance("a", "http://a"), Breaker())
        for op, arg in steps:
            if op == "send":
                t.keep(frame(arg))
            elif op == "mark":
                t.mark()
            else:
                t.checkpoint(state(*arg))
        t.fold()
        return t

    return asyncio.run(play())


@pytest.mark.parametrize(("steps", "offset", "want"), [
    pytest.param([("send", "ab"), ("send", "cd")], 0, None, id="no-export-asked-nothing-kept"),
    pytest.param([("send", "ab"), ("mark", None), ("send", "cd"), ("send", "ef")], 2, "cdef",
                 id="kept-from-the-mark"),
    pytest.param([("send", "ab"), ("mark", None), ("send", "cd"), ("export", (5, 3)), ("send", "ef")], 3, "def",
                 id="export-trims-before-its-offset"),
    pytest.param([("send", "ab"), ("mark", None), ("send", "cd"), ("export", (5, 3))], 2, None,
                 id="before-the-kept-text-is-unknown"),
    pytest.param([("mark", None), ("send", "ab"), ("export", (9, 10)), ("send", "cd")], 2, "cd",
                 id="offset-past-delivered-keeps-from-delivered"),
    pytest.param([("mark", None), ("send", "ab"), ("export", (6, 2)), ("export", (4, 0)), ("send", "c")], 2, "c",
                 id="an-older-export-is-ignored"),
])
def test_the_text_kept_after_an_export(steps, offset, want):
    assert run(steps).sent_after(offset) == want


def test_the_newest_export_is_the_one_kept():
    t = run([("mark", None), ("send", "ab"), ("export", (6, 2)), ("export", (4, 0)), ("export", (8, 2))])
    assert t.last_state is not None and t.last_state.position == 8
    assert t.delivered == 2


@pytest.mark.parametrize(("expected", "pieces", "ok"), [
    pytest.param("hello", ["he", "llo"], [True, True], id="same-text"),
    pytest.param("hello", ["he", "LLO"], [True, False], id="differs"),
    pytest.param("hello", ["hello wor"], [True], id="longer-than-sent-only-its-prefix-counts"),
    pytest.param("hello", ["x"], [False], id="differs-at-once"),
    pytest.param(None, ["anything"], [True], id="not-kept-nothing-to-check"),
    pytest.param("", ["abc"], [True], id="nothing-sent-after-the-export"),
])
def test_the_regenerated_text_is_checked_against_what_was_sent(expected, pieces, ok):
    check = _Regenerated(expected)
    assert [check.add(p) for p in pieces] == ok


@pytest.mark.parametrize(("streaming", "ended", "internal", "exporting", "due"), [
    pytest.param(True, False, "http://a:1", False, True, id="relayed-stream"),
    pytest.param(False, False, "http://a:1", False, False, id="not-a-stream"),
    pytest.param(True, True, "http://a:1", False, False, id="ended"),
    pytest.param(True, False, "", False, False, id="no-internal-api"),
    pytest.param(True, False, "http://a:1", True, False, id="export-in-flight"),
])
def test_which_streams_are_exported(streaming, ended, internal, exporting, due):
    async def check() -> bool:
        t = Tracked("cmpl-1", ServiceKey("default", "m"), RoutedInstance("a", "http://a", internal_url=internal),
                    Breaker())
        t.streaming, t.ended, t.exporting = streaming, ended, exporting
        table = StreamTable()
        table.add(t)
        return t in table.exportable()

    assert asyncio.run(check()) is due


def test_a_stream_being_migrated_is_not_exported_by_the_loop():
    async def check() -> tuple[bool, bool]:
        t = Tracked("cmpl-1", ServiceKey("default", "m"), RoutedInstance("a", "http://a", internal_url="http://a:1"),
                    Breaker())
        t.streaming = True
        table = StreamTable()
        table.add(t)
        t.begin(RoutedInstance("b", "http://b", internal_url="http://b:1"))
        during = t in table.exportable()
        t.settle(MigrationOutcome.MIGRATED)
        return during, t in table.exportable()

    assert asyncio.run(check()) == (False, True)
