"""bench/_common.py's Periodic: the thread behind the benchmarks' samplers and the DRAM evictor."""

from __future__ import annotations

import time

from bench._common import Periodic


class Counter(Periodic):
    def __init__(self, interval: float) -> None:
        super().__init__(interval, "counter")
        self.ticks = 0

    def tick(self) -> None:
        self.ticks += 1


def test_periodic_ticks_while_its_block_runs_and_stops_after() -> None:
    with Counter(0.01) as c:
        assert isinstance(c, Counter)
        deadline = time.monotonic() + 10
        while c.ticks < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert c.ticks >= 5
    after = c.ticks
    time.sleep(0.1)
    assert c.ticks == after  # the thread is joined: no tick once the block has ended
    assert not c._thread.is_alive()


def test_periodic_does_not_tick_before_its_first_interval() -> None:
    with Counter(60) as c:
        time.sleep(0.05)
    assert c.ticks == 0
