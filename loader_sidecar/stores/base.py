"""The one interface every model store implements.

A store answers two questions about a file of a checkpoint: how big is it (`size`, None when
absent) and what are its bytes in [start, end) (`read`, an async stream of chunks). Retrying,
resuming, parallelism and verification live in fetch.py, once, for every store kind; a store
only translates its client's errors into the sidecar's tree (errors.py):

    absent -> size() returns None, read() raises NotFound
    refused -> AccessDenied          transient (5xx, reset, refused, cut) -> StoreUnavailable
    no bytes within the timeout -> Stalled
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator

from loader_sidecar.errors import CorruptData, NotFound
from loader_sidecar.refs import ModelRef, StoreRoot

READ_CHUNK = 1 << 20


class Store(abc.ABC):
    """Reads the files of checkpoints under one configured store root."""

    def __init__(self, root: StoreRoot) -> None:
        self.root = root

    @abc.abstractmethod
    def location(self, ref: ModelRef, file: str) -> str:
        """Where the file lives, for messages (a URL or a path; never credentials)."""

    @abc.abstractmethod
    async def size(self, ref: ModelRef, file: str) -> int | None:
        """The file's size in bytes, or None when the store does not have it."""

    @abc.abstractmethod
    def read(self, ref: ModelRef, file: str, start: int, end: int) -> AsyncIterator[bytes]:
        """The bytes [start, end) of the file, in chunks; at most end - start bytes in total."""

    async def aclose(self) -> None:
        """Release connections (default: nothing to release)."""
        return None

    async def read_all(self, ref: ModelRef, file: str, limit: int) -> bytes:
        """A small file (index, config, tokenizer) in one piece; refuses files over `limit` bytes."""
        size = await self.size(ref, file)
        if size is None:
            raise NotFound(f"{self.location(ref, file)}: not found")
        if size > limit:
            raise CorruptData(f"{self.location(ref, file)}: {size} bytes, more than the {limit}-byte limit "
                              "for a metadata file")
        parts = [chunk async for chunk in self.read(ref, file, 0, size)]
        data = b"".join(parts)
        if len(data) != size:
            raise CorruptData(f"{self.location(ref, file)}: got {len(data)} bytes, expected {size}")
        return data
