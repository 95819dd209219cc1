"""Loading: errors with file/offset/errno, checksums, tmpfs, concurrency, cancellation, models."""

from __future__ import annotations

import errno
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

from cuda_ext import _C
from sllm_knative import format as fmt
from sllm_knative.loading import (
    CancelToken,
    LoadCancelled,
    LoadOptions,
    aligned_empty,
    load_checkpoint,
    load_model,
    load_state_dict,
)
from sllm_knative.pagecache import is_memory_fs


@pytest.fixture()
def ckpt_copy(tiny_ckpt: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_ckpt, tmp_path / "ckpt"))


@pytest.fixture()
def shm_dir():
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm on this machine")
    d = Path(os.environ.get("SLLM_TEST_SHM", "/dev/shm")) / f"sllm-test-{os.getpid()}-{threading.get_ident()}"
    d.mkdir(parents=True)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _crc32c_reference(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


@pytest.mark.parametrize("n", [1, 7, 8, 9, 3 * 8192 - 1, 3 * 8192, 3 * 8192 + 1, 6 * 8192 + 13, 70_001])
def test_crc32c_all_paths_match_bitwise_reference(n: int) -> None:
    """Covers the 3-stream combine (>= 24 KiB), the 8-byte loop and the byte tail."""
    data = os.urandom(n)
    assert _C.crc32c(data) == _crc32c_reference(data)
    cut = n // 3
    assert _C.crc32c(data[cut:], _C.crc32c(data[:cut])) == _crc32c_reference(data)


def test_crc32c_matches_reference_vectors() -> None:
    assert _C.crc32c(b"123456789") == 0xE3069283
    assert _C.crc32c(b"") == 0
    assert _C.crc32c(b"6789", _C.crc32c(b"12345")) == 0xE3069283  # incremental
    data = os.urandom(100_003)
    buf = aligned_empty(len(data))
    buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    assert _C.crc32c_ptr(buf.data_ptr(), len(data)) == _C.crc32c(data)


def test_direct_read_keeps_unaligned_tail(tmp_path: Path) -> None:
    """A direct-I/O read whose length is not a multiple of 4096 must not lose the tail."""
    data = os.urandom(3 * 4096 + 123)
    p = tmp_path / "f"
    p.write_bytes(data)
    buf = aligned_empty(len(data))
    stats = _C.read_to_host(str(p), 0, buf.data_ptr(), len(data), 4096, 3, True)
    assert bytes(buf.numpy()) == data
    assert stats["bytes"] == len(data)


@pytest.mark.parametrize("file_offset", [0, 1, 4095, 4097, 8192 + 13])
@pytest.mark.parametrize("length", [1, 4096, 3 * 4096 + 5, (1 << 20) + 333])
@pytest.mark.parametrize("dst_offset", [0, 7])
def test_direct_read_of_an_unaligned_range(tmp_path: Path, file_offset: int, length: int, dst_offset: int) -> None:
    """O_DIRECT refuses an unaligned file offset or destination (EINVAL): such a range is read
    through the bounce buffer, whole, and only its bytes land at the destination."""
    data = os.urandom(3 * (1 << 20) + 777)
    p = tmp_path / "f"
    p.write_bytes(data)
    buf = aligned_empty(length + dst_offset + 64)
    guard = bytes(buf.numpy()[length + dst_offset:])
    stats = _C.read_to_host(str(p), file_offset, buf.data_ptr() + dst_offset, length, 1 << 16, 3, True)
    assert stats["direct"], "the file system refused O_DIRECT: nothing here tests the direct path"
    got = bytes(buf.numpy())
    assert got[dst_offset:dst_offset + length] == data[file_offset:file_offset + length]
    assert got[dst_offset + length:] == guard  # nothing written past the range


def test_checkpoint_loads_with_direct_io_and_identical_logits(tiny_src: Path, tiny_ckpt: Path) -> None:
    from transformers import AutoModelForCausalLM

    from sllm_knative.pagecache import evict

    evict(tiny_ckpt / "partition-0.bin")
    loaded = load_checkpoint(tiny_ckpt)
    assert loaded.partitions[0].method == "direct"  # not cached: read from disk
    assert load_checkpoint(tiny_ckpt).partitions[0].method == "direct"  # O_DIRECT did not fill the cache
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_src)).eval()
    model = load_model(tiny_ckpt)
    ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    # Every parameter is a view into the one partition allocation.
    lo = loaded.buffers[0].data_ptr()
    state = load_checkpoint(tiny_ckpt)
    base = state.buffers[0].data_ptr()
    for t in state.state_dict.values():
        assert base <= t.data_ptr() < base + state.partitions[0].bytes
    assert lo != base  # two loads, two allocations


def test_tied_model_weights_share_one_storage(tmp_path: Path) -> None:
    import dataclasses

    from transformers import AutoModelForCausalLM

    from sllm_knative.convert import convert
    from sllm_knative.models import TINY, build_model

    src = build_model(tmp_path / "src", dataclasses.replace(TINY, tie_word_embeddings=True), weights="bin")
    dst = convert(src, tmp_path / "dst")
    model = load_model(dst)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ref = AutoModelForCausalLM.from_pretrained(str(src)).eval()
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_plain_hf_directory_loads_through_from_pretrained(tiny_src: Path) -> None:
    model = load_model(tiny_src)
    assert not model.training


def test_truncated_partition_is_reported(ckpt_copy: Path) -> None:
    part = ckpt_copy / "partition-0.bin"
    size = part.stat().st_size
    os.truncate(part, size - 4096)
    with pytest.raises(fmt.PartitionSizeMismatch, match="truncated"):
        load_state_dict(ckpt_copy)
    # The extension itself refuses to read past the end and names file, offset and errno.
    buf = aligned_empty(size)
    with pytest.raises(OSError) as info:
        _C.read_to_host(str(part), 0, buf.data_ptr(), size, 1 << 20, 2, True)
    assert info.value.errno == errno.ENODATA
    assert info.value.filename == str(part)
    assert "truncated" in str(info.value)


def test_page_cache_resident_partition_is_mapped_and_verified(ckpt_copy: Path) -> None:
    from sllm_knative.pagecache import evict, resident_fraction

    part = ckpt_copy / "partition-0.bin"
    part.read_bytes()  # now in the page cache
    assert resident_fraction(part) == 1.0
    cached = load_checkpoint(ckpt_copy)
    assert cached.partitions[0].method == "mmap-cached"
    values = {k: v.clone() for k, v in cached.state_dict.items()}
    del cached  # mapped pages cannot be evicted: unmap first
    import gc

    gc.collect()
    evict(part)
    ref = load_checkpoint(ckpt_copy)
    assert ref.partitions[0].method == "direct"
    assert all(torch.equal(values[k], v) for k, v in ref.state_dict.items())


def test_flipped_byte_fails_checksum(ckpt_copy: Path) -> None:
    part = ckpt_copy / "partition-0.bin"
    idx = fmt.read_index(ckpt_copy)
    offset = idx.storages[-1].offset + 5
    with open(part, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))
    with pytest.raises(fmt.ChecksumError) as info:
        load_state_dict(ckpt_copy)
    assert info.value.block == offset // idx.partitions[0].block_size
    assert str(part) in str(info.value)
    with pytest.raises(fmt.ChecksumError):
        fmt.verify_partition(part, idx.partitions[0])
    # Verification can be switched off explicitly (the bytes then load as they are).
    load_state_dict(ckpt_copy, options=LoadOptions(verify=False))


def test_missing_files_are_reported(ckpt_copy: Path, tmp_path: Path) -> None:
    (ckpt_copy / "partition-0.bin").unlink()
    with pytest.raises(FileNotFoundError, match="partition 0 missing"):
        load_state_dict(ckpt_copy)
    with pytest.raises(FileNotFoundError, match="not a sllm-knative checkpoint"):
        load_state_dict(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="neither"):
        load_model(tmp_path)


def test_tmpfs_partition_is_mapped_or_read_buffered(tiny_ckpt: Path, shm_dir: Path) -> None:
    dram = Path(shutil.copytree(tiny_ckpt, shm_dir / "ckpt"))
    assert is_memory_fs(dram) and not is_memory_fs(tiny_ckpt)
    ref = load_state_dict(tiny_ckpt)
    mapped = load_checkpoint(dram)
    assert mapped.partitions[0].method == "mmap"
    # Asked to verify, it still maps (the pages are in memory) and checks every block's crc32c.
    verified = load_checkpoint(dram, options=LoadOptions(verify=True))
    assert verified.partitions[0].method == "mmap-cached"
    for k, v in ref.items():
        assert torch.equal(mapped.state_dict[k], v) and torch.equal(verified.state_dict[k], v)
    # Mapped tensors are copy-on-write: writing one does not change the DRAM-tier file.
    name = next(iter(mapped.state_dict))
    mapped.state_dict[name].zero_()
    assert torch.equal(load_state_dict(dram)[name], ref[name])


@pytest.fixture()
def no_direct_fs(tmp_path: Path):
    """A ramfs mount: a file system that refuses O_DIRECT (needs root to mount)."""
    import subprocess

    mnt = tmp_path / "ramfs"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "ramfs", "none", str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a ramfs here (not root?): the O_DIRECT fallback is not exercised")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_direct_io_refused_falls_back_to_buffered(tiny_ckpt: Path, no_direct_fs: Path) -> None:
    ckpt = Path(shutil.copytree(tiny_ckpt, no_direct_fs / "ckpt"))
    with pytest.raises(OSError):
        os.close(os.open(ckpt / "partition-0.bin", os.O_RDONLY | os.O_DIRECT))
    loaded = load_checkpoint(ckpt, options=LoadOptions(verify=True, direct=True, map_memory_files=False))
    assert loaded.partitions[0].method == "buffered"
    ref = load_state_dict(tiny_ckpt)
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in ref.items())


def test_two_loads_at_once(tiny_ckpt: Path) -> None:
    ref = load_state_dict(tiny_ckpt)
    results: list[dict] = [{}, {}, {}, {}]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = load_state_dict(tiny_ckpt, options=LoadOptions(threads=3, chunk_bytes=4096))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for r in results:
        assert all(torch.equal(r[k], v) for k, v in ref.items())


def test_cancel_stops_a_load(tmp_path: Path) -> None:
    p = tmp_path / "big"
    with open(p, "wb") as f:
        f.truncate(256 << 20)
    token = CancelToken()
    token.cancel()
    buf = aligned_empty(256 << 20)
    with pytest.raises(LoadCancelled):
        _C.read_to_host(str(p), 0, buf.data_ptr(), 256 << 20, 1 << 20, 2, True, 0, [], token)
    # Cancelled from another thread while reading.
    token2 = CancelToken()
    timer = threading.Timer(0.01, token2.cancel)
    timer.start()
    with pytest.raises(LoadCancelled):
        for _ in range(200):
            _C.read_to_host(str(p), 0, buf.data_ptr(), 256 << 20, 1 << 16, 1, False, 0, [], token2)
    timer.join()


def test_bad_options_are_rejected() -> None:
    with pytest.raises(ValueError, match="chunk_bytes"):
        LoadOptions(chunk_bytes=1000)
    with pytest.raises(ValueError, match="threads"):
        LoadOptions(threads=0)
    with pytest.raises(ValueError, match="only 'cpu' and 'cuda"):
        load_state_dict("/nonexistent", device="mps")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: tests/checkpoint/test_gpu.py loads on it")
def test_cuda_without_a_gpu_says_why(tiny_ckpt: Path) -> None:
    """F9: the error names what is missing, and the extension's own CUDA error text is exposed."""
    with pytest.raises(RuntimeError, match="torch sees no CUDA device|built without CUDA"):
        load_state_dict(tiny_ckpt, device="cuda")
    why = _C.cuda_error()
    assert why and not _C.cuda_available()
    assert "built without CUDA" in why or "the driver supports" in why, why


def test_release_pinned_is_safe_without_a_ring() -> None:
    _C.release_pinned()  # nothing pinned yet (or no CUDA at all): a no-op
    _C.release_pinned()


def test_raw_extension_rejects_chunk_bytes_zero_before_dividing(tmp_path: Path) -> None:
    """chunk_bytes=0 with block checksums used to reach `block_bytes % chunk_bytes`: SIGFPE."""
    p = tmp_path / "f"
    p.write_bytes(bytes(8192))
    buf = aligned_empty(8192)
    with pytest.raises(ValueError, match="chunk_bytes"):
        _C.read_to_host(str(p), 0, buf.data_ptr(), 8192, 0, 1, False, 4096, [0, 0])


def test_verified_reads_use_the_largest_chunk_that_tiles_the_blocks(tiny_src: Path, tiny_ckpt: Path,
                                                                     tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A 24 KiB block with 16 KiB chunks reads in 8 KiB chunks (their gcd), not 4 KiB ones."""
    from sllm_knative import loading
    from sllm_knative.convert import convert

    ckpt = convert(tiny_src, tmp_path / "ckpt", block_size=24 << 10)
    chunks: list[int] = []
    real = _C.read_to_host

    def spy(*args: object) -> object:
        chunks.append(int(args[4]))  # type: ignore[call-overload]
        return real(*args)

    monkeypatch.setattr(loading._C, "read_to_host", spy)
    opts = LoadOptions(chunk_bytes=16 << 10, verify=True, map_memory_files=False, direct=False)
    got = load_checkpoint(ckpt, "cpu", options=opts).state_dict
    assert chunks and set(chunks) == {8 << 10}
    monkeypatch.undo()
    for k, v in load_state_dict(tiny_ckpt).items():
        assert torch.equal(got[k], v), k

