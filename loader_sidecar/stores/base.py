"""The one interface every model store implements.

A store answers two questions about a file of a checkpoint: how big is it (`size`, None when
absent) and what are its bytes in [start, end) (`read`, an async stream of chunks). Retrying,
resuming, parallelism and verification live in fetch.py, once, for every store kind; a store
only translates its client's errors into the sidecar's tree (errors.py):

    absent -> size() returns None, read() raises NotFound
    refused -> AccessDenied          transient (5xx, reset, refused, cut) -> StoreUnavailable
    no bytes within the timeout -> Stalled

A store may also offer a blocking reader (`blocking_reader()`): the same bytes handed to a
callback from a worker thread, for stores whose client can receive into a reused buffer. The
fetcher prefers it for bulk ranges, so several connections' bytes move on several cores instead
of through the event loop; it falls back to `read` when a store has none.
"""

from __future__ import annotations

import abc
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Protocol

from loader_sidecar.refs import ModelRef, StoreRoot
from sllm_knative.loader.errors import CorruptData, NotFound

READ_CHUNK = 1 << 20

Sink = Callable[[memoryview], None]


class Cancel:
    """Stops a blocking read from another thread: sets a flag the reader checks between requests
    and runs the hook the reader installed (closing its connection, so a read blocked in the
    kernel returns at once instead of after the timeout)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled = False
        self._hook: Callable[[], None] | None = None

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            hook = self._hook
        if hook is not None:
            hook()

    @contextlib.contextmanager
    def hooked(self, hook: Callable[[], None]) -> Iterator[None]:
        """Inside the block, cancel() calls hook (at once when already cancelled)."""
        with self._lock:
            self._hook = hook
            cancelled = self._cancelled
        if cancelled:
            hook()
        try:
            yield
        finally:
            with self._lock:
                self._hook = None


class BlockingRead(Protocol):
    def __call__(self, ref: ModelRef, file: str, start: int, end: int, sink: Sink, cancel: Cancel) -> None:
        """In a worker thread: the bytes [start, end) handed to `sink` in order as they arrive, each a
        view of a reused buffer that is valid during the call only (write or copy it); at most
        end - start bytes in total (fewer when the response ends early). Store errors as `read`
        raises them; whatever `sink` raises passes through untouched."""


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

    def blocking_reader(self) -> BlockingRead | None:
        """The blocking reader the fetcher prefers for bulk ranges, or None (use `read`)."""
        return None

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
