"""Where the weights come from: one seam, `WeightsSource.acquire()`.

A source yields, for as long as the instance uses the model, a directory that
`sllm_knative.loading.load_model` accepts: a checkpoint in the loading-optimised format
(docs/format.md) or a plain Hugging Face directory. Today the only source is a local
directory (`LocalDirectory`). A lease from the node's loader sidecar (the DRAM-tier copy,
held for the instance's lifetime) plugs in here as a second `WeightsSource` whose context
manager takes the lease on entry and returns it on exit; nothing else changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol


class WeightsSource(Protocol):
    def acquire(self) -> contextlib.AbstractContextManager[Path]:
        """A context manager whose value is the model directory, valid until it exits."""
        ...


@dataclasses.dataclass(frozen=True)
class LocalDirectory:
    path: Path

    @contextlib.contextmanager
    def acquire(self) -> Iterator[Path]:
        if not self.path.is_dir():
            raise FileNotFoundError(2, "model directory does not exist", str(self.path))
        yield self.path


def load(path: Path, device: str) -> tuple[Any, Any]:
    """(model in eval mode on device, tokenizer) from a model directory."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from sllm_knative.loading import load_model

    hf_logging.disable_progress_bar()
    model = load_model(path, device)
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
