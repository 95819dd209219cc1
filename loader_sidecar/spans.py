"""The remote transfer's bookkeeping: spans of whole checksum blocks, and the writer that puts a
span's bytes at their offsets and checks each block's crc32c as it completes.

A remote fetch cuts each partition into spans (`plan_spans`), one range request each; a
`SpanWriter` follows one span's download so a broken request resumes where it stopped, and a
block whose checksum does not match (`BadBlock`) is fetched again from its first byte. Used by
`loader_sidecar.fetch`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from cuda_ext import _C
from sllm_knative.loader.errors import CorruptData, DiskError


@dataclasses.dataclass(frozen=True)
class Span:
    """Bytes [start, end) of target `target`, a whole number of its blocks (the last may be short)."""

    target: int
    start: int
    end: int


def plan_spans(sizes: Sequence[int], block_sizes: Sequence[int], chunk_bytes: int) -> list[Span]:
    """Range requests for files of `sizes`: in file order, each a multiple of the file's block size."""
    spans = []
    for t, (size, bs) in enumerate(zip(sizes, block_sizes, strict=True)):
        unit = max(1, chunk_bytes // bs) * bs
        spans += [Span(t, s, min(s + unit, size)) for s in range(0, size, unit)]
    return spans


@dataclasses.dataclass
class Target:
    """One file being downloaded: where its bytes go and how its blocks are checked."""

    name: str
    size: int
    block_size: int
    checksums: tuple[int, ...] | None
    fds: list[int]
    on_block: Callable[[int], None]


class BadBlock(Exception):
    def __init__(self, block: int, offset: int, expected: int, actual: int) -> None:
        super().__init__(block, offset, expected, actual)
        self.block, self.offset, self.expected, self.actual = block, offset, expected, actual


def create_file(path: Path, size: int) -> int:
    """Create `path` (it must not exist) at its final size; return a read-write descriptor."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def pwrite_all(fd: int, data: bytes | memoryview, offset: int, name: str) -> None:
    """All of `data` at `offset`; a failure is a DiskError naming the file and the offset."""
    try:
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n
    except OSError as exc:
        raise DiskError(f"writing {name} at offset {offset}: {exc.strerror or exc}") from exc


class SpanWriter:
    """Where one span's download stands. `write` puts bytes at their offsets in every file of the
    target and checks each block as it completes (then `on_block(block)`); after a failure, `pos`
    is where to resume (the running crc covers [block start, pos)). Used by one thread at a time:
    the event loop's, or the worker thread of the request in progress."""

    def __init__(self, t: Target, span: Span, on_block: Callable[[int], None], where: str) -> None:
        self.target = t
        self.where = where
        self.end = span.end
        self.on_block = on_block
        self.pos = span.start
        self.block = span.start // t.block_size
        self.crc = 0

    def write(self, data: bytes | memoryview) -> None:
        t, bs = self.target, self.target.block_size
        if len(data) > self.end - self.pos:
            raise CorruptData(f"{self.where} at offset {self.pos}: the store sent more bytes than asked for")
        for fd in t.fds:
            pwrite_all(fd, data, self.pos, t.name)
        view = memoryview(data)
        while view:
            block_end = min((self.block + 1) * bs, t.size)
            take = min(len(view), block_end - self.pos)
            if t.checksums is not None:
                self.crc = _C.crc32c(view[:take], self.crc)
            self.pos += take
            view = view[take:]
            if self.pos == block_end:
                if t.checksums is not None and self.crc != t.checksums[self.block]:
                    raise BadBlock(self.block, self.block * bs, t.checksums[self.block], self.crc)
                self.on_block(self.block)
                self.block, self.crc = self.block + 1, 0

    def restart_block(self) -> None:
        """Fetch the current block again from its first byte (after a checksum mismatch)."""
        self.pos, self.crc = self.block * self.target.block_size, 0
