"""The next hop follows the watermark: an instance copies a DRAM-tier checkpoint that the sidecar
is still filling (loading.load_checkpoint(..., follow=lease.wait)), segment by segment, and ends
with exactly the checkpoint's tensors. On the CPU the copy path (map_memory_files=False) stands
for the GPU's host-to-device copy, which uses the same segments through read_to_device."""

from __future__ import annotations

import threading
import time

import torch

from sllm_knative.loading import LoadOptions, load_checkpoint, load_state_dict

SEGMENT = 256 << 10


def test_copy_runs_behind_the_fill_and_is_exact(nginx, sidecar, store_root):
    # ~4.4 MB in 2 partitions from a 200 KB/s-per-connection store: a few seconds of filling.
    _, client = sidecar([f"{nginx.url}/slow/models"], "--connections", "4", "--chunk-bytes", str(SEGMENT))
    calls: list[tuple[int, int, int, bool]] = []  # (partition, asked, watermark, fill complete then)
    lock = threading.Lock()
    with client.acquire(f"{nginx.url}/slow/models/small") as lease:
        assert lease.source == "remote"

        def follow(partition: int, nbytes: int) -> int:
            mark = lease.wait(partition, nbytes, timeout=120)
            with lock:
                calls.append((partition, nbytes, mark, lease.complete))
            return mark

        t0 = time.perf_counter()
        loaded = load_checkpoint(lease.directory, "cpu", follow=follow,
                                 options=LoadOptions(map_memory_files=False, chunk_bytes=SEGMENT))
        seconds = time.perf_counter() - t0
        assert lease.complete
    assert [p.method for p in loaded.partitions] == ["follow", "follow"]
    # It copied while the fill went on: several segments per partition, the first ones early.
    for part in (0, 1):
        marks = [m for p, _, m, _ in calls if p == part]
        assert len(marks) >= 2 and marks == sorted(marks), calls
    assert not calls[0][3], "the first segment was copied only after the fill had completed"
    assert seconds > 1.0  # it did wait for a slow fill (4.4 MB at 4 x 200 KB/s)
    want = load_state_dict(store_root / "models" / "small")
    assert loaded.state_dict.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(loaded.state_dict[name], tensor), name


def test_a_mapped_partition_waits_for_its_whole_fill(nginx, sidecar, store_root):
    _, client = sidecar([f"{nginx.url}/slow/models"], "--connections", "4", "--chunk-bytes", str(SEGMENT))
    asked: list[tuple[int, int]] = []
    with client.acquire(f"{nginx.url}/slow/models/small") as lease:
        def follow(partition: int, nbytes: int) -> int:
            asked.append((partition, nbytes))
            return lease.wait(partition, nbytes, timeout=120)

        loaded = load_checkpoint(lease.directory, "cpu", follow=follow)
        assert asked == [(0, lease.partitions[0].size), (1, lease.partitions[1].size)]
        assert [p.method for p in loaded.partitions] == ["mmap", "mmap"]
        want = load_state_dict(store_root / "models" / "small")
        for name, tensor in want.items():
            assert torch.equal(loaded.state_dict[name], tensor), name
        del loaded
