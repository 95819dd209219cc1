"""Rewrite a Hugging Face checkpoint into the loading-optimized format (docs/format.md).

Streams: tensor bytes are copied 16 MiB at a time from the source files (safetensors are
read with pread; PyTorch .bin files are memory-mapped), so peak memory stays far below
"largest tensor + 512 MiB" whatever the model size. The result is written into a temporary
directory beside DST, verified (index re-parsed, every block's checksum re-read), and
renamed into place: an interrupted or failed conversion never leaves a directory that
looks complete.

A GGUF file (llama.cpp's format), or a directory holding one and no other weights, is a source
too: its tensors are dequantized to `dtype` (bfloat16 by default) a chunk at a time, and its
config and tokenizer are written beside them (`sllm_knative.gguf_source`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from cuda_ext import _C
from sllm_knative import atomic
from sllm_knative import format as fmt
from sllm_knative.log import get_logger

_log = get_logger("sllm_knative.convert")

COPY_CHUNK = 16 << 20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu", "C64": "complex64",
}
MAX_SAFETENSORS_HEADER = 100 << 20
GGUF_DTYPES = ("bfloat16", "float16", "float32")  # what GGUF tensors are dequantized to; the first is the default


class ConversionError(ValueError):
    """The source checkpoint cannot be converted (says which file and why)."""


@dataclasses.dataclass
class _Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int  # elements, within the source storage
    storage_key: Any


@dataclasses.dataclass
class _SourceStorage:
    key: Any
    # read(start_byte, n) -> bytes-like of the source storage
    read: Callable[[int, int], Any]
    tensors: list[_Tensor] = dataclasses.field(default_factory=list)
    # Set for storages that are computed, not copied (GGUF: dequantized): the storage's bytes in
    # order, in pieces; `read` is then unused.
    chunks: Callable[[], Iterable[Any]] | None = None


# -- sources -----------------------------------------------------------------------------------


def _safetensors_files(src: Path) -> list[Path] | None:
    idx = src / "model.safetensors.index.json"
    if idx.is_file():
        weight_map = _load_json(idx).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"{idx}: 'weight_map' must be a non-empty object")
        return [_inside(src, f) for f in sorted(set(weight_map.values()))]
    files = sorted(src.glob("*.safetensors"))
    return files or None


def _bin_files(src: Path) -> list[Path] | None:
    idx = src / "pytorch_model.bin.index.json"
    if idx.is_file():
        weight_map = _load_json(idx).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"{idx}: 'weight_map' must be a non-empty object")
        return [_inside(src, f) for f in sorted(set(weight_map.values()))]
    one = src / "pytorch_model.bin"
    return [one] if one.is_file() else None


def _inside(root: Path, name: Any) -> Path:
    if not isinstance(name, str) or "/" in name or name in ("", ".", ".."):
        raise ConversionError(f"{root}: weight file name {name!r} must be a plain file name")
    p = root / name
    if not p.is_file():
        raise ConversionError(f"{p}: listed in the weight index but missing")
    return p


def _load_json(p: Path) -> dict[str, Any]:
    try:
        doc = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{p}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ConversionError(f"{p}: must hold a JSON object")
    return doc


def _read_safetensors(path: Path) -> Iterator[_SourceStorage]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConversionError(f"{path}: too short for a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_SAFETENSORS_HEADER or 8 + n > size:
            raise ConversionError(f"{path}: header length {n} is invalid for a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConversionError(f"{path}: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: header must be a JSON object")
    data_start = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict) or {"dtype", "shape", "data_offsets"} - info.keys():
            raise ConversionError(f"{where}: needs dtype, shape and data_offsets")
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ConversionError(f"{where}: unsupported dtype {info['dtype']!r}")
        shape = info["shape"]
        offs = info["data_offsets"]
        if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) for o in offs)):
            raise ConversionError(f"{where}: malformed shape or data_offsets")
        begin, end = offs
        numel = 1
        for d in shape:
            numel *= d
        if not 0 <= begin <= end or data_start + end > size or end - begin != numel * fmt.DTYPES[dtype]:
            raise ConversionError(f"{where}: data_offsets {offs} do not match shape {shape} {dtype} "
                                  f"inside a {size}-byte file")
        key = (str(path), begin)
        storage = _SourceStorage(key, _pread_reader(path, data_start + begin))
        storage.tensors.append(_Tensor(name, dtype, tuple(shape), fmt.contiguous_stride(shape), 0, key))
        yield storage


def _pread_reader(path: Path, base: int) -> Callable[[int, int], bytes]:
    def read(start: int, n: int) -> bytes:
        with open(path, "rb", buffering=0) as f:
            data = os.pread(f.fileno(), n, base + start)
        if len(data) != n:
            raise ConversionError(f"{path}: unexpected end of file at offset {base + start}")
        return data
    return read


def _read_bin(path: Path) -> Iterator[_SourceStorage]:
    import torch

    try:
        sd = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError:
        # Legacy (non-zip) pickles cannot be memory-mapped: they are read whole.
        _log.warning("legacy .bin format cannot be memory-mapped; reading it whole", file=str(path))
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConversionError(f"{path}: not a loadable PyTorch checkpoint ({exc})") from None
    if not isinstance(sd, dict):
        raise ConversionError(f"{path}: expected a dict of tensors, got {type(sd).__name__}")
    groups: dict[Any, _SourceStorage] = {}
    for name, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise ConversionError(f"{path}: entry {name!r} is a {type(t).__name__}, not a tensor")
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in fmt.DTYPES:
            raise ConversionError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        st = t.untyped_storage()
        key = (str(path), st.data_ptr(), st.nbytes())
        if key not in groups:
            raw = torch.empty(0, dtype=torch.uint8).set_(st)
            groups[key] = _SourceStorage(key, _tensor_reader(raw))
        groups[key].tensors.append(
            _Tensor(name, dtype, tuple(int(d) for d in t.shape), tuple(int(d) for d in t.stride()),
                    int(t.storage_offset()), key))
    yield from groups.values()


def _tensor_reader(raw: Any) -> Callable[[int, int], Any]:
    def read(start: int, n: int) -> Any:
        return memoryview(raw[start: start + n].numpy())
    return read


def _gguf_file(src: Path) -> Path | None:
    """The GGUF file SRC is, or the one GGUF file a directory without other weights holds."""
    if src.is_file():
        with open(src, "rb") as f:
            magic = f.read(4)
        if src.suffix == ".gguf" or magic == b"GGUF":
            return src
        raise ConversionError(f"{src}: neither a model directory nor a GGUF file")
    if _safetensors_files(src) or _bin_files(src):
        return None
    found = sorted(p for p in src.glob("*.gguf") if p.is_file())
    if len(found) > 1:
        raise ConversionError(f"{src}: holds {len(found)} GGUF files ({', '.join(p.name for p in found[:3])}); "
                              f"convert one of them by its path (split GGUF files are not supported)")
    return found[0] if found else None


def _gguf_sources(path: Path, dtype: str) -> tuple[Callable[[Path], None], dict[str, str],
                                                   list[_SourceStorage]]:
    """The storages of a GGUF file (dequantized tensors), and what writes its config and tokenizer."""
    import functools

    from sllm_knative import gguf_source

    g = gguf_source.open_gguf(path)
    shape = gguf_source.llama_shape(g)
    storages = []
    for t in gguf_source.plan_tensors(g, shape):
        key = ("gguf", t.hf_name)
        s = _SourceStorage(key, _computed, chunks=functools.partial(gguf_source.tensor_chunks, g, t, dtype))
        s.tensors.append(_Tensor(t.hf_name, dtype, t.info.shape, fmt.contiguous_stride(t.info.shape), 0, key))
        storages.append(s)

    def aux(out: Path) -> None:
        gguf_source.write_config(g, shape, dtype, out)
        gguf_source.write_tokenizer(g, out)

    return aux, gguf_source.describe(g), storages


def _computed(start: int, n: int) -> Any:
    raise AssertionError("a computed storage is written from its chunks")


def _sources(src: Path) -> tuple[str, list[Path], Iterable[_SourceStorage]]:
    st = _safetensors_files(src)
    if st:
        return "safetensors", st, (s for f in st for s in _read_safetensors(f))
    bins = _bin_files(src)
    if bins:
        return "bin", bins, (s for f in bins for s in _read_bin(f))
    raise ConversionError(f"{src}: no *.safetensors or pytorch_model*.bin weights found")


# -- layout ------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Planned:
    source: _SourceStorage
    base_byte: int  # first source byte stored
    nbytes: int
    partition: int = 0
    offset: int = 0


def _plan_storage(s: _SourceStorage) -> _Planned:
    """The byte range of a source storage its tensors use; rebases their storage offsets."""
    spans = []
    for t in s.tensors:
        item = fmt.DTYPES[t.dtype]
        ext = fmt.extent_bytes(t.shape, t.stride, t.storage_offset, item)
        if ext:
            spans.append((t.storage_offset * item, ext))
    if not spans:
        for t in s.tensors:
            t.storage_offset = 0
        return _Planned(s, 0, 0)
    base = min(a for a, _ in spans) // 16 * 16  # every itemsize divides 16
    end = max(e for _, e in spans)
    for t in s.tensors:
        item = fmt.DTYPES[t.dtype]
        if fmt.extent_bytes(t.shape, t.stride, t.storage_offset, item) == 0:
            t.storage_offset = 0
        else:
            t.storage_offset -= base // item
    return _Planned(s, base, end - base)


def _assign(planned: list[_Planned], partitions: int, alignment: int) -> list[int]:
    """Contiguous runs of storages balanced by bytes; returns each partition's padded size."""
    total = sum(p.nbytes for p in planned) or 1
    ends = [0] * partitions
    part, acc = 0, 0
    for p in planned:
        if part < partitions - 1 and acc >= total * (part + 1) / partitions:
            part += 1
        p.partition = part
        p.offset = fmt.align_up(ends[part], alignment)
        ends[part] = p.offset + p.nbytes
        acc += p.nbytes
    return [fmt.align_up(e, fmt.PAGE) for e in ends]


class _BlockWriter:
    """Writes a partition sequentially and computes crc32c per block as it goes."""

    def __init__(self, path: Path, block_size: int) -> None:
        self.f = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.block_size = block_size
        self.pos = 0
        self.crc = 0
        self.crcs: list[int] = []

    def write(self, data: Any) -> None:
        mv = memoryview(data).cast("B")
        while len(mv):
            room = self.block_size - self.pos % self.block_size
            piece = mv[:room]
            self.crc = _C.crc32c(piece, self.crc)
            self.f.write(piece)
            self.pos += len(piece)
            mv = mv[len(piece):]
            if self.pos % self.block_size == 0:
                self.crcs.append(self.crc)
                self.crc = 0

    def pad_to(self, offset: int) -> None:
        while self.pos < offset:
            self.write(bytes(min(offset - self.pos, COPY_CHUNK)))

    def close(self) -> list[int]:
        if self.pos % self.block_size:
            self.crcs.append(self.crc)
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return self.crcs


# -- conversion --------------------------------------------------------------------------------


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, partitions: int = 1,
            overwrite: bool = False, block_size: int = fmt.DEFAULT_BLOCK_SIZE, alignment: int = fmt.MIN_ALIGNMENT,
            verify: bool = True, progress: bool = False, dtype: str | None = None) -> Path:
    """Convert SRC into a checkpoint directory DST: a Hugging Face model directory, a GGUF file, or
    a directory holding one GGUF file and no other weights.

    dtype: what a GGUF file's tensors are dequantized to (bfloat16, float16 or float32; default
    bfloat16). A Hugging Face checkpoint's tensors are copied as they are, so it takes none."""
    src_p, dst_p = Path(src), Path(dst)
    if partitions < 1:
        raise ValueError(f"partitions = {partitions}, must be at least 1")
    if block_size <= 0 or block_size % fmt.PAGE:
        raise ValueError(f"block_size = {block_size}, must be a positive multiple of {fmt.PAGE}")
    if dtype is not None and dtype not in GGUF_DTYPES:
        raise ValueError(f"dtype = {dtype!r}, must be one of {', '.join(GGUF_DTYPES)}")
    if not src_p.exists():
        raise FileNotFoundError(2, "source model directory not found", str(src_p))
    gguf = _gguf_file(src_p)
    if gguf is None and dtype is not None:
        raise ValueError(f"dtype = {dtype!r}: only GGUF sources are converted to another dtype; "
                         f"{src_p} is a Hugging Face checkpoint, whose tensors are copied as they are")
    if dst_p.exists() and not overwrite:
        raise FileExistsError(17, "destination exists (pass overwrite=True / --overwrite)", str(dst_p))
    metadata: dict[str, str] = {}
    storages: Iterable[_SourceStorage]
    if gguf is not None:
        kind, files = "gguf", [gguf]
        write_aux, metadata, storages = _gguf_sources(gguf, dtype or GGUF_DTYPES[0])
    else:
        kind, files, storages = _sources(src_p)

        def write_aux(out: Path) -> None:
            _copy_aux(src_p, out)
    dst_p.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst_p.parent / f".{dst_p.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        if gguf is not None:
            write_aux(tmp)  # the tokenizer can fail: before the long part
        planned = [_plan_storage(s) for s in storages]
        sizes = _assign(planned, partitions, alignment)
        index = _write(tmp, planned, sizes, block_size, alignment, kind, progress, metadata)
        if gguf is None:
            write_aux(tmp)
        atomic.fsync_dir(tmp)
        check = fmt.read_index(tmp)
        if verify:
            for p in check.partitions:
                fmt.verify_partition(tmp / p.file, p)
        _replace(tmp, dst_p)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log.info("converted", src=str(src_p), dst=str(dst_p), source_format=kind, files=len(files),
              tensors=len(index.tensors), bytes=index.total_bytes, partitions=partitions)
    return dst_p


def _write(tmp: Path, planned: list[_Planned], sizes: list[int], block_size: int, alignment: int, kind: str,
           progress: bool, metadata: dict[str, str] | None = None) -> fmt.Index:
    from tqdm import tqdm

    total = sum(p.nbytes for p in planned)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=not progress)
    writers = [_BlockWriter(tmp / f"partition-{i}.bin", block_size) for i in range(len(sizes))]
    storages, tensors = [], []
    try:
        for sid, p in enumerate(planned):
            w = writers[p.partition]
            w.pad_to(p.offset)
            if p.source.chunks is not None:
                done = 0
                for data in p.source.chunks():
                    n = memoryview(data).nbytes
                    if done + n > p.nbytes:
                        break
                    w.write(data)
                    done += n
                    bar.update(n)
                if done != p.nbytes:
                    raise ConversionError(f"storage {p.source.key}: produced more or fewer than {p.nbytes} bytes")
            else:
                for start in range(0, p.nbytes, COPY_CHUNK):
                    n = min(COPY_CHUNK, p.nbytes - start)
                    w.write(p.source.read(p.base_byte + start, n))
                    bar.update(n)
            storages.append(fmt.Storage(p.partition, p.offset, p.nbytes))
            for t in p.source.tensors:
                tensors.append(fmt.TensorEntry(t.name, sid, t.dtype, t.shape, t.stride, t.storage_offset))
        parts = []
        for i, (w, size) in enumerate(zip(writers, sizes, strict=True)):
            w.pad_to(size)
            parts.append(fmt.Partition(f"partition-{i}.bin", size, block_size, tuple(w.close())))
    finally:
        bar.close()
        for w in writers:
            if not w.f.closed:
                w.f.close()
    order = sorted(range(len(tensors)), key=lambda i: tensors[i].name)
    index = fmt.Index(fmt.FORMAT_VERSION, alignment, tuple(parts), tuple(storages),
                      tuple(tensors[i] for i in order), {"source_format": kind, **(metadata or {})})
    fmt.parse_index(index.to_json())  # what we write must be what we read
    atomic.write_bytes(tmp / fmt.INDEX_NAME, index.to_json())
    return index


def _copy_aux(src: Path, dst: Path) -> None:
    """Config, generation config, tokenizer and other small files travel with the weights."""
    for p in sorted(src.iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.name in WEIGHT_INDEXES or p.name == fmt.INDEX_NAME:
            continue
        if p.suffix in WEIGHT_SUFFIXES:
            continue
        shutil.copy2(p, dst / p.name)


def _replace(tmp: Path, dst: Path) -> None:
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(dst, old)
        os.rename(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dst)
    atomic.fsync_dir(dst.parent)
