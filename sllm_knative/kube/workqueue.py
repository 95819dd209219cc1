"""A work queue of object keys, as controllers use it (client-go's `workqueue`, small).

- A key is queued at most once, however many times it is added while it waits.
- A key is handed to one worker at a time: added while a worker holds it, it is queued again
  when that worker calls `done` (so the latest state is always reconciled, never twice at once).
- `retry` re-adds a key after a per-key exponential backoff (`backoff_s`); `forget` resets it
  after a success. `add_after` re-adds after a fixed delay (a requeue the reconciler asked for).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable


def backoff_s(failures: int, base_s: float = 0.05, cap_s: float = 30.0) -> float:
    """The delay before retry number `failures` (1, 2, ...): base * 2^(failures-1), capped."""
    if failures <= 0:
        return 0.0
    return min(cap_s, base_s * (2 ** min(failures - 1, 32)))


class ShutDown(Exception):
    """The queue was shut down; workers should return."""


class WorkQueue:
    def __init__(self, clock: Callable[[], float] = time.monotonic, base_s: float = 0.05,
                 cap_s: float = 30.0) -> None:
        self._clock = clock
        self._base_s, self._cap_s = base_s, cap_s
        self._cond = threading.Condition()
        self._queue: deque[Hashable] = deque()  # FIFO of keys ready now
        self._queued: set[Hashable] = set()  # keys in _queue, or dirty while processing
        self._processing: set[Hashable] = set()
        self._delayed: list[tuple[float, int, Hashable]] = []  # (due, seq, key) heap
        self._seq = itertools.count()
        self._failures: dict[Hashable, int] = {}
        self._shutdown = False

    def add(self, key: Hashable) -> None:
        with self._cond:
            self._add_locked(key)

    def _add_locked(self, key: Hashable) -> None:
        if self._shutdown or key in self._queued:
            return
        self._queued.add(key)
        if key not in self._processing:
            self._queue.append(key)
            self._cond.notify()

    def add_after(self, key: Hashable, delay_s: float) -> None:
        if delay_s <= 0:
            self.add(key)
            return
        with self._cond:
            heapq.heappush(self._delayed, (self._clock() + delay_s, next(self._seq), key))
            self._cond.notify()

    def retry(self, key: Hashable) -> float:
        """Re-add `key` after its next backoff; returns that delay."""
        with self._cond:
            n = self._failures[key] = self._failures.get(key, 0) + 1
        delay = backoff_s(n, self._base_s, self._cap_s)
        self.add_after(key, delay)
        return delay

    def failures(self, key: Hashable) -> int:
        with self._cond:
            return self._failures.get(key, 0)

    def forget(self, key: Hashable) -> None:
        with self._cond:
            self._failures.pop(key, None)

    def _promote_due_locked(self) -> float | None:
        """Move due delayed keys into the queue; the seconds until the next one is due."""
        now = self._clock()
        while self._delayed and self._delayed[0][0] <= now:
            _, _, key = heapq.heappop(self._delayed)
            self._add_locked(key)
        return self._delayed[0][0] - now if self._delayed else None

    def get(self, timeout_s: float | None = None) -> Hashable:
        """The next key to process (blocks). Raises ShutDown, or TimeoutError after `timeout_s`."""
        deadline = None if timeout_s is None else self._clock() + timeout_s
        with self._cond:
            while True:
                wait = self._promote_due_locked()
                if self._queue:
                    key = self._queue.popleft()
                    self._queued.discard(key)
                    self._processing.add(key)
                    return key
                if self._shutdown:
                    raise ShutDown()
                if deadline is not None:
                    left = deadline - self._clock()
                    if left <= 0:
                        raise TimeoutError()
                    wait = left if wait is None else min(wait, left)
                self._cond.wait(wait)

    def done(self, key: Hashable) -> None:
        with self._cond:
            self._processing.discard(key)
            if key in self._queued:  # added again while it was being processed
                self._queue.append(key)
                self._cond.notify()

    def shut_down(self) -> None:
        with self._cond:
            self._shutdown = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._queue)
