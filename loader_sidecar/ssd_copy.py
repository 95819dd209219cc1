"""SSD -> DRAM: the extension's direct reads (many threads, O_DIRECT) into a pre-faulted staging
buffer, every block verified there, then the segment written to the tmpfs file (faster than
faulting in a shared mapping page by page, and only verified bytes ever reach the DRAM tier).
SEGMENTS_IN_FLIGHT segments are in flight; the watermark moves in order. Used by
`loader_sidecar.fetch.Fetcher` for every SSD hit and after a plain-HF import.
"""

from __future__ import annotations

import asyncio
import collections
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cuda_ext import _C
from loader_sidecar.aio import in_thread
from loader_sidecar.config import Config
from loader_sidecar.fills import Fill, Layout
from loader_sidecar.metrics import LoaderMetrics
from loader_sidecar.profile import Profile
from loader_sidecar.refs import ModelRef
from loader_sidecar.spans import create_file, pwrite_all
from loader_sidecar.tiers import Entry, TierStore
from loader_sidecar.watermarks import Watermarks
from sllm_knative import format as fmt
from sllm_knative.loader.errors import CorruptData, DiskError
from sllm_knative.log import get_logger

SEGMENTS_IN_FLIGHT = 4  # x fill_segment_bytes staged: keeps ~16 direct reads of 16 MiB in flight
STAGING_POOL = 4
_log = get_logger("loader_sidecar.fetch")


class _Staging:
    """A page-aligned, pre-faulted host buffer for SSD -> DRAM copies (reused across fills)."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self._raw = np.ones(nbytes + fmt.PAGE, dtype=np.uint8)  # ones, not zeros: pages faulted in now
        pad = (-self._raw.ctypes.data) % fmt.PAGE
        self.addr = self._raw.ctypes.data + pad
        self.view = memoryview(self._raw.data)[pad: pad + nbytes]


class SsdToDram:
    """Copies verified SSD entries into the DRAM tier, reusing its staging buffers across fills."""

    def __init__(self, config: Config, ssd: TierStore, dram: TierStore, profile: Profile, metrics: LoaderMetrics,
                 on_progress: Callable[[], None]) -> None:
        self.config = config
        self.ssd = ssd
        self.dram = dram
        self.profile = profile
        self.metrics = metrics
        self._on_progress = on_progress
        self._staging_pool: list[_Staging] = []

    async def fill(self, ref: ModelRef, fill: Fill) -> None:
        """Fill `fill` (the DRAM tier's entry for ref) from the SSD copy; a corrupt copy is dropped."""
        key = ref.key
        src_entry = self.ssd.entries[key]
        self.ssd.add_reader(key, 1)
        self.ssd.touch(key)
        reserved = False
        try:
            src = self.ssd.path(key)
            try:
                index = fmt.read_index(src)
            except (fmt.FormatError, OSError) as exc:
                raise CorruptData(f"SSD copy of {ref.uri}: {exc}") from exc
            files = dict(src_entry.files)
            fill.attach(await self.dram.reserve_when_free(key, ref.uri, sum(files.values()), self.config.timeout_s,
                                                          self.config.lease_wait_s))
            reserved = True
            dst = self.dram.path(key)
            dst.mkdir(parents=True, exist_ok=True)
            partition_names = {p.file for p in index.partitions}
            for name in files:
                if name not in partition_names:
                    shutil.copyfile(src / name, dst / name)
            for p in index.partitions:
                os.close(create_file(dst / p.file, p.size))
            parts = index.partitions
            wm = Watermarks([p.size for p in parts], [p.block_size for p in parts])
            fill.ready(Layout(dst, index, files, "ssd"), wm)
            self.metrics.fetches.labels("ssd_to_dram").inc()
            t0 = time.perf_counter()
            for i, p in enumerate(parts):
                await self._copy_partition(src / p.file, dst / p.file, p, i, wm, key)
            seconds = time.perf_counter() - t0
            self.profile.observe("disk_read", index.total_bytes, seconds)
            self.metrics.transfer("ssd_to_dram", index.total_bytes, seconds)
            _log.info("filled from ssd", checkpoint=ref.uri, bytes=index.total_bytes, seconds=round(seconds, 3))
            self.dram.publish(key, dst, files)
            fill.finish()
        except BaseException as exc:
            if reserved:
                self.dram.abort(key)
            if isinstance(exc, CorruptData | fmt.ChecksumError):
                self._drop_corrupt_ssd(key, src_entry)
            if isinstance(exc, fmt.ChecksumError):
                raise CorruptData(f"SSD copy of {ref.uri} failed verification and was dropped: {exc}") from exc
            raise
        finally:
            if self.ssd.entries.get(key) is src_entry:
                self.ssd.add_reader(key, -1)

    def _drop_corrupt_ssd(self, key: str, entry: Entry) -> None:
        """Evict an SSD copy that failed verification, unless someone else is reading it too."""
        if self.ssd.entries.get(key) is entry and entry.readers <= 1 and entry.leases == 0:
            entry.readers = 0
            self.ssd.evict(key)
            _log.warning("dropped a corrupt SSD copy", checkpoint=entry.model)

    def _staging(self, nbytes: int) -> _Staging:
        for i, buf in enumerate(self._staging_pool):
            if buf.nbytes >= nbytes:
                return self._staging_pool.pop(i)
        return _Staging(nbytes)

    def _unstage(self, buf: _Staging) -> None:
        if len(self._staging_pool) < STAGING_POOL:
            self._staging_pool.append(buf)

    async def _copy_partition(self, src: Path, dst: Path, p: fmt.Partition, i: int, wm: Watermarks,
                              key: str) -> None:
        """SSD -> DRAM for one partition: direct reads into a staging buffer, verified there, then
        written to the tmpfs file; SEGMENTS_IN_FLIGHT segments at once, the watermark in order."""
        if p.size == 0:
            return
        bs = p.block_size
        chunk = min(16 << 20, bs)
        if bs % chunk:
            chunk = fmt.PAGE
        segment = max(bs, self.config.fill_segment_bytes // bs * bs)
        cancel = _C.CancelToken()
        fd = os.open(dst, os.O_WRONLY | os.O_CLOEXEC)
        buffers = [self._staging(min(segment, p.size)) for _ in range(SEGMENTS_IN_FLIGHT)]

        def copy(off: int, n: int, buf: _Staging) -> None:  # in a worker thread
            first, last = off // bs, -(-(off + n) // bs)
            try:
                _C.read_to_host(str(src), off, buf.addr, n, chunk, self.config.read_threads, True, bs,
                                list(p.checksums[first:last]), cancel)
            except fmt.ChecksumError as exc:
                raise fmt.ChecksumError(str(src), exc.block + first, exc.offset, exc.expected, exc.actual) from None
            except OSError as exc:
                raise DiskError(f"reading {src} at offset {off}: {exc.strerror or exc}") from exc
            pwrite_all(fd, buf.view[:n], off, dst.name)  # only verified bytes reach the DRAM tier

        offsets = iter(range(0, p.size, segment))
        pending: collections.deque[tuple[int, _Staging, asyncio.Future[None]]] = collections.deque()
        free = list(buffers)
        try:
            while True:
                while free and (off := next(offsets, None)) is not None:
                    buf = free.pop()
                    n = min(segment, p.size - off)
                    pending.append((off + n, buf, asyncio.ensure_future(in_thread(copy, off, n, buf, cancel=cancel))))
                if not pending:
                    break
                end, buf, task = pending[0]
                await task
                pending.popleft()
                free.append(buf)
                wm.advance(i, end)
                self.dram.progress(key, wm.total)
                self._on_progress()
        finally:
            for _, _, t in pending:
                t.cancel()
            await asyncio.gather(*(t for _, _, t in pending), return_exceptions=True)  # threads stopped
            os.close(fd)
            for buf in buffers:
                self._unstage(buf)
