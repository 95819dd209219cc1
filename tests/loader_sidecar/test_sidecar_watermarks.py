"""Watermarks: the leading run of verified blocks, waitable; range plans in whole blocks."""

from __future__ import annotations

import asyncio

import pytest

from loader_sidecar.spans import Span, plan_spans
from loader_sidecar.watermarks import Watermarks, prefix_end


@pytest.mark.parametrize("done, block, size, end", [
    pytest.param([], 4, 0, 0, id="empty"),
    pytest.param([False, True, True], 4, 12, 0, id="first-missing"),
    pytest.param([True, False, True], 4, 12, 4, id="gap"),
    pytest.param([True, True, True], 4, 12, 12, id="all"),
    pytest.param([True, True], 4, 6, 6, id="short-last-block"),
])
def test_prefix_end(done, block, size, end):
    assert prefix_end(done, block, size) == end


@pytest.mark.parametrize("sizes, blocks, chunk, spans", [
    pytest.param([10], [4], 4, [Span(0, 0, 4), Span(0, 4, 8), Span(0, 8, 10)], id="one-block-per-span"),
    pytest.param([10], [4], 9, [Span(0, 0, 8), Span(0, 8, 10)], id="chunk-rounded-down-to-blocks"),
    pytest.param([10], [4], 2, [Span(0, 0, 4), Span(0, 4, 8), Span(0, 8, 10)], id="chunk-below-block"),
    pytest.param([4, 0, 3], [4, 4, 4], 8, [Span(0, 0, 4), Span(2, 0, 3)], id="several-files-empty-skipped"),
])
def test_plan_spans(sizes, blocks, chunk, spans):
    assert plan_spans(sizes, blocks, chunk) == spans


def test_out_of_order_blocks_raise_the_watermark_only_when_contiguous():
    async def run() -> list[int]:
        wm = Watermarks([10, 4], [4, 4])
        seen = []
        wm.mark_block(0, 1)
        seen.append(wm.filled[0])
        wm.mark_block(0, 0)
        seen.append(wm.filled[0])
        wm.mark_block(0, 2)
        seen.append(wm.filled[0])
        assert not wm.complete
        wm.advance(1, 4)
        assert wm.complete and wm.total == 14
        return seen

    assert asyncio.run(run()) == [0, 8, 10]


def test_waiters_wake_on_change_and_failure():
    async def run() -> tuple[int, int, BaseException | None]:
        wm = Watermarks([8], [4])
        waiter = asyncio.ensure_future(wm.wait_newer(wm.version))
        await asyncio.sleep(0)
        assert not waiter.done()
        wm.advance(0, 4)
        v1 = await asyncio.wait_for(waiter, 1)
        waiter = asyncio.ensure_future(wm.wait_newer(v1))
        wm.fail(RuntimeError("store gone"))
        v2 = await asyncio.wait_for(waiter, 1)
        return v1, v2, wm.error

    v1, v2, err = asyncio.run(run())
    assert v2 > v1 and str(err) == "store gone"


def test_advance_outside_partition_is_an_error():
    async def run() -> None:
        Watermarks([8], [4]).advance(0, 9)

    with pytest.raises(ValueError, match="outside partition 0"):
        asyncio.run(run())
