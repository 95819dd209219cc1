"""The KV cache on the CPU: an anonymous memory map that reads as zeros and costs nothing until
written (functions.llm.runner._zeros)."""

from __future__ import annotations

import pytest
import torch

from functions.llm.runner import KVCache, _zeros


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_zeros_is_a_writable_zero_tensor_of_its_own(dtype):
    a = _zeros((3, 2, 16, 8), dtype, torch.device("cpu"))
    b = _zeros((3, 2, 16, 8), dtype, torch.device("cpu"))
    assert a.shape == (3, 2, 16, 8) and a.dtype == dtype and a.is_contiguous()
    assert torch.count_nonzero(a) == 0
    a[1, 0, 5] = 2.5
    assert float(a.sum()) == pytest.approx(2.5 * 8)
    assert torch.count_nonzero(b) == 0  # separate memory
    assert a.data_ptr() % 4096 == 0  # page-aligned


def test_zeros_of_empty_shape():
    assert _zeros((0, 4), torch.float16, torch.device("cpu")).shape == (0, 4)


def test_cache_pages_are_not_touched_until_written():
    """A 256 MiB cache must not be resident after allocation (torch.zeros would write it all)."""
    import psutil

    proc = psutil.Process()
    before = proc.memory_info().rss
    cache = KVCache(layers=4, slots=7, kv_heads=4, max_len=4096, head_dim=128, dtype=torch.float16,
                    device=torch.device("cpu"))
    assert cache.nbytes == 2 * 4 * 8 * 4 * 4096 * 128 * 2
    grown = proc.memory_info().rss - before
    assert grown < cache.nbytes // 8, (grown, cache.nbytes)
    cache.k[0][0, 0, :4] = 1.0
    assert float(cache.k[0].sum()) == 4 * 128
