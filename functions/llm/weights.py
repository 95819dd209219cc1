"""Where the weights come from: one seam, `WeightsSource.acquire()`.

A source yields, for as long as the instance uses the model, a directory that
`sllm_knative.loading.load_model` accepts: a checkpoint in the loading-optimised format
(docs/format.md) or a plain Hugging Face directory.

- `LocalDirectory`: a directory on disk (the default, `--model DIR`).
- `FilledCheckpoint`: the DRAM-tier copy the node's loader sidecar is still filling under a
  lease (the local cluster's zygote takes the lease for a GPU instance, sllm_knative/local/
  zygote.py); its `follow` is the lease's watermark wait, so the copy to the device runs right
  behind the fill (`load_model(..., follow=...)`) instead of after it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

Follow = Callable[[int, int], int]  # (partition, nbytes) -> watermark, once that much is filled


class WeightsSource(Protocol):
    @property
    def follow(self) -> Follow | None:
        """Set when the checkpoint is still being filled: waits for its watermark."""
        ...

    def acquire(self) -> contextlib.AbstractContextManager[Path]:
        """A context manager whose value is the model directory, valid until it exits."""
        ...


@dataclasses.dataclass(frozen=True)
class LocalDirectory:
    path: Path
    follow: Follow | None = None

    @contextlib.contextmanager
    def acquire(self) -> Iterator[Path]:
        if not self.path.is_dir():
            raise FileNotFoundError(2, "model directory does not exist", str(self.path))
        yield self.path


@dataclasses.dataclass(frozen=True)
class FilledCheckpoint:
    """A DRAM-tier directory the loader is still filling; `follow` waits for its watermark."""

    path: Path
    follow: Follow | None

    @contextlib.contextmanager
    def acquire(self) -> Iterator[Path]:
        yield self.path


def load(path: Path, device: str, follow: Follow | None = None) -> tuple[Any, Any]:
    """(model in eval mode on device, tokenizer) from a model directory."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from sllm_knative.loading import load_model

    hf_logging.disable_progress_bar()
    model = load_model(path, device, follow=follow)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer


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
