"""Conversion: atomic results, clear errors on bad sources, streaming memory, the CLI."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from sllm_knative import format as fmt
from sllm_knative.convert import ConversionError, convert


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_result_holds_index_partitions_and_aux_files(tiny_src: Path, tiny_ckpt: Path) -> None:
    names = {p.name for p in tiny_ckpt.iterdir()}
    assert {fmt.INDEX_NAME, "partition-0.bin", "config.json", "generation_config.json", "tokenizer.json"} <= names
    assert not any(n.endswith(".safetensors") for n in names)
    assert not _leftovers(tiny_ckpt.parent)


def test_existing_destination_needs_overwrite(tiny_src: Path, tmp_path: Path) -> None:
    dst = convert(tiny_src, tmp_path / "dst")
    before = (dst / fmt.INDEX_NAME).read_bytes()
    with pytest.raises(FileExistsError):
        convert(tiny_src, dst)
    convert(tiny_src, dst, overwrite=True, partitions=2)
    assert (dst / fmt.INDEX_NAME).read_bytes() != before
    assert len(fmt.read_index(dst).partitions) == 2
    assert not _leftovers(tmp_path)


def _bad_header_source(tmp: Path, header: bytes, data: bytes = b"") -> Path:
    src = tmp / "bad"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + data)
    return src


@pytest.mark.parametrize(("header", "data", "message"), [
    pytest.param(b"{not json", b"", "not valid JSON", id="header-json"),
    pytest.param(json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode(), b"\0" * 8,
                 "do not match", id="data-past-eof"),
    pytest.param(json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode(), b"\0" * 16,
                 "do not match", id="size-mismatch"),
    pytest.param(json.dumps({"w": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}).encode(), b"\0",
                 "unsupported dtype", id="unknown-dtype"),
    pytest.param(json.dumps({"w": {"shape": [1]}}).encode(), b"", "needs dtype", id="missing-fields"),
])
def test_bad_source_fails_cleanly(tmp_path: Path, header: bytes, data: bytes, message: str) -> None:
    src = _bad_header_source(tmp_path, header, data)
    with pytest.raises(ConversionError, match=message):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not _leftovers(tmp_path)


def test_no_weights_and_missing_shard(tmp_path: Path, tiny_src: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConversionError, match="no \\*.safetensors"):
        convert(empty, tmp_path / "o1")
    src = tmp_path / "idx"
    src.mkdir()
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "missing.safetensors"}}))
    with pytest.raises(ConversionError, match="missing"):
        convert(src, tmp_path / "o2")
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../../etc/passwd"}}))
    with pytest.raises(ConversionError, match="plain file name"):
        convert(src, tmp_path / "o3")


def test_interrupted_conversion_leaves_nothing_that_looks_complete(tiny_src: Path, tmp_path: Path) -> None:
    """Kill the converter midway: no destination, and no index anywhere but in a temp dir."""
    from sllm_knative.models import build_model, spec_for_size

    big = build_model(tmp_path / "big", spec_for_size(96 << 20, vocab_size=4096))
    code = ("import sys, time; from sllm_knative import convert as c\n"
            "orig = c._BlockWriter.write\n"
            "def slow(self, d):\n    time.sleep(0.05); orig(self, d)\n"
            "c._BlockWriter.write = slow\n"
            "c.convert(sys.argv[1], sys.argv[2])\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(big), str(tmp_path / "dst")])
    import time

    for _ in range(600):
        if _leftovers(tmp_path) and list(tmp_path.glob(".dst.tmp-*/partition-0.bin")):
            break
        time.sleep(0.05)
    assert _leftovers(tmp_path), "the converter never started writing"
    proc.kill()
    proc.wait()
    assert not (tmp_path / "dst").exists()
    for tmp in _leftovers(tmp_path):
        assert not (tmp_path / tmp / fmt.INDEX_NAME).exists()  # index is written last


def test_conversion_streams_with_bounded_memory(tmp_path: Path) -> None:
    """Peak memory growth stays below the largest tensor + 128 MiB (spec allows + 512 MiB)."""
    from sllm_knative.models import build_model, spec_for_size

    spec = spec_for_size(400 << 20, vocab_size=8192)
    src = build_model(tmp_path / "src", spec)
    largest = spec.vocab_size * spec.hidden_size * 2
    code = ("import resource, sys, torch, transformers\n"
            "from sllm_knative.convert import convert\n"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "convert(sys.argv[1], sys.argv[2])\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)\n")
    out = subprocess.run([sys.executable, "-c", code, str(src), str(tmp_path / "dst")], check=True,
                         capture_output=True, text=True).stdout
    growth = int(out.strip().splitlines()[-1])
    total = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    assert total > largest + (128 << 20)  # a non-streaming converter would exceed the bound
    assert growth < largest + (128 << 20), f"peak RSS grew by {growth >> 20} MiB"


def test_cli_convert(tiny_src: Path, tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "sllm-knative"
    r = subprocess.run([str(exe), "convert", str(tiny_src), str(tmp_path / "c"), "--no-progress"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert fmt.is_checkpoint(tmp_path / "c")
    r = subprocess.run([str(exe), "convert", str(tiny_src), str(tmp_path / "c"), "--no-progress"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "destination exists" in r.stderr
    r = subprocess.run([str(exe), "convert", str(tmp_path / "missing"), str(tmp_path / "d")],
                       capture_output=True, text=True, env={**os.environ})
    assert r.returncode == 2 and "source model directory not found" in r.stderr
