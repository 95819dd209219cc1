"""Moving checkpoints into the tiers: remote -> SSD (and DRAM at once), SSD -> DRAM.

One flight per checkpoint and hop: `Fetcher.fill_dram(ref)` and `Fetcher.fill_ssd(ref)` return or join
the fill already under way. A remote fetch of a loading-optimized checkpoint cuts its
partitions into spans of whole checksum blocks and hands them, in order, to `connections`
workers; each span is one range request that resumes where it broke (cut connection, 5xx,
stall) up to `retries` times. When the store has a blocking reader (HTTP), each request runs in
a worker thread that writes and checks the bytes as they arrive (`SpanWriter`), so the
connections use every core; other stores stream through the event loop into the same writer
(the spans and their writer: `loader_sidecar.spans`).
Every block's crc32c is computed as its bytes stream in and compared with the index before the
block counts: the watermark covers verified bytes only.
When an instance is waiting, the bytes go straight to the DRAM tier and the SSD copy is made
from the verified DRAM copy right after (kernel copy, off the instance's path); otherwise they
go straight to SSD staging. Either way a cold remote load costs one transfer, not three in a row.

A store holding a plain Hugging Face checkpoint, or a GGUF file (`model.gguf`, which brings
its own config and tokenizer), is downloaded once to SSD staging and converted there
(which files to fetch and the conversion: `loader_sidecar.plain_import`), then filled into DRAM
from SSD like any SSD hit.
SSD -> DRAM fills are `loader_sidecar.ssd_copy` (direct reads into a staging buffer, verified
there, then written to the tmpfs file).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

from loader_sidecar.aio import all_or_first_error, in_thread
from loader_sidecar.config import Config
from loader_sidecar.fills import Fill, Layout
from loader_sidecar.metrics import LoaderMetrics
from loader_sidecar.plain_import import (
    GGUF_FILE,
    HF_SINGLE_WEIGHTS,
    HF_WEIGHT_INDEXES,
    convert_on_node,
    gguf_output_bytes,
    weight_files,
)
from loader_sidecar.profile import Profile
from loader_sidecar.refs import ModelRef
from loader_sidecar.spans import BadBlock, Span, SpanWriter, Target, create_file, plan_spans
from loader_sidecar.ssd_copy import SsdToDram
from loader_sidecar.stores import Store, open_store
from loader_sidecar.stores.base import BlockingRead, Cancel
from loader_sidecar.tiers import TierStore
from loader_sidecar.watermarks import Watermarks
from sllm_knative import format as fmt
from sllm_knative import loading  # noqa: F401  (installs the extension's error types)
from sllm_knative.loader.errors import (
    CorruptData,
    DiskError,
    LoaderError,
    NotFound,
    StoreUnavailable,
    TierFull,
)
from sllm_knative.log import get_logger

# Small files that travel with the weights; probed by name so every store kind (even plain
# HTTP, which cannot list a directory) finds the same set.
AUX_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
             "chat_template.jinja", "chat_template.json", "preprocessor_config.json")
MAX_META_BYTES = 64 << 20
CORRUPT_RETRIES = 1
MAX_FAILURES = 64  # failed checkpoints remembered (oldest forgotten first)
TRANSFER_THREADS = 64  # range requests in worker threads, all fills together (threads start as needed)

T = TypeVar("T")
_log = get_logger("loader_sidecar.fetch")


@dataclasses.dataclass(frozen=True)
class Failure:
    """The last failed fill of a checkpoint (kept until a later fill of it succeeds)."""

    kind: str  # the error class: NotFound, StoreUnavailable, TierFull, ...
    message: str
    time: float


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)


def _fsync_all(paths: Sequence[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Fetcher:
    """Fills the SSD and DRAM tiers of one node; every method runs on the event loop."""

    def __init__(self, config: Config, ssd: TierStore, dram: TierStore, profile: Profile, metrics: LoaderMetrics,
                 on_progress: Callable[[], None]) -> None:
        self.config = config
        self.ssd = ssd
        self.dram = dram
        self.profile = profile
        self.metrics = metrics
        self._on_progress = on_progress
        self._stores: dict[str, Store] = {}
        self._fills: dict[str, Fill] = {}
        self._ssd_jobs: dict[str, asyncio.Task[None]] = {}
        self._job_refs: dict[str, ModelRef] = {}  # key -> ref of each _ssd_jobs entry
        # model URI -> its last failed fill, while no later fill of it succeeded (NodeCache's DownloadError)
        self.failures: collections.OrderedDict[str, Failure] = collections.OrderedDict()
        self._ssd_to_dram = SsdToDram(config, ssd, dram, profile, metrics, on_progress)
        self._transfers = concurrent.futures.ThreadPoolExecutor(TRANSFER_THREADS, thread_name_prefix="fetch")

    async def aclose(self) -> None:
        tasks = [f.task for f in self._fills.values() if f.task] + list(self._ssd_jobs.values())
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        self._transfers.shutdown(wait=False)  # idle: every transfer thread was waited for above
        for s in self._stores.values():
            await s.aclose()

    def _store(self, ref: ModelRef) -> Store:
        store = self._stores.get(ref.store.uri)
        if store is None:
            store = self._stores[ref.store.uri] = open_store(ref.store, self.config)
        return store

    def in_flight(self) -> dict[str, str]:
        """Model URI -> the tier being filled ("dram" or "ssd"), for every fill under way."""
        out = {ref.uri: "ssd" for ref in self._job_refs.values()}
        out.update({f.ref.uri: "dram" for f in self._fills.values() if not f.done.done()})
        return out

    def _succeeded(self, ref: ModelRef) -> None:
        if self.failures.pop(ref.uri, None) is not None:
            self._on_progress()

    # -- entry points --------------------------------------------------------------------------

    def fill_dram(self, ref: ModelRef) -> Fill:
        """The DRAM fill of ref: a completed one on a hit, the one under way, or a new one."""
        key = ref.key
        entry = self.dram.ready(key)
        if entry is not None:
            self.metrics.hits.labels("dram").inc()
            self.dram.touch(key)
            directory = self.dram.path(key)
            layout = Layout(directory, fmt.read_index(directory), dict(entry.files), "dram")
            self._succeeded(ref)
            return Fill.completed(ref, self.dram, entry, layout)
        fill = self._fills.get(key)
        if fill is not None and not fill.done.done():  # a finished fill whose entry is gone is stale
            self.metrics.joins.labels("dram").inc()
            return fill
        self.metrics.misses.labels("dram").inc()
        fill = self._fills[key] = Fill(ref, self.dram)
        fill.task = asyncio.create_task(self._run_dram(ref, fill), name=f"dram-fill {ref.uri}")
        self._on_progress()  # a new fill: the inventory's watchers see it pending
        return fill

    async def fill_ssd(self, ref: ModelRef) -> str:
        """Make sure the SSD tier holds ref; returns where it came from ("ssd" hit or "remote")."""
        key = ref.key
        while True:
            if self.ssd.ready(key) is not None:
                self.metrics.hits.labels("ssd").inc()
                self.ssd.touch(key)
                self._succeeded(ref)
                return "ssd"
            job = self._ssd_jobs.get(key)
            if job is not None:
                self.metrics.joins.labels("ssd").inc()
                await asyncio.shield(job)
                continue
            self.metrics.misses.labels("ssd").inc()
            await asyncio.shield(self._start_remote(ref, None))
            self._succeeded(ref)
            return "remote"

    def _start_remote(self, ref: ModelRef, fill: Fill | None) -> asyncio.Task[None]:
        key = ref.key
        task = asyncio.create_task(self._fetch_remote(ref, fill), name=f"fetch {ref.uri}")
        self._ssd_jobs[key] = task
        self._job_refs[key] = ref

        def done(t: asyncio.Task[None]) -> None:
            if self._ssd_jobs.get(key) is t:
                del self._ssd_jobs[key]
                self._job_refs.pop(key, None)

        task.add_done_callback(done)
        self._on_progress()
        return task

    async def _run_dram(self, ref: ModelRef, fill: Fill) -> None:
        key = ref.key
        try:
            while not fill.done.done():
                if self.ssd.ready(key) is not None:
                    self.metrics.hits.labels("ssd").inc()
                    await self._ssd_to_dram.fill(ref, fill)
                    break
                job = self._ssd_jobs.get(key)
                if job is None:
                    self.metrics.misses.labels("ssd").inc()
                    job = self._start_remote(ref, fill)
                # A remote fetch that fills DRAM too finishes the fill before its SSD copy is
                # flushed and published: stop waiting as soon as either happens.
                await asyncio.wait({job, fill.done}, return_when=asyncio.FIRST_COMPLETED)
                if job.done() and not fill.done.done():
                    job.result()  # raises the fetch's error
            self._succeeded(ref)
        except BaseException as exc:
            self._failed(ref, "dram", exc)
            fill.fail(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            if self._fills.get(key) is fill:
                del self._fills[key]

    def _failed(self, ref: ModelRef, hop: str, exc: BaseException) -> None:
        kind = type(exc).__name__ if isinstance(exc, LoaderError) else "Cancelled" \
            if isinstance(exc, asyncio.CancelledError) else "Internal"
        self.metrics.failures.labels(kind).inc()
        _log.warning("fill failed", checkpoint=ref.uri, hop=hop, error=kind, detail=str(exc))
        if kind != "Cancelled":
            self.failures.pop(ref.uri, None)
            self.failures[ref.uri] = Failure(kind, str(exc) or kind, time.time())
            while len(self.failures) > MAX_FAILURES:
                self.failures.popitem(last=False)
            self._on_progress()

    # -- remote -> SSD (+ DRAM) ----------------------------------------------------------------

    async def _meta(self, store: Store, ref: ModelRef, name: str) -> bytes | None:
        try:
            return await self._retrying(store, lambda: store.read_all(ref, name, MAX_META_BYTES))
        except NotFound:
            return None

    async def _retrying(self, store: Store, call: Callable[[], Awaitable[T]]) -> T:
        """A whole small request (HEAD, metadata file) with the transient-failure retries."""
        attempt = 0
        while True:
            try:
                return await call()
            except StoreUnavailable as exc:
                attempt += 1
                if attempt > self.config.retries:
                    raise
                self.metrics.retries.labels(store.root.uri).inc()
                _log.info("retrying", store=store.root.uri, attempt=attempt, error=str(exc))
                await asyncio.sleep(self.config.retry_backoff_s * 2 ** (attempt - 1))

    async def _aux(self, store: Store, ref: ModelRef) -> dict[str, bytes]:
        found = await asyncio.gather(*(self._meta(store, ref, name) for name in AUX_FILES))
        return {name: data for name, data in zip(AUX_FILES, found, strict=True) if data is not None}

    async def _fetch_remote(self, ref: ModelRef, fill: Fill | None) -> None:
        store = self._store(ref)
        try:
            raw = await self._meta(store, ref, fmt.INDEX_NAME)
            if raw is None:
                await self._fetch_hf(store, ref)
                return
            try:
                index = fmt.parse_index(raw)
            except fmt.FormatError as exc:
                raise CorruptData(f"{store.location(ref, fmt.INDEX_NAME)}: {exc}") from exc
            aux = await self._aux(store, ref)
            await self._fetch_checkpoint(store, ref, raw, index, aux, fill)
        except BaseException as exc:
            self._failed(ref, "remote", exc)
            raise

    async def _fetch_checkpoint(self, store: Store, ref: ModelRef, raw: bytes, index: fmt.Index,
                                aux: dict[str, bytes], fill: Fill | None) -> None:
        """Download into DRAM when an instance waits (then copy DRAM -> SSD off the critical
        path), else straight into the SSD staging directory; publish each copy once verified.
        With an instance waiting, an SSD tier that has no room (its disk full of other data, or
        every entry in use) costs the SSD copy, not the cold start: the checkpoint goes to DRAM
        only, and so does one whose SSD copy fails to write (ENOSPC)."""
        key = ref.key
        small = {fmt.INDEX_NAME: raw, **aux}
        files = {**{n: len(d) for n, d in small.items()}, **{p.file: p.size for p in index.partitions}}
        total = sum(files.values())
        dram_dir: Path | None = None
        if fill is not None:
            fill.attach(await self.dram.reserve_when_free(key, ref.uri, total, self.config.timeout_s,
                                                          self.config.lease_wait_s))
            dram_dir = self.dram.path(key)
        staging: Path | None = None
        try:
            self.ssd.reserve(key, ref.uri, total)
            staging = self.ssd.staging_dir(key)
        except TierFull as exc:
            if fill is None:
                raise
            _log.warning("no room in the SSD tier: the checkpoint goes to DRAM only", checkpoint=ref.uri,
                         bytes=total, error=str(exc)[:300])
        except BaseException:
            if fill is not None:
                self.dram.abort(key)
            raise
        target_dir = dram_dir or staging
        assert target_dir is not None  # no DRAM fill means an SSD reservation (or a raise above)
        fds: list[int] = []
        dram_done = False
        try:
            for d in {d for d in (staging, target_dir) if d is not None}:
                d.mkdir(parents=True, exist_ok=True)
                for name, data in small.items():
                    _write_file(d / name, data)
            parts = index.partitions
            fds = [create_file(target_dir / p.file, p.size) for p in parts]
            wm = Watermarks([p.size for p in parts], [p.block_size for p in parts])
            if fill is not None and dram_dir is not None:
                fill.ready(Layout(dram_dir, index, files, "remote"), wm)
            targets = [Target(p.file, p.size, p.block_size, p.checksums, [fds[i]],
                               functools.partial(self._block_done, wm, i, key=key, to_dram=fill is not None))
                       for i, p in enumerate(parts)]
            self.metrics.fetches.labels("remote").inc()
            t0 = time.perf_counter()
            await self._download(store, ref, targets)
            seconds = time.perf_counter() - t0
            if not wm.complete:  # every block verified, or nothing is published
                raise CorruptData(f"{ref.uri}: the download ended with unverified blocks ({wm.filled} of {wm.sizes})")
            self.profile.observe(f"remote:{store.root.uri}", index.total_bytes, seconds)
            self.metrics.transfer("remote", index.total_bytes, seconds)
            _log.info("fetched", checkpoint=ref.uri, bytes=index.total_bytes, seconds=round(seconds, 3),
                      to="dram" if fill else "ssd")
            while fds:
                os.close(fds.pop())
            if fill is not None and dram_dir is not None:
                self.dram.publish(key, dram_dir, files)
                dram_done = True
                fill.finish()
                if staging is not None:
                    await self._copy_to_ssd(ref, dram_dir, staging, [p.file for p in parts])
            if staging is not None:
                await in_thread(_fsync_all, [staging / n for n in files])
                self.ssd.publish(key, staging, files)
        except DiskError as exc:
            if staging is not None:
                self.ssd.abort(key, staging)
            if not dram_done:
                if fill is not None:
                    self.dram.abort(key)
                raise
            _log.warning("the SSD copy failed: the checkpoint stays in DRAM only", checkpoint=ref.uri,
                         error=str(exc)[:300])
        except BaseException:
            if staging is not None:
                self.ssd.abort(key, staging)
            if fill is not None and not dram_done:
                self.dram.abort(key)
            raise
        finally:
            for fd in fds:
                os.close(fd)

    async def _copy_to_ssd(self, ref: ModelRef, dram_dir: Path, staging: Path, names: list[str]) -> None:
        """The SSD copy of a checkpoint just verified in DRAM, made by the kernel (sendfile), with the
        DRAM entry pinned meanwhile; the instance already has its bytes, so this is off its path."""
        entry = self.dram.entries[ref.key]
        self.dram.add_reader(ref.key, 1)
        try:
            t0 = time.perf_counter()
            for name in names:
                await in_thread(shutil.copyfile, dram_dir / name, staging / name)
            self.metrics.transfer("dram_to_ssd", sum((staging / n).stat().st_size for n in names),
                                  time.perf_counter() - t0)
        except OSError as exc:
            raise DiskError(f"writing the SSD copy of {ref.uri}: {exc.strerror or exc}") from exc
        finally:
            if self.dram.entries.get(ref.key) is entry:
                self.dram.add_reader(ref.key, -1)

    def _block_done(self, wm: Watermarks, partition: int, block: int, *, key: str, to_dram: bool) -> None:
        wm.mark_block(partition, block)
        self.ssd.progress(key, wm.total)  # (no-op without an SSD entry: a DRAM-only fetch)
        if to_dram:
            self.dram.progress(key, wm.total)
        self._on_progress()

    async def _download(self, store: Store, ref: ModelRef, targets: list[Target]) -> None:
        spans = collections.deque(plan_spans([t.size for t in targets], [t.block_size for t in targets],
                                             self.config.chunk_bytes))

        async def worker() -> None:
            while spans:
                span = spans.popleft()
                await self._fetch_span(store, ref, targets[span.target], span)

        await all_or_first_error([worker() for _ in range(min(self.config.connections, len(spans)))])

    async def _fetch_span(self, store: Store, ref: ModelRef, t: Target, span: Span) -> None:
        """One range request with resume after transient failures and per-block verification."""
        where = store.location(ref, t.name)
        read_into = store.blocking_reader()
        loop = asyncio.get_running_loop()

        def posted(block: int) -> None:  # from the transfer thread: the bookkeeping belongs to the loop
            loop.call_soon_threadsafe(t.on_block, block)

        w = SpanWriter(t, span, t.on_block if read_into is None else posted, where)
        attempts = corrupt = 0
        while w.pos < span.end:
            try:
                await self._transfer(store, ref, w, read_into)
                if w.pos < span.end:
                    raise StoreUnavailable(f"{where}: the response ended at byte {w.pos}, expected {span.end}")
            except StoreUnavailable as exc:
                attempts += 1
                if attempts > self.config.retries:
                    raise type(exc)(f"{exc} (gave up after {attempts} attempts)") from exc
                self.metrics.retries.labels(store.root.uri).inc()
                _log.info("resuming range", checkpoint=ref.uri, file=t.name, offset=w.pos, attempt=attempts,
                          error=str(exc))
                await asyncio.sleep(self.config.retry_backoff_s * 2 ** (attempts - 1))
            except BadBlock as bad:
                corrupt += 1
                if corrupt > CORRUPT_RETRIES:
                    raise CorruptData(
                        f"{where}: block {bad.block} at offset {bad.offset} has crc32c {bad.actual:#010x}, "
                        f"the index records {bad.expected:#010x} (the store's copy is corrupt)") from None
                _log.warning("checksum mismatch, fetching the block again", checkpoint=ref.uri, file=t.name,
                             block=bad.block)
                w.restart_block()

    async def _transfer(self, store: Store, ref: ModelRef, w: SpanWriter, read_into: BlockingRead | None) -> None:
        """One request for the rest of the span: in a transfer thread with the store's blocking
        reader (the writer's block completions are posted back to the loop), else through the loop."""
        if read_into is None:
            async for data in store.read(ref, w.target.name, w.pos, w.end):
                w.write(data)
            return
        cancel = Cancel()
        await in_thread(read_into, ref, w.target.name, w.pos, w.end, w.write, cancel, cancel=cancel,
                         executor=self._transfers)

    # -- plain Hugging Face checkpoints: download once, convert on the node --------------------

    async def _hf_weights(self, store: Store, ref: ModelRef) -> dict[str, bytes | None]:
        """Weight files of a plain HF checkpoint: {name: bytes of small index files, None for weights}."""
        for idx_name in HF_WEIGHT_INDEXES:
            raw = await self._meta(store, ref, idx_name)
            if raw is None:
                continue
            return {idx_name: raw, **dict.fromkeys(weight_files(raw, store.location(ref, idx_name)))}
        for name in (*HF_SINGLE_WEIGHTS, GGUF_FILE):
            if await self._retrying(store, functools.partial(store.size, ref, name)) is not None:
                return {name: None}
        raise NotFound(f"{ref.uri}: the store has neither {fmt.INDEX_NAME} nor Hugging Face weights "
                       f"(looked for {', '.join(HF_WEIGHT_INDEXES + HF_SINGLE_WEIGHTS + (GGUF_FILE,))} under "
                       f"{store.location(ref, '')})")

    async def _fetch_hf(self, store: Store, ref: ModelRef) -> None:
        key = ref.key
        aux = await self._aux(store, ref)
        if "config.json" in aux:
            weights = await self._hf_weights(store, ref)
        elif await self._retrying(store, functools.partial(store.size, ref, GGUF_FILE)) is not None:
            weights = {GGUF_FILE: None}  # the converter writes its config and tokenizer
        else:
            raise NotFound(f"{ref.uri}: neither {fmt.INDEX_NAME} nor config.json nor {GGUF_FILE} found under "
                           f"{store.location(ref, '')}")
        sizes: dict[str, int] = {}
        for name, data in weights.items():
            size = len(data) if data is not None else \
                await self._retrying(store, functools.partial(store.size, ref, name))
            if size is None:
                raise NotFound(f"{store.location(ref, name)}: listed in the weight index but not found")
            sizes[name] = size
        source_bytes = sum(sizes.values()) + sum(len(d) for d in aux.values())
        self.ssd.reserve(key, ref.uri, 2 * source_bytes)  # the download and its converted copy
        staging = self.ssd.staging_dir(key)
        src, out = staging / "hf", staging / "checkpoint"
        try:
            src.mkdir()
            for name, data in {**aux, **{n: d for n, d in weights.items() if d is not None}}.items():
                _write_file(src / name, data)
            big = [n for n, d in weights.items() if d is None]
            fds = [create_file(src / n, sizes[n]) for n in big]
            try:
                targets = [Target(n, sizes[n], self.config.chunk_bytes, None, [fd], lambda b: None)
                           for n, fd in zip(big, fds, strict=True)]
                self.metrics.fetches.labels("remote").inc()
                t0 = time.perf_counter()
                await self._download(store, ref, targets)
                seconds = time.perf_counter() - t0
            finally:
                for fd in fds:
                    os.close(fd)
            nbytes = sum(sizes[n] for n in big)
            self.profile.observe(f"remote:{store.root.uri}", nbytes, seconds)
            self.metrics.transfer("remote", nbytes, seconds)
            if GGUF_FILE in weights:  # dequantized, the checkpoint outgrows twice the download
                self.ssd.resize(key, source_bytes + await gguf_output_bytes(ref, src / GGUF_FILE))
            await convert_on_node(ref, src, out)
            shutil.rmtree(src)
            files = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file() and not p.name.startswith(".")}
            self.ssd.resize(key, sum(files.values()))
            self.ssd.publish(key, out, files)
            shutil.rmtree(staging, ignore_errors=True)
        except BaseException:
            self.ssd.abort(key, staging)
            raise

    # -- SSD -> DRAM ---------------------------------------------------------------------------
