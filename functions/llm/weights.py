"""Where the weights come from: one seam, `WeightsSource.acquire()`.

A source yields, for as long as the instance uses the model, a directory that
`sllm_knative.loading.load_model` accepts: a checkpoint in the loading-optimised format
(docs/format.md) or a plain Hugging Face directory.

- `LocalDirectory`: a directory on disk (`--model DIR`).
- `LeasedCheckpoint`: a checkpoint leased from the node's loader sidecar (`--checkpoint URI
  --loader ADDRESS`): the instance asks the loader for the DRAM-tier copy (`Acquire`), holds the
  lease until it exits, and loads the copy following the fill's watermark. On a `cuda` device
  its `follow` is the lease's `wait`, so the copy to the device runs right behind the fill
  (`load_model(..., follow=...)`); on the CPU it waits for the complete, verified copy and the
  instance maps those tmpfs files without a copy. The lease's timing goes to a JSON file
  (`--lease-timing`), which the local backend reads for the load-time model and benchmarks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sllm_knative import atomic
from sllm_knative.log import Logger

if TYPE_CHECKING:
    from functions.llm.config import ServeConfig

Follow = Callable[[int, int], int]  # (partition, nbytes) -> watermark, once that much is filled


class WeightsSource(Protocol):
    @property
    def follow(self) -> Follow | None:
        """Set when the checkpoint is still being filled: waits for its watermark."""
        ...

    def request(self) -> None:
        """Start getting the weights, without waiting (called before the imports)."""
        ...

    def acquire(self) -> contextlib.AbstractContextManager[Path]:
        """A context manager whose value is the model directory, valid until it exits."""
        ...


@dataclasses.dataclass(frozen=True)
class LocalDirectory:
    path: Path
    follow: Follow | None = None

    def request(self) -> None:
        pass

    @contextlib.contextmanager
    def acquire(self) -> Iterator[Path]:
        if not self.path.is_dir():
            raise FileNotFoundError(2, "model directory does not exist", str(self.path))
        yield self.path


class LeaseFailed(RuntimeError):
    """The loader could not lease the checkpoint, or its fill failed; names both."""


@dataclasses.dataclass
class LeasedCheckpoint:
    """The checkpoint `checkpoint`, leased from the loader sidecar at `loader` for the instance's
    lifetime (released when `acquire`'s context exits, or with the process: the lease is a gRPC
    stream). `follow` is set once the lease is granted, for a `cuda` device.

    The lease timing (requested, granted, complete: when the loader's fill completed, not when
    the instance looked) is written by a thread that follows the fill from the grant on."""

    loader: str
    checkpoint: str
    device: str = "cpu"
    instance: str = ""
    timing_path: Path | None = None
    log: Logger | None = None
    follow: Follow | None = dataclasses.field(default=None, init=False)
    _client: Any = dataclasses.field(default=None, init=False, repr=False)
    _lease: Any = dataclasses.field(default=None, init=False, repr=False)
    _recorded: threading.Event = dataclasses.field(default_factory=threading.Event, init=False, repr=False)

    def _failed(self, exc: BaseException, what: str = "refused the lease") -> LeaseFailed:
        return LeaseFailed(f"checkpoint {self.checkpoint!r}: the loader at {self.loader} {what}: {exc}")

    def request(self) -> None:
        """Take the lease now: the grant comes as soon as the loader has sized the DRAM-tier files,
        and the loader fills them meanwhile (while a fresh process imports torch)."""
        from sllm_knative.loader.client import LoaderClient
        from sllm_knative.loader.errors import LoaderError

        if self._lease is not None:
            return
        requested = time.time()
        client = LoaderClient(self.loader)
        try:
            lease = client.acquire(self.checkpoint, device=self.device, instance=self.instance)
        except LoaderError as exc:
            client.close()
            raise self._failed(exc) from None
        self._client, self._lease = client, lease
        threading.Thread(target=self._record, args=(lease, requested, time.time()), name="lease-timing",
                         daemon=True).start()

    @contextlib.contextmanager
    def acquire(self) -> Iterator[Path]:
        from sllm_knative.loader.errors import LoaderError

        self.request()
        lease = self._lease
        try:
            if self.device.startswith("cuda"):  # the copy to the device follows the fill
                def wait(partition: int, nbytes: int) -> int:
                    try:
                        return int(lease.wait(partition, nbytes))
                    except LoaderError as exc:
                        raise self._failed(exc, "could not fill it") from None

                self.follow = wait
            else:  # the CPU maps the DRAM-tier files, which needs them whole
                try:
                    lease.wait_complete()
                except LoaderError as exc:
                    raise self._failed(exc, "could not fill it") from None
                self._recorded.wait(timeout=10.0)  # the timing is on disk before the instance is ready
            yield Path(lease.directory)
        finally:
            lease.release()
            self._client.close()
            self._lease = self._client = None

    def _record(self, lease: Any, requested: float, granted: float) -> None:
        """Once the fill completes: write the lease timing and log it (a failed fill is reported
        by the load that waits for it)."""
        try:
            lease.wait_complete()
            done = time.time()
            if self.timing_path:
                atomic.write_json(self.timing_path, {
                    "lease_requested": requested, "lease_granted": granted, "lease_complete": done,
                    "source": lease.source, "bytes": lease.total_bytes,
                    "followed": self.device.startswith("cuda")}, durable=False)
            if self.log:
                self.log.info("lease complete", lease=lease.id, checkpoint=lease.model, loader=self.loader,
                              source=lease.source, bytes=lease.total_bytes, seconds=round(done - requested, 3))
        except Exception as exc:
            if self.log:
                self.log.debug("lease timing not recorded", checkpoint=self.checkpoint, error=str(exc))
        finally:
            self._recorded.set()


def source_for(cfg: ServeConfig, log: Logger | None = None) -> WeightsSource:
    """The configured source: a lease from the loader (`--checkpoint`), else `--model DIR`."""
    if cfg.checkpoint:
        return LeasedCheckpoint(cfg.loader or "", cfg.checkpoint, cfg.device, cfg.instance or "",
                                cfg.lease_timing, log)
    assert cfg.model_dir is not None  # config.validate: one of the two
    return LocalDirectory(cfg.model_dir)


def load(path: Path, device: str, follow: Follow | None = None) -> tuple[Any, Any]:
    """(model in eval mode on device, tokenizer) from a model directory."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from sllm_knative.loading import load_model

    hf_logging.disable_progress_bar()
    model = load_model(path, device, follow=follow)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer


def checkpoint_dtype(model: Any) -> str:
    """The dtype of the model's first floating-point parameter, as a torch dtype's name."""
    for p in model.parameters():
        if p.is_floating_point():
            return str(p.dtype).removeprefix("torch.")
    return "float32"


def cast_parameters(model: Any, dtype: Any) -> int:
    """Cast the model's floating-point parameters to `dtype` in place, one tensor at a time;
    returns how many were cast.

    Memory stays bounded by the model in the new dtype plus one tensor: each parameter's new
    data replaces the old before the next is converted (the old is freed then, or stays the
    mapped checkpoint file it was a view of). Parameters shared between modules (tied
    embeddings) are one Parameter object and are cast once, so they stay shared. Buffers (the
    rotary frequencies) keep their dtype: they are computed in float32 by design.
    """
    import torch

    cast = 0
    with torch.no_grad():
        for p in model.parameters():  # each shared Parameter once
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
                cast += 1
    return cast


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """Token ids that end a generation: the generation config's, else the tokenizer's."""
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    value = getattr(gen, "eos_token_id", None)
    if value is None:
        value = getattr(tokenizer, "eos_token_id", None)
    if isinstance(value, int):
        ids.add(value)
    elif isinstance(value, (list, tuple)):
        ids.update(int(v) for v in value)
    return ids
