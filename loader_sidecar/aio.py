"""Event-loop helpers for the fills: run blocking work in threads that are stopped, not abandoned,
when the caller is cancelled; run coroutines together and fail on the first error."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


async def all_or_first_error(coros: Sequence[Awaitable[None]]) -> None:
    """Run coroutines concurrently; on the first failure cancel the rest and raise it."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for t in tasks:
        if t in done and not t.cancelled() and t.exception() is not None:
            raise t.exception()  # type: ignore[misc]


async def in_thread(fn: Callable[..., T], *args: Any, cancel: Any = None,
                     executor: concurrent.futures.Executor | None = None) -> T:
    """Run fn in a worker thread (of `executor`, else the loop's default); on cancellation, stop it
    (CancelToken or Cancel) and wait before unwinding, so memory or files it writes into (a mapping,
    a descriptor) are never released under it."""
    if executor is None:
        fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    else:
        fut = asyncio.ensure_future(asyncio.get_running_loop().run_in_executor(executor, functools.partial(fn, *args)))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        if cancel is not None:
            cancel.cancel()
        with contextlib.suppress(BaseException):
            await fut
        raise
