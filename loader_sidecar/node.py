"""The sidecar's core: one node's tiers, fetcher, leases, profile and inventory, behind a small API.

server.py adapts this to gRPC; tests drive it the same way. Everything runs on one event loop,
so the bookkeeping (tiers, leases, fills) needs no locks: each decision and the pin that
protects it happen in one synchronous step, between awaits.
"""

from __future__ import annotations

import asyncio
import time

from loader_sidecar import inventory, refs
from loader_sidecar.config import Config
from loader_sidecar.fetch import Fetcher
from loader_sidecar.leases import Lease, LeaseTable, check_instance, parse_device
from loader_sidecar.metrics import LoaderMetrics
from loader_sidecar.profile import Profile
from loader_sidecar.tiers import Entry, TierStore
from sllm_knative.loader import loader_pb2 as pb
from sllm_knative.loader.errors import BadRequest, NotFound
from sllm_knative.log import get_logger

TIERS = ("ssd", "dram")


def parse_tier(text: str, *, allow_all: bool = False) -> str:
    if text in TIERS or (allow_all and text == ""):
        return text
    choices = "'ssd', 'dram'" + (" or '' (both)" if allow_all else "")
    raise BadRequest(f"tier {text!r}: expected {choices}")


class Node:
    def __init__(self, config: Config, metrics: LoaderMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or LoaderMetrics()
        self.log = get_logger("loader_sidecar", node=config.node)
        self.notifier = inventory.Notifier()
        self.profile = Profile()
        self.ssd = TierStore("ssd", config.ssd_dir, config.ssd_bytes, on_change=self._changed, on_evict=self._evicted)
        self.dram = TierStore("dram", config.dram_dir, config.dram_bytes, on_change=self._changed,
                         on_evict=self._evicted)
        self.leases = LeaseTable()
        self.fetcher = Fetcher(config, self.ssd, self.dram, self.profile, self.metrics,
                               on_progress=self.notifier.bump_throttled)
        self._gpus = inventory.gpu_count(inventory.devices())
        self._background: set[asyncio.Task[str]] = set()
        for t in (self.ssd, self.dram):
            self.metrics.tier_capacity.labels(t.name).set(t.budget)

    async def start(self) -> None:
        """Rebuild the tiers from disk (dropping anything unverified), then measure bandwidths."""
        dropped = self.ssd.recover() + self.dram.recover()
        self.log.info("tiers recovered", ssd_entries=len(self.ssd.entries), dram_entries=len(self.dram.entries),
                      dropped=len(dropped))
        await asyncio.to_thread(self.profile.measure_start, self.config.ssd_dir, self.config.dram_dir,
                                self.config.profile_bytes, self.config.read_threads)
        self.notifier.bump()

    async def aclose(self) -> None:
        self.leases.release_all()
        for t in list(self._background):
            t.cancel()
        await self.fetcher.aclose()

    def _changed(self) -> None:
        for t in (self.ssd, self.dram):
            self.metrics.tier_bytes.labels(t.name).set(t.used)
            self.metrics.tier_entries.labels(t.name).set(len(t.entries))
        self.metrics.leases.set(len(self.leases.leases))
        self.notifier.bump()

    def _evicted(self, tier: str, entry: Entry) -> None:
        self.metrics.evictions.labels(tier).inc()

    def resolve(self, model: str) -> refs.ModelRef:
        return refs.resolve(model, self.config.stores)

    # -- API -----------------------------------------------------------------------------------

    async def acquire(self, model: str, device: str = "cpu", instance: str = "") -> Lease:
        """Lease model in the DRAM tier; returns once its files exist (they may still be filling)."""
        ref = self.resolve(model)
        dev = parse_device(device, self._gpus)
        check_instance(instance)
        fill = self.fetcher.fill_dram(ref)
        hold = fill.hold()
        try:
            await asyncio.shield(fill.layout)
        except BaseException:
            hold.release()
            raise
        lease = self.leases.add(ref, dev, instance, fill, hold)
        self.log.info("lease granted", checkpoint=ref.uri, lease=lease.id, device=dev, instance=instance or None,
                      source=fill.layout.result().source)
        self._changed()
        return lease

    def release(self, lease_id: str) -> Lease:
        lease = self.leases.release(lease_id)
        self.log.info("lease released", checkpoint=lease.ref.uri, lease=lease.id, instance=lease.instance or None)
        self._changed()
        return lease

    async def prefetch(self, model: str, tier: str = "dram", wait: bool = True) -> str:
        """Warm a tier; returns where the bytes came from ("started" when not waiting)."""
        ref = self.resolve(model)
        tier = parse_tier(tier or "dram")

        async def run() -> str:
            if tier == "ssd":
                return await self.fetcher.fill_ssd(ref)
            fill = self.fetcher.fill_dram(ref)
            await asyncio.shield(fill.done)
            return fill.layout.result().source

        if wait:
            return await run()
        task = asyncio.create_task(run(), name=f"prefetch {ref.uri}")
        self._background.add(task)
        task.add_done_callback(self._background_done)
        return "started"

    def _background_done(self, task: asyncio.Task[str]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.warning("prefetch failed", task=task.get_name(), error=str(task.exception()))

    def evict(self, model: str, tier: str = "") -> tuple[list[str], int]:
        """Evict model from one tier or both; refused (InUse) while leased, read or filling."""
        ref = self.resolve(model)
        tier = parse_tier(tier, allow_all=True)
        tiers = [t for t in (self.ssd, self.dram) if tier in ("", t.name) and ref.key in t.entries]
        if not tiers:
            raise NotFound(f"{ref.uri} is not in the {tier or 'ssd or dram'} tier")
        evicted, nbytes = [], 0
        for t in tiers:
            nbytes += t.evict(ref.key).size
            evicted.append(t.name)
        self.log.info("evicted on request", checkpoint=ref.uri, tiers=",".join(evicted), bytes=nbytes)
        return evicted, nbytes

    def inventory(self) -> pb.Inventory:
        return inventory.build(self.config.node, self.notifier.version, [self.ssd, self.dram], self.profile,
                               inventory.devices(), self.leases.leases.values(),
                               [s.uri for s in self.config.stores], time.time())
