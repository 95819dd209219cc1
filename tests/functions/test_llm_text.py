"""Incremental detokenization and stop strings (functions.llm.text.TextTracker)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from functions.llm.text import TextTracker


@pytest.fixture(scope="module")
def tok(tiny_model):
    return AutoTokenizer.from_pretrained(str(tiny_model))


TEXT = "The quick brown fox jumps over the lazy dog. Paris? 100 + 1000 = 1100! Héllo wörld ✓"


def _run(tok, text: str, stop=()) -> tuple[list[str], TextTracker]:
    tracker = TextTracker(tok, stop)
    out = []
    for t in tok.encode(text, add_special_tokens=False):
        out.append(tracker.add(t))
        if tracker.stopped:
            break
    out.append(tracker.flush())
    return out, tracker


def test_incremental_text_equals_full_decode(tok):
    pieces, _ = _run(tok, TEXT)
    assert "".join(pieces) == TEXT
    assert all("\ufffd" not in p for p in pieces)  # multi-byte characters are released whole


@pytest.mark.parametrize("stop,expected", [
    pytest.param(("fox",), "The quick brown ", id="word"),
    pytest.param((" over", "lazy"), "The quick brown fox jumps", id="first-of-two"),
    pytest.param(("lazy", " over"), "The quick brown fox jumps", id="order-does-not-matter"),
    pytest.param(("Paris?",), "The quick brown fox jumps over the lazy dog. ", id="punctuation"),
    pytest.param(("wörld",), TEXT[:TEXT.index("wörld")], id="multibyte"),
    pytest.param(("absent",), TEXT, id="never-seen"),
    pytest.param(("",), TEXT, id="empty-ignored"),
])
def test_stop_strings(tok, stop, expected):
    pieces, tracker = _run(tok, TEXT, stop)
    assert "".join(pieces) == expected
    assert tracker.stopped == (expected != TEXT)


def test_partial_stop_is_held_back_then_released(tok):
    tracker = TextTracker(tok, ("brown cow",))
    released = ""
    for t in tok.encode("The quick brown fox", add_special_tokens=False):
        released += tracker.add(t)
        assert not released.endswith("brown")  # could still become the stop string
    assert released + tracker.flush() == "The quick brown fox"


def test_replay_rebuilds_state(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    original = TextTracker(tok, ("zzz",))
    sent = "".join(original.add(t) for t in ids[:20])
    copy = TextTracker(tok, ("zzz",))
    copy.replay(ids[:20], len(sent))
    rest_a = "".join(original.add(t) for t in ids[20:]) + original.flush()
    rest_b = "".join(copy.add(t) for t in ids[20:]) + copy.flush()
    assert rest_a == rest_b and sent + rest_a == TEXT
    with pytest.raises(ValueError, match="text_offset"):
        TextTracker(tok).replay(ids[:3], 10_000)


@pytest.mark.parametrize("stop", [(), ("zzz",), ("lazy dog",), ("wörld",)])
def test_restore_continues_like_replay(tok, stop):
    """At every split point (mid-character and held-back stop prefixes included), a tracker
    restored from a snapshot emits exactly what the original and a replayed tracker emit."""
    ids = tok.encode(TEXT, add_special_tokens=False)
    for split in range(len(ids) + 1):
        original = TextTracker(tok, stop)
        sent = ""
        for t in ids[:split]:
            sent += original.add(t)
            if original.stopped:
                break
        if original.stopped:
            continue
        restored, replayed = TextTracker(tok, stop), TextTracker(tok, stop)
        restored.restore(ids[:split], original.snapshot(), len(sent))
        replayed.replay(ids[:split], len(sent))
        outs = []
        for tracker in (original, restored, replayed):
            out = []
            for t in ids[split:]:
                out.append(tracker.add(t))
                if tracker.stopped:
                    break
            out.append(tracker.flush())
            outs.append((out, tracker.stopped))
        assert outs[0] == outs[1] == outs[2], split


def test_restore_rejects_inconsistent_snapshot(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)[:8]
    tracker = TextTracker(tok)
    for t in ids:
        tracker.add(t)
    snap = tracker.snapshot()
    with pytest.raises(ValueError, match="decode offsets"):
        TextTracker(tok).restore(ids[:2], snap, 0)
    with pytest.raises(ValueError, match="text_offset"):
        TextTracker(tok).restore(ids, snap, len(snap.text) + 1)
    stopped = TextTracker(tok, ("quick",))
    for t in tok.encode("The quick", add_special_tokens=False):
        stopped.add(t)
    with pytest.raises(RuntimeError, match="stopped"):
        stopped.snapshot()
