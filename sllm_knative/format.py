"""The loading-optimized checkpoint format: index types, validation, verification.

A checkpoint directory holds `sllm-index.json`, partition files `partition-<i>.bin` and the
Hugging Face config/tokenizer files. docs/format.md is the specification; this module is its
reader. `parse_index` validates in a fixed order before anything is read into memory:

    1. size cap of the index            (IndexTooLarge)
    2. UTF-8 and JSON, no duplicate keys (MalformedIndex)
    3. format name and version          (UnsupportedVersion)
    4. top-level fields                 (BadField)
    5. partitions: names, sizes, checksum lists (BadField)
    6. storages: bounds inside their partition, alignment (OutOfBounds, Misaligned),
       no two storages overlapping      (OverlappingStorages)
    7. tensors: dtype, shape, stride, storage offset, extent inside the storage, overflow
       checked                           (BadField, ExtentMismatch)
    8. every storage's length equals the largest extent of its tensors (ExtentMismatch)

`read_index(dir)` adds step 9: the partition files exist with the recorded sizes
(PartitionSizeMismatch). Every error is a `FormatError` (a ValueError) naming the field.

    FormatError (ValueError)
     ├── IndexTooLarge
     ├── MalformedIndex
     ├── UnsupportedVersion
     ├── BadField
     ├── OutOfBounds
     ├── Misaligned
     ├── OverlappingStorages
     ├── ExtentMismatch
     ├── PartitionSizeMismatch
     └── ChecksumError            (raised while verifying or loading bytes)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

FORMAT_NAME = "sllm-knative-checkpoint"
FORMAT_VERSION = 1
INDEX_NAME = "sllm-index.json"
MAX_INDEX_BYTES = 64 << 20
PAGE = 4096
MIN_ALIGNMENT = 256
DEFAULT_BLOCK_SIZE = 16 << 20
# Offsets and sizes must fit a signed 64-bit integer on the C++ side.
MAX_BYTES = (1 << 62) - 1
MAX_DIMS = 64

# dtype name -> itemsize. Names are torch's (`str(torch.float16)` without the prefix).
DTYPES: dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "float8_e4m3fn": 1, "float8_e4m3fnuz": 1, "float8_e5m2": 1, "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1,
    "uint64": 8, "uint32": 4, "uint16": 2, "uint8": 1,
    "bool": 1, "complex64": 8, "complex128": 16,
}

_PARTITION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")


class FormatError(ValueError):
    """A checkpoint index or partition that does not follow docs/format.md."""

    def __init__(self, where: str, message: str) -> None:
        self.where = where
        self.message = message
        super().__init__(f"{where}: {message}" if where else message)


class IndexTooLarge(FormatError):
    pass


class MalformedIndex(FormatError):
    pass


class UnsupportedVersion(FormatError):
    pass


class BadField(FormatError):
    pass


class OutOfBounds(FormatError):
    pass


class Misaligned(FormatError):
    pass


class OverlappingStorages(FormatError):
    pass


class ExtentMismatch(FormatError):
    pass


class PartitionSizeMismatch(FormatError):
    pass


class ChecksumError(FormatError):
    """A block whose crc32c differs from the index (raised by the extension and verify_partition)."""

    def __init__(self, path: str, block: int, offset: int, expected: int, actual: int) -> None:
        self.path, self.block, self.offset, self.expected, self.actual = path, block, offset, expected, actual
        super().__init__(
            str(path), f"checksum mismatch in block {block} at offset {offset}: "
            f"expected crc32c {expected:#010x}, got {actual:#010x} (corrupt or partially written file)")

    def __reduce__(self):  # picklable across processes
        return (ChecksumError, (self.path, self.block, self.offset, self.expected, self.actual))


@dataclasses.dataclass(frozen=True)
class Partition:
    file: str
    size: int
    block_size: int
    checksums: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Storage:
    partition: int
    offset: int
    nbytes: int


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    name: str
    storage: int
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype]

    def extent_bytes(self) -> int:
        return extent_bytes(self.shape, self.stride, self.storage_offset, self.itemsize)


@dataclasses.dataclass(frozen=True)
class Index:
    version: int
    alignment: int
    partitions: tuple[Partition, ...]
    storages: tuple[Storage, ...]
    tensors: tuple[TensorEntry, ...]
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(p.size for p in self.partitions)

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT_NAME,
            "version": self.version,
            "alignment": self.alignment,
            "metadata": self.metadata,
            "partitions": [
                {"file": p.file, "size": p.size,
                 "checksum": {"algorithm": "crc32c", "block_size": p.block_size, "blocks": list(p.checksums)}}
                for p in self.partitions
            ],
            "storages": [{"partition": s.partition, "offset": s.offset, "nbytes": s.nbytes} for s in self.storages],
            "tensors": [
                {"name": t.name, "storage": t.storage, "dtype": t.dtype, "shape": list(t.shape),
                 "stride": list(t.stride), "storage_offset": t.storage_offset}
                for t in self.tensors
            ],
        }
        return json.dumps(doc, indent=1).encode()


def extent_bytes(shape: Sequence[int], stride: Sequence[int], storage_offset: int, itemsize: int) -> int:
    """Bytes of storage a strided tensor needs from the storage start (0 for an empty tensor)."""
    if any(d == 0 for d in shape):
        return 0
    last = storage_offset + sum((d - 1) * s for d, s in zip(shape, stride, strict=True))
    return (last + 1) * itemsize


def contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    stride, acc = [], 1
    for d in reversed(shape):
        stride.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(stride))


def block_count(size: int, block_size: int) -> int:
    return (size + block_size - 1) // block_size


def align_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


# -- parsing -----------------------------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise MalformedIndex("index", f"duplicate key {k!r}")
        out[k] = v
    return out


def _int(v: Any, where: str, lo: int = 0, hi: int = MAX_BYTES) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadField(where, f"must be an integer, got {type(v).__name__} {_short(v)}")
    if not lo <= v <= hi:
        raise BadField(where, f"must be in [{lo}, {hi}], got {v}")
    return v


def _obj(v: Any, where: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise BadField(where, f"must be an object, got {type(v).__name__}")
    return v


def _list(v: Any, where: str) -> list[Any]:
    if not isinstance(v, list):
        raise BadField(where, f"must be a list, got {type(v).__name__}")
    return v


def _keys(d: dict[str, Any], where: str, required: set[str], optional: frozenset[str] = frozenset()) -> None:
    missing = required - d.keys()
    if missing:
        raise BadField(where, f"missing field {sorted(missing)[0]!r}")
    unknown = d.keys() - required - optional
    if unknown:
        raise BadField(where, f"unknown field {sorted(unknown)[0]!r}")


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def parse_index(raw: bytes) -> Index:
    """Validate and parse an index; raises a FormatError naming the offending field."""
    # 1. size cap
    if len(raw) > MAX_INDEX_BYTES:
        raise IndexTooLarge("index", f"{len(raw)} bytes exceeds the {MAX_INDEX_BYTES}-byte limit")
    # 2. encoding and JSON
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedIndex("index", f"not UTF-8 at byte {exc.start}") from None
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise MalformedIndex("index", f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise MalformedIndex("index", "JSON nested too deeply") from None
    # 3. format and version
    if not isinstance(doc, dict):
        raise MalformedIndex("index", f"top level must be an object, got {type(doc).__name__}")
    if doc.get("format") != FORMAT_NAME:
        raise UnsupportedVersion("format", f"expected {FORMAT_NAME!r}, got {_short(doc.get('format'))}")
    version = doc.get("version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise UnsupportedVersion("version", f"this reader supports version {FORMAT_VERSION}, got {_short(version)}")
    # 4. top level
    _keys(doc, "index", {"format", "version", "alignment", "partitions", "storages", "tensors"},
          frozenset({"metadata"}))
    alignment = _int(doc["alignment"], "alignment", MIN_ALIGNMENT, PAGE)
    if alignment & (alignment - 1):
        raise BadField("alignment", f"must be a power of two, got {alignment}")
    metadata = _obj(doc.get("metadata", {}), "metadata")
    for k, v in metadata.items():
        if not isinstance(v, str):
            raise BadField(f"metadata[{k!r}]", f"must be a string, got {type(v).__name__}")
    partitions = _parse_partitions(_list(doc["partitions"], "partitions"))
    storages = _parse_storages(_list(doc["storages"], "storages"), partitions, alignment)
    tensors = _parse_tensors(_list(doc["tensors"], "tensors"), storages)
    return Index(FORMAT_VERSION, alignment, partitions, storages, tensors, dict(metadata))


def _reject_constant(name: str) -> Any:
    raise MalformedIndex("index", f"{name} is not valid JSON")


def _parse_partitions(items: list[Any]) -> tuple[Partition, ...]:
    if not items:
        raise BadField("partitions", "must hold at least one partition")
    out, names = [], set()
    for i, item in enumerate(items):
        where = f"partitions[{i}]"
        d = _obj(item, where)
        _keys(d, where, {"file", "size", "checksum"})
        name = d["file"]
        if not isinstance(name, str) or not _PARTITION_NAME.match(name) or name == INDEX_NAME:
            raise BadField(f"{where}.file", f"must be a plain file name (letters, digits, '._-'), got {_short(name)}")
        if name in names:
            raise BadField(f"{where}.file", f"duplicate partition file {name!r}")
        names.add(name)
        size = _int(d["size"], f"{where}.size")
        if size % PAGE:
            raise Misaligned(f"{where}.size", f"must be a multiple of {PAGE}, got {size}")
        ck = _obj(d["checksum"], f"{where}.checksum")
        _keys(ck, f"{where}.checksum", {"algorithm", "block_size", "blocks"})
        if ck["algorithm"] != "crc32c":
            raise BadField(f"{where}.checksum.algorithm", f"must be 'crc32c', got {_short(ck['algorithm'])}")
        block_size = _int(ck["block_size"], f"{where}.checksum.block_size", PAGE, 1 << 34)
        if block_size % PAGE:
            raise Misaligned(f"{where}.checksum.block_size", f"must be a multiple of {PAGE}, got {block_size}")
        blocks = _list(ck["blocks"], f"{where}.checksum.blocks")
        if len(blocks) != block_count(size, block_size):
            raise BadField(f"{where}.checksum.blocks",
                           f"expected {block_count(size, block_size)} checksums for {size} bytes, got {len(blocks)}")
        crcs = tuple(_int(c, f"{where}.checksum.blocks[{j}]", 0, 0xFFFFFFFF) for j, c in enumerate(blocks))
        out.append(Partition(name, size, block_size, crcs))
    return tuple(out)


def _parse_storages(items: list[Any], partitions: tuple[Partition, ...], alignment: int) -> tuple[Storage, ...]:
    out = []
    for i, item in enumerate(items):
        where = f"storages[{i}]"
        d = _obj(item, where)
        _keys(d, where, {"partition", "offset", "nbytes"})
        part = _int(d["partition"], f"{where}.partition", 0, len(partitions) - 1)
        offset = _int(d["offset"], f"{where}.offset")
        nbytes = _int(d["nbytes"], f"{where}.nbytes")
        if offset % alignment:
            raise Misaligned(f"{where}.offset", f"must be a multiple of the alignment {alignment}, got {offset}")
        if offset + nbytes > partitions[part].size:
            raise OutOfBounds(f"{where}", f"bytes [{offset}, {offset + nbytes}) lie outside partition {part} "
                                          f"of {partitions[part].size} bytes")
        out.append(Storage(part, offset, nbytes))
    by_part: dict[int, list[tuple[int, int, int]]] = {}
    for i, s in enumerate(out):
        if s.nbytes:
            by_part.setdefault(s.partition, []).append((s.offset, s.offset + s.nbytes, i))
    for spans in by_part.values():
        spans.sort()
        for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:], strict=False):
            if start_b < end_a:
                raise OverlappingStorages(f"storages[{b}]", f"overlaps storages[{a}] (shared data must be one storage)")
    return tuple(out)


def _parse_tensors(items: list[Any], storages: tuple[Storage, ...]) -> tuple[TensorEntry, ...]:
    out, names = [], set()
    max_extent = [0] * len(storages)
    used = [False] * len(storages)
    for i, item in enumerate(items):
        d = _obj(item, f"tensors[{i}]")
        name = d.get("name")
        if not isinstance(name, str) or not name or len(name) > 1024:
            raise BadField(f"tensors[{i}].name", f"must be a non-empty string, got {_short(name)}")
        where = f"tensors[{name!r}]"
        if name in names:
            raise BadField(where, "duplicate tensor name")
        names.add(name)
        _keys(d, where, {"name", "storage", "dtype", "shape", "stride", "storage_offset"})
        sid = _int(d["storage"], f"{where}.storage", 0, len(storages) - 1) if storages else None
        if sid is None:
            raise BadField(f"{where}.storage", "refers to a storage but the index has none")
        dtype = d["dtype"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise BadField(f"{where}.dtype", f"unknown dtype {_short(dtype)}")
        shape = _dims(d["shape"], f"{where}.shape")
        if math.prod(shape) > MAX_BYTES:
            raise BadField(f"{where}.shape", f"element count of {list(shape)} overflows")
        stride = _dims(d["stride"], f"{where}.stride")
        if len(stride) != len(shape):
            raise BadField(f"{where}.stride", f"has {len(stride)} entries for {len(shape)} dimensions")
        soff = _int(d["storage_offset"], f"{where}.storage_offset")
        extent = extent_bytes(shape, stride, soff, DTYPES[dtype])
        if extent > MAX_BYTES:
            raise ExtentMismatch(where, f"extent of {extent} bytes overflows")
        st = storages[sid]
        if extent > st.nbytes:
            raise ExtentMismatch(where, f"needs {extent} bytes (shape {list(shape)}, stride {list(stride)}, "
                                        f"storage_offset {soff}, {dtype}) but storages[{sid}] has {st.nbytes}")
        if (st.offset % DTYPES[dtype]) != 0:
            raise Misaligned(where, f"storages[{sid}] offset {st.offset} is not a multiple of the {dtype} itemsize")
        max_extent[sid] = max(max_extent[sid], extent)
        used[sid] = True
        out.append(TensorEntry(name, sid, dtype, shape, stride, soff))
    for sid, st in enumerate(storages):
        if not used[sid]:
            raise ExtentMismatch(f"storages[{sid}]", "is not used by any tensor")
        if st.nbytes != max_extent[sid]:
            raise ExtentMismatch(f"storages[{sid}].nbytes",
                                 f"is {st.nbytes} but its tensors reach only {max_extent[sid]} bytes")
    return tuple(out)


def _dims(v: Any, where: str) -> tuple[int, ...]:
    items = _list(v, where)
    if len(items) > MAX_DIMS:
        raise BadField(where, f"has {len(items)} dimensions, at most {MAX_DIMS}")
    return tuple(_int(x, f"{where}[{j}]", 0, MAX_BYTES) for j, x in enumerate(items))


# -- files -------------------------------------------------------------------------------------


def is_checkpoint(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / INDEX_NAME).is_file()


def read_index(path: str | os.PathLike[str], *, check_files: bool = True) -> Index:
    """Read and validate DIR/sllm-index.json; with check_files, the partitions' sizes too."""
    root = Path(path)
    index_path = root / INDEX_NAME
    try:
        with open(index_path, "rb") as f:
            raw = f.read(MAX_INDEX_BYTES + 1)
    except FileNotFoundError:
        raise FileNotFoundError(2, f"not a sllm-knative checkpoint: {INDEX_NAME} missing", str(index_path)) from None
    try:
        index = parse_index(raw)
    except FormatError as exc:
        raise type(exc)(f"{index_path}: {exc.where}", exc.message) from None
    if check_files:
        for i, p in enumerate(index.partitions):
            fp = root / p.file
            try:
                actual = fp.stat().st_size
            except FileNotFoundError:
                raise FileNotFoundError(2, f"partition {i} missing", str(fp)) from None
            if actual != p.size:
                raise PartitionSizeMismatch(str(fp), f"is {actual} bytes, the index records {p.size} "
                                                     "(truncated or still being written)")
    return index


def verify_partition(path: str | os.PathLike[str], partition: Partition, *, threads: int = 4) -> None:
    """Re-read a partition file and check every block's crc32c; raises ChecksumError."""
    from sllm_knative import loading

    loading.verify_file(str(path), partition, threads=threads)
