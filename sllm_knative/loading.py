"""Loading a checkpoint (docs/format.md) into host or device memory.

One allocation per partition on the target device; every tensor is a view at its offset in
that allocation, tied tensors are views of one storage. The bytes are read by the compiled
extension (`cuda_ext._C`): many threads, large chunks, O_DIRECT into 4096-aligned host
memory, or through a bounded ring of pinned buffers into device memory. On the CPU a
partition that already lives in memory (tmpfs: the DRAM tier) is mapped, not copied.

    load_state_dict(path, device)  -> {name: tensor}
    load_model(path, device)       -> transformers model (meta-built, weights assigned)

`follow` (both, and load_checkpoint): load a DRAM-tier copy that the loader sidecar is still
filling. `follow(partition, nbytes)` blocks until the first nbytes of that partition are filled
and verified and returns the watermark (the lease's `wait`); each partition is then copied in
segments right behind the watermark, so the copy to the device overlaps the fill instead of
following it. A mapped partition (CPU, tmpfs) waits for its whole fill first: a map costs
nothing to overlap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import mmap
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cuda_ext import _C
from sllm_knative import format as fmt
from sllm_knative.log import get_logger
from sllm_knative.pagecache import is_memory_fs, resident_fraction

if TYPE_CHECKING:
    import torch

_log = get_logger("sllm_knative.loading")


class LoadCancelled(RuntimeError):
    """A load stopped because its CancelToken was cancelled."""


_C.set_error_types(fmt.ChecksumError, LoadCancelled)
CancelToken = _C.CancelToken

_MADV_POPULATE_READ = 22
DEVICE_SEGMENT = 64 << 20  # least bytes per host-to-device copy call when following a fill
_HUGE_PAGE = 2 << 20


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """Knobs of a load. Defaults measured by bench/loading.py on the reference machine."""

    chunk_bytes: int = 16 << 20
    threads: int = 8
    # None: O_DIRECT unless most of the file is already in the page cache (then buffered
    # reads copy from the cache instead of going to the disk again).
    direct: bool | None = None
    # None: verify checksums when reading from disk, not when mapping the DRAM tier (the
    # loader sidecar verified those bytes when it filled the tier).
    verify: bool | None = None
    # True: map partitions that live on tmpfs instead of copying them (CPU only).
    map_memory_files: bool = True
    pinned_bytes: int = 256 << 20
    streams: int = 4

    def __post_init__(self) -> None:
        if self.chunk_bytes <= 0 or self.chunk_bytes % fmt.PAGE:
            raise ValueError(f"chunk_bytes = {self.chunk_bytes}, must be a positive multiple of {fmt.PAGE}")
        if self.threads < 1:
            raise ValueError(f"threads = {self.threads}, must be at least 1")
        if self.streams < 1:
            raise ValueError(f"streams = {self.streams}, must be at least 1")


@dataclasses.dataclass
class PartitionLoad:
    file: str
    bytes: int
    seconds: float
    method: str  # "direct", "buffered", "mmap", "device"


@dataclasses.dataclass
class LoadedCheckpoint:
    state_dict: dict[str, torch.Tensor]
    partitions: list[PartitionLoad]
    seconds: float
    # The one allocation (or mapping) per partition that the tensors view.
    buffers: list[Any]

    @property
    def bytes(self) -> int:
        return sum(p.bytes for p in self.partitions)


def aligned_empty(nbytes: int, alignment: int = fmt.PAGE) -> torch.Tensor:
    """An uninitialised uint8 host tensor whose data pointer is `alignment`-aligned.

    Large buffers are anonymous mappings advised to use transparent huge pages: the first
    touch of fresh memory (the kernel zeroing it) is a large part of a cold load's CPU time,
    and 2 MiB pages cut the number of faults by 512.
    """
    import torch

    if nbytes >= _HUGE_PAGE and alignment <= mmap.PAGESIZE:
        mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        with contextlib.suppress(OSError, AttributeError):
            mm.madvise(mmap.MADV_HUGEPAGE)
        return torch.frombuffer(mm, dtype=torch.uint8)  # the tensor keeps the mapping alive
    raw = torch.empty(nbytes + alignment, dtype=torch.uint8)
    pad = (-raw.data_ptr()) % alignment
    return raw[pad: pad + nbytes]


def resolve_device(device: Any) -> torch.device:
    """torch.device of 'cpu' or 'cuda[:N]' ('cuda': the current device), checked to be usable by the
    loader extension; a RuntimeError says what is missing (torch's GPU or the extension's)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        if not _C.cuda_compiled():
            raise RuntimeError("cuda_ext was built without CUDA (nvcc was not found at install time)")
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r}: torch sees no CUDA device (torch {torch.__version__}, "
                               f"built for CUDA {torch.version.cuda})")
        if not _C.cuda_available():
            raise RuntimeError(f"device {device!r}: torch sees a GPU but the loader extension does not: "
                               f"{_C.cuda_error()}")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {device!r}: torch sees {torch.cuda.device_count()} GPU(s)")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r}: only 'cpu' and 'cuda[:N]' are supported")
    return dev


def _device_buffer(nbytes: int, dev: torch.device) -> torch.Tensor:
    """A device buffer for the loader's own streams to write into.

    It comes from torch's caching allocator, which may hand back a block that kernels queued on
    torch's current stream still use. The extension copies on its own non-blocking streams, which
    are not ordered after that stream, so torch's queued work is finished first.
    """
    import torch

    buf = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    torch.cuda.current_stream(dev).synchronize()
    return buf


Follow = Callable[[int, int], int]  # (partition, nbytes) -> watermark >= nbytes, once filled


def _read_partition(path: Path, part: fmt.Partition, dev: torch.device, opts: LoadOptions,
                    cancel: Any, follow: Follow | None = None, number: int = 0) -> tuple[Any, torch.Tensor,
                                                                                          PartitionLoad]:
    t0 = time.perf_counter()
    on_memory_fs = is_memory_fs(path)
    if follow is not None:
        if dev.type == "cpu" and on_memory_fs and opts.map_memory_files:
            follow(number, part.size)
        else:
            return _follow_partition(path, part, dev, opts, cancel, follow, number, t0)
    verify = (not on_memory_fs) if opts.verify is None else opts.verify
    crcs = list(part.checksums) if verify else []
    block = part.block_size if verify else 0
    # A verified read's chunks must tile its checksum blocks: the largest chunk up to chunk_bytes
    # that divides the block size (both are multiples of 4096, validated), not 4 KiB.
    chunk = math.gcd(part.block_size, opts.chunk_bytes) if verify else opts.chunk_bytes
    keep: Any
    if dev.type == "cpu" and on_memory_fs and opts.map_memory_files and not verify:
        keep, buf = _map(path, part.size)
        return keep, buf, PartitionLoad(part.file, part.size, time.perf_counter() - t0, "mmap")
    resident = resident_fraction(path) if opts.direct is None or (dev.type == "cpu" and opts.map_memory_files) else 0.0
    if dev.type == "cpu" and opts.map_memory_files and resident >= 0.999:
        # Already in the page cache: map it like the DRAM tier (no copy into fresh memory),
        # and check the blocks' checksums over the mapping when asked to.
        keep, buf = _map(path, part.size)
        if verify:
            _verify_mapped(str(path), buf, part)
        return keep, buf, PartitionLoad(part.file, part.size, time.perf_counter() - t0, "mmap-cached")
    direct = opts.direct if opts.direct is not None else resident < 0.5
    if dev.type == "cpu":
        buf = aligned_empty(part.size)
        keep = buf
        # The buffer is fresh memory: fault it in on a separate thread ahead of the readers.
        stats = _C.read_to_host(str(path), 0, buf.data_ptr(), part.size, chunk, opts.threads, direct,
                                block, crcs, cancel, True)
        method = "direct" if stats["direct"] else "buffered"
        if direct and not stats["direct"]:
            _log.debug("O_DIRECT refused by the file system, read buffered", file=str(path))
    else:
        buf = _device_buffer(part.size, dev)
        keep = buf
        stats = _C.read_to_device(str(path), 0, dev.index, buf.data_ptr(), part.size, chunk, opts.threads, direct,
                                  opts.pinned_bytes, opts.streams, block, crcs, cancel)
        method = "device"
        if stats["direct_fallback"]:
            _log.warning("direct reads into pinned memory refused, read buffered", file=str(path),
                         reason=stats["direct_fallback"])
    return keep, buf, PartitionLoad(part.file, part.size, time.perf_counter() - t0, method)


def _follow_partition(path: Path, part: fmt.Partition, dev: torch.device, opts: LoadOptions, cancel: Any,
                      follow: Follow, number: int, t0: float) -> tuple[Any, torch.Tensor, PartitionLoad]:
    """Copy a partition that is still being filled, one segment behind the watermark at a time.

    The bytes under the watermark were verified by the sidecar as they arrived, so segments are
    not checked again. A segment is at least `chunk_bytes` on the CPU; on a GPU at least
    DEVICE_SEGMENT, with the reader threads sized to the segment rather than to a whole partition.
    The extension keeps its pinned ring between calls and caps it at the chunks a call copies, so
    the segments share one ring instead of pinning one each."""
    buf = aligned_empty(part.size) if dev.type == "cpu" else _device_buffer(part.size, dev)
    least = opts.chunk_bytes if dev.type == "cpu" else max(opts.chunk_bytes, DEVICE_SEGMENT)
    done, segments = 0, 0
    while done < part.size:
        mark = min(part.size, follow(number, min(part.size, done + least)))
        if mark <= done:
            raise RuntimeError(f"{path}: the watermark went back to {mark} after {done} bytes were copied")
        if dev.type == "cpu":
            _C.read_to_host(str(path), done, buf.data_ptr() + done, mark - done, opts.chunk_bytes, opts.threads,
                            False, 0, [], cancel)
        else:
            chunks = -(-(mark - done) // opts.chunk_bytes)
            threads = max(1, min(opts.threads, chunks // 2))
            _C.read_to_device(str(path), done, dev.index, buf.data_ptr() + done, mark - done, opts.chunk_bytes,
                              threads, False, opts.pinned_bytes, opts.streams, 0, [], cancel)
        done, segments = mark, segments + 1
    _log.debug("partition copied behind the fill", file=str(path), bytes=part.size, segments=segments)
    return buf, buf, PartitionLoad(part.file, part.size, time.perf_counter() - t0, "follow")


def _map(path: Path, size: int) -> tuple[mmap.mmap, torch.Tensor]:
    """Map a memory-resident partition copy-on-write and pre-fault its page tables."""
    import torch

    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        mm = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):  # kernels before 5.14: pages fault in lazily instead
        mm.madvise(_MADV_POPULATE_READ)
    return mm, torch.frombuffer(mm, dtype=torch.uint8)


def _verify_mapped(path: str, buf: torch.Tensor, part: fmt.Partition) -> None:
    base = buf.data_ptr()
    for i, expected in enumerate(part.checksums):
        off = i * part.block_size
        n = min(part.block_size, part.size - off)
        actual = _C.crc32c_ptr(base + off, n)
        if actual != expected:
            raise fmt.ChecksumError(path, i, off, expected, actual)


def _views(index: fmt.Index, buffers: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    import torch

    storages: dict[int, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for t in index.tensors:
        dtype = getattr(torch, t.dtype)
        key = t.storage
        base = storages.get(key)
        if base is None or base.dtype != dtype:
            s = index.storages[key]
            base = buffers[s.partition][s.offset: s.offset + s.nbytes].view(dtype)
            storages.setdefault(key, base)
        out[t.name] = base.as_strided(t.shape, t.stride, base.storage_offset() + t.storage_offset)
    return out


def load_checkpoint(path: str | os.PathLike[str], device: Any = "cpu", *, options: LoadOptions | None = None,
                    cancel: Any = None, follow: Follow | None = None) -> LoadedCheckpoint:
    """Load every partition of a checkpoint onto device; tensors are views of one buffer per partition.

    follow: the partitions are still being filled (see the module docstring)."""
    opts = options or LoadOptions()
    root = Path(path)
    dev = resolve_device(device)
    index = fmt.read_index(root)
    t0 = time.perf_counter()
    keep, buffers, parts = [], [], []
    for number, part in enumerate(index.partitions):
        k, buf, stat = _read_partition(root / part.file, part, dev, opts, cancel, follow, number)
        keep.append(k)
        buffers.append(buf)
        parts.append(stat)
    sd = _views(index, buffers)
    seconds = time.perf_counter() - t0
    _log.debug("checkpoint loaded", path=str(root), device=str(dev), bytes=index.total_bytes,
               seconds=round(seconds, 4), methods=",".join(p.method for p in parts))
    return LoadedCheckpoint(sd, parts, seconds, keep)


def load_state_dict(path: str | os.PathLike[str], device: Any = "cpu", *, options: LoadOptions | None = None,
                    cancel: Any = None) -> dict[str, torch.Tensor]:
    """{name: tensor} of a checkpoint, bit-identical to the converted source."""
    return load_checkpoint(path, device, options=options, cancel=cancel).state_dict


def verify_file(path: str, partition: fmt.Partition, *, threads: int = 4) -> None:
    """Check every block's crc32c of a partition file, reading a few blocks at a time."""
    window = max(1, threads) * partition.block_size
    size = os.stat(path).st_size
    if size != partition.size:
        raise fmt.PartitionSizeMismatch(path, f"is {size} bytes, the index records {partition.size}")
    buf = aligned_empty(min(window, max(partition.size, fmt.PAGE)))
    per_window = window // partition.block_size
    for first in range(0, len(partition.checksums), per_window):
        off = first * partition.block_size
        length = min(window, partition.size - off)
        crcs = list(partition.checksums[first: first + per_window])
        try:
            _C.read_to_host(path, off, buf.data_ptr(), length, partition.block_size, threads, True,
                            partition.block_size, crcs, None)
        except fmt.ChecksumError as exc:
            raise fmt.ChecksumError(path, exc.block + first, exc.offset, exc.expected, exc.actual) from None


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules with parameters on the meta device and buffers (rotary tables) for real.

    Parameters are created, moved to meta at registration, and their random init then runs on
    meta (free). Patches nn.Module.register_parameter for the duration: not thread-safe.
    """
    import torch

    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: Any) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            assert p is not None
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    torch.nn.Module.register_parameter = on_meta  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register  # type: ignore[method-assign]


def _no_init_weights() -> Any:
    """transformers' switch that skips the random initialisation of a new model's weights."""
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights  # type: ignore[attr-defined,no-redef]
    return no_init_weights()


def load_model(path: str | os.PathLike[str], device: Any = "cpu", *, options: LoadOptions | None = None,
               cancel: Any = None, follow: Follow | None = None) -> Any:
    """A transformers causal LM whose weights are the checkpoint's tensors, never copied again.

    `path` is a converted checkpoint directory, or a plain Hugging Face directory (then
    loaded with from_pretrained, for standalone use).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    root = Path(path)
    if not fmt.is_checkpoint(root):
        if not (root / "config.json").is_file():
            raise FileNotFoundError(2, "neither a sllm-knative checkpoint nor a Hugging Face model directory",
                                    str(root))
        model = AutoModelForCausalLM.from_pretrained(str(root))
        return model.to(torch.device(device)).eval()  # type: ignore[arg-type]
    loaded = load_checkpoint(root, device, options=options, cancel=cancel, follow=follow)
    config = AutoConfig.from_pretrained(str(root))
    with parameters_on_meta(), _no_init_weights():  # the init would only fill meta tensors: 0.1 s for nothing
        model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict, strict=False, assign=True)
    if unexpected:
        _log.debug("checkpoint tensors not used by the model", path=str(root), names=",".join(unexpected[:8]))
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise fmt.FormatError(str(root), f"checkpoint lacks {len(still_meta)} model parameters, e.g. "
                                         f"{', '.join(still_meta[:3])} (missing: {', '.join(missing[:3])})")
    model.to(loaded.state_dict[next(iter(loaded.state_dict))].device)  # buffers only: params are there
    if (root / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(root))
    model.eval()
    model._sllm_buffers = loaded.buffers  # keep the mappings alive as long as the model
    return model
