"""sllm_knative.atomic: readers see the old file or the new one, never a half-written one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sllm_knative import atomic


@pytest.mark.parametrize("durable", [True, False])
def test_write_replaces_whole(tmp_path: Path, durable: bool) -> None:
    p = tmp_path / "doc.json"
    p.write_text("old")
    atomic.write_json(p, {"a": 1}, durable=durable, indent=1)
    assert json.loads(p.read_text()) == {"a": 1}
    atomic.write_text(p, "text", durable=durable)
    assert p.read_text() == "text"
    atomic.write_bytes(p, b"\x00\x01", durable=durable)
    assert p.read_bytes() == b"\x00\x01"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["doc.json"]  # no temporary left


def test_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    p = tmp_path / "doc.json"
    p.write_text("old")
    with pytest.raises(RuntimeError, match="midway"), atomic.open_atomic(p) as f:
        f.write("half of the new")
        raise RuntimeError("midway")
    assert p.read_text() == "old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["doc.json"]


def test_unserialisable_document_is_refused_before_the_rename(tmp_path: Path) -> None:
    p = tmp_path / "doc.json"
    p.write_text('{"ok": true}')
    with pytest.raises(TypeError):
        atomic.write_json(p, {"bad": object()})
    assert json.loads(p.read_text()) == {"ok": True}
    assert sorted(x.name for x in tmp_path.iterdir()) == ["doc.json"]


def test_temporary_is_hidden_and_beside_the_target(tmp_path: Path) -> None:
    t = atomic.temp_name(tmp_path / "x.bin")
    assert t.parent == tmp_path and t.name.startswith(".x.bin.") and t.name.endswith(".tmp")
