"""A DRAM-tier fill as its waiters see it: the layout (once known), the watermarks, the outcome.

`Fill` is shared by every acquire of one checkpoint (single flight). A lease pins the DRAM
entry through a `Hold` taken synchronously when it joins the fill, before any await, so no
eviction can slip between "the fill finished" and "the lease counts": if the entry does not
exist yet, the hold is pending and is attached by the fill at the moment it reserves room.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from loader_sidecar.refs import ModelRef
from loader_sidecar.tiers import Entry, TierStore
from loader_sidecar.watermarks import Watermarks
from sllm_knative import format as fmt


@dataclasses.dataclass(frozen=True)
class Layout:
    """What an instance needs to map or copy a checkpoint from the DRAM tier."""

    directory: Path
    index: fmt.Index
    files: dict[str, int]
    source: str  # the tier the bytes come from: "dram" (hit), "ssd" or "remote"


class Hold:
    """One lease's pin on a fill's DRAM entry; `release` is idempotent."""

    def __init__(self, fill: Fill) -> None:
        self._fill = fill
        self.entry: Entry | None = None
        self.released = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        fill = self._fill
        if self.entry is None:
            if self in fill.pending:
                fill.pending.remove(self)
            return
        if fill.tier.entries.get(fill.ref.key) is self.entry:  # not a newer entry of the same key
            fill.tier.add_lease(fill.ref.key, -1)


class Fill:
    def __init__(self, ref: ModelRef, tier: TierStore) -> None:
        self.ref = ref
        self.tier = tier
        loop = asyncio.get_running_loop()
        self.layout: asyncio.Future[Layout] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self.watermarks: Watermarks | None = None
        self.entry: Entry | None = None
        self.pending: list[Hold] = []
        self.task: asyncio.Task[None] | None = None

    @classmethod
    def completed(cls, ref: ModelRef, tier: TierStore, entry: Entry, layout: Layout) -> Fill:
        fill = cls(ref, tier)
        fill.entry = entry
        parts = layout.index.partitions
        fill.watermarks = Watermarks.complete_for([p.size for p in parts], [p.block_size for p in parts])
        fill.layout.set_result(layout)
        fill.done.set_result(None)
        return fill

    def hold(self) -> Hold:
        """Pin the DRAM entry for a lease (now if it exists, else as soon as it is reserved)."""
        h = Hold(self)
        if self.entry is not None and self.tier.entries.get(self.ref.key) is self.entry:
            h.entry = self.entry
            self.tier.add_lease(self.ref.key, 1)
        else:
            self.pending.append(h)
        return h

    def attach(self, entry: Entry) -> None:
        """Called by the fill right after it reserved the entry: pending holds now count."""
        self.entry = entry
        for h in self.pending:
            h.entry = entry
            entry.leases += 1
        self.pending.clear()

    def ready(self, layout: Layout, watermarks: Watermarks) -> None:
        self.watermarks = watermarks
        self.layout.set_result(layout)

    def finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def fail(self, exc: BaseException) -> None:
        for fut in (self.layout, self.done):
            if fut.done():
                continue
            if isinstance(exc, asyncio.CancelledError):
                fut.cancel()
            else:
                fut.set_exception(exc)
                fut.exception()  # retrieved: waiters get it; nobody waiting is not an error
        if self.watermarks is not None and self.watermarks.error is None:
            self.watermarks.fail(exc)
