"""The GGUF header: `open_gguf(path)` parses and checks a GGUF file's header, metadata and tensor
table (llama.cpp's single-file checkpoints); `sllm_knative.gguf_source` converts what it found.

Every way a header can be wrong raises `ConversionError` naming the file and the field or
tensor: truncated anywhere, a bad magic or version, an unknown or unsupported quantization
type, a tensor whose bytes lie outside the file. The parser bounds every length and count by the
bytes left in the file before it allocates or loops, so corrupted bytes cannot make it allocate
without bound or spin. The `gguf` package is asked only which quantization types it can
dequantize (and their block sizes); its own reader is not used (see gguf_source's measurement).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import struct
from pathlib import Path
from typing import Any

from sllm_knative.convert import ConversionError
from sllm_knative.log import get_logger

_log = get_logger("sllm_knative.gguf_header")

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # v1 counted with 32-bit integers; llama.cpp has not written it since 2023
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 8  # arrays of arrays in the metadata

# GGUF metadata value types: id -> (struct format, width) for the fixed-size ones.
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
            6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
          12: "<f8"}
STRING, ARRAY = 8, 9
INTEGERS = (0, 1, 2, 3, 4, 5, 10, 11)
FLOATS = (6, 12)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (ggml lists the fastest-moving dimension first)
    ggml_type: int
    offset: int  # absolute, in the file
    nbytes: int

    @property
    def rows(self) -> int:
        return math.prod(self.shape[:-1])

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.rows if self.rows else 0


@dataclasses.dataclass
class GGUFFile:
    path: Path
    version: int
    fields: dict[str, Any]
    types: dict[str, int]  # field -> value type (arrays: 9)
    tensors: list[TensorInfo]
    alignment: int
    data_start: int


class _Reader:
    """Sequential reads of the header with every length checked against the bytes left."""

    WINDOW = 1 << 20

    def __init__(self, path: Path, f: Any, size: int) -> None:
        self.path, self.f, self.size = path, f, size
        self.buf = b""
        self.at = 0  # index into buf
        self.base = 0  # file offset of buf[0]

    @property
    def pos(self) -> int:
        return self.base + self.at

    def left(self) -> int:
        return self.size - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.left():
            raise ConversionError(f"{self.path}: truncated: {what} needs {n} bytes at offset {self.pos}, "
                                  f"the file ends at {self.size}")
        if self.at + n > len(self.buf):
            rest = self.buf[self.at:]
            more = self.f.read(max(n - len(rest), self.WINDOW))
            self.base += self.at
            self.buf, self.at = rest + more, 0
            if len(self.buf) < n:  # the file shrank while we read it
                raise ConversionError(f"{self.path}: truncated: {what} at offset {self.pos}")
        out = self.buf[self.at: self.at + n]
        self.at += n
        return out

    def unpack(self, fmt: str, width: int, what: str) -> Any:
        return struct.unpack(fmt, self.take(width, what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("<Q", 8, f"{what} (string length)")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConversionError(f"{self.path}: {what}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            fmt, width = _SCALARS[vtype]
            return self.unpack(fmt, width, what)
        if vtype == STRING:
            return self.string(what)
        if vtype != ARRAY:
            raise ConversionError(f"{self.path}: {what}: unknown value type {vtype}")
        if depth >= MAX_NESTING:
            raise ConversionError(f"{self.path}: {what}: arrays nested more than {MAX_NESTING} deep")
        etype = self.unpack("<I", 4, f"{what} (array type)")
        count = self.unpack("<Q", 8, f"{what} (array length)")
        least = _SCALARS[etype][1] if etype in _SCALARS else 8 if etype == STRING else 12 if etype == ARRAY else 0
        if least == 0:
            raise ConversionError(f"{self.path}: {what}: unknown array element type {etype}")
        if count * least > self.left():
            raise ConversionError(f"{self.path}: truncated: {what} claims {count} elements, more than the "
                                  f"{self.left()} bytes left in the file hold")
        if etype in _SCALARS:
            import numpy as np

            values = np.frombuffer(self.take(count * least, what), dtype=_NUMPY[etype])
            return [bool(v) for v in values] if etype == 7 else values.tolist()
        return [self.value(etype, f"{what}[{i}]", depth + 1) for i in range(count)]


def open_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Parse and check a GGUF file's header, metadata and tensor table (no tensor data is read)."""
    p = Path(path)
    try:
        size = p.stat().st_size
        f = open(p, "rb")  # noqa: SIM115 - closed below; buffered: a read returns all it is asked for
    except OSError as exc:
        raise ConversionError(f"{p}: cannot open ({exc.strerror})") from None
    with f:
        g = _parse(p, _Reader(p, f, size), size)
    _log.debug("GGUF header read", file=str(p), version=g.version, fields=len(g.fields), tensors=len(g.tensors),
               data_start=g.data_start)
    return g


def _parse(p: Path, r: _Reader, size: int) -> GGUFFile:
    if size < 4:
        raise ConversionError(f"{p}: truncated: {size} bytes, not a GGUF file")
    magic = r.take(4, "the magic number")
    if magic != MAGIC:
        raise ConversionError(f"{p}: not a GGUF file (magic {magic!r}, expected {MAGIC!r})")
    version = r.unpack("<I", 4, "the version")
    if version not in VERSIONS:
        if version & 0xFFFF == 0 and (version >> 24) in VERSIONS:
            raise ConversionError(f"{p}: a big-endian GGUF file; only little-endian files are supported")
        raise ConversionError(f"{p}: GGUF version {version} is not supported (supported: "
                              f"{', '.join(map(str, VERSIONS))})")
    n_tensors = r.unpack("<Q", 8, "the tensor count")
    n_fields = r.unpack("<Q", 8, "the metadata count")
    # Each field takes at least 13 bytes (key length, value type, one byte of value) and each
    # tensor at least 24: a count larger than the file can hold is corruption, not a large model.
    if n_fields * 13 > r.left():
        raise ConversionError(f"{p}: truncated: the header claims {n_fields} metadata fields, more than the "
                              f"{r.left()} bytes left hold")
    if n_tensors * 24 > r.left():
        raise ConversionError(f"{p}: truncated: the header claims {n_tensors} tensors, more than the "
                              f"{r.left()} bytes left hold")
    fields: dict[str, Any] = {}
    types: dict[str, int] = {}
    for i in range(n_fields):
        key = r.string(f"metadata field #{i} (key)")
        if key in fields:
            raise ConversionError(f"{p}: field {key!r} appears twice")
        vtype = r.unpack("<I", 4, f"field {key!r} (value type)")
        fields[key] = r.value(vtype, f"field {key!r}")
        types[key] = vtype
    alignment = fields.get("general.alignment", DEFAULT_ALIGNMENT)
    if "general.alignment" in fields and (types["general.alignment"] not in INTEGERS or alignment <= 0
                                          or alignment & (alignment - 1)):
        raise ConversionError(f"{p}: field 'general.alignment' = {alignment!r} is not a power of two")
    infos = []
    for i in range(n_tensors):
        name = r.string(f"tensor #{i} (name)")
        where = f"tensor {name!r}"
        n_dims = r.unpack("<I", 4, f"{where} (dimension count)")
        if not 1 <= n_dims <= MAX_DIMS:
            raise ConversionError(f"{p}: {where}: {n_dims} dimensions (GGUF allows 1 to {MAX_DIMS})")
        dims = struct.unpack(f"<{n_dims}Q", r.take(8 * n_dims, f"{where} (dimensions)"))
        ggml_type = r.unpack("<I", 4, f"{where} (type)")
        offset = r.unpack("<Q", 8, f"{where} (offset)")
        infos.append((name, tuple(reversed(dims)), ggml_type, offset))
    data_start = -(-r.pos // alignment) * alignment
    tensors = []
    seen: set[str] = set()
    for name, shape, ggml_type, offset in infos:
        if name in seen:
            raise ConversionError(f"{p}: tensor {name!r} appears twice")
        seen.add(name)
        tensors.append(_tensor(p, name, shape, ggml_type, offset, alignment, data_start, size))
    return GGUFFile(p, version, fields, types, tensors, alignment, data_start)


def quant_name(ggml_type: int) -> str:
    from gguf.constants import GGMLQuantizationType

    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"#{ggml_type}"


@functools.cache
def _dequantizable(ggml_type: int) -> bool:
    """Whether the gguf package dequantizes this type (asked of it with one zero block)."""
    import numpy as np
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType(ggml_type)
    if qtype not in GGML_QUANT_SIZES:
        return False
    try:
        with np.errstate(all="ignore"):
            dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8), qtype)
    except NotImplementedError:  # the gguf package's answer for a type it has no dequantizer for
        return False
    return True


def _tensor(p: Path, name: str, shape: tuple[int, ...], ggml_type: int, offset: int, alignment: int,
            data_start: int, size: int) -> TensorInfo:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    where = f"{p}: tensor {name!r}"
    try:
        qtype = GGMLQuantizationType(ggml_type)
    except ValueError:
        raise ConversionError(f"{where}: unknown quantization type {ggml_type}") from None
    if not _dequantizable(ggml_type):
        raise ConversionError(f"{where}: quantization type {qtype.name} ({ggml_type}) is not supported "
                              f"(no dequantizer for it)")
    if any(d == 0 for d in shape):
        raise ConversionError(f"{where}: shape {list(shape)} has an empty dimension")
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        raise ConversionError(f"{where}: rows of {shape[-1]} elements are not whole {qtype.name} blocks of {block}")
    nbytes = math.prod(shape) // block * block_bytes
    if offset % alignment:
        raise ConversionError(f"{where}: offset {offset} is not a multiple of the alignment {alignment}")
    start = data_start + offset
    if start + nbytes > size:
        raise ConversionError(f"{where}: truncated: its {nbytes} bytes at offset {start} end past the end of "
                              f"the {size}-byte file")
    return TensorInfo(name, shape, ggml_type, start, nbytes)
