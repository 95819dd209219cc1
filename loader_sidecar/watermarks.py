"""Per-partition watermarks: how many leading bytes of each partition are filled and verified.

A fill marks checksum blocks as they are verified, in any order (several connections work on
different ranges); the watermark of a partition is the end of its longest run of verified
blocks from the start. A reader (the instance's copy to its device) may use every byte below
the watermark, so the next hop starts before this one ends. `prefix_end` is the pure part.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence


def prefix_end(done: Sequence[bool], block_size: int, size: int) -> int:
    """Bytes covered by the leading run of done blocks (the last block may be short)."""
    n = 0
    for d in done:
        if not d:
            break
        n += 1
    return min(size, n * block_size)


class Watermarks:
    """Watermarks of one fill, awaitable from the event loop; `version` grows on every change."""

    def __init__(self, sizes: Sequence[int], block_sizes: Sequence[int]) -> None:
        self.sizes = list(sizes)
        self.block_sizes = list(block_sizes)
        self.filled = [0] * len(self.sizes)
        self._done = [[False] * -(-s // b) if s else [] for s, b in zip(self.sizes, self.block_sizes, strict=True)]
        self.error: BaseException | None = None
        self.version = 0
        self._event = asyncio.Event()

    @classmethod
    def complete_for(cls, sizes: Sequence[int], block_sizes: Sequence[int]) -> Watermarks:
        w = cls(sizes, block_sizes)
        for i, s in enumerate(w.sizes):
            w.advance(i, s)
        return w

    @property
    def complete(self) -> bool:
        return self.filled == self.sizes

    @property
    def total(self) -> int:
        return sum(self.filled)

    def mark_block(self, partition: int, block: int) -> None:
        """Block `block` of `partition` is filled and verified."""
        done = self._done[partition]
        done[block] = True
        end = prefix_end(done, self.block_sizes[partition], self.sizes[partition])
        if end != self.filled[partition]:
            self.filled[partition] = end
            self._changed()

    def advance(self, partition: int, end: int) -> None:
        """Everything below `end` of `partition` is filled and verified (sequential fills)."""
        if not 0 <= end <= self.sizes[partition]:
            raise ValueError(f"watermark {end} outside partition {partition} of {self.sizes[partition]} bytes")
        if end > self.filled[partition]:
            bs = self.block_sizes[partition]
            done = self._done[partition]
            for b in range(min(len(done), end // bs + (1 if end == self.sizes[partition] else 0))):
                done[b] = True
            self.filled[partition] = end
            self._changed()

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        self._changed()

    def _changed(self) -> None:
        self.version += 1
        self._event.set()
        self._event = asyncio.Event()

    async def wait_newer(self, version: int) -> int:
        """Wait until `self.version > version` (returns at once if it already is)."""
        while self.version <= version:
            await self._event.wait()
        return self.version
