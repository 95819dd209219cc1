"""A loader sidecar (the real gRPC server) running on an event loop thread in this process."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar

from loader_sidecar.config import Config
from loader_sidecar.node import Node
from loader_sidecar.server import Sidecar

T = TypeVar("T")

_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_LOCK = threading.Lock()


def shared_loop() -> asyncio.AbstractEventLoop:
    """One event loop thread for every in-process sidecar: grpc.aio binds its completion queue
    to the first loop that uses it, so a second loop in the same process would never be woken."""
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None:
            _LOOP = asyncio.new_event_loop()
            threading.Thread(target=_LOOP.run_forever, daemon=True, name="sidecar-loop").start()
        return _LOOP


class SidecarThread:
    """A sidecar (the real gRPC server) on the process's sidecar loop thread (see shared_loop)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.loop = shared_loop()
        self.sidecar: Sidecar | None = None
        self.address = ""

    def start(self) -> SidecarThread:
        async def make() -> str:
            self.sidecar = Sidecar(self.config)  # built on the loop: its asyncio objects belong there
            return await self.sidecar.start()

        self.address = self.call(make())
        return self

    @property
    def node(self) -> Node:
        assert self.sidecar is not None
        return self.sidecar.node

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        """Run a coroutine on the sidecar's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self.sidecar is not None:
            self.call(self.sidecar.stop(grace=0.2), timeout=30)
            self.sidecar = None

    def __enter__(self) -> SidecarThread:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
