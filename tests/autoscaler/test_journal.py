"""The local autoscaler's journal of what was applied: what it keeps, what a replay rebuilds,
and a damaged file named with what is wrong."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from autoscaler.backends.memory import MemoryActivator, MemoryBackend
from autoscaler.controller import Autoscaler
from autoscaler.journal import Journal, JournalError, replay
from tests.autoscaler.cluster import ALLOW_ZERO_INITIAL_SCALE, SIZES, node, service


def doc(*parts: str) -> str:
    return "---\n".join([ALLOW_ZERO_INITIAL_SCALE, *parts])


def rebuilt(path: Path) -> dict[str, dict]:
    """The services a fresh autoscaler has after replaying the journal at `path`: key -> a few fields."""
    async def go() -> dict[str, dict]:
        backend = MemoryBackend([node("n1")], SIZES)
        scaler = Autoscaler(backend, MemoryActivator(backend))
        await replay(Journal(path), scaler)
        out = {k: {"keep_alive": rt.policy.keep_alive if rt.policy else None, "model": rt.model}
               for k, rt in scaler.services.items()}
        await scaler.close()
        return out
    return asyncio.run(go())


OPS = {
    "one apply": ([("apply", doc(service("a")))], {"default/a": 5.0}),
    "last apply wins": ([("apply", doc(service("a"))), ("apply", doc(service("a", keep_alive="9s")))],
                        {"default/a": 9.0}),
    "the first again wins again": ([("apply", doc(service("a"))), ("apply", doc(service("a", keep_alive="9s"))),
                                    ("apply", doc(service("a")))], {"default/a": 5.0}),
    "delete": ([("apply", doc(service("a"), service("b"))), ("delete", "default/a")], {"default/b": 5.0}),
    "delete then apply": ([("apply", doc(service("a"))), ("delete", "default/a"), ("apply", doc(service("a")))],
                          {"default/a": 5.0}),
}


@pytest.mark.parametrize("ops,want", list(OPS.values()), ids=list(OPS))
def test_a_replay_rebuilds_what_was_applied(ops: list[tuple[str, str]], want: dict[str, float],
                                            tmp_path: Path) -> None:
    path = tmp_path / "applied.json"
    j = Journal(path)
    for op, arg in ops:
        j.applied(arg, "test.yaml") if op == "apply" else j.deleted(arg)
    got = rebuilt(path)
    assert {k: v["keep_alive"] for k, v in got.items()} == want
    assert Journal(path).entries == j.entries  # what was written is what is read


def test_an_entry_that_no_longer_parses_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "applied.json"
    path.write_text(json.dumps({"version": 1, "entries": [
        {"op": "apply", "text": "kind: Nonsense\n", "source": "old.yaml"},
        {"op": "apply", "text": doc(service("b")), "source": "b.yaml"}]}))
    assert set(rebuilt(path)) == {"default/b"}


@pytest.mark.parametrize("content,message", [
    ("{not json", "not a readable journal"),
    (json.dumps({"version": 2, "entries": []}), "not a version 1 journal"),
    (json.dumps([]), "not a version 1 journal"),
    (json.dumps({"version": 1, "entries": [{"op": "apply", "text": "x"}]}), "entries[0] is neither"),
    (json.dumps({"version": 1, "entries": [{"op": "delete"}]}), "entries[0] is neither"),
    (json.dumps({"version": 1, "entries": [{"op": "apply", "text": "x", "source": "s"}, {"op": "drop"}]}),
     "entries[1] is neither"),
])
def test_a_damaged_journal_is_named(content: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "applied.json"
    path.write_text(content)
    with pytest.raises(JournalError, match=r"applied\.json: .*" + message.replace("[", r"\[").replace("]", r"\]")):
        Journal(path)


def test_no_journal_is_empty(tmp_path: Path) -> None:
    assert Journal(tmp_path / "none.json").entries == []
