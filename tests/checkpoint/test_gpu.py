"""The CUDA loading path on a real GPU (review finding F8, docs of the path: GPU-PATH-REVIEW.md).

Every test is marked `gpu`. They skip only where torch sees no CUDA device. Where torch sees one
but the loader extension was built without CUDA, or its CUDA runtime sees no device (a driver too
old for its static runtime, say), they fail and name the cause: a GPU machine that cannot load
onto its GPU is a broken install, not a reason to skip.

Nothing here touches CUDA at import or collection time: the checks run in a fixture, so a CPU
machine's `pytest -m 'not alone'` collects and skips the module without initialising the driver.
Sizes are small (the largest checkpoint is 24 MiB): the whole module is meant to take seconds.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from cuda_ext import _C
from sllm_knative import format as fmt
from sllm_knative.loading import (
    CancelToken,
    LoadCancelled,
    LoadOptions,
    load_checkpoint,
    load_model,
    load_state_dict,
)
from sllm_knative.pagecache import evict, is_memory_fs

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20
BIG_TENSORS = 6  # of 4 MiB each: a 24 MiB checkpoint of 1 MiB checksum blocks


def extension_cuda_problem() -> str | None:
    """Why the loader extension cannot use the GPU that torch sees, or None when it can."""
    if not _C.cuda_compiled():
        return "cuda_ext was built without CUDA (nvcc was not found when the extension was built)"
    if not _C.cuda_available():
        return f"the loader extension's CUDA runtime sees no device: {_C.cuda_error() or 'no error text'}"
    return None


@pytest.fixture(scope="session", autouse=True)
def _cuda_ready() -> None:
    """Skip without a GPU; fail when torch has one and the extension cannot use it.

    Session-scoped so that it runs before the session fixtures the tests use (a skip then costs
    nothing); autouse in this module only."""
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    problem = extension_cuda_problem()
    if problem is not None:
        pytest.fail(f"torch sees {torch.cuda.device_count()} CUDA device(s) but {problem}", pytrace=False)


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 CPU tensor (bitwise: NaNs and float8 included)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def assert_bit_identical(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], device: torch.device) -> None:
    assert got.keys() == ref.keys()
    for name, r in ref.items():
        t = got[name]
        assert t.device == device, name
        assert t.dtype == r.dtype and t.shape == r.shape and t.stride() == r.stride(), name
        assert torch.equal(_bytes_of(t), _bytes_of(r)), name


def _random(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    n = 1
    for d in shape:
        n *= d
    raw = torch.randint(0, 256, (n * torch.empty(0, dtype=dtype).element_size(),), dtype=torch.uint8, generator=gen)
    if dtype == torch.bool:
        return (raw % 2).bool().reshape(shape)
    return raw.view(dtype).reshape(shape)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


@dataclass
class Big:
    src: Path
    ckpt: Path
    state: dict[str, torch.Tensor]

    @property
    def partition(self) -> Path:
        return self.ckpt / "partition-0.bin"


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Big:
    """A 24 MiB checkpoint of 1 MiB checksum blocks, converted from a safetensors state dict."""
    from safetensors.torch import save_file

    from sllm_knative.convert import convert

    gen = torch.Generator().manual_seed(7)
    state = {f"layers.{i}.w": _random((1024, 2048), torch.bfloat16, gen) for i in range(BIG_TENSORS)}
    root = tmp_path_factory.mktemp("big")
    src = root / "src"
    src.mkdir()
    save_file(state, str(src / "model.safetensors"))
    ckpt = convert(src, root / "ckpt", block_size=MiB)
    assert len(fmt.read_index(ckpt).partitions[0].checksums) >= 24
    return Big(src, ckpt, state)


def _write_random(path: Path, nbytes: int) -> bytes:
    data = os.urandom(nbytes)
    path.write_bytes(data)
    return data


# -- bytes -----------------------------------------------------------------------------------


def test_every_dtype_reads_bit_identical_on_the_device(tmp_path: Path) -> None:
    """Every dtype of the format (that this torch has), 4 KiB checksum blocks, verified on the device."""
    from sllm_knative.convert import convert

    gen = torch.Generator().manual_seed(3)
    names = [n for n in fmt.DTYPES if hasattr(torch, n)]
    state: dict[str, torch.Tensor] = {}
    for n in names:
        dtype = getattr(torch, n)
        state[n] = _random((7, 13), dtype, gen)
        state[f"{n}.scalar"] = _random((), dtype, gen)
    src = tmp_path / "src"
    src.mkdir()
    torch.save(state, src / "pytorch_model.bin")
    ckpt = convert(src, tmp_path / "ckpt", block_size=4096)
    assert len(fmt.read_index(ckpt).partitions[0].checksums) > 1
    dev = _device()
    opts = LoadOptions(chunk_bytes=4096, threads=3, streams=2, pinned_bytes=64 << 10, verify=True)
    loaded = load_checkpoint(ckpt, "cuda", options=opts)
    assert [p.method for p in loaded.partitions] == ["device"]
    assert_bit_identical(loaded.state_dict, state, dev)
    assert_bit_identical(load_state_dict(ckpt), state, torch.device("cpu"))


def test_cuda_load_matches_cpu(tiny_ckpt: Path) -> None:
    """The tiny model's checkpoint (was in test_loading.py): small ring, several threads and streams."""
    ref = load_state_dict(tiny_ckpt)
    opts = LoadOptions(chunk_bytes=64 << 10, threads=4, pinned_bytes=256 << 10, streams=3)
    on_gpu = load_checkpoint(tiny_ckpt, "cuda", options=opts)
    assert on_gpu.partitions[0].method == "device"
    assert_bit_identical(on_gpu.state_dict, ref, _device())


def test_many_blocks_evicted_with_direct_reads(big: Big) -> None:
    """24 blocks, 4 threads on 3 streams through a ring of 8 slots, out of a cold file with O_DIRECT
    into the pinned ring (F3: cudaHostAlloc memory as an O_DIRECT target)."""
    evict(big.partition)
    opts = LoadOptions(direct=True, chunk_bytes=MiB, threads=4, streams=3, pinned_bytes=4 * MiB)
    loaded = load_checkpoint(big.ckpt, "cuda", options=opts)
    assert [p.method for p in loaded.partitions] == ["device"]
    assert_bit_identical(loaded.state_dict, big.state, _device())
    cpu = load_state_dict(big.ckpt)
    for k, v in cpu.items():
        assert torch.equal(_bytes_of(loaded.state_dict[k]), _bytes_of(v)), k
    # The raw call says whether O_DIRECT was taken (load_checkpoint does not, for a device load).
    evict(big.partition)
    size = big.partition.stat().st_size
    buf = torch.empty(size, dtype=torch.uint8, device=_device())
    torch.cuda.current_stream().synchronize()
    stats = _C.read_to_device(str(big.partition), 0, _device().index, buf.data_ptr(), size, MiB, 4, True,
                              4 * MiB, 3)
    if not is_memory_fs(big.partition) and not stats["direct"]:
        # F3: the reader falls back to buffered reads when direct reads into pinned memory are
        # refused; that is handled, but it must say why (and the GPU check reports it).
        assert stats["direct_fallback"], f"O_DIRECT was not used for {big.partition} and no reason was given"
        warnings.warn(f"O_DIRECT into pinned memory fell back to buffered reads: {stats['direct_fallback']}",
                      stacklevel=1)
    expected = torch.frombuffer(bytearray(big.partition.read_bytes()), dtype=torch.uint8)
    assert torch.equal(buf.cpu(), expected)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_raw_read_at_an_unaligned_offset_into_the_middle_of_a_buffer(tmp_path: Path, direct: bool) -> None:
    """An unaligned file range (head and tail through the bounce buffer) to an unaligned device address;
    the bytes either side are untouched."""
    p = tmp_path / "data"
    data = _write_random(p, 3 * MiB + 777)
    file_offset, length, dst_offset = 3 * 4096 + 123, MiB + 4097, 1001
    dev = _device()
    buf = torch.full((4 * MiB,), 0xAB, dtype=torch.uint8, device=dev)
    torch.cuda.current_stream().synchronize()  # the fill runs on torch's stream, the read on its own
    stats = _C.read_to_device(str(p), file_offset, dev.index, buf.data_ptr() + dst_offset, length, 256 << 10, 3,
                              direct, MiB, 2)
    assert stats["bytes"] == length
    expected = torch.frombuffer(bytearray(data[file_offset:file_offset + length]), dtype=torch.uint8).to(dev)
    assert torch.equal(buf[dst_offset:dst_offset + length], expected)
    assert bool((buf[:dst_offset] == 0xAB).all())
    assert bool((buf[dst_offset + length:] == 0xAB).all())


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_flipped_byte_fails_checksum_on_the_device_path(big: Big, tmp_path: Path, direct: bool) -> None:
    ckpt = Path(shutil.copytree(big.ckpt, tmp_path / "ckpt"))
    part = ckpt / "partition-0.bin"
    offset = 5 * MiB + 17
    with open(part, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))
    evict(part)
    opts = LoadOptions(direct=direct, verify=True, chunk_bytes=MiB, threads=4, streams=3, pinned_bytes=4 * MiB)
    with pytest.raises(fmt.ChecksumError) as info:
        load_checkpoint(ckpt, "cuda", options=opts)
    assert info.value.block == 5
    assert str(part) in str(info.value)
    # The ring survives a failed read: the intact checkpoint loads right after.
    assert_bit_identical(load_checkpoint(big.ckpt, "cuda", options=opts).state_dict, big.state, _device())


# -- cancel ----------------------------------------------------------------------------------


def test_cancel_before_and_during_a_device_read(big: Big, tmp_path: Path) -> None:
    dev = _device()
    token = CancelToken()
    token.cancel()
    with pytest.raises(LoadCancelled):
        load_checkpoint(big.ckpt, "cuda", cancel=token)
    p = tmp_path / "big"
    size = 256 * MiB
    with open(p, "wb") as f:
        f.truncate(size)  # sparse: the reads are fast, the copies through a 4-slot ring are not
    buf = torch.empty(size, dtype=torch.uint8, device=dev)
    torch.cuda.current_stream().synchronize()
    with pytest.raises(LoadCancelled):
        _C.read_to_device(str(p), 0, dev.index, buf.data_ptr(), size, 64 << 10, 2, False, 256 << 10, 1, 0, [], token)

    # From another thread while a read runs: it stops (LoadCancelled) or it had already finished.
    token2 = CancelToken()
    timer = threading.Timer(0.01, token2.cancel)
    timer.start()
    try:
        _C.read_to_device(str(p), 0, dev.index, buf.data_ptr(), size, 64 << 10, 2, False, 256 << 10, 1, 0, [], token2)
    except LoadCancelled:
        pass
    timer.join()
    assert token2.cancelled
    with pytest.raises(LoadCancelled):  # a cancelled token stops every later read too
        _C.read_to_device(str(p), 0, dev.index, buf.data_ptr(), size, 64 << 10, 2, False, 256 << 10, 1, 0, [], token2)
    del buf

    # Afterwards the loader is intact: a read through the same ring, then through a fresh one.
    q = tmp_path / "small"
    data = _write_random(q, 3 * MiB + 4096)
    expected = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev)
    for release in (False, True):
        if release:
            _C.release_pinned()
        out = torch.empty(len(data), dtype=torch.uint8, device=dev)
        torch.cuda.current_stream().synchronize()
        _C.read_to_device(str(q), 0, dev.index, out.data_ptr(), len(data), 64 << 10, 2, False, 256 << 10, 1, 0, [],
                          CancelToken())
        assert torch.equal(out, expected)
    _C.release_pinned()
    assert_bit_identical(load_state_dict(big.ckpt, "cuda"), big.state, dev)


# -- follow, partitions, devices ---------------------------------------------------------------


def test_follow_a_partition_behind_a_throttled_writer(big: Big, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The partition is written 8 MiB (less 1000 bytes: unaligned watermarks) at a time with pauses;
    `follow` blocks until enough is written and returns the watermark. Segments are shrunk to 2 MiB
    (1 MiB chunks) so that a 24 MiB partition is copied in several, each behind the writer."""
    from sllm_knative import loading

    monkeypatch.setattr(loading, "DEVICE_SEGMENT", 2 * MiB)
    dst = Path(shutil.copytree(big.ckpt, tmp_path / "filling", ignore=shutil.ignore_patterns("partition-*.bin")))
    source = big.partition.read_bytes()
    target = dst / "partition-0.bin"
    with open(target, "wb") as f:  # at its final size first, as the sidecar's fill creates it (spans.create_file)
        f.truncate(len(source))
    step = 8 * MiB - 1000
    cond = threading.Condition()
    written = 0
    writer_error: list[BaseException] = []

    def writer() -> None:
        nonlocal written
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
            try:
                view = memoryview(source)
                for off in range(0, len(source), step):
                    end = min(len(source), off + step)
                    pos = off
                    while pos < end:
                        pos += os.pwrite(fd, view[pos:end], pos)
                    with cond:
                        written = end
                        cond.notify_all()
                    time.sleep(0.02)
            finally:
                os.close(fd)
        except BaseException as exc:  # reported by the test, not lost in the thread
            writer_error.append(exc)
            with cond:
                cond.notify_all()

    calls: list[tuple[int, int, int]] = []

    def follow(partition: int, nbytes: int) -> int:
        with cond:
            if not cond.wait_for(lambda: written >= nbytes or bool(writer_error), timeout=60):
                raise TimeoutError(f"partition {partition}: {nbytes} bytes never written")
            if writer_error:
                raise RuntimeError("the writer failed") from writer_error[0]
            calls.append((partition, nbytes, written))
            return written

    t = threading.Thread(target=writer, name="throttled-writer")
    t.start()
    try:
        loaded = load_checkpoint(dst, "cuda", follow=follow, options=LoadOptions(chunk_bytes=MiB))
    finally:
        t.join()
    assert not writer_error
    assert [p.method for p in loaded.partitions] == ["follow"]
    assert len(calls) >= 3 and all(c[0] == 0 for c in calls)
    marks = [c[2] for c in calls]
    assert marks == sorted(set(marks)) and marks[-1] == len(source)
    assert_bit_identical(loaded.state_dict, load_state_dict(big.ckpt), _device())


def test_several_partitions_each_on_the_device(big: Big, tmp_path: Path) -> None:
    from sllm_knative.convert import convert

    ckpt = convert(big.src, tmp_path / "ckpt", partitions=3, block_size=MiB)
    idx = fmt.read_index(ckpt)
    assert len(idx.partitions) == 3
    loaded = load_checkpoint(ckpt, "cuda", options=LoadOptions(chunk_bytes=MiB, threads=4, streams=2))
    assert [p.method for p in loaded.partitions] == ["device"] * 3
    assert len({b.data_ptr() for b in loaded.buffers}) == 3
    assert_bit_identical(loaded.state_dict, big.state, _device())
    assert {s.partition for s in idx.storages} == {0, 1, 2}
    for t in idx.tensors:  # every tensor views its own partition's buffer
        buf = loaded.buffers[idx.storages[t.storage].partition]
        ptr = loaded.state_dict[t.name].data_ptr()
        assert buf.data_ptr() <= ptr < buf.data_ptr() + buf.numel(), t.name


def test_explicit_device_index_leaves_the_current_device_alone(big: Big) -> None:
    """F5: a load on cuda:N restores the caller's current device afterwards."""
    n = torch.cuda.device_count() - 1
    before = torch.cuda.current_device()
    loaded = load_checkpoint(big.ckpt, f"cuda:{n}")
    assert torch.cuda.current_device() == before
    assert all(b.device == torch.device("cuda", n) for b in loaded.buffers)
    assert_bit_identical(loaded.state_dict, big.state, torch.device("cuda", n))
    if n != before:  # several GPUs: a plain "cuda" still means the current one
        assert all(t.device.index == before for t in load_state_dict(big.ckpt, "cuda").values())


def test_queued_kernels_cannot_overwrite_a_reused_block(big: Big) -> None:
    """F2: a freed block that a queued kernel still writes is handed to the loader by torch's caching
    allocator; _device_buffer waits for torch's stream before the loader's own streams copy into it."""
    from sllm_knative import loading

    dev = _device()
    size = fmt.read_index(big.ckpt).partitions[0].size
    ref = load_state_dict(big.ckpt)

    def hazard() -> tuple[loading.LoadedCheckpoint, bool]:
        x = torch.empty(size, dtype=torch.uint8, device=dev)
        ptr = x.data_ptr()
        torch.cuda._sleep(500_000_000)  # a few hundred ms of spinning on torch's current stream
        x.fill_(0x5A)  # queued behind it, into the block about to be freed
        del x
        loaded = load_checkpoint(big.ckpt, dev)
        torch.cuda.synchronize()
        return loaded, loaded.buffers[0].data_ptr() == ptr

    loaded, reused = hazard()
    if not reused:
        import warnings

        warnings.warn("the caching allocator did not hand the freed block to the loader: the F2 hazard was "
                      "not set up, this test only checked a plain load", stacklevel=1)
    for k, v in ref.items():
        assert torch.equal(_bytes_of(loaded.state_dict[k]), _bytes_of(v)), k


def test_a_forked_child_loads_on_the_gpu(tiny_ckpt: Path) -> None:
    """As a zygote does: torch and the loader imported, CUDA not initialised, then fork; the child
    loads on "cuda". Run in a fresh interpreter: this pytest process has initialised CUDA already."""
    script = r"""
import hashlib, json, os, sys
import torch
import sllm_knative.loading as loading
assert not torch.cuda.is_initialized(), "the parent initialised CUDA before forking"
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    try:
        loaded = loading.load_checkpoint(sys.argv[1], "cuda")
        digest = hashlib.sha256()
        for name in sorted(loaded.state_dict):
            t = loaded.state_dict[name]
            digest.update(name.encode())
            digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        out = {"sha256": digest.hexdigest(), "devices": sorted({str(t.device) for t in loaded.state_dict.values()})}
    except BaseException as exc:
        out = {"error": f"{type(exc).__name__}: {exc}"}
    os.write(w, json.dumps(out).encode())
    os._exit(0)
os.close(w)
data = b""
while True:
    chunk = os.read(r, 1 << 16)
    if not chunk:
        break
    data += chunk
_, status = os.waitpid(pid, 0)
print(data.decode())
sys.exit(os.waitstatus_to_exitcode(status))
"""
    proc = subprocess.run([sys.executable, "-c", script, str(tiny_ckpt)], cwd=REPO, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, f"rc={proc.returncode}\nstdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-4000:]}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "error" not in out, out["error"]
    assert out["devices"] == ["cuda:0"]
    digest = hashlib.sha256()
    ref = load_state_dict(tiny_ckpt)
    for name in sorted(ref):
        digest.update(name.encode())
        digest.update(_bytes_of(ref[name]).numpy().tobytes())
    assert out["sha256"] == digest.hexdigest()


def test_repeated_loads_keep_gpu_and_host_memory_flat(big: Big) -> None:
    import psutil

    proc = psutil.Process()
    gc.collect()
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    rss_after_first = 0
    for i in range(5):
        loaded = load_checkpoint(big.ckpt, "cuda")
        assert torch.cuda.memory_allocated() > start
        del loaded
        gc.collect()
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == start, f"load {i + 1} left device memory allocated"
        if i == 0:
            rss_after_first = proc.memory_info().rss
    growth = proc.memory_info().rss - rss_after_first
    assert growth < 64 * MiB, f"RSS grew by {growth / MiB:.1f} MiB over four loads after the first"


# -- models ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-3), ("bfloat16", 5e-2), ("float16", 1e-2)])
def test_model_logits_on_the_gpu_match_the_cpu(tmp_path: Path, dtype: str, tolerance: float) -> None:
    import dataclasses

    from sllm_knative.convert import convert
    from sllm_knative.models import TINY, build_model

    src = build_model(tmp_path / "src", dataclasses.replace(TINY, dtype=dtype))
    ckpt = convert(src, tmp_path / "ckpt")
    cpu_model = load_model(ckpt, "cpu")
    gpu_model = load_model(ckpt, "cuda")
    for (name, p), (_, q) in zip(cpu_model.named_parameters(), gpu_model.named_parameters(), strict=True):
        assert q.device.type == "cuda", name
        assert torch.equal(_bytes_of(q), _bytes_of(p)), name
    ids = torch.tensor([[5, 17, 42, 7, 99, 3, 250, 1]])
    with torch.no_grad():
        want = cpu_model(ids).logits.float()
        got = gpu_model(ids.cuda()).logits.float().cpu()
    assert torch.isfinite(got).all()
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance * scale)
