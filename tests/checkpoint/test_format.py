"""The index parser: one row per failure, in the order docs/format.md validates."""

from __future__ import annotations

import pytest

from sllm_knative import format as fmt
from tests.checkpoint.conftest import encode, mutated, valid_index_doc


def test_valid_index_parses() -> None:
    idx = fmt.parse_index(encode(valid_index_doc()))
    assert [t.name for t in idx.tensors] == ["a", "a.T", "b", "empty"]
    assert idx.tensors[1].stride == (1, 4)
    assert idx.storages[1].nbytes == 24
    assert idx.total_bytes == 8192
    assert fmt.parse_index(idx.to_json()) == idx  # round-trips


def _set(path, value):
    def fn(doc):
        node = doc
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    return fn


def _del(path):
    def fn(doc):
        node = doc
        for k in path[:-1]:
            node = node[k]
        del node[path[-1]]
    return fn


BAD = [
    pytest.param(b"x" * (fmt.MAX_INDEX_BYTES + 1), fmt.IndexTooLarge, "exceeds", id="too-large"),
    pytest.param(b"\xff\xfe{}", fmt.MalformedIndex, "not UTF-8", id="not-utf8"),
    pytest.param(b'{"format": ', fmt.MalformedIndex, "invalid JSON", id="truncated-json"),
    pytest.param(b'{"a": 1, "a": 2}', fmt.MalformedIndex, "duplicate key", id="duplicate-key"),
    pytest.param(b"[]", fmt.MalformedIndex, "top level", id="not-object"),
    pytest.param(b'{"x": NaN}', fmt.MalformedIndex, "NaN", id="nan-constant"),
    pytest.param(b"[" * 100000 + b"]" * 100000, fmt.MalformedIndex, "", id="deep-nesting"),
    pytest.param(mutated(_set(["format"], "safetensors")), fmt.UnsupportedVersion, "format", id="wrong-format"),
    pytest.param(mutated(_set(["version"], 2)), fmt.UnsupportedVersion, "version 1, got 2", id="future-version"),
    pytest.param(mutated(_set(["version"], True)), fmt.UnsupportedVersion, "version", id="bool-version"),
    pytest.param(mutated(_del(["tensors"])), fmt.BadField, "missing field 'tensors'", id="missing-tensors"),
    pytest.param(mutated(_set(["extra"], 1)), fmt.BadField, "unknown field 'extra'", id="unknown-field"),
    pytest.param(mutated(_set(["alignment"], 384)), fmt.BadField, "power of two", id="alignment-not-pow2"),
    pytest.param(mutated(_set(["alignment"], 16)), fmt.BadField, "alignment", id="alignment-too-small"),
    pytest.param(mutated(_set(["partitions"], [])), fmt.BadField, "at least one", id="no-partitions"),
    pytest.param(mutated(_set(["partitions", 0, "file"], "../etc/passwd")), fmt.BadField, "partitions[0].file",
                 id="partition-path-traversal"),
    pytest.param(mutated(_set(["partitions", 0, "size"], 8000)), fmt.Misaligned, "multiple of 4096",
                 id="partition-size-unpadded"),
    pytest.param(mutated(_set(["partitions", 0, "size"], -4096)), fmt.BadField, "partitions[0].size",
                 id="partition-size-negative"),
    pytest.param(mutated(_set(["partitions", 0, "size"], 1 << 70)), fmt.BadField, "partitions[0].size",
                 id="partition-size-overflow"),
    pytest.param(mutated(_set(["partitions", 0, "checksum", "algorithm"], "md5")), fmt.BadField, "crc32c",
                 id="checksum-algorithm"),
    pytest.param(mutated(_set(["partitions", 0, "checksum", "blocks"], [1])), fmt.BadField,
                 "expected 2 checksums", id="checksum-count"),
    pytest.param(mutated(_set(["partitions", 0, "checksum", "blocks"], [1, 1 << 32])), fmt.BadField,
                 "blocks[1]", id="checksum-out-of-range"),
    pytest.param(mutated(_set(["partitions", 0, "checksum", "block_size"], 1000)), fmt.BadField,
                 "block_size", id="block-size-small"),
    pytest.param(mutated(_set(["storages", 0, "partition"], 1)), fmt.BadField, "storages[0].partition",
                 id="storage-partition-missing"),
    pytest.param(mutated(_set(["storages", 1, "offset"], 8192)), fmt.OutOfBounds, "outside partition",
                 id="storage-out-of-bounds"),
    pytest.param(mutated(_set(["storages", 1, "offset"], 100)), fmt.Misaligned, "storages[1].offset",
                 id="storage-misaligned"),
    pytest.param(mutated(_set(["storages", 1, "offset"], 0)), fmt.OverlappingStorages, "overlaps",
                 id="storages-overlap"),
    pytest.param(mutated(_set(["tensors", 0, "dtype"], "float128")), fmt.BadField, "unknown dtype",
                 id="unknown-dtype"),
    pytest.param(mutated(_set(["tensors", 0, "shape"], [4, "4"])), fmt.BadField, "tensors['a'].shape[1]",
                 id="shape-not-int"),
    pytest.param(mutated(_set(["tensors", 0, "shape"], [4, -1])), fmt.BadField, "tensors['a'].shape[1]",
                 id="shape-negative"),
    pytest.param(mutated(_set(["tensors", 0, "stride"], [4])), fmt.BadField, "1 entries for 2 dimensions",
                 id="stride-rank"),
    pytest.param(mutated(_set(["tensors", 0, "shape"], [5, 4])), fmt.ExtentMismatch, "needs 80 bytes",
                 id="extent-exceeds-storage"),
    pytest.param(mutated(_set(["tensors", 2, "storage_offset"], 0)), fmt.ExtentMismatch,
                 "storages[1].nbytes", id="storage-longer-than-tensors"),
    pytest.param(mutated(_set(["tensors", 0, "shape"], [1 << 40, 1 << 40])), fmt.BadField, "overflows",
                 id="shape-product-overflow"),
    pytest.param(mutated(_set(["tensors", 0, "stride"], [1 << 61, 1 << 61])), fmt.ExtentMismatch, "overflows",
                 id="extent-overflow"),
    pytest.param(mutated(_set(["tensors", 1, "name"], "a")), fmt.BadField, "duplicate tensor name",
                 id="duplicate-tensor"),
    pytest.param(mutated(_set(["tensors", 1, "name"], "")), fmt.BadField, "non-empty string", id="empty-name"),
    pytest.param(mutated(_set(["tensors", 0, "storage"], 7)), fmt.BadField, "tensors['a'].storage",
                 id="storage-id-out-of-range"),
    pytest.param(mutated(lambda d: d["tensors"].pop(3)), fmt.ExtentMismatch, "not used by any tensor",
                 id="orphan-storage"),
    pytest.param(mutated(_set(["metadata"], {"k": 1})), fmt.BadField, "metadata['k']", id="metadata-type"),
]


@pytest.mark.parametrize(("raw", "error", "message"), BAD)
def test_malformed_index_rejected(raw: bytes, error: type[fmt.FormatError], message: str) -> None:
    with pytest.raises(error) as info:
        fmt.parse_index(raw)
    assert isinstance(info.value, ValueError)
    assert message in str(info.value)


def test_extent_helpers() -> None:
    assert fmt.extent_bytes((4, 4), (1, 4), 0, 4) == 64
    assert fmt.extent_bytes((0, 3), (3, 1), 5, 4) == 0
    assert fmt.extent_bytes((2, 3), (0, 1), 2, 2) == 10  # broadcast stride 0
    assert fmt.contiguous_stride((2, 3, 4)) == (12, 4, 1)
    assert fmt.contiguous_stride((2, 0, 4)) == (4, 4, 1)
